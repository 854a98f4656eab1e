//! The destinations API (SPEC §5) on a real producer process: every rule
//! with the field it names, every authorization path, secrets, and the
//! audit events of changes flowing through the whole pipeline.

use std::{net::SocketAddr, time::Duration};

use proto::namespace::{NamespaceRecord, NamespaceRef};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tests::{Role, TestBroker, free_addr, http, spawn_role, unique, wait_ready, wait_until};

const ADMIN: &str = "admin-token-for-tests";
const ACME_OWNER: &str = "acme-owner-token";
const BETA_OWNER: &str = "beta-owner-token";
const PUBLISHER: &str = "publisher-only-token";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEXT_SECRET: &str = "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB";

struct Api {
    broker: TestBroker,
    prefix: String,
    producer: Role,
    base: String,
    client: reqwest::Client,
}

/// acme (100) > sub (101) > project 102; beta (200) > project 201.
async fn start(extra: &[(&str, String)]) -> Api {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("dest"));
    // The deliverers here use the default ladder: seven retry rungs, each
    // consumed (and waited for by /ready) on its own.
    broker.create_topics(&prefix, 7).await;
    let kafka = broker.kafka(&prefix);
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    let rec = |parent, path: &str| NamespaceRecord { parent, full_path: path.into() };
    seed.put_namespace(NamespaceRef::group(100), Some(&rec(None, "acme"))).await.unwrap();
    seed.put_namespace(NamespaceRef::group(101), Some(&rec(Some(NamespaceRef::group(100)), "acme/sub"))).await.unwrap();
    seed.put_namespace(NamespaceRef::project(102), Some(&rec(Some(NamespaceRef::group(101)), "acme/sub/p")))
        .await
        .unwrap();
    seed.put_namespace(NamespaceRef::group(200), Some(&rec(None, "beta"))).await.unwrap();
    seed.put_namespace(NamespaceRef::project(201), Some(&rec(Some(NamespaceRef::group(200)), "beta/p"))).await.unwrap();

    let token = |name: &str, t: &str, extra: &str| {
        format!(r#"{{name = "{name}", sha256 = "{}", {extra}}}"#, producer::auth::hash_token(t))
    };
    let tokens = format!(
        "[{}, {}, {}, {}]",
        token("admin", ADMIN, r#"rights = ["instance_admin", "publish"], user_id = 7"#),
        token("acme-owner", ACME_OWNER, "owner_of = [100]"),
        token("beta-owner", BETA_OWNER, "owner_of = [200]"),
        token("publisher", PUBLISHER, r#"rights = ["publish"]"#),
    );
    let api = free_addr();
    let mut env = vec![
        ("AUDITSTREAM_API__LISTEN", api.to_string()),
        ("AUDITSTREAM_AUTH__TOKENS", tokens),
        ("AUDITSTREAM_API__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
        ("AUDITSTREAM_TELEMETRY__FILTER", "debug,rdkafka=warn,librdkafka=warn,hyper=warn,h2=warn".into()),
    ];
    env.extend(extra.iter().cloned());
    let producer = spawn_role("producer", &broker, &prefix, &env);
    assert!(wait_ready(producer.admin, Duration::from_secs(60)).await, "producer not ready");
    Api { broker, prefix, producer, base: format!("http://{api}/api/v1"), client: http() }
}

impl Api {
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        (status, serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null))
    }

    async fn create(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }
}

fn fields(body: &Value) -> Vec<String> {
    body["error"]["errors"]
        .as_array()
        .map(|a| a.iter().map(|e| e["field"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

fn receiver_url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}/{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_read_update_delete() {
    let api = start(&[]).await;
    let url = receiver_url(free_addr(), "in");
    let (status, created) = api.create("/instance/destinations", ADMIN, json!({ "name": "SIEM", "url": url })).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let token = created["verification_token"].as_str().unwrap();
    assert_eq!(token.len(), 24, "a token is generated when none is given");
    assert!(token.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(created["active"], true);
    assert_eq!(created["category"], "http");

    let (status, read) = api.call(Method::GET, &format!("/instance/destinations/{id}"), Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read["verification_token"], created["verification_token"], "shown to those who manage it");
    let (_, list) = api.call(Method::GET, "/instance/destinations", Some(ADMIN), None).await;
    assert_eq!(list["destinations"].as_array().unwrap().len(), 1);

    let (status, updated) = api
        .call(
            Method::PATCH,
            &format!("/instance/destinations/{id}"),
            Some(ADMIN),
            Some(json!({ "name": "SIEM 2", "active": false })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["name"], "SIEM 2");
    assert_eq!(updated["active"], false);
    let (status, refused) = api
        .call(
            Method::PATCH,
            &format!("/instance/destinations/{id}"),
            Some(ADMIN),
            Some(json!({ "verification_token": "x".repeat(20) })),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&refused), ["verification_token"], "the token cannot change after creation");

    let (status, _) = api.call(Method::DELETE, &format!("/instance/destinations/{id}"), Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api.call(Method::GET, &format!("/instance/destinations/{id}"), Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_names_its_field() {
    let api = start(&[]).await;
    let good = || json!({ "name": "d", "url": receiver_url(free_addr(), "x") });
    let with = |k: &str, v: Value| {
        let mut b = good();
        b[k] = v;
        b
    };
    let headers = |n: usize| Value::Array((0..n).map(|i| json!({ "name": format!("X-H{i}"), "value": "v" })).collect());
    let group = |id: i64| json!({ "kind": "group", "id": id });
    let cases: Vec<(&str, Value, &str)> = vec![
        ("token too short", with("verification_token", json!("a".repeat(15))), "verification_token"),
        ("token too long", with("verification_token", json!("a".repeat(25))), "verification_token"),
        ("21 headers", with("headers", headers(21)), "headers"),
        ("header name not a token", with("headers", json!([{ "name": "X Bad", "value": "v" }])), "headers[0].name"),
        (
            "header set by the system",
            with("headers", json!([{ "name": "X-Gitlab-Event-Streaming-Token", "value": "v" }])),
            "headers[0].name",
        ),
        (
            "header value with a newline",
            with("headers", json!([{ "name": "X-Ok", "value": "a\r\nInjected: 1" }])),
            "headers[0].value",
        ),
        (
            "header value too long",
            with("headers", json!([{ "name": "X-Ok", "value": "v".repeat(256) }])),
            "headers[0].value",
        ),
        (
            "header value of 256 characters, non-ASCII",
            with("headers", json!([{ "name": "X-Ok", "value": "é".repeat(256) }])),
            "headers[0].value",
        ),
        (
            "duplicate header",
            with("headers", json!([{ "name": "X-A", "value": "1" }, { "name": "x-a", "value": "2" }])),
            "headers[1].name",
        ),
        (
            "6 namespace filters",
            with("namespace_filters", Value::Array((0..6).map(|_| group(101)).collect())),
            "namespace_filters",
        ),
        (
            "filter outside the group",
            with("namespace_filters", json!([{ "kind": "project", "id": 201 }])),
            "namespace_filters[0]",
        ),
        ("filter that does not exist", with("namespace_filters", json!([group(999)])), "namespace_filters[0]"),
        (
            "unknown event type",
            with("event_type_filters", json!({ "allow": ["no_such_type"] })),
            "event_type_filters[0]",
        ),
        (
            "unknown category",
            with("event_type_filters", json!({ "deny": ["category:nothing"] })),
            "event_type_filters[0]",
        ),
        ("ftp url", with("url", json!("ftp://example.com/x")), "url"),
        ("url too long", with("url", json!(format!("http://127.0.0.1/{}", "a".repeat(250)))), "url"),
        ("url with credentials", with("url", json!("http://user:pw@127.0.0.1/")), "url"),
        ("private address", with("url", json!("http://10.0.0.1/in")), "url"),
        ("cloud metadata", with("url", json!("http://169.254.169.254/latest/meta-data")), "url"),
        ("IPv6 loopback (not allow-listed)", with("url", json!("http://[::1]/in")), "url"),
        ("IPv4-mapped private", with("url", json!("http://[::ffff:192.168.0.1]/in")), "url"),
        ("name too long", with("name", json!("n".repeat(73))), "name"),
        ("name missing", json!({ "url": "http://127.0.0.1/x" }), "name"),
        ("url missing", json!({ "name": "d" }), "url"),
        ("category not yet supported", with("category", json!("amazon_s3")), "category"),
        ("category that does not exist", with("category", json!("carrier_pigeon")), "category"),
        ("bad signing secret", with("signing_secret", json!("not-a-secret")), "signing_secret"),
        ("unknown field", with("colour", json!("red")), "(body)"),
        ("wrong type", with("active", json!("yes")), "(body)"),
    ];
    for (what, body, field) in cases {
        let (status, answer) = api.create("/groups/100/destinations", ACME_OWNER, body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {answer}");
        assert!(fields(&answer).iter().any(|f| f == field), "{what}: expected {field} in {answer}");
    }
    // Nothing was created by any of them.
    let (_, list) = api.call(Method::GET, "/groups/100/destinations", Some(ACME_OWNER), None).await;
    assert_eq!(list["destinations"], json!([]));
    // A category entry and an in-group filter are fine.
    let ok = json!({ "name": "ok", "url": "http://127.0.0.1:9/x", "event_type_filters": { "allow": ["category:compliance_management", "audit_operation"] }, "namespace_filters": [{ "kind": "project", "id": 102 }, group(101)] });
    let (status, answer) = api.create("/groups/100/destinations", ACME_OWNER, ok).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    // An update of the URL is checked as a create's is, and a refused one
    // changes nothing.
    let one = format!("/groups/100/destinations/{}", answer["id"].as_str().unwrap());
    for private in ["http://10.0.0.1/in", "http://169.254.169.254/latest/meta-data"] {
        let (status, refused) = api.call(Method::PATCH, &one, Some(ACME_OWNER), Some(json!({ "url": private }))).await;
        assert_eq!((status, fields(&refused)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["url".to_owned()]), "{refused}");
    }
    let (_, kept) = api.call(Method::GET, &one, Some(ACME_OWNER), None).await;
    assert_eq!(kept["url"], "http://127.0.0.1:9/x");
    // Limits count characters, not bytes: 200 "é" are 400 bytes.
    let wide = json!({ "name": "é".repeat(72), "url": format!("http://127.0.0.1:9/{}", "é".repeat(200)), "headers": [{ "name": "X-Ok", "value": "é".repeat(200) }] });
    let (status, answer) = api.create("/groups/100/destinations", ACME_OWNER, wide).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_are_resolved_and_every_address_checked() {
    // No allowed networks: loopback is refused, as in production.
    let api = start(&[("AUDITSTREAM_API__ALLOWED_NETWORKS", "[]".into())]).await;
    let body = |url: &str| json!({ "name": "by-name", "url": url });
    let url_problem = |answer: &Value| answer["error"]["errors"][0]["problem"].as_str().unwrap_or("").to_owned();
    // "localhost" is a name, not an address: it is resolved, and its
    // loopback address refused.
    let (status, answer) = api.create("/instance/destinations", ADMIN, body("http://localhost:9/x")).await;
    assert_eq!((status, fields(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["url".to_owned()]), "{answer}");
    assert!(url_problem(&answer).contains("loopback"), "{answer}");
    // A name that does not resolve (".invalid" never does, RFC 6761).
    let (status, answer) = api.create("/instance/destinations", ADMIN, body("http://no-such-host.invalid/x")).await;
    assert_eq!((status, fields(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["url".to_owned()]), "{answer}");
    assert!(url_problem(&answer).contains("\"no-such-host.invalid\" does not resolve"), "{answer}");
    // A public address is accepted (the API does not connect to it), and
    // an update to a name resolving to loopback is refused like a create.
    let (status, created) = api.create("/instance/destinations", ADMIN, body("http://93.184.216.34/x")).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let one = format!("/instance/destinations/{}", created["id"].as_str().unwrap());
    let (status, answer) =
        api.call(Method::PATCH, &one, Some(ADMIN), Some(json!({ "url": "https://localhost/x" }))).await;
    assert_eq!((status, fields(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["url".to_owned()]), "{answer}");
    assert!(url_problem(&answer).contains("loopback"), "{answer}");
    let (_, kept) = api.call(Method::GET, &one, Some(ADMIN), None).await;
    assert_eq!(kept["url"], "http://93.184.216.34/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_top_level_groups_unique_names_and_the_active_limit() {
    let api = start(&[("AUDITSTREAM_API__MAX_ACTIVE_DESTINATIONS_PER_GROUP", "2".into())]).await;
    let body = |name: &str, active: bool| json!({ "name": name, "url": "http://127.0.0.1:9/x", "active": active });
    let (status, answer) = api.create("/groups/101/destinations", ADMIN, body("a", true)).await;
    assert_eq!((status, fields(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["group_id".to_owned()]), "subgroup");
    let (status, answer) = api.create("/groups/555/destinations", ADMIN, body("a", true)).await;
    assert_eq!(
        (status, fields(&answer)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["group_id".to_owned()]),
        "unknown group"
    );

    assert_eq!(api.create("/groups/100/destinations", ADMIN, body("SIEM", true)).await.0, StatusCode::CREATED);
    let (status, answer) = api.create("/groups/100/destinations", ADMIN, body("siem", true)).await;
    assert_eq!(
        (status, fields(&answer)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["name".to_owned()]),
        "names are unique per owner"
    );
    assert_eq!(
        api.create("/groups/200/destinations", ADMIN, body("SIEM", true)).await.0,
        StatusCode::CREATED,
        "another owner may"
    );
    assert_eq!(api.create("/groups/100/destinations", ADMIN, body("second", true)).await.0, StatusCode::CREATED);
    let (status, answer) = api.create("/groups/100/destinations", ADMIN, body("third", true)).await;
    assert_eq!(
        (status, fields(&answer)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["active".to_owned()]),
        "active limit"
    );
    let (status, third) = api.create("/groups/100/destinations", ADMIN, body("third", false)).await;
    assert_eq!(status, StatusCode::CREATED, "inactive ones do not count");
    let id = third["id"].as_str().unwrap();
    let (status, answer) = api
        .call(Method::PATCH, &format!("/groups/100/destinations/{id}"), Some(ADMIN), Some(json!({ "active": true })))
        .await;
    assert_eq!(
        (status, fields(&answer)),
        (StatusCode::UNPROCESSABLE_ENTITY, vec!["active".to_owned()]),
        "activating counts too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_paths() {
    let api = start(&[]).await;
    let body = json!({ "name": "b", "url": "http://127.0.0.1:9/x" });
    let (status, beta) = api.create("/groups/200/destinations", BETA_OWNER, body.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let beta_id = beta["id"].as_str().unwrap();
    let beta_one = format!("/groups/200/destinations/{beta_id}");

    // An owner of acme sees nothing of beta: 404 everywhere, existence hidden.
    for (method, path, body) in [
        (Method::GET, "/groups/200/destinations".to_owned(), None),
        (Method::POST, "/groups/200/destinations".to_owned(), Some(body.clone())),
        (Method::GET, beta_one.clone(), None),
        (Method::PATCH, beta_one.clone(), Some(json!({ "active": false }))),
        (Method::DELETE, beta_one.clone(), None),
    ] {
        let (status, _) = api.call(method.clone(), &path, Some(ACME_OWNER), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    // A group path that is not a group id finds nothing.
    for path in ["/groups/abc/destinations", "/groups/0/destinations", "/groups/-1/destinations"] {
        let (status, answer) = api.call(Method::GET, path, Some(ADMIN), None).await;
        assert_eq!((status, &answer["error"]["code"]), (StatusCode::NOT_FOUND, &json!("not_found")), "{path}");
    }
    // Looking up beta's destination through acme's path does not find it.
    let (status, _) =
        api.call(Method::GET, &format!("/groups/100/destinations/{beta_id}"), Some(ACME_OWNER), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A publisher token manages nothing; no token is 401; owners are not
    // instance admins.
    assert_eq!(api.call(Method::GET, "/groups/200/destinations", Some(PUBLISHER), None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.call(Method::GET, "/instance/destinations", Some(PUBLISHER), None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.call(Method::GET, "/instance/destinations", Some(BETA_OWNER), None).await.0, StatusCode::FORBIDDEN);
    assert_eq!(api.call(Method::GET, "/groups/200/destinations", None, None).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.call(Method::GET, "/groups/200/destinations", Some("wrong-token"), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    // Instance admins manage every group's and the instance's.
    assert_eq!(api.call(Method::GET, &beta_one, Some(ADMIN), None).await.0, StatusCode::OK);
    assert_eq!(api.call(Method::GET, "/instance/destinations", Some(ADMIN), None).await.0, StatusCode::OK);
    // The beta owner still has it, unchanged.
    let (status, still) = api.call(Method::GET, &beta_one, Some(BETA_OWNER), None).await;
    assert_eq!((status, &still["active"]), (StatusCode::OK, &json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_after_create_rotated_and_never_logged() {
    let api = start(&[]).await;
    let token = "tok-0123456789abcdefgh";
    let header_value = "Bearer very-secret-header-value";
    let body = json!({
        "name": "signed", "url": "http://127.0.0.1:9/x", "verification_token": token, "signing_secret": SECRET,
        "headers": [{ "name": "Authorization", "value": header_value }],
    });
    let (status, created) = api.create("/groups/100/destinations", ACME_OWNER, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["signing_secret"], SECRET, "shown once, in the answer that set it");
    assert_eq!(created["headers"][0]["value"], header_value);
    let id = created["id"].as_str().unwrap();
    let path = format!("/groups/100/destinations/{id}");
    let (_, read) = api.call(Method::GET, &path, Some(ACME_OWNER), None).await;
    assert_eq!(read["verification_token"], token);
    assert_ne!(read["signing_secret"], SECRET);
    assert_ne!(read["headers"][0]["value"], header_value);

    let (status, rotated) =
        api.call(Method::PATCH, &path, Some(ACME_OWNER), Some(json!({ "signing_secret": NEXT_SECRET }))).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert!(
        rotated["previous_signing_secret_until"].is_string(),
        "the old secret keeps signing for a while: {rotated}"
    );
    let (_, read) = api.call(Method::GET, &path, Some(ACME_OWNER), None).await;
    assert_ne!(read["signing_secret"], NEXT_SECRET);

    let logs = api.producer.process.stderr().join("\n");
    assert!(logs.contains("producer API listening"), "logs were captured at debug level");
    // Watch the logs for a while (stderr is read by a thread) and stop at the
    // first secret seen.
    let secrets = [token, SECRET, NEXT_SECRET, header_value, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"];
    let leaked = || {
        let logs = api.producer.process.stderr().join("\n");
        let leaked = secrets.iter().any(|s| logs.contains(s));
        async move { leaked }
    };
    assert!(!wait_until(Duration::from_millis(500), leaked).await, "a secret reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_audited_and_reach_routing_within_seconds() {
    let api = start(&[]).await;
    let sink_token = "audit-sink-token-00001";
    let group_token = "group-dest-token-00001";
    let (receiver, addr) = tests::serve_receiver(vec![
        receiver::Expected { name: "sink".into(), token: sink_token.into(), secret: None },
        receiver::Expected { name: "group".into(), token: group_token.into(), secret: None },
    ])
    .await;
    let roles_env = |role: &str| {
        vec![(
            if role == "router" { "AUDITSTREAM_ROUTER__GROUP_ID" } else { "AUDITSTREAM_DELIVERER__GROUP_ID" },
            unique(role),
        )]
    };
    let router = spawn_role("router", &api.broker, &api.prefix, &roles_env("router"));
    let mut deliverer_env = roles_env("deliverer");
    deliverer_env.push(("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()));
    let deliverer = spawn_role("deliverer", &api.broker, &api.prefix, &deliverer_env);
    assert!(
        wait_ready(router.admin, Duration::from_secs(60)).await
            && wait_ready(deliverer.admin, Duration::from_secs(60)).await
    );

    // An instance destination that receives everything, the audit events too.
    let sink = json!({ "name": "audit sink", "url": receiver_url(addr, "sink"), "verification_token": sink_token });
    assert_eq!(api.create("/instance/destinations", ADMIN, sink).await.0, StatusCode::CREATED);
    // Routing learns of a new destination within moments; events routed
    // before that do not reach it. Wait until a probe arrives.
    let mut probes = 0;
    let sink_live = wait_until(Duration::from_secs(30), || {
        probes += 1;
        let client = api.client.clone();
        let url = format!("{}/events", api.base);
        let r = receiver.clone();
        async move {
            let body = json!({ "id": format!("probe-{probes}"), "event_type": "audit_operation", "entity_type": "Instance", "entity_id": 1 });
            client.post(url).bearer_auth(ADMIN).body(body.to_string()).send().await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            r.received().iter().any(|d| d.path == "/sink")
        }
    })
    .await;
    assert!(sink_live, "the audit sink never received a probe");
    let secret_header = "secret-header-value-xyz";
    let group_dest = json!({
        "name": "acme SIEM", "url": receiver_url(addr, "group"), "verification_token": group_token, "active": false,
        "headers": [{ "name": "X-Key", "value": secret_header }],
    });
    let (status, created) = api.create("/groups/100/destinations", ACME_OWNER, group_dest).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap().to_owned();

    // The change events arrive at the instance destination.
    let audit_types = |r: &receiver::Receiver| {
        r.received().iter().filter_map(|d| d.header("x-gitlab-audit-event-type").map(str::to_owned)).collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            let t = audit_types(&receiver);
            async move { t.iter().any(|t| t == "create_group_event_streaming_destination") }
        })
        .await,
        "{:?}",
        audit_types(&receiver)
    );
    let event = receiver
        .received()
        .into_iter()
        .find(|d| d.header("x-gitlab-audit-event-type") == Some("create_group_event_streaming_destination"))
        .unwrap();
    let body: Value = serde_json::from_slice(&event.body).unwrap();
    assert_eq!(body["author_name"], "acme-owner");
    assert_eq!(body["entity_type"], "Group");
    assert_eq!(body["entity_id"], 100);
    assert_eq!(body["entity_path"], "acme");
    assert_eq!(body["target_id"], id.as_str());
    assert!(body["details"]["custom_message"].as_str().unwrap().contains("acme SIEM"));
    let text = String::from_utf8_lossy(&event.body);
    assert!(!text.contains(group_token) && !text.contains(secret_header), "no secret in the audit event");

    // Activate it: routing follows within seconds, and the update is audited
    // naming what changed.
    let (status, _) = api
        .call(
            Method::PATCH,
            &format!("/groups/100/destinations/{id}"),
            Some(ACME_OWNER),
            Some(json!({ "active": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let started = std::time::Instant::now();
    let publish = |n: u32| {
        let client = api.client.clone();
        let url = format!("{}/events", api.base);
        async move {
            let body = json!({ "id": format!("after-{n}"), "event_type": "audit_operation", "entity_type": "Project", "entity_id": 102, "entity_path": "acme/sub/p" });
            client.post(url).bearer_auth(ADMIN).body(body.to_string()).send().await.unwrap().status()
        }
    };
    let mut n = 0;
    let routed = wait_until(Duration::from_secs(30), || {
        n += 1;
        let (send, r) = (publish(n), receiver.clone());
        async move {
            assert_eq!(send.await, StatusCode::ACCEPTED);
            tokio::time::sleep(Duration::from_millis(700)).await;
            r.received().iter().any(|d| d.path == "/group")
        }
    })
    .await;
    assert!(routed, "the activated destination never received events");
    eprintln!("destination change reached delivery within {:?}", started.elapsed());
    let got = receiver.received().into_iter().find(|d| d.path == "/group").unwrap();
    assert_eq!(got.header("x-key"), Some(secret_header), "its custom header is sent");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let t = audit_types(&receiver);
            async move { t.iter().any(|t| t == "update_group_event_streaming_destination") }
        })
        .await
    );
    let update = receiver
        .received()
        .into_iter()
        .find(|d| d.header("x-gitlab-audit-event-type") == Some("update_group_event_streaming_destination"))
        .unwrap();
    let body: Value = serde_json::from_slice(&update.body).unwrap();
    assert!(body["details"]["custom_message"].as_str().unwrap().contains("changed active"), "{body}");

    // Deleting it is audited on the same entity and target.
    let (status, _) = api.call(Method::DELETE, &format!("/groups/100/destinations/{id}"), Some(ACME_OWNER), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let body = audit_event(&receiver, "destroy_group_event_streaming_destination", &id).await;
    assert_eq!(
        (&body["entity_type"], &body["entity_id"], &body["entity_path"]),
        (&json!("Group"), &json!(100), &json!("acme")),
        "{body}"
    );
    assert_eq!(body["author_name"], "acme-owner");
    assert!(body["details"]["custom_message"].as_str().unwrap().starts_with("Deleted event streaming destination"));

    // Every change of an instance destination is audited on the instance.
    let archive = json!({ "name": "archive", "url": receiver_url(addr, "archive"), "active": false });
    let (status, created) = api.create("/instance/destinations", ADMIN, archive).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let archive_id = created["id"].as_str().unwrap().to_owned();
    let one = format!("/instance/destinations/{archive_id}");
    let (status, _) = api.call(Method::PATCH, &one, Some(ADMIN), Some(json!({ "name": "archive 2" }))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.call(Method::DELETE, &one, Some(ADMIN), None).await.0, StatusCode::NO_CONTENT);
    for (event_type, message) in [
        ("create_instance_event_streaming_destination", "Created event streaming destination \"archive\""),
        ("update_instance_event_streaming_destination", "changed name"),
        ("destroy_instance_event_streaming_destination", "Deleted event streaming destination \"archive 2\""),
    ] {
        let body = audit_event(&receiver, event_type, &archive_id).await;
        assert_eq!((&body["entity_type"], &body["entity_id"]), (&json!("Instance"), &json!(1)), "{body}");
        assert_eq!((&body["author_id"], &body["author_name"]), (&json!(7), &json!("admin")), "{body}");
        assert!(body["details"]["custom_message"].as_str().unwrap().contains(message), "{body}");
    }
}

/// Waits for the audit event of `event_type` about destination `target` to
/// reach `receiver`, and returns its body.
async fn audit_event(receiver: &receiver::Receiver, event_type: &str, target: &str) -> Value {
    let find = || {
        receiver
            .received()
            .into_iter()
            .filter(|d| d.header("x-gitlab-audit-event-type") == Some(event_type))
            .filter_map(|d| serde_json::from_slice::<Value>(&d.body).ok())
            .find(|body| body["target_id"] == target)
    };
    tests::wait_for(Duration::from_secs(30), find).await.unwrap_or_else(|| {
        let seen: Vec<_> = receiver
            .received()
            .iter()
            .filter_map(|d| d.header("x-gitlab-audit-event-type").map(str::to_owned))
            .collect();
        panic!("no {event_type} about {target} arrived; saw {seen:?}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_signing_secret_stops_signing_deliveries() {
    let api = start(&[]).await;
    let token = "signed-dest-token-00001";
    let (receiver, addr) =
        tests::serve_receiver(vec![receiver::Expected { name: "signed".into(), token: token.into(), secret: None }])
            .await;

    // Signed, then rotated, so a retiring secret signs beside the current one.
    let body = json!({ "name": "signed", "url": receiver_url(addr, "signed"), "verification_token": token, "signing_secret": SECRET });
    let (status, created) = api.create("/instance/destinations", ADMIN, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let path = format!("/instance/destinations/{}", created["id"].as_str().unwrap());
    let (status, rotated) =
        api.call(Method::PATCH, &path, Some(ADMIN), Some(json!({ "signing_secret": NEXT_SECRET }))).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert!(rotated["previous_signing_secret_until"].is_string(), "{rotated}");

    // Started after the destination exists: their readiness waits until
    // they have read it.
    let router = spawn_role("router", &api.broker, &api.prefix, &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("r"))]);
    let deliverer = spawn_role(
        "deliverer",
        &api.broker,
        &api.prefix,
        &[
            ("AUDITSTREAM_DELIVERER__GROUP_ID", unique("d")),
            ("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
        ],
    );
    assert!(
        wait_ready(router.admin, Duration::from_secs(60)).await
            && wait_ready(deliverer.admin, Duration::from_secs(60)).await
    );
    // Publishes an event and waits for its delivery.
    let deliver = |id: String| {
        let (client, url, r) = (api.client.clone(), format!("{}/events", api.base), receiver.clone());
        async move {
            let body = json!({ "id": id, "event_type": "audit_operation", "entity_type": "Instance", "entity_id": 1 });
            let status = client.post(url).bearer_auth(ADMIN).body(body.to_string()).send().await.unwrap().status();
            assert_eq!(status, StatusCode::ACCEPTED);
            let quoted = format!("\"{id}\"");
            let find = || {
                r.received()
                    .into_iter()
                    .find(|d| d.path == "/signed" && String::from_utf8_lossy(&d.body).contains(&quoted))
            };
            tests::wait_for(Duration::from_secs(20), find).await
        }
    };
    let signed = deliver("signed-1".into()).await.expect("the signed delivery arrived");
    assert_eq!(signed.header("webhook-id"), Some("signed-1"));
    assert_eq!(signed.header("webhook-signature").map(|s| s.split(' ').count()), Some(2), "both secrets sign");

    let (status, removed) = api.call(Method::PATCH, &path, Some(ADMIN), Some(json!({ "signing_secret": null }))).await;
    assert_eq!(status, StatusCode::OK, "{removed}");
    assert_eq!(removed["signing_secret"], Value::Null);
    // The deliverer follows within moments; deliveries made before it
    // learns of the change may still be signed.
    let signature_headers = |d: &receiver::Received| {
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .into_iter()
            .filter(|h| d.header(h).is_some())
            .collect::<Vec<_>>()
    };
    let mut n = 0;
    let unsigned = wait_until(Duration::from_secs(30), || {
        n += 1;
        let delivered = deliver(format!("unsigned-{n}"));
        async move { delivered.await.is_some_and(|d| signature_headers(&d).is_empty()) }
    })
    .await;
    assert!(unsigned, "deliveries are still signed after the secret was removed");
    let last = deliver("unsigned-last".into()).await.expect("delivered");
    assert_eq!(signature_headers(&last), Vec::<&str>::new(), "and they stay unsigned");
    let (_, read) = api.call(Method::GET, &path, Some(ADMIN), None).await;
    assert_eq!((&read["signing_secret"], &read["previous_signing_secret_until"]), (&Value::Null, &Value::Null));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_and_keys_rotate() {
    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
    let keys = |list: &[(&str, &str)]| {
        format!(
            "[{}]",
            list.iter().map(|(id, k)| format!(r#"{{id = "{id}", key = "{k}"}}"#)).collect::<Vec<_>>().join(", ")
        )
    };
    let api = start(&[("AUDITSTREAM_SECRETS__KEYS", keys(&[("k1", K1)]))]).await;
    let token = "sealed-token-000000001";
    let (receiver, addr) =
        tests::serve_receiver(vec![receiver::Expected { name: "sink".into(), token: token.into(), secret: None }])
            .await;
    let header_value = "sealed-header-value";
    let body = json!({
        "name": "sealed", "url": receiver_url(addr, "in"), "verification_token": token, "signing_secret": SECRET,
        "headers": [{ "name": "X-Key", "value": header_value }],
    });
    let (status, created) = api.create("/instance/destinations", ADMIN, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    let kafka = api.broker.kafka(&api.prefix);
    let topic = proto::topics::Topics::new(&api.prefix).destinations();
    let latest = |kafka: service::config::KafkaConfig, topic: String, id: String| async move {
        let records = tests::read_topic(&kafka, &topic, 100, Duration::from_secs(3)).await;
        records
            .iter()
            .rev()
            .find(|m| rdkafka::Message::key(*m) == Some(id.as_bytes()))
            .and_then(|m| rdkafka::Message::payload(m).map(|p| String::from_utf8_lossy(p).into_owned()))
            .unwrap_or_default()
    };
    let stored = latest(kafka.clone(), topic.clone(), id.clone()).await;
    assert!(stored.contains("sealed:v1:k1:"), "{stored}");
    for secret in [token, header_value, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"] {
        assert!(!stored.contains(secret), "a secret is stored in the clear");
    }

    let deliver_with = |group: String, keys_env: String| {
        spawn_role(
            "deliverer",
            &api.broker,
            &api.prefix,
            &[
                ("AUDITSTREAM_DELIVERER__GROUP_ID", group),
                ("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
                ("AUDITSTREAM_SECRETS__KEYS", keys_env),
            ],
        )
    };
    let router = spawn_role(
        "router",
        &api.broker,
        &api.prefix,
        &[("AUDITSTREAM_ROUTER__GROUP_ID", unique("r")), ("AUDITSTREAM_SECRETS__KEYS", keys(&[("k1", K1)]))],
    );
    let mut first = deliver_with(unique("d"), keys(&[("k1", K1)]));
    assert!(
        wait_ready(router.admin, Duration::from_secs(60)).await
            && wait_ready(first.admin, Duration::from_secs(60)).await
    );
    let publish = |n: &str| {
        let (client, url) = (api.client.clone(), format!("{}/events", api.base));
        let body = json!({ "id": n, "event_type": "audit_operation", "entity_type": "Instance", "entity_id": 1 });
        async move { client.post(url).bearer_auth(ADMIN).body(body.to_string()).send().await.unwrap().status() }
    };
    let arrived = |n: &'static str| {
        let r = receiver.clone();
        move || {
            let got = r.received().iter().any(|d| String::from_utf8_lossy(&d.body).contains(n));
            async move { got }
        }
    };
    assert_eq!(publish("sealed-1").await, StatusCode::ACCEPTED);
    assert!(wait_until(Duration::from_secs(30), arrived("sealed-1")).await, "delivered with the opened token");
    assert_eq!(receiver.received()[0].header("x-key"), Some(header_value));

    // Rotation: the new key first, reseal, then a deliverer with only the new key.
    let out = std::process::Command::new(tests::binary())
        .arg("reseal")
        .env("AUDITSTREAM_KAFKA__BROKERS", api.broker.brokers())
        .env("AUDITSTREAM_KAFKA__TOPIC_PREFIX", &api.prefix)
        .env("AUDITSTREAM_SECRETS__KEYS", keys(&[("k2", K2), ("k1", K1)]))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("resealed") && stdout.contains("\"k2\""),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = latest(kafka, topic, id).await;
    assert!(stored.contains("sealed:v1:k2:") && !stored.contains("sealed:v1:k1:"), "{stored}");
    first.process.kill9();
    let second = deliver_with(unique("d"), keys(&[("k2", K2)]));
    assert!(wait_ready(second.admin, Duration::from_secs(60)).await);
    assert_eq!(publish("sealed-2").await, StatusCode::ACCEPTED);
    assert!(
        wait_until(Duration::from_secs(30), arrived("sealed-2")).await,
        "a deliverer with only the new key delivers"
    );
}
