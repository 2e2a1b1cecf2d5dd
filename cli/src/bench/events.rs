//! `spine bench events` (issue 22): webhook events at a steady rate into a rule, with a
//! `kill -9` of the dispatcher in the middle. The farm is separate processes (`spine server`,
//! `spine dispatcher`, `spine agent --builtin`: [`super::procs`]); the dispatcher has one rule
//! that makes a `text.upper` job of each event. The client sends `--rate` structured
//! CloudEvents a second for `--seconds` (open loop: each is sent at its time, whatever the
//! earlier ones are doing), each a `POST /v1/events` that answers 202 once the event's job is
//! stored — placed at once when an agent has a free slot. A request that fails (the dispatcher
//! killed, restarting) is sent again, with the same id, every 50 ms until it is answered.
//!
//! Latency is from an event's scheduled time to its 202: the time until its job is stored and
//! (when its state says `dispatched`) placed, retries included. After the run every event must
//! have made exactly one job: the jobs of the rule are listed, and their event ids must be the
//! events sent, each once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::procs::{self, Plan};

/// The rule's capability.
const CAPABILITY: &str = "text.upper";

/// Requests in flight at most (a bound on the client, far above what the rate needs).
const MAX_IN_FLIGHT: usize = 2048;

/// When the dispatcher was killed, and when it answered again.
type Outage = (Instant, Option<Instant>);

/// One event's fate.
struct Sent {
    latency_ms: f64,
    /// Requests it took (1: answered the first time).
    tries: u32,
    /// Its job was placed before the answer.
    placed: bool,
    /// Sent while the dispatcher was down or restarting.
    in_outage: bool,
    /// Sent within [`RECOVERY`] after the dispatcher answered again (the retried events and
    /// the restart's own work compete with these).
    recovering: bool,
}

/// How long after a restart an event counts as sent while the dispatcher recovers.
const RECOVERY: Duration = Duration::from_secs(5);

/// Runs the scenario; `kill_at`: seconds into the run (none: no kill).
pub(super) async fn run(
    rate: u64,
    seconds: u64,
    kill_at: Option<u64>,
    dir: &std::path::Path,
) -> Result<Value> {
    let events = rate * seconds;
    println!(
        "events: {events} CloudEvents ({rate}/s for {seconds} s, open loop) posted to POST /v1/events of a dispatcher with one rule making a {CAPABILITY} job of each; farm of separate processes (server, dispatcher, 2 agents × 64 slots){}",
        kill_at.map(|k| format!("; kill -9 of the dispatcher at {k} s, started again at once")).unwrap_or_default()
    );
    let work = tempfile::Builder::new()
        .prefix("spine-bench-events-")
        .tempdir_in(dir)
        .context("creating the farm's directory")?;
    let mut farm = procs::start(
        work.path(),
        Plan {
            agents: 2,
            slots: 64,
            capability: CAPABILITY,
            dispatchers: 1,
        },
        |d| {
            d.rules = vec![toml::from_str(
                r#"
                name = "bench"
                on = { type = "bench.event" }
                do = { capability = "text.upper", input = "{{data.text}}" }
                "#,
            )
            .expect("the bench rule")];
        },
    )
    .await?;
    let base = format!("http://{}", farm.https[0]);
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .tcp_nodelay(true)
        .build()
        .context("the HTTP client")?;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let outage: Arc<std::sync::Mutex<Option<Outage>>> = Arc::default();
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::with_capacity(events as usize);
    let dispatcher_toml = work.path().join("config/dispatcher.toml");
    let mut killed = false;
    for n in 0..events {
        let at = start + Duration::from_nanos(n * 1_000_000_000 / rate);
        tokio::time::sleep_until(at.into()).await;
        if let Some(k) = kill_at {
            if !killed && at >= start + Duration::from_secs(k) {
                killed = true;
                let t = Instant::now();
                farm.children.kill9("dispatcher").await?;
                farm.children
                    .spawn("dispatcher", &["dispatcher"], &dispatcher_toml)?;
                *outage.lock().unwrap_or_else(|e| e.into_inner()) = Some((t, None));
                let (http, base, outage) = (http.clone(), base.clone(), outage.clone());
                tokio::spawn(async move {
                    loop {
                        let up = http
                            .get(format!("{base}/healthz"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
                        if up {
                            if let Some(o) =
                                outage.lock().unwrap_or_else(|e| e.into_inner()).as_mut()
                            {
                                o.1 = Some(Instant::now());
                            }
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
            }
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .context("the client's bound")?;
        let (http, base) = (http.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let body = json!({
                "specversion": "1.0", "id": format!("e-{n}"), "source": "/bench",
                "type": "bench.event", "data": { "text": format!("event {n}") },
            })
            .to_string();
            let mut tries = 0u32;
            loop {
                tries += 1;
                let r = http
                    .post(format!("{base}/v1/events"))
                    .header("content-type", "application/cloudevents+json")
                    .body(body.clone())
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status().as_u16() == 202 {
                        let answer: Value =
                            serde_json::from_str(&r.text().await.unwrap_or_default())
                                .unwrap_or(Value::Null);
                        let placed = answer["jobs"][0]["state"]
                            .as_str()
                            .is_some_and(|s| s != "queued" && s != "accepted");
                        return (at, Instant::now(), tries, placed);
                    }
                }
                if tries > 2_000 {
                    return (at, Instant::now(), u32::MAX, false);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    let mut sent = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (at, done, tries, placed) = t.await.context("an event's task")?;
        anyhow::ensure!(
            tries != u32::MAX,
            "an event was never answered 202 in 100 s"
        );
        sent.push((at, done, tries, placed));
    }
    let wall = start.elapsed().as_secs_f64();
    let outage = *outage.lock().unwrap_or_else(|e| e.into_inner());
    let sent: Vec<Sent> = sent
        .into_iter()
        .map(|(at, done, tries, placed)| Sent {
            latency_ms: done.duration_since(at).as_secs_f64() * 1000.0,
            tries,
            placed,
            in_outage: outage.is_some_and(|(from, to)| {
                at >= from - Duration::from_millis(20) && to.is_none_or(|to| at <= to)
            }),
            recovering: outage
                .and_then(|(_, to)| to)
                .is_some_and(|to| at > to && at <= to + RECOVERY),
        })
        .collect();
    // Every event made exactly one job.
    let (jobs, distinct) = jobs_of_the_rule(&http, &base, events).await?;
    farm.children.stop().await;
    let pct = |v: &mut Vec<f64>, p: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let mut all: Vec<f64> = sent.iter().map(|s| s.latency_ms).collect();
    let mut steady: Vec<f64> = sent
        .iter()
        .filter(|s| !s.in_outage)
        .map(|s| s.latency_ms)
        .collect();
    let mut settled: Vec<f64> = sent
        .iter()
        .filter(|s| !s.in_outage && !s.recovering)
        .map(|s| s.latency_ms)
        .collect();
    let recovering: Vec<f64> = sent
        .iter()
        .filter(|s| s.recovering)
        .map(|s| s.latency_ms)
        .collect();
    let retried = sent.iter().filter(|s| s.tries > 1).count();
    let placed = sent.iter().filter(|s| s.placed).count();
    let outage_ms = outage.and_then(|(a, b)| b.map(|b| b.duration_since(a).as_secs_f64() * 1000.0));
    let r = json!({
        "events": events, "rate": rate, "seconds": seconds, "wall_s": wall,
        "kill_at_s": kill_at, "outage_ms": outage_ms,
        "p50_ms": pct(&mut all.clone(), 0.5), "p99_ms": pct(&mut all.clone(), 0.99),
        "max_ms": pct(&mut all, 1.0),
        "steady_events": steady.len(),
        "steady_p50_ms": pct(&mut steady.clone(), 0.5), "steady_p99_ms": pct(&mut steady.clone(), 0.99),
        "steady_max_ms": pct(&mut steady, 1.0),
        "settled_events": settled.len(),
        "settled_p50_ms": pct(&mut settled.clone(), 0.5), "settled_p99_ms": pct(&mut settled.clone(), 0.99),
        "settled_max_ms": pct(&mut settled, 1.0),
        "recovering_events": recovering.len(),
        "recovering_p50_ms": pct(&mut recovering.clone(), 0.5), "recovering_p99_ms": pct(&mut recovering.clone(), 0.99),
        "retried": retried, "placed_at_answer": placed,
        "jobs": jobs, "distinct_events": distinct,
    });
    println!(
        "sent {events} events in {wall:.1} s; all: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; outside the outage ({} events): p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        r["p50_ms"].as_f64().unwrap_or(0.0), r["p99_ms"].as_f64().unwrap_or(0.0), r["max_ms"].as_f64().unwrap_or(0.0),
        r["steady_events"], r["steady_p50_ms"].as_f64().unwrap_or(0.0), r["steady_p99_ms"].as_f64().unwrap_or(0.0), r["steady_max_ms"].as_f64().unwrap_or(0.0),
    );
    if let Some(ms) = outage_ms {
        println!("outage: the dispatcher answered again {ms:.0} ms after its kill -9; {retried} events were sent more than once");
        println!(
            "in the {} s after it answered again ({} events): p50 {:.2} ms, p99 {:.2} ms; the rest, outside outage and recovery ({} events): p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            RECOVERY.as_secs(),
            r["recovering_events"], r["recovering_p50_ms"].as_f64().unwrap_or(0.0), r["recovering_p99_ms"].as_f64().unwrap_or(0.0),
            r["settled_events"], r["settled_p50_ms"].as_f64().unwrap_or(0.0), r["settled_p99_ms"].as_f64().unwrap_or(0.0), r["settled_max_ms"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "jobs of the rule: {jobs} for {events} events, {distinct} distinct events ({placed} placed by the time of their 202)"
    );
    anyhow::ensure!(
        jobs == events && distinct == events,
        "every event must make exactly one job: {jobs} jobs, {distinct} distinct events, {events} sent"
    );
    Ok(r)
}

/// The rule's jobs, listed page by page: how many, and how many distinct events made them.
async fn jobs_of_the_rule(http: &reqwest::Client, base: &str, events: u64) -> Result<(u64, u64)> {
    let mut seen = HashSet::new();
    let mut jobs = 0u64;
    let mut before: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/jobs?submitter=rule:bench&limit=10000");
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let text = http
            .get(&url)
            .send()
            .await
            .context("listing the rule's jobs")?
            .text()
            .await
            .context("the list of jobs")?;
        let page: Value = serde_json::from_str(&text).context("the list of jobs")?;
        let list = page["jobs"].as_array().cloned().unwrap_or_default();
        for j in &list {
            jobs += 1;
            if let Some(e) = j["event"]["id"].as_str() {
                seen.insert(e.to_owned());
            }
        }
        match page["next"].as_str() {
            Some(n) if !list.is_empty() && jobs < events * 2 => before = Some(n.to_owned()),
            _ => break,
        }
    }
    Ok((jobs, seen.len() as u64))
}
