//! The fleet: agents' presence (advertisements and load reports) into the registry, the
//! hello that asks agents to advertise, and liveness (a silent agent is pinged, and declared
//! gone when it does not answer).
//!
//! Inputs come from [`super::inbound`] (presence, ping answers) and [`super::Core::tick`]
//! (silence, ping timeouts). An agent that goes away hands its jobs to
//! [`super::outcomes`] to be retried; an agent that comes or reports room sets placement
//! going ([`super::place`]).

use jid::{FullJid, Jid};
use spine_protocol::{presence_payloads, DispatcherHello, JobId, ProtocolVersion};
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::{Presence, Type as PresenceType};

use super::outcomes::Settled;
use super::{bare, Core, Now};
use crate::registry::{AdvertiseOutcome, LoadOutcome};

/// Agents greeted after a restart: those seen in the last day.
const GREET_WITHIN_MS: u64 = 86_400_000;

impl Core {
    /// Initial presence, then a hello to every agent seen in the last day.
    pub(super) fn greet_fleet(&mut self, now: Now) {
        self.send(Presence::available());
        let since = now.ms.saturating_sub(GREET_WITHIN_MS);
        let mut agents: Vec<&String> = self
            .known_agents
            .iter()
            .filter(|(_, t)| **t >= since)
            .map(|(a, _)| a)
            .collect();
        agents.sort();
        let hellos: Vec<Jid> = agents
            .into_iter()
            .filter_map(|a| bare(a))
            .map(Jid::from)
            .collect();
        for to in hellos {
            self.hello(to);
        }
    }

    /// Asks an agent (or every resource of an account) to advertise (PROTOCOL.md §4.4).
    pub(super) fn hello(&mut self, to: Jid) {
        // 1.1 when this dispatcher offers the fast path for large payloads (PROTOCOL.md
        // §13.4); agents then use its constructs toward us.
        let protocol = if self.offers_references() {
            ProtocolVersion::V1_2
        } else {
            ProtocolVersion::CURRENT
        };
        self.send(
            Presence::available()
                .with_to(to)
                .with_payload(DispatcherHello { protocol }),
        );
    }

    pub(super) fn on_presence(&mut self, p: Presence, now: Now) {
        let Some(Ok(from)) = p.from.clone().map(Jid::try_into_full) else {
            return;
        };
        if p.type_ == PresenceType::Unavailable {
            if self.registry.id_of(&from).is_some() {
                self.agent_gone(&from, "went unavailable", now);
            }
            return;
        }
        let Some(allowed) = self.policy.agent(&from.to_bare()) else {
            if presence_payloads(&p.payloads).is_ok_and(|f| f.advertise.is_some()) {
                warn!(from = %from, "ignoring an advertisement from an account not allowed as an agent (see `agents` and [[agent]])");
            }
            return;
        };
        let found = match presence_payloads(&p.payloads) {
            Ok(f) => f,
            Err(e) => {
                warn!(from = %from, "ignoring presence: {e}");
                return;
            }
        };
        match (found.advertise, found.load) {
            (Some(mut ad), Some(load)) => {
                // Capabilities this account may not offer are dropped, each with a warning;
                // an agent left with none is not registered.
                ad.capabilities.retain(|c| {
                    let ok = allowed.allows(&c.name);
                    if !ok {
                        warn!(agent = %from, capability = %c.name, "ignoring a capability this agent is not allowed to offer (see [[agent]])");
                    }
                    ok
                });
                if ad.capabilities.is_empty() {
                    warn!(agent = %from, "ignoring an agent that offers no capability it is allowed to");
                    if self.registry.id_of(&from).is_some() {
                        self.agent_gone(&from, "no allowed capability", now);
                    }
                    return;
                }
                let outcome =
                    self.registry
                        .on_advertise(&from, &ad, &load, now.mono, &mut self.rng);
                let new = !matches!(outcome, AdvertiseOutcome::Updated(_));
                self.agent_version(&from, ad.protocol.minor, ad.serves.clone(), new);
                match outcome {
                    AdvertiseOutcome::Added(_) => {
                        info!(agent = %from, capabilities = ad.capabilities.len(), slots = ad.slots, "agent registered");
                        let account = from.to_bare().to_string();
                        self.known_agents.insert(account.clone(), now.ms);
                        self.ready.agents_seen.push((account, now.ms));
                    }
                    AdvertiseOutcome::Updated(_) => {}
                    AdvertiseOutcome::Restarted(_, lost) => {
                        warn!(agent = %from, lost = lost.len(), "agent restarted: retrying its jobs");
                        self.retry_lost(&from, lost, now);
                    }
                }
                // Capabilities offered for the first time are remembered across restarts.
                for c in self.registry.take_learned() {
                    self.ready.capabilities_learned.push((c, now.ms));
                }
                self.place_pending = true;
            }
            (None, Some(load)) => {
                match self.registry.on_load(&from, &load, now.mono, &mut self.rng) {
                    LoadOutcome::Updated => self.place_pending = true,
                    LoadOutcome::Stale => {}
                    LoadOutcome::NeedHello => self.hello(Jid::from(from)),
                }
            }
            _ => {}
        }
    }

    /// An agent's session ended (or it stopped answering): forget it and its requests, and
    /// retry its jobs elsewhere.
    pub(super) fn agent_gone(&mut self, agent: &FullJid, why: &str, now: Now) {
        let lost = self.registry.on_agent_gone(agent);
        info!(agent = %agent, jobs = lost.len(), "agent gone ({why})");
        self.requests.forget_agent(agent);
        self.http_agents.remove(agent);
        self.retry_lost(agent, lost, now);
        self.recall_agent_gone(agent, now);
    }

    /// Jobs that were on `agent` when it was lost: each attempt failed (retried or ended).
    pub(super) fn retry_lost(&mut self, agent: &FullJid, lost: Vec<JobId>, now: Now) {
        for job in lost {
            let after = self.jobs.attempt_failed(&job, Some(agent), None, now.ms);
            let settled = Settled::from_failure(after);
            if let Settled::Ended(state) = settled {
                info!(job = %job, %state, "job ended: its agent was lost");
            }
            // The registry already forgot the agent with its slots.
            self.settle(&job, None, settled, now);
        }
        self.place_pending = true;
    }

    /// A pinged agent answered: ask it for its load (it is no longer suspect once it reports).
    pub(super) fn ping_answered(&mut self, agent: FullJid) {
        debug!(agent = %agent, "silent agent answered a ping: asking for its load");
        self.hello(Jid::from(agent));
    }

    /// Agents silent for too long are pinged.
    pub(super) fn check_silent(&mut self, now: Now) {
        for agent in self.registry.check_silent(now.mono) {
            let id = self.requests.id("ping");
            self.requests.ping_sent(id.clone(), agent.clone(), now.mono);
            self.send(Iq::from_get(id, xmpp_parsers::ping::Ping).with_to(agent.into()));
        }
    }
}
