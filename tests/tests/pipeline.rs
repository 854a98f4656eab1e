//! The real binary as three processes (producer, router, deliverer) against
//! the broker, delivering to a real HTTP receiver on loopback.

use std::time::Duration;

use proto::{
    destination::{CustomHeader, EventTypeFilter, HeaderName, HeaderValue, Owner, SigningSecret},
    namespace::{NamespaceRecord, NamespaceRef},
};
use tests::{Process, TestBroker, destination, free_addr, http, unique, wait_ready, wait_until};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GROUP_TOKEN: &str = "e2e-group-token-0000001";
const INSTANCE_TOKEN: &str = "e2e-instance-token-00001";
const PUBLISH_TOKEN: &str = "e2e-publisher-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_deliver_exact_body_and_headers() {
    let broker = TestBroker::start();
    let prefix = format!("{}.", unique("e2e"));
    broker.create_topics(&prefix, 2).await;
    let kafka = broker.kafka(&prefix);

    // The receiver: a real HTTP server on loopback.
    let (receiver, receiver_addr) = tests::serve_receiver(vec![
        receiver::Expected {
            name: "group".into(),
            token: GROUP_TOKEN.into(),
            secret: Some(SigningSecret::new(SECRET).unwrap()),
        },
        receiver::Expected { name: "instance".into(), token: INSTANCE_TOKEN.into(), secret: None },
    ])
    .await;

    // The tree and two destinations.
    let seed =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))
            .unwrap();
    let rec = |parent, path: &str| NamespaceRecord { parent, full_path: path.into() };
    seed.put_namespace(NamespaceRef::group(100), Some(&rec(None, "acme"))).await.unwrap();
    seed.put_namespace(NamespaceRef::group(101), Some(&rec(Some(NamespaceRef::group(100)), "acme/platform")))
        .await
        .unwrap();
    seed.put_namespace(NamespaceRef::project(200), Some(&rec(Some(NamespaceRef::group(101)), "acme/platform/app")))
        .await
        .unwrap();
    let mut group =
        destination("e2e-group", Owner::Group { id: 100 }, &format!("http://{receiver_addr}/g"), GROUP_TOKEN);
    group.signing_secret = Some(SigningSecret::new(SECRET).unwrap());
    group.event_type_filters = EventTypeFilter::Allow(vec!["merge_request_create".into()]);
    group.headers = vec![
        CustomHeader {
            name: HeaderName::new("X-Tenant").unwrap(),
            value: HeaderValue::new("acme").unwrap(),
            active: true,
        },
        CustomHeader { name: HeaderName::new("X-Off").unwrap(), value: HeaderValue::new("no").unwrap(), active: false },
    ];
    seed.put_destination(&group).await.unwrap();
    seed.put_destination(&destination(
        "e2e-instance",
        Owner::Instance,
        &format!("http://{receiver_addr}/i"),
        INSTANCE_TOKEN,
    ))
    .await
    .unwrap();

    // Three processes, configured through the environment.
    let common = [
        ("AUDITSTREAM_KAFKA__BROKERS", broker.brokers().to_owned()),
        ("AUDITSTREAM_KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("AUDITSTREAM_KAFKA__CREATE_TOPICS", "false".to_owned()),
    ];
    let with = |extra: Vec<(&'static str, String)>| common.iter().cloned().chain(extra).collect::<Vec<_>>();
    let (p_admin, r_admin, d_admin, api) = (free_addr(), free_addr(), free_addr(), free_addr());
    let token_hash = producer::auth::hash_token(PUBLISH_TOKEN);
    let _producer = Process::spawn(
        "producer",
        &["producer"],
        &with(vec![
            ("AUDITSTREAM_ADMIN__LISTEN", p_admin.to_string()),
            ("AUDITSTREAM_API__LISTEN", api.to_string()),
            (
                "AUDITSTREAM_AUTH__TOKENS",
                format!(r#"[{{name = "e2e", sha256 = "{token_hash}", rights = ["publish"]}}]"#),
            ),
        ]),
    );
    let _router = Process::spawn(
        "router",
        &["router"],
        &with(vec![
            ("AUDITSTREAM_ADMIN__LISTEN", r_admin.to_string()),
            ("AUDITSTREAM_ROUTER__GROUP_ID", unique("router")),
            ("AUDITSTREAM_ROUTER__SESSION_TIMEOUT", "6s".into()),
        ]),
    );
    let _deliverer = Process::spawn(
        "deliverer",
        &["deliverer"],
        &with(vec![
            ("AUDITSTREAM_ADMIN__LISTEN", d_admin.to_string()),
            ("AUDITSTREAM_DELIVERER__GROUP_ID", unique("deliverer")),
            ("AUDITSTREAM_DELIVERER__SESSION_TIMEOUT", "6s".into()),
            ("AUDITSTREAM_DELIVERER__ALLOWED_NETWORKS", r#"["127.0.0.0/8"]"#.into()),
            ("AUDITSTREAM_DELIVERER__RETRY_DELAYS", r#"["1s", "2s"]"#.into()),
        ]),
    );
    for (name, addr) in [("producer", p_admin), ("router", r_admin), ("deliverer", d_admin)] {
        assert!(wait_ready(addr, Duration::from_secs(60)).await, "{name} not ready");
    }
    // The series the alerts read exist at 0 from the start: increase() and
    // rate() cannot see the first dead letter (or 503) on a series that
    // appears with it.
    for (admin, series) in [
        (p_admin, r#"auditstream_producer_events_total{outcome="unavailable"} 0"#),
        (p_admin, r#"auditstream_producer_rejected_events_total{reason="busy"} 0"#),
        (p_admin, r#"auditstream_producer_destination_audits_total{outcome="dead_lettered"} 0"#),
        (r_admin, r#"auditstream_router_events_total{outcome="dead_lettered"} 0"#),
        (d_admin, r#"auditstream_deliverer_deliveries_total{outcome="dead_lettered"} 0"#),
    ] {
        let text = http().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(text.lines().any(|l| l == series), "{series} missing at start");
    }

    let client = http();
    let url = format!("http://{api}/api/v1/events");
    let unauthenticated = client.post(&url).body("{}").send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);

    // A real payload, with an id of this run, published byte for byte.
    let event_id = unique("evt");
    let golden = include_str!("../../proto/tests/golden/merge_request_create.json")
        .replacen("\"id\": 1,", &format!("\"id\": \"{event_id}\","), 1)
        .replacen("\"entity_id\": 24,", "\"entity_id\": 200,", 1);
    let accepted = client.post(&url).bearer_auth(PUBLISH_TOKEN).body(golden.clone()).send().await.unwrap();
    assert_eq!(accepted.status(), 202, "{}", accepted.text().await.unwrap());
    // Filtered out by the group destination's allow-list: instance only.
    let other_id = unique("evt");
    let other = format!(
        r#"{{"id":"{other_id}","event_type":"audit_operation","entity_type":"Project","entity_id":200,"entity_path":"acme/platform/app"}}"#
    );
    let accepted = client.post(&url).bearer_auth(PUBLISH_TOKEN).body(other).send().await.unwrap();
    assert_eq!(accepted.status(), 202);

    assert!(
        wait_until(Duration::from_secs(60), || {
            let n = receiver.received().len();
            async move { n >= 3 }
        })
        .await,
        "deliveries missing: {:?}",
        receiver.received().iter().map(|r| (&r.path, r.header("x-gitlab-audit-event-type"))).collect::<Vec<_>>()
    );
    // Give a wrongly routed extra delivery the chance to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = receiver.received();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(receiver.stats().rejected, 0);

    let to_group: Vec<_> = got.iter().filter(|r| r.path == "/g").collect();
    assert_eq!(to_group.len(), 1, "group destination gets only merge_request_create");
    let g = to_group[0];
    assert_eq!(g.body, golden.trim().as_bytes(), "the receiver gets the exact bytes published");
    assert_eq!(g.header("content-type"), Some("application/json"));
    assert_eq!(g.header("x-gitlab-event-streaming-token"), Some(GROUP_TOKEN));
    assert_eq!(g.header("x-gitlab-audit-event-type"), Some("merge_request_create"));
    assert_eq!(g.header("x-tenant"), Some("acme"));
    assert_eq!(g.header("x-off"), None, "inactive headers are not sent");
    assert!(g.header("user-agent").is_some_and(|ua| ua.starts_with("auditstream/")));
    assert_eq!(g.header("webhook-id"), Some(event_id.as_str()));
    assert_eq!(g.signature, "verified");

    let to_instance: Vec<_> = got.iter().filter(|r| r.path == "/i").collect();
    assert_eq!(to_instance.len(), 2);
    assert!(to_instance.iter().any(|r| r.body == golden.trim().as_bytes()));
    assert!(to_instance.iter().all(|r| r.header("x-gitlab-event-streaming-token") == Some(INSTANCE_TOKEN)));
    assert!(to_instance.iter().all(|r| r.header("webhook-signature").is_none()), "unsigned destination");
}
