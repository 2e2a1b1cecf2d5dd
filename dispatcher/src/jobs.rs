//! The job lifecycle as a pure state machine: accepted → queued → dispatched(agent, attempt)
//! → running → succeeded | failed | cancelled | timed-out, with retries.
//!
//! The dispatcher's connection task feeds it events (submitted, dispatched, started, result,
//! attempt failed, agent gone, cancel, time passing) with the time as a parameter (milliseconds
//! since the UNIX epoch, so deadlines survive a restart) and acts on the decisions it returns:
//! which job to place next, which agent to tell to cancel, which jobs timed out. Each job ends
//! in exactly one recorded outcome: a second result for the same job (two agents ran it) is
//! reported as a duplicate and not recorded.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use jid::{FullJid, Jid};
use serde::{Deserialize, Serialize};
use spine_protocol::{
    AttrName, CapabilityName, Condition, Filter, JobId, JobResult, JobState, MapReduce, SpineError,
    Strategy,
};

mod mapreduce;
pub use mapreduce::{Advance, MapReduceState, Straggler, Task};

/// What the submitter asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The capability.
    pub capability: CapabilityName,
    /// Placement strategy.
    pub strategy: Strategy,
    /// Attribute filter (its canonical text).
    pub filter: Option<String>,
    /// Numeric attribute to sort agents by.
    pub sort: Option<AttrName>,
    /// Key of the affinity strategy.
    pub affinity_key: Option<String>,
    /// Arguments (a JSON object).
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Input bytes. Not part of the record's JSON: the store keeps inputs in a table of their
    /// own, written once (records written by earlier versions, input included, still load).
    #[serde(
        default,
        skip_serializing,
        deserialize_with = "base64_bytes::deserialize"
    )]
    pub input: Vec<u8>,
    /// Input MIME type.
    pub input_mime: Option<String>,
    /// Absolute deadline, ms since the UNIX epoch.
    pub deadline_ms: Option<u64>,
    /// Higher first.
    pub priority: i64,
    /// Attempts before failing.
    pub max_attempts: u64,
    /// Who submitted (JID or `http:<token>`).
    pub submitter: String,
    /// Idempotency key given by the submitter.
    pub idempotency_key: Option<String>,
    /// Whether progress reports are wanted.
    pub progress: bool,
    /// Full JID to push progress and the final status to (XMPP watch mode).
    pub watch: Option<String>,
    /// `all` strategy: how many capable agents to use.
    #[serde(default)]
    pub limit: Option<spine_protocol::Limit>,
    /// `all` strategy: how many children run at once.
    #[serde(default)]
    pub batch: Option<u64>,
    /// A child of an `all` job: the agent (full JID) it must run on.
    #[serde(default)]
    pub target: Option<String>,
    /// A child of an `all` or map/reduce job: its parent.
    #[serde(default)]
    pub parent: Option<JobId>,
    /// A map/reduce job: `capability` is the map step.
    #[serde(default)]
    pub mapreduce: Option<MapReduce>,
}

impl JobSpec {
    /// What must hold of a job before it is stored, so that it is refused at once instead of
    /// failing (or worse, running otherwise) later: its stored filter text parses (placement
    /// reads it back with [`JobSpec::parsed_filter`]), and a map/reduce job without a split
    /// step has a fragment list as its input.
    pub fn check_input(&self) -> Result<(), SpineError> {
        if let Some(f) = &self.filter {
            f.parse::<Filter>().map_err(|e| {
                SpineError::new(Condition::BadArguments)
                    .with_field("filter")
                    .with_text(e.to_string())
            })?;
        }
        match &self.mapreduce {
            Some(m) if m.split.is_none() => spine_protocol::fragments::decode(&self.input)
                .map(|_| ())
                .map_err(|e| {
                    SpineError::new(Condition::BadArguments)
                        .with_field("input")
                        .with_text(e)
                }),
            _ => Ok(()),
        }
    }

    /// The parsed filter, if any (it parses: [`JobSpec::check_input`] saw to that).
    pub fn parsed_filter(&self) -> Option<Filter> {
        self.filter.as_deref().and_then(|f| f.parse().ok())
    }

    /// Its arguments fit `max_args` bytes as they travel in the job stanza, so that no job
    /// stanza can exceed an XMPP server's stanza limit (issue 14, finding 5): otherwise
    /// `bad-arguments`, field `args`.
    pub fn check_args(&self, max_args: u64) -> Result<(), SpineError> {
        let args = args_wire_size(&self.args);
        if args > max_args {
            return Err(SpineError::new(Condition::BadArguments)
                .with_field("args")
                .with_text(format!(
                    "the arguments take {args} bytes in the job stanza, over the limit of {max_args} (max_args): send large data as the job's input"
                )));
        }
        Ok(())
    }

    /// Its `max-attempts` and `priority` are within its submitter's `limits` (issue 14,
    /// finding 11; the limits are never below the configured default attempts, so only a job
    /// that asked can be over). Errors are `bad-arguments` naming the field as the submitter
    /// wrote it (`max_attempts` over HTTP, `max-attempts` over XMPP).
    pub fn check_limits(&self, limits: &crate::policy::SubmitLimits) -> Result<(), SpineError> {
        let bad = |field: &str, text: String| {
            Err(SpineError::new(Condition::BadArguments)
                .with_field(field)
                .with_text(text))
        };
        let http = self.submitter.starts_with("http:");
        if self.max_attempts > limits.max_attempts {
            return bad(
                if http { "max_attempts" } else { "max-attempts" },
                format!(
                    "{} attempts asked, over this submitter's limit of {}",
                    self.max_attempts, limits.max_attempts
                ),
            );
        }
        if self.priority > limits.max_priority {
            return bad(
                "priority",
                format!(
                    "priority {} is over this submitter's limit of {}",
                    self.priority, limits.max_priority
                ),
            );
        }
        Ok(())
    }
}

/// The size of a job's arguments as they travel in its job stanza: the `<args>` element,
/// serialised as the XMPP stream will carry it (JSON text escaped for XML, so up to several
/// times the JSON's own length). 0 for no arguments (the element is left out).
pub fn args_wire_size(args: &serde_json::Map<String, serde_json::Value>) -> u64 {
    if args.is_empty() {
        return 0;
    }
    let text = serde_json::Value::Object(args.clone()).to_string();
    let el = minidom::Element::builder("args", spine_protocol::NS)
        .append(text)
        .build();
    serialized_size(&el)
}

/// The size of an element as serialised, counted without building the text.
pub fn serialized_size(el: &minidom::Element) -> u64 {
    /// Counts what is written.
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    match el.write_to(&mut n) {
        Ok(()) => n.0,
        // Unreachable for a counter; never let such an element pass as small.
        Err(_) => u64::MAX,
    }
}

use spine_protocol::serde_base64 as base64_bytes;

/// How a job ended, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Recorded {
    /// The result (output inline; large outputs are assembled before recording).
    Succeeded {
        /// Metadata JSON.
        meta: serde_json::Map<String, serde_json::Value>,
        /// Output bytes.
        #[serde(with = "base64_bytes")]
        output: Vec<u8>,
        /// Output MIME type.
        mime: Option<String>,
        /// Handler time.
        elapsed_ms: Option<u64>,
    },
    /// Failed, cancelled or timed out.
    Failure {
        /// Spine condition.
        condition: String,
        /// Message.
        message: Option<String>,
        /// For `bad-arguments`: the argument the agent (or the dispatcher) named, passed on to
        /// every submitter (`error.field` over HTTP, `field` of `<failure>` over XMPP).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
    },
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// The request.
    pub spec: JobSpec,
    /// State.
    pub state: JobState,
    /// Attempts made.
    pub attempts: u64,
    /// Agent of the current or last attempt.
    pub agent: Option<String>,
    /// Agents that failed this job (not used again unless nothing else is left).
    pub excluded: Vec<String>,
    /// Outcome once final.
    pub outcome: Option<Recorded>,
    /// Last progress.
    pub percent: Option<u8>,
    /// When it was accepted.
    pub accepted_ms: u64,
    /// Last change.
    pub updated_ms: u64,
    /// Not to be dispatched before (retry backoff).
    pub not_before_ms: u64,
    /// Order of submission (FIFO among equal priorities).
    pub seq: u64,
    /// An `all` job: one child per agent; a map/reduce job: every step it created.
    #[serde(default)]
    pub children: Vec<JobId>,
    /// A map/reduce job's plan and progress, once started.
    #[serde(default)]
    pub mr: Option<MapReduceState>,
    /// When the current or last attempt was sent (ms since the UNIX epoch).
    #[serde(default)]
    pub dispatched_ms: u64,
    /// Restored after a restart while it was on `agent`: send it back there with the same
    /// attempt number (the agent attaches it to the running job or answers from its cache).
    #[serde(default)]
    pub resume: bool,
}

/// What to do after an attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterFailure {
    /// Queued again; not before the given time.
    Retry {
        /// Earliest dispatch time.
        not_before_ms: u64,
    },
    /// The job ended.
    Final(JobState),
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The capability's queue is full.
    #[error("the queue for {capability} is full ({limit} jobs)")]
    QueueFull {
        /// The capability.
        capability: CapabilityName,
        /// The bound.
        limit: usize,
    },
    /// The submitter already has its share of the capability's queue.
    #[error("{submitter} already has {limit} jobs queued for {capability}, its share of the queue (max_queued)")]
    SubmitterQuota {
        /// The submitter.
        submitter: String,
        /// The capability.
        capability: CapabilityName,
        /// Its share.
        limit: usize,
    },
    /// The id is taken.
    #[error("job id {0} already exists")]
    Exists(JobId),
}

/// What became of a job whose request went out just before the dispatcher's XMPP session
/// ended ([`JobTable::session_lost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionLost {
    /// Counted as a failed attempt; it goes to its agent again as this attempt.
    Resend {
        /// The new attempt number.
        attempt: u64,
    },
    /// That was its last attempt: it failed.
    Final,
}

/// Which requests to blame for a session that ended: among those sent from `since` to `died`
/// (each a key, its stanza's size in bytes and when it was sent), the largest. A server closes
/// a session for a stanza over its size limit (`policy-violation`), and that stanza is then
/// at least as large as any other sent with it; when the session ended for another reason
/// (a server restart), this blames one request, which costs it one attempt.
pub fn blame<K, T: Ord + Copy>(
    sent: impl IntoIterator<Item = (K, usize, T)>,
    since: T,
    died: T,
) -> Vec<K> {
    let recent: Vec<(K, usize)> = sent
        .into_iter()
        .filter(|(_, _, at)| since <= *at && *at <= died)
        .map(|(k, bytes, _)| (k, bytes))
        .collect();
    let Some(largest) = recent.iter().map(|(_, b)| *b).max() else {
        return Vec::new();
    };
    recent
        .into_iter()
        .filter(|(_, b)| *b == largest)
        .map(|(k, _)| k)
        .collect()
}

/// The job id is not known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no job {0}")]
pub struct UnknownJob(pub JobId);

/// A result for a job that already has its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate;

/// Retry backoff after the `attempt`-th failure: 200 ms doubling, at most 10 s.
pub fn backoff_ms(attempt: u64) -> u64 {
    (200u64 << attempt.saturating_sub(1).min(6)).min(10_000)
}

type QueueKey = (Reverse<i64>, u64, JobId);

/// All jobs the dispatcher knows, and the queues of those waiting for an agent.
#[derive(Debug, Default)]
pub struct JobTable {
    jobs: HashMap<JobId, JobRecord>,
    queues: HashMap<CapabilityName, BTreeSet<QueueKey>>,
    /// Queued jobs per (submitter, capability): submitters' shares of the queues.
    queued_by: HashMap<(String, CapabilityName), usize>,
    next_seq: u64,
    max_queue: usize,
}

impl JobTable {
    /// A table whose per-capability queues hold at most `max_queue` jobs.
    pub fn new(max_queue: usize) -> Self {
        JobTable {
            max_queue,
            ..Default::default()
        }
    }

    /// A job by id.
    pub fn get(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// Every job known.
    pub fn iter(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Number of jobs known.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Jobs queued for `cap`.
    pub fn queued(&self, cap: &CapabilityName) -> usize {
        self.queues.get(cap).map_or(0, BTreeSet::len)
    }

    /// Capabilities with queued jobs.
    pub fn queued_capabilities(&self) -> Vec<CapabilityName> {
        self.queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// Counts by (capability, state), for metrics.
    pub fn counts(&self) -> HashMap<(CapabilityName, JobState), u64> {
        let mut m = HashMap::new();
        for j in self.jobs.values() {
            *m.entry((j.spec.capability.clone(), j.state)).or_default() += 1;
        }
        m
    }

    /// Jobs of `submitter` queued for `cap` (counted against its share, `max_queued`).
    pub fn queued_by(&self, submitter: &str, cap: &CapabilityName) -> usize {
        self.queued_by
            .get(&(submitter.to_owned(), cap.clone()))
            .copied()
            .unwrap_or(0)
    }

    fn enqueue(&mut self, id: &JobId) {
        if let Some(j) = self.jobs.get(id) {
            let added = self
                .queues
                .entry(j.spec.capability.clone())
                .or_default()
                .insert((Reverse(j.spec.priority), j.seq, id.clone()));
            if added {
                *self
                    .queued_by
                    .entry((j.spec.submitter.clone(), j.spec.capability.clone()))
                    .or_default() += 1;
            }
        }
    }

    fn dequeue(&mut self, id: &JobId) {
        if let Some(j) = self.jobs.get(id) {
            let removed = self
                .queues
                .get_mut(&j.spec.capability)
                .is_some_and(|q| q.remove(&(Reverse(j.spec.priority), j.seq, id.clone())));
            let key = (j.spec.submitter.clone(), j.spec.capability.clone());
            if removed {
                if let Some(n) = self.queued_by.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.queued_by.remove(&key);
                    }
                }
            }
        }
    }

    /// Accepts a new job (queued at once).
    pub fn submit(
        &mut self,
        id: JobId,
        spec: JobSpec,
        now_ms: u64,
    ) -> Result<&JobRecord, SubmitError> {
        self.submit_within(id, spec, now_ms, usize::MAX)
    }

    /// Accepts a new job if its capability's queue has room and its submitter has fewer than
    /// `max_queued` jobs queued for that capability.
    pub fn submit_within(
        &mut self,
        id: JobId,
        spec: JobSpec,
        now_ms: u64,
        max_queued: usize,
    ) -> Result<&JobRecord, SubmitError> {
        if self.jobs.contains_key(&id) {
            return Err(SubmitError::Exists(id));
        }
        if self.queued(&spec.capability) >= self.max_queue {
            return Err(SubmitError::QueueFull {
                capability: spec.capability,
                limit: self.max_queue,
            });
        }
        if self.queued_by(&spec.submitter, &spec.capability) >= max_queued {
            return Err(SubmitError::SubmitterQuota {
                submitter: spec.submitter,
                capability: spec.capability,
                limit: max_queued,
            });
        }
        self.insert_queued(id.clone(), spec, now_ms);
        Ok(&self.jobs[&id])
    }

    /// Records a new job, queued, with the next submission order.
    fn insert_queued(&mut self, id: JobId, spec: JobSpec, now_ms: u64) {
        self.next_seq += 1;
        let rec = JobRecord {
            id: id.clone(),
            spec,
            state: JobState::Queued,
            attempts: 0,
            agent: None,
            excluded: Vec::new(),
            outcome: None,
            percent: None,
            accepted_ms: now_ms,
            updated_ms: now_ms,
            not_before_ms: 0,
            seq: self.next_seq,
            children: Vec::new(),
            mr: None,
            dispatched_ms: 0,
            resume: false,
        };
        self.jobs.insert(id.clone(), rec);
        self.enqueue(&id);
    }

    /// Restores a job read from the store after a restart. Jobs that were dispatched are
    /// queued again (their agent may have finished them while we were down: the agent's
    /// outcome cache answers the re-sent job without running it twice).
    pub fn restore(&mut self, mut rec: JobRecord) {
        self.next_seq = self.next_seq.max(rec.seq);
        // A parent of an `all` or map/reduce job stays running: its children carry the work.
        if rec.children.is_empty()
            && rec.mr.is_none()
            && matches!(
                rec.state,
                JobState::Accepted | JobState::Dispatched | JobState::Running
            )
        {
            rec.resume = rec.state != JobState::Accepted && rec.agent.is_some();
            rec.state = JobState::Queued;
        }
        let id = rec.id.clone();
        let queued = rec.state == JobState::Queued;
        self.jobs.insert(id.clone(), rec);
        if queued {
            self.enqueue(&id);
        }
    }

    /// The next job of `cap` to place: highest priority, then oldest; skipping those in
    /// backoff.
    pub fn next_for(&self, cap: &CapabilityName, now_ms: u64) -> Option<&JobRecord> {
        self.queues
            .get(cap)?
            .iter()
            .filter_map(|(_, _, id)| self.jobs.get(id))
            .find(|j| j.not_before_ms <= now_ms)
    }

    /// Up to `limit` queued jobs of `cap` ready to place, in placement order.
    pub fn queued_in_order(&self, cap: &CapabilityName, now_ms: u64, limit: usize) -> Vec<JobId> {
        let Some(q) = self.queues.get(cap) else {
            return Vec::new();
        };
        q.iter()
            .filter_map(|(_, _, id)| self.jobs.get(id))
            .filter(|j| j.not_before_ms <= now_ms)
            .take(limit)
            .map(|j| j.id.clone())
            .collect()
    }

    /// Fans an `all` job out: one child per agent in `targets`, queued; the parent runs until
    /// they have all ended. Returns the children.
    pub fn fan_out(&mut self, parent: &JobId, targets: &[String], now_ms: u64) -> Vec<JobId> {
        self.dequeue(parent);
        let Some(p) = self.jobs.get(parent).cloned() else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for (i, agent) in targets.iter().enumerate() {
            let Ok(id) = format!("{parent}.{}", i + 1).parse::<JobId>() else {
                continue;
            };
            let mut spec = p.spec.clone();
            spec.strategy = Strategy::LeastLoaded;
            spec.limit = None;
            spec.batch = None;
            spec.idempotency_key = None;
            spec.watch = None;
            spec.target = Some(agent.clone());
            spec.parent = Some(parent.clone());
            self.insert_queued(id.clone(), spec, now_ms);
            ids.push(id);
        }
        if let Some(p) = self.jobs.get_mut(parent) {
            p.state = JobState::Running;
            p.attempts = 1;
            p.children = ids.clone();
            p.updated_ms = now_ms;
        }
        ids
    }

    /// Children of `parent` that are dispatched or running.
    pub fn running_children(&self, parent: &JobId) -> u64 {
        self.jobs.get(parent).map_or(0, |p| {
            p.children
                .iter()
                .filter(|c| {
                    self.jobs.get(*c).is_some_and(|j| {
                        matches!(j.state, JobState::Dispatched | JobState::Running)
                    })
                })
                .count() as u64
        })
    }

    /// When every child of an `all` job has ended, records the parent's outcome: a JSON report
    /// of each agent's outcome (succeeded if at least one child did). Returns whether the
    /// parent ended now.
    pub fn gather(&mut self, parent: &JobId, now_ms: u64) -> bool {
        use base64::Engine as _;
        let Some(p) = self.jobs.get(parent) else {
            return false;
        };
        if p.state.is_final() || p.children.is_empty() || p.mr.is_some() {
            return false;
        }
        let children: Vec<&JobRecord> =
            p.children.iter().filter_map(|c| self.jobs.get(c)).collect();
        if children.iter().any(|c| !c.state.is_final()) {
            return false;
        }
        let mut report = Vec::new();
        let mut succeeded = 0u64;
        for c in &children {
            let mut entry =
                serde_json::json!({ "job": c.id, "agent": c.spec.target, "state": c.state });
            match &c.outcome {
                Some(Recorded::Succeeded {
                    output, mime, meta, ..
                }) => {
                    succeeded += 1;
                    entry["output"] =
                        serde_json::json!(base64::engine::general_purpose::STANDARD.encode(output));
                    entry["type"] = serde_json::json!(mime);
                    entry["meta"] = serde_json::json!(meta);
                }
                Some(Recorded::Failure {
                    condition,
                    message,
                    field,
                }) => {
                    entry["error"] =
                        serde_json::json!({ "condition": condition, "message": message });
                    if let Some(f) = field {
                        entry["error"]["field"] = serde_json::json!(f);
                    }
                }
                None => {}
            }
            report.push(entry);
        }
        let total = children.len() as u64;
        let Some(rec) = self.jobs.get_mut(parent) else {
            return false;
        };
        rec.updated_ms = now_ms;
        rec.percent = Some(100);
        if succeeded > 0 {
            let mut meta = serde_json::Map::new();
            meta.insert("agents".into(), total.into());
            meta.insert("succeeded".into(), succeeded.into());
            rec.state = JobState::Succeeded;
            rec.outcome = Some(Recorded::Succeeded {
                meta,
                output: serde_json::Value::Array(report).to_string().into_bytes(),
                mime: Some("application/json".into()),
                elapsed_ms: None,
            });
        } else {
            rec.state = JobState::Failed;
            rec.outcome = Some(Recorded::Failure {
                condition: Condition::Failed.as_str().to_owned(),
                message: Some(format!(
                    "the job failed on all {total} agents: {}",
                    serde_json::Value::Array(report)
                )),
                field: None,
            });
        }
        true
    }

    /// The job was sent to `agent`.
    pub fn dispatched(&mut self, id: &JobId, agent: &FullJid, now_ms: u64) -> Option<&JobRecord> {
        self.dequeue(id);
        let j = self.jobs.get_mut(id)?;
        j.state = JobState::Dispatched;
        // Sent back to the agent that had it before a restart: the same attempt.
        let same = j.resume && j.agent.as_deref() == Some(agent.to_string().as_str());
        if !same || j.attempts == 0 {
            j.attempts += 1;
        }
        j.resume = false;
        j.agent = Some(agent.to_string());
        j.updated_ms = now_ms;
        j.dispatched_ms = now_ms;
        Some(j)
    }

    /// The agent reported progress (the first report means it started).
    pub fn progress(&mut self, id: &JobId, percent: Option<u8>, now_ms: u64) {
        if let Some(j) = self.jobs.get_mut(id) {
            if j.state == JobState::Dispatched {
                j.state = JobState::Running;
            }
            if j.state == JobState::Running {
                j.percent = percent.or(j.percent);
                j.updated_ms = now_ms;
            }
        }
    }

    /// A result arrived. `Err(Duplicate)` if the job already has its outcome.
    pub fn succeeded(
        &mut self,
        id: &JobId,
        result: &JobResult,
        output: Vec<u8>,
        mime: Option<String>,
        now_ms: u64,
    ) -> Result<&JobRecord, Duplicate> {
        let j = self.jobs.get_mut(id).ok_or(Duplicate)?;
        if j.state.is_final() {
            return Err(Duplicate);
        }
        let was_queued = j.state == JobState::Queued;
        j.state = JobState::Succeeded;
        j.percent = Some(100);
        j.outcome = Some(Recorded::Succeeded {
            meta: result.meta.0.clone(),
            output,
            mime,
            elapsed_ms: result.elapsed_ms,
        });
        j.updated_ms = now_ms;
        if was_queued {
            // A late result of an earlier attempt while a retry was waiting: take it.
            self.dequeue(id);
        }
        Ok(&self.jobs[id])
    }

    fn finalize(
        &mut self,
        id: &JobId,
        state: JobState,
        condition: Condition,
        message: Option<String>,
        now_ms: u64,
    ) {
        self.finalize_with_field(id, state, condition, message, None, now_ms);
    }

    /// [`JobTable::finalize`], recording the argument at fault (`bad-arguments`).
    fn finalize_with_field(
        &mut self,
        id: &JobId,
        state: JobState,
        condition: Condition,
        message: Option<String>,
        field: Option<String>,
        now_ms: u64,
    ) {
        self.dequeue(id);
        if let Some(j) = self.jobs.get_mut(id) {
            j.state = state;
            j.outcome = Some(Recorded::Failure {
                condition: condition.as_str().to_owned(),
                message,
                field,
            });
            j.updated_ms = now_ms;
        }
    }

    /// An attempt failed on `agent` with `error` (`None`: the agent is gone). Retries
    /// transient failures while attempts and time remain.
    pub fn attempt_failed(
        &mut self,
        id: &JobId,
        agent: Option<&FullJid>,
        error: Option<&SpineError>,
        now_ms: u64,
    ) -> Option<AfterFailure> {
        let j = self.jobs.get_mut(id)?;
        if j.state.is_final() || j.state == JobState::Queued {
            return None; // already decided (or a stale report of an earlier attempt)
        }
        if let Some(a) = agent {
            let a = a.to_string();
            if !j.excluded.contains(&a) {
                j.excluded.push(a);
            }
        }
        let retryable = error.is_none_or(|e| e.condition.is_retryable());
        let time_left = j.spec.deadline_ms.is_none_or(|d| now_ms < d);
        if retryable && j.attempts < j.spec.max_attempts && time_left {
            j.state = JobState::Queued;
            j.not_before_ms = now_ms + backoff_ms(j.attempts);
            j.updated_ms = now_ms;
            let nb = j.not_before_ms;
            self.enqueue(id);
            return Some(AfterFailure::Retry { not_before_ms: nb });
        }
        let (state, condition, message) = match error {
            Some(e) if e.condition == Condition::DeadlineExceeded => {
                (JobState::TimedOut, e.condition, e.text.clone())
            }
            Some(e) if e.condition == Condition::Cancelled => {
                (JobState::Cancelled, e.condition, e.text.clone())
            }
            Some(e) if retryable => (
                JobState::Failed,
                e.condition,
                Some(format!(
                    "gave up after {} attempts: {}",
                    j.attempts,
                    e.text.clone().unwrap_or_default()
                )),
            ),
            Some(e) => (JobState::Failed, e.condition, e.text.clone()),
            None if !time_left => (
                JobState::TimedOut,
                Condition::DeadlineExceeded,
                Some("deadline passed while retrying".into()),
            ),
            None => (
                JobState::Failed,
                Condition::Retryable,
                Some(format!(
                    "the agent was lost on each of {} attempts",
                    j.attempts
                )),
            ),
        };
        // The agent's `field` (the argument it refused) goes with the job's outcome.
        let field = error.and_then(|e| e.field.clone());
        self.finalize_with_field(id, state, condition, message, field, now_ms);
        Some(AfterFailure::Final(state))
    }

    /// The dispatcher's XMPP session ended right after this job's request was sent: the likely
    /// cause is the request itself (a stanza over the server's size limit makes the server
    /// close the session), and sending it again as it is would end every new session too.
    /// Counts as a failed attempt: while attempts remain the job stays with its agent, to be
    /// sent again with the next attempt number (the agent attaches a repeated job id to the
    /// running job); after the last one it fails. `None` if the job is not in flight.
    pub fn session_lost(&mut self, id: &JobId, now_ms: u64) -> Option<SessionLost> {
        let j = self.jobs.get_mut(id)?;
        if !matches!(j.state, JobState::Dispatched | JobState::Running) {
            return None;
        }
        j.updated_ms = now_ms;
        if j.attempts < j.spec.max_attempts {
            j.attempts += 1;
            return Some(SessionLost::Resend {
                attempt: j.attempts,
            });
        }
        let message = format!(
            "gave up after {} attempts: the dispatcher's XMPP session ended right after the job was sent (is the job stanza over the XMPP server's size limit?)",
            j.attempts
        );
        self.finalize(
            id,
            JobState::Failed,
            Condition::Retryable,
            Some(message),
            now_ms,
        );
        Some(SessionLost::Final)
    }

    /// The agent refused the attempt without running it (`busy`, `draining`): queue the job
    /// again without counting the attempt or excluding the agent; it was only unlucky timing.
    pub fn refused(&mut self, id: &JobId, now_ms: u64) -> bool {
        let Some(j) = self.jobs.get_mut(id) else {
            return false;
        };
        if !matches!(j.state, JobState::Dispatched | JobState::Running) {
            return false;
        }
        j.state = JobState::Queued;
        j.attempts = j.attempts.saturating_sub(1);
        j.not_before_ms = now_ms + 50;
        j.updated_ms = now_ms;
        self.enqueue(id);
        true
    }

    /// Cancels a job. Returns the agent running it (to send `<cancel/>` to), if any.
    /// `Err` if the job is unknown; a final job stays as it is.
    pub fn cancel(&mut self, id: &JobId, now_ms: u64) -> Result<Option<String>, UnknownJob> {
        self.cancel_because(id, "cancelled by the submitter", now_ms)
    }

    /// Cancels a job, recording `reason`; otherwise as [`JobTable::cancel`].
    pub fn cancel_because(
        &mut self,
        id: &JobId,
        reason: &str,
        now_ms: u64,
    ) -> Result<Option<String>, UnknownJob> {
        let j = self.jobs.get(id).ok_or_else(|| UnknownJob(id.clone()))?;
        if j.state.is_final() {
            return Ok(None);
        }
        let agent = matches!(j.state, JobState::Dispatched | JobState::Running)
            .then(|| j.agent.clone())
            .flatten();
        self.finalize(
            id,
            JobState::Cancelled,
            Condition::Cancelled,
            Some(reason.to_owned()),
            now_ms,
        );
        Ok(agent)
    }

    /// Fails a queued job that found no capable agent in time.
    pub fn no_agent(&mut self, id: &JobId, now_ms: u64) {
        if self
            .jobs
            .get(id)
            .is_some_and(|j| j.state == JobState::Queued)
        {
            let cap = self.jobs[id].spec.capability.clone();
            self.finalize(
                id,
                JobState::Failed,
                Condition::NoAgent,
                Some(format!("no agent offering {cap} appeared in time")),
                now_ms,
            );
        }
    }

    /// Jobs whose deadline passed: timed out now. Returns them with the agent each was on.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(JobId, Option<String>)> {
        let due: Vec<(JobId, Option<String>)> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_final() && j.spec.deadline_ms.is_some_and(|d| d <= now_ms))
            .map(|j| {
                (
                    j.id.clone(),
                    matches!(j.state, JobState::Dispatched | JobState::Running)
                        .then(|| j.agent.clone())
                        .flatten(),
                )
            })
            .collect();
        for (id, _) in &due {
            self.finalize(
                id,
                JobState::TimedOut,
                Condition::DeadlineExceeded,
                Some("deadline passed".into()),
                now_ms,
            );
        }
        due
    }

    /// Forgets final jobs older than `retention_ms`; returns their ids (to delete from the
    /// store).
    pub fn prune(&mut self, now_ms: u64, retention_ms: u64) -> Vec<JobId> {
        let old: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.state.is_final() && now_ms.saturating_sub(j.updated_ms) > retention_ms)
            .map(|j| j.id.clone())
            .collect();
        for id in &old {
            self.jobs.remove(id);
        }
        old
    }

    /// Whether `agent` (full JID text) failed this job before.
    pub fn is_excluded(&self, id: &JobId, agent: &Jid) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|j| j.excluded.iter().any(|a| a == agent.as_str()))
    }
}
