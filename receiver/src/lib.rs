//! The reference receiver: what a destination owner runs to take audit
//! events. It checks the verification token and, when it knows the secret,
//! the Standard Webhooks signature; deduplicates by event `id`; counts
//! unique, duplicate and rejected deliveries; prints one line per delivery
//! and can write every request to an NDJSON log.
//!
//! For tests and chaos runs it injects faults ([`Faults`]): failure
//! statuses (with `Retry-After`), added delay, connection resets, redirects
//! and whole periods of being down. While any fault is configured it closes
//! each connection after one response, so every request meets the faults
//! afresh (a pooled connection would skip the accept-time ones).

use std::{
    collections::HashSet,
    io::{self, Write},
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, Version},
    response::IntoResponse,
    routing::{get, post},
};
use proto::destination::SigningSecret;
use serde::Serialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};

/// A destination this receiver stands in for.
#[derive(Debug, Clone)]
pub struct Expected {
    /// Name printed for its deliveries.
    pub name: String,
    /// Its verification token.
    pub token: String,
    /// Its signing secret, to verify signatures.
    pub secret: Option<SigningSecret>,
}

/// Faults to inject. The default injects none.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Share of requests (0 to 1) answered with `fail_status`.
    pub fail_rate: f64,
    /// The next this-many requests are answered with `fail_status`.
    pub fail_first: u64,
    /// The failure status (503 when 0).
    pub fail_status: u16,
    /// `Retry-After` seconds sent with failures.
    pub retry_after: Option<u64>,
    /// Added before every answer.
    pub delay: Duration,
    /// Share of connections (0 to 1) reset once the client has written to
    /// them.
    pub reset_rate: f64,
    /// The next this-many connections are reset once the client has
    /// written to them.
    pub reset_first: u64,
    /// Every connection is reset for this long after the faults are set.
    pub down_for: Option<Duration>,
    /// Answer every request with `307` to this location.
    pub redirect_to: Option<String>,
}

impl Faults {
    fn any(&self) -> bool {
        self.fail_rate > 0.0
            || self.fail_first > 0
            || !self.delay.is_zero()
            || self.reset_rate > 0.0
            || self.reset_first > 0
            || self.down_for.is_some()
            || self.redirect_to.is_some()
    }
}

struct FaultState {
    faults: Faults,
    since: Instant,
    rng: u64,
    injected: u64,
}

impl FaultState {
    /// A uniform draw in [0, 1) (xorshift; deterministic per run).
    fn draw(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn reset_connection(&mut self) -> bool {
        let f = &mut self.faults;
        let hit = if f.down_for.is_some_and(|d| self.since.elapsed() < d) {
            true
        } else if f.reset_first > 0 {
            f.reset_first -= 1;
            true
        } else {
            let rate = f.reset_rate;
            rate > 0.0 && self.draw() < rate
        };
        self.injected += u64::from(hit);
        hit
    }

    fn fail_request(&mut self) -> Option<(u16, Option<u64>)> {
        let f = &mut self.faults;
        let status = if f.fail_status == 0 { 503 } else { f.fail_status };
        let retry_after = f.retry_after;
        let hit = if f.fail_first > 0 {
            f.fail_first -= 1;
            true
        } else {
            let rate = f.fail_rate;
            rate > 0.0 && self.draw() < rate
        };
        self.injected += u64::from(hit);
        hit.then_some((status, retry_after))
    }
}

/// Connections served: in all, and still open.
#[derive(Default)]
struct Connections {
    served: AtomicU64,
    open: AtomicU64,
}

/// A served connection, counted open until it is dropped.
struct Counted {
    stream: TcpStream,
    connections: Arc<Connections>,
}

impl Counted {
    fn new(stream: TcpStream, connections: Arc<Connections>) -> Self {
        connections.served.fetch_add(1, Ordering::Relaxed);
        connections.open.fetch_add(1, Ordering::Relaxed);
        Self { stream, connections }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.connections.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A listener that resets the connections the faults say to reset (once
/// the client has written to them), and counts the ones it serves.
struct FaultyListener {
    inner: TcpListener,
    faults: Arc<Mutex<FaultState>>,
    connections: Arc<Connections>,
}

impl axum::serve::Listener for FaultyListener {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let reset = self.faults.lock().unwrap_or_else(|e| e.into_inner()).reset_connection();
            if reset {
                // Reset once the client has written (its request, or a TLS
                // hello), as a peer crashing mid-request would: the client
                // then cannot tell whether the request was acted on, and
                // its attempt fails. A reset before the client writes
                // would race the client's write: a client may find such a
                // request unsent and send it on another connection, and a
                // test counting failed attempts would count one or none.
                // Zero linger: closing sends RST.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), stream.readable()).await;
                    let _ = stream.set_zero_linger();
                    drop(stream);
                });
                continue;
            }
            return (Counted::new(stream, self.connections.clone()), addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Receiver settings.
#[derive(Debug, Clone, Default)]
pub struct ReceiverConfig {
    /// The destinations it accepts; a request with another token gets 401.
    pub expected: Vec<Expected>,
    /// Where to append one NDJSON line per request.
    pub log_file: Option<PathBuf>,
    /// Print one line per delivery on stdout.
    pub print: bool,
    /// Faults to inject from the start.
    pub faults: Faults,
}

/// Delivery counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// First deliveries of an (destination, event id).
    pub unique: u64,
    /// Repeats of one already received.
    pub duplicates: u64,
    /// Refused: unknown token or bad signature.
    pub rejected: u64,
    /// Requests and connections that met an injected fault.
    pub faults_injected: u64,
    /// Connections accepted and served (the reset ones not counted).
    pub connections: u64,
    /// Of those, the ones still open.
    pub open_connections: u64,
}

/// One request as received.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    /// Request path.
    pub path: String,
    /// Headers, names lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The raw body.
    #[serde(skip)]
    pub body: Vec<u8>,
    /// Which expected destination the token matched.
    pub destination: Option<String>,
    /// `verified`, `unsigned` or `invalid`.
    pub signature: &'static str,
    /// When the request arrived (Unix milliseconds), for delivery latency.
    pub at_ms: i64,
    /// The HTTP version it came over, e.g. `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
}

impl Received {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Inner {
    stats: Stats,
    seen: HashSet<(String, String)>,
    received: Vec<Received>,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    config: Arc<ReceiverConfig>,
    inner: Arc<Mutex<Inner>>,
    log: Option<Arc<Mutex<std::fs::File>>>,
    faults: Arc<Mutex<FaultState>>,
    connections: Arc<Connections>,
}

impl Receiver {
    /// A receiver with `config`. Fails when the log file cannot be opened.
    pub fn new(config: ReceiverConfig) -> std::io::Result<Self> {
        let log = match &config.log_file {
            Some(path) => Some(Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?))),
            None => None,
        };
        let faults = FaultState {
            faults: config.faults.clone(),
            since: Instant::now(),
            rng: 0x9E37_79B9_7F4A_7C15,
            injected: 0,
        };
        Ok(Self {
            config: Arc::new(config),
            inner: Arc::default(),
            log,
            faults: Arc::new(Mutex::new(faults)),
            connections: Arc::default(),
        })
    }

    fn fault_state(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the faults; `down_for` counts from now.
    pub fn set_faults(&self, faults: Faults) {
        let mut f = self.fault_state();
        f.faults = faults;
        f.since = Instant::now();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counts so far.
    pub fn stats(&self) -> Stats {
        let mut stats = self.lock().stats;
        stats.faults_injected = self.fault_state().injected;
        stats.connections = self.connections.served.load(Ordering::Relaxed);
        stats.open_connections = self.connections.open.load(Ordering::Relaxed);
        stats
    }

    /// Every accepted request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The routes: `POST` anywhere takes a delivery; `GET /stats` reports.
    pub fn router(&self) -> Router {
        Router::new().route("/stats", get(stats)).fallback(post(take)).with_state(self.clone())
    }

    /// Serves on `listener` until `stop` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener =
            FaultyListener { inner: listener, faults: self.faults.clone(), connections: self.connections.clone() };
        axum::serve(listener, self.router()).with_graceful_shutdown(stop).await
    }

    fn match_token(&self, presented: Option<&str>) -> Option<&Expected> {
        let presented = presented?.as_bytes();
        // Check every candidate, so timing does not reveal which matched.
        let mut found = None;
        for e in &self.config.expected {
            if bool::from(e.token.as_bytes().ct_eq(presented)) {
                found = Some(e);
            }
        }
        found
    }
}

async fn stats(State(r): State<Receiver>) -> impl IntoResponse {
    Json(r.stats())
}

fn check_signature(expected: &Expected, headers: &HeaderMap, body: &[u8]) -> &'static str {
    let Some(secret) = &expected.secret else {
        return "unsigned";
    };
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    match (get("webhook-id"), get("webhook-timestamp").and_then(|t| t.parse::<i64>().ok()), get("webhook-signature")) {
        (Some(id), Some(ts), Some(sig)) if proto::signature::verify(secret, sig, id, ts, body) => "verified",
        _ => "invalid",
    }
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The event `id` of a delivery body, read without parsing the rest: a body
/// that a strict parser refuses elsewhere (a lone surrogate escape, a number
/// beyond f64) must still be deduplicated on its id.
fn event_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a serde_json::value::RawValue>,
    }
    let raw = serde_json::from_slice::<IdOnly<'_>>(body).ok()?.id?;
    Some(serde_json::from_str::<String>(raw.get()).unwrap_or_else(|_| raw.get().to_owned()))
}

async fn take(
    State(r): State<Receiver>,
    version: Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let at_ms = now_ms();
    let (delay, failure, redirect, close) = {
        let mut f = r.fault_state();
        let failure = f.fail_request();
        (f.faults.delay, failure, f.faults.redirect_to.clone(), f.faults.any())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut response = if let Some(location) = redirect {
        r.fault_state().injected += 1;
        (StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, location)]).into_response()
    } else if let Some((status, retry_after)) = failure {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = (status, Json(json!({ "status": "injected failure" }))).into_response();
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    } else {
        take_delivery(&r, version, &uri, &headers, &body, at_ms).into_response()
    };
    if close {
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

fn take_delivery(
    r: &Receiver,
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    at_ms: i64,
) -> impl IntoResponse {
    let token = headers.get("x-gitlab-event-streaming-token").and_then(|v| v.to_str().ok());
    let expected = r.match_token(token).cloned();
    let signature = expected.as_ref().map_or("unsigned", |e| check_signature(e, headers, body));
    let header_list: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let event: Option<Value> = serde_json::from_slice(body).ok();
    let id = event_id(body);
    let event_type = headers.get("x-gitlab-audit-event-type").and_then(|v| v.to_str().ok()).unwrap_or("?");
    let accepted = expected.is_some() && signature != "invalid";

    if let Some(log) = &r.log {
        // The exact bytes when they fit on one NDJSON line; otherwise the
        // parsed value (or the text, when it is not JSON).
        let exact = std::str::from_utf8(body)
            .ok()
            .filter(|t| !t.contains(['\n', '\r']))
            .and_then(|t| serde_json::value::RawValue::from_string(t.to_owned()).ok());
        let fallback = || {
            let v = event.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(body).into_owned()));
            serde_json::value::to_raw_value(&v).ok()
        };
        #[derive(Serialize)]
        struct LogLine<'a> {
            received_at_ms: i64,
            path: &'a str,
            headers: std::collections::BTreeMap<&'a str, &'a str>,
            body: Option<Box<serde_json::value::RawValue>>,
            accepted: bool,
        }
        let line = LogLine {
            received_at_ms: at_ms,
            path: uri.path(),
            headers: header_list.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            body: exact.or_else(fallback),
            accepted,
        };
        let line = serde_json::to_string(&line).unwrap_or_default();
        let mut f = log.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(f, "{line}") {
            tracing::warn!(error = %e, "cannot write receiver log");
        }
    }

    let name = expected.as_ref().map_or("unknown".to_owned(), |e| e.name.clone());
    let mut inner = r.lock();
    let (status, verdict) = if !accepted {
        inner.stats.rejected += 1;
        (StatusCode::UNAUTHORIZED, "rejected")
    } else if inner.seen.insert((name.clone(), id.clone().unwrap_or_default())) {
        inner.stats.unique += 1;
        (StatusCode::OK, "new")
    } else {
        inner.stats.duplicates += 1;
        (StatusCode::OK, "duplicate")
    };
    if accepted {
        inner.received.push(Received {
            path: uri.path().to_owned(),
            headers: header_list,
            body: body.to_vec(),
            destination: expected.as_ref().map(|e| e.name.clone()),
            signature,
            at_ms,
            version: format!("{version:?}"),
        });
    }
    drop(inner);
    if r.config.print {
        let token_state = if expected.is_some() { "verified" } else { "REJECTED" };
        println!(
            "received id={} type={event_type} destination={name} token={token_state} signature={signature} ({verdict})",
            id.as_deref().unwrap_or("?"),
        );
    }
    (status, Json(json!({ "status": verdict })))
}

#[cfg(test)]
mod tests {
    //! The receiver on loopback, spoken to in plain HTTP/1.1.

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    const TOKEN: &str = "token-0123456789";
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// POSTs `body` with `headers` and returns the status code.
    async fn post(to: std::net::SocketAddr, headers: &[(&str, String)], body: &str) -> u16 {
        let mut request =
            format!("POST /in HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let mut stream = tokio::net::TcpStream::connect(to).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    #[tokio::test]
    async fn unknown_tokens_and_bad_signatures_are_rejected_401_and_counted() {
        let secret = SigningSecret::new(SECRET).unwrap();
        let expected = vec![
            Expected { name: "plain".into(), token: TOKEN.into(), secret: None },
            Expected { name: "signed".into(), token: "token-signed-0123".into(), secret: Some(secret.clone()) },
        ];
        let r = Receiver::new(ReceiverConfig { expected, ..Default::default() }).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        tokio::spawn(r.clone().serve(listener, std::future::pending()));
        let body = r#"{"id":"e-1","event_type":"audit_operation"}"#;
        let token = |t: &str| ("x-gitlab-event-streaming-token", t.to_owned());

        assert_eq!(post(to, &[token(TOKEN)], body).await, 200);
        assert_eq!(post(to, &[token(TOKEN)], body).await, 200, "a duplicate is still a success");
        assert_eq!(post(to, &[token("token-unknown-000")], body).await, 401);
        assert_eq!(post(to, &[], body).await, 401, "no token");

        let signed = |signature: String| {
            vec![
                token("token-signed-0123"),
                ("webhook-id", "e-1".to_owned()),
                ("webhook-timestamp", "1700000000".to_owned()),
                ("webhook-signature", signature),
            ]
        };
        let good = proto::signature::signature(&[&secret], "e-1", 1_700_000_000, body.as_bytes());
        assert_eq!(post(to, &signed(good.clone()), body).await, 200);
        let other = SigningSecret::new("whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").unwrap();
        let forged = proto::signature::signature(&[&other], "e-1", 1_700_000_000, body.as_bytes());
        assert_eq!(post(to, &signed(forged), body).await, 401, "signed with another secret");
        assert_eq!(post(to, &signed(good), r#"{"id":"e-1","event_type":"tampered"}"#).await, 401, "body changed");
        assert_eq!(post(to, &[token("token-signed-0123")], body).await, 401, "a signed destination's unsigned request");

        let stats = r.stats();
        assert_eq!((stats.unique, stats.duplicates, stats.rejected), (2, 1, 5), "{stats:?}");
        assert!(r.received().iter().all(|d| d.signature != "invalid"), "rejected requests are not kept");
    }
}
