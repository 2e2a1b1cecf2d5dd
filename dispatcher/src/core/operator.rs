//! The operator's drain and undrain of one agent (PROTOCOL.md §5.6): the request from the HTTP
//! API ([`ApiRequest::SetAgentState`](super::ApiRequest)) becomes a `<drain/>` or
//! `<undrain/>` IQ to the agent, and its answer — or its absence after [`STATE_TIMEOUT`] —
//! becomes the API's reply.
//!
//! Part of the [`Core`]: the request goes out with the other stanzas of its batch; the
//! inbound classifier ([`super::inbound`]) hands the agent's answer here, counted only from
//! the agent the request went to; [`Core::tick`](super::Core::tick) gives up on silent agents
//! at the deadline [`Core::next_wake`](super::Core::next_wake) wakes for. On success the
//! registry records the agent's new state at once (placement skips a draining agent), and an
//! undrained agent is offered queued jobs again.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use jid::{FullJid, Jid};
use spine_protocol::{AgentState, Condition, Drain, SpineError, Undrain};
use tracing::{info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::{DefinedCondition, StanzaError};

use super::api::StateError;
use super::{ApiReply, ApiToken, Core, Now};
use crate::registry::Unresolved;

/// How long the dispatcher waits for an agent's answer to a drain or undrain. An agent
/// answers at once (it changes a flag and sends a load); ten seconds cover a loaded server.
pub(crate) const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// A drain or undrain waiting for the agent's answer.
#[derive(Debug)]
pub(crate) struct Pending {
    token: ApiToken,
    agent: FullJid,
    drain: bool,
    deadline: Instant,
}

/// The drains and undrains in flight, by IQ id, with their deadlines in time order.
#[derive(Debug, Default)]
pub(crate) struct StateRequests {
    by_id: HashMap<String, Pending>,
    deadlines: BTreeSet<(Instant, String)>,
}

impl StateRequests {
    /// The request `id` answered by `from`, taken out; `None` when `id` is not one of ours.
    /// An answer from anyone but the agent is `Some(Err(()))` and leaves the request waiting.
    pub(crate) fn take(&mut self, id: &str, from: Option<&Jid>) -> Option<Result<Pending, ()>> {
        let p = self.by_id.get(id)?;
        if from.is_none_or(|f| f.as_str() != p.agent.as_str()) {
            return Some(Err(()));
        }
        let p = self.by_id.remove(id)?;
        self.deadlines.remove(&(p.deadline, id.to_owned()));
        Some(Ok(p))
    }

    /// When the first request in flight times out.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    fn overdue(&mut self, now: Instant) -> Vec<Pending> {
        let mut out = Vec::new();
        while let Some((t, id)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            out.extend(self.by_id.remove(&id));
        }
        out
    }
}

/// What the agent's error means to the operator.
fn refusal(agent: &FullJid, e: &StanzaError) -> StateError {
    let agent = agent.to_string();
    let spine = SpineError::from_stanza_error(e).ok().flatten();
    let text = spine
        .as_ref()
        .and_then(|s| s.text.clone())
        .or_else(|| e.texts.values().next().cloned())
        .unwrap_or_default();
    let not_supported = matches!(e.defined_condition, DefinedCondition::FeatureNotImplemented)
        || spine
            .as_ref()
            .is_some_and(|s| s.condition == Condition::Malformed);
    if not_supported {
        return StateError::NotSupported { agent, said: text };
    }
    if spine.is_none()
        && matches!(
            e.defined_condition,
            DefinedCondition::ServiceUnavailable | DefinedCondition::RecipientUnavailable
        )
    {
        // Spine agents always add their condition: this is the server, for an agent that is
        // offline, or an implementation that knows no Spine request at all.
        return StateError::Refused {
            agent,
            condition: "service-unavailable".into(),
            text: if text.is_empty() {
                "the agent is not online, or does not take Spine requests (the server answered for it)".into()
            } else {
                text
            },
        };
    }
    let condition = match &spine {
        Some(s) => s.condition.to_string(),
        None => format!("{:?}", e.defined_condition),
    };
    StateError::Refused {
        agent,
        condition,
        text,
    }
}

impl Core {
    /// An operator's drain or undrain of `agent`: the IQ goes out, the answer comes in
    /// [`Core::state_answered`] or [`Core::expire_state_requests`].
    pub(super) fn set_agent_state(
        &mut self,
        token: ApiToken,
        agent: &Jid,
        drain: bool,
        reason: Option<String>,
        now: Now,
    ) {
        let full = match self.registry.resolve(agent) {
            Ok(f) => f,
            Err(Unresolved::Unknown) => {
                let e = StateError::UnknownAgent(agent.to_string());
                self.ready
                    .replies
                    .push((token, ApiReply::AgentState(Err(e))));
                return;
            }
            Err(Unresolved::Ambiguous(agents)) => {
                let e = StateError::Ambiguous {
                    given: agent.to_string(),
                    agents,
                };
                self.ready
                    .replies
                    .push((token, ApiReply::AgentState(Err(e))));
                return;
            }
        };
        let id = self.requests.id("s");
        let to: Jid = full.clone().into();
        let iq = if drain {
            Iq::from_set(id.clone(), Drain { reason }).with_to(to)
        } else {
            Iq::from_set(id.clone(), Undrain).with_to(to)
        };
        self.send(iq);
        let deadline = now.mono + STATE_TIMEOUT;
        self.state_requests.deadlines.insert((deadline, id.clone()));
        self.state_requests.by_id.insert(
            id,
            Pending {
                token,
                agent: full,
                drain,
                deadline,
            },
        );
    }

    /// The agent answered a drain or undrain: on success its new state counts at once.
    pub(super) fn state_answered(&mut self, p: Pending, answer: Result<(), StanzaError>) {
        let reply = match answer {
            Ok(()) => {
                let state = if p.drain {
                    AgentState::Draining
                } else {
                    AgentState::Ready
                };
                self.registry.on_state(&p.agent, state);
                info!(agent = %p.agent, %state, "agent state set by an operator");
                if !p.drain {
                    self.place_pending = true;
                }
                // The agent may have gone between its answer and now: then it is unknown.
                self.registry
                    .info(&p.agent)
                    .ok_or_else(|| StateError::UnknownAgent(p.agent.to_string()))
            }
            Err(e) => {
                let e = refusal(&p.agent, &e);
                warn!(agent = %p.agent, drain = p.drain, "agent did not change its state: {e:?}");
                Err(e)
            }
        };
        self.ready
            .replies
            .push((p.token, ApiReply::AgentState(reply)));
    }

    /// Drains and undrains unanswered for [`STATE_TIMEOUT`] are answered as such.
    pub(super) fn expire_state_requests(&mut self, now: Now) {
        for p in self.state_requests.overdue(now.mono) {
            warn!(agent = %p.agent, drain = p.drain, "no answer from the agent to a drain or undrain");
            let e = StateError::NoAnswer {
                agent: p.agent.to_string(),
                waited_ms: STATE_TIMEOUT.as_millis() as u64,
            };
            self.ready
                .replies
                .push((p.token, ApiReply::AgentState(Err(e))));
        }
    }
}

#[cfg(test)]
mod tests {
    use spine_protocol::JobState;
    use tokio_xmpp::Stanza;
    use xmpp_parsers::iq::Iq;

    use super::super::tests::{jobs_sent, spec, World};
    use super::*;

    /// The drain or undrain IQs among stanzas: (id, to, element name).
    fn state_iqs(stanzas: &[Stanza]) -> Vec<(String, Jid, String)> {
        stanzas
            .iter()
            .filter_map(|s| match s {
                Stanza::Iq(Iq::Set {
                    id, to, payload, ..
                }) if payload.is("drain", spine_protocol::NS)
                    || payload.is("undrain", spine_protocol::NS) =>
                {
                    Some((id.clone(), to.clone()?, payload.name().to_owned()))
                }
                _ => None,
            })
            .collect()
    }

    fn ask(w: &mut World, token: ApiToken, agent: &str, drain: bool) {
        let req = super::super::ApiRequest::SetAgentState {
            agent: agent.parse().unwrap(),
            drain,
            reason: drain.then(|| "rack 4".to_owned()),
        };
        w.core.api(token, req, w.now);
    }

    fn answer(w: &mut World, id: &str, from: &FullJid, error: Option<SpineError>) {
        let from = Jid::from(from.clone());
        let iq = match error {
            None => Iq::empty_result(w.core_jid(), id.to_owned()).with_from(from),
            Some(e) => Iq::from_error(id.to_owned(), StanzaError::from(e)).with_from(from),
        };
        w.core.stanza(iq.into(), w.now);
    }

    impl World {
        fn core_jid(&self) -> Jid {
            "dispatcher@localhost/d1".parse().unwrap()
        }
    }

    #[test]
    fn a_drained_agent_gets_no_new_jobs_until_it_is_undrained() {
        let mut w = World::new();
        let a = w.agent(1, 4);
        let b = w.agent(2, 4);
        w.ready();
        ask(&mut w, 1, "agent1@localhost", true);
        let r = w.ready();
        assert!(r.replies.is_empty(), "answered when the agent answers");
        let sent = state_iqs(&r.stanzas);
        assert_eq!(sent.len(), 1);
        let (id, to, name) = &sent[0];
        assert_eq!((to.as_str(), name.as_str()), (a.as_str(), "drain"));
        // An answer from someone else does not count.
        answer(&mut w, id, &b, None);
        assert!(w.ready().replies.is_empty());
        answer(&mut w, id, &a, None);
        let r = w.ready();
        let [(1, ApiReply::AgentState(Ok(info)))] = r.replies.as_slice() else {
            panic!("the agent's view: {:?}", r.replies);
        };
        assert_eq!(info.state, AgentState::Draining);
        assert_eq!(info.jid.as_str(), a.as_str());
        // Every job now goes to b, though a is idle and was as good a choice.
        for _ in 0..4 {
            w.submit(spec(super::super::tests::CAP)).unwrap();
        }
        let sent = jobs_sent(&w.ready().stanzas);
        assert_eq!(sent.len(), 4);
        assert!(sent.iter().all(|s| s.to == b), "{sent:?}");
        // b is full: the next job waits rather than going to the drained a.
        let (queued, state) = w.submit(spec(super::super::tests::CAP)).unwrap();
        assert_eq!(state, JobState::Queued);
        assert!(jobs_sent(&w.ready().stanzas).is_empty());
        // Undrain: a takes the queued job at once.
        ask(&mut w, 2, a.as_str(), false);
        let sent = state_iqs(&w.ready().stanzas);
        assert_eq!(sent[0].2, "undrain");
        answer(&mut w, &sent[0].0, &a, None);
        let r = w.ready();
        assert!(matches!(
            r.replies.as_slice(),
            [(2, ApiReply::AgentState(Ok(i)))] if i.state == AgentState::Ready
        ));
        let sent = jobs_sent(&r.stanzas);
        assert_eq!(sent.len(), 1);
        assert_eq!((&sent[0].to, &sent[0].job.id), (&a, &queued));
    }

    #[test]
    fn unknown_ambiguous_silent_refusing_and_old_agents_are_told_apart() {
        let mut w = World::new();
        let a = w.agent(1, 1);
        w.ready();
        ask(&mut w, 1, "nobody@localhost/w", true);
        let r = w.ready();
        assert!(state_iqs(&r.stanzas).is_empty());
        assert!(matches!(
            r.replies.as_slice(),
            [(1, ApiReply::AgentState(Err(StateError::UnknownAgent(j))))] if j == "nobody@localhost/w"
        ));
        // Refused for not being one of its dispatchers.
        ask(&mut w, 2, a.as_str(), true);
        let id = state_iqs(&w.ready().stanzas)[0].0.clone();
        answer(
            &mut w,
            &id,
            &a,
            Some(SpineError::new(Condition::NotAuthorized)),
        );
        assert!(matches!(
            w.ready().replies.as_slice(),
            [(2, ApiReply::AgentState(Err(StateError::Refused { condition, .. })))] if condition == "not-authorized"
        ));
        // An agent from before drain answers malformed (an unknown element).
        ask(&mut w, 3, a.as_str(), true);
        let id = state_iqs(&w.ready().stanzas)[0].0.clone();
        let old = SpineError::new(Condition::Malformed).with_text(
            "expected <a Spine payload xmlns='urn:spine:1'>, found <drain xmlns='urn:spine:1'>",
        );
        answer(&mut w, &id, &a, Some(old));
        assert!(matches!(
            w.ready().replies.as_slice(),
            [(3, ApiReply::AgentState(Err(StateError::NotSupported { said, .. })))] if said.contains("found <drain")
        ));
        // Silence: answered after the timeout, which the driver's wake covers.
        ask(&mut w, 4, a.as_str(), true);
        w.ready();
        assert!(w.core.next_wake(w.now) <= STATE_TIMEOUT);
        w.advance(STATE_TIMEOUT.as_millis() as u64 - 1);
        w.tick();
        assert!(w.ready().replies.is_empty());
        w.advance(1);
        w.tick();
        assert!(matches!(
            w.ready().replies.as_slice(),
            [(
                4,
                ApiReply::AgentState(Err(StateError::NoAnswer {
                    waited_ms: 10_000,
                    ..
                }))
            )]
        ));
        // Two agents on one account: the bare JID names neither.
        let mut w = World::new();
        w.agent(1, 1);
        let p = xmpp_parsers::presence::Presence::available()
            .with_from(Jid::new("agent1@localhost/x").unwrap())
            .with_payloads(vec![
                spine_protocol::Advertise {
                    protocol: spine_protocol::ProtocolVersion::CURRENT,
                    instance: "other".into(),
                    gen: 1,
                    slots: 1,
                    heartbeat_ms: 1000,
                    attrs: Default::default(),
                    serves: None,
                    capabilities: vec![spine_protocol::CapabilityAd::new(
                        super::super::tests::CAP.parse().unwrap(),
                    )],
                }
                .into(),
                super::super::tests::load(1, 1, 0).into(),
            ]);
        w.core.stanza(p.into(), w.now);
        w.ready();
        ask(&mut w, 5, "agent1@localhost", true);
        assert!(matches!(
            w.ready().replies.as_slice(),
            [(5, ApiReply::AgentState(Err(StateError::Ambiguous { agents, .. })))] if agents.len() == 2
        ));
    }
}
