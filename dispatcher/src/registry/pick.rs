//! Placement decisions from the registry's indexes: [`Registry::pick`] for one job by its
//! strategy, [`Registry::rank`] for discovery and `all` fan-out, and what they share (which
//! agents are eligible, the sort attribute, rendezvous hashing for affinity).
//!
//! Part of the [`Registry`] state machine (the parent module keeps the events that update the
//! indexes these read); called by the dispatcher's core when it places a job.

use rand::Rng;
use spine_protocol::{AgentInfo, AttrName, CapabilityName, Filter, Strategy};

use super::{AgentEntry, AgentId, NoPick, PickRequest, Registry};

impl Registry {
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

    /// Data locality (PROTOCOL.md §13.5): whether `holder`, an agent that keeps some of a
    /// job's input, should take the job instead of `picked`, the least-loaded choice. It
    /// must be eligible, and about as loaded: its share of busy slots at most one of its
    /// slots above `picked`'s (with 4 slots: one more job in flight at most). Reading its
    /// input from its own disk then saves a network copy that costs more than the slightly
    /// longer queue (measured in BENCHMARKS.md, map/reduce with `data_listen`).
    pub fn near_enough(&self, holder: AgentId, picked: AgentId, req: &PickRequest<'_>) -> bool {
        if holder == picked {
            return true;
        }
        let (Some(h), Some(p)) = (self.get(holder), self.get(picked)) else {
            return false;
        };
        self.eligible(holder, req) && h.key.0 <= p.key.0.saturating_add(1_000_000 / h.slots.max(1))
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
