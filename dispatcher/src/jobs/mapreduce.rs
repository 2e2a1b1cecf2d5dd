//! Map/reduce jobs as a pure state machine over the job table (PROTOCOL.md §11.7).
//!
//! A map/reduce job is a parent record whose steps are ordinary child jobs, so each of them is
//! placed least-loaded, retried, timed out, cancelled and stored like any job:
//!
//! - an optional **split** step (`<parent>.split`) turns the submitted input into the fragment
//!   list; without it the input is the fragment list;
//! - one **map** step per fragment (`<parent>.m<i>`);
//! - a tree of **reduce** steps (`<parent>.r<level>.<j>`): reduce `j` of level 1 takes the map
//!   outputs `j·f .. (j+1)·f` (`f` the fan-in), in order, as a fragment list; level `k + 1`
//!   does the same over level `k`, until one reduce is left. A reduce starts as soon as its own
//!   inputs are done, not when its whole level is;
//! - a **speculative copy** (`<step>.b`) of a step that runs far longer than its finished
//!   siblings (factor × their median, and at least a minimum), on another agent: the first of
//!   the two results counts and the other copy is cancelled.
//!
//! [`JobTable::advance`] is idempotent: it reads the children's states and moves the parent on,
//! so it is called after any child ends and once for every running parent after a restart.
//! Like every change of a record, each step here goes through [`JobTable::update`], so the
//! table's indexes (queued and running map/reduce jobs among them) follow.

use jid::FullJid;
use serde::{Deserialize, Serialize};
use spine_protocol::{CapabilityName, Condition, JobId, JobState};

use super::{BlobAccess, Body, JobSpec, JobTable, Recorded};
use crate::blobs::Stored;
use spine_protocol::fragments::{self, Fragment};
use spine_protocol::FRAGMENTS_MIME;

/// The plan and progress of a map/reduce job, kept in the parent's record.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MapReduceState {
    /// The split step, if the job has one.
    pub split: Option<JobId>,
    /// `levels[0]`: the map steps, one per fragment; `levels[k]`: the reduce steps of level k.
    /// Empty until the fragments are known.
    pub levels: Vec<Vec<Task>>,
    /// Speculative copies started.
    pub speculative: u64,
    /// Steps made again after outputs kept by agents were lost ([`JobTable::lose_kept`]).
    #[serde(default)]
    pub remade: u64,
}

/// One step of a map/reduce job, with its copies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Task {
    /// The fragment's label (map steps), passed on to the reduce that reads its output.
    pub name: Option<String>,
    /// The step's jobs: the first, then any speculative copy. Empty: not started yet.
    pub jobs: Vec<JobId>,
    /// The copy whose result counts.
    pub winner: Option<JobId>,
}

impl MapReduceState {
    /// (map steps done, map steps, reduce steps done, reduce steps).
    pub fn counts(&self) -> (usize, usize, usize, usize) {
        let done = |l: &Vec<Task>| l.iter().filter(|t| t.winner.is_some()).count();
        let maps = self.levels.first();
        let reduces = self.levels.iter().skip(1);
        (
            maps.map_or(0, done),
            maps.map_or(0, Vec::len),
            reduces.clone().map(done).sum(),
            reduces.map(Vec::len).sum(),
        )
    }

    /// Steps done ÷ steps, as a percentage (0 before the fragments are known).
    pub fn percent(&self) -> u8 {
        let (md, mt, rd, rt) = self.counts();
        ((md + rd) * 100).checked_div(mt + rt).unwrap_or(0) as u8
    }

    /// For people: "fragments 12/50, reduce steps 0/5".
    pub fn describe(&self) -> String {
        if self.levels.is_empty() {
            return "splitting the input".into();
        }
        let (md, mt, rd, rt) = self.counts();
        format!("fragments {md}/{mt}, reduce steps {rd}/{rt}")
    }
}

/// What [`JobTable::advance`] did, for the core to act on.
#[derive(Debug, Default, PartialEq)]
pub struct Advance {
    /// New child jobs, queued.
    pub created: Vec<JobId>,
    /// Copies to cancel on their agents: a sibling won, or the whole job ended.
    pub cancel: Vec<JobId>,
    /// A step finished (progress moved).
    pub progressed: bool,
    /// The map/reduce job has its outcome now.
    pub ended: bool,
}

/// A step running far longer than its finished siblings.
#[derive(Debug, Clone, PartialEq)]
pub struct Straggler {
    /// The map/reduce job.
    pub parent: JobId,
    /// The running copy.
    pub job: JobId,
    /// Its agent.
    pub agent: FullJid,
    /// How long it has run.
    pub running_ms: u64,
    /// The median time of its finished siblings.
    pub median_ms: u64,
}

/// Sizes of the reduce levels over `maps` map steps with fan-in `fan_in`: at least one level
/// of one step (so the result is always a reduce output, even for one fragment or none).
pub fn reduce_levels(maps: usize, fan_in: usize) -> Vec<usize> {
    let fan_in = fan_in.max(2);
    let mut levels = Vec::new();
    let mut n = maps;
    loop {
        n = n.div_ceil(fan_in).max(1);
        levels.push(n);
        if n == 1 {
            return levels;
        }
    }
}

fn child_id(base: &JobId, suffix: &str) -> Option<JobId> {
    format!("{base}.{suffix}").parse().ok()
}

/// A step's request: the parent's placement, deadline and attempts; its own capability and
/// input.
fn step_spec(
    parent: &JobSpec,
    parent_id: &JobId,
    capability: CapabilityName,
    input: Body,
    mime: Option<String>,
) -> JobSpec {
    JobSpec {
        capability,
        strategy: parent.strategy,
        filter: parent.filter.clone(),
        sort: parent.sort.clone(),
        affinity_key: parent.affinity_key.clone(),
        args: parent.args.clone(),
        input,
        input_mime: mime,
        deadline_ms: parent.deadline_ms,
        not_before_ms: None,
        priority: parent.priority,
        max_attempts: parent.max_attempts,
        submitter: parent.submitter.clone(),
        idempotency_key: None,
        progress: false,
        watch: None,
        limit: None,
        batch: None,
        target: None,
        parent: Some(parent_id.clone()),
        mapreduce: None,
        output_refs: false,
        input_blobs: Vec::new(),
        keep_output: false,
        input_kept: Vec::new(),
        event: None,
    }
}

impl JobTable {
    /// Starts a queued map/reduce job: its split step, or (input given as a fragment list) its
    /// map steps. The parent runs until its last reduce ends.
    ///
    /// A fragment list in the blob store is read through `blobs`; the map steps' inputs are
    /// inline bodies here, and the core moves those over the inline limit to the store.
    pub fn start_mapreduce(
        &mut self,
        parent: &JobId,
        now_ms: u64,
        blobs: &dyn BlobAccess,
    ) -> Advance {
        let started = self.update(parent, |p| {
            let mr = p.spec.mapreduce.clone()?;
            // The steps carry the input from here on: one copy, not two.
            let input = std::mem::take(&mut p.spec.input);
            p.spec.input_blobs.clear();
            p.state = JobState::Running;
            p.attempts = 1;
            p.percent = Some(0);
            p.updated_ms = now_ms;
            p.mr = Some(MapReduceState::default());
            Some((mr, input, p.spec.clone()))
        });
        let Some((mr, input, spec)) = started.flatten() else {
            return Advance::default();
        };
        match (mr.split, child_id(parent, "split")) {
            (Some(split), Some(id)) => {
                let s = step_spec(&spec, parent, split, input, spec.input_mime.clone());
                self.insert_queued(id.clone(), s, now_ms);
                self.update(parent, |p| {
                    p.children.push(id.clone());
                    if let Some(st) = &mut p.mr {
                        st.split = Some(id.clone());
                    }
                });
                Advance {
                    created: vec![id],
                    ..Default::default()
                }
            }
            _ => match input
                .bytes(blobs)
                .map_err(|e| format!("the stored input cannot be read: {e}"))
                .and_then(|b| fragments::decode(&b).map_err(|e| e.to_string()))
            {
                Ok(f) => self.plan(parent, f, now_ms, blobs),
                Err(e) => {
                    self.finalize(
                        parent,
                        JobState::Failed,
                        Condition::BadArguments,
                        Some(format!("input: {e}")),
                        now_ms,
                    );
                    Advance {
                        ended: true,
                        ..Default::default()
                    }
                }
            },
        }
    }

    /// The fragments are known: one map step each, and the empty reduce tree above them.
    fn plan(
        &mut self,
        parent: &JobId,
        frags: Vec<Fragment>,
        now_ms: u64,
        blobs: &dyn BlobAccess,
    ) -> Advance {
        let Some(spec) = self.get(parent).map(|p| p.spec.clone()) else {
            return Advance::default();
        };
        let fan_in = spec.mapreduce.as_ref().map_or(2, |m| m.fan_in as usize);
        // A split step's list may name blobs too: each must be there for its map step.
        let missing = frags.iter().enumerate().find_map(|(i, f)| {
            let r = f.source.as_ref()?;
            let b = Stored {
                sha256: r.sha256,
                size: r.size,
            };
            (!blobs.contains(&b)).then_some((i, b))
        });
        if let Some((i, b)) = missing {
            return self.fail_mapreduce(
                parent,
                Condition::BadArguments,
                format!(
                    "fragment {i} names blob {} of {} bytes, which is not in the blob store",
                    b.hex(),
                    b.size
                ),
                now_ms,
            );
        }
        let mut maps = Vec::with_capacity(frags.len());
        let mut created = Vec::with_capacity(frags.len());
        for (i, f) in frags.into_iter().enumerate() {
            let Some(id) = child_id(parent, &format!("m{i}")) else {
                continue;
            };
            // A fragment by reference is its map step's input as it is: stored once, fetched
            // by the agent that maps it.
            let input = match f.source {
                Some(r) => Body::Stored(Stored {
                    sha256: r.sha256,
                    size: r.size,
                }),
                None => Body::Inline(f.data),
            };
            let mut s = step_spec(&spec, parent, spec.capability.clone(), input, f.mime);
            s.keep_output = true;
            self.insert_queued(id.clone(), s, now_ms);
            maps.push(Task {
                name: f.name,
                jobs: vec![id.clone()],
                winner: None,
            });
            created.push(id);
        }
        let reduces = reduce_levels(maps.len(), fan_in);
        let mut levels = vec![maps];
        levels.extend(reduces.into_iter().map(|n| vec![Task::default(); n]));
        self.update(parent, |p| {
            p.children.extend(created.iter().cloned());
            if let Some(st) = &mut p.mr {
                st.levels = levels;
            }
        });
        // With no fragments, the one reduce (over an empty list) can start at once.
        let mut adv = self.advance(parent, now_ms, blobs);
        created.append(&mut adv.created);
        adv.created = created;
        adv
    }

    /// Moves a running map/reduce job on from its children's states: records the step
    /// winners, starts the reduces whose inputs are all done, ends the job with the last
    /// reduce's result, or fails it when a step failed for good.
    ///
    /// Outputs in the blob store are read through `blobs` (a split step's fragment list, the
    /// outputs a reduce step takes as its input).
    pub fn advance(&mut self, parent: &JobId, now_ms: u64, blobs: &dyn BlobAccess) -> Advance {
        let mut adv = Advance::default();
        let Some(p) = self.get(parent) else {
            return adv;
        };
        let Some(mut st) = p.mr.clone().filter(|_| !p.state.is_final()) else {
            return adv;
        };
        let spec = p.spec.clone();
        let Some(mr) = spec.mapreduce.clone() else {
            return adv;
        };
        if st.levels.is_empty() {
            let Some(split) = st.split.clone() else {
                return adv;
            };
            let Some(j) = self.get(&split).filter(|j| j.state.is_final()) else {
                return adv;
            };
            return match &j.outcome {
                Some(Recorded::Succeeded { output, .. }) => match output
                    .bytes(blobs)
                    .map_err(|e| format!("cannot be read from the blob store: {e}"))
                    .and_then(|b| fragments::decode(&b).map_err(|e| e.to_string()))
                {
                    Ok(f) => self.plan(parent, f, now_ms, blobs),
                    Err(e) => self.fail_mapreduce(
                        parent,
                        Condition::Failed,
                        format!("the split step's output is {e}"),
                        now_ms,
                    ),
                },
                other => {
                    let (c, m) = failure_of(other);
                    self.fail_mapreduce(
                        parent,
                        c,
                        format!("the split step {split} failed: {m}"),
                        now_ms,
                    )
                }
            };
        }
        // Winners, and steps that failed for good.
        let mut failed = None;
        for (level, tasks) in st.levels.iter_mut().enumerate() {
            for (i, t) in tasks.iter_mut().enumerate() {
                if t.winner.is_some() || t.jobs.is_empty() {
                    continue;
                }
                let state_of = |id: &JobId| self.get(id).map(|j| j.state);
                if let Some(w) = t
                    .jobs
                    .iter()
                    .find(|id| state_of(id) == Some(JobState::Succeeded))
                {
                    adv.cancel.extend(
                        t.jobs
                            .iter()
                            .filter(|id| *id != w && state_of(id).is_some_and(|s| !s.is_final()))
                            .cloned(),
                    );
                    t.winner = Some(w.clone());
                    adv.progressed = true;
                } else if failed.is_none()
                    && t.jobs
                        .iter()
                        .all(|id| state_of(id).is_none_or(JobState::is_final))
                {
                    let last = t.jobs.last().and_then(|id| self.get(id));
                    let (c, m) = failure_of(&last.and_then(|j| j.outcome.clone()));
                    let what = if level == 0 {
                        format!("fragment {i}")
                    } else {
                        format!("reduce step {level}.{i}")
                    };
                    let id = t.jobs.last().map(|j| j.to_string()).unwrap_or_default();
                    failed = Some((c, format!("{what} ({id}) failed: {m}")));
                }
            }
        }
        if let Some((c, m)) = failed {
            self.update(parent, |p| p.mr = Some(st));
            let mut more = self.fail_mapreduce(parent, c, m, now_ms);
            more.progressed |= adv.progressed;
            return more;
        }
        // Reduces whose inputs are all done.
        let fan_in = mr.fan_in as usize;
        for level in 1..st.levels.len() {
            for j in 0..st.levels[level].len() {
                if !st.levels[level][j].jobs.is_empty() {
                    continue;
                }
                let below = &st.levels[level - 1];
                let range = (j * fan_in).min(below.len())..((j + 1) * fan_in).min(below.len());
                if below[range.clone()].iter().any(|t| t.winner.is_none()) {
                    continue;
                }
                // The map outputs by reference when they are in the blob store (the agent
                // fetches them, or the dispatcher inlines them for one that cannot), inline
                // when they are small: the list itself stays a few bytes per input, and
                // nothing is read from the store here.
                let mut named = Vec::new();
                let mut kept: Vec<(FullJid, u64)> = Vec::new();
                let inputs: Vec<Fragment> = below[range]
                    .iter()
                    .map(|t| {
                        let out = t.winner.as_ref().and_then(|w| self.get(w));
                        match out.and_then(|j| j.outcome.as_ref()) {
                            Some(Recorded::Succeeded { output, mime, .. }) => {
                                let mut f = match output {
                                    Body::Stored(b) => {
                                        named.push(*b);
                                        Fragment::reference(b.sha256, b.size)
                                    }
                                    Body::Inline(bytes) => Fragment::new(bytes.clone()),
                                    // Kept by the agent that made it: named with its URL,
                                    // which the core signs for the reduce step's agent.
                                    Body::Kept(k) => {
                                        match kept.iter_mut().find(|(a, _)| *a == k.agent) {
                                            Some((_, n)) => *n += k.blob.size,
                                            None => kept.push((k.agent.clone(), k.blob.size)),
                                        }
                                        let mut f = Fragment::reference(k.blob.sha256, k.blob.size);
                                        if let Some(r) = f.source.as_mut() {
                                            r.url = Some(k.url.clone());
                                        }
                                        f
                                    }
                                };
                                f.name = t.name.clone();
                                f.mime = mime.clone();
                                f
                            }
                            _ => Fragment::default(),
                        }
                    })
                    .collect();
                // A reduce step made again after its kept inputs were lost needs a new id.
                let Some(mut id) = child_id(parent, &format!("r{level}.{j}")) else {
                    continue;
                };
                if self.get(&id).is_some() {
                    st.remade += 1;
                    match child_id(&id, &format!("x{}", st.remade)) {
                        Some(again) => id = again,
                        None => continue,
                    }
                }
                let mut s = step_spec(
                    &spec,
                    parent,
                    mr.reduce.clone(),
                    Body::Inline(fragments::encode(&inputs)),
                    Some(FRAGMENTS_MIME.into()),
                );
                s.input_blobs = named;
                s.input_kept = kept;
                self.insert_queued(id.clone(), s, now_ms);
                st.levels[level][j].jobs.push(id.clone());
                // Its inputs travel in this job now; the next level inherits the first label.
                st.levels[level][j].name = st.levels[level - 1]
                    .get(j * fan_in)
                    .and_then(|t| t.name.clone());
                adv.created.push(id);
            }
        }
        let last = st
            .levels
            .last()
            .and_then(|l| l.first())
            .and_then(|t| t.winner.clone());
        let percent = st.percent();
        let (maps, _, _, reduces) = st.counts();
        let speculative = st.speculative;
        let moved = adv.progressed || !adv.created.is_empty();
        let updated = self.update(parent, |p| {
            p.children.extend(adv.created.iter().cloned());
            p.mr = Some(st);
            p.percent = Some(percent);
            if moved {
                p.updated_ms = now_ms;
            }
        });
        if updated.is_none() {
            return adv;
        }
        let Some(winner) = last else {
            return adv;
        };
        let Some(Recorded::Succeeded {
            meta, output, mime, ..
        }) = self.get(&winner).and_then(|j| j.outcome.clone())
        else {
            return adv;
        };
        let mut meta = meta;
        meta.insert("fragments".into(), maps.into());
        meta.insert("reduce_steps".into(), reduces.into());
        meta.insert("speculative".into(), speculative.into());
        self.update(parent, |p| {
            p.state = JobState::Succeeded;
            p.percent = Some(100);
            p.outcome = Some(Recorded::Succeeded {
                meta,
                output,
                mime,
                elapsed_ms: Some(now_ms.saturating_sub(p.accepted_ms)),
            });
            p.updated_ms = now_ms;
        });
        adv.ended = true;
        adv
    }

    /// The reduce step `reduce` cannot get the outputs agents keep for it: each map step of
    /// its range whose winning output is [`Body::Kept`] runs again as a new step whose output
    /// goes to the dispatcher's blob store, and the reduce step leaves its task (the caller
    /// cancels it), so that [`JobTable::advance`] makes a new one when the maps are done.
    pub fn lose_kept(&mut self, parent: &JobId, reduce: &JobId, now_ms: u64) -> Advance {
        let mut adv = Advance::default();
        let Some(mut st) = self.get(parent).and_then(|p| p.mr.clone()) else {
            return adv;
        };
        let Some(fan_in) = self
            .get(parent)
            .and_then(|p| p.spec.mapreduce.as_ref())
            .map(|m| m.fan_in as usize)
        else {
            return adv;
        };
        let Some((level, j)) = st.levels.iter().enumerate().skip(1).find_map(|(l, tasks)| {
            tasks
                .iter()
                .position(|t| t.jobs.contains(reduce))
                .map(|j| (l, j))
        }) else {
            return adv;
        };
        st.levels[level][j].jobs.clear();
        let below = st.levels[level - 1].len();
        for i in (j * fan_in).min(below)..((j + 1) * fan_in).min(below) {
            let Some(w) = st.levels[level - 1][i].winner.clone() else {
                continue;
            };
            let Some(rec) = self.get(&w) else {
                continue;
            };
            if !matches!(
                rec.outcome,
                Some(Recorded::Succeeded {
                    output: Body::Kept(_),
                    ..
                })
            ) {
                continue;
            }
            let mut spec = rec.spec.clone();
            spec.keep_output = false;
            st.remade += 1;
            let Some(id) = child_id(&w, &format!("x{}", st.remade)) else {
                continue;
            };
            self.insert_queued(id.clone(), spec, now_ms);
            let t = &mut st.levels[level - 1][i];
            t.winner = None;
            t.jobs = vec![id.clone()];
            adv.created.push(id);
        }
        self.update(parent, |p| {
            p.children.extend(adv.created.iter().cloned());
            p.mr = Some(st);
            p.updated_ms = now_ms;
        });
        adv
    }

    /// Ends a map/reduce job as failed; its unfinished steps are to be cancelled.
    fn fail_mapreduce(
        &mut self,
        parent: &JobId,
        condition: Condition,
        message: String,
        now_ms: u64,
    ) -> Advance {
        self.finalize(parent, JobState::Failed, condition, Some(message), now_ms);
        let cancel = self.get(parent).map_or_else(Vec::new, |p| {
            p.children
                .iter()
                .filter(|c| self.get(c).is_some_and(|j| !j.state.is_final()))
                .cloned()
                .collect()
        });
        Advance {
            cancel,
            ended: true,
            ..Default::default()
        }
    }

    /// Steps running longer than `factor` × the median time of their finished siblings (and
    /// at least `min_ms`) that have no speculative copy yet. A level needs a quarter of its
    /// steps finished (at least one) before its median counts.
    pub fn stragglers(&self, now_ms: u64, factor: f64, min_ms: u64) -> Vec<Straggler> {
        let mut out = Vec::new();
        if factor <= 0.0 {
            return out;
        }
        // Only the running map/reduce jobs (an index), not every job held.
        for p in self.running_mapreduce_records() {
            let Some(st) = p.mr.as_ref().filter(|_| p.state == JobState::Running) else {
                continue;
            };
            for tasks in &st.levels {
                let mut times: Vec<u64> = tasks
                    .iter()
                    .filter_map(|t| t.winner.as_ref().and_then(|w| self.get(w)))
                    .map(|j| j.updated_ms.saturating_sub(j.dispatched_ms))
                    .collect();
                if times.is_empty() || times.len() < tasks.len().div_ceil(4) {
                    continue;
                }
                times.sort_unstable();
                let median = times[times.len() / 2];
                let limit = ((median as f64 * factor) as u64).max(min_ms);
                for t in tasks
                    .iter()
                    .filter(|t| t.winner.is_none() && t.jobs.len() == 1)
                {
                    let Some(j) = self.get(&t.jobs[0]) else {
                        continue;
                    };
                    let running = now_ms.saturating_sub(j.dispatched_ms);
                    let agent = j
                        .agent
                        .clone()
                        .filter(|_| matches!(j.state, JobState::Dispatched | JobState::Running));
                    if let Some(agent) = agent.filter(|_| running > limit) {
                        out.push(Straggler {
                            parent: p.id.clone(),
                            job: j.id.clone(),
                            agent,
                            running_ms: running,
                            median_ms: median,
                        });
                    }
                }
            }
        }
        out
    }

    /// Queues a speculative copy of a straggling step, kept off the straggler's agent and
    /// ahead of its siblings in the queue. Returns the copy's id.
    pub fn speculate(&mut self, s: &Straggler, now_ms: u64) -> Option<JobId> {
        let orig = self.get(&s.job)?;
        let mut spec = orig.spec.clone();
        spec.priority = spec.priority.saturating_add(1);
        let id = child_id(&s.job, "b")?;
        if self.get(&id).is_some() {
            return None;
        }
        self.insert_queued(id.clone(), spec, now_ms);
        self.update(&id, |j| j.excluded.push(s.agent.clone()));
        self.update(&s.parent, |p| {
            p.children.push(id.clone());
            let st = p.mr.as_mut()?;
            st.speculative += 1;
            let task = st
                .levels
                .iter_mut()
                .flatten()
                .find(|t| t.jobs.first() == Some(&s.job))?;
            task.jobs.push(id.clone());
            Some(())
        })??;
        Some(id)
    }
}

/// The condition and message of a step that did not succeed.
fn failure_of(outcome: &Option<Recorded>) -> (Condition, String) {
    match outcome {
        Some(Recorded::Failure {
            condition,
            message,
            field,
        }) => (
            *condition,
            match field {
                Some(f) => format!(
                    "{condition}: field '{f}': {}",
                    message.as_deref().unwrap_or("")
                ),
                None => format!("{condition}: {}", message.as_deref().unwrap_or("")),
            },
        ),
        _ => (Condition::Failed, "no result".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::reduce_levels;

    #[test]
    fn reduce_tree_shape() {
        assert_eq!(reduce_levels(0, 16), vec![1]);
        assert_eq!(reduce_levels(1, 16), vec![1]);
        assert_eq!(reduce_levels(16, 16), vec![1]);
        assert_eq!(reduce_levels(17, 16), vec![2, 1]);
        assert_eq!(reduce_levels(50, 4), vec![13, 4, 1]);
        assert_eq!(reduce_levels(1000, 10), vec![100, 10, 1]);
    }
}
