//! The router's metrics, registered under `auditstream_router_`.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Handles to the router's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Events by outcome: routed, unrouted (no destination wanted it),
    /// not_streamed, dead_lettered.
    pub events: IntCounterVec,
    /// Deliveries written, by destination level (instance, group).
    pub deliveries: IntCounterVec,
    /// Events whose root came from somewhere other than the tree, by how:
    /// path, unknown, cycle, too_deep.
    pub resolution: IntCounterVec,
    /// Size of the in-memory tables: namespaces, destinations.
    pub table_size: IntGaugeVec,
    /// Seconds from an event's arrival in Kafka to its routing.
    pub lag: Histogram,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            events: IntCounterVec::new(
                Opts::new("auditstream_router_events_total", "Events read, by outcome"),
                &["outcome"],
            )?,
            deliveries: IntCounterVec::new(
                Opts::new("auditstream_router_deliveries_total", "Deliveries written, by destination level"),
                &["level"],
            )?,
            resolution: IntCounterVec::new(
                Opts::new("auditstream_router_root_resolution_total", "How each event's root group was found"),
                &["via"],
            )?,
            table_size: IntGaugeVec::new(
                Opts::new("auditstream_router_table_entries", "Entries in the in-memory tables"),
                &["table"],
            )?,
            lag: Histogram::with_opts(
                HistogramOpts::new(
                    "auditstream_router_lag_seconds",
                    "Time from an event's arrival in Kafka to its routing",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            )?,
        };
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.resolution.clone()))?;
        registry.register(Box::new(m.table_size.clone()))?;
        Ok(m)
    }
}
