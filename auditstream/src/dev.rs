//! `auditstream dev`: the whole system in one process, on librdkafka's
//! in-process mock cluster unless `--brokers` names a real one, with a
//! reference receiver, a demo namespace tree and two demo destinations.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use proto::{
    destination::{Destination, Owner, SigningSecret},
    namespace::{NamespaceRecord, NamespaceRef},
    topics::Topics,
};
use service::{
    Admin,
    config::{KafkaConfig, LogFormat, TelemetryConfig},
    shutdown, telemetry,
};
use tokio::net::TcpListener;

/// Arguments of `auditstream dev`.
#[derive(clap::Args)]
pub struct DevArgs {
    /// Use this Kafka instead of the embedded mock cluster (HOST:PORT).
    #[arg(long)]
    brokers: Option<String>,
    /// Producer API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    /// Reference receiver address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    receiver: SocketAddr,
    /// Admin address (/live, /ready, /metrics of all roles).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Append every request the receiver gets to this NDJSON file.
    #[arg(long)]
    receiver_log: Option<PathBuf>,
    /// Prefix for every topic name (to share a real broker).
    #[arg(long, default_value = "")]
    topic_prefix: String,
    /// The admin token for the destinations API (instance admin).
    #[arg(long, default_value = DEV_ADMIN_TOKEN)]
    admin_token: String,
}

/// The documented default admin token of `auditstream dev` (not a secret:
/// dev mode only).
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

/// The demo group destination's token.
pub const GROUP_TOKEN: &str = "dev-group-token-00000001";
/// The demo instance destination's token.
pub const INSTANCE_TOKEN: &str = "dev-instance-token-00002";
/// The demo group destination's signing secret (a fixed, public dev key).
pub const GROUP_SECRET: &str = "whsec_ZGV2LW1vZGUtc2lnbmluZy1rZXktbm90LWEtc2VjcmV0";

fn demo_tree() -> Vec<(NamespaceRef, NamespaceRecord)> {
    let rec = |parent: Option<NamespaceRef>, path: &str| NamespaceRecord { parent, full_path: path.into() };
    vec![
        (NamespaceRef::group(1), rec(None, "example-group")),
        (NamespaceRef::group(2), rec(Some(NamespaceRef::group(1)), "example-group/platform")),
        (NamespaceRef::project(24), rec(Some(NamespaceRef::group(1)), "example-group/example-project")),
        (NamespaceRef::project(29), rec(Some(NamespaceRef::group(2)), "example-group/platform/api")),
        (NamespaceRef::user(50), rec(None, "root")),
        (
            NamespaceRef::project(174),
            rec(Some(NamespaceRef::user(50)), "root/test-pipelines-disabled-audit-events-security-policy-project"),
        ),
    ]
}

fn demo_destinations(receiver: SocketAddr) -> anyhow::Result<Vec<Destination>> {
    let url = |path: &str| format!("http://{receiver}/{path}");
    let mut group =
        Destination::http("dev-group-siem", Owner::Group { id: 1 }, "example-group SIEM", &url("group"), GROUP_TOKEN)
            .map_err(anyhow::Error::msg)?;
    group.signing_secret = Some(SigningSecret::new(GROUP_SECRET).map_err(anyhow::Error::msg)?);
    let instance =
        Destination::http("dev-instance-logs", Owner::Instance, "instance log store", &url("instance"), INSTANCE_TOKEN)
            .map_err(anyhow::Error::msg)?;
    Ok(vec![group, instance])
}

/// `auditstream dev`.
pub async fn run(args: DevArgs) -> ExitCode {
    telemetry::init(&TelemetryConfig { format: LogFormat::Pretty, filter: "info,rdkafka=warn,librdkafka=warn".into() });
    match start(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for the {what} on {addr} (choose another with its flag)"))
}

/// Dev mode's destinations live on this machine.
fn loopback() -> anyhow::Result<Vec<proto::netguard::Network>> {
    ["127.0.0.0/8", "::1/128"].iter().map(|n| n.parse().map_err(anyhow::Error::msg)).collect()
}

fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr }
}

async fn start(args: DevArgs) -> anyhow::Result<()> {
    // Bind first: a busy port fails before anything else starts.
    let api = bind(args.api, "producer API (--api)").await?;
    let receiver_listener = bind(args.receiver, "receiver (--receiver)").await?;
    let admin_listener = bind(args.admin, "admin server (--admin)").await?;
    let receiver_addr = reachable(receiver_listener.local_addr()?);
    let api_addr = reachable(api.local_addr()?);
    let admin_addr = reachable(admin_listener.local_addr()?);

    let rungs = deliverer::config::DelivererSettings::default().retry_delays.len();
    let topics = Topics::new(args.topic_prefix.clone());
    // The mock cluster lives as long as this function: everything runs inside.
    let mock;
    let (brokers, embedded) = match &args.brokers {
        Some(b) => (b.clone(), false),
        None => {
            mock = rdkafka::mocking::MockCluster::new(1).context("starting the embedded mock cluster")?;
            for (topic, _) in topics.all(rungs) {
                mock.create_topic(&topic, 4, 1).context("creating a topic on the mock cluster")?;
            }
            (mock.bootstrap_servers(), true)
        }
    };
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        topic_prefix: args.topic_prefix.clone(),
        create_topics: !embedded,
        ..KafkaConfig::default()
    };
    if !embedded {
        service::kafka::ensure_topics(&kafka, &topics.all(rungs)).await.context("creating topics")?;
    }

    let admin = Admin::default();
    let (trigger, shutdown) = shutdown::channel();
    let mut signal = shutdown::on_signal();
    tokio::spawn(async move {
        signal.wait().await;
        trigger.trigger();
    });

    let expected = vec![
        receiver::Expected {
            name: "example-group SIEM".into(),
            token: GROUP_TOKEN.into(),
            secret: Some(SigningSecret::new(GROUP_SECRET).map_err(anyhow::Error::msg)?),
        },
        receiver::Expected { name: "instance log store".into(), token: INSTANCE_TOKEN.into(), secret: None },
    ];
    let receiver = receiver::Receiver::new(receiver::ReceiverConfig {
        expected,
        log_file: args.receiver_log.clone(),
        print: true,
        faults: Default::default(),
    })
    .context("opening --receiver-log")?;
    let mut stop = shutdown.clone();
    let receiver_task = tokio::spawn(receiver.clone().serve(receiver_listener, async move { stop.wait().await }));

    // Seed the demo tree and destinations before the router starts, so its
    // tables hold them when it reports ready.
    let seeder =
        producer::Publisher::new(&kafka, proto::Registry::embedded(), Default::default(), Duration::from_secs(10))?;
    for (of, record) in demo_tree() {
        seeder.put_namespace(of, Some(&record)).await.context("seeding the demo namespace tree")?;
    }
    for d in demo_destinations(receiver_addr)? {
        seeder.put_destination(&d).await.context("seeding the demo destinations")?;
    }

    let dev_telemetry = TelemetryConfig { format: LogFormat::Pretty, filter: String::new() };
    let mut producer_cfg =
        producer::ProducerConfig { kafka: kafka.clone(), telemetry: dev_telemetry.clone(), ..Default::default() };
    producer_cfg.auth.required = false;
    producer_cfg.auth.tokens = vec![producer::config::TokenConfig {
        name: "dev-admin".into(),
        sha256: producer::auth::hash_token(&args.admin_token),
        rights: vec![
            producer::config::Right::Publish,
            producer::config::Right::Namespaces,
            producer::config::Right::InstanceAdmin,
        ],
        owner_of: Vec::new(),
        user_id: Some(1),
    }];
    producer_cfg.api.allowed_networks = loopback()?;
    producer_cfg.api.listen = api_addr;
    producer_cfg.relay.session_timeout = Duration::from_secs(6);
    let mut router_cfg =
        router::RouterConfig { kafka: kafka.clone(), telemetry: dev_telemetry.clone(), ..Default::default() };
    router_cfg.router.session_timeout = Duration::from_secs(6);
    let mut deliverer_cfg =
        deliverer::DelivererConfig { kafka: kafka.clone(), telemetry: dev_telemetry, ..Default::default() };
    deliverer_cfg.deliverer.session_timeout = Duration::from_secs(6);
    deliverer_cfg.deliverer.allowed_networks = loopback()?;

    let admin_token = &args.admin_token;
    let broker_text = if embedded { format!("embedded mock cluster ({brokers})") } else { brokers.clone() };
    let log_text = args
        .receiver_log
        .as_ref()
        .map_or(String::from("not written (use --receiver-log FILE)"), |p| p.display().to_string());
    println!(
        r#"
auditstream dev is starting
  broker         {broker_text}
  producer API   http://{api_addr}/api/v1/events   (no credentials needed in dev)
  receiver       http://{receiver_addr}   (group destination /group, instance destination /instance)
  receiver log   {log_text}
  admin          http://{admin_addr}/ready  /metrics

Demo tree: group 1 example-group > group 2 example-group/platform > project 29;
project 24 example-group/example-project; user 50 root > project 174 (personal).

Manage destinations with the admin token {admin_token}:
  curl -sS http://{api_addr}/api/v1/instance/destinations -H 'Authorization: Bearer {admin_token}'

Publish an example event (delivered to both destinations):
  curl -sS -X POST http://{api_addr}/api/v1/events -H 'Content-Type: application/json' \
    -d '{{"event_type":"merge_request_create","entity_type":"Project","entity_id":24,"entity_path":"example-group/example-project","author_id":1,"author_name":"Administrator","details":{{"custom_message":"Added merge request"}}}}'

Each delivery the receiver takes is printed below as one line. Ctrl-C stops.
"#
    );

    // The roles start after the guide is printed, so /ready never answers
    // 200 before it is on stdout; and the admin server after the roles'
    // `run`s registered their own checks, as they are called.
    let mut producer_task = tokio::spawn(producer::run(producer_cfg, admin.clone(), api, shutdown.clone()));
    let mut router_task = tokio::spawn(router::run(router_cfg, admin.clone(), shutdown.clone()));
    let mut deliverer_task = tokio::spawn(deliverer::run(deliverer_cfg, admin.clone(), shutdown.clone()));
    let admin_task = tokio::spawn(admin.clone().serve(admin_listener, shutdown.clone()));

    let mut wait = shutdown.clone();
    let failed = tokio::select! {
        _ = wait.wait() => None,
        r = &mut producer_task => Some(format!("producer stopped: {r:?}")),
        r = &mut router_task => Some(format!("router stopped: {r:?}")),
        r = &mut deliverer_task => Some(format!("deliverer stopped: {r:?}")),
    };
    let stats = receiver.stats();
    println!("receiver: {} unique, {} duplicates, {} rejected", stats.unique, stats.duplicates, stats.rejected);
    drop(admin_task);
    drop(receiver_task);
    match failed {
        Some(why) => anyhow::bail!(why),
        None => {
            // Let the roles drain before the mock cluster goes away.
            let grace = service::config::ShutdownConfig::default().grace;
            let all = futures_util::future::join3(producer_task, router_task, deliverer_task);
            if tokio::time::timeout(grace, all).await.is_err() {
                eprintln!("some roles did not finish draining within {grace:?}");
            }
            Ok(())
        }
    }
}
