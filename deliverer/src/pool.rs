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
//! A request handed to a connection that closed before writing it (a
//! kept-alive connection the receiver closed just as it was taken: its
//! close arrived after the checkout found it open; or a new one the
//! receiver reset before the request was on it; over HTTP/2, a shared
//! connection that ended before its task took the request) comes back
//! unsent, and [`Pool::send`] sends it again on another connection, up
//! to [`RESENDS`] times: it never reached the receiver, so this cannot
//! deliver it twice, and the attempt does not fail for a race of the
//! connection's. A request the connection wrote and got no answer to is
//! not sent again here (the receiver may have acted on it); the
//! deliverer's retries take it.
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
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
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

/// How many times [`Pool::send`] sends a request again after a connection
/// gave it back unsent.
pub const RESENDS: u32 = 2;

/// Why a request got no response.
pub enum Broken {
    /// No connection: the address guard, the TCP connect, TLS, or the
    /// protocol handshake.
    Connect(BoxError),
    /// The connection failed during the exchange, or gave the request back
    /// unsent once more than [`RESENDS`] allow.
    Transport(hyper::Error),
}

/// A response, and over HTTP/1.1 the connection to give back once it was
/// read to its end ([`Pool::checkin`]).
pub type Sent = (Response<Incoming>, Option<http1::SendRequest<Body>>);

/// How one send ended without a response.
enum Failed {
    Broken(Broken),
    /// Given back unsent (the request is back in its slot), with why.
    Unsent(hyper::Error),
}

/// The request in `request`, addressed to `uri`, with an empty one (no
/// allocation) left in its place until it comes back unsent.
fn take_to(request: &mut Request<Body>, uri: &Uri) -> Request<Body> {
    let mut r = std::mem::take(request);
    *r.uri_mut() = uri.clone();
    r
}

/// The response, or why there is none with the request put back in
/// `request` when the connection gave it back unsent.
fn sent_or_back(
    sent: Result<Response<Incoming>, TrySendError<Request<Body>>>,
    request: &mut Request<Body>,
) -> Result<Response<Incoming>, Failed> {
    sent.map_err(|mut e| match e.take_message() {
        Some(unsent) => {
            *request = unsent;
            Failed::Unsent(e.into_error())
        }
        None => Failed::Broken(Broken::Transport(e.into_error())),
    })
}

/// A connection to send one request on.
enum Conn {
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
    /// Requests sent again because their connection closed before
    /// writing them.
    pub resent: IntCounter,
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
    async fn checkout(&self, origin: &str, uri: &Uri) -> Result<Conn, BoxError> {
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

    /// Sends the request in `request` to `origin` on a connection from the
    /// pool (`uri` the whole URL, `path` its path and query for HTTP/1.1's
    /// request line), and again on another one when it comes back unsent
    /// (see the module's documentation). Returns the response and, over
    /// HTTP/1.1, the connection to give back once the response was read to
    /// its end.
    ///
    /// The request is taken out of `request` when it is sent, and put back
    /// while it waits to be sent again: held by reference, it takes no
    /// room of its own in this future, which every attempt's carries.
    /// What is left in `request` afterwards is of no use.
    pub async fn send(&self, origin: &str, uri: &Uri, path: &Uri, request: &mut Request<Body>) -> Result<Sent, Broken> {
        let mut unsent = match self.send_once(origin, uri, path, request).await {
            Ok(sent) => return Ok(sent),
            Err(Failed::Broken(broken)) => return Err(broken),
            Err(Failed::Unsent(e)) => e,
        };
        // Boxed: rare, and this future is in every delivery's task.
        Box::pin(async {
            for _ in 0..RESENDS {
                if let Some(c) = &self.counters {
                    c.resent.inc();
                }
                match self.send_once(origin, uri, path, request).await {
                    Ok(sent) => return Ok(sent),
                    Err(Failed::Broken(broken)) => return Err(broken),
                    Err(Failed::Unsent(e)) => unsent = e,
                }
            }
            Err(Broken::Transport(unsent))
        })
        .await
    }

    /// One checkout and one send of the request in `request`, put back
    /// there when the connection gives it back unsent.
    async fn send_once(
        &self,
        origin: &str,
        uri: &Uri,
        path: &Uri,
        request: &mut Request<Body>,
    ) -> Result<Sent, Failed> {
        let conn = self.checkout(origin, uri).await.map_err(|e| Failed::Broken(Broken::Connect(e)))?;
        match conn {
            Conn::Http1(mut send) => {
                let sent = send.try_send_request(take_to(request, path)).await;
                sent_or_back(sent, request).map(|response| (response, Some(send)))
            }
            Conn::Http2(mut send) => {
                let sent = send.try_send_request(take_to(request, uri)).await;
                sent_or_back(sent, request).map(|response| (response, None))
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

#[cfg(test)]
mod tests {
    //! [`Pool::send`] against the reference receiver on loopback. The race
    //! it covers (a kept-alive connection's close arriving between the
    //! checkout that found it open and the request's write) cannot be made
    //! to happen on demand with a bare socket, so the connections here wrap
    //! real TCP streams in one that can be told to read the receiver's
    //! close (end of stream) from a given moment: the only part not real.
    //! For HTTP/2 the streams say so as TLS's ALPN would, and the receiver
    //! takes HTTP/2 with prior knowledge; the TLS itself is the end-to-end
    //! tests' (`tests/tests/deliverer.rs`).

    use std::{
        io,
        net::SocketAddr,
        pin::Pin,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        task::{Context, Poll},
    };

    use http_body_util::BodyExt;
    use hyper_util::{client::legacy::connect::Connected, rt::TokioIo};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A TCP stream that reads end of stream once `closed` is set, and
    /// says it negotiated HTTP/2 when `h2`.
    struct Closable {
        io: TokioIo<TcpStream>,
        closed: Arc<AtomicBool>,
        h2: bool,
    }

    impl hyper::rt::Read for Closable {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if this.closed.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            Pin::new(&mut this.io).poll_read(cx, buf)
        }
    }

    impl hyper::rt::Write for Closable {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    impl Connection for Closable {
        fn connected(&self) -> Connected {
            if self.h2 { Connected::new().negotiated_h2() } else { Connected::new() }
        }
    }

    /// Connects to `to` over `h2` or HTTP/1.1; each connection's close
    /// switch is kept in `switches`, in order, set from the start for the
    /// first `born_closed`.
    #[derive(Clone)]
    struct Connector {
        to: SocketAddr,
        h2: bool,
        born_closed: usize,
        switches: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    }

    impl Connector {
        fn switch(&self, n: usize) -> Arc<AtomicBool> {
            self.switches.lock().unwrap()[n].clone()
        }

        fn connections(&self) -> usize {
            self.switches.lock().unwrap().len()
        }
    }

    impl Service<Uri> for Connector {
        type Response = Closable;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<Closable>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            let mut switches = self.switches.lock().unwrap();
            let closed = Arc::new(AtomicBool::new(switches.len() < self.born_closed));
            switches.push(closed.clone());
            let (to, h2) = (self.to, self.h2);
            Box::pin(async move { Ok(Closable { io: TokioIo::new(TcpStream::connect(to).await?), closed, h2 }) })
        }
    }

    const TOKEN: &str = "token-0123456789";

    /// The project's reference receiver on loopback (it keeps connections
    /// alive and counts what it reads).
    async fn receiver() -> (receiver::Receiver, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let expected = vec![receiver::Expected { name: "d".into(), token: TOKEN.into(), secret: None }];
        let config = receiver::ReceiverConfig { expected, ..Default::default() };
        let r = receiver::Receiver::new(config).unwrap();
        tokio::spawn(r.clone().serve(listener, std::future::pending()));
        (r, to)
    }

    fn counters() -> Counters {
        Counters {
            opened_http1: IntCounter::new("opened_http1", "-").unwrap(),
            opened_http2: IntCounter::new("opened_http2", "-").unwrap(),
            open: IntGauge::new("open", "-").unwrap(),
            resent: IntCounter::new("resent", "-").unwrap(),
        }
    }

    struct World {
        pool: Arc<Pool<Connector>>,
        connector: Connector,
        counters: Counters,
        receiver: receiver::Receiver,
        sent: AtomicUsize,
        origin: String,
        uri: Uri,
        path: Uri,
    }

    /// A pool connecting to the receiver over `h2` or HTTP/1.1, the first
    /// `born_closed` connections closed from the start.
    async fn world(h2: bool, born_closed: usize) -> World {
        let (receiver, to) = receiver().await;
        let connector = Connector { to, h2, born_closed, switches: Arc::default() };
        let counters = counters();
        World {
            pool: Pool::new(connector.clone(), Duration::from_secs(60), Some(counters.clone())),
            connector,
            counters,
            receiver,
            sent: AtomicUsize::new(0),
            origin: format!("http://{to}"),
            uri: format!("http://{to}/in").parse().unwrap(),
            path: "/in".parse().unwrap(),
        }
    }

    impl World {
        /// One exchange, its response read to the end and its connection
        /// given back.
        async fn exchange(&self) -> Result<u16, Broken> {
            let id = self.sent.fetch_add(1, Ordering::SeqCst);
            let request = Request::post(self.uri.clone())
                .header("x-gitlab-event-streaming-token", TOKEN)
                .body(Full::new(Bytes::from(format!(r#"{{"id":"e-{id}"}}"#))))
                .unwrap();
            let mut request = request;
            let (response, reusable) = self.pool.send(&self.origin, &self.uri, &self.path, &mut request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await.unwrap();
            if let Some(send) = reusable {
                self.pool.checkin(&self.origin, send);
            }
            Ok(status)
        }

        /// The requests the receiver read.
        fn requests(&self) -> u64 {
            let stats = self.receiver.stats();
            stats.unique + stats.duplicates + stats.rejected
        }
    }

    // A current-thread runtime: a connection's task runs only when the
    // test waits, so it reads the close only once the request was handed
    // to it, as in the race.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_its_connection_closed_before_writing_is_sent_again_on_another() {
        let w = world(false, 0).await;
        assert!(matches!(w.exchange().await, Ok(200)));
        assert_eq!(w.connector.connections(), 1);
        // The receiver closes the idle connection; its close is read only
        // after the checkout found the connection open.
        w.connector.switch(0).store(true, Ordering::SeqCst);
        assert!(matches!(w.exchange().await, Ok(200)), "the request was not sent again");
        assert_eq!(w.counters.resent.get(), 1);
        assert_eq!(w.connector.connections(), 2, "sent again on a new connection");
        assert_eq!(w.requests(), 2, "the receiver got each request once");
        // The new connection is kept and reused.
        assert!(matches!(w.exchange().await, Ok(200)));
        assert_eq!(w.connector.connections(), 2);
        assert_eq!(w.counters.resent.get(), 1);
    }

    /// Every connection (over `h2` or HTTP/1.1) closed from the start: the
    /// request fails once it came back unsent more than [`RESENDS`] allow.
    async fn given_back_again_and_again_fails_after_the_resends(h2: bool) {
        let w = world(h2, usize::MAX).await;
        let Err(Broken::Transport(e)) = w.exchange().await else {
            panic!("a request no connection would take did not fail as a transport error");
        };
        assert!(e.is_canceled(), "{e}");
        assert_eq!(w.counters.resent.get(), u64::from(RESENDS));
        assert_eq!(w.connector.connections(), 1 + RESENDS as usize, "one connection per try");
        let opened = if h2 { &w.counters.opened_http2 } else { &w.counters.opened_http1 };
        assert_eq!(opened.get(), 1 + u64::from(RESENDS));
        assert_eq!(w.requests(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_given_back_unsent_again_and_again_fails_after_the_resends() {
        given_back_again_and_again_fails_after_the_resends(false).await;
    }

    // A new HTTP/2 connection the receiver closed at once (as one at its
    // connection limit would): the request handed to it comes back unsent
    // when its connection task ends.
    #[tokio::test(flavor = "current_thread")]
    async fn over_http2_a_request_given_back_unsent_is_sent_again_on_a_new_shared_connection() {
        let w = world(true, 1).await;
        assert!(matches!(w.exchange().await, Ok(200)), "the request was not sent again");
        assert_eq!(w.counters.resent.get(), 1);
        assert_eq!(w.connector.connections(), 2, "sent again on a new connection");
        assert_eq!(w.counters.opened_http2.get(), 2);
        assert_eq!(w.requests(), 1, "the receiver got the request once");
        let got = w.receiver.received();
        assert_eq!(got[0].version, "HTTP/2.0");
        // The new connection is the origin's shared one from now on.
        for _ in 0..3 {
            assert!(matches!(w.exchange().await, Ok(200)));
        }
        assert_eq!(w.connector.connections(), 2);
        assert_eq!(w.counters.resent.get(), 1);
        assert_eq!(w.counters.opened_http1.get(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn over_http2_a_request_given_back_unsent_again_and_again_fails_after_the_resends() {
        given_back_again_and_again_fails_after_the_resends(true).await;
    }
}
