//! Agents (the spine-agent library and its exec/http wrappers) on the embedded server, driven
//! by a test dispatcher that speaks docs/PROTOCOL.md.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jid::{BareJid, Jid};
use serde_json::json;
use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Args, Cancel, Condition, Data, Job, JobId, SpineError};
use tokio::sync::oneshot;
use tokio::time::Instant;
use xmpp_parsers::stanza_error::{ErrorType, StanzaError};

const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("agent1", "pw-a1"),
    ("mallory", "pw-m"),
];

/// A running in-process agent, stopped (drained) on drop of the sender.
struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), spine_agent::AgentError>>,
}

impl RunningAgent {
    async fn stop(mut self) -> Result<(), spine_agent::AgentError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("agent stops")
            .expect("agent task")
    }
}

fn config(server: &TestServer, extra: &str) -> AgentConfig {
    let toml = format!(
        "jid = \"agent1@localhost/w1\"\npassword = \"pw-a1\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"10s\"\ndrain_grace = \"5s\"\n{extra}",
        server.addr
    );
    AgentConfig::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

fn start(agent: Agent) -> RunningAgent {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(agent.run(async move {
        let _ = rx.await;
    }));
    RunningAgent {
        stop: Some(tx),
        task,
    }
}

async fn dispatcher(server: &TestServer) -> TestDispatcher {
    TestDispatcher::new(server.client("dispatcher", "pw-d").await).await
}

fn job(id: &str, cap: &str, args: serde_json::Value, input: &[u8]) -> Job {
    let mut j = Job::new(id.parse().unwrap(), cap.parse().unwrap());
    j.args = Args(args.as_object().cloned().unwrap_or_default());
    if !input.is_empty() {
        j.input = Some(Data::inline(input.to_vec()));
    }
    j
}

fn output(r: &spine_protocol::JobResult) -> Vec<u8> {
    match &r.output {
        Some(Data::Inline { bytes, .. }) => bytes.clone(),
        other => panic!("expected inline output, got {other:?}"),
    }
}

fn spine_error(e: &StanzaError) -> SpineError {
    SpineError::from_stanza_error(e)
        .expect("valid condition")
        .expect("a Spine condition")
}

async fn agent_jid(d: &mut TestDispatcher) -> Jid {
    let (jid, ad, load) = d
        .wait_advertise(&"agent1@localhost".parse::<BareJid>().unwrap())
        .await;
    assert_eq!(load.in_flight, 0);
    assert!(!ad.capabilities.is_empty());
    jid
}

#[tokio::test]
async fn exec_wraps_real_commands() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let cfg = config(
        &server,
        r#"
        [[capability]]
        name = "hash.sha256"
        kind = "exec"
        argv = ["sha256sum"]
        [[capability]]
        name = "compress.gzip"
        kind = "exec"
        argv = ["gzip", "-c", "-{arg.level}"]
        slots = 2
    "#,
    );
    let agent = start(Agent::builder(cfg).build().unwrap());
    let to = agent_jid(&mut d).await;

    let data = b"the quick brown fox".repeat(1000);
    let id = d
        .send_job(&to, job("j-sha", "hash.sha256", json!({}), &data))
        .await;
    let r = d.wait_result(&id).await.expect("sha256 job");
    let expected = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(&data);
        h.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let out = String::from_utf8(output(&r)).unwrap();
    assert_eq!(out.split_whitespace().next(), Some(expected.as_str()));
    assert_eq!(r.meta.get("exit_code").and_then(|v| v.as_i64()), Some(0));

    let id = d
        .send_job(
            &to,
            job("j-gz", "compress.gzip", json!({"level": 9}), &data),
        )
        .await;
    let gz = output(&d.wait_result(&id).await.expect("gzip job"));
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    assert!(
        gz.len() < data.len() / 10,
        "compressed {} -> {}",
        data.len(),
        gz.len()
    );
    let mut gunzip = std::process::Command::new("gzip")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(gunzip.stdin.as_mut().unwrap(), &gz).unwrap();
    drop(gunzip.stdin.take());
    assert_eq!(gunzip.wait_with_output().unwrap().stdout, data);

    // A missing argument is the caller's fault, named.
    let id = d
        .send_job(&to, job("j-gz2", "compress.gzip", json!({}), b"x"))
        .await;
    let e = spine_error(&d.wait_result(&id).await.unwrap_err());
    assert_eq!(
        (e.condition, e.field.as_deref()),
        (Condition::BadArguments, Some("level"))
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn hostile_arguments_reach_the_program_as_literal_argv_elements() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let cfg = config(
        &server,
        r#"
        [[capability]]
        name = "debug.argv"
        kind = "exec"
        argv = ["python3", "-c", "import sys, json; sys.stdout.write(json.dumps(sys.argv[1:]))", "{arg.a}", "--x={arg.b}", "{arg.c}", "{arg.n}"]
    "#,
    );
    let agent = start(Agent::builder(cfg).build().unwrap());
    let to = agent_jid(&mut d).await;
    let a = "; rm -rf / #";
    let b = "$(id) `id` 'single' \"double\" && echo pwned | cat";
    let c = "two words\nand a newline\ttab *?[glob]";
    let id = d
        .send_job(
            &to,
            job(
                "j-argv",
                "debug.argv",
                json!({"a": a, "b": b, "c": c, "n": 9007199254740993u64}),
                b"",
            ),
        )
        .await;
    let out = output(&d.wait_result(&id).await.expect("argv job"));
    let argv: Vec<String> = serde_json::from_slice(&out).expect("program printed JSON");
    assert_eq!(
        argv,
        vec![
            a.to_owned(),
            format!("--x={b}"),
            c.to_owned(),
            "9007199254740993".to_owned()
        ]
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn http_wraps_a_local_service_with_status_mapping() {
    use axum::routing::{get, post};
    let app =
        axum::Router::new()
            .route(
                "/upper",
                post(|body: String| async move {
                    ([("content-type", "text/plain")], body.to_uppercase())
                }),
            )
            .route(
                "/args",
                get(
                    |headers: axum::http::HeaderMap, q: axum::extract::RawQuery| async move {
                        format!(
                            "{}|{}",
                            q.0.unwrap_or_default(),
                            headers
                                .get("spine-args")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                        )
                    },
                ),
            )
            .route(
                "/busy",
                post(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "try later") }),
            )
            .route(
                "/invalid",
                post(|| async {
                    (
                        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                        "width must be positive",
                    )
                }),
            );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let cfg = config(
        &server,
        &format!(
            r#"
        [[capability]]
        name = "legacy.upper"
        kind = "http"
        url = "http://{http}/upper"
        [[capability]]
        name = "legacy.args"
        kind = "http"
        method = "GET"
        url = "http://{http}/args"
        args.w = {{ type = "integer" }}
        args.name = {{}}
        [[capability]]
        name = "legacy.busy"
        kind = "http"
        url = "http://{http}/busy"
        [[capability]]
        name = "legacy.invalid"
        kind = "http"
        url = "http://{http}/invalid"
    "#
        ),
    );
    let agent = start(Agent::builder(cfg).build().unwrap());
    let to = agent_jid(&mut d).await;

    let id = d
        .send_job(&to, job("h1", "legacy.upper", json!({}), b"hello http"))
        .await;
    let r = d.wait_result(&id).await.expect("upper");
    assert_eq!(output(&r), b"HELLO HTTP");
    assert_eq!(r.output.as_ref().and_then(|o| o.mime()), Some("text/plain"));

    let id = d
        .send_job(
            &to,
            job("h2", "legacy.args", json!({"w": 128, "name": "a b"}), b""),
        )
        .await;
    let text = String::from_utf8(output(&d.wait_result(&id).await.expect("args"))).unwrap();
    assert!(text.starts_with("name=a+b&w=128|"), "{text}");
    assert!(text.contains("\"w\":128"), "{text}");

    let id = d
        .send_job(&to, job("h3", "legacy.busy", json!({}), b"x"))
        .await;
    let err = d.wait_result(&id).await.unwrap_err();
    assert_eq!(err.type_, ErrorType::Wait);
    let e = spine_error(&err);
    assert_eq!(e.condition, Condition::Retryable);
    assert!(e.text.as_deref().unwrap_or("").contains("503"), "{e}");

    let id = d
        .send_job(&to, job("h4", "legacy.invalid", json!({}), b"x"))
        .await;
    let e = spine_error(&d.wait_result(&id).await.unwrap_err());
    assert_eq!(e.condition, Condition::BadArguments);
    assert!(
        e.text
            .as_deref()
            .unwrap_or("")
            .contains("width must be positive"),
        "{e}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn jobs_from_a_jid_that_is_not_a_dispatcher_get_forbidden() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let cfg = config(
        &server,
        "[[capability]]\nname = \"hash.sha256\"\nkind = \"exec\"\nargv = [\"sha256sum\"]\n",
    );
    let agent = start(Agent::builder(cfg).build().unwrap());
    let to = agent_jid(&mut d).await;
    let mut m = TestDispatcher::new(server.client("mallory", "pw-m").await).await;
    let id = m
        .send_job(&to, job("evil", "hash.sha256", json!({}), b"x"))
        .await;
    let err = m.wait_result(&id).await.unwrap_err();
    assert_eq!(
        err.defined_condition,
        xmpp_parsers::stanza_error::DefinedCondition::Forbidden
    );
    assert_eq!(spine_error(&err).condition, Condition::NotAuthorized);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_job_past_its_deadline_is_killed_and_reported() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let cfg = config(
        &server,
        r#"
        [[capability]]
        name = "slow.sleep"
        kind = "exec"
        argv = ["python3", "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(30)", "{arg.pidfile}"]
    "#,
    );
    let agent = start(Agent::builder(cfg).build().unwrap());
    let to = agent_jid(&mut d).await;
    let mut j = job(
        "late",
        "slow.sleep",
        json!({"pidfile": pidfile.display().to_string()}),
        b"",
    );
    j.deadline_ms = Some(800);
    let t0 = Instant::now();
    let id = d.send_job(&to, j).await;
    let e = spine_error(&d.wait_result(&id).await.unwrap_err());
    assert_eq!(e.condition, Condition::DeadlineExceeded, "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "reported after {:?}",
        t0.elapsed()
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("the program started")
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn load_reports_follow_job_start_and_finish_within_100ms() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let cfg = config(
        &server,
        r#"
        [[capability]]
        name = "slow.sleep"
        kind = "exec"
        argv = ["sleep", "{arg.secs}"]
        slots = 3
    "#,
    );
    let agent = start(Agent::builder(cfg).build().unwrap());
    let to = agent_jid(&mut d).await;
    let me: BareJid = "agent1@localhost".parse().unwrap();
    let sent = Instant::now();
    let id = d
        .send_job(&to, job("s1", "slow.sleep", json!({"secs": "0.6"}), b""))
        .await;
    let busy = d.wait_load(&me, |l| l.in_flight == 1).await;
    let start_delay = busy.at.duration_since(sent);
    assert_eq!(
        (busy.load.yours, busy.load.cap_in_flight("slow.sleep")),
        (1, Some(1))
    );
    d.wait_result(&id).await.expect("sleep job");
    let finished = Instant::now();
    let idle = d.wait_load(&me, |l| l.in_flight == 0).await;
    let finish_delay = idle.at.saturating_duration_since(finished);
    println!("load report after start: {start_delay:?}, after finish: {finish_delay:?}");
    assert!(
        start_delay < Duration::from_millis(100),
        "start reported after {start_delay:?}"
    );
    assert!(
        finish_delay < Duration::from_millis(100),
        "finish reported after {finish_delay:?}"
    );
    assert!(idle.load.seq > busy.load.seq);
    agent.stop().await.unwrap();
}

/// A Rust handler that counts its runs and sleeps.
fn counting(
    counter: Arc<AtomicUsize>,
    sleep: Duration,
) -> impl Fn(
    JobContext,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Output, JobError>> + Send>>
       + Send
       + Sync
       + 'static {
    move |ctx: JobContext| {
        let counter = counter.clone();
        Box::pin(async move {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            ctx.progress(50, "half way");
            tokio::time::sleep(sleep).await;
            Ok(Output::bytes(format!("run {n} of {}", ctx.id)))
        })
    }
}

#[tokio::test]
async fn duplicates_run_once_busy_cancel_and_panic() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let cfg = config(&server, "slots = 2\n");
    let agent = Agent::builder(cfg)
        .capability(
            "test.count",
            None,
            counting(runs.clone(), Duration::from_millis(400)),
        )
        .capability("test.panic", None, |_ctx: JobContext| async move {
            if true {
                panic!("handler bug");
            }
            Ok::<Output, JobError>(Output::default())
        })
        .capability("test.flaky", None, {
            let tries = Arc::new(AtomicUsize::new(0));
            move |ctx: JobContext| {
                let tries = tries.clone();
                async move {
                    match tries.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(JobError::Retryable("transient".into())),
                        n => Ok(Output::bytes(format!(
                            "attempt {} ran (try {})",
                            ctx.attempt,
                            n + 1
                        ))),
                    }
                }
            }
        })
        .capability("test.wait", Some(1), |ctx: JobContext| async move {
            ctx.cancel.cancelled().await;
            Err::<Output, _>(JobError::Failed("stopped".into()))
        })
        .build()
        .unwrap();
    let agent = start(agent);
    let to = agent_jid(&mut d).await;

    // The same job id twice while it runs: attached, one run, both answered alike.
    let a = d
        .send_job(&to, job("dup-1", "test.count", json!({}), b""))
        .await;
    let b = d
        .send_job(&to, job("dup-1", "test.count", json!({}), b""))
        .await;
    let (ra, rb) = (
        d.wait_result(&a).await.unwrap(),
        d.wait_result(&b).await.unwrap(),
    );
    assert_eq!(output(&ra), b"run 1 of dup-1");
    assert_eq!(output(&rb), output(&ra));
    // ...and again after it finished: the stored outcome, no new run.
    let c = d
        .send_job(&to, job("dup-1", "test.count", json!({}), b""))
        .await;
    assert_eq!(output(&d.wait_result(&c).await.unwrap()), b"run 1 of dup-1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A retryable failure is not cached: the next attempt of the same job really runs.
    let f1 = d
        .send_job(&to, job("flaky-1", "test.flaky", json!({}), b""))
        .await;
    assert_eq!(
        spine_error(&d.wait_result(&f1).await.unwrap_err()).condition,
        Condition::Retryable
    );
    let mut again = job("flaky-1", "test.flaky", json!({}), b"");
    again.attempt = 2;
    let f2 = d.send_job(&to, again).await;
    assert_eq!(
        output(&d.wait_result(&f2).await.unwrap()),
        b"attempt 2 ran (try 2)"
    );

    // Slots: 2 in total; the third job is refused with a wait-type error.
    let w1 = d
        .send_job(&to, job("busy-1", "test.count", json!({}), b""))
        .await;
    let w2 = d
        .send_job(&to, job("busy-2", "test.count", json!({}), b""))
        .await;
    let w3 = d
        .send_job(&to, job("busy-3", "test.count", json!({}), b""))
        .await;
    let err = d.wait_result(&w3).await.unwrap_err();
    assert_eq!(
        (err.type_.clone(), spine_error(&err).condition),
        (ErrorType::Wait, Condition::Busy)
    );
    d.wait_result(&w1).await.unwrap();
    d.wait_result(&w2).await.unwrap();

    // Cancel stops the handler; the job's IQ gets `cancelled`; cancelling again is harmless.
    let w = d
        .send_job(&to, job("wait-1", "test.wait", json!({}), b""))
        .await;
    d.wait_load(&"agent1@localhost".parse().unwrap(), |l| {
        l.cap_in_flight("test.wait") == Some(1)
    })
    .await;
    let c = d
        .send_set(
            &to,
            Cancel {
                job: "wait-1".parse::<JobId>().unwrap(),
            },
        )
        .await;
    assert!(d.wait_reply(&c).await.is_ok());
    assert_eq!(
        spine_error(&d.wait_result(&w).await.unwrap_err()).condition,
        Condition::Cancelled
    );
    let c = d
        .send_set(
            &to,
            Cancel {
                job: "wait-1".parse::<JobId>().unwrap(),
            },
        )
        .await;
    assert!(
        d.wait_reply(&c).await.is_ok(),
        "cancel after the end is a no-op"
    );
    let c = d
        .send_set(
            &to,
            Cancel {
                job: "never".parse::<JobId>().unwrap(),
            },
        )
        .await;
    assert_eq!(
        spine_error(&d.wait_reply(&c).await.unwrap_err()).condition,
        Condition::UnknownJob
    );

    // A panicking handler is a failed job; the agent keeps serving.
    let p = d
        .send_job(&to, job("boom", "test.panic", json!({}), b""))
        .await;
    let e = spine_error(&d.wait_result(&p).await.unwrap_err());
    assert_eq!(e.condition, Condition::Failed);
    assert!(
        e.text.as_deref().unwrap_or("").contains("handler bug"),
        "{e}"
    );
    let ok = d
        .send_job(&to, job("after-boom", "test.count", json!({}), b""))
        .await;
    assert!(d.wait_result(&ok).await.is_ok());

    // Unknown capability, malformed job.
    let u = d
        .send_job(&to, job("nope", "test.nothing", json!({}), b""))
        .await;
    assert_eq!(
        spine_error(&d.wait_result(&u).await.unwrap_err()).condition,
        Condition::UnknownCapability
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn progress_disco_hello_large_output_and_blob_input() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let agent = Agent::builder(config(&server, "[attributes]\nzone = \"eu-1\"\n"))
        .capability(
            "test.count",
            None,
            counting(runs, Duration::from_millis(50)),
        )
        .capability("test.big", None, |ctx: JobContext| async move {
            let n = ctx.arg_u64("bytes", 1..=10_000_000)?;
            Ok::<_, JobError>(
                Output::bytes((0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
                    .with_mime("application/octet-stream"),
            )
        })
        .capability("test.digest", None, |ctx: JobContext| async move {
            use sha2::Digest;
            Ok::<_, JobError>(Output::bytes(sha2::Sha256::digest(&ctx.input).to_vec()))
        })
        .build()
        .unwrap();
    let agent = start(agent);
    let to = agent_jid(&mut d).await;

    // Progress: the start notification, then the handler's own.
    let mut j = job("prog", "test.count", json!({}), b"");
    j.progress = true;
    let id = d.send_job(&to, j).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let p = d
            .wait_for("progress", |st| match st {
                tokio_xmpp::Stanza::Message(m) => m
                    .payloads
                    .iter()
                    .find_map(|p| spine_protocol::Progress::try_from(p.clone()).ok()),
                _ => None,
            })
            .await;
        seen.push((p.percent, p.message));
    }
    assert_eq!(
        seen,
        vec![
            (Some(0), Some("started".to_owned())),
            (Some(50), Some("half way".to_owned()))
        ]
    );
    d.wait_result(&id).await.unwrap();

    // disco#info lists the capabilities as features.
    let iq_id = "disco-1";
    d.conn
        .send(
            xmpp_parsers::iq::Iq::from_get(
                iq_id,
                xmpp_parsers::disco::DiscoInfoQuery { node: None },
            )
            .with_to(to.clone()),
        )
        .await;
    let info =
        xmpp_parsers::disco::DiscoInfoResult::try_from(d.wait_reply(iq_id).await.unwrap().unwrap())
            .unwrap();
    let caps = spine_protocol::disco::capabilities_in(&info);
    assert_eq!(
        caps.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        vec!["test.big", "test.count", "test.digest"]
    );

    // A hello is answered with a fresh advertisement.
    d.hello(&Jid::from(to.to_bare())).await;
    let (_, ad, _) = d.wait_advertise(&to.to_bare()).await;
    assert_eq!(ad.attrs.get("zone").map(String::as_str), Some("eu-1"));

    // Output over the inline limit travels as a blob.
    let id = d
        .send_job(&to, job("big", "test.big", json!({"bytes": 300_000}), b""))
        .await;
    let r = d.wait_result(&id).await.unwrap();
    let bytes = output(&r);
    assert_eq!(bytes.len(), 300_000);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    // Input over the inline limit: chunks first, then the job referencing the blob.
    let input: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let blob: spine_protocol::BlobId = "in-1".parse().unwrap();
    for c in spine_protocol::chunks(&blob, &input) {
        let cid = d.send_set(&to, c).await;
        d.wait_reply(&cid).await.expect("chunk accepted");
    }
    use sha2::Digest;
    let sha: [u8; 32] = sha2::Sha256::digest(&input).into();
    let mut j = job("digest", "test.digest", json!({}), b"");
    j.input = Some(Data::Blob(spine_protocol::BlobRef {
        blob,
        size: input.len() as u64,
        sha256: sha,
        mime: None,
    }));
    let id = d.send_job(&to, j).await;
    assert_eq!(output(&d.wait_result(&id).await.unwrap()), sha.to_vec());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn agent_over_starttls_and_clear_login_errors() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = dispatcher(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &server.cert_pem).unwrap();
    let tls = format!("[tls]\nmode = \"required\"\nca_file = \"{}\"\n[[capability]]\nname = \"hash.sha256\"\nkind = \"exec\"\nargv = [\"sha256sum\"]\n", ca.display());
    let agent = start(Agent::builder(config(&server, &tls)).build().unwrap());
    let to = agent_jid(&mut d).await;
    let id = d
        .send_job(&to, job("t1", "hash.sha256", json!({}), b"abc"))
        .await;
    assert!(
        String::from_utf8(output(&d.wait_result(&id).await.unwrap()))
            .unwrap()
            .starts_with("ba7816bf")
    );
    agent.stop().await.unwrap();

    let mut bad = config(&server, &tls);
    bad.password = Some("wrong".into());
    let err = Agent::builder(bad)
        .build()
        .unwrap()
        .run(std::future::pending::<()>())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            spine_agent::AgentError::Connect(spine_xmpp::ConnectError::Auth { .. })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn agent_reconnects_after_a_server_restart_and_advertises_again() {
    // The restarted server keeps its certificate, so the TLS dispatcher trusts it again.
    let tls_dir = tempfile::tempdir().unwrap();
    let tls_path = tls_dir.path().to_path_buf();
    let server =
        TestServer::start_with(ACCOUNTS, |c| c.tls.self_signed_dir = Some(tls_path.clone())).await;
    let addr = server.addr;
    let mut d = dispatcher(&server).await;
    let agent = start(
        Agent::builder(config(
            &server,
            "[[capability]]\nname = \"hash.sha256\"\nkind = \"exec\"\nargv = [\"sha256sum\"]\n",
        ))
        .build()
        .unwrap(),
    );
    let me: BareJid = "agent1@localhost".parse().unwrap();
    let (before, ad1, _) = d.wait_advertise(&me).await;

    // XEP-0199: the agent answers pings.
    d.conn
        .send(
            xmpp_parsers::iq::Iq::from_get("ping-1", xmpp_parsers::ping::Ping)
                .with_to(before.clone()),
        )
        .await;
    assert!(d.wait_reply("ping-1").await.is_ok());

    server.stop().await;
    let server = TestServer::start_with(ACCOUNTS, |c| {
        c.listen = addr;
        c.tls.self_signed_dir = Some(tls_path.clone());
    })
    .await;
    // As a restarted dispatcher does: hello to the agents it knows until they answer.
    let deadline = Instant::now() + PATIENCE;
    let (after, ad2) = loop {
        assert!(
            Instant::now() < deadline,
            "agent did not come back within {PATIENCE:?}"
        );
        d.hello(&Jid::from(me.clone())).await;
        let got = d
            .try_wait_for(Duration::from_millis(300), |st| match st {
                tokio_xmpp::Stanza::Presence(p)
                    if p.from.as_ref().is_some_and(|f| f.to_bare() == me) =>
                {
                    let found = spine_protocol::presence_payloads(&p.payloads).ok()?;
                    Some((p.from.clone()?, found.advertise?))
                }
                _ => None,
            })
            .await;
        if let Some(v) = got {
            break v;
        }
    };
    assert_eq!(after, before, "same full JID after the reconnect");
    assert_eq!(ad2.instance, ad1.instance, "same agent process");
    let id = d
        .send_job(
            &after,
            job("after-restart", "hash.sha256", json!({}), b"abc"),
        )
        .await;
    assert!(
        String::from_utf8(output(&d.wait_result(&id).await.unwrap()))
            .unwrap()
            .starts_with("ba7816bf")
    );
    agent.stop().await.unwrap();
    drop(server);
}
