//! The router's metrics, registered under `auditstream_router_`.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    /// Records written again: Kafka refused them, or the producer's queue
    /// had no room.
    pub rewrites: IntCounter,
    /// Events completed before delivery: written to Kafka without some
    /// fields of SPEC §1, or with `created_at` in another RFC 3339 form.
    pub completed: IntCounter,
    /// The per-event series, looked up once (a label lookup hashes the
    /// labels on every call).
    pub hot: Hot,
}

/// Series touched for every event.
#[derive(Clone)]
pub struct Hot {
    /// `events{outcome="routed"}`.
    pub routed: IntCounter,
    /// `events{outcome="unrouted"}`.
    pub unrouted: IntCounter,
    /// `events{outcome="not_streamed"}`.
    pub not_streamed: IntCounter,
    /// `events{outcome="dead_lettered"}`.
    pub dead_lettered: IntCounter,
    /// `resolution{via="tree"}`.
    pub via_tree: IntCounter,
    /// `deliveries{level="instance"}`.
    pub instance: IntCounter,
    /// `deliveries{level="group"}`.
    pub group: IntCounter,
    /// `table_size{table="namespaces"}`.
    pub namespaces: IntGauge,
    /// `table_size{table="destinations"}`.
    pub destinations: IntGauge,
}

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let events =
            IntCounterVec::new(Opts::new("auditstream_router_events_total", "Events read, by outcome"), &["outcome"])?;
        let deliveries = IntCounterVec::new(
            Opts::new("auditstream_router_deliveries_total", "Deliveries written, by destination level"),
            &["level"],
        )?;
        let table_size = IntGaugeVec::new(
            Opts::new("auditstream_router_table_entries", "Entries in the in-memory tables"),
            &["table"],
        )?;
        let resolution = IntCounterVec::new(
            Opts::new("auditstream_router_root_resolution_total", "How each event's root group was found"),
            &["via"],
        )?;
        let hot = Hot {
            routed: events.with_label_values(&["routed"]),
            unrouted: events.with_label_values(&["unrouted"]),
            not_streamed: events.with_label_values(&["not_streamed"]),
            // At 0 from the start, so that increase() (and the dead-letter
            // alert on it) sees the first one.
            dead_lettered: events.with_label_values(&["dead_lettered"]),
            via_tree: resolution.with_label_values(&["tree"]),
            instance: deliveries.with_label_values(&["instance"]),
            group: deliveries.with_label_values(&["group"]),
            namespaces: table_size.with_label_values(&["namespaces"]),
            destinations: table_size.with_label_values(&["destinations"]),
        };
        let m = Self {
            events,
            deliveries,
            resolution,
            table_size,
            lag: Histogram::with_opts(
                HistogramOpts::new(
                    "auditstream_router_lag_seconds",
                    "Time from an event's arrival in Kafka to its routing",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
            )?,
            rewrites: IntCounter::new(
                "auditstream_router_rewrites_total",
                "Records written again after Kafka refused them or the producer had no room",
            )?,
            completed: IntCounter::new(
                "auditstream_router_events_completed_total",
                "Events written to Kafka without some SPEC fields, or with created_at in another RFC 3339 form, completed before delivery",
            )?,
            hot,
        };
        registry.register(Box::new(m.lag.clone()))?;
        registry.register(Box::new(m.events.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.resolution.clone()))?;
        registry.register(Box::new(m.table_size.clone()))?;
        registry.register(Box::new(m.rewrites.clone()))?;
        registry.register(Box::new(m.completed.clone()))?;
        Ok(m)
    }
}
