//! The API endpoints the web console reads (docs/console.md), over real HTTP to a dispatcher
//! on the embedded server with real agents: the whole fleet and its live stream, job
//! timelines, filtered and paged listings, the stream of every visible job's events (and
//! nothing of another token's jobs on it), trees, retries, capability windows, and the
//! console's cookie sign-in with its CSRF and cross-site checks.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{json, Value};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher};
use spine_integration::{TestServer, PATIENCE};

const POLICY: &str = r#"
[[http_token]]
name = "ops"
token = "token-ops-0123456789"
capabilities = ["*"]
all_jobs = true

[[http_token]]
name = "alice"
token = "token-alice-0123456789"
capabilities = ["test.*"]

[[http_token]]
name = "bob"
token = "token-bob-0123456789"
capabilities = ["test.*"]
"#;

const OPS: &str = "token-ops-0123456789";
const ALICE: &str = "token-alice-0123456789";
const BOB: &str = "token-bob-0123456789";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client")
}

async fn get(base: &str, token: &str, path: &str) -> Value {
    let r = client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET");
    let status = r.status();
    let body: Value = r.json().await.expect("JSON");
    assert!(status.is_success(), "GET {path}: {status} {body}");
    body
}

async fn post(base: &str, token: &str, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON"))
}

async fn submit(base: &str, token: &str, job: Value) -> String {
    let (status, body) = post(base, token, "/v1/jobs", job).await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn wait_state(base: &str, token: &str, id: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let j = get(base, token, &format!("/v1/jobs/{id}")).await;
        if j["state"] == want {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never became {want}: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Server-sent events read from a stream: (event, data) pairs.
struct Events {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    buf: String,
}

impl Events {
    async fn open(base: &str, token: &str, path: &str) -> Events {
        let r = client()
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), 200, "GET {path}");
        Events {
            body: Box::pin(r.bytes_stream().map(|c| c.map(|b| b.to_vec()))),
            buf: String::new(),
        }
    }

    /// The next event, or `None` if none comes within `wait`.
    async fn next(&mut self, wait: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_owned();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((event, serde_json::from_str(&data).expect("event JSON")));
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .ok()??;
            self.buf
                .push_str(&String::from_utf8_lossy(&chunk.expect("stream chunk")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_apis_show_the_fleet_jobs_and_capabilities_as_they_are() {
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("agent2", "pw"),
        ("agent3", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_d, base) = start_http_dispatcher(&server, dir.path(), POLICY).await;
    let worker = |n: usize| {
        Agent::builder(agent_config(&server, n, ""))
            .capability("test.echo", None, |ctx: JobContext| async move {
                Ok::<_, JobError>(Output::bytes(ctx.input.to_vec()))
            })
            .capability("test.wait", None, |ctx: JobContext| async move {
                ctx.cancel.cancelled().await;
                Err::<Output, _>(JobError::Failed("stopped".into()))
            })
            .capability("test.fail", None, |_ctx: JobContext| async move {
                Err::<Output, _>(JobError::Failed("always fails".into()))
            })
            .build()
            .unwrap()
    };
    let _a1 = run_agent(worker(1));
    let _a2 = run_agent(worker(2));
    // An agent of a capability alice and bob may not run: the fleet hides it from them.
    let _a3 = run_agent(
        Agent::builder(agent_config(&server, 3, ""))
            .capability("ops.secret", None, |_ctx: JobContext| async move {
                Ok::<_, JobError>(Output::bytes(b"x".to_vec()))
            })
            .build()
            .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let f = get(&base, OPS, "/v1/fleet").await;
        if f["agents"].as_array().map_or(0, Vec::len) == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "3 agents never joined: {f}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Who am I.
    let me = get(&base, ALICE, "/v1/whoami").await;
    assert_eq!(
        me,
        json!({"name": "alice", "capabilities": ["test.*"], "all_jobs": false, "metrics": false, "tokens": true})
    );

    // The fleet: every agent for ops, the test.* agents for alice, and each capability's load.
    let f = get(&base, OPS, "/v1/fleet").await;
    let jids: Vec<&str> = f["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["jid"].as_str().unwrap())
        .collect();
    assert_eq!(
        jids,
        [
            "agent1@localhost/w",
            "agent2@localhost/w",
            "agent3@localhost/w"
        ]
    );
    let a1 = &f["agents"][0];
    assert_eq!(a1["state"], "ready");
    assert_eq!(a1["in_flight"], 0);
    assert_eq!(
        a1["capabilities"],
        json!(["test.echo", "test.fail", "test.wait"])
    );
    let caps: Vec<&str> = f["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(caps, ["ops.secret", "test.echo", "test.fail", "test.wait"]);
    let f = get(&base, ALICE, "/v1/fleet").await;
    assert_eq!(f["agents"].as_array().unwrap().len(), 2, "{f}");
    assert_eq!(f["capabilities"].as_array().unwrap().len(), 3, "{f}");
    let f = get(
        &base,
        ALICE,
        "/v1/fleet?capability=test.echo&filter=zone%3Dmars",
    )
    .await;
    assert_eq!(f["agents"], json!([]), "no agent has zone=mars");
    let r = client()
        .get(format!("{base}/v1/fleet?filter=%3D%3D"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "filter");

    // The live fleet: a snapshot, then an update when a job lands on an agent.
    let mut fleet = Events::open(&base, OPS, "/v1/fleet/events").await;
    let (kind, snap) = fleet.next(PATIENCE).await.expect("snapshot");
    assert_eq!(kind, "snapshot");
    assert_eq!(snap["agents"].as_array().unwrap().len(), 3);
    let waiting = submit(
        &base,
        ALICE,
        json!({"capability": "test.wait", "progress": true}),
    )
    .await;
    wait_state(&base, ALICE, &waiting, "running").await;
    let busy = loop {
        let (kind, u) = fleet.next(PATIENCE).await.expect("an update");
        assert_eq!(kind, "update");
        let busy: Vec<Value> = u["agents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["in_flight"] == 1)
            .cloned()
            .collect();
        if let Some(a) = busy.first() {
            let cap = u["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "test.wait")
                .cloned()
                .unwrap();
            assert_eq!(cap["in_flight"], 1, "{u}");
            break a.clone();
        }
    };
    let j = get(&base, ALICE, &format!("/v1/jobs/{waiting}")).await;
    assert_eq!(j["agent"], busy["jid"]);

    // Cancel it: the agent's in-flight falls back to 0 on the stream, and the timeline
    // holds its whole life.
    let r = client()
        .delete(format!("{base}/v1/jobs/{waiting}"))
        .bearer_auth(ALICE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    loop {
        let (_, u) = fleet.next(PATIENCE).await.expect("an update");
        if u["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["jid"] == busy["jid"] && a["in_flight"] == 0)
        {
            break;
        }
    }
    let j = wait_state(&base, ALICE, &waiting, "cancelled").await;
    let steps: Vec<&str> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["queued", "dispatched", "running", "cancelled"],
        "{j}"
    );
    assert_eq!(j["history"][1]["agent"], busy["jid"]);
    assert_eq!(j["history"][1]["attempt"], 1);
    assert!(
        j["history"][3]["note"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{j}"
    );
    assert!(j["accepted_at"].as_str().unwrap() <= j["dispatched_at"].as_str().unwrap());
    assert_eq!(j["ended_at"], j["updated_at"]);

    // Every job event alice may see, on one stream; bob's stream carries none of alice's.
    let mut bobs = Events::open(&base, BOB, "/v1/jobs/events").await;
    let mut alices = Events::open(&base, ALICE, "/v1/jobs/events").await;
    let mut mine = Vec::new();
    for i in 0..5 {
        mine.push(
            submit(
                &base,
                ALICE,
                json!({"capability": "test.echo", "input": "aGk=", "args": {"n": i}}),
            )
            .await,
        );
    }
    let bob_job = submit(
        &base,
        BOB,
        json!({"capability": "test.echo", "input": "aGk="}),
    )
    .await;
    let mut ended = HashSet::new();
    while ended.len() < mine.len() {
        let (kind, ev) = alices.next(PATIENCE).await.expect("alice's events");
        assert_ne!(ev["id"], bob_job.as_str(), "alice saw bob's job");
        assert_ne!(ev["job"], bob_job.as_str(), "alice saw bob's job");
        if kind == "final" {
            ended.insert(ev["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(ended, mine.iter().cloned().collect::<HashSet<_>>());
    let (kind, ev) = bobs.next(PATIENCE).await.expect("bob's own job");
    assert_eq!(
        (kind.as_str(), ev["id"].as_str()),
        ("final", Some(bob_job.as_str()))
    );
    assert!(
        bobs.next(Duration::from_millis(500)).await.is_none(),
        "bob's stream carried another event"
    );

    // A job's page: arguments, input, timestamps, timeline.
    let j = get(&base, ALICE, &format!("/v1/jobs/{}", mine[2])).await;
    assert_eq!(j["args"], json!({"n": 2}));
    assert_eq!(j["input"]["size"], 2);
    let steps: Vec<&str> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(steps.first(), Some(&"queued"));
    assert_eq!(steps.last(), Some(&"succeeded"));

    // Listings: alice sees her own jobs only, newest first, in pages that follow each other.
    let mut seen = Vec::new();
    let mut path = "/v1/jobs?capability=test.echo&limit=2".to_owned();
    loop {
        let page = get(&base, ALICE, &path).await;
        for j in page["jobs"].as_array().unwrap() {
            assert_eq!(j["submitter"], "http:alice");
            assert!(j.get("history").is_none() && j.get("args").is_none());
            seen.push(j["id"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/jobs?capability=test.echo&limit=2&before={next}"),
            None => break,
        }
    }
    let mut newest_first = mine.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    // ops sees everyone's, and filters by submitter, agent and time.
    let all = get(&base, OPS, "/v1/jobs?capability=test.echo&limit=100").await;
    assert_eq!(all["jobs"].as_array().unwrap().len(), 6);
    let bobs_jobs = get(&base, OPS, "/v1/jobs?submitter=http:bob").await;
    assert_eq!(bobs_jobs["jobs"][0]["id"], bob_job.as_str());
    assert_eq!(bobs_jobs["jobs"].as_array().unwrap().len(), 1);
    let on = busy["jid"].as_str().unwrap();
    let by_agent = get(
        &base,
        OPS,
        &format!("/v1/jobs?agent={}&limit=100", urlencode(on)),
    )
    .await;
    assert!(by_agent["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["agent"] == on));
    assert!(by_agent["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == waiting.as_str()));
    let last = get(&base, OPS, &format!("/v1/jobs/{}", mine[4])).await;
    let since = last["accepted_at"].as_str().unwrap();
    let recent = get(&base, OPS, &format!("/v1/jobs?since={}", urlencode(since))).await;
    assert!(recent["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == mine[4].as_str()));
    assert!(!recent["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == waiting.as_str()));
    let r = client()
        .get(format!("{base}/v1/jobs?since=yesterday"))
        .bearer_auth(OPS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "since");

    // Retry: a failed job again, as a new job; a succeeded one is refused.
    let failing = submit(&base, ALICE, json!({"capability": "test.fail"})).await;
    wait_state(&base, ALICE, &failing, "failed").await;
    let (status, again) = post(
        &base,
        ALICE,
        &format!("/v1/jobs/{failing}/retry"),
        json!({}),
    )
    .await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["retry_of"], failing.as_str());
    assert_ne!(again["id"], failing.as_str());
    wait_state(&base, ALICE, again["id"].as_str().unwrap(), "failed").await;
    let (status, refused) = post(
        &base,
        ALICE,
        &format!("/v1/jobs/{}/retry", mine[0]),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (409, Some("not-failed"))
    );
    let (status, _) = post(&base, BOB, &format!("/v1/jobs/{failing}/retry"), json!({})).await;
    assert_eq!(status, 403, "bob may not retry alice's job");

    // An `all` job's tree: one copy per agent of the capability.
    let everyone = submit(
        &base,
        OPS,
        json!({"capability": "test.echo", "strategy": "all", "input": "aGk="}),
    )
    .await;
    wait_state(&base, OPS, &everyone, "succeeded").await;
    let t = get(&base, OPS, &format!("/v1/jobs/{everyone}/tree")).await;
    assert_eq!(t["levels"][0]["kind"], "copies");
    let copies = t["levels"][0]["steps"].as_array().unwrap();
    assert_eq!(copies.len(), 2, "{t}");
    assert!(copies.iter().all(|s| s["jobs"][0]["state"] == "succeeded"));

    // Capabilities: the window's counts are the jobs above.
    let caps = get(&base, ALICE, "/v1/capabilities").await;
    let cap = |name: &str| {
        caps["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {caps}"))
    };
    let echo = cap("test.echo");
    // 5 of alice's, 1 of bob's, the `all` job's 2 copies (its parent's end is counted too).
    assert!(echo["succeeded"].as_u64().unwrap() >= 8, "{echo}");
    assert_eq!(echo["agents"], 2);
    // Samples come every 5 s: a short test may have none yet; any it has are of 2 × 4 slots.
    let samples = echo["samples"].as_array().unwrap();
    assert!(
        samples.iter().all(|s| s["slots"] == echo["slots"]),
        "{echo}"
    );
    let lat = &echo["latency_ms"];
    assert!(lat["p50"].as_f64().unwrap() <= lat["p95"].as_f64().unwrap());
    assert_eq!(cap("test.fail")["failed"], 2);
    assert_eq!(echo["window_s"], 300);
    assert!(
        !caps["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "ops.secret"),
        "alice may not run ops.secret"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_with_a_cookie_and_refuses_forged_changes() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (_d, base) = start_http_dispatcher(&server, dir.path(), POLICY).await;
    let c = client();

    // The console's files, under a strict CSP; `/` leads there.
    let r = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    for (path, kind) in [
        ("/ui", "text/html; charset=utf-8"),
        ("/ui/console.js", "text/javascript; charset=utf-8"),
        ("/ui/console.css", "text/css; charset=utf-8"),
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], kind);
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    }

    // Without a cookie the API answers 401 (the page then shows its sign-in form).
    let r = c.get(format!("{base}/v1/whoami")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A wrong token: back to the form, no cookie.
    let r = c
        .post(format!("{base}/ui/login"))
        .form(&[("token", "not-a-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui#/login?error=unknown-token");
    assert!(r.headers().get("set-cookie").is_none());

    // A right one: an HTTP-only, SameSite=Strict token cookie and a CSRF cookie.
    let r = c
        .post(format!("{base}/ui/login"))
        .form(&[("token", ALICE)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookies: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let token_cookie = cookies
        .iter()
        .find(|c| c.starts_with("spine_token="))
        .expect("token cookie");
    assert!(token_cookie.contains("HttpOnly") && token_cookie.contains("SameSite=Strict"));
    let csrf_cookie = cookies
        .iter()
        .find(|c| c.starts_with("spine_csrf="))
        .expect("csrf cookie");
    assert!(!csrf_cookie.contains("HttpOnly"));
    let pair = |c: &str| c.split(';').next().unwrap().to_owned();
    let jar = format!("{}; {}", pair(token_cookie), pair(csrf_cookie));
    let csrf = pair(csrf_cookie)
        .trim_start_matches("spine_csrf=")
        .to_owned();

    let me: Value = c
        .get(format!("{base}/v1/whoami"))
        .header("cookie", &jar)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["name"], "alice");

    // A change by cookie without the CSRF header is refused; with it, it is done.
    let submit_with = |headers: &[(&str, &str)]| {
        let mut r = c
            .post(format!("{base}/v1/jobs"))
            .json(&json!({"capability": "test.echo", "wait_for_agent": true}));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, e) = submit_with(&[("cookie", &jar)]).await;
    assert_eq!((status, e["error"].as_str()), (403, Some("csrf")));
    let (status, _) = submit_with(&[("cookie", &jar), ("x-spine-csrf", "forged")]).await;
    assert_eq!(status, 403);
    let (status, _) = submit_with(&[("cookie", &jar), ("x-spine-csrf", &csrf)]).await;
    assert_eq!(status, 202);

    // A page of another site may change nothing, whatever it sends.
    let bearer = format!("Bearer {ALICE}");
    let (status, e) =
        submit_with(&[("authorization", &bearer), ("sec-fetch-site", "cross-site")]).await;
    assert_eq!((status, e["error"].as_str()), (403, Some("cross-origin")));

    // Signing out clears both cookies.
    let r = c
        .post(format!("{base}/ui/logout"))
        .header("cookie", &jar)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cleared: Vec<&str> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cleared.len(), 2);
    assert!(cleared.iter().all(|c| c.contains("Max-Age=0")));
}
