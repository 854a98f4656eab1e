//! Layered, typed configuration: embedded defaults → optional TOML file →
//! `AUDITSTREAM_*` environment, then validation. Unknown keys are rejected
//! at every layer, so a typo fails at start instead of being ignored.
//!
//! Environment variables name a key path with `__` between levels:
//! `AUDITSTREAM_KAFKA__BROKERS=host:9092` sets `kafka.brokers`. A value is
//! read as TOML when it parses as such (numbers, booleans, arrays), else as a
//! string. Variables without `__` are not configuration.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "AUDITSTREAM_";

/// Why configuration could not be loaded. The process exits with 64
/// (`EX_USAGE`) before touching the network.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A value has the wrong type, or a key is unknown.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads a role's config: `T::default()`, then `file`, then `env`.
pub fn load<T>(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut merged = toml::Value::try_from(T::default())
        .map_err(|e| ConfigError::Invalid(format!("defaults do not serialize: {e}")))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| ConfigError::Syntax { path: path.display().to_string(), message: e.to_string() })?;
        merge(&mut merged, toml::Value::Table(table));
    }
    for (key, value) in env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let mut layer = parsed;
        for segment in path.iter().rev() {
            let mut t = toml::Table::new();
            t.insert(segment.clone(), layer);
            layer = toml::Value::Table(t);
        }
        merge(&mut merged, layer);
    }
    T::deserialize(merged).map_err(|e| ConfigError::Invalid(e.to_string()))
}

/// The process environment, for [`load`].
pub fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars()
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Serde for durations written as `30s`, `1m`, `250ms`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `d` as humantime text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads humantime text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like 30s: {e}")))
    }
}

/// Serde for lists of durations.
pub mod durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    /// Writes each as humantime text.
    pub fn serialize<S: Serializer>(ds: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(ds.len()))?;
        for d in ds {
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
        }
        seq.end()
    }

    /// Reads a list of humantime texts.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| {
                humantime::parse_duration(t)
                    .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a duration: {e}")))
            })
            .collect()
    }
}

/// Kafka client settings shared by every role.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Prefix of every topic name.
    pub topic_prefix: String,
    /// Extra librdkafka properties passed through unchanged: TLS and SASL
    /// (`security.protocol`, `ssl.ca.location`, `sasl.mechanism`,
    /// `sasl.username`, `sasl.password`, …), and producer batching
    /// (`linger.ms`, `compression.type`, `batch.size`). Values are never
    /// logged. Numbers and booleans are taken as their text, so
    /// `AUDITSTREAM_KAFKA__PROPERTIES__LINGER.MS=20` works.
    #[serde(deserialize_with = "scalar_texts")]
    pub properties: BTreeMap<String, String>,
    /// Partitions of topics created by auditstream.
    pub partitions: i32,
    /// Replication factor of topics created by auditstream.
    pub replication_factor: i32,
    /// Create missing topics at start.
    pub create_topics: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            properties: BTreeMap::new(),
            partitions: 4,
            replication_factor: 1,
            create_topics: true,
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<_> = self.properties.keys().collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("properties (values hidden)", &keys)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("create_topics", &self.create_topics)
            .finish()
    }
}

impl KafkaConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::Invalid("kafka.brokers is empty".into()));
        }
        if self.partitions < 1 || self.replication_factor < 1 {
            return Err(ConfigError::Invalid(
                "kafka.partitions and kafka.replication_factor must be at least 1".into(),
            ));
        }
        for key in self.properties.keys() {
            if matches!(key.as_str(), "bootstrap.servers" | "group.id" | "enable.auto.offset.store") {
                return Err(ConfigError::Invalid(format!(
                    "kafka.properties.{key} is managed by auditstream; use kafka.brokers or the role's settings"
                )));
            }
        }
        Ok(())
    }
}

/// A map whose values may be written as strings, numbers or booleans
/// (librdkafka takes every property as text).
fn scalar_texts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Integer(i64),
        Float(f64),
        Flag(bool),
    }
    let map = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                Scalar::Text(s) => s,
                Scalar::Integer(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Flag(b) => b.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// One operator key for secrets at rest.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Its id, recorded beside each value it seals.
    pub id: String,
    /// Base64 of 32 random bytes (`head -c 32 /dev/urandom | base64`).
    pub key: String,
}

impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyConfig({:?}, ***)", self.id)
    }
}

/// Keys that seal destination secrets in the destinations topic. The first
/// seals, all open: rotate by putting a new key first, running
/// `auditstream reseal`, then removing the old key. Every role needs the
/// same keys. Empty: secrets are stored in the clear (development).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// The keys, sealing key first.
    pub keys: Vec<KeyConfig>,
}

impl SecretsConfig {
    /// The keyring, or `None` when no keys are configured.
    pub fn keyring(&self) -> Result<Option<std::sync::Arc<proto::seal::Keyring>>, ConfigError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        proto::seal::Keyring::new(self.keys.iter().map(|k| (k.id.as_str(), k.key.as_str())))
            .map(|k| Some(std::sync::Arc::new(k)))
            .map_err(|e| ConfigError::Invalid(format!("secrets.keys: {e}")))
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable (development).
    Pretty,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info,rdkafka=warn`.
    pub filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { format: LogFormat::Json, filter: "info".into() }
    }
}

/// The admin port: `/live`, `/ready`, `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], 9090)) }
    }
}

/// How long a role may take to drain at shutdown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Drain deadline; keep it below Kubernetes' grace period (30 s).
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace: Duration::from_secs(20) }
    }
}

/// The settings every role shares.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Common {
    /// Kafka client.
    pub kafka: KafkaConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Admin port.
    pub admin: AdminConfig,
    /// Shutdown.
    pub shutdown: ShutdownConfig,
}

impl Common {
    /// Checks the shared settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        if self.shutdown.grace.is_zero() {
            return Err(ConfigError::Invalid("shutdown.grace must be above zero".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Role {
        common: Common,
        limit: u32,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_then_file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "limit = 5\n[common.kafka]\nbrokers = \"file:1\"\ntopic_prefix = \"f.\"\n").unwrap();
        let c: Role = load(
            Some(&file),
            env(&[
                ("AUDITSTREAM_COMMON__KAFKA__BROKERS", "env:2"),
                ("AUDITSTREAM_COMMON__SHUTDOWN__GRACE", "5s"),
                ("AUDITSTREAM_COMMON__KAFKA__PROPERTIES__SASL.PASSWORD", "hunter2"),
                ("AUDITSTREAM_COMMON__KAFKA__PROPERTIES__LINGER.MS", "20"),
                ("AUDITSTREAM_COMMON__KAFKA__PROPERTIES__ENABLE.SSL.CERTIFICATE.VERIFICATION", "false"),
                ("AUDITSTREAM_TEST_BROKERS", "not config"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limit, 5);
        assert_eq!(c.common.kafka.brokers, "env:2");
        assert_eq!(c.common.kafka.topic_prefix, "f.");
        assert_eq!(c.common.shutdown.grace, Duration::from_secs(5));
        assert_eq!(c.common.kafka.properties["sasl.password"], "hunter2");
        assert_eq!(c.common.kafka.properties["linger.ms"], "20", "a number is taken as its text");
        assert_eq!(c.common.kafka.properties["enable.ssl.certificate.verification"], "false");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(c.common.telemetry.filter, "info");
    }

    #[test]
    fn unknown_keys_are_rejected_in_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "limmit = 5\n").unwrap();
        let err = load::<Role>(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(err.contains("limmit"), "{err}");
        let err = load::<Role>(None, env(&[("AUDITSTREAM_COMMON__KAFKA__BROKER", "x")])).unwrap_err().to_string();
        assert!(err.contains("broker"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err =
            load::<Role>(None, env(&[("AUDITSTREAM_LIMIT", "1"), ("AUDITSTREAM_COMMON__SHUTDOWN__GRACE", "soon")]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("soon"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "limit = [").unwrap();
        assert!(matches!(load::<Role>(Some(&file), env(&[])), Err(ConfigError::Syntax { .. })));
        assert!(matches!(
            load::<Role>(Some(&dir.path().join("missing.toml")), env(&[])),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn validation_catches_managed_properties() {
        let mut c = Common::default();
        c.kafka.properties.insert("group.id".into(), "x".into());
        assert!(c.validate().unwrap_err().to_string().contains("group.id"));
        let mut c = Common::default();
        c.kafka.brokers = " ".into();
        assert!(c.validate().is_err());
        let mut c = Common::default();
        c.shutdown.grace = Duration::ZERO;
        assert!(c.validate().is_err());
        for (partitions, replication_factor) in [(0, 1), (1, 0)] {
            let mut c = Common::default();
            (c.kafka.partitions, c.kafka.replication_factor) = (partitions, replication_factor);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("kafka.partitions and kafka.replication_factor must be at least 1"), "{e}");
        }
    }
}
