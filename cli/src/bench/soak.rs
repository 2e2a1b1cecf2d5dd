//! `spine bench soak`: whether the dispatcher holds metadata, not payloads (issue 17, item 7).
//! A steady mix of jobs runs for minutes against a short retention, and the resident memory of
//! each process, the size of the job store and of the blob store, the jobs held and the
//! throughput are sampled over time, during the load and for `retention` + 60 s after it
//! (`--after`), when nothing should be held any more.
//!
//! Every part runs as its own child process of this executable, so that each has its own
//! memory figure: `spine server`, `spine dispatcher` and two `spine agent --builtin` (the
//! capabilities of `spine up`'s local agents), with the configurations of `spine up`'s farm
//! ([`crate::up::FarmAccounts`]) written to files in a temporary directory, on free loopback
//! ports. `callers` tasks of this process each submit a job over HTTP and follow it to its end,
//! in a loop: most a `text.upper` of a short text (its output checked), `large_percent` % a
//! `hash.sha256` of `large_kib` KiB of bytes that differ per job (so no upload is a dedup hit;
//! the digest checked), which the dispatcher keeps in its blob store and the agent fetches over
//! HTTP. Blobs of forgotten jobs are deleted once older than `blob_orphan_ttl`, which the soak
//! sets to the retention (the default is 15 minutes), so the blob store can empty too.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::Digest as _;

use super::proc_status_bytes;
use super::procs::{self, Children, Plan};
use super::retained::{job_gauges, metrics, NOOP};

/// The capability of the large jobs: it reads its whole input.
const LARGE: &str = "hash.sha256";
/// Agents (child processes).
const AGENTS: usize = 2;
/// A job that has not ended after this long counts as failed (its caller goes on).
const JOB_PATIENCE: Duration = Duration::from_secs(120);

/// What to run.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mix {
    /// Seconds of load.
    pub(super) seconds: u64,
    /// Callers, each with one job in flight.
    pub(super) callers: usize,
    /// Share of the jobs with a large input, percent.
    pub(super) large_percent: u32,
    /// Size of a large input, KiB.
    pub(super) large_kib: usize,
    /// The dispatcher's `retention` (and `blob_orphan_ttl`).
    pub(super) retention: Duration,
    /// Time between samples.
    pub(super) sample: Duration,
    /// Sampling goes on for this long after the load (retention + 60 s: nothing is held then).
    pub(super) after: Duration,
}

/// Runs the soak and returns its figures; `passed` is false when a job failed.
pub(super) async fn run(mix: Mix) -> Result<(Value, bool)> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let plan = Plan {
        agents: AGENTS,
        slots: mix.callers.div_ceil(AGENTS) as u64,
        capability: LARGE,
        dispatchers: 1,
    };
    let mut farm = procs::start(dir.path(), plan, |dcfg| {
        dcfg.retention = mix.retention;
        // Released blobs go when older than this: the default (15 min) would keep every large
        // input of the last quarter hour, whatever the retention.
        dcfg.blob_orphan_ttl = mix.retention;
    })
    .await?;
    let result = soak(&mut farm.children, &farm.api, mix, &farm.data).await;
    farm.children.stop().await;
    result
}

/// What the callers count, shared with the sampler.
#[derive(Default)]
struct Counts {
    /// Jobs that ended succeeded with the expected output.
    completed: AtomicU64,
    /// ... of which had a large input.
    large: AtomicU64,
    /// Jobs that ended otherwise, failed to submit or took longer than [`JOB_PATIENCE`].
    failed: AtomicU64,
    /// Jobs started (each job's number: which are large, what their input is).
    started: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// One sample.
struct Sample {
    t_s: f64,
    load: bool,
    /// VmRSS of each process (the children, then this one), bytes.
    rss: Vec<(String, Option<u64>)>,
    jobs_redb: u64,
    blobs: u64,
    blob_files: u64,
    held: u64,
    completed: u64,
    jobs_per_s: f64,
    load_avg: f64,
}

async fn soak(
    children: &mut Children,
    api: &spine_client::Client,
    mix: Mix,
    data: &Path,
) -> Result<(Value, bool)> {
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let large_input = Bytes::from(
        (0..mix.large_kib * 1024)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect::<Vec<u8>>(),
    );
    println!(
        "soak: {} s of load, {} callers (each one job at a time over HTTP), {} % of jobs {LARGE} of {} KiB, the rest {NOOP} of a short text; retention and blob_orphan_ttl {} s; a sample every {} s; server, dispatcher and {AGENTS} agents as separate processes; {} cores",
        mix.seconds,
        mix.callers,
        mix.large_percent,
        mix.large_kib,
        mix.retention.as_secs_f64(),
        mix.sample.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let pids = children.pids();
    let names: Vec<String> = pids
        .iter()
        .map(|(n, _)| n.clone())
        .chain(["bench".to_owned()])
        .collect();
    let mut header = format!("{:>6} {:>5}", "t (s)", "phase");
    for n in &names {
        header.push_str(&format!(" {:>12}", format!("{n} MiB")));
    }
    header.push_str(&format!(
        " {:>14} {:>10} {:>7} {:>7} {:>8} {:>5}",
        "jobs.redb MiB", "blobs MiB", "files", "held", "jobs/s", "load"
    ));
    println!("{header}");

    let started = Instant::now();
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..mix.callers {
        let (api, counts, stop, input) = (
            api.clone(),
            counts.clone(),
            stop.clone(),
            large_input.clone(),
        );
        callers.spawn(caller(api, counts, stop, input, mix.large_percent));
    }
    let load_end = started + Duration::from_secs(mix.seconds);
    let end = load_end + mix.after;
    // The load ends on time: each caller then finishes the job it has in flight and stops.
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(load_end.into()).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut samples: Vec<Sample> = Vec::new();
    let (mut last_t, mut last_completed) = (0.0, 0);
    let mut next = started + mix.sample;
    let sampled = loop {
        tokio::time::sleep_until(next.into()).await;
        next += mix.sample;
        if let Err(e) = children.check_alive() {
            break Err(e);
        }
        let t_s = started.elapsed().as_secs_f64();
        let completed = counts.completed.load(Ordering::Relaxed);
        let (blobs, blob_files) = dir_size(&data.join("blobs"));
        let s = Sample {
            t_s,
            load: t_s <= mix.seconds as f64,
            rss: pids
                .iter()
                .map(|(n, pid)| {
                    let pid = pid.map_or("self".to_owned(), |p| p.to_string());
                    (n.clone(), proc_status_bytes(&pid, "VmRSS"))
                })
                .chain([("bench".to_owned(), proc_status_bytes("self", "VmRSS"))])
                .collect(),
            jobs_redb: std::fs::metadata(data.join("jobs.redb")).map_or(0, |m| m.len()),
            blobs,
            blob_files,
            held: match metrics(api).await {
                Ok(text) => job_gauges(&text).map(|(_, n)| n).sum(),
                Err(e) => break Err(e),
            },
            completed,
            jobs_per_s: (completed - last_completed) as f64 / (t_s - last_t),
            load_avg: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(f64::NAN),
        };
        (last_t, last_completed) = (t_s, completed);
        print_row(&s);
        samples.push(s);
        if Instant::now() >= end {
            break Ok(());
        }
    };
    stop.store(true, Ordering::Relaxed);
    stopper.abort();
    while let Some(r) = callers.join_next().await {
        r.context("a caller task")?;
    }
    sampled?;
    let failed = counts.failed.load(Ordering::Relaxed);
    let first_error = counts
        .first_error
        .lock()
        .map_or(None, |e| e.clone())
        .unwrap_or_default();
    Ok((
        summarize(mix, &counts, &names, &samples, &first_error),
        failed == 0,
    ))
}

fn mib(b: Option<u64>) -> String {
    b.map_or("?".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0))
}

fn print_row(s: &Sample) {
    let mut row = format!(
        "{:>6.0} {:>5}",
        s.t_s,
        if s.load { "load" } else { "after" }
    );
    for (_, rss) in &s.rss {
        row.push_str(&format!(" {:>12}", mib(*rss)));
    }
    row.push_str(&format!(
        " {:>14} {:>10} {:>7} {:>7} {:>8.1} {:>5.2}",
        mib(Some(s.jobs_redb)),
        mib(Some(s.blobs)),
        s.blob_files,
        s.held,
        s.jobs_per_s,
        s.load_avg
    ));
    println!("{row}");
}

/// The figures as JSON, and the summary lines printed under the table.
fn summarize(
    mix: Mix,
    counts: &Counts,
    names: &[String],
    samples: &[Sample],
    first_error: &str,
) -> Value {
    let completed = counts.completed.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let large = counts.large.load(Ordering::Relaxed);
    let during: Vec<&Sample> = samples.iter().filter(|s| s.load).collect();
    let last = samples.last();
    let mut peak = BTreeMap::new();
    let mut after = BTreeMap::new();
    for (k, name) in names.iter().enumerate() {
        let max = during.iter().filter_map(|s| s.rss[k].1).max();
        peak.insert(name.clone(), max);
        after.insert(name.clone(), last.and_then(|s| s.rss[k].1));
    }
    // Throughput trend: the mean rate over the first and the last fifth of the load.
    let fifth = (during.len() / 5).max(1);
    let rate = |v: &[&Sample]| v.iter().map(|s| s.jobs_per_s).sum::<f64>() / v.len().max(1) as f64;
    let first_rate = rate(&during[..fifth.min(during.len())]);
    let last_rate = rate(&during[during.len().saturating_sub(fifth)..]);
    let held_max = during.iter().map(|s| s.held).max().unwrap_or(0);
    println!(
        "jobs: {completed} completed ({large} large), {failed} failed, {:.1} jobs/s over the load; {:.1} jobs/s in the first fifth, {:.1} in the last",
        completed as f64 / mix.seconds.max(1) as f64,
        first_rate,
        last_rate
    );
    let line = |m: &BTreeMap<String, Option<u64>>| {
        m.iter()
            .map(|(n, b)| format!("{n} {} MiB", mib(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("peak RSS during the load: {}", line(&peak));
    println!(
        "RSS at the end ({} jobs held): {}",
        last.map_or(0, |s| s.held),
        line(&after)
    );
    println!(
        "most jobs held: {held_max}; store at the end: jobs.redb {} MiB, blobs {} MiB in {} files",
        mib(last.map(|s| s.jobs_redb)),
        mib(last.map(|s| s.blobs)),
        last.map_or(0, |s| s.blob_files)
    );
    if failed > 0 {
        println!("first failure: {first_error}");
    }
    json!({
        "seconds": mix.seconds, "callers": mix.callers, "large_percent": mix.large_percent,
        "large_kib": mix.large_kib, "retention_s": mix.retention.as_secs_f64(),
        "blob_orphan_ttl_s": mix.retention.as_secs_f64(), "sample_s": mix.sample.as_secs_f64(),
        "after_s": mix.after.as_secs_f64(),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "completed": completed, "large_completed": large, "failed": failed,
        "first_error": (failed > 0).then_some(first_error),
        "jobs_per_s": completed as f64 / mix.seconds.max(1) as f64,
        "jobs_per_s_first_fifth": first_rate, "jobs_per_s_last_fifth": last_rate,
        "held_max": held_max,
        "peak_rss_bytes": peak, "end_rss_bytes": after,
        "samples": samples.iter().map(|s| json!({
            "t_s": s.t_s, "phase": if s.load { "load" } else { "after" },
            "rss_bytes": s.rss.iter().map(|(n, b)| (n.clone(), json!(b))).collect::<serde_json::Map<_, _>>(),
            "jobs_redb_bytes": s.jobs_redb, "blobs_bytes": s.blobs, "blob_files": s.blob_files,
            "held": s.held, "completed": s.completed, "jobs_per_s": s.jobs_per_s,
            "load_average": s.load_avg,
        })).collect::<Vec<_>>(),
    })
}

/// Bytes and files under `dir` (0 when it does not exist).
fn dir_size(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut bytes, mut files) = (0, 0);
    for e in entries.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => {
                let (b, f) = dir_size(&e.path());
                (bytes, files) = (bytes + b, files + f);
            }
            Ok(t) if t.is_file() => {
                bytes += e.metadata().map_or(0, |m| m.len());
                files += 1;
            }
            _ => {}
        }
    }
    (bytes, files)
}

/// One caller: a job at a time until `stop`, each followed to its end and its output checked.
/// Job number `n` (over all callers) is large when `n × large_percent` crosses a multiple of
/// 100, so exactly that share of the jobs is large, spread evenly.
async fn caller(
    api: spine_client::Client,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    large_input: Bytes,
    large_percent: u32,
) {
    while !stop.load(Ordering::Relaxed) {
        let n = counts.started.fetch_add(1, Ordering::Relaxed);
        let p = u64::from(large_percent);
        let large = (n + 1) * p / 100 > n * p / 100;
        let job = async {
            if large {
                large_job(&api, n, &large_input).await
            } else {
                small_job(&api, n).await
            }
        };
        match tokio::time::timeout(JOB_PATIENCE, job).await {
            Ok(Ok(())) => {
                counts.completed.fetch_add(1, Ordering::Relaxed);
                if large {
                    counts.large.fetch_add(1, Ordering::Relaxed);
                }
            }
            r => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                let why = match r {
                    Ok(Err(e)) => format!("job {n}: {e:#}"),
                    _ => format!("job {n} did not end within {} s", JOB_PATIENCE.as_secs()),
                };
                if let Ok(mut first) = counts.first_error.lock() {
                    first.get_or_insert(why);
                }
            }
        }
    }
}

/// `text.upper` of a short text; the output is checked.
async fn small_job(api: &spine_client::Client, n: u64) -> Result<()> {
    let text = format!("soak job {n}");
    let id = api
        .submit(&json!({ "capability": NOOP, "input": spine_client::base64(text.as_bytes()) }))
        .await?;
    let job = api.follow(&id, |_, _| {}).await?;
    anyhow::ensure!(
        job["state"] == "succeeded",
        "{NOOP} job {id} ended {}",
        job["state"]
    );
    let out = api.output(&job).await?;
    anyhow::ensure!(
        out == text.to_uppercase().as_bytes(),
        "{NOOP} job {id} gave {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}

/// `hash.sha256` of the large input with the job number in its first 8 bytes (so that no
/// two jobs upload the same blob), sent as the request body; the digest is checked.
async fn large_job(api: &spine_client::Client, n: u64, input: &Bytes) -> Result<()> {
    let mut bytes = input.to_vec();
    let k = bytes.len().min(8);
    bytes[..k].copy_from_slice(&n.to_le_bytes()[..k]);
    let expected: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let accepted = api
        .call(
            api.request(
                reqwest::Method::POST,
                &format!("/v1/jobs?capability={LARGE}"),
            )
            .header("content-type", "application/octet-stream")
            .body(bytes),
            "submitting a large job",
        )
        .await?;
    let id = accepted["id"]
        .as_str()
        .context("the accepted job has no id")?
        .to_owned();
    let job = api.follow(&id, |_, _| {}).await?;
    anyhow::ensure!(
        job["state"] == "succeeded",
        "{LARGE} job {id} ended {}",
        job["state"]
    );
    let out = api.output(&job).await?;
    anyhow::ensure!(
        out == expected.as_bytes(),
        "{LARGE} job {id} gave {:?}",
        String::from_utf8_lossy(&out)
    );
    Ok(())
}
