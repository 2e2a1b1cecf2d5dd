//! The agent's core driven with plain `#[test]`s at fixed times, asserting on its effects:
//! no connection, no handler runs, no clock.

use super::*;
use crate::handler::Output;
use file_outputs::FILE_TRANSFERS;
use sha2::{Digest, Sha256};
use spine_protocol::{
    chunks, AgentState, BlobId, BlobRef, Chunk, ProtocolVersion, RequestSlot, Slot,
};

const DISPATCHER: &str = "dispatcher@localhost/d1";
const OTHER_DISPATCHER: &str = "backup@localhost/d2";
const MS: Duration = Duration::from_millis(1);

fn jid(s: &str) -> Jid {
    s.parse().expect("valid JID")
}

fn job_id(s: &str) -> JobId {
    s.parse().expect("valid job id")
}

fn cap(s: &str) -> CapabilityName {
    s.parse().expect("valid capability name")
}

/// A core with `slots` slots serving two dispatchers, offering `test.echo` (no slots of its
/// own) and `test.one` (one slot), its session started at `t0`, the start's effects taken.
fn core(slots: u64, t0: Instant) -> Core {
    let config = AgentConfig {
        slots,
        ..AgentConfig::default()
    };
    let mut caps = BTreeMap::new();
    caps.insert(cap("test.echo"), CapabilityAd::new(cap("test.echo")));
    let mut one = CapabilityAd::new(cap("test.one"));
    one.slots = Some(1);
    caps.insert(cap("test.one"), one);
    let dispatchers = vec![jid(DISPATCHER).to_bare(), jid(OTHER_DISPATCHER).to_bare()];
    let mut c = Core::new(&config, dispatchers, caps, Attributes::new(), 7, t0);
    c.session_started(t0);
    c.take_ready();
    c
}

fn job(id: &str, capability: &str) -> Job {
    Job::new(job_id(id), cap(capability))
}

fn send_job(c: &mut Core, from: &str, iq: &str, j: Job, now: Instant) -> Ready {
    c.stanza(Iq::from_set(iq, j).with_from(jid(from)).into(), now);
    c.take_ready()
}

fn send_set(c: &mut Core, iq: &str, p: impl xmpp_parsers::iq::IqSetPayload, now: Instant) -> Ready {
    c.stanza(Iq::from_set(iq, p).with_from(jid(DISPATCHER)).into(), now);
    c.take_ready()
}

fn done(id: &str, result: Result<Output, SpineError>) -> Done {
    Done {
        id: job_id(id),
        attempt: 1,
        result,
        elapsed: Duration::from_millis(20),
        work: None,
        files: Vec::new(),
    }
}

fn iqs(r: &Ready) -> Vec<&Iq> {
    r.out
        .iter()
        .filter_map(|o| match o {
            Out::Stanza(Stanza::Iq(iq)) => Some(iq),
            _ => None,
        })
        .collect()
}

/// The answer to IQ `id`: Ok(payload of a result) or Err(the Spine error).
fn answer(r: &Ready, id: &str) -> Option<Result<Option<minidom::Element>, SpineError>> {
    iqs(r).into_iter().find_map(|iq| match iq {
        Iq::Result { id: i, payload, .. } if i == id => Some(Ok(payload.clone())),
        Iq::Error { id: i, error, .. } if i == id => {
            Some(Err(SpineError::from_stanza_error(error)
                .expect("valid condition")
                .expect("a Spine condition")))
        }
        _ => None,
    })
}

fn result_of(r: &Ready, id: &str) -> JobResult {
    let payload = answer(r, id)
        .expect("an answer")
        .expect("a result")
        .expect("a payload");
    JobResult::try_from(payload).expect("a job result")
}

fn condition_of(r: &Ready, id: &str) -> Condition {
    answer(r, id)
        .expect("an answer")
        .expect_err("an error")
        .condition
}

fn loads(r: &Ready) -> Vec<(Jid, &Load, bool)> {
    r.out
        .iter()
        .filter_map(|o| match o {
            Out::Load {
                to,
                advertise,
                load,
            } => Some((to.clone(), load, advertise.is_some())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_session_start_advertises_to_every_dispatcher() {
    let t0 = Instant::now();
    let config = AgentConfig::default();
    let mut c = Core::new(
        &config,
        vec![jid(DISPATCHER).to_bare(), jid(OTHER_DISPATCHER).to_bare()],
        BTreeMap::from([(cap("test.echo"), CapabilityAd::new(cap("test.echo")))]),
        Attributes::new(),
        7,
        t0,
    );
    c.session_started(t0);
    let r = c.take_ready();
    assert!(matches!(&r.out[0], Out::Stanza(Stanza::Presence(p)) if p.to.is_none()));
    let l = loads(&r);
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].0, Jid::from(jid(DISPATCHER).to_bare()));
    assert!(l[0].2 && l[1].2, "each load goes with the advertisement");
    assert_eq!((l[0].1.seq, l[1].1.seq), (1, 2));
    assert_eq!(l[0].1.state, AgentState::Ready);
    // The heartbeat starts at half a second after a session start.
    assert_eq!(c.poll_timeout(), t0 + 500 * MS);
}

#[test]
fn a_job_from_a_jid_that_is_not_a_dispatcher_is_refused() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let r = send_job(
        &mut c,
        "intruder@localhost/x",
        "j1",
        job("a", "test.echo"),
        t0,
    );
    assert_eq!(condition_of(&r, "j1"), Condition::NotAuthorized);
    assert!(r.starts.is_empty());
    assert_eq!(c.running(), 0);
}

/// The start notifications (progress `percent='0'`, "started") in `r`, with their
/// recipient and job.
fn start_notices(r: &Ready) -> Vec<(Jid, String)> {
    r.out
        .iter()
        .filter_map(|o| match o {
            Out::Stanza(Stanza::Message(m)) => Progress::try_from(m.payloads[0].clone())
                .ok()
                .filter(|p| p.percent == Some(0) && p.message.as_deref() == Some("started"))
                .map(|p| (m.to.clone().expect("to"), p.job.to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_starts_with_its_deadline_a_load_report_and_a_held_start_notification() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let mut j = job("a", "test.echo");
    j.progress = true;
    j.deadline_ms = Some(1500);
    j.args.0.insert("n".into(), 3.into());
    j.input = Some(Data::Inline {
        mime: Some("text/plain".into()),
        bytes: b"hi".to_vec(),
    });
    let now = t0 + Duration::from_secs(1);
    let r = send_job(&mut c, DISPATCHER, "j1", j, now);
    assert_eq!(r.starts.len(), 1);
    let s = &r.starts[0];
    assert_eq!((s.id.as_str(), s.attempt), ("a", 1));
    assert_eq!(s.deadline, Some(now + 1500 * MS));
    assert_eq!(s.input, b"hi");
    assert_eq!(s.input_mime.as_deref(), Some("text/plain"));
    assert_eq!(s.args.get("n"), Some(&serde_json::json!(3)));
    // No answer yet, a load report per dispatcher, and the start notification held back.
    assert!(answer(&r, "j1").is_none());
    assert_eq!(r.out.len(), 2);
    let l = loads(&r);
    assert_eq!(l.len(), 2);
    assert_eq!((l[0].1.in_flight, l[0].1.yours), (1, 1));
    assert_eq!((l[1].1.in_flight, l[1].1.yours), (1, 0));
    // The job still runs when the hold is over: the notification goes to its dispatcher.
    assert!(c.poll_timeout() <= now + START_NOTICE_HOLD);
    c.tick(now + START_NOTICE_HOLD - MS);
    assert!(start_notices(&c.take_ready()).is_empty());
    c.tick(now + START_NOTICE_HOLD);
    let r = c.take_ready();
    assert_eq!(start_notices(&r), [(jid(DISPATCHER), "a".to_owned())]);
    assert_eq!(r.out.len(), 1);
    assert!(c.poll_timeout() > now + START_NOTICE_HOLD);
    c.tick(now + 2 * START_NOTICE_HOLD);
    assert!(start_notices(&c.take_ready()).is_empty());
}

#[test]
fn a_job_that_ends_within_the_hold_is_reported_by_its_outcome_alone() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let mut j = job("a", "test.echo");
    j.progress = true;
    send_job(&mut c, DISPATCHER, "j1", j, t0);
    c.job_done(done("a", Ok(Output::bytes("out"))), t0 + MS);
    let r = c.take_ready();
    assert_eq!(result_of(&r, "j1").job.as_str(), "a");
    assert!(start_notices(&r).is_empty());
    // Nothing is held any more: no timer for it, nothing sent when it would have been due.
    assert!(c.poll_timeout() > t0 + START_NOTICE_HOLD);
    c.tick(t0 + START_NOTICE_HOLD);
    assert!(start_notices(&c.take_ready()).is_empty());
    // Not asked for progress: never a notification.
    send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0 + 2 * MS);
    c.tick(t0 + 2 * MS + START_NOTICE_HOLD);
    assert!(start_notices(&c.take_ready()).is_empty());
}

#[test]
fn a_held_start_notification_goes_before_the_handlers_report_and_a_delayed_outcome() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let mut j = job("a", "test.echo");
    j.progress = true;
    send_job(&mut c, DISPATCHER, "j1", j, t0);
    c.report(
        job_id("a"),
        1,
        Report::Progress {
            percent: Some(30),
            message: None,
        },
    );
    let r = c.take_ready();
    assert_eq!(start_notices(&r), [(jid(DISPATCHER), "a".to_owned())]);
    assert_eq!(
        r.out.len(),
        2,
        "the notification, then the handler's progress"
    );
    c.tick(t0 + START_NOTICE_HOLD);
    assert!(start_notices(&c.take_ready()).is_empty(), "sent once");

    // An output too large to answer inline waits for its upload: the start is reported
    // before that wait.
    let mut j = job("b", "test.echo");
    j.progress = true;
    send_job(&mut c, DISPATCHER, "j2", j, t0 + MS);
    let big = vec![b'x'; INLINE_LIMIT + 1];
    c.job_done(done("b", Ok(Output::bytes(big))), t0 + 2 * MS);
    let r = c.take_ready();
    assert!(answer(&r, "j2").is_none());
    assert_eq!(start_notices(&r), [(jid(DISPATCHER), "b".to_owned())]);
}

#[test]
fn a_repeated_job_id_attaches_to_the_running_job() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    assert_eq!(
        send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0)
            .starts
            .len(),
        1
    );
    let r = send_job(&mut c, DISPATCHER, "j2", job("a", "test.echo"), t0 + MS);
    assert!(r.starts.is_empty() && r.out.is_empty(), "{r:?}");
    c.job_done(done("a", Ok(Output::bytes("out"))), t0 + 10 * MS);
    let r = c.take_ready();
    for iq in ["j1", "j2"] {
        let res = result_of(&r, iq);
        assert_eq!(res.job.as_str(), "a");
        assert_eq!(res.elapsed_ms, Some(20));
        assert_eq!(
            res.output,
            Some(Data::Inline {
                mime: None,
                bytes: b"out".to_vec()
            })
        );
    }
}

/// `<recall/>` from a dispatcher, answered.
fn recall(c: &mut Core, from: &str, iq: &str, now: Instant) -> Ready {
    c.stanza(
        Iq::from_get(iq, spine_protocol::Recall)
            .with_from(jid(from))
            .into(),
        now,
    );
    c.take_ready()
}

#[test]
fn a_new_leader_learns_which_of_its_accounts_jobs_the_agent_has() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    // Finished, running, and a later attempt of a job sent again; one from another account.
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    c.job_done(done("a", Ok(Output::bytes("out"))), t0 + MS);
    c.take_ready();
    send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0 + 2 * MS);
    let mut again = job("c", "test.echo");
    send_job(&mut c, DISPATCHER, "j3", again.clone(), t0 + 3 * MS);
    again.attempt = 2;
    send_job(&mut c, DISPATCHER, "j4", again, t0 + 4 * MS);
    send_job(
        &mut c,
        OTHER_DISPATCHER,
        "j5",
        job("d", "test.echo"),
        t0 + 5 * MS,
    );

    // Another resource of the account asks (a standby that now leads): newest first.
    let r = recall(&mut c, "dispatcher@localhost/d2", "r1", t0 + 6 * MS);
    let payload = answer(&r, "r1")
        .expect("an answer")
        .expect("a result")
        .expect("a payload");
    let had = spine_protocol::Recalled::try_from(payload).expect("a <recalled>");
    let got: Vec<(&str, u64)> = had
        .jobs
        .iter()
        .map(|h| (h.job.as_str(), h.attempt))
        .collect();
    assert_eq!(got, vec![("c", 2), ("b", 1), ("a", 1)]);

    let r = recall(&mut c, OTHER_DISPATCHER, "r2", t0 + 7 * MS);
    let payload = answer(&r, "r2")
        .expect("an answer")
        .expect("a result")
        .expect("a payload");
    let had = spine_protocol::Recalled::try_from(payload).expect("a <recalled>");
    assert_eq!(had.jobs.len(), 1);
    assert_eq!(had.jobs[0].job.as_str(), "d");

    // Nobody else may ask.
    let r = recall(&mut c, "stranger@localhost/x", "r3", t0 + 8 * MS);
    assert_eq!(condition_of(&r, "r3"), Condition::NotAuthorized);
}

#[test]
fn a_finished_jobs_repeat_is_answered_from_the_cache_but_a_retryable_one_runs_again() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0);
    c.job_done(done("a", Ok(Output::bytes("once"))), t0 + MS);
    let e = SpineError::new(Condition::Retryable).with_text("transient");
    c.job_done(done("b", Err(e)), t0 + MS);
    let r = c.take_ready();
    assert_eq!(condition_of(&r, "j2"), Condition::Retryable);

    let r = send_job(&mut c, DISPATCHER, "j3", job("a", "test.echo"), t0 + 2 * MS);
    assert!(r.starts.is_empty());
    assert_eq!(
        result_of(&r, "j3").output,
        Some(Data::Inline {
            mime: None,
            bytes: b"once".to_vec()
        })
    );
    let mut again = job("b", "test.echo");
    again.attempt = 2;
    let r = send_job(&mut c, DISPATCHER, "j4", again, t0 + 2 * MS);
    assert_eq!(r.starts.len(), 1, "a retryable outcome is not cached");
    assert_eq!(r.starts[0].attempt, 2);
}

#[test]
fn busy_when_the_agents_or_the_capabilitys_slots_are_full() {
    let t0 = Instant::now();
    let mut c = core(2, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.one"), t0);
    // test.one has one slot of its own.
    let r = send_job(&mut c, DISPATCHER, "j2", job("b", "test.one"), t0);
    assert_eq!(condition_of(&r, "j2"), Condition::Busy);
    let r = send_job(&mut c, DISPATCHER, "j3", job("c", "test.echo"), t0);
    assert_eq!(r.starts.len(), 1);
    // Both agent slots taken.
    let r = send_job(&mut c, DISPATCHER, "j4", job("d", "test.echo"), t0);
    assert!(r.starts.is_empty());
    let Some(Err(e)) = answer(&r, "j4") else {
        panic!("expected a refusal");
    };
    assert_eq!(e.condition, Condition::Busy);
    assert_eq!(e.text.as_deref(), Some("all 2 slots are busy"));
    // A slot is free again once the job's end is taken.
    c.job_done(done("c", Ok(Output::default())), t0 + MS);
    c.take_ready();
    let r = send_job(&mut c, DISPATCHER, "j5", job("d", "test.echo"), t0 + MS);
    assert_eq!(r.starts.len(), 1);
}

#[test]
fn unknown_capability_and_too_large_input_are_refused() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let r = send_job(&mut c, DISPATCHER, "j1", job("a", "test.none"), t0);
    assert_eq!(condition_of(&r, "j1"), Condition::UnknownCapability);
    let mut j = job("b", "test.echo");
    j.input = Some(Data::Blob(BlobRef {
        blob: "in-1".parse().expect("blob id"),
        size: u64::MAX,
        sha256: [0; 32],
        mime: None,
    }));
    let r = send_job(&mut c, DISPATCHER, "j2", j, t0);
    assert_eq!(condition_of(&r, "j2"), Condition::TooLarge);
    assert_eq!(c.running(), 0);
}

#[test]
fn an_input_blob_is_assembled_from_chunks_then_given_to_the_job() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let input: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
    let blob: BlobId = "in-1".parse().expect("blob id");
    for (i, ch) in chunks(&blob, &input).into_iter().enumerate() {
        let iq = format!("c{i}");
        let r = send_set(&mut c, &iq, ch, t0);
        assert_eq!(answer(&r, &iq), Some(Ok(None)));
    }
    let mut j = job("a", "test.echo");
    j.input = Some(Data::Blob(BlobRef {
        blob,
        size: input.len() as u64,
        sha256: Sha256::digest(&input).into(),
        mime: Some("application/octet-stream".into()),
    }));
    let r = send_job(&mut c, DISPATCHER, "j1", j, t0);
    assert_eq!(r.starts.len(), 1);
    assert_eq!(r.starts[0].input, input);
}

#[test]
fn draining_refuses_new_work_and_leaves_when_the_last_job_ends() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    c.shutdown(t0 + MS);
    let r = c.take_ready();
    let l = loads(&r);
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|(_, l, _)| l.state == AgentState::Draining));
    assert!(!c.is_serving() && !c.is_gone());
    let r = send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0 + 2 * MS);
    assert_eq!(condition_of(&r, "j2"), Condition::Draining);
    // The running job still reports its outcome; then the agent goes unavailable.
    c.job_done(done("a", Ok(Output::bytes("x"))), t0 + 3 * MS);
    let r = c.take_ready();
    assert_eq!(result_of(&r, "j1").job.as_str(), "a");
    assert!(matches!(
        r.out.last(),
        Some(Out::Stanza(Stanza::Presence(p))) if p.type_ == PresenceType::Unavailable
    ));
    assert!(c.is_gone());
}

#[test]
fn the_drain_grace_stops_running_jobs_and_the_stop_grace_ends_the_wait() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    c.shutdown(t0);
    c.take_ready();
    let grace = AgentConfig::default().drain_grace;
    assert!(c.poll_timeout() <= t0 + grace);
    c.tick(t0 + grace);
    assert_eq!(c.take_ready().stops, vec![Stop::All]);
    assert!(c.poll_timeout() <= t0 + grace + STOP_GRACE);
    c.tick(t0 + grace + STOP_GRACE);
    assert!(c.is_gone());
}

#[test]
fn shutdown_with_nothing_running_leaves_at_once() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    c.shutdown(t0);
    assert!(c.is_gone());
}

#[test]
fn an_operator_drain_refuses_new_jobs_finishes_running_ones_and_keeps_the_agent() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    let drain = spine_protocol::Drain {
        reason: Some("rack 4".into()),
    };
    let r = send_set(&mut c, "d1", drain, t0 + MS);
    // Kept first, then a draining load to every dispatcher (not debounced), then the answer.
    assert_eq!(
        r.save,
        Some(Drained {
            drained: true,
            reason: Some("rack 4".into())
        })
    );
    let l = loads(&r);
    assert_eq!(l.len(), 2, "every dispatcher hears of it");
    assert!(l
        .iter()
        .all(|(_, load, _)| load.state == AgentState::Draining));
    let answered_at = r
        .out
        .iter()
        .position(|o| matches!(o, Out::Stanza(Stanza::Iq(_))))
        .expect("an answer");
    let last_load = r
        .out
        .iter()
        .rposition(|o| matches!(o, Out::Load { .. }))
        .expect("loads");
    assert!(last_load < answered_at, "the loads leave before the answer");
    assert_eq!(answer(&r, "d1"), Some(Ok(None)));
    assert!(r.stops.is_empty(), "running jobs continue");
    // A new job is refused; the running one finishes and is answered.
    let r = send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0 + 2 * MS);
    assert_eq!(condition_of(&r, "j2"), Condition::Draining);
    c.job_done(done("a", Ok(Output::default())), t0 + 3 * MS);
    let r = c.take_ready();
    assert_eq!(result_of(&r, "j1").job, job_id("a"));
    // Nothing running, yet the agent stays: a drain is not a shutdown.
    assert!(!c.is_gone() && c.is_serving() && c.is_drained());
    c.tick(t0 + Duration::from_secs(3600));
    assert!(!c.is_gone());
    assert!(c
        .take_ready()
        .out
        .iter()
        .all(|o| !matches!(o, Out::Load { load, .. } if load.state == AgentState::Ready)));
    // Undrain: ready again, told at once, and the next job runs.
    let r = send_set(
        &mut c,
        "u1",
        spine_protocol::Undrain,
        t0 + Duration::from_secs(3601),
    );
    assert_eq!(
        r.save,
        Some(Drained {
            drained: false,
            reason: None
        })
    );
    assert!(loads(&r)
        .iter()
        .all(|(_, load, _)| load.state == AgentState::Ready));
    assert_eq!(answer(&r, "u1"), Some(Ok(None)));
    let r = send_job(
        &mut c,
        DISPATCHER,
        "j3",
        job("c", "test.echo"),
        t0 + Duration::from_secs(3602),
    );
    assert_eq!(r.starts.len(), 1);
    // A shutdown still drains and ends the agent, drained or not; an undrain cannot stop it.
    c.shutdown(t0 + Duration::from_secs(3603));
    assert!(!c.is_serving());
    let r = send_set(
        &mut c,
        "u2",
        spine_protocol::Undrain,
        t0 + Duration::from_secs(3604),
    );
    assert_eq!(condition_of(&r, "u2"), Condition::Draining);
    assert!(r.save.is_none());
}

#[test]
fn a_drain_from_a_stranger_is_refused_and_changes_nothing() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    c.stanza(
        Iq::from_set("x1", spine_protocol::Drain::default())
            .with_from(jid("mallory@localhost/laptop"))
            .into(),
        t0,
    );
    let r = c.take_ready();
    assert_eq!(condition_of(&r, "x1"), Condition::NotAuthorized);
    assert!(r.save.is_none() && loads(&r).is_empty());
    assert!(!c.is_drained());
}

#[test]
fn an_agent_drained_before_its_start_advertises_draining_and_refuses_jobs() {
    let t0 = Instant::now();
    let config = AgentConfig::default();
    let mut c = Core::new(
        &config,
        vec![jid(DISPATCHER).to_bare()],
        BTreeMap::from([(cap("test.echo"), CapabilityAd::new(cap("test.echo")))]),
        Attributes::new(),
        7,
        t0,
    )
    .with_drained(Some("rack 4".into()));
    c.session_started(t0);
    let r = c.take_ready();
    assert!(loads(&r)
        .iter()
        .all(|(_, load, ad)| *ad && load.state == AgentState::Draining));
    let r = send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    let e = answer(&r, "j1").unwrap().unwrap_err();
    assert_eq!(e.condition, Condition::Draining);
    assert_eq!(
        e.text.as_deref(),
        Some("agent is drained by an operator: rack 4")
    );
}

#[test]
fn a_cancel_stops_the_right_job() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    send_job(&mut c, DISPATCHER, "j1", job("a", "test.echo"), t0);
    send_job(&mut c, DISPATCHER, "j2", job("b", "test.echo"), t0);
    let r = send_set(&mut c, "x1", Cancel { job: job_id("b") }, t0);
    assert_eq!(r.stops, vec![Stop::Job(job_id("b"))]);
    assert_eq!(answer(&r, "x1"), Some(Ok(None)));
    // The supervisor reports the cancelled handler's end.
    let e = SpineError::new(Condition::Cancelled).with_text("cancelled by the dispatcher");
    c.job_done(done("b", Err(e)), t0 + MS);
    let r = c.take_ready();
    assert_eq!(condition_of(&r, "j2"), Condition::Cancelled);
    assert_eq!(c.running(), 1);
    // Cancelling again is a no-op; an unknown job is an error.
    let r = send_set(&mut c, "x2", Cancel { job: job_id("b") }, t0 + MS);
    assert!(r.stops.is_empty());
    assert_eq!(answer(&r, "x2"), Some(Ok(None)));
    let r = send_set(&mut c, "x3", Cancel { job: job_id("zz") }, t0 + MS);
    assert_eq!(condition_of(&r, "x3"), Condition::UnknownJob);
}

#[test]
fn progress_goes_only_where_asked_and_for_the_running_attempt() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let mut j = job("p", "test.echo");
    j.progress = true;
    send_job(&mut c, DISPATCHER, "j1", j, t0);
    send_job(&mut c, DISPATCHER, "j2", job("q", "test.echo"), t0);
    let progress = || Report::Progress {
        percent: Some(50),
        message: Some("half".into()),
    };
    c.report(job_id("q"), 1, progress());
    c.report(job_id("p"), 2, progress());
    assert!(c.take_ready().out.is_empty());
    c.report(job_id("p"), 1, progress());
    for _ in 0..2 {
        c.report(
            job_id("p"),
            1,
            Report::Partial {
                mime: None,
                bytes: b"x".to_vec(),
            },
        );
    }
    let r = c.take_ready();
    // The held start notification, then the progress and the two partials.
    assert_eq!(r.out.len(), 4);
    assert_eq!(start_notices(&r), [(jid(DISPATCHER), "p".to_owned())]);
    let seqs: Vec<u64> = r
        .out
        .iter()
        .filter_map(|o| match o {
            Out::Stanza(Stanza::Message(m)) => Partial::try_from(m.payloads[0].clone()).ok(),
            _ => None,
        })
        .map(|p| p.seq)
        .collect();
    assert_eq!(seqs, [0, 1]);
}

#[test]
fn disco_info_is_answered_for_anyone_and_other_gets_are_refused() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    let get = Iq::from_get("d1", xmpp_parsers::disco::DiscoInfoQuery { node: None })
        .with_from(jid("someone@localhost/x"));
    c.stanza(get.into(), t0);
    let r = c.take_ready();
    let info = xmpp_parsers::disco::DiscoInfoResult::try_from(
        answer(&r, "d1")
            .expect("answer")
            .expect("result")
            .expect("payload"),
    )
    .expect("disco info");
    let caps = spine_protocol::disco::capabilities_in(&info);
    assert_eq!(
        caps.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        ["test.echo", "test.one"]
    );
    let ping = Iq::from_get("p1", xmpp_parsers::ping::Ping).with_from(jid(DISPATCHER));
    c.stanza(ping.into(), t0);
    let r = c.take_ready();
    assert!(matches!(iqs(&r)[..], [Iq::Error { .. }]));
}

mod events;
mod references;
mod uploads_and_loads;

/// The core after `test.echo` job `id` ran on a dispatcher that said hello with protocol 1.1,
/// its handler ended with `n` fragment files of 100,000 bytes each (over the inline limit together) (file `i` hashed as `[i; 32]`).
fn files_done(n: usize, t0: Instant) -> (Core, Ready) {
    let mut c = core(4, t0);
    let hello = Presence::available()
        .with_from(jid(DISPATCHER))
        .with_payload(spine_protocol::DispatcherHello {
            protocol: ProtocolVersion::V1_1,
        });
    c.stanza(hello.into(), t0);
    c.take_ready();
    send_job(&mut c, DISPATCHER, "j1", job("f1", "test.echo"), t0);
    let files = (0..n)
        .map(|i| OutFile {
            // Never created: deleting a missing file is fine.
            path: std::env::temp_dir().join(format!("spine-core-test-{i}-does-not-exist")),
            name: Some(format!("part-{i}")),
            mime: Some("text/plain".into()),
            size: 100_000,
            sha256: [i as u8; 32],
        })
        .collect();
    let mut d = done("f1", Ok(Output::fragment_files(Vec::new())));
    if let Ok(o) = &mut d.result {
        o.bytes.clear();
    }
    d.files = files;
    c.job_done(d, t0);
    let r = c.take_ready();
    (c, r)
}

/// The slot requests in `r`: (IQ id, request).
fn slot_requests(r: &Ready) -> Vec<(String, RequestSlot)> {
    iqs(r)
        .into_iter()
        .filter_map(|iq| match iq {
            Iq::Get { id, payload, .. } => {
                Some((id.clone(), RequestSlot::try_from(payload.clone()).ok()?))
            }
            _ => None,
        })
        .collect()
}

fn grant(c: &mut Core, iq: &str, n: u8, now: Instant) -> Ready {
    let slot = Slot {
        job: job_id("f1"),
        put: format!("http://127.0.0.1:1/v1/uploads/f1?n={n}"),
        expires_ms: 60_000,
    };
    c.stanza(
        Iq::from_result(iq, Some(slot))
            .with_from(jid(DISPATCHER))
            .into(),
        now,
    );
    c.take_ready()
}

#[test]
fn fragment_files_go_to_a_slot_each_four_at_a_time_and_the_result_names_them() {
    let t0 = Instant::now();
    let (mut c, r) = files_done(6, t0);
    let reqs = slot_requests(&r);
    assert_eq!(reqs.len(), FILE_TRANSFERS, "four files in flight at most");
    assert_eq!(reqs[1].1.sha256, [1; 32]);
    assert_eq!((reqs[1].1.size, reqs[1].1.attempt), (100_000, 1));
    assert!(answer(&r, "j1").is_none(), "no result before the uploads");
    let mut puts = Vec::new();
    for (i, (iq, _)) in reqs.iter().enumerate() {
        let r = grant(&mut c, iq, i as u8, t0);
        let [p] = <[FilePut; 1]>::try_from(r.file_puts).unwrap();
        assert_eq!(p.size, 100_000);
        puts.push(p);
    }
    // One upload done: the fifth file's slot is asked for.
    c.file_put_done(puts[0].key, Ok(()), t0);
    let reqs2 = slot_requests(&c.take_ready());
    assert_eq!(reqs2.len(), 1);
    assert_eq!(reqs2[0].1.sha256, [4; 32]);
    for p in &puts[1..] {
        c.file_put_done(p.key, Ok(()), t0);
    }
    let reqs3 = slot_requests(&c.take_ready());
    assert_eq!(reqs3.len(), 1, "the sixth");
    for (iq, _) in reqs2.iter().chain(&reqs3) {
        let r = grant(&mut c, iq, 9, t0);
        for p in r.file_puts {
            c.file_put_done(p.key, Ok(()), t0);
        }
    }
    let r = c.take_ready();
    let res = result_of(&r, "j1");
    let Some(Data::Inline { mime, bytes }) = res.output else {
        panic!("{:?}", res.output)
    };
    assert_eq!(mime.as_deref(), Some(spine_protocol::FRAGMENTS_MIME));
    let list = spine_protocol::fragments::decode(&bytes).unwrap();
    assert_eq!(list.len(), 6);
    for (i, f) in list.iter().enumerate() {
        let s = f.source.as_ref().expect("by reference");
        assert_eq!((s.sha256, s.size), ([i as u8; 32], 100_000));
        assert_eq!(f.name, Some(format!("part-{i}")));
        assert!(f.data.is_empty());
    }
    assert!(
        r.cleanups
            .iter()
            .any(|c| matches!(c, Cleanup::Files(f) if f.len() == 6)),
        "the files are deleted"
    );
}

#[test]
fn a_refused_slot_sends_the_fragment_files_inline() {
    let t0 = Instant::now();
    let (mut c, r) = files_done(3, t0);
    let reqs = slot_requests(&r);
    let r = grant(&mut c, &reqs[0].0, 0, t0);
    assert_eq!(r.file_puts.len(), 1);
    let put_key = r.file_puts[0].key;
    let refusal = Iq::from_error(
        reqs[1].0.clone(),
        StanzaError::from(SpineError::new(Condition::TooLarge).with_text("no")),
    )
    .with_from(jid(DISPATCHER));
    c.stanza(refusal.into(), t0);
    let r = c.take_ready();
    assert_eq!(r.aborts, vec![put_key], "the running upload is stopped");
    let [inline] = <[InlineFiles; 1]>::try_from(r.inlines).unwrap();
    assert_eq!(inline.files.len(), 3);
    // A late answer to the third request changes nothing.
    assert!(grant(&mut c, &reqs[2].0, 2, t0).file_puts.is_empty());
    let list = spine_protocol::fragments::encode(&[spine_protocol::Fragment::new(b"x".to_vec())]);
    c.files_inlined(inline.key, Ok(list.clone()), t0);
    let res = result_of(&c.take_ready(), "j1");
    assert_eq!(
        res.output,
        Some(Data::Inline {
            mime: Some(spine_protocol::FRAGMENTS_MIME.into()),
            bytes: list
        })
    );
}

#[test]
fn fragment_files_over_max_input_size_without_http_fail_naming_the_limit() {
    let t0 = Instant::now();
    let mut c = core(4, t0);
    c.settings.http_data = false;
    c.settings.max_input_size = 250_000;
    send_job(&mut c, DISPATCHER, "j1", job("f1", "test.echo"), t0);
    let mut d = done("f1", Ok(Output::default()));
    d.files = (0..3)
        .map(|i| OutFile {
            path: std::env::temp_dir().join(format!("spine-core-test-big-{i}-does-not-exist")),
            name: None,
            mime: None,
            size: 100_000,
            sha256: [0; 32],
        })
        .collect();
    c.job_done(d, t0);
    let r = c.take_ready();
    assert!(r.inlines.is_empty());
    let e = answer(&r, "j1").unwrap().unwrap_err();
    assert_eq!(e.condition, Condition::Failed);
    let text = e.text.unwrap_or_default();
    assert!(text.contains("max_input_size (250000)"), "{text}");
    assert!(text.contains("http_data is off"), "{text}");
}

#[test]
fn a_cancel_while_fragment_files_upload_stops_them_and_deletes_the_files() {
    let t0 = Instant::now();
    let (mut c, r) = files_done(6, t0);
    let reqs = slot_requests(&r);
    let put = grant(&mut c, &reqs[0].0, 0, t0).file_puts.remove(0);
    let r = send_set(&mut c, "x1", Cancel { job: job_id("f1") }, t0);
    assert_eq!(answer(&r, "x1"), Some(Ok(None)));
    assert_eq!(condition_of(&r, "j1"), Condition::Cancelled);
    assert_eq!(r.aborts, vec![put.key], "the running upload is stopped");
    assert!(
        r.cleanups
            .iter()
            .any(|c| matches!(c, Cleanup::Files(f) if f.len() == 6)),
        "the files are deleted"
    );
    // Late answers change nothing.
    assert!(grant(&mut c, &reqs[1].0, 1, t0).file_puts.is_empty());
    c.file_put_done(put.key, Ok(()), t0);
    assert!(iqs(&c.take_ready()).is_empty());
}
