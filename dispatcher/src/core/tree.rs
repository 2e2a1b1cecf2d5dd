//! A job's tree of steps, as the console's job page draws it (`GET /v1/jobs/{id}/tree`): a
//! map/reduce job's split, map and reduce levels with each step's copies (a straggler and its
//! speculative copy side by side), or an `all` job's copies, one per agent.
//!
//! Read by [`super::Core::query`] from the parent's plan ([`crate::jobs::MapReduceState`])
//! and the children's records: one lookup per step, bounded by the plan's size.

use serde::Serialize;
use utoipa::ToSchema;

use super::JobStateName;
use crate::jobs::{JobRecord, JobTable};
use spine_protocol::JobState;

/// A job's steps.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobTree)]
pub struct TreeView {
    /// The job.
    pub id: String,
    /// Its levels in the order they run: `split`, `map`, then each `reduce` level; or the
    /// one level of an `all` job's `copies`. Empty for a job without steps.
    pub levels: Vec<LevelView>,
}

/// One level of steps.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobTreeLevel)]
pub struct LevelView {
    /// `split`, `map`, `reduce` or `copies`.
    #[schema(example = "map")]
    pub kind: &'static str,
    /// 0 for split, map and copies; 1, 2, … for the reduce levels.
    pub level: u64,
    pub steps: Vec<StepBox>,
}

/// One step, with its copies.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobTreeStep)]
pub struct StepBox {
    /// A map step's fragment label (`null` for other steps).
    pub name: Option<String>,
    /// The copy whose result counts, once one finished.
    pub winner: Option<String>,
    /// The step's jobs: the first, then a speculative copy. Empty: not started yet.
    pub jobs: Vec<CopyView>,
}

/// One job of a step.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobTreeCopy)]
pub struct CopyView {
    pub id: String,
    #[schema(value_type = JobStateName)]
    pub state: JobState,
    pub agent: Option<String>,
    pub attempts: u64,
    pub percent: Option<u8>,
    /// A copy started because the first ran far longer than its siblings.
    pub speculative: bool,
    /// A step that ran far longer than its siblings and got a speculative copy.
    pub straggler: bool,
}

fn copy(j: &JobRecord, speculative: bool, straggler: bool) -> CopyView {
    CopyView {
        id: j.id.to_string(),
        state: j.state,
        agent: j.agent.as_ref().map(|a| a.to_string()),
        attempts: j.attempts,
        percent: j.percent,
        speculative,
        straggler,
    }
}

/// The tree of `parent`.
pub(crate) fn tree(jobs: &JobTable, parent: &JobRecord) -> TreeView {
    let mut levels = Vec::new();
    if let Some(st) = &parent.mr {
        if let Some(split) = st.split.as_ref().and_then(|id| jobs.get(id)) {
            levels.push(LevelView {
                kind: "split",
                level: 0,
                steps: vec![StepBox {
                    name: None,
                    winner: split.state.is_final().then(|| split.id.to_string()),
                    jobs: vec![copy(split, false, false)],
                }],
            });
        }
        for (k, tasks) in st.levels.iter().enumerate() {
            let steps = tasks
                .iter()
                .map(|t| {
                    let copied = t.jobs.len() > 1;
                    StepBox {
                        // A reduce step carries its first input's label on to its own reduce;
                        // it names a fragment only on a map step.
                        name: t.name.clone().filter(|_| k == 0),
                        winner: t.winner.as_ref().map(|w| w.to_string()),
                        jobs: t
                            .jobs
                            .iter()
                            .enumerate()
                            .filter_map(|(i, id)| {
                                jobs.get(id).map(|j| copy(j, i > 0, i == 0 && copied))
                            })
                            .collect(),
                    }
                })
                .collect();
            levels.push(LevelView {
                kind: if k == 0 { "map" } else { "reduce" },
                level: k as u64,
                steps,
            });
        }
    } else if !parent.children.is_empty() {
        levels.push(LevelView {
            kind: "copies",
            level: 0,
            steps: parent
                .children
                .iter()
                .filter_map(|id| jobs.get(id))
                .map(|j| StepBox {
                    name: j.agent.as_ref().map(|a| a.to_string()),
                    winner: j.state.is_final().then(|| j.id.to_string()),
                    jobs: vec![copy(j, false, false)],
                })
                .collect(),
        });
    }
    TreeView {
        id: parent.id.to_string(),
        levels,
    }
}

#[cfg(test)]
mod tests {
    use jid::FullJid;
    use spine_protocol::fragments::{self, Fragment};
    use spine_protocol::{JobId, JobResult, MapReduce};

    use super::*;
    use crate::jobs::{JobSpec, MemoryBlobs};

    fn id(s: &str) -> JobId {
        s.parse().unwrap()
    }

    fn agent(n: u32) -> FullJid {
        format!("agent{n}@localhost/w").parse().unwrap()
    }

    fn ok(t: &mut JobTable, job: &JobId, now: u64) {
        let r = JobResult {
            job: job.clone(),
            attempt: 1,
            elapsed_ms: None,
            meta: Default::default(),
            output: None,
        };
        t.succeeded(job, &r, b"x".to_vec().into(), None, now)
            .unwrap();
    }

    #[test]
    fn a_straggler_and_its_speculative_copy_are_marked_and_reduce_steps_are_unnamed() {
        let mut t = JobTable::new(100);
        let p = id("mr");
        let list: Vec<Fragment> = (0..4)
            .map(|i| Fragment::new(b"a".to_vec()).with_name(format!("part-{i}")))
            .collect();
        let mut spec = JobSpec::new("wc.map".parse().unwrap(), "http:test");
        spec.input = fragments::encode(&list).into();
        spec.mapreduce = Some(MapReduce {
            reduce: "wc.reduce".parse().unwrap(),
            split: None,
            fan_in: 16,
        });
        t.submit(p.clone(), spec, 0).unwrap();
        t.start_mapreduce(&p, 0, &MemoryBlobs::default());
        let maps: Vec<JobId> = (0..4).map(|i| id(&format!("mr.m{i}"))).collect();
        for m in &maps {
            t.dispatched(m, &agent(1), 0).unwrap();
        }
        for m in &maps[..3] {
            ok(&mut t, m, 100);
            t.advance(&p, 100, &MemoryBlobs::default());
        }
        let s = t.stragglers(5_000, 4.0, 2_000);
        assert_eq!(s.len(), 1);
        let copy = t.speculate(&s[0], 5_000).unwrap();

        let view = tree(&t, t.get(&p).unwrap());
        assert_eq!(view.levels.len(), 2, "map and reduce levels");
        let map = &view.levels[0];
        assert_eq!((map.kind, map.level, map.steps.len()), ("map", 0, 4));
        assert_eq!(map.steps[0].name.as_deref(), Some("part-0"));
        assert_eq!(map.steps[0].winner.as_deref(), Some("mr.m0"));
        let slow = &map.steps[3];
        assert_eq!(slow.jobs.len(), 2);
        assert_eq!(slow.jobs[0].id, "mr.m3");
        assert!(slow.jobs[0].straggler && !slow.jobs[0].speculative);
        assert_eq!(slow.jobs[1].id, copy.to_string());
        assert!(slow.jobs[1].speculative && !slow.jobs[1].straggler);
        assert_eq!(slow.jobs[1].state, JobState::Queued);
        assert!(map.steps[..3]
            .iter()
            .all(|s| s.jobs.len() == 1 && !s.jobs[0].straggler && !s.jobs[0].speculative));
        // The reduce level: planned, not started, and named by no fragment.
        let reduce = &view.levels[1];
        assert_eq!((reduce.kind, reduce.level), ("reduce", 1));
        assert!(reduce
            .steps
            .iter()
            .all(|s| s.name.is_none() && s.jobs.is_empty()));

        // The copy wins: the step's winner is the copy.
        t.dispatched(&copy, &agent(2), 5_010).unwrap();
        ok(&mut t, &copy, 5_020);
        t.advance(&p, 5_020, &MemoryBlobs::default());
        let view = tree(&t, t.get(&p).unwrap());
        assert_eq!(
            view.levels[0].steps[3].winner.as_deref(),
            Some(copy.as_str())
        );
        assert_eq!(view.levels[1].steps[0].jobs[0].id, "mr.r1.0");

        // A job without steps has no levels.
        let plain = id("plain");
        t.submit(
            plain.clone(),
            JobSpec::new("x.y".parse().unwrap(), "http:test"),
            0,
        )
        .unwrap();
        assert!(tree(&t, t.get(&plain).unwrap()).levels.is_empty());
    }
}
