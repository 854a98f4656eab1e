//! Logging: [`subscriber`] builds, [`init`] installs. Split so tests can
//! build a subscriber without touching the global one.

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, registry::Registry};

use crate::config::{LogFormat, TelemetryConfig};

/// Builds a subscriber from the config. `RUST_LOG`, when set, wins over
/// the configured filter.
pub fn subscriber(config: &TelemetryConfig) -> Box<dyn Subscriber + Send + Sync> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let base = Registry::default().with(filter);
    match config.format {
        LogFormat::Json => Box::new(base.with(fmt::layer().json().with_writer(std::io::stderr))),
        LogFormat::Pretty => Box::new(base.with(fmt::layer().with_writer(std::io::stderr))),
    }
}

/// Installs the subscriber globally; later calls are ignored (tests and
/// `dev` start several roles in one process).
pub fn init(config: &TelemetryConfig) {
    let _ = tracing::subscriber::set_global_default(subscriber(config));
}
