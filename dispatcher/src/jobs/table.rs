//! The [`JobTable`]: every job the dispatcher knows, from submission until its retention
//! ends, with the indexes that answer the core's questions (what to place next,
//! what waits for fan-out or a map/reduce start, what is due to time out or be forgotten,
//! counts, the newest jobs) without walking it.
//!
//! This file holds the records themselves and the one step that changes them,
//! [`JobTable::update`]: it takes the record's index keys, applies the change, and moves the
//! record in the indexes whose keys moved. The lifecycle events (`attempts.rs`), the `all`
//! fan-out (`all.rs`) and map/reduce (`mapreduce.rs`) change records only through it, and
//! only this file can reach the map of records, so the compiler keeps that promise.

use crate::fastmap::HashMap;

use jid::FullJid;
use spine_protocol::{CapabilityName, Condition, JobId, JobState};

use super::index::{Family, Index, Keys};
use super::{Body, JobRecord, JobSpec, Recorded, SubmitError};
use crate::blobs::Stored;

/// Below this many slots the job table is not shrunk (a rehash of a small table gains nothing).
const MIN_CAPACITY: usize = 1024;

/// All jobs the dispatcher knows, and the queues of those waiting for an agent.
#[derive(Debug, Default)]
pub struct JobTable {
    /// The records; changed only through [`JobTable::update`], [`JobTable::put`] and
    /// [`JobTable::take`], which keep `index` right. Boxed: a record is hundreds of bytes,
    /// and a growing map moves every slot at each rehash (a tenth of the dispatcher's
    /// acceptance of a job in a profile of 100,000 jobs, with page faults for the new
    /// slots), where a box moves a pointer.
    jobs: HashMap<JobId, Box<JobRecord>>,
    index: Index,
    next_seq: u64,
    max_queue: usize,
    /// Delayed jobs waiting, at most.
    max_delayed: usize,
}

impl JobTable {
    /// A table whose per-capability queues hold at most `max_queue` jobs.
    pub fn new(max_queue: usize) -> Self {
        JobTable {
            max_queue,
            max_delayed: 100_000,
            ..Default::default()
        }
    }

    /// The same table holding at most `max_delayed` delayed jobs (`not_before`) at once.
    pub fn with_max_delayed(mut self, max_delayed: usize) -> Self {
        self.max_delayed = max_delayed;
        self
    }

    /// Changes the record `id` with `f`, and its place in every index with it. `None` if
    /// there is no such job. `f` must not change the record's id.
    pub(super) fn update<R>(
        &mut self,
        id: &JobId,
        f: impl FnOnce(&mut JobRecord) -> R,
    ) -> Option<R> {
        let j = self.jobs.get_mut(id)?;
        let old = Keys::of(j);
        let before = (j.state, j.attempts, j.agent.is_some());
        let r = f(j);
        debug_assert_eq!(&j.id, id, "a job's id changed");
        // The timeline follows every change of state and every new attempt, whoever made it.
        if (j.state, j.attempts, j.agent.is_some()) != before {
            let note = match (&j.outcome, j.state.is_final()) {
                (
                    Some(Recorded::Failure {
                        condition, message, ..
                    }),
                    true,
                ) => Some(match message {
                    Some(m) => format!("{condition}: {m}"),
                    None => condition.to_string(),
                }),
                _ => None,
            };
            j.log(j.updated_ms, note);
        }
        self.index.change(id, &old, &Keys::of(j));
        Some(r)
    }

    /// Adds a record (replacing one with its id), indexed.
    fn put(&mut self, rec: JobRecord) {
        let id = rec.id.clone();
        let keys = Keys::of(&rec);
        if let Some(old) = self.jobs.insert(id.clone(), Box::new(rec)) {
            self.index.remove(&id, &Keys::of(&old));
        }
        self.index.add(&id, &keys);
    }

    /// Lets a job go that another holds now (a standby's submission, stored for the leader).
    pub fn hand_over(&mut self, id: &JobId) -> Option<JobRecord> {
        self.take(id)
    }

    /// Removes a record and its index entries.
    fn take(&mut self, id: &JobId) -> Option<JobRecord> {
        let rec = self.jobs.remove(id)?;
        self.index.remove(id, &Keys::of(&rec));
        // A HashMap keeps its capacity when emptied: after a busy hour the slots of its peak
        // stayed resident with no job held (the soak benchmark, BENCHMARKS.md). Give them
        // back once the table is three-quarters empty; each shrink at least halves it, so
        // the rehash costs O(1) per removal over time.
        if self.jobs.capacity() > 4 * self.jobs.len().max(MIN_CAPACITY) {
            self.jobs.shrink_to(2 * self.jobs.len().max(MIN_CAPACITY));
        }
        Some(*rec)
    }

    /// Slots of the record map (the test of its shrinking reads it).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.jobs.capacity()
    }

    /// A job by id.
    pub fn get(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id).map(|j| &**j)
    }

    /// Every job known.
    pub fn iter(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values().map(|j| &**j)
    }

    /// Number of jobs known.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// How many held jobs reference `blob` (as input or output).
    pub fn blob_refs(&self, blob: &Stored) -> u32 {
        self.index.blob_refs.get(blob).copied().unwrap_or(0)
    }

    /// Blobs whose last referencing job went (or let go of them) since the last call.
    pub fn take_released(&mut self) -> Vec<Stored> {
        let mut released = std::mem::take(&mut self.index.released.0);
        // A blob let go of and taken again in the same step (a map/reduce job's fragment
        // handed to its map step) is not released.
        released.retain(|b| !self.index.blob_refs.contains_key(b));
        released.sort_unstable_by_key(|b| b.sha256);
        released.dedup();
        released
    }

    /// Every blob held jobs reference, for the start-up sweep of the blob store.
    pub fn referenced_blobs(&self) -> impl Iterator<Item = &Stored> {
        self.index.blob_refs.keys()
    }

    /// Replaces a job's input (the core moves large inline inputs to the blob store).
    pub fn set_input(&mut self, id: &JobId, input: Body) {
        self.update(id, |j| j.spec.input = input);
    }

    /// Replaces a succeeded job's output (the core moves a large inline output to the blob
    /// store).
    pub fn set_output(&mut self, id: &JobId, body: Body) {
        self.update(id, |j| {
            if let Some(Recorded::Succeeded { output, .. }) = &mut j.outcome {
                *output = body;
            }
        });
    }

    /// Jobs queued for `cap`.
    pub fn queued(&self, cap: &CapabilityName) -> usize {
        self.index.queues.get(cap).map_or(0, |q| q.len())
    }

    /// Capabilities with queued jobs.
    pub fn queued_capabilities(&self) -> Vec<CapabilityName> {
        self.index.queues.keys().cloned().collect()
    }

    /// Counts by (capability, state), for metrics (kept up to date, not counted).
    pub fn counts(&self) -> HashMap<(CapabilityName, JobState), u64> {
        self.index.counts.clone()
    }

    /// Jobs of `submitter` queued for `cap` (counted against its share, `max_queued`).
    pub fn queued_by(&self, submitter: &str, cap: &CapabilityName) -> usize {
        self.index
            .queued_by
            .get(&(submitter.to_owned(), cap.clone()))
            .copied()
            .unwrap_or(0)
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
        if spec.not_before_ms.is_some_and(|t| t > now_ms) {
            // Delayed: outside the queues (and their bounds) until due; bounded on its own.
            if self.index.delayed.len() >= self.max_delayed {
                return Err(SubmitError::TooManyDelayed {
                    limit: self.max_delayed,
                });
            }
            self.insert_queued(id.clone(), spec, now_ms);
            self.update(&id, |j| {
                // Its timeline starts accepted (the step `update` logs), not queued.
                j.history.clear();
                j.state = JobState::Accepted;
            });
            return Ok(&self.jobs[&id]);
        }
        if let Some(e) = self.over_bounds(&spec, max_queued) {
            return Err(e);
        }
        self.insert_queued(id.clone(), spec, now_ms);
        Ok(&self.jobs[&id])
    }

    /// Whether one more queued job of `spec` would be over the queue's bound for its
    /// capability or over its submitter's share of it (`max_queued`).
    pub fn over_bounds(&self, spec: &JobSpec, max_queued: usize) -> Option<SubmitError> {
        if self.queued(&spec.capability) >= self.max_queue {
            return Some(SubmitError::QueueFull {
                capability: spec.capability.clone(),
                limit: self.max_queue,
            });
        }
        if self.queued_by(&spec.submitter, &spec.capability) >= max_queued {
            return Some(SubmitError::SubmitterQuota {
                submitter: spec.submitter.clone(),
                capability: spec.capability.clone(),
                limit: max_queued,
            });
        }
        None
    }

    /// Delayed jobs whose time has come, queued now (placement order then is priority and
    /// submission order, as for any job); their ids.
    pub fn release_due(&mut self, now_ms: u64) -> Vec<JobId> {
        let due: Vec<JobId> = self
            .index
            .delayed
            .iter()
            .take_while(|(t, _)| *t <= now_ms)
            .map(|(_, id)| id.clone())
            .collect();
        for id in &due {
            self.update(id, |j| {
                j.state = JobState::Queued;
                j.updated_ms = now_ms;
            });
        }
        due
    }

    /// When the next delayed job is due (ms since the UNIX epoch).
    pub fn next_due(&self) -> Option<u64> {
        self.index.delayed.first().map(|(t, _)| *t)
    }

    /// Records a new job, queued, with the next submission order.
    pub(super) fn insert_queued(&mut self, id: JobId, spec: JobSpec, now_ms: u64) {
        self.next_seq += 1;
        self.put(JobRecord {
            id,
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
            history: vec![super::Step {
                at_ms: now_ms,
                state: JobState::Queued,
                attempt: 0,
                agent: None,
                note: None,
            }],
        });
    }

    /// Room for `n` more records without growing the map (a restart restores many at once:
    /// growing rehashes every record held, again and again).
    pub fn reserve(&mut self, n: usize) {
        self.jobs.reserve(n);
    }

    /// Restores a job read from the store after a restart. Jobs that were dispatched are
    /// queued again (their agent may have finished them while we were down: the agent's
    /// outcome cache answers the re-sent job without running it twice).
    pub fn restore(&mut self, mut rec: JobRecord) {
        self.next_seq = self.next_seq.max(rec.seq);
        // A parent of an `all` or map/reduce job stays running: its children carry the work.
        // A delayed job that was waiting for its time keeps waiting (`release_due`).
        let delayed = rec.state == JobState::Accepted && rec.spec.not_before_ms.is_some();
        if rec.children.is_empty()
            && rec.mr.is_none()
            && !delayed
            && matches!(
                rec.state,
                JobState::Accepted | JobState::Dispatched | JobState::Running
            )
        {
            rec.resume = rec.state != JobState::Accepted && rec.agent.is_some();
            rec.state = JobState::Queued;
        }
        self.put(rec);
    }

    /// The next job of `cap` to place: highest priority, then oldest; skipping those in
    /// backoff.
    pub fn next_for(&self, cap: &CapabilityName, now_ms: u64) -> Option<&JobRecord> {
        self.index
            .queues
            .get(cap)?
            .iter()
            .filter_map(|(_, _, id)| self.get(id))
            .find(|j| j.not_before_ms <= now_ms)
    }

    /// Up to `limit` queued jobs of `cap` ready to place, in placement order.
    pub fn queued_in_order(&self, cap: &CapabilityName, now_ms: u64, limit: usize) -> Vec<JobId> {
        let Some(q) = self.index.queues.get(cap) else {
            return Vec::new();
        };
        q.iter()
            .filter_map(|(_, _, id)| self.get(id))
            .filter(|j| j.not_before_ms <= now_ms)
            .take(limit)
            .map(|j| j.id.clone())
            .collect()
    }

    /// Queued `all` jobs (not children) waiting to be fanned out, in submission order.
    pub fn queued_all_parents(&self) -> Vec<JobId> {
        self.index
            .all_parents
            .iter()
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Queued map/reduce jobs waiting to start, in submission order.
    pub fn queued_mapreduces(&self) -> Vec<JobId> {
        self.index
            .mr_queued
            .iter()
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Running map/reduce jobs, in submission order (to move on after a restart).
    pub fn running_mapreduces(&self) -> Vec<JobId> {
        self.index
            .mr_running
            .iter()
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Running map/reduce parents, in submission order.
    pub(super) fn running_mapreduce_records(&self) -> impl Iterator<Item = &JobRecord> {
        self.index
            .mr_running
            .iter()
            .filter_map(|(_, id)| self.get(id))
    }

    /// A page of the job list, newest first by (accepted, submission order): up to `limit`
    /// jobs in `state` and of `submitter` when given, accepted before the job whose
    /// (`accepted_ms`, `seq`) is `before` when given (the last of the previous page). Read
    /// from ordered indexes, whatever the filters, and without copying a record: its cost
    /// does not grow with the jobs held (see `Index::page`).
    pub fn page(
        &self,
        state: Option<JobState>,
        submitter: Option<&str>,
        before: Option<(u64, u64)>,
        limit: usize,
    ) -> Vec<&JobRecord> {
        self.index
            .page(state, submitter, before, limit)
            .into_iter()
            .filter_map(|id| self.get(id))
            .collect()
    }

    /// A page of the jobs matching `f`, newest first, accepted before the job whose
    /// (`accepted_ms`, `seq`) is `before` when given: up to `limit` jobs, and the cursor of
    /// the next page when there may be more. The walk reads the listing index of the
    /// submitter, else of the capability, else of every job (the state picks sets in each);
    /// the other filters (the agent, a capability with a submitter) are checked per record,
    /// and at most `budget` records are looked at, so a page never costs a scan of the table:
    /// when the budget runs out first, the page is short and `next` continues from there.
    pub fn find(
        &self,
        f: &JobFilter,
        before: Option<(u64, u64)>,
        limit: usize,
        budget: usize,
    ) -> Page<'_> {
        let family = match (&f.submitter, &f.capability) {
            (Some(s), _) => Family::Submitter(s),
            (None, Some(c)) => Family::Capability(c),
            (None, None) => Family::All,
        };
        let upper = match (before, f.until_ms) {
            (Some((at, _)), Some(u)) if at > u => (u.saturating_add(1), 0, None),
            (Some((at, seq)), _) => (at, seq, None),
            (None, Some(u)) => (u.saturating_add(1), 0, None),
            (None, None) => (u64::MAX, u64::MAX, None),
        };
        let mut page = Page {
            jobs: Vec::with_capacity(limit.min(1024)),
            next: None,
        };
        let mut looked = 0usize;
        self.index.walk(
            family,
            f.state,
            Some(&upper),
            f.since_ms,
            |(at, seq, id)| {
                let Some(j) = id.as_ref().and_then(|id| self.get(id)) else {
                    return true;
                };
                if page.jobs.len() == limit {
                    // One more matches: there is a next page, from the last one taken.
                    if f.matches(j) {
                        page.next = page.jobs.last().map(|l| (l.accepted_ms, l.seq));
                        return false;
                    }
                } else if f.matches(j) {
                    page.jobs.push(j);
                }
                looked += 1;
                if looked >= budget {
                    page.next = Some((*at, *seq));
                    return false;
                }
                true
            },
        );
        page
    }

    /// Jobs whose deadline passed: timed out now. Returns them with the agent each was on.
    /// Only the due jobs are looked at (a deadline index).
    pub fn expire(&mut self, now_ms: u64) -> Vec<(JobId, Option<FullJid>)> {
        let due: Vec<JobId> = self
            .index
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ms)
            .map(|(_, id)| id.clone())
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for id in due {
            let agent = self.get(&id).and_then(|j| {
                matches!(j.state, JobState::Dispatched | JobState::Running)
                    .then(|| j.agent.clone())
                    .flatten()
            });
            self.finalize(
                &id,
                JobState::TimedOut,
                Condition::DeadlineExceeded,
                Some("deadline passed".into()),
                now_ms,
            );
            out.push((id, agent));
        }
        out
    }

    /// The earliest deadline of a job not ended yet (ms since the UNIX epoch): when
    /// [`JobTable::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<u64> {
        self.index.deadlines.first().map(|(d, _)| *d)
    }

    /// Forgets final jobs older than `retention_ms`; returns their ids (to delete from the
    /// store). Only the due jobs are looked at (an index of final jobs by when they ended).
    pub fn prune(&mut self, now_ms: u64, retention_ms: u64) -> Vec<JobId> {
        let old: Vec<JobId> = self
            .index
            .ended
            .iter()
            .take_while(|(t, _)| now_ms.saturating_sub(*t) > retention_ms)
            .map(|(_, id)| id.clone())
            .collect();
        for id in &old {
            self.take(id);
        }
        old
    }

    /// When [`JobTable::prune`] with `retention_ms` next has a job to forget (ms since the
    /// UNIX epoch), if any job has ended.
    pub fn next_prune_at(&self, retention_ms: u64) -> Option<u64> {
        self.index
            .ended
            .first()
            .map(|(t, _)| t.saturating_add(retention_ms).saturating_add(1))
    }

    /// The indexes rebuilt from the records, for the property test to compare with the ones
    /// kept up to date.
    #[cfg(test)]
    pub(super) fn check_index(&self) -> Result<(), String> {
        let mut fresh = Index::default();
        for j in self.jobs.values() {
            fresh.add(&j.id, &Keys::of(j));
        }
        if fresh == self.index {
            Ok(())
        } else {
            Err(format!("kept: {:#?}\nrebuilt: {fresh:#?}", self.index))
        }
    }
}

/// What a job listing asks for ([`JobTable::find`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    /// In this state.
    pub state: Option<JobState>,
    /// Submitted by this submitter.
    pub submitter: Option<String>,
    /// Of this capability.
    pub capability: Option<CapabilityName>,
    /// Whose current or last agent is this one (a full JID, or a bare JID for every agent on
    /// that account).
    pub agent: Option<String>,
    /// Accepted at or after (ms since the UNIX epoch).
    pub since_ms: Option<u64>,
    /// Accepted at or before.
    pub until_ms: Option<u64>,
}

impl JobFilter {
    /// Whether `j` matches the filters a walk does not pick its index by.
    fn matches(&self, j: &JobRecord) -> bool {
        self.capability
            .as_ref()
            .is_none_or(|c| *c == j.spec.capability)
            && self.agent.as_deref().is_none_or(|want| {
                j.agent.as_ref().is_some_and(|a| {
                    a.as_str() == want || (!want.contains('/') && a.to_bare().as_str() == want)
                })
            })
    }
}

/// A page of a job listing.
#[derive(Debug)]
pub struct Page<'a> {
    /// The jobs, newest first.
    pub jobs: Vec<&'a JobRecord>,
    /// Where the next page starts (pass it as `before`), when there may be one.
    pub next: Option<(u64, u64)>,
}
