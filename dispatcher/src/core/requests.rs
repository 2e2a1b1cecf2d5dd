//! The dispatcher's requests in flight to agents: job IQs, input uploads (chunks before their
//! job) and pings, keyed by IQ id, with the sender check for their replies.
//!
//! Part of the [`Core`](super::Core): placement adds requests here when it dispatches a job,
//! liveness when it pings a silent agent; the inbound classifier ([`super::inbound`]) takes a
//! reply's request out of here only when the reply comes from the agent the request went to.
//! A job has at most one request in flight, so forgetting a job's request (cancelled, timed
//! out, its agent gone) is one lookup.

use crate::fastmap::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jid::{FullJid, Jid};
use spine_protocol::upload::UploadWindow;
use spine_protocol::{BlobId, Job, JobId};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

/// Unacknowledged chunks per upload.
pub(crate) const CHUNK_WINDOW: usize = 8;
/// Time a silent agent has to answer a ping.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A job IQ in flight.
#[derive(Debug, Clone)]
pub(crate) struct Sent {
    pub job: JobId,
    pub agent: FullJid,
    pub attempt: u64,
    /// The request, to send again after our own reconnect (its reply may have been lost).
    pub payload: Job,
    /// When it was last sent: if the session ends right after, the largest recent request
    /// is blamed ([`crate::jobs::blame`]; its size counted then, not for every request).
    pub at: Instant,
}

/// The size of a job IQ's payload as serialised (what counts against a server's stanza
/// limit, less the few bytes of the `<iq>` around it).
fn stanza_bytes(job: &Job) -> usize {
    let size = crate::jobs::serialized_size(&minidom::Element::from(job.clone()));
    usize::try_from(size).unwrap_or(usize::MAX)
}

/// A large input being sent to an agent in chunks before its job (PROTOCOL.md §13).
struct Upload {
    sent: Sent,
    window: UploadWindow,
    /// When the last chunk was sent.
    last_chunk: Option<Instant>,
}

/// What a job's one request in flight is.
#[derive(Debug, Clone)]
enum Pending {
    Iq(String),
    Upload(u64),
}

/// A reply matched to its request.
pub(crate) enum Matched {
    /// The reply to a job IQ.
    Job(Box<Sent>),
    /// A ping's answer (or error) from the pinged agent.
    Ping(FullJid),
    /// A chunk acknowledgement of this upload.
    Chunk(u64),
    /// A job IQ's id, but from another sender: ignored.
    WrongSender,
    /// No request of ours has this id.
    Unknown,
}

/// The requests in flight.
pub(crate) struct Requests {
    /// A random per-process prefix of IQ ids, so a late reply meant for an earlier process
    /// (or a guessed id) never matches a request of this one.
    prefix: String,
    next: u64,
    jobs: HashMap<String, Sent>,
    by_job: HashMap<JobId, Pending>,
    uploads: HashMap<u64, Upload>,
    chunk_iqs: HashMap<String, u64>,
    pings: HashMap<String, (FullJid, Instant)>,
}

impl Requests {
    pub(crate) fn new(prefix: String) -> Self {
        Requests {
            prefix,
            next: 0,
            jobs: HashMap::default(),
            by_job: HashMap::default(),
            uploads: HashMap::default(),
            chunk_iqs: HashMap::default(),
            pings: HashMap::default(),
        }
    }

    /// A fresh id: `kind` (one letter or word), the process prefix, a counter.
    pub(crate) fn id(&mut self, kind: &str) -> String {
        self.next += 1;
        format!("{kind}{}-{}", self.prefix, self.next)
    }

    /// A fresh number (upload keys, blob names).
    pub(crate) fn number(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Job IQs in flight (uploads not counted).
    pub(crate) fn in_flight(&self) -> usize {
        self.jobs.len()
    }

    /// Records a job IQ sent with `id`, replacing any earlier request of the same job.
    pub(crate) fn job_sent(&mut self, id: String, sent: Sent) {
        self.forget_job(&sent.job);
        self.by_job
            .insert(sent.job.clone(), Pending::Iq(id.clone()));
        self.jobs.insert(id, sent);
    }

    /// Records a ping of `agent` sent with `id` at `at`.
    pub(crate) fn ping_sent(&mut self, id: String, agent: FullJid, at: Instant) {
        self.pings.insert(id, (agent, at));
    }

    /// Matches a reply (result or error) with id `id` from `from` to its request, taking the
    /// request out when it matches. The one place where a reply's sender is checked: it
    /// counts only from the entity the request went to.
    pub(crate) fn take_reply(&mut self, id: &str, from: Option<&Jid>) -> Matched {
        let from_agent = |a: &FullJid| from.is_some_and(|f| f.as_str() == a.as_str());
        if let Some(s) = self.jobs.get(id) {
            if !from_agent(&s.agent) {
                return Matched::WrongSender;
            }
            let Some(s) = self.jobs.remove(id) else {
                return Matched::Unknown;
            };
            self.by_job.remove(&s.job);
            return Matched::Job(Box::new(s));
        }
        if let Some((a, _)) = self.pings.get(id) {
            if !from_agent(a) {
                return Matched::WrongSender;
            }
            return match self.pings.remove(id) {
                Some((a, _)) => Matched::Ping(a),
                None => Matched::Unknown,
            };
        }
        if let Some(key) = self.chunk_iqs.get(id).copied() {
            let ours = self
                .uploads
                .get(&key)
                .is_some_and(|u| from_agent(&u.sent.agent));
            if !ours {
                return Matched::WrongSender;
            }
            self.chunk_iqs.remove(id);
            return Matched::Chunk(key);
        }
        Matched::Unknown
    }

    /// Pings unanswered for longer than [`PING_TIMEOUT`] (taken out).
    pub(crate) fn overdue_pings(&mut self, now: Instant) -> Vec<FullJid> {
        let overdue: Vec<String> = self
            .pings
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) > PING_TIMEOUT)
            .map(|(id, _)| id.clone())
            .collect();
        overdue
            .into_iter()
            .filter_map(|id| self.pings.remove(&id).map(|(a, _)| a))
            .collect()
    }

    /// When the oldest ping times out.
    pub(crate) fn next_ping_timeout(&self) -> Option<Instant> {
        self.pings.values().map(|(_, t)| *t + PING_TIMEOUT).min()
    }

    /// Forgets the request of a job (job IQ or input upload), e.g. when it is cancelled.
    pub(crate) fn forget_job(&mut self, job: &JobId) {
        match self.by_job.remove(job) {
            Some(Pending::Iq(id)) => {
                self.jobs.remove(&id);
            }
            Some(Pending::Upload(key)) => self.drop_upload(key),
            None => {}
        }
    }

    /// Forgets every request to `agent` (its session ended).
    pub(crate) fn forget_agent(&mut self, agent: &FullJid) {
        let jobs: Vec<JobId> = self
            .jobs
            .values()
            .map(|s| &s.job)
            .chain(self.uploads.values().map(|u| &u.sent.job))
            .filter(|j| {
                self.by_job.contains_key(*j) && self.sent_of(j).is_some_and(|s| &s.agent == agent)
            })
            .cloned()
            .collect();
        for j in jobs {
            self.forget_job(&j);
        }
        self.pings.retain(|_, (a, _)| a != agent);
    }

    fn sent_of(&self, job: &JobId) -> Option<&Sent> {
        match self.by_job.get(job)? {
            Pending::Iq(id) => self.jobs.get(id),
            Pending::Upload(key) => self.uploads.get(key).map(|u| &u.sent),
        }
    }

    fn drop_upload(&mut self, key: u64) {
        if let Some(u) = self.uploads.remove(&key) {
            if matches!(self.by_job.get(&u.sent.job), Some(Pending::Upload(k)) if *k == key) {
                self.by_job.remove(&u.sent.job);
            }
        }
        self.chunk_iqs.retain(|_, k| *k != key);
    }

    /// Starts sending `data` as blob `blob` to `sent.agent`; the job request follows when
    /// every chunk is acknowledged ([`Requests::pump_upload`]).
    pub(crate) fn start_upload(
        &mut self,
        key: u64,
        sent: Sent,
        blob: BlobId,
        data: Arc<Vec<u8>>,
        out: &mut Vec<Stanza>,
        now: Instant,
    ) {
        self.forget_job(&sent.job);
        self.by_job.insert(sent.job.clone(), Pending::Upload(key));
        self.uploads.insert(
            key,
            Upload {
                sent,
                window: UploadWindow::new(blob, data, CHUNK_WINDOW),
                last_chunk: None,
            },
        );
        self.pump_upload(key, out, now);
    }

    /// Sends chunks up to the window; when all are acknowledged, the job itself.
    pub(crate) fn pump_upload(&mut self, key: u64, out: &mut Vec<Stanza>, now: Instant) {
        let Some(u) = self.uploads.get_mut(&key) else {
            return;
        };
        let to: Jid = u.sent.agent.clone().into();
        let mut chunks = Vec::new();
        while let Some(chunk) = u.window.next_chunk() {
            u.last_chunk = Some(now);
            chunks.push(chunk);
        }
        let complete = u.window.is_complete();
        for chunk in chunks {
            let id = self.id("b");
            self.chunk_iqs.insert(id.clone(), key);
            out.push(Iq::from_set(id, chunk).with_to(to.clone()).into());
        }
        if !complete {
            return;
        }
        let Some(mut u) = self.uploads.remove(&key) else {
            return;
        };
        self.by_job.remove(&u.sent.job);
        u.sent.at = now;
        let id = self.id("j");
        out.push(
            Iq::from_set(id.clone(), u.sent.payload.clone())
                .with_to(to)
                .into(),
        );
        self.job_sent(id, u.sent);
    }

    /// A chunk of upload `key` was acknowledged.
    pub(crate) fn chunk_acked(&mut self, key: u64, out: &mut Vec<Stanza>, now: Instant) {
        if let Some(u) = self.uploads.get_mut(&key) {
            u.window.acked();
        }
        self.pump_upload(key, out, now);
    }

    /// A chunk of upload `key` was refused: the upload ends; its job request is returned (the
    /// refusal counts as the job's error).
    pub(crate) fn upload_refused(&mut self, key: u64) -> Option<Sent> {
        let sent = self.uploads.get(&key).map(|u| u.sent.clone());
        self.drop_upload(key);
        sent
    }

    /// After our reconnect: uploads start over (acknowledgements of the old session are
    /// lost) and every job IQ is sent again with a new id. The agent attaches a repeated job
    /// id to the running job, or answers from its outcome cache, so nothing runs twice.
    pub(crate) fn resend_all(&mut self, out: &mut Vec<Stanza>, now: Instant) {
        self.chunk_iqs.clear();
        let keys: Vec<u64> = self.uploads.keys().copied().collect();
        for k in keys {
            if let Some(u) = self.uploads.get_mut(&k) {
                u.window.restart();
            }
            self.pump_upload(k, out, now);
        }
        let old: Vec<Sent> = self.jobs.drain().map(|(_, s)| s).collect();
        for mut s in old {
            s.at = now;
            let id = self.id("j");
            let to: Jid = s.agent.clone().into();
            out.push(
                Iq::from_set(id.clone(), s.payload.clone())
                    .with_to(to)
                    .into(),
            );
            self.job_sent(id, s);
        }
    }

    /// Every request with when it (or its last chunk) was sent and its stanza size, for
    /// blaming a session that ended ([`crate::jobs::blame`]).
    pub(crate) fn sent_sizes(&self) -> Vec<(JobId, usize, Instant)> {
        let sent = self
            .jobs
            .values()
            .map(|s| (s.job.clone(), stanza_bytes(&s.payload), s.at));
        let chunks = self.uploads.values().filter_map(|u| {
            let bytes = u.window.largest_stanza().max(stanza_bytes(&u.sent.payload));
            u.last_chunk.map(|at| (u.sent.job.clone(), bytes, at))
        });
        sent.chain(chunks).collect()
    }

    /// Sets the attempt number of `job`'s request (sent again as a new attempt).
    pub(crate) fn set_attempt(&mut self, job: &JobId, attempt: u64) {
        let key = self.by_job.get(job).cloned();
        let s = match key {
            Some(Pending::Iq(id)) => self.jobs.get_mut(&id),
            Some(Pending::Upload(k)) => self.uploads.get_mut(&k).map(|u| &mut u.sent),
            None => None,
        };
        if let Some(s) = s {
            s.attempt = attempt;
            s.payload.attempt = attempt;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn sent(job: &str, agent: &str) -> Sent {
        Sent {
            job: job.parse().unwrap(),
            agent: agent.parse().unwrap(),
            attempt: 1,
            payload: Job::new(job.parse().unwrap(), "c.x".parse().unwrap()),
            at: Instant::now(),
        }
    }

    #[test]
    fn a_reply_counts_only_from_the_agent_it_went_to() {
        let mut r = Requests::new("p".into());
        let id = r.id("j");
        r.job_sent(id.clone(), sent("j1", "a@x/w"));
        let other: Jid = "b@x/w".parse().unwrap();
        assert!(matches!(
            r.take_reply(&id, Some(&other)),
            Matched::WrongSender
        ));
        assert!(matches!(r.take_reply(&id, None), Matched::WrongSender));
        let right: Jid = "a@x/w".parse().unwrap();
        assert!(
            matches!(r.take_reply(&id, Some(&right)), Matched::Job(s) if s.job.as_str() == "j1")
        );
        assert!(matches!(r.take_reply(&id, Some(&right)), Matched::Unknown));
    }

    #[test]
    fn a_job_has_one_request_and_forgetting_it_is_one_lookup() {
        let mut r = Requests::new("p".into());
        let a = r.id("j");
        r.job_sent(a.clone(), sent("j1", "a@x/w"));
        let b = r.id("j");
        r.job_sent(b.clone(), sent("j1", "a@x/w"));
        assert_eq!(
            r.in_flight(),
            1,
            "a new request of a job replaces the old one"
        );
        r.forget_job(&"j1".parse().unwrap());
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn uploads_keep_at_most_the_window_unacknowledged_then_send_the_job() {
        let mut r = Requests::new("p".into());
        let data = Arc::new(vec![7u8; spine_protocol::INLINE_LIMIT * 10 + 1]);
        let mut out = Vec::new();
        let now = Instant::now();
        let key = r.number();
        r.start_upload(
            key,
            sent("j1", "a@x/w"),
            "in-1".parse().unwrap(),
            data,
            &mut out,
            now,
        );
        assert_eq!(out.len(), CHUNK_WINDOW);
        let ids: Vec<String> = out
            .iter()
            .map(|s| match s {
                Stanza::Iq(iq) => iq.id().to_owned(),
                _ => panic!("a chunk is an IQ"),
            })
            .collect();
        let agent: Jid = "a@x/w".parse().unwrap();
        let mut all = std::mem::take(&mut out);
        let mut queue: VecDeque<String> = ids.into();
        let mut job_seen = false;
        while let Some(id) = queue.pop_front() {
            match r.take_reply(&id, Some(&agent)) {
                Matched::Chunk(k) => r.chunk_acked(k, &mut out, now),
                Matched::Job(s) => {
                    assert_eq!(s.job.as_str(), "j1");
                    job_seen = true;
                }
                _ => panic!("reply {id} not matched"),
            }
            assert!(queue.len() + out.len() <= CHUNK_WINDOW, "window exceeded");
            for s in &out {
                if let Stanza::Iq(iq) = s {
                    queue.push_back(iq.id().to_owned());
                }
            }
            all.append(&mut out);
        }
        // 11 chunks, then the job once every chunk was acknowledged.
        assert!(job_seen);
        assert_eq!(all.len(), 12);
        assert_eq!(r.in_flight(), 0);
    }
}
