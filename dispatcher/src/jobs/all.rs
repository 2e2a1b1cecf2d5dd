//! The `all` strategy in the job table: a queued `all` job (found through
//! [`JobTable::queued_all_parents`]) is fanned out into one child per capable agent, each an
//! ordinary job pinned to its agent; the parent runs until every child has ended, then
//! [`JobTable::gather`] records its outcome, a report of each agent's.

use jid::FullJid;
use spine_protocol::{Condition, JobId, JobState, Strategy};

use super::{Body, JobRecord, JobTable, Recorded};

impl JobTable {
    /// Fans an `all` job out: one child per agent in `targets`, queued; the parent runs until
    /// they have all ended. Returns the children.
    pub fn fan_out(&mut self, parent: &JobId, targets: &[FullJid], now_ms: u64) -> Vec<JobId> {
        let Some(spec) = self.get(parent).map(|p| p.spec.clone()) else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        for (i, agent) in targets.iter().enumerate() {
            let Ok(id) = format!("{parent}.{}", i + 1).parse::<JobId>() else {
                continue;
            };
            let mut spec = spec.clone();
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
        self.update(parent, |p| {
            p.state = JobState::Running;
            p.attempts = 1;
            p.children = ids.clone();
            p.updated_ms = now_ms;
        });
        ids
    }

    /// Children of `parent` that are dispatched or running.
    pub fn running_children(&self, parent: &JobId) -> u64 {
        self.get(parent).map_or(0, |p| {
            p.children
                .iter()
                .filter(|c| {
                    self.get(c).is_some_and(|j| {
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
        let Some(p) = self.get(parent) else {
            return false;
        };
        if p.state.is_final() || p.children.is_empty() || p.mr.is_some() {
            return false;
        }
        let children: Vec<&JobRecord> = p.children.iter().filter_map(|c| self.get(c)).collect();
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
                    // Each child's output is in the report when it is inline; a large one is
                    // read from its own job (`output_url`).
                    match output.inline() {
                        Some(b) => {
                            entry["output"] = serde_json::json!(
                                base64::engine::general_purpose::STANDARD.encode(b)
                            )
                        }
                        None => {
                            entry["output_size"] = serde_json::json!(output.len());
                            entry["output_url"] =
                                serde_json::json!(format!("/v1/jobs/{}/output", c.id));
                        }
                    }
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
        self.update(parent, |rec| {
            rec.updated_ms = now_ms;
            rec.percent = Some(100);
            if succeeded > 0 {
                let mut meta = serde_json::Map::new();
                meta.insert("agents".into(), total.into());
                meta.insert("succeeded".into(), succeeded.into());
                rec.state = JobState::Succeeded;
                rec.outcome = Some(Recorded::Succeeded {
                    meta,
                    output: Body::Inline(serde_json::Value::Array(report).to_string().into_bytes()),
                    mime: Some("application/json".into()),
                    elapsed_ms: None,
                });
            } else {
                rec.state = JobState::Failed;
                rec.outcome = Some(Recorded::Failure {
                    condition: Condition::Failed,
                    message: Some(format!(
                        "the job failed on all {total} agents: {}",
                        serde_json::Value::Array(report)
                    )),
                    field: None,
                });
            }
        })
        .is_some()
    }
}
