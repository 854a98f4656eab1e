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

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use proto::{
    EventId, EventLimits, FieldError, PreparedEvent, Registry,
    delivery::{H_AUDIT_EVENT, H_EVENT_ID, H_EVENT_TYPE, H_REASON},
    namespace::{NamespaceRecord, NamespaceRef},
    topics::Topics,
};
use rdkafka::{
    ClientContext,
    error::KafkaError,
    message::ToBytes,
    producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer},
    types::RDKafkaErrorCode,
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
    PublishError::Unavailable(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut))
}

/// How long a write waits before trying again when the producer's queue
/// is full (its acknowledgements make room).
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(10);

/// The producer's context: each acknowledgement (or refusal) is written
/// into the batch its record belongs to. One callback per record, and no
/// channel or future per record: a request's events are waited for
/// together.
struct Acks;

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Box<Ack>) {
        ack.writes.settle(ack.index, result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// A record's place in its batch.
struct Ack {
    writes: Arc<Writes>,
    index: usize,
}

/// The outcomes of a batch of writes, as the acknowledgements come in.
struct Writes {
    /// Per record, in the order given; `None` until it is settled.
    outcomes: Mutex<Vec<Option<Result<(), KafkaError>>>>,
    /// Records not settled yet.
    left: AtomicUsize,
    /// Signalled when the last record is settled.
    settled: tokio::sync::Notify,
}

impl Writes {
    fn new(records: usize) -> Arc<Self> {
        Arc::new(Self {
            outcomes: Mutex::new(vec![None; records]),
            left: AtomicUsize::new(records),
            settled: tokio::sync::Notify::new(),
        })
    }

    /// Records the outcome of record `index`; each record is settled once.
    fn settle(&self, index: usize, outcome: Result<(), KafkaError>) {
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner())[index] = Some(outcome);
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit is kept if nobody waits yet, so the wake is not lost.
            self.settled.notify_one();
        }
    }

    /// Every record's outcome once all are settled or `deadline` passed;
    /// a record still unsettled then timed out.
    async fn outcomes(&self, deadline: tokio::time::Instant) -> Vec<Result<(), PublishError>> {
        if self.left.load(Ordering::Acquire) > 0 {
            let _ = tokio::time::timeout_at(deadline, self.settled.notified()).await;
        }
        let outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        outcomes
            .iter()
            .map(|o| match o {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(PublishError::Unavailable(e.clone())),
                None => Err(timed_out()),
            })
            .collect()
    }
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
    producer: Arc<ThreadedProducer<Acks>>,
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
            producer: Arc::new(
                service::kafka::producer_config(kafka, timeout)
                    .create_with_context(Acks)
                    .map_err(PublishError::Setup)?,
            ),
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
        let mut results = self.send_all(std::slice::from_ref(event)).await;
        results.pop().unwrap_or_else(|| Err(timed_out()))
    }

    /// Writes prepared events, each result in the order given; resolves
    /// once the broker acknowledged (or refused) every one. All are handed
    /// to the producer first, so they travel in as few batches as the
    /// partitions allow; when the producer's queue is full, the rest wait
    /// for room, up to the timeout.
    pub async fn send_all(&self, events: &[PreparedEvent]) -> Vec<Result<(), PublishError>> {
        let writes = Writes::new(events.len());
        let queue_deadline = tokio::time::Instant::now() + self.timeout;
        // One key buffer for the whole request: the producer copies it.
        let mut key = String::new();
        for (index, event) in events.iter().enumerate() {
            proto::event::write_partition_key(&mut key, &event.entity_type, event.entity_id);
            let record =
                BaseRecord::with_opaque_to(&self.events_topic, Box::new(Ack { writes: writes.clone(), index }))
                    .key(key.as_str())
                    .payload(&event.bytes[..])
                    .headers(headers(event));
            self.enqueue(record, queue_deadline).await;
        }
        self.acknowledged(&writes, queue_deadline).await
    }

    /// Every outcome of `writes`, whose records were handed over by
    /// `queue_deadline`. Each acknowledgement comes within the delivery
    /// timeout (the producer's `message.timeout.ms`); the bound on the
    /// whole is a guard against a stuck client.
    async fn acknowledged(
        &self,
        writes: &Writes,
        queue_deadline: tokio::time::Instant,
    ) -> Vec<Result<(), PublishError>> {
        writes.outcomes(queue_deadline + self.timeout * 2).await
    }

    /// Hands `record` to the producer, waiting for room in its queue until
    /// `deadline`. A record the producer does not take is settled here,
    /// with the reason; one it takes, by its acknowledgement.
    async fn enqueue<K, P>(&self, mut record: BaseRecord<'_, K, P, Box<Ack>>, deadline: tokio::time::Instant)
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((e, returned))
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull)
                        && tokio::time::Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, refused)) => {
                    let ack = refused.delivery_opaque;
                    return ack.writes.settle(ack.index, Err(e));
                }
            }
        }
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
        self.write(&topic, key.as_bytes(), payload.as_deref()).await
    }

    /// Writes a destination record (validated by the caller) with no audit
    /// event: for seeding and tools. The API writes every change with its
    /// audit event ([`Self::change_destination`]).
    pub async fn put_destination(&self, destination: &proto::destination::Destination) -> Result<(), PublishError> {
        self.change_destination(&destination.id, Some(destination), None).await
    }

    /// Deletes a destination, with no audit event: a tombstone for its id.
    pub async fn delete_destination(&self, id: &str) -> Result<(), PublishError> {
        self.change_destination(id, None, None).await
    }

    /// Writes destination `id`'s new record (`None`: its tombstone) and, as
    /// the same record's [`H_AUDIT_EVENT`] header, the audit event of the
    /// change: once this resolves, Kafka holds both or neither, and the
    /// relay ([`crate::relay`]) publishes the event to `audit.events`.
    pub async fn change_destination(
        &self,
        id: &str,
        destination: Option<&proto::destination::Destination>,
        audit: Option<&PreparedEvent>,
    ) -> Result<(), PublishError> {
        let payload = match destination {
            Some(d) => {
                let invalid =
                    |e: serde_json::Error| PublishError::Invalid(vec![FieldError::new("(destination)", e.to_string())]);
                let mut value = serde_json::to_value(d).map_err(invalid)?;
                if let Some(keyring) = &self.keyring {
                    proto::seal::seal_destination(&mut value, keyring);
                }
                Some(serde_json::to_vec(&value).map_err(invalid)?)
            }
            None => None,
        };
        let headers = audit.map(|event| service::kafka::headers([(H_AUDIT_EVENT, &event.bytes[..])]));
        let topic = self.topics.destinations();
        self.write_with(&topic, id.as_bytes(), payload.as_deref(), headers).await
    }

    /// Parks `payload` in `audit.events.dlq` under `key`, with `reason`.
    pub(crate) async fn park(&self, key: &[u8], payload: &[u8], reason: &str) -> Result<(), PublishError> {
        let headers = service::kafka::headers([(H_REASON, reason.as_bytes())]);
        self.write_with(&self.topics.events_dlq(), key, Some(payload), Some(headers)).await
    }

    /// Writes one record (`None`: a tombstone) and waits for its
    /// acknowledgement.
    async fn write(&self, topic: &str, key: &[u8], payload: Option<&[u8]>) -> Result<(), PublishError> {
        self.write_with(topic, key, payload, None).await
    }

    /// [`Self::write`], with headers.
    async fn write_with(
        &self,
        topic: &str,
        key: &[u8],
        payload: Option<&[u8]>,
        headers: Option<rdkafka::message::OwnedHeaders>,
    ) -> Result<(), PublishError> {
        let writes = Writes::new(1);
        let mut record =
            BaseRecord::<[u8], [u8], _>::with_opaque_to(topic, Box::new(Ack { writes: writes.clone(), index: 0 }))
                .key(key);
        record.payload = payload;
        record.headers = headers;
        let queue_deadline = tokio::time::Instant::now() + self.timeout;
        self.enqueue(record, queue_deadline).await;
        self.acknowledged(&writes, queue_deadline).await.pop().unwrap_or_else(|| Err(timed_out()))
    }

    /// Waits for queued writes, up to `deadline`.
    pub fn flush(&self, deadline: Duration) {
        if let Err(e) = self.producer.flush(deadline) {
            tracing::warn!(error = %e, "producer flush incomplete at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> KafkaError {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    }

    /// Outcomes land at their own index whatever order they come in, and
    /// one never settled reads as timed out.
    #[tokio::test]
    async fn each_outcome_belongs_to_its_record_and_an_unsettled_one_timed_out() {
        let writes = Writes::new(3);
        writes.settle(2, Err(refused()));
        writes.settle(0, Ok(()));
        let outcomes = writes.outcomes(tokio::time::Instant::now() + Duration::from_millis(50)).await;
        assert!(outcomes[0].is_ok());
        let error = |i: usize| match &outcomes[i] {
            Err(PublishError::Unavailable(e)) => e.rdkafka_error_code(),
            other => panic!("record {i}: {other:?}"),
        };
        assert_eq!(error(1), Some(RDKafkaErrorCode::MessageTimedOut));
        assert_eq!(error(2), Some(RDKafkaErrorCode::MessageSizeTooLarge));
    }

    /// The wait ends with the last acknowledgement, from the producer's
    /// own thread once the request is already waiting, not at its deadline.
    #[tokio::test]
    async fn the_wait_ends_with_the_last_acknowledgement() {
        let writes = Writes::new(2);
        writes.settle(1, Ok(()));
        let mut wait = std::pin::pin!(writes.outcomes(tokio::time::Instant::now() + Duration::from_secs(3600)));
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(wait.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "one record is still unsettled");
        let late = writes.clone();
        std::thread::spawn(move || late.settle(0, Ok(()))).join().expect("settled");
        let waited = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the wait ends when the last record is settled");
        assert!(waited.iter().all(Result::is_ok));
    }
}
