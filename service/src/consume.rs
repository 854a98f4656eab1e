//! The at-least-once consumer loop shared by router and deliverer.
//!
//! Each message is handed to a task that must *finish* it: do its work, or
//! move it somewhere durable (a retry or dead-letter topic). Only then does
//! its offset count as done, and the stored offset only ever advances to
//! just below the lowest unfinished one ([`Watermarks`]).
//!
//! - In-flight work is bounded: at the bound the loop stops reading until a
//!   quarter of the places are free; if that takes longer than
//!   [`PAUSE_AFTER`] it pauses its partitions but keeps polling, so group
//!   membership never lapses however long the work takes.
//! - When partitions are revoked (a rebalance), the rebalance callback waits
//!   for their in-flight work up to the grace deadline and commits, so the
//!   next owner starts where this one finished.
//! - At shutdown the loop stops reading, waits for the work in flight up to
//!   the grace deadline, and commits. Unfinished work is read again by
//!   whoever owns the partition next: a duplicate at worst, never a loss.

use std::{
    collections::HashSet,
    future::Future,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use prometheus::{IntGaugeVec, Opts, Registry};
use rdkafka::{
    ClientConfig, ClientContext, Message, Statistics,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    message::{BorrowedMessage, OwnedMessage},
};
use tokio::sync::Notify;

use crate::{admin::ReadyFlag, offsets::Watermarks, shutdown::Shutdown};

/// How often a repeating consume error is logged.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long the loop waits at its in-flight bound for places to free
/// before it pauses its partitions. Short waits skip the pause: pausing
/// drops librdkafka's prefetched messages, and the fetch after resuming
/// cost about a quarter of a second on every cycle (one destination's
/// deliveries went at ~1,000/s however fast it answered).
const PAUSE_AFTER: Duration = Duration::from_millis(500);

/// How often the loop hands finished offsets to librdkafka. Its automatic
/// commit (every second) takes whatever was stored by then.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Limits of one consumer loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopLimits {
    /// Most messages in flight at once.
    pub max_in_flight: usize,
    /// How long to wait for in-flight work at shutdown and on revocation.
    pub grace: Duration,
}

/// In-flight offsets, shared by the loop, its tasks and the rebalance
/// callback.
#[derive(Default)]
pub struct Tracker {
    marks: Mutex<Watermarks>,
    /// Signalled per finished message while a rebalance drains.
    finished: Condvar,
    /// Rebalance callbacks waiting on `finished`.
    draining: AtomicUsize,
    /// Signalled when in-flight work drops below `wake_below`.
    capacity: Notify,
    /// The loop's wake-up mark plus one; 0 while nobody waits. Waking the
    /// loop once per batch rather than per message spares a thread wake-up
    /// per message.
    wake_below: AtomicUsize,
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Watermarks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn in_flight(&self) -> usize {
        self.lock().in_flight()
    }

    /// Asks for a wake-up (through `capacity`) once at most `n` messages
    /// are in flight.
    fn wake_at(&self, n: usize) {
        self.wake_below.store(n + 1, Ordering::Release);
    }

    fn no_wake(&self) {
        self.wake_below.store(0, Ordering::Release);
    }

    /// Marks a message finished. Its partition's watermark is handed to
    /// librdkafka by the next [`Self::flush`], not here: one store call
    /// per partition and flush instead of one per message.
    fn finish(&self, topic: &str, partition: i32, offset: i64) {
        let left = {
            let mut marks = self.lock();
            marks.finish(topic, partition, offset);
            marks.in_flight()
        };
        if self.draining.load(Ordering::Acquire) > 0 {
            self.finished.notify_all();
        }
        if left < self.wake_below.load(Ordering::Acquire) {
            self.capacity.notify_one();
        }
    }

    /// Stores the watermarks that moved since the last flush, for the next
    /// commit (automatic, or the one on revocation and shutdown).
    fn flush<C: Consumer<LoopContext>>(&self, consumer: &C) {
        let mut list = rdkafka::TopicPartitionList::new();
        // The stored offset is the next one to read, which is what a commit
        // must hold. `store_offsets` stores it as given; `store_offset`
        // would store `next + 1` (librdkafka's rd_kafka_offset_store adds
        // one) and the partition's next owner would skip a message.
        self.lock().take_pending(|topic, partition, next| {
            if let Err(e) = list.add_partition_offset(topic, partition, rdkafka::Offset::Offset(next)) {
                tracing::debug!(%topic, partition, error = %e, "offset not listed");
            }
        });
        if list.count() > 0
            && let Err(e) = consumer.store_offsets(&list)
        {
            // Revoked meanwhile: the new owner re-reads from the last commit.
            tracing::debug!(error = %e, "offsets not stored");
        }
    }

    /// Blocks until no message of `parts` is in flight, or `grace` passed;
    /// returns how many are left.
    fn drain(&self, parts: &[(String, i32)], grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let mut marks = self.lock();
        // Under the lock, so no finish between here and the wait goes
        // unsignalled.
        self.draining.fetch_add(1, Ordering::AcqRel);
        let left = loop {
            let left: usize = parts.iter().map(|(t, p)| marks.in_flight_in(t, *p)).sum();
            let now = Instant::now();
            if left == 0 || now >= deadline {
                break left;
            }
            marks = self.finished.wait_timeout(marks, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        self.draining.fetch_sub(1, Ordering::AcqRel);
        left
    }
}

/// How often librdkafka reports statistics (and the lag gauge updates),
/// unless the operator's `statistics.interval.ms` says otherwise.
const STATS_INTERVAL_MS: &str = "5000";

/// `auditstream_consumer_lag{group,topic,partition}`: records of each
/// assigned partition not yet finished (the partition's end offset minus
/// the stored watermark, or the committed offset, or, before either
/// exists, its start). Exported by the process itself, so lag panels and
/// autoscaling need no Kafka exporter. Roles take it from
/// [`crate::Admin::consumer_lag`], registered once per process.
#[derive(Clone)]
pub struct ConsumerLag(IntGaugeVec);

impl ConsumerLag {
    /// Registers the gauge in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = IntGaugeVec::new(
            Opts::new("auditstream_consumer_lag", "Records of an assigned partition not yet finished"),
            &["group", "topic", "partition"],
        )?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(Self(gauge))
    }
}

/// A partition's lag from librdkafka's statistics, when it is known.
fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.consumer_lag_stored >= 0 {
        Some(p.consumer_lag_stored)
    } else if p.consumer_lag >= 0 {
        Some(p.consumer_lag)
    } else if p.lo_offset >= 0 && p.hi_offset >= p.lo_offset {
        // Nothing stored or committed yet: everything from the start
        // (`auto.offset.reset` = earliest) is still to do.
        Some(p.hi_offset - p.lo_offset)
    } else {
        None
    }
}

/// The consumer context: drains revoked partitions before they move,
/// reports readiness once the consumer has joined its group, and exports
/// its partitions' lag.
pub struct LoopContext {
    tracker: Arc<Tracker>,
    grace: Duration,
    joined: ReadyFlag,
    group: String,
    lag: ConsumerLag,
    /// (topic, partition) pairs the gauge holds a value for.
    reported: Mutex<HashSet<(String, i32)>>,
}

impl ClientContext for LoopContext {
    fn stats(&self, statistics: Statistics) {
        let mut now = HashSet::new();
        for (topic, t) in &statistics.topics {
            for p in t.partitions.values() {
                // Only partitions this member was assigned.
                if p.partition < 0 || !p.desired {
                    continue;
                }
                let Some(lag) = partition_lag(p) else { continue };
                self.lag.0.with_label_values(&[&self.group, topic, &p.partition.to_string()]).set(lag);
                now.insert((topic.clone(), p.partition));
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in reported.difference(&now) {
            // Revoked: another member reports it now.
            let _ = self.lag.0.remove_label_values(&[&self.group, topic, &partition.to_string()]);
        }
        *reported = now;
    }
}

impl ConsumerContext for LoopContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else { return };
        let parts: Vec<(String, i32)> = list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        let drain = || self.tracker.drain(&parts, self.grace);
        // Blocking here holds up this worker thread; on a multi-threaded
        // runtime let tokio move its other tasks away meanwhile.
        let left = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(drain)
            }
            _ => drain(),
        };
        if left > 0 {
            tracing::warn!(left, "partitions revoked with work in flight; the next owner repeats it");
        }
        self.tracker.flush(consumer);
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "commit on revoke");
        }
        let mut marks = self.tracker.lock();
        for (t, p) in &parts {
            marks.forget(t, *p);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // An assignment, even an empty one (more replicas than partitions),
        // means the group accepted this member.
        if let Rebalance::Assign(_) = rebalance {
            self.joined.set(true);
        }
    }
}

/// A consumer driven by [`run`].
pub type LoopConsumer = StreamConsumer<LoopContext>;

/// Creates a consumer from `config` (see [`crate::kafka::consumer_config`])
/// with the draining context; `joined` is set once the group assigned it
/// its partitions, and `lag` holds its partitions' lag.
pub fn consumer(
    config: &ClientConfig,
    limits: LoopLimits,
    joined: ReadyFlag,
    lag: &ConsumerLag,
) -> Result<(Arc<LoopConsumer>, Arc<Tracker>), KafkaError> {
    let tracker = Arc::new(Tracker::default());
    let mut config = config.clone();
    if config.get("statistics.interval.ms").is_none() {
        config.set("statistics.interval.ms", STATS_INTERVAL_MS);
    }
    let context = LoopContext {
        tracker: tracker.clone(),
        grace: limits.grace,
        joined,
        group: config.get("group.id").unwrap_or_default().to_owned(),
        lag: lag.clone(),
        reported: Mutex::default(),
    };
    let consumer: LoopConsumer = config.create_with_context(context)?;
    Ok((Arc::new(consumer), tracker))
}

fn set_paused(consumer: &LoopConsumer, pause: bool) {
    let result = consumer.assignment().and_then(|a| if pause { consumer.pause(&a) } else { consumer.resume(&a) });
    if let Err(e) = result {
        tracing::warn!(error = %e, pause, "cannot change the partitions' pause state");
    }
}

/// One message taken on by a [`run_inline`] handler. Calling
/// [`Done::finish`] lets its offset be committed; dropping it without does
/// not (the message stays in flight and is read again by the partition's
/// next owner), so a lost hand-off can never skip a message.
#[must_use = "a message whose Done is never finished holds its partition's offset"]
pub struct Done {
    tracker: Arc<Tracker>,
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

impl Done {
    /// The message's work is done, or it is somewhere durable.
    pub fn finish(self) {
        self.tracker.finish(&self.topic, self.partition, self.offset);
    }
}

/// Runs until `shutdown`, spawning `handler(message)` for each message.
pub async fn run<H, F>(
    consumer: Arc<LoopConsumer>,
    tracker: Arc<Tracker>,
    limits: LoopLimits,
    shutdown: Shutdown,
    handler: H,
) where
    H: Fn(OwnedMessage) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    run_inline(consumer, tracker, limits, shutdown, move |m, done| {
        let work = handler(m.detach());
        tokio::spawn(async move {
            work.await;
            done.finish();
        });
    })
    .await;
}

/// Runs until `shutdown`, calling `handler(message, done)` for each message
/// on the loop itself: no task and no copy of the message. The handler
/// must not block; it hands `done` to whatever finishes the work (for the
/// router, the acknowledgement of the last record it wrote for the
/// message).
pub async fn run_inline<H>(
    consumer: Arc<LoopConsumer>,
    tracker: Arc<Tracker>,
    limits: LoopLimits,
    mut shutdown: Shutdown,
    mut handler: H,
) where
    H: FnMut(&BorrowedMessage<'_>, Done),
{
    let mut paused = false;
    let (mut last_logged, mut errors_since) = (None, 0u64);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The topic of the last message, shared with its `Done`: one
    // allocation per topic change, not per message.
    let mut topic: Arc<str> = Arc::from("");
    // Made once, not per message: each `recv()` registers a waker slot in
    // the consumer (a lock and a slab insert) and removes it again (a
    // second lock), and each `shutdown.wait()` registers a waiter with the
    // shutdown's channel and removes it again.
    let mut messages = consumer.stream();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        if !paused && tracker.in_flight() >= limits.max_in_flight {
            // At the bound: wait, without reading, until a quarter of the
            // places are free (one wake-up per batch, not per message). Only
            // a long wait pauses the partitions (and keeps polling), so the
            // group never sees this member go quiet.
            let low = limits.max_in_flight - (limits.max_in_flight / 4).max(1);
            tracker.wake_at(low);
            let until = tokio::time::Instant::now() + PAUSE_AFTER;
            let waited = loop {
                if tracker.in_flight() <= low {
                    break Some(true);
                }
                tokio::select! {
                    biased;
                    _ = &mut stop => break None,
                    _ = tracker.capacity.notified() => {}
                    _ = flush.tick() => tracker.flush(consumer.as_ref()),
                    _ = tokio::time::sleep_until(until) => break Some(false),
                }
            };
            tracker.no_wake();
            match waited {
                None => break,
                Some(true) => {}
                Some(false) => {
                    set_paused(&consumer, true);
                    paused = true;
                    tracker.wake_at(limits.max_in_flight / 2);
                }
            }
        }
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = flush.tick() => tracker.flush(consumer.as_ref()),
            _ = tracker.capacity.notified(), if paused => {
                // Resume only once half the places are free: resuming at the
                // first free place paused again one message later, and each
                // pause drops librdkafka's prefetched messages.
                if tracker.in_flight() <= limits.max_in_flight / 2 {
                    set_paused(&consumer, false);
                    paused = false;
                    tracker.no_wake();
                }
            }
            // The stream never ends (rdkafka's never yields `None`).
            Some(received) = messages.next() => match received {
                Ok(m) => {
                    if *topic != *m.topic() {
                        topic = Arc::from(m.topic());
                    }
                    let (partition, offset) = (m.partition(), m.offset());
                    tracker.lock().start(&topic, partition, offset);
                    let done = Done { tracker: tracker.clone(), topic: topic.clone(), partition, offset };
                    handler(&m, done);
                }
                Err(e) => {
                    // Persistent errors (a missing topic) repeat every poll:
                    // say so once per interval, with the count.
                    errors_since += 1;
                    if last_logged.is_none_or(|t: tokio::time::Instant| t.elapsed() >= ERROR_LOG_INTERVAL) {
                        tracing::warn!(error = %e, repeats = errors_since, "consume error");
                        last_logged = Some(tokio::time::Instant::now());
                        errors_since = 0;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let deadline = tokio::time::Instant::now() + limits.grace;
    tracker.wake_at(0);
    while tracker.in_flight() > 0 {
        tokio::select! {
            _ = tracker.capacity.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                in_flight = tracker.in_flight(),
                "grace deadline reached; unfinished messages will be read again"
            );
            break;
        }
    }
    tracker.flush(consumer.as_ref());
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(error = %e, "final commit");
    }
}
