//! Large outputs to XMPP submitters (PROTOCOL.md §11.3, §13.1): a `<job-status>` whose output
//! is over the inline limit — a `<status>` reply, or the final message of watch mode — is sent
//! only after the output itself, as a blob of `<chunk/>`s to the submitter's full JID (at most
//! [`WINDOW`] unacknowledged); the status then references the blob, so the submitter gets every
//! byte. A submitter that refuses a chunk (with any error: a client without §13, its blob
//! limits, an offline resource) or acknowledges none for [`IDLE`] gets the status with the
//! output marked `truncated='true'`, its size and SHA-256, instead: never a result that
//! silently lacks its output.
//!
//! A pure state machine, like the registry: requests and chunk replies in, with the time as a
//! parameter; chunks and statuses to send out ([`Out`]). It holds no output bytes: each chunk
//! is cut from the job table when it is sent, so a transfer costs no copy of the output.
//!
//! Bounds: per recipient (full JID), [`ACTIVE_PER_RECIPIENT`] transfers at once; waiting behind
//! them at most [`QUEUED_REPLIES`] `<status>` replies (one more is refused `busy`) and every
//! pushed watch message (one per job).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use jid::Jid;
use sha2::{Digest as _, Sha256};
use spine_protocol::client::TruncatedOutput;
use spine_protocol::{
    BlobId, BlobRef, Chunk, Condition, Data, JobId, JobStatus, Outcome, SpineError, INLINE_LIMIT,
};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::stanza_error::StanzaError;

/// Unacknowledged chunks per transfer (PROTOCOL.md §13.1).
pub(crate) const WINDOW: usize = 8;
/// Transfers to one recipient at once.
pub(crate) const ACTIVE_PER_RECIPIENT: usize = 2;
/// `<status>` replies waiting for a transfer to one recipient; more are refused `busy`.
pub(crate) const QUEUED_REPLIES: usize = 16;
/// A transfer with no chunk acknowledged for this long is given up (the output is then
/// marked truncated).
pub(crate) const IDLE: Duration = Duration::from_secs(30);
/// How often transfers are checked for [`IDLE`].
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Output digests remembered (a status asked again costs no second pass over the output).
const DIGESTS: usize = 256;

/// How a status reaches its recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Via {
    /// The reply to the `<status>` IQ with this id.
    Reply(String),
    /// A `<message type='normal'>` (watch mode's final status).
    Message,
}

/// A status to send, whose output is over the inline limit.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// The recipient's full JID.
    pub to: Jid,
    /// A reply to its `<status>`, or a watch message.
    pub via: Via,
    /// The status, its result without the output.
    pub status: JobStatus,
    /// The job whose output goes first.
    pub job: JobId,
    /// The output: its size, SHA-256 and type.
    pub size: u64,
    pub sha256: [u8; 32],
    pub mime: Option<String>,
}

/// What to send, in this order.
#[derive(Debug)]
pub(crate) enum Out {
    /// One chunk of an output, an IQ set with this id.
    Chunk { to: Jid, id: String, chunk: Chunk },
    /// A status, its output referenced as a blob or marked truncated.
    Status {
        to: Jid,
        via: Via,
        status: Box<JobStatus>,
    },
}

impl From<Out> for Stanza {
    fn from(o: Out) -> Stanza {
        match o {
            Out::Chunk { to, id, chunk } => Iq::from_set(id, chunk).with_to(to).into(),
            Out::Status {
                to,
                via: Via::Reply(id),
                status,
            } => Iq::from_result(id, Some(*status)).with_to(to).into(),
            Out::Status {
                to,
                via: Via::Message,
                status,
            } => {
                let mut m = Message::new(Some(to));
                m.type_ = MessageType::Normal;
                m.payloads.push((*status).into());
                m.into()
            }
        }
    }
}

/// A refusal in a few words: its Spine error, else its text, else its XMPP condition.
fn describe(e: &StanzaError) -> String {
    match SpineError::from_stanza_error(e) {
        Ok(Some(s)) => s.to_string(),
        _ => match e.texts.values().next() {
            Some(text) => text.clone(),
            None => format!("{:?}", e.defined_condition),
        },
    }
}

/// One output being sent.
struct Transfer {
    req: Request,
    blob: BlobId,
    /// The first offset never sent.
    next: u64,
    /// Offsets to send again (their IQs were lost with our session).
    resend: VecDeque<u64>,
    /// Chunks sent and not yet acknowledged.
    in_flight: usize,
    /// When it started or last had a chunk acknowledged.
    progress: Instant,
    /// Why it was given up, once it was.
    failed: Option<String>,
}

/// A recipient's transfers.
#[derive(Default)]
struct Recipient {
    active: Vec<u64>,
    waiting: VecDeque<Request>,
    /// How many of `waiting` are `<status>` replies.
    replies: usize,
}

/// Every transfer of large outputs to XMPP submitters.
pub(crate) struct Deliveries {
    /// IQ ids and blob ids: this prefix (random per process), then a counter.
    prefix: String,
    next: u64,
    transfers: HashMap<u64, Transfer>,
    recipients: HashMap<Jid, Recipient>,
    /// Chunk IQ id → (transfer, offset).
    iqs: HashMap<String, (u64, u64)>,
    /// Transfers with something to do at the next poll.
    ready: VecDeque<u64>,
    digests: HashMap<JobId, [u8; 32]>,
    next_check: Option<Instant>,
}

impl Deliveries {
    /// Ids of chunk IQs and blobs start with `prefix`, random to this process (the core draws
    /// it), so that a late reply meant for an earlier one never matches.
    pub(crate) fn new(prefix: String) -> Self {
        Deliveries {
            prefix,
            next: 0,
            transfers: HashMap::new(),
            recipients: HashMap::new(),
            iqs: HashMap::new(),
            ready: VecDeque::new(),
            digests: HashMap::new(),
            next_check: None,
        }
    }

    /// The SHA-256 of `job`'s output, remembered for the next request.
    pub(crate) fn digest(&mut self, job: &JobId, output: &[u8]) -> [u8; 32] {
        if let Some(d) = self.digests.get(job) {
            return *d;
        }
        if self.digests.len() >= DIGESTS {
            self.digests.clear();
        }
        let d: [u8; 32] = Sha256::digest(output).into();
        self.digests.insert(job.clone(), d);
        d
    }

    /// Takes a status to send after its output. A `<status>` reply beyond the recipient's
    /// queue is refused `busy`; a watch message always waits its turn.
    pub(crate) fn offer(&mut self, req: Request, now: Instant) -> Result<(), SpineError> {
        let r = self.recipients.entry(req.to.clone()).or_default();
        if r.active.len() < ACTIVE_PER_RECIPIENT {
            self.start(req, now);
            return Ok(());
        }
        if matches!(req.via, Via::Reply(_)) {
            if r.replies >= QUEUED_REPLIES {
                return Err(SpineError::new(Condition::Busy).with_text(format!(
                    "{} large outputs are being sent to {} and {} more wait: ask again when they arrived",
                    r.active.len(),
                    req.to,
                    r.replies
                )));
            }
            r.replies += 1;
        }
        r.waiting.push_back(req);
        Ok(())
    }

    fn start(&mut self, req: Request, now: Instant) {
        self.next += 1;
        let key = self.next;
        let blob = format!("out-{}-{key}", self.prefix)
            .parse()
            .expect("generated blob id is valid");
        self.recipients
            .entry(req.to.clone())
            .or_default()
            .active
            .push(key);
        self.transfers.insert(
            key,
            Transfer {
                req,
                blob,
                next: 0,
                resend: VecDeque::new(),
                in_flight: 0,
                progress: now,
                failed: None,
            },
        );
        self.ready.push_back(key);
    }

    /// A reply to an IQ: whether it acknowledged (or refused) one of our chunks, from the
    /// recipient it was sent to. `error`: the refusal, if it was one.
    pub(crate) fn on_reply(
        &mut self,
        id: &str,
        from: Option<&Jid>,
        error: Option<&StanzaError>,
        now: Instant,
    ) -> bool {
        let Some(&(key, _)) = self.iqs.get(id) else {
            return false;
        };
        let Some(t) = self.transfers.get_mut(&key) else {
            self.iqs.remove(id);
            return false;
        };
        // The recipient, or its server on its behalf (an offline resource).
        if from.map(Jid::to_bare) != Some(t.req.to.to_bare()) {
            return false;
        }
        self.iqs.remove(id);
        t.in_flight = t.in_flight.saturating_sub(1);
        match error {
            None => t.progress = now,
            Some(e) => {
                t.failed
                    .get_or_insert_with(|| format!("a chunk was refused: {}", describe(e)));
            }
        }
        self.ready.push_back(key);
        true
    }

    /// Our session ended and a new one began: chunks in flight are sent again (chunks are
    /// idempotent, PROTOCOL.md §13.1).
    pub(crate) fn on_session_reset(&mut self, now: Instant) {
        for (_, (key, offset)) in self.iqs.drain() {
            if let Some(t) = self.transfers.get_mut(&key) {
                t.in_flight = t.in_flight.saturating_sub(1);
                t.resend.push_back(offset);
                t.progress = now;
                self.ready.push_back(key);
            }
        }
    }

    /// What to send now: chunks up to each window, the statuses of transfers that ended
    /// (all acknowledged, or given up). `output(job, offset, end)` reads bytes `offset..end`
    /// of the job's output: `Err` if it is no longer held (or not of the size announced).
    pub(crate) fn poll(
        &mut self,
        output: impl Fn(&JobId, u64, u64) -> Result<Vec<u8>, String>,
        now: Instant,
    ) -> Vec<Out> {
        if self.transfers.is_empty() {
            return Vec::new();
        }
        if self.next_check.is_none_or(|t| now >= t) {
            self.next_check = Some(now + CHECK_EVERY);
            for (key, t) in &mut self.transfers {
                if t.failed.is_none() && now.saturating_duration_since(t.progress) >= IDLE {
                    t.failed = Some(format!("no chunk acknowledged for {} s", IDLE.as_secs()));
                    self.ready.push_back(*key);
                }
            }
        }
        let mut out = Vec::new();
        while let Some(key) = self.ready.pop_front() {
            self.step(key, &output, now, &mut out);
        }
        out
    }

    /// Moves one transfer on: more chunks, or its end.
    fn step(
        &mut self,
        key: u64,
        output: &impl Fn(&JobId, u64, u64) -> Result<Vec<u8>, String>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let Some(t) = self.transfers.get_mut(&key) else {
            return;
        };
        if t.failed.is_none() {
            while t.in_flight < WINDOW {
                let offset = match t.resend.pop_front() {
                    Some(o) => o,
                    None if t.next < t.req.size => {
                        let o = t.next;
                        t.next = (o + INLINE_LIMIT as u64).min(t.req.size);
                        o
                    }
                    None => break,
                };
                let end = (offset + INLINE_LIMIT as u64).min(t.req.size);
                let piece = match output(&t.req.job, offset, end) {
                    Ok(p) => p,
                    Err(why) => {
                        t.failed = Some(why);
                        break;
                    }
                };
                self.next += 1;
                let id = format!("o{}-{}", self.prefix, self.next);
                self.iqs.insert(id.clone(), (key, offset));
                t.in_flight += 1;
                out.push(Out::Chunk {
                    to: t.req.to.clone(),
                    id,
                    chunk: Chunk {
                        blob: t.blob.clone(),
                        offset,
                        total: t.req.size,
                        bytes: piece,
                    },
                });
            }
            if t.failed.is_none()
                && (t.in_flight > 0 || t.next < t.req.size || !t.resend.is_empty())
            {
                return;
            }
        }
        // Done, or given up: the status goes out, and the recipient's next transfer starts.
        let Some(t) = self.transfers.remove(&key) else {
            return;
        };
        self.iqs.retain(|_, (k, _)| *k != key);
        let Request {
            to,
            via,
            mut status,
            size,
            sha256,
            mime,
            job,
        } = t.req;
        status.outcome = match status.outcome.take() {
            Some(Outcome::Result(mut r)) => Some(match t.failed {
                None => {
                    r.output = Some(Data::Blob(BlobRef {
                        blob: t.blob,
                        size,
                        sha256,
                        mime,
                    }));
                    Outcome::Result(r)
                }
                Some(why) => {
                    tracing::warn!(job = %job, to = %to, bytes = size, "output not sent in chunks ({why}): the status says it was left out");
                    r.output = None;
                    Outcome::Truncated(r, TruncatedOutput { size, sha256, mime })
                }
            }),
            other => other,
        };
        out.push(Out::Status {
            to: to.clone(),
            via,
            status: Box::new(status),
        });
        let next = match self.recipients.get_mut(&to) {
            Some(r) => {
                r.active.retain(|k| *k != key);
                let next = r.waiting.pop_front();
                if next
                    .as_ref()
                    .is_some_and(|n| matches!(n.via, Via::Reply(_)))
                {
                    r.replies = r.replies.saturating_sub(1);
                }
                next
            }
            None => None,
        };
        match next {
            // Started at once: the poll's loop sends its first chunks.
            Some(req) => self.start(req, now),
            None => {
                if self
                    .recipients
                    .get(&to)
                    .is_some_and(|r| r.active.is_empty() && r.waiting.is_empty())
                {
                    self.recipients.remove(&to);
                }
            }
        }
    }

    /// Transfers under way and waiting.
    #[cfg(test)]
    fn pending(&self) -> (usize, usize) {
        (
            self.transfers.len(),
            self.recipients.values().map(|r| r.waiting.len()).sum(),
        )
    }
}

#[cfg(test)]
mod tests;
