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
    /// Ids of chunk IQs and blobs start with a prefix random to this process, so that a late
    /// reply meant for an earlier one never matches.
    pub(crate) fn new() -> Self {
        use rand::Rng as _;
        Deliveries {
            prefix: format!("{:08x}", rand::rng().random::<u32>()),
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
    /// (all acknowledged, or given up). `output(job)` is the job's whole output, if it is
    /// still held.
    pub(crate) fn poll<'a>(
        &mut self,
        output: impl Fn(&JobId) -> Option<&'a [u8]>,
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
    fn step<'a>(
        &mut self,
        key: u64,
        output: &impl Fn(&JobId) -> Option<&'a [u8]>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let Some(t) = self.transfers.get_mut(&key) else {
            return;
        };
        let bytes = output(&t.req.job).filter(|b| b.len() as u64 == t.req.size);
        if bytes.is_none() && t.failed.is_none() {
            t.failed = Some("the job's output is no longer held".into());
        }
        if let (Some(bytes), None) = (bytes, &t.failed) {
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
                let Some(piece) = bytes.get(offset as usize..end as usize) else {
                    break;
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
                        bytes: piece.to_vec(),
                    },
                });
            }
            if t.in_flight > 0 || t.next < t.req.size || !t.resend.is_empty() {
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
mod tests {
    use super::*;
    use spine_protocol::blob::BlobStore;
    use spine_protocol::{JobResult, JobState};

    const KIB: u64 = 1024;

    fn output(n: u64) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn job(n: u64) -> JobId {
        format!("job-{n}").parse().unwrap()
    }

    fn request(to: &str, via: Via, job_id: JobId, bytes: &[u8]) -> Request {
        let status = JobStatus {
            job: job_id.clone(),
            capability: "work.big".parse().unwrap(),
            state: JobState::Succeeded,
            attempts: 1,
            agent: None,
            percent: Some(100),
            outcome: Some(Outcome::Result(JobResult {
                job: job_id.clone(),
                attempt: 1,
                elapsed_ms: None,
                meta: Default::default(),
                output: None,
            })),
        };
        Request {
            to: to.parse().unwrap(),
            via,
            status,
            job: job_id,
            size: bytes.len() as u64,
            sha256: Sha256::digest(bytes).into(),
            mime: Some("text/plain".into()),
        }
    }

    fn chunks(out: &[Out]) -> Vec<(String, Chunk)> {
        out.iter()
            .filter_map(|o| match o {
                Out::Chunk { id, chunk, .. } => Some((id.clone(), chunk.clone())),
                _ => None,
            })
            .collect()
    }

    fn statuses(out: Vec<Out>) -> Vec<(Jid, Via, JobStatus)> {
        out.into_iter()
            .filter_map(|o| match o {
                Out::Status { to, via, status } => Some((to, via, *status)),
                _ => None,
            })
            .collect()
    }

    /// The whole transfer: chunks within the window, acknowledged one by one, then the status
    /// referencing a blob that a receiver's BlobStore assembles to the same bytes.
    #[test]
    fn an_output_goes_in_windowed_chunks_then_the_status_references_it() {
        let bytes = output(1024 * KIB + 5);
        let j = job(1);
        let to: Jid = "webapp@localhost/app".parse().unwrap();
        let mut d = Deliveries::new();
        let t0 = Instant::now();
        d.offer(
            request("webapp@localhost/app", Via::Message, j.clone(), &bytes),
            t0,
        )
        .unwrap();
        let held = |id: &JobId| (id == &j).then_some(bytes.as_slice());
        let mut sent = chunks(&d.poll(held, t0));
        assert_eq!(sent.len(), WINDOW, "a window of 8 unacknowledged chunks");
        let mut store = BlobStore::new(1 << 30, Duration::from_secs(60));
        let mut done = Vec::new();
        let mut n = 0;
        while let Some((id, c)) = sent.pop() {
            n += 1;
            store.put("dispatcher@localhost", c, t0).unwrap();
            assert!(d.on_reply(&id, Some(&to), None, t0));
            let out = d.poll(held, t0);
            sent.extend(chunks(&out));
            done.extend(statuses(out));
            assert!(sent.len() <= WINDOW);
        }
        assert_eq!(n, 17, "1 MiB + 5 bytes is 17 chunks");
        let [(got_to, via, st)] = <[_; 1]>::try_from(done).unwrap();
        assert_eq!((got_to, via), (to, Via::Message));
        let Some(Outcome::Result(r)) = st.outcome else {
            panic!("{:?}", st.outcome)
        };
        let Some(Data::Blob(b)) = r.output else {
            panic!("{:?}", r.output)
        };
        assert_eq!(b.mime.as_deref(), Some("text/plain"));
        assert_eq!(store.take("dispatcher@localhost", &b).unwrap(), bytes);
        assert_eq!(d.pending(), (0, 0));
    }

    /// A refused chunk, a silent recipient or an output no longer held: the status still goes
    /// out, its output marked truncated with the size and digest.
    #[test]
    fn a_transfer_that_cannot_finish_marks_the_output_truncated() {
        let bytes = output(300 * KIB);
        let to: Jid = "py@localhost/slix".parse().unwrap();
        let t0 = Instant::now();
        let truncated = |st: &JobStatus| match &st.outcome {
            Some(Outcome::Truncated(r, t)) => {
                r.output.is_none()
                    && t.size == 300 * KIB
                    && t.sha256 == <[u8; 32]>::from(Sha256::digest(output(300 * KIB)))
            }
            _ => false,
        };

        // Refused: the first error ends it.
        let mut d = Deliveries::new();
        let j = job(1);
        let held = |id: &JobId| (id == &j).then_some(bytes.as_slice());
        d.offer(
            request(
                "py@localhost/slix",
                Via::Reply("q1".into()),
                j.clone(),
                &bytes,
            ),
            t0,
        )
        .unwrap();
        let sent = chunks(&d.poll(held, t0));
        assert_eq!(sent.len(), 5);
        // A reply from someone else is not the recipient's.
        let stranger: Jid = "eve@localhost/x".parse().unwrap();
        assert!(!d.on_reply(&sent[0].0, Some(&stranger), None, t0));
        let refusal = StanzaError::new(
            xmpp_parsers::stanza_error::ErrorType::Cancel,
            xmpp_parsers::stanza_error::DefinedCondition::ServiceUnavailable,
            "en",
            "no handler",
        );
        assert!(d.on_reply(&sent[0].0, Some(&to), Some(&refusal), t0));
        let [(_, via, st)] = <[_; 1]>::try_from(statuses(d.poll(held, t0))).unwrap();
        assert_eq!(via, Via::Reply("q1".into()));
        assert!(truncated(&st), "{st:?}");
        // Late replies to the other chunks are not ours any more.
        assert!(!d.on_reply(&sent[1].0, Some(&to), None, t0));

        // Silent: given up after IDLE without an acknowledgement.
        let mut d = Deliveries::new();
        d.offer(
            request("py@localhost/slix", Via::Message, j.clone(), &bytes),
            t0,
        )
        .unwrap();
        assert_eq!(chunks(&d.poll(held, t0)).len(), 5);
        assert!(statuses(d.poll(held, t0 + IDLE - Duration::from_secs(2))).is_empty());
        let [(_, _, st)] = <[_; 1]>::try_from(statuses(d.poll(held, t0 + IDLE))).unwrap();
        assert!(truncated(&st), "{st:?}");

        // Gone from the job table (retention) before the transfer could start.
        let mut d = Deliveries::new();
        d.offer(
            request("py@localhost/slix", Via::Message, j.clone(), &bytes),
            t0,
        )
        .unwrap();
        let [(_, _, st)] = <[_; 1]>::try_from(statuses(d.poll(|_| None, t0))).unwrap();
        assert!(truncated(&st), "{st:?}");
    }

    #[test]
    fn transfers_to_one_recipient_are_bounded_and_queued_in_order() {
        let bytes = output(70 * KIB);
        let to: Jid = "webapp@localhost/app".parse().unwrap();
        let t0 = Instant::now();
        let mut d = Deliveries::new();
        let held = |_: &JobId| Some(bytes.as_slice());
        for i in 0..ACTIVE_PER_RECIPIENT + QUEUED_REPLIES {
            d.offer(
                request(
                    "webapp@localhost/app",
                    Via::Reply(format!("q{i}")),
                    job(1),
                    &bytes,
                ),
                t0,
            )
            .unwrap();
        }
        let e = d
            .offer(
                request(
                    "webapp@localhost/app",
                    Via::Reply("q-over".into()),
                    job(1),
                    &bytes,
                ),
                t0,
            )
            .unwrap_err();
        assert_eq!(e.condition, Condition::Busy);
        // Watch messages are never refused, and another recipient has its own share.
        d.offer(
            request("webapp@localhost/app", Via::Message, job(2), &bytes),
            t0,
        )
        .unwrap();
        d.offer(
            request(
                "other@localhost/app",
                Via::Reply("o1".into()),
                job(3),
                &bytes,
            ),
            t0,
        )
        .unwrap();
        assert_eq!(d.pending(), (ACTIVE_PER_RECIPIENT + 1, QUEUED_REPLIES + 1));
        // Two chunks (70 KiB) per transfer; acknowledging everything as it comes drains every
        // queue, in order.
        let mut order = Vec::new();
        let mut sent: VecDeque<_> = chunks(&d.poll(held, t0)).into();
        assert_eq!(sent.len(), 2 * (ACTIVE_PER_RECIPIENT + 1));
        while let Some((id, c)) = sent.pop_front() {
            assert_eq!(c.total, 70 * KIB);
            if !d.on_reply(&id, Some(&to), None, t0) {
                let other: Jid = "other@localhost/app".parse().unwrap();
                assert!(d.on_reply(&id, Some(&other), None, t0));
            }
            let out = d.poll(held, t0);
            sent.extend(chunks(&out));
            order.extend(
                statuses(out)
                    .into_iter()
                    .filter(|(t, _, _)| *t == to)
                    .map(|(_, via, _)| via),
            );
        }
        assert_eq!(d.pending(), (0, 0));
        let mut want: Vec<Via> = (0..ACTIVE_PER_RECIPIENT + QUEUED_REPLIES)
            .map(|i| Via::Reply(format!("q{i}")))
            .collect();
        want.push(Via::Message);
        assert_eq!(order, want);
    }

    /// Our own session ended: the chunks in flight are sent again in the new one.
    #[test]
    fn chunks_in_flight_are_sent_again_after_our_reconnect() {
        let bytes = output(200 * KIB);
        let to: Jid = "webapp@localhost/app".parse().unwrap();
        let t0 = Instant::now();
        let mut d = Deliveries::new();
        let held = |_: &JobId| Some(bytes.as_slice());
        d.offer(
            request("webapp@localhost/app", Via::Message, job(1), &bytes),
            t0,
        )
        .unwrap();
        let first = chunks(&d.poll(held, t0));
        assert_eq!(first.len(), 4);
        assert!(d.on_reply(&first[0].0, Some(&to), None, t0));
        let _ = d.poll(held, t0);
        d.on_session_reset(t0);
        let again = chunks(&d.poll(held, t0));
        let mut offsets: Vec<u64> = again.iter().map(|(_, c)| c.offset).collect();
        offsets.sort_unstable();
        assert_eq!(offsets, vec![64 * KIB, 128 * KIB, 192 * KIB]);
        // Replies to the lost requests no longer count.
        assert!(!d.on_reply(&first[1].0, Some(&to), None, t0));
        let mut store = BlobStore::new(1 << 30, Duration::from_secs(60));
        store.put("d", first[0].1.clone(), t0).unwrap();
        let mut done = Vec::new();
        for (id, c) in again {
            store.put("d", c, t0).unwrap();
            assert!(d.on_reply(&id, Some(&to), None, t0));
            done.extend(statuses(d.poll(held, t0)));
        }
        let [(_, _, st)] = <[_; 1]>::try_from(done).unwrap();
        let Some(Outcome::Result(JobResult {
            output: Some(Data::Blob(b)),
            ..
        })) = st.outcome
        else {
            panic!("{:?}", st.outcome)
        };
        assert_eq!(store.take("d", &b).unwrap(), bytes);
    }

    #[test]
    fn a_digest_is_computed_once_per_job() {
        let mut d = Deliveries::new();
        let a = d.digest(&job(1), b"abc");
        assert_eq!(d.digest(&job(1), b"ignored: remembered"), a);
        assert_ne!(d.digest(&job(2), b"abd"), a);
    }
}
