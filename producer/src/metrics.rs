//! The producer's metrics, registered under `auditstream_producer_`.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use proto::FieldError;

/// Handles to the producer's metrics.
#[derive(Clone)]
pub struct Metrics {
    events: IntCounterVec,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    produce_seconds: Histogram,
    rejected: IntCounterVec,
    in_flight: IntGauge,
    /// Destination changes' audit events the relay took on, by outcome:
    /// `published`, or `dead_lettered` (not a valid event of a change of
    /// the record's destination).
    pub relayed: IntCounterVec,
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The rejection reason of an event's problems, for the metric label
/// (a small fixed set).
pub fn reason(errors: &[FieldError]) -> &'static str {
    let Some(first) = errors.first() else { return "invalid_field" };
    match (first.field.as_str(), first.problem.as_str()) {
        ("(event)", p) if p.contains("bytes, more than") => "too_large",
        ("(event)", p) if p.contains("deeper than") => "too_deep",
        ("(event)", _) => "malformed",
        ("event_type", p) if p.contains("not a registered") => "unregistered_type",
        ("event_type", p) if p.contains("streamed: false") => "not_streamed",
        _ => "invalid_field",
    }
}

/// The rejection reason, and the API's error code, of a request refused at
/// the in-flight limit.
pub const BUSY: &str = "busy";

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
        let rejected = IntCounterVec::new(
            Opts::new(
                "auditstream_producer_rejected_events_total",
                "Events refused, by reason (busy: requests refused at the in-flight limit, their events unread)",
            ),
            &["reason"],
        )?;
        let in_flight = IntGauge::new("auditstream_producer_requests_in_flight", "Event requests being handled")?;
        let relayed = IntCounterVec::new(
            Opts::new(
                "auditstream_producer_destination_audits_total",
                "Audit events of destination changes relayed to audit.events, by outcome: published, dead_lettered",
            ),
            &["outcome"],
        )?;
        // Every outcome's series from the start at 0, so that rate() and
        // increase() (and the alerts on them) see the first event.
        for outcome in ["published", "dead_lettered"] {
            relayed.with_label_values(&[outcome]);
        }
        for outcome in ["accepted", "invalid", "unavailable"] {
            events.with_label_values(&[outcome]);
        }
        // The saturation alert reads this one.
        rejected.with_label_values(&[BUSY]);
        registry.register(Box::new(relayed.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_seconds.clone()))?;
        registry.register(Box::new(produce_seconds.clone()))?;
        Ok(Self { events, requests, request_seconds, produce_seconds, rejected, in_flight, relayed })
    }

    /// Counts `n` events with `outcome`.
    pub fn events(&self, outcome: &str, n: usize) {
        self.events.with_label_values(&[outcome]).inc_by(n as u64);
    }

    /// Counts `n` refused events with `reason`.
    pub fn rejected(&self, reason: &str, n: usize) {
        self.rejected.with_label_values(&[reason]).inc_by(n as u64);
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight_guard(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
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
