//! `spine bench https`: what HTTPS costs the dispatcher's HTTP API (issue 17, item 4), with
//! plain HTTP as the baseline in the same run.
//!
//! Each run starts a fresh local farm (embedded server, dispatcher, 2 agents: `spine up`'s
//! [`crate::up::Farm`]) once with plain HTTP and once with HTTPS (a self-signed certificate
//! made for the run, which the client trusts as its CA file), the two alternating so that the
//! machine's drift falls on both alike. On each: no-op jobs (`text.upper` of an empty input)
//! submitted over the API and followed over their event stream to their end, as `spine submit
//! --wait` does, one at a time and then `window` in flight (the client keeps its connections
//! open, so this is the cost of TLS records, not of handshakes); then `GET /healthz` on a new
//! connection each time, which is what a handshake costs.

use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::retained::{noop_jobs, NOOP};
use super::{median, wait_for_agents};

/// Jobs run on each farm before the measurement (connections, caches).
const WARM_UP: usize = 100;

/// The figures of one farm.
struct Figures {
    seq_per_s: f64,
    par_per_s: f64,
    fresh_per_s: f64,
}

/// Runs the scenario: `runs` × (plain, HTTPS), medians and the ratios HTTPS ÷ plain.
pub(super) async fn run(
    seq_jobs: usize,
    par_jobs: usize,
    window: usize,
    connections: usize,
    runs: usize,
) -> Result<Value> {
    println!(
        "https: no-op jobs over the HTTP API ({NOOP}, submitted and followed to their end), {seq_jobs} one at a time and {par_jobs} with {window} in flight, and {connections} GET /healthz on new connections, on a fresh farm of 2 agents per scheme; {runs} runs"
    );
    println!(
        "{:>4} {:>6} {:>12} {:>16} {:>18}",
        "run", "scheme", "seq. jobs/s", "jobs/s in flight", "new connections/s"
    );
    let mut rows = Vec::new();
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        for https in [false, true] {
            let f = farm_run(https, seq_jobs, par_jobs, window, connections).await?;
            let scheme = if https { "https" } else { "http" };
            println!(
                "{run:>4} {scheme:>6} {:>12.0} {:>16.0} {:>18.0}",
                f.seq_per_s, f.par_per_s, f.fresh_per_s
            );
            rows.push(json!({
                "run": run, "scheme": scheme, "seq_jobs_per_s": f.seq_per_s,
                "par_jobs_per_s": f.par_per_s, "window": window,
                "new_connections_per_s": f.fresh_per_s,
            }));
            if https { &mut tls } else { &mut plain }.push(f);
        }
    }
    let med = |v: &[Figures], k: fn(&Figures) -> f64| median(v.iter().map(k).collect());
    type Figure = fn(&Figures) -> f64;
    let pairs: [(&str, Figure); 3] = [
        ("seq", |f| f.seq_per_s),
        ("par", |f| f.par_per_s),
        ("fresh", |f| f.fresh_per_s),
    ];
    let mut out = json!({
        "seq_jobs": seq_jobs, "par_jobs": par_jobs, "window": window,
        "connections": connections, "runs": rows,
    });
    for (name, k) in pairs {
        let (p, t) = (med(&plain, k), med(&tls, k));
        out[format!("{name}_http")] = json!(p);
        out[format!("{name}_https")] = json!(t);
        out[format!("{name}_ratio")] = json!(t / p);
    }
    let f = |k: &str| out[k].as_f64().unwrap_or(0.0);
    println!(
        "medians, plain HTTP (baseline) → HTTPS: one at a time {:.0} → {:.0} jobs/s (ratio {:.3}); {window} in flight {:.0} → {:.0} jobs/s (ratio {:.3}); new connections {:.0} → {:.0} per s (ratio {:.3})",
        f("seq_http"), f("seq_https"), f("seq_ratio"),
        f("par_http"), f("par_https"), f("par_ratio"),
        f("fresh_http"), f("fresh_https"), f("fresh_ratio"),
    );
    Ok(out)
}

/// One farm, plain or HTTPS: start it, measure, stop it.
async fn farm_run(
    https: bool,
    seq_jobs: usize,
    par_jobs: usize,
    window: usize,
    connections: usize,
) -> Result<Figures> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let (cert, key, ca) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("ca.pem"),
    );
    let (cert_pem, key_pem) = spine_server::tls::generate("localhost")?;
    for (path, text) in [(&cert, &cert_pem), (&key, &key_pem), (&ca, &cert_pem)] {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let farm = crate::up::Farm::start(crate::up::FarmOptions {
        agents: 2,
        slots: window.div_ceil(2) as u64,
        xmpp_listen: "127.0.0.1:0".parse()?,
        http_listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        max_blob: None,
        dispatcher: Some(Box::new(
            move |cfg: &mut spine_dispatcher::DispatcherConfig| {
                // Every job in flight holds an event stream of the one local caller.
                cfg.http_max_event_streams_per_token = (window * 2).max(32);
                cfg.http_max_event_streams = cfg.http_max_event_streams.max(window * 2);
                if https {
                    cfg.http_tls_cert = Some(cert);
                    cfg.http_tls_key = Some(key);
                }
            },
        )),
        agent: None,
        extra_agents: Vec::new(),
    })
    .await?;
    let scheme = if https { "https" } else { "http" };
    let base = format!("{scheme}://{}", farm.http);
    let ca = https.then_some(ca.as_path());
    let api = spine_client::Client::with_ca_file(&base, None, ca)?;
    let r = measure(&api, &base, ca, seq_jobs, par_jobs, window, connections).await;
    farm.stop().await;
    r
}

async fn measure(
    api: &spine_client::Client,
    base: &str,
    ca: Option<&std::path::Path>,
    seq_jobs: usize,
    par_jobs: usize,
    window: usize,
    connections: usize,
) -> Result<Figures> {
    wait_for_agents(api, NOOP, 2).await?;
    noop_jobs(api, WARM_UP, window).await?;
    let t = Instant::now();
    noop_jobs(api, seq_jobs, 1).await?;
    let seq_per_s = seq_jobs as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    noop_jobs(api, par_jobs, window).await?;
    let par_per_s = par_jobs as f64 / t.elapsed().as_secs_f64();
    // A new client per request: a new connection, and over HTTPS a full handshake (the
    // configuration, loaded once, is not what is measured).
    let tls = match ca {
        Some(f) => Some(spine_tls::client_config_for_ca_file(Some(f))?),
        None => None,
    };
    let t = Instant::now();
    for _ in 0..connections {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0);
        if let Some(c) = &tls {
            b = b.use_preconfigured_tls(c.clone());
        }
        let r = b
            .build()?
            .get(format!("{base}/healthz"))
            .send()
            .await
            .context("GET /healthz on a new connection")?;
        anyhow::ensure!(r.status().is_success(), "GET /healthz: {}", r.status());
        r.bytes().await?;
    }
    let fresh_per_s = connections as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        seq_per_s,
        par_per_s,
        fresh_per_s,
    })
}
