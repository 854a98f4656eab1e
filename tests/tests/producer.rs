//! The producer as a real process: every rejection reason, Kafka down,
//! a crash while publishing, the Rust client library, a stock non-Rust
//! Kafka client, and the `publish` and `destinations` commands.

use std::{collections::HashSet, time::Duration};

use proto::{
    delivery::{H_AUDIT_EVENT, H_EVENT_ID, H_REASON},
    namespace::{NamespaceRecord, NamespaceRef},
    topics::Topics,
};
use rdkafka::Message as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tests::{
    Role, TestBroker, free_addr, http, metric, read_topic, read_until, spawn_role, unique, wait_ready, wait_until,
};

const TOKEN: &str = "producer-test-publisher";
const NS_ONLY: &str = "producer-test-namespaces";
const ADMIN: &str = "producer-test-admin";

struct Front {
    broker: TestBroker,
    prefix: String,
    role: Role,
    url: String,
}

async fn front_on(broker: TestBroker, extra: &[(&str, String)]) -> Front {
    let prefix = format!("{}.", unique("producer"));
    broker.create_topics(&prefix, 0).await;
    let tokens = format!(
        r#"[{{name = "pub", sha256 = "{}", rights = ["publish"]}}, {{name = "ns", sha256 = "{}", rights = ["namespaces"]}}, {{name = "admin", sha256 = "{}", rights = ["instance_admin", "publish", "namespaces"]}}]"#,
        producer::auth::hash_token(TOKEN),
        producer::auth::hash_token(NS_ONLY),
        producer::auth::hash_token(ADMIN),
    );
    let api = free_addr();
    let mut env = vec![("AUDITSTREAM_API__LISTEN", api.to_string()), ("AUDITSTREAM_AUTH__TOKENS", tokens)];
    env.extend(extra.iter().cloned());
    let role = spawn_role("producer", &broker, &prefix, &env);
    assert!(wait_ready(role.admin, Duration::from_secs(60)).await, "producer not ready");
    Front { broker, prefix, role, url: format!("http://{api}/api/v1") }
}

async fn front(extra: &[(&str, String)]) -> Front {
    front_on(TestBroker::start(), extra).await
}

async fn post(
    url: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, Value, Option<String>) {
    let mut req = http().post(url).header("content-type", content_type).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null), retry_after)
}

fn event(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","event_type":"audit_operation","entity_type":"Project","entity_id":7,"entity_path":"g/p"}}"#
    )
}

/// (what, token, content type, body, status, error code, (index, field)
/// expected in the answer).
type Case = (&'static str, Option<&'static str>, &'static str, Vec<u8>, u16, &'static str, Option<(u64, &'static str)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_reason_is_answered_precisely() {
    let f = front(&[
        ("AUDITSTREAM_API__MAX_EVENTS", "3".into()),
        ("AUDITSTREAM_API__MAX_REQUEST_BYTES", "4096".into()),
        ("AUDITSTREAM_API__MAX_EVENT_BYTES", "1024".into()),
        ("AUDITSTREAM_API__MAX_IMPORT_BYTES", "65536".into()),
    ])
    .await;
    let events = format!("{}/events", f.url);
    let json = "application/json";
    let big = format!(
        r#"{{"event_type":"audit_operation","entity_type":"Project","entity_id":1,"details":{{"x":"{}"}}}}"#,
        "a".repeat(1100)
    );
    let cases: Vec<Case> = vec![
        ("no token", None, json, event("a").into_bytes(), 401, "unauthenticated", None),
        ("unknown token", Some("nope"), json, event("a").into_bytes(), 401, "unauthenticated", None),
        ("token without the right", Some(NS_ONLY), json, event("a").into_bytes(), 403, "forbidden", None),
        ("body over the limit", Some(TOKEN), json, vec![b' '; 5000], 413, "request_too_large", None),
        (
            "too many events",
            Some(TOKEN),
            json,
            format!("[{},{},{},{}]", event("1"), event("2"), event("3"), event("4")).into_bytes(),
            413,
            "too_many_events",
            None,
        ),
        ("not a JSON array", Some(TOKEN), json, b"[{\"a\":1},".to_vec(), 400, "invalid_json", None),
        ("no events", Some(TOKEN), json, b"[]".to_vec(), 422, "no_events", None),
        ("empty body", Some(TOKEN), json, b"".to_vec(), 422, "invalid_events", Some((0, "(event)"))),
        ("not an object", Some(TOKEN), json, b"42".to_vec(), 422, "invalid_events", Some((0, "(event)"))),
        (
            "invalid UTF-8",
            Some(TOKEN),
            json,
            b"{\"event_type\":\"\xff\"}".to_vec(),
            422,
            "invalid_events",
            Some((0, "(event)")),
        ),
        (
            "missing required field",
            Some(TOKEN),
            json,
            br#"{"event_type":"audit_operation","entity_type":"Project"}"#.to_vec(),
            422,
            "invalid_events",
            Some((0, "entity_id")),
        ),
        (
            "wrong type",
            Some(TOKEN),
            json,
            br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":"7"}"#.to_vec(),
            422,
            "invalid_events",
            Some((0, "entity_id")),
        ),
        (
            "unregistered type",
            Some(TOKEN),
            json,
            br#"{"event_type":"made_up","entity_type":"Project","entity_id":7}"#.to_vec(),
            422,
            "invalid_events",
            Some((0, "event_type")),
        ),
        (
            "not streamed",
            Some(TOKEN),
            json,
            br#"{"event_type":"login_failed_with_otp_authentication","entity_type":"User","entity_id":7}"#.to_vec(),
            422,
            "invalid_events",
            Some((0, "event_type")),
        ),
        (
            "bad timestamp",
            Some(TOKEN),
            json,
            br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":7,"created_at":"yesterday"}"#
                .to_vec(),
            422,
            "invalid_events",
            Some((0, "created_at")),
        ),
        ("event over the limit", Some(TOKEN), json, big.into_bytes(), 422, "invalid_events", Some((0, "(event)"))),
        (
            "second of three invalid",
            Some(TOKEN),
            json,
            format!("[{},{{}},{}]", event("v1"), event("v2")).into_bytes(),
            422,
            "invalid_events",
            Some((1, "event_type")),
        ),
        (
            "bad NDJSON line",
            Some(TOKEN),
            "application/x-ndjson",
            format!("{}\n{{oops\n", event("n1")).into_bytes(),
            422,
            "invalid_events",
            Some((1, "(event)")),
        ),
    ];
    for (what, token, content_type, body, status, code, where_) in cases {
        let (got, answer, _) = post(&events, token, content_type, body).await;
        assert_eq!(got.as_u16(), status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        if let Some((index, field)) = where_ {
            let listed = answer["error"]["events"].as_array().unwrap();
            assert!(
                listed.iter().any(|e| e["index"] == index && e["errors"].as_array().unwrap().iter().any(|x| x["field"] == field)),
                "{what}: expected index {index} field {field} in {answer}"
            );
        }
    }
    // All or nothing: the valid events of rejected requests were not published.
    let topics = Topics::new(&f.prefix);
    let written = read_topic(&f.broker.kafka(&f.prefix), &topics.events(), 1, Duration::from_secs(3)).await;
    assert!(written.is_empty(), "a rejected request published {} events", written.len());
    assert!(
        metric(f.role.admin, "auditstream_producer_rejected_events_total{reason=\"unregistered_type\"}").await >= 1.0
    );
    assert!(metric(f.role.admin, "auditstream_producer_rejected_events_total{reason=\"too_large\"}").await >= 1.0);

    // Namespaces.
    let ns = |path: &str| format!("{}/namespaces/{path}", f.url);
    let put = |url: String, token: &'static str, body: &'static str| async move {
        let r = http().put(url).bearer_auth(token).body(body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(put(ns("folder/1"), NS_ONLY, r#"{"parent":null,"full_path":"a"}"#).await.0, 404);
    assert_eq!(put(ns("group/x"), NS_ONLY, r#"{"parent":null,"full_path":"a"}"#).await.0, 404);
    let (status, body) = put(ns("project/1"), NS_ONLY, r#"{"parent":null,"full_path":"a"}"#).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("parent"));
    assert_eq!(put(ns("group/1"), NS_ONLY, r#"{"full_path":"a","colour":1}"#).await.0, 422);
    assert_eq!(put(ns("group/1"), TOKEN, r#"{"parent":null,"full_path":"a"}"#).await.0, 403);
    assert_eq!(put(ns("group/1"), NS_ONLY, r#"{"parent":null,"full_path":"a"}"#).await.0, 200);

    // Bulk import: a bad line fails the import, naming the line.
    let import = format!("{}/namespaces/import", f.url);
    let bad = b"{\"kind\":\"group\",\"id\":5,\"parent\":null,\"full_path\":\"x\"}\n{\"kind\":\"project\",\"id\":6,\"full_path\":\"x/p\"}\n".to_vec();
    let (status, answer, _) = post(&import, Some(NS_ONLY), "application/x-ndjson", bad).await;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(answer["error"]["lines"][0]["line"], 2);
    // Every bad line is named with its problem, blank lines skipped and
    // counted; a delete needs no path.
    let bad = concat!(
        "{\"kind\":\"group\",\"id\":7,\"delete\":true}\n",
        "not json\n",
        "\n",
        "{\"kind\":\"group\",\"id\":8,\"parent\":null,\"full_path\":\"y\",\"colour\":1}\n",
        "{\"kind\":\"group\",\"id\":9,\"parent\":null}\r\n",
    );
    let (status, answer, _) = post(&import, Some(NS_ONLY), "application/x-ndjson", bad.into()).await;
    assert_eq!((status.as_u16(), &answer["error"]["code"]), (422, &json!("invalid_namespaces")), "{answer}");
    let named: Vec<(u64, String, String)> = answer["error"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let e = &l["errors"][0];
            (l["line"].as_u64().unwrap(), e["field"].as_str().unwrap().into(), e["problem"].as_str().unwrap().into())
        })
        .collect();
    assert_eq!(
        named.iter().map(|(l, f, _)| (*l, f.as_str())).collect::<Vec<_>>(),
        [(2, "(line)"), (4, "(line)"), (5, "full_path")]
    );
    assert!(named[0].2.contains("expected ident"), "{named:?}");
    assert!(named[1].2.contains("unknown field `colour`"), "{named:?}");
    assert_eq!(named[2].2, "is required");
    // An import has its own size limit, above the events' one.
    let (status, answer, _) = post(&import, Some(NS_ONLY), "application/x-ndjson", vec![b'\n'; 65537]).await;
    assert_eq!((status.as_u16(), &answer["error"]["code"]), (413, &json!("request_too_large")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("65536 bytes"), "{answer}");
    let lines: String = (0..500).map(|i| format!("{{\"kind\":\"project\",\"id\":{i},\"parent\":{{\"kind\":\"group\",\"id\":1}},\"full_path\":\"a/p{i}\"}}\n")).collect();
    let (status, answer, _) = post(&import, Some(NS_ONLY), "application/x-ndjson", lines.into_bytes()).await;
    assert_eq!((status.as_u16(), &answer["written"]), (200, &json!(500)), "{answer}");
    let tree = read_topic(&f.broker.kafka(&f.prefix), &topics.namespaces(), 501, Duration::from_secs(10)).await;
    assert_eq!(tree.len(), 501, "one PUT and 500 imported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_unknown_types_is_configurable() {
    let f = front(&[("AUDITSTREAM_API__ACCEPT_UNKNOWN_TYPES", "true".into())]).await;
    let body = br#"{"event_type":"brand_new_type","entity_type":"Project","entity_id":7}"#.to_vec();
    let (status, answer, _) = post(&format!("{}/events", f.url), Some(TOKEN), "application/json", body).await;
    assert_eq!(status, 202, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_gives_503_with_retry_after_never_202() {
    let f = front_on(TestBroker::mock_cluster(), &[("AUDITSTREAM_API__PUBLISH_TIMEOUT", "2s".into())]).await;
    let events = format!("{}/events", f.url);
    let (status, _, _) = post(&events, Some(TOKEN), "application/json", event("before").into_bytes()).await;
    assert_eq!(status, 202);
    f.broker.mock().unwrap().broker_down(1).unwrap();
    let (status, answer, retry_after) =
        post(&events, Some(TOKEN), "application/json", event("while-down").into_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(retry_after.is_some(), "Retry-After sent");
    assert_eq!(answer["error"]["failed_indexes"], json!([0]));
    f.broker.mock().unwrap().broker_up(1).unwrap();
    let mut accepted = false;
    for _ in 0..30 {
        if post(&events, Some(TOKEN), "application/json", event("after").into_bytes()).await.0 == 202 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(accepted, "the producer recovers when Kafka is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_writes_kafka_does_not_take_are_503_and_change_nothing() {
    let f = front_on(
        TestBroker::mock_cluster(),
        &[
            ("AUDITSTREAM_API__PUBLISH_TIMEOUT", "2s".into()),
            ("AUDITSTREAM_API__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
        ],
    )
    .await;
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let req = http().request(method, format!("{}{path}", f.url)).bearer_auth(ADMIN);
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(b.to_string()),
            None => req,
        };
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null), retry_after)
        }
    };
    let destination = |name: &str| json!({ "name": name, "url": "http://127.0.0.1:9/x" });
    let (status, answer, _) = call(reqwest::Method::POST, "/instance/destinations", Some(destination("before"))).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        call(reqwest::Method::PUT, "/namespaces/group/5", Some(json!({ "parent": null, "full_path": "five" }))).await.0,
        200
    );

    f.broker.mock().unwrap().broker_down(1).unwrap();
    let (status, answer, retry_after) =
        call(reqwest::Method::POST, "/instance/destinations", Some(destination("while-down"))).await;
    assert_eq!((status, &answer["error"]["code"]), (503, &json!("unavailable")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("nothing changed"), "{answer}");
    assert!(retry_after, "Retry-After sent");
    let (status, answer, _) =
        call(reqwest::Method::PUT, "/namespaces/group/6", Some(json!({ "parent": null, "full_path": "six" }))).await;
    assert_eq!((status, &answer["error"]["code"]), (503, &json!("unavailable")), "{answer}");
    let (status, answer, _) = call(reqwest::Method::DELETE, "/namespaces/group/5", None).await;
    assert_eq!((status, &answer["error"]["code"]), (503, &json!("unavailable")), "{answer}");
    let import = format!("{}/namespaces/import", f.url);
    let lines = b"{\"kind\":\"group\",\"id\":7,\"parent\":null,\"full_path\":\"seven\"}\n".to_vec();
    let (status, answer, _) = post(&import, Some(ADMIN), "application/x-ndjson", lines).await;
    assert_eq!((status.as_u16(), &answer["error"]["written"]), (503, &json!(0)), "{answer}");

    // Nothing the producer answered 503 for was applied.
    f.broker.mock().unwrap().broker_up(1).unwrap();
    let (status, listed, _) = call(reqwest::Method::GET, "/instance/destinations", None).await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> =
        listed["destinations"].as_array().unwrap().iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["before"], "{listed}");
}

/// A destination change and its audit event are one record: the change's
/// record in `audit.destinations` carries the event, and the relay
/// publishes it, so a producer killed the moment Kafka took a change still
/// leaves its audit event to be published, with the id it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_change_and_its_audit_event_are_one_write() {
    let mut f = front(&[("AUDITSTREAM_API__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into())]).await;
    let kafka = f.broker.kafka(&f.prefix);
    let topics = Topics::new(f.prefix.clone());
    let body = json!({ "name": "siem", "url": "http://127.0.0.1:9/x" }).to_string().into_bytes();
    let (status, created, _) =
        post(&format!("{}/instance/destinations", f.url), Some(ADMIN), "application/json", body).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    // The change's record carries its audit event ...
    let records = read_topic(&kafka, &topics.destinations(), 1, Duration::from_secs(30)).await;
    let carried =
        tests::header(&records[0], H_AUDIT_EVENT).expect("the destination record carries its audit event").as_bytes();
    let event: Value = serde_json::from_slice(carried).unwrap();
    assert_eq!(event["event_type"], "create_instance_event_streaming_destination", "{event}");
    assert_eq!(event["target_id"], id.as_str(), "{event}");
    // ... which the relay publishes, byte for byte, and only it: the API
    // does not publish it a second time. Once the relay committed the
    // record, an event published after it on the same entity (so the same
    // partition) closes what either could have written.
    let relay = format!("{}relay", f.prefix);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let (kafka, relay, topic) = (kafka.clone(), relay.clone(), topics.destinations());
            async move { tests::committed(&kafka, &relay, &topic).await >= 1 }
        })
        .await,
        "the relay never committed the change's record"
    );
    let sentinel =
        br#"{"id":"after-the-change","event_type":"audit_operation","entity_type":"Instance","entity_id":1}"#;
    let (status, answer, _) =
        post(&format!("{}/events", f.url), Some(ADMIN), "application/json", sentinel.to_vec()).await;
    assert_eq!(status, 202, "{answer}");
    let is_sentinel = |m: &rdkafka::message::OwnedMessage| tests::header(m, H_EVENT_ID) == Some("after-the-change");
    let published =
        read_until(&kafka, &topics.events(), Duration::from_secs(30), |read| read.iter().any(is_sentinel)).await;
    let audits: Vec<_> = published.iter().filter(|m| !is_sentinel(m)).collect();
    assert_eq!(audits.len(), 1, "the change's audit event, published once");
    assert_eq!(audits[0].payload(), Some(carried));

    // A producer killed as Kafka acknowledged its next change: the record,
    // with its event, is all there is. Then a record whose audit header is
    // not an event (no writer of ours makes one).
    f.role.process.kill9();
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    let context = |event_type| {
        producer::audit::AuditContext::new(
            event_type,
            producer::audit::Author::user(7, "admin"),
            producer::audit::Scope::instance(),
            "Deleted event streaming destination \"siem\" (127.0.0.1)",
        )
        .target(producer::audit::Target::new(id.clone(), "EventStreamingDestination", "siem"))
        .to_event()
    };
    let destroyed = context(proto::types::DESTROY_INSTANCE_EVENT_STREAMING_DESTINATION);
    let orphan = seed.prepare(&destroyed).unwrap();
    seed.change_destination(&id, None, Some(&orphan)).await.unwrap();
    // Records whose audit header is not relayed: no writer of ours makes
    // them. (key, header, what the reason says)
    let other_type = context(proto::types::AUDIT_OPERATION);
    let refused: [(&str, &[u8], &str); 3] = [
        (
            "other",
            br#"{"event_type":"destroy_instance_event_streaming_destination"}"#,
            "is invalid: entity_id: is required",
        ),
        ("other", &destroyed, &format!("is about destination Some({id:?}), not the record's \"other\"")),
        (&id, &other_type, "is of type \"audit_operation\", not a destination change's"),
    ];
    let raw = service::kafka::producer(&kafka, Duration::from_secs(10)).unwrap();
    let destinations = topics.destinations();
    for (key, header, _) in &refused {
        let record = rdkafka::producer::FutureRecord::<str, [u8]>::to(&destinations)
            .key(key)
            .headers(service::kafka::headers([(H_AUDIT_EVENT, *header)]));
        raw.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    // A producer started again publishes the orphaned audit event with its
    // id, and parks the unreadable one with the reason.
    let again = spawn_role(
        "producer",
        &f.broker,
        &f.prefix,
        &[("AUDITSTREAM_API__LISTEN", free_addr().to_string()), ("AUDITSTREAM_AUTH__REQUIRED", "false".into())],
    );
    assert!(wait_ready(again.admin, Duration::from_secs(60)).await, "producer not ready");
    let orphan_id = orphan.id.to_string();
    let is_orphan = |m: &rdkafka::message::OwnedMessage| tests::header(m, H_EVENT_ID) == Some(orphan_id.as_str());
    let events = read_until(&kafka, &topics.events(), Duration::from_secs(30), |read| read.iter().any(is_orphan)).await;
    let relayed = events.into_iter().find(is_orphan).expect("the orphaned audit event was never published");
    assert_eq!(relayed.payload(), Some(&orphan.bytes[..]), "the orphaned audit event, as the API prepared it");
    let parked = read_topic(&kafka, &topics.events_dlq(), 3, Duration::from_secs(30)).await;
    assert_eq!(parked.len(), 3, "every audit header not relayed is parked");
    for (key, header, why) in refused {
        let found = parked.iter().find(|m| m.payload() == Some(header) && m.key() == Some(key.as_bytes()));
        let reason = found.and_then(|m| tests::header(m, H_REASON)).unwrap_or_else(|| panic!("{why}: not parked"));
        assert!(
            reason.starts_with("the audit event carried by destination record ") && reason.contains(why),
            "{reason}"
        );
    }
    assert_eq!(
        metric(again.admin, "auditstream_producer_destination_audits_total{outcome=\"dead_lettered\"}").await,
        3.0
    );
    assert!(metric(again.admin, "auditstream_producer_destination_audits_total{outcome=\"published\"}").await >= 1.0);
}

/// An operator's definitions that would leave destination changes
/// unaudited (a change type replaced with `streamed: false`) stop the
/// producer at start, naming the type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_could_not_audit_destination_changes_does_not_start() {
    let dir = std::env::temp_dir().join(unique("types"));
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = include_str!("../../proto/event_types/update_group_event_streaming_destination.yml");
    let unstreamed = shipped.replace("streamed: true", "streamed: false");
    assert_ne!(shipped, unstreamed);
    std::fs::write(dir.join("update_group_event_streaming_destination.yml"), unstreamed).unwrap();
    let broker = TestBroker::start();
    let mut role = spawn_role(
        "producer",
        &broker,
        &format!("{}.", unique("types")),
        &[
            ("AUDITSTREAM_API__LISTEN", free_addr().to_string()),
            ("AUDITSTREAM_AUTH__REQUIRED", "false".into()),
            ("AUDITSTREAM_API__TYPES_DIR", dir.display().to_string()),
        ],
    );
    let status = role.process.wait_exit(Duration::from_secs(30)).expect("the producer stops by itself");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(64), "refused as configuration, before touching the network");
    let logs = role.process.stderr().join("\n");
    assert!(logs.contains("update_group_event_streaming_destination") && logs.contains("streamed: true"), "{logs}");
}

/// Clients publishing concurrently until the producer stops answering,
/// recording the ids it answered 202 for.
struct Publishing {
    accepted: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
}

impl Publishing {
    /// Starts `workers` clients sending `per_request` events a request, and
    /// returns once `at_least` events were accepted.
    async fn start(events: &str, workers: usize, per_request: usize, at_least: usize) -> Self {
        let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let senders = (0..workers)
            .map(|worker| {
                let (events, accepted) = (events.to_owned(), accepted.clone());
                tokio::spawn(async move {
                    for i in 0..10_000 {
                        let batch: Vec<String> =
                            (0..per_request).map(|n| event(&format!("w{worker}-{i}-{n}"))).collect();
                        let body = format!("[{}]", batch.join(","));
                        match http().post(&events).bearer_auth(TOKEN).body(body).send().await {
                            Ok(r) if r.status() == 202 => {
                                let ids: Value =
                                    serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null);
                                accepted.lock().unwrap().extend(
                                    ids["ids"]
                                        .as_array()
                                        .into_iter()
                                        .flatten()
                                        .filter_map(|v| v.as_str().map(str::to_owned)),
                                );
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        let acc = accepted.clone();
        assert!(
            tests::wait_until(Duration::from_secs(30), || {
                let n = acc.lock().unwrap().len();
                async move { n >= at_least }
            })
            .await,
            "too few events accepted"
        );
        Self { accepted, senders }
    }

    /// Waits for the clients to stop; the accepted ids.
    async fn finish(self) -> HashSet<String> {
        for s in self.senders {
            let _ = s.await;
        }
        self.accepted.lock().unwrap().iter().cloned().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_while_publishing_keeps_every_accepted_event() {
    let mut f = front(&[]).await;
    let events = format!("{}/events", f.url);
    // Kill mid-stream: once a good number of events were accepted.
    let publishing = Publishing::start(&events, 4, 2, 200).await;
    f.role.process.kill9();
    let accepted = publishing.finish().await;
    assert!(accepted.len() > 50, "too few accepted before the kill: {}", accepted.len());
    let topics = Topics::new(&f.prefix);
    let written =
        read_topic(&f.broker.kafka(&f.prefix), &topics.events(), accepted.len() * 2, Duration::from_secs(10)).await;
    let in_topic: HashSet<String> =
        written.iter().filter_map(|m| tests::header(m, proto::delivery::H_EVENT_ID).map(str::to_owned)).collect();
    let missing: Vec<_> = accepted.difference(&in_topic).take(5).collect();
    assert!(missing.is_empty(), "events answered 202 are missing from the topic: {missing:?}");
    eprintln!("producer crash: {} events accepted with 202, all {} in the topic", accepted.len(), in_topic.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_publishes_to_the_broker() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("client"));
    broker.create_topics(&prefix, 0).await;
    let kafka = broker.kafka(&prefix);
    let publisher =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    let id = publisher.publish(event("lib-1").as_bytes()).await.unwrap();
    assert_eq!(id.to_string(), "lib-1");
    let minted =
        publisher.publish(br#"{"event_type":"audit_operation","entity_type":"Group","entity_id":9}"#).await.unwrap();
    use producer::audit::{AuditContext, Author, Scope, Target};
    let ctx = AuditContext::new(
        proto::types::MERGE_REQUEST_CREATE,
        Author::user(1, "root"),
        Scope::project(24, "g/p"),
        "Added",
    )
    .target(Target::new(132, "MergeRequest", "title"));
    let from_context = publisher.audit(&ctx).await.unwrap();
    let (result, scoped) = publisher
        .audited(|rec| async move {
            rec.record(ctx.clone());
            rec.record(ctx);
            "op done"
        })
        .await;
    assert_eq!(result, "op done");
    let scoped = scoped.unwrap();
    assert_eq!(scoped.len(), 2);
    let bad = publisher.publish(br#"{"event_type":"nope","entity_type":"Group","entity_id":9}"#).await;
    assert!(matches!(bad, Err(producer::PublishError::Invalid(_))));

    let records = read_topic(&kafka, &Topics::new(&prefix).events(), 5, Duration::from_secs(10)).await;
    assert_eq!(records.len(), 5);
    let ids: HashSet<String> =
        records.iter().filter_map(|m| tests::header(m, proto::delivery::H_EVENT_ID).map(str::to_owned)).collect();
    for want in
        [id.to_string(), minted.to_string(), from_context.to_string(), scoped[0].to_string(), scoped[1].to_string()]
    {
        assert!(ids.contains(&want), "{want} missing");
    }
    let key = |id: &str| {
        records
            .iter()
            .find(|m| tests::header(m, proto::delivery::H_EVENT_ID) == Some(id))
            .and_then(|m| rdkafka::Message::key(m).map(|k| String::from_utf8_lossy(k).into_owned()))
    };
    assert_eq!(key("lib-1").as_deref(), Some("Project:7"), "partitioned by entity");
    assert_eq!(key(&minted.to_string()).as_deref(), Some("Group:9"));
}

/// A publisher linked in, on a fresh prefix, with one extra client
/// property; the broker is kept alive by the caller.
async fn library_publisher(
    name: &str,
    (key, value): (&str, &str),
) -> (TestBroker, service::config::KafkaConfig, producer::Publisher) {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique(name));
    broker.create_topics(&prefix, 0).await;
    let mut kafka = broker.kafka(&prefix);
    kafka.properties.insert(key.into(), value.into());
    let publisher =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    (broker, kafka, publisher)
}

/// A batch larger than the producer's queue: the events beyond it wait for
/// room (the acknowledgements make it) instead of failing, and each result
/// belongs to its own event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_producer_queue_waits_for_room() {
    let (_broker, kafka, publisher) = library_publisher("queue", ("queue.buffering.max.messages", "1")).await;
    let events: Vec<_> =
        (0..20).map(|i| publisher.prepare(event(&format!("queued-{i}")).as_bytes()).expect("valid")).collect();
    let results = publisher.send_all(&events).await;
    assert_eq!(results.len(), 20);
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "event {i}: {r:?}");
    }
    let records = read_topic(&kafka, &Topics::new(&kafka.topic_prefix).events(), 20, Duration::from_secs(10)).await;
    let ids: HashSet<&str> = records.iter().filter_map(|m| tests::header(m, proto::delivery::H_EVENT_ID)).collect();
    assert_eq!(
        ids,
        (0..20).map(|i| format!("queued-{i}")).collect::<HashSet<_>>().iter().map(String::as_str).collect()
    );
}

/// An event the producer refuses outright (larger than its
/// `message.max.bytes`) fails alone: the others of its batch are written,
/// and each result is its own event's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_producer_refuses_fails_alone_in_its_batch() {
    let (_broker, kafka, publisher) = library_publisher("refused", ("message.max.bytes", "1000")).await;
    let large = format!(
        r#"{{"id":"too-large","event_type":"audit_operation","entity_type":"Project","entity_id":7,"entity_path":"{}"}}"#,
        "p".repeat(1500)
    );
    let events = [
        publisher.prepare(event("small-0").as_bytes()).expect("valid"),
        publisher.prepare(large.as_bytes()).expect("valid"),
        publisher.prepare(event("small-2").as_bytes()).expect("valid"),
    ];
    let results = publisher.send_all(&events).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    match &results[1] {
        Err(producer::PublishError::Unavailable(e)) => {
            assert_eq!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge))
        }
        other => panic!("the large event: {other:?}"),
    }
    let records = read_topic(&kafka, &Topics::new(&kafka.topic_prefix).events(), 2, Duration::from_secs(10)).await;
    let ids: HashSet<&str> = records.iter().filter_map(|m| tests::header(m, proto::delivery::H_EVENT_ID)).collect();
    assert_eq!(ids, HashSet::from(["small-0", "small-2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_python_kafka_client_can_publish_and_the_router_routes_it() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("python"));
    broker.create_topics(&prefix, 0).await;
    let kafka = broker.kafka(&prefix);
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    seed.put_namespace(NamespaceRef::group(3), Some(&NamespaceRecord { parent: None, full_path: "py".into() }))
        .await
        .unwrap();
    seed.put_destination(&tests::destination(
        "inst",
        proto::destination::Owner::Instance,
        "https://x.example.com/",
        "0123456789abcdef",
    ))
    .await
    .unwrap();
    let router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("r"))]);
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);

    // The topic contract (docs/PUBLISHING.md): topic, key entity_type:entity_id,
    // value the event JSON with an id. Neither event carries every field of
    // SPEC §1; the second has no created_at, so the record's timestamp is it.
    let script = r#"
import json, sys
from confluent_kafka import Producer
brokers, topic = sys.argv[1], sys.argv[2]
p = Producer({"bootstrap.servers": brokers, "acks": "all", "enable.idempotence": True})
first = {"id": "from-python-1", "event_type": "project_fork_operation", "entity_type": "Project", "entity_id": 42,
         "entity_path": "py/tool", "author_id": 1, "author_name": "py", "created_at": "2026-01-01T02:00:00+02:00",
         "details": {}, "extra": [1]}
second = {"id": 77, "event_type": "project_fork_operation", "entity_type": "Project", "entity_id": 42}
p.produce(topic, key="Project:42", value=json.dumps(first).encode())
p.produce(topic, key="Project:42", value=json.dumps(second).encode(), timestamp=1767225600123)
if p.flush(30) != 0:
    sys.exit("not delivered")
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, broker.brokers(), &Topics::new(&prefix).events()])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "python publisher failed: {}", String::from_utf8_lossy(&out.stderr));
    let deliveries = read_topic(&kafka, &Topics::new(&prefix).deliveries(), 2, Duration::from_secs(30)).await;
    assert_eq!(deliveries.len(), 2);
    assert_eq!(tests::delivery_event_id(&deliveries[0]).as_deref(), Some("from-python-1"));
    assert_eq!(tests::key(&deliveries[0]), Some("inst"));

    // Delivered complete (SPEC §1): every field present, null where unknown,
    // created_at in UTC with milliseconds; the publisher's extra field kept.
    let payloads: Vec<serde_json::Value> = deliveries
        .iter()
        .map(|m| serde_json::from_slice(rdkafka::Message::payload(m).unwrap_or_default()).expect("a JSON event"))
        .collect();
    for p in &payloads {
        for field in proto::event::FIELDS {
            assert!(p.get(field).is_some(), "{field} missing from {p}");
        }
        assert_eq!(p["target_details"], serde_json::Value::Null, "{p}");
    }
    assert_eq!(payloads[0]["created_at"], "2026-01-01T00:00:00.000Z");
    assert_eq!(payloads[0]["author_name"], "py");
    assert_eq!(payloads[0]["extra"], serde_json::json!([1]));
    assert_eq!(payloads[1]["id"], 77);
    assert_eq!(payloads[1]["created_at"], "2026-01-01T00:00:00.123Z");
    assert_eq!(payloads[1]["entity_path"], serde_json::Value::Null);
    let completed = tests::metric(router.admin, "auditstream_router_events_completed_total").await;
    assert_eq!(completed, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_command_reports_and_publishes_what_is_valid() {
    let f = front(&[]).await;
    let dir = std::env::temp_dir().join(unique("publish"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("events.ndjson");
    let mut lines = String::new();
    for i in 0..1200 {
        if i == 10 || i == 700 {
            lines.push_str(r#"{"event_type":"nope","entity_type":"Project","entity_id":1}"#);
        } else {
            lines.push_str(&event(&format!("cli-{i}")));
        }
        lines.push('\n');
    }
    std::fs::write(&file, lines).unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["publish", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        std::process::Command::new(tests::binary())
            .args(&args)
            .env("AUDITSTREAM_KAFKA__BROKERS", f.broker.brokers())
            .env("AUDITSTREAM_KAFKA__TOPIC_PREFIX", &f.prefix)
            .output()
            .unwrap()
    };
    let api_base = f.url.trim_end_matches("/api/v1").to_owned();
    let out = run(&["--api", &api_base, "--token", TOKEN, "--batch", "300"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "some were rejected: {stdout}");
    assert!(stdout.contains("published 1198 of 1200 events"), "{stdout}");
    assert!(stdout.contains("2 rejected") && stdout.contains("event 10: event_type"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("100%"), "progress shown on a large input");

    // A token the API refuses stops the run at the first request.
    let out = run(&["--api", &api_base, "--token", "not-a-token", "--batch", "300"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("published 0 of 1200 events") && stdout.contains("1200 not acknowledged"), "{stdout}");
    assert_eq!(stderr.matches("error: the API refused the token (401)").count(), 1, "{stderr}");
    let out = run(&["--api", &api_base, "--token", NS_ONLY, "--batch", "300"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the API refused the token (403): this token may not publish")
    );
    // Arguments it cannot use: exit 64 before sending anything.
    let out = run(&["--api", &api_base, "--token", TOKEN, "--batch", "0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch must be at least 1"));
    let out =
        std::process::Command::new(tests::binary()).args(["publish", "/nonexistent/events.ndjson"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/events.ndjson"));

    let out = run(&["--kafka"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("published 1198 of 1200 events"), "{stdout}");
    let written =
        read_topic(&f.broker.kafka(&f.prefix), &Topics::new(&f.prefix).events(), 2396, Duration::from_secs(20)).await;
    assert_eq!(written.len(), 2396);
}

/// Reads `child`'s stderr until it says `marker`; returns what was read
/// and the rest of the stream. Panics if the command ends first.
async fn stderr_until(
    child: &mut std::process::Child,
    marker: &'static str,
) -> (String, std::io::BufReader<std::process::ChildStderr>) {
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    tokio::task::spawn_blocking(move || {
        let mut seen = String::new();
        while !seen.contains(marker) {
            if std::io::BufRead::read_line(&mut stderr, &mut seen).unwrap() == 0 {
                panic!("the command ended before saying {marker:?}: {seen}");
            }
        }
        (seen, stderr)
    })
    .await
    .unwrap()
}

/// Kafka down behind a real producer answers every event with 503 and
/// `failed_indexes`. (A 503 that names only some of a request's events is
/// the next test's, with one of two mock brokers down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_command_resends_what_the_api_could_not_take_and_then_gives_up() {
    let f = front_on(TestBroker::mock_cluster(), &[("AUDITSTREAM_API__PUBLISH_TIMEOUT", "2s".into())]).await;
    let api_base = f.url.trim_end_matches("/api/v1").to_owned();
    let dir = std::env::temp_dir().join(unique("publish-retry"));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, ids: &[&str]| {
        let file = dir.join(name);
        std::fs::write(&file, ids.iter().map(|id| event(id) + "\n").collect::<String>()).unwrap();
        file.to_str().unwrap().to_owned()
    };
    let publish = |file: &str, api: &str, extra: &[&str]| {
        let mut command = std::process::Command::new(tests::binary());
        command.args(["publish", file, "--api", api, "--token", TOKEN, "--batch", "2"]).args(extra);
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        command.spawn().unwrap()
    };
    let finish = |child: std::process::Child| {
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Kafka down: the first request is resent once, then the run stops;
    // the third event, in the second request, is never sent.
    f.broker.mock().unwrap().broker_down(1).unwrap();
    let lost = write("lost.ndjson", &["lost-1", "lost-2", "lost-3"]);
    let child = publish(&lost, &api_base, &["--retries", "1"]);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || finish(child)).await.unwrap();
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("published 0 of 3 events") && stdout.contains("3 not acknowledged"), "{stdout}");
    assert_eq!(stderr.matches("resending 2 events in 2 s").count(), 1, "{stderr}");
    assert!(stderr.contains("error: the API answered 503: ") && stderr.contains("gave up after 1 retries"), "{stderr}");

    // Kafka back while it waits: what was refused is resent and published.
    let resent = write("resent.ndjson", &["resent-1", "resent-2", "resent-3"]);
    let mut child = publish(&resent, &api_base, &[]);
    let (seen, mut stderr) = stderr_until(&mut child, "resending 2 events").await;
    assert!(seen.contains("warning: the API answered 503: "), "{seen}");
    f.broker.mock().unwrap().broker_up(1).unwrap();
    let (code, stdout, _) = tokio::task::spawn_blocking(move || finish(child)).await.unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(code, Some(0), "{stdout}{seen}{rest}");
    assert!(
        stdout.contains("published 3 of 3 events") && stdout.contains("0 rejected, 0 not acknowledged"),
        "{stdout}"
    );
    let ids = |read: &[rdkafka::message::OwnedMessage]| -> Vec<String> {
        let payloads = read.iter().filter_map(|m| serde_json::from_slice::<Value>(rdkafka::Message::payload(m)?).ok());
        payloads.filter_map(|e| e["id"].as_str().map(str::to_owned)).collect()
    };
    let resent_ids = ["resent-1", "resent-2", "resent-3"];
    let all_resent =
        |read: &[rdkafka::message::OwnedMessage]| resent_ids.iter().all(|r| ids(read).iter().any(|i| i == r));
    let topic = Topics::new(&f.prefix).events();
    let read = tests::read_until(&f.broker.kafka(&f.prefix), &topic, Duration::from_secs(30), all_resent).await;
    assert!(all_resent(&read), "every resent event was published: {:?}", ids(&read));

    // No API at all: nothing to wait for with --retries 0.
    let closed = format!("http://{}", tests::free_addr());
    let (code, stdout, stderr) = finish(publish(&resent, &closed, &["--retries", "0"]));
    assert_eq!(code, Some(1));
    assert!(stdout.contains("published 0 of 3 events") && stdout.contains("3 not acknowledged"), "{stdout}");
    assert!(stderr.contains(&format!("error: cannot reach {closed}/api/v1/events: ")), "{stderr}");
    assert!(stderr.contains("gave up after 0 retries") && !stderr.contains("resending"), "{stderr}");
}

/// One of two brokers down: a request's events on the partition it leads
/// are not acknowledged, the others are. The API answers 503 naming both
/// (`accepted_ids` in request order, `failed_indexes`), and the publish
/// command counts the accepted ones as published and resends only the
/// others, so every event is in the topic once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_kafka_took_in_part_is_answered_with_both_lists_and_only_the_rest_resent() {
    let f = front_on(TestBroker::mock_cluster_of(2), &[("AUDITSTREAM_API__PUBLISH_TIMEOUT", "2s".into())]).await;
    let mock = f.broker.mock().unwrap();
    let topic = Topics::new(&f.prefix).events();
    mock.partition_leader(&topic, 0, Some(1)).unwrap();
    mock.partition_leader(&topic, 1, Some(2)).unwrap();
    mock.broker_down(2).unwrap();
    // Events of eight projects (the partition key), so of both partitions.
    let events = |tag: &str| {
        (1..=8)
            .map(|n| {
                format!(
                    r#"{{"id":"{tag}-{n}","event_type":"audit_operation","entity_type":"Project","entity_id":{n},"entity_path":"g/p{n}"}}"#
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };

    let (status, answer, retry_after) =
        post(&format!("{}/events", f.url), Some(TOKEN), "application/x-ndjson", events("api").into_bytes()).await;
    assert_eq!((status.as_u16(), &answer["error"]["code"]), (503, &json!("unavailable")), "{answer}");
    assert!(retry_after.is_some());
    let failed: Vec<u64> =
        answer["error"]["failed_indexes"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
    let accepted: Vec<&str> =
        answer["error"]["accepted_ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    assert!(!failed.is_empty() && !accepted.is_empty(), "both partitions had events: {answer}");
    let expected: Vec<String> = (1..=8).filter(|n| !failed.contains(&(n - 1))).map(|n| format!("api-{n}")).collect();
    assert_eq!(accepted, expected, "the accepted ids are the events not named failed, in request order");

    // The command: one request of all eight, the failed ones resent once
    // the broker is back.
    let file = std::env::temp_dir().join(unique("publish-part"));
    std::fs::write(&file, events("cli") + "\n").unwrap();
    let api_base = f.url.trim_end_matches("/api/v1").to_owned();
    let mut child = std::process::Command::new(tests::binary())
        .args(["publish", file.to_str().unwrap(), "--api", &api_base, "--token", TOKEN, "--batch", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (seen, _) = stderr_until(&mut child, "resending").await;
    let resent: usize = seen.split("resending ").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!((1..8).contains(&resent), "only what Kafka did not take is resent: {seen}");
    mock.broker_up(2).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("published 8 of 8 events") && stdout.contains("0 not acknowledged"), "{stdout}");
    let cli_ids = |read: &[rdkafka::message::OwnedMessage]| -> Vec<String> {
        let events = read.iter().filter_map(|m| serde_json::from_slice::<Value>(m.payload()?).ok());
        events.filter_map(|e| e["id"].as_str().filter(|id| id.starts_with("cli-")).map(str::to_owned)).collect()
    };
    let kafka = f.broker.kafka(&f.prefix);
    let read = read_until(&kafka, &topic, Duration::from_secs(30), |r| cli_ids(r).len() >= 8).await;
    let mut ids = cli_ids(&read);
    ids.sort();
    assert_eq!(ids, (1..=8).map(|n| format!("cli-{n}")).collect::<Vec<_>>(), "every event published");
    // The whole topic: the API's accepted events and the command's eight,
    // nothing twice (a ninth record would be a resent accepted one).
    let all = read_topic(&kafka, &topic, accepted.len() + 9, Duration::from_secs(3)).await;
    assert_eq!(all.len(), accepted.len() + 8, "none resent twice: {:?}", cli_ids(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destinations_command_manages_destinations() {
    let f = front(&[("AUDITSTREAM_API__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into())]).await;
    let api_base = f.url.trim_end_matches("/api/v1").to_owned();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(tests::binary())
            .arg("destinations")
            .args(args)
            .args(["--api", &api_base, "--token", ADMIN])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&[
        "create",
        "--name",
        "SIEM",
        "--url",
        "http://127.0.0.1:9/in",
        "--allow",
        "audit_operation",
        "--header",
        "X-Team=sec",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let (code, out, _) = run(&["list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("SIEM") && out.contains(&id) && out.contains("allow 1"), "{out}");
    let (code, out, _) = run(&["update", &id, "--active", "false", "--json"]);
    assert_eq!(code, Some(0));
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["active"], false);
    let (code, _, err) = run(&["create", "--name", "bad", "--url", "http://10.0.0.1/"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("url:"), "field errors are printed: {err}");
    // Flags it cannot turn into a request: exit 64, naming the flag.
    let (code, _, err) = run(&["create", "--name", "h", "--url", "http://127.0.0.1:9/", "--header", "X-Team"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("--header takes NAME=VALUE, got \"X-Team\""), "{err}");
    let (code, _, err) = run(&["create", "--name", "n", "--url", "http://127.0.0.1:9/", "--namespace", "folder:1"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("folder"), "{err}");
    // An API that is not there.
    let closed = tests::free_addr();
    let out = std::process::Command::new(tests::binary())
        .args(["destinations", "list", "--api", &format!("http://{closed}"), "--token", ADMIN])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot reach http://{closed}")));
    let (code, out, _) = run(&["delete", &id]);
    assert_eq!((code, out.trim()), (Some(0), format!("deleted {id}").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_work_is_bounded_with_503_busy() {
    let f = front_on(
        TestBroker::mock_cluster(),
        &[("AUDITSTREAM_API__MAX_IN_FLIGHT", "1".into()), ("AUDITSTREAM_API__PUBLISH_TIMEOUT", "3s".into())],
    )
    .await;
    let events = format!("{}/events", f.url);
    // With Kafka down, one request holds the only place until its timeout.
    f.broker.mock().unwrap().broker_down(1).unwrap();
    let holder = tokio::spawn({
        let events = events.clone();
        async move { post(&events, Some(TOKEN), "application/json", event("held").into_bytes()).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, answer, retry_after) =
        post(&events, Some(TOKEN), "application/json", event("second").into_bytes()).await;
    assert_eq!(status, 503, "{answer}");
    // Its own code: the producer is saturated, Kafka is not (yet) the cause.
    assert_eq!(answer["error"]["code"], "busy", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("api.max_in_flight"), "{answer}");
    assert!(retry_after.is_some());
    assert_eq!(holder.await.unwrap(), 503, "the held request is never answered 202 while Kafka is down");
    assert!(metric(f.role.admin, "auditstream_producer_rejected_events_total{reason=\"busy\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_producer_and_exits_cleanly() {
    let mut f = front(&[]).await;
    let events = format!("{}/events", f.url);
    let publishing = Publishing::start(&events, 3, 1, 100).await;
    let status = f.role.process.terminate(Duration::from_secs(25));
    assert!(status.is_some_and(|s| s.success()), "exit after SIGTERM: {status:?}");
    let accepted = publishing.finish().await;
    let written = read_topic(
        &f.broker.kafka(&f.prefix),
        &Topics::new(&f.prefix).events(),
        accepted.len(),
        Duration::from_secs(10),
    )
    .await;
    let in_topic: HashSet<String> =
        written.iter().filter_map(|m| tests::header(m, proto::delivery::H_EVENT_ID).map(str::to_owned)).collect();
    assert!(!accepted.is_empty() && accepted.is_subset(&in_topic), "every 202 before the stop is in the topic");
    assert!(http().post(&events).body(event("late")).send().await.is_err(), "no longer accepting");
}
