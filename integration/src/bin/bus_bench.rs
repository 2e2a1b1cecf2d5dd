//! The bus against the transport's limit, on the same embedded server in the same run:
//! `cargo run --release -p spine-integration --bin bus-bench [-- N [JSON-PATH] [--servers
//! embedded,prosody,ejabberd|all] [--profile [--window W]]]` (the embedded server alone by
//! default).
//!
//! `--profile` measures only N waited jobs with 64 in flight (after a warm-up), the mode of
//! the ratio the issue of the bus's speed targets, and prints the process id when they begin,
//! for `perf record -p` (BENCHMARKS.md, "twenty-third session"); nothing is written.
//! `--window 1` profiles them one at a time instead (the sequential p50 target).
//!
//! (a) raw IQ request/response between two plain tokio-xmpp clients (the `xmpp-bench`
//! measurement); (b) no-op Spine jobs: a submitter sends `<submit watch='true'>` over XMPP to a
//! real dispatcher, which stores the job, sends it to a real agent with a no-op capability and
//! pushes the final status back (five stanzas through the server); (c) the same job submitted
//! with `wait-ms` (protocol 1.3) and not watched, like a web app's `POST /v1/jobs?wait=`: the
//! final status answers the submit (four stanzas). Each
//! sequentially and with 64 in flight; (b) and (c) in the order b c c b, half of each at a
//! time, so that a drift over the run weighs on both. And (a) and (c) one at a time once
//! more with the measuring loop on a runtime worker instead of the main thread
//! ([`on_worker`]): the raw figure then is the transport's own. Prints throughput, p50/p99
//! and the ratios bus ÷ raw per server; writes JSON (an object keyed by server) to
//! target/bench/bus-vs-transport.json.

use jid::Jid;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::bench::{
    measure, measure_jobs, measure_jobs_abba, responder, RoundTrips, Submitting,
};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher};
use spine_integration::servers::{AnyServer, Kind};
use spine_xmpp::{ConnectOptions, Security};

/// The `spine` binary's allocator (cli/src/main.rs): the server, the dispatcher and the agent
/// run here as they run in production. (With glibc's malloc, allocation took about 15 % of
/// this benchmark's CPU with 64 jobs in flight, BENCHMARKS.md.)
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn row(name: &str, r: &RoundTrips) -> String {
    format!(
        "{name:<26} {:>7} {:>6} {:>10.0} {:>10.3} {:>10.3}",
        r.n,
        r.window,
        r.per_sec,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3
    )
}

fn json(name: &str, r: &RoundTrips) -> serde_json::Value {
    serde_json::json!({
        "mode": name, "n": r.n, "window": r.window, "per_sec": r.per_sec,
        "p50_ms": r.p50.as_secs_f64() * 1e3, "p99_ms": r.p99.as_secs_f64() * 1e3,
    })
}

/// The measurements on one server.
struct Measured {
    raw_seq: RoundTrips,
    /// [`Measured::raw_seq`] with the loop on a runtime worker (see [`on_worker`]).
    raw_seq_worker: RoundTrips,
    raw_par: RoundTrips,
    bus_seq: RoundTrips,
    bus_par: RoundTrips,
    wait_seq: RoundTrips,
    wait_par: RoundTrips,
    /// [`Measured::wait_seq`] with the loop on a runtime worker.
    wait_seq_worker: RoundTrips,
}

/// Runs a measurement of `conn` on a task of the runtime (a worker thread) and gives the
/// connection back.
///
/// The other measurements run their loop in `main`'s `block_on`, on the main thread, which is
/// not one of the runtime's workers: each answer read by the connection's task (on a worker)
/// wakes the main thread, and each request it sends wakes a worker again. One at a time, those
/// two hand-offs were about 0.07 ms of a raw round trip's 0.125 ms p50 on the test machine
/// (BENCHMARKS.md). On a worker, the raw figure is the transport's own; with 64 in flight the
/// two ways measure the same.
async fn on_worker<F>(
    mut conn: spine_xmpp::Connection,
    f: F,
) -> Result<(spine_xmpp::Connection, RoundTrips), String>
where
    F: for<'c> FnOnce(
            &'c mut spine_xmpp::Connection,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<RoundTrips, String>> + Send + 'c>,
        > + Send
        + 'static,
{
    tokio::spawn(async move {
        let r = f(&mut conn).await;
        (conn, r)
    })
    .await
    .map_err(|e| format!("the measurement's task failed: {e}"))
    .and_then(|(conn, r)| r.map(|r| (conn, r)))
}

/// How a client of `server` connects: plain TCP on loopback for every client, as the
/// dispatcher and agent use by default (TLS off loopback only), so the raw clients and the bus
/// pay the same transport.
fn opts(server: &AnyServer, user: &str, pw: &str) -> ConnectOptions {
    ConnectOptions::new(
        format!("{user}@{}", server.domain).parse().expect("jid"),
        pw,
        server.addr,
        Security::Plain { insecure: false },
    )
}

/// A real dispatcher and agent (one no-op capability, 64 slots) on `server`; [`Bus::start`]
/// also connects a submitter.
struct Bus {
    dispatcher: spine_integration::farm::Running,
    agent: spine_integration::farm::Running,
    to: Jid,
    cap: spine_protocol::CapabilityName,
    _dir: tempfile::TempDir,
}

impl Bus {
    async fn start(server: &AnyServer) -> Result<(Bus, spine_xmpp::Connection), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (dispatcher, base) = start_http_dispatcher(
            server,
            dir.path(),
            "submitters = [\"submitter@localhost\"]\n",
        )
        .await;
        let agent = Agent::builder(agent_config(server, 1, "slots = 64\n"))
            .capability("bench.noop", None, |_ctx: JobContext| async move {
                Ok::<_, JobError>(Output::bytes(Vec::new()))
            })
            .build()
            .map_err(|e| e.to_string())?;
        let agent = run_agent(agent);
        spine_integration::farm::wait_for_agents(&base, "bench.noop", 1).await;
        let sub = spine_xmpp::connect(opts(server, "submitter", "pw-s"))
            .await
            .map_err(|e| e.to_string())?;
        sub.send(xmpp_parsers::presence::Presence::available())
            .await;
        let bus = Bus {
            dispatcher,
            agent,
            to: "dispatcher@localhost/d1".parse().expect("jid"),
            cap: "bench.noop".parse().expect("capability"),
            _dir: dir,
        };
        Ok((bus, sub))
    }

    async fn stop(self, sub: spine_xmpp::Connection) {
        sub.close().await;
        self.agent.stop();
        self.dispatcher.stop();
    }
}

/// `--profile`: waited jobs only, `window` in flight (64, the mode of the ratio
/// target, unless `--window` says otherwise), `n` of them after a warm-up, for a profiler to
/// attach to this process: the process id is printed on standard error when the measured
/// jobs begin.
async fn profile_waited(server: &AnyServer, n: usize, window: usize) -> Result<RoundTrips, String> {
    let (bus, mut sub) = Bus::start(server).await?;
    measure_jobs(&mut sub, &bus.to, &bus.cap, 2000, window, Submitting::Wait).await?;
    eprintln!(
        "bus-bench: measuring {n} waited jobs with {window} in flight in process {}",
        std::process::id()
    );
    let r = measure_jobs(&mut sub, &bus.to, &bus.cap, n, window, Submitting::Wait).await;
    bus.stop(sub).await;
    r
}

async fn measure_on(server: &AnyServer, n: usize) -> Result<Measured, String> {
    let opts = |user: &str, pw: &str| opts(server, user, pw);

    // (a) The transport's limit.
    let resp = spine_xmpp::connect(opts("bench-b", "pw-b"))
        .await
        .map_err(|e| e.to_string())?;
    let to: Jid = resp.jid().clone().into();
    tokio::spawn(responder(resp));
    let mut req = spine_xmpp::connect(opts("bench-a", "pw-a"))
        .await
        .map_err(|e| e.to_string())?;
    measure(&mut req, &to, 500, 1).await?; // warm-up
    let raw_seq = measure(&mut req, &to, n, 1).await?;
    let to_w = to.clone();
    let (mut req, raw_seq_worker) = on_worker(req, move |c| {
        Box::pin(async move { measure(c, &to_w, n, 1).await })
    })
    .await?;
    let raw_par = measure(&mut req, &to, n * 4, 64).await?;
    req.close().await;

    // (b) No-op jobs through a real dispatcher and agent on the same server.
    let (bus, mut sub) = Bus::start(server).await?;
    let (d, cap) = (bus.to.clone(), bus.cap.clone());
    let ways = (Submitting::Watch, Submitting::Wait);
    // A warm-up, then jobs one at a time: a quarter of N of each way.
    measure_jobs(&mut sub, &d, &cap, 200.min(n), 1, ways.0).await?;
    let seq_n = (n / 4).max(1);
    let (bus_seq, wait_seq) = measure_jobs_abba(&mut sub, &d, &cap, seq_n, 1, ways).await?;
    let (bus_par, wait_par) = measure_jobs_abba(&mut sub, &d, &cap, n, 64, ways).await?;
    let (d_w, cap_w) = (d.clone(), cap.clone());
    let (sub, wait_seq_worker) = on_worker(sub, move |c| {
        Box::pin(async move { measure_jobs(c, &d_w, &cap_w, seq_n, 1, Submitting::Wait).await })
    })
    .await?;
    bus.stop(sub).await;
    Ok(Measured {
        raw_seq,
        raw_seq_worker,
        raw_par,
        bus_seq,
        bus_par,
        wait_seq,
        wait_par,
        wait_seq_worker,
    })
}

fn usage() -> String {
    "usage: bus-bench [N] [JSON-PATH] [--servers embedded,prosody,ejabberd] [--profile [--window W]]"
        .into()
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bus-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> Result<(), String> {
    let mut n = 2000usize;
    let mut path = "target/bench/bus-vs-transport.json".to_string();
    let mut kinds = vec![Kind::Embedded];
    let mut positional = 0;
    let mut profile = false;
    let mut window = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--profile" {
            profile = true;
        } else if a == "--window" {
            let w = args.next().ok_or_else(usage)?;
            window = match w.parse::<usize>() {
                Ok(w) if w >= 1 => Some(w),
                _ => {
                    return Err(format!(
                        "--window must be a number from 1, not {w:?}; {}",
                        usage()
                    ))
                }
            };
        } else if a == "--servers" {
            let list = args.next().ok_or_else(usage)?;
            kinds = if list == "all" {
                Kind::ALL.to_vec()
            } else {
                list.split(',')
                    .map(|k| match k.trim() {
                        "embedded" => Ok(Kind::Embedded),
                        "prosody" => Ok(Kind::Prosody),
                        "ejabberd" => Ok(Kind::Ejabberd),
                        other => Err(format!("unknown server {other:?}; {}", usage())),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
        } else if positional == 0 {
            n = a
                .parse()
                .map_err(|_| format!("N must be a number, not {a:?}; {}", usage()))?;
            positional += 1;
        } else if positional == 1 {
            path = a;
            positional += 1;
        } else {
            return Err(usage());
        }
    }
    if n == 0 {
        return Err(format!("N must be at least 1; {}", usage()));
    }
    if window.is_some() && !profile {
        return Err(format!("--window goes with --profile; {}", usage()));
    }
    let window = window.unwrap_or(64);
    let accounts = [
        ("bench-a", "pw-a"),
        ("bench-b", "pw-b"),
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("submitter", "pw-s"),
    ];
    let mut results = serde_json::Map::new();
    println!(
        "{:<10} {:<26} {:>7} {:>6} {:>10} {:>10} {:>10}",
        "server", "mode", "n", "window", "per s", "p50 ms", "p99 ms"
    );
    for kind in kinds {
        let Some(server) = AnyServer::start(kind, &accounts).await else {
            continue; // not installed: the reason was printed
        };
        if profile {
            let r = profile_waited(&server, n, window)
                .await
                .map_err(|e| format!("{}: {e}\n{}", kind.name(), server.log()))?;
            let mode = match window {
                1 => "waited job, sequential".to_string(),
                w => format!("waited job, {w} in flight"),
            };
            println!("{:<10} {}", kind.name(), row(&mode, &r));
            continue;
        }
        let m = measure_on(&server, n)
            .await
            .map_err(|e| format!("{}: {e}\n{}", kind.name(), server.log()))?;
        for (name, r) in [
            ("raw IQ, sequential", &m.raw_seq),
            ("raw IQ, 64 in flight", &m.raw_par),
            ("no-op job, sequential", &m.bus_seq),
            ("no-op job, 64 in flight", &m.bus_par),
            ("waited job, sequential", &m.wait_seq),
            ("waited job, 64 in flight", &m.wait_par),
            ("raw IQ, seq., on a worker", &m.raw_seq_worker),
            ("waited job, seq., worker", &m.wait_seq_worker),
        ] {
            println!("{:<10} {}", kind.name(), row(name, r));
        }
        let ratio = |b: &RoundTrips, r: &RoundTrips| {
            (
                b.per_sec / r.per_sec,
                b.p50.as_secs_f64() / r.p50.as_secs_f64(),
            )
        };
        let (ts, ls) = ratio(&m.bus_seq, &m.raw_seq);
        let (tp, lp) = ratio(&m.bus_par, &m.raw_par);
        let (ws, wls) = ratio(&m.wait_seq, &m.raw_seq);
        let (wp, wlp) = ratio(&m.wait_par, &m.raw_par);
        let (wws, wwls) = ratio(&m.wait_seq_worker, &m.raw_seq_worker);
        println!(
            "{:<10} bus ÷ raw: sequential throughput {ts:.3}, p50 latency {ls:.2}; 64 in flight throughput {tp:.3}, p50 latency {lp:.2}",
            kind.name()
        );
        println!(
            "{:<10} waited ÷ raw: sequential throughput {ws:.3}, p50 latency {wls:.2}; 64 in flight throughput {wp:.3}, p50 latency {wlp:.2}",
            kind.name()
        );
        println!(
            "{:<10} waited ÷ raw, both on a worker: sequential throughput {wws:.3}, p50 latency {wwls:.2}",
            kind.name()
        );
        results.insert(
            kind.name().into(),
            serde_json::json!({
                "raw_sequential": json("raw/sequential", &m.raw_seq),
                "raw_window64": json("raw/window64", &m.raw_par),
                "bus_sequential": json("bus/sequential", &m.bus_seq),
                "bus_window64": json("bus/window64", &m.bus_par),
                "wait_sequential": json("wait/sequential", &m.wait_seq),
                "wait_window64": json("wait/window64", &m.wait_par),
                "raw_sequential_worker": json("raw/sequential/worker", &m.raw_seq_worker),
                "wait_sequential_worker": json("wait/sequential/worker", &m.wait_seq_worker),
                "throughput_ratio": {
                    "sequential": ts, "window64": tp,
                    "wait_sequential": ws, "wait_window64": wp,
                    "wait_sequential_worker": wws,
                },
                "p50_latency_ratio": {
                    "sequential": ls, "window64": lp,
                    "wait_sequential": wls, "wait_window64": wlp,
                    "wait_sequential_worker": wwls,
                },
            }),
        );
    }
    if profile {
        return Ok(());
    }
    let out = serde_json::Value::Object(results);
    if let Some(dir) = std::path::Path::new(&path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    ) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => eprintln!("cannot write {path}: {e}"),
    }
    Ok(())
}
