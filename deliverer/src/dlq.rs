//! Dead-lettered deliveries: list them, and replay them into the flow.
//!
//! Kafka topics are append-only: replaying does not remove a record from
//! the dead-letter topic, so replaying the same selection twice delivers
//! twice (receivers deduplicate on the event id, which never changes).
//! Narrow a replay with the filters, and use `--dry-run` to see it first.

use std::time::Duration;

use proto::{
    delivery::{DeliveryMeta, H_REASON},
    topics::Topics,
};
use rdkafka::{Message, error::KafkaError, message::Header};
use service::{
    config::KafkaConfig,
    kafka::{self, Window},
};

/// How long the topic must stay quiet before the read counts as complete.
const IDLE: Duration = Duration::from_secs(2);

pub use proto::delivery::H_REPLAYED_FROM;

/// Which dead-lettered deliveries to select.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this destination.
    pub destination: Option<String>,
    /// Parked within this window.
    pub window: Window,
}

impl Filter {
    fn admits(&self, p: &Parked) -> bool {
        self.destination.as_ref().is_none_or(|d| p.meta.as_ref().is_some_and(|m| &m.destination_id == d))
            && self.window.admits(p.parked_at_ms)
    }
}

/// One dead-lettered delivery.
#[derive(Debug, Clone)]
pub struct Parked {
    /// Where it is in the dead-letter topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// When it was parked (the record's timestamp, Unix ms).
    pub parked_at_ms: Option<i64>,
    /// Its delivery metadata, when readable.
    pub meta: Option<DeliveryMeta>,
    /// Why it was parked.
    pub reason: String,
    /// The record key (the destination id).
    pub key: Vec<u8>,
    /// The event bytes.
    pub payload: Vec<u8>,
}

/// Reads the dead-letter topic to its current end and returns what
/// `filter` selects.
pub async fn read(config: &KafkaConfig, filter: &Filter) -> Result<Vec<Parked>, KafkaError> {
    let topic = Topics::new(config.topic_prefix.clone()).deliveries_dlq();
    let mut out = Vec::new();
    for m in kafka::read_all(config, &topic, IDLE).await? {
        let headers = kafka::header_pairs(&m);
        let reason = headers
            .iter()
            .find(|(k, _)| *k == H_REASON)
            .and_then(|(_, v)| v.and_then(|v| std::str::from_utf8(v).ok()))
            .unwrap_or_default()
            .to_owned();
        let parked = Parked {
            partition: m.partition(),
            offset: m.offset(),
            parked_at_ms: m.timestamp().to_millis(),
            meta: DeliveryMeta::read(m.key(), headers, m.payload().unwrap_or_default()).ok(),
            reason,
            key: m.key().unwrap_or_default().to_vec(),
            payload: m.payload().unwrap_or_default().to_vec(),
        };
        if filter.admits(&parked) {
            out.push(parked);
        }
    }
    // Records come partition by partition: newest last, across them.
    out.sort_by_key(|p| (p.parked_at_ms, p.partition, p.offset));
    Ok(out)
}

/// Writes the selected deliveries back to `audit.deliveries`, event bytes
/// and id unchanged, attempt history kept, due at once. Records whose
/// metadata cannot be read are skipped (and counted in the second number).
pub async fn replay(config: &KafkaConfig, parked: &[Parked]) -> Result<(usize, usize), KafkaError> {
    let topics = Topics::new(config.topic_prefix.clone());
    let producer = kafka::producer(config, Duration::from_secs(30))?;
    let (mut replayed, mut skipped) = (0, 0);
    for p in parked {
        let Some(meta) = &p.meta else {
            skipped += 1;
            continue;
        };
        let mut meta = meta.clone();
        meta.due_at_ms = None;
        // Replayed deliveries start the ladder afresh.
        meta.rung = None;
        meta.bounces = 0;
        let from = format!("{}:{}", p.partition, p.offset);
        let headers = || crate::headers(&meta).insert(Header { key: H_REPLAYED_FROM, value: Some(&from) });
        kafka::produce_durably_with(
            &producer,
            &topics.deliveries(),
            meta.destination_id.as_bytes(),
            Some(&p.payload),
            headers,
        )
        .await;
        replayed += 1;
    }
    Ok((replayed, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(dest: &str, at: i64) -> Parked {
        Parked {
            partition: 0,
            offset: 0,
            parked_at_ms: Some(at),
            meta: Some(DeliveryMeta::new(dest, "e", "t")),
            reason: String::new(),
            key: Vec::new(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn filters_select_by_destination_and_time() {
        let f = Filter { destination: Some("a".into()), window: Window { since_ms: Some(10), until_ms: Some(20) } };
        assert!(f.admits(&parked("a", 10)));
        assert!(!f.admits(&parked("a", 20)));
        assert!(!f.admits(&parked("a", 9)));
        assert!(!f.admits(&parked("b", 15)));
        let mut unreadable = parked("a", 15);
        unreadable.meta = None;
        assert!(!f.admits(&unreadable));
        assert!(Filter::default().admits(&unreadable));
    }
}
