//! The bad-input corpus (issue 7): malformed and hostile inputs at every
//! door of the system, each with its exact expected outcome.
//!
//! - Events, through the validation every door shares (`proto::event`).
//! - The producer's HTTP API: status, error code, and per event the index,
//!   field and problem; a request with any bad event publishes nothing.
//! - Namespace records through the API, and a namespace cycle published
//!   through it: the router sends the event to instance destinations only
//!   and counts it.
//! - Records written straight to Kafka by a stock client, bypassing the API:
//!   poison lands in the dead-letter topic with its reason while good events
//!   keep flowing; a hostile destination record is never routed to.
//! - Destination configuration: header injection, oversized values,
//!   reserved headers, bad URLs, bad filters (`proto::destination`).
//! - SSRF: every spelling of a loopback, private, link-local or metadata
//!   address that URL parsing normalizes, refused by the address guard; and
//!   the deliverer dead-letters such destinations without sending a request.
//!
//! docs/RELIABILITY.md summarizes the corpus.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use proto::{
    EventLimits, FieldError, Registry,
    delivery::{DeliveryMeta, H_EVENT_ID, H_REASON},
    destination::{Destination, DestinationUrl, Owner},
    netguard::Policy,
    topics::Topics,
};
use rdkafka::Message as _;
use serde_json::{Value, json};
use tests::{
    TestBroker, destination, header, http, metric, produce_raw, read_topic, spawn_role, unique, wait_ready, wait_until,
};

const PUBLISH_TOKEN: &str = "bad-input-publisher-token";
const NAMESPACE_TOKEN: &str = "bad-input-namespace-token";
const DEST_TOKEN: &str = "0123456789abcdef";

/// An event of a registered, streamed type with `extra` fields appended.
fn event_with(extra: &str) -> String {
    format!(r#"{{"event_type":"audit_operation","entity_type":"Project","entity_id":6{extra}}}"#)
}

/// What validation must answer for an input.
#[derive(Debug)]
enum Want {
    /// Accepted; the completed bytes contain this text.
    Accepted(&'static str),
    /// Refused with exactly one error, on this field, whose problem
    /// contains this text.
    Refused(&'static str, &'static str),
}

fn deep(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

/// Event validation, shared by the API, the client library and the router.
#[test]
fn event_validation_corpus() {
    use Want::*;
    let mib = 1024 * 1024;
    // Exactly 1 MiB, and one byte more.
    let padded = |total: usize| {
        let base = event_with(r#","pad":"""#);
        event_with(&format!(r#","pad":"{}""#, "x".repeat(total - base.len())))
    };
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        (
            "invalid UTF-8 in a string",
            b"{\"event_type\":\"audit_operation\",\"x\":\"\xff\"}".to_vec(),
            Refused("(event)", "not valid UTF-8 (invalid byte at offset 37)"),
        ),
        ("overlong UTF-8 encoding of '/'", b"{\"a\":\"\xc0\xaf\"}".to_vec(), Refused("(event)", "not valid UTF-8")),
        (
            "UTF-16 text with its byte-order mark",
            [0xfe, 0xff].into_iter().chain("{\"a\":1}".encode_utf16().flat_map(u16::to_be_bytes)).collect(),
            Refused("(event)", "not valid UTF-8 (invalid byte at offset 0)"),
        ),
        (
            "100 000 levels of nesting",
            event_with(&format!(r#","extra":{}"#, deep(100_000))).into_bytes(),
            Refused("(event)", "nests arrays and objects deeper than 64 levels"),
        ),
        (
            "65 levels of nesting",
            event_with(&format!(r#","extra":{}"#, deep(64))).into_bytes(),
            Refused("(event)", "deeper than 64"),
        ),
        (
            "64 levels of nesting (the limit)",
            event_with(&format!(r#","extra":{}"#, deep(63))).into_bytes(),
            Accepted(r#""extra":[[["#),
        ),
        (
            "brackets inside strings do not count",
            event_with(&format!(r#","extra":"{}""#, "[".repeat(1000))).into_bytes(),
            Accepted("[[[["),
        ),
        (
            "1 MiB + 1 byte",
            padded(mib + 1).into_bytes(),
            Refused("(event)", "is 1048577 bytes, more than the limit of 1048576 bytes"),
        ),
        ("exactly 1 MiB", padded(mib).into_bytes(), Accepted(r#""pad":"xxx"#)),
        ("empty", Vec::new(), Refused("(event)", "is empty")),
        ("only whitespace", b" \r\n\t ".to_vec(), Refused("(event)", "is empty")),
        ("a JSON array", format!("[{}]", event_with("")).into_bytes(), Refused("(event)", "must be a JSON object")),
        ("a JSON string", br#""audit_operation""#.to_vec(), Refused("(event)", "must be a JSON object")),
        ("a JSON number", b"42".to_vec(), Refused("(event)", "must be a JSON object")),
        ("JSON null", b"null".to_vec(), Refused("(event)", "must be a JSON object")),
        (
            "a byte-order mark before the object",
            format!("\u{feff}{}", event_with("")).into_bytes(),
            Refused("(event)", "must be a JSON object"),
        ),
        (
            "truncated",
            br#"{"event_type":"audit_operation","entity_type":"#.to_vec(),
            Refused("(event)", "is not valid JSON: EOF while parsing"),
        ),
        ("trailing garbage", format!("{} x", event_with("")).into_bytes(), Refused("(event)", "trailing characters")),
        (
            "two objects without NDJSON",
            format!("{0}{0}", event_with("")).into_bytes(),
            Refused("(event)", "trailing characters"),
        ),
        (
            "a raw NUL inside a string",
            event_with(",\"x\":\"a\u{0}b\"").into_bytes(),
            Refused("(event)", "control character"),
        ),
        ("a single quote string", event_with(",'x':1").into_bytes(), Refused("(event)", "key must be a string")),
        (
            "entity_id as a string",
            br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":"6"}"#.to_vec(),
            Refused("entity_id", "must be an integer, found a string"),
        ),
        (
            "entity_id as a float",
            br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":6.5}"#.to_vec(),
            Refused("entity_id", "6.5 is not a 64-bit integer"),
        ),
        (
            "entity_id beyond i64",
            br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":9223372036854775808}"#.to_vec(),
            Refused("entity_id", "is not a 64-bit integer"),
        ),
        (
            "entity_id null",
            br#"{"event_type":"audit_operation","entity_type":"Project","entity_id":null}"#.to_vec(),
            Refused("entity_id", "must be an integer, found null"),
        ),
        (
            "author_id as a string",
            event_with(r#","author_id":"x""#).into_bytes(),
            Refused("author_id", "must be an integer, found a string"),
        ),
        (
            "author_name as an object",
            event_with(r#","author_name":{}"#).into_bytes(),
            Refused("author_name", "must be a string, found an object"),
        ),
        (
            "details as an array",
            event_with(r#","details":[]"#).into_bytes(),
            Refused("details", "must be an object, found an array"),
        ),
        (
            "details as a string",
            event_with(r#","details":"{}""#).into_bytes(),
            Refused("details", "must be an object, found a string"),
        ),
        (
            "target_details as a number",
            event_with(r#","target_details":5"#).into_bytes(),
            Refused("target_details", "must be a string or an object, found a number"),
        ),
        (
            "target_id as a boolean",
            event_with(r#","target_id":true"#).into_bytes(),
            Refused("target_id", "found a boolean"),
        ),
        (
            "ip_address as a number",
            event_with(r#","ip_address":127"#).into_bytes(),
            Refused("ip_address", "must be a string, found a number"),
        ),
        ("id null", event_with(r#","id":null"#).into_bytes(), Refused("id", "found null")),
        ("id as an object", event_with(r#","id":{"a":1}"#).into_bytes(), Refused("id", "found an object")),
        ("id as a float", event_with(r#","id":1e3"#).into_bytes(), Refused("id", "1e3 is not a 64-bit integer")),
        ("id empty", event_with(r#","id":"""#).into_bytes(), Refused("id", "visible ASCII")),
        ("id with a space", event_with(r#","id":"a b""#).into_bytes(), Refused("id", "visible ASCII")),
        (
            "header injection in id",
            event_with(r#","id":"a\r\nX-Injected: 1""#).into_bytes(),
            Refused("id", "sent as the webhook-id header"),
        ),
        ("non-ASCII id", event_with(r#","id":"é""#).into_bytes(), Refused("id", "visible ASCII")),
        (
            "id of 129 characters",
            event_with(&format!(r#","id":"{}""#, "i".repeat(129))).into_bytes(),
            Refused("id", "1 to 128"),
        ),
        (
            "created_at in words",
            event_with(r#","created_at":"yesterday""#).into_bytes(),
            Refused("created_at", "not an RFC 3339 timestamp"),
        ),
        (
            "created_at on 30 February",
            event_with(r#","created_at":"2022-02-30T00:00:00Z""#).into_bytes(),
            Refused("created_at", "not an RFC 3339 timestamp"),
        ),
        (
            "created_at as Unix seconds",
            event_with(r#","created_at":1700000000"#).into_bytes(),
            Refused("created_at", "found a number"),
        ),
        (
            "event_type missing",
            br#"{"entity_type":"Project","entity_id":6}"#.to_vec(),
            Refused("event_type", "is required"),
        ),
        (
            "entity_type missing",
            br#"{"event_type":"audit_operation","entity_id":6}"#.to_vec(),
            Refused("entity_type", "is required"),
        ),
        (
            "entity_type empty",
            br#"{"event_type":"audit_operation","entity_type":"","entity_id":6}"#.to_vec(),
            Refused("entity_type", "must not be empty"),
        ),
        (
            "unregistered event type",
            br#"{"event_type":"no_such_type","entity_type":"Project","entity_id":6}"#.to_vec(),
            Refused("event_type", r#""no_such_type" is not a registered event type"#),
        ),
        (
            "registered but not streamed",
            br#"{"event_type":"login_failed_with_otp_authentication","entity_type":"User","entity_id":6}"#.to_vec(),
            Refused("event_type", "streamed: false"),
        ),
        (
            "header injection in event_type",
            br#"{"event_type":"audit_operation\r\nX-Injected: 1","entity_type":"Project","entity_id":6}"#.to_vec(),
            Refused("event_type", "is not an event type name"),
        ),
        (
            "event_type in capitals",
            br#"{"event_type":"Audit_Operation","entity_type":"Project","entity_id":6}"#.to_vec(),
            Refused("event_type", "lowercase letters"),
        ),
        (
            "duplicate event_type",
            event_with(r#","event_type":"merge_request_create""#).into_bytes(),
            Refused("(event)", "duplicate field `event_type`"),
        ),
        (
            "duplicate through an escaped key",
            event_with(r#","event\u005ftype":"audit_operation""#).into_bytes(),
            Refused("(event)", "duplicate field `event_type`"),
        ),
        ("duplicate id", event_with(r#","id":"a","id":"b""#).into_bytes(), Refused("(event)", "duplicate field `id`")),
        // Fields the pipeline does not read are the publisher's: kept byte
        // for byte, duplicates included (SPEC §1).
        ("duplicate unknown keys are kept", event_with(r#","x":1,"x":2"#).into_bytes(), Accepted(r#""x":1,"x":2"#)),
        (
            "a known key spelled with an escape",
            br#"{"event\u005ftype":"audit_operation","entity_type":"Project","entity_id":6}"#.to_vec(),
            Accepted(r#""event\u005ftype":"audit_operation""#),
        ),
        (
            "negative ids for non-user actors",
            event_with(r#","author_id":-3"#).into_bytes(),
            Accepted(r#""author_id":-3"#),
        ),
    ];
    assert!(cases.len() >= 50);
    let registry = Registry::embedded();
    let now = time::OffsetDateTime::now_utc();
    for (what, bytes, want) in &cases {
        let got = proto::event::prepare(bytes, &registry, &EventLimits::default(), now);
        match (want, got) {
            (Want::Accepted(text), Ok(p)) => {
                let out = String::from_utf8(p.bytes).unwrap();
                assert!(out.contains(text), "{what}: {text:?} not in {}", &out[..out.len().min(300)]);
            }
            (Want::Refused(field, problem), Err(errors)) => {
                assert_eq!(errors.len(), 1, "{what}: {errors:?}");
                assert_eq!(errors[0].field, *field, "{what}: {errors:?}");
                assert!(errors[0].problem.contains(problem), "{what}: {:?} lacks {problem:?}", errors[0].problem);
            }
            (want, got) => panic!("{what}: wanted {want:?}, got {:?}", got.map(|p| p.id)),
        }
    }
}

/// A producer process with one publishing and one namespace token.
async fn producer(broker: &TestBroker, prefix: &str) -> (tests::Role, String) {
    let api = tests::free_addr();
    let token = |name: &str, secret: &str, right: &str| {
        let hash = producer::auth::hash_token(secret);
        format!(r#"{{name = "{name}", sha256 = "{hash}", rights = ["{right}"]}}"#)
    };
    let tokens =
        format!("[{}, {}]", token("pub", PUBLISH_TOKEN, "publish"), token("ns", NAMESPACE_TOKEN, "namespaces"));
    let role = spawn_role(
        "producer",
        broker,
        prefix,
        &[("AUDITSTREAM_API__LISTEN", api.to_string()), ("AUDITSTREAM_AUTH__TOKENS", tokens)],
    );
    assert!(wait_ready(role.admin, Duration::from_secs(60)).await, "producer not ready");
    (role, format!("http://{api}"))
}

/// Sends a request; returns the status and the JSON answer (`null` when
/// the answer is not JSON).
async fn call(method: &str, url: &str, token: Option<&str>, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let client = http();
    let mut req = client.request(method.parse().unwrap(), url).header("content-type", content_type).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&text).unwrap_or(Value::Null))
}

/// What the API must answer.
struct ApiWant {
    status: u16,
    code: Option<&'static str>,
    /// For `invalid_events`: (index, field, problem text) of every bad event.
    events: Vec<(u64, &'static str, &'static str)>,
}

fn refused(status: u16, code: &'static str) -> ApiWant {
    ApiWant { status, code: Some(code), events: Vec::new() }
}

fn invalid(events: Vec<(u64, &'static str, &'static str)>) -> ApiWant {
    ApiWant { status: 422, code: Some("invalid_events"), events }
}

/// The producer's HTTP API against malformed and hostile requests. Every
/// refused request publishes nothing; only the control requests reach
/// `audit.events`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_api_corpus() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("badapi"));
    broker.create_topics(&prefix, 0).await;
    let (_producer, base) = producer(&broker, &prefix).await;
    let events_url = format!("{base}/api/v1/events");
    let run = unique("r");
    // Ids of events in refused requests: none may reach Kafka.
    let doomed = |n: usize| format!(r#","id":"{run}-doomed-{n}""#);
    let ok = event_with(&doomed(0));
    let json = "application/json";
    let ndjson = "application/x-ndjson";
    let many = |n: usize| format!("[{}]", vec![event_with(&doomed(1)); n].join(","));
    let mib = 1024 * 1024;

    // (what, token, content type, body, answer)
    type Case = (&'static str, Option<&'static str>, &'static str, Vec<u8>, ApiWant);
    let cases: Vec<Case> = vec![
        ("no token", None, json, ok.clone().into_bytes(), refused(401, "unauthenticated")),
        ("an unknown token", Some("not-a-token"), json, ok.clone().into_bytes(), refused(401, "unauthenticated")),
        (
            "a token without the publish right",
            Some(NAMESPACE_TOKEN),
            json,
            ok.clone().into_bytes(),
            refused(403, "forbidden"),
        ),
        ("empty body", Some(PUBLISH_TOKEN), json, Vec::new(), invalid(vec![(0, "(event)", "is empty")])),
        ("empty NDJSON", Some(PUBLISH_TOKEN), ndjson, b"\n\r\n  \n".to_vec(), refused(422, "no_events")),
        (
            "invalid UTF-8",
            Some(PUBLISH_TOKEN),
            json,
            b"{\"event_type\":\"\xfe\"}".to_vec(),
            invalid(vec![(0, "(event)", "not valid UTF-8")]),
        ),
        (
            "invalid UTF-8 inside an array",
            Some(PUBLISH_TOKEN),
            json,
            b"[{\"a\":\"\xfe\"}]".to_vec(),
            refused(400, "invalid_json"),
        ),
        ("a truncated array", Some(PUBLISH_TOKEN), json, b"[{\"a\":1},".to_vec(), refused(400, "invalid_json")),
        (
            "a JSON number",
            Some(PUBLISH_TOKEN),
            json,
            b"42".to_vec(),
            invalid(vec![(0, "(event)", "must be a JSON object")]),
        ),
        (
            "an array of non-objects",
            Some(PUBLISH_TOKEN),
            json,
            br#"[1, "x", null]"#.to_vec(),
            invalid(vec![
                (0, "(event)", "must be a JSON object"),
                (1, "(event)", "must be a JSON object"),
                (2, "(event)", "must be a JSON object"),
            ]),
        ),
        (
            "100 000 levels of nesting",
            Some(PUBLISH_TOKEN),
            json,
            event_with(&format!(r#","x":{}"#, deep(100_000))).into_bytes(),
            invalid(vec![(0, "(event)", "deeper than 64")]),
        ),
        (
            "deep nesting inside an array",
            Some(PUBLISH_TOKEN),
            json,
            format!("[{},{}]", ok, event_with(&format!(r#","x":{}"#, deep(10_000)))).into_bytes(),
            invalid(vec![(1, "(event)", "deeper than 64")]),
        ),
        ("a body over 5 MiB", Some(PUBLISH_TOKEN), json, vec![b' '; 5 * mib + 1], refused(413, "request_too_large")),
        (
            "one event over 1 MiB",
            Some(PUBLISH_TOKEN),
            json,
            event_with(&format!(r#","pad":"{}""#, "x".repeat(mib))).into_bytes(),
            invalid(vec![(0, "(event)", "more than the limit of 1048576 bytes")]),
        ),
        (
            "1001 events in an array",
            Some(PUBLISH_TOKEN),
            json,
            many(1001).into_bytes(),
            refused(413, "too_many_events"),
        ),
        (
            "1001 NDJSON lines",
            Some(PUBLISH_TOKEN),
            ndjson,
            vec![event_with(&doomed(2)); 1001].join("\n").into_bytes(),
            refused(413, "too_many_events"),
        ),
        (
            "NDJSON with one bad line",
            Some(PUBLISH_TOKEN),
            ndjson,
            format!("{}\n{}\n{{\"event_type\":\n", event_with(&doomed(3)), event_with(&doomed(4))).into_bytes(),
            invalid(vec![(2, "(event)", "not valid JSON")]),
        ),
        (
            "NDJSON line holding an array",
            Some(PUBLISH_TOKEN),
            ndjson,
            format!("[{}]\n", event_with(&doomed(5))).into_bytes(),
            invalid(vec![(0, "(event)", "must be a JSON object")]),
        ),
        (
            "one wrongly typed field among good events",
            Some(PUBLISH_TOKEN),
            json,
            format!("[{},{}]", event_with(&doomed(6)), event_with(r#","details":[1]"#)).into_bytes(),
            invalid(vec![(1, "details", "must be an object, found an array")]),
        ),
        (
            "an unregistered type",
            Some(PUBLISH_TOKEN),
            json,
            br#"{"event_type":"no_such_type","entity_type":"Project","entity_id":1}"#.to_vec(),
            invalid(vec![(0, "event_type", "is not a registered event type")]),
        ),
        (
            "header injection in event_type",
            Some(PUBLISH_TOKEN),
            json,
            br#"{"event_type":"audit_operation\r\nX-Injected: 1","entity_type":"Project","entity_id":1}"#.to_vec(),
            invalid(vec![(0, "event_type", "is not an event type name")]),
        ),
        (
            "header injection in id",
            Some(PUBLISH_TOKEN),
            json,
            event_with(r#","id":"x\r\nX-Injected: 1""#).into_bytes(),
            invalid(vec![(0, "id", "visible ASCII")]),
        ),
        (
            "duplicate known keys",
            Some(PUBLISH_TOKEN),
            json,
            event_with(r#","entity_id":7"#).into_bytes(),
            invalid(vec![(0, "(event)", "duplicate field `entity_id`")]),
        ),
        (
            "every field wrong",
            Some(PUBLISH_TOKEN),
            json,
            br#"{"id":[],"entity_id":"x","event_type":7}"#.to_vec(),
            ApiWant {
                status: 422,
                code: Some("invalid_events"),
                events: vec![
                    (0, "id", "found an array"),
                    (0, "entity_id", "found a string"),
                    (0, "event_type", "found a number"),
                    (0, "entity_type", "is required"),
                ],
            },
        ),
        ("GET on the events route", Some(PUBLISH_TOKEN), json, Vec::new(), refused(405, "method_not_allowed")),
    ];
    assert!(cases.len() >= 25);
    for (what, token, content_type, body, want) in cases {
        let method = if what.starts_with("GET") { "GET" } else { "POST" };
        let (status, answer) = call(method, &events_url, token, content_type, body).await;
        assert_eq!(status, want.status, "{what}: {answer}");
        if let Some(code) = want.code {
            assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        }
        if !want.events.is_empty() {
            let reported: Vec<(u64, String, String)> = answer["error"]["events"]
                .as_array()
                .unwrap_or_else(|| panic!("{what}: {answer}"))
                .iter()
                .flat_map(|e| {
                    let index = e["index"].as_u64().unwrap();
                    let errors: Vec<FieldError> = e["errors"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| FieldError::new(f["field"].as_str().unwrap(), f["problem"].as_str().unwrap()))
                        .collect();
                    errors.into_iter().map(move |f| (index, f.field, f.problem))
                })
                .collect();
            assert_eq!(reported.len(), want.events.len(), "{what}: {answer}");
            for (index, field, problem) in &want.events {
                assert!(
                    reported.iter().any(|(i, f, p)| i == index && f == field && p.contains(problem)),
                    "{what}: no error ({index}, {field}, {problem:?}) in {answer}"
                );
            }
        }
    }

    // Controls: good requests of each shape are accepted, CRLF NDJSON too.
    let good = |n: usize| event_with(&format!(r#","id":"{run}-good-{n}""#));
    let controls: Vec<(&str, Vec<u8>, usize)> = vec![
        (json, good(0).into_bytes(), 1),
        (json, format!("[{},{}]", good(1), good(2)).into_bytes(), 2),
        (ndjson, format!("{}\r\n\r\n{}\r\n", good(3), good(4)).into_bytes(), 2),
    ];
    for (content_type, body, n) in controls {
        let (status, answer) = call("POST", &events_url, Some(PUBLISH_TOKEN), content_type, body).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["ids"].as_array().map(Vec::len), Some(n), "{answer}");
    }
    let kafka = broker.kafka(&prefix);
    let published = read_topic(&kafka, &Topics::new(&prefix).events(), 6, Duration::from_secs(10)).await;
    let ids: HashSet<String> =
        published.iter().filter_map(|m| header(m, H_EVENT_ID).map(str::to_owned)).collect::<HashSet<_>>();
    let want: HashSet<String> = (0..5).map(|n| format!("{run}-good-{n}")).collect();
    assert_eq!(ids, want, "only the control events were published");
}

/// Namespace records through the API: bad parents, bad paths, bad keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_api_corpus() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("badns"));
    broker.create_topics(&prefix, 0).await;
    let (_producer, base) = producer(&broker, &prefix).await;
    let ns = |path: &str| format!("{base}/api/v1/namespaces/{path}");
    let body = |v: Value| v.to_string().into_bytes();
    let json = "application/json";
    // (what, path, token, body, status, code, field, problem)
    type Row =
        (&'static str, &'static str, Option<&'static str>, Vec<u8>, u16, &'static str, &'static str, &'static str);
    let cases: Vec<Row> = vec![
        (
            "a project without a parent",
            "project/5",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a/p"})),
            422,
            "invalid",
            "parent",
            "a project needs a parent group or user",
        ),
        (
            "a group under a project",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": {"kind": "project", "id": 1}, "full_path": "a/b"})),
            422,
            "invalid",
            "parent",
            "a group cannot have a project as parent",
        ),
        (
            "a group its own parent",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": {"kind": "group", "id": 2}, "full_path": "a/b"})),
            422,
            "invalid",
            "parent",
            "cannot be its own parent",
        ),
        (
            "a user under a group",
            "user/3",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": {"kind": "group", "id": 1}, "full_path": "u"})),
            422,
            "invalid",
            "parent",
            "a user cannot have a group as parent",
        ),
        (
            "a group under a user",
            "group/4",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": {"kind": "user", "id": 1}, "full_path": "u/g"})),
            422,
            "invalid",
            "parent",
            "a group cannot have a user as parent",
        ),
        (
            "an empty path",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": ""})),
            422,
            "invalid",
            "full_path",
            "slash-separated",
        ),
        (
            "an empty segment",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a//b"})),
            422,
            "invalid",
            "full_path",
            "slash-separated",
        ),
        (
            "a leading slash",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "/a"})),
            422,
            "invalid",
            "full_path",
            "slash-separated",
        ),
        (
            "a newline in the path",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a\nb"})),
            422,
            "invalid",
            "full_path",
            "without control characters",
        ),
        (
            "a path of 1025 characters",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a".repeat(1025)})),
            422,
            "invalid",
            "full_path",
            "1 to 1024",
        ),
        (
            "an unknown field",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a", "owner": 1})),
            422,
            "invalid",
            "(body)",
            "unknown field `owner`",
        ),
        (
            "an unknown parent kind",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": {"kind": "folder", "id": 1}, "full_path": "a"})),
            422,
            "invalid",
            "(body)",
            "unknown variant `folder`",
        ),
        (
            "a parent id as a string",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": {"kind": "group", "id": "1"}, "full_path": "a"})),
            422,
            "invalid",
            "(body)",
            "invalid type",
        ),
        (
            "no full_path",
            "group/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null})),
            422,
            "invalid",
            "(body)",
            "missing field `full_path`",
        ),
        (
            "not JSON",
            "group/2",
            Some(NAMESPACE_TOKEN),
            b"parent=1".to_vec(),
            422,
            "invalid",
            "(body)",
            "expected value",
        ),
        (
            "invalid UTF-8",
            "group/2",
            Some(NAMESPACE_TOKEN),
            b"{\"parent\":null,\"full_path\":\"\xff\"}".to_vec(),
            422,
            "invalid",
            "(body)",
            "invalid unicode",
        ),
        (
            "an unknown kind in the route",
            "folder/2",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a"})),
            404,
            "not_found",
            "",
            "",
        ),
        (
            "a non-integer id",
            "group/abc",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a"})),
            404,
            "not_found",
            "",
            "",
        ),
        (
            "an id beyond i64",
            "group/9223372036854775808",
            Some(NAMESPACE_TOKEN),
            body(json!({"parent": null, "full_path": "a"})),
            404,
            "not_found",
            "",
            "",
        ),
        (
            "a publish-only token",
            "group/2",
            Some(PUBLISH_TOKEN),
            body(json!({"parent": null, "full_path": "a"})),
            403,
            "forbidden",
            "",
            "",
        ),
        ("no token", "group/2", None, body(json!({"parent": null, "full_path": "a"})), 401, "unauthenticated", "", ""),
    ];
    assert!(cases.len() >= 20);
    for (what, path, token, req, status, code, field, problem) in cases {
        let (got, answer) = call("PUT", &ns(path), token, json, req).await;
        assert_eq!(got, status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        if !field.is_empty() {
            let errors = answer["error"]["errors"].as_array().unwrap_or_else(|| panic!("{what}: {answer}"));
            assert_eq!(errors.len(), 1, "{what}: {answer}");
            assert_eq!(errors[0]["field"], field, "{what}: {answer}");
            assert!(errors[0]["problem"].as_str().unwrap().contains(problem), "{what}: {answer}");
        }
    }
    // Nothing refused reached the namespace topic.
    let kafka = broker.kafka(&prefix);
    let written = read_topic(&kafka, &Topics::new(&prefix).namespaces(), 1, Duration::from_secs(3)).await;
    assert!(written.is_empty(), "refused records were written: {}", written.len());
}

/// Destinations each event was routed to, by event id.
async fn routed(kafka: &service::config::KafkaConfig, topics: &Topics, want: usize) -> Vec<(String, String)> {
    read_topic(kafka, &topics.deliveries(), want, Duration::from_secs(3))
        .await
        .iter()
        .filter_map(|m| Some((tests::delivery_event_id(m)?, tests::key(m)?.to_owned())))
        .collect()
}

/// A namespace cycle, built through the API one valid record at a time:
/// events under it go to instance destinations only, and the router counts
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_cycle_routes_to_instance_destinations_only() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("cycle"));
    broker.create_topics(&prefix, 0).await;
    let kafka = broker.kafka(&prefix);
    let topics = Topics::new(&prefix);
    let seed =
        producer::Publisher::new(&kafka, Registry::embedded(), Default::default(), Duration::from_secs(10)).unwrap();
    seed.put_destination(&destination("inst", Owner::Instance, "https://siem.example.com/", DEST_TOKEN)).await.unwrap();
    seed.put_destination(&destination("acme-d", Owner::Group { id: 10 }, "https://acme.example.com/", DEST_TOKEN))
        .await
        .unwrap();
    let (_producer, base) = producer(&broker, &prefix).await;
    let put = |path: &str, parent: Value, full_path: &str| {
        let url = format!("{base}/api/v1/namespaces/{path}");
        let body = json!({"parent": parent, "full_path": full_path}).to_string().into_bytes();
        async move { call("PUT", &url, Some(NAMESPACE_TOKEN), "application/json", body).await }
    };
    // acme (10) > a (11) > b (12) > project p (13); then a moves under b.
    for (path, parent, full_path) in [
        ("group/10", Value::Null, "acme"),
        ("group/11", json!({"kind": "group", "id": 10}), "acme/a"),
        ("group/12", json!({"kind": "group", "id": 11}), "acme/a/b"),
        ("project/13", json!({"kind": "group", "id": 12}), "acme/a/b/p"),
        ("group/11", json!({"kind": "group", "id": 12}), "acme/a"),
    ] {
        let (status, answer) = put(path, parent, full_path).await;
        assert_eq!(status, 200, "{path}: every record is valid on its own: {answer}");
    }
    let run = unique("c");
    let publish = |id: String, entity_type: &str, entity_id: i64, path: &str| {
        let url = format!("{base}/api/v1/events");
        let body = json!({
            "id": id,
            "event_type": "audit_operation",
            "entity_type": entity_type,
            "entity_id": entity_id,
            "entity_path": path,
        })
        .to_string();
        async move { call("POST", &url, Some(PUBLISH_TOKEN), "application/json", body.into_bytes()).await }
    };
    let (in_cycle, control) = (format!("{run}-cycle"), format!("{run}-control"));
    assert_eq!(publish(in_cycle.clone(), "Project", 13, "acme/a/b/p").await.0, 202);
    assert_eq!(publish(control.clone(), "Group", 10, "acme").await.0, 202);

    let router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("g"))]);
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            metric(router.admin, "auditstream_router_events_total{outcome=\"routed\"}").await >= 2.0
        })
        .await
    );
    let deliveries = routed(&kafka, &topics, 3).await;
    let to =
        |id: &str| -> HashSet<&str> { deliveries.iter().filter(|(e, _)| e == id).map(|(_, d)| d.as_str()).collect() };
    assert_eq!(to(&in_cycle), HashSet::from(["inst"]), "the cycle's event goes to instance destinations only");
    assert_eq!(to(&control), HashSet::from(["inst", "acme-d"]), "the group outside the cycle still routes");
    assert_eq!(metric(router.admin, "auditstream_router_root_resolution_total{via=\"cycle\"}").await, 1.0);
}

/// Records a stock Kafka client wrote straight to `audit.events`, bypassing
/// the API: each poison record lands in the dead-letter topic with its
/// reason and original bytes, while good events around them are routed. A
/// hostile destination record written the same way is never routed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_written_straight_to_kafka_is_dead_lettered_and_good_events_flow() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("bypass"));
    broker.create_topics(&prefix, 0).await;
    let kafka = broker.kafka(&prefix);
    let topics = Topics::new(&prefix);
    let seed =
        producer::Publisher::new(&kafka, Registry::embedded(), Default::default(), Duration::from_secs(10)).unwrap();
    seed.put_destination(&destination("inst", Owner::Instance, "https://siem.example.com/", DEST_TOKEN)).await.unwrap();
    // Destination records that validation would refuse, written raw.
    let mut evil =
        serde_json::to_value(destination("evil", Owner::Instance, "https://evil.example.com/", DEST_TOKEN)).unwrap();
    evil["headers"] = json!([{"name": "X-Tenant", "value": "a\r\nX-Injected: 1", "active": true}]);
    let mut javascript =
        serde_json::to_value(destination("js", Owner::Instance, "https://x.example.com/", DEST_TOKEN)).unwrap();
    javascript["url"] = json!("javascript:alert(1)");
    // Rules across fields, which the value types alone do not catch.
    let mut twice =
        serde_json::to_value(destination("twice", Owner::Instance, "https://twice.example.com/", DEST_TOKEN)).unwrap();
    twice["headers"] = json!([
        {"name": "X-Tenant", "value": "a", "active": true},
        {"name": "x-tenant", "value": "b", "active": true},
    ]);
    let mut crowded =
        serde_json::to_value(destination("crowded", Owner::Instance, "https://many.example.com/", DEST_TOKEN)).unwrap();
    crowded["headers"] = (0..=proto::destination::MAX_HEADERS)
        .map(|i| json!({"name": format!("X-H{i}"), "value": "v", "active": true}))
        .collect();
    for (key, record) in [("evil", evil), ("js", javascript), ("twice", twice), ("crowded", crowded)] {
        produce_raw(&kafka, &topics.destinations(), key, record.to_string().as_bytes(), &[]).await;
    }

    let good = |id: &str| {
        format!(r#"{{"id":"{id}","event_type":"audit_operation","entity_type":"Project","entity_id":1}}"#).into_bytes()
    };
    let raw = |text: &str| Some(text.as_bytes().to_vec());
    let with = |id: &str, event_type: &str, entity_id: &str| {
        raw(&format!(r#"{{"id":"{id}","event_type":"{event_type}","entity_type":"Project","entity_id":{entity_id}}}"#))
    };
    let poison: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("a tombstone (no value)", None, "is empty"),
        ("an empty value", Some(Vec::new()), "is empty"),
        ("binary garbage", Some(vec![0x00, 0x9f, 0xff, 0x10]), "not valid UTF-8"),
        ("invalid UTF-8 in JSON", Some(b"{\"id\":\"\xff\"}".to_vec()), "not valid UTF-8"),
        ("not JSON", raw("id=1&event_type=audit_operation"), "must be a JSON object"),
        ("truncated JSON", raw(r#"{"id":"t","event_type":"#), "not valid JSON"),
        (
            "a JSON array of events",
            raw(&format!("[{}]", String::from_utf8(good("in-array")).unwrap())),
            "must be a JSON object",
        ),
        ("100 000 levels of nesting", raw(&format!(r#"{{"id":"d","x":{}}}"#, deep(100_000))), "deeper than 64"),
        ("an unregistered type", with("u", "no_such_type", "1"), "event type \"no_such_type\" is not registered"),
        (
            "header injection in event_type",
            with("h", "audit_operation\\r\\nX-Injected: 1", "1"),
            "event_type: \"audit_operation\\r\\nX-Injected: 1\" is not an event type name",
        ),
        (
            "header injection in id",
            with("i\\r\\nX-Injected: 1", "audit_operation", "1"),
            "id: must be 1 to 128 visible ASCII",
        ),
        (
            "no id (the producer mints one; a bypass has none)",
            raw(r#"{"event_type":"audit_operation","entity_type":"Project","entity_id":1}"#),
            "the event has no id",
        ),
        (
            "duplicate event_type",
            raw(r#"{"id":"k","event_type":"audit_operation","event_type":"x","entity_type":"Project","entity_id":1}"#),
            "duplicate field `event_type`",
        ),
        (
            "entity_id as a string",
            with("s", "audit_operation", "\"1\""),
            "entity_id: must be an integer, found a string",
        ),
    ];
    assert!(poison.len() >= 12);
    let producer = service::kafka::producer(&kafka, Duration::from_secs(10)).unwrap();
    let mut good_ids = Vec::new();
    for (i, (_, payload, _)) in poison.iter().enumerate() {
        let id = format!("good-{i}");
        produce_raw(&kafka, &topics.events(), "Project:1", &good(&id), &[]).await;
        good_ids.push(id);
        let key = format!("poison-{i}");
        service::kafka::produce_durably(
            &producer,
            &topics.events(),
            key.as_bytes(),
            payload.as_deref(),
            &[("origin", b"stock-client".as_slice())],
        )
        .await;
    }
    produce_raw(&kafka, &topics.events(), "Project:1", &good("good-last"), &[]).await;
    good_ids.push("good-last".into());

    let router = spawn_role("router", &broker, &prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("g"))]);
    assert!(wait_ready(router.admin, Duration::from_secs(60)).await);
    let dlq = read_topic(&kafka, &topics.events_dlq(), poison.len(), Duration::from_secs(30)).await;
    assert_eq!(dlq.len(), poison.len(), "every poison record was dead-lettered, once");
    for (i, (what, payload, reason)) in poison.iter().enumerate() {
        let key = format!("poison-{i}");
        let m =
            dlq.iter().find(|m| m.key() == Some(key.as_bytes())).unwrap_or_else(|| panic!("{what}: not dead-lettered"));
        assert_eq!(m.payload().unwrap_or_default(), payload.as_deref().unwrap_or_default(), "{what}: bytes kept");
        assert_eq!(header(m, "origin"), Some("stock-client"), "{what}: original headers kept");
        let got = header(m, H_REASON).unwrap_or_default();
        assert!(got.contains(reason), "{what}: reason {got:?} lacks {reason:?}");
    }
    let deliveries = routed(&kafka, &topics, good_ids.len() + 1).await;
    let ids: HashSet<&str> = deliveries.iter().map(|(e, _)| e.as_str()).collect();
    for id in &good_ids {
        assert!(ids.contains(id.as_str()), "{id} was not routed past the poison");
    }
    let destinations: HashSet<&str> = deliveries.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(destinations, HashSet::from(["inst"]), "the hostile destination records were never loaded");
    assert_eq!(
        metric(router.admin, "auditstream_router_events_total{outcome=\"dead_lettered\"}").await,
        poison.len() as f64
    );
}

/// Destination configuration, as an owner (or the coming destinations API)
/// would send it: each hostile value is refused by the value types on
/// deserialization, or by `Destination::validate`, naming the field.
#[test]
fn destination_config_corpus() {
    let registry = Registry::embedded();
    let base = json!({
        "id": "d-1",
        "owner": {"kind": "group", "id": 9},
        "name": "SIEM",
        "url": "https://siem.example.com/in",
        "verification_token": "0123456789abcdefABCD",
        "headers": [{"name": "X-Tenant", "value": "acme", "active": true}],
        "event_type_filters": {"allow": ["audit_operation"]},
        "namespace_filters": [{"kind": "group", "id": 10}],
    });
    let header = |name: &str, value: &str| json!([{"name": name, "value": value}]);
    /// What the configuration gets: refused when read (text of the serde
    /// error), refused by `validate` (field, problem), or accepted.
    enum Want {
        Unreadable(&'static str),
        Invalid(&'static str, &'static str),
        Valid,
    }
    use Want::*;
    let mut cases: Vec<(String, &str, Value, Want)> = vec![
        (
            "CRLF header injection in a value".into(),
            "headers",
            header("X-A", "v\r\nX-Injected: 1"),
            Unreadable("must not contain control characters"),
        ),
        ("a bare LF in a value".into(), "headers", header("X-A", "v\nX-Injected: 1"), Unreadable("control characters")),
        ("NUL in a value".into(), "headers", header("X-A", "v\u{0}"), Unreadable("control characters")),
        ("DEL in a value".into(), "headers", header("X-A", "v\u{7f}"), Unreadable("control characters")),
        (
            "a C1 control (NEL) in a value".into(),
            "headers",
            header("X-A", "v\u{85}w"),
            Unreadable("control characters"),
        ),
        ("a tab in a value".into(), "headers", header("X-A", "a\tb"), Unreadable("control characters")),
        ("a value of 256 characters".into(), "headers", header("X-A", &"v".repeat(256)), Unreadable("longer than 255")),
        ("a value of 255 characters".into(), "headers", header("X-A", &"v".repeat(255)), Valid),
        // SPEC §5 counts characters, not bytes.
        (
            "a value of 256 two-byte characters".into(),
            "headers",
            header("X-A", &"é".repeat(256)),
            Unreadable("longer than 255"),
        ),
        ("a value of 255 two-byte characters (510 bytes)".into(), "headers", header("X-A", &"é".repeat(255)), Valid),
        (
            "CRLF header injection in a name".into(),
            "headers",
            header("X-A\r\nX-Injected", "1"),
            Unreadable("is not an HTTP header name"),
        ),
        ("a colon in a name".into(), "headers", header("X-A: b", "1"), Unreadable("is not an HTTP header name")),
        ("a space in a name".into(), "headers", header("X A", "1"), Unreadable("is not an HTTP header name")),
        ("an empty name".into(), "headers", header("", "1"), Unreadable("is not an HTTP header name")),
        (
            "a name of 129 characters".into(),
            "headers",
            header(&"n".repeat(129), "1"),
            Unreadable("at most 128 characters"),
        ),
        ("a non-ASCII name".into(), "headers", header("X-Ünïcode", "1"), Unreadable("is not an HTTP header name")),
        (
            "Content-Type may be overridden (SPEC §2)".into(),
            "headers",
            header("Content-Type", "application/cloudevents+json"),
            Valid,
        ),
        (
            "duplicate names, differing in case".into(),
            "headers",
            json!([{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]),
            Invalid("headers[1].name", "appears twice"),
        ),
        (
            "21 headers".into(),
            "headers",
            Value::Array((0..21).map(|i| json!({"name": format!("X-{i}"), "value": "v"})).collect()),
            Invalid("headers", "has 21 headers, more than 20"),
        ),
        ("a header without a value".into(), "headers", json!([{"name": "X-A"}]), Unreadable("missing field `value`")),
        (
            "an unknown header field".into(),
            "headers",
            json!([{"name": "X-A", "value": "1", "secret": true}]),
            Unreadable("unknown field `secret`"),
        ),
        (
            "a token of 15 characters".into(),
            "verification_token",
            json!("0123456789abcde"),
            Unreadable("16 to 24 visible ASCII"),
        ),
        (
            "a token of 25 characters".into(),
            "verification_token",
            json!("0123456789abcdef012345678"),
            Unreadable("16 to 24"),
        ),
        (
            "CRLF in the token".into(),
            "verification_token",
            json!("0123456789abcdef\r\nX: 1"),
            Unreadable("16 to 24 visible ASCII"),
        ),
        ("a space in the token".into(), "verification_token", json!("0123456789 abcdef"), Unreadable("visible ASCII")),
        (
            "a signing secret without whsec_".into(),
            "signing_secret",
            json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Unreadable("must start with whsec_"),
        ),
        (
            "a signing secret that is not base64".into(),
            "signing_secret",
            json!("whsec_!!!!"),
            Unreadable("must be base64"),
        ),
        ("a signing secret of 5 bytes".into(), "signing_secret", json!("whsec_c2hvcnQ="), Unreadable("24 to 64 bytes")),
        (
            "CRLF in the signing secret".into(),
            "signing_secret",
            json!("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\r\n"),
            Unreadable("must be base64"),
        ),
        (
            "a javascript: URL".into(),
            "url",
            json!("javascript:alert(1)"),
            Unreadable(r#"scheme "javascript" is not http or https"#),
        ),
        ("a file: URL".into(), "url", json!("file:///etc/passwd"), Unreadable(r#"scheme "file""#)),
        ("a gopher: URL".into(), "url", json!("gopher://127.0.0.1:6379/_FLUSHALL"), Unreadable(r#"scheme "gopher""#)),
        ("a data: URL".into(), "url", json!("data:text/plain,hi"), Unreadable(r#"scheme "data""#)),
        (
            "a relative URL".into(),
            "url",
            json!("/hooks/audit"),
            Unreadable("is not a URL: relative URL without a base"),
        ),
        ("a URL without a host".into(), "url", json!("http://"), Unreadable("is not a URL: empty host")),
        (
            "credentials in the URL".into(),
            "url",
            json!("https://user:pass@siem.example.com/"),
            Unreadable("must not carry credentials"),
        ),
        (
            "credentials hiding the real host".into(),
            "url",
            json!("http://127.0.0.1:80@evil.example.com/"),
            Unreadable("must not carry credentials"),
        ),
        (
            "a URL of 256 characters".into(),
            "url",
            json!(format!("https://siem.example.com/{}", "a".repeat(231))),
            Unreadable("is 256 characters, more than 255"),
        ),
        (
            "a URL of 255 characters".into(),
            "url",
            json!(format!("https://siem.example.com/{}", "a".repeat(230))),
            Valid,
        ),
        (
            "a space in the host".into(),
            "url",
            json!("https://siem example.com/"),
            Unreadable("must not contain spaces or control characters"),
        ),
        ("a name of 73 characters".into(), "name", json!("n".repeat(73)), Unreadable("must be 1 to 72 characters")),
        ("a newline in the name".into(), "name", json!("SIEM\nX"), Unreadable("without control characters")),
        ("a blank name".into(), "name", json!("   "), Unreadable("must be 1 to 72 characters")),
        ("an id with CRLF".into(), "id", json!("d\r\n1"), Invalid("id", "visible ASCII")),
        ("an id of 65 characters".into(), "id", json!("d".repeat(65)), Invalid("id", "1 to 64")),
        (
            "a group owner with id 0".into(),
            "owner",
            json!({"kind": "group", "id": 0}),
            Invalid("owner", "group id must be positive"),
        ),
        (
            "an owner of unknown kind".into(),
            "owner",
            json!({"kind": "project", "id": 1}),
            Unreadable("unknown variant `project`"),
        ),
        (
            "a user namespace filter".into(),
            "namespace_filters",
            json!([{"kind": "user", "id": 1}]),
            Invalid("namespace_filters[0].kind", "must be group or project"),
        ),
        (
            "6 namespace filters".into(),
            "namespace_filters",
            Value::Array((1..=6).map(|i| json!({"kind": "group", "id": i})).collect()),
            Invalid("namespace_filters", "has 6 filters, more than 5"),
        ),
        (
            "an unregistered type in a filter".into(),
            "event_type_filters",
            json!({"deny": ["no_such_type"]}),
            Invalid("event_type_filters[0]", "is not a registered event type"),
        ),
        (
            "an unknown category in a filter".into(),
            "event_type_filters",
            json!({"allow": ["category:no_such_category"]}),
            Invalid("event_type_filters[0]", "no registered event type has feature_category"),
        ),
        (
            "a category named without its prefix".into(),
            "event_type_filters",
            json!({"allow": ["Compliance Management"]}),
            Invalid("event_type_filters[0]", "write category:<name>"),
        ),
        ("allow and deny at once".into(), "event_type_filters", json!({"allow": [], "deny": []}), Unreadable("")),
        (
            "an unknown category of destination".into(),
            "category",
            json!("amazon_s3"),
            Unreadable("unknown variant `amazon_s3`"),
        ),
        (
            "an unknown top-level field".into(),
            "webhook_url",
            json!("https://elsewhere.example.com/"),
            Unreadable("unknown field `webhook_url`"),
        ),
    ];
    for reserved in proto::destination::RESERVED_HEADERS {
        // Mixed case: the check must not be fooled by it.
        let name: String =
            reserved.chars().enumerate().map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c }).collect();
        cases.push((
            format!("the reserved header {name}"),
            "headers",
            header(&name, "x"),
            Unreadable("set by auditstream"),
        ));
    }
    assert!(cases.len() >= 60);
    for (what, field, value, want) in cases {
        let mut config = base.clone();
        config[field] = value;
        let read = serde_json::from_value::<Destination>(config);
        match (want, read) {
            (Unreadable(text), Err(e)) => assert!(e.to_string().contains(text), "{what}: {e} lacks {text:?}"),
            (Invalid(field, text), Ok(d)) => {
                let errors = d.validate(&registry).expect_err(&what);
                assert_eq!(errors.len(), 1, "{what}: {errors:?}");
                assert_eq!(errors[0].field, field, "{what}: {errors:?}");
                assert!(errors[0].problem.contains(text), "{what}: {errors:?}");
            }
            (Valid, Ok(d)) => {
                assert_eq!(d.validate(&registry), Ok(()), "{what}");
                // What validation accepts, HTTP can carry.
                for h in &d.headers {
                    http::HeaderName::from_bytes(h.name.expose().as_bytes()).expect(&what);
                    http::HeaderValue::from_str(h.value.expose()).expect(&what);
                }
            }
            (Unreadable(_), Ok(_)) => panic!("{what}: accepted"),
            (Invalid(..), Err(e)) | (Valid, Err(e)) => panic!("{what}: unreadable: {e}"),
        }
    }
}

/// The address a URL's host normalizes to, when it is an IP address.
fn host_ip(url: &str) -> Option<IpAddr> {
    let parsed = reqwest::Url::parse(url).ok()?;
    parsed.host_str()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// SSRF: the spellings of special-purpose addresses that URL parsing
/// (WHATWG, as the deliverer's client parses) normalizes — decimal, hex,
/// octal, short, percent-encoded, full-width digits, IPv4-mapped IPv6 —
/// all reach the address guard as the address they mean, and are refused.
/// The URL itself is a valid destination URL: the check happens when the
/// deliverer connects (names resolve then), see the next test.
#[test]
fn ssrf_address_spellings_normalize_to_refused_addresses() {
    let cases: Vec<(&str, &str, &str)> = vec![
        ("http://127.0.0.1/", "127.0.0.1", "loopback"),
        ("http://2130706433/", "127.0.0.1", "loopback"),
        ("http://0x7f000001/", "127.0.0.1", "loopback"),
        ("http://0x7f.0.0.1/", "127.0.0.1", "loopback"),
        ("http://0177.0.0.1/", "127.0.0.1", "loopback"),
        ("http://017700000001/", "127.0.0.1", "loopback"),
        ("http://127.1/", "127.0.0.1", "loopback"),
        ("http://127.0.0.1./", "127.0.0.1", "loopback"),
        ("http://%31%32%37.0.0.1/", "127.0.0.1", "loopback"),
        ("http://\u{ff11}\u{ff12}\u{ff17}.0.0.1/", "127.0.0.1", "loopback"),
        ("http:/\\127.0.0.1/", "127.0.0.1", "loopback"),
        ("http://[::1]/", "::1", "loopback"),
        ("http://[0:0:0:0:0:0:0:1]/", "::1", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "loopback"),
        ("http://[::ffff:7f00:1]/", "::ffff:127.0.0.1", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "link-local (cloud metadata"),
        ("http://2852039166/", "169.254.169.254", "link-local"),
        ("http://0xA9FEA9FE/", "169.254.169.254", "link-local"),
        ("http://0251.0376.0251.0376/", "169.254.169.254", "link-local"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254", "link-local"),
        ("http://[fe80::1]/", "fe80::1", "link-local"),
        ("http://10.0.0.1/", "10.0.0.1", "private"),
        ("http://172.16.0.1/", "172.16.0.1", "private"),
        ("http://192.168.1.1/", "192.168.1.1", "private"),
        ("http://3232235777/", "192.168.1.1", "private"),
        ("http://[::ffff:10.0.0.1]/", "::ffff:10.0.0.1", "private"),
        ("http://[fd00::1]/", "fd00::1", "unique local"),
        ("http://0/", "0.0.0.0", "unspecified"),
        ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("http://[::]/", "::", "unspecified"),
        ("http://100.64.0.1/", "100.64.0.1", "carrier-grade NAT"),
        ("http://255.255.255.255/", "255.255.255.255", "broadcast"),
        ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe", "NAT64"),
        ("http://[2002:7f00:1::]/", "2002:7f00:1::", "6to4"),
    ];
    assert!(cases.len() >= 30);
    let guard = Policy::default();
    let dev = Policy { allowed: vec!["127.0.0.0/8".parse().unwrap()] };
    for (url, ip, why) in cases {
        assert!(DestinationUrl::new(url).is_ok(), "{url} is a valid URL; the guard judges its address");
        let got = host_ip(url).unwrap_or_else(|| panic!("{url}: host is not an IP address"));
        assert_eq!(got, ip.parse::<IpAddr>().unwrap(), "{url} normalizes to {ip}");
        let refusal = guard.check(got).expect_err(url);
        assert!(refusal.contains(why), "{url}: {refusal} lacks {why:?}");
        // An operator's allow-list opens exactly its network.
        let loopback_v4 = ip.starts_with("127.") || ip.starts_with("::ffff:127.");
        assert_eq!(dev.check(got).is_ok(), loopback_v4, "{url} under an allow-list of 127.0.0.0/8");
    }
    // Names are judged when the deliverer resolves them, not here.
    assert_eq!(host_ip("http://localhost/"), None);
    assert_eq!(host_ip("http://169.254.169.254.nip.io/"), None);
    // Public addresses pass (no traffic is sent by this test).
    assert!(guard.check(host_ip("https://93.184.216.34/").unwrap()).is_ok());
}

/// The deliverer's connect-time guard, as a real process: destinations
/// spelling a loopback address every way above, or naming it, are
/// dead-lettered at once as not retryable, and the receiver listening
/// there gets no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deliverer_dead_letters_ssrf_destinations_without_a_request() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("ssrf"));
    broker.create_topics(&prefix, 2).await;
    let kafka = broker.kafka(&prefix);
    let topics = Topics::new(&prefix);
    let (receiver, addr) =
        tests::serve_receiver(vec![receiver::Expected { name: "any".into(), token: DEST_TOKEN.into(), secret: None }])
            .await;
    let port = addr.port();
    let seed =
        producer::Publisher::new(&kafka, Registry::embedded(), Default::default(), Duration::from_secs(10)).unwrap();
    let targets: Vec<(&str, String)> = vec![
        ("plain", format!("http://127.0.0.1:{port}/hook")),
        ("decimal", format!("http://2130706433:{port}/hook")),
        ("hex", format!("http://0x7f.0.0.1:{port}/hook")),
        ("octal", format!("http://0177.0.0.1:{port}/hook")),
        ("short", format!("http://127.1:{port}/hook")),
        ("trailing-dot", format!("http://127.0.0.1.:{port}/hook")),
        ("mapped", format!("http://[::ffff:127.0.0.1]:{port}/hook")),
        ("v6-loopback", format!("http://[::1]:{port}/hook")),
        ("name", format!("http://localhost:{port}/hook")),
    ];
    for (id, url) in &targets {
        seed.put_destination(&destination(id, Owner::Instance, url, DEST_TOKEN)).await.unwrap();
    }
    // The deliverer's defaults: no special-purpose network allowed.
    let deliverer = spawn_role(
        "deliverer",
        &broker,
        &prefix,
        &[
            ("AUDITSTREAM_DELIVERER__GROUP_ID", unique("d")),
            ("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["1s", "2s"]"#.into()),
        ],
    );
    assert!(wait_ready(deliverer.admin, Duration::from_secs(60)).await);
    let producer = service::kafka::producer(&kafka, Duration::from_secs(10)).unwrap();
    for (id, _) in &targets {
        let body = format!(r#"{{"id":"e-{id}","event_type":"audit_operation","entity_type":"Project","entity_id":1}}"#);
        let meta = DeliveryMeta::new(id, &format!("e-{id}"), "audit_operation").to_headers();
        let headers: Vec<(&str, &[u8])> = meta.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        service::kafka::produce_durably(
            &producer,
            &topics.deliveries(),
            id.as_bytes(),
            Some(body.as_bytes()),
            &headers,
        )
        .await;
    }
    let dlq = read_topic(&kafka, &topics.deliveries_dlq(), targets.len(), Duration::from_secs(30)).await;
    assert_eq!(dlq.len(), targets.len());
    for (id, url) in &targets {
        let m = dlq.iter().find(|m| tests::key(m) == Some(*id)).unwrap_or_else(|| panic!("{url}: not dead-lettered"));
        let reason = header(m, H_REASON).unwrap_or_default();
        assert!(reason.starts_with("not retryable") && reason.contains("loopback"), "{url}: {reason}");
        let meta = tests::delivery_meta(m).unwrap();
        assert_eq!(meta.attempt, 1, "{url}: refused on the first attempt, not retried");
    }
    assert!(receiver.received().is_empty(), "a refused destination was reached");
    assert_eq!(receiver.stats(), receiver::Stats::default());
}
