//! `spine bench <scenario>`: benchmarks that print a table with their baseline beside Spine's
//! figure and write the same as JSON (BENCHMARKS.md records the results).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use spine_dispatcher::sim::{placement, timed, Workload};

/// Arguments of `spine bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Placement quality in virtual time: the real scheduler with each strategy, beside a
    /// stale least-loaded baseline (15 s heartbeats, no in-flight accounting).
    Placement {
        /// Agents (speeds 0.5/1/1.5/2 and slots 2/4/8, in every pairing).
        #[arg(long, default_value_t = 200)]
        agents: usize,
        /// Jobs (log-normal durations, median 1 s at speed 1, σ 1).
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        /// Bursts the jobs arrive in.
        #[arg(long, default_value_t = 20)]
        bursts: usize,
        /// Seconds between bursts (capacity is about 1,150 job-seconds per second).
        #[arg(long, default_value_t = 10.0)]
        burst_interval: f64,
        /// Random seed (the same seed gives the same figures).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub fn run(a: BenchArgs) -> Result<bool> {
    match a.scenario {
        Scenario::Placement {
            agents,
            jobs,
            bursts,
            burst_interval,
            seed,
            json,
        } => {
            if agents == 0 || jobs == 0 || bursts == 0 {
                anyhow::bail!("--agents, --jobs and --bursts must be at least 1");
            }
            if !(burst_interval >= 0.0 && burst_interval.is_finite()) {
                anyhow::bail!("--burst-interval must be a number of seconds, 0 or more");
            }
            let w = Workload {
                agents,
                jobs,
                bursts,
                burst_interval_s: burst_interval,
                seed,
                ..Workload::default()
            };
            let (r, took) = timed(|| placement(&w));
            println!(
                "placement: {agents} agents, {jobs} jobs in {bursts} bursts {}s apart, log-normal durations (median {} s, sigma {}), seed {seed}",
                w.burst_interval_s, w.median_s, w.sigma
            );
            println!(
                "total work {:.0} s at speed 1, capacity {:.1} per s: lower bound on the makespan {:.1} s",
                r.total_work_s, r.capacity, r.bound_s
            );
            println!(
                "{:<62} {:>10} {:>8} {:>9} {:>9} {:>9} {:>11}",
                "strategy", "makespan", "÷ bound", "wait p50", "wait p99", "wait max", "turnaround"
            );
            for o in &r.outcomes {
                println!(
                    "{:<62} {:>9.1}s {:>8.3} {:>8.2}s {:>8.2}s {:>8.2}s {:>10.2}s",
                    o.strategy,
                    o.makespan_s,
                    o.ratio,
                    o.wait_p50_s,
                    o.wait_p99_s,
                    o.wait_max_s,
                    o.turnaround_mean_s
                );
            }
            println!("(computed in {:.2} s of wall time)", took.as_secs_f64());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&r)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(true)
        }
    }
}
