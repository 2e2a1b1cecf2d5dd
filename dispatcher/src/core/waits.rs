//! Submissions over XMPP that wait for their job's end (`<submit wait-ms>`, protocol 1.3,
//! PROTOCOL.md §11.2.1): the `<submit>` IQ is answered once, with the final `<job-status>` when
//! the job ends within the wait, else with `<accepted>` when the wait is over. A watched job
//! then takes four stanzas through the server instead of five (no `<accepted>` and no final
//! message), the XMPP counterpart of the HTTP API's `POST /v1/jobs?wait=`.
//!
//! The waits are kept by job (a final event takes its job's waits with one lookup) and by
//! when they end (the earliest one is the core's next wake; a job that ends takes its entries
//! out, so a finished wait never wakes the driver).

use std::collections::{BTreeMap, HashMap};

use jid::Jid;
use spine_protocol::{JobId, JobState};

/// Submissions that may wait for one job at once (the same idempotency key sent again): one
/// more is answered `<accepted>` at once, so that a submitter repeating itself cannot make the
/// dispatcher hold its requests without bound.
pub(super) const MAX_WAITS_PER_JOB: usize = 16;

/// One `<submit>` waiting for its job.
#[derive(Debug)]
pub(super) struct Waiting {
    /// The submitter's full JID.
    pub to: Jid,
    /// The `<submit>` IQ's id.
    pub id: String,
    /// The job's state when the wait began: the answer's state if the job is gone when the
    /// wait ends (it is not, unless a standby handed it over).
    pub state: JobState,
    /// When the wait ends (ms, wall clock like the jobs' deadlines), and a tie-breaker.
    until: (u64, u64),
}

/// Every waiting `<submit>`.
#[derive(Debug, Default)]
pub(super) struct SubmitWaits {
    by_job: HashMap<JobId, Vec<Waiting>>,
    /// (end, sequence) → job: the next to end first.
    due: BTreeMap<(u64, u64), JobId>,
    seq: u64,
}

impl SubmitWaits {
    /// The submitter `to` waits until `until_ms` for `job`'s end, to be answered to IQ `id`;
    /// false if [`MAX_WAITS_PER_JOB`] wait for that job already (it is answered now).
    pub fn add(&mut self, job: JobId, to: Jid, id: String, state: JobState, until_ms: u64) -> bool {
        let waits = self.by_job.entry(job.clone()).or_default();
        if waits.len() >= MAX_WAITS_PER_JOB {
            return false;
        }
        self.seq += 1;
        let until = (until_ms, self.seq);
        waits.push(Waiting {
            to,
            id,
            state,
            until,
        });
        self.due.insert(until, job);
        true
    }

    /// The waits for `job`, which ended: they are answered now.
    pub fn take(&mut self, job: &JobId) -> Vec<Waiting> {
        let Some(waits) = self.by_job.remove(job) else {
            return Vec::new();
        };
        for w in &waits {
            self.due.remove(&w.until);
        }
        waits
    }

    /// The waits whose time is over at `now_ms`, with their jobs.
    pub fn expired(&mut self, now_ms: u64) -> Vec<(JobId, Waiting)> {
        let mut out = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let (until, job) = entry.remove_entry();
            let Some(waits) = self.by_job.get_mut(&job) else {
                continue;
            };
            if let Some(i) = waits.iter().position(|w| w.until == until) {
                out.push((job.clone(), waits.swap_remove(i)));
            }
            if waits.is_empty() {
                self.by_job.remove(&job);
            }
        }
        out
    }

    /// When the next wait ends (ms).
    pub fn next_due(&self) -> Option<u64> {
        self.due.first_key_value().map(|(k, _)| k.0)
    }

    /// How many submissions wait.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u32) -> JobId {
        format!("0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e{n:02}")
            .parse()
            .expect("job id")
    }

    fn to() -> Jid {
        "web@example.com/app".parse().expect("jid")
    }

    #[test]
    fn waits_end_in_time_order_and_a_taken_wait_never_expires() {
        let mut w = SubmitWaits::default();
        assert!(w.add(job(1), to(), "a".into(), JobState::Queued, 300));
        assert!(w.add(job(2), to(), "b".into(), JobState::Queued, 100));
        assert!(w.add(job(1), to(), "c".into(), JobState::Running, 200));
        assert_eq!(w.next_due(), Some(100));
        assert!(w.expired(99).is_empty());
        let first = w.expired(250);
        let ids: Vec<(&str, &str)> = first
            .iter()
            .map(|(j, x)| (if *j == job(1) { "1" } else { "2" }, x.id.as_str()))
            .collect();
        assert_eq!(ids, [("2", "b"), ("1", "c")]);
        assert_eq!(first[1].1.state, JobState::Running);
        // Job 1 ends: its last wait is answered with its end and leaves the time index.
        let taken = w.take(&job(1));
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].id, "a");
        assert_eq!(w.next_due(), None);
        assert!(w.expired(u64::MAX).is_empty());
        assert_eq!(w.len(), 0);
        assert!(w.take(&job(1)).is_empty());
    }

    #[test]
    fn one_job_holds_a_bounded_number_of_waits() {
        let mut w = SubmitWaits::default();
        for i in 0..MAX_WAITS_PER_JOB {
            assert!(w.add(job(1), to(), format!("s{i}"), JobState::Queued, 100));
        }
        assert!(!w.add(job(1), to(), "more".into(), JobState::Queued, 100));
        assert!(w.add(job(2), to(), "other".into(), JobState::Queued, 100));
        assert_eq!(w.len(), MAX_WAITS_PER_JOB + 1);
    }
}
