//! One agent as an operator names it: finding it by the JID given on the command line or in
//! the URL of `POST /v1/agents/{jid}/drain`, its view for the answer, and the state it
//! confirmed (PROTOCOL.md §5.6).
//!
//! Part of the [`Registry`]; the dispatcher's core ([`crate::core`]) resolves the agent here
//! before it sends `<drain/>` or `<undrain/>`, and records the state once the agent answered.

use jid::{FullJid, Jid};
use spine_protocol::{AgentInfo, AgentState, Attributes};

use super::Registry;

/// Why a JID names no one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unresolved {
    /// No agent registered under it (never advertised, or gone).
    Unknown,
    /// A bare JID with several agents (resources) on it: these full JIDs.
    Ambiguous(Vec<String>),
}

impl Registry {
    /// The registered agent named by `jid`: its full JID, or a bare JID when exactly one
    /// agent runs on that account (operators rarely know the resource).
    pub fn resolve(&self, jid: &Jid) -> Result<FullJid, Unresolved> {
        if let Ok(full) = jid.clone().try_into_full() {
            return match self.by_jid.contains_key(&full) {
                true => Ok(full),
                false => Err(Unresolved::Unknown),
            };
        }
        let bare = jid.to_bare();
        let mut on_account: Vec<&FullJid> =
            self.by_jid.keys().filter(|f| f.to_bare() == bare).collect();
        on_account.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        match on_account.as_slice() {
            [] => Err(Unresolved::Unknown),
            [one] => Ok((*one).clone()),
            many => Err(Unresolved::Ambiguous(
                many.iter().map(|f| f.to_string()).collect(),
            )),
        }
    }

    /// The agent confirmed it is now `state` (its answer to a drain or undrain). The load
    /// saying so left before that answer, but may still be in its debounce at another
    /// dispatcher; recording it here makes the change effective for this one at once.
    pub fn on_state(&mut self, jid: &FullJid, state: AgentState) {
        let Some(id) = self.by_jid.get(jid).copied() else {
            return;
        };
        if let Some(a) = self.agents.get_mut(id.0 as usize).and_then(Option::as_mut) {
            a.state = state;
            self.clock += 1;
            a.stamp = self.clock;
        }
    }

    /// How the dispatcher sees agent `jid`, over all its capabilities: the attributes are
    /// those every capability shares (the agent-wide ones, unless every capability overrides
    /// one alike).
    pub fn info(&self, jid: &FullJid) -> Option<AgentInfo> {
        let a = self.get(*self.by_jid.get(jid)?)?;
        let eff = a.effective_in_flight();
        let mut caps = a.caps.values();
        let mut attrs: Attributes = caps.next().map(|c| c.attrs.clone()).unwrap_or_default();
        for c in caps {
            attrs.retain(|k, v| c.attrs.get(k) == Some(v));
        }
        Some(AgentInfo {
            jid: a.jid.clone().into(),
            state: a.state,
            load: eff as f64 / a.slots.max(1) as f64,
            in_flight: eff,
            slots: a.slots,
            loadavg: a.loadavg,
            mem_used: a.mem_used,
            mem_total: a.mem_total,
            attrs,
        })
    }
}
