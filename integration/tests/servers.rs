//! The same end-to-end scenarios on all three XMPP servers — the embedded server, Prosody and
//! ejabberd (Debian packages, each a child process with the project's configuration from
//! `integration/servers/`): agents advertise and are ranked by load; jobs run; progress and
//! partial results arrive; a lost agent's job runs again elsewhere; a 20 MB payload goes
//! through; cancel and deadlines work. One function holds the scenarios; one test per server
//! runs it, so a failure names the server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, Relay, Running};
use spine_integration::servers::{AnyServer, Endpoint, Kind};

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")];

/// The test agent: `t.echo` (input back), `t.steps` (three progress reports and partials),
/// `t.sleep` (`ms` milliseconds; counts the runs that were cut short).
fn test_agent(server: &impl Endpoint, n: usize, cut_short: Arc<AtomicUsize>) -> Running {
    struct Guard(Arc<AtomicUsize>, bool);
    impl Drop for Guard {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    let agent = Agent::builder(agent_config(server, n, "slots = 2\n"))
        .capability("t.echo", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(ctx.input).with_mime("application/octet-stream"))
        })
        .capability("t.steps", None, |ctx: JobContext| async move {
            // Time for the submitter to open the event stream after submitting.
            tokio::time::sleep(Duration::from_millis(300)).await;
            for i in 1..=3u8 {
                ctx.progress(i * 30, format!("step {i}"));
                ctx.partial(Some("text/plain"), format!("part {i}").as_bytes());
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Ok::<_, JobError>(Output::bytes("done"))
        })
        .capability("t.sleep", None, move |ctx: JobContext| {
            let cut_short = cut_short.clone();
            async move {
                let ms = ctx.args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                let mut guard = Guard(cut_short, false);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.1 = true;
                Ok::<_, JobError>(Output::bytes(format!("slept on agent{n}")))
            }
        })
        .build()
        .unwrap();
    run_agent(agent)
}

struct Api {
    base: String,
    client: spine_client::Client,
    http: reqwest::Client,
}

impl Api {
    async fn submit(&self, body: Value) -> String {
        self.client.submit(&body).await.unwrap()
    }

    async fn job(&self, id: &str) -> Value {
        self.client.job(id).await.unwrap()
    }

    async fn agents(&self, cap: &str) -> Vec<Value> {
        let text = self
            .http
            .get(format!("{}/v1/agents?capability={cap}", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["agents"].as_array().cloned().unwrap_or_default()
    }

    /// Polls the job until `done` holds (at most `within`).
    async fn until(&self, id: &str, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if done(&j) {
                return j;
            }
            assert!(Instant::now() < deadline, "gave up waiting: {j}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finished(&self, id: &str, within: Duration) -> Value {
        self.until(id, within, |j| {
            ["succeeded", "failed", "cancelled", "timed-out"]
                .contains(&j["state"].as_str().unwrap_or(""))
        })
        .await
    }
}

async fn scenarios(kind: Kind) {
    let Some(server) = AnyServer::start(kind, ACCOUNTS).await else {
        return;
    };
    let name = kind.name();
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    let cut_short = Arc::new(AtomicUsize::new(0));
    // Each agent reaches the server through a relay that can cut its connection like a dead
    // network would.
    let relays = [
        Relay::start(server.addr).await,
        Relay::start(server.addr).await,
    ];
    let mut agents: Vec<Running> = (1..=2)
        .map(|n| test_agent(&relays[n - 1], n, cut_short.clone()))
        .collect();
    let api = Api {
        client: spine_client::Client::new(&base, None).unwrap(),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        base,
    };
    spine_integration::farm::wait_for_agents(&api.base, "t.sleep", 2).await;

    // Advertisement and ranking by load: a running job puts its agent behind the idle one.
    let started = Instant::now();
    let long = api
        .submit(json!({ "capability": "t.sleep", "args": { "ms": 1500 } }))
        .await;
    let running = api
        .until(&long, Duration::from_secs(10), |j| j["agent"].is_string())
        .await;
    let busy = running["agent"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    let ranked = loop {
        let ranked = api.agents("t.sleep").await;
        if ranked.len() == 2 && ranked[1]["jid"] == busy.as_str() {
            break ranked;
        }
        assert!(Instant::now() < deadline, "{name}: ranking {ranked:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ranked[0]["in_flight"], 0, "{name}: {ranked:?}");
    assert_eq!(ranked[1]["in_flight"], 1, "{name}: {ranked:?}");
    assert_eq!(
        api.finished(&long, Duration::from_secs(10)).await["state"],
        "succeeded"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // A job runs.
    let echo = api
        .submit(json!({ "capability": "t.echo", "input": spine_client::base64(b"hello") }))
        .await;
    let j = api.finished(&echo, Duration::from_secs(10)).await;
    assert_eq!(spine_client::output(&j).unwrap(), b"hello", "{name}: {j}");

    // Progress and partial results arrive over the event stream, in order.
    let steps = api
        .submit(json!({ "capability": "t.steps", "progress": true }))
        .await;
    let mut progress = Vec::new();
    let mut partials = Vec::new();
    let j = api
        .client
        .events(&steps, |event, data| match event {
            "progress" => progress.push(data["percent"].as_u64().unwrap_or(0)),
            "partial" => partials.push(data["data"].as_str().unwrap_or("").to_owned()),
            _ => {}
        })
        .await
        .unwrap();
    assert_eq!(j["state"], "succeeded", "{name}: {j}");
    // The agent reports 0 when it starts, then 30, 60, 90.
    assert!(progress.ends_with(&[30, 60, 90]), "{name}: {progress:?}");
    let parts: Vec<String> = ["part 1", "part 2", "part 3"]
        .iter()
        .map(|p| spine_client::base64(p.as_bytes()))
        .collect();
    assert_eq!(partials, parts, "{name}");

    // A lost agent's job runs again on the other one: its connection drops without a stream
    // close, as when its machine dies.
    let lost = api
        .submit(json!({ "capability": "t.sleep", "args": { "ms": 800 } }))
        .await;
    let j = api
        .until(&lost, Duration::from_secs(10), |j| j["agent"].is_string())
        .await;
    let first = j["agent"].as_str().unwrap().to_owned();
    let i = if first.starts_with("agent1@") { 0 } else { 1 };
    let killed = Instant::now();
    relays[i].cut();
    let j = api.finished(&lost, Duration::from_secs(20)).await;
    let recovered = killed.elapsed();
    assert_eq!(j["state"], "succeeded", "{name}: {j}");
    // The server's `unavailable` (not 3 s of missed heartbeats and a 5 s ping) told the
    // dispatcher: the 800 ms job ran again at once, although the server offers stream
    // management with resumption (Spine's clients decline it).
    assert!(
        recovered < Duration::from_millis(2500),
        "{name}: the job ended {recovered:?} after its agent was lost"
    );
    eprintln!("{name}: lost agent's job done elsewhere {recovered:?} after the loss");
    assert_ne!(j["agent"].as_str().unwrap(), first, "{name}: ran elsewhere");
    assert_eq!(j["attempts"], 2, "{name}: {j}");
    agents.remove(i).kill();
    agents.push(test_agent(&server, i + 1, cut_short.clone()));
    spine_integration::farm::wait_for_agents(&api.base, "t.sleep", 2).await;

    // A 20 MB input and output: chunks both ways through the server.
    let big: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let t = Instant::now();
    let resp = api
        .http
        .post(format!("{}/v1/jobs?capability=t.echo", api.base))
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{name}");
    let id = serde_json::from_str::<Value>(&resp.text().await.unwrap()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let j = api.finished(&id, Duration::from_secs(120)).await;
    let out = api
        .client
        .output(&j)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(out.len(), big.len(), "{name}");
    assert_eq!(
        sha2::Sha256::digest(&out),
        sha2::Sha256::digest(&big),
        "{name}: the 20 MB came back intact"
    );
    eprintln!(
        "{name}: 20 MiB in and out in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Cancel: the agent stops the job and its slot frees.
    let before = cut_short.load(Ordering::SeqCst);
    let c = api
        .submit(json!({ "capability": "t.sleep", "args": { "ms": 30000 } }))
        .await;
    api.until(&c, Duration::from_secs(10), |j| j["agent"].is_string())
        .await;
    let resp = api
        .http
        .delete(format!("{}/v1/jobs/{c}", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{name}");
    let j = api.job(&c).await;
    assert_eq!(j["state"], "cancelled", "{name}: {j}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cut_short.load(Ordering::SeqCst) == before {
        assert!(
            Instant::now() < deadline,
            "{name}: the agent did not stop the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Deadline: the job times out and the agent stops it.
    let before = cut_short.load(Ordering::SeqCst);
    let d = api
        .submit(json!({ "capability": "t.sleep", "args": { "ms": 30000 }, "deadline": "700ms" }))
        .await;
    let j = api.finished(&d, Duration::from_secs(10)).await;
    assert_eq!(j["state"], "timed-out", "{name}: {j}");
    assert_eq!(j["error"]["condition"], "deadline-exceeded", "{name}: {j}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cut_short.load(Ordering::SeqCst) == before {
        assert!(
            Instant::now() < deadline,
            "{name}: the agent did not stop the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for a in agents {
        a.stop();
    }
    dispatcher.stop();
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_on_the_embedded_server() {
    scenarios(Kind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_on_prosody() {
    scenarios(Kind::Prosody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_on_ejabberd() {
    scenarios(Kind::Ejabberd).await;
}
