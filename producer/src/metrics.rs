//! The producer's metrics, registered under `auditstream_producer_`.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Handles to the producer's metrics.
#[derive(Clone)]
pub struct Metrics {
    events: IntCounterVec,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    produce_seconds: Histogram,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new("auditstream_producer_events_total", "Events by outcome: accepted, invalid, unavailable"),
            &["outcome"],
        )?;
        let requests = IntCounterVec::new(
            Opts::new("auditstream_producer_requests_total", "API requests by route and status"),
            &["route", "status"],
        )?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("auditstream_producer_request_duration_seconds", "API request latency"),
            &["route"],
        )?;
        let produce_seconds = Histogram::with_opts(HistogramOpts::new(
            "auditstream_producer_kafka_produce_seconds",
            "Time for Kafka to acknowledge a request's events",
        ))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(produce_seconds.clone()))?;
        Ok(Self { events, requests, request_seconds, produce_seconds })
    }

    /// Counts `n` events with `outcome`.
    pub fn events(&self, outcome: &str, n: usize) {
        self.events.with_label_values(&[outcome]).inc_by(n as u64);
    }

    /// Records one request.
    pub fn observe_request(&self, route: &str, status: u16, took: Duration) {
        self.requests.with_label_values(&[route, &status.to_string()]).inc();
        self.request_seconds.with_label_values(&[route]).observe(took.as_secs_f64());
    }

    /// Records a Kafka produce round.
    pub fn observe_produce(&self, took: Duration) {
        self.produce_seconds.observe(took.as_secs_f64());
    }
}
