//! The public HTTP API. Every error is JSON: `{"error": {"code", "message",
//! …}}`, with a status that says what the caller should do (4xx: fix the
//! request; 503 with `Retry-After`: try again later).

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use futures_util::future::join_all;
use proto::{
    FieldError, PreparedEvent,
    namespace::{NamespaceKind, NamespaceRecord, NamespaceRef},
};
use serde_json::{Value, json, value::RawValue};
use tokio::sync::Semaphore;

use crate::{
    auth::{Auth, AuthError},
    client::{PublishError, Publisher},
    config::{ApiConfig, Right},
    metrics::Metrics,
};

/// Every route the API serves, as (method, path). The router is built from
/// the same paths, and a test checks the OpenAPI document lists exactly
/// these.
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/v1/events"),
    ("PUT", "/api/v1/namespaces/{kind}/{id}"),
    ("DELETE", "/api/v1/namespaces/{kind}/{id}"),
    ("POST", "/api/v1/namespaces/import"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/groups/{group_id}/destinations"),
    ("POST", "/api/v1/groups/{group_id}/destinations"),
    ("GET", "/api/v1/groups/{group_id}/destinations/{id}"),
    ("PATCH", "/api/v1/groups/{group_id}/destinations/{id}"),
    ("DELETE", "/api/v1/groups/{group_id}/destinations/{id}"),
    ("GET", "/api/v1/instance/destinations"),
    ("POST", "/api/v1/instance/destinations"),
    ("GET", "/api/v1/instance/destinations/{id}"),
    ("PATCH", "/api/v1/instance/destinations/{id}"),
    ("DELETE", "/api/v1/instance/destinations/{id}"),
];

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) publisher: Publisher,
    pub(crate) auth: Arc<Auth>,
    pub(crate) config: Arc<ApiConfig>,
    pub(crate) metrics: Metrics,
    in_flight: Arc<Semaphore>,
    pub(crate) destinations: crate::destinations::Store,
}

impl AppState {
    /// The state of one API instance.
    pub fn new(
        publisher: Publisher,
        auth: Auth,
        config: ApiConfig,
        metrics: Metrics,
        destinations: crate::destinations::Store,
    ) -> Self {
        Self {
            publisher,
            auth: Arc::new(auth),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config: Arc::new(config),
            metrics,
            destinations,
        }
    }
}

/// An error answer: `{"error": {"code", "message", …extra}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Value,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "code": self.code, "message": self.message });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, self.extra) {
            b.extend(e);
        }
        let mut r = (self.status, Json(json!({ "error": body }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// An error answer with `status` and a machine-readable `code`.
pub fn error(status: StatusCode, code: &'static str, message: impl Into<String>, extra: Value) -> ApiError {
    ApiError { status, code, message: message.into(), extra }
}

fn unavailable(message: impl Into<String>, extra: Value) -> ApiError {
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message, extra)
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => {
                error(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string(), Value::Null)
            }
            AuthError::Forbidden(_) => error(StatusCode::FORBIDDEN, "forbidden", e.to_string(), Value::Null),
        }
    }
}

/// The API routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/events", post(post_events))
        .route("/api/v1/namespaces/{kind}/{id}", put(put_namespace).delete(delete_namespace))
        .route("/api/v1/namespaces/import", post(import_namespaces))
        .route("/api/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .merge(crate::destinations::routes())
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route", Value::Null) })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route", Value::Null)
        })
        .with_state(state)
}

pub(crate) fn authorize(state: &AppState, headers: &HeaderMap, right: Right) -> Result<String, AuthError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    state.auth.check(value, right)
}

pub(crate) async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    read_limited(body, state.config.max_request_bytes).await
}

async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than {limit} bytes"),
            Value::Null,
        )
    })
}

/// Splits a body into event texts: NDJSON (one per line), a JSON array, or
/// one object.
fn split_events(body: &[u8], ndjson: bool) -> Result<Vec<&[u8]>, ApiError> {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, "invalid_json", m, Value::Null);
    if ndjson {
        return Ok(body
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .collect());
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<&RawValue> =
            serde_json::from_slice(body).map_err(|e| bad(format!("the body is not a JSON array of events: {e}")))?;
        Ok(items.into_iter().map(|r| r.get().as_bytes()).collect())
    } else {
        Ok(vec![body])
    }
}

async fn post_events(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let response = publish_events(&state, &headers, body).await.unwrap_or_else(IntoResponse::into_response);
    state.metrics.observe_request("events", response.status().as_u16(), started.elapsed());
    response
}

async fn publish_events(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let Ok(_permit) = state.in_flight.try_acquire() else {
        state.metrics.rejected(crate::metrics::BUSY, 1);
        // Its own code, not `unavailable`: nothing is wrong with Kafka, this
        // producer is at `api.max_in_flight` (scale out, or raise it).
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            crate::metrics::BUSY,
            "too many requests in flight (api.max_in_flight); nothing was published, resend the request shortly",
            Value::Null,
        ));
    };
    let _gauge = state.metrics.in_flight_guard();
    authorize(state, headers, Right::Publish)?;
    let body = read_body(state, body).await?;
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-ndjson"));
    let texts = split_events(&body, ndjson)?;
    let max = state.config.max_events;
    if texts.is_empty() {
        return Err(error(StatusCode::UNPROCESSABLE_ENTITY, "no_events", "the request holds no events", Value::Null));
    }
    if texts.len() > max {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!("the request holds {} events, more than {max}", texts.len()),
            Value::Null,
        ));
    }

    let mut prepared: Vec<PreparedEvent> = Vec::with_capacity(texts.len());
    let mut invalid: Vec<Value> = Vec::new();
    for (index, text) in texts.iter().enumerate() {
        match state.publisher.prepare(text) {
            Ok(p) => prepared.push(p),
            Err(errors) => {
                state.metrics.rejected(crate::metrics::reason(&errors), 1);
                invalid.push(json!({ "index": index, "errors": errors }));
            }
        }
    }
    if !invalid.is_empty() {
        state.metrics.events("invalid", invalid.len());
        // All or nothing: a request with any invalid event publishes none,
        // so a publisher can fix and resend the whole request.
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_events",
            format!("{} of {} events are invalid; none was published", invalid.len(), texts.len()),
            json!({ "events": invalid }),
        ));
    }

    let produce_started = Instant::now();
    let results = state.publisher.send_all(&prepared).await;
    state.metrics.observe_produce(produce_started.elapsed());
    let mut failed = Vec::new();
    for (index, result) in results.iter().enumerate() {
        if let Err(e) = result {
            tracing::warn!(error = %e, index, "event not acknowledged by Kafka");
            failed.push(index);
        }
    }
    state.metrics.events("accepted", prepared.len() - failed.len());
    if failed.is_empty() {
        let body = ids_body(&prepared);
        return Ok((StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    state.metrics.events("unavailable", failed.len());
    let accepted: Vec<String> =
        prepared.iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(event, _)| event.id.to_string()).collect();
    Err(unavailable(
        format!("Kafka did not acknowledge {} of {} events; resend those", failed.len(), prepared.len()),
        json!({ "accepted_ids": accepted, "failed_indexes": failed }),
    ))
}

/// `{"ids":[…]}` for `events`, every id a JSON string (integers too),
/// written straight into the body: no string and no JSON value per id.
fn ids_body(events: &[PreparedEvent]) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + events.len() * 40);
    body.extend_from_slice(b"{\"ids\":[");
    let mut digits = itoa::Buffer::new();
    for (n, event) in events.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        // A publisher's own id may hold anything a JSON string can.
        if serde_json::to_writer(&mut body, event.id.text(&mut digits)).is_err() {
            unreachable!("a string always serializes into a Vec");
        }
    }
    body.extend_from_slice(b"]}");
    body
}

fn namespace_ref(kind: &str, id: &str) -> Result<NamespaceRef, ApiError> {
    let bad = |m: String| error(StatusCode::NOT_FOUND, "not_found", m, Value::Null);
    let kind: NamespaceKind = kind.parse().map_err(bad)?;
    let id: i64 = id.parse().map_err(|_| bad(format!("{id:?} is not an integer id")))?;
    Ok(NamespaceRef { kind, id })
}

fn publish_failure(e: PublishError) -> ApiError {
    match e {
        PublishError::Invalid(errors) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, "invalid", "the record is invalid", json!({ "errors": errors }))
        }
        PublishError::Unavailable(e) | PublishError::Setup(e) => {
            tracing::warn!(error = %e, "namespace write not acknowledged");
            unavailable("Kafka did not acknowledge the write", Value::Null)
        }
    }
}

async fn put_namespace(
    State(state): State<AppState>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Right::Namespaces)?;
    let of = namespace_ref(&kind, &id)?;
    let body = read_body(&state, body).await?;
    let record: NamespaceRecord = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "the body is not a namespace record",
            json!({ "errors": [FieldError::new("(body)", e.to_string())] }),
        )
    })?;
    state.publisher.put_namespace(of, Some(&record)).await.map_err(publish_failure)?;
    Ok((StatusCode::OK, Json(json!({ "key": of.to_string(), "record": record }))).into_response())
}

async fn delete_namespace(
    State(state): State<AppState>,
    Path((kind, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Right::Namespaces)?;
    let of = namespace_ref(&kind, &id)?;
    state.publisher.put_namespace(of, None).await.map_err(publish_failure)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One line of a namespace import.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    kind: NamespaceKind,
    id: i64,
    #[serde(default)]
    parent: Option<NamespaceRef>,
    #[serde(default)]
    full_path: Option<String>,
    /// Remove the namespace instead.
    #[serde(default)]
    delete: bool,
}

/// `POST /api/v1/namespaces/import`: NDJSON, one namespace per line, for
/// the initial load of a large tree. Every line is validated first; any bad
/// line fails the whole import (422, nothing written). Writes are
/// idempotent, so a failed import can simply be sent again.
async fn import_namespaces(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Right::Namespaces)?;
    let body = read_limited(body, state.config.max_import_bytes).await?;
    let mut records = Vec::new();
    let mut invalid = Vec::new();
    for (line_no, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed: Result<ImportLine, _> = serde_json::from_slice(line);
        let checked = parsed.map_err(|e| FieldError::new("(line)", e.to_string())).and_then(|l| {
            let of = NamespaceRef { kind: l.kind, id: l.id };
            if l.delete {
                return Ok((of, None));
            }
            let full_path = l.full_path.ok_or_else(|| FieldError::new("full_path", "is required"))?;
            let record = NamespaceRecord { parent: l.parent, full_path };
            record.validate(of)?;
            Ok((of, Some(record)))
        });
        match checked {
            Ok(r) => records.push(r),
            Err(e) => invalid.push(json!({ "line": line_no + 1, "errors": [e] })),
        }
    }
    if !invalid.is_empty() {
        return Err(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_namespaces",
            format!("{} lines are invalid; nothing was written", invalid.len()),
            json!({ "lines": invalid }),
        ));
    }
    let mut written = 0usize;
    for chunk in records.chunks(1000) {
        let results = join_all(chunk.iter().map(|(of, r)| state.publisher.put_namespace(*of, r.as_ref()))).await;
        for r in results {
            r.map_err(|e| {
                tracing::warn!(error = %e, written, "namespace import interrupted");
                unavailable(
                    format!("Kafka did not acknowledge every write ({written} written); send the import again"),
                    json!({ "written": written }),
                )
            })?;
            written += 1;
        }
    }
    Ok((StatusCode::OK, Json(json!({ "written": written }))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_answer_is_json_with_every_id_a_string_in_order() {
        let registry = proto::Registry::embedded();
        let limits = proto::EventLimits::default();
        let now = time::OffsetDateTime::now_utc();
        let event = |id: &str| {
            let text = format!(
                r#"{{"id":{id},"event_type":"audit_operation","entity_type":"Project","entity_id":6,"author_id":1}}"#
            );
            proto::event::prepare(text.as_bytes(), &registry, &limits, now).expect("valid event")
        };
        let events = [event("42"), event(r#""a\"quoted\"id\\""#), event("-7")];
        let answer: Value = serde_json::from_slice(&ids_body(&events)).expect("the answer is JSON");
        assert_eq!(answer, json!({ "ids": ["42", "a\"quoted\"id\\", "-7"] }));
        assert_eq!(serde_json::from_slice::<Value>(&ids_body(&[])).expect("JSON"), json!({ "ids": [] }));
    }

    #[test]
    fn openapi_lists_exactly_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("OpenAPI is JSON");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        let mut routes: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        documented.sort();
        routes.sort();
        assert_eq!(documented, routes);
    }

    /// Every listed route is served by the router (not its 404/405
    /// fallback), on a real listener.
    #[tokio::test]
    async fn every_route_is_served() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kafka = service::config::KafkaConfig { brokers: "127.0.0.1:1".into(), ..Default::default() };
        let publisher = Publisher::new(
            &kafka,
            proto::Registry::embedded(),
            Default::default(),
            std::time::Duration::from_millis(100),
        )
        .expect("publisher");
        let metrics = Metrics::register(&prometheus::Registry::new()).expect("metrics");
        let store = crate::destinations::Store {
            destinations: service::table::Table::new(Default::default()),
            tree: service::table::Table::new(Default::default()),
        };
        let auth = Auth::new(&crate::config::AuthConfig { required: false, tokens: vec![] });
        let state = AppState::new(publisher, auth, ApiConfig::default(), metrics, store);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        let client = reqwest::Client::new();
        for (method, path) in ROUTES {
            let url = format!(
                "http://{addr}{}",
                path.replace("{kind}", "group").replace("{group_id}", "1").replace("{id}", "1")
            );
            let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let r = client.request(method.clone(), &url).body("{}").send().await.expect("answer");
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {url}");
            assert!(!body.contains("no such route"), "{method} {url}: {body}");
        }
        let r = client.get(format!("http://{addr}/api/v1/nope")).send().await.expect("answer");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.text().await.unwrap_or_default().contains("no such route"));
    }

    #[test]
    fn split_understands_three_shapes() {
        assert_eq!(split_events(b"{\"a\":1}", false).unwrap(), vec![&b"{\"a\":1}"[..]]);
        assert_eq!(
            split_events(b" [ {\"a\":1} , {\"b\":2} ]", false).unwrap(),
            vec![&b"{\"a\":1}"[..], &b"{\"b\":2}"[..]]
        );
        assert_eq!(
            split_events(b"{\"a\":1}\r\n\n{\"b\":2}\n", true).unwrap(),
            vec![&b"{\"a\":1}"[..], &b"{\"b\":2}"[..]]
        );
        assert_eq!(split_events(b"[1,", false).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
