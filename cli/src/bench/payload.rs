//! `spine bench payload`: a large payload through the data plane (issue 17), leg by leg, with
//! a raw TCP loopback copy of the same bytes as the baseline in the same run.
//!
//! One local farm (embedded server, dispatcher, one agent: [`crate::up::Farm`]), plain HTTP,
//! HTTPS (`--tls`: a self-signed certificate made for the run, trusted by the client and the
//! agent) or with the agent's HTTP data plane off (`--in-band`: inputs and outputs travel as
//! `<chunk/>` IQs). Each run measures, in this order:
//!
//! - `raw`: the bytes over one loopback TCP connection (the baseline);
//! - `upload`: `PUT /v1/blobs` of the bytes until its 201 (streamed into the blob store,
//!   hashed, fsynced: the bytes differ each run, so no upload is a dedup hit);
//! - `fetch`: `GET /v1/jobs/{id}/output` of a stored output of the same size, read as the
//!   agent reads an input (hashed while read into a buffer of the referenced size, the hash
//!   checked). The output is served by the same `serve_file` as an agent's
//!   `GET /v1/blobs/{sha256}`; the signed input URL itself is not reachable from outside, so
//!   this is the proxy for the agent's fetch. The output is made once per farm by a
//!   `text.upper` job of an ASCII input of the same size (not timed);
//! - `end_to_end`: `POST /v1/jobs?capability=hash.sha256` with the bytes as the body, until
//!   the job's end is seen on its event stream: upload, durable store, the agent's fetch and
//!   hash check, the handler's SHA-256, the result. The output (the hex digest) is checked.
//!
//! Peak memory: the farm runs in this process, so the figure is the whole process (server,
//! dispatcher, agent and this client together). Before each leg the peak (`VmHWM`) is reset
//! to the current RSS (`/proc/self/clear_refs`), after it the growth of the peak is read; the
//! bytes the client itself holds are shared, not copied, per request, and the fetch leg's
//! buffer (the size of the payload) is the client's.

use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::Digest as _;

use super::{median, wait_for_agents};

/// The legs measured each run, in order.
const LEGS: [&str; 4] = ["raw", "upload", "fetch", "end_to_end"];

/// Which farm to measure.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mode {
    /// HTTPS on the dispatcher's API and data plane.
    pub(super) tls: bool,
    /// The agent with `http_data = false`: payloads in chunks.
    pub(super) in_band: bool,
}

/// Bytes that do not compress and are the same every run.
fn payload_bytes(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// The raw baseline: the same bytes over one loopback TCP connection, seconds.
async fn raw_copy(data: &[u8]) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let len = data.len();
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < len {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok::<usize, std::io::Error>(got)
    });
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(data).await?;
    s.shutdown().await?;
    let got = reader.await??;
    anyhow::ensure!(got == len, "raw copy moved {got} of {len} bytes");
    Ok(t.elapsed().as_secs_f64())
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`); `None` off Linux.
fn status_bytes(field: &str) -> Option<u64> {
    super::proc_status_bytes("self", field)
}

/// Resets the process's peak RSS to its current RSS; returns that RSS (`None` if the kernel
/// does not allow it, then the peak is the process's since its start).
pub(super) fn reset_peak() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    status_bytes("VmRSS")
}

/// How much the peak RSS grew since `base` (from [`reset_peak`]).
pub(super) fn peak_growth(base: Option<u64>) -> Option<u64> {
    Some(status_bytes("VmHWM")?.saturating_sub(base?))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Gives every run's bytes a different start, so that the blob store never finds them stored
/// already (a dedup hit skips the fsync).
fn vary(data: Bytes, tag: u64) -> Bytes {
    let mut v = Vec::from(data); // no copy when no request holds a reference any more
    let n = v.len().min(8);
    v[..n].copy_from_slice(&tag.to_le_bytes()[..n]);
    Bytes::from(v)
}

/// The figures of one run, seconds per leg and peak RSS growth per leg.
struct Run {
    secs: [f64; 4],
    peak: [Option<u64>; 4],
}

/// Runs the scenario on one farm of the given mode.
pub(super) async fn run(mib: usize, runs: usize, mode: Mode) -> Result<Value> {
    let len = mib * 1024 * 1024;
    let dir = tempfile::tempdir().context("temporary directory")?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    if mode.tls {
        let (cert_pem, key_pem) = spine_server::tls::generate("localhost")?;
        for (path, text) in [(&cert, &cert_pem), (&key, &key_pem)] {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    // Room for the payload (and its upper-cased twin) in every limit.
    let limit = bytesize::ByteSize::b((len as u64 + (1 << 20)).max(64 << 20));
    let (tls, in_band, ca) = (mode.tls, mode.in_band, cert.clone());
    let farm = crate::up::Farm::start(crate::up::FarmOptions {
        agents: 1,
        slots: 1,
        xmpp_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        max_blob: Some(limit),
        dispatcher: Some(Box::new(
            move |cfg: &mut spine_dispatcher::DispatcherConfig| {
                cfg.max_input = cfg.max_input.max(limit);
                if tls {
                    cfg.http_tls_cert = Some(cert);
                    cfg.http_tls_key = Some(key);
                }
            },
        )),
        agent: Some(Box::new(move |cfg: &mut spine_agent::AgentConfig| {
            cfg.max_input_size = cfg.max_input_size.max(limit);
            cfg.http_data = !in_band;
            if tls {
                cfg.tls.ca_file = Some(ca.clone());
            }
        })),
        extra_agents: Vec::new(),
    })
    .await?;
    let result = measure(&farm, mib, runs, mode, dir.path()).await;
    farm.stop().await;
    result
}

async fn measure(
    farm: &crate::up::Farm,
    mib: usize,
    runs: usize,
    mode: Mode,
    dir: &std::path::Path,
) -> Result<Value> {
    let scheme = if mode.tls { "https" } else { "http" };
    let ca = mode.tls.then(|| dir.join("cert.pem"));
    let api = spine_client::Client::with_ca_file(
        &format!("{scheme}://{}", farm.http),
        None,
        ca.as_deref(),
    )?;
    wait_for_agents(&api, "hash.sha256", 1).await?;
    let len = mib * 1024 * 1024;
    let how = match (mode.tls, mode.in_band) {
        (_, true) => "agent in-band (http_data = false: chunks)",
        (true, _) => "HTTPS",
        _ => "plain HTTP",
    };
    println!("payload: {mib} MiB, {runs} runs, one-agent farm, {how}");

    // The stored output the fetch leg reads: `text.upper` of ASCII bytes of the same size.
    let ascii: Bytes = (0..len)
        .map(|i| b'a' + (i % 26) as u8)
        .collect::<Vec<_>>()
        .into();
    let upper_sha = hex(&sha2::Sha256::digest(ascii.to_ascii_uppercase()));
    let accepted = api
        .call(
            api.request(reqwest::Method::POST, "/v1/jobs?capability=text.upper")
                .header("content-type", "text/plain")
                .body(ascii),
            "uploading the fetch leg's input",
        )
        .await?;
    let upper_id = accepted["id"].as_str().context("no job id")?.to_owned();
    let job = api.follow(&upper_id, |_, _| {}).await?;
    anyhow::ensure!(
        job["state"] == "succeeded",
        "the text.upper job that makes the fetch leg's output ended {}",
        job["state"]
    );

    let mut data = Bytes::from(payload_bytes(len));
    let mut all = Vec::new();
    println!(
        "{:>4} {:>14} {:>14} {:>14} {:>14}",
        "run", "raw MB/s", "upload MB/s", "fetch MB/s", "end-to-end MB/s"
    );
    for r in 0..runs {
        let mut run = Run {
            secs: [0.0; 4],
            peak: [None; 4],
        };
        // raw
        let base = reset_peak();
        run.secs[0] = raw_copy(&data).await?;
        run.peak[0] = peak_growth(base);
        // upload
        data = vary(data, 2 * r as u64 + 1);
        let base = reset_peak();
        let t = Instant::now();
        let stored = api
            .call(
                api.request(reqwest::Method::PUT, "/v1/blobs")
                    .header("content-type", "application/octet-stream")
                    .body(data.clone()),
                "PUT /v1/blobs",
            )
            .await?;
        run.secs[1] = t.elapsed().as_secs_f64();
        run.peak[1] = peak_growth(base);
        anyhow::ensure!(
            stored["size"].as_u64() == Some(len as u64),
            "PUT /v1/blobs stored {stored}"
        );
        // fetch
        let base = reset_peak();
        let t = Instant::now();
        fetch_like_the_agent(&api, &upper_id, len as u64, &upper_sha).await?;
        run.secs[2] = t.elapsed().as_secs_f64();
        run.peak[2] = peak_growth(base);
        // end to end
        data = vary(data, 2 * r as u64 + 2);
        let expected = hex(&sha2::Sha256::digest(&data));
        let base = reset_peak();
        let t = Instant::now();
        let accepted = api
            .call(
                api.request(reqwest::Method::POST, "/v1/jobs?capability=hash.sha256")
                    .header("content-type", "application/octet-stream")
                    .body(data.clone()),
                "uploading",
            )
            .await?;
        let id = accepted["id"].as_str().context("no job id")?.to_owned();
        let job = api.follow(&id, |_, _| {}).await?;
        run.secs[3] = t.elapsed().as_secs_f64();
        run.peak[3] = peak_growth(base);
        let out = api.output(&job).await?;
        anyhow::ensure!(
            out == expected.as_bytes(),
            "the agent hashed something else: {}",
            String::from_utf8_lossy(&out)
        );
        let mbs = |s: f64| len as f64 / 1e6 / s;
        println!(
            "{:>4} {:>14.1} {:>14.1} {:>14.1} {:>14.1}",
            r + 1,
            mbs(run.secs[0]),
            mbs(run.secs[1]),
            mbs(run.secs[2]),
            mbs(run.secs[3])
        );
        all.push(run);
    }
    let mb = len as f64 / 1e6;
    let raw_s = median(all.iter().map(|r| r.secs[0]).collect());
    let mut out = json!({
        "bytes": len, "runs": runs, "tls": mode.tls, "in_band": mode.in_band,
        "fetch_proxy": "GET /v1/jobs/{id}/output of a stored output, hashed and checked while read",
        "peak_rss_note": "growth of the whole process's VmHWM (server, dispatcher, agent and client together) during each leg; the fetch leg's client holds the payload",
    });
    let mut line = format!("medians ({how}):");
    for (k, name) in LEGS.iter().enumerate() {
        let secs: Vec<f64> = all.iter().map(|r| r.secs[k]).collect();
        let s = median(secs.clone());
        let peak = all.iter().filter_map(|r| r.peak[k]).max();
        out[name] = json!({
            "s_runs": secs, "s": s, "mb_s": mb / s, "ratio_to_raw": raw_s / s,
            "peak_rss_growth_bytes": peak,
        });
        let peak = peak.map_or("?".to_owned(), |p| format!("{:.0}", p as f64 / 1048576.0));
        line.push_str(&format!(
            " {name} {:.1} MB/s (÷ raw {:.3}, peak RSS +{peak} MiB);",
            mb / s,
            raw_s / s
        ));
    }
    println!("{}", line.trim_end_matches(';'));
    Ok(out)
}

/// Reads a stored output as the agent reads an input (`agent/src/dataplane.rs`): the whole
/// body into a buffer of the referenced size, hashed while it arrives, the hash checked.
async fn fetch_like_the_agent(
    api: &spine_client::Client,
    id: &str,
    size: u64,
    sha: &str,
) -> Result<()> {
    let mut resp = api
        .request(reqwest::Method::GET, &format!("/v1/jobs/{id}/output"))
        .send()
        .await
        .context("GET /v1/jobs/{id}/output")?;
    anyhow::ensure!(
        resp.status() == reqwest::StatusCode::OK,
        "GET output: {}",
        resp.status()
    );
    let mut hasher = sha2::Sha256::new();
    let mut bytes = Vec::with_capacity(size as usize);
    while let Some(chunk) = resp.chunk().await? {
        hasher.update(&chunk);
        bytes.extend_from_slice(&chunk);
    }
    anyhow::ensure!(bytes.len() as u64 == size, "fetched {} bytes", bytes.len());
    anyhow::ensure!(hex(&hasher.finalize()) == sha, "fetched other bytes");
    Ok(())
}
