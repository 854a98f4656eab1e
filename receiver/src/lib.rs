//! The reference receiver: what a destination owner runs to take audit
//! events. It checks the verification token and, when it knows the secret,
//! the Standard Webhooks signature; deduplicates by event `id`; counts
//! unique, duplicate and rejected deliveries; prints one line per delivery
//! and can write every request to an NDJSON log.

use std::{
    collections::HashSet,
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    response::IntoResponse,
    routing::{get, post},
};
use proto::destination::SigningSecret;
use serde::Serialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

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

/// Receiver settings.
#[derive(Debug, Clone, Default)]
pub struct ReceiverConfig {
    /// The destinations it accepts; a request with another token gets 401.
    pub expected: Vec<Expected>,
    /// Where to append one NDJSON line per request.
    pub log_file: Option<PathBuf>,
    /// Print one line per delivery on stdout.
    pub print: bool,
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
}

impl Receiver {
    /// A receiver with `config`. Fails when the log file cannot be opened.
    pub fn new(config: ReceiverConfig) -> std::io::Result<Self> {
        let log = match &config.log_file {
            Some(path) => Some(Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?))),
            None => None,
        };
        Ok(Self { config: Arc::new(config), inner: Arc::default(), log })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counts so far.
    pub fn stats(&self) -> Stats {
        self.lock().stats
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

async fn take(State(r): State<Receiver>, uri: Uri, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let token = headers.get("x-gitlab-event-streaming-token").and_then(|v| v.to_str().ok());
    let expected = r.match_token(token).cloned();
    let signature = expected.as_ref().map_or("unsigned", |e| check_signature(e, &headers, &body));
    let header_list: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let event: Option<Value> = serde_json::from_slice(&body).ok();
    let id = event.as_ref().and_then(|e| e.get("id")).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let event_type = headers.get("x-gitlab-audit-event-type").and_then(|v| v.to_str().ok()).unwrap_or("?");
    let accepted = expected.is_some() && signature != "invalid";

    if let Some(log) = &r.log {
        // The exact bytes when they fit on one NDJSON line; otherwise the
        // parsed value (or the text, when it is not JSON).
        let exact = std::str::from_utf8(&body)
            .ok()
            .filter(|t| !t.contains(['\n', '\r']))
            .and_then(|t| serde_json::value::RawValue::from_string(t.to_owned()).ok());
        let fallback = || {
            let v = event.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into_owned()));
            serde_json::value::to_raw_value(&v).ok()
        };
        #[derive(Serialize)]
        struct LogLine<'a> {
            path: &'a str,
            headers: std::collections::BTreeMap<&'a str, &'a str>,
            body: Option<Box<serde_json::value::RawValue>>,
            accepted: bool,
        }
        let line = LogLine {
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
