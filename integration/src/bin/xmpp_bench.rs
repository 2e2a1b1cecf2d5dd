//! IQ round trips per second through the embedded server and through Prosody, measured in the
//! same run: `cargo run --release -p spine-integration --bin xmpp-bench [-- N]`.
//!
//! Two plain-TCP loopback clients (TCP_NODELAY), one answering pings, one sending them:
//! sequentially and with 64 in flight. Prints a table and writes JSON to
//! target/bench/xmpp-roundtrips.json.

use std::net::SocketAddr;

use jid::Jid;
use spine_integration::bench::{measure, responder, RoundTrips};
use spine_integration::prosody::{self, Prosody};
use spine_integration::TestServer;
use spine_xmpp::{ConnectOptions, Security};

async fn run_on(addr: SocketAddr, n: usize) -> Result<(RoundTrips, RoundTrips), String> {
    let opts = |user: &str, pw: &str| {
        ConnectOptions::new(
            format!("{user}@localhost").parse().expect("jid"),
            pw,
            addr,
            Security::Plain { insecure: false },
        )
    };
    let resp = spine_xmpp::connect(opts("bench-b", "pw-b"))
        .await
        .map_err(|e| e.to_string())?;
    let to: Jid = resp.jid().clone().into();
    tokio::spawn(responder(resp));
    let mut req = spine_xmpp::connect(opts("bench-a", "pw-a"))
        .await
        .map_err(|e| e.to_string())?;
    measure(&mut req, &to, 500, 1).await?; // warm-up
    let seq = measure(&mut req, &to, n, 1).await?;
    let par = measure(&mut req, &to, n * 4, 64).await?;
    req.close().await;
    Ok((seq, par))
}

fn row(name: &str, r: &RoundTrips) -> String {
    format!(
        "{name:<22} {:>7} {:>6} {:>10.0} {:>10.3} {:>10.3}",
        r.n,
        r.window,
        r.per_sec,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3
    )
}

fn json(name: &str, r: &RoundTrips) -> String {
    format!(
        "{{\"server\":\"{name}\",\"n\":{},\"window\":{},\"per_sec\":{:.1},\"p50_ms\":{:.4},\"p99_ms\":{:.4}}}",
        r.n, r.window, r.per_sec, r.p50.as_secs_f64() * 1e3, r.p99.as_secs_f64() * 1e3
    )
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let accounts = [("bench-a", "pw-a"), ("bench-b", "pw-b")];
    let mut rows = Vec::new();

    let embedded = TestServer::start(&accounts).await;
    match run_on(embedded.addr, n).await {
        Ok((s, p)) => rows.push(("embedded", s, p)),
        Err(e) => eprintln!("embedded server: {e}"),
    }
    embedded.stop().await;

    if prosody::available() {
        match Prosody::start(&accounts) {
            Ok(p) => {
                match run_on(p.addr, n).await {
                    Ok((s, q)) => rows.push(("prosody", s, q)),
                    Err(e) => eprintln!("prosody: {e}\n{}", p.log()),
                }
                drop(p);
            }
            Err(e) => eprintln!("prosody not measured: {e}"),
        }
    } else {
        eprintln!("prosody not installed: only the embedded server is measured");
    }

    println!(
        "{:<22} {:>7} {:>6} {:>10} {:>10} {:>10}",
        "server / mode", "IQs", "window", "IQ/s", "p50 ms", "p99 ms"
    );
    let mut out = Vec::new();
    for (name, s, p) in &rows {
        println!("{}", row(&format!("{name} sequential"), s));
        println!("{}", row(&format!("{name} 64 in flight"), p));
        out.push(json(&format!("{name}/sequential"), s));
        out.push(json(&format!("{name}/window64"), p));
    }
    if let (Some(e), Some(pr)) = (
        rows.iter().find(|r| r.0 == "embedded"),
        rows.iter().find(|r| r.0 == "prosody"),
    ) {
        println!(
            "embedded / prosody: sequential {:.2}x, 64 in flight {:.2}x",
            e.1.per_sec / pr.1.per_sec,
            e.2.per_sec / pr.2.per_sec
        );
    }
    let _ = std::fs::create_dir_all("target/bench");
    let path = "target/bench/xmpp-roundtrips.json";
    match std::fs::write(path, format!("[{}]\n", out.join(",\n"))) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => eprintln!("cannot write {path}: {e}"),
    }
}
