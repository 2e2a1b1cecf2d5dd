//! Registry micro-benchmarks: `pick` (least-loaded) and a load update (assign + finish) at
//! 100, 1,000, 10,000 and 50,000 agents over 100 capabilities. Target: ≤ 1 µs median `pick` at
//! 50,000 agents, beside a scan of every capable agent (the baseline). Run: `cargo bench -p
//! spine-dispatcher --bench registry`. `cargo test` runs each benchmark once (criterion's test
//! mode), so the benchmark cannot rot.
//!
//! Each agent offers 5 of the 100 capabilities (so ~2,500 agents per capability at 50,000),
//! has 16 slots and starts with a random number of them busy; a tenth of the agents are
//! draining, so `pick` has to skip some.
//!
//! The `fleet` group times the console's fleet reads (`GET /v1/fleet` and each second of a
//! fleet stream), which run in the dispatcher's core task: a snapshot of every agent, and a
//! delta with nothing changed and with 1 % of the agents changed.

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spine_dispatcher::registry::{FleetView, PickRequest, Registry};
use spine_protocol::{
    Advertise, AgentState, CapabilityAd, CapabilityName, JobId, Load, ProtocolVersion,
};

const CAPS: usize = 100;

fn build(n: usize, rng: &mut StdRng) -> (Registry, Vec<CapabilityName>) {
    let caps: Vec<CapabilityName> = (0..CAPS)
        .map(|i| format!("cap.c{i}").parse().unwrap())
        .collect();
    let mut reg = Registry::new();
    let now = Instant::now();
    for a in 0..n {
        let mut offered: Vec<usize> = (0..5).map(|_| rng.random_range(0..CAPS)).collect();
        offered.sort();
        offered.dedup();
        let ad = Advertise {
            protocol: ProtocolVersion::CURRENT,
            instance: "i".into(),
            gen: 1,
            slots: 16,
            heartbeat_ms: 10_000,
            attrs: Default::default(),
            serves: None,
            capabilities: offered
                .iter()
                .map(|i| CapabilityAd::new(caps[*i].clone()))
                .collect(),
        };
        let load = Load {
            seq: 1,
            gen: 1,
            state: if a % 10 == 0 {
                AgentState::Draining
            } else {
                AgentState::Ready
            },
            in_flight: rng.random_range(0..16),
            yours: 0,
            slots: 16,
            queue: 0,
            loadavg: Some(rng.random_range(0.0..4.0)),
            mem_used: None,
            mem_total: None,
            caps: vec![],
        };
        let jid = format!("agent{a}@bench.example/w").parse().unwrap();
        reg.on_advertise(&jid, &ad, &load, now, rng);
    }
    (reg, caps)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    for n in [100usize, 1_000, 10_000, 50_000] {
        let mut rng = StdRng::seed_from_u64(1);
        let (mut reg, caps) = build(n, &mut rng);
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("pick_least_loaded", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % CAPS;
                black_box(
                    reg.pick(&PickRequest::least_loaded(&caps[i]), &mut rng)
                        .ok(),
                )
            })
        });
        // The baseline: a scan of every capable agent for the lowest load (what a registry
        // without a load-ordered index does on each job).
        g.bench_with_input(BenchmarkId::new("scan_least_loaded", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % CAPS;
                let req = PickRequest::least_loaded(&caps[i]);
                black_box(
                    reg.eligible_agents(&req)
                        .into_iter()
                        .min_by_key(|id| reg.effective_in_flight(*id).unwrap_or(u64::MAX)),
                )
            })
        });
        let job: JobId = "bench-job".parse().unwrap();
        g.bench_with_input(BenchmarkId::new("assign_and_finish", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % CAPS;
                if let Ok(id) = reg.pick(&PickRequest::least_loaded(&caps[i]), &mut rng) {
                    reg.on_assigned(id, job.clone(), caps[i].clone(), &mut rng);
                    reg.on_finished(id, &job, &mut rng);
                }
            })
        });
    }
    g.finish();
}

/// The console's fleet reads, which run in the core's task: a whole snapshot, and a second's
/// delta when nothing changed and when 1 % of the agents did (a busy fleet's second).
fn fleet(c: &mut Criterion) {
    let mut g = c.benchmark_group("fleet");
    let all = |_: &CapabilityName| true;
    let view = FleetView {
        capability: None,
        filter: None,
        visible: &all,
    };
    for n in [1_000usize, 10_000] {
        let mut rng = StdRng::seed_from_u64(1);
        let (mut reg, caps) = build(n, &mut rng);
        let now = Instant::now();
        g.bench_with_input(BenchmarkId::new("snapshot", n), &n, |b, _| {
            b.iter(|| black_box(reg.fleet(&view, None, now).agents.len()))
        });
        let v = reg.version();
        g.bench_with_input(BenchmarkId::new("delta_unchanged", n), &n, |b, _| {
            b.iter(|| black_box(reg.fleet(&view, Some(v), now).agents.len()))
        });
        let job: JobId = "bench-job".parse().unwrap();
        for i in 0..n / 100 {
            let cap = &caps[i % CAPS];
            if let Ok(id) = reg.pick(&PickRequest::least_loaded(cap), &mut rng) {
                reg.on_assigned(id, job.clone(), cap.clone(), &mut rng);
            }
        }
        g.bench_with_input(BenchmarkId::new("delta_1pct_changed", n), &n, |b, _| {
            b.iter(|| black_box(reg.fleet(&view, Some(v), now).agents.len()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, fleet);
criterion_main!(benches);
