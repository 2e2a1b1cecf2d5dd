//! The web console (issue 20) as a person sees it: headless Chromium
//! (spine_integration::browser) on the dispatcher's `/ui`, in front of a real farm — the
//! embedded XMPP server, a dispatcher with API tokens, agents running the image and word-count
//! examples and a slow capability — on loopback. Every test reads the page through the DOM
//! hooks of the console's contract and checks what it shows against the HTTP API answered to
//! the same token (docs/console.md); each saves screenshots of what it saw under
//! `target/console-screenshots/`.
//!
//! The tests take one browser at a time (a 2-core CI machine); without Chromium and
//! chromedriver they are skipped with the reason, unless `SPINE_REQUIRE_SERVERS=1`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::browser::{Browser, PAGE_PATIENCE};
use spine_integration::farm::{
    agent_config, plain_word_count, run_agent, start_http_dispatcher, Running,
};
use spine_integration::{TestServer, PATIENCE};

const OPS: &str = "ops-console-token-0123456789";
const ALICE: &str = "alice-console-token-0123456789";
const BOB: &str = "bob-console-token-0123456789";

/// `ops` sees everything (an operator); `alice` and `bob` see only their own jobs.
const TOKENS: &str = r#"
[[http_token]]
name = "ops"
token = "ops-console-token-0123456789"
capabilities = ["*"]
all_jobs = true

[[http_token]]
name = "alice"
token = "alice-console-token-0123456789"
capabilities = ["*"]

[[http_token]]
name = "bob"
token = "bob-console-token-0123456789"
capabilities = ["*"]
"#;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")];

/// Slots of each agent.
const SLOTS: u64 = 2;

/// One browser at a time in this test binary: Chromium is the heaviest thing a test here
/// runs, and the live-update timings are only meaningful on a machine that is not swamped.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A farm for the console: the embedded server, a dispatcher with [`TOKENS`] and two agents
/// of [`SLOTS`] slots. agent1 runs the image example, agent2 the word-count example, and both
/// `slow.sleep` (`{"ms": N}`: reports progress 0, then sleeps, or stops early when the job is
/// cancelled).
struct Farm {
    base: String,
    /// Attempts of `slow.sleep` that were stopped before their sleep ended (cancelled, or
    /// their future dropped by the agent): what the agent did when a job was cancelled.
    stopped: Arc<AtomicUsize>,
    http: reqwest::Client,
    agents: Vec<Running>,
    dispatcher: Running,
    server: TestServer,
    _dir: tempfile::TempDir,
}

/// Counts a `slow.sleep` attempt as stopped unless it was disarmed (slept to the end).
struct StopWitness {
    stopped: Arc<AtomicUsize>,
    armed: bool,
}

impl StopWitness {
    /// The attempt ran to its end: not counted.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for StopWitness {
    fn drop(&mut self) {
        if self.armed {
            self.stopped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Registers `slow.sleep` on `b`, counting stopped attempts in `stopped`.
fn slow_sleep(
    b: spine_agent::AgentBuilder,
    stopped: &Arc<AtomicUsize>,
) -> spine_agent::AgentBuilder {
    let stopped = stopped.clone();
    b.capability("slow.sleep", None, move |ctx: JobContext| {
        let witness = StopWitness {
            stopped: stopped.clone(),
            armed: true,
        };
        async move {
            let ms = ctx.arg_u64("ms", 1..=600_000)?;
            // Sent only when the job asked for progress: then the job is `running`.
            ctx.progress(0, "sleeping");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                    witness.disarm();
                    Ok(Output::bytes("slept").with_mime("text/plain"))
                }
                _ = ctx.cancel.cancelled() => Err(JobError::Failed("cancelled".into())),
            }
        }
    })
}

impl Farm {
    async fn start() -> Farm {
        Farm::start_with("").await
    }

    /// A farm whose dispatcher has `extra` configuration after [`TOKENS`].
    async fn start_with(extra: &str) -> Farm {
        let server = TestServer::start(ACCOUNTS).await;
        let dir = tempfile::tempdir().expect("a data directory");
        let config = format!("{TOKENS}\n{extra}");
        let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), &config).await;
        let stopped = Arc::new(AtomicUsize::new(0));
        let slots = format!("slots = {SLOTS}\n");
        let a1 = spine_example_image::register(Agent::builder(agent_config(&server, 1, &slots)));
        let a2 =
            spine_example_wordcount::register(Agent::builder(agent_config(&server, 2, &slots)));
        let agents = vec![
            run_agent(slow_sleep(a1, &stopped).build().expect("agent1")),
            run_agent(slow_sleep(a2, &stopped).build().expect("agent2")),
        ];
        let farm = Farm {
            base,
            stopped,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
            agents,
            dispatcher,
            server,
            _dir: dir,
        };
        farm.wait_for_fleet(2).await;
        farm
    }

    /// The console's URL for the hash route `route` (`/fleet`, `/jobs/ID`).
    fn page(&self, route: &str) -> String {
        format!("{}/ui#{route}", self.base)
    }

    /// `GET path` as `token`: the status and the JSON body.
    async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: {status} answered {text:?}, not JSON: {e}"));
        (status, body)
    }

    /// `method path` with a JSON `body` as `token`: the status and the JSON answer.
    async fn send(
        &self,
        method: reqwest::Method,
        token: &str,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        // A body with `specversion` is a CloudEvent, of its own content type.
        let ctype = if body.get("specversion").is_some() {
            "application/cloudevents+json"
        } else {
            "application/json"
        };
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", ctype)
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /v1/jobs` as `token`; returns the job id.
    async fn submit(&self, token: &str, body: Value) -> String {
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("submitting {body}: {e}"));
        let status = resp.status().as_u16();
        let answer: Value =
            serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or_default();
        assert_eq!(status, 202, "submitting {body}: {answer}");
        answer["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {answer}"))
            .to_owned()
    }

    /// Waits until job `id` (read as `ops`) satisfies `pred`; returns it.
    async fn wait_job(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
        loop {
            let (status, job) = self.get(OPS, &format!("/v1/jobs/{id}")).await;
            assert_eq!(status, 200, "{job}");
            if pred(&job) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} not {what} within {PAGE_PATIENCE:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until job `id` ended; returns it.
    async fn wait_final(&self, id: &str) -> Value {
        self.wait_job(id, "final", |j| {
            matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "timed-out")
            )
        })
        .await
    }

    /// Waits until `GET /v1/fleet` (as ops) lists `n` agents; returns the answer.
    async fn wait_for_fleet(&self, n: usize) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let resp = self
                .http
                .get(format!("{}/v1/fleet", self.base))
                .bearer_auth(OPS)
                .send()
                .await;
            let body: Value = match resp {
                Ok(r) => {
                    serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default()
                }
                Err(_) => Value::Null,
            };
            if body["agents"].as_array().map_or(0, Vec::len) == n {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fleet did not reach {n} agents: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the fleet's agent `jid` (as `GET /v1/fleet` answers ops) satisfies `pred`;
    /// returns it.
    async fn wait_agent(&self, jid: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
        loop {
            let (_, fleet) = self.get(OPS, "/v1/fleet").await;
            let agent = fleet["agents"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["jid"] == jid)
                .cloned()
                .unwrap_or_else(|| panic!("no agent {jid} in {fleet}"));
            if pred(&agent) {
                return agent;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {jid} not {what} within {PAGE_PATIENCE:?}: {agent}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        for a in self.agents {
            a.stop();
        }
        self.dispatcher.stop();
        self.server.stop().await;
    }
}

/// Signs in on the login form with `token` and waits until `#whoami` says `name`.
async fn sign_in(b: &Browser, farm: &Farm, token: &str, name: &str) {
    b.goto(&farm.page("/login")).await;
    b.fill("#token", token).await;
    b.click("#login").await;
    wait_text(b, "#whoami", |t| t == name, &format!("#whoami = {name:?}")).await;
}

/// Waits until the text of `selector` satisfies `pred`; returns it.
async fn wait_text(b: &Browser, selector: &str, pred: impl Fn(&str) -> bool, what: &str) -> String {
    let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
    loop {
        let text = match b.try_wait_for(selector, Duration::ZERO).await {
            Some(e) => e.text().await.unwrap_or_default(),
            None => String::new(),
        };
        if pred(text.trim()) {
            return text.trim().to_owned();
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "{what}: {selector:?} reads {text:?} after {PAGE_PATIENCE:?} on {}",
                b.url().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The fleet table as shown: per row (`data-agent`), the text of each named cell.
async fn fleet_rows(b: &Browser) -> Vec<(String, Value)> {
    let rows = b
        .execute(
            r#"return Array.from(document.querySelectorAll("tr[data-agent]")).map(tr => {
                const cell = c => { const td = tr.querySelector("td." + c); return td ? td.textContent.trim() : null; };
                return [tr.dataset.agent, {slots: cell("slots"), in_flight: cell("in-flight"), state: cell("state")}];
            });"#,
            vec![],
        )
        .await;
    rows.as_array()
        .into_iter()
        .flatten()
        .map(|r| (r[0].as_str().unwrap_or_default().to_owned(), r[1].clone()))
        .collect()
}

/// A 100×60 PNG, red and blue halves.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(100, 60, |x, _| {
        if x < 50 {
            image::Rgb([200, 10, 10])
        } else {
            image::Rgb([10, 10, 200])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG");
    out.into_inner()
}

/// A farm and a browser, or `None` when the browser is missing and not required.
async fn setup() -> Option<(Farm, Browser)> {
    let browser = Browser::start().await?;
    Some((Farm::start().await, browser))
}

/// (a) Tokens are configured: the page asks for one; a wrong one is refused on the form; the
/// right one shows its name, and the fleet page shows every agent of the farm with the slots
/// and in-flight counts `GET /v1/fleet` gives the same token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_then_the_fleet_shows_every_agent_as_the_api_does() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    // Every test here runs the page under the contract's policy: no inline script or style.
    let shell = farm
        .http
        .get(format!("{}/ui", farm.base))
        .send()
        .await
        .expect("GET /ui");
    assert_eq!(shell.status(), 200);
    let csp = shell
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // The contract's directives, every one (the server may add stricter ones).
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    for d in [
        "default-src 'self'",
        "img-src 'self' blob: data:",
        "style-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(directives.contains(&d), "{d:?} in {csp:?}");
    }

    b.goto(&format!("{}/ui", farm.base)).await;
    b.wait_for(
        "form[action='/ui/login'] input#token[type=password]",
        PAGE_PATIENCE,
    )
    .await;
    let label = b.text("label[for=token]").await;
    assert_eq!(label, "API token");
    b.screenshot("login").await;

    // A wrong token: back to the form, told why, and no session.
    b.fill("#token", "not-a-token-0123456789").await;
    b.click("#login").await;
    b.wait_until(
        "the login form again after a wrong token",
        "return location.hash.includes('error=unknown-token') && !!document.querySelector('#token');",
        PAGE_PATIENCE,
    )
    .await;
    b.screenshot("login-refused").await;

    sign_in(&b, &farm, OPS, "ops").await;
    b.goto(&farm.page("/fleet")).await;
    b.wait_until(
        "two agent rows",
        "return document.querySelectorAll('tr[data-agent]').length === 2;",
        PAGE_PATIENCE,
    )
    .await;
    let count = wait_text(
        &b,
        "#fleet-count",
        |t| t.starts_with('2'),
        "the agent count",
    )
    .await;
    assert_eq!(count, "2 agents");
    b.screenshot("fleet").await;

    let (status, fleet) = farm.get(OPS, "/v1/fleet").await;
    assert_eq!(status, 200, "{fleet}");
    let api: Vec<&Value> = fleet["agents"].as_array().expect("agents").iter().collect();
    let shown = fleet_rows(&b).await;
    assert_eq!(shown.len(), api.len(), "rows {shown:?} against {fleet}");
    for agent in api {
        let jid = agent["jid"].as_str().expect("a jid");
        let (_, row) = shown
            .iter()
            .find(|(j, _)| j == jid)
            .unwrap_or_else(|| panic!("no row for {jid}: {shown:?}"));
        assert_eq!(row["slots"], agent["slots"].to_string(), "{jid}: {row}");
        assert_eq!(row["slots"], SLOTS.to_string());
        assert_eq!(
            row["in_flight"],
            agent["in_flight"].to_string(),
            "{jid}: {row}"
        );
        assert_eq!(row["state"], agent["state"], "{jid}: {row}");
    }

    b.close().await;
    farm.stop().await;
}

/// (b) A burst of slow jobs: without a reload the fleet page shows agents' in-flight counts
/// rise above 0 while the jobs run and fall back to 0 once they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_shows_in_flight_rise_and_fall_live() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    sign_in(&b, &farm, OPS, "ops").await;
    b.goto(&farm.page("/fleet")).await;
    b.wait_until(
        "two idle agent rows",
        "const c = Array.from(document.querySelectorAll('tr[data-agent] td.in-flight'));
         return c.length === 2 && c.every(td => td.textContent.trim() === '0');",
        PAGE_PATIENCE,
    )
    .await;
    // A mark on this document: if the page reloaded, it would be gone.
    b.execute("window.spineTestMark = 'no reload'; return true;", vec![])
        .await;

    // Twice the slots of the farm, each for 3 s: both agents full, then a second wave.
    let mut ids = Vec::new();
    for _ in 0..(4 * SLOTS) {
        ids.push(
            farm.submit(
                OPS,
                json!({"capability": "slow.sleep", "args": {"ms": 3000}}),
            )
            .await,
        );
    }
    let peak = b
        .wait_until(
            "an agent's in-flight above 0",
            "const c = Array.from(document.querySelectorAll('tr[data-agent] td.in-flight'));
             const n = c.map(td => parseInt(td.textContent, 10) || 0);
             return Math.max(0, ...n);",
            PAGE_PATIENCE,
        )
        .await;
    b.screenshot("fleet-burst").await;
    assert!(
        peak.as_u64().is_some_and(|n| (1..=SLOTS).contains(&n)),
        "in flight shown: {peak}"
    );
    for id in &ids {
        let job = farm.wait_final(id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    b.wait_until(
        "every agent's in-flight back to 0",
        "const c = Array.from(document.querySelectorAll('tr[data-agent] td.in-flight'));
         return c.length === 2 && c.every(td => td.textContent.trim() === '0');",
        PAGE_PATIENCE,
    )
    .await;
    let mark = b
        .execute("return window.spineTestMark || null;", vec![])
        .await;
    assert_eq!(mark, "no reload", "the page was reloaded");
    b.screenshot("fleet-after-burst").await;

    b.close().await;
    farm.stop().await;
}

/// (c) An image job's page: its timeline from acceptance to `succeeded`, and the thumbnail the
/// agent made shown inline, decoded by the browser at the size the agent made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_page_shows_its_timeline_and_output_image() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    let id = farm
        .submit(
            OPS,
            json!({"capability": "image.thumbnail", "args": {"size": 32},
                   "input": spine_client::base64(&png()), "input_type": "image/png"}),
        )
        .await;
    let job = farm.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (_, full) = farm.get(OPS, &format!("/v1/jobs/{id}")).await;
    let thumb = image::load_from_memory(&spine_client::output(&full).expect("the output"))
        .expect("a PNG thumbnail");
    assert_eq!(thumb.width(), 32);

    sign_in(&b, &farm, OPS, "ops").await;
    b.goto(&farm.page(&format!("/jobs/{id}"))).await;
    wait_text(&b, "#job-state", |t| t == "succeeded", "the job's state").await;
    let heading = b.text("h1").await;
    assert!(heading.contains(&id), "the heading {heading:?} names {id}");
    assert_eq!(b.text("#job-capability").await, "image.thumbnail");
    b.wait_for("#timeline li[data-state='succeeded']", PAGE_PATIENCE)
        .await;
    let states = b
        .execute(
            "return Array.from(document.querySelectorAll('#timeline li')).map(li => li.dataset.state);",
            vec![],
        )
        .await;
    let api_states: Vec<Value> = full["history"]
        .as_array()
        .expect("the job's history")
        .iter()
        .map(|h| h["state"].clone())
        .collect();
    assert_eq!(
        states,
        Value::Array(api_states),
        "the timeline is the history"
    );
    let size = b
        .wait_until(
            "the output image decoded",
            "const img = document.querySelector('img#output-image');
             return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null;",
            PAGE_PATIENCE,
        )
        .await;
    assert_eq!(size, json!([thumb.width(), thumb.height()]));
    b.screenshot("job-image").await;

    b.close().await;
    farm.stop().await;
}

/// (d) Cancel from the page: the running job's page, `button#cancel`, the state becomes
/// `cancelled` there and in the API, the agent's handler was stopped, and its in-flight count
/// returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_the_page_stops_the_agent() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    let id = farm
        .submit(
            OPS,
            json!({"capability": "slow.sleep", "args": {"ms": 120000}, "progress": true}),
        )
        .await;
    let running = farm
        .wait_job(&id, "running", |j| j["state"] == "running")
        .await;
    let agent = running["agent"]
        .as_str()
        .expect("the job's agent")
        .to_owned();
    farm.wait_agent(&agent, "busy", |a| a["in_flight"] == 1)
        .await;

    sign_in(&b, &farm, OPS, "ops").await;
    b.goto(&farm.page(&format!("/jobs/{id}"))).await;
    wait_text(&b, "#job-state", |t| t == "running", "the job running").await;
    b.screenshot("job-running").await;
    b.click("button#cancel").await;
    // A confirmation, if the page asks for one, is accepted as a person would.
    let _ = b.client().accept_alert().await;
    wait_text(&b, "#job-state", |t| t == "cancelled", "the job cancelled").await;
    b.screenshot("job-cancelled").await;

    let job = farm.wait_final(&id).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
    while farm.stopped.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never stopped the job's handler"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    farm.wait_agent(&agent, "idle", |a| a["in_flight"] == 0)
        .await;
    // A cancelled job may be retried from its page, and no longer cancelled.
    b.wait_for("button#retry", PAGE_PATIENCE).await;
    assert!(
        b.try_wait_for("button#cancel", Duration::ZERO)
            .await
            .is_none(),
        "no cancel button on a final job"
    );

    b.close().await;
    farm.stop().await;
}

/// (e) A word-count map/reduce: its page's tree fills in until every step box is
/// `succeeded`, one box per job of `GET /v1/jobs/{id}/tree`, and the counts are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapreduce_tree_fills_in_to_succeeded() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    sign_in(&b, &farm, OPS, "ops").await;
    let texts = [
        "The cat sat on the mat.",
        "THE DOG; the cat!",
        "Été, été, ÉTÉ 42",
        "a dog, a cat, a mat",
        "the end",
    ];
    let fragments: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"name": format!("{i}.txt"), "data": spine_client::base64(t.as_bytes())}))
        .collect();
    let id = farm
        .submit(
            OPS,
            json!({"capability": "wordcount.map", "reduce": "wordcount.reduce", "fan_in": 2,
                   "fragments": fragments}),
        )
        .await;
    b.goto(&farm.page(&format!("/jobs/{id}"))).await;
    b.wait_for("#tree .step", PAGE_PATIENCE).await;
    b.screenshot("mapreduce-running").await;
    let job = farm.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (_, full) = farm.get(OPS, &format!("/v1/jobs/{id}")).await;
    let counts: Vec<(String, u64)> =
        serde_json::from_slice(&spine_client::output(&full).expect("the counts"))
            .expect("counts as JSON");
    assert_eq!(counts, plain_word_count(texts));

    let (status, tree) = farm.get(OPS, &format!("/v1/jobs/{id}/tree")).await;
    assert_eq!(status, 200, "{tree}");
    let steps: Vec<&Value> = tree["levels"]
        .as_array()
        .expect("levels")
        .iter()
        .flat_map(|l| l["steps"].as_array().into_iter().flatten())
        .collect();
    let tree_jobs: Vec<&str> = steps
        .iter()
        .flat_map(|s| s["jobs"].as_array().into_iter().flatten())
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert!(
        steps.len() > texts.len(),
        "a map per fragment and reduces: {tree}"
    );
    let shown = b
        .wait_until(
            "every step box succeeded",
            "const s = Array.from(document.querySelectorAll('#tree .step'));
             return s.length > 0 && s.every(e => e.dataset.state === 'succeeded') ? s.map(e => e.dataset.job) : null;",
            PAGE_PATIENCE,
        )
        .await;
    let shown: Vec<&str> = shown
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    // A box per step's job (a speculative copy is a box of its own).
    assert!(
        (steps.len()..=tree_jobs.len()).contains(&shown.len()),
        "{} boxes for {} steps of {} jobs: {tree}",
        shown.len(),
        steps.len(),
        tree_jobs.len()
    );
    for job in &shown {
        assert!(
            tree_jobs.contains(job),
            "box {job} is not in the tree {tree}"
        );
    }
    wait_text(&b, "#job-state", |t| t == "succeeded", "the parent's state").await;
    b.screenshot("mapreduce").await;

    b.close().await;
    farm.stop().await;
}

/// Opens `GET /v1/jobs/events` as `token`, says so on `open` once the answer's head came, and
/// keeps appending what the stream carries to `seen` (until the task is aborted or the stream
/// ends).
async fn read_events(
    http: reqwest::Client,
    url: String,
    token: &'static str,
    open: tokio::sync::oneshot::Sender<()>,
    seen: Arc<std::sync::Mutex<String>>,
) {
    let mut resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("the jobs' event stream");
    assert_eq!(resp.status(), 200, "the jobs' event stream");
    let _ = open.send(());
    while let Ok(Some(c)) = resp.chunk().await {
        if let Ok(mut s) = seen.lock() {
            s.push_str(&String::from_utf8_lossy(&c));
        }
    }
}

/// (f) Tokens without `all_jobs` see only their own jobs: bob's jobs page and bob's SSE
/// stream never carry an id of alice's (while alice's jobs run and end), and alice's job page
/// opened by bob shows the API's 403 message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_token_never_sees_another_tokens_jobs() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let (open, opened) = tokio::sync::oneshot::channel();
    let events = tokio::spawn(read_events(
        farm.http.clone(),
        format!("{}/v1/jobs/events", farm.base),
        BOB,
        open,
        seen.clone(),
    ));
    let read = || seen.lock().map(|s| s.clone()).unwrap_or_default();
    // The stream is open (its head came) before the jobs start.
    tokio::time::timeout(PATIENCE, opened)
        .await
        .expect("bob's event stream opens")
        .expect("bob's event stream opens");
    // Alice's jobs run while bob listens, and bob's own, so that his stream is seen to work.
    let mut alices = Vec::new();
    for ms in [300, 600, 900] {
        alices.push(
            farm.submit(
                ALICE,
                json!({"capability": "slow.sleep", "args": {"ms": ms}}),
            )
            .await,
        );
    }
    let bobs = farm
        .submit(
            BOB,
            json!({"capability": "slow.sleep", "args": {"ms": 400}}),
        )
        .await;
    for id in alices.iter().chain([&bobs]) {
        let job = farm.wait_final(id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    // Bob's own final event shows the stream carries what it should. Alice's jobs ended
    // before it was looked for; a second more catches an event of hers that would trail it.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !(read().contains(&bobs) && read().contains("final")) {
        assert!(
            tokio::time::Instant::now() < deadline && !events.is_finished(),
            "bob's own job not in his stream: {}",
            read()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    events.abort();
    let seen = read();
    for id in &alices {
        assert!(
            !seen.contains(id.as_str()),
            "alice's {id} in bob's stream: {seen}"
        );
    }

    sign_in(&b, &farm, BOB, "bob").await;
    b.goto(&farm.page("/jobs")).await;
    b.wait_for(&format!("tr[data-job='{bobs}']"), PAGE_PATIENCE)
        .await;
    let listed = b
        .execute(
            "return Array.from(document.querySelectorAll('tr[data-job]')).map(tr => tr.dataset.job);",
            vec![],
        )
        .await;
    assert_eq!(listed, json!([bobs]), "bob's jobs page");
    let html = b.client().source().await.unwrap_or_default();
    for id in &alices {
        assert!(
            !html.contains(id.as_str()),
            "alice's {id} on bob's jobs page"
        );
    }
    b.screenshot("jobs-restricted").await;

    let (status, refusal) = farm.get(BOB, &format!("/v1/jobs/{}", alices[0])).await;
    assert_eq!(status, 403, "{refusal}");
    let message = refusal["message"].as_str().expect("a message").to_owned();
    b.goto(&farm.page(&format!("/jobs/{}", alices[0]))).await;
    let alert = wait_text(
        &b,
        "#alert",
        |t| !t.is_empty(),
        "the 403 in the alert region",
    )
    .await;
    assert!(alert.contains(&message), "{alert:?} shows {message:?}");
    b.screenshot("job-forbidden").await;

    b.close().await;
    farm.stop().await;
}

/// (g) The capabilities page's numbers are the API's: agents, slots, in flight, queued,
/// succeeded, failed, retried and the latency percentiles per capability, after jobs that
/// succeeded and one that failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capabilities_page_agrees_with_the_api() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    let mut ids = Vec::new();
    for ms in [50, 100, 150] {
        ids.push(
            farm.submit(OPS, json!({"capability": "slow.sleep", "args": {"ms": ms}}))
                .await,
        );
    }
    let png = spine_client::base64(&png());
    ids.push(
        farm.submit(
            OPS,
            json!({"capability": "image.thumbnail", "args": {"size": 16}, "input": png}),
        )
        .await,
    );
    // Refused by the agent: size out of range.
    let bad = farm
        .submit(
            OPS,
            json!({"capability": "image.thumbnail", "args": {"size": 0}, "input": png}),
        )
        .await;
    for id in &ids {
        assert_eq!(farm.wait_final(id).await["state"], "succeeded");
    }
    assert_eq!(farm.wait_final(&bad).await["state"], "failed");

    sign_in(&b, &farm, OPS, "ops").await;
    b.goto(&farm.page("/capabilities")).await;
    b.wait_for("tr[data-capability='slow.sleep']", PAGE_PATIENCE)
        .await;
    // (cell class, the API's field): counts as the API gives them.
    let fields = [
        ("agents", "agents"),
        ("slots", "slots"),
        ("in-flight", "in_flight"),
        ("queued", "queued"),
        ("succeeded", "succeeded"),
        ("failed", "failed"),
        ("retried", "retried"),
    ];
    let cells: Vec<&str> = fields
        .iter()
        .map(|(cell, _)| *cell)
        .chain(["p50", "p95", "p99"])
        .collect();
    // The page refreshes every 2 s: wait for a view that agrees, and say what differed.
    let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
    loop {
        let (_, caps) = farm.get(OPS, "/v1/capabilities").await;
        let expected: Vec<Value> = caps["capabilities"]
            .as_array()
            .expect("capabilities")
            .iter()
            .map(|c| {
                let mut row = json!({"name": c["name"]});
                for (cell, field) in fields {
                    row[cell] = Value::String(c[field].to_string());
                }
                for p in ["p50", "p95", "p99"] {
                    row[p] = c["latency_ms"][p].clone();
                }
                row
            })
            .collect();
        let shown = b
            .execute(
                r#"const fields = arguments[0];
                   return Array.from(document.querySelectorAll("tr[data-capability]")).map(tr => {
                     const row = {name: tr.dataset.capability};
                     for (const f of fields) { const td = tr.querySelector("td." + f); row[f] = td ? td.textContent.trim() : null; }
                     return row;
                   });"#,
                vec![json!(cells)],
            )
            .await;
        let sorted = |v: Value| {
            let mut a = v.as_array().cloned().unwrap_or_default();
            a.sort_by_key(|r| r["name"].to_string());
            a
        };
        let (mut shown, expected) = (sorted(shown), sorted(Value::Array(expected)));
        // Latency is shown to 0.1 ms (JavaScript's rounding of ties), a dash when there is
        // none: a shown value within half a tenth of the API's is the API's.
        for (row, api) in shown.iter_mut().zip(&expected) {
            for p in ["p50", "p95", "p99"] {
                let text = row[p].as_str().unwrap_or_default().to_owned();
                let agrees = match api[p].as_f64() {
                    Some(ms) => text.parse::<f64>().is_ok_and(|v| {
                        (v - ms).abs() <= 0.05 + 1e-9
                            && text.split('.').nth(1).map(str::len) == Some(1)
                    }),
                    None => text == "–",
                };
                if agrees {
                    row[p] = api[p].clone();
                }
            }
        }
        let slow = expected.iter().find(|r| r["name"] == "slow.sleep");
        assert_eq!(
            slow.map(|r| (r["agents"].clone(), r["succeeded"].clone())),
            Some((json!("2"), json!("3"))),
            "the API's own numbers: {expected:?}"
        );
        if shown == expected {
            let thumb = shown.iter().find(|r| r["name"] == "image.thumbnail");
            assert_eq!(thumb.map(|r| r["failed"].clone()), Some(json!("1")));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page shows {shown:?}\nthe API says {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    b.screenshot("capabilities").await;

    // The same jobs on the jobs page, newest first, as `GET /v1/jobs` lists them.
    b.goto(&farm.page("/jobs")).await;
    let (_, list) = farm.get(OPS, "/v1/jobs").await;
    let api_ids: Vec<Value> = list["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["id"].clone())
        .collect();
    assert_eq!(api_ids.len(), ids.len() + 1, "{list}");
    let shown = b
        .wait_until(
            "every job listed",
            &format!(
                "const r = Array.from(document.querySelectorAll('tr[data-job]')).map(tr => tr.dataset.job);
                 return r.length === {} ? r : null;",
                api_ids.len()
            ),
            PAGE_PATIENCE,
        )
        .await;
    assert_eq!(shown, Value::Array(api_ids));
    b.screenshot("jobs").await;

    b.close().await;
    farm.stop().await;
}

/// (h) At phone width (390×844) the fleet and a job page fit the screen (tables scroll in
/// their own box); from the top of the page, Tab reaches the skip link first, then the nav
/// links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_width_and_keyboard() {
    let _one = ONE_BROWSER.lock().await;
    let Some((farm, b)) = setup().await else {
        return;
    };
    sign_in(&b, &farm, OPS, "ops").await;

    // The keyboard, at desktop width: a fresh load, nothing focused, then Tab.
    b.goto(&farm.page("/fleet")).await;
    b.wait_for("tr[data-agent]", PAGE_PATIENCE).await;
    b.execute(
        "document.activeElement && document.activeElement.blur(); return true;",
        vec![],
    )
    .await;
    let mut reached = Vec::new();
    for _ in 0..12 {
        b.press(fantoccini::key::Key::Tab).await;
        let focused = b
            .execute(
                "const e = document.activeElement;
                 return e ? [e.tagName.toLowerCase(), e.getAttribute('href') || '', e.textContent.trim()] : null;",
                vec![],
            )
            .await;
        reached.push(focused);
    }
    let first = &reached[0];
    assert_eq!(first[0], "a", "the skip link first: {reached:?}");
    assert_eq!(first[2], "Skip to content", "{reached:?}");
    for route in ["#/fleet", "#/capabilities", "#/jobs", "#/submit"] {
        assert!(
            reached.iter().any(|r| r[1] == route),
            "Tab reaches the {route} link: {reached:?}"
        );
    }

    b.set_window_size(390, 844).await;
    b.goto(&farm.page("/fleet")).await;
    b.wait_for("tr[data-agent]", PAGE_PATIENCE).await;
    let width = b
        .wait_until(
            "the narrow viewport",
            "return window.innerWidth <= 400 ? window.innerWidth : 0;",
            PAGE_PATIENCE,
        )
        .await;
    let overflow = b
        .execute("return document.documentElement.scrollWidth;", vec![])
        .await;
    assert!(
        overflow.as_u64() <= width.as_u64(),
        "the fleet page is {overflow} px wide in a {width} px viewport"
    );
    b.screenshot("fleet-phone").await;

    let id = farm
        .submit(
            OPS,
            json!({"capability": "image.thumbnail", "args": {"size": 64},
                   "input": spine_client::base64(&png())}),
        )
        .await;
    assert_eq!(farm.wait_final(&id).await["state"], "succeeded");
    b.goto(&farm.page(&format!("/jobs/{id}"))).await;
    wait_text(&b, "#job-state", |t| t == "succeeded", "the job's state").await;
    b.wait_until(
        "the output image decoded",
        "const img = document.querySelector('img#output-image'); return img && img.naturalWidth > 0;",
        PAGE_PATIENCE,
    )
    .await;
    let overflow = b
        .execute("return document.documentElement.scrollWidth;", vec![])
        .await;
    assert!(
        overflow.as_u64() <= width.as_u64(),
        "the job page is {overflow} px wide in a {width} px viewport"
    );
    b.screenshot("job-phone").await;

    b.close().await;
    farm.stop().await;
}

/// The events page (issue 22): the rules with their origin and counters, the canaries of
/// every agent, and the live feed of jobs' ends and rules' firings — each as the API says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_page_shows_rules_canaries_and_the_live_feed() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let farm = Farm::start_with(
        r#"
[[rule]]
name = "nap"
on = { type = "com.example.nap" }
do = { capability = "slow.sleep", args = { ms = 20 } }

[[canary]]
capability = "slow.sleep"
args = { ms = 5 }
expect = "slept"
interval = "1s"
"#,
    )
    .await;
    let b = browser;
    sign_in(&b, &farm, OPS, "ops").await;
    b.goto(&farm.page("/events")).await;
    wait_text(
        &b,
        "tr[data-rule='nap'] td.origin",
        |t| t == "configuration",
        "the configured rule",
    )
    .await;
    // A rule made over the API shows up at the next refresh, as made over the API.
    let (status, made) = farm
        .send(
            reqwest::Method::PUT,
            OPS,
            "/v1/rules/nap-api",
            json!({"on": {"type": "com.example.nap2"}, "do": {"capability": "slow.sleep", "args": {"ms": 5}}}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    wait_text(
        &b,
        "tr[data-rule='nap-api'] td.origin",
        |t| t == "API",
        "the API's rule",
    )
    .await;
    // Both agents' canaries pass.
    for agent in ["agent1@localhost/w", "agent2@localhost/w"] {
        let sel = format!("tr[data-canary='slow.sleep {agent}'] td.health");
        wait_text(&b, &sel, |t| t == "ok", &format!("{agent}'s canary")).await;
    }
    // An event: its rule fires and its job ends, live in the feed; the counters agree with
    // GET /v1/rules.
    let (status, answer) = farm
        .send(
            reqwest::Method::POST,
            OPS,
            "/v1/events",
            json!({"specversion": "1.0", "id": "nap-1", "source": "/console-test", "type": "com.example.nap"}),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    let job = answer["jobs"][0]["id"].as_str().expect("a job").to_owned();
    farm.wait_final(&job).await;
    wait_text(
        &b,
        "#event-feed",
        |t| t.contains("spine.rule.fired") && t.contains("spine.job.succeeded") && t.contains(&job),
        "the feed",
    )
    .await;
    wait_text(
        &b,
        "tr[data-rule='nap'] td.jobs",
        |t| t == "1",
        "the rule's job count",
    )
    .await;
    let (_, rules) = farm.get(OPS, "/v1/rules").await;
    let nap = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "nap")
        .unwrap()
        .clone();
    assert_eq!(nap["counts"]["jobs"], 1, "{rules}");
    assert_eq!(nap["counts"]["matched"], 1, "{rules}");
    let (_, canaries) = farm.get(OPS, "/v1/canaries").await;
    assert_eq!(
        canaries["canaries"].as_array().map(Vec::len),
        Some(2),
        "{canaries}"
    );
    b.screenshot("events").await;
    // A token that is no operator sees why the rules are not shown.
    sign_in(&b, &farm, ALICE, "alice").await;
    b.goto(&farm.page("/events")).await;
    wait_text(
        &b,
        "#rules-table td.empty",
        |t| t.contains("Only an operator"),
        "the operator-only note",
    )
    .await;
    b.close().await;
}
