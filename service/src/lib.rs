//! Service plumbing shared by every auditstream role, written once: typed
//! configuration, telemetry, the admin server, shutdown, Kafka client
//! settings and the offset watermark that keeps consumers at-least-once.
//!
//! # Layout
//! - [`config`] — defaults → file → `AUDITSTREAM_*` environment, validated.
//! - [`telemetry`] — build a `tracing` subscriber, then install it.
//! - [`admin`] — `/live`, `/ready`, `/metrics` on the admin port.
//! - [`shutdown`] — SIGTERM/SIGINT, and the signal passed into `run`.
//! - [`kafka`] — client settings, topic creation, the embedded mock cluster.
//! - [`offsets`] — per-partition contiguous watermarks.

pub mod admin;
pub mod config;
pub mod consume;
pub mod kafka;
pub mod offsets;
pub mod shutdown;
pub mod telemetry;

pub use admin::{Admin, Readiness};
pub use config::{Common, ConfigError};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub mod table;
