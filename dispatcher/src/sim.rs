//! Placement quality in virtual time (`spine bench placement`, BENCHMARKS.md): a fleet of agents
//! of differing speeds and slots, a burst-arrival workload with log-normal job durations, and
//! the **real** [`Registry`] state machine choosing agents with each strategy — beside a
//! "stale least-loaded" baseline that sees load only from a heartbeat every 15 s, with no
//! in-flight accounting (how Nanite placed work).
//!
//! Discrete-event simulation, no I/O and no wall clock: the same seed gives the same figures.
//! Spine strategies queue a job at the dispatcher while every capable agent is full (the
//! registry only picks agents with a free slot) and place it when a slot frees. The stale
//! baseline sends each job at once to the agent whose last report looked least loaded, and the
//! agent queues what it cannot start.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use jid::FullJid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use spine_protocol::{
    Advertise, AgentState, AttrName, CapabilityAd, CapabilityName, JobId, Load, ProtocolVersion,
    Strategy,
};

use crate::registry::{AgentId, PickRequest, Registry};

/// The simulated fleet and workload.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Agents.
    pub agents: usize,
    /// Jobs.
    pub jobs: usize,
    /// Bursts the jobs arrive in (equal sizes).
    pub bursts: usize,
    /// Time between bursts, seconds.
    pub burst_interval_s: f64,
    /// Median job duration on a speed-1 agent, seconds (log-normal).
    pub median_s: f64,
    /// σ of the log-normal.
    pub sigma: f64,
    /// Agent speeds, assigned round robin (a job of base duration d takes d / speed).
    pub speeds: Vec<f64>,
    /// Agent slots, assigned round robin (offset from the speeds, so every pairing occurs).
    pub slots: Vec<u64>,
    /// Heartbeat of the stale baseline, seconds.
    pub stale_heartbeat_s: f64,
    /// Random seed.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            agents: 200,
            jobs: 100_000,
            bursts: 20,
            burst_interval_s: 10.0,
            median_s: 1.0,
            sigma: 1.0,
            speeds: vec![0.5, 1.0, 1.5, 2.0],
            slots: vec![2, 4, 8],
            stale_heartbeat_s: 15.0,
            seed: 7,
        }
    }
}

/// How one strategy did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The strategy.
    pub strategy: String,
    /// Time the last job ended, seconds.
    pub makespan_s: f64,
    /// Makespan ÷ the lower bound.
    pub ratio: f64,
    /// Median wait from arrival to start, seconds.
    pub wait_p50_s: f64,
    /// 99th percentile wait, seconds.
    pub wait_p99_s: f64,
    /// Longest wait, seconds.
    pub wait_max_s: f64,
    /// Mean time from arrival to end, seconds (wait plus run time on the agent chosen).
    pub turnaround_mean_s: f64,
    /// Jobs that ran (must equal the jobs submitted).
    pub completed: usize,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The workload.
    pub workload: Workload,
    /// Lower bound on the makespan, seconds, for any scheduler: the largest of total work ÷
    /// total capacity, every job's arrival plus its duration on the fastest agent, and every
    /// burst's arrival plus the work from it on ÷ capacity.
    pub bound_s: f64,
    /// Total work, speed-1 seconds.
    pub total_work_s: f64,
    /// Total capacity, speed-1 seconds per second.
    pub capacity: f64,
    /// One row per strategy.
    pub outcomes: Vec<Outcome>,
}

struct Job {
    arrival: f64,
    work: f64,
}

fn workload_jobs(w: &Workload) -> Vec<Job> {
    let mut rng = StdRng::seed_from_u64(w.seed);
    let per_burst = w.jobs.div_ceil(w.bursts.max(1));
    (0..w.jobs)
        .map(|i| {
            // Box–Muller: a standard normal from two uniforms.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            Job {
                arrival: (i / per_burst) as f64 * w.burst_interval_s,
                work: w.median_s * (w.sigma * z).exp(),
            }
        })
        .collect()
}

fn agent_params(w: &Workload, i: usize) -> (f64, u64) {
    (
        w.speeds[i % w.speeds.len()],
        w.slots[(i / w.speeds.len()) % w.slots.len()],
    )
}

/// A min-heap of events keyed by time (then sequence, for determinism).
#[derive(Default)]
struct Events {
    heap: BinaryHeap<Reverse<(u64, u64, usize, usize)>>,
    seq: u64,
}

/// Times are kept in integer nanoseconds in the heap so they order exactly.
fn ns(t: f64) -> u64 {
    (t * 1e9).round() as u64
}

impl Events {
    /// (time, kind 0 = arrival / 1 = completion, job, agent)
    fn push(&mut self, t: f64, kind: usize, job: usize, agent: usize) {
        self.seq += 1;
        // Completions before arrivals at the same instant: a freed slot is visible at once.
        let ordered = if kind == 1 { 0 } else { 1 };
        self.heap.push(Reverse((
            ns(t),
            self.seq * 2 + ordered,
            job,
            agent * 2 + kind,
        )));
    }
    fn pop(&mut self) -> Option<(f64, usize, usize, usize)> {
        self.heap
            .pop()
            .map(|Reverse((t, _, job, ak))| (t as f64 / 1e9, ak % 2, job, ak / 2))
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn outcome(name: &str, waits: &mut [f64], turnaround: f64, makespan: f64, bound: f64) -> Outcome {
    let n = waits.len().max(1) as f64;
    waits.sort_by(f64::total_cmp);
    Outcome {
        strategy: name.to_owned(),
        makespan_s: makespan,
        ratio: makespan / bound,
        wait_p50_s: percentile(waits, 0.5),
        wait_p99_s: percentile(waits, 0.99),
        wait_max_s: waits.last().copied().unwrap_or(0.0),
        turnaround_mean_s: turnaround / n,
        completed: waits.len(),
    }
}

/// Runs the workload through the real registry with one strategy (`sort_by_speed`: agents
/// advertise `cost = 1 / speed` and the job asks to sort by it).
fn run_registry(
    w: &Workload,
    jobs: &[Job],
    strategy: Strategy,
    sort_by_speed: bool,
    bound: f64,
) -> Outcome {
    let mut rng = StdRng::seed_from_u64(w.seed ^ 0x5eed);
    let cap: CapabilityName = "sim.work".parse().expect("capability name");
    let cost: AttrName = "cost".parse().expect("attribute name");
    let mut reg = Registry::new();
    let t0 = Instant::now();
    let mut speeds = Vec::with_capacity(w.agents);
    let mut ids: Vec<AgentId> = Vec::with_capacity(w.agents);
    let mut index_of = std::collections::HashMap::new();
    for i in 0..w.agents {
        let (speed, slots) = agent_params(w, i);
        let jid: FullJid = format!("agent{i}@sim/w").parse().expect("jid");
        let mut c = CapabilityAd::new(cap.clone());
        c.attrs.insert(cost.clone(), format!("{:.6}", 1.0 / speed));
        let ad = Advertise {
            protocol: ProtocolVersion::CURRENT,
            instance: format!("i{i}"),
            gen: 1,
            slots,
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
            slots,
            queue: 0,
            loadavg: None,
            mem_used: None,
            mem_total: None,
            caps: Vec::new(),
        };
        reg.on_advertise(&jid, &ad, &load, t0, &mut rng);
        let id = reg.id_of(&jid).expect("registered");
        index_of.insert(id, i);
        ids.push(id);
        speeds.push(speed);
    }
    let job_ids: Vec<JobId> = (0..jobs.len())
        .map(|j| format!("j{j}").parse().expect("job id"))
        .collect();
    let mut events = Events::default();
    for (j, job) in jobs.iter().enumerate() {
        events.push(job.arrival, 0, j, 0);
    }
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut waits = Vec::with_capacity(jobs.len());
    let mut turnaround = 0.0;
    let mut makespan: f64 = 0.0;
    let req = PickRequest {
        capability: &cap,
        strategy,
        filter: None,
        sort: sort_by_speed.then_some(&cost),
        affinity_key: None,
        exclude: &[],
    };
    while let Some((now, kind, job, agent)) = events.pop() {
        if kind == 0 {
            queue.push_back(job);
        } else {
            reg.on_finished(ids[agent], &job_ids[job], &mut rng);
            makespan = makespan.max(now);
        }
        // Place from the head of the queue while agents have room.
        while let Some(&next) = queue.front() {
            match reg.pick(&req, &mut rng) {
                Ok(id) => {
                    queue.pop_front();
                    reg.on_assigned(id, job_ids[next].clone(), cap.clone(), &mut rng);
                    let i = index_of[&id];
                    waits.push(now - jobs[next].arrival);
                    let end = now + jobs[next].work / speeds[i];
                    turnaround += end - jobs[next].arrival;
                    events.push(end, 1, next, i);
                }
                Err(_) => break,
            }
        }
    }
    let name = match (strategy, sort_by_speed) {
        (Strategy::LeastLoaded, true) => "least-loaded, sort=cost (1/speed)".to_owned(),
        (s, _) => s.to_string(),
    };
    outcome(&name, &mut waits, turnaround, makespan, bound)
}

/// The stale baseline: loads known only from each agent's heartbeat (every
/// `stale_heartbeat_s`, agents out of phase), no count of what was sent since; each job goes
/// at once to the agent that looked least loaded (ties: the first), which queues it locally.
fn run_stale(w: &Workload, jobs: &[Job], bound: f64) -> Outcome {
    let n = w.agents;
    let params: Vec<(f64, u64)> = (0..n).map(|i| agent_params(w, i)).collect();
    let mut running = vec![0u64; n];
    let mut local: Vec<VecDeque<usize>> = vec![VecDeque::new(); n];
    let mut reported = vec![0.0f64; n];
    let mut next_beat: Vec<f64> = (0..n)
        .map(|i| w.stale_heartbeat_s * i as f64 / n as f64)
        .collect();
    let mut events = Events::default();
    for (j, job) in jobs.iter().enumerate() {
        events.push(job.arrival, 0, j, 0);
    }
    let mut waits = Vec::with_capacity(jobs.len());
    let mut turnaround = 0.0;
    let mut makespan: f64 = 0.0;
    let start = |i: usize,
                 j: usize,
                 now: f64,
                 running: &mut Vec<u64>,
                 waits: &mut Vec<f64>,
                 turnaround: &mut f64,
                 events: &mut Events| {
        running[i] += 1;
        waits.push(now - jobs[j].arrival);
        let end = now + jobs[j].work / params[i].0;
        *turnaround += end - jobs[j].arrival;
        events.push(end, 1, j, i);
    };
    while let Some((now, kind, job, agent)) = events.pop() {
        // Heartbeats due by now: (queued + running) ÷ slots as last seen.
        for i in 0..n {
            while next_beat[i] <= now {
                reported[i] = (running[i] + local[i].len() as u64) as f64 / params[i].1 as f64;
                next_beat[i] += w.stale_heartbeat_s;
            }
        }
        if kind == 0 {
            let i = (0..n)
                .min_by(|a, b| reported[*a].total_cmp(&reported[*b]))
                .unwrap_or(0);
            if running[i] < params[i].1 {
                start(
                    i,
                    job,
                    now,
                    &mut running,
                    &mut waits,
                    &mut turnaround,
                    &mut events,
                );
            } else {
                local[i].push_back(job);
            }
        } else {
            running[agent] -= 1;
            makespan = makespan.max(now);
            if let Some(j) = local[agent].pop_front() {
                start(
                    agent,
                    j,
                    now,
                    &mut running,
                    &mut waits,
                    &mut turnaround,
                    &mut events,
                );
            }
        }
    }
    outcome(
        "stale least-loaded (15 s heartbeat, no in-flight accounting)",
        &mut waits,
        turnaround,
        makespan,
        bound,
    )
}

/// Runs every strategy over the same workload.
pub fn placement(w: &Workload) -> Report {
    let jobs = workload_jobs(w);
    let capacity: f64 = (0..w.agents)
        .map(|i| {
            let (speed, slots) = agent_params(w, i);
            speed * slots as f64
        })
        .sum();
    let max_speed = w.speeds.iter().copied().fold(0.0, f64::max);
    let total: f64 = jobs.iter().map(|j| j.work).sum();
    let one_job = jobs
        .iter()
        .map(|j| j.arrival + j.work / max_speed)
        .fold(0.0, f64::max);
    // Work arriving at or after each burst cannot finish before arrival + work / capacity.
    let mut bound = (total / capacity).max(one_job);
    let mut remaining = total;
    let mut i = 0;
    while i < jobs.len() {
        let t = jobs[i].arrival;
        bound = bound.max(t + remaining / capacity);
        while i < jobs.len() && jobs[i].arrival == t {
            remaining -= jobs[i].work;
            i += 1;
        }
    }
    let mut outcomes = vec![
        run_registry(w, &jobs, Strategy::LeastLoaded, false, bound),
        run_registry(w, &jobs, Strategy::LeastLoaded, true, bound),
        run_registry(w, &jobs, Strategy::PowerOfTwo, false, bound),
        run_registry(w, &jobs, Strategy::Random, false, bound),
        run_registry(w, &jobs, Strategy::RoundRobin, false, bound),
    ];
    outcomes.push(run_stale(w, &jobs, bound));
    Report {
        workload: w.clone(),
        bound_s: bound,
        total_work_s: total,
        capacity,
        outcomes,
    }
}

/// Virtual time is not wall time: how long the simulation took to compute, for the record.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_is_complete_and_consistent() {
        let w = Workload {
            agents: 20,
            jobs: 3_000,
            bursts: 6,
            burst_interval_s: 2.0,
            ..Workload::default()
        };
        let r = placement(&w);
        assert_eq!(r.outcomes.len(), 6);
        for o in &r.outcomes {
            assert_eq!(o.completed, 3_000, "{}: every job ran once", o.strategy);
            assert!(
                o.ratio >= 0.999,
                "{}: below the lower bound: {o:?}",
                o.strategy
            );
            assert!(o.wait_p50_s <= o.wait_p99_s && o.wait_p99_s <= o.wait_max_s);
        }
        let ll = &r.outcomes[0];
        let stale = r.outcomes.last().unwrap();
        assert!(
            ll.wait_p99_s < stale.wait_p99_s,
            "in-flight accounting beats stale loads: {ll:?} vs {stale:?}"
        );
        // The same seed gives the same figures.
        let again = placement(&w);
        assert_eq!(again.outcomes[0].makespan_s, ll.makespan_s);
    }
}
