//! The job table's indexes, kept with its records so that no event, tick or API read walks
//! the whole table (which holds every finished job for its retention: hundreds of thousands).
//!
//! Each record has a few index [`Keys`], computed from it alone by [`Keys::of`]; the table
//! takes them before and after every change of a record and hands both to [`Index::change`],
//! which moves the record in exactly the indexes whose keys differ. So the indexes are a
//! function of the records, which the property test in `jobs/tests.rs` checks against a
//! rebuild from scratch after every operation. What each index answers: the per-capability
//! queues (placement), each submitter's share of them (`max_queued`), counts by capability
//! and state (`/metrics`), deadlines in time order (`expire`, `next_deadline`), delayed jobs
//! by when they are due (`release_due`, `next_due`), final jobs by
//! the time they ended (`prune`, `next_prune_at`), queued `all` parents and queued map/reduce
//! jobs (started after each event), running map/reduce jobs (stragglers), and the
//! newest-first listing per state and per submitter and state (`GET /v1/jobs`).

use crate::fastmap::HashMap;
use std::cmp::Reverse;
use std::collections::BTreeSet;

use spine_protocol::{CapabilityName, JobId, JobState, Strategy};

use super::JobRecord;
use crate::blobs::Stored;

/// Placement order in a capability's queue: highest priority, then oldest.
pub(super) type QueueKey = (Reverse<i64>, u64, JobId);

/// Listing order, (accepted, submission order, id), read newest first. The id is `Some` in
/// every stored key; `None` sorts below every id, so `(at, seq, None)` bounds a page that
/// starts just before the job `(at, seq)`.
pub(super) type ListKey = (u64, u64, Option<JobId>);

/// A record's place in every index (a function of the record alone).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Keys {
    capability: CapabilityName,
    submitter: String,
    priority: i64,
    seq: u64,
    accepted_ms: u64,
    state: JobState,
    /// The deadline of a job that has not ended.
    deadline: Option<u64>,
    /// When a delayed job (accepted, `not_before`) is due.
    due: Option<u64>,
    /// When a final job ended (its last change).
    ended: Option<u64>,
    /// Queued, strategy `all`, not a child: waits for fan-out.
    all_parent: bool,
    /// Queued map/reduce job: waits for its start.
    mr_queued: bool,
    /// A map/reduce job started and not ended.
    mr_running: bool,
    /// The blobs it holds: its input's and its output's, when they are in the blob store.
    blobs: [Option<Stored>; 2],
    /// The blobs its input names (a fragment list's references; empty, and so no allocation,
    /// for almost every job).
    named: Vec<Stored>,
}

impl Keys {
    /// The keys of `j`.
    pub(super) fn of(j: &JobRecord) -> Keys {
        let fin = j.state.is_final();
        let queued = j.state == JobState::Queued;
        Keys {
            capability: j.spec.capability.clone(),
            submitter: j.spec.submitter.clone(),
            priority: j.spec.priority,
            seq: j.seq,
            accepted_ms: j.accepted_ms,
            state: j.state,
            deadline: j.spec.deadline_ms.filter(|_| !fin),
            due: j
                .spec
                .not_before_ms
                .filter(|_| j.state == JobState::Accepted),
            ended: fin.then_some(j.updated_ms),
            all_parent: queued && j.spec.strategy == Strategy::All && j.spec.parent.is_none(),
            mr_queued: queued && j.spec.mapreduce.is_some(),
            mr_running: j.mr.is_some() && !fin,
            blobs: [
                j.spec.input.stored(),
                match &j.outcome {
                    Some(super::Recorded::Succeeded { output, .. }) => output.stored(),
                    _ => None,
                },
            ],
            named: j.spec.input_blobs.clone(),
        }
    }

    /// The fields every index is keyed by in part; they do not change in a record's life
    /// (only its state and times do), but if they did the record is re-indexed whole.
    fn same_identity(&self, o: &Keys) -> bool {
        self.seq == o.seq
            && self.accepted_ms == o.accepted_ms
            && self.priority == o.priority
            && self.capability == o.capability
            && self.submitter == o.submitter
    }

    fn list_key(&self, id: &JobId) -> ListKey {
        (self.accepted_ms, self.seq, Some(id.clone()))
    }
}

/// Which listing sets a walk reads.
#[derive(Debug, Clone, Copy)]
pub(super) enum Family<'a> {
    /// Every job.
    All,
    /// One submitter's jobs.
    Submitter(&'a str),
    /// One capability's jobs.
    Capability(&'a CapabilityName),
}

/// Position of a state in [`JobState::ALL`], for the per-state listing.
fn slot(s: JobState) -> usize {
    JobState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// Listing sets, one per state.
type ByState = [BTreeSet<ListKey>; JobState::ALL.len()];

/// Every index of the job table. Empty sets and zero counts are removed, so that two indexes
/// of the same records are equal.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Index {
    /// Queued jobs per capability, in placement order.
    pub(super) queues: HashMap<CapabilityName, BTreeSet<QueueKey>>,
    /// Queued jobs per (submitter, capability): submitters' shares of the queues.
    pub(super) queued_by: HashMap<(String, CapabilityName), usize>,
    /// Jobs by (capability, state), for metrics.
    pub(super) counts: HashMap<(CapabilityName, JobState), u64>,
    /// Jobs not ended that have a deadline, by deadline.
    pub(super) deadlines: BTreeSet<(u64, JobId)>,
    /// Delayed jobs waiting for their time, by when they are due.
    pub(super) delayed: BTreeSet<(u64, JobId)>,
    /// Final jobs by the time they ended.
    pub(super) ended: BTreeSet<(u64, JobId)>,
    /// Queued `all` parents, in submission order.
    pub(super) all_parents: BTreeSet<(u64, JobId)>,
    /// Queued map/reduce jobs, in submission order.
    pub(super) mr_queued: BTreeSet<(u64, JobId)>,
    /// Running map/reduce jobs, in submission order.
    pub(super) mr_running: BTreeSet<(u64, JobId)>,
    /// Every job by state, in listing order.
    by_state: ByState,
    /// Every job by submitter and state, in listing order.
    by_submitter: HashMap<String, ByState>,
    /// Every job by capability and state, in listing order.
    by_capability: HashMap<CapabilityName, ByState>,
    /// How many held jobs reference each blob (as input or output).
    pub(super) blob_refs: HashMap<Stored, u32>,
    /// Blobs whose last reference went since the core last took them.
    pub(super) released: Released,
}

/// Blobs no job references any more, to be deleted (after a grace: see `crate::driver`).
/// Not part of the index's value: two indexes of the same records are equal whatever each has
/// released.
#[derive(Debug, Default)]
pub(super) struct Released(pub(super) Vec<Stored>);

impl PartialEq for Released {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Index {
    /// Indexes a new record.
    pub(super) fn add(&mut self, id: &JobId, k: &Keys) {
        self.queue(id, k, true);
        self.state(id, k, true);
        self.times(id, k, true);
        self.flags(id, k, true);
        self.blobs(k, true);
    }

    /// Forgets a record.
    pub(super) fn remove(&mut self, id: &JobId, k: &Keys) {
        self.queue(id, k, false);
        self.state(id, k, false);
        self.times(id, k, false);
        self.flags(id, k, false);
        self.blobs(k, false);
    }

    /// Moves a changed record (keys `old` before, `new` after) in the indexes whose keys
    /// differ; nothing at all when they are the same (a progress report).
    pub(super) fn change(&mut self, id: &JobId, old: &Keys, new: &Keys) {
        if old == new {
            return;
        }
        if !old.same_identity(new) {
            self.remove(id, old);
            self.add(id, new);
            return;
        }
        if old.state != new.state {
            self.queue(id, old, false);
            self.queue(id, new, true);
            self.state(id, old, false);
            self.state(id, new, true);
        }
        if (old.deadline, old.ended, old.due) != (new.deadline, new.ended, new.due) {
            self.times(id, old, false);
            self.times(id, new, true);
        }
        if (old.all_parent, old.mr_queued, old.mr_running)
            != (new.all_parent, new.mr_queued, new.mr_running)
        {
            self.flags(id, old, false);
            self.flags(id, new, true);
        }
        if old.blobs != new.blobs || old.named != new.named {
            // Add first, so a blob kept across the change is never released.
            self.blobs(new, true);
            self.blobs(old, false);
        }
    }

    /// The reference counts of a record's blobs.
    fn blobs(&mut self, k: &Keys, on: bool) {
        for b in k.blobs.iter().flatten().chain(&k.named) {
            if on {
                *self.blob_refs.entry(*b).or_insert(0) += 1;
            } else if let Some(n) = self.blob_refs.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    self.blob_refs.remove(b);
                    self.released.0.push(*b);
                }
            }
        }
    }

    /// The queue of its capability, and its submitter's share, while queued.
    fn queue(&mut self, id: &JobId, k: &Keys, on: bool) {
        if k.state != JobState::Queued {
            return;
        }
        let key = (Reverse(k.priority), k.seq, id.clone());
        let share = (k.submitter.clone(), k.capability.clone());
        if on {
            if self
                .queues
                .entry(k.capability.clone())
                .or_default()
                .insert(key)
            {
                *self.queued_by.entry(share).or_default() += 1;
            }
            return;
        }
        let Some(q) = self.queues.get_mut(&k.capability) else {
            return;
        };
        let removed = q.remove(&key);
        if q.is_empty() {
            self.queues.remove(&k.capability);
        }
        if removed {
            if let Some(n) = self.queued_by.get_mut(&share) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.queued_by.remove(&share);
                }
            }
        }
    }

    /// The counts and the listings, which depend on the state.
    fn state(&mut self, id: &JobId, k: &Keys, on: bool) {
        let count = (k.capability.clone(), k.state);
        let key = k.list_key(id);
        let s = slot(k.state);
        if on {
            *self.counts.entry(count).or_default() += 1;
            self.by_state[s].insert(key.clone());
            self.by_submitter.entry(k.submitter.clone()).or_default()[s].insert(key.clone());
            self.by_capability.entry(k.capability.clone()).or_default()[s].insert(key);
            return;
        }
        if let Some(n) = self.counts.get_mut(&count) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&count);
            }
        }
        self.by_state[s].remove(&key);
        if let Some(mine) = self.by_submitter.get_mut(&k.submitter) {
            mine[s].remove(&key);
            if mine.iter().all(BTreeSet::is_empty) {
                self.by_submitter.remove(&k.submitter);
            }
        }
        if let Some(theirs) = self.by_capability.get_mut(&k.capability) {
            theirs[s].remove(&key);
            if theirs.iter().all(BTreeSet::is_empty) {
                self.by_capability.remove(&k.capability);
            }
        }
    }

    /// The deadline and retention orders.
    fn times(&mut self, id: &JobId, k: &Keys, on: bool) {
        for (set, at) in [
            (&mut self.deadlines, k.deadline),
            (&mut self.ended, k.ended),
            (&mut self.delayed, k.due),
        ] {
            if let Some(at) = at {
                if on {
                    set.insert((at, id.clone()));
                } else {
                    set.remove(&(at, id.clone()));
                }
            }
        }
    }

    /// The sets of jobs waiting for a start, and of running map/reduce jobs.
    fn flags(&mut self, id: &JobId, k: &Keys, on: bool) {
        for (set, member) in [
            (&mut self.all_parents, k.all_parent),
            (&mut self.mr_queued, k.mr_queued),
            (&mut self.mr_running, k.mr_running),
        ] {
            if member {
                if on {
                    set.insert((k.seq, id.clone()));
                } else {
                    set.remove(&(k.seq, id.clone()));
                }
            }
        }
    }

    /// Visits the listing keys of `family` (and `state` when given), newest first by
    /// (accepted, submission order), below `upper` when given and accepted at or after
    /// `since_ms` when given, until `visit` says stop (returns `false`).
    ///
    /// Bounded whatever the filters: every job is in one listing set per state, one per
    /// submitter and state and one per capability and state, so a filter on any of those
    /// picks its sets instead of skipping what does not match, and the walk is a merge of at
    /// most eight of them (the states): O(8 · (log n + visited)). A rare state (`failed`
    /// among 100,000 `succeeded`) costs no more than a common one; the price is three
    /// ordered-set entries per job.
    pub(super) fn walk<'s>(
        &'s self,
        family: Family<'_>,
        state: Option<JobState>,
        upper: Option<&ListKey>,
        since_ms: Option<u64>,
        mut visit: impl FnMut(&'s ListKey) -> bool,
    ) {
        let sets: &'s ByState = match family {
            Family::All => &self.by_state,
            Family::Submitter(s) => match self.by_submitter.get(s) {
                Some(mine) => mine,
                None => return,
            },
            Family::Capability(c) => match self.by_capability.get(c) {
                Some(theirs) => theirs,
                None => return,
            },
        };
        let chosen: Vec<&'s BTreeSet<ListKey>> = match state {
            Some(s) => vec![&sets[slot(s)]],
            None => sets.iter().collect(),
        };
        let mut heads: Vec<_> = chosen
            .into_iter()
            .map(|set| {
                match upper {
                    Some(b) => set.range(..b.clone()),
                    None => set.range(..),
                }
                .rev()
                .peekable()
            })
            .collect();
        loop {
            // The newest of the sets' next entries.
            let Some(next) = heads
                .iter_mut()
                .enumerate()
                .filter_map(|(i, h)| h.peek().map(|k| (i, *k)))
                .max_by(|a, b| a.1.cmp(b.1))
                .map(|(i, _)| i)
            else {
                return;
            };
            let Some(key) = heads[next].next() else {
                return;
            };
            if since_ms.is_some_and(|t| key.0 < t) || !visit(key) {
                return;
            }
        }
    }

    /// Up to `limit` jobs, newest first by (accepted, submission order), of `state` and
    /// `submitter` when given, accepted before the job `before` when given (see
    /// [`Index::walk`]).
    pub(super) fn page(
        &self,
        state: Option<JobState>,
        submitter: Option<&str>,
        before: Option<(u64, u64)>,
        limit: usize,
    ) -> Vec<&JobId> {
        let family = submitter.map_or(Family::All, Family::Submitter);
        let bound = before.map(|(at, seq)| (at, seq, None));
        let mut out = Vec::with_capacity(limit.min(1024));
        if limit == 0 {
            return out;
        }
        self.walk(family, state, bound.as_ref(), None, |k| {
            if let (_, _, Some(id)) = k {
                out.push(id);
            }
            out.len() < limit
        });
        out
    }
}
