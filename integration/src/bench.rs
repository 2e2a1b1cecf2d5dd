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
    Ok(figures(n, window, t0.elapsed(), lat))
}

fn figures(n: usize, window: usize, elapsed: Duration, mut lat: Vec<Duration>) -> RoundTrips {
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    RoundTrips {
        n,
        window,
        per_sec: n as f64 / elapsed.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

/// How [`measure_jobs`] hears of a job's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitting {
    /// `<submit watch='true'>`: `<accepted>`, then the final status in a message (five
    /// stanzas through the server per job).
    Watch,
    /// `<submit wait-ms='60000'>` (protocol 1.3), not watched, like a web app's `POST
    /// /v1/jobs?wait=`: the final status answers the submit (four stanzas per job). A wait
    /// that ends first is an error of the measurement.
    Wait,
}

/// Submits `n` jobs of `capability` over XMPP to the dispatcher `to` in watch mode (waiting
/// for the end in the answer with [`Submitting::Wait`]), keeping `window` unfinished, and
/// measures each from the `<submit>` to its final `<job-status>` (all must succeed).
pub async fn measure_jobs(
    conn: &mut Connection,
    to: &Jid,
    capability: &spine_protocol::CapabilityName,
    n: usize,
    window: usize,
    how: Submitting,
) -> Result<RoundTrips, String> {
    let (lat, elapsed) = sample_jobs(conn, to, capability, n, window, how).await?;
    Ok(figures(n, window, elapsed, lat))
}

/// Compares two ways of submitting in one run: `n` jobs each, in the order A B B A (half of
/// each at a time), so that a drift over the run (the dispatcher's tables growing, the
/// machine's load) weighs on both alike. The figures of `a` and of `b`.
pub async fn measure_jobs_abba(
    conn: &mut Connection,
    to: &Jid,
    capability: &spine_protocol::CapabilityName,
    n: usize,
    window: usize,
    (a, b): (Submitting, Submitting),
) -> Result<(RoundTrips, RoundTrips), String> {
    let first = n.div_ceil(2);
    let mut got = [
        (Vec::with_capacity(n), Duration::ZERO),
        (Vec::with_capacity(n), Duration::ZERO),
    ];
    for (i, how, count) in [
        (0, a, first),
        (1, b, first),
        (1, b, n - first),
        (0, a, n - first),
    ] {
        if count == 0 {
            continue;
        }
        let (lat, elapsed) = sample_jobs(conn, to, capability, count, window, how).await?;
        got[i].0.extend(lat);
        got[i].1 += elapsed;
    }
    let [(la, ta), (lb, tb)] = got;
    Ok((figures(n, window, ta, la), figures(n, window, tb, lb)))
}

/// [`measure_jobs`]'s latencies and the time they took.
async fn sample_jobs(
    conn: &mut Connection,
    to: &Jid,
    capability: &spine_protocol::CapabilityName,
    n: usize,
    window: usize,
    how: Submitting,
) -> Result<(Vec<Duration>, Duration), String> {
    use spine_protocol::{Accepted, JobState, JobStatus, Submit};
    let mut submitted: HashMap<String, Instant> = HashMap::with_capacity(window);
    let mut running: HashMap<String, Instant> = HashMap::with_capacity(window);
    // Final statuses can overtake the <accepted> reply they belong to.
    let mut early: HashMap<String, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(n);
    let (mut sent, mut done) = (0usize, 0usize);
    let t0 = Instant::now();
    while done < n {
        while sent < n && submitted.len() + running.len() < window {
            let id = format!("s{sent}");
            let mut s = Submit::new(capability.clone());
            match how {
                Submitting::Watch => s.watch = true,
                Submitting::Wait => s.wait_ms = Some(60_000),
            }
            submitted.insert(id.clone(), Instant::now());
            conn.send(Iq::from_set(id, s).with_to(to.clone())).await;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(10), conn.next()).await {
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Result {
                id,
                payload: Some(p),
                ..
            })))) => {
                let Some(t) = submitted.remove(&id) else {
                    continue;
                };
                // A submit that waited is answered by the job's end.
                if p.name() == "job-status" {
                    let st = JobStatus::try_from(p).map_err(|e| e.to_string())?;
                    if st.state != JobState::Succeeded {
                        return Err(format!("job {} ended {}", st.job, st.state));
                    }
                    lat.push(t.elapsed());
                    done += 1;
                    continue;
                }
                let Ok(a) = Accepted::try_from(p) else {
                    continue;
                };
                if how == Submitting::Wait {
                    return Err(format!("job {} outlasted its wait of 60 s", a.job));
                }
                let job = a.job.to_string();
                match early.remove(&job) {
                    Some(end) => {
                        lat.push(end - t);
                        done += 1;
                    }
                    None => {
                        running.insert(job, t);
                    }
                }
            }
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Error { id, error, .. })))) => {
                return Err(format!("submit {id} failed: {:?}", error.defined_condition));
            }
            Ok(Some(Event::Stanza(Stanza::Message(m)))) => {
                let Some(st) = m
                    .payloads
                    .iter()
                    .find_map(|p| JobStatus::try_from(p.clone()).ok())
                else {
                    continue;
                };
                if !st.state.is_final() {
                    continue;
                }
                if st.state != JobState::Succeeded {
                    return Err(format!("job {} ended {}", st.job, st.state));
                }
                match running.remove(st.job.as_str()) {
                    Some(t) => {
                        lat.push(t.elapsed());
                        done += 1;
                    }
                    None => {
                        early.insert(st.job.to_string(), Instant::now());
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("connection closed".into()),
            Err(_) => {
                return Err(format!(
                    "stalled with {} unfinished after {done} of {n}",
                    submitted.len() + running.len()
                ))
            }
        }
    }
    Ok((lat, t0.elapsed()))
}
