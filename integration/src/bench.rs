//! IQ round-trip measurement between two XMPP clients through a server: the transport's
//! limit, which Spine's own overhead is later compared against (BENCHMARKS.md).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jid::Jid;
use spine_xmpp::Connection;
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::ping::Ping;

/// Figures of one run.
#[derive(Debug, Clone, Copy)]
pub struct RoundTrips {
    /// IQs completed.
    pub n: usize,
    /// IQs in flight at once.
    pub window: usize,
    /// Completed per second.
    pub per_sec: f64,
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile round trip.
    pub p99: Duration,
}

/// Answers every IQ get with an empty result until the connection ends.
pub async fn responder(mut conn: Connection) {
    while let Some(ev) = conn.next().await {
        if let Event::Stanza(Stanza::Iq(Iq::Get {
            id,
            from: Some(from),
            ..
        })) = ev
        {
            conn.send(Iq::empty_result(from, id)).await;
        }
    }
}

/// Sends `n` pings to `to`, keeping `window` in flight, and measures each round trip.
pub async fn measure(
    conn: &mut Connection,
    to: &Jid,
    n: usize,
    window: usize,
) -> Result<RoundTrips, String> {
    let mut pending: HashMap<String, Instant> = HashMap::with_capacity(window);
    let mut lat = Vec::with_capacity(n);
    let (mut sent, mut done) = (0usize, 0usize);
    let t0 = Instant::now();
    while done < n {
        while sent < n && pending.len() < window {
            let id = format!("b{sent}");
            pending.insert(id.clone(), Instant::now());
            conn.send(Iq::from_get(id, Ping).with_to(to.clone())).await;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Result { id, .. })))) => {
                if let Some(t) = pending.remove(&id) {
                    lat.push(t.elapsed());
                    done += 1;
                }
            }
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Error { id, error, .. })))) => {
                return Err(format!("IQ {id} failed: {:?}", error.defined_condition));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("connection closed".into()),
            Err(_) => {
                return Err(format!(
                    "stalled with {} in flight after {done} of {n}",
                    pending.len()
                ))
            }
        }
    }
    let elapsed = t0.elapsed();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok(RoundTrips {
        n,
        window,
        per_sec: n as f64 / elapsed.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
    })
}
