//! The deliverer's metrics, registered under `auditstream_deliverer_`.

use prometheus::{IntCounterVec, Opts, Registry};

/// Handles to the deliverer's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// HTTP attempts by outcome (delivered, failed) and status class
    /// (2xx, 3xx, 4xx, 5xx, none).
    pub attempts: IntCounterVec,
    /// Deliveries finished, by outcome: delivered, retried (moved to a
    /// retry topic), dead_lettered, dropped (destination deleted).
    pub deliveries: IntCounterVec,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            attempts: IntCounterVec::new(
                Opts::new("auditstream_deliverer_attempts_total", "HTTP attempts by outcome and status class"),
                &["outcome", "class"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new("auditstream_deliverer_deliveries_total", "Deliveries finished, by outcome"),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        Ok(m)
    }

    /// Counts one attempt.
    pub fn attempt(&self, delivered: bool, status: Option<u16>) {
        let class = match status {
            Some(s) => ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .get(usize::from(s / 100).wrapping_sub(1))
                .copied()
                .unwrap_or("other"),
            None => "none",
        };
        self.attempts.with_label_values(&[if delivered { "delivered" } else { "failed" }, class]).inc();
    }
}
