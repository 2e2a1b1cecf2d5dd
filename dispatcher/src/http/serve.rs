//! The HTTP front end below the router: the listener ([`Listener`], plain or HTTPS), the accept
//! loop ([`serve`]) with its connection limit (room kept for loopback clients), one task per
//! connection with TCP_NODELAY, the TLS handshake (when configured) and hyper with the
//! header-read timeout, the count of open event streams, and the lingering close that lets a
//! client read an early answer. Connections come in here and leave as requests for the router
//! of `routes.rs`; nothing here looks at a request's contents.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::ApiError;
use super::{router, Handle};
use crate::config::DispatcherConfig;
use crate::error::DispatcherError;

/// hyper's read buffer per connection, which bounds a request's headers (and the memory a
/// connection holds before it is authenticated): headers that do not fit are refused with
/// 431 (hyper checks between reads, so up to twice this gets in). At least 8 KiB (hyper).
const READ_BUFFER: usize = 64 * 1024;

/// Open files besides the HTTP connections: the store, the audit log, the XMPP connection,
/// standard streams, the runtime's own.
const OTHER_FILES: u64 = 64;

/// How long answers in progress get to finish when the dispatcher stops (an event stream
/// never finishes by itself).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The HTTP front end's timeouts and limits (the `http_*` keys of the configuration).
#[derive(Debug, Clone)]
pub(super) struct Limits {
    header_timeout: Duration,
    pub(super) request_timeout: Duration,
    max_connections: usize,
    loopback_reserve: usize,
    max_streams: usize,
    max_streams_per_token: usize,
}

impl Limits {
    pub(super) fn from_config(cfg: &DispatcherConfig) -> Self {
        Limits {
            header_timeout: cfg.http_header_timeout,
            request_timeout: cfg.http_request_timeout,
            max_connections: cfg.http_max_connections,
            loopback_reserve: cfg.http_loopback_reserve,
            max_streams: cfg.http_max_event_streams,
            max_streams_per_token: cfg.http_max_event_streams_per_token,
        }
    }

    /// Connections a client at `peer` may find open and still get in: all of them for
    /// loopback clients, all but the reserve for the others.
    fn connection_cap(&self, peer: SocketAddr) -> usize {
        if is_loopback(peer) {
            self.max_connections
        } else {
            self.max_connections.saturating_sub(self.loopback_reserve)
        }
    }
}

/// A loopback peer, also as an IPv4-mapped IPv6 address (a dual-stack listener).
pub(super) fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// Open connections and the ones refused at the limit, for `/metrics`.
#[derive(Default)]
pub(super) struct ConnCounts {
    pub(super) open: AtomicUsize,
    pub(super) refused: AtomicU64,
}

/// One open connection, counted until it is dropped.
struct ConnSlot(Arc<ConnCounts>);

impl ConnSlot {
    fn take(c: &Arc<ConnCounts>) -> Self {
        c.open.fetch_add(1, Ordering::AcqRel);
        ConnSlot(c.clone())
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Open event streams, in all and per caller (token name, or `local`).
#[derive(Default)]
pub(super) struct Streams(Mutex<StreamCounts>);

#[derive(Default)]
struct StreamCounts {
    total: usize,
    per_caller: HashMap<String, usize>,
}

impl Streams {
    /// Counts a new stream of `who`, or refuses it: 429 past the caller's limit, 503 past the
    /// dispatcher's.
    pub(super) fn open(
        self: &Arc<Self>,
        who: &str,
        limits: &Limits,
    ) -> Result<StreamSlot, ApiError> {
        let mut c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.per_caller.get(who).copied().unwrap_or(0);
        if mine >= limits.max_streams_per_token {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                format!(
                    "'{who}' has {mine} event streams open, the most a token may have (http_max_event_streams_per_token)"
                ),
            ));
        }
        if c.total >= limits.max_streams {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-streams",
                format!(
                    "the dispatcher has {} event streams open, its limit (http_max_event_streams)",
                    c.total
                ),
            ));
        }
        c.total += 1;
        *c.per_caller.entry(who.to_owned()).or_default() += 1;
        Ok(StreamSlot {
            streams: self.clone(),
            who: who.to_owned(),
        })
    }

    pub(super) fn total(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).total
    }
}

/// One open event stream, counted until it is dropped (when its task ends).
pub(super) struct StreamSlot {
    streams: Arc<Streams>,
    who: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut c = self
            .streams
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_caller.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_caller.remove(&self.who);
            }
        }
    }
}

/// The HTTP API's open listening socket, and the TLS configuration its connections are
/// accepted with (HTTPS only), if any.
pub struct Listener {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Listener {
    /// Opens the listener of `http_listen` (none for `"off"`), with the certificate of
    /// `http_tls_cert` when set (read and checked here, at start).
    pub(crate) async fn bind(cfg: &DispatcherConfig) -> Result<Option<Self>, DispatcherError> {
        let Some(addr) = cfg.http_listen else {
            return Ok(None);
        };
        let tls = cfg.http_tls()?.map(TlsAcceptor::from);
        let tcp = TcpListener::bind(addr).await.map_err(|e| {
            DispatcherError::Config(format!("http_listen: cannot listen on {addr}: {e}"))
        })?;
        Ok(Some(Listener { tcp, tls }))
    }

    /// The address it listens on (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// `https` or `http`, for logs.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Serves the API on `listener` until `stop`: one task per connection, at most
/// `http_max_connections` of them, the last `http_loopback_reserve` for loopback clients only.
/// A connection over the limit is answered 503 (JSON) and closed at once, so that the
/// listener's backlog keeps moving and a loopback client still gets in; nothing of it is read.
pub(crate) async fn serve(listener: Listener, h: Handle, stop: CancellationToken) {
    let Listener { tcp: listener, tls } = listener;
    let limits = h.limits.clone();
    let conns = h.conns.clone();
    let app = router(h);
    let mut refusals = Throttled::default();
    let mut accept_errors = Throttled::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                use std::io::ErrorKind::*;
                // The peer gave up before the accept: nothing to do.
                if matches!(
                    e.kind(),
                    ConnectionAborted | ConnectionReset | ConnectionRefused
                ) {
                    continue;
                }
                // Out of file descriptors or memory: wait a little rather than spin; the
                // header timeout frees connections meanwhile.
                if let Some(n) = accept_errors.tick() {
                    warn!("HTTP API: accept failed ({n} times in the last seconds): {e}");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // One accept loop takes the slots, so the check and the count cannot race (slots
        // are only given back meanwhile).
        if conns.open.load(Ordering::Acquire) >= limits.connection_cap(peer) {
            conns.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = refusals.tick() {
                warn!(
                    %peer,
                    "HTTP API: connection limit reached, {n} connections refused (http_max_connections = {}, of which {} for loopback clients)",
                    limits.max_connections, limits.loopback_reserve
                );
            }
            refuse(stream);
            continue;
        }
        let slot = ConnSlot::take(&conns);
        tokio::spawn(serve_connection(
            stream,
            peer,
            tls.clone(),
            app.clone(),
            limits.clone(),
            stop.clone(),
            slot,
        ));
    }
    info!("HTTP API: no longer accepting connections");
}

/// Answers a connection over the limit with 503 and closes it, without reading from it.
fn refuse(stream: TcpStream) {
    const BODY: &str = r#"{"error":"too-many-connections","message":"the dispatcher has as many HTTP connections open as it allows (http_max_connections); try again later"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{BODY}",
        BODY.len()
    );
    // A fresh socket's send buffer takes these few bytes at once; if it does not, the client
    // sees the connection closed, which says the same.
    if let Err(e) = stream
        .set_nodelay(true)
        .and_then(|()| stream.try_write(answer.as_bytes()))
    {
        debug!("HTTP API: refusing a connection: {e}");
    }
}

/// Serves one connection: TCP_NODELAY; with `tls`, the handshake (within the header-read
/// timeout, which thus also bounds a client that never finishes it) and HTTPS only; then
/// [`serve_http`].
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Arc<Limits>,
    stop: CancellationToken,
    slot: ConnSlot,
) {
    // Without it each small write (an event, a JSON answer) may wait for the client's delayed
    // acknowledgement of the previous one: about 40 ms per event stream event.
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, "HTTP API: TCP_NODELAY: {e}");
    }
    let Some(tls) = tls else {
        return serve_http(stream, peer, app, limits, stop, slot).await;
    };
    let handshake = async {
        if !starts_with_tls_record(&stream).await? {
            answer_plain_http(stream).await;
            return Ok(None);
        }
        tls.accept(stream).await.map(Some)
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(limits.header_timeout, handshake) => r,
        _ = stop.cancelled() => return,
    };
    match accepted {
        Ok(Ok(Some(s))) => serve_http(s, peer, app, limits, stop, slot).await,
        Ok(Ok(None)) => debug!(%peer, "HTTP API: plain HTTP on the HTTPS port, answered 400"),
        Ok(Err(e)) => debug!(%peer, "HTTP API: TLS handshake failed: {e}"),
        Err(_) => debug!(%peer, "HTTP API: TLS handshake not finished within http_header_timeout"),
    }
}

/// Whether the client's first byte opens a TLS handshake record (content type 22), without
/// consuming it. A client speaking plain HTTP starts with a method's letter instead.
async fn starts_with_tls_record(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    Ok(n == 1 && first[0] == 0x16)
}

/// Tells a client that sent plain HTTP to the HTTPS port what to do, rather than leaving it
/// with a closed connection (curl and browsers show the body), then closes as an answered
/// connection does ([`linger`]), so that the unread request does not turn the close into a
/// reset that destroys the answer.
async fn answer_plain_http(stream: TcpStream) {
    const BODY: &str =
        r#"{"error":"tls-required","message":"this port serves HTTPS only: use an https:// URL"}"#;
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    // A fresh socket's send buffer takes these few bytes at once.
    if let Err(e) = stream.try_write(answer.as_bytes()) {
        debug!("HTTP API: answering plain HTTP on the HTTPS port: {e}");
        return;
    }
    linger(stream).await;
}

/// Serves one connection (plain or TLS) with hyper: the header-read timeout and a bounded
/// read buffer; on `stop`, a graceful shutdown of at most [`SHUTDOWN_GRACE`]; then [`linger`].
async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    app: Router,
    limits: Arc<Limits>,
    stop: CancellationToken,
    _slot: ConnSlot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    // Boxed futures keep the connection `Unpin`, which `poll_without_shutdown` needs.
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        Box::pin(app.clone().oneshot(req))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's header-read timeout (it needs a timer) also closes a connection idle between
    // requests: the clock starts again when an answer ends.
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(READ_BUFFER);
    let mut conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let served = {
        // Cancellation-safe: the connection keeps its state when this poll is dropped.
        let run = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx));
        tokio::select! {
            r = run => Some(r),
            _ = stop.cancelled() => None,
        }
    };
    let served = match served {
        Some(r) => r,
        None => {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            let run = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx));
            match tokio::time::timeout(SHUTDOWN_GRACE, run).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(%peer, "HTTP API: connection dropped at shutdown");
                    return;
                }
            }
        }
    };
    match served {
        Ok(()) => linger(conn.into_parts().io.into_inner()).await,
        Err(e) => debug!(%peer, "HTTP API: connection ended: {e}"),
    }
}

/// Most bytes [`linger`] reads and drops, and the longest it waits.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Closes a connection whose answer has been sent: first our half (FIN), then, once the
/// client closed its half, or after [`LINGER_BYTES`] or [`LINGER_TIME`], the socket. An early
/// answer (401, 413) leaves the client still sending its body, and closing a socket with
/// unread data resets the connection, which can destroy the answer before the client read it
/// (it then sees "broken pipe" instead of the 413). Go's net/http and nginx linger likewise.
/// The bytes are dropped as they come, never kept. Over TLS our half's close is a
/// close_notify and then the FIN.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut tcp: S) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    if tcp.shutdown().await.is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => dropped += n,
            // Closed by the client (the usual end), an error, or time is up.
            _ => return,
        }
    }
    // Still sending: give it the rest of the time to read the answer, without reading more.
    tokio::time::sleep_until(deadline).await;
}

/// Counts an event and says, at most once a second, how many happened since it last said.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    count: u64,
}

impl Throttled {
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Raises this process's soft open-file limit to what `http_max_connections` needs (every
/// connection holds a descriptor), within the hard limit; refuses to start, naming the key,
/// when the hard limit is too low. Without it, connections past the limit fail at `accept`
/// ("Too many open files") and the dispatcher's own files with them.
pub(crate) fn ensure_open_files(cfg: &DispatcherConfig) -> Result<(), DispatcherError> {
    if cfg.http_listen.is_none() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        let need = cfg.http_max_connections as u64 + OTHER_FILES;
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| {
            DispatcherError::Config(format!(
                "http_max_connections: reading the open-file limit: {e}"
            ))
        })?;
        if soft >= need {
            return Ok(());
        }
        if hard < need {
            return Err(DispatcherError::Config(format!(
                "http_max_connections: {} connections need {need} open files, but this process may open at most {hard} (raise LimitNOFILE= in the systemd unit, or ulimit -n; or lower http_max_connections)",
                cfg.http_max_connections
            )));
        }
        setrlimit(Resource::RLIMIT_NOFILE, need, hard).map_err(|e| {
            DispatcherError::Config(format!(
                "http_max_connections: raising the open-file limit from {soft} to {need}: {e}"
            ))
        })?;
        info!(
            from = soft,
            to = need,
            "raised the open-file limit for http_max_connections"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::from_config(&DispatcherConfig {
            http_max_connections: 10,
            http_loopback_reserve: 3,
            http_max_event_streams: 3,
            http_max_event_streams_per_token: 2,
            ..DispatcherConfig::default()
        })
    }

    #[test]
    fn loopback_clients_may_use_the_reserve() {
        let l = limits();
        for (peer, cap) in [
            ("127.0.0.1:1", 10),
            ("127.9.9.9:1", 10),
            ("[::1]:1", 10),
            ("[::ffff:127.0.0.1]:1", 10),
            ("10.0.0.5:1", 7),
            ("[2001:db8::1]:1", 7),
            ("[::ffff:10.0.0.5]:1", 7),
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(l.connection_cap(peer), cap, "{peer}");
        }
    }

    #[test]
    fn event_streams_are_counted_per_caller_and_in_all_until_dropped() {
        let l = limits();
        let s = Arc::new(Streams::default());
        let a1 = s.open("a", &l).unwrap();
        let _a2 = s.open("a", &l).unwrap();
        let Err(e) = s.open("a", &l) else {
            panic!("a third stream of a")
        };
        assert_eq!(
            (e.status, e.condition),
            (StatusCode::TOO_MANY_REQUESTS, "too-many-streams")
        );
        let _b1 = s.open("b", &l).unwrap();
        let Err(e) = s.open("b", &l) else {
            panic!("a fourth stream in all")
        };
        assert_eq!(
            (e.status, e.condition),
            (StatusCode::SERVICE_UNAVAILABLE, "too-many-streams")
        );
        assert_eq!(s.total(), 3);
        drop(a1);
        assert_eq!(s.total(), 2);
        let _b2 = s.open("b", &l).unwrap();
        assert!(s.open("c", &l).is_err());
    }
}
