//! `spine dispatcher` as a real process: `kill -9` with jobs in flight, restart on the same data
//! directory, and every accepted job still ends succeeded exactly once, with no job run twice.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jid::Jid;
use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
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
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let to: Jid = "dispatcher@localhost/d1".parse().unwrap();
    let mut k = 0;
    loop {
        k += 1;
        let id = format!("d{k}");
        let d = Discover {
            capability: "work.slow".parse().unwrap(),
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
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("webapp", "pw-w"),
        ("agent1", "pw"),
        ("agent2", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatcher.toml");
    std::fs::write(
        &config,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nsubmitters = [\"webapp@localhost\"]\nhttp_listen = \"127.0.0.1:0\"\n",
            server.addr,
            dir.path().join("data").display()
        ),
    )
    .unwrap();

    // Two agents; every handler run is recorded by job id.
    let runs: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut stops = Vec::new();
    for n in 1..=2 {
        let cfg = AgentConfig::from_toml(&format!(
            "jid = \"agent{n}@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nslots = 3\nheartbeat = \"1s\"\n",
            server.addr
        ))
        .unwrap();
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
    // Jobs are running on both agents (6 slots) and 14 wait in the queue: crash now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait().await;

    let mut child = spawn_dispatcher(&config);
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
    let _ = child.kill().await;
    drop(stops);
}
