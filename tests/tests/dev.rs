//! `auditstream dev`: the whole system in one process on its embedded mock
//! cluster, as a new user runs it.

use std::time::Duration;

use tests::{Process, first_ready, free_addr, http, unique, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_delivers_an_example_event_with_verified_token() {
    let (api, receiver, admin) = (free_addr(), free_addr(), free_addr());
    let log = std::env::temp_dir().join(format!("{}.ndjson", unique("receiver-log")));
    let dev = Process::spawn(
        "dev",
        &[
            "dev",
            "--api",
            &api.to_string(),
            "--receiver",
            &receiver.to_string(),
            "--admin",
            &admin.to_string(),
            "--receiver-log",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let ready = first_ready(admin, Duration::from_secs(60)).await;
    let ready = ready.unwrap_or_else(|| panic!("dev never became ready: {:?}", dev.stdout()));
    // Ready means every role got far enough to register all its checks:
    // the first 200 already lists the consumer groups of the router and the
    // deliverer, not only the producer's tables.
    let checks = ready["checks"].as_object().expect("checks");
    for check in [
        "producer",
        "producer.destinations",
        "router",
        "router.namespaces",
        "router.group",
        "deliverer",
        "deliverer.group",
        "deliverer.retry_group.0",
    ] {
        assert_eq!(checks.get(check), Some(&serde_json::Value::Bool(true)), "{check} in {ready}");
    }
    let guide = || {
        let printed = dev.stdout().iter().any(|l| l.contains("curl"));
        async move { printed }
    };
    // stdout is read by a thread: give it a moment to catch up with /ready.
    assert!(wait_until(Duration::from_secs(10), guide).await, "prints what to do next: {:?}", dev.stdout());

    let id = unique("dev-evt");
    let body = include_str!("../../proto/tests/golden/merge_request_create.json").replacen(
        "\"id\": 1,",
        &format!("\"id\": \"{id}\","),
        1,
    );
    let r = http().post(format!("http://{api}/api/v1/events")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 202, "no credentials needed in dev");

    let lines_for = |id: String| {
        let dev = &dev;
        move || {
            let n = dev.stdout().iter().filter(|l| l.starts_with("received") && l.contains(&id)).count();
            async move { n >= 2 }
        }
    };
    assert!(wait_until(Duration::from_secs(30), lines_for(id.clone())).await, "{:?}", dev.stdout());
    let lines: Vec<String> = dev.stdout().into_iter().filter(|l| l.contains(&id)).collect();
    let group = lines.iter().find(|l| l.contains("destination=example-group SIEM")).expect("group destination line");
    assert!(
        group.contains("type=merge_request_create")
            && group.contains("token=verified")
            && group.contains("signature=verified"),
        "{group}"
    );
    let instance =
        lines.iter().find(|l| l.contains("destination=instance log store")).expect("instance destination line");
    assert!(instance.contains("token=verified"), "{instance}");

    // The receiver log: one NDJSON line per request, with headers and body.
    let text = std::fs::read_to_string(&log).unwrap();
    let entries: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mine: Vec<_> = entries.iter().filter(|e| e["body"]["id"] == id.as_str()).collect();
    assert_eq!(mine.len(), 2, "{text}");
    for e in mine {
        assert_eq!(e["headers"]["x-gitlab-audit-event-type"], "merge_request_create");
        assert_eq!(e["body"], serde_json::from_str::<serde_json::Value>(&body).unwrap());
    }
}
