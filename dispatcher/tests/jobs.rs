//! The job lifecycle state machine: every transition, driven with plain values and times.

use jid::FullJid;
use spine_dispatcher::jobs::*;
use spine_protocol::{Condition, JobId, JobResult, JobState, SpineError, Strategy};

fn id(s: &str) -> JobId {
    s.parse().unwrap()
}
fn agent(n: u32) -> FullJid {
    format!("agent{n}@localhost/w").parse().unwrap()
}

fn spec(cap: &str, priority: i64) -> JobSpec {
    JobSpec {
        capability: cap.parse().unwrap(),
        strategy: Strategy::LeastLoaded,
        filter: None,
        sort: None,
        affinity_key: None,
        args: Default::default(),
        input: b"in".to_vec().into(),
        input_mime: None,
        deadline_ms: None,
        not_before_ms: None,
        priority,
        max_attempts: 3,
        submitter: "http:test".into(),
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

fn result(job: &str) -> JobResult {
    JobResult {
        job: id(job),
        attempt: 1,
        elapsed_ms: Some(5),
        meta: Default::default(),
        output: None,
    }
}

#[test]
fn queue_order_is_priority_then_fifo_and_bounded() {
    let mut t = JobTable::new(3);
    t.submit(id("a"), spec("c", 0), 1).unwrap();
    t.submit(id("b"), spec("c", 5), 2).unwrap();
    t.submit(id("c"), spec("c", 0), 3).unwrap();
    assert_eq!(
        t.submit(id("d"), spec("c", 9), 4).unwrap_err(),
        SubmitError::QueueFull {
            capability: "c".parse().unwrap(),
            limit: 3
        }
    );
    assert!(
        t.submit(id("d"), spec("other", 0), 4).is_ok(),
        "queues are per capability"
    );
    assert_eq!(
        t.submit(id("a"), spec("c", 0), 5).unwrap_err(),
        SubmitError::Exists(id("a"))
    );
    let cap = "c".parse().unwrap();
    let mut order = Vec::new();
    while let Some(j) = t.next_for(&cap, 10) {
        let jid = j.id.clone();
        order.push(jid.to_string());
        t.dispatched(&jid, &agent(1), 10);
    }
    assert_eq!(order, vec!["b", "a", "c"]);
    assert_eq!(t.queued(&cap), 0);
}

#[test]
fn happy_path_and_duplicate_results() {
    let mut t = JobTable::new(10);
    t.submit(id("j"), spec("c", 0), 1).unwrap();
    assert_eq!(t.get(&id("j")).unwrap().state, JobState::Queued);
    let j = t.dispatched(&id("j"), &agent(1), 2).unwrap();
    assert_eq!(
        (j.state, j.attempts, j.agent.clone()),
        (JobState::Dispatched, 1, Some(agent(1)))
    );
    t.progress(&id("j"), Some(40), 3);
    assert_eq!(
        (
            t.get(&id("j")).unwrap().state,
            t.get(&id("j")).unwrap().percent
        ),
        (JobState::Running, Some(40))
    );
    let j = t
        .succeeded(
            &id("j"),
            &result("j"),
            b"out".to_vec().into(),
            Some("text/plain".into()),
            4,
        )
        .unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert!(
        matches!(&j.outcome, Some(Recorded::Succeeded { output, .. }) if output.inline() == Some(&b"out"[..]))
    );
    assert_eq!(
        t.succeeded(&id("j"), &result("j"), b"other".to_vec().into(), None, 5),
        Err(Duplicate),
        "first outcome wins"
    );
    assert!(
        matches!(&t.get(&id("j")).unwrap().outcome, Some(Recorded::Succeeded { output, .. }) if output.inline() == Some(&b"out"[..]))
    );
    assert_eq!(
        t.cancel(&id("j"), 6),
        Ok(None),
        "cancelling a finished job changes nothing"
    );
    assert_eq!(t.get(&id("j")).unwrap().state, JobState::Succeeded);
}

#[test]
fn transient_failures_retry_with_backoff_elsewhere_then_give_up() {
    let mut t = JobTable::new(10);
    let cap = "c".parse().unwrap();
    t.submit(id("j"), spec("c", 0), 1000).unwrap();
    let busy = SpineError::new(Condition::Retryable).with_text("disk full");
    for attempt in 1..=2u64 {
        t.dispatched(&id("j"), &agent(attempt as u32), 1000);
        let after = t
            .attempt_failed(&id("j"), Some(&agent(attempt as u32)), Some(&busy), 1000)
            .unwrap();
        assert_eq!(
            after,
            AfterFailure::Retry {
                not_before_ms: 1000 + backoff_ms(attempt)
            }
        );
        assert!(t.next_for(&cap, 1000).is_none(), "in backoff");
        assert!(t.next_for(&cap, 1000 + backoff_ms(attempt)).is_some());
    }
    assert!(t.is_excluded(&id("j"), &agent(1).into()) && t.is_excluded(&id("j"), &agent(2).into()));
    t.dispatched(&id("j"), &agent(3), 5000);
    assert_eq!(
        t.attempt_failed(&id("j"), Some(&agent(3)), Some(&busy), 5000),
        Some(AfterFailure::Final(JobState::Failed))
    );
    let j = t.get(&id("j")).unwrap();
    assert_eq!(j.attempts, 3);
    assert!(
        matches!(&j.outcome, Some(Recorded::Failure { condition, message: Some(m), .. }) if condition.as_str() == "retryable" && m.contains("gave up after 3 attempts"))
    );
    assert_eq!(
        t.attempt_failed(&id("j"), Some(&agent(3)), Some(&busy), 5001),
        None,
        "a late report changes nothing"
    );
}

#[test]
fn permanent_failures_end_at_once_and_lost_agents_retry() {
    let mut t = JobTable::new(10);
    t.submit(id("bad"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("bad"), &agent(1), 1);
    let e = SpineError::new(Condition::BadArguments)
        .with_field("width")
        .with_text("must be positive");
    assert_eq!(
        t.attempt_failed(&id("bad"), Some(&agent(1)), Some(&e), 2),
        Some(AfterFailure::Final(JobState::Failed))
    );
    // The agent's field is recorded with the outcome (issue 15, item 5).
    assert_eq!(
        t.get(&id("bad")).unwrap().outcome,
        Some(Recorded::Failure {
            condition: Condition::BadArguments,
            message: Some("must be positive".into()),
            field: Some("width".into()),
        })
    );
    // Outcomes stored before there was a field still load, without one.
    let old: Recorded =
        serde_json::from_str(r#"{"Failure":{"condition":"failed","message":"exit 2"}}"#).unwrap();
    assert_eq!(
        old,
        Recorded::Failure {
            condition: Condition::Failed,
            message: Some("exit 2".into()),
            field: None,
        }
    );

    t.submit(id("lost"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("lost"), &agent(1), 1);
    assert!(matches!(
        t.attempt_failed(&id("lost"), Some(&agent(1)), None, 2),
        Some(AfterFailure::Retry { .. })
    ));
    assert_eq!(t.get(&id("lost")).unwrap().state, JobState::Queued);

    t.submit(id("dl"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("dl"), &agent(1), 1);
    let e = SpineError::new(Condition::DeadlineExceeded);
    assert_eq!(
        t.attempt_failed(&id("dl"), Some(&agent(1)), Some(&e), 2),
        Some(AfterFailure::Final(JobState::TimedOut))
    );
}

#[test]
fn deadlines_cancel_no_agent_and_late_results() {
    let mut t = JobTable::new(10);
    let mut s = spec("c", 0);
    s.deadline_ms = Some(100);
    t.submit(id("q"), s.clone(), 1).unwrap();
    t.submit(id("d"), s.clone(), 1).unwrap();
    t.dispatched(&id("d"), &agent(7), 2);
    assert!(t.expire(99).is_empty());
    let mut expired = t.expire(100);
    expired.sort();
    assert_eq!(expired, vec![(id("d"), Some(agent(7))), (id("q"), None)]);
    assert_eq!(t.get(&id("q")).unwrap().state, JobState::TimedOut);
    assert_eq!(t.queued(&"c".parse().unwrap()), 0);

    // A retry whose deadline passed meanwhile times out instead of queueing.
    t.submit(id("r"), s, 1).unwrap();
    t.dispatched(&id("r"), &agent(1), 50);
    assert_eq!(
        t.attempt_failed(&id("r"), Some(&agent(1)), None, 150),
        Some(AfterFailure::Final(JobState::TimedOut))
    );

    t.submit(id("c1"), spec("c", 0), 1).unwrap();
    assert_eq!(t.cancel(&id("c1"), 2), Ok(None));
    t.submit(id("c2"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("c2"), &agent(2), 2);
    assert_eq!(t.cancel(&id("c2"), 3), Ok(Some(agent(2))));
    assert_eq!(t.get(&id("c2")).unwrap().state, JobState::Cancelled);
    assert_eq!(t.cancel(&id("nope"), 3), Err(UnknownJob(id("nope"))));

    t.submit(id("na"), spec("c", 0), 1).unwrap();
    t.no_agent(&id("na"), 9);
    assert!(
        matches!(&t.get(&id("na")).unwrap().outcome, Some(Recorded::Failure { condition, .. }) if condition.as_str() == "no-agent")
    );

    // A late success of a first attempt while the retry waits in the queue is taken.
    t.submit(id("late"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("late"), &agent(1), 1);
    t.attempt_failed(&id("late"), Some(&agent(1)), None, 2);
    assert!(t
        .succeeded(&id("late"), &result("late"), Default::default(), None, 3)
        .is_ok());
    assert!(t.next_for(&"c".parse().unwrap(), 1_000_000).is_none());
}

#[test]
fn restore_requeues_unfinished_jobs_and_prune_forgets_old_ones() {
    let mut t = JobTable::new(10);
    t.submit(id("a"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("a"), &agent(1), 2);
    t.submit(id("b"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("b"), &agent(1), 2);
    t.succeeded(&id("b"), &result("b"), vec![1].into(), None, 3)
        .unwrap();
    // What the store holds is serde JSON; read it back as a restarted dispatcher would.
    let saved: Vec<String> = ["a", "b"]
        .iter()
        .map(|k| serde_json::to_string(t.get(&id(k)).unwrap()).unwrap())
        .collect();
    let mut t2 = JobTable::new(10);
    for s in &saved {
        t2.restore(serde_json::from_str(s).unwrap());
    }
    assert_eq!(t2.get(&id("a")).unwrap().state, JobState::Queued);
    assert_eq!(t2.get(&id("a")).unwrap().attempts, 1, "attempts survive");
    assert_eq!(t2.get(&id("b")).unwrap().state, JobState::Succeeded);
    assert_eq!(
        t2.next_for(&"c".parse().unwrap(), 10)
            .map(|j| j.id.to_string()),
        Some("a".into())
    );
    assert_eq!(
        t2.submit(id("new"), spec("c", 0), 11).unwrap().seq,
        3,
        "sequence continues after restore"
    );
    assert_eq!(t2.prune(1_000_000, 60_000), vec![id("b")]);
    assert!(t2.get(&id("b")).is_none());
}

#[test]
fn backoff_doubles_and_caps() {
    assert_eq!(
        (backoff_ms(1), backoff_ms(2), backoff_ms(3)),
        (200, 400, 800)
    );
    assert_eq!(backoff_ms(40), 10_000);
}

#[test]
fn refusals_requeue_without_burning_attempts() {
    let mut t = JobTable::new(10);
    t.submit(id("r"), spec("c", 0), 1).unwrap();
    for _ in 0..5 {
        t.dispatched(&id("r"), &agent(1), 2);
        assert!(t.refused(&id("r"), 2));
    }
    let j = t.get(&id("r")).unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0));
    assert!(
        !t.is_excluded(&id("r"), &agent(1).into()),
        "a busy agent is not excluded"
    );
    assert!(
        t.next_for(&"c".parse().unwrap(), 2).is_none(),
        "a short pause first"
    );
    assert!(t.next_for(&"c".parse().unwrap(), 60).is_some());
    assert!(
        !t.refused(&id("r"), 3),
        "only a dispatched job can be refused"
    );
}

#[test]
fn restored_jobs_resume_on_their_agent_with_the_same_attempt() {
    let mut t = JobTable::new(10);
    t.submit(id("a"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("a"), &agent(1), 2);
    t.submit(id("b"), spec("c", 0), 1).unwrap();
    t.dispatched(&id("b"), &agent(1), 2);
    let saved: Vec<String> = ["a", "b"]
        .iter()
        .map(|k| serde_json::to_string(t.get(&id(k)).unwrap()).unwrap())
        .collect();
    let mut t2 = JobTable::new(10);
    for s in &saved {
        t2.restore(serde_json::from_str(s).unwrap());
    }
    assert!(t2.get(&id("a")).unwrap().resume);
    assert_eq!(
        t2.dispatched(&id("a"), &agent(1), 3).unwrap().attempts,
        1,
        "same agent: same attempt"
    );
    assert_eq!(
        t2.dispatched(&id("b"), &agent(2), 3).unwrap().attempts,
        2,
        "another agent: a new attempt"
    );
    assert!(!t2.get(&id("b")).unwrap().resume);
}

#[test]
fn a_filter_is_kept_parsed_and_stored_as_its_text() {
    let mut s = spec("c.x", 0);
    s.filter = Some("zone in (eu-1,eu-2), gpu".parse().unwrap());
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["filter"], "zone in (eu-1,eu-2), gpu");
    let back: JobSpec = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back.filter, s.filter);
    // A record whose filter text does not parse is refused with the reason.
    let mut bad = json;
    bad["filter"] = "zone in (eu-1".into();
    let e = serde_json::from_value::<JobSpec>(bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zone") || e.contains(")"), "{e}");
}
