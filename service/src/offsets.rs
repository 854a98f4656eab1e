//! Per-partition contiguous watermarks.
//!
//! A consumer may finish messages out of order (a fast delivery overtakes a
//! slow one). Committing the highest finished offset would skip the slow
//! one if the process died — the way a well-known Kafka-to-HTTP shipper
//! loses events. The watermark only ever advances to just below the lowest
//! offset still in flight.
//!
//! Lookups take the topic as `&str` and allocate nothing: this runs twice
//! per message.

use std::collections::{BTreeSet, HashMap};

/// Tracks in-flight offsets of every partition.
#[derive(Debug, Default)]
pub struct Watermarks {
    /// Per topic (a consumer loop reads one or a few), its partitions.
    topics: Vec<(String, HashMap<i32, Partition>)>,
    /// Messages in flight across all partitions.
    total: usize,
}

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset started.
    next: i64,
    /// The offset last returned as safe to store.
    stored: i64,
    /// `stored` moved since [`Watermarks::take_pending`] last reported it.
    pending: bool,
}

impl Partition {
    fn safe(&self) -> i64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

impl Watermarks {
    fn partitions(&self, topic: &str) -> Option<&HashMap<i32, Partition>> {
        self.topics.iter().find(|(t, _)| t == topic).map(|(_, p)| p)
    }

    fn partitions_mut(&mut self, topic: &str) -> Option<&mut HashMap<i32, Partition>> {
        self.topics.iter_mut().find(|(t, _)| t == topic).map(|(_, p)| p)
    }

    /// Marks `offset` as taken on.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        if self.partitions(topic).is_none() {
            self.topics.push((topic.to_owned(), HashMap::new()));
        }
        let Some(parts) = self.partitions_mut(topic) else { return };
        let p = parts.entry(partition).or_default();
        if p.in_flight.is_empty() && p.next == 0 {
            p.stored = offset;
        }
        let added = p.in_flight.insert(offset);
        p.next = p.next.max(offset + 1);
        self.total += usize::from(added);
    }

    /// Marks `offset` finished. Returns the offset to store (the next one to
    /// read) when the watermark moved; it is also kept for
    /// [`Self::take_pending`].
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions_mut(topic)?.get_mut(&partition)?;
        if !p.in_flight.remove(&offset) {
            return None;
        }
        let safe = p.safe();
        let moved = (safe > p.stored).then(|| {
            p.stored = safe;
            p.pending = true;
            safe
        });
        self.total -= 1;
        moved
    }

    /// Calls `store(topic, partition, next)` for every partition whose
    /// watermark moved since the last call.
    pub fn take_pending(&mut self, mut store: impl FnMut(&str, i32, i64)) {
        for (topic, parts) in &mut self.topics {
            for (partition, p) in parts.iter_mut().filter(|(_, p)| p.pending) {
                p.pending = false;
                store(topic, *partition, p.stored);
            }
        }
    }

    /// How many messages are in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.total
    }

    /// How many messages of one partition are in flight.
    pub fn in_flight_in(&self, topic: &str, partition: i32) -> usize {
        self.partitions(topic).and_then(|p| p.get(&partition)).map_or(0, |p| p.in_flight.len())
    }

    /// Forgets a partition (after it was revoked), with anything it had
    /// pending.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        if let Some(p) = self.partitions_mut(topic).and_then(|parts| parts.remove(&partition)) {
            self.total -= p.in_flight.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn later_finish_does_not_skip_earlier() {
        let mut w = Watermarks::default();
        for o in 10..13 {
            w.start("t", 0, o);
        }
        assert_eq!(w.finish("t", 0, 11), None, "10 still in flight");
        assert_eq!(w.finish("t", 0, 12), None);
        assert_eq!(w.finish("t", 0, 10), Some(13));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut w = Watermarks::default();
        w.start("t", 0, 5);
        w.start("t", 1, 7);
        assert_eq!(w.finish("t", 1, 7), Some(8));
        assert_eq!(w.in_flight(), 1);
        assert_eq!(w.finish("t", 9, 1), None, "unknown partition");
    }

    #[test]
    fn pending_reports_each_moved_partition_once() {
        let mut w = Watermarks::default();
        w.start("t", 0, 5);
        w.start("t", 0, 6);
        w.start("u", 3, 9);
        let pending = |w: &mut Watermarks| {
            let mut out = Vec::new();
            w.take_pending(|t, p, o| out.push((t.to_owned(), p, o)));
            out.sort();
            out
        };
        assert_eq!(w.finish("t", 0, 6), None, "5 still in flight");
        assert!(pending(&mut w).is_empty());
        w.finish("t", 0, 5);
        w.finish("u", 3, 9);
        assert_eq!(pending(&mut w), vec![("t".to_owned(), 0, 7), ("u".to_owned(), 3, 10)]);
        assert!(pending(&mut w).is_empty(), "reported once");
        w.start("t", 0, 7);
        w.forget("t", 0);
        assert_eq!(w.in_flight(), 0, "a forgotten partition's work no longer counts");
        assert_eq!(w.finish("t", 0, 7), None);
        assert!(pending(&mut w).is_empty());
    }

    #[test]
    fn finishing_twice_counts_once() {
        let mut w = Watermarks::default();
        w.start("t", 0, 1);
        w.start("t", 0, 2);
        w.finish("t", 0, 1);
        w.finish("t", 0, 1);
        assert_eq!(w.in_flight(), 1);
    }

    proptest! {
        /// Whatever the finishing order, a stored offset never passes an
        /// unfinished one, and once all finish the last stored is one past
        /// the highest.
        #[test]
        fn never_passes_unfinished(order in Just((0..50i64).collect::<Vec<_>>()).prop_shuffle()) {
            let mut w = Watermarks::default();
            for o in 0..50 {
                w.start("t", 0, o);
            }
            let mut done = BTreeSet::new();
            let mut last = 0;
            for o in order {
                done.insert(o);
                if let Some(s) = w.finish("t", 0, o) {
                    prop_assert!((0..s).all(|x| done.contains(&x)));
                    last = s;
                }
            }
            prop_assert_eq!(last, 50);
        }
    }
}
