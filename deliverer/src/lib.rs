//! The deliverer: POSTs each delivery to its destination (SPEC §2), retries
//! durably through the retry topics, and parks what cannot be delivered in
//! the dead-letter topic with its full attempt history.
//!
//! # Layout
//! - [`config`] — the role's typed configuration.
//! - [`http`] — one attempt, and the connect-time address guard.
//! - [`isolation`] — per-destination concurrency limit and circuit breaker.
//! - [`dlq`] — listing and replaying dead-lettered deliveries.
//! - [`metrics`] — `auditstream_deliverer_*`.
//! - [`pool`] — keep-alive connections per origin.
//!
//! A delivery's offset counts as finished only once it was delivered,
//! written to the next retry topic, or dead-lettered, and Kafka
//! acknowledged that write.

pub mod config;
pub mod dlq;
pub mod http;
pub mod isolation;
pub mod metrics;
pub mod pool;

use std::{sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
pub use config::DelivererConfig;
use proto::{
    delivery::{Attempt, DeliveryMeta, H_REASON},
    destination::Directory,
    topics::Topics,
};
use rdkafka::{
    Message,
    consumer::Consumer,
    message::{BorrowedMessage, Header, OwnedHeaders, OwnedMessage},
    producer::FutureProducer,
};
use service::{Admin, Shutdown, admin::ReadyFlag, consume, kafka, table::Table};

use crate::http::{Outcome, Sender};

/// Why the deliverer stopped.
#[derive(Debug, thiserror::Error)]
pub enum DelivererError {
    /// Kafka could not be set up.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[from] http::ClientError),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

struct Context {
    destinations: Table<Directory>,
    isolation: isolation::Isolation,
    sender: Sender,
    producer: FutureProducer,
    topics: Topics,
    /// `topics.retry(n)` for every rung, named once.
    retry_topics: Vec<String>,
    settings: config::DelivererSettings,
    metrics: metrics::Metrics,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Runs the deliverer until `shutdown`, then drains within the grace period.
///
/// Its own readiness check, `deliverer`, is registered when this is called,
/// before the future first runs, and set once every consumer is registered
/// and consuming: `/ready` never passes while the deliverer has yet to
/// register its other checks.
pub fn run(
    config: DelivererConfig,
    admin: Admin,
    shutdown: Shutdown,
) -> impl Future<Output = Result<(), DelivererError>> + Send {
    let started = admin.readiness.register("deliverer");
    run_registered(config, admin, shutdown, started)
}

async fn run_registered(
    config: DelivererConfig,
    admin: Admin,
    shutdown: Shutdown,
    started: ReadyFlag,
) -> Result<(), DelivererError> {
    let settings = config.deliverer.clone();
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    let rungs = settings.retry_delays.len();
    if config.kafka.create_topics {
        kafka::ensure_topics(&config.kafka, &topics.all(rungs)).await?;
    }
    let metrics = metrics::Metrics::register(&admin.registry)?;
    let lag = admin.consumer_lag()?;
    let keyring = config.secrets.keyring().map_err(|e| DelivererError::Config(e.to_string()))?;
    let ready = admin.readiness.register("deliverer.destinations");
    let (destinations, _) = service::table::follow(
        &config.kafka,
        &topics.destinations(),
        Directory::with_keyring(keyring),
        ready,
        shutdown.clone(),
    )
    .await?;
    let mut stop = shutdown.clone();
    tokio::select! {
        _ = destinations.wait_ready() => {}
        _ = stop.wait() => return Ok(()),
    }
    let limits = isolation::Limits {
        concurrency: settings.per_destination_concurrency,
        queue: settings.per_destination_queue,
        max_wait: settings.per_destination_max_wait,
        failures_to_open: settings.circuit_failures,
        open_for: settings.circuit_open_for,
    };
    let ctx = Arc::new(Context {
        destinations,
        isolation: isolation::Isolation::new(limits, metrics.circuit_open.clone()),
        sender: Sender::new(&settings, Some(metrics.connections.clone()))?,
        producer: kafka::producer(&config.kafka, Duration::from_secs(30))?,
        topics: topics.clone(),
        retry_topics: (0..rungs).map(|n| topics.retry(n)).collect(),
        settings: settings.clone(),
        metrics,
    });
    tokio::spawn(forget_dropped_destinations(ctx.clone(), shutdown.clone()));
    let limits = consume::LoopLimits { max_in_flight: settings.max_in_flight, grace: config.shutdown.grace };

    let fresh_settings =
        kafka::consumer_config(&config.kafka, &settings.group_id, settings.session_timeout, kafka::Path::Event);
    let (fresh, fresh_tracker) =
        consume::consumer(&fresh_settings, limits, admin.readiness.register("deliverer.group"), &lag)?;
    fresh.subscribe(&[&topics.deliveries()])?;
    let c = ctx.clone();
    let fresh_loop =
        consume::run_inline(fresh, fresh_tracker, limits, shutdown.clone(), move |m, done| take(&c, m, done));

    // Each retry rung has its own consumer (group `<group_id>-retry-<n>`)
    // and in-flight window: deliveries held until due never take the places
    // of fresh ones, and a long rung's (12 h) never those of a short one.
    let mut retry_loops = Vec::with_capacity(rungs);
    for n in 0..rungs {
        let mut retry_settings = kafka::consumer_config(
            &config.kafka,
            &retry_group(&settings.group_id, n),
            settings.session_timeout,
            kafka::Path::Background,
        );
        if !config.kafka.properties.contains_key("queued.max.messages.kbytes") {
            // Seven rungs prefetching librdkafka's default 64 MiB each would
            // be a lot of memory for records that mostly wait.
            retry_settings.set("queued.max.messages.kbytes", "8192");
        }
        let ready = admin.readiness.register(&format!("deliverer.retry_group.{n}"));
        let (retry, retry_tracker) = consume::consumer(&retry_settings, limits, ready, &lag)?;
        retry.subscribe(&[&topics.retry(n)])?;
        let c = ctx.clone();
        retry_loops.push(consume::run_inline(retry, retry_tracker, limits, shutdown.clone(), move |m, done| {
            take(&c, m, done)
        }));
    }
    tracing::info!(group = %settings.group_id, rungs, "deliverer consuming");
    started.set(true);
    tokio::join!(fresh_loop, futures_util::future::join_all(retry_loops));
    tracing::info!("deliverer stopped");
    Ok(())
}

/// How often the isolation state of deleted and inactive destinations is
/// dropped.
const FORGET_EVERY: Duration = Duration::from_secs(5);

/// Drops, every [`FORGET_EVERY`], the isolation state of destinations the
/// table no longer has or holds inactive: no attempt will close their
/// circuits (see [`isolation::Isolation::retain`]).
async fn forget_dropped_destinations(ctx: Arc<Context>, mut shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FORGET_EVERY) => {}
            _ = shutdown.wait() => return,
        }
        let table = ctx.destinations.read();
        ctx.isolation.retain(|id| table.get(id).is_some_and(|d| d.active));
    }
}

/// The consumer group of retry rung `n`.
pub fn retry_group(group_id: &str, n: usize) -> String {
    format!("{group_id}-retry-{n}")
}

/// What the destinations table says about an id.
enum Lookup {
    Found(Arc<proto::destination::Destination>),
    /// Its tombstone was seen.
    Deleted,
    /// Never seen: the table may lag behind the router's.
    Unknown,
}

/// How long a delivery waits for the table to learn a destination it does
/// not know yet (the router may have seen it first).
const UNKNOWN_GRACE: Duration = Duration::from_secs(5);

impl Context {
    async fn lookup(&self, id: &str) -> Lookup {
        let deadline = tokio::time::Instant::now() + UNKNOWN_GRACE;
        loop {
            {
                let table = self.destinations.read();
                if let Some(d) = table.get(id) {
                    return Lookup::Found(d.clone());
                }
                if table.was_removed(id) {
                    return Lookup::Deleted;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Lookup::Unknown;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes the delivery to retry rung `rung`, due after `delay`.
    async fn requeue(&self, record: &Record, meta: &mut DeliveryMeta, rung: usize, delay: Duration) {
        meta.due_at_ms = Some(now_ms() + delay.as_millis() as i64);
        let meta = &*meta;
        let key = meta.destination_id.as_bytes();
        // Boxed, here and in `park`: the produce future is ~1 KB, and
        // inline it would take that room in every delivery's task.
        let topic = &self.retry_topics[rung];
        Box::pin(kafka::produce_durably_with(&self.producer, topic, key, Some(&record.body), || headers(meta))).await;
        self.metrics.deliveries.with_label_values(&["retried"]).inc();
    }

    /// The topic a delivery was read from.
    fn topic_of(&self, rung: Option<usize>) -> String {
        rung.map_or_else(|| self.topics.deliveries(), |n| self.retry_topics[n].clone())
    }

    /// Which retry rung a topic is (`None` for fresh deliveries).
    fn rung_of(&self, topic: &str) -> Option<usize> {
        self.retry_topics.iter().position(|t| t == topic)
    }

    /// Parks a delivery in the dead-letter topic with its history.
    async fn dead_letter(&self, record: &Record, meta: &DeliveryMeta, reason: &str) {
        tracing::warn!(topic = %self.topic_of(record.rung), partition = record.partition, offset = record.offset, destination = %meta.destination_id, %reason, "dead-lettering delivery");
        self.park(meta.destination_id.as_bytes(), Some(&record.body), || headers(meta), reason).await;
    }

    /// Parks a record whose delivery cannot be read (its key, its headers
    /// or, without headers, its event), as it came.
    async fn dead_letter_unreadable(&self, m: &OwnedMessage, reason: &str) {
        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %reason, "dead-lettering delivery");
        let headers = || kafka::headers(kafka::header_iter(m).filter_map(|(k, v)| v.map(|v| (k, v))));
        self.park(m.key().unwrap_or_default(), m.payload(), headers, reason).await;
    }

    /// Writes a record to the dead-letter topic: `headers`, then the reason.
    async fn park(&self, key: &[u8], payload: Option<&[u8]>, headers: impl Fn() -> OwnedHeaders, reason: &str) {
        let with_reason = || headers().insert(Header { key: H_REASON, value: Some(reason) });
        let topic = self.topics.deliveries_dlq();
        Box::pin(kafka::produce_durably_with(&self.producer, &topic, key, payload, with_reason)).await;
        self.metrics.deliveries.with_label_values(&["dead_lettered"]).inc();
    }
}

/// A delivery record's headers ([`DeliveryMeta::to_headers`]), written
/// straight into the Kafka client's list: no copy of each value first.
fn headers(meta: &DeliveryMeta) -> OwnedHeaders {
    meta.fold_headers(OwnedHeaders::new_with_capacity(8), |h, key, value| h.insert(Header { key, value: Some(value) }))
}

/// How the attempts of one turn ended.
enum Turn {
    /// Delivered, dropped or dead-lettered: finished.
    Done,
    /// Down the ladder, after `retry_after` if the receiver asked.
    Ladder(Option<Duration>),
    /// Set aside on the same rung: the destination is busy, not failing.
    Bounce,
    /// Dead-letter: retrying cannot help.
    Hopeless(String),
}

/// What the deliverer keeps of a delivery record: its metadata is read
/// from the consumer's buffer (its headers, or its event, into
/// [`DeliveryMeta`]), and the body is shared with every attempt's request.
struct Record {
    body: Bytes,
    /// The retry rung it was read from; `None` for a fresh delivery.
    rung: Option<usize>,
    partition: i32,
    offset: i64,
}

/// Takes a delivery off the consumer loop: reads its metadata, and hands it
/// to a task of its own (its attempts wait for the network).
fn take(ctx: &Arc<Context>, m: &BorrowedMessage<'_>, done: consume::Done) {
    let ctx = ctx.clone();
    let payload = m.payload().unwrap_or_default();
    match DeliveryMeta::read(m.key(), kafka::header_iter(m), payload) {
        Ok(mut meta) => {
            let record = Record {
                body: Bytes::copy_from_slice(payload),
                rung: ctx.rung_of(m.topic()),
                partition: m.partition(),
                offset: m.offset(),
            };
            // `handle` borrows what this task owns: one copy of the
            // delivery in the task, not one per level of the future.
            tokio::spawn(async move {
                handle(&ctx, &record, &mut meta).await;
                done.finish();
            });
        }
        Err(reason) => {
            let m = m.detach();
            tokio::spawn(async move {
                ctx.dead_letter_unreadable(&m, &format!("unreadable delivery: {reason}")).await;
                done.finish();
            });
        }
    }
}

async fn handle(ctx: &Context, record: &Record, meta: &mut DeliveryMeta) {
    let rung = record.rung;
    // How far down the ladder it is: its `auditstream-rung` header, else
    // the topic it was read from (0 = fresh, n = retry rung n − 1).
    let position = meta.rung.unwrap_or(rung.map_or(0, |n| n + 1));
    if let Some(due) = meta.due_at_ms {
        let wait = due - now_ms();
        if wait > 0 {
            let label = rung.map_or_else(|| "fresh".to_owned(), |n| n.to_string());
            let waiting = ctx.metrics.retry_waiting.with_label_values(&[&label]);
            waiting.inc();
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            waiting.dec();
        }
    }
    let mut turn = attempts(ctx, record, meta).await;
    if let Turn::Bounce = turn
        && meta.bounces >= ctx.settings.max_bounces()
    {
        // Set aside again and again: the destination cannot keep up. The
        // delivery goes down the ladder like a failed attempt, so its
        // waits grow, instead of churning through the first rung forever.
        let error = "not attempted: destination saturated".to_owned();
        meta.record(Attempt { at_ms: now_ms(), status: None, error: Some(error) });
        turn = Turn::Ladder(None);
    }
    match turn {
        Turn::Done => {}
        Turn::Hopeless(reason) => ctx.dead_letter(record, meta, &reason).await,
        Turn::Bounce => {
            // Busy, not failing: back soon through the first rung (the one
            // with the shortest wait), keeping its place on the ladder, a
            // little later each time.
            meta.rung = Some(position);
            let delay = ctx.settings.bounce_delay(meta.bounces);
            meta.bounces += 1;
            ctx.requeue(record, meta, 0, delay).await;
        }
        Turn::Ladder(retry_after) => {
            let next = position;
            meta.rung = None;
            meta.bounces = 0;
            let Some(delay) = ctx.settings.retry_delays.get(next) else {
                let reason = format!("retries exhausted after {} attempts", meta.attempt);
                return ctx.dead_letter(record, meta, &reason).await;
            };
            let delay = retry_after.map_or(*delay, |ra| ra.max(*delay));
            ctx.requeue(record, meta, next, delay).await;
        }
    }
}

/// The quick in-process tries of one turn (backon schedule), each through
/// the destination's isolation.
async fn attempts(ctx: &Context, record: &Record, meta: &mut DeliveryMeta) -> Turn {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(ctx.settings.quick_retry_delay)
        .with_max_times(ctx.settings.quick_retries)
        .with_jitter()
        .build();
    loop {
        // Looked up on every attempt: configuration changes apply to the
        // next one.
        let destination = match ctx.lookup(&meta.destination_id).await {
            Lookup::Found(d) => d,
            Lookup::Deleted => {
                tracing::warn!(destination = %meta.destination_id, event_id = %meta.event_id, "destination deleted; delivery dropped");
                ctx.metrics.deliveries.with_label_values(&["dropped"]).inc();
                return Turn::Done;
            }
            Lookup::Unknown => {
                let error = "destination not known to this deliverer yet".to_owned();
                meta.record(Attempt { at_ms: now_ms(), status: None, error: Some(error) });
                return Turn::Ladder(None);
            }
        };
        if !destination.active {
            ctx.dead_letter(record, meta, "destination inactive").await;
            return Turn::Done;
        }
        let slot = match ctx.isolation.enter(&destination.id).await {
            Ok(slot) => slot,
            Err(isolation::Refusal::Saturated) => return Turn::Bounce,
            Err(refusal) => {
                meta.record(Attempt { at_ms: now_ms(), status: None, error: Some(refusal.as_str().into()) });
                return Turn::Ladder(None);
            }
        };
        let started = tokio::time::Instant::now();
        let outcome = ctx.sender.attempt(&destination, &meta.event_id, &meta.event_type, &record.body).await;
        ctx.metrics.attempt_duration.observe(started.elapsed().as_secs_f64());
        match outcome {
            Outcome::Delivered(status) => {
                ctx.isolation.record(slot, true);
                ctx.metrics.attempt(true, Some(status));
                ctx.metrics.delivered.inc();
                if let Some(created) = meta.created_at_ms {
                    ctx.metrics.latency.observe((now_ms() - created).max(0) as f64 / 1000.0);
                }
                return Turn::Done;
            }
            Outcome::Failed { status, error, retry_after, retryable } => {
                ctx.isolation.record(slot, false);
                ctx.metrics.attempt(false, status);
                tracing::info!(destination = %meta.destination_id, event_id = %meta.event_id, status, %error, "delivery attempt failed");
                meta.record(Attempt { at_ms: now_ms(), status, error: Some(error.clone()) });
                if !retryable {
                    return Turn::Hopeless(format!("not retryable: {error}"));
                }
                match backoff.next() {
                    Some(pause) if retry_after.is_none_or(|ra| ra <= pause) => tokio::time::sleep(pause).await,
                    _ => return Turn::Ladder(retry_after),
                }
            }
        }
    }
}
