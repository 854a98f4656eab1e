//! The producer's configuration.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use service::config::{AdminConfig, ConfigError, KafkaConfig, ShutdownConfig, TelemetryConfig, duration};

/// Everything the producer role reads at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// Kafka client.
    pub kafka: KafkaConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Admin port.
    pub admin: AdminConfig,
    /// Shutdown.
    pub shutdown: ShutdownConfig,
    /// The public API.
    pub api: ApiConfig,
    /// Who may call the API.
    pub auth: AuthConfig,
}

/// The public HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Largest request body, in bytes.
    pub max_request_bytes: usize,
    /// Most events in one request.
    pub max_events: usize,
    /// Largest single event, in bytes.
    pub max_event_bytes: usize,
    /// Accept event types that have no definition.
    pub accept_unknown_types: bool,
    /// A folder of extra event-type definitions, added to the shipped ones.
    pub types_dir: Option<PathBuf>,
    /// How long a publish may wait for Kafka before the API answers 503.
    #[serde(with = "duration")]
    pub publish_timeout: Duration,
    /// Most requests handled at once; beyond it the API answers 503.
    pub max_in_flight: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_request_bytes: 5 * 1024 * 1024,
            max_events: 1000,
            max_event_bytes: 1024 * 1024,
            accept_unknown_types: false,
            types_dir: None,
            publish_timeout: Duration::from_secs(10),
            max_in_flight: 256,
        }
    }
}

/// A right a bearer token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Right {
    /// Publish audit events.
    Publish,
    /// Write the namespace tree.
    Namespaces,
}

/// One API token, stored as the SHA-256 of its text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (for logs; never the token).
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    /// What it may do.
    pub rights: Vec<Right>,
}

/// Who may call the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When false, requests without a token are allowed every right
    /// (development only).
    pub required: bool,
    /// Known tokens.
    pub tokens: Vec<TokenConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { required: true, tokens: Vec::new() }
    }
}

impl ProducerConfig {
    /// Checks the values before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        let a = &self.api;
        if a.max_events == 0 || a.max_event_bytes == 0 || a.max_request_bytes == 0 || a.max_in_flight == 0 {
            return Err(ConfigError::Invalid("api limits must be above zero".into()));
        }
        if a.publish_timeout.is_zero() {
            return Err(ConfigError::Invalid("api.publish_timeout must be above zero".into()));
        }
        for t in &self.auth.tokens {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::Invalid(format!(
                    "auth.tokens {:?}: sha256 must be 64 hex characters (the hash, not the token)",
                    t.name
                )));
            }
        }
        if self.auth.required && self.auth.tokens.is_empty() {
            return Err(ConfigError::Invalid(
                "auth.required is true but auth.tokens is empty: nobody could publish".into(),
            ));
        }
        Ok(())
    }
}
