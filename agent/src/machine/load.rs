//! The core's reports to its dispatchers: the advertisement and the load reports with their
//! one sequence of numbers, part of [`Core`] kept apart from the job logic in
//! [`crate::machine`]. Reports leave as [`Out::Load`] effects; the driver adds the machine's
//! load average and memory, so nothing here reads the system.

use jid::{BareJid, Jid};
use spine_protocol::{Advertise, AgentState, CapLoad, CapabilityName, Load, ProtocolVersion};
use tokio::time::Instant;

use super::{Core, Out, Phase};

impl Core {
    fn advertise(&self) -> Advertise {
        Advertise {
            // 1.2 (`<recall/>`, which this agent always answers) builds on 1.1, which it
            // announces only when it fetches and uploads over HTTP.
            protocol: if self.settings.http_data {
                ProtocolVersion::V1_2
            } else {
                ProtocolVersion::CURRENT
            },
            instance: self.instance.clone(),
            gen: self.gen,
            slots: self.settings.slots,
            heartbeat_ms: self.settings.heartbeat.as_millis() as u64,
            attrs: self.attrs.clone(),
            serves: self.settings.serves.clone(),
            capabilities: self.caps.values().cloned().collect(),
        }
    }

    /// The next load report for `dispatcher` (the machine's figures are the driver's).
    fn load_for(&mut self, dispatcher: &BareJid) -> Load {
        self.seq += 1;
        let caps = self
            .caps
            .values()
            .filter(|c| c.slots.is_some())
            .map(|c| CapLoad {
                name: c.name.clone(),
                in_flight: self.in_flight(&c.name) as u64,
            })
            .collect();
        Load {
            seq: self.seq,
            gen: self.gen,
            state: if self.phase == Phase::Serving && self.drained.is_none() {
                AgentState::Ready
            } else {
                AgentState::Draining
            },
            in_flight: self.running.len() as u64,
            yours: self
                .running
                .values()
                .filter(|r| &r.from_bare == dispatcher)
                .count() as u64,
            slots: self.settings.slots,
            queue: 0,
            loadavg: None,
            mem_used: None,
            mem_total: None,
            caps,
        }
    }

    pub(super) fn in_flight(&self, cap: &CapabilityName) -> usize {
        self.running
            .values()
            .filter(|r| &r.capability == cap)
            .count()
    }

    pub(super) fn send_advertisement(&mut self, to: Jid, now: Instant) {
        let load = self.load_for(&to.to_bare());
        let advertise = Some(Box::new(self.advertise()));
        self.ready.out.push(Out::Load {
            to,
            advertise,
            load,
        });
        self.last_load = now;
        self.load_dirty = false;
    }

    pub(super) fn send_load(&mut self, now: Instant) {
        for d in self.dispatchers.clone() {
            let load = self.load_for(&d);
            self.ready.out.push(Out::Load {
                to: Jid::from(d),
                advertise: None,
                load,
            });
        }
        self.last_load = now;
        self.load_dirty = false;
    }

    /// The running jobs changed: a load report now, or when the debounce allows.
    pub(super) fn mark_load_dirty(&mut self, now: Instant) {
        self.load_dirty = true;
        if now >= self.last_load + self.settings.load_debounce {
            self.send_load(now);
        }
    }
}
