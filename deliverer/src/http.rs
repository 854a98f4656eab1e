//! One HTTP delivery attempt (SPEC §2), and the connect-time address guard.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{
    Method, Request, Uri,
    header::{
        ACCEPT, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT as USER_AGENT_HEADER,
    },
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{HttpConnector, dns::Name};
use proto::{destination::Destination, netguard::Policy};

/// Most destinations whose prepared requests are kept; past it the cache
/// starts over (it only saves work, and deleted destinations linger in it).
const PREPARED_MAX: usize = 16_384;

const EVENT_TYPE: HeaderName = HeaderName::from_static("x-gitlab-audit-event-type");
const TOKEN: HeaderName = HeaderName::from_static("x-gitlab-event-streaming-token");

use crate::{
    config::DelivererSettings,
    pool::{BoxError, Broken, Pool},
};
use proto::signature as sign;

/// The `User-Agent` of every delivery.
pub const USER_AGENT: &str = concat!("auditstream/", env!("CARGO_PKG_VERSION"));

/// Why the HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct ClientError(#[from] rustls::Error);

type Resolved = std::vec::IntoIter<SocketAddr>;

/// Resolves names, then keeps only addresses the policy allows, so the
/// connection goes to a checked address (DNS rebinding cannot slip a private
/// address in between check and connect). IP literals never reach a
/// resolver: [`Sender::prepare`] checks those.
#[derive(Clone)]
struct GuardedResolver {
    policy: Arc<Policy>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = Resolved;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Resolved, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            let mut refusals = Vec::new();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refusals.push(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refusals.first().cloned().unwrap_or_else(|| format!("{host} has no address"));
                return Err(format!("refused to connect to {host}: {why}").into());
            }
            Ok(allowed.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<GuardedResolver>>;

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx came back.
    Delivered(u16),
    /// Anything else.
    Failed {
        /// The status, when a response came back.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// The receiver's `Retry-After`, capped.
        retry_after: Option<Duration>,
        /// Whether retrying can help (a refused address cannot).
        retryable: bool,
    },
}

/// What every request to one destination shares, worked out once per
/// version of the destination. `Err` names why no request can be made.
type Prepared = Result<Target, String>;

/// A destination's parsed and checked URL, in the forms the connection
/// needs, and its fixed headers.
struct Target {
    /// The whole URL (HTTP/2 requests carry scheme and authority).
    uri: Uri,
    /// Its path and query (HTTP/1.1's request line; `Host` is fixed).
    path: Uri,
    /// Scheme, host and port: the connection pool's key.
    origin: Box<str>,
    fixed: Vec<(HeaderName, HeaderValue)>,
}

/// Per destination id: the version it was prepared from (compared by
/// pointer: the table replaces the `Arc` on every change) and the result.
type PreparedCache = HashMap<String, (Arc<Destination>, Arc<Prepared>)>;

/// Sends deliveries.
#[derive(Clone)]
pub struct Sender {
    pool: Arc<Pool<Connector>>,
    policy: Arc<Policy>,
    request_timeout: Duration,
    max_response_bytes: usize,
    max_retry_after: Duration,
    prepared: Arc<Mutex<PreparedCache>>,
}

impl Sender {
    /// A sender with keep-alive connections ([`crate::pool`]), no redirects
    /// (hyper follows none), no proxies, rustls with the platform's trust
    /// store; HTTP/2 where the destination offers it over TLS. `counters`,
    /// when given, count its connections.
    ///
    /// hyper's connections directly, not reqwest or hyper-util's pooled
    /// client: reqwest's per-request layers (redirect policy, URL to URI and
    /// back, boxed futures) were ~20 allocations per delivery and a URL
    /// parse, and the pooled client's checkout ~4 µs of CPU per delivery
    /// (docs/PERFORMANCE.md).
    pub fn new(settings: &DelivererSettings, counters: Option<crate::pool::Counters>) -> Result<Self, ClientError> {
        let policy = Arc::new(Policy { allowed: settings.allowed_networks.clone() });
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { policy: policy.clone() });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let tls = tls_config()?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Self {
            pool: Pool::new(connector, settings.idle_connection_timeout, counters),
            policy,
            request_timeout: settings.request_timeout,
            max_response_bytes: settings.max_response_bytes,
            max_retry_after: settings.max_retry_after,
            prepared: Arc::default(),
        })
    }

    /// The destination's URL and fixed headers, from the cache while the
    /// destination is unchanged.
    fn prepared(&self, destination: &Arc<Destination>) -> Arc<Prepared> {
        let mut cache = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((version, prepared)) = cache.get(destination.id.as_str())
            && Arc::ptr_eq(version, destination)
        {
            return prepared.clone();
        }
        let prepared = Arc::new(self.prepare(destination));
        if cache.len() >= PREPARED_MAX {
            cache.clear();
        }
        cache.insert(destination.id.clone(), (destination.clone(), prepared.clone()));
        prepared
    }

    fn prepare(&self, destination: &Destination) -> Prepared {
        let url =
            url::Url::parse(destination.url.expose()).map_err(|e| format!("destination URL does not parse: {e}"))?;
        // IP literals never reach the resolver: check them here.
        if let Some(host) = url.host() {
            let literal = match host {
                url::Host::Ipv4(a) => Some(std::net::IpAddr::V4(a)),
                url::Host::Ipv6(a) => Some(std::net::IpAddr::V6(a)),
                url::Host::Domain(_) => None,
            };
            if let Some(ip) = literal {
                self.policy.check(ip)?;
            }
        }
        // The URL crate's normal form (lower-case host, a path of at least
        // "/"), as HTTP's URI type.
        let uri: Uri = String::from(url)
            .try_into()
            .map_err(|e: http::uri::InvalidUri| format!("destination URL is not a valid HTTP URI: {e}"))?;
        let (Some(scheme), Some(authority), Some(path)) = (uri.scheme(), uri.authority(), uri.path_and_query()) else {
            return Err("destination URL has no scheme, host or path".to_owned());
        };
        let origin = format!("{scheme}://{authority}").into_boxed_str();
        let path = Uri::from(path.clone());
        let mut fixed = fixed_headers(destination)?;
        // The same for every request: made once.
        fixed.push((HOST, host_value(&uri)?));
        Ok(Target { uri, path, origin, fixed })
    }

    /// POSTs `body` to `destination`. `event_id` and `event_type` come from
    /// the delivery's headers; the body is sent as is.
    pub async fn attempt(
        &self,
        destination: &Arc<Destination>,
        event_id: &str,
        event_type: &str,
        body: &Bytes,
    ) -> Outcome {
        let failed = |error: String, retryable| Outcome::Failed { status: None, error, retry_after: None, retryable };
        let prepared = self.prepared(destination);
        let target = match &*prepared {
            Ok(t) => t,
            Err(e) => return failed(e.clone(), false),
        };
        let headers = match build_headers(&target.fixed, destination, event_id, event_type, body) {
            Ok(h) => h,
            Err(e) => return failed(e, false),
        };
        // The whole exchange (connecting included, response body included)
        // within the timeout. The request is made inside it, so that the
        // attempt's future (in every delivery's task) holds one copy.
        let exchange = async {
            let mut request = Request::new(Full::new(body.clone()));
            *request.method_mut() = Method::POST;
            *request.headers_mut() = headers;
            let (response, reusable) = self.pool.send(&target.origin, &target.uri, &target.path, &mut request).await?;
            let (parts, mut body) = response.into_parts();
            // Read a bounded amount of the body and discard it. A
            // connection whose response was read to its end is reused.
            let mut read = 0usize;
            while read < self.max_response_bytes {
                match body.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(_)) => break,
                    None => {
                        if let Some(send) = reusable {
                            self.pool.checkin(&target.origin, send);
                        }
                        break;
                    }
                }
            }
            Ok::<_, Broken>(parts)
        };
        let response = match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok(parts)) => parts,
            Ok(Err(broken)) => {
                let (kind, chain) = match broken {
                    Broken::Connect(e) => ("connect error", error_chain(&*e)),
                    Broken::Transport(e) => ("transport error", error_chain(&e)),
                };
                let refused = chain.contains("refused to connect to");
                return failed(format!("{kind}: {chain}"), !refused);
            }
            Err(_) => return failed(format!("timeout: no complete response within {:?}", self.request_timeout), true),
        };
        let status = response.status;
        let retry_after = response
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(self.max_retry_after));
        if status.is_success() {
            Outcome::Delivered(status.as_u16())
        } else {
            let what = if status.is_redirection() { "redirect (not followed)" } else { "non-2xx response" };
            Outcome::Failed {
                status: Some(status.as_u16()),
                error: format!("{what}: {status}"),
                retry_after,
                retryable: true,
            }
        }
    }
}

/// rustls with the ring provider and the platform's trust store (on Linux
/// the system's CA bundle; `SSL_CERT_FILE` overrides it).
fn tls_config() -> Result<rustls::ClientConfig, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth())
}

fn header_value(v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| "a header value is not valid in HTTP".to_owned())
}

/// The `Host` header for `uri`, as the HTTP client writes it: the host,
/// and the port unless it is the scheme's default.
fn host_value(uri: &Uri) -> Result<HeaderValue, String> {
    let host = uri.host().ok_or("destination URL has no host")?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    match uri.port_u16().filter(|&p| p != default) {
        Some(port) => header_value(&format!("{host}:{port}")),
        None => header_value(host),
    }
}

/// The headers every request to `destination` carries: content type,
/// custom headers, verification token.
fn fixed_headers(destination: &Destination) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut h = vec![
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT)),
        (ACCEPT, HeaderValue::from_static("*/*")),
    ];
    for custom in destination.active_headers() {
        let name = HeaderName::from_bytes(custom.name.expose().as_bytes())
            .map_err(|_| format!("header name {:?} is not valid in HTTP", custom.name.expose()))?;
        let mut v = header_value(custom.value.expose())?;
        v.set_sensitive(true);
        h.push((name, v));
    }
    let mut token = header_value(destination.verification_token.expose())?;
    token.set_sensitive(true);
    h.push((TOKEN, token));
    Ok(h)
}

/// One request's headers: the fixed ones, the event type and, when the
/// destination signs, the signature headers.
fn build_headers(
    fixed: &[(HeaderName, HeaderValue)],
    destination: &Destination,
    event_id: &str,
    event_type: &str,
    body: &[u8],
) -> Result<HeaderMap, String> {
    let value = header_value;
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let secrets = destination.signing_secrets(now_ms);
    // Exactly the room needed: the event type, the two hyper adds (host,
    // content length) and the signature's three; no regrowth, and a small
    // map stays in the allocator's fast path.
    let signed = if secrets.is_empty() { 0 } else { 3 };
    let mut h = HeaderMap::with_capacity(fixed.len() + 3 + signed);
    for (name, value) in fixed {
        h.insert(name.clone(), value.clone());
    }
    h.insert(EVENT_TYPE, value(event_type)?);
    if !secrets.is_empty() {
        let now = now_ms / 1000;
        h.insert("webhook-id", value(event_id)?);
        h.insert("webhook-timestamp", value(&now.to_string())?);
        h.insert("webhook-signature", value(&sign::signature(&secrets, event_id, now, body))?);
    }
    Ok(h)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// rustls needs one process-wide crypto provider; ring is the lean one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_is_the_authority_without_a_default_port() {
        for (url, host) in [
            ("http://example.com/in", "example.com"),
            ("http://example.com:80/in", "example.com"),
            ("https://example.com:443/in", "example.com"),
            ("https://example.com:80/in", "example.com:80"),
            ("http://127.0.0.1:8080/in", "127.0.0.1:8080"),
            ("http://[::1]:9000/in", "[::1]:9000"),
        ] {
            let uri: Uri = url.parse().unwrap();
            assert_eq!(host_value(&uri).unwrap(), host, "{url}");
        }
    }

    /// Every delivery's task holds an attempt's future, and a future takes
    /// the room of every branch it might await. Connecting (resolve, TCP,
    /// TLS, handshake) is ~6 KB and rare, so it is boxed; inline, this
    /// future measured 7,488 bytes (docs/PERFORMANCE.md, session 12).
    #[test]
    fn an_attempt_does_not_carry_connecting_inline() {
        install_crypto_provider();
        let sender = Sender::new(&DelivererSettings::default(), None).unwrap();
        let destination = Arc::new(
            Destination::http(
                "d",
                proto::destination::Owner::Instance,
                "d",
                "http://127.0.0.1:9/in",
                "token-0123456789",
            )
            .unwrap(),
        );
        let body = Bytes::from_static(b"{}");
        let attempt = sender.attempt(&destination, "id", "type", &body);
        let size = std::mem::size_of_val(&attempt);
        assert!(size < 2048, "an attempt's future is {size} bytes: is a rare branch (connecting?) inline again?");
    }
}
