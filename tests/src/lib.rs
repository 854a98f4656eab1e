//! The end-to-end harness: a broker (the real one named by
//! `AUDITSTREAM_TEST_BROKERS`, else librdkafka's mock cluster), fresh topic
//! prefixes and groups per test, free loopback ports, and the real
//! `auditstream` binary started as child processes.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use proto::topics::Topics;
use rdkafka::{message::OwnedMessage, mocking::MockCluster, producer::DefaultProducerContext};
use service::config::KafkaConfig;

/// The environment variable naming a real broker for tests.
pub const BROKERS_ENV: &str = "AUDITSTREAM_TEST_BROKERS";

/// The real broker's bootstrap servers, when `AUDITSTREAM_TEST_BROKERS`
/// names one (set and not empty).
pub fn real_brokers() -> Option<String> {
    std::env::var(BROKERS_ENV).ok().filter(|b| !b.is_empty())
}

/// A broker for one test.
pub struct TestBroker {
    brokers: String,
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl TestBroker {
    /// The real broker when `AUDITSTREAM_TEST_BROKERS` is set, else a fresh
    /// mock cluster.
    pub fn start() -> Self {
        match real_brokers() {
            Some(b) => Self { brokers: b, mock: None },
            None => {
                let mock = MockCluster::new(1).expect("mock cluster starts");
                Self { brokers: mock.bootstrap_servers(), mock: Some(mock) }
            }
        }
    }

    /// Always a mock cluster, for tests that inject broker faults.
    pub fn mock_cluster() -> Self {
        Self::mock_cluster_of(1)
    }

    /// A mock cluster of `brokers` brokers, for faults that take some of
    /// a topic's partitions away and leave the others.
    pub fn mock_cluster_of(brokers: i32) -> Self {
        let mock = MockCluster::new(brokers).expect("mock cluster starts");
        Self { brokers: mock.bootstrap_servers(), mock: Some(mock) }
    }

    /// Bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Whether this is the real broker.
    pub fn is_real(&self) -> bool {
        self.mock.is_none()
    }

    /// The mock cluster, for fault injection.
    pub fn mock(&self) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        self.mock.as_ref()
    }

    /// Kafka settings for a test with its own topic `prefix`.
    pub fn kafka(&self, prefix: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic_prefix: prefix.into(),
            partitions: 2,
            create_topics: false,
            ..KafkaConfig::default()
        }
    }

    /// Creates every topic of `prefix` with `rungs` retry topics.
    pub async fn create_topics(&self, prefix: &str, rungs: usize) {
        let topics = Topics::new(prefix);
        match &self.mock {
            Some(mock) => {
                for (t, _) in topics.all(rungs) {
                    mock.create_topic(&t, 2, 1).expect("mock topic");
                }
            }
            None => {
                service::kafka::ensure_topics(&self.kafka(prefix), &topics.all(rungs)).await.expect("topics created")
            }
        }
    }
}

/// A name no other test uses: `t<pid>-<random>`.
pub fn unique(what: &str) -> String {
    format!("{what}-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A loopback address with a free port (free when asked; tests tolerate
/// the small race).
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address")
}

/// The `auditstream` binary, built beside the test binaries.
///
/// `cargo test -p tests` does not build it (it is another package's
/// binary), so a binary older than a source it was built from would test
/// yesterday's code and pass: this refuses it, naming the newer source.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("auditstream");
    assert!(bin.exists(), "{} is missing: run `cargo build -p auditstream` first (scripts/test does)", bin.display());
    if let Some(source) = newer_source(&bin) {
        panic!(
            "{} is older than {}, one of the sources it is built from: run `cargo build -p auditstream` first (scripts/test does)",
            bin.display(),
            source.display()
        );
    }
    bin
}

/// The first source listed in `bin`'s dep-info (`<bin>.d`, written by
/// cargo beside it: every file of the workspace's crates the binary was
/// built from) that was modified after `bin`. None when there is no
/// dep-info to read, or when the binary is newer than all of it.
pub fn newer_source(bin: &Path) -> Option<PathBuf> {
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok()?;
    let dep_info = std::fs::read_to_string(bin.with_extension("d")).ok()?;
    dep_info_sources(&dep_info).into_iter().find(|source| {
        // A source gone since the build is cargo's to notice, not ours.
        std::fs::metadata(source).and_then(|m| m.modified()).is_ok_and(|modified| modified > built)
    })
}

/// The prerequisites of a Makefile-style dep-info line (`target: a b`),
/// with `\ ` as an escaped space in a path.
fn dep_info_sources(dep_info: &str) -> Vec<PathBuf> {
    let Some(line) = dep_info.lines().next() else { return Vec::new() };
    let Some((_, deps)) = line.split_once(": ") else { return Vec::new() };
    let mut sources = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(' ') => current.push(' '),
                Some(other) => {
                    current.push('\\');
                    current.push(other);
                }
                None => current.push('\\'),
            },
            ' ' => {
                if !current.is_empty() {
                    sources.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        sources.push(PathBuf::from(current));
    }
    sources
}

/// A child process, killed when dropped.
pub struct Process {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Collects a child's output lines on a thread.
fn collect(out: impl std::io::Read + Send + 'static, echo: bool) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if echo {
                eprintln!("{line}");
            }
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}

impl Process {
    /// Starts `auditstream <args>` with `env` (and a quiet log filter).
    /// Its stdout and stderr lines are collected ([`Process::stdout`],
    /// [`Process::stderr`]); stderr is also echoed, for failing tests.
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env("AUDITSTREAM_TELEMETRY__FILTER", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().map(|o| collect(o, false)).unwrap_or_default();
        let stderr = child.stderr.take().map(|o| collect(o, true)).unwrap_or_default();
        Self { name: name.into(), child, stdout, stderr }
    }

    /// The stderr lines (logs) so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The stdout lines so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SIGKILL, no drain.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `deadline` for exit; returns the status.
    pub fn terminate(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_exit(deadline)
    }

    /// Waits up to `deadline` for it to exit; returns the status.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `find` finds something, polling every 100 ms, up to
/// `deadline`; what it found.
pub async fn wait_for<T>(deadline: Duration, mut find: impl FnMut() -> Option<T>) -> Option<T> {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(found) = find() {
            return Some(found);
        }
        if start.elapsed() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` is true, polling, up to `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP client for tests.
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().expect("http client")
}

/// Waits until `http://addr/ready` answers 200.
pub async fn wait_ready(addr: SocketAddr, deadline: Duration) -> bool {
    first_ready(addr, deadline).await.is_some()
}

/// Waits until `http://addr/ready` answers 200 and returns that first
/// answer's body (`{"ready":true,"checks":{...}}`); `None` at `deadline`.
pub async fn first_ready(addr: SocketAddr, deadline: Duration) -> Option<serde_json::Value> {
    let client = http();
    let url = format!("http://{addr}/ready");
    let first = std::sync::Mutex::new(None);
    wait_until(deadline, || {
        let (req, first) = (client.get(&url).send(), &first);
        async move {
            let Ok(r) = req.await else { return false };
            if !r.status().is_success() {
                return false;
            }
            let body = r.bytes().await.ok().and_then(|b| serde_json::from_slice(&b).ok());
            *first.lock().unwrap_or_else(|e| e.into_inner()) = body;
            true
        }
    })
    .await;
    first.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// Writes one raw record and waits for the acknowledgement.
pub async fn produce_raw(kafka: &KafkaConfig, topic: &str, key: &str, payload: &[u8], headers: &[(&str, &[u8])]) {
    let producer = service::kafka::producer(kafka, Duration::from_secs(10)).expect("producer");
    service::kafka::produce_durably(&producer, topic, key.as_bytes(), Some(payload), headers).await;
}

/// Writes one record to `partition` of `topic` with the given timestamp
/// (Unix ms), and waits for the broker's acknowledgement.
pub async fn produce_at(
    kafka: &KafkaConfig,
    topic: &str,
    partition: i32,
    timestamp_ms: i64,
    key: &str,
    payload: &[u8],
) {
    use rdkafka::producer::FutureRecord;
    let producer = service::kafka::producer(kafka, Duration::from_secs(10)).expect("producer");
    let record = FutureRecord::to(topic).partition(partition).timestamp(timestamp_ms).key(key).payload(payload);
    producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("the broker takes the record");
}

/// Starts the reference receiver on a free loopback port, expecting
/// `expected`; returns it and its address. It serves until the test ends.
pub async fn serve_receiver(expected: Vec<receiver::Expected>) -> (receiver::Receiver, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("receiver port");
    let addr = listener.local_addr().expect("receiver address");
    let receiver =
        receiver::Receiver::new(receiver::ReceiverConfig { expected, ..Default::default() }).expect("receiver");
    tokio::spawn(receiver.clone().serve(listener, std::future::pending()));
    (receiver, addr)
}

/// Reads `topic` from the beginning until `want` records arrived or
/// `deadline` passed; returns what was read.
pub async fn read_topic(kafka: &KafkaConfig, topic: &str, want: usize, deadline: Duration) -> Vec<OwnedMessage> {
    read_until(kafka, topic, deadline, |read| read.len() >= want).await
}

/// Reads `topic` from the beginning until `enough` says so of what was
/// read, or `deadline` passed; returns what was read.
pub async fn read_until(
    kafka: &KafkaConfig,
    topic: &str,
    deadline: Duration,
    mut enough: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{Consumer as _, StreamConsumer},
    };
    let consumer: StreamConsumer = service::kafka::reader(kafka, service::kafka::Path::Event).expect("reader");
    let n = service::kafka::partitions(&consumer, topic, Duration::from_secs(20)).await.expect("topic exists");
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + deadline;
    while !enough(&out) {
        match tokio::time::timeout_at(end, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// The offsets `group` committed on `topic`, summed over its partitions
/// (a partition without a commit counts 0): how many records the group
/// finished, when it read from the start.
pub async fn committed(kafka: &KafkaConfig, group: &str, topic: &str) -> i64 {
    use rdkafka::{
        Offset, TopicPartitionList,
        consumer::{Consumer as _, StreamConsumer},
    };
    let mut config = service::kafka::base(kafka);
    config.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create().expect("consumer");
    let n = service::kafka::partitions(&consumer, topic, Duration::from_secs(20)).await.expect("topic exists");
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition(topic, p);
    }
    let found = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
    found
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

/// The value of a record's header.
pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    service::kafka::header_pairs(m)
        .into_iter()
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| std::str::from_utf8(v?).ok())
}

/// A delivery record's destination id: its key.
pub fn key(m: &OwnedMessage) -> Option<&str> {
    rdkafka::Message::key(m).and_then(|k| std::str::from_utf8(k).ok())
}

/// A delivery record's metadata, read as the deliverer reads it: from its
/// key, its headers and, for a fresh delivery (no headers), its event.
pub fn delivery_meta(m: &OwnedMessage) -> Result<proto::delivery::DeliveryMeta, String> {
    use rdkafka::Message as _;
    proto::delivery::DeliveryMeta::read(m.key(), service::kafka::header_pairs(m), m.payload().unwrap_or_default())
}

/// A delivery record's event id, read as the deliverer reads it.
pub fn delivery_event_id(m: &OwnedMessage) -> Option<String> {
    delivery_meta(m).ok().map(|meta| meta.event_id)
}

/// A destination with test defaults.
pub fn destination(
    id: &str,
    owner: proto::destination::Owner,
    url: &str,
    token: &str,
) -> proto::destination::Destination {
    proto::destination::Destination::http(id, owner, id, url, token).expect("valid test destination")
}

/// A role of the real binary, with its admin address.
pub struct Role {
    /// The process.
    pub process: Process,
    /// Its admin address (`/ready`, `/metrics`).
    pub admin: SocketAddr,
}

/// Starts `auditstream <role>` on `broker` with topic `prefix`, a free admin
/// port, a short session timeout, and `extra` settings.
pub fn spawn_role(role: &str, broker: &TestBroker, prefix: &str, extra: &[(&str, String)]) -> Role {
    let admin = free_addr();
    let mut env = vec![
        ("AUDITSTREAM_KAFKA__BROKERS", broker.brokers().to_owned()),
        ("AUDITSTREAM_KAFKA__TOPIC_PREFIX", prefix.to_owned()),
        ("AUDITSTREAM_KAFKA__CREATE_TOPICS", "false".to_owned()),
        ("AUDITSTREAM_ADMIN__LISTEN", admin.to_string()),
    ];
    match role {
        "router" => env.push(("AUDITSTREAM_ROUTER__SESSION_TIMEOUT", "6s".into())),
        "deliverer" => env.push(("AUDITSTREAM_DELIVERER__SESSION_TIMEOUT", "6s".into())),
        // The relay's group, one per installation: tests share the broker.
        "producer" => env.extend([
            ("AUDITSTREAM_RELAY__GROUP_ID", format!("{prefix}relay")),
            ("AUDITSTREAM_RELAY__SESSION_TIMEOUT", "6s".into()),
        ]),
        _ => {}
    }
    env.extend(extra.iter().cloned());
    Role { process: Process::spawn(role, &[role], &env), admin }
}

/// Sums the samples of a metric whose line starts with `prefix` (name and
/// optionally labels) on an admin server; 0 when absent.
pub async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let Ok(r) = http().get(format!("http://{admin}/metrics")).send().await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// How many series of a metric whose line starts with `prefix` an admin
/// server exports (0 when unreachable).
pub async fn series(admin: SocketAddr, prefix: &str) -> usize {
    let Ok(r) = http().get(format!("http://{admin}/metrics")).send().await else { return 0 };
    r.text().await.unwrap_or_default().lines().filter(|l| l.starts_with(prefix)).count()
}

/// Writes `events` (key, payload) to a topic, all in flight at once.
pub async fn produce_many(kafka: &KafkaConfig, topic: &str, events: &[(String, Vec<u8>)]) {
    use rdkafka::producer::FutureRecord;
    let producer = service::kafka::producer(kafka, Duration::from_secs(30)).expect("producer");
    // `send_result` enqueues at once (`send` would only start when awaited,
    // one record per acknowledgement).
    let mut pending = std::collections::VecDeque::with_capacity(events.len());
    for (k, v) in events {
        let mut record = FutureRecord::to(topic).key(k).payload(v);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break pending.push_back(delivery),
                Err((e, r)) => {
                    assert!(
                        matches!(e.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::QueueFull)),
                        "enqueue failed: {e}"
                    );
                    record = r;
                    // The queue is full: the oldest acknowledgement makes room.
                    let oldest = pending.pop_front().expect("a full queue holds a record");
                    oldest.await.expect("not cancelled").expect("event written");
                }
            }
        }
    }
    for delivery in pending {
        delivery.await.expect("not cancelled").expect("event written");
    }
}

#[cfg(test)]
mod stale_binary {
    use std::{
        fs::{self, File},
        path::PathBuf,
        time::{Duration, SystemTime},
    };

    use super::{dep_info_sources, newer_source, unique};

    /// A scratch directory with a "binary", its dep-info naming two
    /// sources (one with a space in its name), and the three files' times.
    fn built(binary_at: SystemTime, sources_at: [SystemTime; 2]) -> (PathBuf, PathBuf, [PathBuf; 2]) {
        let dir = std::env::temp_dir().join(unique("stale-binary"));
        fs::create_dir_all(&dir).expect("scratch dir");
        let bin = dir.join("auditstream");
        let sources = [dir.join("main.rs"), dir.join("with space.rs")];
        for (source, at) in sources.iter().zip(sources_at) {
            File::create(source).and_then(|f| f.set_modified(at)).expect("source");
        }
        File::create(&bin).and_then(|f| f.set_modified(binary_at)).expect("binary");
        let escaped: Vec<String> = sources.iter().map(|s| s.display().to_string().replace(' ', "\\ ")).collect();
        fs::write(bin.with_extension("d"), format!("{}: {}\n", bin.display(), escaped.join(" "))).expect("dep-info");
        (dir, bin, sources)
    }

    #[test]
    fn dep_info_paths_keep_their_escaped_spaces() {
        let sources = dep_info_sources("/t/auditstream: /w/a.rs /w/with\\ space.rs  /w/b.json\n/w/a.rs:\n");
        assert_eq!(sources, [PathBuf::from("/w/a.rs"), PathBuf::from("/w/with space.rs"), PathBuf::from("/w/b.json")]);
        assert!(dep_info_sources("").is_empty());
        assert!(dep_info_sources("no prerequisites here").is_empty());
    }

    #[test]
    fn a_binary_older_than_a_source_is_refused_and_a_newer_one_is_not() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);

        let (dir, bin, _) = built(now, [now - hour, now - hour]);
        assert_eq!(newer_source(&bin), None);
        fs::remove_dir_all(dir).ok();

        let (dir, bin, sources) = built(now - hour, [now - 2 * hour, now]);
        assert_eq!(newer_source(&bin), Some(sources[1].clone()));
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn without_dep_info_the_binary_is_taken_as_it_is() {
        let now = SystemTime::now();
        let (dir, bin, _) = built(now - Duration::from_secs(3600), [now, now]);
        fs::remove_file(bin.with_extension("d")).expect("remove dep-info");
        assert_eq!(newer_source(&bin), None);
        fs::remove_dir_all(dir).ok();
    }
}
