//! Per-partition contiguous watermarks.
//!
//! A consumer may finish messages out of order (a fast delivery overtakes a
//! slow one). Committing the highest finished offset would skip the slow
//! one if the process died — the way a well-known Kafka-to-HTTP shipper
//! loses events. The watermark only ever advances to just below the lowest
//! offset still in flight.

use std::collections::{BTreeSet, HashMap};

/// Tracks in-flight offsets of every partition.
#[derive(Debug, Default)]
pub struct Watermarks {
    parts: HashMap<(String, i32), Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset started.
    next: i64,
    /// The offset last returned as safe to store.
    stored: i64,
}

impl Partition {
    fn safe(&self) -> i64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

impl Watermarks {
    /// Marks `offset` as taken on.
    pub fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.parts.entry((topic.to_owned(), partition)).or_default();
        if p.in_flight.is_empty() && p.next == 0 {
            p.stored = offset;
        }
        p.in_flight.insert(offset);
        p.next = p.next.max(offset + 1);
    }

    /// Marks `offset` finished. Returns the offset to store (the next one to
    /// read) when the watermark moved.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(&(topic.to_owned(), partition))?;
        p.in_flight.remove(&offset);
        let safe = p.safe();
        (safe > p.stored).then(|| {
            p.stored = safe;
            safe
        })
    }

    /// How many messages are in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.in_flight.len()).sum()
    }

    /// How many messages of one partition are in flight.
    pub fn in_flight_in(&self, topic: &str, partition: i32) -> usize {
        self.parts.get(&(topic.to_owned(), partition)).map_or(0, |p| p.in_flight.len())
    }

    /// Forgets a partition (after it was revoked).
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.parts.remove(&(topic.to_owned(), partition));
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
