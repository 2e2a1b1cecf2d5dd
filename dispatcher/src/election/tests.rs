//! The election in virtual time: several dispatchers and one store row, with network delays,
//! clocks that drift, pauses (SIGSTOP past the lease), crashes and clean stops. Over random
//! schedules: **never two leaders at once**, every write that lands carries the newest epoch
//! (the fence), and after a leader dies another leads within a lease and a poll.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::*;

/// The store's row, in its own (real) clock, ms.
#[derive(Debug, Default)]
struct Row {
    holder: Option<usize>,
    epoch: u64,
    expires_ms: f64,
}

impl Row {
    fn apply(&mut self, node: usize, ask: Ask, now_ms: f64, lease_ms: f64) -> Answer {
        match ask {
            Ask::Take => {
                if self.holder.is_none() || self.holder == Some(node) || self.expires_ms <= now_ms {
                    self.holder = Some(node);
                    self.epoch += 1;
                    self.expires_ms = now_ms + lease_ms;
                    Answer::Took { epoch: self.epoch }
                } else {
                    Answer::HeldByOther
                }
            }
            Ask::Renew { epoch } if self.holder == Some(node) && self.epoch == epoch => {
                self.expires_ms = now_ms + lease_ms;
                Answer::Renewed
            }
            Ask::Renew { .. } => Answer::Lost,
            Ask::Release { epoch } if self.holder == Some(node) && self.epoch == epoch => {
                self.holder = None;
                self.expires_ms = now_ms;
                Answer::Released
            }
            Ask::Release { .. } => Answer::Lost,
        }
    }
}

struct Node {
    election: Election,
    /// Its clock runs at this rate against real time.
    rate: f64,
    offset_ms: f64,
    up: bool,
    paused_until_ms: f64,
    /// Answers on their way back: (arrival, answer).
    inbox: VecDeque<(f64, Answer)>,
}

/// A fault at a real time (ms).
#[derive(Debug, Clone)]
enum Fault {
    /// kill -9: gone (its row stays until it expires).
    Crash(usize),
    /// Started again (a new process).
    Start(usize),
    /// SIGSTOP for this long, then SIGCONT.
    Pause(usize, u64),
    /// SIGTERM: releases the row, then gone.
    Stop(usize),
}

struct World {
    base: Instant,
    row: Row,
    nodes: Vec<Node>,
    timing: Timing,
    rng: StdRng,
    /// Questions on their way to the store: (arrival, node, ask).
    to_store: Vec<(f64, usize, Ask)>,
    violations: Vec<String>,
    /// Writes that landed: (real ms, node, epoch).
    landed: Vec<(f64, usize, u64)>,
    /// Leader deaths (real ms) and the next taking after each.
    deaths: Vec<f64>,
    takings: Vec<f64>,
}

impl World {
    fn new(seed: u64, n: usize, timing: Timing) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let base = Instant::now();
        let drift = timing.drift;
        let nodes = (0..n)
            .map(|_| {
                let rate = 1.0 + rng.random_range(-drift / 2.0..=drift / 2.0);
                let offset_ms = rng.random_range(0.0..5_000.0);
                Node {
                    election: Election::new(
                        timing,
                        base + Duration::from_secs_f64(offset_ms / 1e3),
                    ),
                    rate,
                    offset_ms,
                    up: true,
                    paused_until_ms: 0.0,
                    inbox: VecDeque::new(),
                }
            })
            .collect();
        World {
            base,
            row: Row::default(),
            nodes,
            timing,
            rng,
            to_store: Vec::new(),
            violations: Vec::new(),
            landed: Vec::new(),
            deaths: Vec::new(),
            takings: Vec::new(),
        }
    }

    fn local(&self, i: usize, real_ms: f64) -> Instant {
        let n = &self.nodes[i];
        self.base + Duration::from_secs_f64((n.offset_ms + real_ms * n.rate) / 1e3)
    }

    fn latency(&mut self) -> f64 {
        self.rng.random_range(0.2..5.0)
    }

    fn leads(&self, i: usize, real_ms: f64) -> Option<u64> {
        let n = &self.nodes[i];
        if !n.up {
            return None;
        }
        match n.election.role(self.local(i, real_ms)) {
            Role::Leader { epoch } => Some(epoch),
            Role::Standby => None,
        }
    }

    fn fault(&mut self, f: &Fault, t: f64) {
        let n = self.nodes.len();
        match *f {
            Fault::Crash(i) | Fault::Stop(i) if self.nodes[i % n].up => {
                let i = i % n;
                if self.leads(i, t).is_some() {
                    self.deaths.push(t);
                }
                if matches!(f, Fault::Stop(_)) {
                    let now = self.local(i, t);
                    if let Some(ask) = self.nodes[i].election.step_down(now) {
                        let at = t + self.latency();
                        self.to_store.push((at, i, ask));
                    }
                }
                self.nodes[i].up = false;
                self.nodes[i].inbox.clear();
            }
            Fault::Start(i) if !self.nodes[i % n].up => {
                let i = i % n;
                let now = self.local(i, t);
                let node = &mut self.nodes[i];
                node.up = true;
                node.paused_until_ms = 0.0;
                node.election = Election::new(self.timing, now);
            }
            Fault::Pause(i, ms) => {
                let i = i % n;
                self.nodes[i].paused_until_ms = t + ms as f64;
            }
            _ => {}
        }
    }

    /// One millisecond of real time.
    fn step(&mut self, t: f64) {
        let lease_ms = self.timing.lease.as_secs_f64() * 1e3;
        // The store answers what reached it (a question already sent still lands while its
        // sender is paused or dead).
        let mut arrived = Vec::new();
        self.to_store.retain(|q| {
            if q.0 <= t {
                arrived.push(*q);
                false
            } else {
                true
            }
        });
        arrived.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (_, i, ask) in arrived {
            let answer = self.row.apply(i, ask, t, lease_ms);
            if let Answer::Took { .. } = answer {
                self.takings.push(t);
            }
            let back = t + self.latency();
            if self.nodes[i].up {
                self.nodes[i].inbox.push_back((back, answer));
            }
        }
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if !node.up || node.paused_until_ms > t {
                continue;
            }
            let now = self.local(i, t);
            while self.nodes[i].inbox.front().is_some_and(|(at, _)| *at <= t) {
                if let Some((_, a)) = self.nodes[i].inbox.pop_front() {
                    self.nodes[i].election.answer(a, now);
                }
            }
            if let Some(ask) = self.nodes[i].election.poll(now) {
                let at = t + self.latency();
                self.to_store.push((at, i, ask));
            }
            // A leader writes (a commit, fenced by its epoch) whenever it runs.
            if let Some(epoch) = self.leads(i, t) {
                if self.row.holder == Some(i) && self.row.epoch == epoch {
                    if let Some(last) = self.landed.last() {
                        if last.2 > epoch {
                            self.violations.push(format!(
                                "at {t} ms node {i} wrote with epoch {epoch} after epoch {}",
                                last.2
                            ));
                        }
                    }
                    self.landed.push((t, i, epoch));
                }
            }
        }
        let leaders: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.leads(i, t).is_some())
            .collect();
        if leaders.len() > 1 {
            self.violations
                .push(format!("at {t} ms nodes {leaders:?} all believe they lead"));
        }
    }
}

/// Runs `faults` in the first 20 s, then 10 s of calm with every node up; the violations.
fn run(seed: u64, n: usize, faults: &[(u64, Fault)]) -> Vec<String> {
    let timing = Timing::default();
    let mut w = World::new(seed, n, timing);
    let mut faults = faults.to_vec();
    faults.sort_by_key(|f| f.0);
    let mut fi = 0;
    for ms in 0..30_000u64 {
        let t = ms as f64;
        while fi < faults.len() && faults[fi].0 <= ms {
            let f = faults[fi].1.clone();
            w.fault(&f, t);
            fi += 1;
        }
        if ms == 20_000 {
            for i in 0..n {
                w.fault(&Fault::Start(i), t);
                w.nodes[i].paused_until_ms = 0.0;
            }
        }
        w.step(t);
    }
    let end = 30_000.0;
    let leaders: Vec<usize> = (0..n)
        .filter(|&i| w.leads(i, end - 1.0).is_some())
        .collect();
    if leaders.len() != 1 {
        w.violations
            .push(format!("after 10 s of calm, {} leaders", leaders.len()));
    }
    w.violations
}

fn fault(n: usize) -> impl Strategy<Value = (u64, Fault)> {
    (
        0u64..20_000,
        prop_oneof![
            3 => (0..n).prop_map(Fault::Crash),
            3 => (0..n).prop_map(Fault::Start),
            2 => ((0..n), 100u64..4_000).prop_map(|(i, ms)| Fault::Pause(i, ms)),
            1 => (0..n).prop_map(Fault::Stop),
        ],
    )
}

#[test]
fn one_leader_emerges_and_a_killed_one_is_replaced_within_a_lease_and_a_poll() {
    // Node 0 or another takes first; then whoever leads is killed, three times.
    let timing = Timing::default();
    let mut w = World::new(1, 3, timing);
    let mut kills = 0;
    for ms in 0..12_000u64 {
        let t = ms as f64;
        if ms % 3_000 == 2_000 {
            if let Some(i) = (0..3).find(|&i| w.leads(i, t).is_some()) {
                w.fault(&Fault::Crash(i), t);
                w.fault(&Fault::Start(i), t + 1.0);
                kills += 1;
            }
        }
        w.step(t);
    }
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    assert_eq!(kills, 4, "a leader was found to kill each time");
    let max = (timing.lease + timing.poll).as_secs_f64() * 1e3 + 15.0;
    for d in &w.deaths {
        let next = w.takings.iter().find(|&&k| k > *d).expect("a new leader");
        assert!(
            next - d <= max,
            "failover took {} ms (at most {max})",
            next - d
        );
    }
}

#[test]
fn a_leader_paused_past_its_lease_wakes_up_deposed_and_its_writes_do_not_land() {
    let timing = Timing::default();
    let mut w = World::new(2, 2, timing);
    let mut paused = None;
    for ms in 0..8_000u64 {
        let t = ms as f64;
        if ms == 1_000 {
            let i = (0..2).find(|&i| w.leads(i, t).is_some()).expect("a leader");
            w.fault(&Fault::Pause(i, 3_000), t);
            paused = Some((i, w.row.epoch));
        }
        w.step(t);
    }
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    let (i, old) = paused.expect("paused");
    assert!(w.row.epoch > old, "another took the row meanwhile");
    assert_ne!(w.row.holder, Some(i));
    assert!(
        w.landed
            .iter()
            .all(|&(t, n, e)| n != i || e != old || t < 1_000.0),
        "no write of the paused leader's epoch after its pause"
    );
}

#[test]
fn a_clean_stop_hands_over_at_once() {
    let timing = Timing::default();
    let mut w = World::new(3, 2, timing);
    for ms in 0..4_000u64 {
        let t = ms as f64;
        if ms == 1_500 {
            let i = (0..2).find(|&i| w.leads(i, t).is_some()).expect("a leader");
            w.fault(&Fault::Stop(i), t);
        }
        w.step(t);
    }
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    let d = w.deaths[0];
    let next = w.takings.iter().find(|&&k| k > d).expect("a new leader");
    // The row is free at once: the standby's next poll takes it.
    let max = timing.poll.as_secs_f64() * 1e3 + 15.0;
    assert!(next - d <= max, "handover took {} ms", next - d);
}

#[test]
fn timings_that_cannot_hold_are_refused() {
    assert!(Timing::default().check().is_ok());
    let slow = Timing {
        renew: Duration::from_millis(700),
        ..Timing::default()
    };
    assert!(slow.check().unwrap_err().contains("half the lease"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn never_two_leaders_over_random_crashes_pauses_and_stops(
        seed in any::<u64>(),
        n in 2usize..5,
        faults in proptest::collection::vec(fault(4), 0..16),
    ) {
        let v = run(seed, n, &faults);
        prop_assert!(v.is_empty(), "{:#?}", v);
    }
}
