//! The core driven with plain `#[test]`s: inputs at fixed times, assertions on what
//! [`Ready`] says to store, send and answer. No connection, no store, no clock.

use std::time::{Duration, Instant};

use jid::{FullJid, Jid};
use spine_protocol::fragments::{self, Fragment};
use spine_protocol::{
    Advertise, AgentState, CapabilityAd, Condition, Data, Job, JobId, JobResult, JobState, Load,
    MapReduce, ProtocolVersion, SpineError, INLINE_LIMIT,
};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::Presence;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use super::*;
use crate::jobs::JobSpec;
use crate::policy::Capabilities;

pub(crate) const CAP: &str = "c.work";

/// A core and the time, with helpers to play agents and submitters.
pub(crate) struct World {
    pub core: Core,
    pub now: Now,
    token: ApiToken,
    instance: u64,
    /// The heartbeat agents advertise (ms).
    pub heartbeat_ms: u64,
    /// The protocol version agents announce.
    pub protocol: ProtocolVersion,
    /// Agents advertise that they serve kept outputs (`data_listen`), agent n at
    /// [`serves_url`]`(n)`.
    pub serves: bool,
}

/// Where agent n serves kept outputs when [`World::serves`] is set.
pub(crate) fn serves_url(n: usize) -> String {
    format!("http://agent{n}.test:7443")
}

/// A job request the core sent.
#[derive(Debug, Clone)]
pub(crate) struct SentJob {
    pub iq: String,
    pub to: FullJid,
    pub job: Job,
}

pub(crate) fn agent(n: usize) -> FullJid {
    format!("agent{n}@localhost/w").parse().unwrap()
}

pub(crate) fn spec(cap: &str) -> JobSpec {
    JobSpec {
        max_attempts: 3,
        ..JobSpec::new(cap.parse().unwrap(), "http:test")
    }
}

fn config() -> DispatcherConfig {
    DispatcherConfig {
        submitters: vec!["webapp@localhost".into()],
        ..DispatcherConfig::default()
    }
}

impl World {
    pub(crate) fn new() -> World {
        World::with(config(), Restored::default())
    }

    pub(crate) fn with(cfg: DispatcherConfig, restored: Restored) -> World {
        World::restarted(cfg, restored, Vec::new())
    }

    /// A core started on what a previous one stored and sent ahead of its commits.
    pub(crate) fn restarted(
        cfg: DispatcherConfig,
        restored: Restored,
        sent_ahead: Vec<SentAhead>,
    ) -> World {
        let policy = Policy::from_config(&cfg).expect("test policy");
        let now = Now {
            ms: 1_700_000_000_000,
            mono: Instant::now(),
        };
        let mut core = Core::new(
            cfg,
            policy,
            restored,
            7,
            now,
            Box::new(crate::jobs::MemoryBlobs::default()),
        );
        core.session_started(now);
        core.recover(sent_ahead, now);
        core.take_ready();
        World {
            core,
            now,
            token: 0,
            instance: 0,
            heartbeat_ms: 1000,
            protocol: ProtocolVersion::CURRENT,
            serves: false,
        }
    }

    pub(crate) fn advance(&mut self, ms: u64) {
        self.now = self.now.after(Duration::from_millis(ms));
    }

    pub(crate) fn tick(&mut self) {
        self.core.tick(self.now);
    }

    /// An agent comes with `slots` slots of `caps`.
    pub(crate) fn agent_with(&mut self, n: usize, slots: u64, caps: &[&str]) -> FullJid {
        self.instance += 1;
        let ad = Advertise {
            protocol: self.protocol,
            instance: format!("00000000-0000-0000-0000-{:012}", self.instance),
            gen: 1,
            slots,
            heartbeat_ms: self.heartbeat_ms,
            attrs: Default::default(),
            serves: self.serves.then(|| serves_url(n)),
            capabilities: caps
                .iter()
                .map(|c| CapabilityAd::new(c.parse().unwrap()))
                .collect(),
        };
        let p = Presence::available()
            .with_from(Jid::from(agent(n)))
            .with_payloads(vec![ad.into(), load(1, slots, 0).into()]);
        self.core.stanza(p.into(), self.now);
        agent(n)
    }

    pub(crate) fn agent(&mut self, n: usize, slots: u64) -> FullJid {
        self.agent_with(n, slots, &[CAP])
    }

    pub(crate) fn submit(&mut self, spec: JobSpec) -> Result<(JobId, JobState), SpineError> {
        self.submit_waiting(spec, false)
    }

    pub(crate) fn submit_waiting(
        &mut self,
        spec: JobSpec,
        wait_for_agent: bool,
    ) -> Result<(JobId, JobState), SpineError> {
        self.token += 1;
        let token = self.token;
        let req = ApiRequest::Submit {
            spec: Box::new(spec),
            wait_for_agent,
            visible: Capabilities::all(),
            wait: false,
        };
        self.core.api(token, req, self.now);
        let replies = std::mem::take(&mut self.core.ready.replies);
        let (t, reply) = replies.into_iter().last().expect("an answer");
        assert_eq!(t, token);
        match reply {
            ApiReply::Submitted(r) => r,
            other => panic!("not a submit answer: {other:?}"),
        }
    }

    /// A load report of `agent` (one slot, idle).
    pub(crate) fn report(&mut self, agent: &FullJid, seq: u64) {
        let p = Presence::available()
            .with_from(Jid::from(agent.clone()))
            .with_payloads(vec![load(seq, 1, 0).into()]);
        self.core.stanza(p.into(), self.now);
    }

    /// What the core decided, the job requests that leave before the commit
    /// ([`Core::take_early`]) first among the stanzas, in the order the driver sends them.
    pub(crate) fn ready(&mut self) -> Ready {
        let mut r = self.core.take_ready();
        let early = std::mem::take(&mut r.early);
        r.sent_ahead.clear();
        r.stanzas.splice(0..0, early);
        let now = std::mem::take(&mut r.now);
        r.stanzas.splice(0..0, now);
        r
    }

    pub(crate) fn state(&self, job: &JobId) -> JobState {
        self.core.record(job).expect("job held").state
    }

    /// Answers a job request with a result from `from`.
    pub(crate) fn succeed(&mut self, sent: &SentJob, from: &FullJid) {
        let r = JobResult {
            job: sent.job.id.clone(),
            attempt: sent.job.attempt,
            elapsed_ms: Some(1),
            meta: Default::default(),
            output: Some(Data::Inline {
                mime: None,
                bytes: b"done".to_vec(),
            }),
        };
        let iq = Iq::from_result(sent.iq.clone(), Some(r)).with_from(Jid::from(from.clone()));
        self.core.stanza(iq.into(), self.now);
    }

    /// Answers a job request with an error from its agent.
    pub(crate) fn refuse(&mut self, sent: &SentJob, e: SpineError) {
        let iq = Iq::from_error(sent.iq.clone(), StanzaError::from(e))
            .with_from(Jid::from(sent.to.clone()));
        self.core.stanza(iq.into(), self.now);
    }
}

pub(crate) fn load(seq: u64, slots: u64, in_flight: u64) -> Load {
    Load {
        seq,
        gen: 1,
        state: AgentState::Ready,
        in_flight,
        yours: in_flight,
        slots,
        queue: 0,
        loadavg: None,
        mem_used: None,
        mem_total: None,
        caps: vec![],
    }
}

/// The job requests among stanzas.
pub(crate) fn jobs_sent(stanzas: &[Stanza]) -> Vec<SentJob> {
    stanzas
        .iter()
        .filter_map(|s| match s {
            Stanza::Iq(Iq::Set {
                id, to, payload, ..
            }) if payload.is("job", spine_protocol::NS) => Some(SentJob {
                iq: id.clone(),
                to: to.clone()?.try_into_full().ok()?,
                job: Job::try_from(payload.clone()).ok()?,
            }),
            _ => None,
        })
        .collect()
}

/// IQ sets of one element name, with their ids and recipients.
fn iq_sets(stanzas: &[Stanza], name: &str) -> Vec<(String, Jid)> {
    stanzas
        .iter()
        .filter_map(|s| match s {
            Stanza::Iq(Iq::Set {
                id, to, payload, ..
            }) if payload.name() == name => Some((id.clone(), to.clone()?)),
            _ => None,
        })
        .collect()
}

fn pings(stanzas: &[Stanza]) -> Vec<(String, Jid)> {
    stanzas
        .iter()
        .filter_map(|s| match s {
            Stanza::Iq(Iq::Get {
                id, to, payload, ..
            }) if payload.name() == "ping" => Some((id.clone(), to.clone()?)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_accepted_job_is_stored_before_it_is_acknowledged_and_sent() {
    let mut w = World::new();
    let a = w.agent(1, 2);
    w.ready();
    w.token += 1;
    let req = ApiRequest::Submit {
        spec: Box::new(spec(CAP)),
        wait_for_agent: false,
        visible: Capabilities::all(),
        wait: false,
    };
    w.core.api(w.token, req, w.now);
    let r = w.ready();
    assert!(r.must_store());
    let [(token, ApiReply::Submitted(Ok((id, state))))] = r.replies.as_slice() else {
        panic!("one accepted answer: {:?}", r.replies);
    };
    assert_eq!(*token, w.token);
    assert_eq!(
        *state,
        JobState::Dispatched,
        "placed at once: an agent had room"
    );
    assert_eq!(r.persist, vec![id.clone()]);
    let sent = jobs_sent(&r.stanzas);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].to, a);
    assert_eq!(&sent[0].job.id, id);
}

/// A job of [`CAP`] submitted over the HTTP API, its caller waiting for the end or not.
fn api_submit(w: &mut World, wait: bool) {
    w.token += 1;
    let req = ApiRequest::Submit {
        spec: Box::new(spec(CAP)),
        wait_for_agent: false,
        visible: Capabilities::all(),
        wait,
    };
    w.core.api(w.token, req, w.now);
}

#[test]
fn a_job_request_leaves_before_the_commit_and_a_waiting_callers_acceptance_may_linger() {
    let mut w = World::new();
    let a = w.agent(1, 4);
    w.ready();
    assert_eq!(w.core.pending(), Pending::Nothing);
    let submit = api_submit;
    // A caller who waits for the end: the job request goes at once, nothing hurries the
    // commit of its acceptance.
    submit(&mut w, true);
    let early = w.core.take_early();
    let sent = jobs_sent(&early.stanzas);
    assert_eq!(sent.len(), 1, "the job request leaves before the commit");
    assert_eq!(sent[0].to, a);
    assert_eq!(w.core.pending(), Pending::Lazy);
    // Its outcome makes the commit urgent: acceptance and outcome are stored together.
    w.succeed(&sent[0], &a);
    assert_eq!(w.core.pending(), Pending::Urgent);
    let r = w.core.take_ready();
    assert_eq!(
        r.persist,
        vec![sent[0].job.id.clone()],
        "one record, one write"
    );
    assert_eq!(w.state(&sent[0].job.id), JobState::Succeeded);
    // The caller hears the end with the acceptance: it need not ask again.
    let [(_, ApiReply::Ended { id, state, view })] = r.replies.as_slice() else {
        panic!("the job's end as the answer: {:?}", r.replies);
    };
    assert_eq!((id, *state), (&sent[0].job.id, JobState::Succeeded));
    // The view is the final event's, rendered once.
    let fin = r.events.iter().find(|e| e.kind == EventKind::Final);
    assert_eq!(fin.map(|e| e.data.get()), Some(view.get()));
    let v: serde_json::Value = serde_json::from_str(view.get()).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str()),
        (Some(id.as_str()), Some("succeeded"))
    );
    assert_eq!(w.core.pending(), Pending::Nothing);
    // A waiting caller whose job is still running when its acceptance is stored hears
    // "accepted" (and waits for the event).
    submit(&mut w, true);
    assert_eq!(jobs_sent(&w.core.take_early().stanzas).len(), 1);
    assert!(matches!(
        w.core.take_ready().replies.as_slice(),
        [(_, ApiReply::Submitted(Ok((_, JobState::Dispatched))))]
    ));
    // A caller told only "accepted" waits for that answer: urgent at once.
    submit(&mut w, false);
    assert_eq!(jobs_sent(&w.core.take_early().stanzas).len(), 1);
    assert_eq!(w.core.pending(), Pending::Urgent);
    w.ready();
    // An XMPP submitter who watches the job: its <accepted> may linger too.
    let from: Jid = "webapp@localhost/app".parse().unwrap();
    let xmpp = |w: &mut World, id: &str, watch: bool| {
        let s = spine_protocol::Submit {
            watch,
            ..spine_protocol::Submit::new(CAP.parse().unwrap())
        };
        let iq = Iq::from_set(id.to_owned(), s).with_from(from.clone());
        w.core.stanza(iq.into(), w.now);
    };
    xmpp(&mut w, "s1", true);
    assert_eq!(jobs_sent(&w.core.take_early().stanzas).len(), 1);
    assert_eq!(w.core.pending(), Pending::Lazy);
    xmpp(&mut w, "s2", false);
    assert_eq!(
        w.core.pending(),
        Pending::Urgent,
        "an unwatched <accepted> does not wait"
    );
}

#[test]
fn a_jobs_end_is_rendered_only_while_someone_may_read_it() {
    let mut w = World::new();
    let a = w.agent(1, 4);
    w.ready();
    let run = |w: &mut World, wait: bool| {
        api_submit(w, wait);
        let sent = jobs_sent(&w.core.take_early().stanzas);
        w.succeed(&sent[0], &a);
        (sent[0].job.id.clone(), w.core.take_ready())
    };
    // No event stream open, no request waiting: the end is published without its view.
    w.core.set_listened(false);
    let (id, r) = run(&mut w, false);
    let fin = r
        .events
        .iter()
        .find(|e| e.kind == EventKind::Final && e.job == id);
    assert!(fin.is_some_and(|e| e.data.is_later()), "{fin:?}");
    // A caller waiting in this very commit still gets the job's view with its answer.
    let (id, r) = run(&mut w, true);
    let [(_, ApiReply::Ended { view, .. })] = r.replies.as_slice() else {
        panic!("the job's end as the answer: {:?}", r.replies);
    };
    let v: serde_json::Value = serde_json::from_str(view.get()).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str()),
        (Some(id.as_str()), Some("succeeded"))
    );
    // Someone may read it: rendered at once, as the job is.
    w.core.set_listened(true);
    let (id, r) = run(&mut w, false);
    let fin = r
        .events
        .iter()
        .find(|e| e.kind == EventKind::Final && e.job == id);
    let data = fin.map(|e| e.data.clone()).expect("a final event");
    assert!(!data.is_later());
    let v: serde_json::Value = serde_json::from_str(data.get()).unwrap();
    assert_eq!(v["state"].as_str(), Some("succeeded"));
    // `null` rendered is not the marker.
    assert!(!crate::core::Rendered::parse("null").unwrap().is_later());
}

#[test]
fn a_submit_that_waits_is_answered_once_by_the_jobs_end_or_when_its_wait_is_over() {
    let mut w = World::new();
    let a = w.agent(1, 1);
    let from: Jid = "webapp@localhost/app".parse().unwrap();
    let xmpp = |w: &mut World, id: &str, wait_ms: u64, key: &str| {
        let s = spine_protocol::Submit {
            watch: true,
            wait_ms: Some(wait_ms),
            idempotency_key: Some(key.to_owned()),
            ..spine_protocol::Submit::new(CAP.parse().unwrap())
        };
        let iq = Iq::from_set(id.to_owned(), s).with_from(from.clone());
        w.core.stanza(iq.into(), w.now);
    };
    let status_in = |iq: Option<Iq>| match iq {
        Some(Iq::Result {
            payload: Some(el), ..
        }) => spine_protocol::JobStatus::try_from(el).ok(),
        _ => None,
    };
    // Accepted, sent to the agent, stored: nothing answers yet, so nothing hurries the commit.
    xmpp(&mut w, "s1", 5_000, "k1");
    let r = w.ready();
    let sent = jobs_sent(&r.stanzas).remove(0);
    assert!(answer_to(&r.stanzas, "s1").is_none(), "no <accepted>");
    assert!(r.persist.contains(&sent.job.id));
    // It ends within the wait: its final status is the answer, and the watcher, who is the
    // waiting submitter, gets no message besides.
    w.succeed(&sent, &a);
    let r = w.ready();
    let st = status_in(answer_to(&r.stanzas, "s1")).expect("the final status as the answer");
    assert_eq!((&st.job, st.state), (&sent.job.id, JobState::Succeeded));
    let messages = r
        .stanzas
        .iter()
        .filter(|st| matches!(st, Stanza::Message(_)))
        .count();
    assert_eq!(messages, 0, "no final message: {:?}", r.stanzas);
    // The same key again, for the job that ended: its end at once.
    xmpp(&mut w, "s2", 5_000, "k1");
    let st = status_in(answer_to(&w.ready().stanzas, "s2")).expect("the end at once");
    assert_eq!((&st.job, st.state), (&sent.job.id, JobState::Succeeded));
    // A job that outlasts its wait: <accepted> with its state when the wait is over, then
    // the watcher's final message as usual.
    xmpp(&mut w, "s3", 1_000, "k3");
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    w.advance(600);
    w.tick();
    assert!(answer_to(&w.ready().stanzas, "s3").is_none());
    let wake = w.core.next_wake(w.now);
    assert!(
        wake <= Duration::from_millis(401),
        "wakes when the wait ends: {wake:?}"
    );
    w.advance(401);
    w.tick();
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&w.ready().stanzas, "s3")
    else {
        panic!("<accepted> when the wait is over");
    };
    let acc = spine_protocol::Accepted::try_from(el).unwrap();
    assert_eq!((&acc.job, acc.state), (&sent.job.id, JobState::Dispatched));
    assert_eq!(w.core.submit_waits.len(), 0);
    w.succeed(&sent, &a);
    let r = w.ready();
    assert!(answer_to(&r.stanzas, "s3").is_none(), "answered once");
    let watched = r
        .stanzas
        .iter()
        .any(|st| matches!(st, Stanza::Message(m) if m.to.as_ref() == Some(&from)));
    assert!(watched, "the watcher's final message: {:?}", r.stanzas);
}

#[test]
fn a_busy_refusal_costs_no_attempt_and_the_job_is_placed_again() {
    let mut w = World::new();
    w.agent(1, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&w.ready().stanzas);
    assert_eq!(sent[0].job.attempt, 1);
    w.refuse(&sent[0], SpineError::new(Condition::Busy));
    let r = w.ready();
    assert_eq!(w.state(&id), JobState::Queued);
    assert_eq!(w.core.record(&id).unwrap().attempts, 0, "no attempt spent");
    assert!(r.persist.contains(&id));
    assert!(
        jobs_sent(&r.stanzas).is_empty(),
        "not at once: a short pause first"
    );
    let wake = w.core.next_wake(w.now);
    assert!(
        wake <= Duration::from_millis(50),
        "wakes for the retry: {wake:?}"
    );
    w.advance(60);
    w.tick();
    let again = jobs_sent(&w.ready().stanzas);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].job.attempt, 1, "the same attempt number");
}

#[test]
fn a_reply_from_the_wrong_sender_is_ignored() {
    let mut w = World::new();
    let a = w.agent(1, 1);
    let b = w.agent(2, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    let stranger = if sent.to == a { b } else { a };
    w.succeed(&sent, &stranger);
    assert_eq!(w.state(&id), JobState::Dispatched);
    assert!(w.ready().persist.is_empty(), "nothing changed");
    let to = sent.to.clone();
    w.succeed(&sent, &to);
    assert_eq!(w.state(&id), JobState::Succeeded);
    let r = w.ready();
    assert!(r.persist.contains(&id));
    assert!(r
        .events
        .iter()
        .any(|e| e.job == id && e.kind == EventKind::Final));
}

#[test]
fn a_silent_agent_is_pinged_then_declared_gone_and_its_job_retried_elsewhere() {
    let mut w = World::new();
    let a = w.agent(1, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    let first = jobs_sent(&w.ready().stanzas).remove(0);
    assert_eq!(first.to, a);
    let b = w.agent(2, 1);
    // Agent 2 keeps reporting; agent 1 falls silent for more than 3 heartbeats (1 s each).
    for seq in 2..=4 {
        w.advance(1000);
        w.report(&b, seq);
        w.tick();
    }
    w.advance(300);
    w.tick();
    let r = w.ready();
    let p = pings(&r.stanzas);
    assert_eq!(p.len(), 1, "one ping: {p:?}");
    assert_eq!(p[0].1, Jid::from(a.clone()));
    w.advance(5_100);
    // Agent 2 still reports (so that only agent 1 is silent).
    w.report(&b, 5);
    w.tick();
    assert_eq!(
        w.state(&id),
        JobState::Queued,
        "attempt failed: retried after a backoff"
    );
    w.advance(1_000);
    w.tick();
    let retried = jobs_sent(&w.ready().stanzas);
    assert_eq!(retried.len(), 1);
    assert_eq!(retried[0].to, b, "elsewhere");
    assert_eq!(retried[0].job.attempt, 2);
}

#[test]
fn a_job_sent_ahead_of_its_commit_goes_back_to_the_same_agent_after_a_crash() {
    // Stored queued (no agent yet); then agent 1 comes and the job request leaves at once.
    let mut w = World::new();
    let (id, _) = w.submit_waiting(spec(CAP), true).unwrap();
    w.ready();
    let stored = w.core.record(&id).unwrap().clone();
    assert_eq!(stored.state, JobState::Queued);
    let a = w.agent(1, 2);
    let early = w.core.take_early();
    assert_eq!(jobs_sent(&early.stanzas).len(), 1);
    assert_eq!(
        early.sent,
        vec![SentAhead {
            job: id.clone(),
            attempt: 1,
            agent: a.clone()
        }],
        "recorded for the next process"
    );
    // The process dies before the dispatch is committed. Without the record, the next one
    // would place the job afresh: on idle agent 2, while agent 1 runs it.
    let restored = || Restored {
        jobs: vec![stored.clone()],
        ..Restored::default()
    };
    let mut blind = World::with(config(), restored());
    blind.agent(2, 1);
    let elsewhere = jobs_sent(&blind.ready().stanzas);
    assert_eq!(elsewhere.len(), 1);
    assert_eq!(elsewhere[0].to, agent(2));
    // With it, the job is restored in flight on agent 1 and waits for it.
    let mut w2 = World::restarted(config(), restored(), early.sent);
    let rec = w2.core.record(&id).unwrap();
    assert!(rec.resume, "{rec:?}");
    assert_eq!((rec.attempts, rec.agent.as_ref()), (1, Some(&a)));
    w2.agent(2, 1);
    assert!(
        jobs_sent(&w2.ready().stanzas).is_empty(),
        "not to another agent"
    );
    w2.agent(1, 2);
    let back = jobs_sent(&w2.ready().stanzas);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].to, a, "back to its agent");
    assert_eq!(
        back[0].job.attempt, 1,
        "the same attempt: the agent attaches it"
    );
    // A record that was stored after the request left is not changed.
    let mut rec = stored.clone();
    rec.attempts = 1;
    let mut w3 = World::restarted(
        config(),
        Restored {
            jobs: vec![rec],
            ..Restored::default()
        },
        vec![SentAhead {
            job: id.clone(),
            attempt: 1,
            agent: a,
        }],
    );
    assert!(!w3.core.record(&id).unwrap().resume);
    w3.agent(2, 1);
    assert_eq!(jobs_sent(&w3.ready().stanzas).len(), 1);
}

#[test]
fn after_a_restart_a_job_in_flight_waits_for_its_agent_within_the_grace() {
    // A first core dispatches a job to agent 1, and stops.
    let mut w = World::new();
    let a = w.agent(1, 1);
    let (id, _) = w.submit(spec(CAP)).unwrap();
    w.ready();
    let stored = w.core.record(&id).unwrap().clone();
    // The restarted core: agent 1 comes back within the grace.
    let restored = Restored {
        jobs: vec![stored.clone()],
        ..Restored::default()
    };
    let mut w2 = World::with(config(), restored);
    w2.agent(2, 1);
    w2.advance(1_000);
    w2.tick();
    assert!(
        jobs_sent(&w2.ready().stanzas).is_empty(),
        "not to another agent within the grace"
    );
    w2.agent(1, 1);
    let back = jobs_sent(&w2.ready().stanzas);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].to, a, "back to its agent");
    assert_eq!(
        back[0].job.attempt, 1,
        "the same attempt (the agent attaches it)"
    );
    // Another restart where agent 1 never returns: after the grace, anywhere.
    let mut w3 = World::with(
        config(),
        Restored {
            jobs: vec![stored],
            ..Restored::default()
        },
    );
    // Agent 2 reports rarely: nothing but the end of the grace sets placement going.
    w3.heartbeat_ms = 60_000;
    let b = w3.agent(2, 1);
    w3.ready();
    w3.tick();
    assert!(jobs_sent(&w3.ready().stanzas).is_empty());
    // The driver is woken when the grace ends, whatever else happens (nothing here).
    let wake = w3.core.next_wake(w3.now);
    assert!(wake <= RESUME_GRACE, "{wake:?}");
    w3.advance(RESUME_GRACE.as_millis() as u64);
    w3.tick();
    let moved = jobs_sent(&w3.ready().stanzas);
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].to, b);
}

#[test]
fn a_large_input_goes_as_chunks_at_most_eight_unacknowledged_then_the_job() {
    let mut w = World::new();
    let a = w.agent(1, 1);
    let mut s = spec(CAP);
    s.input = vec![1u8; INLINE_LIMIT * 10 + 5].into();
    let (id, _) = w.submit(s).unwrap();
    let stored = w.core.record(&id).unwrap().spec.input.stored();
    assert_eq!(
        stored.map(|b| b.size),
        Some(INLINE_LIMIT as u64 * 10 + 5),
        "the record holds the blob's hash and size, not the bytes"
    );
    let r = w.ready();
    let chunks = iq_sets(&r.stanzas, "chunk");
    assert_eq!(chunks.len(), 8, "the window");
    assert!(
        jobs_sent(&r.stanzas).is_empty(),
        "the job waits for its input"
    );
    let mut acked = 0;
    let mut pending: std::collections::VecDeque<String> =
        chunks.into_iter().map(|(id, _)| id).collect();
    let mut job = None;
    while let Some(cid) = pending.pop_front() {
        let ack = Iq::empty_result(Jid::from(a.clone()), cid).with_from(Jid::from(a.clone()));
        // `empty_result` addresses the reply; the sender is what the core checks.
        w.core.stanza(ack.into(), w.now);
        acked += 1;
        let r = w.ready();
        for (cid, _) in iq_sets(&r.stanzas, "chunk") {
            pending.push_back(cid);
        }
        assert!(pending.len() <= 8, "never more than 8 unacknowledged");
        if let Some(j) = jobs_sent(&r.stanzas).pop() {
            job = Some(j);
        }
    }
    assert_eq!(acked, 11);
    let job = job.expect("the job after its last chunk");
    assert_eq!(job.job.id, id);
    assert!(
        matches!(job.job.input, Some(Data::Blob(ref b)) if b.size == (INLINE_LIMIT * 10 + 5) as u64)
    );
}

#[test]
fn two_submissions_with_one_idempotency_key_in_one_batch_give_one_job() {
    let mut w = World::new();
    w.agent(1, 4);
    let mut s = spec(CAP);
    s.idempotency_key = Some("order-1".into());
    let (a, _) = w.submit(s.clone()).unwrap();
    let (b, _) = w.submit(s).unwrap();
    assert_eq!(a, b);
    let r = w.ready();
    assert_eq!(r.persist, vec![a]);
    assert_eq!(jobs_sent(&r.stanzas).len(), 1, "one job sent");
}

#[test]
fn a_job_no_capable_agent_takes_fails_after_no_agent_wait() {
    let mut w = World::new();
    let (id, state) = w.submit_waiting(spec("c.nobody"), true).unwrap();
    assert_eq!(state, JobState::Queued);
    let wait = w.core.cfg.no_agent_wait.as_millis() as u64;
    let wake = w.core.next_wake(w.now);
    assert!(
        wake <= Duration::from_millis(wait + 1),
        "wakes for it: {wake:?}"
    );
    w.advance(wait / 2);
    w.tick();
    assert_eq!(w.state(&id), JobState::Queued);
    w.advance(wait / 2 + 2);
    w.tick();
    assert_eq!(w.state(&id), JobState::Failed);
    let r = w.ready();
    assert!(r.persist.contains(&id));
    assert!(r
        .events
        .iter()
        .any(|e| e.job == id && e.kind == EventKind::Final));
    match &w.core.record(&id).unwrap().outcome {
        Some(crate::jobs::Recorded::Failure { condition, .. }) => {
            assert_eq!(*condition, Condition::NoAgent)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_deadline_times_the_job_out_and_its_agent_is_told() {
    let mut w = World::new();
    let a = w.agent(1, 1);
    let mut s = spec(CAP);
    s.deadline_ms = Some(w.now.ms + 1_000);
    let (id, _) = w.submit(s).unwrap();
    w.ready();
    let wake = w.core.next_wake(w.now);
    assert!(
        wake <= Duration::from_millis(1_000),
        "wakes at the deadline: {wake:?}"
    );
    w.advance(1_000);
    w.tick();
    assert_eq!(w.state(&id), JobState::TimedOut);
    let r = w.ready();
    let cancels = iq_sets(&r.stanzas, "cancel");
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].1, Jid::from(a));
    assert!(
        r.audit.iter().any(|(j, _)| j == id.as_str()),
        "an audit line"
    );
}

#[test]
fn cancelling_a_map_reduce_job_cancels_its_running_steps() {
    let mut w = World::new();
    let a = w.agent_with(1, 8, &["wc.map", "wc.reduce"]);
    let list: Vec<Fragment> = (0..3)
        .map(|i| Fragment::new(format!("text {i}").into_bytes()))
        .collect();
    let mut s = spec("wc.map");
    s.input = fragments::encode(&list).into();
    s.mapreduce = Some(MapReduce::new("wc.reduce".parse().unwrap()));
    let (parent, _) = w.submit(s).unwrap();
    let maps = jobs_sent(&w.ready().stanzas);
    assert_eq!(maps.len(), 3, "a map step per fragment");
    w.token += 1;
    w.core
        .api(w.token, ApiRequest::Cancel { id: parent.clone() }, w.now);
    let r = w.ready();
    assert!(matches!(
        r.replies.as_slice(),
        [(_, ApiReply::Cancelled(Ok(JobState::Cancelled)))]
    ));
    assert_eq!(w.state(&parent), JobState::Cancelled);
    for m in &maps {
        assert_eq!(w.state(&m.job.id), JobState::Cancelled);
    }
    let cancels = iq_sets(&r.stanzas, "cancel");
    assert_eq!(cancels.len(), 3, "each running step's agent is told");
    let a = Jid::from(a);
    assert!(cancels.iter().all(|(_, to)| *to == a));
}

#[test]
fn a_burst_does_not_herd_onto_one_agent() {
    let mut w = World::new();
    let agents: Vec<FullJid> = (1..=10).map(|n| w.agent(n, 10)).collect();
    w.ready();
    for _ in 0..100 {
        w.submit(spec(CAP)).unwrap();
    }
    let sent = jobs_sent(&w.ready().stanzas);
    assert_eq!(sent.len(), 100);
    for a in &agents {
        let n = sent.iter().filter(|s| &s.to == a).count();
        assert_eq!(n, 10, "{a} got {n}");
    }
}

#[test]
fn the_driver_is_woken_by_the_earliest_deadline_not_a_sweep() {
    let mut w = World::new();
    w.tick();
    let idle = w.core.next_wake(w.now);
    assert!(
        idle >= Duration::from_millis(200),
        "idle: housekeeping only ({idle:?})"
    );
    let mut s = spec("c.nobody");
    s.deadline_ms = Some(w.now.ms + 120);
    w.submit_waiting(s, true).unwrap();
    let wake = w.core.next_wake(w.now);
    assert!(wake <= Duration::from_millis(120), "{wake:?}");
}

#[test]
fn finished_jobs_are_forgotten_after_their_retention_with_their_keys() {
    let cfg = DispatcherConfig {
        retention: Duration::from_secs(1),
        ..config()
    };
    let mut w = World::with(cfg, Restored::default());
    let a = w.agent(1, 1);
    let mut s = spec(CAP);
    s.idempotency_key = Some("once".into());
    let (id, _) = w.submit(s.clone()).unwrap();
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    w.succeed(&sent, &a);
    w.ready();
    w.advance(900);
    w.tick();
    assert!(w.ready().delete.is_empty(), "kept within the retention");
    let wake = w.core.next_wake(w.now);
    assert!(
        wake <= Duration::from_millis(101),
        "wakes when it is due: {wake:?}"
    );
    w.advance(200);
    w.tick();
    assert_eq!(w.ready().delete, vec![id.clone()]);
    assert!(w.core.record(&id).is_none());
    let (again, _) = w.submit(s).unwrap();
    assert_ne!(again, id, "the key went with its job: a new job");
}

#[test]
fn jobs_with_the_same_large_input_share_one_blob_released_with_the_last_of_them() {
    let cfg = DispatcherConfig {
        retention: Duration::from_secs(1),
        ..config()
    };
    let mut w = World::with(cfg, Restored::default());
    let mut s = spec(CAP);
    s.input = vec![9u8; INLINE_LIMIT + 1].into();
    let (first, _) = w.submit_waiting(s.clone(), true).unwrap();
    w.advance(10);
    let (second, _) = w.submit_waiting(s, true).unwrap();
    let blob = w.core.record(&first).unwrap().spec.input.stored().unwrap();
    assert_eq!(
        w.core.record(&second).unwrap().spec.input.stored(),
        Some(blob)
    );
    assert_eq!(w.core.blob_refs(&blob), 2);
    assert!(w.ready().released.is_empty());
    w.core.cancel_job(&first, w.now).unwrap();
    w.advance(500);
    w.core.cancel_job(&second, w.now).unwrap();
    w.ready();
    // The first is forgotten: the blob stays, the second holds it.
    w.advance(600);
    w.tick();
    let r = w.ready();
    assert_eq!(r.delete, vec![first]);
    assert!(r.released.is_empty());
    assert_eq!(w.core.blob_refs(&blob), 1);
    w.advance(600);
    w.tick();
    let r = w.ready();
    assert_eq!(r.delete, vec![second]);
    assert_eq!(r.released, vec![blob], "released once, with its last job");
    assert_eq!(w.core.blob_refs(&blob), 0);
}

/// The counters operators alert on: submitted, refused by reason, retried, ended by state and
/// duplicate results per capability; per-agent in-flight and slots; latency histograms per
/// capability.
#[test]
fn metrics_count_jobs_per_capability_and_show_each_agents_load() {
    let mut w = World::new();
    let a = w.agent(1, 2);
    w.ready();
    let (id, _) = w.submit(spec(CAP)).unwrap();
    // A capability nobody offers is refused.
    assert!(w.submit(spec("no.such")).is_err());
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    // First attempt fails retryably, the second succeeds; its result repeated is a stale
    // reply (its request is answered), not a duplicate outcome.
    w.refuse(
        &sent,
        SpineError::new(Condition::Retryable).with_text("try again"),
    );
    w.advance(2_000);
    w.tick();
    let again = jobs_sent(&w.ready().stanzas).remove(0);
    assert_eq!(again.job.attempt, 2);
    w.succeed(&again, &a);
    w.succeed(&again, &a);
    w.ready();
    assert_eq!(w.state(&id), JobState::Succeeded);
    let m = w.core.metrics();
    let has = |line: &str| assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
    has(&format!(
        "spine_jobs_submitted_total{{capability=\"{CAP}\"}} 1"
    ));
    has("spine_jobs_refused_total{capability=\"no.such\",reason=\"unknown-capability\"} 1");
    has(&format!(
        "spine_jobs_retried_total{{capability=\"{CAP}\"}} 1"
    ));
    has(&format!(
        "spine_jobs_ended_total{{capability=\"{CAP}\",state=\"succeeded\"}} 1"
    ));
    assert!(!m.contains("spine_duplicate_results_total{"), "{m}");
    has("spine_agent_in_flight{agent=\"agent1@localhost/w\"} 0");
    has("spine_agent_slots{agent=\"agent1@localhost/w\"} 2");
    has(&format!(
        "spine_job_dispatch_seconds_count{{capability=\"{CAP}\"}} 1"
    ));
    has(&format!(
        "spine_job_end_to_end_seconds_count{{capability=\"{CAP}\"}} 1"
    ));
    has(&format!(
        "spine_job_end_to_end_seconds_bucket{{capability=\"{CAP}\",le=\"5\"}} 1"
    ));
}

#[test]
fn a_delayed_job_waits_accepted_until_its_time_even_across_a_restart() {
    let mut w = World::new();
    let a = w.agent(1, 2);
    w.ready();
    let at = w.now.ms + 10_000;
    let (id, state) = w
        .submit(JobSpec {
            not_before_ms: Some(at),
            ..spec(CAP)
        })
        .unwrap();
    assert_eq!(state, JobState::Accepted, "held back, with a free slot");
    let r = w.ready();
    assert_eq!(r.persist, vec![id.clone()], "stored like any job");
    assert!(jobs_sent(&r.stanzas).is_empty());
    // A job without delay submitted after it goes first.
    let (now_id, _) = w.submit(spec(CAP)).unwrap();
    assert_eq!(jobs_sent(&w.ready().stanzas)[0].job.id, now_id);
    // The driver is woken at its time, not earlier.
    let wake = w.core.next_wake(w.now);
    assert!(wake <= Duration::from_millis(10_000), "{wake:?}");
    w.advance(9_000);
    w.tick();
    assert!(jobs_sent(&w.ready().stanzas).is_empty());
    assert_eq!(w.state(&id), JobState::Accepted);

    // A restart before its time: still waiting, then placed when due.
    let stored = w.core.record(&id).unwrap().clone();
    let mut w2 = World::with(
        config(),
        Restored {
            jobs: vec![stored],
            ..Restored::default()
        },
    );
    w2.now.ms = w.now.ms;
    let b = w2.agent(2, 1);
    w2.tick();
    assert_eq!(w2.state(&id), JobState::Accepted);
    assert!(jobs_sent(&w2.ready().stanzas).is_empty());
    w2.now.ms = at;
    w2.tick();
    let r = w2.ready();
    assert!(r.persist.contains(&id), "queued, and stored so");
    let sent = jobs_sent(&r.stanzas);
    assert_eq!(sent.len(), 1, "placed at its time");
    assert_eq!((&sent[0].job.id, &sent[0].to), (&id, &b));
    let _ = a;
}

#[test]
fn a_delayed_job_can_be_cancelled_before_its_time_and_delayed_jobs_are_bounded() {
    let mut cfg = config();
    cfg.max_delayed = 1;
    let mut w = World::with(cfg, Restored::default());
    w.agent(1, 1);
    let at = w.now.ms + 60_000;
    let delayed = || JobSpec {
        not_before_ms: Some(at),
        ..spec(CAP)
    };
    let (id, _) = w.submit(delayed()).unwrap();
    let e = w.submit(delayed()).unwrap_err();
    assert_eq!(e.condition, Condition::QueueFull);
    assert!(e.to_string().contains("max_delayed"), "{e}");
    w.ready();
    w.core
        .api(w.token, ApiRequest::Cancel { id: id.clone() }, w.now);
    w.ready();
    assert_eq!(w.state(&id), JobState::Cancelled);
    w.advance(61_000);
    w.tick();
    assert!(jobs_sent(&w.ready().stanzas).is_empty(), "never placed");
    // The slot it held among delayed jobs is free again.
    assert!(w.submit(delayed()).is_ok());
}

/// An XMPP `<submit/>` from webapp@localhost/app; the dispatcher's answer to it.
fn xmpp_submit(w: &mut World, id: &str, s: spine_protocol::Submit) -> Iq {
    let from: Jid = "webapp@localhost/app".parse().unwrap();
    let iq = Iq::from_set(id.to_owned(), s).with_from(from);
    w.core.stanza(iq.into(), w.now);
    let r = w.ready();
    r.stanzas
        .iter()
        .find_map(|st| match st {
            Stanza::Iq(iq) if iq.id() == id => Some(iq.clone()),
            _ => None,
        })
        .expect("an answer to the submit")
}

#[test]
fn xmpp_submitters_get_delayed_jobs_and_rate_limits_as_queue_full_with_when_to_retry() {
    let mut cfg = config();
    cfg.submitter_rate = Some("1/min".parse().unwrap());
    let mut w = World::with(cfg, Restored::default());
    let a = w.agent(1, 1);
    w.ready();
    let submit = |delay_ms| spine_protocol::Submit {
        delay_ms,
        ..spine_protocol::Submit::new(CAP.parse().unwrap())
    };
    // A delayed job: accepted, then placed when its delay has passed.
    let answer = xmpp_submit(&mut w, "s1", submit(Some(5_000)));
    let Iq::Result {
        payload: Some(el), ..
    } = answer
    else {
        panic!("accepted: {answer:?}");
    };
    let accepted = spine_protocol::Accepted::try_from(el).unwrap();
    assert_eq!(accepted.state, JobState::Accepted);
    // The next submission is over the rate (one a minute): queue-full, with when to retry.
    let answer = xmpp_submit(&mut w, "s2", submit(None));
    let Iq::Error { error: e, .. } = answer else {
        panic!("refused: {answer:?}");
    };
    assert_eq!(e.type_, xmpp_parsers::stanza_error::ErrorType::Wait);
    let spine = SpineError::from_stanza_error(&e).unwrap().unwrap();
    assert_eq!(
        spine.condition,
        Condition::QueueFull,
        "1.0 toward submitters"
    );
    let text = spine.text.unwrap();
    assert!(
        text.contains("webapp@localhost is over its rate limit") && text.ends_with("retry in 60 s"),
        "{text}"
    );
    // A delay beyond max_delay names the attribute.
    let answer = xmpp_submit(&mut w, "s3", submit(Some(31 * 86_400_000)));
    let Iq::Error { error: e, .. } = answer else {
        panic!("refused: {answer:?}");
    };
    let spine = SpineError::from_stanza_error(&e).unwrap().unwrap();
    assert_eq!(
        (spine.condition, spine.field.as_deref()),
        (Condition::BadArguments, Some("delay-ms"))
    );
    // The delayed job goes out at its time (the agent keeps reporting meanwhile).
    w.advance(4_000);
    w.report(&a, 2);
    w.tick();
    assert!(jobs_sent(&w.ready().stanzas).is_empty());
    w.advance(1_000);
    w.report(&a, 3);
    w.tick();
    let sent = jobs_sent(&w.ready().stanzas);
    assert_eq!((sent.len(), &sent[0].to), (1, &a));
    assert_eq!(sent[0].job.id, accepted.job);
}

/// A busy fleet's heartbeats cost no store write: with a job running on every agent (what
/// swarm-bench's busy phase holds), each agent's load report stores nothing, sends nothing and
/// publishes nothing — so the driver commits no transaction (no fsync) for it — and the next
/// job still goes at once to an agent with a free slot.
#[test]
fn heartbeats_of_a_busy_fleet_store_and_send_nothing() {
    const N: usize = 2_000;
    let mut w = World::new();
    let agents: Vec<FullJid> = (0..N).map(|n| w.agent(n, 2)).collect();
    w.ready();
    for _ in 0..N {
        w.submit(spec(CAP)).expect("accepted");
    }
    let sent = jobs_sent(&w.ready().stanzas);
    let on: std::collections::HashSet<&FullJid> = sent.iter().map(|s| &s.to).collect();
    assert_eq!(
        (sent.len(), on.len()),
        (N, N),
        "one job on every agent (least-loaded spreads them)"
    );
    for (i, a) in agents.iter().enumerate() {
        let p = Presence::available()
            .with_from(Jid::from(a.clone()))
            .with_payloads(vec![load(2, 2, 1).into()]);
        w.core.stanza(p.into(), w.now);
        let r = w.ready();
        assert!(
            !r.must_store(),
            "load {i} wants a commit: persist {:?}, agents seen {:?}",
            r.persist,
            r.agents_seen
        );
        assert!(
            r.stanzas.is_empty() && r.events.is_empty() && r.replies.is_empty(),
            "load {i} sent {:?}",
            r.stanzas
        );
    }
    let (id, state) = w.submit(spec(CAP)).expect("accepted");
    assert_eq!(
        state,
        JobState::Dispatched,
        "a free slot was left on every agent"
    );
    let sent = jobs_sent(&w.ready().stanzas);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].job.id, id);
}

#[test]
fn a_standby_keeps_the_fleet_places_nothing_and_on_winning_sends_running_jobs_back_to_their_agents()
{
    // The leader dispatched a job to agent 1 and stored it; then it died.
    let mut leader = World::new();
    let a = leader.agent(1, 2);
    let (id, _) = leader.submit(spec(CAP)).unwrap();
    let sent = jobs_sent(&leader.ready().stanzas);
    assert_eq!(sent.len(), 1);
    let stored = leader.core.record(&id).unwrap().clone();
    assert_eq!(stored.agent.as_ref(), Some(&a));

    // A standby: the same fleet reaches it (advertisements go to the shared bare JID).
    let mut w = standby_world();
    assert_eq!(w.core.agent_count(), 2, "the registry is warm");
    assert!(!w.core.leads());
    w.ready();
    // It refuses a stranger's request (or an agent's), naming the leader, and stores
    // nothing; its submitters it serves (below).
    let stranger: Jid = "stranger@localhost/x".parse().unwrap();
    let iq =
        Iq::from_set("s1", spine_protocol::Submit::new(CAP.parse().unwrap())).with_from(stranger);
    w.core.stanza(iq.into(), w.now);
    let r = w.ready();
    let answer = r
        .stanzas
        .iter()
        .find_map(|st| match st {
            Stanza::Iq(iq) if iq.id() == "s1" => Some(iq.clone()),
            _ => None,
        })
        .expect("an answer");
    assert!(!r.must_store(), "nothing stored");
    let Iq::Error { error, .. } = answer else {
        panic!("refused: {answer:?}")
    };
    assert_eq!(
        (error.type_, error.defined_condition),
        (ErrorType::Wait, DefinedCondition::ServiceUnavailable)
    );
    let text = error.texts.values().next().cloned().unwrap_or_default();
    assert!(text.contains("dispatcher@localhost/d1"), "{text}");

    // It wins: the stored job goes back to agent 1 (not idle agent 2) with the same attempt.
    w.core.lead(
        Restored {
            jobs: vec![stored],
            ..Restored::default()
        },
        w.now,
    );
    w.core.recover(Vec::new(), w.now);
    w.tick();
    let back = jobs_sent(&w.ready().stanzas);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].to, a, "back to the agent that runs it");
    assert_eq!(
        back[0].job.attempt, 1,
        "the same attempt: the agent attaches it"
    );
    // And it accepts submissions now.
    let (id2, _) = w.submit(spec(CAP)).unwrap();
    assert_eq!(jobs_sent(&w.ready().stanzas).len(), 1, "placed: {id2}");
}

/// A standby core (one of several dispatchers) with the test configuration, at `w`'s time.
pub(crate) fn standby_core(w: &World) -> Core {
    let cfg = config();
    let policy = Policy::from_config(&cfg).unwrap();
    Core::standby(
        cfg,
        policy,
        Restored::default(),
        9,
        w.now,
        Box::new(crate::jobs::MemoryBlobs::default()),
    )
}

/// A standby as [`World`]'s core, with two agents of `CAP`, whose leader is d1.
fn standby_world() -> World {
    let mut w = World::new();
    w.core = standby_core(&w);
    w.core.session_started(w.now);
    w.core
        .set_leader_hint(Some("dispatcher@localhost/d1".to_owned()));
    w.agent(1, 2);
    w.agent(2, 2);
    w.ready();
    w
}

/// The answer to the IQ `id` among `stanzas`.
fn answer_to(stanzas: &[Stanza], id: &str) -> Option<Iq> {
    stanzas.iter().find_map(|st| match st {
        Stanza::Iq(iq) if iq.id() == id => Some(iq.clone()),
        _ => None,
    })
}

/// A job as the shared store holds it, submitted by `submitter` (a bare JID).
fn stored_job(w: &mut World, submitter: &str, state: JobState) -> crate::jobs::JobRecord {
    let mut leader = World::new();
    leader.now = w.now;
    let mut s = spec(CAP);
    s.submitter = submitter.to_owned();
    let (id, _) = leader.submit_waiting(s, true).unwrap();
    let mut rec = leader.core.record(&id).unwrap().clone();
    rec.state = state;
    rec
}

#[test]
fn a_waiting_submit_hears_of_a_cancel_and_a_standby_answers_it_at_once() {
    let mut w = World::new();
    w.agent(1, 1);
    let from: Jid = "webapp@localhost/app".parse().unwrap();
    let waiting = |wait_ms| spine_protocol::Submit {
        wait_ms: Some(wait_ms),
        ..spine_protocol::Submit::new(CAP.parse().unwrap())
    };
    let set = |w: &mut World, id: &str, payload: minidom::Element| {
        let iq = Iq::Set {
            from: Some(from.clone()),
            to: None,
            id: id.to_owned(),
            payload,
        };
        w.core.stanza(iq.into(), w.now);
    };
    // Not watched: the wait alone holds the answer.
    set(&mut w, "s1", waiting(60_000).into());
    let sent = jobs_sent(&w.ready().stanzas).remove(0);
    set(
        &mut w,
        "c1",
        spine_protocol::Cancel {
            job: sent.job.id.clone(),
        }
        .into(),
    );
    let r = w.ready();
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&r.stanzas, "s1")
    else {
        panic!("the end answers the submit: {:?}", r.stanzas);
    };
    let st = spine_protocol::JobStatus::try_from(el).unwrap();
    assert_eq!((&st.job, st.state), (&sent.job.id, JobState::Cancelled));
    assert_eq!(w.core.submit_waits.len(), 0);

    // A standby stores the job for the leader and answers <accepted> at once.
    let mut w = standby_world();
    set(&mut w, "s2", waiting(60_000).into());
    let r = w.ready();
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&r.stanzas, "s2")
    else {
        panic!("accepted at once: {:?}", r.stanzas);
    };
    assert!(spine_protocol::Accepted::try_from(el).is_ok());
    assert_eq!(w.core.submit_waits.len(), 0);
}

#[test]
fn a_standby_serves_xmpp_submitters_storing_their_jobs_and_reading_the_shared_store() {
    let mut w = standby_world();
    let me: Jid = "webapp@localhost/app".parse().unwrap();
    let set = |w: &mut World, id: &str, payload: minidom::Element| {
        let iq = Iq::Set {
            from: Some(me.clone()),
            to: None,
            id: id.to_owned(),
            payload,
        };
        w.core.stanza(iq.into(), w.now);
    };
    let get = |w: &mut World, id: &str, payload: minidom::Element| {
        let iq = Iq::Get {
            from: Some(me.clone()),
            to: None,
            id: id.to_owned(),
            payload,
        };
        w.core.stanza(iq.into(), w.now);
    };
    // A submission without a key: stored for the leader (not placed), then acknowledged.
    let mut s = spine_protocol::Submit::new(CAP.parse().unwrap());
    s.watch = true;
    set(&mut w, "s1", s.into());
    assert!(w.core.take_lookups().is_empty(), "no read needed");
    let r = w.ready();
    assert_eq!(r.persist.len(), 1, "stored for the leader");
    assert!(jobs_sent(&r.stanzas).is_empty(), "a standby places nothing");
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&r.stanzas, "s1")
    else {
        panic!("accepted: {:?}", r.stanzas);
    };
    let first = spine_protocol::Accepted::try_from(el).unwrap();
    let rec = w.core.record(&first.job).unwrap();
    assert_eq!(
        rec.spec.watch,
        Some(me.clone()),
        "the leader tells the watcher"
    );
    assert_eq!(rec.spec.submitter, "webapp@localhost");

    // A keyed submission waits for a read of the key; a key the store knows answers its job.
    let keyed = || spine_protocol::Submit {
        idempotency_key: Some("k-1".into()),
        ..spine_protocol::Submit::new(CAP.parse().unwrap())
    };
    set(&mut w, "s2", keyed().into());
    assert!(
        answer_to(&w.ready().stanzas, "s2").is_none(),
        "not before the read"
    );
    let mut lookups = w.core.take_lookups();
    assert_eq!(lookups.len(), 1);
    match &lookups[0].what {
        standby::LookupFor::Key { submitter, key, .. } => {
            assert_eq!(
                (submitter.as_str(), key.as_str()),
                ("webapp@localhost", "k-1")
            )
        }
        other => panic!("a key's read: {other:?}"),
    }
    let known = stored_job(&mut w, "webapp@localhost", JobState::Running);
    w.core
        .looked_up(lookups.remove(0), Ok(Some(known.clone())), w.now);
    let r = w.ready();
    assert!(!r.must_store(), "nothing new stored");
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&r.stanzas, "s2")
    else {
        panic!("accepted: {:?}", r.stanzas);
    };
    let again = spine_protocol::Accepted::try_from(el).unwrap();
    assert_eq!(
        (again.job, again.state),
        (known.id.clone(), JobState::Running)
    );
    // A key the store does not know: stored as a new job.
    set(&mut w, "s3", keyed().into());
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Ok(None), w.now);
    let r = w.ready();
    assert_eq!(r.persist.len(), 1);
    assert!(matches!(
        answer_to(&r.stanzas, "s3"),
        Some(Iq::Result { .. })
    ));
    // The store cannot be read: try again (wait), nothing stored.
    set(&mut w, "s4", keyed().into());
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Err("connection refused".into()), w.now);
    let r = w.ready();
    assert!(!r.must_store());
    let Some(Iq::Error { error, .. }) = answer_to(&r.stanzas, "s4") else {
        panic!("refused: {:?}", r.stanzas);
    };
    assert_eq!(
        (error.type_, error.defined_condition),
        (ErrorType::Wait, DefinedCondition::ServiceUnavailable)
    );

    // <status/>: read from the store; another submitter's job is not this one's to see.
    get(
        &mut w,
        "q1",
        spine_protocol::Status {
            job: known.id.clone(),
        }
        .into(),
    );
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Ok(Some(known.clone())), w.now);
    let r = w.ready();
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&r.stanzas, "q1")
    else {
        panic!("a status: {:?}", r.stanzas);
    };
    let st = spine_protocol::JobStatus::try_from(el).unwrap();
    assert_eq!((st.job, st.state), (known.id.clone(), JobState::Running));
    let theirs = stored_job(&mut w, "other@localhost", JobState::Running);
    get(
        &mut w,
        "q2",
        spine_protocol::Status {
            job: theirs.id.clone(),
        }
        .into(),
    );
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Ok(Some(theirs.clone())), w.now);
    let Some(Iq::Error { error, .. }) = answer_to(&w.ready().stanzas, "q2") else {
        panic!("refused");
    };
    let e = SpineError::from_stanza_error(&error).unwrap().unwrap();
    assert_eq!(e.condition, Condition::NotAuthorized);
    get(
        &mut w,
        "q3",
        spine_protocol::Status {
            job: "nosuchjob".parse().unwrap(),
        }
        .into(),
    );
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Ok(None), w.now);
    let Some(Iq::Error { error, .. }) = answer_to(&w.ready().stanzas, "q3") else {
        panic!("unknown");
    };
    let e = SpineError::from_stanza_error(&error).unwrap().unwrap();
    assert_eq!(e.condition, Condition::UnknownJob);

    // <cancel/>: read, checked, passed on to the leader through the store, then answered.
    set(
        &mut w,
        "c1",
        spine_protocol::Cancel {
            job: known.id.clone(),
        }
        .into(),
    );
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Ok(Some(known.clone())), w.now);
    assert!(
        answer_to(&w.ready().stanzas, "c1").is_none(),
        "not before it is passed on"
    );
    let l = w.core.take_lookups().remove(0);
    assert!(
        matches!(&l.what, standby::LookupFor::PassCancel { job } if *job == known.id),
        "{l:?}"
    );
    w.core.looked_up(l, Ok(None), w.now);
    assert!(matches!(
        answer_to(&w.ready().stanzas, "c1"),
        Some(Iq::Result { payload: None, .. })
    ));
    // An ended job keeps its outcome: answered without passing anything on.
    let ended = stored_job(&mut w, "webapp@localhost", JobState::Succeeded);
    set(
        &mut w,
        "c2",
        spine_protocol::Cancel {
            job: ended.id.clone(),
        }
        .into(),
    );
    let l = w.core.take_lookups().remove(0);
    w.core.looked_up(l, Ok(Some(ended)), w.now);
    assert!(w.core.take_lookups().is_empty());
    assert!(matches!(
        answer_to(&w.ready().stanzas, "c2"),
        Some(Iq::Result { payload: None, .. })
    ));

    // <discover/>: from the fleet the standby keeps warm.
    let d = spine_protocol::Discover {
        capability: CAP.parse().unwrap(),
        filter: None,
        sort: None,
        limit: None,
    };
    get(&mut w, "d1", d.into());
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&w.ready().stanzas, "d1")
    else {
        panic!("agents");
    };
    assert_eq!(
        spine_protocol::Agents::try_from(el).unwrap().agents.len(),
        2
    );

    // A large input's chunks, then its <submit/>: kept here until the submission takes
    // them, and stored with its job for the leader.
    let input: Vec<u8> = (0..INLINE_LIMIT * 2 + 7).map(|i| (i % 251) as u8).collect();
    let blob: spine_protocol::BlobId = "in1".parse().unwrap();
    for (n, c) in spine_protocol::chunks(&blob, &input)
        .into_iter()
        .enumerate()
    {
        let cid = format!("c{n}");
        set(&mut w, &cid, c.into());
        assert!(
            matches!(answer_to(&w.ready().stanzas, &cid), Some(Iq::Result { .. })),
            "chunk {n} taken"
        );
    }
    let big = spine_protocol::Submit {
        input: Some(Data::Blob(spine_protocol::BlobRef {
            blob,
            size: input.len() as u64,
            sha256: <sha2::Sha256 as sha2::Digest>::digest(&input).into(),
            mime: None,
        })),
        ..spine_protocol::Submit::new(CAP.parse().unwrap())
    };
    set(&mut w, "b1", big.into());
    let r = w.ready();
    let Some(Iq::Result {
        payload: Some(el), ..
    }) = answer_to(&r.stanzas, "b1")
    else {
        panic!("accepted: {:?}", r.stanzas);
    };
    let job = spine_protocol::Accepted::try_from(el).unwrap().job;
    assert!(r.persist.contains(&job), "stored for the leader");
    assert_eq!(
        w.core
            .record(&job)
            .unwrap()
            .spec
            .input
            .stored()
            .map(|b| b.size),
        Some(input.len() as u64),
        "with its input"
    );

    // Events stay the leader's: refused, naming it.
    let event = spine_protocol::events::Event {
        id: "e1".into(),
        source: "/test".into(),
        ty: "thing.happened".into(),
        subject: None,
        time: None,
        data: Default::default(),
    };
    set(&mut w, "e1", event.into());
    let Some(Iq::Error { error, .. }) = answer_to(&w.ready().stanzas, "e1") else {
        panic!("refused");
    };
    let text = error.texts.values().next().cloned().unwrap_or_default();
    assert!(text.contains("dispatcher@localhost/d1"), "{text}");
}

#[test]
fn a_standby_bounds_the_reads_it_waits_for() {
    let mut w = standby_world();
    let me: Jid = "webapp@localhost/app".parse().unwrap();
    for i in 0..=standby::MAX_LOOKUPS {
        let iq = Iq::from_get(
            format!("q{i}"),
            spine_protocol::Status {
                job: "somejob".parse().unwrap(),
            },
        )
        .with_from(me.clone());
        w.core.stanza(iq.into(), w.now);
    }
    assert_eq!(w.core.take_lookups().len(), standby::MAX_LOOKUPS);
    let last = format!("q{}", standby::MAX_LOOKUPS);
    let Some(Iq::Error { error, .. }) = answer_to(&w.ready().stanzas, &last) else {
        panic!("the one over the bound is refused");
    };
    assert_eq!(error.type_, ErrorType::Wait);
}

#[test]
fn the_leader_holds_the_queue_bounds_over_jobs_standbys_accepted() {
    // A standby counts only what it accepted itself; the leader, which holds the whole
    // queue, ends a job it takes over the bound as failed, queue-full.
    let mut cfg = config();
    cfg.max_queue = 2;
    cfg.submitter_max_queued = crate::policy::QueueShare::Percent(100);
    let mut w = World::with(cfg, Restored::default());
    // Three jobs a standby stored (made by another core, queued there).
    let mut standby = World::new();
    let records: Vec<crate::jobs::JobRecord> = (0..3)
        .map(|_| {
            let (id, _) = standby.submit_waiting(spec(CAP), true).unwrap();
            standby.core.record(&id).unwrap().clone()
        })
        .collect();
    let ids: Vec<JobId> = records.iter().map(|r| r.id.clone()).collect();
    let taken = w.core.adopt(records, w.now);
    assert_eq!(taken, ids, "all three taken");
    assert_eq!(w.state(&ids[0]), JobState::Queued);
    assert_eq!(w.state(&ids[1]), JobState::Queued);
    assert_eq!(w.state(&ids[2]), JobState::Failed);
    let rec = w.core.record(&ids[2]).unwrap();
    match &rec.outcome {
        Some(crate::jobs::Recorded::Failure {
            condition, message, ..
        }) => {
            assert_eq!(*condition, Condition::QueueFull);
            let m = message.clone().unwrap_or_default();
            assert!(m.contains("accepted by a standby"), "{m}");
        }
        other => panic!("failed queue-full: {other:?}"),
    }
    let r = w.ready();
    assert!(r.persist.contains(&ids[2]), "its end is stored");
    assert!(
        r.events
            .iter()
            .any(|e| e.job == ids[2] && e.kind == EventKind::Final),
        "and told"
    );
}

#[test]
fn xmpp_changes_are_refused_at_once_while_the_store_cannot_be_reached() {
    let mut w = World::new();
    w.agent(1, 2);
    w.ready();
    w.core.set_store_down(true);
    let from: Jid = "webapp@localhost/app".parse().unwrap();
    let iq = Iq::from_set("s1", spine_protocol::Submit::new(CAP.parse().unwrap()))
        .with_from(from.clone());
    w.core.stanza(iq.into(), w.now);
    // The refusal leaves at once, not behind a commit; nothing is accepted.
    let now = w.core.take_now();
    let Some(Stanza::Iq(Iq::Error { error, .. })) = now.first() else {
        panic!("refused now: {now:?}");
    };
    assert_eq!(
        (error.type_.clone(), error.defined_condition.clone()),
        (ErrorType::Wait, DefinedCondition::ServiceUnavailable)
    );
    assert!(!w.ready().must_store());
    // A read is answered as ever; once the store is back, submissions are accepted.
    w.core.set_store_down(false);
    let answer = xmpp_submit(
        &mut w,
        "s2",
        spine_protocol::Submit::new(CAP.parse().unwrap()),
    );
    assert!(matches!(answer, Iq::Result { .. }), "{answer:?}");
}

#[test]
fn job_ids_are_hyphenated_hex_of_their_value() {
    let split = |v: u128| {
        let h = format!("{v:032x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    };
    let mut v: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
    for _ in 0..1000 {
        assert_eq!(hyphenated(v), split(v));
        v = v
            .wrapping_mul(0x2545_f491_4f6c_dd1d)
            .wrapping_add(0x9e37_79b9);
    }
    assert_eq!(hyphenated(0), "00000000-0000-0000-0000-000000000000");
    assert_eq!(
        hyphenated(u128::MAX),
        "ffffffff-ffff-ffff-ffff-ffffffffffff"
    );
}
