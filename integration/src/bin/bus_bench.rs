//! The bus against the transport's limit, on the same embedded server in the same run:
//! `cargo run --release -p spine-integration --bin bus-bench [-- N [JSON-PATH]]`.
//!
//! (a) raw IQ request/response between two plain tokio-xmpp clients (the `xmpp-bench`
//! measurement); (b) no-op Spine jobs: a submitter sends `<submit watch='true'>` over XMPP to a
//! real dispatcher, which stores the job, sends it to a real agent with a no-op capability and
//! pushes the final status back. Both sequentially and with 64 in flight. Prints throughput,
//! p50/p99 and the ratios bus ÷ raw; writes JSON to target/bench/bus-vs-transport.json.

use jid::Jid;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::bench::{measure, measure_jobs, responder, RoundTrips};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher};
use spine_integration::TestServer;
use spine_xmpp::{ConnectOptions, Security};

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

#[tokio::main]
async fn main() -> Result<(), String> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let server = TestServer::start(&[
        ("bench-a", "pw-a"),
        ("bench-b", "pw-b"),
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("submitter", "pw-s"),
    ])
    .await;
    let opts = |user: &str, pw: &str| {
        ConnectOptions::new(
            format!("{user}@localhost").parse().expect("jid"),
            pw,
            server.addr,
            Security::Plain { insecure: false },
        )
    };

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
    let raw_par = measure(&mut req, &to, n * 4, 64).await?;
    req.close().await;

    // (b) No-op jobs through a real dispatcher and agent on the same server.
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (dispatcher, base) = start_http_dispatcher(
        &server,
        dir.path(),
        "submitters = [\"submitter@localhost\"]\n",
    )
    .await;
    let agent = Agent::builder(agent_config(&server, 1, "slots = 64\n"))
        .capability("bench.noop", None, |_ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(Vec::new()))
        })
        .build()
        .map_err(|e| e.to_string())?;
    let agent = run_agent(agent);
    spine_integration::farm::wait_for_agents(&base, "bench.noop", 1).await;
    let mut sub = spine_xmpp::connect(opts("submitter", "pw-s"))
        .await
        .map_err(|e| e.to_string())?;
    sub.send(xmpp_parsers::presence::Presence::available())
        .await;
    let d: Jid = "dispatcher@localhost/d1".parse().expect("jid");
    let cap = "bench.noop".parse().expect("capability");
    measure_jobs(&mut sub, &d, &cap, 200, 1).await?;
    let bus_seq = measure_jobs(&mut sub, &d, &cap, n / 4, 1).await?;
    let bus_par = measure_jobs(&mut sub, &d, &cap, n, 64).await?;
    sub.close().await;
    agent.stop();
    dispatcher.stop();

    println!(
        "{:<26} {:>7} {:>6} {:>10} {:>10} {:>10}",
        "mode", "n", "window", "per s", "p50 ms", "p99 ms"
    );
    for (name, r) in [
        ("raw IQ, sequential", &raw_seq),
        ("raw IQ, 64 in flight", &raw_par),
        ("no-op job, sequential", &bus_seq),
        ("no-op job, 64 in flight", &bus_par),
    ] {
        println!("{}", row(name, r));
    }
    let ratio = |b: &RoundTrips, r: &RoundTrips| {
        (
            b.per_sec / r.per_sec,
            b.p50.as_secs_f64() / r.p50.as_secs_f64(),
        )
    };
    let (ts, ls) = ratio(&bus_seq, &raw_seq);
    let (tp, lp) = ratio(&bus_par, &raw_par);
    println!(
        "bus ÷ raw: sequential throughput {ts:.3}, p50 latency {ls:.2}; 64 in flight throughput {tp:.3}, p50 latency {lp:.2}"
    );
    let out = serde_json::json!({
        "raw_sequential": json("raw/sequential", &raw_seq),
        "raw_window64": json("raw/window64", &raw_par),
        "bus_sequential": json("bus/sequential", &bus_seq),
        "bus_window64": json("bus/window64", &bus_par),
        "throughput_ratio": { "sequential": ts, "window64": tp },
        "p50_latency_ratio": { "sequential": ls, "window64": lp },
    });
    let path = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "target/bench/bus-vs-transport.json".into());
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
