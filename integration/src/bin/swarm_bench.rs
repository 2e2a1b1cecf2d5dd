//! Swarm: thousands of simulated agents (real XMPP sessions from this one process) on the
//! embedded server, with the server and the dispatcher in processes of their own:
//! `cargo run --release -p spine-integration --bin swarm-bench [-- SIZES] [--jobs M] [--json PATH]`
//! (SIZES a comma-separated list, default `1000,10000`).
//!
//! For each size it reports the time until the dispatcher has registered every agent, the
//! server's and the dispatcher's resident memory per agent (growth over the same processes
//! before the agents came), and no-op jobs per second (64 in flight, submitted over XMPP in
//! watch mode) with the fleet idle and busy (every agent holding one job in one of its two
//! slots). The baseline beside the busy figure is the idle one, and beside both the
//! one-agent run (the first size when it is 1). Beside the rates, the CPU time the server and
//! the dispatcher spent per job in each phase (from /proc), which other work on the machine
//! disturbs far less than the rates. Then the console's view of the busy fleet:
//! `GET /v1/fleet` (time and size), and the busy jobs again with a fleet stream
//! (`GET /v1/fleet/events`) open — its first snapshot's time, its updates per second and
//! bytes, and the throughput with the stream beside the throughput without.
//!
//! The same binary is the child: `--role server` and `--role dispatcher` run the real
//! `spine_server` and `spine_dispatcher` (what `spine server` and `spine dispatcher` run),
//! print their address and stop when their standard input closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jid::{BareJid, Jid};
use spine_integration::bench::{measure_jobs, RoundTrips, Submitting};
use spine_integration::swarm::{self, Child, FleetCounters};
use spine_xmpp::{ConnectOptions, Security};
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

const USAGE: &str = "usage: swarm-bench [SIZES] [--jobs M] [--json PATH]   (SIZES like 1000,10000)";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("--role") => child(&args[1..]).await,
        _ => parent(&args).await,
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swarm-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The child roles.
async fn child(args: &[String]) -> Result<(), String> {
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or_else(|| format!("missing {name}"))
    };
    match args.first().map(String::as_str) {
        Some("server") => {
            let max: u64 = arg("--max-connections")?
                .parse()
                .map_err(|e| format!("--max-connections: {e}"))?;
            let cfg = spine_server::ServerConfig::from_toml(&format!(
                "listen = \"127.0.0.1:0\"\ndomain = \"localhost\"\ndev_secret = \"{}\"\nmax_connections = {max}\nmax_unauthenticated = {max}\nmax_unauthenticated_per_address = {max}\nlogin_timeout = \"120s\"\nauth_timeout = \"120s\"\nidle_timeout = \"30m\"\n",
                swarm::SECRET
            ))
            .map_err(|e| e.to_string())?;
            let server = spine_server::Server::bind(cfg)
                .await
                .map_err(|e| e.to_string())?;
            println!("{}", server.local_addr());
            server
                .run(swarm::stdin_closed())
                .await
                .map_err(|e| e.to_string())
        }
        Some("dispatcher") => {
            let cfg = spine_dispatcher::DispatcherConfig::from_toml(&format!(
                "jid = \"dispatcher@localhost/d1\"\npassword = \"{}\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\nsubmitters = [\"submitter@localhost\"]\naudit_log = \"off\"\n",
                swarm::SECRET,
                arg("--server")?,
                arg("--dir")?
            ))
            .map_err(|e| e.to_string())?;
            let d = spine_dispatcher::Dispatcher::bind(cfg)
                .await
                .map_err(|e| e.to_string())?;
            let http = d.http_addr().ok_or("no HTTP address")?;
            println!("{http}");
            d.run(swarm::stdin_closed())
                .await
                .map_err(|e| e.to_string())
        }
        _ => Err("--role server|dispatcher".into()),
    }
}

struct Options {
    sizes: Vec<usize>,
    jobs: usize,
    json: String,
}

fn options(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        sizes: vec![1000, 10_000],
        jobs: 2000,
        json: "target/bench/swarm.json".into(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--jobs" => {
                o.jobs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("--jobs takes a number ≥ 1; {USAGE}"))?
            }
            "--json" => o.json = it.next().cloned().ok_or(USAGE)?,
            sizes if !sizes.starts_with('-') => {
                o.sizes = sizes
                    .split(',')
                    .map(|s| s.trim().parse::<usize>().ok().filter(|n| *n > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("bad size list {sizes:?}; {USAGE}"))?
            }
            other => return Err(format!("unknown option {other:?}; {USAGE}")),
        }
    }
    Ok(o)
}

async fn parent(args: &[String]) -> Result<(), String> {
    let o = options(args)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let ports = swarm::ephemeral_ports().unwrap_or(u64::MAX);
    let mut rows = Vec::new();
    println!(
        "{:>7} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11} {:>9}",
        "agents",
        "login s",
        "register s",
        "server KiB/a",
        "disp. KiB/a",
        "idle jobs/s",
        "busy jobs/s",
        "busy÷idle"
    );
    for &n in &o.sizes {
        // One socket per agent here and in the server, and the same per client address and
        // server port in the kernel's ephemeral range.
        if n as u64 + 64 > ports {
            println!(
                "{n:>7} skipped: this machine's ephemeral port range (net.ipv4.ip_local_port_range) allows {ports} connections from one address to one server port"
            );
            rows.push(serde_json::json!({ "agents": n, "skipped": format!("ephemeral port range {ports}") }));
            continue;
        }
        let limit = swarm::raise_fd_limit(n as u64 + 1024);
        if limit < n as u64 + 256 {
            println!("{n:>7} skipped: the open-file limit is {limit} and cannot be raised");
            rows.push(
                serde_json::json!({ "agents": n, "skipped": format!("open-file limit {limit}") }),
            );
            continue;
        }
        let r = one_size(&exe, n, o.jobs).await?;
        println!(
            "{n:>7} {:>10.2} {:>10.2} {:>11.1} {:>11.1} {:>11.0} {:>11.0} {:>9.2}",
            r["login_s"].as_f64().unwrap_or(0.0),
            r["register_s"].as_f64().unwrap_or(0.0),
            r["server_rss_per_agent"].as_f64().unwrap_or(0.0) / 1024.0,
            r["dispatcher_rss_per_agent"].as_f64().unwrap_or(0.0) / 1024.0,
            r["idle"]["per_sec"].as_f64().unwrap_or(0.0),
            r["busy"]["per_sec"].as_f64().unwrap_or(0.0),
            r["busy_over_idle"].as_f64().unwrap_or(0.0),
        );
        let cpu = |phase: &str, process: &str| {
            r["cpu_ms_per_job"][phase][process]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        println!(
            "{n:>7} CPU ms per job, idle → busy: server {:.3} → {:.3}, dispatcher {:.3} → {:.3}",
            cpu("idle", "server"),
            cpu("busy", "server"),
            cpu("idle", "dispatcher"),
            cpu("busy", "dispatcher"),
        );
        let fs = &r["fleet_stream"];
        if let Some(b) = r["console"]["browser"].as_object() {
            println!(
                "{n:>7} console in Chromium: the fleet page's first view {:.0} ms after navigation (median of {}; mark {:?})",
                b.get("first_view_ms").and_then(|v| v.as_f64()).unwrap_or(0.0),
                b.get("runs").and_then(|v| v.as_u64()).unwrap_or(0),
                b.get("marks_ms"),
            );
        } else {
            println!("{n:>7} console in Chromium: {}", r["console"]["browser"]);
        }
        println!(
            "{n:>7} console: GET /v1/fleet {:.1} ms ({:.0} KiB); fleet stream: snapshot in {:.1} ms, {:.2} updates/s, {:.1} KiB/s; busy jobs/s with the stream open ÷ without: {:.2}",
            r["console"]["fleet_ms"].as_f64().unwrap_or(0.0),
            r["console"]["fleet_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            fs["snapshot_ms"].as_f64().unwrap_or(0.0),
            fs["updates_per_s"].as_f64().unwrap_or(0.0),
            fs["update_bytes_per_s"].as_f64().unwrap_or(0.0) / 1024.0,
            r["streamed_over_busy"].as_f64().unwrap_or(0.0),
        );
        rows.push(r);
    }
    let out = serde_json::json!({ "jobs": o.jobs, "window": 64, "slots_per_agent": swarm::SLOTS, "sizes": rows });
    if let Some(dir) = std::path::Path::new(&o.json).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(
        &o.json,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    )
    .map_err(|e| format!("writing {}: {e}", o.json))?;
    println!("wrote {}", o.json);
    Ok(())
}

fn figures(r: &RoundTrips) -> serde_json::Value {
    serde_json::json!({
        "n": r.n, "window": r.window, "per_sec": r.per_sec,
        "p50_ms": r.p50.as_secs_f64() * 1e3, "p99_ms": r.p99.as_secs_f64() * 1e3,
    })
}

/// One fleet size, on fresh processes.
async fn one_size(
    exe: &std::path::Path,
    n: usize,
    jobs: usize,
) -> Result<serde_json::Value, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let server = Child::spawn(
        exe,
        &[
            "--role".into(),
            "server".into(),
            "--max-connections".into(),
            (n + 64).to_string(),
        ],
    )
    .await?;
    let dispatcher = Child::spawn(
        exe,
        &[
            "--role".into(),
            "dispatcher".into(),
            "--server".into(),
            server.addr.to_string(),
            "--dir".into(),
            dir.path().display().to_string(),
        ],
    )
    .await?;
    let base = format!("http://{}", dispatcher.addr);
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let registered = || {
        let http = http.clone();
        let url = format!("{base}/v1/capabilities");
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            let body: serde_json::Value = serde_json::from_str(&text).ok()?;
            body["capabilities"]
                .as_array()?
                .iter()
                .find(|c| c["name"] == "bench.noop")
                .and_then(|c| c["agents"].as_u64())
                .or(Some(0))
        }
    };
    // The dispatcher is up and logged in once it answers; let both settle before the baseline.
    let t = Instant::now();
    while registered().await.is_none() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err("the dispatcher's HTTP API did not answer".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (server_base, disp_base) = (server.rss().unwrap_or(0), dispatcher.rss().unwrap_or(0));

    let counters = Arc::new(FleetCounters::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let login = Arc::new(tokio::sync::Semaphore::new(64));
    let d_bare: BareJid = "dispatcher@localhost".parse().map_err(|e| format!("{e}"))?;
    let t0 = Instant::now();
    let mut fleet = tokio::task::JoinSet::new();
    for i in 0..n {
        fleet.spawn(swarm::sim_agent(
            i,
            server.addr,
            d_bare.clone(),
            Duration::from_secs(30),
            counters.clone(),
            login.clone(),
            stop_rx.clone(),
        ));
    }
    let (mut login_s, register_s);
    login_s = None;
    loop {
        if login_s.is_none() && counters.connected.load(Ordering::Relaxed) >= n {
            login_s = Some(t0.elapsed().as_secs_f64());
        }
        let failed = counters.failed.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(format!(
                "{failed} simulated agents could not log in or were cut off"
            ));
        }
        if registered().await.unwrap_or(0) >= n as u64 {
            register_s = t0.elapsed().as_secs_f64();
            break;
        }
        if t0.elapsed() > Duration::from_secs(60 + n as u64 / 50) {
            return Err(format!(
                "after {:.0} s: {} of {n} logged in, {:?} registered",
                t0.elapsed().as_secs_f64(),
                counters.connected.load(Ordering::Relaxed),
                registered().await
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login_s = login_s.unwrap_or(register_s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (server_rss, disp_rss) = (server.rss().unwrap_or(0), dispatcher.rss().unwrap_or(0));

    // Jobs: a submitter over XMPP, as in bus-bench.
    let mut sub = spine_xmpp::connect(ConnectOptions::new(
        "submitter@localhost/s"
            .parse()
            .map_err(|e| format!("{e}"))?,
        swarm::SECRET,
        server.addr,
        Security::Plain { insecure: false },
    ))
    .await
    .map_err(|e| e.to_string())?;
    sub.send(xmpp_parsers::presence::Presence::available())
        .await;
    let d: Jid = "dispatcher@localhost/d1"
        .parse()
        .map_err(|e| format!("{e}"))?;
    let noop: spine_protocol::CapabilityName = "bench.noop".parse()?;
    measure_jobs(
        &mut sub,
        &d,
        &noop,
        (jobs / 10).max(1),
        64,
        Submitting::Watch,
    )
    .await?; // warm-up
    let before = Cpu::of(&server, &dispatcher);
    let idle = measure_jobs(&mut sub, &d, &noop, jobs, 64, Submitting::Watch).await?;
    let idle_cpu = Cpu::of(&server, &dispatcher).per_job_since(&before, jobs);

    // Busy: one held job on every agent (half of each one's slots), then the same jobs.
    submit_held(&mut sub, &d, n).await?;
    let t = Instant::now();
    while counters.held.load(Ordering::Relaxed) < n {
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "only {} of {n} held jobs reached the agents",
                counters.held.load(Ordering::Relaxed)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = Cpu::of(&server, &dispatcher);
    let busy = measure_jobs(&mut sub, &d, &noop, jobs, 64, Submitting::Watch).await?;
    let busy_cpu = Cpu::of(&server, &dispatcher).per_job_since(&before, jobs);

    // The console's view of this fleet: `GET /v1/fleet` (every agent, busy), and the same jobs
    // again with a fleet stream open, whose updates are counted.
    let mut console = console_figures(&http, &base, n).await?;
    console["browser"] = browser_first_view(&base, n).await;
    let seen = Arc::new(StreamCounts::default());
    let stream = tokio::spawn(fleet_stream(http.clone(), base.clone(), seen.clone()));
    let t = Instant::now();
    while seen.snapshot_ms.load(Ordering::Relaxed) == 0 && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let streamed_from = Instant::now();
    let busy_streamed = measure_jobs(&mut sub, &d, &noop, jobs, 64, Submitting::Watch).await?;
    let streamed_s = streamed_from.elapsed().as_secs_f64();
    stream.abort();
    sub.close().await;

    let _ = stop_tx.send(true);
    while fleet.join_next().await.is_some() {}
    dispatcher.stop().await;
    server.stop().await;
    let per = |after: u64, before: u64| after.saturating_sub(before) as f64 / n as f64;
    Ok(serde_json::json!({
        "agents": n,
        "login_s": login_s,
        "register_s": register_s,
        "server_rss_before": server_base, "server_rss_after": server_rss,
        "dispatcher_rss_before": disp_base, "dispatcher_rss_after": disp_rss,
        "server_rss_per_agent": per(server_rss, server_base),
        "dispatcher_rss_per_agent": per(disp_rss, disp_base),
        "idle": figures(&idle),
        "busy": figures(&busy),
        "busy_over_idle": busy.per_sec / idle.per_sec,
        "cpu_ms_per_job": { "idle": idle_cpu, "busy": busy_cpu },
        "console": console,
        "busy_with_fleet_stream": figures(&busy_streamed),
        "fleet_stream": {
            "snapshot_ms": seen.snapshot_ms.load(Ordering::Relaxed) as f64 / 1e3,
            "snapshot_bytes": seen.snapshot_bytes.load(Ordering::Relaxed),
            "updates_per_s": seen.updates.load(Ordering::Relaxed) as f64 / streamed_s,
            "update_bytes_per_s": seen.update_bytes.load(Ordering::Relaxed) as f64 / streamed_s,
        },
        "streamed_over_busy": busy_streamed.per_sec / busy.per_sec,
        "answered": counters.answered.load(Ordering::Relaxed),
    }))
}

/// The CPU time the server and the dispatcher have used: read before and after a run of
/// jobs, it gives each one's cost per job, which a machine busy with other work changes far
/// less than it changes jobs per second.
struct Cpu {
    server: Option<Duration>,
    dispatcher: Option<Duration>,
}

impl Cpu {
    fn of(server: &Child, dispatcher: &Child) -> Cpu {
        Cpu {
            server: server.cpu(),
            dispatcher: dispatcher.cpu(),
        }
    }

    /// Milliseconds of CPU per job of each process since `before` (null where /proc could
    /// not be read).
    fn per_job_since(&self, before: &Cpu, jobs: usize) -> serde_json::Value {
        let per = |a: Option<Duration>, b: Option<Duration>| {
            Some(a?.saturating_sub(b?).as_secs_f64() * 1e3 / jobs as f64)
        };
        serde_json::json!({
            "server": per(self.server, before.server),
            "dispatcher": per(self.dispatcher, before.dispatcher),
        })
    }
}

/// Submits `n` `bench.hold` jobs (not watched) and waits until the dispatcher accepted all.
async fn submit_held(sub: &mut spine_xmpp::Connection, d: &Jid, n: usize) -> Result<(), String> {
    let cap: spine_protocol::CapabilityName = "bench.hold".parse()?;
    let (mut sent, mut accepted) = (0usize, 0usize);
    while accepted < n {
        while sent < n && sent - accepted < 256 {
            let s = spine_protocol::Submit::new(cap.clone());
            sub.send(Iq::from_set(format!("h{sent}"), s).with_to(d.clone()))
                .await;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Result { id, .. })))) if id.starts_with('h') => {
                accepted += 1
            }
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Error { id, error, .. })))) => {
                return Err(format!("held submit {id}: {:?}", error.defined_condition))
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("the submitter's connection closed".into()),
            Err(_) => {
                return Err(format!(
                    "{accepted} of {n} held jobs accepted, then silence"
                ))
            }
        }
    }
    Ok(())
}

/// What a fleet stream reader saw.
#[derive(Default)]
struct StreamCounts {
    /// Microseconds from the request to the whole first snapshot (0 until it came).
    snapshot_ms: std::sync::atomic::AtomicU64,
    snapshot_bytes: std::sync::atomic::AtomicU64,
    updates: std::sync::atomic::AtomicU64,
    update_bytes: std::sync::atomic::AtomicU64,
}

/// Reads `GET /v1/fleet/events` until aborted, counting its events and bytes.
async fn fleet_stream(http: reqwest::Client, base: String, seen: Arc<StreamCounts>) {
    use futures::StreamExt as _;
    let t = Instant::now();
    let Ok(r) = http.get(format!("{base}/v1/fleet/events")).send().await else {
        return;
    };
    let mut body = r.bytes_stream();
    let mut buf = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let bytes = event.len() as u64;
            if event.starts_with(b"event: snapshot") || event.starts_with(b"event:snapshot") {
                seen.snapshot_bytes.store(bytes, Ordering::Relaxed);
                seen.snapshot_ms
                    .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            } else if event.starts_with(b"event: update") || event.starts_with(b"event:update") {
                seen.updates.fetch_add(1, Ordering::Relaxed);
                seen.update_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }
}

/// `GET /v1/fleet` on a fleet of `n` agents: its time (median of 5) and size, checked to
/// hold every agent.
async fn console_figures(
    http: &reqwest::Client,
    base: &str,
    n: usize,
) -> Result<serde_json::Value, String> {
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let body = http
            .get(format!("{base}/v1/fleet"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let agents = v["agents"].as_array().map_or(0, Vec::len);
        if agents != n {
            return Err(format!("GET /v1/fleet listed {agents} agents of {n}"));
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(serde_json::json!({ "fleet_ms": times[times.len() / 2], "fleet_bytes": bytes }))
}

/// The console's fleet page in headless Chromium on this fleet: the time from navigation to
/// the first view of all `n` agents (the page's `spine-fleet-first-render` mark), three
/// loads, median. A string saying why when Chromium or chromedriver is missing.
async fn browser_first_view(base: &str, n: usize) -> serde_json::Value {
    use spine_integration::browser::{Browser, PAGE_PATIENCE};
    let Some(browser) = Browser::start().await else {
        return serde_json::json!(format!(
            "skipped: {}",
            spine_integration::browser::missing().unwrap_or_else(|| "no browser".into())
        ));
    };
    let mut marks = Vec::new();
    for _ in 0..3 {
        browser.goto("about:blank").await;
        browser.goto(&format!("{base}/ui#/fleet")).await;
        browser
            .wait_until(
                "the fleet's count",
                &format!(
                    "const c = document.querySelector('#fleet-count'); return c && c.dataset.count === '{n}';"
                ),
                PAGE_PATIENCE,
            )
            .await;
        let mark = browser
            .wait_until(
                "the first-render mark",
                "const m = performance.getEntriesByName('spine-fleet-first-render')[0]; return m ? m.startTime : null;",
                PAGE_PATIENCE,
            )
            .await;
        marks.push(mark.as_f64().unwrap_or(f64::NAN));
    }
    browser.close().await;
    let mut sorted = marks.clone();
    sorted.sort_by(f64::total_cmp);
    serde_json::json!({ "first_view_ms": sorted[1], "marks_ms": marks, "runs": 3 })
}
