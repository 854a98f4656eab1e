//! The deliverer's metrics, registered under `auditstream_deliverer_`.

use std::sync::{Arc, OnceLock};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Handles to the deliverer's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// HTTP attempts by outcome (delivered, failed) and status class
    /// (2xx, 3xx, 4xx, 5xx, none).
    pub attempts: IntCounterVec,
    /// Deliveries finished, by outcome: delivered, retried (moved to a
    /// retry topic), dead_lettered, dropped (destination deleted).
    pub deliveries: IntCounterVec,
    /// Seconds from an event's `created_at` to its 2xx.
    pub latency: Histogram,
    /// Seconds one HTTP attempt took, from sending to the response read.
    pub attempt_duration: Histogram,
    /// Destinations whose circuit is open.
    pub circuit_open: IntGauge,
    /// Deliveries held waiting for their due time, by retry rung.
    pub retry_waiting: IntGaugeVec,
    /// Connections to destinations opened (by protocol) and open.
    pub connections: crate::pool::Counters,
    /// `deliveries{outcome="delivered"}`, looked up once: a label lookup
    /// hashes the labels on every call.
    pub delivered: IntCounter,
    /// The `attempts` series by outcome and class, each looked up once, on
    /// first use.
    attempt_series: Arc<[[OnceLock<IntCounter>; CLASSES.len()]; 2]>,
}

/// The status classes of `attempts`.
const CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other", "none"];

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let attempts = IntCounterVec::new(
            Opts::new("auditstream_deliverer_attempts_total", "HTTP attempts by outcome and status class"),
            &["outcome", "class"],
        )?;
        let deliveries = IntCounterVec::new(
            Opts::new("auditstream_deliverer_deliveries_total", "Deliveries finished, by outcome"),
            &["outcome"],
        )?;
        let opened = IntCounterVec::new(
            Opts::new(
                "auditstream_deliverer_connections_opened_total",
                "Connections to destinations opened, by protocol (http1, http2)",
            ),
            &["protocol"],
        )?;
        let open = IntGauge::new(
            "auditstream_deliverer_connections_open",
            "Connections to destinations open now, idle or busy",
        )?;
        let resent = IntCounter::new(
            "auditstream_deliverer_requests_resent_total",
            "Requests sent again on another connection because theirs closed before writing them (a kept-alive connection the receiver closed as it was reused, or a new one it reset at once)",
        )?;
        registry.register(Box::new(opened.clone()))?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(resent.clone()))?;
        let m = Self {
            connections: crate::pool::Counters {
                opened_http1: opened.with_label_values(&["http1"]),
                opened_http2: opened.with_label_values(&["http2"]),
                open,
                resent,
            },
            delivered: deliveries.with_label_values(&["delivered"]),
            attempt_series: Arc::default(),
            attempts,
            deliveries,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "auditstream_deliverer_delivery_latency_seconds",
                    "Time from an event's created_at to the destination's 2xx",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
                    86400.0,
                ]),
            )?,
            attempt_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "auditstream_deliverer_attempt_duration_seconds",
                    "Time one HTTP attempt took, from sending the request to reading the response",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            )?,
            circuit_open: IntGauge::new("auditstream_deliverer_circuit_open", "Destinations whose circuit is open")?,
            retry_waiting: IntGaugeVec::new(
                Opts::new("auditstream_deliverer_retry_waiting", "Deliveries held until their retry is due, by rung"),
                &["rung"],
            )?,
        };
        // Every outcome's series from the start at 0, so that increase()
        // (and the dead-letter alert on it) sees the first one.
        for outcome in ["retried", "dead_lettered", "dropped"] {
            m.deliveries.with_label_values(&[outcome]);
        }
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.attempt_duration.clone()))?;
        registry.register(Box::new(m.circuit_open.clone()))?;
        registry.register(Box::new(m.retry_waiting.clone()))?;
        registry.register(Box::new(m.attempts.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        Ok(m)
    }

    /// Counts one attempt.
    pub fn attempt(&self, delivered: bool, status: Option<u16>) {
        let class = match status {
            Some(s) => usize::from(s / 100).checked_sub(1).filter(|&c| c < 5).unwrap_or(5),
            None => 6,
        };
        let outcome = usize::from(!delivered);
        self.attempt_series[outcome][class]
            .get_or_init(|| self.attempts.with_label_values(&[["delivered", "failed"][outcome], CLASSES[class]]))
            .inc();
    }
}
