//! `spine agent drain` / `spine agent undrain` as real processes against a dispatcher's HTTP
//! API, with two real agents on the embedded server (PROTOCOL.md §5.6): a drained agent takes
//! no new job but finishes the one it runs and keeps running, every dispatcher sees it
//! draining, it stays drained across a restart (its state file), and an undrain puts it back.
//! A stranger's drain is refused by the agent itself.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_dispatcher::{Dispatcher, DispatcherConfig};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{run_agent, wait_for_agents, Running};
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Condition, Drain, SpineError};
use tokio::process::Command;
use tokio::sync::{mpsc, Notify};

async fn spine(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        PATIENCE * 3,
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(args)
            .env_remove("SPINE_TOKEN")
            .output(),
    )
    .await
    .expect("spine command finished")
    .expect("run spine");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Agent `n` (`agent<n>@localhost/w`): `test.work` answers its own name; agent 1 also offers
/// `test.hold`, which reports its start on `started` and ends when `gate` is notified (or at
/// once with `{"hold": false}`).
fn agent(
    server: &TestServer,
    n: usize,
    state_file: &std::path::Path,
    started: mpsc::UnboundedSender<()>,
    gate: Arc<Notify>,
) -> Running {
    let cfg = AgentConfig::from_toml(&format!(
        "jid = \"agent{n}@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"1s\"\nslots = 2\nstate_file = \"{}\"\n",
        server.addr,
        state_file.display()
    ))
    .unwrap();
    let name = format!("agent{n}");
    let mut b = Agent::builder(cfg).capability("test.work", None, move |_: JobContext| {
        let name = name.clone();
        async move { Ok::<_, JobError>(Output::bytes(name)) }
    });
    if n == 1 {
        b = b.capability("test.hold", None, move |ctx: JobContext| {
            let (started, gate) = (started.clone(), gate.clone());
            async move {
                if ctx.args.get("hold").and_then(Value::as_bool) != Some(false) {
                    let _ = started.send(());
                    gate.notified().await;
                }
                Ok::<_, JobError>(Output::bytes("agent1"))
            }
        });
    }
    run_agent(b.build().unwrap())
}

/// A response's JSON body (the test's reqwest has no `json` feature).
async fn json_of(r: reqwest::Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn submit(&self, capability: &str, args: Value) -> String {
        let r = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", "application/json")
            .body(json!({ "capability": capability, "args": args }).to_string())
            .send()
            .await
            .unwrap();
        let r = json_of(r).await;
        r["id"].as_str().expect("a job id").to_owned()
    }

    async fn job(&self, id: &str, wait: &str) -> Value {
        let r = self
            .http
            .get(format!("{}/v1/jobs/{id}?wait={wait}", self.base))
            .send()
            .await
            .unwrap();
        json_of(r).await
    }

    /// The output of job `id` once it succeeded.
    async fn output(&self, id: &str) -> String {
        let j = self.job(id, "10s").await;
        assert_eq!(j["state"], "succeeded", "{j}");
        let out = self
            .http
            .get(format!("{}/v1/jobs/{id}/output", self.base))
            .send()
            .await
            .unwrap();
        out.text().await.unwrap()
    }

    /// The state of `jid` in `GET /v1/agents?capability=test.work`, or `None` if not listed.
    async fn agent_state(&self, jid: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/v1/agents?capability=test.work", self.base))
            .send()
            .await
            .unwrap();
        let body = json_of(r).await;
        body["agents"]
            .as_array()?
            .iter()
            .find(|a| a["jid"] == jid)
            .and_then(|a| a["state"].as_str().map(str::to_owned))
    }

    async fn until(&self, what: &str, mut ok: impl FnMut(Option<String>) -> bool, jid: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let s = self.agent_state(jid).await;
            if ok(s.clone()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{jid} never {what}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_work_away_keeps_the_running_job_survives_a_restart_and_undrains() {
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("agent2", "pw"),
        ("mallory", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\n",
        server.addr,
        dir.path().display()
    ))
    .unwrap();
    let d = Dispatcher::bind(cfg).await.unwrap();
    let base = format!("http://{}", d.http_addr().unwrap());
    tokio::spawn(d.run(std::future::pending::<()>()));
    let api = Api {
        base: base.clone(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    };
    let state1 = dir.path().join("agent1.state");
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let gate = Arc::new(Notify::new());
    let a1 = agent(&server, 1, &state1, started_tx.clone(), gate.clone());
    let _a2 = agent(
        &server,
        2,
        &dir.path().join("agent2.state"),
        started_tx.clone(),
        gate.clone(),
    );
    wait_for_agents(&base, "test.work", 2).await;
    const A1: &str = "agent1@localhost/w";

    // A job in flight on agent1 when it is drained.
    let held = api.submit("test.hold", json!({})).await;
    tokio::time::timeout(PATIENCE, started.recv())
        .await
        .expect("the held job started on agent1");

    let (code, out, err) = spine(&[
        "agent",
        "drain",
        A1,
        "--reason",
        "kernel upgrade",
        "--api",
        &base,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{A1} draining (in flight 1/2)"));
    assert_eq!(
        std::fs::read_to_string(&state1).unwrap().trim(),
        r#"{"drained":true,"reason":"kernel upgrade"}"#,
        "the drain is kept before it is confirmed"
    );
    let (code, table, err) = spine(&["agents", "--capability", "test.work", "--api", &base]).await;
    assert_eq!(code, 0, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with(A1))
        .expect("agent1 listed");
    assert!(row.contains("draining"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("agent2@localhost/w"))
        .expect("agent2 listed");
    assert!(row.contains("ready"), "{table}");

    // Every new job goes to agent2, though agent1 has a free slot.
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(api.submit("test.work", json!({})).await);
    }
    for id in &ids {
        assert_eq!(api.output(id).await, "agent2", "job {id}");
    }
    // A job only agent1 can run waits.
    let waiting = api.submit("test.hold", json!({ "hold": false })).await;
    assert_eq!(api.job(&waiting, "300ms").await["state"], "queued");

    // The job agent1 was running when drained ends normally, and agent1 stays.
    gate.notify_one();
    assert_eq!(api.output(&held).await, "agent1");
    assert_eq!(api.agent_state(A1).await.as_deref(), Some("draining"));

    // Only its dispatchers may drain it: the agent itself refuses a stranger.
    let mut mallory = TestDispatcher::new(server.client("mallory", "pw").await).await;
    let id = mallory
        .send_set(&A1.parse().unwrap(), Drain::default())
        .await;
    let refused = mallory.wait_reply(&id).await.expect_err("refused");
    let e = SpineError::from_stanza_error(&refused).unwrap().unwrap();
    assert_eq!(e.condition, Condition::NotAuthorized);

    // Restarted, agent1 comes back drained: its state file says so.
    a1.stop();
    api.until("left", |s| s.is_none(), A1).await;
    let a1 = agent(&server, 1, &state1, started_tx.clone(), gate.clone());
    api.until(
        "came back draining",
        |s| s.as_deref() == Some("draining"),
        A1,
    )
    .await;
    assert_eq!(api.job(&waiting, "300ms").await["state"], "queued");
    let id = api.submit("test.work", json!({})).await;
    assert_eq!(api.output(&id).await, "agent2");

    // Undrained, it takes jobs again: the one that waited for it first.
    let (code, out, err) = spine(&["agent", "undrain", "agent1@localhost", "--api", &base]).await;
    assert_eq!(code, 0, "{err}");
    // The job that waited may already be on it: the agent's ready load goes before its answer.
    assert!(
        out.trim() == format!("{A1} ready (in flight 0/2)")
            || out.trim() == format!("{A1} ready (in flight 1/2)"),
        "{out}"
    );
    assert_eq!(api.output(&waiting).await, "agent1");
    assert_eq!(
        std::fs::read_to_string(&state1).unwrap().trim(),
        r#"{"drained":false}"#
    );
    a1.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_unknown_agent_says_so_and_exits_1() {
    let server = TestServer::start(&[("dispatcher", "pw-d")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\n",
        server.addr,
        dir.path().display()
    ))
    .unwrap();
    let d = Dispatcher::bind(cfg).await.unwrap();
    let base = format!("http://{}", d.http_addr().unwrap());
    tokio::spawn(d.run(std::future::pending::<()>()));
    let (code, out, err) = spine(&["agent", "drain", "nobody@localhost/w", "--api", &base]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(
        err.trim(),
        "spine: cannot drain nobody@localhost/w: no agent nobody@localhost/w is registered with this dispatcher (see `spine agents` for the JIDs of the agents it knows) (unknown-agent, HTTP 404)"
    );
    // Not a JID at all: named, with the fix.
    let (code, _, err) = spine(&["agent", "undrain", "@@", "--api", &base]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a JID"), "{err}");
    // `spine agent` without a subcommand still runs an agent: its options are unchanged.
    let (code, out, err) = spine(&["agent", "--print-config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("# state_file = "), "{out}");
}
