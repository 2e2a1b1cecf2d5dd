//! `spine bench cost`: what one no-op job costs the farm when a web app submits it over HTTP
//! and waits for its answer (issue 19): the CPU time of each part per job and the latency, one
//! job at a time and many in flight, with the job store on a real disk.
//!
//! Each run starts a fresh farm of separate child processes ([`super::procs`]: `spine
//! server`, `spine dispatcher`, one `spine agent --builtin`), so that the CPU time each process
//! used during a phase can be read from `/proc/<pid>/stat` before and after it. Every job is
//! one `POST /v1/jobs?wait=30s` of `{"capability":"text.upper"}` on a keep-alive client,
//! answered 200 with the job `succeeded`: one at a time from a client with a thread and a
//! runtime of its own ([`SeqClient::Own`], as a web app's request handler calls out on its
//! thread), many in flight from the benchmark's multi-thread runtime. With `--against BIN` the
//! same run is made by another `spine` binary (an older build) after each run of this one,
//! so that the machine's drift falls on both, and the ratios after ÷ before are reported; the
//! other side's figures are read from the JSON it writes, one flat object per run
//! ([`Figures`]), which both sides must therefore agree on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::median;
use super::procs::{self, Plan};
use super::retained::NOOP;

/// Jobs run before the measurement (connections, caches, the store's first pages).
const WARM_UP: usize = 500;
/// The request of every job: the web app's path, one round trip per job.
const SUBMIT: &str = "/v1/jobs?wait=30s";
/// The body of every job: `text.upper` of no input.
const BODY: &str = r#"{"capability":"text.upper"}"#;
/// The parts whose CPU time is measured, as [`procs`] names them.
const PARTS: [&str; 3] = ["server", "dispatcher", "agent1"];

/// What to run.
#[derive(Clone, Debug)]
pub(super) struct Options {
    pub(super) seq_jobs: usize,
    pub(super) jobs: usize,
    pub(super) window: usize,
    pub(super) runs: usize,
    /// Where each run's farm directory is made (default: the current directory).
    pub(super) dir: Option<PathBuf>,
    /// Another `spine` binary measured in alternation with this one.
    pub(super) against: Option<PathBuf>,
    /// A scratch PostgreSQL database for the job store (emptied before each run).
    pub(super) store: Option<String>,
    /// Dispatchers sharing `store`; jobs go to each in turn.
    pub(super) dispatchers: usize,
    /// Jobs go to the leader alone (the standbys kept warm).
    pub(super) to_leader: bool,
    /// Where the client of the jobs one at a time runs.
    pub(super) seq_client: SeqClient,
}

/// Where the client of the jobs one at a time runs (`--seq-client`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SeqClient {
    /// On a thread of its own, with a single-threaded runtime: the request, its answer and
    /// the next request stay on one thread, as in a web app's request handler.
    Own,
    /// On the benchmark's multi-thread runtime, driven from its main thread: each job then
    /// also pays two wake-ups of another thread inside the client (the connection's task and
    /// the caller), 60–70 µs of the client's CPU a job and up to a tenth of the p50 on a
    /// 2-core VM (BENCHMARKS.md). The only client of builds before this option.
    Shared,
}

impl SeqClient {
    fn name(self) -> &'static str {
        match self {
            SeqClient::Own => "own",
            SeqClient::Shared => "shared",
        }
    }
}

/// The figures of one run: a flat object, the JSON both sides of `--against` read and write
/// (so a key is renamed only with both builds in mind). CPU figures are µs per job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Figures {
    pub(super) seq_jobs: usize,
    pub(super) seq_p50_ms: f64,
    pub(super) seq_p90_ms: f64,
    pub(super) seq_p99_ms: f64,
    pub(super) seq_cpu_us_server: f64,
    pub(super) seq_cpu_us_dispatcher: f64,
    pub(super) seq_cpu_us_agent: f64,
    pub(super) seq_cpu_us_total: f64,
    /// This benchmark's own process (the HTTP client), not in the total.
    pub(super) seq_cpu_us_client: f64,
    pub(super) jobs: usize,
    pub(super) window: usize,
    pub(super) jobs_per_s: f64,
    pub(super) par_p50_ms: f64,
    pub(super) par_p99_ms: f64,
    pub(super) par_cpu_us_server: f64,
    pub(super) par_cpu_us_dispatcher: f64,
    pub(super) par_cpu_us_agent: f64,
    pub(super) par_cpu_us_total: f64,
    pub(super) par_cpu_us_client: f64,
    /// With several dispatchers: the one that led through the run (`dispatcher`,
    /// `dispatcher2`, …), and its own part of `*_cpu_us_dispatcher` (the bottleneck when each
    /// has a machine of its own). Empty and 0 with one (and from builds without them).
    #[serde(default)]
    pub(super) leader: String,
    #[serde(default)]
    pub(super) seq_cpu_us_leader: f64,
    #[serde(default)]
    pub(super) par_cpu_us_leader: f64,
    /// Several dispatchers, jobs to each in turn: the submissions the standbys passed on to
    /// the leader per request, in flight (0: none passed, or a build that does not count).
    #[serde(default)]
    pub(super) par_passed_per_request: f64,
    /// With `--store`: the PostgreSQL server's processes (all of them: the dispatchers'
    /// backends, the WAL writer, …), µs per job, not in the total; 0 when the server is not
    /// on this machine (and from builds that do not count it).
    #[serde(default)]
    pub(super) seq_cpu_us_store: f64,
    #[serde(default)]
    pub(super) par_cpu_us_store: f64,
    /// The file system the farm's data directory was on.
    pub(super) filesystem: String,
}

/// The figures compared between the two binaries: key and label.
const COMPARED: [(&str, &str); 4] = [
    ("seq_cpu_us_total", "CPU µs/job, one at a time"),
    ("par_cpu_us_total", "CPU µs/job, in flight"),
    ("seq_p50_ms", "latency p50 ms, one at a time"),
    ("jobs_per_s", "jobs/s in flight"),
];

/// Runs the scenario: `runs` runs of this binary (each followed by one of `against`), their
/// medians and, with `against`, its medians and the ratios this ÷ that.
pub(super) async fn run(o: Options) -> Result<Value> {
    let parent = o.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    anyhow::ensure!(
        parent.is_dir(),
        "--dir {}: not a directory (give an existing directory on the disk to measure)",
        parent.display()
    );
    let mut o = o;
    // Whether the other build has --seq-client (asked once, passed to each of its runs).
    let mut other_knows = false;
    if let Some(bin) = &o.against {
        anyhow::ensure!(
            bin.is_file(),
            "--against {}: no such file (give the path of another spine binary)",
            bin.display()
        );
        other_knows = knows_seq_client(bin).await?;
        // Both sides measure with the same client, or the ratios would include the client's.
        if o.seq_client != SeqClient::Shared && !other_knows {
            println!(
                "note: {} has only the client on the shared runtime for the jobs one at a time: this binary uses it too (--seq-client shared), so that both are measured alike",
                bin.display()
            );
            o.seq_client = SeqClient::Shared;
        }
    }
    let o = o;
    println!(
        "cost: no-op jobs ({NOOP}, no input), each one POST {SUBMIT}, on a fresh farm of separate processes per run (spine server, spine dispatcher, one spine agent --builtin with {} slots); warm-up {WARM_UP} jobs, then {} one at a time, then {} with {} in flight; {} run(s){}; {} cores",
        o.window,
        o.seq_jobs,
        o.jobs,
        o.window,
        o.runs,
        o.against
            .as_ref()
            .map_or(String::new(), |b| format!(", each followed by the same run of {}", b.display())),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    match &o.store {
        None => println!(
            "store: redb in a fresh directory under {} on {}",
            parent.display(),
            filesystem(&parent)
        ),
        Some(url) => {
            let name = spine_dispatcher::store::postgres::PgTarget::parse(url, None)
                .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
            if o.dispatchers > 1 {
                println!(
                    "dispatchers: {} sharing the store; the warm-up's jobs to each in turn, the measured ones {}",
                    o.dispatchers,
                    if o.to_leader {
                        "to the leader alone (the standbys kept warm)"
                    } else {
                        "to each in turn (the standbys pass theirs on to the leader)"
                    }
                );
            }
            println!(
                "store: PostgreSQL {} (emptied before each run){}",
                name.name(),
                if o.against.is_some() {
                    "; the --against runs use redb"
                } else {
                    ""
                }
            );
        }
    }
    let defaults = spine_dispatcher::DispatcherConfig::default();
    println!(
        "limits: the loopback caller (http:local) has no rate limit (submitter_rate unset, the default) and may have {} jobs queued (submitter_max_queued, of max_queue {}); http_max_connections {}: nothing throttles {} in flight",
        defaults.submitter_max_queued.of(defaults.max_queue),
        defaults.max_queue,
        max_connections(o.window),
        o.window
    );
    println!(
        "client: one at a time {} ({}), in flight on the benchmark's multi-thread runtime",
        o.seq_client.name(),
        match o.seq_client {
            SeqClient::Own => "a thread and a single-threaded runtime of its own",
            SeqClient::Shared =>
                "the benchmark's multi-thread runtime, driven from its main thread",
        }
    );
    println!("CPU: utime + stime of each process over the phase, µs per job; total = server + dispatcher + agent (the client, this process, beside it)");
    println!(
        "{:>4} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "run", "binary", "seq p50", "p90", "p99", "server", "disp.", "agent", "total",
        "jobs/s", "p50", "p99", "server", "disp.", "agent", "total"
    );
    let mut mine = Vec::new();
    let mut theirs = Vec::new();
    for k in 1..=o.runs {
        let f = one_run(&o, &parent).await?;
        print_row(k, "this", &f);
        mine.push(f);
        if let Some(bin) = &o.against {
            let f = other_run(bin, &o, other_knows).await?;
            print_row(k, "against", &f);
            theirs.push(f);
        }
    }
    let this = medians(&mine)?;
    println!("medians of this binary:");
    print_medians(&this);
    let mut out = json!({
        "seq_jobs": o.seq_jobs, "jobs": o.jobs, "window": o.window, "warm_up": WARM_UP,
        "runs": mine, "medians": this,
    });
    if let Some(bin) = &o.against {
        let that = medians(&theirs)?;
        println!("medians of {}:", bin.display());
        print_medians(&that);
        let mut ratios = BTreeMap::new();
        let mut paired = BTreeMap::new();
        let mine_cols = columns(&mine)?;
        let theirs_cols = columns(&theirs)?;
        println!(
            "after (this binary) ÷ before ({}): ratio of the medians; median of the run-by-run ratios (each run beside the one right after it, so that drift cancels)",
            bin.display()
        );
        for (key, label) in COMPARED {
            let r = this[key] / that[key];
            let p = median(
                mine_cols[key]
                    .iter()
                    .zip(&theirs_cols[key])
                    .map(|(a, b)| a / b)
                    .collect(),
            );
            println!(
                "  {label:<32} {:>10.3} ÷ {:>10.3} = {r:.3}; paired {p:.3}",
                this[key], that[key]
            );
            ratios.insert(key, r);
            paired.insert(key, p);
        }
        out["against"] = json!({
            "binary": bin.display().to_string(), "runs": theirs, "medians": that,
        });
        out["ratios"] = json!(ratios);
        out["paired_ratios"] = json!(paired);
    }
    Ok(out)
}

/// The dispatcher's connection limit for `window` requests in flight, with room to spare.
fn max_connections(window: usize) -> usize {
    (window + 64).max(spine_dispatcher::DispatcherConfig::default().http_max_connections)
}

fn print_row(k: usize, who: &str, f: &Figures) {
    println!(
        "{k:>4} {who:>7} | {:>7.3} {:>7.3} {:>7.3} {:>7.0} {:>7.0} {:>7.0} {:>7.0} | {:>8.0} {:>7.2} {:>7.2} {:>7.0} {:>7.0} {:>7.0} {:>7.0}",
        f.seq_p50_ms, f.seq_p90_ms, f.seq_p99_ms,
        f.seq_cpu_us_server, f.seq_cpu_us_dispatcher, f.seq_cpu_us_agent, f.seq_cpu_us_total,
        f.jobs_per_s, f.par_p50_ms, f.par_p99_ms,
        f.par_cpu_us_server, f.par_cpu_us_dispatcher, f.par_cpu_us_agent, f.par_cpu_us_total,
    );
}

fn print_medians(m: &BTreeMap<String, f64>) {
    println!(
        "  one at a time: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms; CPU per job: server {:.0} µs, dispatcher {:.0} µs, agent {:.0} µs, total {:.0} µs (client {:.0} µs)",
        m["seq_p50_ms"], m["seq_p90_ms"], m["seq_p99_ms"], m["seq_cpu_us_server"],
        m["seq_cpu_us_dispatcher"], m["seq_cpu_us_agent"], m["seq_cpu_us_total"],
        m["seq_cpu_us_client"]
    );
    println!(
        "  in flight: {:.0} jobs/s, p50 {:.2} ms, p99 {:.2} ms; CPU per job: server {:.0} µs, dispatcher {:.0} µs, agent {:.0} µs, total {:.0} µs (client {:.0} µs)",
        m["jobs_per_s"], m["par_p50_ms"], m["par_p99_ms"], m["par_cpu_us_server"],
        m["par_cpu_us_dispatcher"], m["par_cpu_us_agent"], m["par_cpu_us_total"],
        m["par_cpu_us_client"]
    );
    if m.get("par_cpu_us_leader").is_some_and(|x| *x > 0.0) {
        println!(
            "  of the dispatchers' CPU per job, the leading dispatcher's own: one at a time {:.0} µs, in flight {:.0} µs",
            m["seq_cpu_us_leader"], m["par_cpu_us_leader"]
        );
    }
    if m.get("par_cpu_us_store").is_some_and(|x| *x > 0.0) {
        println!(
            "  PostgreSQL's processes, beside the total: one at a time {:.0} µs per job, in flight {:.0} µs",
            m["seq_cpu_us_store"], m["par_cpu_us_store"]
        );
    }
    if m.get("par_passed_per_request").is_some_and(|x| *x > 0.0) {
        println!(
            "  the standbys passed submissions on to the leader {:.1} per request, in flight",
            m["par_passed_per_request"]
        );
    }
}

/// Every numeric figure over the runs, in run order.
fn columns(runs: &[Figures]) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut columns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for f in runs {
        let Value::Object(m) = serde_json::to_value(f)? else {
            anyhow::bail!("the figures of a run are not a JSON object");
        };
        for (k, v) in m {
            if let Some(x) = v.as_f64() {
                columns.entry(k).or_default().push(x);
            }
        }
    }
    Ok(columns)
}

/// The median of every numeric figure over the runs.
fn medians(runs: &[Figures]) -> Result<BTreeMap<String, f64>> {
    Ok(columns(runs)?
        .into_iter()
        .map(|(k, v)| (k, median(v)))
        .collect())
}

/// Whether another `spine` build has `bench cost --seq-client` (builds before it do not).
async fn knows_seq_client(bin: &Path) -> Result<bool> {
    let out = tokio::process::Command::new(bin)
        .args(["bench", "cost", "--help"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} bench cost --help", bin.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("--seq-client"))
}

/// One run of `BIN bench cost --runs 1` with the same sizes, its figures read from its JSON.
/// `knows`: whether `bin` has `--seq-client` ([`knows_seq_client`]).
async fn other_run(bin: &Path, o: &Options, knows: bool) -> Result<Figures> {
    let tmp = tempfile::tempdir().context("temporary directory")?;
    let json = tmp.path().join("cost.json");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["bench", "cost", "--runs", "1"])
        .args(["--jobs", &o.jobs.to_string()])
        .args(["--seq-jobs", &o.seq_jobs.to_string()])
        .args(["--window", &o.window.to_string()])
        .arg("--json")
        .arg(&json)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = &o.dir {
        cmd.arg("--dir").arg(dir);
    }
    // (`run` made this binary's client the other's only one when the other lacks the option.)
    if knows {
        cmd.args(["--seq-client", o.seq_client.name()]);
    }
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {} bench cost", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} bench cost failed ({}):\n{}{}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?;
    let r: Value = serde_json::from_slice(&text)
        .with_context(|| format!("{} bench cost wrote no JSON", bin.display()))?;
    serde_json::from_value(r["runs"][0].clone()).with_context(|| {
        format!(
            "{} bench cost wrote a run in another form than this build's: {}",
            bin.display(),
            r["runs"][0]
        )
    })
}

/// One run on a fresh farm in a fresh directory under `parent`, deleted afterwards.
async fn one_run(o: &Options, parent: &Path) -> Result<Figures> {
    let dir = tempfile::Builder::new()
        .prefix("spine-bench-cost-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a directory under {}", parent.display()))?;
    let plan = Plan {
        agents: 1,
        slots: o.window as u64,
        capability: NOOP,
        dispatchers: o.dispatchers,
    };
    let window = o.window;
    let mut postmaster = None;
    if let Some(url) = &o.store {
        let target = spine_dispatcher::store::postgres::PgTarget::parse(url, None)
            .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        spine_dispatcher::store::postgres::drop_schema(&target)
            .await
            .context("--store: emptying the scratch database")?;
        postmaster = spine_dispatcher::store::postgres::server_process(&target)
            .await
            .context("--store: finding the server's process")?;
    }
    let store = o.store.clone();
    let mut farm = procs::start(dir.path(), plan, |cfg| {
        cfg.store = store;
        // The loopback caller's limits (docs/dispatcher.md, "Rate limits", "Queues",
        // "Limits"): none on its rate, a share of the queue far above the window, and a
        // connection for every job in flight.
        cfg.submitter_rate = None;
        cfg.http_max_connections = max_connections(window);
    })
    .await?;
    let r = measure(&mut farm, o, dir.path(), postmaster).await;
    farm.children.stop().await;
    r
}

/// One run's figures; `postmaster`: the PostgreSQL server's main process, to count its CPU.
async fn measure(
    farm: &mut procs::ProcFarm,
    o: &Options,
    dir: &Path,
    postmaster: Option<u32>,
) -> Result<Figures> {
    let http = client(o.window)?;
    let mut urls: Vec<String> = farm
        .https
        .iter()
        .map(|h| format!("http://{h}{SUBMIT}"))
        .collect();
    let pids: Vec<(String, Option<u32>)> = farm.children.pids();
    let pid_of = |name: &str| -> Result<String> {
        pids.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, p)| *p)
            .map(|p| p.to_string())
            .with_context(|| format!("the {name} has no process id"))
    };
    let parts: Vec<String> = PARTS
        .iter()
        .map(|p| pid_of(p))
        .chain([Ok("self".to_owned())])
        .collect::<Result<_>>()?;
    // The other dispatchers count as the dispatcher.
    let more: Vec<String> = (2..=o.dispatchers)
        .map(|k| pid_of(&format!("dispatcher{k}")))
        .collect::<Result<_>>()?;
    let tick = clock_tick()?;

    jobs(&http, &urls, WARM_UP, o.window).await?;
    farm.children.check_alive()?;
    // Which dispatcher leads (asked after the warm-up, when the election is long over).
    let leader = if o.dispatchers > 1 {
        leading(&http, &farm.https).await?
    } else {
        String::new()
    };
    if o.to_leader {
        let k = match leader.strip_prefix("dispatcher") {
            Some("") => 0,
            Some(n) => n.parse::<usize>().context("the leader's name")? - 1,
            None => anyhow::bail!("no leader to send the jobs to"),
        };
        urls = vec![urls[k].clone()];
    }
    let leader_pid = if leader.is_empty() {
        None
    } else {
        Some(pid_of(&leader)?)
    };
    let cpu = || -> Result<Vec<f64>> {
        let mut v: Vec<f64> = parts
            .iter()
            .map(|p| cpu_seconds(p, tick))
            .collect::<Result<_>>()?;
        for p in &more {
            v[1] += cpu_seconds(p, tick)?;
        }
        v.push(match &leader_pid {
            Some(p) => cpu_seconds(p, tick)?,
            None => 0.0,
        });
        v.push(match postmaster {
            Some(p) => server_cpu_seconds(p, tick)?,
            None => 0.0,
        });
        Ok(v)
    };

    // The client of the jobs one at a time, its connection made (outside the measurement).
    let own = match o.seq_client {
        SeqClient::Own => {
            let health = farm.https.iter().map(|h| format!("http://{h}/healthz"));
            Some(OwnClient::start(urls.clone(), health.collect()).await?)
        }
        SeqClient::Shared => None,
    };
    let before = cpu()?;
    let mut seq = match &own {
        Some(c) => c.jobs(o.seq_jobs).await?,
        None => jobs(&http, &urls, o.seq_jobs, 1).await?,
    };
    let seq_cpu = per_job(&before, &cpu()?, o.seq_jobs);
    farm.children.check_alive()?;

    let passed_before = passed(&http, &farm.https).await;
    let before = cpu()?;
    let t = Instant::now();
    let mut par = jobs(&http, &urls, o.jobs, o.window).await?;
    let took = t.elapsed().as_secs_f64();
    let par_cpu = per_job(&before, &cpu()?, o.jobs);
    farm.children.check_alive()?;
    let passed_after = passed(&http, &farm.https).await;
    let requests = passed_after.1 - passed_before.1;
    let par_passed_per_request = if requests > 0.0 {
        (passed_after.0 - passed_before.0) / requests
    } else {
        0.0
    };

    seq.sort_by(f64::total_cmp);
    par.sort_by(f64::total_cmp);
    Ok(Figures {
        seq_jobs: o.seq_jobs,
        seq_p50_ms: percentile(&seq, 0.50),
        seq_p90_ms: percentile(&seq, 0.90),
        seq_p99_ms: percentile(&seq, 0.99),
        seq_cpu_us_server: seq_cpu[0],
        seq_cpu_us_dispatcher: seq_cpu[1],
        seq_cpu_us_agent: seq_cpu[2],
        seq_cpu_us_total: seq_cpu[..3].iter().sum(),
        seq_cpu_us_client: seq_cpu[3],
        jobs: o.jobs,
        window: o.window,
        jobs_per_s: o.jobs as f64 / took,
        par_p50_ms: percentile(&par, 0.50),
        par_p99_ms: percentile(&par, 0.99),
        par_cpu_us_server: par_cpu[0],
        par_cpu_us_dispatcher: par_cpu[1],
        par_cpu_us_agent: par_cpu[2],
        par_cpu_us_total: par_cpu[..3].iter().sum(),
        par_cpu_us_client: par_cpu[3],
        leader,
        seq_cpu_us_leader: seq_cpu[4],
        par_cpu_us_leader: par_cpu[4],
        par_passed_per_request,
        seq_cpu_us_store: seq_cpu[5],
        par_cpu_us_store: par_cpu[5],
        filesystem: filesystem(dir),
    })
}

/// The name of the farm's process (`dispatcher`, `dispatcher2`, …) whose `/healthz` at
/// `https[k]` answers that it leads.
async fn leading(http: &reqwest::Client, https: &[std::net::SocketAddr]) -> Result<String> {
    for (k, addr) in https.iter().enumerate() {
        let r = http
            .get(format!("http://{addr}/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET /healthz of the dispatcher at {addr}"))?;
        if r.text().await.unwrap_or_default().contains("leader") {
            return Ok(if k == 0 {
                "dispatcher".to_owned()
            } else {
                format!("dispatcher{}", k + 1)
            });
        }
    }
    anyhow::bail!(
        "none of the {} dispatchers says it leads (GET /healthz)",
        https.len()
    )
}

/// The submissions the dispatchers at `https` passed on to their leader, and the requests
/// that carried them (`/metrics`; 0 from a dispatcher that does not count them).
async fn passed(http: &reqwest::Client, https: &[std::net::SocketAddr]) -> (f64, f64) {
    let mut sum = (0.0, 0.0);
    if https.len() < 2 {
        return sum;
    }
    for addr in https {
        let Ok(r) = http
            .get(format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        let figure = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        sum.0 += figure("spine_passed_submissions_total");
        sum.1 += figure("spine_passed_requests_total");
    }
    sum
}

/// The CPU µs per job of each process between two readings (seconds).
fn per_job(before: &[f64], after: &[f64], jobs: usize) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) * 1e6 / jobs as f64)
        .collect()
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// The client of [`SeqClient::Own`]: a thread with a single-threaded runtime and a
/// keep-alive client, which runs the jobs it is asked for one at a time.
struct OwnClient {
    ask: std::sync::mpsc::Sender<Ask>,
}

/// A request to [`OwnClient`]'s thread: how many jobs, and where their latencies go.
type Ask = (usize, tokio::sync::oneshot::Sender<Result<Vec<f64>>>);

impl OwnClient {
    /// Starts the thread, whose client makes its connections with a `GET` of each of
    /// `health` (no job: the jobs counted stay those of the phases).
    async fn start(urls: Vec<String>, health: Vec<String>) -> Result<OwnClient> {
        let (ask, asked) = std::sync::mpsc::channel::<Ask>();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("cost-client".into())
            .spawn(move || {
                let started = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the client's runtime")
                    .and_then(|rt| Ok((rt, client(1)?)));
                let (rt, http) = match started {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let warm = rt.block_on(async {
                    for u in &health {
                        http.get(u)
                            .send()
                            .await
                            .and_then(|r| r.error_for_status())
                            .with_context(|| format!("GET {u}"))?
                            .bytes()
                            .await
                            .with_context(|| format!("reading the answer to GET {u}"))?;
                    }
                    Ok(())
                });
                let _ = ready_tx.send(warm);
                // Until the benchmark drops its end of the channel.
                while let Ok((n, reply)) = asked.recv() {
                    let _ = reply.send(rt.block_on(jobs(&http, &urls, n, 1)));
                }
            })
            .context("starting the client's thread")?;
        ready.await.context("the client's thread ended")??;
        Ok(OwnClient { ask })
    }

    /// `n` jobs one at a time, their latencies in ms.
    async fn jobs(&self, n: usize) -> Result<Vec<f64>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask
            .send((n, tx))
            .map_err(|_| anyhow::anyhow!("the client's thread ended"))?;
        rx.await.context("the client's thread ended")?
    }
}

/// A keep-alive HTTP client for `window` requests at a time.
fn client(window: usize) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(window)
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")
}

/// `n` no-op jobs, `window` at a time, each one request, to each of `urls` in turn; the
/// latency of each in ms.
async fn jobs(
    http: &reqwest::Client,
    urls: &[String],
    n: usize,
    window: usize,
) -> Result<Vec<f64>> {
    futures::stream::iter(0..n)
        .map(|i| job(http, &urls[i % urls.len()]))
        .buffer_unordered(window)
        .try_collect()
        .await
}

/// One job: `POST /v1/jobs?wait=30s`, which must answer 200 with the job succeeded.
async fn job(http: &reqwest::Client, url: &str) -> Result<f64> {
    let t = Instant::now();
    let r = http
        .post(url)
        .header("content-type", "application/json")
        .body(BODY)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .with_context(|| format!("POST {SUBMIT}"))?;
    let status = r.status();
    let text = r
        .text()
        .await
        .with_context(|| format!("reading the answer to POST {SUBMIT}"))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let state = serde_json::from_str::<Value>(&text).map(|v| v["state"].clone());
    anyhow::ensure!(
        status == reqwest::StatusCode::OK && state.is_ok_and(|s| s == "succeeded"),
        "a no-op job: POST {SUBMIT} answered {status} (expected 200 with state succeeded): {text}"
    );
    Ok(ms)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
fn clock_tick() -> Result<f64> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => Ok(t as f64),
        r => anyhow::bail!("sysconf(_SC_CLK_TCK) gave {r:?}, not a tick rate"),
    }
}

/// User + system CPU seconds used so far by process `pid` (or `"self"`), from
/// `/proc/<pid>/stat` (its threads included).
fn cpu_seconds(pid: &str, tick: f64) -> Result<f64> {
    let f = stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok((f[11] + f[12]) as f64 / tick)
}

/// User + system CPU seconds of a server: its main process `pid`, its children alive (for
/// PostgreSQL the backends, the WAL writer, …) and those it reaped (backends whose
/// connection ended), from `/proc`.
fn server_cpu_seconds(pid: u32, tick: f64) -> Result<f64> {
    let main =
        stat_fields(&pid.to_string()).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // utime, stime, cutime, cstime: fields 14–17.
    let mut ticks: u64 = main[11..15].iter().sum();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let Some(child) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        // A process that ended meanwhile is left out (its parent's reaped count has it).
        if let Some(f) = stat_fields(&child.to_string()).filter(|f| f[1] == u64::from(pid)) {
            ticks += f[11] + f[12];
        }
    }
    Ok(ticks as f64 / tick)
}

/// The numeric fields of `/proc/<pid>/stat` (`pid` or `"self"`) after the command name, which
/// is in parentheses and may hold spaces, from the state on (index 0: state as 0, 1: parent,
/// 11: utime, 12: stime, 13: cutime, 14: cstime).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let v: Vec<u64> = rest
        .split_whitespace()
        .take(15)
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .collect();
    (v.len() == 15).then_some(v)
}

/// The file system `path` is on, from `/proc/self/mounts` (the longest mount point that
/// holds it): `ext4 /dev/sda1 on /`.
fn filesystem(path: &Path) -> String {
    let Ok(path) = std::fs::canonicalize(path) else {
        return format!("{} (not found)", path.display());
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && path.starts_with(f[1])).then(|| (f[1].len(), f[2], f[0], f[1]))
        })
        .max_by_key(|m| m.0)
        .map_or_else(
            || format!("{} (file system unknown)", path.display()),
            |(_, fs, dev, on)| format!("{fs} {dev} on {on} ({})", path.display()),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }

    #[test]
    fn the_cpu_time_of_this_process_is_read() {
        let tick = clock_tick().unwrap();
        assert!(tick >= 1.0);
        let s = cpu_seconds("self", tick).unwrap();
        assert!((0.0..3600.0).contains(&s), "{s}");
    }

    #[test]
    fn a_servers_cpu_time_counts_its_children() {
        let tick = clock_tick().unwrap();
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let f = stat_fields(&child.id().to_string()).unwrap();
        assert_eq!(f[1], u64::from(me), "the parent field");
        let own = cpu_seconds("self", tick).unwrap();
        let all = server_cpu_seconds(me, tick).unwrap();
        assert!(all >= own && all < own + 3600.0, "{all} against {own}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
