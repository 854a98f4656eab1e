//! The deliverer: POSTs each delivery to its destination (SPEC §2), retries
//! durably through the retry topics, and parks what cannot be delivered in
//! the dead-letter topic with its full attempt history.
//!
//! # Layout
//! - [`config`] — the role's typed configuration.
//! - [`http`] — one attempt, and the connect-time address guard.
//! - [`metrics`] — `auditstream_deliverer_*`.
//!
//! A delivery's offset counts as finished only once it was delivered,
//! written to the next retry topic, or dead-lettered, and Kafka
//! acknowledged that write.

pub mod config;
pub mod http;
pub mod metrics;

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
pub use config::DelivererConfig;
use proto::{
    delivery::{Attempt, DeliveryMeta, H_REASON},
    destination::Directory,
    topics::Topics,
};
use rdkafka::{Message, consumer::Consumer, message::OwnedMessage, producer::FutureProducer};
use service::{Admin, Shutdown, consume, kafka, table::Table};

use crate::http::{Outcome, Sender};

/// Why the deliverer stopped.
#[derive(Debug, thiserror::Error)]
pub enum DelivererError {
    /// Kafka could not be set up.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

struct Context {
    destinations: Table<Directory>,
    sender: Sender,
    producer: FutureProducer,
    topics: Topics,
    settings: config::DelivererSettings,
    metrics: metrics::Metrics,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Runs the deliverer until `shutdown`, then drains within the grace period.
pub async fn run(config: DelivererConfig, admin: Admin, shutdown: Shutdown) -> Result<(), DelivererError> {
    let settings = config.deliverer.clone();
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    let rungs = settings.retry_delays.len();
    if config.kafka.create_topics {
        kafka::ensure_topics(&config.kafka, &topics.all(rungs)).await?;
    }
    let metrics = metrics::Metrics::register(&admin.registry)?;
    let ready = admin.readiness.register("deliverer.destinations");
    let (destinations, _) =
        service::table::follow(&config.kafka, &topics.destinations(), Directory::default(), ready, shutdown.clone())
            .await?;
    let mut stop = shutdown.clone();
    tokio::select! {
        _ = destinations.wait_ready() => {}
        _ = stop.wait() => return Ok(()),
    }
    let ctx = Arc::new(Context {
        destinations,
        sender: Sender::new(&settings)?,
        producer: kafka::producer(&config.kafka, Duration::from_secs(30))?,
        topics: topics.clone(),
        settings: settings.clone(),
        metrics,
    });
    let limits = consume::LoopLimits { max_in_flight: settings.max_in_flight, grace: config.shutdown.grace };

    let fresh_settings = kafka::consumer_config(&config.kafka, &settings.group_id, settings.session_timeout);
    let (fresh, fresh_tracker) = consume::consumer(&fresh_settings, limits)?;
    fresh.subscribe(&[&topics.deliveries()])?;
    let c = ctx.clone();
    let fresh_loop = consume::run(fresh, fresh_tracker, limits, shutdown.clone(), move |m| handle(c.clone(), m));

    // Retries wait in their own consumer, so waiting deliveries never take
    // the places of fresh ones.
    let retry_names: Vec<String> = (0..rungs).map(|n| topics.retry(n)).collect();
    let retry_loop = async {
        if retry_names.is_empty() {
            return Ok::<(), DelivererError>(());
        }
        let retry_settings =
            kafka::consumer_config(&config.kafka, &format!("{}-retry", settings.group_id), settings.session_timeout);
        let (retry, retry_tracker) = consume::consumer(&retry_settings, limits)?;
        retry.subscribe(&retry_names.iter().map(String::as_str).collect::<Vec<_>>())?;
        let c = ctx.clone();
        consume::run(retry, retry_tracker, limits, shutdown.clone(), move |m| handle(c.clone(), m)).await;
        Ok(())
    };
    tracing::info!(group = %settings.group_id, rungs, "deliverer consuming");
    let ((), retried) = tokio::join!(fresh_loop, retry_loop);
    retried?;
    tracing::info!("deliverer stopped");
    Ok(())
}

impl Context {
    /// Which retry rung a topic is (`None` for fresh deliveries).
    fn rung_of(&self, topic: &str) -> Option<usize> {
        (0..self.settings.retry_delays.len()).find(|n| self.topics.retry(*n) == topic)
    }

    async fn dead_letter(&self, m: &OwnedMessage, meta: Option<&DeliveryMeta>, reason: &str) {
        tracing::warn!(topic = m.topic(), offset = m.offset(), destination = meta.map(|m| m.destination_id.as_str()), %reason, "dead-lettering delivery");
        let meta_headers = meta.map(DeliveryMeta::to_headers).unwrap_or_default();
        let mut headers: Vec<(&str, &[u8])> = match meta {
            Some(_) => meta_headers.iter().map(|(k, v)| (*k, v.as_slice())).collect(),
            None => kafka::header_pairs(m).into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect(),
        };
        headers.push((H_REASON, reason.as_bytes()));
        kafka::produce_durably(
            &self.producer,
            &self.topics.deliveries_dlq(),
            m.key().unwrap_or_default(),
            m.payload(),
            &headers,
        )
        .await;
        self.metrics.deliveries.with_label_values(&["dead_lettered"]).inc();
    }
}

async fn handle(ctx: Arc<Context>, m: OwnedMessage) {
    let mut meta = match DeliveryMeta::from_headers(kafka::header_pairs(&m)) {
        Ok(meta) => meta,
        Err(reason) => {
            return ctx.dead_letter(&m, None, &format!("unreadable delivery: {reason}")).await;
        }
    };
    if let Some(due) = meta.due_at_ms {
        let wait = due - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
    }
    let body = m.payload().unwrap_or_default();
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(ctx.settings.quick_retry_delay)
        .with_max_times(ctx.settings.quick_retries)
        .with_jitter()
        .build();
    let (retry_after, retryable) = loop {
        // Looked up on every attempt: configuration changes apply to the
        // next one.
        let destination = ctx.destinations.read().get(&meta.destination_id).cloned();
        let Some(destination) = destination else {
            tracing::warn!(destination = %meta.destination_id, event_id = %meta.event_id, "destination deleted; delivery dropped");
            ctx.metrics.deliveries.with_label_values(&["dropped"]).inc();
            return;
        };
        if !destination.active {
            return ctx.dead_letter(&m, Some(&meta), "destination inactive").await;
        }
        let outcome = ctx.sender.attempt(&destination, &meta.event_id, &meta.event_type, body).await;
        match outcome {
            Outcome::Delivered(status) => {
                ctx.metrics.attempt(true, Some(status));
                ctx.metrics.deliveries.with_label_values(&["delivered"]).inc();
                return;
            }
            Outcome::Failed { status, error, retry_after, retryable } => {
                ctx.metrics.attempt(false, status);
                tracing::info!(destination = %meta.destination_id, event_id = %meta.event_id, status, %error, "delivery attempt failed");
                meta.record(Attempt { at_ms: now_ms(), status, error: Some(error) });
                if !retryable {
                    break (None, false);
                }
                match backoff.next() {
                    Some(pause) if retry_after.is_none_or(|ra| ra <= pause) => tokio::time::sleep(pause).await,
                    _ => break (retry_after, true),
                }
            }
        }
    };
    let next = ctx.rung_of(m.topic()).map_or(0, |n| n + 1);
    if !retryable {
        let reason = meta.history.last().and_then(|a| a.error.clone()).unwrap_or_default();
        return ctx.dead_letter(&m, Some(&meta), &format!("not retryable: {reason}")).await;
    }
    let Some(delay) = ctx.settings.retry_delays.get(next) else {
        return ctx.dead_letter(&m, Some(&meta), &format!("retries exhausted after {} attempts", meta.attempt)).await;
    };
    let delay = retry_after.map_or(*delay, |ra| ra.max(*delay));
    meta.due_at_ms = Some(now_ms() + delay.as_millis() as i64);
    let headers = meta.to_headers();
    let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    kafka::produce_durably(&ctx.producer, &ctx.topics.retry(next), m.key().unwrap_or_default(), Some(body), &headers)
        .await;
    ctx.metrics.deliveries.with_label_values(&["retried"]).inc();
}
