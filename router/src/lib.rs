//! The router: reads accepted events, resolves each one's root group from
//! the namespace tree, and writes one delivery per (event, destination).
//!
//! # Layout
//! - [`config`] — the role's typed configuration.
//! - [`route`] — the per-event decision (SPEC §4).
//! - [`metrics`] — `auditstream_router_*`.
//!
//! An input offset is stored only after every delivery produced for it was
//! acknowledged by Kafka (or the event was dead-lettered), through the
//! shared contiguous watermark.

pub mod config;
pub mod metrics;
pub mod route;

use std::{sync::Arc, time::Duration};

pub use config::RouterConfig;
use proto::{
    EventView, Registry,
    delivery::{DeliveryMeta, H_REASON},
    destination::{Directory, Owner},
    topics::Topics,
    tree::Tree,
};
use rdkafka::{Message, consumer::Consumer, message::OwnedMessage, producer::FutureProducer};
use service::{Admin, Shutdown, consume, kafka, table::Table};

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
    producer: FutureProducer,
    topics: Topics,
    metrics: metrics::Metrics,
}

/// Runs the router until `shutdown`, then drains within the grace period.
pub async fn run(config: RouterConfig, admin: Admin, shutdown: Shutdown) -> Result<(), RouterError> {
    let mut registry = Registry::embedded();
    if let Some(dir) = &config.router.types_dir {
        registry.extend(
            Registry::load_dir(dir).map_err(|errs| {
                RouterError::Types(errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
            })?,
        );
    }
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
    let settings = kafka::consumer_config(&config.kafka, &config.router.group_id, config.router.session_timeout);
    let (consumer, tracker) = consume::consumer(&settings, limits, admin.readiness.register("router.group"), &lag)?;
    consumer.subscribe(&[&topics.events()])?;
    let ctx = Arc::new(Context {
        tree,
        destinations,
        registry,
        accept_unknown: config.router.accept_unknown_types,
        producer: kafka::producer(&config.kafka, Duration::from_secs(30))?,
        topics,
        metrics,
    });
    tracing::info!(group = %config.router.group_id, "router consuming");
    consume::run(consumer, tracker, limits, shutdown, move |m| handle(ctx.clone(), m)).await;
    tracing::info!("router stopped");
    Ok(())
}

/// Where one event goes, decided while holding the table read locks.
enum Plan {
    Deliver {
        /// Destination ids, and whether each is instance-level.
        targets: Vec<(String, bool)>,
        event_id: String,
        event_type: String,
        /// `created_at` in Unix ms, for the deliverer's latency metric.
        created_at_ms: Option<i64>,
    },
    Nothing,
    Poison(String),
}

fn plan(ctx: &Context, payload: &[u8]) -> Plan {
    let view = match EventView::parse(payload) {
        Ok(v) => v,
        Err(errors) => {
            let reason = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            return Plan::Poison(format!("invalid event: {reason}"));
        }
    };
    let tree = ctx.tree.read();
    let destinations = ctx.destinations.read();
    ctx.metrics.table_size.with_label_values(&["namespaces"]).set(tree.len() as i64);
    ctx.metrics.table_size.with_label_values(&["destinations"]).set(destinations.len() as i64);
    let mut out = Vec::new();
    match route::route(&view, &tree, &destinations, &ctx.registry, ctx.accept_unknown, &mut out) {
        Err(reason) => Plan::Poison(reason),
        Ok(Decision::NotStreamed) => {
            ctx.metrics.events.with_label_values(&["not_streamed"]).inc();
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
            ctx.metrics.resolution.with_label_values(&[via]).inc();
            let targets = out.iter().map(|d| (d.id.clone(), d.owner == Owner::Instance)).collect();
            let id = view.id.as_ref().map(ToString::to_string).unwrap_or_default();
            let created_at_ms = view.created_at.as_deref().and_then(proto::event::timestamp_ms);
            Plan::Deliver { targets, event_id: id, event_type: view.event_type.into_owned(), created_at_ms }
        }
    }
}

async fn handle(ctx: Arc<Context>, m: OwnedMessage) {
    if let Some(at) = m.timestamp().to_millis() {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        ctx.metrics.lag.observe(((now as i64 - at).max(0) as f64) / 1000.0);
    }
    let payload = m.payload().unwrap_or_default();
    match plan(&ctx, payload) {
        Plan::Nothing => {}
        Plan::Poison(reason) => {
            tracing::warn!(partition = m.partition(), offset = m.offset(), %reason, "dead-lettering event");
            let mut headers: Vec<(&str, &[u8])> =
                kafka::header_pairs(&m).into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect();
            headers.push((H_REASON, reason.as_bytes()));
            let key = m.key().unwrap_or_default();
            kafka::produce_durably(&ctx.producer, &ctx.topics.events_dlq(), key, Some(payload), &headers).await;
            ctx.metrics.events.with_label_values(&["dead_lettered"]).inc();
        }
        Plan::Deliver { targets, event_id, event_type, created_at_ms } => {
            let topic = ctx.topics.deliveries();
            let writes = targets.iter().map(|(dest, instance)| {
                let mut meta = DeliveryMeta::new(dest, &event_id, &event_type);
                meta.created_at_ms = created_at_ms;
                let meta = meta.to_headers();
                let topic = &topic;
                let ctx = &ctx;
                async move {
                    let headers: Vec<(&str, &[u8])> = meta.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                    kafka::produce_durably(&ctx.producer, topic, dest.as_bytes(), Some(payload), &headers).await;
                    ctx.metrics.deliveries.with_label_values(&[if *instance { "instance" } else { "group" }]).inc();
                }
            });
            futures_util::future::join_all(writes).await;
            let outcome = if targets.is_empty() { "unrouted" } else { "routed" };
            ctx.metrics.events.with_label_values(&[outcome]).inc();
        }
    }
}
