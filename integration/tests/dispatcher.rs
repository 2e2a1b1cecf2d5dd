//! The dispatcher end to end on the embedded server: real agents, a real XMPP submitter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jid::Jid;
use serde_json::json;
use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_dispatcher::DispatcherConfig;
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{
    Accepted, Agents, Args, Condition, Discover, JobState, JobStatus, Outcome, SpineError, Submit,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("webapp", "pw-w"),
    ("stranger", "pw-s"),
    ("agent1", "pw"),
    ("agent2", "pw"),
    ("agent3", "pw"),
    ("agent4", "pw"),
];

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
    /// Drops the agent without draining: its connection goes away mid-job.
    fn kill(self) {
        self.task.abort();
    }
}

fn start_dispatcher(server: &TestServer, dir: &std::path::Path) -> Running {
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nsubmitters = [\"webapp@localhost\"]\nno_agent_wait = \"2s\"\n",
        server.addr,
        dir.display()
    ))
    .unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) = spine_dispatcher::run(cfg, async move {
            let _ = rx.await;
        })
        .await
        {
            panic!("dispatcher failed: {e}");
        }
    });
    Running {
        stop: Some(tx),
        task,
    }
}

/// An agent whose `work.sleep` takes `ms` per job and counts its runs.
fn start_agent(
    server: &TestServer,
    n: usize,
    slots: u64,
    ms: u64,
    runs: Arc<AtomicUsize>,
) -> Running {
    let cfg = AgentConfig::from_toml(&format!(
        "jid = \"agent{n}@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nslots = {slots}\nheartbeat = \"1s\"\n",
        server.addr
    ))
    .unwrap();
    let agent = Agent::builder(cfg)
        .capability("work.sleep", None, move |ctx: JobContext| {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, JobError>(Output::bytes(format!("{} done by agent{n}", ctx.id)))
            }
        })
        .build()
        .unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = agent
            .run(async move {
                let _ = rx.await;
            })
            .await;
    });
    Running {
        stop: Some(tx),
        task,
    }
}

fn dispatcher_jid() -> Jid {
    "dispatcher@localhost/d1".parse().unwrap()
}

async fn submit(w: &mut TestDispatcher, secs: u64) -> String {
    let mut s = Submit::new("work.sleep".parse().unwrap());
    s.watch = true;
    s.args = Args(json!({ "n": secs }).as_object().cloned().unwrap());
    w.send_set(&dispatcher_jid(), s).await
}

/// Waits until the dispatcher lists `n` agents for work.sleep.
async fn wait_agents(w: &mut TestDispatcher, n: usize) -> Agents {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let id = format!("disc-{}", rand_u32());
        let d = Discover {
            capability: "work.sleep".parse().unwrap(),
            filter: None,
            sort: None,
            limit: None,
        };
        w.conn
            .send(Iq::from_get(id.clone(), d).with_to(dispatcher_jid()))
            .await;
        if let Ok(Some(p)) = w.wait_reply(&id).await {
            let a = Agents::try_from(p).unwrap();
            if a.agents.len() >= n {
                return a;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dispatcher did not register {n} agents"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

async fn final_status(w: &mut TestDispatcher, within: Duration) -> Option<JobStatus> {
    w.try_wait_for(within, |st| match st {
        Stanza::Message(m) => m
            .payloads
            .iter()
            .find_map(|p| JobStatus::try_from(p.clone()).ok()),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_jobs_on_four_agents_of_unequal_speed() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let dispatcher = start_dispatcher(&server, dir.path());
    let speeds = [5u64, 10, 20, 40];
    let runs: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let agents: Vec<Running> = (0..4)
        .map(|i| start_agent(&server, i + 1, 4, speeds[i], runs[i].clone()))
        .collect();
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents(&mut w, 4).await;

    let mut ids = Vec::new();
    for _ in 0..500 {
        ids.push(submit(&mut w, 0).await);
    }
    let mut accepted = Vec::new();
    for id in &ids {
        let p = w.wait_reply(id).await.expect("accepted").expect("payload");
        accepted.push(Accepted::try_from(p).unwrap().job);
    }
    let mut by_agent: HashMap<String, usize> = HashMap::new();
    let mut done = 0;
    while done < 500 {
        let st = final_status(&mut w, Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("only {done} of 500 jobs finished"));
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
        assert!(matches!(&st.outcome, Some(Outcome::Result(_))));
        *by_agent
            .entry(
                st.agent
                    .map(|a| a.to_bare().to_string())
                    .unwrap_or_default(),
            )
            .or_default() += 1;
        done += 1;
    }
    let ran: Vec<usize> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    println!("jobs per agent (5, 10, 20, 40 ms per job): {ran:?}; by status: {by_agent:?}");
    assert_eq!(ran.iter().sum::<usize>(), 500, "each job ran once");
    assert!(
        ran[0] * 2 > ran[3] * 3,
        "the fastest agent ran at least 1.5 times the slowest: {ran:?}"
    );
    assert!(
        ran[0] >= ran[1] && ran[1] >= ran[2] && ran[2] >= ran[3],
        "faster agents ran more: {ran:?}"
    );
    for a in agents {
        a.stop();
    }
    dispatcher.stop();
}

#[tokio::test]
async fn a_job_on_a_lost_agent_runs_again_elsewhere_once() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let dispatcher = start_dispatcher(&server, dir.path());
    let (slow_runs, other_runs) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let slow = start_agent(&server, 1, 1, 60_000, slow_runs.clone());
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents(&mut w, 1).await;
    let id = submit(&mut w, 0).await;
    let job = Accepted::try_from(w.wait_reply(&id).await.unwrap().unwrap())
        .unwrap()
        .job;
    // The job runs on the only agent (it reports in-flight 1).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let a = wait_agents(&mut w, 1).await;
        if a.agents.iter().any(|x| x.in_flight == 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = start_agent(&server, 2, 1, 10, other_runs.clone());
    wait_agents(&mut w, 2).await;
    slow.kill();
    let st = final_status(&mut w, PATIENCE)
        .await
        .expect("the job finished elsewhere");
    assert_eq!((st.job, st.state), (job, JobState::Succeeded));
    assert_eq!(st.attempts, 2);
    assert_eq!(
        st.agent.map(|a| a.to_bare().to_string()).as_deref(),
        Some("agent2@localhost")
    );
    assert_eq!(
        (
            slow_runs.load(Ordering::SeqCst),
            other_runs.load(Ordering::SeqCst)
        ),
        (0, 1)
    );
    other.stop();
    dispatcher.stop();
}

#[tokio::test]
async fn discovery_ranks_by_load_and_strangers_are_forbidden() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let dispatcher = start_dispatcher(&server, dir.path());
    let a = start_agent(&server, 1, 2, 3_000, Arc::new(AtomicUsize::new(0)));
    let b = start_agent(&server, 2, 2, 3_000, Arc::new(AtomicUsize::new(0)));
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents(&mut w, 2).await;
    // Three long jobs on two agents with two slots each: loads 2/2 and 1/2.
    for _ in 0..3 {
        let id = submit(&mut w, 0).await;
        w.wait_reply(&id).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let ranked = loop {
        let r = wait_agents(&mut w, 2).await;
        if r.agents.iter().map(|x| x.in_flight).sum::<u64>() == 3 {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline);
    };
    let loads: Vec<f64> = ranked.agents.iter().map(|x| x.load).collect();
    assert_eq!(loads, vec![0.5, 1.0], "least loaded first");

    let mut s = TestDispatcher::new(server.client("stranger", "pw-s").await).await;
    let id = s
        .send_set(
            &dispatcher_jid(),
            Submit::new("work.sleep".parse().unwrap()),
        )
        .await;
    let err = s.wait_reply(&id).await.unwrap_err();
    let e = SpineError::from_stanza_error(&err).unwrap().unwrap();
    assert_eq!(e.condition, Condition::NotAuthorized);

    // Unknown capability: accepted, then failed with no-agent after the configured wait.
    let mut unknown = Submit::new("nobody.offers".parse().unwrap());
    unknown.watch = true;
    let id = w.send_set(&dispatcher_jid(), unknown).await;
    w.wait_reply(&id).await.unwrap();
    let st = final_status(&mut w, PATIENCE)
        .await
        .expect("no-agent outcome");
    assert_eq!(st.state, JobState::Failed);
    assert!(
        matches!(st.outcome, Some(Outcome::Failure(ref f)) if f.condition == Condition::NoAgent),
        "{st:?}"
    );
    a.stop();
    b.stop();
    dispatcher.stop();
}
