//! `spine dispatcher` as a real process: `kill -9` with jobs in flight, restart on the same data
//! directory (and job store: redb, or PostgreSQL), and every accepted job still ends succeeded
//! exactly once, with no job run twice.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jid::Jid;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Accepted, Agents, Discover, JobState, JobStatus, Submit};
use tokio::process::{Child, Command};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

fn spawn_dispatcher(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["dispatcher", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine dispatcher")
}

async fn registered(w: &mut TestDispatcher, n: usize) {
    registered_for(w, "work.slow", n).await
}

async fn registered_for(w: &mut TestDispatcher, capability: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let to: Jid = "dispatcher@localhost/d1".parse().unwrap();
    let mut k = 0;
    loop {
        k += 1;
        let id = format!("d{k}");
        let d = Discover {
            capability: capability.parse().unwrap(),
            filter: None,
            sort: None,
            limit: None,
        };
        w.conn
            .send(Iq::from_get(id.clone(), d).with_to(to.clone()))
            .await;
        if let Ok(Some(p)) = w
            .try_wait_for(Duration::from_secs(1), |st| match st {
                Stanza::Iq(Iq::Result {
                    id: got, payload, ..
                }) if *got == id => Some(Ok(payload.clone())),
                Stanza::Iq(Iq::Error { id: got, .. }) if *got == id => Some(Err(())),
                _ => None,
            })
            .await
            .unwrap_or(Err(()))
        {
            if Agents::try_from(p).map(|a| a.agents.len()).unwrap_or(0) >= n {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dispatcher did not register {n} agents"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_loses_no_accepted_job_and_runs_none_twice() {
    kill_9_and_restart("", Fault::Kill9).await;
}

/// What happens to the dispatcher mid-run.
enum Fault<'a> {
    /// `kill -9`, then a new process on the same store.
    Kill9,
    /// Its PostgreSQL stops for 3 s and starts again; the same process goes on.
    PostgresOutage(&'a mut spine_integration::postgres::Postgres),
}

/// The same with the job store on PostgreSQL (a child process of the test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_on_postgres_loses_no_accepted_job_and_runs_none_twice() {
    let Some(pg) = spine_integration::postgres::Postgres::start_or_skip() else {
        return;
    };
    kill_9_and_restart(&format!("store = \"{}\"\n", pg.url()), Fault::Kill9).await;
    let stored = pg
        .psql("spine", "SELECT count(*) FROM spine_jobs")
        .expect("psql");
    assert_eq!(stored, "20", "the 20 jobs are PostgreSQL's rows");
}

/// A PostgreSQL restart while jobs run and finish: their commits wait for it (reconnecting),
/// the dispatcher does not stop, and every accepted job ends once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_run_loses_no_accepted_job() {
    let Some(mut pg) = spine_integration::postgres::Postgres::start_or_skip() else {
        return;
    };
    let url = pg.url();
    kill_9_and_restart(
        &format!("store = \"{url}\"\n"),
        Fault::PostgresOutage(&mut pg),
    )
    .await;
    let succeeded = pg
        .psql(
            "spine",
            "SELECT count(*) FROM spine_jobs WHERE convert_from(record, 'UTF8')::jsonb->>'state' = 'succeeded'",
        )
        .expect("psql");
    assert_eq!(succeeded, "20", "every job's outcome is PostgreSQL's");
}

/// 20 jobs of 700 ms on two agents of 3 slots; `fault` strikes while 6 run and 14 wait (a
/// `kill -9` of the dispatcher, then a new process on the same store; or an outage of its
/// PostgreSQL); every one finishes, none twice.
async fn kill_9_and_restart(store_config: &str, fault: Fault<'_>) {
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("webapp", "pw-w"),
        ("agent1", "pw"),
        ("agent2", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatcher.toml");
    let http = format!("127.0.0.1:{}", spine_integration::free_port().unwrap());
    std::fs::write(
        &config,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nsubmitters = [\"webapp@localhost\"]\nhttp_listen = \"{http}\"\n{store_config}",
            server.addr,
            dir.path().join("data").display()
        ),
    )
    .unwrap();

    // Two agents; every handler run is recorded by job id.
    let runs: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut stops = Vec::new();
    for n in 1..=2 {
        let cfg = spine_integration::farm::agent_config(&server, n, "slots = 3");
        let runs = runs.clone();
        let agent = Agent::builder(cfg)
            .capability("work.slow", None, move |ctx: JobContext| {
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push(ctx.id.to_string());
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    Ok::<_, JobError>(Output::bytes(ctx.id.to_string()))
                }
            })
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        stops.push(tx);
    }

    let mut child = spawn_dispatcher(&config);
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    registered(&mut w, 2).await;

    let to: Jid = "dispatcher@localhost/d1".parse().unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let mut s = Submit::new("work.slow".parse().unwrap());
        s.watch = true;
        ids.push(w.send_set(&to, s).await);
    }
    let mut accepted = HashSet::new();
    for id in &ids {
        let p = w
            .wait_reply(id)
            .await
            .expect("accepted before the crash")
            .expect("payload");
        accepted.insert(Accepted::try_from(p).unwrap().job.to_string());
    }
    // Jobs are running on both agents (6 slots) and 14 wait in the queue: strike now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outage = matches!(fault, Fault::PostgresOutage(_));
    let mut child = match fault {
        Fault::Kill9 => {
            let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
            let _ = child.wait().await;
            spawn_dispatcher(&config)
        }
        Fault::PostgresOutage(pg) => {
            // The 6 running jobs end during the outage: their outcomes wait for it. A change
            // asked for meanwhile is refused at once, to be retried (not left hanging), and
            // health says why.
            tokio::task::block_in_place(|| pg.stop());
            let api = reqwest::Client::new();
            let probe = || async {
                let submit = api
                    .post(format!("http://{http}/v1/jobs"))
                    .header("content-type", "application/json")
                    .body(r#"{"capability":"nothing.here"}"#)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .expect("an answer, not a hang");
                let health = api
                    .get(format!("http://{http}/healthz"))
                    .send()
                    .await
                    .expect("healthz");
                let metrics = api
                    .get(format!("http://{http}/metrics"))
                    .send()
                    .await
                    .expect("metrics")
                    .text()
                    .await
                    .expect("metrics text");
                let reachable = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("spine_store_reachable "))
                    .map(str::to_owned);
                (submit, health.status().as_u16(), reachable)
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (refused, health, reachable) = probe().await;
            assert_eq!(refused.status().as_u16(), 503);
            assert_eq!(health, 503);
            assert_eq!(reachable.as_deref(), Some("0"), "the gauge says so");
            assert_eq!(
                refused.headers().get("retry-after").map(|v| v.as_bytes()),
                Some(&b"1"[..])
            );
            let body: serde_json::Value =
                serde_json::from_slice(&refused.bytes().await.expect("body")).expect("JSON");
            assert_eq!(body["error"], "unavailable", "{body}");
            // An XMPP submitter is refused at once too (type `wait`: to send again), not left
            // waiting for a commit that cannot happen.
            let id = w
                .send_set(&to, Submit::new("work.slow".parse().unwrap()))
                .await;
            let asked = tokio::time::Instant::now();
            let refused = w
                .wait_reply(&id)
                .await
                .expect_err("refused while the store is down");
            assert!(
                asked.elapsed() < Duration::from_secs(2),
                "at once, not after the store's timeout: {:?}",
                asked.elapsed()
            );
            assert_eq!(
                (refused.type_, refused.defined_condition),
                (
                    xmpp_parsers::stanza_error::ErrorType::Wait,
                    xmpp_parsers::stanza_error::DefinedCondition::ServiceUnavailable
                )
            );
            tokio::time::sleep(Duration::from_millis(2_000)).await;
            tokio::task::block_in_place(|| pg.launch()).expect("PostgreSQL starts again");
            // Back within a second or so (a commit or the store's probe reconnects): the same
            // request reaches the dispatcher again (422: nobody offers that capability).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (answer, health, reachable) = probe().await;
                if answer.status().as_u16() == 422
                    && health == 200
                    && reachable.as_deref() == Some("1")
                {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still refused after PostgreSQL came back: {}",
                    answer.status()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            child
        }
    };
    let mut outcomes: HashMap<String, JobState> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while outcomes.len() < accepted.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {} jobs finished",
            outcomes.len(),
            accepted.len()
        );
        if let Some(st) = w
            .try_wait_for(Duration::from_secs(5), |st| match st {
                Stanza::Message(m) => m
                    .payloads
                    .iter()
                    .find_map(|p| JobStatus::try_from(p.clone()).ok()),
                _ => None,
            })
            .await
        {
            let prev = outcomes.insert(st.job.to_string(), st.state);
            assert!(
                prev.is_none_or(|p| p == st.state),
                "job {} reported twice with different outcomes",
                st.job
            );
        }
    }
    let finished: HashSet<String> = outcomes.keys().cloned().collect();
    assert_eq!(finished, accepted, "every accepted job has an outcome");
    assert!(
        outcomes.values().all(|s| *s == JobState::Succeeded),
        "{outcomes:?}"
    );
    let ran = runs.lock().unwrap().clone();
    let distinct: HashSet<&String> = ran.iter().collect();
    println!(
        "accepted {}, succeeded {}, handler runs {}, distinct {}",
        accepted.len(),
        outcomes.len(),
        ran.len(),
        distinct.len()
    );
    assert_eq!(distinct.len(), accepted.len());
    assert_eq!(ran.len(), accepted.len(), "no job ran twice");
    if outage {
        assert!(
            child.try_wait().expect("status").is_none(),
            "the dispatcher waited for PostgreSQL instead of stopping"
        );
    }
    let _ = child.kill().await;
    drop(stops);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_reduce_survives_kill_9_of_its_dispatcher_with_exact_counts() {
    use spine_protocol::{Data, Fragment, MapReduce, Outcome, Progress};
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("webapp", "pw-w"),
        ("agent1", "pw"),
        ("agent2", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatcher.toml");
    // No speculative copies: every step must run exactly once.
    std::fs::write(
        &config,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nsubmitters = [\"webapp@localhost\"]\nhttp_listen = \"127.0.0.1:0\"\nspeculation_factor = 0\n",
            server.addr,
            dir.path().join("data").display()
        ),
    )
    .unwrap();

    // Two word-count agents whose maps take 150 ms; every step run is recorded by job id.
    let runs: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut stops = Vec::new();
    for n in 1..=2 {
        let cfg = spine_integration::farm::agent_config(&server, n, "slots = 2");
        let (r1, r2) = (runs.clone(), runs.clone());
        let agent = Agent::builder(cfg)
            .capability("wordcount.map", None, move |ctx: JobContext| {
                let runs = r1.clone();
                async move {
                    runs.lock().unwrap().push(ctx.id.to_string());
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    spine_example_wordcount::map(&ctx.input)
                }
            })
            .capability("wordcount.reduce", None, move |ctx: JobContext| {
                let runs = r2.clone();
                async move {
                    runs.lock().unwrap().push(ctx.id.to_string());
                    spine_example_wordcount::reduce(&ctx.input)
                }
            })
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        stops.push(tx);
    }
    let mut child = spawn_dispatcher(&config);
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    registered_for(&mut w, "wordcount.map", 2).await;

    // 40 fragments: at 4 maps at a time, about 1.5 s of mapping.
    let texts: Vec<String> = (0..40)
        .map(|i| format!("Spine {i} spine BUS bus bus état {}", "x ".repeat(i)))
        .collect();
    let mut s = Submit::new("wordcount.map".parse().unwrap());
    s.watch = true;
    s.mapreduce = Some(MapReduce {
        reduce: "wordcount.reduce".parse().unwrap(),
        split: None,
        fan_in: 4,
    });
    s.input = Some(Data::Inline {
        mime: None,
        bytes: spine_protocol::fragments::encode(
            &texts
                .iter()
                .map(|t| Fragment::new(t.as_bytes().to_vec()))
                .collect::<Vec<_>>(),
        ),
    });
    let to: Jid = "dispatcher@localhost/d1".parse().unwrap();
    let id = w.send_set(&to, s).await;
    let job = Accepted::try_from(w.wait_reply(&id).await.unwrap().unwrap())
        .unwrap()
        .job;
    // Crash once a quarter of the steps are done.
    w.wait_for("progress past 25%", |st| match st {
        Stanza::Message(m) => m.payloads.iter().find_map(|p| {
            Progress::try_from(p.clone())
                .ok()
                .filter(|pr| pr.job == job && pr.percent.unwrap_or(0) >= 25)
        }),
        _ => None,
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait().await;
    let before = runs.lock().unwrap().len();

    let mut child = spawn_dispatcher(&config);
    let status = w
        .try_wait_for(Duration::from_secs(60), |st| match st {
            Stanza::Message(m) => m
                .payloads
                .iter()
                .find_map(|p| JobStatus::try_from(p.clone()).ok().filter(|s| s.job == job)),
            _ => None,
        })
        .await
        .expect("the map/reduce ends after the restart");
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    let Some(Outcome::Result(r)) = status.outcome else {
        panic!("no result: {status:?}")
    };
    let Some(spine_protocol::Data::Inline { bytes, .. }) = r.output else {
        panic!("no inline output")
    };
    let counts: Vec<(String, u64)> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        counts,
        spine_integration::farm::plain_word_count(texts.iter().map(String::as_str))
    );
    // 40 maps and 10 + 3 + 1 reduces, each run exactly once across the crash.
    let ran = runs.lock().unwrap().clone();
    let distinct: HashSet<&String> = ran.iter().collect();
    println!(
        "map/reduce across kill -9: {before} step runs before the crash, {} in all, {} distinct",
        ran.len(),
        distinct.len()
    );
    assert!(
        (10..54).contains(&before),
        "crashed mid-run: {before} steps had run"
    );
    assert_eq!(distinct.len(), 54);
    assert_eq!(ran.len(), 54, "no step ran twice");
    let _ = child.kill().await;
    drop(stops);
}
