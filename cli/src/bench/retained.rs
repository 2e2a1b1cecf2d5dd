//! `spine bench retained`: whether the dispatcher slows down as finished jobs accumulate
//! (issue 15, item 15). Finished jobs stay in the dispatcher's table and store for `retention`
//! (24 h by default), so a busy dispatcher holds hundreds of thousands of them; the work of
//! each event must not grow with that number.
//!
//! Each run starts a fresh local farm (embedded server, dispatcher, agents: `spine up`'s
//! [`crate::up::Farm`]) twice: on an empty data directory, and on one whose job store already
//! holds `retained` finished no-op jobs, which the dispatcher loads into its table at start as
//! after any restart (the figures then check, through `/metrics`, that it holds them). On
//! each it runs no-op jobs (`text.upper` of an empty input), `window` at a time, each
//! submitted over HTTP and followed over its event stream to its end, as `spine submit --wait`
//! does; then it times `GET /v1/jobs?limit=100` and `GET /metrics`. The two configurations
//! alternate so that the machine's drift falls on both alike.

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use spine_dispatcher::jobs::{JobRecord, JobSpec, Recorded, Step};
use spine_dispatcher::store::Store;
use spine_protocol::JobState;

use super::{median, wait_for_agents};

/// The no-op capability every local agent offers.
pub(super) const NOOP: &str = "text.upper";
/// Jobs run before the measurement on each farm (connections, caches).
const WARM_UP: usize = 200;
/// Requests timed for the list and metrics figures (the median is reported).
const PROBES: usize = 5;

/// The figures of one farm.
struct Figures {
    /// No-op jobs completed per second.
    jobs_per_s: f64,
    /// `GET /v1/jobs?limit=100`, median, milliseconds.
    list_ms: f64,
    /// `GET /metrics`, median, milliseconds.
    metrics_ms: f64,
    /// Finished jobs the dispatcher held before the measurement (from `/metrics`).
    held: u64,
}

/// Runs the scenario: `runs` × (no jobs held, `retained` held), medians and their ratio.
pub(super) async fn run(retained: usize, jobs: usize, window: usize, runs: usize) -> Result<Value> {
    println!(
        "retained: {jobs} no-op jobs ({NOOP}, {window} in flight over HTTP) per run on a fresh farm of 2 agents, with 0 and with {retained} finished jobs held; {runs} runs"
    );
    println!(
        "{:>4} {:>9} {:>10} {:>10} {:>16} {:>13}",
        "run", "held", "jobs held", "jobs/s", "list 100 (ms)", "metrics (ms)"
    );
    let mut rows = Vec::new();
    let (mut empty, mut full) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        for held in [0, retained] {
            let f = farm_run(held, jobs, window).await?;
            println!(
                "{run:>4} {held:>9} {:>10} {:>10.0} {:>16.2} {:>13.2}",
                f.held, f.jobs_per_s, f.list_ms, f.metrics_ms
            );
            rows.push(json!({
                "run": run, "retained": held, "held": f.held, "jobs_per_s": f.jobs_per_s,
                "list_ms": f.list_ms, "metrics_ms": f.metrics_ms,
            }));
            if held == 0 { &mut empty } else { &mut full }.push(f);
        }
    }
    let med = |v: &[Figures], k: fn(&Figures) -> f64| median(v.iter().map(k).collect());
    let (rate0, rate1) = (med(&empty, |f| f.jobs_per_s), med(&full, |f| f.jobs_per_s));
    let ratio = rate1 / rate0;
    println!(
        "medians: {rate0:.0} jobs/s with none held (baseline), {rate1:.0} jobs/s with {retained} held: ratio {ratio:.3} (target ≥ 0.9)"
    );
    println!(
        "GET /v1/jobs?limit=100: {:.2} ms → {:.2} ms; GET /metrics: {:.2} ms → {:.2} ms",
        med(&empty, |f| f.list_ms),
        med(&full, |f| f.list_ms),
        med(&empty, |f| f.metrics_ms),
        med(&full, |f| f.metrics_ms)
    );
    Ok(json!({
        "retained": retained, "jobs": jobs, "window": window, "runs": rows,
        "jobs_per_s_none": rate0, "jobs_per_s_retained": rate1, "ratio": ratio,
        "list_ms_none": med(&empty, |f| f.list_ms),
        "list_ms_retained": med(&full, |f| f.list_ms),
        "metrics_ms_none": med(&empty, |f| f.metrics_ms),
        "metrics_ms_retained": med(&full, |f| f.metrics_ms),
    }))
}

/// A local farm of 2 agents with `slots` each in `dir`, whose job store holds `held` finished
/// jobs (written by [`fill`] before the dispatcher starts), and a client of its API.
pub(super) async fn held_farm(
    dir: &std::path::Path,
    held: usize,
    slots: u64,
) -> Result<(crate::up::Farm, spine_client::Client)> {
    if held > 0 {
        let store = dir.join("dispatcher").join("jobs.redb");
        tokio::task::spawn_blocking(move || fill(&store, held))
            .await
            .context("filling the store")??;
    }
    let farm = crate::up::Farm::start(crate::up::FarmOptions {
        agents: 2,
        slots,
        xmpp_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_path_buf(),
        max_blob: None,
        dispatcher: None,
        agent: None,
        extra_agents: Vec::new(),
    })
    .await?;
    let api = spine_client::Client::new(&format!("http://{}", farm.http), None)?;
    Ok((farm, api))
}

/// One farm: fill its store with `held` finished jobs, start it, measure, stop it.
async fn farm_run(held: usize, jobs: usize, window: usize) -> Result<Figures> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let (farm, api) = held_farm(dir.path(), held, window.div_ceil(2) as u64).await?;
    let r = measure(&api, jobs, window).await;
    farm.stop().await;
    let f = r?;
    anyhow::ensure!(
        f.held >= held as u64,
        "the dispatcher holds {} finished jobs, not the {held} written to its store",
        f.held
    );
    Ok(f)
}

async fn measure(api: &spine_client::Client, jobs: usize, window: usize) -> Result<Figures> {
    wait_for_agents(api, NOOP, 2).await?;
    let held = finished(&metrics(api).await?);
    noop_jobs(api, WARM_UP.min(jobs), window).await?;
    let t = Instant::now();
    noop_jobs(api, jobs, window).await?;
    let jobs_per_s = jobs as f64 / t.elapsed().as_secs_f64();
    let listed = (held as usize + WARM_UP.min(jobs) + jobs).min(100);
    let mut list = Vec::new();
    for _ in 0..PROBES {
        let t = Instant::now();
        let l = api
            .call(
                api.request(reqwest::Method::GET, "/v1/jobs?limit=100"),
                "listing jobs",
            )
            .await?;
        list.push(t.elapsed().as_secs_f64() * 1e3);
        let n = l["jobs"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == listed, "the list holds {n} jobs, not {listed}");
    }
    let mut met = Vec::new();
    for _ in 0..PROBES {
        let t = Instant::now();
        metrics(api).await?;
        met.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Figures {
        jobs_per_s,
        list_ms: median(list),
        metrics_ms: median(met),
        held,
    })
}

/// `n` no-op jobs, `window` in flight, each submitted and followed to its end; all must
/// succeed.
pub(super) async fn noop_jobs(api: &spine_client::Client, n: usize, window: usize) -> Result<()> {
    let mut running = tokio::task::JoinSet::new();
    let mut started = 0;
    while started < n || !running.is_empty() {
        while started < n && running.len() < window {
            let api = api.clone();
            running.spawn(async move {
                let id = api.submit(&json!({ "capability": NOOP })).await?;
                let job = api.follow(&id, |_, _| {}).await?;
                anyhow::ensure!(
                    job["state"] == "succeeded",
                    "no-op job {id} ended {}",
                    job["state"]
                );
                Ok(())
            });
            started += 1;
        }
        if let Some(r) = running.join_next().await {
            r.context("a job task")??;
        }
    }
    Ok(())
}

pub(super) async fn metrics(api: &spine_client::Client) -> Result<String> {
    let r = api
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .context("GET /metrics")?;
    anyhow::ensure!(r.status().is_success(), "GET /metrics: {}", r.status());
    r.text().await.context("reading /metrics")
}

/// The `spine_jobs` gauges of a `/metrics` text: (state, jobs), one per capability and state.
pub(super) fn job_gauges(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("spine_jobs{"))
        .filter_map(|l| {
            let state = l.split("state=\"").nth(1)?.split('"').next()?;
            Some((state, l.rsplit(' ').next()?.parse::<u64>().ok()?))
        })
}

/// Finished jobs in a `/metrics` text: the `spine_jobs` gauges of final states.
fn finished(text: &str) -> u64 {
    job_gauges(text)
        .filter(|(state, _)| ["succeeded", "failed", "cancelled", "timed-out"].contains(state))
        .map(|(_, n)| n)
        .sum()
}

/// Writes `n` finished no-op jobs, as the dispatcher records them, into a new job store:
/// accepted over the last `n` milliseconds (well inside the default 24 h retention), on the
/// two local agents in turn, each with its timeline; every 100th failed, the others succeeded
/// with an empty output.
pub(super) fn fill(path: &std::path::Path, n: usize) -> Result<()> {
    let store = Store::open(path)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_millis() as u64;
    let mut spec = JobSpec::new(NOOP.parse().map_err(anyhow::Error::msg)?, "http:local");
    spec.max_attempts = 3;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        let at = now - (n - i) as u64;
        let agent: Option<jid::FullJid> = format!("agent{}@localhost/up", 1 + i % 2).parse().ok();
        let failed = i % 100 == 99;
        let (state, outcome) = if failed {
            (
                JobState::Failed,
                Recorded::Failure {
                    condition: spine_protocol::Condition::Failed,
                    message: Some("the input was not text".into()),
                    field: None,
                },
            )
        } else {
            (
                JobState::Succeeded,
                Recorded::Succeeded {
                    meta: serde_json::Map::new(),
                    output: Default::default(),
                    mime: Some("text/plain; charset=utf-8".into()),
                    elapsed_ms: Some(0),
                },
            )
        };
        let step = |state, attempt, agent: Option<jid::FullJid>| Step {
            at_ms: at,
            state,
            attempt,
            agent,
            note: None,
        };
        batch.push(JobRecord {
            id: format!("retained-{i}")
                .parse()
                .map_err(anyhow::Error::msg)?,
            spec: spec.clone(),
            state,
            attempts: 1,
            agent: agent.clone(),
            excluded: Vec::new(),
            outcome: Some(outcome),
            percent: Some(100),
            accepted_ms: at,
            updated_ms: at,
            not_before_ms: 0,
            seq: i as u64 + 1,
            children: Vec::new(),
            mr: None,
            dispatched_ms: at,
            resume: false,
            history: vec![
                step(JobState::Queued, 0, None),
                step(JobState::Dispatched, 1, agent.clone()),
                step(JobState::Running, 1, agent.clone()),
                step(state, 1, agent),
            ],
        });
        if batch.len() == batch.capacity() || i + 1 == n {
            store.put(&batch.iter().collect::<Vec<_>>())?;
            batch.clear();
        }
    }
    Ok(())
}
