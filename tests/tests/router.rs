//! The router as a real process: poison input, crashes and scale-out.

use std::{collections::HashSet, time::Duration};

use proto::{
    delivery::H_REASON,
    destination::Owner,
    namespace::{NamespaceRecord, NamespaceRef},
    topics::Topics,
};
use tests::{
    TestBroker, destination, header, metric, produce_many, produce_raw, read_topic, series, spawn_role, unique,
    wait_ready, wait_until,
};

async fn setup(broker: &TestBroker) -> (String, service::config::KafkaConfig) {
    let prefix = format!("{}.", unique("router"));
    broker.create_topics(&prefix, 0).await;
    let kafka = broker.kafka(&prefix);
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    seed.put_namespace(NamespaceRef::group(1), Some(&NamespaceRecord { parent: None, full_path: "acme".into() }))
        .await
        .unwrap();
    seed.put_destination(&destination("inst", Owner::Instance, "https://siem.example.com/", "0123456789abcdef"))
        .await
        .unwrap();
    (prefix, kafka)
}

/// A complete event (every field of SPEC §1, `created_at` in its form), so
/// the router delivers its bytes unchanged.
fn event(id: &str, entity: i64) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","author_id":1,"author_name":"a","entity_id":{entity},"entity_type":"Project","entity_path":"acme/p{entity}","target_id":1,"target_type":"X","target_details":null,"event_type":"audit_operation","ip_address":"","created_at":"{CREATED_AT}","details":{{}}}}"#
    )
    .into_bytes()
}

/// The `created_at` of [`event`], and as Unix milliseconds.
const CREATED_AT: &str = "2026-11-21T10:00:00.000Z";
const CREATED_AT_MS: i64 = 1_795_255_200_000;

/// `n` events with ids `{id}0..`, keyed and spread over `projects` projects.
fn events(n: usize, id: &str, projects: usize) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("Project:{}", i % projects), event(&format!("{id}{i}"), (i % projects) as i64))).collect()
}

/// Event ids found in the deliveries topic.
async fn delivered_ids(kafka: &service::config::KafkaConfig, topics: &Topics, want: usize) -> (HashSet<String>, usize) {
    let records = read_topic(kafka, &topics.deliveries(), want, Duration::from_secs(5)).await;
    let n = records.len();
    (records.iter().filter_map(tests::delivery_event_id).collect(), n)
}

/// Polls the deliveries topic until `n` distinct events are there or the
/// deadline passes; returns the ids and the record count.
async fn all_delivered(
    kafka: &service::config::KafkaConfig,
    topics: &Topics,
    n: usize,
    deadline: Duration,
) -> (HashSet<String>, usize) {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let (ids, records) = delivered_ids(kafka, topics, n * 2).await;
        if ids.len() >= n || tokio::time::Instant::now() > end {
            return (ids, records);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_dead_lettered_and_consumption_continues() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"{not json".to_vec()),
        ("invalid utf-8", b"{\"a\":\"\xff\"}".to_vec()),
        (
            "unregistered type",
            br#"{"id":"x","event_type":"no_such_type","entity_type":"Project","entity_id":1}"#.to_vec(),
        ),
        (
            "schema violation",
            br#"{"id":"y","event_type":"audit_operation","entity_type":"Project","entity_id":"one"}"#.to_vec(),
        ),
        ("no id", br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":1}"#.to_vec()),
    ];
    for (_, bytes) in &poison {
        produce_raw(&kafka, &topics.events(), "Project:1", bytes, &[("origin", b"test")]).await;
    }
    produce_raw(&kafka, &topics.events(), "Project:1", &event("good-after-poison", 1), &[]).await;
    let timed = br#"{"id":"timed","event_type":"audit_operation","entity_type":"Project","entity_id":1,"created_at":"2026-11-21T10:00:00.123Z"}"#;
    produce_raw(&kafka, &topics.events(), "Project:1", timed, &[]).await;

    let router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("g"))]);
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);

    let dlq = read_topic(&kafka, &topics.events_dlq(), poison.len(), Duration::from_secs(30)).await;
    assert_eq!(dlq.len(), poison.len());
    // Dead letters of concurrent messages may be written in any order:
    // find each poison input's record by its bytes.
    let reason_of = |what: &str, bytes: &[u8]| -> String {
        let m = dlq
            .iter()
            .find(|m| rdkafka::Message::payload(*m) == Some(bytes))
            .unwrap_or_else(|| panic!("{what}: not dead-lettered with its original bytes"));
        assert_eq!(header(m, "origin"), Some("test"), "{what}: original headers kept");
        header(m, H_REASON).unwrap_or_default().to_owned()
    };
    let reasons: Vec<String> = poison.iter().map(|(what, bytes)| reason_of(what, bytes)).collect();
    assert!(reasons[0].contains("not valid JSON"), "{}", reasons[0]);
    assert!(reasons[1].contains("UTF-8"), "{}", reasons[1]);
    assert!(reasons[2].contains("not registered"), "{}", reasons[2]);
    assert!(reasons[3].contains("entity_id"), "{}", reasons[3]);
    assert!(reasons[4].contains("no id"), "{}", reasons[4]);

    let deliveries = read_topic(&kafka, &topics.deliveries(), 2, Duration::from_secs(30)).await;
    let by_id = |id: &str| {
        deliveries
            .iter()
            .find(|m| tests::delivery_event_id(m).as_deref() == Some(id))
            .unwrap_or_else(|| panic!("{id} was not routed: consumption stopped at the poison"))
    };
    // The deliverer reads the event's created_at (for its latency metric)
    // from the fresh delivery's event.
    let created_at = |id: &str| tests::delivery_meta(by_id(id)).unwrap().created_at_ms;
    assert_eq!(created_at("timed"), Some(1_795_255_200_123));
    assert_eq!(created_at("good-after-poison"), Some(CREATED_AT_MS));
    // "timed" was written without most fields: delivered with them, null.
    let timed: serde_json::Value =
        serde_json::from_slice(rdkafka::Message::payload(by_id("timed")).unwrap_or_default()).unwrap();
    assert_eq!(timed["author_name"], serde_json::Value::Null, "{timed}");
    assert_eq!(timed["created_at"], "2026-11-21T10:00:00.123Z");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            metric(router.admin, "auditstream_router_events_total{outcome=\"dead_lettered\"}").await >= 5.0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_mid_stream_loses_nothing() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    const N: usize = 3000;
    let events = events(N, "k", 50);
    produce_many(&kafka, &topics.events(), &events).await;

    let group = unique("g");
    let mut first = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group.clone())]);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            metric(first.admin, "auditstream_router_events_total{outcome=\"routed\"}").await >= (N / 5) as f64
        })
        .await,
        "the first router routed too little"
    );
    first.process.kill9();

    let second = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group)]);
    assert!(wait_ready(second.admin, Duration::from_secs(60)).await);
    let (seen, records) = all_delivered(&kafka, &topics, N, Duration::from_secs(90)).await;
    let missing: Vec<_> = (0..N).map(|i| format!("k{i}")).filter(|id| !seen.contains(id)).collect();
    assert!(missing.is_empty(), "{} events never routed, e.g. {:?}", missing.len(), &missing[..missing.len().min(5)]);
    eprintln!("router crash: {N} events, {records} deliveries ({} duplicates)", records - N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routers_split_the_partitions_and_route_everything() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    let group = unique("g");
    let a = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group.clone())]);
    let b = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group)]);
    assert!(wait_ready(a.admin, Duration::from_secs(60)).await && wait_ready(b.admin, Duration::from_secs(60)).await);
    // The group has settled once each member reports lag for its own share
    // and together they cover both partitions (revoked ones drop out).
    let lag = "auditstream_consumer_lag{";
    let settled = wait_until(Duration::from_secs(60), || async {
        let (on_a, on_b) = (series(a.admin, lag).await, series(b.admin, lag).await);
        on_a >= 1 && on_b >= 1 && on_a + on_b == 2
    })
    .await;
    assert!(settled, "the two routers never split the partitions between them");

    const N: usize = 1000;
    let events = events(N, "s", N);
    produce_many(&kafka, &topics.events(), &events).await;
    let (seen, _) = all_delivered(&kafka, &topics, N, Duration::from_secs(60)).await;
    assert_eq!(seen.len(), N, "every event routed at least once");
    let routed_a = metric(a.admin, "auditstream_router_events_total{outcome=\"routed\"}").await;
    let routed_b = metric(b.admin, "auditstream_router_events_total{outcome=\"routed\"}").await;
    assert!(routed_a > 0.0 && routed_b > 0.0, "both routers took a share: {routed_a} and {routed_b}");
    assert!(routed_a + routed_b >= N as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_changes_reach_routing_within_seconds() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    let rec = |parent, path: &str| NamespaceRecord { parent, full_path: path.into() };
    seed.put_namespace(NamespaceRef::project(5), Some(&rec(Some(NamespaceRef::group(1)), "acme/app"))).await.unwrap();
    seed.put_namespace(NamespaceRef::group(2), Some(&rec(None, "beta"))).await.unwrap();
    seed.put_destination(&destination("acme-d", Owner::Group { id: 1 }, "https://a.example.com/", "0123456789abcdef"))
        .await
        .unwrap();
    let router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("g"))]);
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);

    let destinations_of = |id: String| {
        let (kafka, topics) = (kafka.clone(), topics.clone());
        async move {
            let records = read_topic(&kafka, &topics.deliveries(), 100, Duration::from_secs(2)).await;
            records
                .iter()
                .filter(|m| tests::delivery_event_id(m).as_deref() == Some(id.as_str()))
                .filter_map(|m| tests::key(m).map(str::to_owned))
                .collect::<HashSet<_>>()
        }
    };
    produce_raw(&kafka, &topics.events(), "Project:5", &event("before", 5), &[]).await;
    let want: HashSet<String> = ["inst".into(), "acme-d".into()].into();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let f = destinations_of("before".into());
            let w = want.clone();
            async move { f.await == w }
        })
        .await
    );
    // A fresh delivery: the event's bytes, unchanged, keyed by the
    // destination, and no headers at all (Kafka clients allocate per
    // header); its id and type are read from the event.
    let records = read_topic(&kafka, &topics.deliveries(), 2, Duration::from_secs(2)).await;
    let before: Vec<_> = records.iter().filter(|m| tests::delivery_event_id(m).as_deref() == Some("before")).collect();
    assert_eq!(before.len(), 2);
    for m in before {
        assert_eq!(service::kafka::header_pairs(m), [], "a fresh delivery carries no headers");
        assert_eq!(rdkafka::Message::payload(m), Some(&event("before", 5)[..]), "the event's bytes, unchanged");
        let meta = tests::delivery_meta(m).unwrap();
        assert_eq!(Some(meta.destination_id.as_str()), tests::key(m));
        assert_eq!((meta.event_type.as_str(), meta.attempt), ("audit_operation", 0));
    }

    // While the router runs: the project moves to beta, beta gets a
    // destination, the instance destination is deactivated.
    seed.put_namespace(NamespaceRef::project(5), Some(&rec(Some(NamespaceRef::group(2)), "beta/app"))).await.unwrap();
    seed.put_destination(&destination("beta-d", Owner::Group { id: 2 }, "https://b.example.com/", "0123456789abcdef"))
        .await
        .unwrap();
    let mut inactive = destination("inst", Owner::Instance, "https://siem.example.com/", "0123456789abcdef");
    inactive.active = false;
    seed.put_destination(&inactive).await.unwrap();
    let started = std::time::Instant::now();
    let want: HashSet<String> = ["beta-d".into()].into();
    let mut n = 0;
    let changed = wait_until(Duration::from_secs(30), || {
        n += 1;
        let id = format!("after-{n}");
        let (kafka, topics, w) = (kafka.clone(), topics.clone(), want.clone());
        let check = destinations_of(id.clone());
        async move {
            produce_raw(&kafka, &topics.events(), "Project:5", &event(&id, 5), &[]).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            check.await == w
        }
    })
    .await;
    assert!(changed, "routing never followed the changes");
    eprintln!("table changes reached routing within {:?}", started.elapsed());
}

/// A consumer group's next member resumes exactly where the last one
/// finished: nothing skipped at a handover (librdkafka's
/// `rd_kafka_offset_store` stores offset + 1, which once made every
/// handover skip one message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_skips_nothing() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    let group = unique("g");
    produce_raw(&kafka, &topics.events(), "Project:1", &event("first", 1), &[]).await;
    let mut first = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group.clone())]);
    assert!(wait_ready(first.admin, Duration::from_secs(60)).await);
    let (ids, _) = all_delivered(&kafka, &topics, 1, Duration::from_secs(30)).await;
    assert!(ids.contains("first"));
    // A clean stop commits what was finished.
    assert!(first.process.terminate(Duration::from_secs(25)).is_some_and(|s| s.success()));
    produce_raw(&kafka, &topics.events(), "Project:1", &event("second", 1), &[]).await;
    let second = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group)]);
    assert!(wait_ready(second.admin, Duration::from_secs(60)).await);
    let (ids, records) = all_delivered(&kafka, &topics, 2, Duration::from_secs(30)).await;
    assert!(ids.contains("second"), "the event after the handover was skipped");
    assert_eq!(records, 2, "and nothing was routed twice after a clean stop");
}

/// A write Kafka refuses is written again, and the event's offset waits
/// for it. The broker is librdkafka's mock cluster: Tansu cannot be told to
/// refuse writes, the mock can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_are_written_again_and_hold_the_offset() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = TestBroker::mock_cluster();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    produce_raw(&kafka, &topics.events(), "Project:1", &event("held", 1), &[]).await;
    // The router's next three writes are refused for good (not retried by
    // the client itself).
    broker
        .mock()
        .unwrap()
        .request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 3]);

    let group = unique("g");
    let router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group.clone())]);
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);
    let (seen, _) = all_delivered(&kafka, &topics, 1, Duration::from_secs(30)).await;
    assert!(seen.contains("held"), "the event was never delivered");
    assert!(
        metric(router.admin, "auditstream_router_rewrites_total").await >= 1.0,
        "delivered, but not through a rewrite: the refusal was never seen"
    );
    assert!(
        wait_until(Duration::from_secs(15), || async { tests::committed(&kafka, &group, &topics.events()).await == 1 })
            .await,
        "the offset did not advance once the write was taken"
    );
}

/// A write the producer has no room for waits for room: with a queue of
/// one record, most writes are not taken at once, and every event still
/// arrives, once each at most as often as it was written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_producer_has_no_room_for_wait_for_room() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    const N: usize = 200;
    let events = events(N, "q", 10);
    produce_many(&kafka, &topics.events(), &events).await;
    let group = unique("g");
    let router = spawn_role(
        "router",
        &broker,
        &prefix,
        &[
            ("AUDITSTREAM_ROUTER__GROUP_ID", group.clone()),
            ("AUDITSTREAM_KAFKA__PROPERTIES__QUEUE.BUFFERING.MAX.MESSAGES", "1".into()),
        ],
    );
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);
    let (seen, records) = all_delivered(&kafka, &topics, N, Duration::from_secs(60)).await;
    assert_eq!(seen.len(), N, "events lost");
    assert_eq!(records, N, "an event written twice");
    assert!(metric(router.admin, "auditstream_router_rewrites_total").await >= 1.0, "the queue never filled");
    assert!(
        wait_until(Duration::from_secs(15), || async {
            tests::committed(&kafka, &group, &topics.events()).await == N as i64
        })
        .await,
        "not every offset was committed"
    );
}

/// Runs an `auditstream` command against the test's topics; its status and
/// output (stdout, then stderr).
fn run_cli(broker: &TestBroker, prefix: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(tests::binary())
        .args(args)
        .env("AUDITSTREAM_KAFKA__BROKERS", broker.brokers())
        .env("AUDITSTREAM_KAFKA__TOPIC_PREFIX", prefix)
        .output()
        .expect("auditstream runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Both dead-letter topics have several partitions; a reader meets their
/// records partition by partition, so the listing sorts them by time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_newest_last_across_partitions() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Oldest and newest in partition 1, the middle one in partition 0.
    let written = [(1, now - 3_000, "oldest"), (0, now - 2_000, "middle"), (1, now - 1_000, "newest")];
    for (topic, list) in [
        (topics.events_dlq(), &["dlq", "list", "--events", "--json"][..]),
        (topics.deliveries_dlq(), &["dlq", "list", "--json"]),
    ] {
        for (partition, at, id) in written {
            let event =
                format!(r#"{{"id":"{id}","event_type":"audit_operation","entity_type":"Project","entity_id":1}}"#);
            tests::produce_at(&kafka, &topic, partition, at, "inst", event.as_bytes()).await;
        }
        let (ok, listed, err) = run_cli(&broker, &prefix, list);
        assert!(ok, "{err}");
        let order: Vec<(i64, String)> = listed
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|r| (r["partition"].as_i64().unwrap(), r["event_id"].as_str().unwrap_or_default().to_owned()))
            .collect();
        let expected: Vec<(i64, String)> = written.iter().map(|(p, _, id)| (i64::from(*p), (*id).to_owned())).collect();
        assert_eq!(order, expected, "{topic}: {listed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_are_listed_and_replayed_once_their_cause_is_fixed() {
    let broker = TestBroker::start();
    let (prefix, kafka) = setup(&broker).await;
    let topics = Topics::new(&prefix);
    let custom = br#"{"id":"custom-1","event_type":"custom_thing","entity_type":"Project","entity_id":1}"#;
    produce_raw(&kafka, &topics.events(), "Project:1", custom, &[("origin", b"test")]).await;
    let producer = service::kafka::producer(&kafka, Duration::from_secs(30)).unwrap();
    service::kafka::produce_durably(&producer, &topics.events(), b"Project:1", None, &[]).await;

    let group = unique("g");
    let mut router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", group.clone())]);
    let parked = read_topic(&kafka, &topics.events_dlq(), 2, Duration::from_secs(30)).await;
    assert_eq!(parked.len(), 2);
    let parked_custom =
        parked.iter().find(|m| !rdkafka::Message::payload(*m).unwrap_or_default().is_empty()).expect("the event");
    // Stopped cleanly, so its successor starts after both records.
    assert!(router.process.terminate(Duration::from_secs(25)).is_some_and(|s| s.success()));

    // The operator's view: the event by id, type, entity and reason.
    let (ok, listed, err) = run_cli(&broker, &prefix, &["dlq", "list", "--events", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{listed}");
    let row = rows.iter().find(|r| r["event_id"] == "custom-1").expect("the event listed");
    assert_eq!(
        (&row["event_type"], &row["key"]),
        (&serde_json::json!("custom_thing"), &serde_json::json!("Project:1"))
    );
    assert!(row["reason"].as_str().unwrap().contains("not registered"), "{row}");
    let (ok, _, err) = run_cli(&broker, &prefix, &["dlq", "list", "--events", "--destination", "inst"]);
    assert!(!ok && err.contains("--destination"), "deliveries' filter refused for events: {err}");

    // The cause fixed (unknown types accepted), the replay routes it; the
    // tombstone has nothing to route.
    let router = spawn_role(
        "router",
        &broker,
        &prefix,
        &[("AUDITSTREAM_ROUTER__GROUP_ID", group), ("AUDITSTREAM_ROUTER__ACCEPT_UNKNOWN_TYPES", "true".into())],
    );
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);
    let (ok, out, err) = run_cli(&broker, &prefix, &["dlq", "replay", "--events", "--since", "1h"]);
    assert!(ok, "{err}");
    assert!(out.contains("replayed 1 events") && out.contains("skipped 1 tombstones"), "{out}");
    let deliveries = read_topic(&kafka, &topics.deliveries(), 1, Duration::from_secs(30)).await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(tests::delivery_event_id(&deliveries[0]).as_deref(), Some("custom-1"));

    // Back in audit.events as written, saying where it was parked.
    let events = read_topic(&kafka, &topics.events(), 3, Duration::from_secs(10)).await;
    let replayed = events.iter().find(|m| header(m, "auditstream-replayed-from").is_some()).expect("replayed record");
    let at = {
        use rdkafka::Message as _;
        format!("{}:{}", parked_custom.partition(), parked_custom.offset())
    };
    assert_eq!(header(replayed, "auditstream-replayed-from"), Some(at.as_str()));
    assert_eq!(header(replayed, "origin"), Some("test"));
    assert_eq!(header(replayed, H_REASON), None);
    assert_eq!(rdkafka::Message::payload(replayed), Some(&custom[..]));
    assert_eq!(tests::key(replayed), Some("Project:1"));
}
