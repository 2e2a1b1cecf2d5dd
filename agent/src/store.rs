//! What the agent keeps: in memory, the finished outcomes that answer a repeated job id
//! without running it again; on disk (`state_file`), the operator's drain, so that an agent
//! drained for maintenance stays out of rotation when its machine reboots. The core decides
//! (a [`Drained`] in its `Ready`); the driver writes it here before the answer leaves, and reads
//! it back at start.

use std::collections::{HashMap, HashSet, VecDeque};

use jid::BareJid;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use spine_protocol::{Had, JobId, Recalled, SpineError, MAX_RECALLED};
use tokio::time::Instant;

/// A finished job's outcome as the agent replies with it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Result(spine_protocol::JobResult),
    Error(SpineError),
}

/// Outcomes of finished jobs, bounded in count and age.
pub(crate) struct OutcomeCache {
    max: usize,
    ttl: Duration,
    order: VecDeque<(JobId, Instant)>,
    map: HashMap<JobId, Outcome>,
}

impl OutcomeCache {
    pub(crate) fn new(max: usize, ttl: Duration) -> Self {
        OutcomeCache {
            max,
            ttl,
            order: VecDeque::new(),
            map: HashMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, id: JobId, outcome: Outcome, now: Instant) {
        if self.map.insert(id.clone(), outcome).is_none() {
            self.order.push_back((id, now));
        }
        self.expire(now);
        while self.order.len() > self.max {
            if let Some((old, _)) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub(crate) fn get(&mut self, id: &JobId, now: Instant) -> Option<&Outcome> {
        self.expire(now);
        self.map.get(id)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, t)) = self.order.front() {
            if now.duration_since(*t) <= self.ttl {
                break;
            }
            let id = id.clone();
            self.order.pop_front();
            self.map.remove(&id);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The job requests received last from each dispatcher account, with their attempts: what a
/// new leader's `<recall/>` is answered from (PROTOCOL.md §10.1). Bounded per account (the
/// accounts are the configured dispatchers): a leader's jobs whose dispatch it had not stored
/// when it died are the newest it sent, at most a quarter of [`MAX_RECALLED`].
pub(crate) struct Received {
    per_account: usize,
    by_account: HashMap<BareJid, VecDeque<(JobId, u64)>>,
}

impl Received {
    /// Remembers the last `per_account` requests of each account (repeats included).
    pub(crate) fn new(per_account: usize) -> Self {
        Received {
            per_account,
            by_account: HashMap::new(),
        }
    }

    /// A job request arrived from `from` (also a repeat, which may carry a later attempt).
    pub(crate) fn push(&mut self, job: &JobId, attempt: u64, from: &BareJid) {
        let q = match self.by_account.get_mut(from) {
            Some(q) => q,
            None => self.by_account.entry(from.clone()).or_default(),
        };
        if q.len() >= self.per_account {
            q.pop_front();
        }
        q.push_back((job.clone(), attempt));
    }

    /// The jobs `from` sent, newest first, each once with its latest attempt, at most
    /// [`MAX_RECALLED`].
    pub(crate) fn recall(&self, from: &BareJid) -> Recalled {
        let Some(q) = self.by_account.get(from) else {
            return Recalled::default();
        };
        let mut seen = HashSet::new();
        let jobs = q
            .iter()
            .rev()
            .filter(|(job, _)| seen.insert(job.clone()))
            .take(MAX_RECALLED)
            .map(|(job, attempt)| Had {
                job: job.clone(),
                attempt: *attempt,
            })
            .collect();
        Recalled { jobs }
    }
}

/// The operator's drain (PROTOCOL.md §5.6), as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Drained {
    /// The agent takes no new jobs.
    pub(crate) drained: bool,
    /// Why, as the operator said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// The drain kept in `path`: `None` when the file does not exist (never drained, or a fresh
/// machine). A file that exists but cannot be read is an error naming it: starting in
/// rotation against the operator's word would be worse than not starting.
pub(crate) fn load_drained(path: &Path) -> Result<Option<Drained>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("state_file: reading {}: {e}", path.display())),
    };
    serde_json::from_str::<Drained>(&text).map(Some).map_err(|e| {
        format!(
            "state_file: {} is not a state this agent wrote ({e}); fix or delete it (deleted, the agent starts taking jobs)",
            path.display()
        )
    })
}

/// Writes the drain to `path` durably: a temporary file beside it, synced, then renamed over
/// it, so that a crash leaves the old state or the new one, never half a file.
pub(crate) fn save_drained(path: &Path, state: &Drained) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let text = serde_json::to_string(state).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use spine_protocol::Condition;

    #[test]
    fn the_drain_survives_in_its_file_and_a_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.state");
        assert_eq!(load_drained(&path).unwrap(), None, "no file: never drained");
        let d = Drained {
            drained: true,
            reason: Some("rack 4 \"maintenance\"".into()),
        };
        save_drained(&path, &d).unwrap();
        assert_eq!(load_drained(&path).unwrap(), Some(d));
        let undrained = Drained {
            drained: false,
            reason: None,
        };
        save_drained(&path, &undrained).unwrap();
        assert_eq!(load_drained(&path).unwrap(), Some(undrained));
        std::fs::write(&path, "drained = yes").unwrap();
        let e = load_drained(&path).unwrap_err();
        assert!(
            e.starts_with("state_file: ") && e.contains("delete it"),
            "{e}"
        );
    }

    fn id(s: &str) -> JobId {
        s.parse().unwrap()
    }

    #[test]
    fn cache_is_bounded_by_count_and_age() {
        let t0 = Instant::now();
        let mut c = OutcomeCache::new(2, Duration::from_secs(10));
        let e = || Outcome::Error(SpineError::new(Condition::Failed));
        c.insert(id("a"), e(), t0);
        c.insert(id("b"), e(), t0);
        c.insert(id("c"), e(), t0);
        assert_eq!(c.len(), 2);
        assert!(c.get(&id("a"), t0).is_none());
        assert!(c.get(&id("c"), t0).is_some());
        assert!(c.get(&id("c"), t0 + Duration::from_secs(11)).is_none());
    }
}
