//! The shared at-least-once consumer loop (`service::consume`) on the
//! broker: its in-flight bound, and membership while work is held long.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rdkafka::{Message, consumer::Consumer};
use service::{admin::Readiness, consume, shutdown};
use tests::{TestBroker, produce_many, unique, wait_until};
use tokio::sync::Semaphore;

/// What the handlers saw.
#[derive(Default)]
struct Seen {
    /// Times each payload was handled.
    handled: Mutex<HashMap<String, usize>>,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

impl Seen {
    fn total(&self) -> usize {
        self.handled.lock().unwrap().len()
    }

    fn repeats(&self) -> usize {
        self.handled.lock().unwrap().values().map(|n| n - 1).sum()
    }
}

/// One loop under test.
struct Run {
    seen: Arc<Seen>,
    trigger: shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
    registry: prometheus::Registry,
    group: String,
    topic: String,
    _broker: TestBroker,
}

impl Run {
    async fn stop(self) -> Arc<Seen> {
        self.trigger.trigger();
        self.task.await.unwrap();
        self.seen
    }

    /// The lag gauge's value for partition 0, if it has one.
    fn lag(&self) -> Option<i64> {
        let families = self.registry.gather();
        let family = families.iter().find(|f| f.name() == "auditstream_consumer_lag")?;
        family
            .get_metric()
            .iter()
            .find(|m| {
                let label = |n: &str| m.get_label().iter().find(|l| l.name() == n).map(|l| l.value().to_owned());
                label("group").as_deref() == Some(self.group.as_str())
                    && label("topic").as_deref() == Some(self.topic.as_str())
                    && label("partition").as_deref() == Some("0")
            })
            .map(|m| m.get_gauge().get_value() as i64)
    }
}

/// Starts a loop on a fresh one-partition topic holding `n` messages; each
/// handler takes (and uses up) a permit of `gate` before finishing.
async fn start(n: usize, max_in_flight: usize, extra: &[(&str, &str)], gate: Arc<Semaphore>) -> Run {
    let broker = TestBroker::start();
    let topic = unique("consume");
    let mut kafka = broker.kafka("");
    kafka.partitions = 1;
    service::kafka::ensure_topics(&kafka, &[(topic.clone(), false)]).await.unwrap();
    let messages: Vec<(String, Vec<u8>)> = (0..n).map(|i| ("k".to_owned(), format!("m{i}").into_bytes())).collect();
    produce_many(&kafka, &topic, &messages).await;

    let group = unique("group");
    let mut settings =
        service::kafka::consumer_config(&kafka, &group, Duration::from_secs(3), service::kafka::Path::Event);
    for (k, v) in extra {
        settings.set(*k, *v);
    }
    let limits = consume::LoopLimits { max_in_flight, grace: Duration::from_secs(5) };
    let registry = prometheus::Registry::new();
    let lag = consume::ConsumerLag::register(&registry).unwrap();
    let (consumer, tracker) =
        consume::consumer(&settings, limits, Readiness::default().register("joined"), &lag).unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let seen = Arc::new(Seen::default());
    let (trigger, stop) = shutdown::channel();
    let s = seen.clone();
    let task = tokio::spawn(consume::run(consumer, tracker, limits, stop, move |m| {
        let (s, gate) = (s.clone(), gate.clone());
        async move {
            let now = s.running.fetch_add(1, Ordering::SeqCst) + 1;
            s.most_running.fetch_max(now, Ordering::SeqCst);
            let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            *s.handled.lock().unwrap().entry(payload).or_default() += 1;
            gate.acquire().await.unwrap().forget();
            s.running.fetch_sub(1, Ordering::SeqCst);
        }
    }));
    Run { seen, trigger, task, registry, group, topic, _broker: broker }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_never_holds_more_than_its_bound() {
    let gate = Arc::new(Semaphore::new(0));
    let run = start(300, 16, &[], gate.clone()).await;
    let seen = run.seen.clone();
    let filled = wait_until(Duration::from_secs(30), || {
        let n = seen.running.load(Ordering::SeqCst);
        async move { n >= 16 }
    })
    .await;
    assert!(filled, "the loop did not fill its bound");
    // Held past the point where the loop pauses its partitions: watched
    // for a message beyond the bound until then, failing at the first.
    let overtaken = wait_until(Duration::from_secs(1), || {
        let n = seen.total();
        async move { n > 16 }
    })
    .await;
    assert!(!overtaken, "messages beyond the bound were taken");
    assert_eq!(seen.total(), 16, "messages beyond the bound were taken");
    // Then one handler at a time gets through, so the loop refills its
    // bound again and again.
    let opener = tokio::spawn(async move {
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            gate.add_permits(1);
        }
    });
    let all = wait_until(Duration::from_secs(60), || {
        let n = seen.total();
        async move { n >= 300 }
    })
    .await;
    run.stop().await;
    opener.abort();
    assert!(all, "only {} of 300 handled", seen.total());
    let most = seen.most_running.load(Ordering::SeqCst);
    assert!(most <= 16, "{most} handlers ran at once with a bound of 16");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_held_longer_than_the_poll_interval_keeps_the_group() {
    // Every place held for 8 s, more than twice max.poll.interval.ms: the
    // loop must pause and keep polling, or librdkafka leaves the group and
    // the held messages are read again after it rejoins.
    let gate = Arc::new(Semaphore::new(0));
    let extra = [("max.poll.interval.ms", "3000")];
    let run = start(8, 4, &extra, gate.clone()).await;
    let seen = run.seen.clone();
    let held = wait_until(Duration::from_secs(30), || {
        let n = seen.running.load(Ordering::SeqCst);
        async move { n == 4 }
    })
    .await;
    assert!(held, "the first four messages were not taken");
    // Held for 8 s, more than twice max.poll.interval.ms, watched for a
    // message beyond the bound all along.
    let overtaken = wait_until(Duration::from_secs(8), || {
        let n = seen.total();
        async move { n > 4 }
    })
    .await;
    assert!(!overtaken, "nothing beyond the bound was taken");
    assert_eq!(seen.total(), 4, "nothing beyond the bound was taken");
    gate.add_permits(1_000);
    let all = wait_until(Duration::from_secs(30), || {
        let n = seen.total();
        async move { n >= 8 }
    })
    .await;
    // A rejoin's re-reads would show up within a few seconds: watched
    // for, failing at the first.
    let reread = wait_until(Duration::from_secs(3), || {
        let n = seen.repeats();
        async move { n > 0 }
    })
    .await;
    run.stop().await;
    assert!(all, "only {} of 8 handled", seen.total());
    assert!(!reread, "messages were handled again: membership lapsed while work was held");
    assert_eq!(seen.repeats(), 0, "messages were handled again: membership lapsed while work was held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_exported_per_partition() {
    let gate = Arc::new(Semaphore::new(0));
    let run = start(20, 4, &[("statistics.interval.ms", "200")], gate.clone()).await;
    // Nothing finished: all 20 records are still to do.
    let waiting = wait_until(Duration::from_secs(30), || {
        let lag = run.lag();
        async move { lag == Some(20) }
    })
    .await;
    assert!(waiting, "lag with nothing finished: {:?}", run.lag());
    gate.add_permits(1_000);
    let caught_up = wait_until(Duration::from_secs(30), || {
        let lag = run.lag();
        async move { lag == Some(0) }
    })
    .await;
    assert!(caught_up, "lag once everything finished: {:?}", run.lag());
    run.stop().await;
}
