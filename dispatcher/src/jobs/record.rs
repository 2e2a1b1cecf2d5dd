//! A job as the dispatcher keeps it ([`JobRecord`], stored as JSON by [`crate::store`]) and
//! how it ended ([`Recorded`]), with the answers the job table's events return (what follows
//! a failed attempt, why a submission was refused, a duplicate result) and two pure rules the
//! table and the core share: the retry backoff and which request to blame for a
//! session that ended.

use jid::FullJid;
use serde::{Deserialize, Serialize};
use spine_protocol::{CapabilityName, Condition, JobId, JobState};

use super::{Body, JobSpec, MapReduceState};

/// How a job ended, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Recorded {
    /// The result (output inline; large outputs are assembled before recording).
    Succeeded {
        /// Metadata JSON.
        meta: serde_json::Map<String, serde_json::Value>,
        /// Output: inline (base64 in the JSON) or in the blob store.
        output: Body,
        /// Output MIME type.
        mime: Option<String>,
        /// Handler time.
        elapsed_ms: Option<u64>,
    },
    /// Failed, cancelled or timed out.
    Failure {
        /// Spine condition.
        condition: Condition,
        /// Message.
        message: Option<String>,
        /// For `bad-arguments`: the argument the agent (or the dispatcher) named, passed on to
        /// every submitter (`error.field` over HTTP, `field` of `<failure>` over XMPP).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
    },
}

/// One job.
///
/// As the store writes it (JSON), an empty field is left out: `None`, and the empty, zero or
/// false value of a field marked `default`. Only fields that every earlier version also reads
/// when absent are left out, so a dispatcher of an earlier version (a rolling upgrade, a
/// rollback) still loads these records. The same holds for [`JobSpec`].
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<FullJid>,
    /// Agents that failed this job (not used again unless nothing else is left).
    pub excluded: Vec<FullJid>,
    /// Outcome once final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Recorded>,
    /// Last progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<JobId>,
    /// A map/reduce job's plan and progress, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mr: Option<MapReduceState>,
    /// When the current or last attempt was sent (ms since the UNIX epoch).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dispatched_ms: u64,
    /// Restored after a restart while it was on `agent`: send it back there with the same
    /// attempt number (the agent attaches it to the running job or answers from its cache).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
    /// The timeline of its life: one step per change of state, dispatch or agent, with why
    /// (the console's job page, `history` in the job's JSON). Written by
    /// [`super::JobTable::update`], bounded by [`MAX_HISTORY`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Step>,
}

/// For `skip_serializing_if`: a zero that needs no writing.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Steps kept per job: the first (its acceptance) and the newest. A job's steps grow with its
/// attempts (about four each), which `max_attempts` bounds; this bounds the rest (a job
/// refused by busy agents over and over).
pub const MAX_HISTORY: usize = 48;

/// One step of a job's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// When (ms since the UNIX epoch).
    pub at_ms: u64,
    /// The state it entered (or kept, for a new dispatch or a note).
    pub state: JobState,
    /// The attempt at that point (0 before the first dispatch).
    pub attempt: u64,
    /// The agent of the attempt, once dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<FullJid>,
    /// Why: a retry's failure, a refusal, the outcome's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl JobRecord {
    /// The blobs it references: its input's and its output's when they are in the blob store,
    /// and those its input names (a fragment list's references).
    pub fn blobs(&self) -> impl Iterator<Item = crate::blobs::Stored> + '_ {
        let output = match &self.outcome {
            Some(Recorded::Succeeded { output, .. }) => output.stored(),
            _ => None,
        };
        self.spec
            .input
            .stored()
            .into_iter()
            .chain(output)
            .chain(self.spec.input_blobs.iter().copied())
    }

    /// Appends a step at `at_ms` in the record's present state, dropping the oldest but the
    /// first beyond [`MAX_HISTORY`].
    pub fn log(&mut self, at_ms: u64, note: Option<String>) {
        if self.history.len() >= MAX_HISTORY {
            self.history.remove(1);
        }
        self.history.push(Step {
            at_ms,
            state: self.state,
            attempt: self.attempts,
            agent: self.agent.clone().filter(|_| self.attempts > 0),
            note,
        });
    }

    /// Sets the note of the newest step (the reason for what the last change did).
    pub fn note(&mut self, note: String) {
        if let Some(s) = self.history.last_mut() {
            s.note = Some(note);
        }
    }
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
    /// As many delayed jobs as `max_delayed` wait for their time.
    #[error("{limit} delayed jobs are already waiting for their time (max_delayed)")]
    TooManyDelayed {
        /// The bound.
        limit: usize,
    },
    /// The id is taken.
    #[error("job id {0} already exists")]
    Exists(JobId),
}

/// What became of a job whose request went out just before the dispatcher's XMPP session
/// ended ([`super::JobTable::session_lost`]).
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
