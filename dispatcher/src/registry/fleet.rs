//! The fleet as the console shows it: every agent (not one capability's, as placement sees
//! them), and what changed since a version the caller saw last.
//!
//! Part of the [`Registry`]: each agent entry carries the registry's version at its last
//! change (`stamp`), and agents that leave are logged with the version at which they left,
//! so [`Registry::fleet`] answers "what changed since version v" by comparing stamps,
//! without keeping a copy per reader. The HTTP layer's fleet stream (`GET /v1/fleet/events`)
//! asks once a second; whatever happened in between is one coalesced update.

use std::time::Instant;

use serde::Serialize;
use spine_protocol::{AgentState, Attributes, CapabilityName, Filter};
use utoipa::ToSchema;

use super::{AgentEntry, Registry};

/// Departures remembered for readers that are behind; a reader further behind than this
/// gets a whole snapshot instead of a delta.
pub(crate) const GONE_KEPT: usize = 100_000;

/// An agent as the console's fleet page shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = FleetAgent)]
pub struct FleetAgent {
    /// Its full JID.
    pub jid: String,
    /// `ready`, `draining`, or `suspect` (silent past its heartbeats: not picked until it
    /// reports again).
    #[schema(example = "ready")]
    pub state: &'static str,
    /// Its slots.
    pub slots: u64,
    /// Effective in-flight jobs, agent-wide (what placement counts).
    pub in_flight: u64,
    /// `in_flight ÷ slots`.
    pub load: f64,
    /// 1-minute OS load average, when reported.
    pub loadavg: Option<f64>,
    /// Memory in use, bytes.
    pub mem_used: Option<u64>,
    /// Total memory, bytes.
    pub mem_total: Option<u64>,
    /// The capabilities it offers, sorted.
    #[schema(value_type = Vec<String>)]
    pub capabilities: Vec<CapabilityName>,
    /// Its attributes: a capability's when the view is of one capability, otherwise those
    /// every capability of it shares.
    #[schema(value_type = Object)]
    pub attrs: std::collections::BTreeMap<String, String>,
    /// Milliseconds since the dispatcher last heard from it.
    pub last_heard_ms: u64,
}

/// What changed in the fleet since a version.
#[derive(Debug, Default)]
pub struct FleetChanges {
    /// The version now: ask again with it.
    pub version: u64,
    /// Agents (matching the view) that changed, or all of them for a snapshot.
    pub agents: Vec<FleetAgent>,
    /// Agents that left, or changed and no longer match the view.
    pub gone: Vec<String>,
    /// Whether this is a whole snapshot (no version given, or the one given is too old).
    pub snapshot: bool,
}

/// Which agents a fleet view holds.
pub struct FleetView<'a> {
    /// Only agents of this capability (their attributes for it).
    pub capability: Option<&'a CapabilityName>,
    /// Only agents whose attributes match.
    pub filter: Option<&'a Filter>,
    /// Only capabilities the reader may see (an agent none of whose capabilities it may see is
    /// not shown; the others are not listed).
    pub visible: &'a dyn Fn(&CapabilityName) -> bool,
}

impl Registry {
    /// The registry's version: it grows with every change of an agent.
    pub fn version(&self) -> u64 {
        self.clock
    }

    /// The agents of `view` that changed since version `since` (every one when `since` is
    /// `None` or older than the departures kept), at `now`.
    pub fn fleet(&self, view: &FleetView<'_>, since: Option<u64>, now: Instant) -> FleetChanges {
        let oldest_gone = self.gone.front().map_or(0, |(v, _)| v.saturating_sub(1));
        let since = since
            .filter(|s| *s <= self.clock && (self.gone.len() < GONE_KEPT || *s >= oldest_gone));
        let mut out = FleetChanges {
            version: self.clock,
            snapshot: since.is_none(),
            ..FleetChanges::default()
        };
        for a in self.agents.iter().flatten() {
            if since.is_some_and(|s| a.stamp <= s) {
                continue;
            }
            match self.fleet_agent(a, view, now) {
                Some(v) => out.agents.push(v),
                None if since.is_some() => out.gone.push(a.jid.to_string()),
                None => {}
            }
        }
        if let Some(s) = since {
            let first = self.gone.partition_point(|(v, _)| *v <= s);
            out.gone
                .extend(self.gone.range(first..).map(|(_, j)| j.to_string()));
        }
        out.agents.sort_by(|a, b| a.jid.cmp(&b.jid));
        out
    }

    /// Each capability the reader may see: (name, agents, slots, effective in-flight).
    pub fn capability_loads(
        &self,
        visible: &dyn Fn(&CapabilityName) -> bool,
    ) -> Vec<(CapabilityName, u64, u64, u64)> {
        let mut v: Vec<_> = self
            .caps
            .iter()
            .filter(|(c, ix)| !ix.members.is_empty() && visible(c))
            .map(|(c, ix)| {
                let (mut slots, mut in_flight) = (0, 0);
                for a in ix.members.iter().filter_map(|id| self.get(*id)) {
                    let own = a.caps.get(c).and_then(|e| e.slots).unwrap_or(a.slots);
                    slots += own.min(a.slots);
                    in_flight += a.cap_effective(c);
                }
                (c.clone(), ix.members.len() as u64, slots, in_flight)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn fleet_agent(
        &self,
        a: &AgentEntry,
        view: &FleetView<'_>,
        now: Instant,
    ) -> Option<FleetAgent> {
        let mut capabilities: Vec<CapabilityName> = a
            .caps
            .keys()
            .filter(|c| (view.visible)(c))
            .cloned()
            .collect();
        if capabilities.is_empty() {
            return None;
        }
        let attrs: Attributes = match view.capability {
            Some(c) => a.caps.get(c)?.attrs.clone(),
            None => {
                let mut caps = a.caps.values();
                let mut shared = caps.next().map(|c| c.attrs.clone()).unwrap_or_default();
                for c in caps {
                    shared.retain(|k, v| c.attrs.get(k) == Some(v));
                }
                shared
            }
        };
        if view.filter.is_some_and(|f| !f.matches_attrs(&attrs)) {
            return None;
        }
        capabilities.sort();
        let eff = a.effective_in_flight();
        Some(FleetAgent {
            jid: a.jid.to_string(),
            state: match (a.suspect, a.state) {
                (true, _) => "suspect",
                (false, AgentState::Ready) => "ready",
                (false, AgentState::Draining) => "draining",
            },
            slots: a.slots,
            in_flight: eff,
            load: eff as f64 / a.slots.max(1) as f64,
            loadavg: a.loadavg,
            mem_used: a.mem_used,
            mem_total: a.mem_total,
            capabilities,
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            last_heard_ms: now.saturating_duration_since(a.last_seen).as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use jid::FullJid;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use spine_protocol::{Advertise, CapabilityAd, JobId, Load, ProtocolVersion};

    use super::*;

    fn join(reg: &mut Registry, name: &str, cap: &str, gpu: bool, now: Instant) -> FullJid {
        let jid: FullJid = format!("{name}@h/a").parse().expect("jid");
        let mut c = CapabilityAd::new(cap.parse().expect("cap"));
        c.attrs
            .insert("gpu".parse().expect("attr"), gpu.to_string());
        let ad = Advertise {
            protocol: ProtocolVersion::CURRENT,
            instance: "i".into(),
            gen: 1,
            slots: 4,
            heartbeat_ms: 10_000,
            attrs: Default::default(),
            serves: None,
            capabilities: vec![c],
        };
        let load = Load {
            seq: 1,
            gen: 1,
            state: AgentState::Ready,
            in_flight: 0,
            yours: 0,
            slots: 4,
            queue: 0,
            loadavg: Some(0.5),
            mem_used: None,
            mem_total: None,
            caps: Vec::new(),
        };
        reg.on_advertise(&jid, &ad, &load, now, &mut StdRng::seed_from_u64(1));
        jid
    }

    fn names(c: &FleetChanges) -> Vec<&str> {
        c.agents.iter().map(|a| a.jid.as_str()).collect()
    }

    #[test]
    fn a_delta_holds_the_agents_that_changed_and_those_that_left() {
        let now = Instant::now();
        let mut reg = Registry::new();
        let all = |_: &CapabilityName| true;
        let view = FleetView {
            capability: None,
            filter: None,
            visible: &all,
        };
        let a = join(&mut reg, "a", "img.x", true, now);
        let b = join(&mut reg, "b", "img.x", false, now);
        let _c = join(&mut reg, "c", "txt.y", false, now);
        let snap = reg.fleet(&view, None, now);
        assert!(snap.snapshot);
        assert_eq!(names(&snap), ["a@h/a", "b@h/a", "c@h/a"]);
        assert_eq!(snap.agents[0].state, "ready");
        assert_eq!(snap.agents[0].attrs["gpu"], "true");
        // Nothing changed: an empty delta.
        let d = reg.fleet(&view, Some(snap.version), now);
        assert!(!d.snapshot && d.agents.is_empty() && d.gone.is_empty());
        // A job on a, b leaves: a delta of a (its in-flight 1) and b gone.
        let id = reg.id_of(&a).expect("a");
        let job: JobId = "j1".parse().expect("id");
        reg.on_assigned(
            id,
            job,
            "img.x".parse().expect("cap"),
            &mut StdRng::seed_from_u64(2),
        );
        reg.on_agent_gone(&b);
        let d = reg.fleet(&view, Some(snap.version), now);
        assert_eq!(names(&d), ["a@h/a"]);
        assert_eq!(d.agents[0].in_flight, 1);
        assert_eq!(d.gone, ["b@h/a"]);
        assert!(d.version > snap.version);
        // A filtered view: an agent that changed and no longer matches is gone from it.
        let f: Filter = "gpu=false".parse().expect("filter");
        let cap: CapabilityName = "img.x".parse().expect("cap");
        let gpu_less = FleetView {
            capability: Some(&cap),
            filter: Some(&f),
            visible: &all,
        };
        assert!(names(&reg.fleet(&gpu_less, None, now)).is_empty());
        let d = reg.fleet(&gpu_less, Some(snap.version), now);
        assert_eq!(d.gone, ["a@h/a", "b@h/a"]);
        // A reader that may see only txt.* sees c alone, and only txt.y's load.
        let txt = |c: &CapabilityName| c.as_str().starts_with("txt.");
        let mine = FleetView {
            capability: None,
            filter: None,
            visible: &txt,
        };
        assert_eq!(names(&reg.fleet(&mine, None, now)), ["c@h/a"]);
        let loads = reg.capability_loads(&txt);
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].0.as_str(), "txt.y");
        assert_eq!(reg.capability_loads(&all)[0], (cap, 1, 4, 1));
    }
}
