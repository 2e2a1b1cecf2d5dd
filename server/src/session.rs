//! One client connection, from TCP accept to close: stream negotiation (STARTTLS, SASL,
//! resource binding), then the stanza loop that stamps `from`, routes, answers what the server
//! itself handles and tracks directed presence so that `unavailable` reaches every recipient
//! when the session ends (RFC 6121 §4.6.3).
//!
//! Each connection is one task that owns its XML stream; other sessions reach it only through
//! its `Outbound` queue (see `router`).

use std::borrow::Cow;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use jid::{BareJid, FullJid, Jid};
use rand::Rng as _;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_xmpp::xmlstream::{
    accept_stream, AcceptedStream, FallibleStreamElement, ReadError, StreamElementError,
    StreamHeader, Timeouts, XmlStream, XmppStreamElement,
};
use tracing::{debug, info, warn};
use xmpp_parsers::bind::{BindFeature, BindQuery, BindResponse};
use xmpp_parsers::disco::{DiscoInfoQuery, DiscoInfoResult, Identity};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::ns;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::roster::Roster;
use xmpp_parsers::sasl::{self, Mechanism};
use xmpp_parsers::stanza::Stanza;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use xmpp_parsers::starttls::{self, StartTls};
use xmpp_parsers::stream_error::{DefinedCondition as StreamCondition, StreamError};
use xmpp_parsers::stream_features::StreamFeatures;

use crate::io::{Limited, StanzaMeter, Transport};
use crate::router::{Delivery, Outbound};
use crate::scram::{Binding, Hash, ScramServer};
use crate::Shared;

pub(crate) type Io = BufStream<Limited>;
type Negotiating = XmlStream<Io, XmppStreamElement>;
/// After bind: read with the stanza scanner, stanzas for other clients relayed as read
/// ([`crate::wire`]).
type Established = crate::wire::Wire;

/// Failed SASL attempts allowed on one connection.
const MAX_AUTH_ATTEMPTS: usize = 3;
/// Time allowed to write a batch of stanzas or a closing stream error.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most queued stanzas written before the next flush.
const WRITE_BATCH: usize = 64;

/// Why negotiation ended without a session. Logged, never sent as such.
#[derive(Debug, thiserror::Error)]
enum NegotiationError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("read: {0}")]
    Read(#[from] ReadError),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("closed by the client")]
    Closed,
}

fn stream_error(condition: StreamCondition, text: &str) -> StreamError {
    let mut e = StreamError {
        condition,
        texts: Default::default(),
        application_specific: Vec::new(),
    };
    if !text.is_empty() {
        // The text may quote what the client sent: characters XML cannot carry are replaced,
        // or the error could not be written at all.
        let text = text
            .chars()
            .map(|c| {
                if spine_protocol::emit::is_xml_char(c) {
                    c
                } else {
                    char::REPLACEMENT_CHARACTER
                }
            })
            .collect();
        e.texts.insert(Default::default(), text);
    }
    e
}

fn new_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

fn timeouts(shared: &Shared) -> Timeouts {
    Timeouts {
        read_timeout: shared.cfg.idle_timeout,
        response_timeout: shared.cfg.ping_timeout,
    }
}

/// Runs one connection to its end. Errors are logged here; nothing propagates.
pub(crate) async fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: crate::admission::Pending,
) {
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%peer, "set_nodelay failed: {e}");
    }
    let login = tokio::time::timeout(
        shared.cfg.login_timeout,
        negotiate(&shared, tcp, peer, pending),
    )
    .await;
    let (xs, me, meter) = match login {
        Ok(Ok(v)) => v,
        Ok(Err(NegotiationError::Closed)) => {
            debug!(%peer, "closed during negotiation");
            return;
        }
        Ok(Err(e)) => {
            info!(%peer, "connection rejected: {e}");
            return;
        }
        Err(_) => {
            info!(%peer, "login timed out after {:?}", shared.cfg.login_timeout);
            return;
        }
    };
    let (session, rx) = Session::new(shared, me, peer, meter);
    session.run(xs, rx).await;
}

/// Sends the features; returns the stream ready to read from.
async fn send_features<T: xso::FromXml>(
    acc: AcceptedStream<Io>,
    shared: &Shared,
    feats: &StreamFeatures,
) -> Result<XmlStream<Io, T>, NegotiationError> {
    let mut acc = acc;
    let header = acc.take_header();
    let domain = shared.cfg.domain.as_str();
    let to_ok = header
        .to
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case(domain));
    let reply = StreamHeader {
        from: Some(Cow::Borrowed(domain)),
        to: None,
        id: Some(Cow::Owned(new_id())),
    };
    let pending = acc.send_header(reply).await?;
    if !to_ok {
        let got = header.to.as_deref().unwrap_or("(none)").to_owned();
        pending
            .send_error(&stream_error(
                StreamCondition::HostUnknown,
                &format!("this server serves '{domain}'"),
            ))
            .await?;
        return Err(NegotiationError::Protocol(format!(
            "stream to unknown host '{got}'"
        )));
    }
    Ok(pending.send_features(feats).await?)
}

async fn next_element(
    xs: &mut Negotiating,
    shared: &Shared,
    meter: &StanzaMeter,
) -> Result<XmppStreamElement, NegotiationError> {
    loop {
        match xs.next().await {
            Some(Ok(el)) => {
                meter.element_done();
                return Ok(el);
            }
            // A soft timeout during login is handled by the login timeout.
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(NegotiationError::Closed)
            }
            Some(Err(ReadError::HardError(e))) => {
                return Err(refuse_over_limit(xs, shared, meter, e).await)
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Which of the transport's limits failed the last read, as the text of the stream error.
fn limit_violation(shared: &Shared, meter: &StanzaMeter) -> Option<String> {
    if meter.too_deep() {
        Some(format!(
            "elements nested deeper than {} levels",
            spine_protocol::depth::MAX_STANZA_DEPTH
        ))
    } else if meter.exceeded() {
        Some(format!(
            "stanza larger than {} bytes",
            shared.cfg.max_stanza_size.as_u64()
        ))
    } else {
        None
    }
}

/// A read failed before the session was bound: if a limit failed it, the stream is closed
/// with `policy-violation` (before any tree of the offending element was built).
async fn refuse_over_limit<T>(
    xs: &mut XmlStream<Io, T>,
    shared: &Shared,
    meter: &StanzaMeter,
    e: std::io::Error,
) -> NegotiationError
where
    T: xso::FromXml,
    for<'a> XmlStream<Io, T>: futures::Sink<&'a StreamError, Error = std::io::Error>,
{
    match limit_violation(shared, meter) {
        Some(text) => {
            close_with(xs, StreamCondition::PolicyViolation, &text).await;
            NegotiationError::Protocol(format!("{text}: stream closed (policy-violation)"))
        }
        None => NegotiationError::Read(ReadError::HardError(e)),
    }
}

async fn close_with<T>(xs: &mut XmlStream<Io, T>, condition: StreamCondition, text: &str)
where
    T: xso::FromXml,
    for<'a> XmlStream<Io, T>: futures::Sink<&'a StreamError, Error = std::io::Error>,
{
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        xs.send(&stream_error(condition, text)).await?;
        xs.shutdown().await
    })
    .await;
}

fn sasl_failure(condition: sasl::DefinedCondition) -> XmppStreamElement {
    XmppStreamElement::Sasl(sasl::Nonza::Failure(sasl::Failure {
        defined_condition: condition,
        texts: Default::default(),
    }))
}

/// STARTTLS, SASL and resource binding. Returns the established stream and the bound JID.
async fn negotiate(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: crate::admission::Pending,
) -> Result<(Established, FullJid, Arc<StanzaMeter>), NegotiationError> {
    let local = crate::config::ServerConfig::is_local(&peer);
    let meter = Arc::new(StanzaMeter::default());
    let limit = shared.cfg.max_stanza_size.as_u64();
    let rate = if local {
        None
    } else {
        shared.cfg.rate_limit.0.map(|b| b.as_u64())
    };
    let wrap = |t: Transport| BufStream::new(Limited::new(t, meter.clone(), limit, rate));

    // Streams before authentication: restarted after STARTTLS. Bounded by auth_timeout, so
    // that sockets which never log in give their place back soon.
    let pre_auth = async {
        let mut io = wrap(Transport::Plain(tcp));
        let mut tls_exporter: Option<Vec<u8>> = None;
        let mut tls = false;
        let user = 'stream: loop {
            let acc = accept_stream(io, ns::JABBER_CLIENT, timeouts(shared)).await?;
            let mut feats = StreamFeatures::default();
            let sasl_allowed = tls || local;
            if !tls {
                feats.starttls = Some(StartTls { required: !local });
            }
            if sasl_allowed {
                feats.sasl_mechanisms = offered_mechanisms(tls, tls_exporter.is_some());
                if tls && tls_exporter.is_some() {
                    // XEP-0440: the binding type our -PLUS mechanisms take, so that clients
                    // use channel binding only when both sides have the same kind.
                    feats.sasl_cb = Some(xmpp_parsers::sasl_cb::SaslChannelBinding {
                        types: vec![xmpp_parsers::sasl_cb::Type::TlsExporter],
                    });
                }
            }
            let mut xs: Negotiating = send_features(acc, shared, &feats).await?;
            let mut attempts = 0;
            loop {
                match next_element(&mut xs, shared, &meter).await? {
                    XmppStreamElement::Starttls(starttls::Nonza::Request(_)) if !tls => {
                        xs.send(&XmppStreamElement::Starttls(starttls::Nonza::Proceed(
                            starttls::Proceed,
                        )))
                        .await?;
                        // The client sends nothing after <starttls/> until it has read <proceed/>,
                        // so the read buffer is empty here.
                        let Transport::Plain(tcp) = xs.into_inner().into_inner().into_inner()
                        else {
                            return Err(NegotiationError::Protocol(
                                "STARTTLS on a TLS stream".into(),
                            ));
                        };
                        let stream = shared
                            .tls()
                            .accept(tcp)
                            .await
                            .map_err(NegotiationError::Tls)?;
                        let conn = stream.get_ref().1;
                        if conn.protocol_version()
                            == Some(tokio_rustls::rustls::ProtocolVersion::TLSv1_3)
                        {
                            tls_exporter = conn
                                .export_keying_material(
                                    vec![0u8; 32],
                                    b"EXPORTER-Channel-Binding",
                                    None,
                                )
                                .ok();
                        }
                        tls = true;
                        io = wrap(Transport::Tls(Box::new(stream)));
                        continue 'stream;
                    }
                    XmppStreamElement::Sasl(sasl::Nonza::Auth(auth)) => {
                        if !sasl_allowed {
                            xs.send(&sasl_failure(sasl::DefinedCondition::EncryptionRequired))
                                .await?;
                            close_with(
                                &mut xs,
                                StreamCondition::PolicyViolation,
                                "STARTTLS is required before authentication",
                            )
                            .await;
                            return Err(NegotiationError::Protocol(
                                "SASL before STARTTLS from a remote address".into(),
                            ));
                        }
                        attempts += 1;
                        let outcome = authenticate(
                            shared,
                            &meter,
                            peer,
                            &mut xs,
                            auth,
                            tls,
                            tls_exporter.as_deref(),
                        )
                        .await?;
                        match outcome {
                            Ok((user, success)) => {
                                shared.admission.succeeded(peer.ip(), &user);
                                info!(%peer, user = %user, tls, "authenticated");
                                let barrier =
                                    XmppStreamElement::Sasl(sasl::Nonza::Success(sasl::Success {
                                        data: success,
                                    }));
                                let acc = xs.accept_reset(&barrier).await?;
                                break 'stream (user, acc);
                            }
                            Err(AuthFailure::Throttled(left)) => {
                                debug!(%peer, "login refused: address in backoff for {left:?}");
                                let text = format!(
                                    "too many failed logins from this address: try again in {} s",
                                    left.as_secs().max(1)
                                );
                                let mut failure = sasl::Failure {
                                    defined_condition: sasl::DefinedCondition::TemporaryAuthFailure,
                                    texts: Default::default(),
                                };
                                failure.texts.insert(String::new(), text.clone());
                                xs.send(&XmppStreamElement::Sasl(sasl::Nonza::Failure(failure)))
                                    .await?;
                                close_with(&mut xs, StreamCondition::PolicyViolation, &text).await;
                                return Err(NegotiationError::Protocol(text));
                            }
                            Err(AuthFailure::Refused { user, reason }) => {
                                let (n, backoff) = shared.admission.failed(peer.ip(), &user);
                                // Never log the password or the SASL data. One line per failure
                                // for the first few from an address, then one per backoff period.
                                match backoff {
                                    Some(d) => {
                                        warn!(%peer, failures = n, "authentication failed: {reason}; refusing logins from {} for {d:?}", peer.ip())
                                    }
                                    None if n <= 3 => {
                                        warn!(%peer, "authentication failed: {reason}")
                                    }
                                    None => {
                                        debug!(%peer, failures = n, "authentication failed: {reason}")
                                    }
                                }
                                xs.send(&sasl_failure(sasl::DefinedCondition::NotAuthorized))
                                    .await?;
                                if attempts >= MAX_AUTH_ATTEMPTS {
                                    close_with(
                                        &mut xs,
                                        StreamCondition::PolicyViolation,
                                        "too many failed authentication attempts",
                                    )
                                    .await;
                                    return Err(NegotiationError::Protocol(
                                        "too many failed authentication attempts".into(),
                                    ));
                                }
                            }
                        }
                    }
                    other => {
                        close_with(
                            &mut xs,
                            StreamCondition::NotAuthorized,
                            "authenticate first",
                        )
                        .await;
                        return Err(NegotiationError::Protocol(format!(
                            "unexpected element before authentication: {}",
                            element_name(&other)
                        )));
                    }
                }
            }
        };
        Ok::<_, NegotiationError>(user)
    };
    let (user, acc) = match tokio::time::timeout(shared.cfg.auth_timeout, pre_auth).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(NegotiationError::Protocol(format!(
                "not authenticated within auth_timeout ({:?})",
                shared.cfg.auth_timeout
            )))
        }
    };
    // Authenticated: no longer counted against the unauthenticated limits.
    drop(pending);

    // After SASL: bind a resource.
    let feats = StreamFeatures {
        bind: Some(BindFeature { required: true }),
        ..Default::default()
    };
    let mut xs: Negotiating = send_features(acc, shared, &feats).await?;
    let bare = BareJid::new(&format!("{user}@{}", shared.cfg.domain)).map_err(|e| {
        NegotiationError::Protocol(format!("user '{user}' makes no valid JID: {e}"))
    })?;
    loop {
        let el = match xs.next().await {
            Some(Ok(el)) => el,
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(NegotiationError::Closed)
            }
            Some(Err(ReadError::HardError(e))) => {
                return Err(refuse_over_limit(&mut xs, shared, &meter, e).await)
            }
            Some(Err(e)) => return Err(e.into()),
        };
        meter.element_done();
        match el {
            XmppStreamElement::Stanza(Stanza::Iq(Iq::Set { id, payload, .. }))
                if payload.is("bind", ns::BIND) =>
            {
                let requested = BindQuery::try_from(payload).ok().and_then(|q| q.resource);
                let resource = match requested.filter(|r| !r.is_empty()) {
                    Some(r) => r,
                    None => format!("spine-{}", new_id()),
                };
                let full = match bare.with_resource_str(&resource) {
                    Ok(f) => f,
                    Err(e) => {
                        let err = StanzaError::new(
                            ErrorType::Modify,
                            DefinedCondition::BadRequest,
                            "en",
                            format!("invalid resource: {e}"),
                        );
                        xs.send(&XmppStreamElement::Stanza(Iq::from_error(id, err).into()))
                            .await?;
                        continue;
                    }
                };
                xs.send(&XmppStreamElement::Stanza(
                    Iq::from_result(id, Some(BindResponse { jid: full.clone() })).into(),
                ))
                .await?;
                // The scanner reads on from the transport, with what tokio-xmpp's parser left
                // in its buffer (a client may send on before the answer).
                let wire = crate::wire::Wire::new(
                    xs.into_inner(),
                    &full,
                    usize::try_from(shared.cfg.max_stanza_size.as_u64()).unwrap_or(usize::MAX),
                    timeouts(shared),
                );
                return Ok((wire, full, meter));
            }
            // Legacy RFC 3921 session establishment some clients still send.
            XmppStreamElement::Stanza(Stanza::Iq(Iq::Set { id, payload, .. }))
                if payload.is("session", "urn:ietf:params:xml:ns:xmpp-session") =>
            {
                xs.send(&XmppStreamElement::Stanza(
                    Iq::empty_result(bare.clone().into(), id).into(),
                ))
                .await?;
            }
            other => {
                let _ = xs
                    .send(&stream_error(
                        StreamCondition::NotAuthorized,
                        "bind a resource first",
                    ))
                    .await;
                let _ = xs.shutdown().await;
                return Err(NegotiationError::Protocol(format!(
                    "unexpected element before bind: {}",
                    element_name(&other)
                )));
            }
        }
    }
}

fn element_name(el: &XmppStreamElement) -> &'static str {
    match el {
        XmppStreamElement::Stanza(Stanza::Iq(_)) => "iq",
        XmppStreamElement::Stanza(Stanza::Message(_)) => "message",
        XmppStreamElement::Stanza(Stanza::Presence(_)) => "presence",
        XmppStreamElement::Sasl(_) => "SASL element",
        XmppStreamElement::Starttls(_) => "STARTTLS element",
        XmppStreamElement::ComponentHandshake(_) => "component handshake",
        XmppStreamElement::StreamError(_) => "stream error",
        XmppStreamElement::SM(_) => "stream management element",
    }
}

/// SASL mechanisms offered on a connection. PLAIN only over TLS or on loopback (the caller
/// offers SASL at all only then); -PLUS only with TLS 1.3 exporter binding.
fn offered_mechanisms(tls: bool, exporter: bool) -> std::collections::BTreeSet<String> {
    let mut m: std::collections::BTreeSet<String> = ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    if tls && exporter {
        m.insert("SCRAM-SHA-256-PLUS".to_owned());
        m.insert("SCRAM-SHA-1-PLUS".to_owned());
    }
    m
}

/// Runs one SASL exchange. Outer error: connection trouble; inner error: authentication failed
/// (with the reason for the log).
/// Why a SASL exchange did not log in.
enum AuthFailure {
    /// The address is in backoff after failed logins: refused unchecked for this long.
    Throttled(Duration),
    /// Wrong credentials or a broken exchange (`user` as claimed, or empty).
    Refused { user: String, reason: String },
}

fn refused(user: &str, reason: impl Into<String>) -> AuthFailure {
    AuthFailure::Refused {
        user: user.to_owned(),
        reason: reason.into(),
    }
}

/// Applies the admission verdict for a login of `user` from `peer`: wait if the account is
/// being guessed, refuse at once if the address is in backoff.
async fn admit_login(shared: &Shared, peer: SocketAddr, user: &str) -> Result<(), AuthFailure> {
    match shared.admission.before_login(peer.ip(), user) {
        crate::admission::Verdict::Refuse(left) => Err(AuthFailure::Throttled(left)),
        crate::admission::Verdict::Proceed(delay) => {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn authenticate(
    shared: &Shared,
    meter: &StanzaMeter,
    peer: SocketAddr,
    xs: &mut Negotiating,
    auth: sasl::Auth,
    tls: bool,
    exporter: Option<&[u8]>,
) -> Result<Result<(String, Vec<u8>), AuthFailure>, NegotiationError> {
    let binding = match exporter {
        Some(e) => Binding::TlsExporter(e.to_vec()),
        None => Binding::NotOffered,
    };
    let (hash, plus) = match auth.mechanism {
        Mechanism::Plain => {
            let user = plain_user(&auth.data).unwrap_or_default();
            if let Err(f) = admit_login(shared, peer, &user).await {
                return Ok(Err(f));
            }
            return Ok(check_plain(shared, &auth.data).map_err(|reason| refused(&user, reason)));
        }
        Mechanism::ScramSha256 => (Hash::Sha256, false),
        Mechanism::ScramSha1 => (Hash::Sha1, false),
        Mechanism::ScramSha256Plus if tls && exporter.is_some() => (Hash::Sha256, true),
        Mechanism::ScramSha1Plus if tls && exporter.is_some() => (Hash::Sha1, true),
        other => {
            return Ok(Err(refused(
                "",
                format!("mechanism {other:?} is not offered"),
            )))
        }
    };
    let user = match ScramServer::username_of(&auth.data) {
        Ok(u) => u,
        Err(e) => return Ok(Err(refused("", e.to_string()))),
    };
    if let Err(f) = admit_login(shared, peer, &user).await {
        return Ok(Err(f));
    }
    let (keys, known) = match shared.accounts().scram_keys(&user, hash) {
        Some(k) => (k, true),
        None => (shared.accounts().decoy_keys(&user, hash), false),
    };
    let nonce: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    let (server, first) = match ScramServer::start(hash, plus, &binding, &auth.data, keys, &nonce) {
        Ok(v) => v,
        Err(e) => return Ok(Err(refused(&user, format!("user '{user}': {e}")))),
    };
    xs.send(&XmppStreamElement::Sasl(sasl::Nonza::Challenge(
        sasl::Challenge { data: first },
    )))
    .await?;
    let response = match next_element(xs, shared, meter).await? {
        XmppStreamElement::Sasl(sasl::Nonza::Response(r)) => r.data,
        XmppStreamElement::Sasl(sasl::Nonza::Abort(_)) => {
            return Ok(Err(refused(
                &user,
                format!("user '{user}': client aborted"),
            )))
        }
        other => {
            return Err(NegotiationError::Protocol(format!(
                "expected a SASL response, got {}",
                element_name(&other)
            )))
        }
    };
    let reason = match server.finish(&response) {
        Ok(fin) if known => return Ok(Ok((user, fin))),
        Ok(_) => format!("unknown user '{user}'"),
        Err(e) if !known => format!("unknown user '{user}' ({e})"),
        Err(e) => format!("user '{user}': {e}"),
    };
    Ok(Err(refused(&user, reason)))
}

/// The user a PLAIN message claims, if it can be read.
fn plain_user(data: &[u8]) -> Option<String> {
    let user = data.split(|b| *b == 0).nth(1)?;
    std::str::from_utf8(user).ok().map(str::to_owned)
}

fn check_plain(shared: &Shared, data: &[u8]) -> Result<(String, Vec<u8>), String> {
    let mut parts = data.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(pw), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed PLAIN message".into());
    };
    let (Ok(user), Ok(pw), Ok(authz)) = (
        std::str::from_utf8(user),
        std::str::from_utf8(pw),
        std::str::from_utf8(authz),
    ) else {
        return Err("PLAIN message is not UTF-8".into());
    };
    if !authz.is_empty() && authz != user && !authz.starts_with(&format!("{user}@")) {
        return Err(format!("user '{user}' may not act as '{authz}'"));
    }
    if shared.accounts().check_password(user, pw) {
        Ok((user.to_owned(), Vec::new()))
    } else {
        Err(format!("wrong password or unknown user '{user}' (PLAIN)"))
    }
}

/// A bound session's state.
struct Session {
    shared: Arc<Shared>,
    me: FullJid,
    conn: u64,
    peer: SocketAddr,
    meter: Arc<StanzaMeter>,
    /// Everyone this session sent available directed presence to.
    directed: HashSet<Jid>,
    /// Sent initial presence.
    available: bool,
    /// Id of the server's keepalive ping in flight.
    ping_id: Option<String>,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        me: FullJid,
        peer: SocketAddr,
        meter: Arc<StanzaMeter>,
    ) -> (Self, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(shared.cfg.outbound_queue);
        let conn = shared.router.new_conn();
        if let Some(old) = shared.router.bind(&me, conn, tx) {
            info!(jid = %me, "resource conflict: closing the older session");
            let _ = old.try_send(Outbound::Close(stream_error(
                StreamCondition::Conflict,
                "replaced by a newer session",
            )));
        }
        info!(jid = %me, %peer, "session bound");
        (
            Session {
                shared,
                me,
                conn,
                peer,
                meter,
                directed: HashSet::new(),
                available: false,
                ping_id: None,
            },
            rx,
        )
    }

    async fn run(mut self, mut xs: Established, mut rx: mpsc::Receiver<Outbound>) {
        let mut shutdown = self.shared.shutdown.clone();
        let reason: Option<StreamError> = loop {
            tokio::select! {
                // Cancellation safety: `changed`, `recv` and `XmlStream::next` keep their
                // progress in the objects they borrow, so a branch that loses the race loses
                // nothing; the partially parsed element stays inside `xs`.
                _ = shutdown.changed() => {
                    break Some(stream_error(StreamCondition::SystemShutdown, "server shutting down"));
                }
                out = rx.recv() => {
                    let Some(out) = out else { break None };
                    match self.write_batch(&mut xs, out, &mut rx).await {
                        Ok(None) => {}
                        Ok(Some(err)) => break Some(err),
                        Err(e) => {
                            debug!(jid = %self.me, "write failed: {e}");
                            break None;
                        }
                    }
                }
                item = xs.next() => {
                    let item = match item {
                        Some(Ok(crate::wire::Read::Relay(r))) => match self.forward(r) {
                            None => {
                                self.meter.element_done();
                                continue;
                            }
                            Some(r) => Some(r.into_element()),
                        },
                        Some(Ok(crate::wire::Read::Element(e))) => Some(Ok(*e)),
                        Some(Err(e)) => Some(Err(e)),
                        None => None,
                    };
                    match self.on_read(item) {
                        Ok(Some(st)) => self.on_stanza(st),
                        Ok(None) => {}
                        Err(ReadOutcome::SoftTimeout) => {
                            let id = new_id();
                            let ping = Iq::from_get(id.clone(), Ping).with_from(Jid::from(self.shared.domain_jid.clone())).with_to(self.me.clone().into());
                            self.ping_id = Some(id);
                            if send_now(&mut xs, Stanza::Iq(ping)).await.is_err() {
                                break None;
                            }
                        }
                        Err(ReadOutcome::Close(e)) => break e,
                    }
                }
            }
        };
        self.end(xs, reason).await;
    }

    /// Writes `first` and whatever else is queued (up to a batch), then flushes.
    async fn write_batch(
        &self,
        xs: &mut Established,
        first: Outbound,
        rx: &mut mpsc::Receiver<Outbound>,
    ) -> Result<Option<StreamError>, std::io::Error> {
        let fut = async {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(out) = next.take() {
                match out {
                    Outbound::Stanza(st) => xs.feed_stanza(*st)?,
                    Outbound::Relayed(bytes) => xs.feed_relayed(&bytes),
                    Outbound::Close(e) => {
                        xs.flush().await?;
                        return Ok(Some(e));
                    }
                }
                n += 1;
                if n < WRITE_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            xs.flush().await?;
            Ok(None)
        };
        match tokio::time::timeout(WRITE_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client does not read",
            )),
        }
    }

    /// Interprets one read result: a stanza to handle, nothing, or the end of the stream.
    fn on_read(
        &mut self,
        item: Option<Result<FallibleStreamElement, ReadError>>,
    ) -> Result<Option<Stanza>, ReadOutcome> {
        match item {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(st)))) => {
                self.meter.element_done();
                Ok(Some(st))
            }
            Some(Ok(FallibleStreamElement::Ok(other))) => {
                self.meter.element_done();
                debug!(jid = %self.me, "ignoring {} after bind", element_name(&other));
                Ok(None)
            }
            Some(Ok(FallibleStreamElement::Err(StreamElementError::InvalidStanza {
                header,
                error,
                name,
                ..
            }))) => {
                self.meter.element_done();
                info!(jid = %self.me, "invalid stanza: {error}");
                self.bounce_invalid(
                    &format!("{name}"),
                    header.type_.as_deref(),
                    header.id,
                    header.to,
                    &error.to_string(),
                );
                Ok(None)
            }
            Some(Ok(FallibleStreamElement::Err(StreamElementError::InvalidNonza {
                qname,
                error,
            }))) => {
                self.meter.element_done();
                info!(jid = %self.me, "invalid element {{{}}}{}: {error}", qname.0, qname.1);
                Err(ReadOutcome::Close(Some(stream_error(
                    StreamCondition::UnsupportedStanzaType,
                    "invalid top-level element",
                ))))
            }
            Some(Err(ReadError::SoftTimeout)) => {
                if self.ping_id.is_some() {
                    Ok(None)
                } else {
                    Err(ReadOutcome::SoftTimeout)
                }
            }
            Some(Err(ReadError::ParseError(e))) => {
                info!(jid = %self.me, "unsupported top-level element: {e}");
                Err(ReadOutcome::Close(Some(stream_error(
                    StreamCondition::UnsupportedStanzaType,
                    "unknown top-level element",
                ))))
            }
            Some(Err(ReadError::HardError(e))) => {
                if let Some(text) = limit_violation(&self.shared, &self.meter)
                    .or_else(|| crate::wire::limit_exceeded(&e))
                {
                    info!(jid = %self.me, "{text}: closing (policy-violation)");
                    Err(ReadOutcome::Close(Some(stream_error(
                        StreamCondition::PolicyViolation,
                        &text,
                    ))))
                } else if e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<minidom::rxml::Error>())
                    .is_some_and(|x| matches!(x, minidom::rxml::Error::InvalidEof(_)))
                {
                    // The socket ended inside an element: a killed or crashed client.
                    debug!(jid = %self.me, "connection closed by peer (mid-stanza)");
                    Err(ReadOutcome::Close(None))
                } else if e.kind() == std::io::ErrorKind::InvalidData {
                    info!(jid = %self.me, "malformed XML: {e}");
                    Err(ReadOutcome::Close(Some(stream_error(
                        StreamCondition::NotWellFormed,
                        &format!("malformed XML: {e}"),
                    ))))
                } else {
                    debug!(jid = %self.me, "connection lost: {e}");
                    Err(ReadOutcome::Close(None))
                }
            }
            Some(Err(ReadError::StreamFooterReceived)) | None => Err(ReadOutcome::Close(None)),
        }
    }

    /// Answers an unparseable IQ request or message with `bad-request`.
    fn bounce_invalid(
        &self,
        kind: &str,
        type_: Option<&str>,
        id: Option<String>,
        to: Option<String>,
        why: &str,
    ) {
        let err = StanzaError::new(
            ErrorType::Modify,
            DefinedCondition::BadRequest,
            "en",
            format!("invalid stanza: {why}"),
        );
        let from = to.and_then(|t| Jid::new(&t).ok());
        let st = match (kind, type_) {
            ("iq", Some("get" | "set")) => {
                let mut iq =
                    Iq::from_error(id.unwrap_or_default(), err).with_to(self.me.clone().into());
                if let Some(f) = from {
                    iq = iq.with_from(f);
                }
                Stanza::Iq(iq)
            }
            ("message", t) if t != Some("error") => {
                let mut m = Message::new(Some(self.me.clone().into()));
                m.type_ = MessageType::Error;
                m.id = id.map(xmpp_parsers::message::Id);
                m.from = from;
                m.payloads.push(err.into());
                Stanza::Message(m)
            }
            _ => return,
        };
        let _ = self.shared.router.to_full(&self.me, st);
    }

    fn server_jid(&self) -> Jid {
        Jid::from(self.shared.domain_jid.clone())
    }

    /// Sends a stanza for another client's full JID on as it was read, when it is for a client
    /// of this server and the recipient's queue takes it ([`crate::wire`]). Gives it back
    /// otherwise, for the typed path (which answers errors, and sends a message for an absent
    /// full JID to the bare one).
    fn forward(&mut self, relay: crate::wire::Relay) -> Option<crate::wire::Relay> {
        if relay.to.domain().as_str() != self.shared.cfg.domain {
            return Some(relay);
        }
        let crate::wire::Relay { to, bytes } = relay;
        match self.shared.router.deliver(&to, Outbound::Relayed(bytes)) {
            Ok(()) => None,
            Err((_, Outbound::Relayed(bytes))) => Some(crate::wire::Relay { to, bytes }),
            // What the router gives back is what it was given.
            Err(_) => None,
        }
    }

    /// Handles one stanza from the client.
    fn on_stanza(&mut self, mut st: Stanza) {
        // RFC 6120 §8.1.2.1: the server stamps `from` with the full JID, whatever the client put.
        let me: Jid = self.me.clone().into();
        let to = match &mut st {
            Stanza::Iq(iq) => {
                *iq.from_mut() = Some(me.clone());
                iq.to().cloned()
            }
            Stanza::Message(m) => {
                m.from = Some(me.clone());
                m.to.clone()
            }
            Stanza::Presence(p) => {
                p.from = Some(me.clone());
                p.to.clone()
            }
        };
        if let Stanza::Iq(iq) = &st {
            if matches!(iq, Iq::Result { .. } | Iq::Error { .. })
                && self.ping_id.as_deref() == Some(iq.id())
                && to
                    .as_ref()
                    .is_none_or(|t| t.as_str() == self.shared.cfg.domain)
            {
                self.ping_id = None;
                return;
            }
        }
        let domain = self.shared.cfg.domain.as_str();
        let own_bare = self.me.to_bare();
        match to {
            // RFC 6120 §10.3: no 'to' means the account itself.
            None => self.for_account(st),
            Some(t) if t.as_str() == domain => self.for_domain(st),
            // An IQ to the account's own bare JID is also for the server, on the account's
            // behalf (RFC 6120 §10.3.3; RFC 6121 §8.5.2.1.3).
            Some(t)
                if matches!(st, Stanza::Iq(_))
                    && t.try_as_full().is_err()
                    && t.to_bare() == own_bare =>
            {
                self.for_account(st)
            }
            Some(t) if t.domain().as_str() != domain => {
                self.reply_error(
                    &st,
                    DefinedCondition::RemoteServerNotFound,
                    ErrorType::Cancel,
                    "this server does not federate",
                    Some(t),
                );
            }
            Some(t) => self.route(st, t),
        }
    }

    /// Stanzas for the user's own account: broadcast presence, and the few IQs the server
    /// answers on the account's behalf (replies come from the account's bare JID,
    /// RFC 6120 §8.1.2.1).
    fn for_account(&mut self, st: Stanza) {
        let account: Jid = self.me.to_bare().into();
        match st {
            Stanza::Presence(p) => {
                match p.type_ {
                    PresenceType::None => {
                        self.available = true;
                        self.shared
                            .router
                            .set_available(&self.me, self.conn, true, p.priority.0);
                    }
                    PresenceType::Unavailable => {
                        self.available = false;
                        self.shared
                            .router
                            .set_available(&self.me, self.conn, false, p.priority.0);
                        self.send_unavailable_to_directed();
                    }
                    // Subscriptions and probes need rosters, which this server does not keep.
                    other => {
                        debug!(jid = %self.me, "ignoring presence of type {other:?}");
                        return;
                    }
                }
                // RFC 6121 §4.2.2 / §4.5.2: broadcast presence reaches the account's own
                // available resources, the sender included (there are no roster contacts).
                let mut p = p;
                p.to = Some(account.clone());
                let _ = self
                    .shared
                    .router
                    .presence_to_bare(&self.me.to_bare(), Stanza::Presence(p));
            }
            Stanza::Message(m) => {
                // A message without 'to' is for the account: its available resources.
                self.route(Stanza::Message(m), account);
            }
            Stanza::Iq(Iq::Get { id, payload, .. }) => {
                let iq = if payload.is("ping", ns::PING) {
                    Iq::empty_result(self.me.clone().into(), id)
                } else if payload.is("query", ns::ROSTER) {
                    Iq::from_result(
                        id,
                        Some(Roster {
                            ver: None,
                            items: Vec::new(),
                        }),
                    )
                } else {
                    Iq::from_error(id, not_supported())
                };
                self.send_self(Stanza::Iq(
                    iq.with_from(account).with_to(self.me.clone().into()),
                ));
            }
            Stanza::Iq(Iq::Set { id, payload, .. }) => {
                let iq = if payload.is("session", "urn:ietf:params:xml:ns:xmpp-session") {
                    Iq::empty_result(self.me.clone().into(), id)
                } else {
                    Iq::from_error(id, not_supported())
                };
                self.send_self(Stanza::Iq(
                    iq.with_from(account).with_to(self.me.clone().into()),
                ));
            }
            Stanza::Iq(_) => {}
        }
    }

    /// Stanzas for the server entity (the domain): XEP-0199 ping and XEP-0030 disco#info.
    fn for_domain(&mut self, st: Stanza) {
        let Stanza::Iq(iq) = st else { return };
        let reply = match iq {
            Iq::Get { id, payload, .. } => {
                if payload.is("ping", ns::PING) {
                    Iq::empty_result(self.me.clone().into(), id)
                } else if payload.is("query", ns::DISCO_INFO)
                    && DiscoInfoQuery::try_from(payload.clone()).is_ok_and(|q| q.node.is_none())
                {
                    Iq::from_result(id, Some(self.server_disco()))
                } else {
                    Iq::from_error(id, not_supported())
                }
            }
            Iq::Set { id, .. } => Iq::from_error(id, not_supported()),
            Iq::Result { .. } | Iq::Error { .. } => return,
        };
        self.send_self(Stanza::Iq(
            reply
                .with_from(self.server_jid())
                .with_to(self.me.clone().into()),
        ));
    }

    fn server_disco(&self) -> DiscoInfoResult {
        DiscoInfoResult {
            node: None,
            identities: vec![Identity::new(
                "server",
                "im",
                "en",
                "Spine embedded XMPP server",
            )],
            features: [ns::DISCO_INFO, ns::PING]
                .into_iter()
                .map(str::to_owned)
                .collect(),
            extensions: Vec::new(),
        }
    }

    /// Routes a stanza to another local entity.
    fn route(&mut self, st: Stanza, to: Jid) {
        let router = &self.shared.router;
        match (st, to.try_as_full()) {
            (Stanza::Presence(p), full) => {
                // Directed presence bookkeeping (RFC 6121 §4.6).
                match p.type_ {
                    PresenceType::None => {
                        self.directed.insert(to.clone());
                    }
                    PresenceType::Unavailable => {
                        self.directed.remove(&to);
                    }
                    _ => {}
                }
                let st = Stanza::Presence(p);
                let _ = match full {
                    Ok(f) => router.to_full(f, st),
                    Err(_) => router.presence_to_bare(&to.to_bare(), st),
                };
            }
            (Stanza::Iq(iq), Ok(full)) => {
                let is_request = matches!(iq, Iq::Get { .. } | Iq::Set { .. });
                let st = Stanza::Iq(iq);
                match router.to_full(full, crate::router::clone_stanza(&st)) {
                    Delivery::Delivered => {}
                    Delivery::Offline if is_request => self.reply_error(
                        &st,
                        DefinedCondition::ServiceUnavailable,
                        ErrorType::Cancel,
                        "recipient is not online",
                        Some(to),
                    ),
                    Delivery::Full if is_request => self.reply_error(
                        &st,
                        DefinedCondition::ResourceConstraint,
                        ErrorType::Wait,
                        "recipient's queue is full",
                        Some(to),
                    ),
                    other => debug!(jid = %self.me, "IQ response to {to} dropped ({other:?})"),
                }
            }
            (Stanza::Iq(iq), Err(_)) => {
                // RFC 6121 §8.5.2.1.3: the server answers IQs to a bare JID on the account's
                // behalf; it has no handlers for them.
                if matches!(iq, Iq::Get { .. } | Iq::Set { .. }) {
                    let st = Stanza::Iq(iq);
                    self.reply_error(
                        &st,
                        DefinedCondition::ServiceUnavailable,
                        ErrorType::Cancel,
                        "no handler for IQs to a bare JID",
                        Some(to),
                    );
                }
            }
            (Stanza::Message(m), full) => {
                let is_error = m.type_ == MessageType::Error;
                let headline = m.type_ == MessageType::Headline;
                let st = Stanza::Message(m);
                let delivery = match full {
                    Ok(f) => match router.to_full(f, crate::router::clone_stanza(&st)) {
                        // RFC 6121 §8.5.3.2.1: to an unavailable full JID, normal and chat go to
                        // the bare JID; headlines are dropped.
                        Delivery::Offline if !headline && !is_error => {
                            router.message_to_bare(&to.to_bare(), crate::router::clone_stanza(&st))
                        }
                        d => d,
                    },
                    Err(_) => {
                        router.message_to_bare(&to.to_bare(), crate::router::clone_stanza(&st))
                    }
                };
                if delivery != Delivery::Delivered && !is_error && !headline {
                    self.reply_error(
                        &st,
                        DefinedCondition::ServiceUnavailable,
                        ErrorType::Cancel,
                        "recipient is not online and messages are not stored",
                        Some(to),
                    );
                }
            }
        }
    }

    /// Sends an error reply to the client for its stanza `st` (never for an error stanza).
    fn reply_error(
        &self,
        st: &Stanza,
        cond: DefinedCondition,
        type_: ErrorType,
        text: &str,
        from: Option<Jid>,
    ) {
        let err = StanzaError::new(type_, cond, "en", text);
        let reply = match st {
            Stanza::Iq(Iq::Get { id, .. } | Iq::Set { id, .. }) => {
                let mut iq = Iq::from_error(id.clone(), err).with_to(self.me.clone().into());
                if let Some(f) = from {
                    iq = iq.with_from(f);
                }
                Stanza::Iq(iq)
            }
            Stanza::Message(m) if m.type_ != MessageType::Error => {
                let mut r = Message::new(Some(self.me.clone().into()));
                r.type_ = MessageType::Error;
                r.id = m.id.clone();
                r.from = from;
                r.payloads.push(err.into());
                Stanza::Message(r)
            }
            _ => return,
        };
        self.send_self(reply);
    }

    /// Queues a stanza for this session's own client.
    fn send_self(&self, st: Stanza) {
        if self.shared.router.to_full(&self.me, st) != Delivery::Delivered {
            debug!(jid = %self.me, "own queue full or closed; reply dropped");
        }
    }

    fn send_unavailable_to_directed(&mut self) {
        for to in std::mem::take(&mut self.directed) {
            let p = Presence::new(PresenceType::Unavailable)
                .with_from(self.me.clone())
                .with_to(to.clone());
            let st = Stanza::Presence(p);
            let _ = match to.try_as_full() {
                Ok(f) => self.shared.router.to_full(f, st),
                Err(_) => self.shared.router.presence_to_bare(&to.to_bare(), st),
            };
        }
    }

    /// Unregisters, tells directed-presence recipients, closes the stream.
    async fn end(mut self, mut xs: Established, reason: Option<StreamError>) {
        self.shared.router.unbind(&self.me, self.conn);
        self.send_unavailable_to_directed();
        let _ = tokio::time::timeout(WRITE_TIMEOUT, xs.close(reason.as_ref())).await;
        info!(jid = %self.me, peer = %self.peer, reason = reason.as_ref().map(|e| e.to_string()).unwrap_or_else(|| "closed".into()), "session ended");
    }
}

fn not_supported() -> StanzaError {
    StanzaError::new(
        ErrorType::Cancel,
        DefinedCondition::ServiceUnavailable,
        "en",
        "not supported by this server",
    )
}

enum ReadOutcome {
    SoftTimeout,
    Close(Option<StreamError>),
}

/// Writes one stanza and flushes (used for the keepalive ping).
async fn send_now(xs: &mut Established, st: Stanza) -> Result<(), std::io::Error> {
    let sent = async {
        xs.feed_stanza(st)?;
        xs.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, sent).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write timed out",
        )),
    }
}
