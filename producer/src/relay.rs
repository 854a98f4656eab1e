//! The relay: publishes the audit event of every destination change
//! (SPEC §5).
//!
//! The destination API writes a change and its audit event as one record:
//! the destination record (or tombstone) in `audit.destinations`, carrying
//! the complete event, id included, in its [`H_AUDIT_EVENT`] header
//! ([`crate::Publisher::change_destination`]). The API answers once Kafka
//! acknowledged that record, so no change stands without its audit event,
//! whenever the producer stops.
//!
//! This consumer group reads `audit.destinations` and publishes each
//! header's event to `audit.events`. A record's offset is committed only
//! once Kafka acknowledged the event (or, for a header that is not a valid
//! event, its parking in `audit.events.dlq` with the reason). A producer
//! that stops in between leaves the record to the partition's next owner,
//! which publishes the event again with the same id: receivers deduplicate
//! on it. Records without the header (seeded, or written by earlier
//! releases) are passed over.
//!
//! Compaction must not remove a record before the relay read it: the
//! destinations topic keeps every record for `min.compaction.lag.ms`
//! (docs/OPERATIONS.md), and the group's lag is exported as
//! `auditstream_consumer_lag{group="auditstream-destination-audits"}`.

use std::time::Duration;

use proto::delivery::H_AUDIT_EVENT;
use rdkafka::{Message, consumer::Consumer, message::BorrowedMessage};
use service::{Admin, Shutdown, config::KafkaConfig, consume, kafka};

use crate::{ProducerError, Publisher, config::RelayConfig, metrics::Metrics};

/// Most destination records being relayed at once.
const MAX_IN_FLIGHT: usize = 64;

/// Starts the relay; it runs until `shutdown`.
pub fn start(
    kafka_config: &KafkaConfig,
    config: &RelayConfig,
    grace: Duration,
    publisher: Publisher,
    metrics: Metrics,
    admin: &Admin,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, ProducerError> {
    let limits = consume::LoopLimits { max_in_flight: MAX_IN_FLIGHT, grace };
    let settings =
        kafka::consumer_config(kafka_config, &config.group_id, config.session_timeout, kafka::Path::Background);
    // Not a readiness check: the API's writes do not wait for the relay
    // (the events wait in their records); its lag is watched instead.
    let joined = service::admin::Readiness::default().register("relay.group");
    let (consumer, tracker) = consume::consumer(&settings, limits, joined, &admin.consumer_lag()?)?;
    consumer.subscribe(&[&publisher.topics().destinations()])?;
    tracing::info!(group = %config.group_id, "relaying destination changes' audit events");
    Ok(tokio::spawn(async move {
        consume::run_inline(consumer, tracker, limits, shutdown, |m, done| relay(&publisher, &metrics, m, done)).await;
    }))
}

/// Takes on one destination record: one without an audit event is done at
/// once; one with is done when its event is in Kafka.
fn relay(publisher: &Publisher, metrics: &Metrics, m: &BorrowedMessage<'_>, done: consume::Done) {
    let Some(event) = kafka::header_iter(m).find(|(k, _)| *k == H_AUDIT_EVENT).and_then(|(_, v)| v) else {
        return done.finish();
    };
    let (publisher, metrics) = (publisher.clone(), metrics.clone());
    let at = format!("{}:{}:{}", m.topic(), m.partition(), m.offset());
    let key = m.key().unwrap_or_default().to_vec();
    let event = event.to_vec();
    tokio::spawn(async move {
        match carried(&publisher, &key, &event) {
            Ok(prepared) => {
                // A refusal cannot be for good: Kafka took the destination
                // record, which holds the event and more.
                kafka::until_acknowledged(&at, || publisher.send(&prepared)).await;
                metrics.relayed.with_label_values(&["published"]).inc();
            }
            Err(problem) => {
                let reason = format!("the audit event carried by destination record {at} {problem}");
                tracing::error!(record = %at, %reason, "parking a destination change's audit event");
                kafka::until_acknowledged(&at, || publisher.park(&key, &event, &reason)).await;
                metrics.relayed.with_label_values(&["dead_lettered"]).inc();
            }
        }
        done.finish();
    });
}

/// The event a destination record carries, checked: a valid event, of a
/// destination change's type, about the destination the record is keyed
/// by. Anything else is not relayed.
fn carried(publisher: &Publisher, key: &[u8], event: &[u8]) -> Result<proto::PreparedEvent, String> {
    let prepared =
        publisher.prepare(event).map_err(|errors| format!("is invalid: {}", proto::FieldError::join(&errors)))?;
    if !crate::destinations::is_change_type(&prepared.event_type) {
        return Err(format!("is of type {:?}, not a destination change's", prepared.event_type));
    }
    let target =
        serde_json::from_slice::<serde_json::Value>(&prepared.bytes).ok().and_then(|v| match v.get("target_id") {
            Some(serde_json::Value::String(id)) => Some(id.clone()),
            _ => None,
        });
    if target.as_deref().map(str::as_bytes) != Some(key) {
        return Err(format!("is about destination {target:?}, not the record's {:?}", String::from_utf8_lossy(key)));
    }
    Ok(prepared)
}
