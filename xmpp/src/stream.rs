//! The clients' own stanza stream: one task per connection that writes what the owner sends,
//! reads what the server sends, keeps the session alive and logs in again when it is lost.
//!
//! It replaces tokio-xmpp's `StanzaStream`, which read every byte through rxml's parser into
//! typed stanzas and wrote every stanza back through its serialiser and a watch channel per
//! stanza: in a no-op job's cost the agent spent about 64 % of its CPU in that stream and the
//! dispatcher about 25 % (issue 19, BENCHMARKS.md). Here stanzas are found by the stanza
//! scanner ([`spine_protocol::scan`]), typed by [`crate::codec::decode_found`], and written by
//! [`crate::codec::StanzaEncoder`] (the direct writer for a job's stanzas).
//!
//! What the owner sees is what tokio-xmpp's stream gave it (docs/client-stream.md has the list
//! and the tests of each): a stanza at a time; `Suspended` as soon as a connection is lost,
//! before logging in again; `Reset` once per new session, before any of its stanzas; never
//! `Resumed`; the end of the events only after the owner closed. Stanzas queued but not yet
//! written when a connection is lost are written on the next session, in order. Three things
//! differ on purpose: the answer to the stream's own liveness ping is not passed to the owner,
//! XEP-0199 pings are answered here (not in [`crate::Connection::next`], where a cancelled
//! call could lose the answer), and a stream error from the server ends the connection
//! without an error of our own in reply.
//!
//! Hand-written because no crate offers an XMPP client stream that reads without building
//! every stanza twice.

use std::collections::VecDeque;
use std::time::Duration;

use jid::FullJid;
use spine_protocol::depth::MAX_STREAM_DEPTH;
use spine_protocol::scan::{Reader, Scan, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc::{self, error::TryRecvError, error::TrySendError};
use tokio::time::Instant;
use tokio_xmpp::connect::AsyncReadAndWrite;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::stanzastream::{Event, StreamEvent};
use tokio_xmpp::xmlstream::{FallibleStreamElement, XmppStreamElement};
use tokio_xmpp::Stanza;
use xmpp_parsers::stream_error::{DefinedCondition, StreamError};
use xmpp_parsers::stream_features::StreamFeatures;

use crate::codec::{decode_found, StanzaEncoder, CLIENT_NS};
use crate::{ConnectError, ConnectOptions, Status};

/// A connection's transport after login and bind (TLS or not, read through the nesting
/// filter, buffered).
pub(crate) type Io = Box<dyn AsyncReadAndWrite + Send>;

/// A bound session, handed from the login to the stream.
pub(crate) struct Session {
    pub(crate) io: Io,
    pub(crate) bound: FullJid,
    pub(crate) features: StreamFeatures,
}

/// The largest stanza a client reads. tokio-xmpp had no limit; the server's own limit is what
/// normally bounds a stanza, and this only keeps a broken peer from filling the memory.
const MAX_STANZA_BYTES: usize = 64 << 20;

/// Encoded bytes at which the stream stops taking the owner's stanzas until some are written.
const HIGH_WATER: usize = 64 << 10;

/// Bytes read from the transport at a time.
const READ_CHUNK: usize = 16 << 10;

/// The log target of every stanza sent and received (`--log info,spine_xmpp::wire=trace`).
const WIRE: &str = "spine_xmpp::wire";

/// The id prefix of the stream's own liveness pings (their answers are not passed on).
const PROBE_PREFIX: &str = "spine-liveness-";

/// How long ending a stream waits for the server to end its side. Closing the socket while the
/// server's bytes are unread can reset the connection and lose what was written last.
const FOOTER_WAIT: Duration = Duration::from_secs(5);

/// A session that ends sooner than this after its login "died young": the next login waits
/// (backoff), so that two processes using one account and resource — which the server
/// resolves by closing the older session with `conflict`, over and over — do not take turns
/// hundreds of times a second, and neither does a client whose session something else keeps
/// ending at once.
const SHORT_SESSION: Duration = Duration::from_secs(5);

/// How a session ended.
enum End {
    /// The connection was lost (the reason, for the log).
    Lost(String),
    /// The owner closed: everything it sent was written, then the stream's end.
    Closed,
}

/// The connection's task.
pub(crate) struct Worker<C> {
    pub(crate) connector: C,
    pub(crate) opts: ConnectOptions,
    /// What the owner sends, in order.
    pub(crate) cmds: mpsc::Receiver<Stanza>,
    /// What the owner reads.
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) status: mpsc::UnboundedSender<Status>,
    /// Liveness pings sent (their ids).
    pub(crate) probes: u64,
    /// Events read and not yet taken by the owner's channel (delivered before `Suspended`
    /// when the connection is lost: what was read is not lost with it).
    pub(crate) inbox: VecDeque<Event>,
}

impl<C: tokio_xmpp::connect::ServerConnector> Worker<C> {
    /// Serves `first` (the session of the first login), then each session that replaces a
    /// lost one, until the owner closes or goes away.
    pub(crate) async fn run(mut self, first: Session) {
        let mut session = first;
        let mut young_in_a_row = 0u32;
        loop {
            let began = Instant::now();
            let jid = session.bound.clone();
            match self.serve(session).await {
                End::Closed => return,
                End::Lost(why) => tracing::info!(%jid, "connection lost: {why}"),
            }
            while let Some(ev) = self.inbox.pop_front() {
                if self.events.send(ev).await.is_err() {
                    return;
                }
            }
            if self
                .events
                .send(Event::Stream(StreamEvent::Suspended))
                .await
                .is_err()
            {
                return; // the owner is gone
            }
            let lived = began.elapsed();
            let wait = if lived < SHORT_SESSION {
                crate::SHORT_SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                young_in_a_row += 1;
                let wait = crate::backoff(young_in_a_row - 1);
                if young_in_a_row >= 2 {
                    tracing::warn!(
                        jid = %self.opts.jid,
                        "the session ended {} ms after it began ({young_in_a_row} times in a row): \
                         if another process uses {} with the same resource, the server replaces \
                         one session with the other (stream error 'conflict'); check that only \
                         one process uses this account and resource. Next login in {:.1} s",
                        lived.as_millis(),
                        self.opts.jid,
                        wait.as_secs_f64()
                    );
                }
                Some(wait)
            } else {
                young_in_a_row = 0;
                None
            };
            let events = self.events.clone();
            session = tokio::select! {
                s = self.reconnect(wait) => s,
                // The owner closed while the server was away: nothing more to do.
                () = events.closed() => return,
            };
            let reset = StreamEvent::Reset {
                bound_jid: session.bound.clone().into(),
                features: session.features.clone(),
            };
            if self.events.send(Event::Stream(reset)).await.is_err() {
                return;
            }
        }
    }

    /// Logs in again, with backoff, until it works.
    async fn reconnect(&mut self, wait: Option<Duration>) -> Session {
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        let mut attempt = 0u32;
        loop {
            match crate::login(self.connector.clone(), &self.opts).await {
                Ok(session) => {
                    tracing::info!(jid = %self.opts.jid, "reconnected");
                    return session;
                }
                Err(e) => {
                    let retry_in = crate::backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    let auth = matches!(e, ConnectError::Auth { .. });
                    let owner = self
                        .status
                        .send(Status::ReconnectFailed {
                            error: e.to_string(),
                            auth,
                            retry_in,
                        })
                        .is_ok();
                    if owner {
                        tracing::warn!(jid = %self.opts.jid, "reconnect failed: {e}; next attempt in {retry_in:?}");
                    } else {
                        tracing::debug!(jid = %self.opts.jid, "reconnect failed: {e}");
                    }
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    }

    /// One session: writes what the owner sends and reads what the server sends, neither
    /// waiting for the other, until the connection is lost or the owner closes.
    async fn serve(&mut self, session: Session) -> End {
        let me = session.bound;
        let (mut rd, mut wr) = tokio::io::split(session.io);
        let mut reader = Reader::new(Scope {
            default_ns: CLIENT_NS,
            max_bytes: MAX_STANZA_BYTES,
            // The stream's nesting limit (the filter under the transport) counts the stream's
            // element; the scanner's, the stanza's. What the filter leaves in is never refused.
            max_depth: MAX_STREAM_DEPTH - 1,
        });
        let mut encoder = StanzaEncoder::new();
        let mut out: Vec<u8> = Vec::with_capacity(8 << 10);
        // Bytes of `out` already written.
        let mut written = 0usize;
        let mut unflushed = false;
        let inbox = &mut self.inbox;
        let mut buf = vec![0u8; READ_CHUNK];
        let timeouts = self.opts.timeouts;
        let mut last_read = Instant::now();
        // When the liveness ping still unanswered (by any byte) was sent.
        let mut probe_sent: Option<Instant> = None;
        let timer = tokio::time::sleep_until(last_read + timeouts.read_timeout);
        tokio::pin!(timer);
        // The owner closed: write what it sent, then end the stream.
        let mut closing = false;
        loop {
            // Hand over and take in what needs no waiting, so that one wake-up carries many.
            while let Some(ev) = inbox.pop_front() {
                match self.events.try_send(ev) {
                    Ok(()) => {}
                    Err(TrySendError::Full(ev)) => {
                        inbox.push_front(ev);
                        break;
                    }
                    // The owner stopped reading (it is closing): nobody wants these.
                    Err(TrySendError::Closed(_)) => inbox.clear(),
                }
            }
            while !closing && out.len() < HIGH_WATER {
                match self.cmds.try_recv() {
                    Ok(st) => encode(&mut encoder, st, &mut out),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => closing = true,
                }
            }
            if closing && written == out.len() && !unflushed {
                finish(rd, wr, reader).await;
                return End::Closed;
            }
            let writing = written < out.len();
            let reading = inbox.len() < self.opts.queue_depth.max(1);
            tokio::select! {
                biased;
                permit = self.events.reserve(), if !inbox.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(ev) = inbox.pop_front() {
                            permit.send(ev);
                        }
                    }
                    Err(_) => inbox.clear(),
                },
                // Writes what is encoded, then flushes once it is all written.
                w = async {
                    if writing {
                        wr.write(&out[written..]).await.map(Some)
                    } else {
                        wr.flush().await.map(|()| None)
                    }
                }, if writing || unflushed => match w {
                    Ok(Some(0)) => return End::Lost("the connection accepts no more bytes".into()),
                    Ok(Some(n)) => {
                        written += n;
                        if written == out.len() {
                            out.clear();
                            written = 0;
                            unflushed = true;
                        }
                    }
                    Ok(None) => unflushed = false,
                    Err(e) => return End::Lost(format!("writing failed: {e}")),
                },
                cmd = self.cmds.recv(), if !closing && out.len() < HIGH_WATER => match cmd {
                    Some(st) => encode(&mut encoder, st, &mut out),
                    None => closing = true,
                },
                r = rd.read(&mut buf), if reading => {
                    let n = match r {
                        Ok(0) => return End::Lost("the server closed the connection".into()),
                        Ok(n) => n,
                        Err(e) => return End::Lost(format!("reading failed: {e}")),
                    };
                    reader.extend(&buf[..n]);
                    last_read = Instant::now();
                    probe_sent = None;
                    loop {
                        let (len, found) = match reader.next_with_text() {
                            Ok(Some((Scan::Stanza(st), text))) => {
                                tracing::trace!(target: WIRE, "RECV {}", &text[st.start..st.len]);
                                (st.len, Some(decode_found(&st, text)))
                            }
                            Ok(Some((Scan::StreamEnd { len }, _))) => (len, None),
                            Ok(Some((Scan::Incomplete, _)) | None) => break,
                            Err(e) => {
                                return End::Lost(format!("the server sent malformed XML: {e}"))
                            }
                        };
                        reader.consume(len);
                        let element = match found {
                            None => {
                                // The server ended the stream: end ours too (bounded).
                                out.truncate(written);
                                let _ = tokio::time::timeout(FOOTER_WAIT, async {
                                    wr.write_all(&out).await?;
                                    wr.write_all(b"</stream:stream>").await?;
                                    wr.shutdown().await
                                })
                                .await;
                                return End::Lost("the server ended the stream".into());
                            }
                            Some(Ok(FallibleStreamElement::Ok(el))) => el,
                            Some(Ok(FallibleStreamElement::Err(e))) => {
                                // tokio-xmpp dropped such a stanza too; the stream stays.
                                tracing::debug!(jid = %me, "dropped a stanza that does not parse: {e}");
                                continue;
                            }
                            Some(Err(e)) => {
                                return End::Lost(format!("the server sent what is not a stanza: {e}"))
                            }
                        };
                        match element {
                            XmppStreamElement::Stanza(st) => {
                                if let Some(ev) = received(st, &me, &mut encoder, &mut out) {
                                    inbox.push_back(ev);
                                }
                            }
                            XmppStreamElement::StreamError(e) => {
                                return End::Lost(stream_error(&me, &e.0));
                            }
                            other => tracing::debug!(jid = %me, "ignored {other:?}"),
                        }
                    }
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if !reading {
                        // Not reading because the owner is behind: the server's silence is
                        // ours, not its.
                        last_read = now;
                        probe_sent = None;
                    }
                    match probe_sent {
                        Some(sent) if now >= sent + timeouts.response_timeout => {
                            return End::Lost("read and response timeouts elapsed".into())
                        }
                        Some(sent) => timer.as_mut().reset(sent + timeouts.response_timeout),
                        None if now >= last_read + timeouts.read_timeout => {
                            // Quiet for the read timeout: ask the server whether it is there.
                            // Any byte that comes back counts as its answer.
                            self.probes = self.probes.wrapping_add(1);
                            let ping = Iq::from_get(format!("{PROBE_PREFIX}{}", self.probes), Ping);
                            encode(&mut encoder, ping.into(), &mut out);
                            probe_sent = Some(now);
                            timer.as_mut().reset(now + timeouts.response_timeout);
                        }
                        None => timer.as_mut().reset(last_read + timeouts.read_timeout),
                    }
                },
            }
        }
    }
}

/// Logs a stream error the server ended the stream with (a restart at info, anything else
/// as a warning) and says what ended the connection.
fn stream_error(me: &FullJid, e: &StreamError) -> String {
    let condition = e.condition.to_string();
    let text = e
        .texts
        .values()
        .next()
        .map(|t| format!(": {t}"))
        .unwrap_or_default();
    if matches!(e.condition, DefinedCondition::SystemShutdown) {
        tracing::info!(
            jid = %me,
            "the XMPP server closed the stream: it is shutting down (system-shutdown)"
        );
    } else {
        tracing::warn!(
            jid = %me,
            "the XMPP server closed the stream with the error '{condition}'{text}"
        );
    }
    format!("the server ended the stream with the error '{condition}'")
}

/// Appends a stanza to what is to be written; one that cannot be written is logged and left
/// out (as tokio-xmpp did).
fn encode(encoder: &mut StanzaEncoder, st: Stanza, out: &mut Vec<u8>) {
    let mark = out.len();
    match encoder.encode_stanza(st, out) {
        Ok(()) => tracing::trace!(target: WIRE, "SEND {}", String::from_utf8_lossy(&out[mark..])),
        Err(e) => tracing::warn!("a stanza could not be written and was dropped: {e}"),
    }
}

/// What a received stanza means for the owner: pings are answered here and the answers to the
/// stream's own pings are dropped; everything else is passed on.
fn received(
    st: Stanza,
    me: &FullJid,
    encoder: &mut StanzaEncoder,
    out: &mut Vec<u8>,
) -> Option<Event> {
    match st {
        Stanza::Iq(Iq::Get {
            id, from, payload, ..
        }) if payload.is("ping", ns::PING) => {
            let pong = match from {
                Some(from) => Iq::empty_result(from, id),
                // A ping without 'from' comes from our own server on our behalf.
                None => Iq::Result {
                    from: None,
                    to: None,
                    id,
                    payload: None,
                },
            };
            encode(encoder, pong.into(), out);
            None
        }
        Stanza::Iq(Iq::Result { ref id, .. } | Iq::Error { ref id, .. })
            if id.starts_with(PROBE_PREFIX) =>
        {
            tracing::trace!(jid = %me, "liveness ping answered");
            None
        }
        st => Some(Event::Stanza(st)),
    }
}

/// Ends the stream after the owner closed: the stream's end tag, then the sending side, then
/// what the server still sends until it ends its side (bounded).
async fn finish(mut rd: ReadHalf<Io>, mut wr: WriteHalf<Io>, mut reader: Reader) {
    let ended = tokio::time::timeout(FOOTER_WAIT, async {
        wr.write_all(b"</stream:stream>").await?;
        wr.flush().await?;
        wr.shutdown().await?;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            reader.extend(&buf[..n]);
            loop {
                let (len, end) = match reader.next_with_text() {
                    Ok(Some((Scan::Stanza(st), _))) => (st.len, false),
                    Ok(Some((Scan::StreamEnd { len }, _))) => (len, true),
                    _ => break,
                };
                if end {
                    return Ok(());
                }
                reader.consume(len);
            }
        }
    })
    .await;
    match ended {
        Ok(Ok(())) => tracing::debug!("stream closed"),
        Ok(Err(e)) => tracing::debug!("stream closed with an error: {e}"),
        Err(_) => {
            tracing::debug!("the server did not end its side of the stream within {FOOTER_WAIT:?}")
        }
    }
}
