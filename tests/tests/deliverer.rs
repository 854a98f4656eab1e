//! The deliverer as a real process against real HTTP receivers on loopback:
//! every failure path, the retry ladder, dead letters and replay, crashes,
//! isolation and signatures.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use proto::{
    delivery::{DeliveryMeta, H_REASON},
    destination::{CustomHeader, Destination, HeaderName, HeaderValue, Owner, RetiringSecret, SigningSecret},
    topics::Topics,
};
use receiver::{Expected, Faults, Receiver, ReceiverConfig};
use service::config::KafkaConfig;
use tests::{Role, TestBroker, destination, header, metric, read_topic, spawn_role, unique, wait_ready, wait_until};

const TOKEN_A: &str = "token-for-destination-a";
const TOKEN_B: &str = "token-for-destination-b";

struct World {
    broker: TestBroker,
    prefix: String,
    kafka: KafkaConfig,
    topics: Topics,
    receiver: Receiver,
    addr: SocketAddr,
    seed: producer::Publisher,
    producer: rdkafka::producer::FutureProducer,
}

async fn start_receiver(expected: Vec<Expected>) -> (Receiver, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r =
        Receiver::new(ReceiverConfig { expected, log_file: None, print: false, faults: Faults::default() }).unwrap();
    tokio::spawn(r.clone().serve(listener, std::future::pending()));
    (r, addr)
}

fn expected(name: &str, token: &str) -> Expected {
    Expected { name: name.into(), token: token.into(), secret: None }
}

async fn world() -> World {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("deliver"));
    // Five rungs exist; most deliverers here use two (one test uses all).
    broker.create_topics(&prefix, 5).await;
    let kafka = broker.kafka(&prefix);
    let (receiver, addr) = start_receiver(vec![expected("a", TOKEN_A), expected("b", TOKEN_B)]).await;
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    seed.put_destination(&destination("a", Owner::Instance, &format!("http://{addr}/a"), TOKEN_A)).await.unwrap();
    seed.put_destination(&destination("b", Owner::Instance, &format!("http://{addr}/b"), TOKEN_B)).await.unwrap();
    let topics = Topics::new(&prefix);
    let producer = service::kafka::producer(&kafka, Duration::from_secs(30)).unwrap();
    World { broker, prefix, kafka, topics, receiver, addr, seed, producer }
}

impl World {
    fn deliverer(&self, extra: &[(&str, String)]) -> Role {
        let mut env = vec![
            ("AUDITSTREAM_DELIVERER__GROUP_ID", unique("d")),
            ("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
            ("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["1s", "2s"]"#.into()),
            ("AUDITSTREAM_DELIVERER__QUICK_RETRIES", "1".into()),
            ("AUDITSTREAM_DELIVERER__QUICK_RETRY_DELAY", "100ms".into()),
            ("AUDITSTREAM_DELIVERER__REQUEST_TIMEOUT", "2s".into()),
            ("AUDITSTREAM_DELIVERER__CONNECT_TIMEOUT", "1s".into()),
            ("AUDITSTREAM_DELIVERER__CIRCUIT_FAILURES", "1000".into()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v.clone()));
        }
        spawn_role("deliverer", &self.broker, &self.prefix, &env)
    }

    async fn ready_deliverer(&self, extra: &[(&str, String)]) -> Role {
        let d = self.deliverer(extra);
        assert!(wait_ready(d.admin, Duration::from_secs(60)).await, "deliverer not ready");
        d
    }

    /// Writes a delivery of a fresh event to `destination`, as the router
    /// would: the event's bytes keyed by the destination, no headers.
    async fn enqueue(&self, destination: &str, event_id: &str) {
        self.enqueue_raw(destination, fresh_event(event_id).as_bytes(), &[]).await;
    }

    /// Runs the binary (an admin command) against this world's topics;
    /// its standard output.
    fn run(&self, args: &[&str]) -> String {
        let env = [
            ("AUDITSTREAM_KAFKA__BROKERS", self.broker.brokers().to_owned()),
            ("AUDITSTREAM_KAFKA__TOPIC_PREFIX", self.prefix.clone()),
        ];
        let out = std::process::Command::new(tests::binary()).args(args).envs(env).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Writes a record to the deliveries topic, keyed by `destination`.
    async fn enqueue_raw(&self, destination: &str, value: &[u8], headers: &[(&str, &[u8])]) {
        let topic = self.topics.deliveries();
        service::kafka::produce_durably(&self.producer, &topic, destination.as_bytes(), Some(value), headers).await;
    }

    /// Writes many deliveries at once: (destination, event id).
    async fn enqueue_many(&self, deliveries: &[(String, String)]) {
        futures_util::future::join_all(deliveries.iter().map(|(d, id)| self.enqueue(d, id))).await;
    }

    fn received(&self, path: &str, event_id: &str) -> usize {
        self.receiver
            .received()
            .iter()
            .filter(|r| r.path == path && String::from_utf8_lossy(&r.body).contains(&format!("\"{event_id}\"")))
            .count()
    }

    async fn wait_received(&self, path: &str, event_id: &str, deadline: Duration) -> bool {
        wait_until(deadline, || {
            let n = self.received(path, event_id);
            async move { n > 0 }
        })
        .await
    }

    /// Asserts that every one of `deliveries` reached `path` in time.
    async fn assert_all_received(&self, path: &str, deliveries: &[(String, String)], deadline: Duration) {
        for (_, id) in deliveries {
            assert!(self.wait_received(path, id, deadline).await, "{id} not delivered");
        }
    }

    /// Destination "slow": its own receiver, answering after `delay`.
    async fn slow_destination(&self, delay: Duration) -> Receiver {
        let (slow, addr) = start_receiver(vec![expected("slow", TOKEN_A)]).await;
        slow.set_faults(Faults { delay, ..Faults::default() });
        let d = destination("slow", Owner::Instance, &format!("http://{addr}/s"), TOKEN_A);
        self.seed.put_destination(&d).await.unwrap();
        slow
    }

    async fn dlq(&self, want: usize) -> Vec<rdkafka::message::OwnedMessage> {
        read_topic(&self.kafka, &self.topics.deliveries_dlq(), want, Duration::from_secs(20)).await
    }
}

/// A fresh event as the producer would have written it, `created_at` now.
fn fresh_event(event_id: &str) -> String {
    let now = proto::event::format_timestamp(time::OffsetDateTime::now_utc());
    format!(
        r#"{{"id":"{event_id}","event_type":"audit_operation","entity_type":"Project","entity_id":1,"created_at":"{now}"}}"#
    )
}

async fn count(d: &Role, series: &str) -> f64 {
    metric(d.admin, series).await
}

/// Failed attempts that got no HTTP answer (connect and transport errors).
const NO_ANSWER: &str = "auditstream_deliverer_attempts_total{class=\"none\",outcome=\"failed\"}";
const OPENED_HTTP1: &str = "auditstream_deliverer_connections_opened_total{protocol=\"http1\"}";
const OPENED_HTTP2: &str = "auditstream_deliverer_connections_opened_total{protocol=\"http2\"}";
/// The gauge's whole line name: a bare prefix would match `..._opened_total` too.
const OPEN: &str = "auditstream_deliverer_connections_open ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_then_success_is_delivered_by_the_quick_tries() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    w.receiver.set_faults(Faults { fail_first: 1, fail_status: 500, ..Faults::default() });
    w.enqueue("a", "e-5xx").await;
    assert!(w.wait_received("/a", "e-5xx", Duration::from_secs(30)).await);
    assert_eq!(count(&d, "auditstream_deliverer_attempts_total{class=\"5xx\",outcome=\"failed\"}").await, 1.0);
    assert_eq!(count(&d, "auditstream_deliverer_deliveries_total{outcome=\"retried\"}").await, 0.0, "no retry topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_a_failed_attempt_and_retried() {
    let w = world().await;
    let d = w.ready_deliverer(&[("AUDITSTREAM_DELIVERER__REQUEST_TIMEOUT", "500ms".into())]).await;
    w.receiver.set_faults(Faults { delay: Duration::from_secs(2), ..Faults::default() });
    w.enqueue("a", "e-timeout").await;
    assert!(wait_until(Duration::from_secs(20), || async { count(&d, NO_ANSWER).await >= 1.0 }).await);
    w.receiver.set_faults(Faults::default());
    assert!(w.wait_received("/a", "e-timeout", Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_is_retried() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    w.receiver.set_faults(Faults { reset_first: 2, ..Faults::default() });
    w.enqueue("a", "e-reset").await;
    assert!(w.wait_received("/a", "e-reset", Duration::from_secs(30)).await);
    assert_eq!(w.receiver.stats().faults_injected, 2);
    // The receiver resets a connection once the request is on it, so each
    // reset is an attempt that got no answer, never a request sent again
    // unsent.
    assert_eq!(count(&d, NO_ANSWER).await, 2.0);
    assert_eq!(count(&d, "auditstream_deliverer_requests_resent_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    w.receiver.set_faults(Faults { fail_first: 1, fail_status: 429, retry_after: Some(3), ..Faults::default() });
    let start = Instant::now();
    w.enqueue("a", "e-429").await;
    assert!(w.wait_received("/a", "e-429", Duration::from_secs(30)).await);
    let took = start.elapsed();
    assert!(took >= Duration::from_secs(3), "delivered after {took:?}, before the 3 s Retry-After");
    assert_eq!(count(&d, "auditstream_deliverer_deliveries_total{outcome=\"retried\"}").await, 1.0);
    assert_eq!(count(&d, "auditstream_deliverer_attempts_total{class=\"4xx\",outcome=\"failed\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_and_count_as_failures() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    let target = format!("http://{}/elsewhere", w.addr);
    w.receiver.set_faults(Faults { redirect_to: Some(target), ..Faults::default() });
    w.enqueue("a", "e-3xx").await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&d, "auditstream_deliverer_attempts_total{class=\"3xx\",outcome=\"failed\"}").await >= 2.0
        })
        .await
    );
    let redirects = count(&d, "auditstream_deliverer_attempts_total{class=\"3xx\",outcome=\"failed\"}").await as u64;
    assert!(
        w.receiver.stats().faults_injected <= redirects + 1,
        "each redirect answer was one attempt: the Location was never requested"
    );
    w.receiver.set_faults(Faults::default());
    assert!(w.wait_received("/a", "e-3xx", Duration::from_secs(30)).await);
    assert_eq!(w.received("/elsewhere", "e-3xx"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_down_longer_than_the_quick_tries_is_served_from_a_retry_topic() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    // Down for more attempts than the quick tries make (1 + 1 here),
    // counted rather than timed so the test does not depend on how soon the
    // first attempt comes (timed outages: the chaos run).
    w.receiver.set_faults(Faults { reset_first: 3, ..Faults::default() });
    w.enqueue("a", "e-down").await;
    assert!(w.wait_received("/a", "e-down", Duration::from_secs(40)).await);
    assert_eq!(w.receiver.stats().faults_injected, 3);
    assert!(count(&d, "auditstream_deliverer_deliveries_total{outcome=\"retried\"}").await >= 1.0);
    assert_eq!(count(&d, "auditstream_deliverer_deliveries_total{outcome=\"delivered\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_deliveries_are_dead_lettered_and_replay_delivers_them() {
    let w = world().await;
    let _d = w.ready_deliverer(&[]).await;
    w.receiver.set_faults(Faults { fail_rate: 1.0, fail_status: 500, ..Faults::default() });
    w.enqueue("a", "e-exhausted").await;
    w.enqueue("b", "e-other").await;
    let dlq = w.dlq(2).await;
    assert_eq!(dlq.len(), 2, "both exhausted the ladder");
    let parked = dlq.iter().find(|m| tests::key(m) == Some("a")).unwrap();
    assert!(header(parked, H_REASON).unwrap().contains("retries exhausted"));
    let meta = tests::delivery_meta(parked).unwrap();
    // Two quick tries on each of: the fresh topic and two retry rungs.
    assert_eq!(meta.attempt, 6);
    // Every attempt is in the history, carried through each retry topic.
    assert_eq!(meta.history.len(), 6, "{:?}", meta.history);
    assert!(meta.history.iter().all(|a| a.status == Some(500)));

    // The operator's view, through the binary.
    let listed = w.run(&["dlq", "list", "--json", "--destination", "a"]);
    let rows: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(rows[0]["event_id"], "e-exhausted");
    assert_eq!(rows[0]["attempts"], 6);
    assert!(w.run(&["dlq", "replay", "--destination", "a", "--dry-run"]).contains("nothing replayed"));

    w.receiver.set_faults(Faults::default());
    let out = w.run(&["dlq", "replay", "--destination", "a", "--since", "1h"]);
    assert!(out.contains("replayed 1 deliveries"), "{out}");
    // The replayed record says where in the dead-letter topic it came from
    // and keeps its history.
    let flow = read_topic(&w.kafka, &w.topics.deliveries(), 3, Duration::from_secs(20)).await;
    let from = |m| header(m, "auditstream-replayed-from");
    let replayed = flow.iter().find(|m| from(m).is_some()).expect("the replayed record in the flow");
    {
        use rdkafka::Message as _;
        assert_eq!(from(replayed), Some(format!("{}:{}", parked.partition(), parked.offset()).as_str()));
    }
    assert_eq!(tests::delivery_meta(replayed).unwrap().history.len(), 6);
    assert!(w.wait_received("/a", "e-exhausted", Duration::from_secs(30)).await);
    assert_eq!(w.received("/b", "e-other"), 0, "the filter left b's parked delivery alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliverer_killed_mid_stream_delivers_every_event() {
    let w = world().await;
    const N: usize = 1500;
    let batch: Vec<(String, String)> =
        (0..N).map(|i| ((if i % 2 == 0 { "a" } else { "b" }).to_owned(), format!("k{i}"))).collect();
    w.enqueue_many(&batch).await;
    w.receiver.set_faults(Faults { delay: Duration::from_millis(5), ..Faults::default() });
    let group = unique("d");
    let mut first = w.deliverer(&[("AUDITSTREAM_DELIVERER__GROUP_ID", group.clone())]);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let n = w.receiver.stats().unique;
            async move { n >= (N / 5) as u64 }
        })
        .await
    );
    first.process.kill9();
    let _second = w.ready_deliverer(&[("AUDITSTREAM_DELIVERER__GROUP_ID", group)]).await;
    let all = wait_until(Duration::from_secs(120), || {
        let n = w.receiver.stats().unique;
        async move { n >= N as u64 }
    })
    .await;
    let stats = w.receiver.stats();
    assert!(all, "only {} of {N} events delivered", stats.unique);
    eprintln!("deliverer crash: {N} events, {} unique, {} duplicates", stats.unique, stats.duplicates);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_destination_does_not_hold_up_a_healthy_one() {
    let w = world().await;
    // "slow" answers after 10 s; "b" is healthy.
    let slow = w.slow_destination(Duration::from_secs(10)).await;
    // Few in-flight places overall: without isolation the slow destination
    // would take them all for 10 s at a time.
    let d = w
        .ready_deliverer(&[
            ("AUDITSTREAM_DELIVERER__MAX_IN_FLIGHT", "64".into()),
            ("AUDITSTREAM_DELIVERER__PER_DESTINATION_CONCURRENCY", "8".into()),
            ("AUDITSTREAM_DELIVERER__PER_DESTINATION_QUEUE", "8".into()),
            ("AUDITSTREAM_DELIVERER__REQUEST_TIMEOUT", "30s".into()),
        ])
        .await;
    const N: usize = 300;
    let batch: Vec<(String, String)> =
        (0..N).flat_map(|i| [("slow".to_owned(), format!("s{i}")), ("b".to_owned(), format!("h{i}"))]).collect();
    w.enqueue_many(&batch).await;
    let healthy_done = wait_until(Duration::from_secs(25), || {
        let n = w.receiver.received().iter().filter(|r| r.path == "/b").count();
        async move { n >= N }
    })
    .await;
    assert!(healthy_done, "healthy deliveries were held up behind the slow destination");
    assert!(
        count(&d, "auditstream_deliverer_deliveries_total{outcome=\"retried\"}").await > 0.0,
        "the slow destination's excess went down the ladder"
    );
    assert!(slow.received().len() < N, "the slow destination was not waited for");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_opens_its_circuit() {
    let w = world().await;
    let d = open_circuit(&w, "1m", 20).await;
    // Once open, deliveries go down the ladder without attempts: the retry
    // rungs (1 s, 2 s) bring every delivery back and on to the dead-letter
    // topic, and none of them may reach the destination meanwhile.
    let failed = "auditstream_deliverer_attempts_total{class=\"5xx\",outcome=\"failed\"}";
    let at_open = count(&d, failed).await;
    let served_at_open = w.receiver.stats().faults_injected;
    assert!(w.dlq(20).await.len() == 20, "all went down the ladder to the dead-letter topic");
    assert_eq!(count(&d, failed).await, at_open, "attempts while the circuit was open");
    assert_eq!(w.receiver.stats().faults_injected, served_at_open, "the destination was hammered while open");
    assert!(
        circuit_logged(&d, "destination circuit opened", "a"),
        "the opened circuit was not logged with its destination: {:?}",
        d.process.stderr()
    );
    // Deleted, the destination gets no trial that could close its circuit:
    // it leaves the gauge (and the alert on it) all the same.
    w.seed.delete_destination("a").await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async { count(&d, "auditstream_deliverer_circuit_open").await == 0.0 })
            .await,
        "a deleted destination's circuit stayed counted as open"
    );
    assert!(circuit_logged(&d, "destination circuit cleared", "a"), "{:?}", d.process.stderr());
}

/// Starts a deliverer whose circuits open after 2 failures for `open_for`
/// (logging at info), makes destination "a" fail every request, and sends
/// it `failing` deliveries until its circuit opens.
async fn open_circuit(w: &World, open_for: &str, failing: usize) -> Role {
    let d = w
        .ready_deliverer(&[
            ("AUDITSTREAM_DELIVERER__CIRCUIT_FAILURES", "2".into()),
            ("AUDITSTREAM_DELIVERER__CIRCUIT_OPEN_FOR", open_for.into()),
            ("AUDITSTREAM_TELEMETRY__FILTER", "info".into()),
        ])
        .await;
    w.receiver.set_faults(Faults { fail_rate: 1.0, fail_status: 503, ..Faults::default() });
    let batch: Vec<(String, String)> = (0..failing).map(|i| ("a".to_owned(), format!("c{i}"))).collect();
    w.enqueue_many(&batch).await;
    assert!(
        wait_until(Duration::from_secs(20), || async { count(&d, "auditstream_deliverer_circuit_open").await == 1.0 })
            .await,
        "failures did not open the circuit"
    );
    d
}

/// Whether the role logged `message` for destination `id`.
fn circuit_logged(role: &Role, message: &str, id: &str) -> bool {
    let destination = format!(r#""destination":"{id}""#);
    role.process.stderr().iter().any(|l| l.contains(message) && l.contains(&destination))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_destination_closes_its_circuit_and_gets_its_deliveries() {
    let w = world().await;
    let d = open_circuit(&w, "1s", 2).await;
    // The destination recovers. The failed deliveries come back from their
    // retry rung; after `open_for` the first of them is the trial, and its
    // success closes the circuit.
    w.receiver.set_faults(Faults::default());
    assert!(
        wait_until(Duration::from_secs(20), || async { count(&d, "auditstream_deliverer_circuit_open").await == 0.0 })
            .await,
        "the circuit stayed open after a successful trial"
    );
    let later: Vec<(String, String)> = (0..5).map(|i| ("a".to_owned(), format!("r{i}"))).collect();
    w.enqueue_many(&later).await;
    w.assert_all_received("/a", &later, Duration::from_secs(20)).await;
    assert!(
        circuit_logged(&d, "destination circuit closed", "a"),
        "the closed circuit was not logged with its destination: {:?}",
        d.process.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_read_from_their_event_or_their_headers_and_unreadable_ones_dead_lettered() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    // A fresh delivery from an earlier release: the event named in headers.
    let meta = DeliveryMeta::new("a", "with-headers", "audit_operation").to_headers();
    let headers: Vec<(&str, &[u8])> = meta.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    w.enqueue_raw("a", fresh_event("with-headers").as_bytes(), &headers).await;
    // No headers, and a value that is not an event: nothing to deliver,
    // parked with the reason and the value as it came.
    w.enqueue_raw("a", b"{\"id\": \"cut-short", &[]).await;
    // A fresh delivery as this release's router writes it.
    w.enqueue("a", "without-headers").await;
    let both = [("a".to_owned(), "with-headers".to_owned()), ("a".to_owned(), "without-headers".to_owned())];
    w.assert_all_received("/a", &both, Duration::from_secs(20)).await;
    let dlq = w.dlq(1).await;
    assert_eq!(dlq.len(), 1);
    let reason = header(&dlq[0], H_REASON).unwrap();
    assert!(
        reason.starts_with(
            "unreadable delivery: no header names the event, and the record's value is not a readable event"
        ),
        "{reason}"
    );
    assert_eq!(rdkafka::Message::payload(&dlq[0]), Some(&b"{\"id\": \"cut-short"[..]));
    assert_eq!(tests::key(&dlq[0]), Some("a"));
    assert_eq!(count(&d, "auditstream_deliverer_deliveries_total{outcome=\"dead_lettered\"}").await, 1.0);

    // A deliverer older than this release's router dead-letters a delivery
    // without headers (rolling back in the wrong order); replay reads it
    // from its event and puts it back. The unreadable one stays parked.
    let old_reason = "unreadable delivery: header auditstream-event-id is missing";
    let parked_by_older = fresh_event("rolled-back");
    service::kafka::produce_durably(
        &w.producer,
        &w.topics.deliveries_dlq(),
        b"a",
        Some(parked_by_older.as_bytes()),
        &[(H_REASON, old_reason.as_bytes())],
    )
    .await;
    assert_eq!(w.dlq(2).await.len(), 2);
    let out = w.run(&["dlq", "replay", "--destination", "a", "--since", "1h"]);
    assert!(out.contains("replayed 1 deliveries"), "{out}");
    assert!(w.wait_received("/a", "rolled-back", Duration::from_secs(30)).await);
    // Replaying everything: the record no destination can be read from is
    // skipped and counted, not replayed.
    let out = w.run(&["dlq", "replay", "--since", "1h"]);
    assert!(out.contains("replayed 1 deliveries"), "{out}");
    assert!(out.contains("skipped 1 records whose delivery (destination, event id and type) cannot be read"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_destinations_are_dead_lettered_without_a_request() {
    let w = world().await;
    let _d = w.ready_deliverer(&[]).await;
    let metadata = destination("meta", Owner::Instance, "http://169.254.169.254/latest/meta-data", TOKEN_A);
    w.seed.put_destination(&metadata).await.unwrap();
    w.enqueue("meta", "e-ssrf").await;
    let dlq = w.dlq(1).await;
    assert_eq!(dlq.len(), 1);
    let reason = header(&dlq[0], H_REASON).unwrap();
    assert!(reason.contains("not retryable") && reason.contains("link-local"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_destinations_are_parked_and_deleted_ones_dropped() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    let mut inactive = destination("a", Owner::Instance, &format!("http://{}/a", w.addr), TOKEN_A);
    inactive.active = false;
    w.seed.put_destination(&inactive).await.unwrap();
    // A deleted destination: its tombstone is in the topic.
    let gone = destination("gone", Owner::Instance, &format!("http://{}/gone", w.addr), TOKEN_A);
    w.seed.put_destination(&gone).await.unwrap();
    w.seed.delete_destination("gone").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.enqueue("a", "e-inactive").await;
    w.enqueue("gone", "e-gone").await;
    let dlq = w.dlq(1).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], H_REASON), Some("destination inactive"));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            count(&d, "auditstream_deliverer_deliveries_total{outcome=\"dropped\"}").await == 1.0
        })
        .await
    );
    assert_eq!(w.dlq(2).await.len(), 1, "the deleted destination's delivery was not parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_the_deliverer_has_not_seen_yet_is_waited_for_not_dropped() {
    let w = world().await;
    let d = w.ready_deliverer(&[]).await;
    // The delivery arrives first (the router saw the destination before the
    // deliverer's table did); the destination follows a moment later.
    w.enqueue("late", "e-late").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.seed
        .put_destination(&destination("late", Owner::Instance, &format!("http://{}/late", w.addr), TOKEN_A))
        .await
        .unwrap();
    assert!(w.wait_received("/late", "e-late", Duration::from_secs(30)).await);
    assert_eq!(count(&d, "auditstream_deliverer_deliveries_total{outcome=\"dropped\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_apply_to_the_next_attempt() {
    let w = world().await;
    // Nothing listens at this port: attempts fail until the URL is fixed.
    let dead = tests::free_addr();
    w.seed.put_destination(&destination("a", Owner::Instance, &format!("http://{dead}/a"), TOKEN_A)).await.unwrap();
    let d =
        w.ready_deliverer(&[("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["1s", "1s", "1s", "1s", "1s"]"#.into())]).await;
    w.enqueue("a", "e-fixed").await;
    assert!(wait_until(Duration::from_secs(20), || async { count(&d, NO_ANSWER).await >= 1.0 }).await);
    w.seed.put_destination(&destination("a", Owner::Instance, &format!("http://{}/a", w.addr), TOKEN_A)).await.unwrap();
    assert!(w.wait_received("/a", "e-fixed", Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_an_independent_implementation_during_rotation() {
    let w = world().await;
    let current = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let previous = "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB";
    let mut signed: Destination = destination("a", Owner::Instance, &format!("http://{}/a", w.addr), TOKEN_A);
    signed.signing_secret = Some(SigningSecret::new(current).unwrap());
    let until_ms = (time::OffsetDateTime::now_utc().unix_timestamp() + 3600) * 1000;
    signed.previous_signing_secret = Some(RetiringSecret { secret: SigningSecret::new(previous).unwrap(), until_ms });
    w.seed.put_destination(&signed).await.unwrap();
    let _d = w.ready_deliverer(&[]).await;
    w.enqueue("a", "e-signed").await;
    assert!(w.wait_received("/a", "e-signed", Duration::from_secs(30)).await);
    let got = w.receiver.received().into_iter().find(|r| r.path == "/a").unwrap();
    let mut headers = http::HeaderMap::new();
    for (k, v) in &got.headers {
        headers.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    assert_eq!(got.header("webhook-id"), Some("e-signed"));
    assert_eq!(got.header("webhook-signature").unwrap().split(' ').count(), 2, "old and new sign together");
    for secret in [current, previous] {
        standardwebhooks::Webhook::new(secret).unwrap().verify(&got.body, &headers).expect("verifies");
    }
    let stranger = standardwebhooks::Webhook::new("whsec_c3RyYW5nZXItc2VjcmV0LXRoYXQtaXMtbG9uZw==").unwrap();
    assert!(stranger.verify(&got.body, &headers).is_err(), "a wrong secret does not verify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_content_type_replaces_the_default_on_the_wire() {
    let w = world().await;
    let mut typed = destination("a", Owner::Instance, &format!("http://{}/a", w.addr), TOKEN_A);
    typed.headers = vec![CustomHeader {
        name: HeaderName::new("Content-Type").unwrap(),
        value: HeaderValue::new("application/vnd.siem+json").unwrap(),
        active: true,
    }];
    w.seed.put_destination(&typed).await.unwrap();
    let _d = w.ready_deliverer(&[]).await;
    w.enqueue("a", "e-typed").await;
    w.enqueue("b", "e-plain").await;
    assert!(w.wait_received("/a", "e-typed", Duration::from_secs(30)).await);
    assert!(w.wait_received("/b", "e-plain", Duration::from_secs(30)).await);
    let content_types = |path: &str| {
        let got = w.receiver.received().into_iter().find(|r| r.path == path).unwrap();
        got.headers.into_iter().filter(|(k, _)| k == "content-type").map(|(_, v)| v).collect::<Vec<_>>()
    };
    assert_eq!(content_types("/a"), ["application/vnd.siem+json"], "the destination's header replaces the default");
    assert_eq!(content_types("/b"), ["application/json"], "the default without one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_refused_addresses_are_not_connected_to() {
    let w = world().await;
    // No allowed networks: "localhost" resolves only to loopback addresses,
    // all refused at connect time (the guard runs in the resolver, so a
    // DNS answer cannot slip a private address past it).
    let _d = w.ready_deliverer(&[("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", "[]".into())]).await;
    let by_name = destination("by-name", Owner::Instance, &format!("http://localhost:{}/a", w.addr.port()), TOKEN_A);
    w.seed.put_destination(&by_name).await.unwrap();
    w.enqueue("by-name", "e-dns").await;
    let dlq = w.dlq(1).await;
    assert_eq!(dlq.len(), 1);
    let reason = header(&dlq[0], H_REASON).unwrap();
    assert!(reason.contains("refused to connect to localhost") && reason.contains("loopback"), "{reason}");
    assert!(w.receiver.received().is_empty(), "no request reached the receiver");
}

/// A TLS front for `to`: terminates TLS with a certificate for `localhost`
/// (`tests/fixtures/tls/localhost.pem`, signed by the test CA `ca.pem`; both
/// made with openssl, valid for 100 years) and relays the bytes.
/// A TLS front (the test CA's `localhost` certificate) that passes each
/// connection's bytes on to `to`, offering `alpn` (e.g. `h2`) to clients.
async fn tls_front(to: SocketAddr, alpn: &[&str]) -> SocketAddr {
    tls_front_dropping(to, alpn, 0).await
}

/// [`tls_front`], closing the first `drop` connections it accepts before
/// the TLS handshake.
async fn tls_front_dropping(to: SocketAddr, alpn: &[&str], drop: usize) -> SocketAddr {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls");
    let certs: Vec<_> =
        CertificateDer::pem_file_iter(format!("{dir}/localhost.pem")).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(format!("{dir}/localhost.key")).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            accepted += 1;
            if accepted <= drop {
                continue;
            }
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut plain) = tokio::net::TcpStream::connect(to).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_destinations_are_delivered_to_and_their_certificates_verified() {
    let w = world().await;
    let front = tls_front(w.addr, &[]).await;
    let url = format!("https://localhost:{}/tls", front.port());
    w.seed.put_destination(&destination("tls", Owner::Instance, &url, TOKEN_A)).await.unwrap();

    // The system's trust store does not know the test CA: every attempt
    // fails on the certificate, and nothing reaches the receiver.
    let untrusting = w.ready_deliverer(&[]).await;
    w.enqueue("tls", "e-untrusted").await;
    let dlq = w.dlq(1).await;
    assert_eq!(dlq.len(), 1);
    let meta = tests::delivery_meta(&dlq[0]).unwrap();
    let error = meta.history.last().and_then(|a| a.error.clone()).unwrap_or_default();
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(w.received("/tls", "e-untrusted"), 0);
    drop(untrusting);

    // Trusting the test CA (`SSL_CERT_FILE`, read by the platform
    // verifier), the same destination is delivered to over TLS.
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/ca.pem");
    let _d = w.ready_deliverer(&[("SSL_CERT_FILE", ca.into())]).await;
    w.enqueue("tls", "e-trusted").await;
    assert!(w.wait_received("/tls", "e-trusted", Duration::from_secs(20)).await, "not delivered over TLS");
    let got = w.receiver.received().into_iter().find(|r| r.path == "/tls").unwrap();
    assert_eq!(got.header("x-gitlab-event-streaming-token"), Some(TOKEN_A));
    // The deliverer writes Host itself (once per destination): the name and
    // port the URL gives.
    assert_eq!(got.header("host"), Some(format!("localhost:{}", front.port()).as_str()));
    assert_eq!(got.version, "HTTP/1.1", "the front offers no ALPN: HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_destinations_offering_http2_get_one_shared_http2_connection() {
    let w = world().await;
    let front = tls_front(w.addr, &["h2", "http/1.1"]).await;
    let url = format!("https://localhost:{}/h2", front.port());
    w.seed.put_destination(&destination("h2", Owner::Instance, &url, TOKEN_A)).await.unwrap();
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/ca.pem");
    let d = w.ready_deliverer(&[("SSL_CERT_FILE", ca.into())]).await;
    // One first, so the connection exists before the others arrive.
    w.enqueue("h2", "e-h2-0").await;
    assert!(w.wait_received("/h2", "e-h2-0", Duration::from_secs(20)).await, "not delivered over HTTP/2");
    let ids: Vec<(String, String)> = (1..=10).map(|i| ("h2".to_owned(), format!("e-h2-{i}"))).collect();
    w.enqueue_many(&ids).await;
    w.assert_all_received("/h2", &ids, Duration::from_secs(20)).await;
    let got: Vec<_> = w.receiver.received().into_iter().filter(|r| r.path == "/h2").collect();
    assert!(got.iter().all(|r| r.version == "HTTP/2.0"), "{:?}", got.iter().map(|r| &r.version).collect::<Vec<_>>());
    assert!(got.iter().all(|r| r.header("x-gitlab-event-streaming-token") == Some(TOKEN_A)));
    // Every request multiplexed over the one connection (the front opens
    // one to the receiver per connection it accepts).
    assert_eq!(w.receiver.stats().connections, 1);
    assert_eq!(count(&d, OPENED_HTTP2).await, 1.0);
    assert_eq!(count(&d, OPENED_HTTP1).await, 0.0);
    assert_eq!(count(&d, OPEN).await, 1.0);
}

/// Twelve deliveries to destination `name` behind the TLS `front`,
/// waiting in the topic before the deliverer starts, so they are attempted
/// together while no connection to the origin exists yet; returns the
/// deliverer once all arrived.
async fn burst_through(w: &World, front: SocketAddr, name: &str) -> Role {
    let url = format!("https://localhost:{}/{name}", front.port());
    w.seed.put_destination(&destination(name, Owner::Instance, &url, TOKEN_A)).await.unwrap();
    let ids: Vec<(String, String)> = (0..12).map(|i| (name.to_owned(), format!("e-{name}-{i}"))).collect();
    w.enqueue_many(&ids).await;
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tls/ca.pem");
    let d = w.ready_deliverer(&[("SSL_CERT_FILE", ca.into())]).await;
    w.assert_all_received(&format!("/{name}"), &ids, Duration::from_secs(30)).await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_a_new_http2_origin_opens_one_connection_not_one_per_attempt() {
    let w = world().await;
    let front = tls_front(w.addr, &["h2", "http/1.1"]).await;
    let d = burst_through(&w, front, "burst").await;
    let got: Vec<_> = w.receiver.received().into_iter().filter(|r| r.path == "/burst").collect();
    assert!(got.iter().all(|r| r.version == "HTTP/2.0"));
    // The front opens one connection to the receiver per connection it
    // accepts: one TLS connection carried the whole burst.
    assert_eq!(w.receiver.stats().connections, 1, "the burst opened a connection per attempt");
    assert_eq!(count(&d, OPENED_HTTP2).await, 1.0);
    assert_eq!(count(&d, NO_ANSWER).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_first_connection_of_a_burst_fails_the_next_attempt_connects_for_the_rest() {
    let w = world().await;
    let front = tls_front_dropping(w.addr, &["h2", "http/1.1"], 1).await;
    let d = burst_through(&w, front, "again").await;
    // Only the attempt whose connection the front closed failed; the ones
    // waiting for it did not take its error, and the next one's HTTP/2
    // connection carried them all.
    assert_eq!(count(&d, NO_ANSWER).await, 1.0);
    assert_eq!(w.receiver.stats().connections, 1);
    assert_eq!(count(&d, OPENED_HTTP2).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_reuse_kept_alive_connections_until_they_idle_out() {
    let w = world().await;
    let d = w
        .ready_deliverer(&[
            ("AUDITSTREAM_DELIVERER__PER_DESTINATION_CONCURRENCY", "2".into()),
            ("AUDITSTREAM_DELIVERER__IDLE_CONNECTION_TIMEOUT", "1s".into()),
        ])
        .await;
    let ids: Vec<(String, String)> = (0..20).map(|i| ("a".to_owned(), format!("e-keep-{i}"))).collect();
    w.enqueue_many(&ids).await;
    w.assert_all_received("/a", &ids, Duration::from_secs(30)).await;
    // Twenty deliveries, at most two at a time: over at most two
    // connections.
    let kept = w.receiver.stats().connections;
    assert!((1..=2).contains(&kept), "{kept} connections for 20 deliveries");
    assert_eq!(count(&d, OPENED_HTTP1).await, kept as f64, "the deliverer counts what the receiver served");
    // Idle for longer than the timeout, they are closed without waiting
    // for another delivery, and the next one needs a new connection.
    let closed = wait_until(Duration::from_secs(10), || async {
        w.receiver.stats().open_connections == 0 && count(&d, OPEN).await == 0.0
    })
    .await;
    assert!(closed, "idle connections still open: {:?}, gauge {}", w.receiver.stats(), count(&d, OPEN).await);
    w.enqueue("a", "e-after-idle").await;
    assert!(w.wait_received("/a", "e-after-idle", Duration::from_secs(30)).await);
    assert_eq!(w.receiver.stats().connections, kept + 1);
    assert_eq!(count(&d, OPENED_HTTP1).await, (kept + 1) as f64);
    assert_eq!(count(&d, OPEN).await, 1.0, "the new connection, idle in the pool");
    assert_eq!(count(&d, NO_ANSWER).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_receiver_closed_is_not_used_again() {
    let w = world().await;
    let d = w.ready_deliverer(&[("AUDITSTREAM_DELIVERER__PER_DESTINATION_CONCURRENCY", "1".into())]).await;
    // Any fault makes the receiver answer `Connection: close`; a tiny
    // delay is the harmless one.
    w.receiver.set_faults(Faults { delay: Duration::from_millis(1), ..Faults::default() });
    let ids: Vec<(String, String)> = (0..5).map(|i| ("a".to_owned(), format!("e-close-{i}"))).collect();
    w.enqueue_many(&ids).await;
    w.assert_all_received("/a", &ids, Duration::from_secs(30)).await;
    assert_eq!(w.receiver.stats().connections, 5, "one connection per response that closed it");
    assert_eq!(count(&d, OPENED_HTTP1).await, 5.0);
    let closed = wait_until(Duration::from_secs(10), || async { count(&d, OPEN).await == 0.0 }).await;
    assert!(closed, "connections the receiver closed still counted open: {}", count(&d, OPEN).await);
    assert_eq!(count(&d, NO_ANSWER).await, 0.0);
    assert_eq!(count(&d, "auditstream_deliverer_attempts_total{class=\"2xx\",outcome=\"delivered\"}").await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_rung_full_of_waiting_deliveries_does_not_hold_up_a_short_one() {
    let w = world().await;
    // Rung 1 holds deliveries due in an hour, more than a window's worth.
    let in_an_hour = (time::OffsetDateTime::now_utc().unix_timestamp() + 3600) * 1000;
    for i in 0..8 {
        let mut meta = DeliveryMeta::new("a", &format!("later{i}"), "audit_operation");
        meta.due_at_ms = Some(in_an_hour);
        meta.attempt = 2;
        let headers = meta.to_headers();
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let body =
            format!(r#"{{"id":"later{i}","event_type":"audit_operation","entity_type":"Project","entity_id":1}}"#);
        service::kafka::produce_durably(&w.producer, &w.topics.retry(1), b"a", Some(body.as_bytes()), &headers).await;
    }
    let d = w
        .ready_deliverer(&[
            ("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["1s", "1h"]"#.into()),
            ("AUDITSTREAM_DELIVERER__MAX_IN_FLIGHT", "4".into()),
        ])
        .await;
    let full = wait_until(Duration::from_secs(30), || async {
        count(&d, "auditstream_deliverer_retry_waiting{rung=\"1\"}").await >= 4.0
    })
    .await;
    assert!(full, "rung 1's window did not fill with waiting deliveries");
    // Now a delivery due at once on rung 0, for another destination.
    let mut meta = DeliveryMeta::new("b", "soon", "audit_operation");
    meta.due_at_ms = Some(time::OffsetDateTime::now_utc().unix_timestamp() * 1000);
    meta.attempt = 1;
    let headers = meta.to_headers();
    let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let body = r#"{"id":"soon","event_type":"audit_operation","entity_type":"Project","entity_id":1}"#;
    service::kafka::produce_durably(&w.producer, &w.topics.retry(0), b"b", Some(body.as_bytes()), &headers).await;
    assert!(
        w.wait_received("/b", "soon", Duration::from_secs(15)).await,
        "a rung-0 delivery waited behind rung 1's hour-long waits"
    );
    assert_eq!(w.received("/a", "later0"), 0, "rung 1's deliveries are not due yet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_set_aside_again_and_again_go_down_the_ladder() {
    let w = world().await;
    // One place, held for 30 s by the first delivery: the others are set
    // aside (100 ms doubling, up to the first rung's 1 s), and once the
    // doubling is spent they move down the ladder as saturated instead of
    // churning through the first rung forever.
    let _slow = w.slow_destination(Duration::from_secs(30)).await;
    let _d = w
        .ready_deliverer(&[
            ("AUDITSTREAM_DELIVERER__PER_DESTINATION_CONCURRENCY", "1".into()),
            ("AUDITSTREAM_DELIVERER__PER_DESTINATION_MAX_WAIT", "100ms".into()),
            ("AUDITSTREAM_DELIVERER__QUICK_RETRY_DELAY", "100ms".into()),
            ("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["1s", "2s", "2s", "2s", "2s"]"#.into()),
            ("AUDITSTREAM_DELIVERER__REQUEST_TIMEOUT", "60s".into()),
        ])
        .await;
    let batch: Vec<(String, String)> = (0..3).map(|i| ("slow".to_owned(), format!("busy{i}"))).collect();
    w.enqueue_many(&batch).await;
    let saturated = |m: &rdkafka::message::OwnedMessage| {
        header(m, proto::delivery::H_HISTORY).is_some_and(|h| h.contains("destination saturated"))
    };
    let moved = wait_until(Duration::from_secs(30), || async {
        read_topic(&w.kafka, &w.topics.retry(1), 20, Duration::from_secs(2)).await.iter().any(saturated)
    })
    .await;
    assert!(moved, "no set-aside delivery reached the second rung as saturated");
    let bounced = read_topic(&w.kafka, &w.topics.retry(0), 200, Duration::from_secs(3)).await;
    assert!(
        bounced.iter().any(|m| header(m, proto::delivery::H_BOUNCES).is_some()),
        "set-aside deliveries carry their bounce count"
    );
}
