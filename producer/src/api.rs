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
    routing::{post, put},
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

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    publisher: Publisher,
    auth: Arc<Auth>,
    config: Arc<ApiConfig>,
    metrics: Metrics,
    in_flight: Arc<Semaphore>,
}

impl AppState {
    /// The state of one API instance.
    pub fn new(publisher: Publisher, auth: Auth, config: ApiConfig, metrics: Metrics) -> Self {
        Self {
            publisher,
            auth: Arc::new(auth),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config: Arc::new(config),
            metrics,
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
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route", Value::Null) })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route", Value::Null)
        })
        .with_state(state)
}

fn authorize(state: &AppState, headers: &HeaderMap, right: Right) -> Result<String, AuthError> {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    state.auth.check(value, right)
}

async fn read_body(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_request_bytes;
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
        return Err(unavailable("too many requests in flight; retry shortly", Value::Null));
    };
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
            Err(errors) => invalid.push(json!({ "index": index, "errors": errors })),
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
    let results = join_all(prepared.iter().map(|e| state.publisher.send(e))).await;
    state.metrics.observe_produce(produce_started.elapsed());
    let mut accepted = Vec::new();
    let mut failed = Vec::new();
    for (index, (event, result)) in prepared.iter().zip(results).enumerate() {
        match result {
            Ok(()) => accepted.push(event.id.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, index, "event not acknowledged by Kafka");
                failed.push(index);
            }
        }
    }
    state.metrics.events("accepted", accepted.len());
    if failed.is_empty() {
        return Ok((StatusCode::ACCEPTED, Json(json!({ "ids": accepted }))).into_response());
    }
    state.metrics.events("unavailable", failed.len());
    Err(unavailable(
        format!("Kafka did not acknowledge {} of {} events; resend those", failed.len(), prepared.len()),
        json!({ "accepted_ids": accepted, "failed_indexes": failed }),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

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
