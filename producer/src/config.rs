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
    /// Keys for destination secrets at rest.
    pub secrets: service::config::SecretsConfig,
    /// The public API.
    pub api: ApiConfig,
    /// Who may call the API.
    pub auth: AuthConfig,
    /// The relay that publishes destination changes' audit events.
    pub relay: RelayConfig,
}

/// The relay ([`crate::relay`]): a consumer group over
/// `audit.destinations` that publishes each change's audit event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Consumer group; the producer replicas in one group split the
    /// partitions, and each change's audit event is published by one.
    pub group_id: String,
    /// How long the group waits for a silent member before moving its
    /// partitions.
    #[serde(with = "duration")]
    pub session_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self { group_id: "auditstream-destination-audits".into(), session_timeout: Duration::from_secs(10) }
    }
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
    /// Largest namespace import body, in bytes.
    pub max_import_bytes: usize,
    /// Most active destinations per group.
    pub max_active_destinations_per_group: usize,
    /// How long a replaced signing secret keeps signing beside the new one.
    #[serde(with = "duration")]
    pub signing_secret_rotation_grace: Duration,
    /// Special-purpose networks destinations may point at anyway
    /// (e.g. `127.0.0.0/8` in development).
    pub allowed_networks: Vec<proto::netguard::Network>,
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
            max_import_bytes: 256 * 1024 * 1024,
            max_active_destinations_per_group: 5,
            signing_secret_rotation_grace: Duration::from_secs(24 * 3600),
            allowed_networks: Vec::new(),
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
    /// Manage instance-level destinations, and every group's.
    InstanceAdmin,
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
    #[serde(default)]
    pub rights: Vec<Right>,
    /// Top-level groups whose destinations it may manage (group owner).
    #[serde(default)]
    pub owner_of: Vec<i64>,
    /// The user id recorded as `author_id` of the audit events its changes
    /// raise (-1, named after the token, when not set).
    #[serde(default)]
    pub user_id: Option<i64>,
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
        self.secrets.keyring()?;
        let a = &self.api;
        if a.max_events == 0
            || a.max_event_bytes == 0
            || a.max_request_bytes == 0
            || a.max_import_bytes == 0
            || a.max_in_flight == 0
        {
            return Err(ConfigError::Invalid(
                "api.max_events, max_event_bytes, max_request_bytes, max_import_bytes and max_in_flight must be \
                 above zero"
                    .into(),
            ));
        }
        if self.relay.group_id.is_empty() {
            return Err(ConfigError::Invalid("relay.group_id must be set".into()));
        }
        if a.publish_timeout.is_zero() {
            return Err(ConfigError::Invalid("api.publish_timeout must be above zero".into()));
        }
        // Read here too, so that a folder the producer cannot use stops it
        // (and `config check`) before it touches the network.
        proto::Registry::with_dir(a.types_dir.as_deref())
            .and_then(|registry| crate::destinations::check_audit_types(&registry))
            .map_err(|e| ConfigError::Invalid(format!("api.types_dir: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> ProducerConfig {
        let mut c = ProducerConfig::default();
        c.auth.required = false;
        c
    }

    #[test]
    fn each_unusable_setting_is_refused_by_name() {
        assert!(valid().validate().is_ok());
        let refused = |change: fn(&mut ProducerConfig), name: &str| {
            let mut c = valid();
            change(&mut c);
            let e = c.validate().expect_err(name).to_string();
            assert!(e.contains(name), "{e}");
        };
        refused(|c| c.relay.group_id.clear(), "relay.group_id");
        refused(|c| c.api.publish_timeout = Duration::ZERO, "api.publish_timeout");
        let limits = "api.max_events, max_event_bytes, max_request_bytes, max_import_bytes and max_in_flight";
        refused(|c| c.api.max_events = 0, limits);
        refused(|c| c.api.max_event_bytes = 0, limits);
        refused(|c| c.api.max_request_bytes = 0, limits);
        refused(|c| c.api.max_import_bytes = 0, limits);
        refused(|c| c.api.max_in_flight = 0, limits);
        refused(|c| c.auth.required = true, "auth.tokens is empty");
        refused(
            |c| c.api.types_dir = Some("/nonexistent-types".into()),
            "api.types_dir: /nonexistent-types: cannot read",
        );
        refused(
            |c| {
                c.auth.tokens.push(TokenConfig {
                    name: "t".into(),
                    sha256: "x".into(),
                    rights: vec![],
                    owner_of: vec![],
                    user_id: None,
                })
            },
            "sha256 must be 64 hex",
        );
    }
}
