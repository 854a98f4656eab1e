//! The admin port: `/live` (the process runs), `/ready` (every readiness
//! check passed: tables read to the end, listeners bound) and `/metrics`
//! (Prometheus text format).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;

use crate::{consume::ConsumerLag, shutdown::Shutdown};

/// Named readiness checks; ready when at least one is registered and every
/// one is set. A process that registered nothing yet is still starting.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Arc<AtomicBool>>>>,
}

/// One readiness check, set by its owner.
#[derive(Debug, Clone)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// Marks the check as passing (or failing again).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

impl Readiness {
    /// Adds a check, initially failing.
    pub fn register(&self, name: &str) -> ReadyFlag {
        let flag = Arc::new(AtomicBool::new(false));
        self.lock().insert(name.to_owned(), flag.clone());
        ReadyFlag(flag)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<AtomicBool>>> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every check and whether it passes.
    pub fn report(&self) -> BTreeMap<String, bool> {
        self.lock().iter().map(|(k, v)| (k.clone(), v.load(Ordering::Acquire))).collect()
    }

    /// Whether every check passes, and there is at least one.
    pub fn is_ready(&self) -> bool {
        ready(&self.report())
    }
}

/// What the admin server serves: created once per process, passed down.
#[derive(Clone, Default)]
pub struct Admin {
    /// The process's one metrics registry.
    pub registry: prometheus::Registry,
    /// Readiness checks.
    pub readiness: Readiness,
    /// The consumer-lag gauge, shared by every consumer loop of the
    /// process (`auditstream dev` runs router and deliverer in one).
    consumer_lag: Arc<Mutex<Option<ConsumerLag>>>,
}

impl Admin {
    /// The process's consumer-lag gauge, registered on first use.
    pub fn consumer_lag(&self) -> prometheus::Result<ConsumerLag> {
        let mut lag = self.consumer_lag.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = lag.as_ref() {
            return Ok(l.clone());
        }
        let l = ConsumerLag::register(&self.registry)?;
        *lag = Some(l.clone());
        Ok(l)
    }

    /// The admin routes, for serving or for tests.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route("/ready", get(ready_route))
            .route("/metrics", get(metrics))
            .with_state(self.clone())
    }

    /// Serves until `shutdown` fires.
    pub async fn serve(self, listener: TcpListener, mut shutdown: Shutdown) -> std::io::Result<()> {
        axum::serve(listener, self.router()).with_graceful_shutdown(async move { shutdown.wait().await }).await
    }
}

/// Ready: something registered, and everything registered passes.
fn ready(report: &BTreeMap<String, bool>) -> bool {
    !report.is_empty() && report.values().all(|r| *r)
}

async fn ready_route(State(admin): State<Admin>) -> impl IntoResponse {
    let report = admin.readiness.report();
    let ok = ready(&report);
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "ready": ok, "checks": report })))
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let mut buf = Vec::new();
    match TextEncoder::new().encode(&admin.registry.gather(), &mut buf) {
        Ok(()) => (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], buf),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], e.to_string().into_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_when_every_check_passes() {
        let admin = Admin::default();
        let counter = prometheus::IntCounter::new("test_things_total", "things").unwrap();
        admin.registry.register(Box::new(counter.clone())).unwrap();
        counter.inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = crate::shutdown::channel();
        let server = tokio::spawn(admin.clone().serve(listener, shutdown));
        let get = |path: &str| {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                let status = out[9..12].to_owned();
                format!("{out}\n{status}")
            }
        };
        assert!(get("/live").await.ends_with("200"));
        // Nothing registered yet: the process is still starting.
        let body = get("/ready").await;
        assert!(body.ends_with("503") && body.contains(r#""checks":{}"#), "{body}");
        assert!(!admin.readiness.is_ready());
        let a = admin.readiness.register("a");
        let b = admin.readiness.register("b");
        assert!(get("/ready").await.ends_with("503"));
        a.set(true);
        assert!(get("/ready").await.ends_with("503"));
        b.set(true);
        let body = get("/ready").await;
        assert!(body.ends_with("200"), "{body}");
        assert!(admin.readiness.is_ready());
        let m = get("/metrics").await;
        assert!(m.contains("test_things_total 1"), "{m}");
        trigger.trigger();
        server.await.unwrap().unwrap();
    }
}
