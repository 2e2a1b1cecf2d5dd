//! `spine-xmpp`: the client side of an XMPP connection, shared by Spine's agent, dispatcher,
//! command-line tools, benchmarks and tests.
//!
//! It exists because tokio-xmpp's stock pieces have traps that cost a factor of 30 or a hang
//! (../shared/XMPP-NOTES.md): its TCP connector sets no `TCP_NODELAY` (≈40 ms per round trip),
//! its `Client` can lose wake-ups on a multi-thread runtime, and its reconnect loop retries a
//! wrong password forever in silence. Here:
//!
//! - [`connect`] makes the first login itself and returns a clear [`ConnectError`] (wrong
//!   password, unreachable server, TLS failure) instead of retrying;
//! - the connection is a tokio-xmpp `StanzaStream` owned by one task (the caller's), with a
//!   reconnector that backs off exponentially with jitter and reports failures on
//!   [`Connection::status`];
//! - both connectors set `TCP_NODELAY`; TLS is STARTTLS with rustls (ring) and an explicit
//!   trust store, required unless the server is on a loopback address.
//!
//! `agent` and `dispatcher` must not depend on each other and `protocol` does no I/O, hence
//! this crate.

#![forbid(unsafe_code)]

pub mod account;
mod connector;
pub mod guard;
mod sasl_login;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt as _;
use jid::{FullJid, Jid};
use rand::Rng as _;
use sasl::common::ChannelBinding;
use tokio::sync::{mpsc, oneshot};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::stanzastream::{
    Connection as RawConnection, Event, StanzaStream, StanzaToken, StreamEvent,
};
use tokio_xmpp::xmlstream::{StreamHeader, Timeouts};
use tokio_xmpp::Stanza;

pub use account::{connect_options, KeyError, TlsConfig, TlsMode};
pub use connector::{PlainConnector, StartTlsConnector, Trust};
pub use tokio_xmpp::stanzastream;

/// How to secure the connection.
#[derive(Debug, Clone)]
pub enum Security {
    /// STARTTLS, required, verifying the server certificate against `trust`.
    StartTls {
        /// Certificates to trust.
        trust: Trust,
        /// Offer `tls-exporter` channel binding (SCRAM-*-PLUS) to the server.
        channel_binding: bool,
    },
    /// Plain TCP. Only for a server on a loopback address, unless `insecure` is set.
    Plain {
        /// Allow plain TCP to a non-loopback address (credentials then travel in clear).
        insecure: bool,
    },
}

/// What [`connect`] needs.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The account: a bare JID (the server picks a resource) or a full JID (asks for one).
    pub jid: Jid,
    /// The account's password.
    pub password: String,
    /// Where the server listens.
    pub addr: SocketAddr,
    /// TLS or not.
    pub security: Security,
    /// Read timeouts of the stream (silence before a keepalive, then before giving up).
    pub timeouts: Timeouts,
    /// Stanzas buffered between the connection worker and the owner.
    pub queue_depth: usize,
}

impl ConnectOptions {
    /// Options with STARTTLS required and the given trust, tight timeouts.
    pub fn new(
        jid: Jid,
        password: impl Into<String>,
        addr: SocketAddr,
        security: Security,
    ) -> Self {
        ConnectOptions {
            jid,
            password: password.into(),
            addr,
            security,
            timeouts: Timeouts::tight(),
            queue_depth: 256,
        }
    }
}

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server refused the credentials.
    #[error("login as {jid} refused by the server: {detail}")]
    Auth {
        /// The account.
        jid: Jid,
        /// The server's reason.
        detail: String,
    },
    /// The JID cannot log in (it needs a local part).
    #[error("{0} cannot log in: the JID needs a user part (user@domain)")]
    NoUser(Jid),
    /// Plain TCP to a non-loopback address without `insecure`.
    #[error(
        "refusing plain TCP to {0}: not a loopback address (use TLS, or set insecure explicitly)"
    )]
    PlainNotAllowed(SocketAddr),
    /// TCP, TLS or stream negotiation failed.
    #[error("cannot connect to {addr}: {detail}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// What failed.
        detail: String,
    },
    /// The server answered but did not bind a session.
    #[error("connected to {addr} but no session was bound: {detail}")]
    Bind {
        /// The server address.
        addr: SocketAddr,
        /// What happened instead.
        detail: String,
    },
}

/// Health of the connection after the first login, reported by the reconnector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// A reconnect attempt failed; the next one follows after `retry_in`.
    ReconnectFailed {
        /// What failed.
        error: String,
        /// Whether the server refused the credentials (retrying is unlikely to help).
        auth: bool,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
}

/// An established client connection.
///
/// Poll [`Connection::next`] continuously (the worker stalls when its event queue is full).
pub struct Connection {
    stream: StanzaStream,
    bound: FullJid,
    status: Option<mpsc::UnboundedReceiver<Status>>,
    /// Set by [`Connection::close`]: the reconnector stops trying.
    closing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The longest [`Connection::close`] waits for the stream to close.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// A session that ends sooner than this after its login "died young": the next login waits
/// (backoff), so that two processes using one account and resource — which the server
/// resolves by closing the older session with `conflict`, over and over — do not take turns
/// hundreds of times a second, and neither does a client whose session something else keeps
/// ending at once.
const SHORT_SESSION: Duration = Duration::from_secs(5);

static SHORT_SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sessions of this process that ended within 5 s of their login (each made the next login
/// wait): a count for metrics. Repeated ones usually mean another process uses the same
/// account and resource.
pub fn short_sessions() -> u64 {
    SHORT_SESSIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// First delay of the reconnect backoff.
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Largest delay of the reconnect backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Connects and authenticates (no bind: the stanza stream binds). tokio-xmpp keeps its own
/// `client_auth` private, and its SASL step sends PLAIN on any transport and never checks
/// the server's SCRAM signature; this is the same sequence with `sasl_login` instead.
async fn authenticate<C: tokio_xmpp::connect::ServerConnector>(
    connector: C,
    opts: &ConnectOptions,
) -> Result<RawConnection, ConnectError> {
    let connect_err = |e: tokio_xmpp::Error| ConnectError::Connect {
        addr: opts.addr,
        detail: e.to_string(),
    };
    let user = opts
        .jid
        .node()
        .map(|n| n.as_str().to_owned())
        .unwrap_or_default();
    let (pending, binding) = connector
        .connect(&opts.jid, ns::JABBER_CLIENT, opts.timeouts)
        .await
        .map_err(connect_err)?;
    let (features, stream) = pending
        .recv_features()
        .await
        .map_err(|e| connect_err(e.into()))?;
    let transport = match opts.security {
        Security::StartTls { .. } => sasl_login::Transport::Tls,
        Security::Plain { insecure } => sasl_login::Transport::Clear {
            allow_plain: insecure,
        },
    };
    let exporter = match &binding {
        ChannelBinding::TlsExporter(data) => Some(data.as_slice()),
        _ => None,
    };
    let stream = sasl_login::login(
        stream,
        &features,
        transport,
        exporter,
        &user,
        &opts.password,
    )
    .await
    .map_err(|e| {
        if e.is_auth() {
            ConnectError::Auth {
                jid: opts.jid.clone(),
                detail: e.to_string(),
            }
        } else {
            ConnectError::Connect {
                addr: opts.addr,
                detail: e.to_string(),
            }
        }
    })?;
    let header = StreamHeader {
        to: Some(Cow::Owned(opts.jid.domain().as_str().to_owned())),
        from: None,
        id: None,
    };
    let (mut features, stream) = stream
        .send_header(header)
        .await
        .map_err(|e| connect_err(e.into()))?
        .recv_features()
        .await
        .map_err(|e| connect_err(e.into()))?;
    // No XEP-0198 stream management, even when the server offers it: with resumption the
    // server keeps a dead client's session "hibernating" for minutes and withholds the
    // `unavailable` that tells a dispatcher an agent is gone (and the dispatcher's own
    // reconnect already re-sends what was in flight). tokio-xmpp enables it whenever the
    // features list it, so it is taken off the list.
    features.stream_management = None;
    Ok(RawConnection {
        stream: stream.box_stream(),
        features,
        identity: opts.jid.clone(),
    })
}

async fn login<C: tokio_xmpp::connect::ServerConnector>(
    connector: C,
    opts: &ConnectOptions,
) -> Result<RawConnection, ConnectError> {
    authenticate(connector, opts).await
}

fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_START
        .saturating_mul(1u32 << attempt.min(8))
        .min(BACKOFF_MAX);
    // Full jitter in [base/2, base]: agents that lost the same server do not return in step.
    let half = base / 2;
    half + Duration::from_millis(rand::rng().random_range(0..=half.as_millis() as u64))
}

/// Logs in once (so bad credentials or an unreachable server are an error here), then keeps
/// the connection up with automatic reconnects.
pub async fn connect(opts: ConnectOptions) -> Result<Connection, ConnectError> {
    if opts.jid.node().is_none() {
        return Err(ConnectError::NoUser(opts.jid.clone()));
    }
    match &opts.security {
        Security::Plain { insecure: false } if !opts.addr.ip().is_loopback() => {
            Err(ConnectError::PlainNotAllowed(opts.addr))
        }
        Security::Plain { .. } => start(PlainConnector { addr: opts.addr }, opts).await,
        Security::StartTls {
            trust,
            channel_binding,
        } => {
            let c =
                StartTlsConnector::new(opts.addr, trust, *channel_binding).map_err(|detail| {
                    ConnectError::Connect {
                        addr: opts.addr,
                        detail,
                    }
                })?;
            start(c, opts).await
        }
    }
}

async fn start<C: tokio_xmpp::connect::ServerConnector>(
    connector: C,
    opts: ConnectOptions,
) -> Result<Connection, ConnectError> {
    let first = login(connector.clone(), &opts).await?;
    let (status_tx, status) = mpsc::unbounded_channel();
    let mut first = Some(first);
    let reconnect_opts = opts.clone();
    // When the current session began, and how many sessions in a row died young.
    let began = std::sync::Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
    let closing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = closing.clone();
    let mut young_in_a_row = 0u32;
    let reconnector = Box::new(
        move |_location: Option<String>, slot: oneshot::Sender<RawConnection>| {
            if let Some(conn) = first.take() {
                *began.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
                let _ = slot.send(conn);
                return;
            }
            let lived = began.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            let wait = if lived < SHORT_SESSION {
                SHORT_SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                young_in_a_row += 1;
                let wait = backoff(young_in_a_row - 1);
                if young_in_a_row >= 2 {
                    tracing::warn!(
                        jid = %reconnect_opts.jid,
                        "the session ended {} ms after it began ({young_in_a_row} times in a row): \
                         if another process uses {} with the same resource, the server replaces \
                         one session with the other (stream error 'conflict'); check that only \
                         one process uses this account and resource. Next login in {:.1} s",
                        lived.as_millis(),
                        reconnect_opts.jid,
                        wait.as_secs_f64()
                    );
                }
                Some(wait)
            } else {
                young_in_a_row = 0;
                None
            };
            let connector = connector.clone();
            let opts = reconnect_opts.clone();
            let status_tx = status_tx.clone();
            let began = began.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
                let mut attempt = 0u32;
                loop {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        // The owner is closing: no more attempts. Dropping the slot would make
                        // tokio-xmpp's worker panic, so it is left unanswered instead (the
                        // worker waits on it until the process ends, which is imminent).
                        std::mem::forget(slot);
                        return;
                    }
                    match login(connector.clone(), &opts).await {
                        Ok(conn) => {
                            tracing::info!(jid = %opts.jid, "reconnected");
                            *began.lock().unwrap_or_else(|p| p.into_inner()) =
                                std::time::Instant::now();
                            let _ = slot.send(conn);
                            return;
                        }
                        Err(e) => {
                            if slot.is_closed() {
                                return; // the stream worker is gone: nobody waits
                            }
                            let retry_in = backoff(attempt);
                            attempt = attempt.saturating_add(1);
                            let auth = matches!(e, ConnectError::Auth { .. });
                            // The owner may have dropped its `Connection` meanwhile; the
                            // worker still waits for this slot, and tokio-xmpp panics if the
                            // slot is dropped unanswered, so keep trying (quietly) until the
                            // worker itself goes away.
                            let owner = status_tx
                                .send(Status::ReconnectFailed {
                                    error: e.to_string(),
                                    auth,
                                    retry_in,
                                })
                                .is_ok();
                            if owner {
                                tracing::warn!(jid = %opts.jid, "reconnect failed: {e}; next attempt in {retry_in:?}");
                            } else {
                                tracing::debug!(jid = %opts.jid, "reconnect failed after the owner left: {e}");
                            }
                            tokio::time::sleep(retry_in).await;
                        }
                    }
                }
            });
        },
    );
    let mut stream = StanzaStream::new(reconnector, opts.queue_depth);
    // The first event is the bind of the connection made above.
    let bound = loop {
        match tokio::time::timeout(opts.timeouts.read_timeout, stream.next()).await {
            Ok(Some(Event::Stream(StreamEvent::Reset { bound_jid, .. }))) => {
                break bound_jid.try_into_full().map_err(|j| ConnectError::Bind {
                    addr: opts.addr,
                    detail: format!("server bound a bare JID {j}"),
                })?
            }
            Ok(Some(other)) => tracing::debug!("event before bind: {other:?}"),
            Ok(None) => {
                return Err(ConnectError::Bind {
                    addr: opts.addr,
                    detail: "stream closed".into(),
                })
            }
            Err(_) => {
                return Err(ConnectError::Bind {
                    addr: opts.addr,
                    detail: "no bind within the read timeout".into(),
                })
            }
        }
    };
    Ok(Connection {
        stream,
        bound,
        status: Some(status),
        closing,
    })
}

impl Connection {
    /// The full JID the server bound (changes after a reconnect: see [`StreamEvent::Reset`]).
    pub fn jid(&self) -> &FullJid {
        &self.bound
    }

    /// The next event: a stanza, or a stream reset/suspension/resumption.
    ///
    /// Cancellation-safe (a `select!` branch that loses loses nothing).
    ///
    /// XEP-0199 pings are answered here and not returned: every Spine client must answer them
    /// (servers use them to tell live sessions from dead ones).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let ev = self.stream.next().await;
            match &ev {
                Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => {
                    if let Ok(full) = bound_jid.clone().try_into_full() {
                        self.bound = full;
                    }
                }
                Some(Event::Stanza(Stanza::Iq(Iq::Get {
                    id, from, payload, ..
                }))) if payload.is("ping", ns::PING) => {
                    let mut pong = Iq::empty_result(
                        from.clone().unwrap_or_else(|| self.bound.to_bare().into()),
                        id.clone(),
                    );
                    if from.is_none() {
                        // A ping without 'from' comes from our own server on our behalf.
                        pong = Iq::Result {
                            from: None,
                            to: None,
                            id: id.clone(),
                            payload: None,
                        };
                    }
                    self.stream.send(Box::new(pong.into())).await;
                    continue;
                }
                _ => {}
            }
            return ev;
        }
    }

    /// Queues a stanza for sending; waits only for queue space.
    pub async fn send(&self, stanza: impl Into<Stanza>) -> StanzaToken {
        self.stream.send(Box::new(stanza.into())).await
    }

    /// The receiver of reconnect status reports, so that an event loop can wait on it beside
    /// [`Connection::next`]. `None` once taken.
    pub fn take_status(&mut self) -> Option<mpsc::UnboundedReceiver<Status>> {
        self.status.take()
    }

    /// Closes the stream cleanly (stream footer, then TCP close), waiting at most 3 s: with
    /// the server unreachable the connection worker is in a reconnect that will not finish,
    /// and a process shutting down must not wait for it. Reconnect attempts stop.
    pub async fn close(self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if tokio::time::timeout(CLOSE_GRACE, self.stream.close())
            .await
            .is_err()
        {
            tracing::info!(
                "the stream did not close within {CLOSE_GRACE:?} (server unreachable?): leaving it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            let base = BACKOFF_START
                .saturating_mul(1u32 << attempt.min(8))
                .min(BACKOFF_MAX);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        assert!(backoff(30) <= BACKOFF_MAX);
    }
}
