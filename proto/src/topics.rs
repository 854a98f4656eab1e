//! Topic names. Every name takes the operator's prefix, so several
//! installations (or tests) can share one cluster.

/// The topics of one installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics named with `prefix` (may be empty).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Accepted audit events, keyed by entity.
    pub fn events(&self) -> String {
        self.name("audit.events")
    }
    /// The namespace tree (compacted), keyed by `kind:id`.
    pub fn namespaces(&self) -> String {
        self.name("audit.namespaces")
    }
    /// Destination configuration (compacted), keyed by destination id.
    pub fn destinations(&self) -> String {
        self.name("audit.destinations")
    }
    /// One record per (event, destination), keyed by destination id.
    pub fn deliveries(&self) -> String {
        self.name("audit.deliveries")
    }
    /// Retry rung `n` (0-based), each holding one delay.
    pub fn retry(&self, n: usize) -> String {
        self.name(&format!("audit.deliveries.retry.{n}"))
    }
    /// Events the router could not read, with the reason.
    pub fn events_dlq(&self) -> String {
        self.name("audit.events.dlq")
    }
    /// Deliveries that exhausted their retries, with their history.
    pub fn deliveries_dlq(&self) -> String {
        self.name("audit.deliveries.dlq")
    }

    /// Every topic, with whether it is compacted, for `rungs` retry rungs.
    pub fn all(&self, rungs: usize) -> Vec<(String, bool)> {
        let mut all = vec![
            (self.events(), false),
            (self.namespaces(), true),
            (self.destinations(), true),
            (self.deliveries(), false),
            (self.events_dlq(), false),
            (self.deliveries_dlq(), false),
        ];
        all.extend((0..rungs).map(|n| (self.retry(n), false)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_applies_to_every_topic() {
        let t = Topics::new("t1.");
        assert_eq!(t.events(), "t1.audit.events");
        assert_eq!(t.retry(2), "t1.audit.deliveries.retry.2");
        assert!(t.all(3).iter().all(|(n, _)| n.starts_with("t1.audit.")));
        assert_eq!(t.all(3).len(), 9);
    }
}
