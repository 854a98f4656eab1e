//! Per-destination isolation: a concurrency limit with a bounded wait, and
//! a circuit breaker.
//!
//! A delivery that finds all of its destination's places taken may wait
//! for one, but only while the wait looks short: at most `max_wait`, and
//! not at all when the destination's recent attempts say the wait would be
//! longer (average attempt time × position ÷ concurrency), or when nothing
//! has finished for `max_wait` while every place is taken. `queue` caps the
//! waiters regardless. A refused delivery is set aside on its current retry
//! rung (a burst is not a failure: it does not move down the ladder), and
//! while the circuit is open deliveries go down the ladder without an
//! attempt.
//!
//! So a fast destination may use the consumer's whole in-flight window (its
//! waits are milliseconds), while a slow one holds its `concurrency` places
//! plus whatever arrives within one short wait.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus::IntGauge;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Isolation settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Attempts in flight to one destination.
    pub concurrency: usize,
    /// Most deliveries waiting for one of those places.
    pub queue: usize,
    /// Longest wait for a place; longer, and the delivery is set aside.
    pub max_wait: Duration,
    /// Consecutive failed attempts that open the circuit.
    pub failures_to_open: u32,
    /// How long an open circuit stays open before one trial attempt.
    pub open_for: Duration,
}

/// Why a delivery was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The destination's circuit is open.
    CircuitOpen,
    /// The destination has too many deliveries in flight and waiting.
    Saturated,
}

impl Refusal {
    /// Words for the attempt history.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CircuitOpen => "not attempted: circuit open",
            Self::Saturated => "not attempted: destination at its concurrency limit",
        }
    }
}

/// A destination's circuit and pace.
#[derive(Debug)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    trial: bool,
    /// Moving average of attempt durations (`None` before the first).
    average: Option<Duration>,
    /// When an attempt last started on a free place or finished.
    last_progress: Instant,
    /// Dropped by [`Isolation::retain`]: attempts still under way no
    /// longer count in the open-circuit gauge.
    forgotten: bool,
}

impl Breaker {
    fn new() -> Self {
        Self {
            failures: 0,
            open_until: None,
            trial: false,
            average: None,
            last_progress: Instant::now(),
            forgotten: false,
        }
    }
}

/// Weight of the newest attempt in the moving average.
const AVERAGE_WEIGHT: f64 = 0.2;

struct Destination {
    /// The destination's id, for the logs.
    id: String,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    breaker: Mutex<Breaker>,
}

/// Counts a waiter for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The isolation state of every destination seen.
pub struct Isolation {
    limits: Limits,
    destinations: Mutex<HashMap<String, Arc<Destination>>>,
    open_circuits: IntGauge,
}

/// Permission to make one attempt; report its outcome with
/// [`Isolation::record`].
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    destination: Arc<Destination>,
    recorded: bool,
    started: Instant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // An attempt abandoned without an outcome must not leave a
        // half-open circuit waiting for its trial forever.
        if !self.recorded {
            self.destination.breaker.lock().unwrap_or_else(|e| e.into_inner()).trial = false;
        }
    }
}

impl Isolation {
    /// Isolation with `limits`, counting open circuits in `open_circuits`.
    pub fn new(limits: Limits, open_circuits: IntGauge) -> Self {
        Self { limits, destinations: Mutex::default(), open_circuits }
    }

    fn get(&self, id: &str) -> Arc<Destination> {
        let mut map = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(id) {
            return d.clone();
        }
        map.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(Destination {
                    id: id.to_owned(),
                    permits: Arc::new(Semaphore::new(self.limits.concurrency)),
                    waiting: AtomicUsize::new(0),
                    breaker: Mutex::new(Breaker::new()),
                })
            })
            .clone()
    }

    /// Asks to attempt a delivery to `id`: takes a free place, or waits
    /// for one while the wait looks short (see the module documentation);
    /// refuses at once when the circuit is open.
    pub async fn enter(&self, id: &str) -> Result<Slot, Refusal> {
        let d = self.get(id);
        let free = {
            let mut b = d.breaker.lock().unwrap_or_else(|e| e.into_inner());
            Self::check_breaker(&mut b)?;
            let free = d.permits.clone().try_acquire_owned().ok();
            if free.is_some() {
                b.last_progress = Instant::now();
            }
            free
        };
        let permit = match free {
            Some(p) => p,
            None => {
                let position = d.waiting.fetch_add(1, Ordering::AcqRel) + 1;
                let _waiting = Waiting(&d.waiting);
                if position > self.limits.queue || !self.short_wait(&d, position) {
                    self.end_trial(&d);
                    return Err(Refusal::Saturated);
                }
                let Ok(Ok(p)) = tokio::time::timeout(self.limits.max_wait, d.permits.clone().acquire_owned()).await
                else {
                    self.end_trial(&d);
                    return Err(Refusal::Saturated);
                };
                // The circuit may have opened while this delivery waited.
                if self.breaker_open(&d) {
                    return Err(Refusal::CircuitOpen);
                }
                p
            }
        };
        Ok(Slot { _permit: permit, destination: d, recorded: false, started: Instant::now() })
    }

    /// Whether the `position`th waiter is likely to get a place within
    /// `max_wait`.
    fn short_wait(&self, d: &Destination, position: usize) -> bool {
        let b = d.breaker.lock().unwrap_or_else(|e| e.into_inner());
        if b.last_progress.elapsed() >= self.limits.max_wait {
            // Every place taken, and none taken or freed for a while: slow.
            return false;
        }
        let Some(average) = b.average else { return true };
        let expected = average.mul_f64(position as f64 / self.limits.concurrency as f64);
        expected <= self.limits.max_wait
    }

    /// Refuses while the circuit is open; after `open_for`, lets exactly one
    /// trial through (half-open).
    fn check_breaker(b: &mut Breaker) -> Result<(), Refusal> {
        if let Some(until) = b.open_until {
            if Instant::now() < until || b.trial {
                return Err(Refusal::CircuitOpen);
            }
            b.trial = true;
        }
        Ok(())
    }

    fn breaker_open(&self, d: &Destination) -> bool {
        let b = d.breaker.lock().unwrap_or_else(|e| e.into_inner());
        b.open_until.is_some_and(|until| Instant::now() < until) && !b.trial
    }

    fn end_trial(&self, d: &Destination) {
        d.breaker.lock().unwrap_or_else(|e| e.into_inner()).trial = false;
    }

    /// Drops the state of every destination `keep` refuses (deleted or
    /// inactive ones), so that a circuit left open by a destination that
    /// gets no more attempts neither stays in the open-circuit gauge (and
    /// its alert) nor in memory. A destination seen again starts afresh.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut map = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|id, d| {
            if keep(id) {
                return true;
            }
            let mut b = d.breaker.lock().unwrap_or_else(|e| e.into_inner());
            b.forgotten = true;
            if b.open_until.is_some() {
                self.open_circuits.dec();
                tracing::info!(destination = %id, "destination circuit cleared: the destination was deleted or deactivated");
            }
            false
        });
    }

    /// Records an attempt's outcome: successes close the circuit, enough
    /// consecutive failures open it.
    pub fn record(&self, mut slot: Slot, success: bool) {
        slot.recorded = true;
        let mut b = slot.destination.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let took = now - slot.started;
        b.average = Some(b.average.map_or(took, |a| a.mul_f64(1.0 - AVERAGE_WEIGHT) + took.mul_f64(AVERAGE_WEIGHT)));
        b.last_progress = now;
        let was_open = b.open_until.is_some();
        b.trial = false;
        if success {
            b.failures = 0;
            b.open_until = None;
            if was_open && !b.forgotten {
                self.open_circuits.dec();
                tracing::info!(destination = %slot.destination.id, "destination circuit closed");
            }
        } else {
            b.failures = b.failures.saturating_add(1);
            if b.failures >= self.limits.failures_to_open {
                b.open_until = Some(Instant::now() + self.limits.open_for);
                if !was_open && !b.forgotten {
                    self.open_circuits.inc();
                    tracing::warn!(
                        destination = %slot.destination.id,
                        failures = b.failures,
                        open_for = ?self.limits.open_for,
                        "destination circuit opened"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isolation(concurrency: usize, queue: usize) -> Isolation {
        waiting_at_most(concurrency, queue, Duration::from_secs(60))
    }

    fn waiting_at_most(concurrency: usize, queue: usize, max_wait: Duration) -> Isolation {
        let limits = Limits { concurrency, queue, max_wait, failures_to_open: 3, open_for: Duration::from_millis(200) };
        Isolation::new(limits, IntGauge::new("open", "open").unwrap())
    }

    #[tokio::test]
    async fn circuit_opens_after_failures_and_half_opens_for_one_trial() {
        let iso = isolation(4, 0);
        for _ in 0..3 {
            let s = iso.enter("d").await.unwrap();
            iso.record(s, false);
        }
        assert_eq!(iso.open_circuits.get(), 1);
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::CircuitOpen));
        assert!(iso.enter("other").await.is_ok(), "other destinations are not affected");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let trial = iso.enter("d").await.expect("one trial after open_for");
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::CircuitOpen), "only one trial at a time");
        iso.record(trial, false);
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::CircuitOpen), "failed trial reopens");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let trial = iso.enter("d").await.unwrap();
        iso.record(trial, true);
        assert_eq!(iso.open_circuits.get(), 0);
        assert!(iso.enter("d").await.is_ok(), "closed again");
    }

    #[tokio::test]
    async fn destinations_dropped_from_the_table_leave_the_open_circuit_gauge() {
        let iso = isolation(4, 0);
        for id in ["gone", "kept"] {
            for _ in 0..3 {
                let s = iso.enter(id).await.unwrap();
                iso.record(s, false);
            }
            assert_eq!(iso.enter(id).await.err(), Some(Refusal::CircuitOpen));
        }
        // "gone-later" has failed twice; its third attempt is under way
        // when it is dropped.
        for _ in 0..2 {
            let s = iso.enter("gone-later").await.unwrap();
            iso.record(s, false);
        }
        let late = iso.enter("gone-later").await.unwrap();
        assert_eq!(iso.open_circuits.get(), 2);

        iso.retain(|id| id == "kept");
        assert_eq!(iso.destinations.lock().unwrap().len(), 1, "and their state is freed");
        assert_eq!(iso.open_circuits.get(), 1, "the dropped destination's open circuit is no longer counted");
        assert_eq!(iso.enter("kept").await.err(), Some(Refusal::CircuitOpen), "kept as it was");
        // The attempt under way fails after the drop: its circuit would
        // open, but it is no longer counted.
        iso.record(late, false);
        assert_eq!(iso.open_circuits.get(), 1);
        // Seen again (re-created or re-activated): it starts afresh.
        assert!(iso.enter("gone").await.is_ok(), "a destination seen again starts with its circuit closed");
    }

    #[tokio::test]
    async fn an_abandoned_trial_frees_the_half_open_circuit() {
        let iso = isolation(4, 0);
        for _ in 0..3 {
            let s = iso.enter("d").await.unwrap();
            iso.record(s, false);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(iso.enter("d").await.unwrap());
        assert!(iso.enter("d").await.is_ok(), "a new trial is allowed");
    }

    #[tokio::test]
    async fn saturation_refuses_beyond_concurrency_and_queue() {
        let iso = Arc::new(isolation(1, 1));
        let held = iso.enter("d").await.unwrap();
        let waiter = {
            let iso = iso.clone();
            tokio::spawn(async move { iso.enter("d").await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::Saturated));
        iso.record(held, true);
        assert!(waiter.await.unwrap(), "the queued delivery gets the place");
    }

    #[tokio::test]
    async fn a_wait_longer_than_max_wait_is_refused() {
        let iso = waiting_at_most(1, 100, Duration::from_millis(100));
        let held = iso.enter("d").await.unwrap();
        let started = Instant::now();
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::Saturated));
        assert!(started.elapsed() >= Duration::from_millis(100), "it waited max_wait first");
        drop(held);
    }

    #[tokio::test]
    async fn a_destination_finishing_nothing_refuses_waiters_at_once() {
        // And the flip side: after a long idle spell a burst may wait.
        let iso = waiting_at_most(1, 100, Duration::from_millis(100));
        let held = iso.enter("d").await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let started = Instant::now();
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::Saturated));
        assert!(started.elapsed() < Duration::from_millis(100), "refused without waiting");
        // Abandoned, so the average stays unknown: only the stall counts.
        drop(held);

        tokio::time::sleep(Duration::from_millis(150)).await;
        let held = iso.enter("d").await.unwrap();
        let freed = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(held);
        };
        let (entered, ()) = tokio::join!(iso.enter("d"), freed);
        assert!(entered.is_ok(), "a burst after an idle spell waits for its place");
    }

    #[tokio::test]
    async fn waiters_beyond_what_the_pace_allows_are_refused_at_once() {
        // Attempts take ~200 ms with one place: the first waiter's expected
        // wait (200 ms) is within 1 s, the sixth's (1.2 s) is not.
        let iso = Arc::new(waiting_at_most(1, 100, Duration::from_secs(1)));
        let slot = iso.enter("d").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        iso.record(slot, true);
        let held = iso.enter("d").await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..5 {
            let iso = iso.clone();
            waiters.push(tokio::spawn(async move { iso.enter("d").await.map(drop) }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert_eq!(iso.enter("d").await.err(), Some(Refusal::Saturated));
        assert!(started.elapsed() < Duration::from_millis(100), "refused without waiting");
        drop(held);
        for w in waiters {
            let _ = w.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_fast_destination_lets_many_wait() {
        // Fast attempts: hundreds of waiters each expect a short wait, and
        // all of them get a place in turn.
        let iso = Arc::new(waiting_at_most(2, 10_000, Duration::from_secs(5)));
        for _ in 0..4 {
            let s = iso.enter("d").await.unwrap();
            iso.record(s, true);
        }
        let mut tasks = Vec::new();
        for _ in 0..500 {
            let iso = iso.clone();
            tasks.push(tokio::spawn(async move {
                let s = iso.enter("d").await?;
                tokio::task::yield_now().await;
                iso.record(s, true);
                Ok::<(), Refusal>(())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
    }
}
