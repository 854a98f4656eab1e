//! The deliverer's configuration.

use std::time::Duration;

use proto::netguard::Network;
use serde::{Deserialize, Serialize};
use service::config::{AdminConfig, ConfigError, KafkaConfig, ShutdownConfig, TelemetryConfig, duration, durations};

/// Everything the deliverer role reads at start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelivererConfig {
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
    /// Delivery.
    pub deliverer: DelivererSettings,
}

/// Delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelivererSettings {
    /// Consumer group of `audit.deliveries`; retry topic `n` uses
    /// `<group_id>-retry-<n>`.
    pub group_id: String,
    /// Consumer session timeout.
    #[serde(with = "duration")]
    pub session_timeout: Duration,
    /// Most deliveries in flight at once, per consumer.
    pub max_in_flight: usize,
    /// Time to connect to a destination.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Time for a whole attempt, response included.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// How long a kept-alive connection to a destination may sit unused
    /// before it is closed.
    #[serde(with = "duration")]
    pub idle_connection_timeout: Duration,
    /// Extra in-process tries after a failed first one, before the retry
    /// topics take over.
    pub quick_retries: usize,
    /// First pause between quick tries (doubling after each).
    #[serde(with = "duration")]
    pub quick_retry_delay: Duration,
    /// One delay per retry topic; after the last, the dead-letter topic.
    #[serde(with = "durations")]
    pub retry_delays: Vec<Duration>,
    /// The longest `Retry-After` honoured.
    #[serde(with = "duration")]
    pub max_retry_after: Duration,
    /// Most response-body bytes read (then discarded).
    pub max_response_bytes: usize,
    /// Special-purpose networks destinations may reach anyway
    /// (e.g. `127.0.0.0/8` in development).
    pub allowed_networks: Vec<Network>,
    /// Attempts in flight to one destination.
    pub per_destination_concurrency: usize,
    /// Most deliveries that may wait for one of those places; beyond it they
    /// are set aside on their current retry rung.
    pub per_destination_queue: usize,
    /// Longest wait for one of a destination's places. A delivery whose wait
    /// would be longer (judged from the destination's recent attempt times)
    /// is set aside at once, so a slow destination holds its concurrency
    /// plus about this long's arrivals, while a fast one is never set aside.
    #[serde(with = "duration")]
    pub per_destination_max_wait: Duration,
    /// Consecutive failed attempts that open a destination's circuit.
    pub circuit_failures: u32,
    /// How long an open circuit stays open before one trial attempt.
    #[serde(with = "duration")]
    pub circuit_open_for: Duration,
}

impl Default for DelivererSettings {
    fn default() -> Self {
        let m = |mins: u64| Duration::from_secs(mins * 60);
        Self {
            group_id: "auditstream-deliverer".into(),
            session_timeout: Duration::from_secs(10),
            max_in_flight: 512,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(60),
            quick_retries: 2,
            quick_retry_delay: Duration::from_millis(500),
            // 10 s, 1 min, 10 min, 1 h, 4 h, 12 h, 12 h: about 29 hours.
            retry_delays: vec![Duration::from_secs(10), m(1), m(10), m(60), m(240), m(720), m(720)],
            max_retry_after: Duration::from_secs(3600),
            max_response_bytes: 64 * 1024,
            allowed_networks: Vec::new(),
            per_destination_concurrency: 32,
            per_destination_queue: 10_000,
            per_destination_max_wait: Duration::from_secs(1),
            circuit_failures: 5,
            circuit_open_for: Duration::from_secs(30),
        }
    }
}

impl DelivererSettings {
    /// How long a delivery set aside for the `n`th time in a row waits:
    /// `quick_retry_delay` doubling each time, up to the first rung's delay.
    pub fn bounce_delay(&self, n: u32) -> Duration {
        let cap = self.retry_delays.first().copied().unwrap_or(self.quick_retry_delay).max(self.quick_retry_delay);
        self.quick_retry_delay.saturating_mul(1u32 << n.min(20)).min(cap)
    }

    /// Times in a row a delivery may be set aside before it goes down the
    /// ladder as if an attempt had failed: once the doubling reached the
    /// first rung's delay.
    pub fn max_bounces(&self) -> u32 {
        (0..20).find(|&n| self.bounce_delay(n) >= self.bounce_delay(20)).map_or(20, |n| n + 1)
    }
}

impl DelivererConfig {
    /// Checks the values before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.secrets.keyring()?;
        let d = &self.deliverer;
        if d.group_id.is_empty() || d.max_in_flight == 0 {
            return Err(ConfigError::Invalid(
                "deliverer.group_id must be set and deliverer.max_in_flight above zero".into(),
            ));
        }
        if d.connect_timeout.is_zero() || d.request_timeout.is_zero() || d.idle_connection_timeout.is_zero() {
            return Err(ConfigError::Invalid("deliverer timeouts must be above zero".into()));
        }
        if d.per_destination_concurrency == 0
            || d.circuit_failures == 0
            || d.circuit_open_for.is_zero()
            || d.per_destination_max_wait.is_zero()
        {
            return Err(ConfigError::Invalid(
                "deliverer.per_destination_concurrency, per_destination_max_wait, circuit_failures and \
                 circuit_open_for must be above zero"
                    .into(),
            ));
        }
        if d.retry_delays.is_empty() || d.retry_delays.iter().any(Duration::is_zero) {
            return Err(ConfigError::Invalid(
                "deliverer.retry_delays needs at least one delay, all above zero (busy destinations' deliveries are \
                 set aside through the first rung)"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounces_double_up_to_the_first_rung_then_stop() {
        let s = DelivererSettings::default();
        let ms = |n| s.bounce_delay(n).as_millis();
        // 500 ms doubling, capped at the first rung's 10 s.
        assert_eq!([ms(0), ms(1), ms(2), ms(3), ms(4), ms(5), ms(40)], [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
        assert_eq!(s.max_bounces(), 6, "500 ms .. 8 s and one at 10 s, then down the ladder");
        let quick =
            DelivererSettings { retry_delays: vec![Duration::from_millis(100)], ..DelivererSettings::default() };
        assert_eq!(quick.max_bounces(), 1, "a first rung shorter than the quick delay: one bounce");
    }

    #[test]
    fn each_unusable_setting_is_refused_by_name() {
        assert!(DelivererConfig::default().validate().is_ok());
        let refused = |change: fn(&mut DelivererSettings), name: &str| {
            let mut c = DelivererConfig::default();
            change(&mut c.deliverer);
            let e = c.validate().expect_err(name).to_string();
            assert!(e.contains(name), "{e}");
        };
        refused(|d| d.group_id.clear(), "deliverer.group_id must be set");
        refused(|d| d.max_in_flight = 0, "deliverer.max_in_flight above zero");
        refused(|d| d.connect_timeout = Duration::ZERO, "deliverer timeouts");
        refused(|d| d.request_timeout = Duration::ZERO, "deliverer timeouts");
        refused(|d| d.idle_connection_timeout = Duration::ZERO, "deliverer timeouts");
        let isolation = "per_destination_concurrency, per_destination_max_wait, circuit_failures and circuit_open_for";
        refused(|d| d.per_destination_concurrency = 0, isolation);
        refused(|d| d.per_destination_max_wait = Duration::ZERO, isolation);
        refused(|d| d.circuit_failures = 0, isolation);
        refused(|d| d.circuit_open_for = Duration::ZERO, isolation);
        refused(|d| d.retry_delays.clear(), "deliverer.retry_delays needs at least one delay");
        refused(|d| d.retry_delays[0] = Duration::ZERO, "all above zero");
    }
}
