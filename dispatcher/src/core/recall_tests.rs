//! A new leader among several dispatchers learns from the agents where the last leader sent
//! jobs whose dispatch it had not stored ([`super::recall`], PROTOCOL.md §10.1).

use std::sync::Arc;
use std::time::Duration;

use jid::{FullJid, Jid};
use spine_protocol::{Had, JobId, JobState, ProtocolVersion, Recalled};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

use super::data::DataPlane;
use super::recall::RECALL_TIMEOUT;
use super::tests::{jobs_sent, spec, standby_core, World};
use super::*;
use crate::signing::UrlKey;

const CAP: &str = "c.work";

/// A standby (one of several dispatchers) offering the fast path, so it speaks 1.2 to agents
/// that do; agents come with `protocol`.
fn several(protocol: ProtocolVersion) -> World {
    let mut w = World::new();
    w.core = standby_core(&w);
    w.core.set_data_plane(DataPlane {
        base: "http://127.0.0.1:8080".into(),
        key: Arc::new(UrlKey::from_bytes([3; 32])),
        ttl: Duration::from_secs(300),
    });
    w.core.session_started(w.now);
    w.protocol = protocol;
    w
}

/// The `<recall/>` questions among stanzas: (IQ id, agent).
fn recalls(stanzas: &[Stanza]) -> Vec<(String, FullJid)> {
    stanzas
        .iter()
        .filter_map(|s| match s {
            Stanza::Iq(Iq::Get {
                id, to, payload, ..
            }) if payload.is("recall", spine_protocol::NS) => {
                Some((id.clone(), to.clone()?.try_into_full().ok()?))
            }
            _ => None,
        })
        .collect()
}

/// The standby wins, the store holding `jobs`.
fn lead_with(w: &mut World, jobs: Vec<crate::jobs::JobRecord>) {
    w.core.lead(
        Restored {
            jobs,
            ..Restored::default()
        },
        w.now,
    );
    w.core.recover(Vec::new(), w.now);
    w.tick();
}

fn answer(w: &mut World, iq: &str, from: &FullJid, jobs: Vec<(JobId, u64)>) {
    let r = Recalled {
        jobs: jobs
            .into_iter()
            .map(|(job, attempt)| Had { job, attempt })
            .collect(),
    };
    let st = Iq::from_result(iq.to_owned(), Some(r)).with_from(Jid::from(from.clone()));
    w.core.stanza(st.into(), w.now);
}

/// A leader (on `protocol` agents) accepts a job while no agent is there (stored queued), then
/// agent 1 comes and the job is placed on it. The stored record, and whether the request
/// left ahead of the dispatch's commit.
fn leader_sends_one(protocol: ProtocolVersion) -> (crate::jobs::JobRecord, bool, FullJid) {
    let mut w = several(protocol);
    w.core.lead(Restored::default(), w.now);
    w.ready();
    let (id, _) = w.submit_waiting(spec(CAP), true).expect("accepted");
    w.ready();
    let stored = w.core.record(&id).expect("held").clone();
    assert_eq!(stored.state, JobState::Queued);
    let a = w.agent(1, 2);
    let early = w.core.take_early();
    let ahead = !jobs_sent(&early.stanzas).is_empty();
    if !ahead {
        let after = jobs_sent(&w.ready().stanzas);
        assert_eq!(after.len(), 1, "sent after the commit");
    }
    (stored, ahead, a)
}

#[test]
fn a_leader_sends_ahead_only_to_agents_that_answer_recall() {
    let (_, ahead, _) = leader_sends_one(ProtocolVersion::V1_2);
    assert!(
        ahead,
        "a 1.2 agent gets the job before its dispatch is stored"
    );
    let (_, ahead, _) = leader_sends_one(ProtocolVersion::V1_1);
    assert!(!ahead, "a 1.1 agent gets it only after the commit");
    // A lone dispatcher sends ahead whatever the agent (its own file records it).
    let mut lone = World::new();
    lone.agent(1, 2);
    lone.ready();
    lone.submit(spec(CAP)).expect("accepted");
    assert_eq!(jobs_sent(&lone.core.take_early().stanzas).len(), 1);
}

#[test]
fn a_new_leader_sends_a_job_the_last_one_sent_ahead_back_to_its_agent() {
    let (stored, ahead, a) = leader_sends_one(ProtocolVersion::V1_2);
    assert!(ahead);
    let id = stored.id.clone();
    // The leader dies before its commit: the store says queued. A standby that knows both
    // agents wins.
    let mut w = several(ProtocolVersion::V1_2);
    let b = w.agent(2, 4);
    assert_eq!(w.agent(1, 2), a);
    w.ready();
    lead_with(&mut w, vec![stored.clone()]);
    let r = w.ready();
    assert!(
        jobs_sent(&r.stanzas).is_empty(),
        "held back: {:?}",
        r.stanzas
    );
    let mut asked = recalls(&r.stanzas);
    asked.sort_by(|x, y| x.1.cmp(&y.1));
    assert_eq!(
        asked.iter().map(|(_, j)| j.clone()).collect::<Vec<_>>(),
        vec![a.clone(), b.clone()]
    );
    // A job submitted now is placed at once (on idle agent 2).
    let (fresh, _) = w.submit(spec(CAP)).expect("accepted");
    let sent = jobs_sent(&w.ready().stanzas);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].job.id, fresh);
    // Agent 2 has none of the old ones; agent 1 has it, attempt 1.
    answer(&mut w, &asked[1].0, &b, vec![]);
    assert!(
        jobs_sent(&w.ready().stanzas).is_empty(),
        "agent 1 not answered yet"
    );
    // An answer from someone else than the agent asked is not one.
    answer(&mut w, &asked[0].0, &b, vec![(id.clone(), 1)]);
    assert!(jobs_sent(&w.ready().stanzas).is_empty());
    answer(&mut w, &asked[0].0, &a, vec![(id.clone(), 1)]);
    let back = jobs_sent(&w.ready().stanzas);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(
        back[0].to, a,
        "back to the agent that has it, not idle agent 2"
    );
    assert_eq!(back[0].job.id, id);
    assert_eq!(
        back[0].job.attempt, 1,
        "the same attempt: the agent attaches it"
    );
}

#[test]
fn a_silent_agent_holds_the_queued_jobs_back_only_until_the_timeout() {
    let (stored, _, a) = leader_sends_one(ProtocolVersion::V1_2);
    let mut w = several(ProtocolVersion::V1_2);
    assert_eq!(w.agent(1, 2), a);
    w.ready();
    lead_with(&mut w, vec![stored.clone()]);
    let r = w.ready();
    assert_eq!(recalls(&r.stanzas).len(), 1);
    assert!(jobs_sent(&r.stanzas).is_empty());
    w.advance(RECALL_TIMEOUT.as_millis() as u64 / 2);
    w.tick();
    assert!(jobs_sent(&w.ready().stanzas).is_empty(), "still waiting");
    w.advance(RECALL_TIMEOUT.as_millis() as u64);
    w.tick();
    let sent = jobs_sent(&w.ready().stanzas);
    assert_eq!(sent.len(), 1, "placed once the round gave up");
    assert_eq!(sent[0].job.id, stored.id);
}

#[test]
fn a_new_leader_asks_nothing_of_agents_that_do_not_speak_1_2() {
    let (stored, _, a) = leader_sends_one(ProtocolVersion::V1_1);
    let mut w = several(ProtocolVersion::V1_1);
    assert_eq!(w.agent(1, 2), a);
    w.ready();
    lead_with(&mut w, vec![stored]);
    let r = w.ready();
    assert!(recalls(&r.stanzas).is_empty());
    assert_eq!(jobs_sent(&r.stanzas).len(), 1, "placed at once");
}

#[test]
fn a_standbys_job_the_last_leader_sent_ahead_goes_back_when_taken_after_the_answers() {
    // The dead leader had taken a standby's job and sent it ahead to agent 1; the job is
    // still in the standbys' table (queued, attempt 0), so the new leader takes it again.
    let (stored, _, a) = leader_sends_one(ProtocolVersion::V1_2);
    let id = stored.id.clone();
    let mut w = several(ProtocolVersion::V1_2);
    assert_eq!(w.agent(1, 2), a);
    let b = w.agent(2, 4);
    w.ready();
    lead_with(&mut w, Vec::new());
    let mut asked = recalls(&w.ready().stanzas);
    asked.sort_by(|x, y| x.1.cmp(&y.1));
    assert_eq!(asked.len(), 2, "asked even with nothing queued: {asked:?}");
    answer(&mut w, &asked[0].0, &a, vec![(id.clone(), 1)]);
    answer(&mut w, &asked[1].0, &b, vec![]);
    w.ready();
    // Taken from the standbys' table after the round: back to agent 1, not to idle agent 2.
    w.core.adopt(vec![stored.clone()], w.now);
    let back = jobs_sent(&w.ready().stanzas);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].to, a);
    assert_eq!(back[0].job.attempt, 1);

    // Taken while the agents are still answering: it waits for them.
    let mut w = several(ProtocolVersion::V1_2);
    assert_eq!(w.agent(1, 2), a);
    w.agent(2, 4);
    w.ready();
    lead_with(&mut w, Vec::new());
    let mut asked = recalls(&w.ready().stanzas);
    asked.sort_by(|x, y| x.1.cmp(&y.1));
    w.core.adopt(vec![stored], w.now);
    assert!(jobs_sent(&w.ready().stanzas).is_empty(), "held back");
    answer(&mut w, &asked[1].0, &b, vec![]);
    answer(&mut w, &asked[0].0, &a, vec![(id, 1)]);
    let back = jobs_sent(&w.ready().stanzas);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].to, a);
}
