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
/// record, without duplicates from its own retries.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = base(config);
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    c.create()
}

/// A group consumer that stores offsets only when told to (the watermark
/// decides), and auto-commits what was stored.
pub fn consumer(
    config: &KafkaConfig,
    group: &str,
    session_timeout: Duration,
) -> Result<StreamConsumer, KafkaError> {
    let mut c = base(config);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (session_timeout.as_millis() / 3).max(100).to_string(),
        );
    c.create()
}

/// A consumer outside any group, for reading a whole topic (tables, tools).
pub fn reader(config: &KafkaConfig) -> Result<StreamConsumer, KafkaError> {
    let mut c = base(config);
    c.set("group.id", "auditstream-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    c.create()
}

/// Creates the topics that do not exist yet. Compacted topics get
/// `cleanup.policy=compact`.
pub async fn ensure_topics(
    config: &KafkaConfig,
    topics: &[(String, bool)],
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, compacted)| {
            let t = NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication_factor),
            );
            if *compacted {
                t.set("cleanup.policy", "compact")
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
pub async fn partitions(
    consumer: &StreamConsumer,
    topic: &str,
    deadline: Duration,
) -> Result<i32, KafkaError> {
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
            return Err(md.err().unwrap_or(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
