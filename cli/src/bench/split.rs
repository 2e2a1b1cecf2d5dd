//! `spine bench split`: the peak memory of an agent process splitting a large input by
//! reference (issue 17, item 5), against the input's size.
//!
//! For each size: a text of that size is written to disk (a generated 64 MiB corpus again and
//! again, so the count to expect is known), uploaded to a fresh local farm's blob store
//! (`PUT /v1/blobs`, streamed), and counted by a map/reduce job with a split step naming it by
//! `input_ref`. The split step runs on `spine agent --builtin`, a child process offering
//! `wordcount.split` (it streams the input to a file, cuts it into fragment files and uploads
//! each to a slot); the map and reduce steps (`bench.lines`, `bench.sum`: bytes and lines) run
//! on an agent in this process, so the child does nothing but split. The child's resident set
//! before the job (`VmRSS`) and its peak after (`VmHWM`, which the kernel keeps) give the
//! growth; the lines and bytes the farm counted must equal the file's. Disk: about three
//! times the input at the peak (the blob store's copy, the agent's, and the fragments).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use spine_agent::{Agent, JobContext, JobError, Output};

use super::{proc_status_bytes, wait_for_agents};

const MIB: u64 = 1 << 20;
/// The generated corpus repeated to make the input (a smaller input is one corpus).
const BASE_MIB: usize = 64;

/// What to measure.
pub(super) struct Options {
    /// Input sizes, GiB.
    pub gib: Vec<f64>,
    /// The split step's `fragment_bytes`, MiB.
    pub fragment_mib: u64,
    /// Where the inputs, the blob store and the agents' work files go.
    pub dir: Option<PathBuf>,
}

/// Bytes and line ends of `bytes`, as JSON.
fn lines_of(bytes: &[u8]) -> Vec<u8> {
    let lines = bytes.iter().filter(|&&b| b == b'\n').count();
    json!({"bytes": bytes.len(), "lines": lines})
        .to_string()
        .into_bytes()
}

/// The sum of a fragment list of [`lines_of`] outputs.
fn sum(list: &[u8]) -> Result<Output, JobError> {
    let list =
        spine_protocol::fragments::decode(list).map_err(|e| JobError::bad_argument("input", e))?;
    let (mut bytes, mut lines) = (0u64, 0u64);
    for f in list {
        let v: Value = serde_json::from_slice(&f.data)
            .map_err(|e| JobError::bad_argument("input", e.to_string()))?;
        bytes += v["bytes"].as_u64().unwrap_or(0);
        lines += v["lines"].as_u64().unwrap_or(0);
    }
    Ok(Output::bytes(
        json!({"bytes": bytes, "lines": lines}).to_string(),
    ))
}

/// Writes `size` bytes or a little more (whole copies of the corpus) to `path`: (bytes, line
/// ends).
fn write_input(path: &Path, size: u64) -> Result<(u64, u64)> {
    let base = spine_example_wordcount::generated_corpus((BASE_MIB << 20).min(size as usize));
    let lines = base.bytes().filter(|&b| b == b'\n').count() as u64;
    let copies = size.div_ceil(base.len() as u64).max(1);
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    for _ in 0..copies {
        out.write_all(base.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((copies * base.len() as u64, copies * lines))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) async fn run(o: Options) -> Result<Value> {
    println!(
        "split: peak RSS of a `spine agent` process splitting a large input by reference (fragments of {} MiB); {} cores",
        o.fragment_mib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>10} {:>10} {:>12} {:>12} {:>10} {:>12} {:>10}",
        "input", "fragments", "RSS before", "peak RSS", "growth", "split step", "job"
    );
    let mut rows = Vec::new();
    for gib in &o.gib {
        let size = (gib * (1u64 << 30) as f64) as u64;
        let r = one(size, &o).await?;
        println!(
            "{:>7.2} GiB {:>10} {:>8.1} MiB {:>8.1} MiB {:>+6.1} MiB {:>10.1} s {:>8.1} s",
            r["input_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
            r["fragments"],
            r["rss_before"].as_f64().unwrap_or(0.0) / MIB as f64,
            r["peak_rss"].as_f64().unwrap_or(0.0) / MIB as f64,
            r["growth"].as_f64().unwrap_or(0.0) / MIB as f64,
            r["split_s"].as_f64().unwrap_or(0.0),
            r["job_s"].as_f64().unwrap_or(0.0),
        );
        rows.push(r);
    }
    Ok(json!({"fragment_mib": o.fragment_mib, "runs": rows}))
}

/// One measurement on a fresh farm, its files deleted after.
async fn one(size: u64, o: &Options) -> Result<Value> {
    let dir = match &o.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .context("temporary directory")?;
    let input = dir.path().join("input.txt");
    let (bytes, lines) = write_input(&input, size)?;

    let accounts = crate::up::FarmAccounts::new(2);
    let server =
        spine_server::Server::bind(accounts.server_config("127.0.0.1:0".parse()?, dir.path()))
            .await
            .context("starting the XMPP server")?;
    let xmpp = server.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server_task = tokio::spawn(server.run(stopped(stop_rx.clone())));
    let mut dcfg = accounts.dispatcher_config(xmpp, "127.0.0.1:0".parse()?, dir.path());
    // The input, and each of its fragments, in the blob store.
    dcfg.max_blob = bytesize::ByteSize::b(bytes + 64 * MIB);
    dcfg.max_input = bytesize::ByteSize::b(bytes + 64 * MIB);
    let dispatcher = spine_dispatcher::Dispatcher::bind(dcfg)
        .await
        .context("starting the dispatcher")?;
    let http = dispatcher
        .http_addr()
        .context("the HTTP API has no address")?;
    let dispatcher_task = tokio::spawn(dispatcher.run(stopped(stop_rx.clone())));

    // The splitter: a child process, its work files under the run's directory.
    let config = dir.path().join("agent1.toml");
    super::procs::write_config(
        &config,
        toml::to_string_pretty(&accounts.agent_config(1, xmpp, 1)),
    )?;
    let log = dir.path().join("agent1.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["agent", "--builtin", "--log", "warn", "--config"])
        .arg(&config)
        .env("TMPDIR", dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .context("starting the split agent")?;
    let pid = child.id().context("the split agent's pid")?.to_string();

    // Map and reduce steps here, so that the child only splits.
    let mut acfg = accounts.agent_config(2, xmpp, 2);
    acfg.max_input_size = bytesize::ByteSize::b(o.fragment_mib * MIB * 2 + 64 * MIB);
    let counter = Agent::builder(acfg)
        .capability("bench.lines", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(lines_of(&ctx.input)))
        })
        .capability("bench.sum", None, |ctx: JobContext| async move {
            sum(&ctx.input)
        })
        .build()
        .context("building the counting agent")?;
    let counter_task = tokio::spawn(counter.run(stopped(stop_rx)));

    let api = spine_client::Client::new(&format!("http://{http}"), None)?;
    let result = async {
        wait_for_agents(&api, "wordcount.split", 1).await?;
        wait_for_agents(&api, "bench.lines", 1).await?;
        let blob = api.put_file(&input).await?;
        let sha256 = blob
            .source
            .as_ref()
            .context("the upload's reference")?
            .sha256;
        // Stored: the disk is needed for the agent's copy and the fragments.
        std::fs::remove_file(&input).with_context(|| format!("deleting {}", input.display()))?;
        // Idle, registered: the baseline.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = proc_status_bytes(&pid, "VmRSS").context("the split agent's VmRSS")?;
        let t = Instant::now();
        let id = api
            .submit(&json!({
                "capability": "bench.lines",
                "reduce": "bench.sum",
                "split": "wordcount.split",
                "fan_in": 8,
                "args": { "fragment_bytes": o.fragment_mib * MIB },
                "input_ref": hex(&sha256),
                "input_type": "text/plain; charset=utf-8",
            }))
            .await?;
        let job = api.follow(&id, |_, _| {}).await?;
        let job_s = t.elapsed().as_secs_f64();
        let peak = proc_status_bytes(&pid, "VmHWM").context("the split agent's VmHWM")?;
        anyhow::ensure!(
            job["state"] == "succeeded",
            "the job did not succeed: {job}"
        );
        let counted: Value = serde_json::from_slice(&api.output(&job).await?)?;
        anyhow::ensure!(
            counted == json!({"bytes": bytes, "lines": lines}),
            "the farm counted {counted}, the file has {bytes} bytes and {lines} lines"
        );
        let split = api.job(&format!("{id}.split")).await?;
        let split_s = split["result"]["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0;
        Ok(json!({
            "input_bytes": bytes, "fragments": job["result"]["meta"]["fragments"],
            "rss_before": before, "peak_rss": peak, "growth": peak.saturating_sub(before),
            "split_s": split_s, "job_s": job_s,
        }))
    }
    .await;
    if let Some(p) = child.id() {
        let pid = nix::unistd::Pid::from_raw(p as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            eprintln!("split: SIGTERM to the agent: {e}");
        }
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        eprintln!("split: the agent did not stop within 30 s: killed");
        let _ = child.kill().await;
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), counter_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), dispatcher_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), server_task).await;
    if result.is_err() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("split: the agent's log:\n{tail}");
    }
    result
}
