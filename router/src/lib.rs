//! The router: reads accepted events, resolves each one's root group from
//! the namespace tree, and writes one delivery per (event, destination).
//!
//! # Layout
//! - [`config`] — the role's typed configuration.
//! - [`dlq`] — the events' dead-letter topic: list and replay.
//! - [`route`] — the per-event decision (SPEC §4).
//! - [`metrics`] — `auditstream_router_*`.
//!
//! An input offset is stored only after every delivery produced for it was
//! acknowledged by Kafka (or the event was dead-lettered), through the
//! shared contiguous watermark.
//!
//! Events are routed on the consumer loop itself ([`consume::run_inline`]):
//! the records are handed to the producer at once, and the producer's
//! acknowledgement callback finishes the event when its last record is in.
//! No task, future or copy of the event per event; a record Kafka refused
//! is written again by one background task until it is taken.

pub mod config;
pub mod dlq;
pub mod metrics;
pub mod route;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

pub use config::RouterConfig;
use proto::{
    EventView, Registry,
    delivery::H_REASON,
    destination::{Destination, Directory, Owner},
    topics::Topics,
    tree::Tree,
};
use rdkafka::{
    ClientContext, Message,
    consumer::Consumer,
    message::{BorrowedMessage, OwnedHeaders},
    producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer},
};
use service::{Admin, Shutdown, admin::ReadyFlag, consume, kafka, table::Table};
use tokio::sync::mpsc;

use crate::route::{Decision, Resolution};

/// Why the router stopped.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Event-type definitions could not be loaded: fix them.
    #[error("event type definitions: {0}")]
    Types(String),
    /// Kafka could not be set up.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

struct Context {
    tree: Table<Tree>,
    destinations: Table<Directory>,
    registry: Registry,
    accept_unknown: bool,
    producer: Arc<ThreadedProducer<Acks>>,
    /// Records the producer did not take, for [`rewrite`].
    rewrites: mpsc::UnboundedSender<Rewrite>,
    topics: Topics,
    /// `topics.deliveries()`, named once.
    deliveries_topic: String,
    metrics: metrics::Metrics,
}

/// Runs the router until `shutdown`, then drains within the grace period.
///
/// Its own readiness check, `router`, is registered when this is called,
/// before the future first runs, and set once it consumes: `/ready` never
/// passes while the router has yet to register its other checks.
pub fn run(
    config: RouterConfig,
    admin: Admin,
    shutdown: Shutdown,
) -> impl Future<Output = Result<(), RouterError>> + Send {
    let started = admin.readiness.register("router");
    run_registered(config, admin, shutdown, started)
}

async fn run_registered(
    config: RouterConfig,
    admin: Admin,
    shutdown: Shutdown,
    started: ReadyFlag,
) -> Result<(), RouterError> {
    let registry = Registry::with_dir(config.router.types_dir.as_deref()).map_err(RouterError::Types)?;
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    if config.kafka.create_topics {
        kafka::ensure_topics(&config.kafka, &topics.all(0)).await?;
    }
    let metrics = metrics::Metrics::register(&admin.registry)?;
    let lag = admin.consumer_lag()?;
    let ready_tree = admin.readiness.register("router.namespaces");
    let ready_dest = admin.readiness.register("router.destinations");
    let (tree, _) =
        service::table::follow(&config.kafka, &topics.namespaces(), Tree::default(), ready_tree, shutdown.clone())
            .await?;
    let (destinations, _) = service::table::follow(
        &config.kafka,
        &topics.destinations(),
        Directory::with_keyring(config.secrets.keyring().map_err(|e| RouterError::Config(e.to_string()))?),
        ready_dest,
        shutdown.clone(),
    )
    .await?;
    // Routing before the tables are complete would send events to too few
    // destinations; wait.
    let mut stop = shutdown.clone();
    tokio::select! {
        _ = async { tree.wait_ready().await; destinations.wait_ready().await } => {}
        _ = stop.wait() => return Ok(()),
    }
    let limits = consume::LoopLimits { max_in_flight: config.router.max_in_flight, grace: config.shutdown.grace };
    let settings = kafka::consumer_config(
        &config.kafka,
        &config.router.group_id,
        config.router.session_timeout,
        kafka::Path::Event,
    );
    let (consumer, tracker) = consume::consumer(&settings, limits, admin.readiness.register("router.group"), &lag)?;
    consumer.subscribe(&[&topics.events()])?;
    let (rewrites, rewrite_queue) = mpsc::unbounded_channel();
    let producer: ThreadedProducer<Acks> = kafka::producer_config(&config.kafka, Duration::from_secs(30))
        .create_with_context(Acks { rewrites: rewrites.clone(), counter: metrics.rewrites.clone() })?;
    let producer = Arc::new(producer);
    let rewriter = tokio::spawn(rewrite(producer.clone(), rewrite_queue));
    let ctx = Context {
        tree,
        destinations,
        registry,
        accept_unknown: config.router.accept_unknown_types,
        producer,
        rewrites,
        deliveries_topic: topics.deliveries(),
        topics,
        metrics,
    };
    tracing::info!(group = %config.router.group_id, "router consuming");
    started.set(true);
    // The destinations of the event being routed, one buffer for all.
    let mut targets = Vec::new();
    consume::run_inline(consumer, tracker, limits, shutdown, |m, done| handle(&ctx, m, done, &mut targets)).await;
    // Every event was finished (or its grace ran out): nothing left to
    // write again.
    rewriter.abort();
    tracing::info!("router stopped");
    Ok(())
}

/// An event being routed: finished once every record written for it was
/// acknowledged.
struct Pending {
    done: Mutex<Option<consume::Done>>,
    left: AtomicUsize,
}

impl Pending {
    fn new(done: consume::Done, records: usize) -> Arc<Self> {
        Arc::new(Self { done: Mutex::new(Some(done)), left: AtomicUsize::new(records) })
    }

    /// One of its records was acknowledged.
    fn written(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            done.finish();
        }
    }
}

/// A record to write again: Kafka refused it, or the producer's queue was
/// full.
struct Rewrite {
    pending: Arc<Pending>,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Option<OwnedHeaders>,
}

/// The producer's context: acknowledgements finish events, refusals are
/// written again.
struct Acks {
    rewrites: mpsc::UnboundedSender<Rewrite>,
    counter: prometheus::IntCounter,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = Arc<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Arc<Pending>) {
        match result {
            Ok(_) => pending.written(),
            Err((e, m)) => {
                tracing::warn!(topic = m.topic(), error = %e, "write not acknowledged; writing it again");
                self.counter.inc();
                let rewrite = Rewrite {
                    pending,
                    topic: m.topic().to_owned(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m.headers().map(|h| h.detach()),
                };
                // Closed only at shutdown: the event stays unfinished, and
                // the partition's next owner routes it again.
                let _ = self.rewrites.send(rewrite);
            }
        }
    }
}

/// Writes refused records again, with growing pauses, for as long as it
/// takes: an event's offset must not advance past a record Kafka did not
/// take.
async fn rewrite(producer: Arc<ThreadedProducer<Acks>>, mut queue: mpsc::UnboundedReceiver<Rewrite>) {
    while let Some(r) = queue.recv().await {
        let mut pause = Duration::from_millis(100);
        loop {
            let mut record = BaseRecord::<[u8], [u8], _>::with_opaque_to(&r.topic, r.pending.clone());
            record.key = r.key.as_deref();
            record.payload = r.payload.as_deref();
            record.headers = r.headers.clone();
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _)) => {
                    tracing::warn!(topic = %r.topic, error = %e, retry_in_ms = pause.as_millis() as u64, "write not taken; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Hands a record to the producer; one it does not take now goes to
/// [`rewrite`].
fn write(
    ctx: &Context,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    headers: Option<OwnedHeaders>,
    pending: &Arc<Pending>,
) {
    let mut record = BaseRecord::with_opaque_to(topic, pending.clone()).key(key).payload(payload);
    record.headers = headers;
    if let Err((e, record)) = ctx.producer.send(record) {
        tracing::debug!(%topic, error = %e, "write not taken at once; queued to write again");
        ctx.metrics.rewrites.inc();
        let _ = ctx.rewrites.send(Rewrite {
            pending: record.delivery_opaque,
            topic: topic.to_owned(),
            key: Some(key.to_vec()),
            payload: Some(payload.to_vec()),
            headers: record.headers,
        });
    }
}

/// Where one event goes, decided while holding the table read locks.
enum Plan {
    /// To the destinations `plan` left in its `out` (perhaps none): the
    /// event's bytes, or these when the event had to be completed
    /// ([`proto::event::complete`]).
    Deliver(Option<Vec<u8>>),
    Nothing,
    Poison(String),
}

/// Decides where the event in `payload` goes; its destinations are left in
/// `out` (cleared first), a buffer the router reuses from event to event.
/// `published` (Unix ms, the record's timestamp) is the `created_at` of an
/// event written to Kafka without one.
fn plan(ctx: &Context, payload: &[u8], published: Option<i64>, out: &mut Vec<Arc<Destination>>) -> Plan {
    out.clear();
    let view = match EventView::parse(payload) {
        Ok(v) => v,
        Err(errors) => {
            let reason = proto::event::FieldError::join(&errors);
            return Plan::Poison(format!("invalid event: {reason}"));
        }
    };
    let tree = ctx.tree.read();
    let destinations = ctx.destinations.read();
    let hot = &ctx.metrics.hot;
    hot.namespaces.set(tree.len() as i64);
    hot.destinations.set(destinations.len() as i64);
    match route::route(&view, &tree, &destinations, &ctx.registry, ctx.accept_unknown, out) {
        Err(reason) => Plan::Poison(reason),
        Ok(Decision::NotStreamed) => {
            hot.not_streamed.inc();
            Plan::Nothing
        }
        Ok(Decision::Route(resolution)) => {
            let via = match resolution {
                Resolution::Tree => "tree",
                Resolution::Path => "path",
                Resolution::InstanceScope => "instance_scope",
                Resolution::Unknown => "unknown",
                Resolution::Bad(bad) => {
                    tracing::warn!(entity_type = %view.entity_type, entity_id = view.entity_id, problem = bad.as_str(), "namespace tree is bad data; instance destinations only");
                    bad.as_str()
                }
            };
            // The common case without a label lookup.
            if matches!(resolution, Resolution::Tree) {
                hot.via_tree.inc();
            } else {
                ctx.metrics.resolution.with_label_values(&[via]).inc();
            }
            if out.is_empty() {
                return Plan::Deliver(None);
            }
            drop((tree, destinations));
            // An event the producer's API or client took is complete; one
            // written to Kafka directly may not be (docs/PUBLISHING.md).
            // `route` refused one without an id.
            let published = || {
                published
                    .and_then(|ms| time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
                    .unwrap_or_else(time::OffsetDateTime::now_utc)
            };
            let completed = view.id.as_ref().and_then(|id| proto::event::complete(payload, &view, id, published));
            if completed.is_some() {
                ctx.metrics.completed.inc();
            }
            Plan::Deliver(completed)
        }
    }
}

fn handle(ctx: &Context, m: &BorrowedMessage<'_>, done: consume::Done, targets: &mut Vec<Arc<Destination>>) {
    let published = m.timestamp().to_millis();
    if let Some(at) = published {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        ctx.metrics.lag.observe(((now as i64 - at).max(0) as f64) / 1000.0);
    }
    let payload = m.payload().unwrap_or_default();
    match plan(ctx, payload, published, targets) {
        Plan::Nothing => done.finish(),
        Plan::Poison(reason) => {
            tracing::warn!(partition = m.partition(), offset = m.offset(), %reason, "dead-lettering event");
            let mut headers: Vec<(&str, &[u8])> =
                kafka::header_iter(m).filter_map(|(k, v)| v.map(|v| (k, v))).collect();
            headers.push((H_REASON, reason.as_bytes()));
            let key = m.key().unwrap_or_default();
            let pending = Pending::new(done, 1);
            write(ctx, &ctx.topics.events_dlq(), key, payload, Some(kafka::headers(headers)), &pending);
            ctx.metrics.hot.dead_lettered.inc();
        }
        Plan::Deliver(_) if targets.is_empty() => {
            ctx.metrics.hot.unrouted.inc();
            done.finish();
        }
        Plan::Deliver(completed) => {
            // A fresh delivery is the event's bytes keyed by the destination,
            // with no headers: the deliverer reads the event's id, type and
            // `created_at` from the bytes (`DeliveryMeta::read`). Every
            // destination gets the same bytes, completed once.
            let payload = completed.as_deref().unwrap_or(payload);
            let pending = Pending::new(done, targets.len());
            for dest in targets.iter() {
                write(ctx, &ctx.deliveries_topic, dest.id.as_bytes(), payload, None, &pending);
                let level =
                    if dest.owner == Owner::Instance { &ctx.metrics.hot.instance } else { &ctx.metrics.hot.group };
                level.inc();
            }
            ctx.metrics.hot.routed.inc();
        }
    }
}
