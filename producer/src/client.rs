//! The publisher: validation, id minting, partitioning and the Kafka write,
//! shared by the HTTP API and by services that link this crate to publish
//! straight to Kafka.
//!
//! ```no_run
//! # async fn demo() -> Result<(), producer::PublishError> {
//! use producer::Publisher;
//! let kafka = service::config::KafkaConfig::default();
//! let publisher = Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), std::time::Duration::from_secs(10))?;
//! let body = br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6}"#;
//! let id = publisher.publish(body).await?; // resolves once the broker acknowledged it
//! println!("published {id}");
//! # Ok(()) }
//! ```

use std::{sync::Arc, time::Duration};

use proto::{
    EventId, EventLimits, FieldError, PreparedEvent, Registry,
    delivery::{H_EVENT_ID, H_EVENT_TYPE},
    namespace::{NamespaceRecord, NamespaceRef},
    topics::Topics,
};
use rdkafka::{
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
};
use service::config::KafkaConfig;

/// Why a publish did not happen; the variant says what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The input is wrong: fix it, do not retry.
    #[error("invalid input: {}", FieldError::join(.0))]
    Invalid(Vec<FieldError>),
    /// Kafka did not take it in time: retry later.
    #[error("Kafka did not acknowledge the write: {0}")]
    Unavailable(KafkaError),
    /// The client could not be built: a configuration problem.
    #[error("cannot create the Kafka producer: {0}")]
    Setup(KafkaError),
}

fn timed_out() -> PublishError {
    PublishError::Unavailable(KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::MessageTimedOut))
}

/// An event record's headers: its id and type, for tools that read the
/// topic without parsing payloads.
fn headers(event: &PreparedEvent) -> rdkafka::message::OwnedHeaders {
    let mut digits = itoa::Buffer::new();
    let id = event.id.text(&mut digits);
    service::kafka::headers([(H_EVENT_ID, id.as_bytes()), (H_EVENT_TYPE, event.event_type.as_bytes())])
}

/// Publishes events, namespace records and destination records to Kafka.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topics: Topics,
    /// `topics.events()`, named once.
    events_topic: Arc<str>,
    registry: Arc<Registry>,
    limits: EventLimits,
    timeout: Duration,
    keyring: Option<Arc<proto::seal::Keyring>>,
}

impl Publisher {
    /// A publisher on `kafka`, validating against `registry`. `timeout`
    /// bounds how long one write may wait for the broker.
    pub fn new(
        kafka: &KafkaConfig,
        registry: Registry,
        limits: EventLimits,
        timeout: Duration,
    ) -> Result<Self, PublishError> {
        let topics = Topics::new(kafka.topic_prefix.clone());
        Ok(Self {
            producer: service::kafka::producer(kafka, timeout).map_err(PublishError::Setup)?,
            events_topic: topics.events().into(),
            topics,
            registry: Arc::new(registry),
            limits,
            timeout,
            keyring: None,
        })
    }

    /// Seals destinations' secrets with `keyring` before writing them.
    pub fn with_keyring(mut self, keyring: Option<Arc<proto::seal::Keyring>>) -> Self {
        self.keyring = keyring;
        self
    }

    /// The event-type registry in use.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The topics written to.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Validates and completes one event without publishing it.
    pub fn prepare(&self, bytes: &[u8]) -> Result<PreparedEvent, Vec<FieldError>> {
        proto::event::prepare(bytes, &self.registry, &self.limits, time::OffsetDateTime::now_utc())
    }

    /// Writes a prepared event; resolves once the broker acknowledged it
    /// (acks=all, idempotent producer).
    pub async fn send(&self, event: &PreparedEvent) -> Result<(), PublishError> {
        let key = event.partition_key();
        self.write(self.event_record(event, &key)).await
    }

    /// The record of `event`, keyed by `key` (its partition key).
    fn event_record<'a>(&'a self, event: &'a PreparedEvent, key: &'a str) -> FutureRecord<'a, str, [u8]> {
        FutureRecord::to(&self.events_topic).key(key).payload(&event.bytes[..]).headers(headers(event))
    }

    /// Writes prepared events, each result in the order given; resolves
    /// once the broker acknowledged (or refused) every one. All are handed
    /// to the producer first, so they travel in as few batches as the
    /// partitions allow; an event the producer's queue had no room for
    /// waits for room as [`Self::send`] does.
    pub async fn send_all(&self, events: &[PreparedEvent]) -> Vec<Result<(), PublishError>> {
        // One key buffer for the whole request: the producer copies it.
        let mut key = String::new();
        let sent: Vec<_> = events
            .iter()
            .map(|event| {
                proto::event::write_partition_key(&mut key, &event.entity_type, event.entity_id);
                self.producer.send_result(self.event_record(event, &key)).ok()
            })
            .collect();
        // Each acknowledgement comes within the delivery timeout; the bound
        // on the whole is a guard against a stuck client, as in `write`.
        let deadline = tokio::time::Instant::now() + self.timeout * 3;
        let mut results = Vec::with_capacity(events.len());
        for (event, sent) in events.iter().zip(sent) {
            results.push(match sent {
                Some(ack) => match tokio::time::timeout_at(deadline, ack).await {
                    Ok(Ok(Ok(_))) => Ok(()),
                    Ok(Ok(Err((e, _)))) => Err(PublishError::Unavailable(e)),
                    Ok(Err(_)) | Err(_) => Err(timed_out()),
                },
                None => self.send(event).await,
            });
        }
        results
    }

    /// Validates, completes and publishes one event.
    pub async fn publish(&self, bytes: &[u8]) -> Result<EventId, PublishError> {
        let event = self.prepare(bytes).map_err(PublishError::Invalid)?;
        self.send(&event).await?;
        Ok(event.id)
    }

    /// Writes (or, with `None`, deletes) a namespace record.
    pub async fn put_namespace(&self, of: NamespaceRef, record: Option<&NamespaceRecord>) -> Result<(), PublishError> {
        let payload = match record {
            Some(r) => {
                r.validate(of).map_err(|e| PublishError::Invalid(vec![e]))?;
                Some(
                    serde_json::to_vec(r)
                        .map_err(|e| PublishError::Invalid(vec![FieldError::new("(record)", e.to_string())]))?,
                )
            }
            None => None,
        };
        let topic = self.topics.namespaces();
        let key = of.to_string();
        let mut record = FutureRecord::<String, Vec<u8>>::to(&topic).key(&key);
        if let Some(p) = &payload {
            record = record.payload(p);
        }
        self.write(record).await
    }

    /// Writes a destination record (validated by the caller).
    pub async fn put_destination(&self, destination: &proto::destination::Destination) -> Result<(), PublishError> {
        let invalid =
            |e: serde_json::Error| PublishError::Invalid(vec![FieldError::new("(destination)", e.to_string())]);
        let mut value = serde_json::to_value(destination).map_err(invalid)?;
        if let Some(keyring) = &self.keyring {
            proto::seal::seal_destination(&mut value, keyring);
        }
        let payload = serde_json::to_vec(&value).map_err(invalid)?;
        let topic = self.topics.destinations();
        self.write(FutureRecord::to(&topic).key(&destination.id).payload(&payload)).await
    }

    /// Deletes a destination: a tombstone for its id.
    pub async fn delete_destination(&self, id: &str) -> Result<(), PublishError> {
        let topic = self.topics.destinations();
        self.write(FutureRecord::<str, [u8]>::to(&topic).key(id)).await
    }

    async fn write<K, P>(&self, record: FutureRecord<'_, K, P>) -> Result<(), PublishError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        // The queue wait and the delivery timeout together stay within twice
        // `timeout`; the outer bound is a guard against a stuck client.
        let send = self.producer.send(record, self.timeout);
        match tokio::time::timeout(self.timeout * 3, send).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(PublishError::Unavailable(e)),
            Err(_) => Err(timed_out()),
        }
    }

    /// Waits for queued writes, up to `deadline`.
    pub fn flush(&self, deadline: Duration) {
        use rdkafka::producer::Producer as _;
        if let Err(e) = self.producer.flush(deadline) {
            tracing::warn!(error = %e, "producer flush incomplete at shutdown");
        }
    }
}
