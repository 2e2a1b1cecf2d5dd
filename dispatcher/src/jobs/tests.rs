//! The job table's indexes against the records: random sequences of every kind of event
//! (submissions of plain, `all` and map/reduce jobs, dispatch, progress, results, failures,
//! refusals, lost sessions, cancels, fan-out, map/reduce steps, stragglers, expiry, retention,
//! restores), and after each one the indexes kept up to date must equal indexes rebuilt from
//! scratch over the records, and every indexed read must give what a scan of the records
//! gives.

use jid::FullJid;
use proptest::prelude::*;
use spine_protocol::fragments::{self, Fragment};
use spine_protocol::Strategy as Placement;
use spine_protocol::{Condition, JobId, JobResult, JobState, MapReduce, SpineError};

use super::{JobFilter, JobRecord, JobSpec, JobTable, MAX_HISTORY};

const IDS: usize = 8;
const CAPS: [&str; 2] = ["cap.a", "cap.b"];
const SUBMITTERS: [&str; 2] = ["http:one", "alice@example.com/x"];

#[derive(Debug, Clone)]
enum Op {
    Submit {
        job: usize,
        cap: usize,
        submitter: usize,
        priority: i64,
        deadline: Option<u64>,
        kind: u8,
        attempts: u64,
    },
    Dispatched(usize, u8),
    Progress(usize),
    Succeeded(usize),
    Failed(usize, bool),
    Refused(usize),
    SessionLost(usize),
    Cancel(usize),
    NoAgent(usize),
    FanOut(usize, u8),
    StartMapReduce(usize),
    Advance(usize),
    Gather(usize),
    Speculate,
    Restore(usize),
    Expire,
    Prune(u64),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let j = 0..IDS;
    prop_oneof![
        4 => (j.clone(), 0..2usize, 0..2usize, -1..2i64, prop::option::of(0..400u64), 0..4u8, 1..4u64)
            .prop_map(|(job, cap, submitter, priority, deadline, kind, attempts)| Op::Submit {
                job, cap, submitter, priority, deadline, kind, attempts
            }),
        3 => (j.clone(), 0..3u8).prop_map(|(a, b)| Op::Dispatched(a, b)),
        1 => j.clone().prop_map(Op::Progress),
        3 => j.clone().prop_map(Op::Succeeded),
        2 => (j.clone(), any::<bool>()).prop_map(|(a, b)| Op::Failed(a, b)),
        1 => j.clone().prop_map(Op::Refused),
        1 => j.clone().prop_map(Op::SessionLost),
        1 => j.clone().prop_map(Op::Cancel),
        1 => j.clone().prop_map(Op::NoAgent),
        1 => (j.clone(), 0..3u8).prop_map(|(a, b)| Op::FanOut(a, b)),
        1 => j.clone().prop_map(Op::StartMapReduce),
        1 => j.clone().prop_map(Op::Advance),
        1 => j.clone().prop_map(Op::Gather),
        1 => Just(Op::Speculate),
        1 => j.clone().prop_map(Op::Restore),
        1 => Just(Op::Expire),
        1 => (0..300u64).prop_map(Op::Prune),
        2 => (0..200u64).prop_map(Op::Wait),
    ]
}

fn jid(n: u8) -> FullJid {
    format!("agent{n}@example.com/w").parse().unwrap()
}

fn spec(cap: usize, submitter: usize, priority: i64, kind: u8, attempts: u64) -> JobSpec {
    let mut input = Vec::new();
    let (strategy, mapreduce) = match kind {
        1 => (Placement::All, None),
        2 => {
            input = fragments::encode(&[
                Fragment::new(b"x".to_vec()).with_name("f0"),
                Fragment::default(),
                Fragment::default(),
            ]);
            let mut m = MapReduce::new(CAPS[1].parse().unwrap());
            m.fan_in = 2;
            (Placement::LeastLoaded, Some(m))
        }
        _ => (Placement::LeastLoaded, None),
    };
    let mut s = JobSpec::new(CAPS[cap].parse().unwrap(), SUBMITTERS[submitter]);
    s.strategy = strategy;
    s.input = input.into();
    s.priority = priority;
    s.max_attempts = attempts;
    s.mapreduce = mapreduce;
    s
}

/// The jobs of the table, steps and children included (their ids grow suffixes), in a fixed
/// order, so that an operation on job `n` reaches them too.
fn ids(t: &JobTable) -> Vec<JobId> {
    let mut v: Vec<JobId> = t.iter().map(|j| j.id.clone()).collect();
    v.sort();
    v
}

fn pick(t: &JobTable, n: usize) -> Option<JobId> {
    let v = ids(t);
    (!v.is_empty()).then(|| v[n % v.len()].clone())
}

fn apply(t: &mut JobTable, op: &Op, now: &mut u64) {
    let result = |id: &JobId| JobResult {
        job: id.clone(),
        attempt: 1,
        elapsed_ms: Some(1),
        meta: Default::default(),
        output: None,
    };
    match op.clone() {
        Op::Submit {
            job,
            cap,
            submitter,
            priority,
            deadline,
            kind,
            attempts,
        } => {
            let mut s = spec(cap, submitter, priority, kind, attempts);
            s.deadline_ms = deadline.map(|d| *now + d);
            let id: JobId = format!("j{job}").parse().unwrap();
            let _ = t.submit_within(id, s, *now, 3);
        }
        Op::Dispatched(n, a) => {
            if let Some(id) = pick(t, n) {
                t.dispatched(&id, &jid(a), *now);
            }
        }
        Op::Progress(n) => {
            if let Some(id) = pick(t, n) {
                t.progress(&id, Some(50), *now);
            }
        }
        Op::Succeeded(n) => {
            if let Some(id) = pick(t, n) {
                // Odd picks end with an output in the blob store (one of two blobs, so that
                // several jobs share one): the index's reference counts are checked too.
                let output = if n % 2 == 1 {
                    crate::jobs::Body::Stored(crate::blobs::Stored {
                        sha256: [(n % 4) as u8; 32],
                        size: 70_000,
                    })
                } else {
                    fragments::encode(&[]).into()
                };
                let _ = t.succeeded(&id, &result(&id), output, None, *now);
            }
        }
        Op::Failed(n, retryable) => {
            if let Some(id) = pick(t, n) {
                let c = if retryable {
                    Condition::Retryable
                } else {
                    Condition::Failed
                };
                t.attempt_failed(&id, Some(&jid(0)), Some(&SpineError::new(c)), *now);
            }
        }
        Op::Refused(n) => {
            if let Some(id) = pick(t, n) {
                t.refused(&id, *now);
            }
        }
        Op::SessionLost(n) => {
            if let Some(id) = pick(t, n) {
                t.session_lost(&id, *now);
            }
        }
        Op::Cancel(n) => {
            if let Some(id) = pick(t, n) {
                let _ = t.cancel(&id, *now);
            }
        }
        Op::NoAgent(n) => {
            if let Some(id) = pick(t, n) {
                t.no_agent(&id, *now);
            }
        }
        Op::FanOut(n, k) => {
            if let Some(id) = t.queued_all_parents().get(n % IDS).cloned() {
                let targets: Vec<FullJid> = (0..=k).map(jid).collect();
                t.fan_out(&id, &targets, *now);
            }
        }
        Op::StartMapReduce(n) => {
            if let Some(id) = t.queued_mapreduces().get(n % IDS).cloned() {
                t.start_mapreduce(&id, *now, &crate::jobs::MemoryBlobs::default());
            }
        }
        Op::Advance(n) => {
            if let Some(id) = pick(t, n) {
                t.advance(&id, *now, &crate::jobs::MemoryBlobs::default());
            }
        }
        Op::Gather(n) => {
            if let Some(id) = pick(t, n) {
                t.gather(&id, *now);
            }
        }
        Op::Speculate => {
            for s in t.stragglers(*now, 1.0, 0) {
                t.speculate(&s, *now);
            }
        }
        Op::Restore(n) => {
            // A record coming back from the store (as after a restart), over its old self.
            if let Some(rec) = pick(t, n).and_then(|id| t.get(&id).cloned()) {
                t.restore(rec);
            }
        }
        Op::Expire => {
            let due: Vec<JobId> = t
                .iter()
                .filter(|j| !j.state.is_final() && j.spec.deadline_ms.is_some_and(|d| d <= *now))
                .map(|j| j.id.clone())
                .collect();
            let mut got: Vec<JobId> = t.expire(*now).into_iter().map(|(id, _)| id).collect();
            got.sort();
            let mut due = due;
            due.sort();
            assert_eq!(got, due, "expire took other jobs than the due ones");
        }
        Op::Prune(retention) => {
            let mut due: Vec<JobId> = t
                .iter()
                .filter(|j| j.state.is_final() && now.saturating_sub(j.updated_ms) > retention)
                .map(|j| j.id.clone())
                .collect();
            let mut got = t.prune(*now, retention);
            got.sort();
            due.sort();
            assert_eq!(got, due, "prune took other jobs than the due ones");
        }
        Op::Wait(ms) => *now += ms,
    }
}

/// Every indexed read against a scan of the records.
fn check_reads(t: &JobTable) {
    if let Err(e) = t.check_index() {
        panic!("the kept indexes differ from a rebuild:\n{e}");
    }
    let all: Vec<&JobRecord> = t.iter().collect();
    // Every record reads back as it was written (the store's JSON leaves empty fields out;
    // an inline input is stored beside it).
    for j in &all {
        let json = serde_json::to_vec(j).unwrap();
        let mut back: JobRecord = serde_json::from_slice(&json).unwrap();
        if j.spec.input.inline().is_some() {
            back.spec.input = j.spec.input.clone();
        }
        assert_eq!(&&back, j, "{}", String::from_utf8_lossy(&json));
    }
    let mut counts = crate::fastmap::HashMap::default();
    for j in &all {
        *counts
            .entry((j.spec.capability.clone(), j.state))
            .or_insert(0u64) += 1;
    }
    assert_eq!(t.counts(), counts);
    let scan = |f: &dyn Fn(&JobRecord) -> bool| {
        let mut v: Vec<(u64, JobId)> = all
            .iter()
            .filter(|j| f(j))
            .map(|j| (j.seq, j.id.clone()))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect::<Vec<_>>()
    };
    assert_eq!(
        t.queued_all_parents(),
        scan(&|j| j.state == JobState::Queued
            && j.spec.strategy == Placement::All
            && j.spec.parent.is_none())
    );
    assert_eq!(
        t.queued_mapreduces(),
        scan(&|j| j.state == JobState::Queued && j.spec.mapreduce.is_some())
    );
    assert_eq!(
        t.running_mapreduces(),
        scan(&|j| j.mr.is_some() && !j.state.is_final())
    );
    assert_eq!(
        t.next_deadline(),
        all.iter()
            .filter(|j| !j.state.is_final())
            .filter_map(|j| j.spec.deadline_ms)
            .min()
    );
    assert_eq!(
        t.next_prune_at(100),
        all.iter()
            .filter(|j| j.state.is_final())
            .map(|j| j.updated_ms + 101)
            .min()
    );
    for cap in caps() {
        let queued = all
            .iter()
            .filter(|j| j.state == JobState::Queued && j.spec.capability == cap)
            .count();
        assert_eq!(t.queued(&cap), queued);
        for s in SUBMITTERS {
            let mine = all
                .iter()
                .filter(|j| {
                    j.state == JobState::Queued && j.spec.capability == cap && j.spec.submitter == s
                })
                .count();
            assert_eq!(t.queued_by(s, &cap), mine);
        }
    }
    // Pages: every filter, walked page by page with the cursor, against a sorted scan.
    let states = std::iter::once(None).chain(JobState::ALL.into_iter().map(Some));
    for state in states {
        for submitter in [None, Some(SUBMITTERS[0]), Some(SUBMITTERS[1])] {
            let mut want: Vec<&JobRecord> = all
                .iter()
                .copied()
                .filter(|j| state.is_none_or(|s| j.state == s))
                .filter(|j| submitter.is_none_or(|s| j.spec.submitter == s))
                .collect();
            want.sort_by(|a, b| (b.accepted_ms, b.seq, &b.id).cmp(&(a.accepted_ms, a.seq, &a.id)));
            let mut got: Vec<&JobRecord> = Vec::new();
            let mut before = None;
            loop {
                let page = t.page(state, submitter, before, 3);
                let Some(last) = page.last() else { break };
                before = Some((last.accepted_ms, last.seq));
                got.extend(page);
            }
            let ids = |v: &[&JobRecord]| v.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "page of {state:?} by {submitter:?}");
        }
    }
    // Listings with every filter (the capability and the agent too, time bounds), walked with
    // the cursor through pages of 2 and a budget of 3 records looked at per page, against a
    // sorted scan.
    let agents = [
        None,
        Some(jid(1).to_string()),
        Some(jid(1).to_bare().to_string()),
    ];
    for state in [None, Some(JobState::Queued), Some(JobState::Succeeded)] {
        for submitter in [None, Some(SUBMITTERS[0])] {
            for cap in [None, Some(CAPS[0])] {
                for agent in &agents {
                    for (since_ms, until_ms) in [(None, None), (Some(1_050), Some(1_300))] {
                        let f = JobFilter {
                            state,
                            submitter: submitter.map(str::to_owned),
                            capability: cap.map(|c| c.parse().unwrap()),
                            agent: agent.clone(),
                            since_ms,
                            until_ms,
                        };
                        let mut want: Vec<&JobRecord> = all
                            .iter()
                            .copied()
                            .filter(|j| state.is_none_or(|s| j.state == s))
                            .filter(|j| submitter.is_none_or(|s| j.spec.submitter == s))
                            .filter(|j| cap.is_none_or(|c| j.spec.capability.as_str() == c))
                            .filter(|j| {
                                agent.as_ref().is_none_or(|a| {
                                    j.agent.as_ref().is_some_and(|x| {
                                        x.as_str() == a || x.to_bare().as_str() == a
                                    })
                                })
                            })
                            .filter(|j| since_ms.is_none_or(|t| j.accepted_ms >= t))
                            .filter(|j| until_ms.is_none_or(|t| j.accepted_ms <= t))
                            .collect();
                        want.sort_by(|a, b| {
                            (b.accepted_ms, b.seq, &b.id).cmp(&(a.accepted_ms, a.seq, &a.id))
                        });
                        let mut got: Vec<&JobRecord> = Vec::new();
                        let mut before = None;
                        for _ in 0..=all.len() + 1 {
                            let page = t.find(&f, before, 2, 3);
                            assert!(page.jobs.len() <= 2);
                            got.extend(page.jobs);
                            match page.next {
                                Some(n) => before = Some(n),
                                None => break,
                            }
                        }
                        let ids =
                            |v: &[&JobRecord]| v.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
                        assert_eq!(ids(&got), ids(&want), "listing {f:?}");
                    }
                }
            }
        }
    }
}

fn caps() -> Vec<spine_protocol::CapabilityName> {
    CAPS.iter().map(|c| c.parse().unwrap()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn indexes_follow_the_records(ops in prop::collection::vec(op(), 1..80)) {
        let mut t = JobTable::new(6);
        let mut now = 1_000u64;
        for op in &ops {
            apply(&mut t, op, &mut now);
            check_reads(&t);
        }
    }
}

#[test]
fn pages_filters_and_retention_read_from_the_indexes() {
    // 2,000 succeeded jobs and one failed: the failed one is the first of its page.
    let mut t = JobTable::new(usize::MAX);
    for i in 0..2_000u64 {
        let id: JobId = format!("ok{i}").parse().unwrap();
        t.submit(id.clone(), spec(0, 0, 0, 0, 1), i).unwrap();
        t.dispatched(&id, &jid(1), i);
        let r = JobResult {
            job: id.clone(),
            attempt: 1,
            elapsed_ms: None,
            meta: Default::default(),
            output: None,
        };
        t.succeeded(&id, &r, Default::default(), None, i).unwrap();
    }
    let bad: JobId = "bad".parse().unwrap();
    t.submit(bad.clone(), spec(0, 0, 0, 0, 1), 5).unwrap();
    t.cancel(&bad, 6).unwrap();
    let page = t.page(Some(JobState::Cancelled), None, None, 100);
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, bad);
    let newest = t.page(None, Some(SUBMITTERS[0]), None, 2);
    assert_eq!(
        newest.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["ok1999", "ok1998"]
    );
    assert!(t.page(None, Some("nobody"), None, 10).is_empty());
    // Retention takes the oldest only, and says when the next one is due.
    assert_eq!(t.next_prune_at(1_000), Some(1_001));
    let gone = t.prune(1_500, 1_000);
    assert_eq!(
        gone.len(),
        501,
        "the jobs that ended at 0..=499 (and the one cancelled at 6) are over 1,000 ms old"
    );
    assert!(gone.contains(&bad));
    assert_eq!(t.next_prune_at(1_000), Some(500 + 1_001));
    assert_eq!(t.len(), 2_001 - 501);
}

/// The soak benchmark (BENCHMARKS.md, "Soak"): after a burst the table's slots of its peak
/// stayed resident with no job held. Once the retention has forgotten most jobs, the table
/// gives them back; it never shrinks below what it holds.
#[test]
fn the_table_gives_back_its_slots_when_retention_empties_it() {
    let mut t = JobTable::new(usize::MAX);
    for i in 0..20_000u64 {
        let id: JobId = format!("j{i}").parse().unwrap();
        t.submit(id.clone(), spec(0, 0, 0, 0, 1), i).unwrap();
        t.cancel(&id, i).unwrap();
    }
    let peak = t.capacity();
    assert!(peak >= 20_000, "{peak}");
    // Half forgotten: not shrunk yet (a table that refills would rehash for nothing). The
    // capacity a HashMap reports dips a little as removals leave tombstones.
    assert_eq!(t.prune(10_000 + 1_000, 1_000).len(), 10_000);
    assert!(t.capacity() > peak * 3 / 4, "{} of {peak}", t.capacity());
    // 1,000 left of 20,000: a table for about twice that.
    assert_eq!(t.prune(19_000 + 1_000, 1_000).len(), 9_000);
    assert_eq!(t.len(), 1_000);
    assert!(t.capacity() < peak / 4, "{} of {peak}", t.capacity());
    assert!(t.capacity() >= 1_000);
    // Every job left is still found.
    assert!((19_000..20_000).all(|i| t.get(&format!("j{i}").parse().unwrap()).is_some()));
}

/// The timeline: each dispatch, retry (with why), busy refusal and the outcome is a step; a
/// job refused over and over keeps its first step and the newest.
#[test]
fn a_job_keeps_a_bounded_timeline_of_its_life() {
    let mut t = JobTable::new(usize::MAX);
    let id: JobId = "j".parse().unwrap();
    t.submit(id.clone(), spec(0, 0, 0, 0, 3), 10).unwrap();
    t.dispatched(&id, &jid(1), 11);
    t.progress(&id, Some(5), 12);
    let e = SpineError::new(Condition::Retryable).with_text("disk full");
    t.attempt_failed(&id, Some(&jid(1)), Some(&e), 13);
    t.dispatched(&id, &jid(2), 14);
    t.cancel(&id, 15).unwrap();
    let steps: Vec<(JobState, u64, Option<String>)> = t
        .get(&id)
        .unwrap()
        .history
        .iter()
        .map(|s| (s.state, s.attempt, s.agent.as_ref().map(|a| a.to_string())))
        .collect();
    let a = |n| Some(jid(n).to_string());
    assert_eq!(
        steps,
        [
            (JobState::Queued, 0, None),
            (JobState::Dispatched, 1, a(1)),
            (JobState::Running, 1, a(1)),
            (JobState::Queued, 1, a(1)),
            (JobState::Dispatched, 2, a(2)),
            (JobState::Cancelled, 2, a(2)),
        ]
    );
    let h = &t.get(&id).unwrap().history;
    assert_eq!(
        h[3].note.as_deref(),
        Some(
            format!(
                "attempt failed on {}: retryable: disk full; retrying",
                jid(1)
            )
            .as_str()
        )
    );
    assert_eq!(
        h[5].note.as_deref(),
        Some("cancelled: cancelled by the submitter")
    );
    assert_eq!((h[0].at_ms, h[5].at_ms), (10, 15));

    let busy: JobId = "busy".parse().unwrap();
    t.submit(busy.clone(), spec(0, 0, 0, 0, 3), 20).unwrap();
    for i in 0..100 {
        t.dispatched(&busy, &jid(1), 21 + i);
        assert!(t.refused(&busy, 21 + i));
    }
    let h = &t.get(&busy).unwrap().history;
    assert_eq!(h.len(), MAX_HISTORY);
    assert_eq!((h[0].state, h[0].at_ms), (JobState::Queued, 20));
    let last = h.last().unwrap();
    assert_eq!(last.state, JobState::Queued);
    assert_eq!(
        last.note.as_deref(),
        Some(format!("{} was busy or draining: placed again", jid(1)).as_str())
    );
}

#[test]
fn a_record_leaves_its_empty_fields_out_and_an_earlier_one_with_them_still_loads() {
    let mut t = JobTable::new(10);
    let job: JobId = "j1".parse().unwrap();
    t.submit(
        job.clone(),
        JobSpec::new("cap.a".parse().unwrap(), "http:one"),
        1_000,
    )
    .unwrap();
    let rec = t.get(&job).unwrap();
    let json: serde_json::Value = serde_json::to_value(rec).unwrap();
    for absent in [
        "agent",
        "outcome",
        "percent",
        "mr",
        "children",
        "dispatched_ms",
        "resume",
    ] {
        assert!(json.get(absent).is_none(), "{absent} in {json}");
    }
    for absent in [
        "filter",
        "sort",
        "deadline_ms",
        "idempotency_key",
        "watch",
        "parent",
        "mapreduce",
    ] {
        assert!(
            json["spec"].get(absent).is_none(),
            "spec.{absent} in {json}"
        );
    }
    // As an earlier version wrote it: every field, empty ones as null, [] or 0.
    let mut earlier = json.clone();
    for (k, v) in [
        ("agent", serde_json::Value::Null),
        ("outcome", serde_json::Value::Null),
        ("percent", serde_json::Value::Null),
        ("mr", serde_json::Value::Null),
        ("children", serde_json::json!([])),
        ("dispatched_ms", serde_json::json!(0)),
        ("resume", serde_json::json!(false)),
    ] {
        earlier[k] = v;
    }
    for k in [
        "filter",
        "sort",
        "affinity_key",
        "input_mime",
        "deadline_ms",
        "idempotency_key",
        "watch",
        "limit",
        "batch",
        "target",
        "parent",
        "mapreduce",
    ] {
        earlier["spec"][k] = serde_json::Value::Null;
    }
    let loaded: JobRecord = serde_json::from_value(earlier).unwrap();
    assert_eq!(&loaded, rec);
}
