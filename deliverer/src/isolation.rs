//! Per-destination isolation: a concurrency limit with a bounded wait
//! queue, and a circuit breaker. Whatever one destination does, it holds at
//! most `concurrency + queue` of the deliverer's in-flight places. Beyond
//! that its deliveries are set aside on their current retry rung (a burst
//! is not a failure: they do not move down the ladder), and while its
//! circuit is open they go down the ladder without an attempt.

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
    /// Deliveries waiting for one of those places.
    pub queue: usize,
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

#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    trial: bool,
}

struct Destination {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    breaker: Mutex<Breaker>,
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
        map.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(Destination {
                    permits: Arc::new(Semaphore::new(self.limits.concurrency)),
                    waiting: AtomicUsize::new(0),
                    breaker: Mutex::default(),
                })
            })
            .clone()
    }

    /// Asks to attempt a delivery to `id`: waits for a place when the queue
    /// has room, refuses at once when the circuit is open or the queue full.
    pub async fn enter(&self, id: &str) -> Result<Slot, Refusal> {
        let d = self.get(id);
        self.check_breaker(&d)?;
        let permit = match d.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if d.waiting.fetch_add(1, Ordering::AcqRel) >= self.limits.queue {
                    d.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.end_trial(&d);
                    return Err(Refusal::Saturated);
                }
                let p = d.permits.clone().acquire_owned().await;
                d.waiting.fetch_sub(1, Ordering::AcqRel);
                let Ok(p) = p else { return Err(Refusal::Saturated) };
                // The circuit may have opened while this delivery waited.
                if self.breaker_open(&d) {
                    return Err(Refusal::CircuitOpen);
                }
                p
            }
        };
        Ok(Slot { _permit: permit, destination: d, recorded: false })
    }

    /// Refuses while the circuit is open; after `open_for`, lets exactly one
    /// trial through (half-open).
    fn check_breaker(&self, d: &Destination) -> Result<(), Refusal> {
        let mut b = d.breaker.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Records an attempt's outcome: successes close the circuit, enough
    /// consecutive failures open it.
    pub fn record(&self, mut slot: Slot, success: bool) {
        slot.recorded = true;
        let mut b = slot.destination.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let was_open = b.open_until.is_some();
        b.trial = false;
        if success {
            b.failures = 0;
            b.open_until = None;
            if was_open {
                self.open_circuits.dec();
            }
        } else {
            b.failures = b.failures.saturating_add(1);
            if b.failures >= self.limits.failures_to_open {
                b.open_until = Some(Instant::now() + self.limits.open_for);
                if !was_open {
                    self.open_circuits.inc();
                    tracing::warn!(failures = b.failures, "destination circuit opened");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn isolation(concurrency: usize, queue: usize) -> Isolation {
        let limits = Limits { concurrency, queue, failures_to_open: 3, open_for: Duration::from_millis(200) };
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
}
