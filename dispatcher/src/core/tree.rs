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
