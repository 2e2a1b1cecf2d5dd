//! TEMPORARY: scanning versions of the job table's indexed queries, until the indexed job
//! table lands (issue 15 item 15). Removed when it does.

use spine_protocol::{JobId, JobState, Strategy};

use crate::jobs::{JobRecord, JobTable};

impl JobTable {
    pub fn next_deadline(&self) -> Option<u64> {
        self.iter()
            .filter(|j| !j.state.is_final())
            .filter_map(|j| j.spec.deadline_ms)
            .min()
    }

    pub fn queued_all_parents(&self) -> Vec<JobId> {
        self.iter()
            .filter(|j| {
                j.state == JobState::Queued
                    && j.spec.strategy == Strategy::All
                    && j.spec.parent.is_none()
            })
            .map(|j| j.id.clone())
            .collect()
    }

    pub fn queued_mapreduces(&self) -> Vec<JobId> {
        self.iter()
            .filter(|j| j.state == JobState::Queued && j.spec.mapreduce.is_some())
            .map(|j| j.id.clone())
            .collect()
    }

    pub fn page(
        &self,
        state: Option<JobState>,
        submitter: Option<&str>,
        _before: Option<(u64, u64)>,
        limit: usize,
    ) -> Vec<&JobRecord> {
        let mut list: Vec<&JobRecord> = self
            .iter()
            .filter(|j| state.is_none_or(|s| j.state == s))
            .filter(|j| submitter.is_none_or(|s| s == j.spec.submitter))
            .collect();
        list.sort_by(|a, b| b.accepted_ms.cmp(&a.accepted_ms).then(b.seq.cmp(&a.seq)));
        list.truncate(limit);
        list
    }
}
