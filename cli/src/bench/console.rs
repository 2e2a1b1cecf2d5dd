//! `spine bench console`: the time the dispatcher takes to answer what the web console asks
//! (docs/console.md) with a table of many finished jobs held, against the same requests on an
//! empty table — the jobs pages with each filter, a deep page, one job, the capabilities and
//! the fleet. The target: a jobs page in under 100 ms with 100,000 jobs held.
//!
//! Each run starts a fresh local farm (`spine up`'s [`crate::up::Farm`]) twice, on an empty
//! data directory and on one whose store holds `held` finished jobs (written as
//! [`super::retained`] writes them: two agents in turn, every 100th failed, each with its
//! timeline), and times each request `probes` times over one kept-alive connection (the
//! median is reported). The two configurations alternate so the machine's drift falls on both.

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::median;
use super::retained::{held_farm, NOOP};
use super::wait_for_agents;

/// The requests timed, by name: (name, path). `{cursor}`, `{since}`, `{until}` and `{job}` are
/// filled from the table held (see [`paths`]).
const ASKS: [(&str, &str); 10] = [
    ("first page", "/v1/jobs?limit=50"),
    ("failed (1 in 100)", "/v1/jobs?limit=50&state=failed"),
    ("by capability", "/v1/jobs?limit=50&capability=text.upper"),
    (
        "by agent",
        "/v1/jobs?limit=50&agent=agent2%40localhost%2Fup",
    ),
    ("deep page", "/v1/jobs?limit=50&before={cursor}"),
    (
        "time range",
        "/v1/jobs?limit=50&since={since}&until={until}",
    ),
    (
        "no match (budget)",
        "/v1/jobs?limit=50&agent=nobody%40localhost%2Fx",
    ),
    ("one job", "/v1/jobs/{job}"),
    ("capabilities", "/v1/capabilities"),
    ("fleet", "/v1/fleet"),
];

/// Runs the scenario: `runs` × (empty, `held` jobs held), medians per request.
pub(super) async fn run(held: usize, runs: usize, probes: usize) -> Result<Value> {
    println!(
        "console: the console's requests on a fresh local farm with 0 and with {held} finished jobs held; {probes} probes each, {runs} runs (medians, ms)"
    );
    // times[config][ask] = one median per run.
    let mut times = [vec![Vec::new(); ASKS.len()], vec![Vec::new(); ASKS.len()]];
    for run in 1..=runs {
        for (c, n) in [0, held].into_iter().enumerate() {
            let t = farm_run(n, probes).await?;
            let cells: Vec<String> = t.iter().map(|ms| format!("{ms:.2}")).collect();
            println!("run {run}, {n:>7} held: {}", cells.join(" "));
            for (i, ms) in t.into_iter().enumerate() {
                times[c][i].push(ms);
            }
        }
    }
    println!(
        "{:<20} {:>12} {:>14} {:>8}",
        "request", "empty (ms)", "held (ms)", "ratio"
    );
    let mut rows = Vec::new();
    let mut worst_page: f64 = 0.0;
    for (i, (name, path)) in ASKS.iter().enumerate() {
        let (e, h) = (median(times[0][i].clone()), median(times[1][i].clone()));
        println!("{name:<20} {e:>12.2} {h:>14.2} {:>8.2}", h / e);
        if path.starts_with("/v1/jobs?") {
            worst_page = worst_page.max(h);
        }
        rows.push(json!({"request": name, "path": path, "empty_ms": e, "held_ms": h}));
    }
    println!(
        "slowest jobs page with {held} held: {worst_page:.2} ms (target < 100 ms server time)"
    );
    Ok(
        json!({"held": held, "runs": runs, "probes": probes, "requests": rows, "slowest_page_ms": worst_page}),
    )
}

/// The paths of [`ASKS`]: the deep page and the time range start at `mid_ms`, the acceptance
/// time of the job in the middle of the table (order `mid_seq`).
fn paths(mid_ms: u64, mid_seq: u64, newest: &str) -> Vec<String> {
    ASKS.iter()
        .map(|(_, p)| {
            p.replace("{cursor}", &format!("{mid_ms}.{mid_seq}"))
                .replace("{since}", &(mid_ms.saturating_sub(1_000)).to_string())
                .replace("{until}", &mid_ms.to_string())
                .replace("{job}", newest)
        })
        .collect()
}

/// One farm: fill its store with `held` jobs, start it, time every request, stop it.
async fn farm_run(held: usize, probes: usize) -> Result<Vec<f64>> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let (farm, api) = held_farm(dir.path(), held, 2).await?;
    let r = measure(&api, held, probes).await;
    farm.stop().await;
    r
}

async fn measure(api: &spine_client::Client, held: usize, probes: usize) -> Result<Vec<f64>> {
    wait_for_agents(api, NOOP, 2).await?;
    // One job of its own, so that every request has something to show on an empty table.
    super::retained::noop_jobs(api, 1, 1).await?;
    let newest = api
        .call(
            api.request(reqwest::Method::GET, "/v1/jobs?limit=1"),
            "listing jobs",
        )
        .await?["jobs"][0]["id"]
        .as_str()
        .context("no job listed")?
        .to_owned();
    // The middle of the table: fill() wrote job i as `retained-i`, order i + 1.
    let (mid, mid_seq) = if held > 0 {
        let name = format!("retained-{}", held / 2);
        let j = api
            .call(
                api.request(reqwest::Method::GET, &format!("/v1/jobs/{name}")),
                &name,
            )
            .await?;
        let at = j["accepted_at"].as_str().context("accepted_at")?;
        let t = humantime::parse_rfc3339(at).context("accepted_at")?;
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .context("accepted_at")?
            .as_millis() as u64;
        (ms, held as u64 / 2 + 1)
    } else {
        (u64::MAX / 2, 1)
    };
    let mut out = Vec::new();
    for path in paths(mid, mid_seq, &newest) {
        // Once untimed (first touch), then the probes.
        let first = api
            .call(api.request(reqwest::Method::GET, &path), &path)
            .await?;
        if held > 0 && path.starts_with("/v1/jobs?") && !path.contains("nobody") {
            let n = first["jobs"].as_array().map_or(0, Vec::len);
            anyhow::ensure!(n > 0, "{path} listed no job of the {held} held");
        }
        let mut t = Vec::with_capacity(probes);
        for _ in 0..probes {
            let start = Instant::now();
            api.call(api.request(reqwest::Method::GET, &path), &path)
                .await?;
            t.push(start.elapsed().as_secs_f64() * 1e3);
        }
        out.push(median(t));
    }
    Ok(out)
}
