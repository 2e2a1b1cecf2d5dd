//! The registry of live agents and the placement decisions made from it: a pure state machine.
//!
//! Events in: [`Registry::on_advertise`], [`Registry::on_load`], [`Registry::on_assigned`],
//! [`Registry::on_finished`], [`Registry::on_agent_gone`], [`Registry::check_silent`].
//! Decisions out: [`Registry::pick`] and [`Registry::rank`]. Time is a parameter; nothing here
//! reads a clock, sends a stanza or spawns a task.
//!
//! **Known capabilities**: every capability an agent has offered since the dispatcher started,
//! plus those the store remembers from earlier runs ([`Registry::remember`]). A submission for
//! any other is refused at once ([`Registry::check_known`]: `unknown-capability`, naming the
//! known ones closest first) instead of waiting `no_agent_wait` for an agent never seen.
//! Capabilities learnt from advertisements are handed to the driver to store
//! ([`Registry::take_learned`]).
//!
//! **Load** is what makes least-loaded placement accurate (docs/PROTOCOL.md §5.4): for each
//! agent, effective in-flight = (its reported in-flight − the part it says came from us) +
//! the jobs we assigned to it and have not seen finish. Our own share is therefore exact at
//! every instant — a burst of jobs spreads across agents instead of piling onto the one that
//! looked idle at the last heartbeat — and other dispatchers' work is as fresh as the agent's
//! last report. Per capability with its own slot limit, effective in-flight is the larger of
//! the reported figure and our outstanding jobs of that capability.
//!
//! **Indexing**: per capability, a `BTreeSet` ordered by (load, load average, random salt), so
//! least-loaded `pick` walks from the least loaded agent and stops at the first eligible one
//! instead of scanning the fleet. The salt is redrawn on every update, which breaks ties at
//! random.

use crate::fastmap::HashMap;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use jid::FullJid;
use rand::Rng;
use spine_protocol::{
    Advertise, AgentState, AttrName, Attributes, CapabilityName, Filter, JobId, Load, Strategy,
};

/// Heartbeats an agent may miss before it is suspected and no longer picked.
pub const MISSED_HEARTBEATS: u32 = 3;

/// Index of an agent in the registry (stable while the agent is registered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(u32);

/// Load as a sortable integer: effective in-flight per slot, in millionths.
fn load_ppm(in_flight: u64, slots: u64) -> u64 {
    in_flight.saturating_mul(1_000_000) / slots.max(1)
}

/// Key of an agent in a capability's load index.
type LoadKey = (u64, u32, u32, AgentId);

#[derive(Debug, Clone)]
struct CapEntry {
    slots: Option<u64>,
    attrs: Attributes,
    reported_in_flight: u64,
}

#[derive(Debug, Clone)]
struct AgentEntry {
    jid: FullJid,
    instance: String,
    gen: u64,
    seq: u64,
    slots: u64,
    heartbeat: Duration,
    caps: HashMap<CapabilityName, CapEntry>,
    reported_in_flight: u64,
    reported_yours: u64,
    state: AgentState,
    loadavg: Option<f64>,
    mem_used: Option<u64>,
    mem_total: Option<u64>,
    last_seen: Instant,
    /// Silent for too long: not picked until it reports again.
    suspect: bool,
    /// Jobs we assigned and have not seen finish, with their capability.
    outstanding: HashMap<JobId, CapabilityName>,
    salt: u32,
    key: LoadKey,
    /// The registry's [`Registry::version`] when this entry last changed (the console's
    /// fleet stream sends only the agents changed since its last event).
    stamp: u64,
}

impl AgentEntry {
    fn effective_in_flight(&self) -> u64 {
        self.reported_in_flight.saturating_sub(self.reported_yours) + self.outstanding.len() as u64
    }

    fn cap_effective(&self, cap: &CapabilityName) -> u64 {
        let mine = self.outstanding.values().filter(|c| *c == cap).count() as u64;
        let reported = self.caps.get(cap).map_or(0, |c| c.reported_in_flight);
        reported.max(mine)
    }

    /// Can take one more job of `cap` now.
    fn has_room(&self, cap: &CapabilityName) -> bool {
        if self.state != AgentState::Ready
            || self.suspect
            || self.effective_in_flight() >= self.slots
        {
            return false;
        }
        match self.caps.get(cap).and_then(|c| c.slots) {
            Some(limit) => self.cap_effective(cap) < limit,
            None => true,
        }
    }

    fn compute_key(&self, id: AgentId) -> LoadKey {
        let la = self
            .loadavg
            .map_or(0, |l| (l * 1000.0).min(u32::MAX as f64) as u32);
        (
            load_ppm(self.effective_in_flight(), self.slots),
            la,
            self.salt,
            id,
        )
    }
}

#[derive(Debug, Default)]
struct CapIndex {
    by_load: BTreeSet<LoadKey>,
    members: Vec<AgentId>,
    cursor: usize,
}

/// What a load report meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// Applied.
    Updated,
    /// Older than what we have (or a duplicate): ignored.
    Stale,
    /// We do not know this agent or its advertisement generation: send it a hello.
    NeedHello,
}

/// What an advertisement meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdvertiseOutcome {
    /// A new agent.
    Added(AgentId),
    /// A known agent updated its advertisement.
    Updated(AgentId),
    /// The same full JID with a new instance: the agent restarted. These jobs were sent to the
    /// old process and will not finish: retry them.
    Restarted(AgentId, Vec<JobId>),
}

/// Placement request.
#[derive(Debug, Clone)]
pub struct PickRequest<'a> {
    /// The capability.
    pub capability: &'a CapabilityName,
    /// How to choose.
    pub strategy: Strategy,
    /// Which agents qualify.
    pub filter: Option<&'a Filter>,
    /// Prefer the lowest value of this numeric attribute, then the least loaded.
    pub sort: Option<&'a AttrName>,
    /// Key for the affinity strategy.
    pub affinity_key: Option<&'a str>,
    /// Agents not to use (they failed this job already).
    pub exclude: &'a [AgentId],
}

impl<'a> PickRequest<'a> {
    /// Least-loaded placement of `capability`, no filter.
    pub fn least_loaded(capability: &'a CapabilityName) -> Self {
        PickRequest {
            capability,
            strategy: Strategy::LeastLoaded,
            filter: None,
            sort: None,
            affinity_key: None,
            exclude: &[],
        }
    }
}

/// Why no agent was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// No registered agent offers the capability (or passes the filter).
    NoCapableAgent,
    /// Capable agents exist but none has a free slot now: queue the job.
    AllBusy,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Registry {
    agents: Vec<Option<AgentEntry>>,
    free_ids: Vec<AgentId>,
    by_jid: HashMap<FullJid, AgentId>,
    caps: HashMap<CapabilityName, CapIndex>,
    /// Capabilities offered since the start, or remembered from earlier runs: the ones a
    /// submission may name without `wait_for_agent`.
    known: BTreeSet<CapabilityName>,
    /// Capabilities first offered since the last [`Registry::take_learned`], to be stored.
    learned: Vec<CapabilityName>,
    /// Grows with every change of an agent (see [`Registry::version`]).
    clock: u64,
    /// Agents that left, with the version at which they left, oldest first (at most
    /// [`fleet::GONE_KEPT`]).
    gone: std::collections::VecDeque<(u64, FullJid)>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of registered agents.
    pub fn len(&self) -> usize {
        self.by_jid.len()
    }

    /// Every registered agent's (full JID, effective in-flight, slots), by JID: for the
    /// per-agent gauges of /metrics.
    pub fn loads(&self) -> Vec<(FullJid, u64, u64)> {
        let mut v: Vec<_> = self
            .by_jid
            .iter()
            .filter_map(|(jid, id)| {
                let a = self.get(*id)?;
                Some((jid.clone(), a.effective_in_flight(), a.slots))
            })
            .collect();
        v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        v
    }

    /// Whether no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.by_jid.is_empty()
    }

    /// The agent registered under `jid`.
    pub fn id_of(&self, jid: &FullJid) -> Option<AgentId> {
        self.by_jid.get(jid).copied()
    }

    /// The full JID of an agent.
    pub fn jid_of(&self, id: AgentId) -> Option<&FullJid> {
        self.get(id).map(|a| &a.jid)
    }

    /// Capabilities offered by at least one agent, with how many agents offer each.
    pub fn capabilities(&self) -> Vec<(CapabilityName, usize)> {
        let mut v: Vec<_> = self
            .caps
            .iter()
            .filter(|(_, i)| !i.members.is_empty())
            .map(|(c, i)| (c.clone(), i.members.len()))
            .collect();
        v.sort();
        v
    }

    fn get(&self, id: AgentId) -> Option<&AgentEntry> {
        self.agents.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn reindex(&mut self, id: AgentId, rng: &mut impl Rng) {
        let Some(a) = self.agents.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        a.salt = rng.random();
        self.clock += 1;
        a.stamp = self.clock;
        let old = a.key;
        let new = a.compute_key(id);
        a.key = new;
        for cap in a.caps.keys() {
            if let Some(ix) = self.caps.get_mut(cap) {
                ix.by_load.remove(&old);
                ix.by_load.insert(new);
            }
        }
    }

    fn unindex(&mut self, id: AgentId) {
        let Some(a) = self.get(id) else { return };
        let (key, caps): (LoadKey, Vec<CapabilityName>) = (a.key, a.caps.keys().cloned().collect());
        for cap in caps {
            if let Some(ix) = self.caps.get_mut(&cap) {
                ix.by_load.remove(&key);
                ix.members.retain(|m| *m != id);
                if ix.members.is_empty() {
                    self.caps.remove(&cap);
                }
            }
        }
    }

    /// An advertisement (with the load beside it) from `jid` at `now`.
    pub fn on_advertise(
        &mut self,
        jid: &FullJid,
        ad: &Advertise,
        load: &Load,
        now: Instant,
        rng: &mut impl Rng,
    ) -> AdvertiseOutcome {
        let caps: HashMap<CapabilityName, CapEntry> = ad
            .capabilities
            .iter()
            .map(|c| {
                let reported = load.cap_in_flight(c.name.as_str()).unwrap_or(0);
                (
                    c.name.clone(),
                    CapEntry {
                        slots: c.slots,
                        attrs: ad.effective_attrs(c),
                        reported_in_flight: reported,
                    },
                )
            })
            .collect();
        let (id, outcome, outstanding) = match self.by_jid.get(jid).copied() {
            Some(id) => {
                let old = self
                    .get(id)
                    .map(|a| (a.instance.clone(), a.outstanding.clone()))
                    .unwrap_or_default();
                self.unindex(id);
                if old.0 != ad.instance {
                    let lost: Vec<JobId> = old.1.keys().cloned().collect();
                    (
                        id,
                        AdvertiseOutcome::Restarted(id, lost),
                        HashMap::default(),
                    )
                } else {
                    (id, AdvertiseOutcome::Updated(id), old.1)
                }
            }
            None => {
                let id = self.free_ids.pop().unwrap_or_else(|| {
                    self.agents.push(None);
                    AgentId((self.agents.len() - 1) as u32)
                });
                self.by_jid.insert(jid.clone(), id);
                (id, AdvertiseOutcome::Added(id), HashMap::default())
            }
        };
        let entry = AgentEntry {
            jid: jid.clone(),
            instance: ad.instance.clone(),
            gen: ad.gen,
            seq: load.seq,
            slots: ad.slots,
            heartbeat: Duration::from_millis(ad.heartbeat_ms),
            caps,
            reported_in_flight: load.in_flight,
            reported_yours: load.yours,
            state: load.state,
            loadavg: load.loadavg,
            mem_used: load.mem_used,
            mem_total: load.mem_total,
            last_seen: now,
            suspect: false,
            outstanding,
            salt: 0,
            key: (0, 0, 0, id),
            stamp: 0,
        };
        let cap_names: Vec<CapabilityName> = entry.caps.keys().cloned().collect();
        self.agents[id.0 as usize] = Some(entry);
        for cap in cap_names {
            if self.known.insert(cap.clone()) {
                self.learned.push(cap.clone());
            }
            self.caps.entry(cap).or_default().members.push(id);
        }
        // Insert into every capability index with a fresh key.
        if let Some(a) = self.agents[id.0 as usize].as_mut() {
            a.salt = rng.random();
            self.clock += 1;
            a.stamp = self.clock;
            a.key = a.compute_key(id);
            let key = a.key;
            for cap in a.caps.keys() {
                if let Some(ix) = self.caps.get_mut(cap) {
                    ix.by_load.insert(key);
                }
            }
        }
        outcome
    }

    /// A load report from `jid` at `now`.
    pub fn on_load(
        &mut self,
        jid: &FullJid,
        load: &Load,
        now: Instant,
        rng: &mut impl Rng,
    ) -> LoadOutcome {
        let Some(id) = self.by_jid.get(jid).copied() else {
            return LoadOutcome::NeedHello;
        };
        let Some(a) = self.agents.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return LoadOutcome::NeedHello;
        };
        if load.gen != a.gen {
            return LoadOutcome::NeedHello;
        }
        if load.seq <= a.seq {
            // XMPP keeps a session's order: an older seq means a restarted process whose
            // advertisement we missed, or a duplicate.
            return if load.seq < a.seq {
                LoadOutcome::NeedHello
            } else {
                LoadOutcome::Stale
            };
        }
        a.seq = load.seq;
        a.reported_in_flight = load.in_flight;
        a.reported_yours = load.yours;
        a.state = load.state;
        a.loadavg = load.loadavg;
        a.mem_used = load.mem_used;
        a.mem_total = load.mem_total;
        a.last_seen = now;
        a.suspect = false;
        for (name, c) in a.caps.iter_mut() {
            c.reported_in_flight = load.cap_in_flight(name.as_str()).unwrap_or(0);
        }
        self.reindex(id, rng);
        LoadOutcome::Updated
    }

    /// We sent job `job` of `cap` to agent `id`.
    pub fn on_assigned(
        &mut self,
        id: AgentId,
        job: JobId,
        cap: CapabilityName,
        rng: &mut impl Rng,
    ) {
        if let Some(a) = self.agents.get_mut(id.0 as usize).and_then(Option::as_mut) {
            a.outstanding.insert(job, cap);
            self.reindex(id, rng);
        }
    }

    /// Job `job` on agent `id` ended (result, error, or given up).
    pub fn on_finished(&mut self, id: AgentId, job: &JobId, rng: &mut impl Rng) {
        if let Some(a) = self.agents.get_mut(id.0 as usize).and_then(Option::as_mut) {
            if a.outstanding.remove(job).is_some() {
                self.reindex(id, rng);
            }
        }
    }

    /// The agent's session ended (unavailable presence, bounced IQ, failed ping). Returns the
    /// jobs we had assigned to it, which must be retried elsewhere.
    pub fn on_agent_gone(&mut self, jid: &FullJid) -> Vec<JobId> {
        let Some(id) = self.by_jid.remove(jid) else {
            return Vec::new();
        };
        self.unindex(id);
        let lost = self.agents[id.0 as usize]
            .take()
            .map(|a| a.outstanding.into_keys().collect())
            .unwrap_or_default();
        self.free_ids.push(id);
        self.clock += 1;
        self.gone.push_back((self.clock, jid.clone()));
        if self.gone.len() > fleet::GONE_KEPT {
            self.gone.pop_front();
        }
        lost
    }

    /// Agents silent for more than [`MISSED_HEARTBEATS`] heartbeats become suspect (not
    /// picked). Returns the newly suspect ones: ping them, and call `on_agent_gone` if they do
    /// not answer.
    pub fn check_silent(&mut self, now: Instant) -> Vec<FullJid> {
        let mut out = Vec::new();
        for a in self.agents.iter_mut().flatten() {
            if !a.suspect
                && now.saturating_duration_since(a.last_seen) > a.heartbeat * MISSED_HEARTBEATS
            {
                a.suspect = true;
                self.clock += 1;
                a.stamp = self.clock;
                out.push(a.jid.clone());
            }
        }
        out
    }
}

mod fleet;
mod known;
mod operator;
mod pick;

pub use fleet::{FleetAgent, FleetChanges, FleetView};
pub use known::submission_steps;
pub use operator::Unresolved;
