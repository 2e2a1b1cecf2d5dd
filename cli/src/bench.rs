//! `spine bench <scenario>`: benchmarks that print a table with their baseline beside Spine's
//! figure and write the same as JSON (BENCHMARKS.md records the results).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures::{StreamExt as _, TryStreamExt as _};
use spine_dispatcher::sim::{placement, timed, Workload};

mod console;
mod cost;
mod events;
mod https;
mod images;
mod payload;
mod procs;
mod retained;
mod soak;
mod split;

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
    /// A large payload through the data plane, leg by leg (upload into the blob store, a
    /// stored blob fetched and hashed, and end to end: upload, agent fetch, `hash.sha256`,
    /// result), beside a raw TCP loopback copy of the same bytes, with the peak RSS growth.
    Payload {
        /// Payload size in MiB.
        #[arg(long, default_value_t = 20)]
        mib: usize,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// HTTPS on the dispatcher (a self-signed certificate the client and agent trust).
        #[arg(long)]
        tls: bool,
        /// The agent without the HTTP data plane (`http_data = false`): chunks over XMPP.
        #[arg(long)]
        in_band: bool,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The image workload (issue 17): thumbnails of generated JPEG photos of several MB,
    /// each uploaded as a job's raw input and thumbnailed by `image.thumbnail` on a fresh
    /// local farm, beside one process making the same thumbnails with the same handler in
    /// the same run; every thumbnail is checked byte for byte.
    Images {
        /// Photos to generate (deterministically, into a temporary directory).
        #[arg(long, default_value_t = 200)]
        photos: usize,
        /// Smallest photo file size, MiB.
        #[arg(long, default_value_t = 5.0)]
        min_mib: f64,
        /// Largest photo file size, MiB (sizes spread evenly between the two).
        #[arg(long, default_value_t = 20.0)]
        max_mib: f64,
        /// Agent counts to run (one slot each, a fresh farm per count and run),
        /// comma-separated: `1,2` shows the scaling.
        #[arg(long, value_delimiter = ',', default_value = "2")]
        agents: Vec<usize>,
        /// Thumbnail size: fit inside SIZE × SIZE pixels.
        #[arg(long, default_value_t = 256)]
        size: u32,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Jobs in flight (default: twice the farm's agents, so that each agent has its next
        /// photo uploaded while it works on one).
        #[arg(long)]
        window: Option<usize>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Map/reduce scaling: a word count over a generated corpus, shipped through the bus as a
    /// fragment list, on local farms of 1, 2 and 4 agents, beside a single-process count.
    Mapreduce {
        /// Corpus size in MiB.
        #[arg(long, default_value_t = 200)]
        mib: usize,
        /// Agent counts to run (one slot each), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        agents: Vec<usize>,
        /// Size of each fragment (one map step) in MiB.
        #[arg(long, default_value_t = 4)]
        fragment_mib: usize,
        /// Reduce fan-in.
        #[arg(long, default_value_t = 16)]
        fan_in: u64,
        /// Runs of the whole set; each farm run is preceded by its own single-process count,
        /// so that the machine's drift falls on both (medians are reported).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Also run each farm with `data_listen` on every agent (map outputs kept by the
        /// agents that made them, reduce steps placed near them, PROTOCOL.md §13.5), right
        /// after the same farm without it.
        #[arg(long)]
        data_listen: bool,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The HTTP API over plain HTTP and over HTTPS in the same run, on fresh local farms in
    /// alternating runs: no-op jobs submitted and followed to their end as `spine submit
    /// --wait` does, one at a time and many in flight, and requests on fresh connections
    /// (what a TLS handshake costs).
    Https {
        /// No-op jobs one at a time, per run and scheme.
        #[arg(long, default_value_t = 500)]
        seq_jobs: usize,
        /// No-op jobs with --window in flight, per run and scheme.
        #[arg(long, default_value_t = 3000)]
        par_jobs: usize,
        /// Jobs in flight in the second measurement.
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// `GET /healthz` requests, each on a new connection.
        #[arg(long, default_value_t = 300)]
        connections: usize,
        /// Runs of each scheme (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Webhook events at a steady rate into a rule (docs/events.md) on a farm of separate
    /// processes, with a kill -9 of the dispatcher in the middle: latency from each event's
    /// time to its 202 (its job stored, and placed when an agent is free), and every event
    /// making exactly one job.
    Events {
        /// Events a second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// For this many seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Seconds into the run at which the dispatcher is killed (-9) and started again
        /// [default: half of --seconds].
        #[arg(long, conflicts_with = "no_kill")]
        kill_at: Option<u64>,
        /// No kill.
        #[arg(long)]
        no_kill: bool,
        /// An existing directory for the farm (configs, logs, job store), removed after the
        /// run [default: the current directory, since /tmp may be memory].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// No-op job throughput with no finished jobs held and with many (as 24 h of retention
    /// holds them), each on a fresh one-agent local farm, in alternating runs; also the time
    /// of `GET /v1/jobs?limit=100` and `GET /metrics` at both sizes.
    Retained {
        /// Finished jobs held in the second configuration (written to the store before the
        /// dispatcher starts, which loads them into its table).
        #[arg(long, default_value_t = 100_000)]
        retained: usize,
        /// No-op jobs measured per run.
        #[arg(long, default_value_t = 4_000)]
        jobs: usize,
        /// Jobs in flight at once (each submitted over HTTP and followed over an event stream
        /// to its end; the dispatcher lets one token hold 32 streams, and a finished one may
        /// count for a moment after its job ended).
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Runs of each configuration (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The console's requests (docs/console.md): jobs pages with each filter, a deep page, one
    /// job, the capabilities and the fleet, timed with many finished jobs held and with none,
    /// each on a fresh local farm, in alternating runs.
    Console {
        /// Finished jobs held in the second configuration (written to the store before the
        /// dispatcher starts).
        #[arg(long, default_value_t = 100_000)]
        held: usize,
        /// Requests timed per figure (the median is kept).
        #[arg(long, default_value_t = 7)]
        probes: usize,
        /// Runs of each configuration (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The split step by reference (issue 17, item 5): the peak RSS of a `spine agent`
    /// process splitting an input of each size (written to disk, uploaded to a fresh local
    /// farm, named by `input_ref`), against that size; map and reduce steps run elsewhere.
    Split {
        /// Input sizes in GiB, comma-separated: `1,10` (needs about 3× the largest free on
        /// disk: the blob store's copy, the agent's copy and the fragments).
        #[arg(long, value_delimiter = ',', default_value = "1")]
        gib: Vec<f64>,
        /// The split step's fragment size in MiB.
        #[arg(long, default_value_t = 64)]
        fragment_mib: u64,
        /// Directory for the inputs, the blob store and the agent's work files (default: the
        /// system's temporary directory); each run's files are deleted after it.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// CPU time and latency per no-op job over HTTP (issue 19): `POST /v1/jobs?wait=30s`
    /// one at a time and many in flight on a fresh farm of separate processes (server,
    /// dispatcher, one agent), the CPU each used per job read from /proc, the job store on
    /// the disk of --dir; with --against, alternating runs of another `spine` build.
    Cost {
        /// No-op jobs one at a time, per run.
        #[arg(long, default_value_t = 2_000)]
        seq_jobs: usize,
        /// No-op jobs with --window in flight, per run.
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Jobs in flight in the warm-up and the throughput phase (also the agent's slots).
        #[arg(long, default_value_t = 64)]
        window: usize,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// An existing directory in which each run's farm gets a fresh directory (configs,
        /// logs, job store), deleted after the run: the disk the store is measured on
        /// [default: the current directory, since /tmp may be memory].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Another `spine` binary (an older build) to measure the same way, one run of it
        /// after each run of this one; prints the ratios this ÷ that. It runs with the
        /// embedded store whatever --store says: `--store URL --against <this binary>` gives
        /// PostgreSQL ÷ redb.
        #[arg(long)]
        against: Option<PathBuf>,
        /// The dispatcher's job store: a PostgreSQL URL of a scratch database, whose Spine
        /// tables are dropped before each run [default: the embedded store in the run's
        /// directory]. A server on this machine has its processes' CPU per job counted too,
        /// beside the total.
        #[arg(long)]
        store: Option<String>,
        /// Dispatchers sharing the --store (PostgreSQL): one leads, the others stand by, and
        /// the jobs are submitted to each in turn (standbys store them for the leader).
        #[arg(long, default_value_t = 1)]
        dispatchers: usize,
        /// With --dispatchers: every job to the leader, the standbys only kept warm (what a
        /// client that follows the `leader` of a standby's 503 does).
        #[arg(long)]
        to_leader: bool,
        /// Where the client of the jobs one at a time runs: "own" (a thread and a
        /// single-threaded runtime of its own, as a web app's request handler) or "shared"
        /// (the benchmark's multi-thread runtime, the only client of builds before this
        /// option; --against such a build uses it on both sides).
        #[arg(long, value_enum, default_value = "own")]
        seq_client: cost::SeqClient,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Memory over time (issue 17, item 7): server, dispatcher and 2 agents as separate
    /// processes under a steady mix of jobs for minutes with a short retention, then idle for
    /// retention + 60 s; every sample the RSS of each process, the job store's and the blob
    /// store's size, the jobs held and the throughput.
    Soak {
        /// Seconds of load.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Callers, each submitting a job over HTTP and following it to its end, in a loop.
        #[arg(long, default_value_t = 24)]
        callers: usize,
        /// Share of the jobs with a large input (hash.sha256 of it), percent; the rest are
        /// text.upper of a short text.
        #[arg(long, default_value_t = 5)]
        large_percent: u32,
        /// Size of a large input, KiB.
        #[arg(long, default_value_t = 200)]
        large_kib: usize,
        /// The dispatcher's retention of finished jobs (also its blob_orphan_ttl).
        #[arg(long, default_value = "60s", value_parser = duration_arg)]
        retention: std::time::Duration,
        /// Time between samples.
        #[arg(long, default_value = "5s", value_parser = duration_arg)]
        sample: std::time::Duration,
        /// How long to keep sampling after the load [default: retention + 60s].
        #[arg(long, value_parser = duration_arg)]
        after: Option<std::time::Duration>,
        /// Also write the results (every sample) as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// A duration with its unit (`"60s"`, `"2m"`), as in the configuration files.
fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    spine_protocol::units::parse_duration(s)
        .map_err(|e| format!("expected a duration such as \"60s\": {e}"))
}

/// Writes a benchmark's results to `--json FILE`, when given.
fn write_json(json: Option<PathBuf>, r: &serde_json::Value) -> Result<()> {
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(r)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<bool> {
    // The farms' logs, when asked for (to see where a run's time goes); none by default.
    if std::env::var_os("RUST_LOG").is_some() {
        crate::server::init_logging("warn");
    }
    match a.scenario {
        Scenario::Images {
            photos,
            min_mib,
            max_mib,
            agents,
            size,
            runs,
            window,
            json,
        } => {
            if photos == 0
                || runs == 0
                || window == Some(0)
                || agents.is_empty()
                || agents.contains(&0)
            {
                anyhow::bail!(
                    "--photos, --runs, --window and every --agents count must be at least 1"
                );
            }
            if !(min_mib > 0.0 && min_mib <= max_mib && max_mib <= 1024.0) {
                anyhow::bail!("--min-mib must be above 0 and at most --max-mib, and --max-mib at most 1024 (sizes in MiB, e.g. --min-mib 5 --max-mib 20)");
            }
            if !(1..=spine_example_image::MAX_SIDE).contains(&size) {
                anyhow::bail!("--size must be from 1 to {}", spine_example_image::MAX_SIDE);
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(images::run(images::Options {
                photos,
                min_mib,
                max_mib,
                agents,
                size,
                runs,
                window,
            }))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Split {
            gib,
            fragment_mib,
            dir,
            json,
        } => {
            if gib.is_empty() || gib.iter().any(|g| !(*g > 0.0 && *g <= 1024.0)) {
                anyhow::bail!(
                    "every --gib size must be above 0 and at most 1024 (e.g. --gib 1,10)"
                );
            }
            if !(1..=1024).contains(&fragment_mib) {
                anyhow::bail!("--fragment-mib must be from 1 to 1024");
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(split::run(split::Options {
                gib,
                fragment_mib,
                dir,
            }))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Soak {
            seconds,
            callers,
            large_percent,
            large_kib,
            retention,
            sample,
            after,
            json,
        } => {
            if seconds == 0 || callers == 0 || large_kib == 0 {
                anyhow::bail!("--seconds, --callers and --large-kib must be at least 1");
            }
            if large_percent > 100 {
                anyhow::bail!("--large-percent must be from 0 to 100");
            }
            if large_kib > 64 * 1024 {
                anyhow::bail!("--large-kib must be at most 65536 (the agents' max_input_size)");
            }
            if retention < std::time::Duration::from_secs(1)
                || sample < std::time::Duration::from_millis(100)
            {
                anyhow::bail!("--retention must be at least 1s and --sample at least 100ms");
            }
            let mix = soak::Mix {
                seconds,
                callers,
                large_percent,
                large_kib,
                retention,
                sample,
                after: after.unwrap_or(retention + std::time::Duration::from_secs(60)),
            };
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let (r, passed) = rt.block_on(soak::run(mix))?;
            write_json(json, &r)?;
            Ok(passed)
        }
        Scenario::Cost {
            seq_jobs,
            jobs,
            window,
            runs,
            dir,
            against,
            store,
            dispatchers,
            to_leader,
            seq_client,
            json,
        } => {
            if to_leader && dispatchers < 2 {
                anyhow::bail!("--to-leader needs --dispatchers 2 or more (with one, every job goes to it anyway)");
            }
            for (flag, n) in [
                ("--seq-jobs", seq_jobs),
                ("--jobs", jobs),
                ("--window", window),
                ("--runs", runs),
                ("--dispatchers", dispatchers),
            ] {
                if n == 0 {
                    anyhow::bail!("{flag} must be at least 1 (it was 0)");
                }
            }
            if window > 1000 {
                anyhow::bail!("--window must be at most 1000 (each job in flight holds a connection and an agent slot)");
            }
            if dispatchers > 1 && store.is_none() {
                anyhow::bail!("--dispatchers {dispatchers} needs --store: several dispatchers share a PostgreSQL store");
            }
            if dispatchers > 9 {
                anyhow::bail!("--dispatchers must be at most 9");
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(cost::run(cost::Options {
                seq_jobs,
                jobs,
                window,
                runs,
                dir,
                against,
                store,
                dispatchers,
                to_leader,
                seq_client,
            }))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Https {
            seq_jobs,
            par_jobs,
            window,
            connections,
            runs,
            json,
        } => {
            if seq_jobs == 0 || par_jobs == 0 || window == 0 || connections == 0 || runs == 0 {
                anyhow::bail!(
                    "--seq-jobs, --par-jobs, --window, --connections and --runs must be at least 1"
                );
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(https::run(seq_jobs, par_jobs, window, connections, runs))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Mapreduce {
            mib,
            agents,
            fragment_mib,
            fan_in,
            runs,
            data_listen,
            json,
        } => {
            if mib == 0
                || fragment_mib == 0
                || runs == 0
                || agents.is_empty()
                || agents.contains(&0)
            {
                anyhow::bail!(
                    "--mib, --fragment-mib, --runs and every --agents count must be at least 1"
                );
            }
            if !(2..=spine_protocol::MAX_FAN_IN).contains(&fan_in) {
                anyhow::bail!("--fan-in must be from 2 to {}", spine_protocol::MAX_FAN_IN);
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(mapreduce(
                mib,
                &agents,
                fragment_mib,
                fan_in,
                runs,
                data_listen,
            ))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Retained {
            retained,
            jobs,
            window,
            runs,
            json,
        } => {
            if jobs == 0 || window == 0 || runs == 0 {
                anyhow::bail!("--jobs, --window and --runs must be at least 1");
            }
            if retained == 0 {
                // Its figure is the rate with jobs held beside the rate with none.
                anyhow::bail!("--retained must be at least 1 (the jobs held in the second configuration; the first holds none)");
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(retained::run(retained, jobs, window, runs))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Events {
            rate,
            seconds,
            kill_at,
            no_kill,
            dir,
            json,
        } => {
            if rate == 0 || seconds == 0 || rate > 100_000 {
                anyhow::bail!("--rate must be 1 to 100000 and --seconds at least 1");
            }
            let kill_at = (!no_kill).then(|| kill_at.unwrap_or(seconds / 2));
            if kill_at.is_some_and(|k| k >= seconds) {
                anyhow::bail!("--kill-at must be less than --seconds");
            }
            let dir = match dir {
                Some(d) => d,
                None => std::env::current_dir().context("the current directory")?,
            };
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(events::run(rate, seconds, kill_at, &dir))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Console {
            held,
            probes,
            runs,
            json,
        } => {
            if probes == 0 || runs == 0 {
                anyhow::bail!("--probes and --runs must be at least 1");
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(console::run(held, runs, probes))?;
            write_json(json, &r)?;
            Ok(true)
        }
        Scenario::Payload {
            mib,
            runs,
            tls,
            in_band,
            json,
        } => {
            if mib == 0 || runs == 0 {
                anyhow::bail!("--mib and --runs must be at least 1");
            }
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let r = rt.block_on(payload::run(mib, runs, payload::Mode { tls, in_band }))?;
            write_json(json, &r)?;
            Ok(true)
        }
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
            write_json(json, &serde_json::to_value(&r)?)?;
            Ok(true)
        }
    }
}

/// A `/proc/<pid>/status` field (`VmRSS`, `VmHWM`) in bytes, of `pid` or `"self"`; `None`
/// off Linux or when the process is gone.
pub(crate) fn proc_status_bytes(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Waits (up to 30 s) until the dispatcher at `api` lists `n` agents offering `capability`.
pub(crate) async fn wait_for_agents(
    api: &spine_client::Client,
    capability: &str,
    n: usize,
) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let a = api
            .call(
                api.request(
                    reqwest::Method::GET,
                    &format!("/v1/agents?capability={capability}"),
                ),
                "agents",
            )
            .await?;
        if a["agents"].as_array().map_or(0, Vec::len) >= n {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{n} agents offering {capability} did not register within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Map/reduce scaling: the same word count on farms of each size, beside one process.
async fn mapreduce(
    mib: usize,
    agent_counts: &[usize],
    fragment_mib: usize,
    fan_in: u64,
    runs: usize,
    data_listen: bool,
) -> Result<serde_json::Value> {
    use spine_example_wordcount as wc;
    let variants: &[bool] = if data_listen {
        &[false, true]
    } else {
        &[false]
    };
    let text = wc::generated_corpus(mib * 1024 * 1024);
    // The single process: one count over the text in memory, sorted as the reduce sorts.
    let single = |text: &str| {
        let t = std::time::Instant::now();
        let mut local = wc::Counts::new();
        wc::count_into(&mut local, text);
        (wc::sorted(local), t.elapsed().as_secs_f64())
    };
    let (local, _) = single(&text);
    let pieces: Vec<bytes::Bytes> = wc::split(&text, fragment_mib * 1024 * 1024)
        .into_iter()
        .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()))
        .collect();
    let n_fragments = pieces.len();
    println!(
        "mapreduce: word count of a generated {mib} MiB corpus ({n_fragments} fragments of {fragment_mib} MiB, fan-in {fan_in}), shipped through the bus; {} cores; {runs} run(s), each farm run after its own single-process count",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>4} {:>7} {:>6} {:>9} {:>10} {:>15} {:>9} {:>22}",
        "run",
        "agents",
        "kept",
        "single",
        "time",
        "÷ single proc.",
        "upload",
        "after upload ÷ single"
    );
    let mut rows = Vec::new();
    for run in 1..=runs {
        for &n in agent_counts {
            for &keep in variants {
                let (_, local_s) = single(&text);
                let (took, uploaded, reduce_steps) =
                    mapreduce_farm(n, &pieces, &local, mib, fan_in, keep).await?;
                let kept = if keep { "yes" } else { "no" };
                println!(
                    "{run:>4} {n:>7} {kept:>6} {local_s:>8.2}s {took:>9.2}s {:>15.2} {uploaded:>8.2}s {:>22.2}",
                    took / local_s,
                    (took - uploaded) / local_s
                );
                rows.push(serde_json::json!({
                    "run": run, "agents": n, "data_listen": keep, "seconds": took,
                    "single_process_s": local_s, "over_single_process": took / local_s,
                    "upload_seconds": uploaded,
                    "after_upload_over_single_process": (took - uploaded) / local_s,
                    "reduce_steps": reduce_steps,
                }));
            }
        }
    }
    println!("medians:");
    println!(
        "{:>7} {:>6} {:>10} {:>9} {:>8} {:>15} {:>22}",
        "agents", "kept", "time", "speedup", "÷ ideal", "÷ single proc.", "after upload ÷ single"
    );
    let of = |n: usize, keep: bool, key: &str| {
        median(
            rows.iter()
                .filter(|r| r["agents"] == n && r["data_listen"] == keep)
                .filter_map(|r| r[key].as_f64())
                .collect(),
        )
    };
    let base = of(agent_counts[0], false, "seconds");
    let mut medians = Vec::new();
    for &n in agent_counts {
        for &keep in variants {
            let took = of(n, keep, "seconds");
            let speedup = base / took;
            // The ideal counts agents relative to the first count's (1 unless told otherwise).
            let ideal = n as f64 / agent_counts[0] as f64;
            let (ratio, after) = (
                of(n, keep, "over_single_process"),
                of(n, keep, "after_upload_over_single_process"),
            );
            let kept = if keep { "yes" } else { "no" };
            println!(
                "{n:>7} {kept:>6} {took:>9.2}s {speedup:>9.2} {:>8.2} {ratio:>15.2} {after:>22.2}",
                speedup / ideal
            );
            medians.push(serde_json::json!({
                "agents": n, "data_listen": keep, "seconds": took, "speedup": speedup,
                "ideal": ideal, "speedup_over_ideal": speedup / ideal,
                "over_single_process": ratio, "after_upload_over_single_process": after,
            }));
        }
    }
    let local_s = median(
        rows.iter()
            .filter_map(|r| r["single_process_s"].as_f64())
            .collect(),
    );
    Ok(serde_json::json!({
        "mib": mib, "fragments": n_fragments, "fragment_mib": fragment_mib, "fan_in": fan_in,
        "single_process_s": local_s, "runs": rows, "medians": medians,
    }))
}

/// One run on a fresh farm of `n` agents: the fragments uploaded (`PUT /v1/blobs`, four at
/// once) and named in the job, which is followed to its end; the counts are checked against
/// the single process's. Returns (seconds in all, seconds of the uploads, reduce steps).
async fn mapreduce_farm(
    n: usize,
    pieces: &[bytes::Bytes],
    local: &[(String, u64)],
    mib: usize,
    fan_in: u64,
    data_listen: bool,
) -> Result<(f64, f64, serde_json::Value)> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let farm = crate::up::Farm::start(crate::up::FarmOptions {
        agents: n,
        slots: 1,
        xmpp_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        max_blob: Some(bytesize::ByteSize::b(
            (mib as u64 * 1024 * 1024) * 3 / 2 + 16 * 1024 * 1024,
        )),
        dispatcher: None,
        agent: data_listen.then(|| -> crate::up::AgentChange {
            Box::new(|a| a.data_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))))
        }),
        extra_agents: Vec::new(),
    })
    .await?;
    let api = spine_client::Client::new(&format!("http://{}", farm.http), None)?;
    wait_for_agents(&api, "wordcount.map", n).await?;
    // The fragments go to the blob store (PUT /v1/blobs, stored once), and the job names
    // them: the time counts the uploads. Four at once, as a client with many files would:
    // the disk's fsyncs overlap the transfers.
    let t = std::time::Instant::now();
    let fragments: Vec<spine_protocol::Fragment> = futures::stream::iter(pieces)
        .map(|p| {
            let api = &api;
            async move {
                api.put_blob(p.clone(), p.len() as u64)
                    .await
                    .map(|f| f.with_mime("text/plain; charset=utf-8"))
            }
        })
        .buffered(4)
        .try_collect()
        .await?;
    let uploaded = t.elapsed().as_secs_f64();
    let body = serde_json::json!({
        "capability": "wordcount.map",
        "reduce": "wordcount.reduce",
        "fan_in": fan_in,
        "fragments": fragments,
    });
    let id = api.submit(&body).await?;
    let job = api.follow(&id, |_, _| {}).await?;
    let took = t.elapsed().as_secs_f64();
    let out = api.output(&job).await?;
    let counts: Vec<(String, u64)> =
        serde_json::from_slice(&out).context("reading the word counts")?;
    farm.stop().await;
    anyhow::ensure!(
        counts == local,
        "{n} agents counted differently from the single process ({} vs {} distinct words)",
        counts.len(),
        local.len()
    );
    Ok((
        took,
        uploaded,
        job["result"]["meta"]["reduce_steps"].clone(),
    ))
}
