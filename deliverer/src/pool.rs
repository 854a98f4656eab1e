//! Keep-alive connections per origin (scheme, host and port), over hyper's
//! connection API.
//!
//! An HTTP/1.1 connection carries one request at a time: an attempt takes
//! an idle one (the most recently used, so the others can expire) or opens
//! one, and gives it back once the response was read to its end. A
//! connection whose TLS handshake chose HTTP/2 (ALPN) is shared by every
//! attempt to its origin. Idle connections are closed after the idle
//! timeout, by a sweep and at the next checkout, whichever comes first.
//!
//! While an origin has no connection and is not known to speak HTTP/1.1,
//! one attempt connects at a time and the others wait for it: if it gets
//! HTTP/2 they share its connection instead of each opening one (a burst
//! of attempts after a cold start, or after the origin closed its
//! connection, would otherwise open as many TLS connections, all but one
//! closed after their request). When it gets HTTP/1.1 the waiters connect
//! on their own, at once; when it fails, the next waiter tries. Each
//! waits within its own request timeout.
//!
//! This replaced hyper-util's pooled `legacy::Client` (session 8): the same
//! connector (the address guard, TLS, ALPN), but no per-request pool key,
//! checkout/connect race and waiter bookkeeping. The deliverer's isolation
//! already bounds the attempts in flight to each destination, so the pool
//! needs no limit or queue of its own.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::{
    client::legacy::connect::Connection,
    rt::{TokioExecutor, TokioTimer},
};
use prometheus::{IntCounter, IntGauge};
use tokio::{sync::OwnedMutexGuard, time::Instant};
use tower_service::Service;

/// The error of an attempt to connect, or of the protocol handshake after.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Body = Full<Bytes>;

/// A connection to send one request on.
pub enum Conn {
    /// Exclusively this attempt's; give it back with [`Pool::checkin`].
    Http1(http1::SendRequest<Body>),
    /// Shared with every other attempt to the origin.
    Http2(http2::SendRequest<Body>),
}

#[derive(Default)]
struct Origin {
    /// Idle HTTP/1.1 connections and since when, the most recently used last.
    idle: Vec<(http1::SendRequest<Body>, Instant)>,
    /// The origin's HTTP/2 connection and when it was last taken.
    shared: Option<(http2::SendRequest<Body>, Instant)>,
    /// The last connection to it negotiated HTTP/1.1: attempts connect in
    /// parallel, nothing to share.
    http1: bool,
    /// Held by the attempt connecting while the protocol may be HTTP/2.
    connecting: Gate,
}

type Gate = Arc<tokio::sync::Mutex<()>>;

impl Origin {
    /// Drops what is closed or was idle for `timeout`.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        self.idle.retain(|(send, since)| !send.is_closed() && now.duration_since(*since) < timeout);
        self.expire_shared(now, timeout);
    }

    /// Drops the shared connection when it is closed or was idle for
    /// `timeout`.
    fn expire_shared(&mut self, now: Instant, timeout: Duration) {
        if self.shared.as_ref().is_some_and(|(send, since)| send.is_closed() || now.duration_since(*since) >= timeout) {
            self.shared = None;
        }
    }

    /// The gate a new connection to `origin` goes through: only where it
    /// may get HTTP/2, which comes by ALPN over TLS alone.
    fn gate(&self, origin: &str) -> Option<Gate> {
        (!self.http1 && origin.starts_with("https:")).then(|| self.connecting.clone())
    }

    /// Nothing to keep: no connection, and no attempt connecting (a held
    /// or awaited gate is a clone of `connecting`).
    fn is_empty(&self) -> bool {
        self.idle.is_empty() && self.shared.is_none() && Arc::strong_count(&self.connecting) == 1
    }
}

/// What the pool counts: connections opened by protocol, and those open.
#[derive(Clone)]
pub struct Counters {
    /// HTTP/1.1 connections opened.
    pub opened_http1: IntCounter,
    /// HTTP/2 connections opened.
    pub opened_http2: IntCounter,
    /// Connections open now, idle or busy.
    pub open: IntGauge,
}

/// Keeps [`Counters::open`] up while a connection's task lives.
struct Open(IntGauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a checkout found in the pool.
enum Found {
    /// An idle HTTP/1.1 connection, to check before use.
    Idle(http1::SendRequest<Body>),
    /// Nothing: connect, through the origin's gate when given.
    Connect(Option<Gate>),
}

/// Connections by origin.
pub struct Pool<C> {
    connector: C,
    idle_timeout: Duration,
    origins: Mutex<HashMap<Box<str>, Origin>>,
    counters: Option<Counters>,
}

impl<C, S> Pool<C>
where
    C: Service<Uri, Response = S> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    S: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send + 'static,
{
    /// A pool connecting through `connector`, counting its connections in
    /// `counters` when given. Within a tokio runtime, a task sweeps out idle
    /// connections every half `idle_timeout` for as long as the pool lives;
    /// outside one, they expire at checkout only.
    pub fn new(connector: C, idle_timeout: Duration, counters: Option<Counters>) -> Arc<Self> {
        let pool = Arc::new(Self { connector, idle_timeout, origins: Mutex::default(), counters });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&pool), (idle_timeout / 2).max(Duration::from_millis(100))));
        }
        pool
    }

    fn origins(&self) -> MutexGuard<'_, HashMap<Box<str>, Origin>> {
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `origin` (`uri`'s scheme and authority): the
    /// shared HTTP/2 one, an idle HTTP/1.1 one that is still open, or a new
    /// one.
    pub async fn checkout(&self, origin: &str, uri: &Uri) -> Result<Conn, BoxError> {
        // The origin's gate, once this attempt waited for it and holds it.
        let mut held: Option<OwnedMutexGuard<()>> = None;
        loop {
            let found = 'look: {
                let mut origins = self.origins();
                let Some(o) = origins.get_mut(origin) else {
                    // Never connected, or swept: the protocol is unknown.
                    break 'look Found::Connect(origins.entry(origin.into()).or_default().gate(origin));
                };
                let now = Instant::now();
                o.expire_shared(now, self.idle_timeout);
                if let Some((send, since)) = &mut o.shared {
                    *since = now;
                    return Ok(Conn::Http2(send.clone()));
                }
                match o.idle.pop() {
                    Some((send, since)) if now.duration_since(since) < self.idle_timeout => Found::Idle(send),
                    popped => {
                        // The most recently used one idled out, so did the rest.
                        if popped.is_some() {
                            o.idle.clear();
                        }
                        Found::Connect(o.gate(origin))
                    }
                }
            };
            match found {
                Found::Idle(mut send) => {
                    // Ready once the connection has finished the last
                    // exchange; an error when the receiver closed it
                    // meanwhile.
                    if send.ready().await.is_ok() {
                        return Ok(Conn::Http1(send));
                    }
                }
                // Connect holding the gate. When another attempt holds it,
                // wait for it and look again still holding it: a waiter
                // that let go before looking would hand it to the next,
                // and none would connect. While it is held the origin is
                // not swept, so the gate found again is the one held.
                // Connecting is boxed, here and below: its future
                // (resolve, TCP, TLS, handshake) is ~6 KB, and inline it
                // would take that room in every delivery's task, though
                // few attempts connect.
                Found::Connect(Some(gate)) => {
                    let _connecting = match held.take() {
                        Some(guard) => guard,
                        None => match gate.clone().try_lock_owned() {
                            Ok(guard) => guard,
                            Err(_) => {
                                held = Some(gate.lock_owned().await);
                                continue;
                            }
                        },
                    };
                    return Box::pin(self.connect(origin, uri)).await;
                }
                Found::Connect(None) => {
                    drop(held.take());
                    return Box::pin(self.connect(origin, uri)).await;
                }
            }
        }
    }

    async fn connect(&self, origin: &str, uri: &Uri) -> Result<Conn, BoxError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(Into::into)?;
        let stream = connector.call(uri.clone()).await.map_err(Into::into)?;
        if stream.connected().is_negotiated_h2() {
            let (send, connection) =
                http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).handshake(stream).await?;
            self.drive(connection, |c| &c.opened_http2);
            let mut origins = self.origins();
            let o = origins.entry(origin.into()).or_default();
            o.shared = Some((send.clone(), Instant::now()));
            o.http1 = false;
            Ok(Conn::Http2(send))
        } else {
            let (send, connection) = http1::handshake(stream).await?;
            self.drive(connection, |c| &c.opened_http1);
            self.origins().entry(origin.into()).or_default().http1 = true;
            Ok(Conn::Http1(send))
        }
    }

    /// Runs a new connection's task, counted open until it ends (the
    /// receiver closed it, or the pool dropped its last handle).
    fn drive<F>(&self, connection: F, opened: impl Fn(&Counters) -> &IntCounter)
    where
        F: Future + Send + 'static,
    {
        let open = self.counters.as_ref().map(|c| {
            opened(c).inc();
            c.open.inc();
            Open(c.open.clone())
        });
        tokio::spawn(async move {
            let _open = open;
            let _ = connection.await;
        });
    }

    /// Gives back an HTTP/1.1 connection whose response was read to its
    /// end.
    pub fn checkin(&self, origin: &str, send: http1::SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        let mut origins = self.origins();
        match origins.get_mut(origin) {
            Some(o) => o.idle.push((send, Instant::now())),
            None => {
                origins.insert(origin.into(), Origin { idle: vec![(send, Instant::now())], ..Origin::default() });
            }
        }
    }

    /// Closes every connection idle for the idle timeout.
    fn sweep(&self) {
        let now = Instant::now();
        self.origins().retain(|_, o| {
            o.expire(now, self.idle_timeout);
            !o.is_empty()
        });
    }
}

async fn sweep<C, S>(pool: Weak<Pool<C>>, every: Duration)
where
    C: Service<Uri, Response = S> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    S: hyper::rt::Read + hyper::rt::Write + Connection + Unpin + Send + 'static,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}
