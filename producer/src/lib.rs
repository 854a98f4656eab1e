//! The producer: the front door through which events, namespace changes
//! and destination changes enter Kafka, and the Rust client library
//! ([`Publisher`]) services link to publish straight to Kafka.
//!
//! # Layout
//! - [`config`] — the role's typed configuration.
//! - [`client`] — validation, id minting, partitioning, the Kafka write.
//! - [`audit`] — instrumentation: audit contexts and scoped recording.
//! - [`destinations`] — the owners' destination API, every change audited.
//! - [`relay`] — publishes each destination change's audit event.
//! - [`api`] — the HTTP API.
//! - [`auth`] — bearer tokens, hashed, compared in constant time.
//! - [`metrics`] — `auditstream_producer_*`.

pub mod api;
pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod destinations;
pub mod metrics;
pub mod relay;

pub use client::{PublishError, Publisher};
pub use config::ProducerConfig;

use proto::{EventLimits, Registry, topics::Topics};
use service::{Admin, Shutdown, admin::ReadyFlag};
use tokio::net::TcpListener;

/// Why the producer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// Event-type definitions could not be loaded: fix them.
    #[error("event type definitions: {0}")]
    Types(String),
    /// Kafka could not be set up.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Publisher setup failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Metrics registration failed (a name registered twice).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The listener failed.
    #[error("serving the API: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the producer API on `listener` until `shutdown`; then stops
/// accepting, finishes the requests in flight and flushes Kafka.
///
/// Its own readiness check, `producer`, is registered when this is called,
/// before the future first runs, and set once the API serves.
pub fn run(
    config: ProducerConfig,
    admin: Admin,
    listener: TcpListener,
    shutdown: Shutdown,
) -> impl Future<Output = Result<(), ProducerError>> + Send {
    let ready = admin.readiness.register("producer");
    run_registered(config, admin, listener, shutdown, ready)
}

async fn run_registered(
    config: ProducerConfig,
    admin: Admin,
    listener: TcpListener,
    shutdown: Shutdown,
    ready: ReadyFlag,
) -> Result<(), ProducerError> {
    let registry = Registry::with_dir(config.api.types_dir.as_deref()).map_err(ProducerError::Types)?;
    destinations::check_audit_types(&registry).map_err(ProducerError::Types)?;
    if config.kafka.create_topics {
        service::kafka::ensure_topics(&config.kafka, &Topics::new(config.kafka.topic_prefix.clone()).all(0)).await?;
    }
    let limits = EventLimits {
        max_event_bytes: config.api.max_event_bytes,
        accept_unknown_types: config.api.accept_unknown_types,
    };
    let keyring = config.secrets.keyring().map_err(|e| ProducerError::Config(e.to_string()))?;
    let publisher =
        Publisher::new(&config.kafka, registry, limits, config.api.publish_timeout)?.with_keyring(keyring.clone());
    let metrics = metrics::Metrics::register(&admin.registry)?;
    let auth = auth::Auth::new(&config.auth);
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    let (destination_table, _) = service::table::follow(
        &config.kafka,
        &topics.destinations(),
        proto::destination::Directory::with_keyring(keyring.clone()),
        admin.readiness.register("producer.destinations"),
        shutdown.clone(),
    )
    .await?;
    let (tree, _) = service::table::follow(
        &config.kafka,
        &topics.namespaces(),
        proto::tree::Tree::default(),
        admin.readiness.register("producer.namespaces"),
        shutdown.clone(),
    )
    .await?;
    let relay = relay::start(
        &config.kafka,
        &config.relay,
        config.shutdown.grace,
        publisher.clone(),
        metrics.clone(),
        &admin,
        shutdown.clone(),
    )?;
    let store = destinations::Store { destinations: destination_table, tree };
    let state = api::AppState::new(publisher.clone(), auth, config.api.clone(), metrics, store);
    tracing::info!(addr = %listener.local_addr()?, "producer API listening");
    ready.set(true);
    let mut stop = shutdown.clone();
    axum::serve(listener, api::router(state)).with_graceful_shutdown(async move { stop.wait().await }).await?;
    ready.set(false);
    // The relay stops with the shutdown, committing what it published.
    let _ = relay.await;
    publisher.flush(config.shutdown.grace);
    tracing::info!("producer stopped");
    Ok(())
}
