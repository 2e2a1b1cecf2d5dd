//! What the tests of issue 14's limits share: a plain job and ids.

use spine_dispatcher::jobs::JobSpec;
use spine_protocol::{JobId, Strategy};

/// A job id.
pub fn id(s: &str) -> JobId {
    s.parse().unwrap()
}

/// A plain job of `cap` from `submitter`: no arguments, input or filter, 3 attempts.
pub fn spec(cap: &str, submitter: &str) -> JobSpec {
    JobSpec {
        capability: cap.parse().unwrap(),
        strategy: Strategy::LeastLoaded,
        filter: None,
        sort: None,
        affinity_key: None,
        args: Default::default(),
        input: Default::default(),
        input_mime: None,
        deadline_ms: None,
        not_before_ms: None,
        priority: 0,
        max_attempts: 3,
        submitter: submitter.into(),
        idempotency_key: None,
        progress: false,
        watch: None,
        limit: None,
        batch: None,
        mapreduce: None,
        output_refs: false,
        input_blobs: Vec::new(),
        keep_output: false,
        input_kept: Vec::new(),
        event: None,
        target: None,
        parent: None,
    }
}
