//! Kafka client settings, written once for every role: the operator's
//! brokers and pass-through properties (TLS, SASL), then the settings the
//! delivery guarantees depend on, which the operator cannot override.

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    producer::FutureProducer,
};

use crate::config::KafkaConfig;

/// The broker's settings plus the operator's properties.
pub fn base(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    c.set("client.id", "auditstream");
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

/// A producer whose acknowledgement means every in-sync replica has the
/// record, without duplicates from its own retries. A record not
/// acknowledged within `delivery_timeout` fails (and is not written later).
///
/// Batching and compression are the operator's to tune
/// (`kafka.properties`): `linger.ms` defaults to 5 and `compression.type`
/// to lz4. Acknowledgements and idempotence are not.
pub fn producer(config: &KafkaConfig, delivery_timeout: Duration) -> Result<FutureProducer, KafkaError> {
    producer_config(config, delivery_timeout).create()
}

/// The settings [`producer`] uses.
pub fn producer_config(config: &KafkaConfig, delivery_timeout: Duration) -> ClientConfig {
    let mut c = base(config);
    c.set("acks", "all")
        .set("message.timeout.ms", delivery_timeout.as_millis().max(1).to_string())
        .set("enable.idempotence", "true");
    default_to(&mut c, &["linger.ms", "queue.buffering.max.ms"], "5");
    default_to(&mut c, &["compression.type", "compression.codec"], "lz4");
    c
}

/// Sets `names[0]` to `value` unless the operator set the setting under
/// any of `names` (librdkafka's aliases of one setting): the operator's
/// value wins, and no alias of it is contradicted.
fn default_to(c: &mut ClientConfig, names: &[&str], value: &str) {
    if names.iter().all(|name| c.get(name).is_none()) {
        c.set(names[0], value);
    }
}

/// Where a consumer reads, which sets how long it lets the broker hold a
/// fetch that finds nothing new (`fetch.wait.max.ms`) where the operator
/// set nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The event path (the router's events, the deliverer's fresh
    /// deliveries): 100 ms instead of librdkafka's 500. Apache Kafka
    /// answers a held fetch as soon as a record arrives, so there this only
    /// changes how often an idle consumer asks (10 times a second instead
    /// of 2). Brokers that look for new records only at points within the
    /// wait (Tansu, the test broker, at half the remaining wait) keep each
    /// record for up to 250 ms per hop at 500; events cross two. At 2,000
    /// events/s on Tansu, p50/p99 fell from 80–181/248–386 ms to 27–39/46–78
    /// ms (docs/PERFORMANCE.md).
    Event,
    /// Everything else (tables, the relay, retry rungs, tools): 500 ms,
    /// librdkafka's default. Their records wait seconds anyway, and these
    /// consumers are idle most of the time: asking five times as often
    /// cost Tansu ~25 µs of CPU per event at 2,000 events/s, ~5% of a core
    /// (docs/PERFORMANCE.md, session 25), and any broker fetch requests.
    Background,
}

impl Path {
    fn fetch_wait_ms(self) -> &'static str {
        match self {
            Self::Event => "100",
            Self::Background => "500",
        }
    }
}

/// The defaults a consumer on `path` gets where the operator set nothing.
fn consumer_defaults(mut c: ClientConfig, path: Path) -> ClientConfig {
    default_to(&mut c, &["fetch.wait.max.ms"], path.fetch_wait_ms());
    c
}

/// Settings of a group consumer that stores offsets only when told to
/// (the watermark decides), and auto-commits what was stored. Create it
/// with [`crate::consume::consumer`].
pub fn consumer_config(config: &KafkaConfig, group: &str, session_timeout: Duration, path: Path) -> ClientConfig {
    let mut c = consumer_defaults(base(config), path);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_timeout.as_millis().to_string())
        .set("heartbeat.interval.ms", (session_timeout.as_millis() / 3).max(100).to_string());
    c
}

/// A consumer outside any group, for reading a whole topic (tables, tools).
pub fn reader(config: &KafkaConfig, path: Path) -> Result<StreamConsumer, KafkaError> {
    reader_config(config, path).create()
}

/// The settings [`reader`] uses.
pub fn reader_config(config: &KafkaConfig, path: Path) -> ClientConfig {
    let mut c = consumer_defaults(base(config), path);
    c.set("group.id", "auditstream-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    c
}

/// How long a compacted topic keeps every record before compaction may
/// drop a superseded one: the producer's relay publishes the audit event a
/// destination record carries, and must read it first (one day).
pub const MIN_COMPACTION_LAG_MS: &str = "86400000";

/// Creates the topics that do not exist yet. Compacted topics get
/// `cleanup.policy=compact` and [`MIN_COMPACTION_LAG_MS`].
pub async fn ensure_topics(config: &KafkaConfig, topics: &[(String, bool)]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, compacted)| {
            let t = NewTopic::new(name, config.partitions, TopicReplication::Fixed(config.replication_factor));
            if *compacted {
                t.set("cleanup.policy", "compact").set("min.compaction.lag.ms", MIN_COMPACTION_LAG_MS)
            } else {
                t
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, error = %code, "cannot create topic");
                });
            }
        }
    }
    Ok(())
}

/// Waits until `topic`'s metadata lists partitions (a fresh topic takes a
/// moment to appear on every broker), and returns their count.
pub async fn partitions(consumer: &StreamConsumer, topic: &str, deadline: Duration) -> Result<i32, KafkaError> {
    let start = tokio::time::Instant::now();
    loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(md) = &md
            && let Some(t) = md.topics().first()
            && t.error().is_none()
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().len() as i32);
        }
        if start.elapsed() > deadline {
            return Err(md.err().unwrap_or(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A span of record timestamps for the operator's commands over a
/// dead-letter topic: at or after `since_ms`, before `until_ms` (Unix ms;
/// either open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    /// At or after.
    pub since_ms: Option<i64>,
    /// Before.
    pub until_ms: Option<i64>,
}

impl Window {
    /// Whether a record stamped `at` falls in the window (one without a
    /// timestamp counts as the epoch).
    pub fn admits(&self, at: Option<i64>) -> bool {
        let at = at.unwrap_or(0);
        self.since_ms.is_none_or(|s| at >= s) && self.until_ms.is_none_or(|u| at < u)
    }
}

/// Reads every partition of `topic` from its beginning until nothing more
/// arrives for `idle`, for the operator's commands over a dead-letter
/// topic. End offsets alone are not trusted: some brokers under-report
/// them (docs/ARCHITECTURE.md).
pub async fn read_all(
    config: &KafkaConfig,
    topic: &str,
    idle: Duration,
) -> Result<Vec<rdkafka::message::OwnedMessage>, KafkaError> {
    use rdkafka::{Offset, TopicPartitionList, consumer::Consumer as _};
    let consumer: StreamConsumer = reader(config, Path::Background)?;
    let count = partitions(&consumer, topic, Duration::from_secs(30)).await?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..count {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    while let Ok(received) = tokio::time::timeout(idle, consumer.recv()).await {
        out.push(received?.detach());
    }
    Ok(out)
}

/// Kafka record headers from name/value pairs.
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> rdkafka::message::OwnedHeaders {
    pairs.into_iter().fold(rdkafka::message::OwnedHeaders::new(), |h, (key, value)| {
        h.insert(rdkafka::message::Header { key, value: Some(value) })
    })
}

/// A message's headers as name/value pairs, read in place.
pub fn header_iter<'a, M: rdkafka::Message>(m: &'a M) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a
where
    M::Headers: 'a,
{
    use rdkafka::message::Headers as _;
    m.headers().into_iter().flat_map(|h| h.iter().map(|h| (h.key, h.value)))
}

/// The name/value pairs of a message's headers, collected.
pub fn header_pairs<M: rdkafka::Message>(m: &M) -> Vec<(&str, Option<&[u8]>)> {
    header_iter(m).collect()
}

/// Writes a record and waits for the acknowledgement, retrying with
/// growing pauses for as long as it takes: the callers' offsets must not
/// advance past a record Kafka did not take.
pub async fn produce_durably(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) {
    produce_durably_with(producer, topic, key, payload, || self::headers(headers.iter().copied())).await;
}

/// [`produce_durably`] with the record's headers built by `headers`, for
/// each try, straight into the client's own list: a writer whose header
/// values are computed (numbers, a serialized history) need not keep a
/// copy of each for the tries to come.
pub async fn produce_durably_with(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    payload: Option<&[u8]>,
    headers: impl Fn() -> rdkafka::message::OwnedHeaders,
) {
    until_acknowledged(topic, || async {
        let mut record = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(topic).key(key).headers(headers());
        if let Some(p) = payload {
            record = record.payload(p);
        }
        producer.send(record, Duration::from_secs(5)).await.map(|_| ()).map_err(|(e, _)| e)
    })
    .await;
}

/// Runs `write` (to `to`, named in the log) until it succeeds, pausing
/// longer after each refusal (100 ms, doubling up to 5 s): for writes an
/// offset must not pass.
pub async fn until_acknowledged<F, Fut, E>(to: &str, write: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use backon::Retryable as _;
    let pauses = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times();
    let acknowledged = write
        .retry(pauses)
        .notify(|e, pause| {
            tracing::warn!(%to, error = %e, retry_in_ms = pause.as_millis() as u64, "write not acknowledged; retrying")
        })
        .await;
    // With no limit on the tries, only an acknowledgement ends them.
    debug_assert!(acknowledged.is_ok());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_admits_from_its_start_up_to_its_end() {
        let w = Window { since_ms: Some(10), until_ms: Some(20) };
        assert!(w.admits(Some(10)));
        assert!(w.admits(Some(19)));
        assert!(!w.admits(Some(20)));
        assert!(!w.admits(Some(9)));
        assert!(!w.admits(None));
        assert!(Window::default().admits(None));
    }

    #[test]
    fn batching_is_tunable_but_guarantees_are_not() {
        let mut config = KafkaConfig::default();
        let defaults = producer_config(&config, Duration::from_secs(30));
        assert_eq!(defaults.get("linger.ms"), Some("5"));
        assert_eq!(defaults.get("compression.type"), Some("lz4"));
        for (k, v) in
            [("linger.ms", "20"), ("compression.codec", "zstd"), ("acks", "1"), ("enable.idempotence", "false")]
        {
            config.properties.insert(k.into(), v.into());
        }
        let tuned = producer_config(&config, Duration::from_secs(30));
        assert_eq!(tuned.get("linger.ms"), Some("20"));
        assert_eq!(tuned.get("compression.codec"), Some("zstd"));
        assert_eq!(tuned.get("compression.type"), None, "the operator's alias is not contradicted");
        assert_eq!(tuned.get("acks"), Some("all"));
        assert_eq!(tuned.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn consumers_bound_a_held_fetch_by_their_path_unless_the_operator_does() {
        let mut config = KafkaConfig::default();
        let wait = |c: ClientConfig| c.get("fetch.wait.max.ms").map(str::to_owned);
        let ten = Duration::from_secs(10);
        assert_eq!(wait(consumer_config(&config, "g", ten, Path::Event)).as_deref(), Some("100"));
        assert_eq!(wait(consumer_config(&config, "g", ten, Path::Background)).as_deref(), Some("500"));
        assert_eq!(wait(reader_config(&config, Path::Event)).as_deref(), Some("100"));
        assert_eq!(wait(reader_config(&config, Path::Background)).as_deref(), Some("500"));
        config.properties.insert("fetch.wait.max.ms".into(), "250".into());
        for path in [Path::Event, Path::Background] {
            assert_eq!(wait(consumer_config(&config, "g", ten, path)).as_deref(), Some("250"));
            assert_eq!(wait(reader_config(&config, path)).as_deref(), Some("250"));
        }
        let group = consumer_config(&config, "g", ten, Path::Event);
        assert_eq!(group.get("enable.auto.offset.store"), Some("false"), "the guarantees stay");
    }
}
