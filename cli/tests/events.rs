//! Event rules (docs/events.md) through a real `spine dispatcher` process: CloudEvents in
//! structured, binary and batched modes, a signed webhook, a rule on a job's outcome, a dead
//! letter, and an event sent again after `kill -9` and a restart making no second job.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{run_agent, wait_for_agents};
use spine_integration::{TestServer, PATIENCE};
use tokio::process::{Child, Command};

const SECRET: &str = "a-webhook-secret-of-some-length";

fn rules(webhook_secret_file: &std::path::Path) -> String {
    format!(
        r#"
[[rule]]
name = "upper"
on = {{ type = "com.example.note.*", source = "/notes" }}
when = "data.lang = en"
do = {{ capability = "text.upper", args = {{ lang = "{{{{data.lang}}}}" }}, input = "{{{{data.text}}}}" }}

[[rule]]
name = "raw"
on = {{ type = "com.example.raw" }}
do = {{ capability = "text.upper", input = "{{{{data}}}}" }}

[[rule]]
name = "index-upper"
on = {{ type = "spine.job.succeeded", subject = "text.upper" }}
when = "data.submitter = rule:upper"
do = {{ capability = "notes.index", args = {{ of = "{{{{data.id}}}}" }} }}

[[rule]]
name = "on-push"
on = {{ type = "com.github.push", source = "/webhooks/github" }}
do = {{ capability = "text.upper", input = "{{{{data.ref}}}}" }}

[[rule]]
name = "broken"
on = {{ type = "com.example.broken" }}
do = {{ capability = "notes.fail" }}
retry = {{ attempts = 1, max_age = "1h" }}

[[submitter]]
jid = "uploads@localhost"
capabilities = []
events = true

[[submitter]]
jid = "app@localhost"
capabilities = ["text.*"]

[[webhook]]
name = "github"
secret_file = "{}"
type = "com.github"
type_header = "X-GitHub-Event"
id_header = "X-GitHub-Delivery"
"#,
        webhook_secret_file.display()
    )
}

/// A dispatcher's configuration in `dir`: its account on `server`, its HTTP API on `port`,
/// then `extra` (rules, schedules, …).
fn dispatcher_config(
    dir: &std::path::Path,
    server: &TestServer,
    port: u16,
    extra: &str,
) -> std::path::PathBuf {
    let config = dir.join("dispatcher.toml");
    let text = format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\n\
         data_dir = \"{}\"\nhttp_listen = \"127.0.0.1:{port}\"\n\n{extra}",
        server.addr,
        dir.join("data").display(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// A `spine agent` configuration in `dir` for agent2 with `watches` (`[[watch]]` sections) and
/// a capability of its own (an agent offers at least one).
fn watcher_config(dir: &std::path::Path, server: &TestServer, watches: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "jid = \"agent2@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\n\
         dispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"1s\"\n\
         [[capability]]\nname = \"files.noop\"\nkind = \"exec\"\nargv = [\"true\"]\n\n{watches}",
        server.addr,
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `spine <part> --config config` (`agent`, `dispatcher`), killed when dropped.
fn spawn_spine(part: &str, config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spine"))
        .args([part, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start spine {part}: {e}"))
}

fn spawn_agent(config: &std::path::Path) -> Child {
    spawn_spine("agent", config)
}

fn spawn_dispatcher(config: &std::path::Path) -> Child {
    spawn_spine("dispatcher", config)
}

/// agent1, offering `text.upper` (its input in upper case), in this process.
fn upper_agent(server: &TestServer) -> spine_integration::farm::Running {
    let agent = Agent::builder(spine_integration::farm::agent_config(
        server,
        1,
        "slots = 4",
    ))
    .capability("text.upper", None, |ctx: JobContext| async move {
        Ok::<_, JobError>(Output::bytes(
            String::from_utf8_lossy(&ctx.input).to_uppercase(),
        ))
    })
    .build()
    .unwrap();
    run_agent(agent)
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// The API of a dispatcher on loopback `port`.
    fn at(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

impl Api {
    async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<String>,
    ) -> (u16, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        json_of(r.body(body.into()).send().await.unwrap()).await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = json_of(
            self.http
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// Job `id` once it ended (it must, within the wait).
    async fn ended(&self, id: &str) -> Value {
        let j = self.get(&format!("/v1/jobs/{id}?wait=20s")).await;
        let state = j["state"].as_str().unwrap_or("");
        assert!(
            ["succeeded", "failed", "timed-out", "cancelled"].contains(&state),
            "{j}"
        );
        j
    }

    async fn output(&self, id: &str) -> String {
        let j = self.ended(id).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        self.http
            .get(format!("{}/v1/jobs/{id}/output", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/metrics`, as text.
    async fn metrics(&self) -> String {
        let r = self.http.get(format!("{}/metrics", self.base)).send();
        r.await.unwrap().text().await.unwrap()
    }

    /// An open event stream.
    async fn sse(&self, path: &str) -> reqwest::Response {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r
    }

    async fn structured(&self, ev: Value) -> (u16, Value) {
        self.post(
            "/v1/events",
            &[("content-type", "application/cloudevents+json")],
            ev.to_string(),
        )
        .await
    }

    /// The one job an answer names, by its rule.
    fn job_of(answer: &Value, rule: &str) -> String {
        let jobs = answer["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 1, "{answer}");
        assert_eq!(jobs[0]["rule"], rule, "{answer}");
        jobs[0]["id"].as_str().unwrap().to_owned()
    }

    async fn until_up(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self
            .http
            .get(format!("{}/healthz", self.base))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the dispatcher did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The next `data:` of an event stream, as JSON (within the test's patience).
async fn next_event(r: &mut reqwest::Response) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut buf = String::new();
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                return serde_json::from_str(data.trim()).unwrap();
            }
            continue;
        }
        let chunk = tokio::time::timeout_at(deadline, r.chunk())
            .await
            .expect("an event in time")
            .unwrap()
            .expect("the stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

fn note(id: &str, text: &str) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "/notes", "type": "com.example.note.created",
        "data": { "text": text, "lang": "en" },
    })
}

fn signed(body: &str) -> String {
    spine_integration::webhook_signature(SECRET, body.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_make_jobs_once_through_rules_webhooks_outcomes_and_a_kill_9() {
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("uploads", "pw-u"),
        ("app", "pw-a"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("github.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let config = dir.path().join("dispatcher.toml");
    let port = spine_integration::free_port().unwrap();
    std::fs::write(
        &config,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:{port}\"\nno_agent_wait = \"2s\"\n{}",
            server.addr,
            dir.path().join("data").display(),
            rules(&secret_file)
        ),
    )
    .unwrap();
    let agent = Agent::builder(spine_integration::farm::agent_config(
        &server,
        1,
        "slots = 4",
    ))
    .capability("text.upper", None, |ctx: JobContext| async move {
        Ok::<_, JobError>(Output::bytes(
            String::from_utf8_lossy(&ctx.input).to_uppercase(),
        ))
    })
    .capability("notes.index", None, |ctx: JobContext| async move {
        Ok::<_, JobError>(Output::bytes(format!("indexed {}", ctx.arg_str("of")?)))
    })
    .capability("notes.fail", None, |_ctx: JobContext| async move {
        Err::<Output, _>(JobError::Failed("this capability is broken".into()))
    })
    .build()
    .unwrap();
    let _agent = run_agent(agent);
    let mut child = spawn_dispatcher(&config);
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    };
    api.until_up().await;
    wait_for_agents(&api.base, "notes.fail", 1).await;

    // Followers of the outbound stream: rules' firings, and text.upper jobs' successes.
    let mut fired = api.sse("/v1/events/stream?type=spine.rule.fired").await;
    let mut succeeded = api
        .sse("/v1/events/stream?type=spine.job.succeeded&subject=text.upper")
        .await;

    // Structured mode: the rule's job runs with the event's data as input.
    let (status, answer) = api.structured(note("n-1", "hello")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (answer["id"].as_str(), answer["source"].as_str()),
        (Some("n-1"), Some("/notes"))
    );
    let upper = Api::job_of(&answer, "upper");
    assert_eq!(api.output(&upper).await, "HELLO");
    let job = api.ended(&upper).await;
    assert_eq!(job["submitter"], "rule:upper");
    assert_eq!(job["args"]["lang"], "en");
    assert_eq!(job["event"]["id"], "n-1");
    assert_eq!(job["event"]["rule"], "upper");
    // Both streams told of it, as CloudEvents.
    let ce = next_event(&mut fired).await;
    assert_eq!(
        (ce["type"].as_str(), ce["subject"].as_str()),
        (Some("spine.rule.fired"), Some("upper")),
        "{ce}"
    );
    assert_eq!(ce["data"]["job"], upper.as_str());
    assert_eq!(ce["data"]["event"]["id"], "n-1");
    let ce = next_event(&mut succeeded).await;
    assert_eq!(
        (ce["id"].as_str(), ce["source"].as_str()),
        (Some(upper.as_str()), Some("/spine/jobs")),
        "{ce}"
    );
    assert_eq!(ce["data"]["state"], "succeeded");
    // The same event again: the same job.
    let (status, again) = api.structured(note("n-1", "hello")).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(Api::job_of(&again, "upper"), upper);

    // Its success fired the rule on outcomes: a job that names it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let indexed = loop {
        let list = api.get("/v1/jobs?submitter=rule:index-upper").await;
        if let Some(j) = list["jobs"].as_array().and_then(|a| a.first()) {
            break j["id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no job of index-upper: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(api.output(&indexed).await, format!("indexed {upper}"));
    let j = api.ended(&indexed).await;
    assert_eq!(
        (j["event"]["type"].as_str(), j["event"]["depth"].as_u64()),
        (Some("spine.job.succeeded"), Some(1))
    );

    // Binary mode: the body is the data, bytes as they came.
    let (status, answer) = api
        .post(
            "/v1/events",
            &[
                ("ce-specversion", "1.0"),
                ("ce-id", "r-1"),
                ("ce-source", "/raw"),
                ("ce-type", "com.example.raw"),
                ("content-type", "text/plain"),
            ],
            "binary note",
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        api.output(&Api::job_of(&answer, "raw")).await,
        "BINARY NOTE"
    );

    // A batch: each event answered in order, an invalid one refused on its own.
    let (status, batch) = api
        .post(
            "/v1/events",
            &[("content-type", "application/cloudevents-batch+json")],
            json!([note("n-2", "two"), {"specversion": "1.0", "id": "x", "source": "/notes"}, note("n-3", "three")]).to_string(),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    let items = batch["events"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(api.output(&Api::job_of(&items[0], "upper")).await, "TWO");
    assert_eq!(
        (items[1]["error"].as_str(), items[1]["field"].as_str()),
        (Some("bad-request"), Some("[1]")),
        "{batch}"
    );
    assert_eq!(api.output(&Api::job_of(&items[2], "upper")).await, "THREE");

    // Over XMPP: <event/> from an account allowed to send events, answered with <fired/>.
    let to: jid::Jid = "dispatcher@localhost/d1".parse().unwrap();
    let mut uploads = TestDispatcher::new(server.client("uploads", "pw-u").await).await;
    let ev = spine_protocol::events::Event {
        id: "x-1".into(),
        source: "/notes".into(),
        ty: "com.example.note.created".into(),
        subject: None,
        time: None,
        data: spine_protocol::events::EventData::Json(json!({ "text": "over xmpp", "lang": "en" })),
    };
    let id = uploads.send_set(&to, ev.clone()).await;
    let reply = uploads
        .wait_reply(&id)
        .await
        .expect("fired")
        .expect("a payload");
    let fired = spine_protocol::events::Fired::try_from(reply).unwrap();
    assert_eq!(fired.event, "x-1");
    assert_eq!(fired.jobs.len(), 1);
    assert_eq!(fired.jobs[0].rule, "upper");
    let over_xmpp = fired.jobs[0].job.to_string();
    assert_eq!(api.output(&over_xmpp).await, "OVER XMPP");
    // Sent again: the same job.
    let id = uploads.send_set(&to, ev.clone()).await;
    let again =
        spine_protocol::events::Fired::try_from(uploads.wait_reply(&id).await.unwrap().unwrap())
            .unwrap();
    assert_eq!(again.jobs[0].job.to_string(), over_xmpp);
    // An account that may submit text.* but not send events is refused.
    let mut app = TestDispatcher::new(server.client("app", "pw-a").await).await;
    let id = app.send_set(&to, ev).await;
    let refused = app.wait_reply(&id).await.unwrap_err();
    assert_eq!(
        spine_protocol::SpineError::from_stanza_error(&refused)
            .unwrap()
            .expect("a Spine condition")
            .condition,
        spine_protocol::Condition::NotAuthorized,
        "{refused:?}"
    );

    // A webhook that signs: a plain JSON body becomes an event of its type and id headers.
    let push = json!({ "ref": "refs/heads/main" }).to_string();
    let sig = signed(&push);
    let hook = |sig: &str| {
        vec![
            ("content-type", "application/json"),
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "delivery-1"),
            ("X-Hub-Signature-256", sig),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_owned()))
        .collect::<Vec<_>>()
    };
    let headers = hook(&sig);
    let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, answer) = api.post("/v1/events/github", &hdrs, push.clone()).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["id"], "delivery-1");
    assert_eq!(
        api.output(&Api::job_of(&answer, "on-push")).await,
        "REFS/HEADS/MAIN"
    );
    let bad = hook(&signed("another body"));
    let hdrs: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, refused) = api.post("/v1/events/github", &hdrs, push.clone()).await;
    assert_eq!(status, 401, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{refused}"
    );
    let (status, _) = api.post("/v1/events/gitlab", &hdrs, push).await;
    assert_eq!(status, 404);

    // An event older than its rule's max_age (6 h by default): its job times out at once,
    // a dead letter.
    let mut stale = note("n-old", "late");
    stale["time"] = json!("2020-01-01T00:00:00Z");
    let (status, answer) = api.structured(stale).await;
    assert_eq!(status, 202, "{answer}");
    let late = api.ended(&Api::job_of(&answer, "upper")).await;
    assert_eq!(late["state"], "timed-out", "{late}");

    // Refusals name what is wrong.
    let (status, e) = api
        .post("/v1/events", &[("content-type", "application/json")], "{}")
        .await;
    assert_eq!(
        (status, e["field"].as_str()),
        (400, Some("ce-specversion")),
        "{e}"
    );
    let mut lacking = note("n-9", "x");
    lacking["data"] = json!({ "lang": "en" });
    let (status, e) = api.structured(lacking).await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(
        e["message"],
        "rule 'upper': do.input: the event has no data.text"
    );

    // A rule whose job fails: a dead letter, listed and counted.
    let (status, answer) = api
        .structured(json!({"specversion": "1.0", "id": "b-1", "source": "/b", "type": "com.example.broken"}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let broken = Api::job_of(&answer, "broken");
    assert_eq!(api.ended(&broken).await["state"], "failed");
    let rules = api.get("/v1/rules").await;
    let rule = |name: &str| {
        rules["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no rule {name}: {rules}"))
            .clone()
    };
    assert_eq!(rule("broken")["counts"]["dead_letters"], 1, "{rules}");
    assert_eq!(rule("upper")["counts"]["jobs"], 5, "{rules}");
    assert_eq!(rule("upper")["counts"]["dead_letters"], 1, "{rules}");
    assert_eq!(rule("upper")["counts"]["duplicates"], 2, "{rules}");
    assert_eq!(rule("upper")["counts"]["errors"], 1, "{rules}");
    let dead = api
        .get(rule("broken")["dead_letters"].as_str().unwrap())
        .await;
    let dead_ids: Vec<&str> = dead["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(dead_ids, vec![broken.as_str()]);
    let metrics = api.metrics().await;
    for line in [
        "spine_rule_jobs_total{rule=\"upper\"} 5",
        "spine_rule_dead_letters_total{rule=\"broken\"} 1",
        "spine_rule_jobs_total{rule=\"index-upper\"} 4",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }

    // kill -9, restart: the event sent again finds the job it made (stored before the 202).
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait().await;
    let _child = spawn_dispatcher(&config);
    api.until_up().await;
    let (status, after) = api.structured(note("n-1", "hello")).await;
    assert_eq!(status, 202, "{after}");
    assert_eq!(
        Api::job_of(&after, "upper"),
        upper,
        "no second job after the restart"
    );
}

/// A schedule firing every second for 30 s of real time, its dispatcher killed (-9) and
/// started again in the middle: every tick ran once or is counted missed by the dispatcher
/// that came back (catch_up = "once": of the ticks missed while it was down, the latest ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_every_second_survives_a_kill_9_without_a_tick_doubled() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatcher.toml");
    let port = spine_integration::free_port().unwrap();
    std::fs::write(
        &config,
        format!(
            r#"jid = "dispatcher@localhost/d1"
password = "pw-d"
server = "{}"
data_dir = "{}"
http_listen = "127.0.0.1:{port}"

[[schedule]]
name = "every-second"
cron = "* * * * * *"
catch_up = "once"

[[rule]]
name = "tick"
on = {{ type = "spine.schedule", subject = "every-second" }}
do = {{ capability = "notes.index", args = {{ of = "{{{{data.tick}}}}" }} }}
"#,
            server.addr,
            dir.path().join("data").display(),
        ),
    )
    .unwrap();
    let agent = Agent::builder(spine_integration::farm::agent_config(
        &server,
        1,
        "slots = 4",
    ))
    .capability("notes.index", None, |ctx: JobContext| async move {
        Ok::<_, JobError>(Output::bytes(ctx.arg_str("of")?.to_owned()))
    })
    .build()
    .unwrap();
    let _agent = run_agent(agent);
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    };
    let started = tokio::time::Instant::now();
    let mut child = spawn_dispatcher(&config);
    api.until_up().await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait().await;
    // Down for two seconds and more: ticks are missed.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let _child = spawn_dispatcher(&config);
    api.until_up().await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(started.elapsed())).await;

    let list = api.get("/v1/jobs?submitter=rule:tick&limit=1000").await;
    let mut ticks: Vec<i64> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            let id = j["event"]["id"]
                .as_str()
                .expect("a tick's job names its tick");
            chrono_secs(id)
        })
        .collect();
    let n = ticks.len();
    ticks.sort_unstable();
    ticks.dedup();
    assert_eq!(ticks.len(), n, "a tick made two jobs: {list}");
    assert!(n >= 20, "{n} ticks in 30 s");
    let (first, last) = (ticks[0], ticks[n - 1]);
    let absent = (last - first + 1) as u64 - n as u64;
    assert!(absent >= 1, "a kill -9 of 2.5 s missed no tick: {ticks:?}");
    eprintln!("schedule: {n} ticks ran once each, {absent} absent over the kill -9 and restart");
    let rules = api.get("/v1/rules").await;
    let s = &rules["schedules"][0];
    assert_eq!(s["name"], "every-second", "{rules}");
    assert_eq!(
        s["counts"]["missed"].as_u64(),
        Some(absent),
        "every tick absent is one the dispatcher that came back counted missed: {ticks:?} {rules}"
    );
    for j in list["jobs"].as_array().unwrap() {
        let id = j["id"].as_str().unwrap();
        let done = api.ended(id).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
}

/// Seconds since the UNIX epoch of an RFC 3339 time like `2026-11-26T10:00:01.000Z`.
fn chrono_secs(t: &str) -> i64 {
    let d = humantime::parse_rfc3339(t).unwrap_or_else(|e| panic!("{t}: {e}"));
    d.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A capability broken on one of two agents (it answers garbage): its canaries quarantine it
/// within two intervals, real jobs stop going there, and it comes back once it is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_agent_is_quarantined_by_its_canaries_and_released_when_fixed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let server =
        TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatcher.toml");
    let port = spine_integration::free_port().unwrap();
    std::fs::write(
        &config,
        format!(
            r#"jid = "dispatcher@localhost/d1"
password = "pw-d"
server = "{}"
data_dir = "{}"
http_listen = "127.0.0.1:{port}"

[[canary]]
capability = "text.upper"
input = "ping"
expect = "PING"
interval = "1s"
timeout = "5s"
quarantine_after = 2
release_after = 2
"#,
            server.addr,
            dir.path().join("data").display(),
        ),
    )
    .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let mut agents = Vec::new();
    for n in 1..=2 {
        let broken = broken.clone();
        let agent = Agent::builder(spine_integration::farm::agent_config(
            &server,
            n,
            "slots = 4",
        ))
        .capability("text.upper", None, move |ctx: JobContext| {
            let garbage = n == 2 && broken.load(Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let text = String::from_utf8_lossy(&ctx.input);
                Ok::<_, JobError>(Output::bytes(if garbage {
                    text.chars().rev().collect::<String>()
                } else {
                    text.to_uppercase()
                }))
            }
        })
        .build()
        .unwrap();
        agents.push(run_agent(agent));
    }
    let _child = spawn_dispatcher(&config);
    let api = Api {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    };
    api.until_up().await;
    wait_for_agents(&api.base, "text.upper", 2).await;
    let registered = tokio::time::Instant::now();
    let canary = |list: &Value, agent: &str| {
        list["canaries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["agent"] == agent)
            .cloned()
            .unwrap_or(Value::Null)
    };
    const A1: &str = "agent1@localhost/w";
    const A2: &str = "agent2@localhost/w";
    // Quarantined within two intervals (and the housekeeping and the jobs' own time).
    let quarantined_after = loop {
        let list = api.get("/v1/canaries").await;
        if canary(&list, A2)["quarantined"] == true {
            assert_eq!(canary(&list, A1)["quarantined"], false, "{list}");
            assert!(
                canary(&list, A2)["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not the expected one")),
                "{list}"
            );
            break registered.elapsed();
        }
        assert!(
            registered.elapsed() < PATIENCE,
            "agent2 never quarantined: {list}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        quarantined_after < Duration::from_millis(3_000),
        "quarantined after {quarantined_after:?}: more than two 1 s intervals and their slack"
    );
    eprintln!("canaries: agent2 quarantined {quarantined_after:?} after it registered");

    // Real jobs all go to agent1 while agent2 is quarantined.
    let batch = |n: usize| {
        json!({ "jobs": (0..n).map(|i| json!({
            "capability": "text.upper", "input": base64_of(&format!("job {i}")),
        })).collect::<Vec<_>>() })
        .to_string()
    };
    let (status, answer) = api
        .post(
            "/v1/jobs:batch",
            &[("content-type", "application/json")],
            batch(16),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let ran_on = agents_of(&api, answer).await;
    assert!(
        ran_on.iter().all(|a| a == A1),
        "a real job went to the quarantined agent: {ran_on:?}"
    );

    // Fixed: two passing canaries release it, and it gets real jobs again.
    broken.store(false, Ordering::SeqCst);
    let fixed = tokio::time::Instant::now();
    loop {
        let list = api.get("/v1/canaries").await;
        if canary(&list, A2)["quarantined"] == false {
            break;
        }
        assert!(fixed.elapsed() < PATIENCE, "agent2 never released: {list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "canaries: agent2 released {:?} after it was fixed",
        fixed.elapsed()
    );
    let (_, answer) = api
        .post(
            "/v1/jobs:batch",
            &[("content-type", "application/json")],
            batch(16),
        )
        .await;
    let ran_on = agents_of(&api, answer).await;
    assert!(
        ran_on.iter().any(|a| a == A2),
        "agent2 got no job after its release: {ran_on:?}"
    );
    let metrics = api.metrics().await;
    for line in [
        "spine_quarantines_total 1".to_owned(),
        format!("spine_agent_quarantined{{capability=\"text.upper\",agent=\"{A2}\"}} 0"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The agent each job of a batch's answer ran on, once it succeeded.
async fn agents_of(api: &Api, answer: Value) -> Vec<String> {
    let ids: Vec<String> = answer["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().expect("accepted").to_owned())
        .collect();
    let mut out = Vec::new();
    for id in ids {
        let j = api.ended(&id).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        out.push(j["agent"].as_str().unwrap().to_owned());
    }
    out
}

/// The TOML block after `<!-- example: NAME -->` in docs/events.md.
fn docs_example(name: &str) -> String {
    let doc = include_str!("../../docs/events.md");
    let marker = format!("<!-- example: {name} -->\n```toml\n");
    let start = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("no example {name}"))
        + marker.len();
    doc[start..].split("```").next().unwrap().to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The seeds' two examples as docs/events.md writes them: an upload directory watched by a
/// real `spine agent` process (files written slowly, in pieces, by another process; the
/// watcher killed with -9 and restarted in the middle), each file making exactly one job with
/// the file as its input by reference; and a change event whose job's end reaches the exams
/// office's XMPP account as a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_examples_run_as_written() {
    use sha2::Digest as _;
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("agent2", "pw"),
        ("exams", "pw-e"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let port = spine_integration::free_port().unwrap();
    let rules = format!(
        "{}\n{}",
        docs_example("uploads-rule").replace("ftp1@example.com", "agent2@localhost"),
        docs_example("marks").replace("exams@example.com", "exams@localhost"),
    );
    let config = dispatcher_config(dir.path(), &server, port, &rules);
    // The worker: thumbnails (the SHA-256 of the input, to prove it is the file) and updates.
    let worker = Agent::builder(spine_integration::farm::agent_config(
        &server,
        1,
        "slots = 4",
    ))
    .capability("image.thumbnail", None, |ctx: JobContext| async move {
        let digest = sha2::Sha256::digest(&ctx.input);
        let name = ctx.arg_str("name")?.to_owned();
        Ok::<_, JobError>(Output::bytes(format!("{}:{name}", hex(&digest))))
    })
    .capability("exams.update", None, |ctx: JobContext| async move {
        let change: Value = serde_json::from_slice(&ctx.input)
            .map_err(|e| JobError::bad_argument("input", e.to_string()))?;
        Ok::<_, JobError>(
            Output::bytes(format!(
                "{} changed the {} marks of {} students",
                ctx.arg_str("teacher")?,
                ctx.arg_str("course")?,
                change["students"]
            ))
            .with_mime("text/plain"),
        )
    })
    .build()
    .unwrap();
    let _worker = run_agent(worker);
    let _dispatcher = spawn_dispatcher(&config);
    let api = Api::at(port);
    api.until_up().await;
    wait_for_agents(&api.base, "image.thumbnail", 1).await;

    // The watcher: a real `spine agent` with the docs' [[watch]], on agent2@localhost.
    let watches =
        docs_example("uploads-agent").replace("/srv/ftp/incoming", incoming.to_str().unwrap());
    let agent_toml = watcher_config(dir.path(), &server, &watches);
    let spawn_watcher = || spawn_agent(&agent_toml);
    let mut watcher = spawn_watcher();
    wait_for_agents(&api.base, "files.noop", 1).await;
    // Another process writes six photos, each in four pieces 0.4 s apart (under the 2 s
    // settle), two at a time; and a file the pattern does not take.
    const FILES: usize = 6;
    let script = format!(
        "cd '{}' && for i in 1 2 3 4 5 6; do \
           (for p in 1 2 3 4; do head -c 50000 /dev/urandom >> photo$i.jpg; sleep 0.4; done) & \
           if [ $((i % 2)) = 0 ]; then wait; fi; \
         done; wait; echo skip > notes.txt",
        incoming.display()
    );
    let mut writer = Command::new("bash")
        .args(["-c", &script])
        .kill_on_drop(true)
        .spawn()
        .expect("start the writer");
    // The watcher dies mid-way and comes back: files it had sent are sent again under the
    // same ids and make no second job.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let pid = nix::unistd::Pid::from_raw(watcher.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = watcher.wait().await;
    let mut _watcher = spawn_watcher();
    assert!(writer.wait().await.unwrap().success(), "the writer failed");
    // Every photo's job, and the directory emptied of photos (after = "delete").
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let jobs = loop {
        let list = api
            .get("/v1/jobs?submitter=rule:thumbnail-uploads&limit=100")
            .await;
        let photos_left = std::fs::read_dir(&incoming)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("photo"))
            })
            .count();
        let jobs = list["jobs"].as_array().unwrap().clone();
        if jobs.len() >= FILES && photos_left == 0 {
            break jobs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} jobs, {photos_left} photos left: {list}",
            jobs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Nothing more comes (a settle and more later).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let list = api
        .get("/v1/jobs?submitter=rule:thumbnail-uploads&limit=100")
        .await;
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        FILES,
        "one job per file: {list}"
    );
    let mut names = Vec::new();
    for j in &jobs {
        let id = j["id"].as_str().unwrap();
        let done = api.ended(id).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(
            done["event"]["source"], "/agents/agent2@localhost/uploads",
            "{done}"
        );
        // By reference: the job's input is the whole file, 4 × 50,000 bytes, in the store.
        assert_eq!(done["input"]["size"], 200_000, "{done}");
        let out = api.output(id).await;
        let (digest, name) = out.split_once(':').expect("digest:name");
        assert_eq!(digest.len(), 64, "{out}");
        names.push(name.to_owned());
    }
    names.sort();
    assert_eq!(
        names,
        (1..=FILES)
            .map(|i| format!("photo{i}.jpg"))
            .collect::<Vec<_>>()
    );
    assert!(
        incoming.join("notes.txt").exists(),
        "not a *.jpg: left alone"
    );
    // A file kept after its event (after = "keep"), and the watcher killed and restarted:
    // it sees the file again, sends the same event, and the dispatcher makes no second job.
    let kept = std::fs::read_to_string(&agent_toml)
        .unwrap()
        .replace("after = \"delete\"", "after = \"keep\"");
    std::fs::write(&agent_toml, kept).unwrap();
    let kill9 = |c: &tokio::process::Child| {
        let pid = nix::unistd::Pid::from_raw(c.id().expect("pid") as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    };
    kill9(&_watcher);
    let _ = _watcher.wait().await;
    let mut watcher = spawn_watcher();
    std::fs::write(incoming.join("kept.jpg"), vec![9u8; 70_000]).unwrap();
    let count = |list: &Value| list["jobs"].as_array().map_or(0, Vec::len);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let kept_job = loop {
        let list = api
            .get("/v1/jobs?submitter=rule:thumbnail-uploads&limit=100")
            .await;
        if count(&list) == FILES + 1 {
            // Listed newest first.
            break list["jobs"][0]["id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no job for kept.jpg: {list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(api.output(&kept_job).await.ends_with(":kept.jpg"));
    kill9(&watcher);
    let _ = watcher.wait().await;
    let _watcher = spawn_watcher();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let counts = loop {
        let rules = api.get("/v1/rules").await;
        let counts = rules["rules"][0]["counts"].clone();
        if counts["duplicates"].as_u64() >= Some(1) {
            break counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted watcher did not send kept.jpg again: {rules}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let list = api
        .get("/v1/jobs?submitter=rule:thumbnail-uploads&limit=100")
        .await;
    assert_eq!(count(&list), FILES + 1, "kept.jpg made one job: {list}");
    assert!(incoming.join("kept.jpg").exists());
    eprintln!("uploads: {FILES} files and one kept, {} jobs, across three kill -9s of the watcher: {counts}", FILES + 1);

    // The marks change: the exams office hears of the update by message.
    let mut exams =
        spine_integration::dispatcher::TestDispatcher::new(server.client("exams", "pw-e").await)
            .await;
    let (status, answer) = api
        .structured(json!({
            "specversion": "1.0", "id": "marks-7", "source": "/gradebook",
            "type": "com.example.marks.changed",
            "data": { "teacher": "alice", "course": "maths", "students": 3 },
        }))
        .await;
    assert_eq!(status, 202, "{answer}");
    let job = Api::job_of(&answer, "marks-to-exams-office");
    let (body, ev) = exams
        .wait_for("the exams office's message", |st| match st {
            tokio_xmpp::Stanza::Message(m) => {
                let ev = m.payloads.iter().find(|p| p.name() == "event")?;
                let ev = spine_protocol::events::Event::try_from(ev.clone()).ok()?;
                Some((m.bodies.values().next()?.clone(), ev))
            }
            _ => None,
        })
        .await;
    assert_eq!(ev.ty, "spine.job.succeeded");
    assert_eq!(ev.id, job);
    assert_eq!(ev.subject.as_deref(), Some("exams.update"));
    assert_eq!(
        body,
        "spine.job.succeeded exams.update: alice changed the maths marks of 3 students"
    );
    let metrics = api.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "spine_subscription_messages_total{subscription=\"exams-office\"} 1"),
        "{metrics}"
    );
}

/// Rules made over the HTTP API: checked, stored before the answer, firing, still there
/// after a `kill -9` and a restart, deleted; the configuration's own rules are read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_made_over_the_api_hold_across_a_kill_9() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = spine_integration::free_port().unwrap();
    let config = dispatcher_config(
        dir.path(),
        &server,
        port,
        "[[rule]]\nname = \"configured\"\non = { type = \"com.example.other\" }\n\
         do = { capability = \"text.upper\" }\n",
    );
    let _agent = upper_agent(&server);
    let mut child = spawn_dispatcher(&config);
    let api = Api::at(port);
    api.until_up().await;
    wait_for_agents(&api.base, "text.upper", 1).await;
    let put = |name: &str, body: Value| {
        let r = api
            .http
            .put(format!("{}/v1/rules/{name}", api.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send();
        async move { json_of(r.await.unwrap()).await }
    };
    let shout = json!({
        "on": {"type": "com.example.shout"},
        "do": {"capability": "text.upper", "input": "{{data.text}}"},
    });
    let (status, made) = put("shout", shout.clone()).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(
        (made["name"].as_str(), made["origin"].as_str()),
        (Some("shout"), Some("api"))
    );
    let (status, again) = put("shout", shout.clone()).await;
    assert_eq!(status, 200, "replaced: {again}");
    let (status, bad) = put(
        "broken",
        json!({"on": {"type": "t"}, "do": {"capability": "no capability"}}),
    )
    .await;
    assert_eq!(
        (status, bad["field"].as_str()),
        (400, Some("do.capability")),
        "{bad}"
    );
    let (status, conflict) = put("configured", shout.clone()).await;
    assert_eq!(status, 409, "{conflict}");
    let event = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/shouts", "type": "com.example.shout",
               "data": {"text": "hello"}})
    };
    let (status, answer) = api.structured(event("s-1")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(api.output(&Api::job_of(&answer, "shout")).await, "HELLO");

    // kill -9 and a restart: the rule was stored, it is there and fires.
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = child.wait().await;
    let _child = spawn_dispatcher(&config);
    api.until_up().await;
    let rules = api.get("/v1/rules").await;
    let origins: Vec<(&str, &str)> = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["origin"].as_str().unwrap()))
        .collect();
    assert_eq!(origins, [("configured", "configuration"), ("shout", "api")]);
    wait_for_agents(&api.base, "text.upper", 1).await;
    let (_, answer) = api.structured(event("s-2")).await;
    assert_eq!(api.output(&Api::job_of(&answer, "shout")).await, "HELLO");

    // A rule whose job takes a blob the event names (uploaded with PUT /v1/blobs).
    let (status, _) = put(
        "by-ref",
        json!({"on": {"type": "com.example.blob"},
               "do": {"capability": "text.upper", "input_ref": "{{data.sha256}}", "deadline": "20s"}}),
    )
    .await;
    assert_eq!(status, 201);
    let stored: Value = api
        .http
        .put(format!("{}/v1/blobs", api.base))
        .body("a stored note")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (status, answer) = api
        .structured(
            json!({"specversion": "1.0", "id": "b-1", "source": "/blobs",
                           "type": "com.example.blob", "data": {"sha256": stored["sha256"]}}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        api.output(&Api::job_of(&answer, "by-ref")).await,
        "A STORED NOTE"
    );

    // Deleted: events of its type make nothing; deleting again is 404.
    let delete = || {
        api.http
            .delete(format!("{}/v1/rules/shout", api.base))
            .send()
    };
    assert_eq!(delete().await.unwrap().status(), 204);
    let (status, answer) = api.structured(event("s-3")).await;
    assert_eq!(
        (status, answer["jobs"].as_array().map(Vec::len)),
        (202, Some(0)),
        "{answer}"
    );
    assert_eq!(delete().await.unwrap().status(), 404);
}

/// A legacy service (another process, here a Python script) emits events by writing JSON
/// lines to a `spine agent`'s socket watcher: each line is answered with the jobs its event
/// made, a bad line with why, and the same id sent again with the same job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_service_emits_events_through_the_agents_socket() {
    let server =
        TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = spine_integration::free_port().unwrap();
    let config = dispatcher_config(
        dir.path(),
        &server,
        port,
        "[[rule]]\nname = \"reports\"\n\
         on = { type = \"com.example.report.done\", source = \"/agents/agent2@localhost/legacy\" }\n\
         do = { capability = \"text.upper\", input = \"{{data.name}}\" }\n",
    );
    let _worker = upper_agent(&server);
    let _dispatcher = spawn_dispatcher(&config);
    let api = Api::at(port);
    api.until_up().await;
    wait_for_agents(&api.base, "text.upper", 1).await;
    let socket = dir.path().join("legacy.sock");
    let watches = format!(
        "[[watch]]\nname = \"legacy\"\nsocket = \"{}\"\n",
        socket.display()
    );
    let _watcher = spawn_agent(&watcher_config(dir.path(), &server, &watches));
    wait_for_agents(&api.base, "files.noop", 1).await;
    // The service: three lines on one connection, the answers printed as they come.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
for line in ['{"type": "com.example.report.done", "id": "r-7", "data": {"name": "report-7"}}',
             'not json',
             '{"type": "com.example.report.done", "id": "r-7", "data": {"name": "report-7"}}']:
    f.write(line + "\n"); f.flush()
    print(f.readline().strip(), flush=True)
"#;
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new("python3")
            .args(["-c", script])
            .arg(&socket)
            .output(),
    )
    .await
    .expect("the service finished")
    .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert_eq!(answers[0]["ok"], true, "{answers:?}");
    let job = answers[0]["jobs"][0].as_str().expect("a job").to_owned();
    assert!(
        answers[1]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("line 2: not JSON")),
        "{answers:?}"
    );
    assert_eq!(
        answers[2]["jobs"],
        json!([job]),
        "the same event, the same job"
    );
    assert_eq!(api.output(&job).await, "REPORT-7");
    let done = api.ended(&job).await;
    assert_eq!(done["event"]["source"], "/agents/agent2@localhost/legacy");
}
