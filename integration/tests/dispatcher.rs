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

use spine_integration::farm::Running;

fn start_dispatcher(server: &TestServer, dir: &std::path::Path) -> Running {
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nsubmitters = [\"webapp@localhost\"]\nno_agent_wait = \"2s\"\nhttp_listen = \"127.0.0.1:0\"\n",
        server.addr,
        dir.display()
    ))
    .unwrap();
    Running::spawn(|rx| async move {
        if let Err(e) = spine_dispatcher::run(cfg, async move {
            let _ = rx.await;
        })
        .await
        {
            panic!("dispatcher failed: {e}");
        }
    })
}

/// An agent whose `work.sleep` takes `ms` per job and counts its runs.
fn start_agent(
    server: &TestServer,
    n: usize,
    slots: u64,
    ms: u64,
    runs: Arc<AtomicUsize>,
) -> Running {
    let cfg = spine_integration::farm::agent_config(server, n, &format!("slots = {slots}"));
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
    spine_integration::farm::run_agent(agent)
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
    wait_agents_for(w, "work.sleep", n).await
}

/// Waits until the dispatcher lists `n` agents for `capability` (asked over XMPP).
async fn wait_agents_for(w: &mut TestDispatcher, capability: &str, n: usize) -> Agents {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let id = format!("disc-{}", rand_u32());
        let d = Discover {
            capability: capability.parse().unwrap(),
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
    // Jobs long enough that 500 of them queue at the dispatcher (the four agents together take
    // about 375 a second), so each agent's share follows its speed, not how fast a loaded
    // machine can submit: with 5-40 ms jobs a debug dispatcher sharing two cores with other
    // tests could not keep the fast agents busy, and the shares came out nearly equal.
    let speeds = [20u64, 40, 80, 160];
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
    println!("jobs per agent (20, 40, 80, 160 ms per job): {ran:?}; by status: {by_agent:?}");
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

/// `<submit wait-ms>` (protocol 1.3, PROTOCOL.md §11.2.1) through the embedded server: a job
/// that ends within the wait answers the submit with its end, one that outlasts it with
/// `<accepted>` and then the watch message, and the same key again answers at once.
#[tokio::test]
async fn a_submit_that_waits_is_answered_by_the_jobs_end() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let dispatcher = start_dispatcher(&server, dir.path());
    let runs = Arc::new(AtomicUsize::new(0));
    let agent = start_agent(&server, 1, 2, 400, runs.clone());
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents(&mut w, 1).await;
    let waiting = |wait_ms: u64, key: &str| {
        let mut s = Submit::new("work.sleep".parse().unwrap());
        s.watch = true;
        s.wait_ms = Some(wait_ms);
        s.idempotency_key = Some(key.to_owned());
        s
    };

    // Ends within the wait: the answer is the final status, and no watch message follows.
    let id = w.send_set(&dispatcher_jid(), waiting(10_000, "w1")).await;
    let p = w
        .wait_reply(&id)
        .await
        .expect("an answer")
        .expect("a payload");
    assert_eq!(p.name(), "job-status", "{p:?}");
    let st = JobStatus::try_from(p).unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    let Some(Outcome::Result(r)) = &st.outcome else {
        panic!("the result in the answer: {st:?}");
    };
    let Some(spine_protocol::Data::Inline { bytes, .. }) = &r.output else {
        panic!("an inline output: {r:?}");
    };
    assert_eq!(bytes, format!("{} done by agent1", st.job).as_bytes());
    assert!(
        final_status(&mut w, Duration::from_millis(500))
            .await
            .is_none(),
        "the end is not told twice"
    );

    // The same key again: that job's end at once, and it did not run again.
    let again = w.send_set(&dispatcher_jid(), waiting(10_000, "w1")).await;
    let p = w.wait_reply(&again).await.unwrap().unwrap();
    let same = JobStatus::try_from(p).unwrap();
    assert_eq!((&same.job, same.state), (&st.job, JobState::Succeeded));
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Outlasts the wait: <accepted> with the state then, and the watch message at the end.
    let id = w.send_set(&dispatcher_jid(), waiting(100, "w2")).await;
    let p = w.wait_reply(&id).await.unwrap().unwrap();
    let a = Accepted::try_from(p).unwrap();
    assert!(!a.state.is_final(), "{a:?}");
    let end = final_status(&mut w, PATIENCE)
        .await
        .expect("the watch message");
    assert_eq!((&end.job, end.state), (&a.job, JobState::Succeeded));

    // A wait over the protocol's limit is refused, naming the attribute.
    let id = w.send_set(&dispatcher_jid(), waiting(300_001, "w3")).await;
    let e = w.wait_reply(&id).await.expect_err("refused");
    let e = SpineError::from_stanza_error(&e).unwrap().unwrap();
    assert_eq!(e.condition, Condition::BadArguments, "{e:?}");
    assert_eq!(e.field.as_deref(), Some("wait-ms"), "{e:?}");
    agent.stop();
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

    // A capability no agent ever offered: refused at once (issue 15, item 7)...
    let id = w
        .send_set(
            &dispatcher_jid(),
            Submit::new("nobody.offers".parse().unwrap()),
        )
        .await;
    let err = w.wait_reply(&id).await.unwrap_err();
    let e = SpineError::from_stanza_error(&err).unwrap().unwrap();
    assert_eq!(e.condition, Condition::UnknownCapability);
    // ... unless the submitter waits for an agent: accepted, then failed with no-agent after
    // the configured wait.
    let mut unknown = Submit::new("nobody.offers".parse().unwrap());
    unknown.watch = true;
    unknown.wait_for_agent = true;
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

/// (method, path, body, expected status, expected field)
type ErrorCase<'a> = (&'a str, &'a str, Option<&'a str>, u16, Option<&'a str>);

/// A dispatcher with its HTTP API on a free loopback port.
async fn start_http_dispatcher(
    server: &TestServer,
    dir: &std::path::Path,
    extra: &str,
) -> (Running, std::net::SocketAddr) {
    let (running, base) = spine_integration::farm::start_http_dispatcher(server, dir, extra).await;
    let addr = base
        .trim_start_matches("http://")
        .parse()
        .expect("base URL holds the address");
    (running, addr)
}

async fn http(
    method: &str,
    url: String,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = match method {
        "POST" => client.post(&url),
        "DELETE" => client.delete(&url),
        _ => client.get(&url),
    };
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_submit_follow_cancel_and_errors() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), "").await;
    let base = format!("http://{addr}");
    let fast = start_agent(&server, 1, 2, 5, Arc::new(AtomicUsize::new(0)));
    // Agents are registered when /v1/agents lists them.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (st, body) = http(
            "GET",
            format!("{base}/v1/agents?capability=work.sleep"),
            None,
            None,
        )
        .await;
        if st == 200 && body["agents"].as_array().is_some_and(|a| a.len() == 1) {
            assert_eq!(body["agents"][0]["slots"], 2);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent not listed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Submit and follow to the result.
    let (st, body) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.sleep","args":{"n":1},"idempotency_key":"k-1"}"#),
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let (st2, again) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.sleep","idempotency_key":"k-1"}"#),
    )
    .await;
    assert_eq!(
        (st2, again["id"].as_str()),
        (202, Some(id.as_str())),
        "same idempotency key, same job"
    );
    // The key as the Idempotency-Key header: the same job; a different key in the body
    // beside it is refused, naming the field.
    let keyed = |body: &'static str| {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(format!("{base}/v1/jobs"))
            .header("idempotency-key", "k-1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = keyed(r#"{"capability":"work.sleep"}"#).await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["id"].as_str(), Some(id.as_str()), "the header's key: {v}");
    let r = keyed(r#"{"capability":"work.sleep","idempotency_key":"k-2"}"#)
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["field"], "idempotency_key", "{v}");
    let done = loop {
        let (st, j) = http("GET", format!("{base}/v1/jobs/{id}"), None, None).await;
        assert_eq!(st, 200);
        if j["state"] == "succeeded" {
            break j;
        }
        assert!(tokio::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    use base64::Engine as _;
    let out = base64::engine::general_purpose::STANDARD
        .decode(done["result"]["output"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("{id} done by agent1")
    );
    assert_eq!(done["attempts"], 1);

    // Server-sent events of a finished job: its final state at once.
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}/v1/jobs/{id}/events"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("event: final") && text.contains("succeeded"),
        "{text}"
    );

    // Cancel a queued job (the capability has no agent), then a second cancel is harmless.
    let (_, q) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"nobody.here","wait_for_agent":true}"#),
    )
    .await;
    let qid = q["id"].as_str().unwrap();
    let (st, c) = http("DELETE", format!("{base}/v1/jobs/{qid}"), None, None).await;
    assert_eq!((st, c["state"].as_str()), (200, Some("cancelled")));
    let (st, c) = http("DELETE", format!("{base}/v1/jobs/{qid}"), None, None).await;
    assert_eq!((st, c["state"].as_str()), (200, Some("cancelled")));

    // Errors: 4xx with a JSON body naming the field.
    let cases: &[ErrorCase] = &[
        ("POST", "/v1/jobs", Some("{not json"), 400, None),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"args":{}}"#),
            400,
            Some("capability"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","colour":"red"}"#),
            400,
            Some("colour"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"Bad Name"}"#),
            400,
            Some("capability"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","strategy":"fastest"}"#),
            400,
            Some("strategy"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","filter":"gpu="}"#),
            400,
            Some("filter"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","deadline":"30"}"#),
            400,
            Some("deadline"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","input":"!!!"}"#),
            400,
            Some("input"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","priority":"high"}"#),
            400,
            Some("priority"),
        ),
        (
            "POST",
            "/v1/jobs",
            Some(r#"{"capability":"work.sleep","max_attempts":0}"#),
            400,
            Some("max_attempts"),
        ),
        ("GET", "/v1/jobs/no-such-job", None, 404, None),
        ("GET", "/v1/jobs/bad%20id", None, 400, Some("id")),
        ("DELETE", "/v1/jobs/no-such-job", None, 404, None),
        ("GET", "/v1/agents", None, 400, Some("capability")),
        (
            "GET",
            "/v1/agents?capability=work.sleep&filter=%3D%3D",
            None,
            400,
            Some("filter"),
        ),
        ("GET", "/v2/nothing", None, 404, None),
        ("DELETE", "/v1/jobs", None, 405, None),
        ("POST", "/v1/agents", Some("{}"), 405, None),
    ];
    for (method, path, body, status, field) in cases {
        let (st, b) = http(method, format!("{base}{path}"), None, *body).await;
        assert_eq!(st, *status, "{method} {path} {body:?} -> {b}");
        assert!(
            b["error"].is_string() && b["message"].is_string(),
            "{method} {path}: JSON error body expected, got {b}"
        );
        if let Some(f) = field {
            assert_eq!(
                b["field"].as_str(),
                Some(*f),
                "{method} {path} {body:?} -> {b}"
            );
        }
    }

    // A JSON body over the limit (it is read whole: 1.5 × max_blob; a raw upload streams to
    // the blob store, up to max_input): the API's JSON error too, not plain text.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(vec![
            0u8;
            spine_dispatcher::http::max_body(64 * 1024 * 1024) + 1
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let b: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(b["error"], "too-large", "{b}");

    let (st, caps) = http("GET", format!("{base}/v1/capabilities"), None, None).await;
    assert_eq!(st, 200);
    assert!(
        caps["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "work.sleep" && c["agents"] == 1),
        "{caps}"
    );
    let (st, m) = http("GET", format!("{base}/metrics"), None, None).await;
    let m = m.as_str().unwrap_or_default().to_owned();
    assert_eq!(st, 200);
    assert!(
        m.contains("spine_jobs{capability=\"work.sleep\",state=\"succeeded\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("spine_agents 1") && m.contains("spine_dispatch_latency_seconds_count 1"),
        "{m}"
    );
    let (st, h) = http("GET", format!("{base}/healthz"), None, None).await;
    assert_eq!((st, h.as_str().map(str::trim)), (200, Some("ok")));
    fast.stop();
    dispatcher.stop();
}

#[tokio::test]
async fn http_tokens_and_capability_permissions() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = "[[http_token]]\nname = \"webapp\"\ntoken = \"0123456789abcdef-web\"\ncapabilities = [\"work.*\"]\n[[http_token]]\nname = \"reports\"\ntoken = \"0123456789abcdef-rep\"\ncapabilities = [\"report.pdf\"]\n";
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), tokens).await;
    let url = format!("http://{addr}/v1/jobs");
    let body = Some(r#"{"capability":"work.sleep"}"#);
    let (st, b) = http("POST", url.clone(), None, body).await;
    assert_eq!(
        (st, b["error"].as_str()),
        (401, Some("not-authorized")),
        "{b}"
    );
    let (st, _) = http("POST", url.clone(), Some("0123456789abcdef-xxx"), body).await;
    assert_eq!(st, 401);
    let (st, b) = http("POST", url.clone(), Some("0123456789abcdef-rep"), body).await;
    assert_eq!(st, 403, "{b}");
    assert!(b["message"]
        .as_str()
        .unwrap()
        .contains("may not run work.sleep"));
    // Allowed, but no agent ever offered it: 422, after the token checks.
    let (st, b) = http("POST", url.clone(), Some("0123456789abcdef-web"), body).await;
    assert_eq!(
        (st, b["error"].as_str()),
        (422, Some("unknown-capability")),
        "{b}"
    );
    let body = Some(r#"{"capability":"work.sleep","wait_for_agent":true}"#);
    let (st, b) = http("POST", url.clone(), Some("0123456789abcdef-web"), body).await;
    assert_eq!(st, 202, "{b}");
    let (st, _) = http("GET", format!("http://{addr}/healthz"), None, None).await;
    assert_eq!(st, 200, "health needs no token");
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_allow_list_no_head_of_line_blocking_and_retention() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "agents = [\"agent1@localhost\"]\nretention = \"1s\"\nsubmitters = [\"webapp@localhost\"]\n";
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), extra).await;
    let base = format!("http://{addr}");
    let allowed = start_agent(&server, 1, 2, 5, Arc::new(AtomicUsize::new(0)));
    let intruder_runs = Arc::new(AtomicUsize::new(0));
    let intruder = start_agent(&server, 2, 2, 5, intruder_runs.clone());
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents(&mut w, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        wait_agents(&mut w, 1).await.agents.len(),
        1,
        "agent2 is not in `agents`: never registered"
    );

    // A job nobody can take (its filter matches no agent) does not block the next one.
    let (st, stuck) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.sleep","filter":"gpu"}"#),
    )
    .await;
    assert_eq!(st, 202, "{stuck}");
    let (_, plain) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.sleep"}"#),
    )
    .await;
    let plain_id = plain["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, j) = http("GET", format!("{base}/v1/jobs/{plain_id}"), None, None).await;
        if j["state"] == "succeeded" {
            assert_eq!(j["agent"].as_str(), Some("agent1@localhost/w"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the plain job was blocked: {j}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(intruder_runs.load(Ordering::SeqCst), 0);

    // Finished jobs are forgotten after their retention (1 s here).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (st, _) = http("GET", format!("{base}/v1/jobs/{plain_id}"), None, None).await;
        if st == 404 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job kept past its retention"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    allowed.stop();
    intruder.stop();
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_travel_as_blobs_over_http_and_xmpp() {
    use sha2::Digest as _;
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, addr) =
        start_http_dispatcher(&server, dir.path(), "submitters = [\"webapp@localhost\"]\n").await;
    let cfg = spine_integration::farm::agent_config(&server, 1, "");
    let agent = Agent::builder(cfg)
        .capability("work.digest", None, |ctx: JobContext| async move {
            let hex: String = sha2::Sha256::digest(&ctx.input)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Ok::<_, JobError>(Output::bytes(format!("{} {hex}", ctx.input.len())))
        })
        .build()
        .unwrap();
    tokio::spawn(agent.run(std::future::pending::<()>()));
    let base = format!("http://{addr}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while http(
        "GET",
        format!("{base}/v1/agents?capability=work.digest"),
        None,
        None,
    )
    .await
    .1["agents"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent not registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expect = |data: &[u8]| {
        format!(
            "{} {}",
            data.len(),
            sha2::Sha256::digest(data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    };

    // HTTP: 300 KB, base64 in the JSON body; the dispatcher uploads it to the agent in chunks.
    use base64::Engine as _;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let body = serde_json::json!({ "capability": "work.digest", "input": base64::engine::general_purpose::STANDARD.encode(&data) }).to_string();
    let (st, acc) = http("POST", format!("{base}/v1/jobs"), None, Some(&body)).await;
    assert_eq!(st, 202, "{acc}");
    let id = acc["id"].as_str().unwrap().to_owned();
    let out = loop {
        let (_, j) = http("GET", format!("{base}/v1/jobs/{id}"), None, None).await;
        if j["state"] == "succeeded" {
            break base64::engine::general_purpose::STANDARD
                .decode(j["result"]["output"].as_str().unwrap())
                .unwrap();
        }
        assert!(j["state"] != "failed", "{j}");
        assert!(tokio::time::Instant::now() < deadline + PATIENCE, "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(String::from_utf8(out).unwrap(), expect(&data));

    // HTTP raw upload: the body is the input, the job's fields are query parameters.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client
        .post(format!(
            "{base}/v1/jobs?capability=work.digest&args=%7B%22n%22%3A1%7D&priority=3"
        ))
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let acc: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let id = acc["id"].as_str().unwrap().to_owned();
    let out = loop {
        let (_, j) = http("GET", format!("{base}/v1/jobs/{id}"), None, None).await;
        if j["state"] == "succeeded" {
            break base64::engine::general_purpose::STANDARD
                .decode(j["result"]["output"].as_str().unwrap())
                .unwrap();
        }
        assert!(j["state"] != "failed", "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(String::from_utf8(out).unwrap(), expect(&data));
    let resp = client
        .post(format!(
            "{base}/v1/jobs?capability=work.digest&priority=high"
        ))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let err: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(err["field"], "priority", "{err}");

    // XMPP: the submitter sends chunks to the dispatcher, then submits with a blob reference.
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    let data2: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let blob: spine_protocol::BlobId = "sub-1".parse().unwrap();
    for c in spine_protocol::chunks(&blob, &data2) {
        let cid = w.send_set(&dispatcher_jid(), c).await;
        w.wait_reply(&cid).await.expect("chunk accepted");
    }
    let mut s = Submit::new("work.digest".parse().unwrap());
    s.watch = true;
    s.input = Some(spine_protocol::Data::Blob(spine_protocol::BlobRef {
        blob,
        size: data2.len() as u64,
        sha256: sha2::Sha256::digest(&data2).into(),
        mime: None,
    }));
    let sid = w.send_set(&dispatcher_jid(), s).await;
    w.wait_reply(&sid).await.expect("accepted");
    let st = final_status(&mut w, PATIENCE).await.expect("final status");
    match st.outcome {
        Some(Outcome::Result(r)) => match r.output {
            Some(spine_protocol::Data::Inline { bytes, .. }) => {
                assert_eq!(String::from_utf8(bytes).unwrap(), expect(&data2))
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    dispatcher.stop();
}

#[tokio::test]
async fn an_agent_started_before_its_dispatcher_is_found_within_seconds() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    // Default heartbeat (10 s): only the fast heartbeats after a connect make this quick.
    let cfg = AgentConfig::from_toml(&format!(
        "jid = \"agent1@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\n",
        server.addr
    ))
    .unwrap();
    let agent = Agent::builder(cfg)
        .capability("work.sleep", None, |_ctx: JobContext| async move {
            Ok::<_, JobError>(Output::default())
        })
        .build()
        .unwrap();
    tokio::spawn(agent.run(std::future::pending::<()>()));
    // The agent is online (its advertisement went nowhere) before the dispatcher starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    let dispatcher = start_dispatcher(&server, dir.path());
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents(&mut w, 1).await;
    let took = started.elapsed();
    println!("agent registered {took:?} after the dispatcher started");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    dispatcher.stop();
}

/// An agent whose `work.echo` answers with its own name after `ms`, and records how many
/// echo jobs run at once across all agents sharing `busy`/`peak`.
fn start_echo_agent(
    server: &TestServer,
    n: usize,
    ms: u64,
    busy: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
) -> Running {
    let cfg = spine_integration::farm::agent_config(server, n, "");
    let agent = Agent::builder(cfg)
        .capability("work.echo", None, move |_ctx: JobContext| {
            let (busy, peak) = (busy.clone(), peak.clone());
            async move {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                busy.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, JobError>(Output::bytes(format!("agent{n}")))
            }
        })
        .build()
        .unwrap();
    spine_integration::farm::run_agent(agent)
}

async fn wait_final(base: &str, id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, j) = http("GET", format!("{base}/v1/jobs/{id}"), None, None).await;
        if j["state"]
            .as_str()
            .is_some_and(|s| ["succeeded", "failed", "cancelled", "timed-out"].contains(&s))
        {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_strategy_fans_out_gathers_limits_and_batches() {
    use base64::Engine as _;
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), "").await;
    let base = format!("http://{addr}");
    let (busy, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let agents: Vec<Running> = (1..=4)
        .map(|n| start_echo_agent(&server, n, 150, busy.clone(), peak.clone()))
        .collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while http(
        "GET",
        format!("{base}/v1/agents?capability=work.echo"),
        None,
        None,
    )
    .await
    .1["agents"]
        .as_array()
        .is_none_or(|a| a.len() < 4)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agents not registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every capable agent runs it once; the outcome gathers each agent's answer.
    let (st, acc) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.echo","strategy":"all"}"#),
    )
    .await;
    assert_eq!(st, 202, "{acc}");
    let j = wait_final(&base, acc["id"].as_str().unwrap()).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["children"].as_array().map(Vec::len), Some(4));
    assert_eq!(j["result"]["type"], "application/json");
    assert_eq!(j["result"]["meta"]["succeeded"], 4);
    let report: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(j["result"]["output"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut answers: Vec<String> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(r["output"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    answers.sort();
    assert_eq!(answers, vec!["agent1", "agent2", "agent3", "agent4"]);

    // limit 50% with batch 1: two agents, one at a time.
    peak.store(0, Ordering::SeqCst);
    let (_, acc) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.echo","strategy":"all","limit":"50%","batch":1}"#),
    )
    .await;
    let j = wait_final(&base, acc["id"].as_str().unwrap()).await;
    assert_eq!(
        (j["state"].as_str(), j["result"]["meta"]["agents"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{j}"
    );
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "batch 1: never two children at once"
    );

    // Cancelling the parent cancels its children.
    let (_, acc) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.echo","strategy":"all","batch":1}"#),
    )
    .await;
    let id = acc["id"].as_str().unwrap().to_owned();
    let (st, c) = http("DELETE", format!("{base}/v1/jobs/{id}"), None, None).await;
    assert_eq!((st, c["state"].as_str()), (200, Some("cancelled")), "{c}");
    let (_, j) = http("GET", format!("{base}/v1/jobs/{id}"), None, None).await;
    for child in j["children"].as_array().into_iter().flatten() {
        let (_, cj) = http(
            "GET",
            format!("{base}/v1/jobs/{}", child.as_str().unwrap()),
            None,
            None,
        )
        .await;
        assert_eq!(cj["state"], "cancelled", "{cj}");
    }

    let (st, b) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.echo","limit":"2"}"#),
    )
    .await;
    assert_eq!((st, b["field"].as_str()), (400, Some("limit")));
    for a in agents {
        a.stop();
    }
    dispatcher.stop();
}

/// An agent offering `text.len` (the input's length in bytes, as decimal text) and `num.sum`
/// (the sum of a fragment list of decimals): a map/reduce pair small enough to check by hand.
fn start_len_sum_agent(server: &TestServer, n: usize) -> Running {
    let cfg = spine_integration::farm::agent_config(server, n, "");
    let agent = Agent::builder(cfg)
        .capability("text.len", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(ctx.input.len().to_string()))
        })
        .capability("num.sum", None, |ctx: JobContext| async move {
            let list = spine_protocol::fragments::decode(&ctx.input)
                .map_err(|e| JobError::bad_argument("input", e))?;
            let mut sum = 0u64;
            for f in list {
                sum += String::from_utf8_lossy(&f.data)
                    .parse::<u64>()
                    .map_err(|e| JobError::bad_argument("input", e.to_string()))?;
            }
            Ok::<_, JobError>(Output::bytes(sum.to_string()))
        })
        .build()
        .unwrap();
    spine_integration::farm::run_agent(agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_reduce_over_xmpp_streams_progress_and_pushes_one_outcome() {
    use spine_protocol::{Data, Fragment, MapReduce, Progress};
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let dispatcher = start_dispatcher(&server, dir.path());
    let agents: Vec<Running> = (1..=2).map(|n| start_len_sum_agent(&server, n)).collect();
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    wait_agents_for(&mut w, "text.len", 2).await;

    // Ten fragments of 1..=10 bytes: the lengths sum to 55, through a tree of fan-in 3.
    let fragments: Vec<Fragment> = (1..=10)
        .map(|n| Fragment::new(vec![b'x'; n]).with_name(format!("f{n}")))
        .collect();
    let mut s = Submit::new("text.len".parse().unwrap());
    s.watch = true;
    s.mapreduce = Some(MapReduce {
        reduce: "num.sum".parse().unwrap(),
        split: None,
        fan_in: 3,
    });
    s.input = Some(Data::Inline {
        mime: Some(spine_protocol::FRAGMENTS_MIME.into()),
        bytes: spine_protocol::fragments::encode(&fragments),
    });
    let id = w.send_set(&dispatcher_jid(), s).await;
    let job = Accepted::try_from(w.wait_reply(&id).await.unwrap().unwrap())
        .unwrap()
        .job;
    // Progress headlines for the map/reduce job itself, then its one final status.
    let mut percents = Vec::new();
    let status = loop {
        let st = w
            .wait_for("progress or the final status", |st| match st {
                Stanza::Message(m) => m.payloads.iter().find_map(|p| {
                    if let Ok(pr) = Progress::try_from(p.clone()) {
                        return (pr.job == job).then_some(Err(pr));
                    }
                    JobStatus::try_from(p.clone()).ok().map(Ok)
                }),
                _ => None,
            })
            .await;
        match st {
            Err(pr) => {
                assert!(pr.message.unwrap().contains("/10, reduce steps "));
                percents.push(pr.percent.unwrap());
            }
            Ok(status) => break status,
        }
    };
    assert_eq!(status.job, job);
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    match status.outcome {
        Some(Outcome::Result(r)) => {
            match r.output {
                Some(Data::Inline { bytes, .. }) => assert_eq!(bytes, b"55"),
                other => panic!("{other:?}"),
            }
            assert_eq!(r.meta.0["fragments"], 10);
            // 10 → 4 → 2 → 1
            assert_eq!(r.meta.0["reduce_steps"], 7);
        }
        other => panic!("{other:?}"),
    }
    assert!(!percents.is_empty());
    assert!(percents.windows(2).all(|p| p[0] <= p[1]), "{percents:?}");

    // A bad fragment list is refused at submission, naming the input.
    let mut s = Submit::new("text.len".parse().unwrap());
    s.mapreduce = Some(MapReduce::new("num.sum".parse().unwrap()));
    s.input = Some(Data::Inline {
        mime: None,
        bytes: b"not json".to_vec(),
    });
    let id = w.send_set(&dispatcher_jid(), s).await;
    let e = w.wait_reply(&id).await.unwrap_err();
    let se = SpineError::from_stanza_error(&e).unwrap().unwrap();
    assert_eq!(se.condition, Condition::BadArguments);
    assert_eq!(se.field.as_deref(), Some("input"));
    assert!(se.text.unwrap().contains("not a fragment list"));
    for a in agents {
        a.stop();
    }
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ended_job_has_one_audit_line() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), "").await;
    let base = format!("http://{addr}");
    let (busy, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let agent = start_echo_agent(&server, 1, 300, busy, peak);
    spine_integration::farm::wait_for_agents(&base, "work.echo", 1).await;
    // One success, one cancelled while running, one for a capability nobody offers.
    let (_, ok) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.echo"}"#),
    )
    .await;
    let ok = ok["id"].as_str().unwrap().to_owned();
    let (_, cancelled) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.echo"}"#),
    )
    .await;
    let cancelled = cancelled["id"].as_str().unwrap().to_owned();
    let (st, _) = http("DELETE", format!("{base}/v1/jobs/{cancelled}"), None, None).await;
    assert_eq!(st, 200);
    let (_, none) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.none","wait_for_agent":true}"#),
    )
    .await;
    let none = none["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_final(&base, &ok).await["state"], "succeeded");
    assert_eq!(wait_final(&base, &none).await["state"], "failed");

    let path = dir.path().join("audit.jsonl");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 3 {
            break lines;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    let line = |id: &str| lines.iter().find(|l| l["job"] == id).unwrap().clone();
    let l = line(&ok);
    assert_eq!(
        (
            &l["state"],
            &l["submitter"],
            &l["capability"],
            &l["agent"],
            &l["attempts"]
        ),
        (
            &json!("succeeded"),
            &json!("http:local"),
            &json!("work.echo"),
            &json!("agent1@localhost/w"),
            &json!(1)
        )
    );
    let l = line(&cancelled);
    assert_eq!(
        (&l["state"], &l["condition"]),
        (&json!("cancelled"), &json!("cancelled"))
    );
    let l = line(&none);
    assert_eq!(
        (&l["state"], &l["condition"]),
        (&json!("failed"), &json!("no-agent"))
    );
    agent.stop();
    dispatcher.stop();
}

/// Submit and wait in one request (`POST /v1/jobs?wait=`), the long poll (`GET
/// /v1/jobs/{id}?wait=`), and `POST /v1/jobs:batch`, against a real dispatcher and agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_submit_and_wait_long_poll_and_batch() {
    use base64::Engine as _;
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), "").await;
    let base = format!("http://{addr}");
    // Each job takes 300 ms.
    let agent = start_agent(&server, 1, 4, 300, Arc::new(AtomicUsize::new(0)));
    spine_integration::farm::wait_for_agents(&base, "work.sleep", 1).await;
    let output = |j: &serde_json::Value| {
        let b64 = j["result"]["output"].as_str().unwrap_or_default();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap()
    };

    // One request: 200 with the final job, its output inline.
    let t = tokio::time::Instant::now();
    let (st, j) = http(
        "POST",
        format!("{base}/v1/jobs?wait=20s"),
        None,
        Some(r#"{"capability":"work.sleep"}"#),
    )
    .await;
    assert_eq!(st, 200, "{j}");
    assert_eq!(j["state"], "succeeded", "{j}");
    let id = j["id"].as_str().unwrap().to_owned();
    assert_eq!(output(&j), format!("{id} done by agent1"));
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "answered when it ended"
    );

    // A wait shorter than the job: 202 with the job as it is, then a long poll to its end.
    let (st, j) = http(
        "POST",
        format!("{base}/v1/jobs?wait=50ms"),
        None,
        Some(r#"{"capability":"work.sleep"}"#),
    )
    .await;
    assert_eq!(st, 202, "{j}");
    assert!(
        matches!(
            j["state"].as_str(),
            Some("queued" | "dispatched" | "running")
        ),
        "{j}"
    );
    let id = j["id"].as_str().unwrap().to_owned();
    let (st, j) = http("GET", format!("{base}/v1/jobs/{id}?wait=20s"), None, None).await;
    assert_eq!((st, j["state"].as_str()), (200, Some("succeeded")), "{j}");
    // A long poll of a finished job answers at once.
    let (st, j) = http("GET", format!("{base}/v1/jobs/{id}?wait=20s"), None, None).await;
    assert_eq!((st, j["state"].as_str()), (200, Some("succeeded")), "{j}");

    // A job submitted with no one waiting and no event stream open ends unrendered in the
    // core (`Core::set_listened`); a stream opened while it runs still gets its final event
    // with the whole job.
    let (st, j) = http(
        "POST",
        format!("{base}/v1/jobs"),
        None,
        Some(r#"{"capability":"work.sleep"}"#),
    )
    .await;
    assert_eq!(st, 202, "{j}");
    let id = j["id"].as_str().unwrap().to_owned();
    let stream = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}/v1/jobs/{id}/events"))
        .send();
    let text = tokio::time::timeout(Duration::from_secs(20), async {
        stream.await.unwrap().text().await.unwrap()
    })
    .await
    .expect("the event stream ends with the job");
    let last = text
        .split("\n\n")
        .filter(|e| e.contains("event: final"))
        .last()
        .unwrap_or_else(|| panic!("no final event: {text}"));
    let data = last
        .lines()
        .find_map(|l| l.strip_prefix("data:"))
        .unwrap_or_else(|| panic!("no data: {last}"));
    let fin: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(
        (fin["id"].as_str(), fin["state"].as_str()),
        (Some(id.as_str()), Some("succeeded")),
        "{text}"
    );
    assert_eq!(output(&fin), format!("{id} done by agent1"));

    // A raw upload waits the same way (`wait` is not a job field).
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client
        .post(format!("{base}/v1/jobs?capability=work.sleep&wait=20s"))
        .header("content-type", "application/octet-stream")
        .body("raw input")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let j: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");

    // Bad waits name the field.
    for (q, says) in [("wait=soon", "not a duration"), ("wait=10m", "at most")] {
        let (st, e) = http(
            "POST",
            format!("{base}/v1/jobs?{q}"),
            None,
            Some(r#"{"capability":"work.sleep"}"#),
        )
        .await;
        assert_eq!((st, e["field"].as_str()), (400, Some("wait")), "{e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{e}");
    }
    let (st, e) = http("GET", format!("{base}/v1/jobs/{id}?wiat=1s"), None, None).await;
    assert_eq!(st, 400, "{e}");

    // A batch: each job accepted or refused on its own, in order; idempotency keys hold.
    let batch = r#"{"jobs":[
        {"capability":"work.sleep","idempotency_key":"batch-1"},
        {"capability":"no.such"},
        {"capability":"work.sleep","args":{"n":2}}
    ]}"#;
    let (st, b) = http("POST", format!("{base}/v1/jobs:batch"), None, Some(batch)).await;
    assert_eq!(st, 200, "{b}");
    let jobs = b["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    assert!(
        jobs[0]["id"].is_string() && jobs[2]["id"].is_string(),
        "{b}"
    );
    assert_eq!(jobs[1]["error"], "unknown-capability", "{b}");
    assert_eq!(
        (jobs[1]["status"].as_u64(), jobs[1]["field"].as_str()),
        (Some(422), Some("capability"))
    );
    let (_, again) = http("POST", format!("{base}/v1/jobs:batch"), None, Some(batch)).await;
    assert_eq!(
        again["jobs"][0]["id"], jobs[0]["id"],
        "the same key, the same job"
    );
    assert_ne!(again["jobs"][2]["id"], jobs[2]["id"], "no key, a new job");
    for j in [&jobs[0], &jobs[2]] {
        let id = j["id"].as_str().unwrap();
        let (_, done) = http("GET", format!("{base}/v1/jobs/{id}?wait=20s"), None, None).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    for (body, field) in [(r#"{"jobs":[]}"#, Some("jobs")), (r#"{"job":[]}"#, None)] {
        let (st, e) = http("POST", format!("{base}/v1/jobs:batch"), None, Some(body)).await;
        assert_eq!((st, e["field"].as_str()), (400, field), "{e}");
    }
    agent.stop();
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after_and_delayed_jobs_wait_their_time() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = "submitter_rate = \"1000/s\"\n\
        [[http_token]]\nname = \"web\"\ntoken = \"0123456789abcdef-web\"\ncapabilities = [\"work.*\"]\n\
        rate = \"3/min burst 3\"\ncapability_rates = { \"work.sleep\" = \"1/min\" }\n\
        [[http_token]]\nname = \"ops\"\ntoken = \"0123456789abcdef-ops\"\ncapabilities = [\"*\"]\nmetrics = true\n";
    let (dispatcher, addr) = start_http_dispatcher(&server, dir.path(), tokens).await;
    let base = format!("http://{addr}");
    let agent = start_agent(&server, 1, 2, 300, Arc::new(AtomicUsize::new(0)));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |token: &'static str, body: &'static str| {
        let client = client.clone();
        let url = format!("{base}/v1/jobs");
        async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, retry, body)
        }
    };
    const WEB: &str = "0123456789abcdef-web";
    const OPS: &str = "0123456789abcdef-ops";
    // Wait for the agent with the operator's token (the web token's budget is small).
    for _ in 0..200 {
        let r = client
            .get(format!("{base}/v1/agents?capability=work.sleep"))
            .bearer_auth(OPS)
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        if v["agents"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // work.sleep has its own budget of one a minute.
    let sleep = r#"{"capability":"work.sleep","idempotency_key":"k1"}"#;
    let (st, _, first) = post(WEB, sleep).await;
    assert_eq!(st, 202, "{first}");
    let (st, retry, b) = post(WEB, r#"{"capability":"work.sleep"}"#).await;
    assert_eq!(
        (st, b["error"].as_str()),
        (429, Some("rate-limited")),
        "{b}"
    );
    let retry = retry.expect("Retry-After");
    assert!((55..=60).contains(&retry), "{retry}");
    assert_eq!(b["retry_after"], retry, "{b}");
    let msg = b["message"].as_str().unwrap();
    assert!(
        msg.contains("http:web") && msg.contains("capability_rates.\"work.sleep\""),
        "{msg}"
    );
    // A repeat of an accepted submission costs nothing and answers the same job.
    let (st, _, again) = post(WEB, sleep).await;
    assert_eq!((st, &again["id"]), (202, &first["id"]), "{again}");
    // Other capabilities draw on `rate` (3 at once, one spent above).
    let other = r#"{"capability":"work.other","wait_for_agent":true}"#;
    for _ in 0..2 {
        let (st, _, b) = post(WEB, other).await;
        assert_eq!(st, 202, "{b}");
    }
    let (st, retry, b) = post(WEB, other).await;
    assert_eq!(
        (st, b["error"].as_str()),
        (429, Some("rate-limited")),
        "{b}"
    );
    assert!(b["message"].as_str().unwrap().contains("(rate = "), "{b}");
    assert!(retry.is_some_and(|s| (15..=20).contains(&s)), "{retry:?}");
    // Another token has its own budget.
    let (st, _, b) = post(OPS, other).await;
    assert_eq!(st, 202, "{b}");
    // The refusals are counted by reason.
    let m = client
        .get(format!("{base}/metrics"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("spine_jobs_refused_total{capability=\"work.sleep\",reason=\"rate-limited\"} 1"),
        "{m}"
    );

    // A delayed job: accepted at once, placed at its time.
    let t0 = tokio::time::Instant::now();
    let (st, _, b) = post(OPS, r#"{"capability":"work.sleep","not_before":"2s"}"#).await;
    assert_eq!((st, b["state"].as_str()), (202, Some("accepted")), "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let (_, j) = http("GET", format!("{base}/v1/jobs/{id}"), Some(OPS), None).await;
    assert_eq!(j["state"], "accepted", "{j}");
    assert!(
        j["not_before"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{j}"
    );
    let (st, j) = http(
        "GET",
        format!("{base}/v1/jobs/{id}?wait=20s"),
        Some(OPS),
        None,
    )
    .await;
    assert_eq!((st, j["state"].as_str()), (200, Some("succeeded")), "{j}");
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    // One far ahead is cancelled while it waits; one too far ahead or unreadable is refused.
    let (st, _, b) = post(
        OPS,
        r#"{"capability":"work.sleep","not_before":"2099-01-01T00:00:00Z"}"#,
    )
    .await;
    assert_eq!((st, b["field"].as_str()), (400, Some("not_before")), "{b}");
    assert!(b["message"].as_str().unwrap().contains("max_delay"), "{b}");
    let (st, _, b) = post(
        OPS,
        r#"{"capability":"work.sleep","not_before":"tomorrow"}"#,
    )
    .await;
    assert_eq!((st, b["field"].as_str()), (400, Some("not_before")), "{b}");
    let (st, _, b) = post(OPS, r#"{"capability":"work.sleep","not_before":"1h"}"#).await;
    assert_eq!(st, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let (st, b) = http("DELETE", format!("{base}/v1/jobs/{id}"), Some(OPS), None).await;
    assert_eq!((st, b["state"].as_str()), (200, Some("cancelled")), "{b}");
    agent.stop();
    dispatcher.stop();
}
