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

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use jid::FullJid;
use rand::Rng;
use spine_protocol::{
    Advertise, AgentInfo, AgentState, AttrName, Attributes, CapabilityName, Condition, Filter,
    JobId, Load, MapReduce, SpineError, Strategy,
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
                    (id, AdvertiseOutcome::Restarted(id, lost), HashMap::new())
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
                (id, AdvertiseOutcome::Added(id), HashMap::new())
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
                out.push(a.jid.clone());
            }
        }
        out
    }

    fn eligible(&self, id: AgentId, req: &PickRequest<'_>) -> bool {
        if req.exclude.contains(&id) {
            return false;
        }
        let Some(a) = self.get(id) else { return false };
        if !a.has_room(req.capability) {
            return false;
        }
        match req.filter {
            Some(f) => a
                .caps
                .get(req.capability)
                .is_some_and(|c| f.matches_attrs(&c.attrs)),
            None => true,
        }
    }

    fn sort_value(&self, id: AgentId, cap: &CapabilityName, attr: &AttrName) -> f64 {
        self.get(id)
            .and_then(|a| a.caps.get(cap))
            .and_then(|c| c.attrs.get(attr.as_str()))
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .unwrap_or(f64::INFINITY)
    }

    /// Chooses an agent for one job of `req.capability`. The caller then calls
    /// [`Registry::on_assigned`]. For [`Strategy::All`] use [`Registry::eligible_agents`].
    pub fn pick(&mut self, req: &PickRequest<'_>, rng: &mut impl Rng) -> Result<AgentId, NoPick> {
        let Some(ix) = self.caps.get(req.capability) else {
            return Err(NoPick::NoCapableAgent);
        };
        let picked = match (req.strategy, req.sort) {
            (Strategy::Affinity, _) => {
                let key = req.affinity_key.unwrap_or("");
                ix.members
                    .iter()
                    .copied()
                    .filter(|id| self.eligible(*id, req))
                    .max_by_key(|id| {
                        rendezvous(key, self.get(*id).map(|a| a.jid.as_str()).unwrap_or(""))
                    })
            }
            (_, Some(attr)) => ix
                .by_load
                .iter()
                .map(|k| k.3)
                .filter(|id| self.eligible(*id, req))
                .min_by(|a, b| {
                    self.sort_value(*a, req.capability, attr)
                        .total_cmp(&self.sort_value(*b, req.capability, attr))
                }),
            (Strategy::LeastLoaded | Strategy::All, None) => ix
                .by_load
                .iter()
                .map(|k| k.3)
                .find(|id| self.eligible(*id, req)),
            (Strategy::Random, None) => {
                let n = ix.members.len();
                let start = rng.random_range(0..n);
                (0..n)
                    .map(|i| ix.members[(start + i) % n])
                    .find(|id| self.eligible(*id, req))
            }
            (Strategy::RoundRobin, None) => {
                let n = ix.members.len();
                let start = ix.cursor % n;
                let found = (0..n)
                    .map(|i| (start + i) % n)
                    .find(|i| self.eligible(ix.members[*i], req));
                if let (Some(i), Some(ix)) = (found, self.caps.get_mut(req.capability)) {
                    ix.cursor = i + 1;
                    Some(ix.members[i])
                } else {
                    None
                }
            }
            (Strategy::PowerOfTwo, None) => {
                let n = ix.members.len();
                let mut draw = || {
                    let start = rng.random_range(0..n);
                    (0..n)
                        .map(|i| ix.members[(start + i) % n])
                        .find(|id| self.eligible(*id, req))
                };
                match (draw(), draw()) {
                    (Some(a), Some(b)) => {
                        let ka = self.get(a).map(|x| x.key);
                        let kb = self.get(b).map(|x| x.key);
                        Some(if ka <= kb { a } else { b })
                    }
                    (a, b) => a.or(b),
                }
            }
        };
        match picked {
            Some(id) => Ok(id),
            None => {
                let capable = self.caps.get(req.capability).is_some_and(|ix| {
                    ix.members.iter().any(|id| {
                        !req.exclude.contains(id)
                            && req.filter.is_none_or(|f| {
                                self.get(*id)
                                    .and_then(|a| a.caps.get(req.capability))
                                    .is_some_and(|c| f.matches_attrs(&c.attrs))
                            })
                    })
                });
                Err(if capable {
                    NoPick::AllBusy
                } else {
                    NoPick::NoCapableAgent
                })
            }
        }
    }

    /// Every agent that could take a job of `req.capability` now (the `all` strategy).
    pub fn eligible_agents(&self, req: &PickRequest<'_>) -> Vec<AgentId> {
        self.caps.get(req.capability).map_or_else(Vec::new, |ix| {
            ix.by_load
                .iter()
                .map(|k| k.3)
                .filter(|id| self.eligible(*id, req))
                .collect()
        })
    }

    /// The capable agents (filter applied, busy ones included), least loaded first — or by the
    /// sort attribute first — with their load and attributes: what a web app asks before
    /// choosing itself.
    pub fn rank(
        &self,
        cap: &CapabilityName,
        filter: Option<&Filter>,
        sort: Option<&AttrName>,
        limit: Option<usize>,
    ) -> Vec<AgentInfo> {
        let Some(ix) = self.caps.get(cap) else {
            return Vec::new();
        };
        let mut ids: Vec<AgentId> = ix
            .by_load
            .iter()
            .map(|k| k.3)
            .filter(|id| {
                self.get(*id).is_some_and(|a| {
                    !a.suspect
                        && filter.is_none_or(|f| {
                            a.caps.get(cap).is_some_and(|c| f.matches_attrs(&c.attrs))
                        })
                })
            })
            .collect();
        if let Some(attr) = sort {
            // Stable: equal sort values keep least-loaded order.
            ids.sort_by(|a, b| {
                self.sort_value(*a, cap, attr)
                    .total_cmp(&self.sort_value(*b, cap, attr))
            });
        }
        ids.into_iter()
            .take(limit.unwrap_or(usize::MAX))
            .filter_map(|id| {
                let a = self.get(id)?;
                let eff = a.effective_in_flight();
                Some(AgentInfo {
                    jid: a.jid.clone().into(),
                    state: a.state,
                    load: eff as f64 / a.slots.max(1) as f64,
                    in_flight: eff,
                    slots: a.slots,
                    loadavg: a.loadavg,
                    mem_used: a.mem_used,
                    mem_total: a.mem_total,
                    attrs: a.caps.get(cap).map(|c| c.attrs.clone()).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Whether agent `id` can take one more job of `cap` now (ready, not suspect, free slot).
    pub fn has_room(&self, id: AgentId, cap: &CapabilityName) -> bool {
        self.get(id)
            .is_some_and(|a| a.caps.contains_key(cap) && a.has_room(cap))
    }

    /// Effective in-flight jobs of an agent (for metrics and tests).
    pub fn effective_in_flight(&self, id: AgentId) -> Option<u64> {
        self.get(id).map(AgentEntry::effective_in_flight)
    }

    /// Capabilities offered in earlier runs (from the store): known, not learnt again.
    pub fn remember(&mut self, caps: impl IntoIterator<Item = CapabilityName>) {
        self.known.extend(caps);
    }

    /// Whether an agent has offered `cap` since the start, or did in an earlier run.
    pub fn is_known(&self, cap: &CapabilityName) -> bool {
        self.known.contains(cap)
    }

    /// Capabilities first offered since the last call, for the driver to store.
    pub fn take_learned(&mut self) -> Vec<CapabilityName> {
        std::mem::take(&mut self.learned)
    }

    /// The known capabilities that `visible` lets a submitter see, closest to `name` first
    /// (Damerau-Levenshtein distance, then name): what a typo most likely meant.
    pub fn closest_known(
        &self,
        name: &str,
        visible: impl Fn(&CapabilityName) -> bool,
    ) -> Vec<CapabilityName> {
        let mut v: Vec<(usize, &CapabilityName)> = self
            .known
            .iter()
            .filter(|c| visible(c))
            .map(|c| (strsim::damerau_levenshtein(name, c.as_str()), c))
            .collect();
        v.sort();
        v.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// Refuses a submission that names a capability no agent has offered since the start nor
    /// in an earlier run (`steps`: each capability with the field that names it): an
    /// `unknown-capability` error naming the field and listing the known capabilities that
    /// `visible` lets the submitter see, closest first. `wait_hint` says how to queue it
    /// anyway (the `wait_for_agent` field as the submitter's front end spells it).
    pub fn check_known(
        &self,
        steps: &[(&'static str, &CapabilityName)],
        visible: impl Fn(&CapabilityName) -> bool,
        wait_hint: &str,
    ) -> Result<(), SpineError> {
        let Some((field, cap)) = steps.iter().find(|(_, c)| !self.is_known(c)) else {
            return Ok(());
        };
        let close = self.closest_known(cap.as_str(), visible);
        let known = if close.is_empty() {
            "no capability has been offered that this submitter may run".to_owned()
        } else {
            let shown: Vec<&str> = close.iter().take(KNOWN_SHOWN).map(|c| c.as_str()).collect();
            let more = close.len().saturating_sub(KNOWN_SHOWN);
            format!(
                "known capabilities, closest first: {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        };
        Err(SpineError::new(Condition::UnknownCapability)
            .with_field(*field)
            .with_text(format!(
                "no agent has offered {cap} to this dispatcher; {known} (to queue the job until an agent offers it, submit with {wait_hint})"
            )))
    }
}

/// Known capabilities named in an `unknown-capability` answer, at most.
const KNOWN_SHOWN: usize = 10;

/// The capabilities a submission names, with the field (attribute) that names each: the
/// job's, and a map/reduce's reduce and split steps.
pub fn submission_steps<'a>(
    capability: &'a CapabilityName,
    mapreduce: Option<&'a MapReduce>,
) -> Vec<(&'static str, &'a CapabilityName)> {
    let mut v = vec![("capability", capability)];
    if let Some(m) = mapreduce {
        v.push(("reduce", &m.reduce));
        v.extend(m.split.as_ref().map(|s| ("split", s)));
    }
    v
}

/// Rendezvous (highest random weight) hash of a key and an agent: the agent with the highest
/// weight wins, and removing an agent only moves the keys it held.
fn rendezvous(key: &str, agent: &str) -> u64 {
    // FNV-1a over key, a separator and the agent: stable across processes and releases
    // (std's hasher is randomly seeded per process).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain([0xff]).chain(agent.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so similar JIDs do not get similar weights.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
