//! A test-side dispatcher: a real XMPP client that speaks docs/PROTOCOL.md with the
//! `spine-protocol` types, to drive agents before (and besides) the real dispatcher, and to
//! submit to the real one. It keeps every stanza it did not consume in a backlog, acknowledges
//! `<chunk/>` uploads and assembles their blobs with the protocol's own
//! [`BlobStore`](spine_protocol::blob::BlobStore), as any receiver of a large output does
//! (PROTOCOL.md §13): an agent's result, or a dispatcher's `<job-status>`.

use std::collections::VecDeque;
use std::time::Duration;

use jid::{BareJid, Jid};
use spine_protocol::blob::{BlobLimits, BlobStore};
use spine_protocol::{
    presence_payloads, Advertise, Chunk, Condition, Data, DispatcherHello, Job, JobId, JobResult,
    JobStatus, Load, Outcome, SpineError, Status,
};
use spine_xmpp::Connection;
use tokio::time::Instant;
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::Presence;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::PATIENCE;

/// A load report as received.
#[derive(Debug, Clone)]
pub struct SeenLoad {
    /// The agent's full JID.
    pub from: Jid,
    /// The report.
    pub load: Load,
    /// When it arrived.
    pub at: Instant,
}

/// The test dispatcher.
pub struct TestDispatcher {
    /// The connection.
    pub conn: Connection,
    /// Answer every `<chunk/>` with `service-unavailable`, as an XMPP client that does not
    /// implement PROTOCOL.md §13 does (slixmpp's default for an unknown IQ).
    pub refuse_chunks: bool,
    backlog: VecDeque<Stanza>,
    blobs: BlobStore,
    next: u64,
}

impl TestDispatcher {
    /// Wraps a logged-in connection (initial presence is sent here).
    pub async fn new(conn: Connection) -> Self {
        conn.send(Presence::available()).await;
        // Generous bounds: tests leave results unread, and send large outputs on purpose.
        let limits = BlobLimits {
            max_size: 1 << 30,
            per_sender: 4096,
            per_sender_bytes: u64::MAX,
            total: 65536,
            total_bytes: u64::MAX,
            idle_ttl: Duration::from_secs(600),
        };
        TestDispatcher {
            conn,
            refuse_chunks: false,
            backlog: VecDeque::new(),
            blobs: BlobStore::with_limits(limits),
            next: 0,
        }
    }

    /// The dispatcher's full JID.
    pub fn jid(&self) -> Jid {
        self.conn.jid().clone().into()
    }

    /// Sends a `<dispatcher/>` hello to `agent` (bare or full).
    pub async fn hello(&self, agent: &Jid) {
        self.conn
            .send(
                Presence::available()
                    .with_to(agent.clone())
                    .with_payload(DispatcherHello::default()),
            )
            .await;
    }

    /// Pulls the next stanza from the connection, handling chunk uploads on the way.
    async fn pull(&mut self, deadline: Instant) -> Option<Stanza> {
        loop {
            match tokio::time::timeout_at(deadline, self.conn.next()).await {
                Ok(Some(Event::Stanza(Stanza::Iq(Iq::Set {
                    id,
                    from: Some(from),
                    payload,
                    ..
                }))))
                    if payload.is("chunk", spine_protocol::NS) =>
                {
                    let stored = if self.refuse_chunks {
                        Err(None)
                    } else {
                        Chunk::try_from(payload)
                            .map_err(|e| e.to_spine_error())
                            .and_then(|c| {
                                self.blobs.put(
                                    from.to_bare().as_str(),
                                    c,
                                    std::time::Instant::now(),
                                )
                            })
                            .map_err(Some)
                    };
                    let reply = match stored {
                        Ok(()) => Iq::empty_result(from, id),
                        Err(Some(e)) => Iq::from_error(id, StanzaError::from(e)).with_to(from),
                        Err(None) => Iq::from_error(
                            id,
                            StanzaError::new(
                                ErrorType::Cancel,
                                DefinedCondition::ServiceUnavailable,
                                "en",
                                "no handler for this IQ",
                            ),
                        )
                        .with_to(from),
                    };
                    self.conn.send(reply).await;
                }
                Ok(Some(Event::Stanza(st))) => return Some(st),
                // A new session after a reconnect: available again, or bare-JID presence
                // (agents' advertisements) would not reach us.
                Ok(Some(Event::Stream(tokio_xmpp::stanzastream::StreamEvent::Reset {
                    ..
                }))) => {
                    self.conn.send(Presence::available()).await;
                }
                Ok(Some(Event::Stream(_))) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits for the first stanza (backlog first) that `pick` accepts; others stay queued.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Stanza) -> Option<T>,
    ) -> T {
        self.try_wait_for(PATIENCE, &mut pick)
            .await
            .unwrap_or_else(|| panic!("no {what} within {PATIENCE:?}"))
    }

    /// Like [`wait_for`](Self::wait_for) with a timeout; `None` if nothing matched.
    pub async fn try_wait_for<T>(
        &mut self,
        within: Duration,
        mut pick: impl FnMut(&Stanza) -> Option<T>,
    ) -> Option<T> {
        if let Some(i) = self.backlog.iter().position(|st| pick(st).is_some()) {
            let st = self.backlog.remove(i)?;
            return pick(&st);
        }
        let deadline = Instant::now() + within;
        loop {
            let st = self.pull(deadline).await?;
            if let Some(v) = pick(&st) {
                return Some(v);
            }
            self.backlog.push_back(st);
        }
    }

    /// Waits for an advertisement from the account `agent`.
    pub async fn wait_advertise(&mut self, agent: &BareJid) -> (Jid, Advertise, Load) {
        self.wait_for("advertisement", |st| match st {
            Stanza::Presence(p) if p.from.as_ref().is_some_and(|f| f.to_bare() == *agent) => {
                let found = presence_payloads(&p.payloads).ok()?;
                Some((p.from.clone()?, found.advertise?, found.load?))
            }
            _ => None,
        })
        .await
    }

    /// Waits for a load report from `agent` that satisfies `pred`.
    pub async fn wait_load(
        &mut self,
        agent: &BareJid,
        mut pred: impl FnMut(&Load) -> bool,
    ) -> SeenLoad {
        self.wait_for("load report", |st| match st {
            Stanza::Presence(p) if p.from.as_ref().is_some_and(|f| f.to_bare() == *agent) => {
                let load = presence_payloads(&p.payloads).ok()?.load?;
                let from = p.from.clone()?;
                pred(&load).then(|| SeenLoad {
                    from,
                    load,
                    at: Instant::now(),
                })
            }
            _ => None,
        })
        .await
    }

    /// Sends a job; returns the IQ id to wait on.
    pub async fn send_job(&mut self, to: &Jid, job: Job) -> String {
        self.next += 1;
        let id = format!("job-{}", self.next);
        self.conn
            .send(Iq::from_set(id.clone(), job).with_to(to.clone()))
            .await;
        id
    }

    /// Sends any IQ set payload; returns the IQ id.
    pub async fn send_set(
        &mut self,
        to: &Jid,
        payload: impl xmpp_parsers::iq::IqSetPayload,
    ) -> String {
        self.next += 1;
        let id = format!("set-{}", self.next);
        self.conn
            .send(Iq::from_set(id.clone(), payload).with_to(to.clone()))
            .await;
        id
    }

    /// Waits for the reply to IQ `id`: the payload of a result (if any) or the error.
    pub async fn wait_reply(&mut self, id: &str) -> Result<Option<minidom::Element>, StanzaError> {
        self.wait_for(&format!("reply to {id}"), |st| match st {
            Stanza::Iq(Iq::Result {
                id: got, payload, ..
            }) if got == id => Some(Ok(payload.clone())),
            Stanza::Iq(Iq::Error { id: got, error, .. }) if got == id => Some(Err(error.clone())),
            _ => None,
        })
        .await
    }

    /// Waits for the reply to IQ `id` with its sender.
    async fn wait_reply_from(
        &mut self,
        id: &str,
    ) -> (Option<Jid>, Result<Option<minidom::Element>, StanzaError>) {
        self.wait_for(&format!("reply to {id}"), |st| match st {
            Stanza::Iq(Iq::Result {
                id: got,
                from,
                payload,
                ..
            }) if got == id => Some((from.clone(), Ok(payload.clone()))),
            Stanza::Iq(Iq::Error {
                id: got,
                from,
                error,
                ..
            }) if got == id => Some((from.clone(), Err(error.clone()))),
            _ => None,
        })
        .await
    }

    /// Waits for a job's result; a blob output is replaced by its assembled bytes (after the
    /// sha256 and size are checked).
    pub async fn wait_result(&mut self, id: &str) -> Result<JobResult, StanzaError> {
        let (from, payload) = self.wait_reply_from(id).await;
        let mut r =
            JobResult::try_from(payload?.expect("result payload")).expect("valid <result/>");
        if let Some(out) = r.output.take() {
            r.output = Some(self.resolve(from.as_ref(), out).expect("the output's blob"));
        }
        Ok(r)
    }

    /// `data` with a blob reference from `from` replaced by the blob's bytes, which must have
    /// arrived in chunks before the reference, complete, of its size and SHA-256.
    pub fn resolve(&mut self, from: Option<&Jid>, data: Data) -> Result<Data, SpineError> {
        let Some(from) = from else {
            return Err(SpineError::new(Condition::Malformed)
                .with_text("a stanza without a sender referenced a blob"));
        };
        let (bytes, mime) = self.blobs.resolve(from.to_bare().as_str(), data)?;
        Ok(Data::Inline { mime, bytes })
    }

    /// A `<job-status>` from `from` with its output whole: a blob output (PROTOCOL.md §11.3,
    /// an output over the inline limit sent in chunks first) becomes inline bytes. An output
    /// by reference (a URL, §13.4) is left as it is, for the test to fetch.
    pub fn resolve_status(
        &mut self,
        from: Option<&Jid>,
        mut st: JobStatus,
    ) -> Result<JobStatus, SpineError> {
        if let Some(Outcome::Result(r)) = &mut st.outcome {
            if let Some(out) = r.output.take() {
                r.output = Some(match out {
                    Data::Ref(d) => Data::Ref(d),
                    out => self.resolve(from, out)?,
                });
            }
        }
        Ok(st)
    }

    /// Asks `dispatcher` for the status of `job`; a large output comes whole (see
    /// [`resolve_status`](Self::resolve_status)).
    pub async fn status(
        &mut self,
        dispatcher: &Jid,
        job: &JobId,
    ) -> Result<JobStatus, StanzaError> {
        self.next += 1;
        let id = format!("status-{}", self.next);
        self.conn
            .send(Iq::from_get(id.clone(), Status { job: job.clone() }).with_to(dispatcher.clone()))
            .await;
        let (from, payload) = self.wait_reply_from(&id).await;
        let st = JobStatus::try_from(payload?.expect("a <job-status/> payload"))
            .expect("valid <job-status/>");
        Ok(self
            .resolve_status(from.as_ref(), st)
            .unwrap_or_else(|e| panic!("the status of {job} references a blob: {e}")))
    }

    /// Waits for the `<job-status>` message of `job` in a final state (watch mode, PROTOCOL.md
    /// §11.4); a large output comes whole (see [`resolve_status`](Self::resolve_status)).
    pub async fn wait_final_status(&mut self, job: &JobId) -> JobStatus {
        let (from, st) = self
            .wait_for(&format!("final status of {job}"), |st| match st {
                Stanza::Message(m) => m.payloads.iter().find_map(|p| {
                    JobStatus::try_from(p.clone())
                        .ok()
                        .filter(|s| &s.job == job && s.state.is_final())
                        .map(|s| (m.from.clone(), s))
                }),
                _ => None,
            })
            .await;
        self.resolve_status(from.as_ref(), st)
            .unwrap_or_else(|e| panic!("the final status of {job} references a blob: {e}"))
    }
}
