//! Dead-lettered events (`audit.events.dlq`): list them, and replay them
//! into `audit.events` once their cause is fixed (an event type since
//! registered or accepted, a namespace since known).
//!
//! The router parks an event it cannot route, with the reason; nothing in
//! the pipeline reads that topic again by itself. As with deliveries
//! (`deliverer::dlq`), replaying does not remove a record from the
//! dead-letter topic, so replaying the same selection twice routes it
//! twice (receivers deduplicate on the event id). A replayed event the
//! router still cannot route is parked again, with its reason.

use std::time::Duration;

use proto::{
    delivery::{H_REASON, H_REPLAYED_FROM},
    topics::Topics,
};
use rdkafka::{Message, error::KafkaError, message::Header};
pub use service::kafka::Window;
use service::{config::KafkaConfig, kafka};

/// How long the topic must stay quiet before the read counts as complete.
const IDLE: Duration = Duration::from_secs(2);

/// One dead-lettered event.
#[derive(Debug, Clone)]
pub struct ParkedEvent {
    /// Where it is in the dead-letter topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// When it was parked (the record's timestamp, Unix ms).
    pub parked_at_ms: Option<i64>,
    /// Why it was parked.
    pub reason: String,
    /// The event's `id`, when the bytes are a JSON object with one.
    pub event_id: Option<String>,
    /// The event's `event_type`, when readable.
    pub event_type: Option<String>,
    /// The record key (the entity, `entity_type:entity_id`).
    pub key: Option<Vec<u8>>,
    /// The event bytes as written (none or empty for a tombstone: the
    /// router parks one with an empty value).
    pub payload: Option<Vec<u8>>,
    /// The record's other headers, as written by the publisher.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// The `id` and `event_type` of a parked event, as text, when its bytes
/// are a JSON object that has them: a parked event may be anything.
fn identify(payload: &[u8]) -> (Option<String>, Option<String>) {
    // A map, not a struct: serde reads a struct from an array too.
    let Ok(mut object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload) else {
        return (None, None);
    };
    let mut text = |field: &str| match object.remove(field)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    };
    (text("id"), text("event_type"))
}

/// Reads the events' dead-letter topic to its current end and returns the
/// events parked within `window`.
pub async fn read(config: &KafkaConfig, window: Window) -> Result<Vec<ParkedEvent>, KafkaError> {
    let topic = Topics::new(config.topic_prefix.clone()).events_dlq();
    let mut out = Vec::new();
    for m in kafka::read_all(config, &topic, IDLE).await? {
        let parked_at_ms = m.timestamp().to_millis();
        if !window.admits(parked_at_ms) {
            continue;
        }
        let mut reason = String::new();
        let mut headers = Vec::new();
        for (k, v) in kafka::header_iter(&m) {
            match k {
                H_REASON => reason = String::from_utf8_lossy(v.unwrap_or_default()).into_owned(),
                // A record parked again after a replay: the new replay says
                // where it comes from now.
                H_REPLAYED_FROM => {}
                _ => headers.push((k.to_owned(), v.map(<[u8]>::to_vec))),
            }
        }
        let (event_id, event_type) = m.payload().map(identify).unwrap_or_default();
        out.push(ParkedEvent {
            partition: m.partition(),
            offset: m.offset(),
            parked_at_ms,
            reason,
            event_id,
            event_type,
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    // Records come partition by partition: newest last, across them.
    out.sort_by_key(|p| (p.parked_at_ms, p.partition, p.offset));
    Ok(out)
}

/// Writes the selected events back to `audit.events` with their key, bytes
/// and headers as the publisher wrote them, plus `auditstream-replayed-from`.
/// Tombstones (no bytes, or none at all) are skipped: nothing there to
/// route. Returns (replayed, skipped).
pub async fn replay(config: &KafkaConfig, parked: &[ParkedEvent]) -> Result<(usize, usize), KafkaError> {
    let topic = Topics::new(config.topic_prefix.clone()).events();
    let producer = kafka::producer(config, Duration::from_secs(30))?;
    let (mut replayed, mut skipped) = (0, 0);
    for p in parked {
        let Some(payload) = p.payload.as_ref().filter(|b| !b.is_empty()) else {
            skipped += 1;
            continue;
        };
        let from = format!("{}:{}", p.partition, p.offset);
        let headers = || {
            p.headers
                .iter()
                .fold(rdkafka::message::OwnedHeaders::new_with_capacity(p.headers.len() + 1), |h, (key, value)| {
                    h.insert(Header { key, value: value.as_deref() })
                })
                .insert(Header { key: H_REPLAYED_FROM, value: Some(&from) })
        };
        kafka::produce_durably_with(&producer, &topic, p.key.as_deref().unwrap_or_default(), Some(payload), headers)
            .await;
        replayed += 1;
    }
    Ok((replayed, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_event_is_identified_when_it_can_be() {
        assert_eq!(
            identify(br#"{"id":"e-1","event_type":"custom_thing","x":1}"#),
            (Some("e-1".into()), Some("custom_thing".into()))
        );
        assert_eq!(identify(br#"{"id":7}"#), (Some("7".into()), None));
        assert_eq!(identify(b"\xff not json"), (None, None));
        assert_eq!(identify(b"[1,2]"), (None, None));
    }
}
