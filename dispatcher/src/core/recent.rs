//! The last minutes of each capability, for the console's capabilities page and
//! `GET /v1/capabilities`: jobs ended and retried per minute, end-to-end latency percentiles,
//! and a sample every [`SAMPLE_EVERY`] of in-flight jobs against slots and the queue.
//!
//! Kept by the core beside its Prometheus counters ([`super::stats`]): counts go into
//! one-minute buckets as jobs end, samples are taken at the core's housekeeping. Memory is
//! bounded per capability (a few buckets, at most [`LATENCIES_KEPT`] latencies each, and
//! [`SAMPLES_KEPT`] samples); a capability no agent offers and no job used for
//! [`SAMPLES_KEPT`] samples is forgotten.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use spine_protocol::CapabilityName;
use utoipa::ToSchema;

/// The window the counts and percentiles cover.
pub(crate) const WINDOW_S: u64 = 300;
/// How often a sample is taken.
pub(crate) const SAMPLE_EVERY_MS: u64 = 5_000;
/// Samples kept per capability: ten minutes.
pub(crate) const SAMPLES_KEPT: usize = 120;
/// Latencies kept per minute and capability; past this, each new one replaces a kept one at
/// random (reservoir sampling), so the percentiles stay unbiased under any load.
const LATENCIES_KEPT: usize = 2_048;

/// One capability's load at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Sample {
    /// When (ms since the UNIX epoch).
    pub at_ms: u64,
    /// Effective in-flight jobs on its agents.
    pub in_flight: u64,
    /// Its agents' slots for it.
    pub slots: u64,
    /// Jobs queued for it.
    pub queued: u64,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// A capability's last [`WINDOW_S`] seconds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Window {
    pub succeeded: u64,
    pub failed: u64,
    pub retried: u64,
    /// Acceptance to end of the jobs that succeeded.
    pub latency_ms: Option<Percentiles>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
struct Minute {
    /// Minutes since the UNIX epoch.
    minute: u64,
    succeeded: u64,
    failed: u64,
    retried: u64,
    latencies: Vec<u32>,
    /// Latencies offered this minute (for reservoir sampling past LATENCIES_KEPT).
    seen: u64,
}

#[derive(Debug, Default)]
pub(super) struct Cap {
    minutes: VecDeque<Minute>,
    samples: VecDeque<Sample>,
}

/// Every capability's recent history.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    pub(super) caps: BTreeMap<CapabilityName, Cap>,
    next_sample_ms: u64,
    /// For reservoir sampling (a cheap deterministic generator: xorshift).
    state: u64,
}

impl Cap {
    fn minute(&mut self, now_ms: u64) -> &mut Minute {
        let m = now_ms / 60_000;
        if self.minutes.back().is_none_or(|b| b.minute != m) {
            self.minutes.push_back(Minute {
                minute: m,
                ..Minute::default()
            });
            let oldest = m.saturating_sub(WINDOW_S / 60);
            while self.minutes.front().is_some_and(|f| f.minute < oldest) {
                self.minutes.pop_front();
            }
        }
        // Just pushed if it was missing.
        self.minutes.back_mut().expect("a minute")
    }
}

impl Recent {
    fn cap(&mut self, cap: &CapabilityName) -> &mut Cap {
        if !self.caps.contains_key(cap) {
            self.caps.insert(cap.clone(), Cap::default());
        }
        self.caps.get_mut(cap).expect("inserted")
    }

    fn random(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A job of `cap` ended at `now_ms`; `latency_ms` after its acceptance if it succeeded.
    pub(crate) fn ended(&mut self, cap: &CapabilityName, latency_ms: Option<u64>, now_ms: u64) {
        if self.state == 0 {
            self.state = now_ms | 1;
        }
        let r = self.random();
        let m = self.cap(cap).minute(now_ms);
        let Some(l) = latency_ms else {
            m.failed += 1;
            return;
        };
        m.succeeded += 1;
        m.seen += 1;
        let l = u32::try_from(l).unwrap_or(u32::MAX);
        if m.latencies.len() < LATENCIES_KEPT {
            m.latencies.push(l);
        } else if let Some(slot) = m.latencies.get_mut((r % m.seen) as usize) {
            *slot = l;
        }
    }

    /// An attempt of a `cap` job failed and was retried.
    pub(crate) fn retried(&mut self, cap: &CapabilityName, now_ms: u64) {
        self.cap(cap).minute(now_ms).retried += 1;
    }

    /// Whether a sample is due at `now_ms`.
    pub(crate) fn sample_due(&self, now_ms: u64) -> bool {
        now_ms >= self.next_sample_ms
    }

    /// Takes a sample of every capability at `now_ms`: `loads` holds (capability, slots,
    /// in-flight, queued) for those offered or queued now; the others sample zero.
    pub(crate) fn sample(&mut self, now_ms: u64, loads: Vec<(CapabilityName, u64, u64, u64)>) {
        self.next_sample_ms = now_ms - now_ms % SAMPLE_EVERY_MS + SAMPLE_EVERY_MS;
        let mut loads: BTreeMap<_, _> = loads
            .into_iter()
            .map(|(c, slots, in_flight, queued)| (c, (slots, in_flight, queued)))
            .collect();
        for (c, _) in loads.iter() {
            if !self.caps.contains_key(c) {
                self.caps.insert(c.clone(), Cap::default());
            }
        }
        self.caps.retain(|c, cap| {
            let (slots, in_flight, queued) = loads.remove(c).unwrap_or_default();
            cap.samples.push_back(Sample {
                at_ms: now_ms,
                in_flight,
                slots,
                queued,
            });
            if cap.samples.len() > SAMPLES_KEPT {
                cap.samples.pop_front();
            }
            let idle = |s: &Sample| s.slots == 0 && s.queued == 0 && s.in_flight == 0;
            let quiet = cap
                .minutes
                .back()
                .is_none_or(|m| m.minute + 10 < now_ms / 60_000);
            !(quiet && cap.samples.len() == SAMPLES_KEPT && cap.samples.iter().all(idle))
        });
    }

    /// `cap`'s last [`WINDOW_S`] seconds at `now_ms` (an empty window for one never seen).
    pub(crate) fn window(&self, cap: &CapabilityName, now_ms: u64) -> Window {
        let Some(c) = self.caps.get(cap) else {
            return Window::default();
        };
        let from = (now_ms / 60_000).saturating_sub(WINDOW_S / 60 - 1);
        let mut w = Window {
            samples: c.samples.iter().copied().collect(),
            ..Window::default()
        };
        let mut lat: Vec<u32> = Vec::new();
        for m in c.minutes.iter().filter(|m| m.minute >= from) {
            w.succeeded += m.succeeded;
            w.failed += m.failed;
            w.retried += m.retried;
            lat.extend_from_slice(&m.latencies);
        }
        if !lat.is_empty() {
            lat.sort_unstable();
            let at = |q: f64| {
                // Nearest rank.
                let i = ((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1;
                f64::from(lat[i])
            };
            w.latency_ms = Some(Percentiles {
                p50: at(0.50),
                p95: at(0.95),
                p99: at(0.99),
            });
        }
        w
    }
}

impl super::Core {
    /// Every capability offered or queued: (name, agents, slots, in-flight, queued), by name.
    pub(crate) fn capability_loads(&self) -> Vec<(CapabilityName, u64, u64, u64, u64)> {
        let mut caps: BTreeMap<CapabilityName, (u64, u64, u64, u64)> = self
            .registry
            .capability_loads(&|_| true)
            .into_iter()
            .map(|(c, agents, slots, in_flight)| (c, (agents, slots, in_flight, 0)))
            .collect();
        for c in self.jobs.queued_capabilities() {
            caps.entry(c.clone()).or_default().3 = self.jobs.queued(&c) as u64;
        }
        caps.into_iter()
            .map(|(c, (a, s, f, q))| (c, a, s, f, q))
            .collect()
    }

    /// Every capability offered, queued or recently used, with its last minutes.
    pub(crate) fn capability_stats(&self, now: super::Now) -> Vec<super::CapabilityStats> {
        let mut loads: BTreeMap<CapabilityName, (u64, u64, u64, u64)> = self
            .capability_loads()
            .into_iter()
            .map(|(c, a, s, f, q)| (c, (a, s, f, q)))
            .collect();
        for c in self.stats.recent.caps.keys() {
            loads.entry(c.clone()).or_default();
        }
        loads
            .into_iter()
            .map(
                |(name, (agents, slots, in_flight, queued))| super::CapabilityStats {
                    window: self.stats.recent.window(&name, now.ms),
                    name,
                    agents,
                    queued,
                    slots,
                    in_flight,
                },
            )
            .collect()
    }

    /// Takes the capabilities' samples when one is due (called at housekeeping).
    pub(crate) fn sample_capabilities(&mut self, now: super::Now) {
        if !self.stats.recent.sample_due(now.ms) {
            return;
        }
        let loads = self
            .capability_loads()
            .into_iter()
            .map(|(c, _, slots, in_flight, queued)| (c, slots, in_flight, queued))
            .collect();
        self.stats.recent.sample(now.ms, loads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles_cover_the_last_five_minutes() {
        let cap: CapabilityName = "img.x".parse().expect("cap");
        let mut r = Recent::default();
        let t0 = 1_000 * 60_000; // a minute boundary
                                 // Ten minutes ago: outside the window.
        r.ended(&cap, Some(999), t0 - 10 * 60_000);
        for l in 1..=100 {
            r.ended(&cap, Some(l), t0 + l);
        }
        r.ended(&cap, None, t0 + 200);
        r.retried(&cap, t0 + 300);
        let w = r.window(&cap, t0 + 60_000);
        assert_eq!((w.succeeded, w.failed, w.retried), (100, 1, 1));
        let p = w.latency_ms.expect("percentiles");
        assert_eq!((p.p50, p.p95, p.p99), (50.0, 95.0, 99.0));
        // Six minutes later nothing is left in the window.
        let w = r.window(&cap, t0 + 6 * 60_000);
        assert_eq!((w.succeeded, w.latency_ms), (0, None));
    }

    #[test]
    fn samples_are_bounded_and_idle_capabilities_are_forgotten() {
        let cap: CapabilityName = "img.x".parse().expect("cap");
        let mut r = Recent::default();
        let t0 = 1_000 * 60_000;
        assert!(r.sample_due(t0));
        r.sample(t0, vec![(cap.clone(), 8, 3, 1)]);
        assert!(!r.sample_due(t0 + 1));
        assert!(r.sample_due(t0 + SAMPLE_EVERY_MS));
        let w = r.window(&cap, t0);
        assert_eq!(
            w.samples,
            [Sample {
                at_ms: t0,
                in_flight: 3,
                slots: 8,
                queued: 1
            }]
        );
        for i in 1..=(2 * SAMPLES_KEPT as u64) {
            r.sample(t0 + i * SAMPLE_EVERY_MS, Vec::new());
        }
        // Its agents left long ago and no job ran: forgotten.
        assert!(r.window(&cap, t0).samples.is_empty());
    }

    #[test]
    fn past_the_reservoir_latencies_are_sampled_not_dropped() {
        let cap: CapabilityName = "img.x".parse().expect("cap");
        let mut r = Recent::default();
        let t0 = 1_000 * 60_000;
        // The first LATENCIES_KEPT are fast, the next as many slow: a reservoir keeps about
        // half of each, so the median is near the boundary rather than all fast.
        for i in 0..(2 * LATENCIES_KEPT as u64) {
            let l = if i < LATENCIES_KEPT as u64 { 1 } else { 100 };
            r.ended(&cap, Some(l), t0 + i % 1000);
        }
        let w = r.window(&cap, t0 + 1000);
        assert_eq!(w.succeeded, 2 * LATENCIES_KEPT as u64);
        let p = w.latency_ms.expect("percentiles");
        assert_eq!(p.p99, 100.0);
        assert_eq!(p.p95, 100.0);
    }
}
