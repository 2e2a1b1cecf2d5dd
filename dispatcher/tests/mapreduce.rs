//! The map/reduce state machine: plan, reduce tree, failures, stragglers, restart — driven with
//! plain values and times, no network.

use jid::FullJid;
use spine_dispatcher::jobs::*;
use spine_protocol::fragments::{self, Fragment};
use spine_protocol::{Condition, JobId, JobResult, JobState, MapReduce, SpineError, Strategy};

fn id(s: &str) -> JobId {
    s.parse().unwrap()
}
fn agent(n: u32) -> FullJid {
    format!("agent{n}@localhost/w").parse().unwrap()
}

fn spec(frags: &[&str], fan_in: u64, split: bool) -> JobSpec {
    let list: Vec<Fragment> = frags
        .iter()
        .enumerate()
        .map(|(i, f)| Fragment::new(f.as_bytes().to_vec()).with_name(format!("f{i}")))
        .collect();
    JobSpec {
        capability: "wc.map".parse().unwrap(),
        strategy: Strategy::LeastLoaded,
        filter: None,
        sort: None,
        affinity_key: None,
        args: Default::default(),
        input: if split {
            b"raw text".to_vec().into()
        } else {
            fragments::encode(&list).into()
        },
        input_mime: None,
        deadline_ms: None,
        not_before_ms: None,
        priority: 0,
        max_attempts: 2,
        submitter: "http:test".into(),
        idempotency_key: None,
        progress: false,
        watch: None,
        limit: None,
        batch: None,
        target: None,
        parent: None,
        mapreduce: Some(MapReduce {
            reduce: "wc.reduce".parse().unwrap(),
            split: split.then(|| "wc.split".parse().unwrap()),
            fan_in,
        }),
        output_refs: false,
        input_blobs: Vec::new(),
        keep_output: false,
        input_kept: Vec::new(),
        event: None,
    }
}

fn ok(t: &mut JobTable, job: &JobId, output: &[u8], now: u64) {
    let r = JobResult {
        job: job.clone(),
        attempt: 1,
        elapsed_ms: None,
        meta: Default::default(),
        output: None,
    };
    t.succeeded(
        job,
        &r,
        output.to_vec().into(),
        Some("text/plain".into()),
        now,
    )
    .unwrap();
}

/// Runs `job` on `agent` at `start` and succeeds it at `end`, then advances the parent.
fn run(t: &mut JobTable, p: &JobId, job: &JobId, out: &[u8], start: u64, end: u64) -> Advance {
    t.dispatched(job, &agent(1), start).unwrap();
    ok(t, job, out, end);
    t.advance(p, end, &MemoryBlobs::default())
}

fn input_of(t: &JobTable, job: &JobId) -> Vec<Fragment> {
    fragments::decode(t.get(job).unwrap().spec.input.inline().unwrap()).unwrap()
}

#[test]
fn reduce_tree_runs_in_fragment_order_and_ends_with_the_last_reduce() {
    let mut t = JobTable::new(100);
    let p = id("mr");
    t.submit(p.clone(), spec(&["a", "b", "c", "d", "e"], 2, false), 0)
        .unwrap();
    let adv = t.start_mapreduce(&p, 1, &MemoryBlobs::default());
    let maps: Vec<JobId> = (0..5).map(|i| id(&format!("mr.m{i}"))).collect();
    assert_eq!(adv.created, maps);
    assert_eq!(t.get(&p).unwrap().state, JobState::Running);
    assert!(
        t.get(&p).unwrap().spec.input.is_empty(),
        "the steps hold the input now"
    );
    // Each map step carries its fragment, queued on the map capability.
    assert_eq!(t.get(&maps[3]).unwrap().spec.input, b"d");
    assert_eq!(t.queued(&"wc.map".parse().unwrap()), 5);
    let st = t.get(&p).unwrap().mr.clone().unwrap();
    let sizes: Vec<usize> = st.levels.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![5, 3, 2, 1]);

    // Map 1 ends first: no reduce can start (reduce 1.0 needs maps 0 and 1).
    let adv = run(&mut t, &p, &maps[1], b"B", 2, 3);
    assert!(adv.progressed && adv.created.is_empty());
    let adv = run(&mut t, &p, &maps[0], b"A", 2, 4);
    assert_eq!(adv.created, vec![id("mr.r1.0")]);
    let r10 = input_of(&t, &id("mr.r1.0"));
    assert_eq!(
        r10.iter()
            .map(|f| (f.name.clone().unwrap(), f.data.clone()))
            .collect::<Vec<_>>(),
        vec![("f0".into(), b"A".to_vec()), ("f1".into(), b"B".to_vec())]
    );
    assert_eq!(t.get(&p).unwrap().percent, Some(18), "2 of 11 steps");
    // The lone last map makes reduce 1.2 by itself.
    let adv = run(&mut t, &p, &maps[4], b"E", 2, 5);
    assert_eq!(adv.created, vec![id("mr.r1.2")]);
    run(&mut t, &p, &maps[2], b"C", 2, 6);
    let adv = run(&mut t, &p, &maps[3], b"D", 2, 7);
    assert_eq!(adv.created, vec![id("mr.r1.1")]);
    let adv = run(&mut t, &p, &id("mr.r1.0"), b"AB", 8, 9);
    assert!(adv.created.is_empty());
    let adv = run(&mut t, &p, &id("mr.r1.1"), b"CD", 8, 10);
    assert_eq!(adv.created, vec![id("mr.r2.0")]);
    let data: Vec<Vec<u8>> = input_of(&t, &id("mr.r2.0"))
        .into_iter()
        .map(|f| f.data)
        .collect();
    assert_eq!(data, vec![b"AB".to_vec(), b"CD".to_vec()]);
    let adv = run(&mut t, &p, &id("mr.r1.2"), b"E", 8, 11);
    assert_eq!(adv.created, vec![id("mr.r2.1")]);
    run(&mut t, &p, &id("mr.r2.0"), b"ABCD", 12, 13);
    let adv = run(&mut t, &p, &id("mr.r2.1"), b"E", 12, 14);
    assert_eq!(adv.created, vec![id("mr.r3.0")]);
    let adv = run(&mut t, &p, &id("mr.r3.0"), b"ABCDE", 15, 20);
    assert!(adv.ended);
    let rec = t.get(&p).unwrap();
    assert_eq!(rec.state, JobState::Succeeded);
    assert_eq!(rec.percent, Some(100));
    match &rec.outcome {
        Some(Recorded::Succeeded {
            output,
            meta,
            elapsed_ms,
            ..
        }) => {
            assert_eq!(output, b"ABCDE");
            assert_eq!(meta["fragments"], 5);
            assert_eq!(meta["reduce_steps"], 6);
            assert_eq!(meta["speculative"], 0);
            assert_eq!(*elapsed_ms, Some(20));
        }
        other => panic!("{other:?}"),
    }
    // Idempotent: advancing an ended job does nothing.
    assert_eq!(
        t.advance(&p, 30, &MemoryBlobs::default()),
        Advance::default()
    );
}

#[test]
fn no_fragments_is_one_reduce_over_an_empty_list() {
    let mut t = JobTable::new(100);
    let p = id("mr");
    t.submit(p.clone(), spec(&[], 16, false), 0).unwrap();
    let adv = t.start_mapreduce(&p, 1, &MemoryBlobs::default());
    assert_eq!(adv.created, vec![id("mr.r1.0")]);
    assert!(input_of(&t, &id("mr.r1.0")).is_empty());
    assert_eq!(
        t.get(&id("mr.r1.0")).unwrap().spec.capability.as_str(),
        "wc.reduce"
    );
}

#[test]
fn split_step_output_becomes_the_map_steps() {
    let mut t = JobTable::new(100);
    let p = id("mr");
    t.submit(p.clone(), spec(&[], 16, true), 0).unwrap();
    let adv = t.start_mapreduce(&p, 1, &MemoryBlobs::default());
    let split = id("mr.split");
    assert_eq!(adv.created, vec![split.clone()]);
    assert_eq!(t.get(&split).unwrap().spec.input, b"raw text");
    assert_eq!(t.get(&split).unwrap().spec.capability.as_str(), "wc.split");
    let list = fragments::encode(&[
        Fragment::new(b"raw".to_vec()),
        Fragment::new(b"text".to_vec()),
    ]);
    t.dispatched(&split, &agent(1), 2).unwrap();
    ok(&mut t, &split, &list, 3);
    let adv = t.advance(&p, 3, &MemoryBlobs::default());
    assert_eq!(adv.created, vec![id("mr.m0"), id("mr.m1")]);
    assert_eq!(t.get(&id("mr.m1")).unwrap().spec.input, b"text");

    // A split whose output is not a fragment list fails the job, naming the problem.
    let q = id("mr2");
    t.submit(q.clone(), spec(&[], 16, true), 0).unwrap();
    t.start_mapreduce(&q, 1, &MemoryBlobs::default());
    let s2 = id("mr2.split");
    t.dispatched(&s2, &agent(1), 2).unwrap();
    ok(&mut t, &s2, b"not json", 3);
    assert!(t.advance(&q, 3, &MemoryBlobs::default()).ended);
    match &t.get(&q).unwrap().outcome {
        Some(Recorded::Failure { message, .. }) => {
            assert!(
                message
                    .as_deref()
                    .unwrap()
                    .contains("split step's output is not a fragment list"),
                "{message:?}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_step_that_fails_for_good_fails_the_job_and_cancels_the_rest() {
    let mut t = JobTable::new(100);
    let p = id("mr");
    t.submit(p.clone(), spec(&["a", "b", "c"], 16, false), 0)
        .unwrap();
    t.start_mapreduce(&p, 1, &MemoryBlobs::default());
    let m1 = id("mr.m1");
    t.dispatched(&id("mr.m0"), &agent(1), 2).unwrap();
    // A transient failure is retried like any job (max_attempts = 2)...
    t.dispatched(&m1, &agent(2), 2).unwrap();
    let e = SpineError::new(Condition::Retryable).with_text("disk full");
    assert!(matches!(
        t.attempt_failed(&m1, Some(&agent(2)), Some(&e), 3),
        Some(AfterFailure::Retry { .. })
    ));
    assert_eq!(
        t.advance(&p, 3, &MemoryBlobs::default()),
        Advance::default()
    );
    // ... and the second failure is final: the job fails and its running steps are cancelled.
    t.dispatched(&m1, &agent(3), 1000).unwrap();
    let e = SpineError::new(Condition::BadArguments).with_text("not UTF-8");
    t.attempt_failed(&m1, Some(&agent(3)), Some(&e), 1001);
    let adv = t.advance(&p, 1001, &MemoryBlobs::default());
    assert!(adv.ended);
    let mut cancel = adv.cancel.clone();
    cancel.sort();
    assert_eq!(cancel, vec![id("mr.m0"), id("mr.m2")]);
    let rec = t.get(&p).unwrap();
    assert_eq!(rec.state, JobState::Failed);
    match &rec.outcome {
        Some(Recorded::Failure {
            condition, message, ..
        }) => {
            assert_eq!(condition.as_str(), "bad-arguments");
            let m = message.as_deref().unwrap();
            assert!(
                m.contains("fragment 1 (mr.m1) failed") && m.contains("not UTF-8"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn straggler_gets_a_copy_elsewhere_and_the_first_result_wins() {
    let mut t = JobTable::new(100);
    let p = id("mr");
    let frags = ["a"; 8];
    t.submit(p.clone(), spec(&frags, 16, false), 0).unwrap();
    t.start_mapreduce(&p, 0, &MemoryBlobs::default());
    let maps: Vec<JobId> = (0..8).map(|i| id(&format!("mr.m{i}"))).collect();
    for m in &maps {
        t.dispatched(m, &agent(1), 0).unwrap();
    }
    t.dispatched(&maps[7], &agent(9), 0).unwrap();
    // Too few siblings finished for a median: no straggler yet.
    ok(&mut t, &maps[0], b"x", 100);
    t.advance(&p, 100, &MemoryBlobs::default());
    assert!(t.stragglers(10_000, 4.0, 2_000).is_empty());
    for m in &maps[1..6] {
        ok(&mut t, m, b"x", 100);
        t.advance(&p, 100, &MemoryBlobs::default());
    }
    // m6 and m7 still run. Under max(4 × 100 ms, 2 s) nothing straggles...
    assert!(t.stragglers(1_999, 4.0, 2_000).is_empty());
    // ... past it both do; speculation off (factor 0) finds none.
    assert!(t.stragglers(5_000, 0.0, 2_000).is_empty());
    let s = t.stragglers(5_000, 4.0, 2_000);
    assert_eq!(s.len(), 2);
    let s7 = s.iter().find(|s| s.job == maps[7]).unwrap().clone();
    assert_eq!(
        (s7.agent.as_str(), s7.running_ms, s7.median_ms),
        ("agent9@localhost/w", 5_000, 100)
    );
    let copy = t.speculate(&s7, 5_000).unwrap();
    assert_eq!(copy, id("mr.m7.b"));
    let c = t.get(&copy).unwrap();
    assert_eq!(c.excluded, vec![agent(9)]);
    assert_eq!(c.spec.input, b"a");
    assert_eq!(c.spec.priority, 1, "ahead of queued siblings");
    assert!(t.speculate(&s7, 5_000).is_none(), "one copy per step");
    assert_eq!(t.stragglers(6_000, 4.0, 2_000).len(), 1, "m7 has its copy");
    // The copy finishes first: it wins and the original is to be cancelled.
    t.dispatched(&copy, &agent(2), 5_010).unwrap();
    ok(&mut t, &copy, b"x", 5_020);
    let adv = t.advance(&p, 5_020, &MemoryBlobs::default());
    assert_eq!(adv.cancel, vec![maps[7].clone()]);
    let st = t.get(&p).unwrap().mr.clone().unwrap();
    assert_eq!(st.levels[0][7].winner, Some(copy.clone()));
    assert_eq!(st.speculative, 1);
    // The original's late result is a duplicate for the step: the winner stays.
    t.cancel_because(&maps[7], "another copy finished first", 5_021)
        .unwrap();
    ok(&mut t, &maps[6], b"x", 6_000);
    let adv = t.advance(&p, 6_000, &MemoryBlobs::default());
    assert_eq!(adv.created, vec![id("mr.r1.0")]);
}

#[test]
fn a_running_map_reduce_survives_a_store_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = spine_dispatcher::store::Store::open(&dir.path().join("jobs.redb")).unwrap();
    let mut t = JobTable::new(100);
    let p = id("mr");
    t.submit(p.clone(), spec(&["a", "b"], 16, false), 0)
        .unwrap();
    t.start_mapreduce(&p, 1, &MemoryBlobs::default());
    t.dispatched(&id("mr.m0"), &agent(1), 2).unwrap();
    t.dispatched(&id("mr.m1"), &agent(1), 2).unwrap();
    ok(&mut t, &id("mr.m0"), b"A", 3);
    t.advance(&p, 3, &MemoryBlobs::default());
    // m1 ended but the crash came before the parent moved on.
    ok(&mut t, &id("mr.m1"), b"B", 4);
    let all: Vec<&JobRecord> = t.iter().collect();
    store.put(&all).unwrap();
    drop(store);

    let store = spine_dispatcher::store::Store::open(&dir.path().join("jobs.redb")).unwrap();
    let mut t2 = JobTable::new(100);
    for r in store.load().unwrap() {
        t2.restore(r);
    }
    assert_eq!(t2.get(&p).unwrap().state, JobState::Running);
    assert_eq!(t2.running_mapreduces(), vec![p.clone()]);
    let adv = t2.advance(&p, 10, &MemoryBlobs::default());
    assert_eq!(adv.created, vec![id("mr.r1.0")]);
    let data: Vec<Vec<u8>> = input_of(&t2, &id("mr.r1.0"))
        .into_iter()
        .map(|f| f.data)
        .collect();
    assert_eq!(data, vec![b"A".to_vec(), b"B".to_vec()]);
}

#[test]
fn bad_fragment_list_is_refused_at_submission() {
    let mut s = spec(&["a"], 16, false);
    s.input = b"[{\"data\": 5}]".to_vec().into();
    let e = s.check_input(&MemoryBlobs::default()).unwrap_err();
    assert_eq!(e.condition, Condition::BadArguments);
    assert_eq!(e.field.as_deref(), Some("input"));
    assert!(e.text.unwrap().contains("not a fragment list"));
    // With a split step the input is anything.
    assert!(spec(&[], 16, true)
        .check_input(&MemoryBlobs::default())
        .is_ok());
}
