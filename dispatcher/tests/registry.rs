//! The registry as a state machine: events in, decisions out, no network, time as a parameter.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jid::FullJid;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use spine_dispatcher::registry::*;
use spine_protocol::{
    Advertise, AgentState, CapabilityAd, CapabilityName, Filter, JobId, Load, ProtocolVersion,
    Strategy,
};

fn jid(n: usize) -> FullJid {
    format!("agent{n}@localhost/w").parse().unwrap()
}
fn cap(s: &str) -> CapabilityName {
    s.parse().unwrap()
}
fn job(n: usize) -> JobId {
    format!("job-{n}").parse().unwrap()
}

/// (capability, its own slots, its attributes)
type CapSpec<'a> = (&'a str, Option<u64>, &'a [(&'a str, &'a str)]);

fn ad(instance: &str, slots: u64, caps: &[CapSpec<'_>]) -> Advertise {
    Advertise {
        protocol: ProtocolVersion::CURRENT,
        instance: instance.into(),
        gen: 1,
        slots,
        heartbeat_ms: 1000,
        attrs: Default::default(),
        serves: None,
        capabilities: caps
            .iter()
            .map(|(n, s, attrs)| {
                let mut c = CapabilityAd::new(cap(n));
                c.slots = *s;
                for (k, v) in *attrs {
                    c.attrs.insert(k.parse().unwrap(), (*v).to_owned());
                }
                c
            })
            .collect(),
    }
}

fn load(seq: u64, slots: u64, in_flight: u64, yours: u64) -> Load {
    Load {
        seq,
        gen: 1,
        state: AgentState::Ready,
        in_flight,
        yours,
        slots,
        queue: 0,
        loadavg: None,
        mem_used: None,
        mem_total: None,
        caps: vec![],
    }
}

struct World {
    reg: Registry,
    rng: StdRng,
    now: Instant,
}

impl World {
    fn new() -> Self {
        World {
            reg: Registry::new(),
            rng: StdRng::seed_from_u64(7),
            now: Instant::now(),
        }
    }
    fn add(&mut self, n: usize, slots: u64, caps: &[CapSpec<'_>]) -> AgentId {
        match self.reg.on_advertise(
            &jid(n),
            &ad("i1", slots, caps),
            &load(1, slots, 0, 0),
            self.now,
            &mut self.rng,
        ) {
            AdvertiseOutcome::Added(id) => id,
            other => panic!("{other:?}"),
        }
    }
    fn pick(&mut self, c: &CapabilityName) -> Result<AgentId, NoPick> {
        self.reg.pick(&PickRequest::least_loaded(c), &mut self.rng)
    }
    fn assign(&mut self, c: &CapabilityName, n: usize) -> Result<AgentId, NoPick> {
        let id = self.pick(c)?;
        self.reg.on_assigned(id, job(n), c.clone(), &mut self.rng);
        Ok(id)
    }
}

#[test]
fn herding_100_jobs_on_10_idle_agents_land_10_each() {
    let mut w = World::new();
    let c = cap("image.thumbnail");
    let ids: Vec<AgentId> = (0..10)
        .map(|n| w.add(n, 10, &[("image.thumbnail", None, &[])]))
        .collect();
    let mut per: HashMap<AgentId, usize> = HashMap::new();
    for n in 0..100 {
        *per.entry(w.assign(&c, n).unwrap()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(per.get(id), Some(&10), "{per:?}");
    }
    assert_eq!(w.pick(&c), Err(NoPick::AllBusy), "every slot is taken");
    // One finishes: exactly that agent has room.
    let holder = w.reg.id_of(&jid(3)).unwrap();
    // Finishing a job not on this agent changes nothing; one of its own frees a slot.
    for n in 0..100 {
        w.reg.on_finished(holder, &job(n), &mut w.rng);
        if w.reg.effective_in_flight(holder) == Some(9) {
            break;
        }
    }
    assert_eq!(w.pick(&c), Ok(holder));
}

#[test]
fn spreads_in_proportion_to_slots() {
    let mut w = World::new();
    let c = cap("c");
    let big = w.add(0, 8, &[("c", None, &[])]);
    let small = w.add(1, 2, &[("c", None, &[])]);
    let mut per: HashMap<AgentId, usize> = HashMap::new();
    for n in 0..10 {
        *per.entry(w.assign(&c, n).unwrap()).or_default() += 1;
    }
    assert_eq!((per[&big], per[&small]), (8, 2));
}

#[test]
fn effective_load_counts_our_jobs_once_and_others_as_reported() {
    let mut w = World::new();
    let c = cap("c");
    let a = w.add(0, 10, &[("c", None, &[])]);
    let b = w.add(1, 10, &[("c", None, &[])]);
    for n in 0..5 {
        w.reg.on_assigned(a, job(n), c.clone(), &mut w.rng);
    }
    // The agent reports our 5 jobs: still 5, not 10.
    assert_eq!(
        w.reg
            .on_load(&jid(0), &load(2, 10, 5, 5), w.now, &mut w.rng),
        LoadOutcome::Updated
    );
    assert_eq!(w.reg.effective_in_flight(a), Some(5));
    // Agent b runs 8 jobs of another dispatcher.
    w.reg
        .on_load(&jid(1), &load(2, 10, 8, 0), w.now, &mut w.rng);
    assert_eq!(w.reg.effective_in_flight(b), Some(8));
    assert_eq!(w.pick(&c), Ok(a), "5/10 beats 8/10");
    // Reported before our job arrived (yours lags): outstanding still counts it.
    w.reg.on_assigned(a, job(99), c.clone(), &mut w.rng);
    w.reg
        .on_load(&jid(0), &load(3, 10, 5, 5), w.now, &mut w.rng);
    assert_eq!(w.reg.effective_in_flight(a), Some(6));
}

#[test]
fn load_reports_stale_unknown_and_generation() {
    let mut w = World::new();
    w.add(0, 4, &[("c", None, &[])]);
    assert_eq!(
        w.reg.on_load(&jid(0), &load(5, 4, 1, 0), w.now, &mut w.rng),
        LoadOutcome::Updated
    );
    assert_eq!(
        w.reg.on_load(&jid(0), &load(5, 4, 2, 0), w.now, &mut w.rng),
        LoadOutcome::Stale
    );
    assert_eq!(
        w.reg.on_load(&jid(0), &load(3, 4, 2, 0), w.now, &mut w.rng),
        LoadOutcome::NeedHello,
        "seq went back: restarted"
    );
    assert_eq!(
        w.reg.on_load(&jid(9), &load(1, 4, 0, 0), w.now, &mut w.rng),
        LoadOutcome::NeedHello,
        "unknown agent"
    );
    let mut l = load(6, 4, 0, 0);
    l.gen = 2;
    assert_eq!(
        w.reg.on_load(&jid(0), &l, w.now, &mut w.rng),
        LoadOutcome::NeedHello,
        "new advertisement generation"
    );
}

#[test]
fn restart_and_loss_return_our_outstanding_jobs() {
    let mut w = World::new();
    let c = cap("c");
    let a = w.add(0, 4, &[("c", None, &[])]);
    w.reg.on_assigned(a, job(1), c.clone(), &mut w.rng);
    w.reg.on_assigned(a, job(2), c.clone(), &mut w.rng);
    // Same instance: an update keeps our outstanding jobs.
    assert_eq!(
        w.reg.on_advertise(
            &jid(0),
            &ad("i1", 4, &[("c", None, &[])]),
            &load(2, 4, 2, 2),
            w.now,
            &mut w.rng
        ),
        AdvertiseOutcome::Updated(a)
    );
    assert_eq!(w.reg.effective_in_flight(a), Some(2));
    // New instance: the old process is gone with our jobs.
    match w.reg.on_advertise(
        &jid(0),
        &ad("i2", 4, &[("c", None, &[])]),
        &load(1, 4, 0, 0),
        w.now,
        &mut w.rng,
    ) {
        AdvertiseOutcome::Restarted(id, mut lost) => {
            lost.sort();
            assert_eq!((id, lost), (a, vec![job(1), job(2)]));
        }
        other => panic!("{other:?}"),
    }
    w.reg.on_assigned(a, job(3), c.clone(), &mut w.rng);
    assert_eq!(w.reg.on_agent_gone(&jid(0)), vec![job(3)]);
    assert_eq!(w.pick(&c), Err(NoPick::NoCapableAgent));
    assert!(
        w.reg.on_agent_gone(&jid(0)).is_empty(),
        "gone twice is harmless"
    );
    assert!(w.reg.capabilities().is_empty());
}

#[test]
fn per_capability_slots_and_draining() {
    let mut w = World::new();
    let gpu = cap("gpu.render");
    let a = w.add(0, 8, &[("gpu.render", Some(1), &[]), ("c", None, &[])]);
    let b = w.add(1, 8, &[("gpu.render", Some(1), &[])]);
    let first = w.assign(&gpu, 1).unwrap();
    let second = w.assign(&gpu, 2).unwrap();
    assert_ne!(first, second, "one gpu job per agent");
    assert_eq!(w.pick(&gpu), Err(NoPick::AllBusy));
    assert!(
        w.pick(&cap("c")).is_ok(),
        "the agent still has room for other capabilities"
    );
    let _ = (a, b);
    // A draining agent takes nothing.
    let mut l = load(2, 8, 0, 0);
    l.state = AgentState::Draining;
    w.reg.on_load(&jid(0), &l, w.now, &mut w.rng);
    assert_eq!(w.pick(&cap("c")), Err(NoPick::AllBusy));
}

#[test]
fn silent_agents_are_suspected_until_they_report() {
    let mut w = World::new();
    let c = cap("c");
    w.add(0, 2, &[("c", None, &[])]);
    assert!(w
        .reg
        .check_silent(w.now + Duration::from_millis(2900))
        .is_empty());
    assert_eq!(
        w.reg.check_silent(w.now + Duration::from_millis(3100)),
        vec![jid(0)]
    );
    assert!(
        w.reg
            .check_silent(w.now + Duration::from_millis(3200))
            .is_empty(),
        "reported once"
    );
    assert_eq!(w.pick(&c), Err(NoPick::AllBusy));
    assert!(
        w.reg.rank(&c, None, None, None).is_empty(),
        "suspects are not offered"
    );
    w.reg.on_load(
        &jid(0),
        &load(2, 2, 0, 0),
        w.now + Duration::from_secs(4),
        &mut w.rng,
    );
    assert!(w.pick(&c).is_ok());
}

#[test]
fn filters_sort_and_exclusion() {
    let mut w = World::new();
    let c = cap("c");
    let cheap = w.add(0, 4, &[("c", None, &[("cost", "0.10"), ("zone", "eu-1")])]);
    let gpu = w.add(
        1,
        4,
        &[(
            "c",
            None,
            &[("cost", "0.90"), ("gpu", "true"), ("zone", "us-1")],
        )],
    );
    let mid = w.add(2, 4, &[("c", None, &[("cost", "0.50"), ("zone", "eu-2")])]);
    let f: Filter = "gpu".parse().unwrap();
    let req = PickRequest {
        filter: Some(&f),
        ..PickRequest::least_loaded(&c)
    };
    assert_eq!(w.reg.pick(&req, &mut w.rng), Ok(gpu));
    let f: Filter = "zone in (eu-1, eu-2), !gpu".parse().unwrap();
    for n in 0..8 {
        let req = PickRequest {
            filter: Some(&f),
            ..PickRequest::least_loaded(&c)
        };
        let id = w.reg.pick(&req, &mut w.rng).unwrap();
        assert_ne!(id, gpu);
        w.reg.on_assigned(id, job(n), c.clone(), &mut w.rng);
    }
    let req = PickRequest {
        filter: Some(&f),
        ..PickRequest::least_loaded(&c)
    };
    assert_eq!(w.reg.pick(&req, &mut w.rng), Err(NoPick::AllBusy));
    let none: Filter = "zone=mars".parse().unwrap();
    let req = PickRequest {
        filter: Some(&none),
        ..PickRequest::least_loaded(&c)
    };
    assert_eq!(w.reg.pick(&req, &mut w.rng), Err(NoPick::NoCapableAgent));
    for n in 0..8 {
        w.reg.on_finished(cheap, &job(n), &mut w.rng);
        w.reg.on_finished(mid, &job(n), &mut w.rng);
    }
    // Cheapest first even when it is busier; ties by load.
    let cost: spine_protocol::AttrName = "cost".parse().unwrap();
    w.reg.on_assigned(cheap, job(50), c.clone(), &mut w.rng);
    let req = PickRequest {
        sort: Some(&cost),
        ..PickRequest::least_loaded(&c)
    };
    assert_eq!(w.reg.pick(&req, &mut w.rng), Ok(cheap));
    let req = PickRequest {
        sort: Some(&cost),
        exclude: &[cheap],
        ..PickRequest::least_loaded(&c)
    };
    assert_eq!(w.reg.pick(&req, &mut w.rng), Ok(mid));
    let ranked: Vec<String> = w
        .reg
        .rank(&c, None, Some(&cost), Some(2))
        .into_iter()
        .map(|a| a.jid.to_string())
        .collect();
    assert_eq!(ranked, vec![jid(0).to_string(), jid(2).to_string()]);
}

#[test]
fn rank_orders_by_effective_load() {
    let mut w = World::new();
    let c = cap("c");
    let ids: Vec<AgentId> = (0..3).map(|n| w.add(n, 4, &[("c", None, &[])])).collect();
    for (i, id) in ids.iter().enumerate() {
        for k in 0..(3 - i) {
            w.reg
                .on_assigned(*id, job(i * 10 + k), c.clone(), &mut w.rng);
        }
    }
    let ranked = w.reg.rank(&c, None, None, None);
    let order: Vec<(String, u64, f64)> = ranked
        .iter()
        .map(|a| (a.jid.to_string(), a.in_flight, a.load))
        .collect();
    assert_eq!(
        order,
        vec![
            (jid(2).to_string(), 1, 0.25),
            (jid(1).to_string(), 2, 0.5),
            (jid(0).to_string(), 3, 0.75)
        ]
    );
}

#[test]
fn ties_break_by_loadavg() {
    let mut w = World::new();
    let c = cap("c");
    w.add(0, 4, &[("c", None, &[])]);
    let calm = w.add(1, 4, &[("c", None, &[])]);
    let mut busy = load(2, 4, 0, 0);
    busy.loadavg = Some(3.5);
    let mut quiet = load(2, 4, 0, 0);
    quiet.loadavg = Some(0.2);
    w.reg.on_load(&jid(0), &busy, w.now, &mut w.rng);
    w.reg.on_load(&jid(1), &quiet, w.now, &mut w.rng);
    for _ in 0..5 {
        assert_eq!(w.pick(&c), Ok(calm));
    }
}

#[test]
fn strategies() {
    let mut w = World::new();
    let c = cap("c");
    let ids: Vec<AgentId> = (0..4).map(|n| w.add(n, 100, &[("c", None, &[])])).collect();
    // Round robin visits every agent in turn.
    let rr: Vec<AgentId> = (0..8)
        .map(|_| {
            w.reg
                .pick(
                    &PickRequest {
                        strategy: Strategy::RoundRobin,
                        ..PickRequest::least_loaded(&c)
                    },
                    &mut w.rng,
                )
                .unwrap()
        })
        .collect();
    assert_eq!(&rr[..4], &rr[4..]);
    let mut seen = rr[..4].to_vec();
    seen.sort();
    assert_eq!(seen, ids);
    // Random reaches every agent and only eligible ones.
    let mut hits: HashMap<AgentId, usize> = HashMap::new();
    for _ in 0..400 {
        let id = w
            .reg
            .pick(
                &PickRequest {
                    strategy: Strategy::Random,
                    exclude: &[ids[0]],
                    ..PickRequest::least_loaded(&c)
                },
                &mut w.rng,
            )
            .unwrap();
        *hits.entry(id).or_default() += 1;
    }
    assert!(!hits.contains_key(&ids[0]));
    assert!(hits.values().all(|n| *n > 60), "{hits:?}");
    // Power of two prefers the less loaded of its draws: the heavily loaded agent rarely wins.
    for n in 0..90 {
        w.reg.on_assigned(ids[1], job(n), c.clone(), &mut w.rng);
    }
    let mut p2: HashMap<AgentId, usize> = HashMap::new();
    for _ in 0..300 {
        let id = w
            .reg
            .pick(
                &PickRequest {
                    strategy: Strategy::PowerOfTwo,
                    ..PickRequest::least_loaded(&c)
                },
                &mut w.rng,
            )
            .unwrap();
        *p2.entry(id).or_default() += 1;
    }
    assert!(p2.get(&ids[1]).copied().unwrap_or(0) < 30, "{p2:?}");
    // Affinity: the same key, the same agent; losing another agent does not move it.
    let aff = |w: &mut World, key: &str| {
        w.reg.pick(
            &PickRequest {
                strategy: Strategy::Affinity,
                affinity_key: Some(key),
                ..PickRequest::least_loaded(&c)
            },
            &mut w.rng,
        )
    };
    let home = aff(&mut w, "user-42").unwrap();
    assert_eq!(aff(&mut w, "user-42").unwrap(), home);
    let other = ids.iter().copied().find(|i| *i != home).unwrap();
    w.reg.on_agent_gone(&w.reg.jid_of(other).unwrap().clone());
    assert_eq!(aff(&mut w, "user-42").unwrap(), home);
    let keys: std::collections::HashSet<AgentId> = (0..50)
        .map(|k| aff(&mut w, &format!("k{k}")).unwrap())
        .collect();
    assert!(keys.len() >= 2, "keys spread over agents");
    // All: every eligible agent.
    assert_eq!(
        w.reg.eligible_agents(&PickRequest::least_loaded(&c)).len(),
        3
    );
}

proptest! {
    /// Any interleaving of assignments and completions keeps the accounting exact and never
    /// picks an agent without room.
    #[test]
    fn accounting_invariants(ops in proptest::collection::vec((any::<bool>(), 0usize..200), 1..300)) {
        let mut w = World::new();
        let c = cap("c");
        let ids: Vec<AgentId> = (0..5).map(|n| w.add(n, 3, &[("c", None, &[])])).collect();
        let mut live: Vec<(usize, AgentId)> = Vec::new();
        let mut next = 0;
        for (assign, k) in ops {
            if assign {
                match w.pick(&c) {
                    Ok(id) => {
                        prop_assert!(w.reg.effective_in_flight(id).unwrap() < 3);
                        w.reg.on_assigned(id, job(next), c.clone(), &mut w.rng);
                        live.push((next, id));
                        next += 1;
                    }
                    Err(NoPick::AllBusy) => prop_assert_eq!(live.len(), 15),
                    Err(e) => prop_assert!(false, "{e:?}"),
                }
            } else if !live.is_empty() {
                let (j, id) = live.remove(k % live.len());
                w.reg.on_finished(id, &job(j), &mut w.rng);
            }
            for id in &ids {
                let expected = live.iter().filter(|(_, a)| a == id).count() as u64;
                prop_assert_eq!(w.reg.effective_in_flight(*id), Some(expected));
            }
        }
    }
}
