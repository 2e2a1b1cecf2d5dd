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
//! - the login binds the session itself; the session is then served by Spine's own stanza
//!   stream (`stream`: the stanza scanner to read, the direct writer to write; one task per
//!   connection), which logs in again after a loss, backing off exponentially with jitter,
//!   and reports failures on [`Connection::take_status`];
//! - both connectors set `TCP_NODELAY`; TLS is STARTTLS with rustls (ring) and an explicit
//!   trust store, required unless the server is on a loopback address.
//!
//! `agent` and `dispatcher` must not depend on each other and `protocol` does no I/O, hence
//! this crate.

#![forbid(unsafe_code)]

pub mod account;
pub mod codec;
mod connector;
pub mod guard;
mod sasl_login;
mod stream;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use jid::{FullJid, Jid};
use rand::Rng as _;
use sasl::common::ChannelBinding;
use tokio::sync::mpsc;
use tokio_xmpp::parsers::bind::{BindQuery, BindResponse};
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::stream_features::StreamFeatures;
use tokio_xmpp::stanzastream::{Event, StreamEvent};
use tokio_xmpp::xmlstream::{ReadError, StreamHeader, Timeouts, XmlStream, XmppStreamElement};
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
    /// To the connection's task: what to send, in order.
    cmds: mpsc::Sender<Stanza>,
    /// From the connection's task.
    events: mpsc::Receiver<Event>,
    bound: FullJid,
    status: Option<mpsc::UnboundedReceiver<Status>>,
    worker: tokio::task::JoinHandle<()>,
}

/// The longest [`Connection::close`] waits for the stream to close.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

pub(crate) static SHORT_SESSIONS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

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

/// The id of the resource-binding request.
const BIND_ID: &str = "spine-bind";

/// A stream on which the login's steps are typed by tokio-xmpp.
type LoginStream = XmlStream<stream::Io, XmppStreamElement>;

/// Connects and authenticates. tokio-xmpp keeps its own `client_auth` private, and its SASL
/// step sends PLAIN on any transport and never checks the server's SCRAM signature; this is
/// the same sequence with `sasl_login` instead.
async fn authenticate<C: tokio_xmpp::connect::ServerConnector>(
    connector: C,
    opts: &ConnectOptions,
) -> Result<(StreamFeatures, LoginStream), ConnectError> {
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
    let (mut features, stream): (StreamFeatures, XmlStream<_, XmppStreamElement>) = stream
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
    Ok((features, stream.box_stream()))
}

/// Binds a resource (the one of `opts.jid`, or one the server picks), then hands over the
/// transport: bytes the server sent after the bind's answer stay in its buffer.
async fn bind(
    mut xs: LoginStream,
    opts: &ConnectOptions,
) -> Result<(FullJid, stream::Io), ConnectError> {
    let failed = |detail: String| ConnectError::Bind {
        addr: opts.addr,
        detail,
    };
    let resource = opts.jid.resource().map(|r| r.as_str().to_owned());
    let request = Iq::from_set(BIND_ID, BindQuery::new(resource));
    xs.send(&XmppStreamElement::Stanza(request.into()))
        .await
        .map_err(|e| ConnectError::Connect {
            addr: opts.addr,
            detail: e.to_string(),
        })?;
    let patience = opts.timeouts.read_timeout + opts.timeouts.response_timeout;
    let answer = tokio::time::timeout(patience, async {
        loop {
            match xs.next().await {
                Some(Ok(XmppStreamElement::Stanza(Stanza::Iq(iq)))) if iq.id() == BIND_ID => {
                    return Ok(iq)
                }
                Some(Ok(XmppStreamElement::StreamError(e))) => {
                    return Err(failed(format!("stream error: {e:?}")))
                }
                Some(Ok(other)) => tracing::debug!("before the bind's answer, ignored {other:?}"),
                Some(Err(ReadError::SoftTimeout)) => {}
                Some(Err(e)) => return Err(failed(e.to_string())),
                None => return Err(failed("the server closed the stream".into())),
            }
        }
    })
    .await
    .map_err(|_| failed(format!("no answer to the bind request within {patience:?}")))??;
    let bound = match answer {
        Iq::Result {
            payload: Some(payload),
            ..
        } => BindResponse::try_from(payload)
            .map(FullJid::from)
            .map_err(|e| failed(format!("unreadable bind answer: {e}")))?,
        Iq::Error { error, .. } => {
            return Err(failed(format!(
                "the server refused: {:?}",
                error.defined_condition
            )))
        }
        other => return Err(failed(format!("unexpected answer {other:?}"))),
    };
    Ok((bound, xs.into_inner()))
}

/// Connects, authenticates and binds.
async fn login<C: tokio_xmpp::connect::ServerConnector>(
    connector: C,
    opts: &ConnectOptions,
) -> Result<stream::Session, ConnectError> {
    let (features, xs) = authenticate(connector, opts).await?;
    let (bound, io) = bind(xs, opts).await?;
    Ok(stream::Session {
        io,
        bound,
        features,
    })
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
    let bound = first.bound.clone();
    let (status_tx, status) = mpsc::unbounded_channel();
    let depth = opts.queue_depth.max(1);
    let (cmds_tx, cmds) = mpsc::channel(depth);
    let (events, events_rx) = mpsc::channel(depth);
    let worker = stream::Worker {
        connector,
        opts,
        cmds,
        events,
        status: status_tx,
        probes: rand::rng().random(),
        inbox: Default::default(),
    };
    let worker = tokio::spawn(worker.run(first));
    Ok(Connection {
        cmds: cmds_tx,
        events: events_rx,
        bound,
        status: Some(status),
        worker,
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
    /// XEP-0199 pings are answered by the connection's task and not returned: every Spine client must answer them
    /// (servers use them to tell live sessions from dead ones).
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.events.recv().await;
        if let Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) = &ev {
            if let Ok(full) = bound_jid.clone().try_into_full() {
                self.bound = full;
            }
        }
        ev
    }

    /// Queues a stanza for sending; waits only for queue space. Stanzas are written in the
    /// order they were queued; one queued while the connection is down is written on the next
    /// session. After [`Connection::close`] nothing is sent.
    pub async fn send(&self, stanza: impl Into<Stanza>) {
        if self.cmds.send(stanza.into()).await.is_err() {
            tracing::debug!("a stanza was not sent: the connection is closed");
        }
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
        let Connection {
            cmds,
            events,
            mut worker,
            ..
        } = self;
        // The task writes what was queued, then the stream's end, and stops logging in again.
        drop(cmds);
        drop(events);
        if tokio::time::timeout(CLOSE_GRACE, &mut worker)
            .await
            .is_err()
        {
            tracing::info!(
                "the stream did not close within {CLOSE_GRACE:?} (server unreachable?): leaving it"
            );
            worker.abort();
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
