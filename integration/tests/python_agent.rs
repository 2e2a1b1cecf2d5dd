//! An agent in another language: `examples/python-agent/agent.py` (slixmpp, written from
//! docs/PROTOCOL.md) runs jobs that the Rust dispatcher sends through Prosody, and
//! `submit.py` submits over XMPP; large inputs and outputs go between them over HTTP
//! (protocol 1.1) or in chunks. Needs Prosody and a Python with slixmpp; without them the
//! tests say why and pass, unless `SPINE_REQUIRE_SERVERS=1` (set by `.ci/run`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spine_integration::farm::start_http_dispatcher;
use spine_integration::servers::{required, AnyServer, Kind};
use spine_integration::{python, repo_root};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The Python with slixmpp, or None (the test is skipped) when there is none and it is not
/// required.
fn python_or_skip() -> Option<PathBuf> {
    match python() {
        Ok(p) => Some(p),
        Err(why) if required() => panic!("SPINE_REQUIRE_SERVERS=1 but {why}"),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// Starts `agent.py` as `pyagent@localhost/py` with STARTTLS trusting `ca`, its log in
/// `log_path`, and `extra` options.
fn start_agent(
    py: &Path,
    server: &AnyServer,
    ca: &Path,
    log_path: &Path,
    extra: &[&str],
) -> tokio::process::Child {
    Command::new(py)
        .arg(repo_root().join("examples/python-agent/agent.py"))
        .args(["--jid", "pyagent@localhost/py", "--server"])
        .arg(server.addr.to_string())
        .args([
            "--dispatcher",
            "dispatcher@localhost",
            "--heartbeat-ms",
            "1000",
        ])
        .arg("--ca-file")
        .arg(ca)
        .args(extra)
        .env("SPINE_AGENT_PASSWORD", "pw-py")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python agent")
}

/// Waits until the dispatcher lists `n` agents offering `capability`.
async fn wait_agents(
    api: &spine_client::Client,
    capability: &str,
    n: usize,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let agents = api
            .call(
                api.request(
                    reqwest::Method::GET,
                    &format!("/v1/agents?capability={capability}"),
                ),
                "agents",
            )
            .await
            .unwrap();
        if agents["agents"].as_array().map_or(0, Vec::len) == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} agents for {capability}: {agents}\nthe Python agent's log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to the agent: it drains and exits 0.
async fn stop_agent(agent: &mut tokio::process::Child, log: impl Fn() -> String) {
    let pid = nix::unistd::Pid::from_raw(agent.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .expect("the agent stops")
        .unwrap();
    assert!(status.success(), "{status}\n{}", log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_agent_runs_jobs_from_the_rust_dispatcher_through_prosody() {
    let Some(py) = python_or_skip() else {
        return;
    };
    let accounts = [
        ("dispatcher", "pw-d"),
        ("pyagent", "pw-py"),
        ("webapp", "pw-w"),
    ];
    let Some(server) = AnyServer::start(Kind::Prosody, &accounts).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) =
        start_http_dispatcher(&server, dir.path(), "submitters = [\"webapp@localhost\"]\n").await;
    let examples = repo_root().join("examples/python-agent");
    // The agent and the submitter use STARTTLS and trust Prosody's generated certificate.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.cert_pem()).unwrap();
    let log_path = dir.path().join("agent.log");
    let mut agent = start_agent(&py, &server, &ca, &log_path, &["--slots", "3"]);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let api = spine_client::Client::new(&base, None).unwrap();
    wait_agents(&api, "text.upper", 1, || {
        format!("{}\nProsody's log:\n{}", log(), server.log())
    })
    .await;

    let agents = api
        .call(
            api.request(reqwest::Method::GET, "/v1/agents?capability=text.lower"),
            "agents",
        )
        .await
        .unwrap();
    let a = &agents["agents"][0];
    assert_eq!(a["jid"], "pyagent@localhost/py", "{agents}");
    assert_eq!(a["slots"], 3);
    assert_eq!(a["attributes"]["runtime"], "python", "{agents}");

    // 30 jobs at once on 3 slots: the dispatcher keeps within them, every one succeeds.
    let mut ids = Vec::new();
    for i in 0..30 {
        let text = format!("job {i}: grüße, spine");
        let id = api
            .submit(&json!({
                "capability": "text.upper",
                "input": spine_client::base64(text.as_bytes()),
                "progress": i == 0,
            }))
            .await
            .unwrap();
        ids.push((id, text));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, text) in &ids {
        let job = loop {
            let j = api.job(id).await.unwrap();
            if j["state"] == "succeeded" || j["state"] == "failed" {
                break j;
            }
            assert!(Instant::now() < deadline, "{j}\n{}", log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            spine_client::output(&job).unwrap_or_else(|e| panic!("{e}\n{}", log())),
            text.to_uppercase().as_bytes()
        );
        assert_eq!(job["agent"], "pyagent@localhost/py");
        assert_eq!(job["result"]["type"], "text/plain");
    }

    // Bad input: the agent's bad-arguments error, naming the field, is the job's outcome.
    let id = api
        .submit(
            &json!({ "capability": "text.upper", "input": spine_client::base64(&[0xff, 0xfe]) }),
        )
        .await
        .unwrap();
    let job: Value = api.follow(&id, |_, _| {}).await.unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["condition"], "bad-arguments", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not UTF-8"),
        "{job}"
    );

    // The Python submitter, over XMPP, through the Rust dispatcher, to the Python agent.
    let mut submit = Command::new(&py)
        .arg(examples.join("submit.py"))
        .args(["--jid", "webapp@localhost/py", "--server"])
        .arg(server.addr.to_string())
        .args(["--dispatcher", "dispatcher@localhost/d1", "--ca-file"])
        .arg(&ca)
        .args(["--verbose", "text.upper"])
        .env("SPINE_PASSWORD", "pw-w")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = submit.stdin.take().unwrap();
    stdin.write_all(b"hello from python").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), submit.wait_with_output())
        .await
        .expect("submit.py finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "submit.py: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    assert_eq!(out.stdout, b"HELLO FROM PYTHON");
    // Answered by the job's end (protocol 1.3, `wait-ms`), not by <accepted> and a message.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("ended within the wait (succeeded)"), "{said}");

    // SIGTERM: the agent drains, goes unavailable and exits 0; the dispatcher forgets it.
    stop_agent(&mut agent, log).await;
    wait_agents(&api, "text.upper", 0, log).await;
    dispatcher.stop();
}

/// A counter of the dispatcher's `/metrics`.
async fn counter(http: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Submits `input` to `bytes.reverse` as a raw upload, waits for the job, and checks that it
/// succeeded on the Python agent with the input reversed as its output (`GET …/output`).
async fn reverse(
    http: &reqwest::Client,
    api: &spine_client::Client,
    base: &str,
    input: &[u8],
    log: impl Fn() -> String,
) -> Value {
    let resp = http
        .post(format!("{base}/v1/jobs?capability=bytes.reverse"))
        .header("content-type", "application/octet-stream")
        .body(input.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let accepted: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    let id = accepted["id"].as_str().expect("a job id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let j = api.job(&id).await.unwrap();
        if j["state"] == "succeeded" || j["state"] == "failed" {
            break j;
        }
        assert!(Instant::now() < deadline, "{j}\n{}", log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(job["state"], "succeeded", "{job}\n{}", log());
    assert_eq!(job["agent"], "pyagent@localhost/py");
    let resp = http
        .get(format!("{base}/v1/jobs/{id}/output"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let output = resp.bytes().await.unwrap();
    assert!(
        output.iter().eq(input.iter().rev()),
        "the output ({} bytes) is not the input ({} bytes) reversed",
        output.len(),
        input.len()
    );
    job
}

/// Large payloads (PROTOCOL.md §13): a 5 MiB input submitted as a raw upload reaches the
/// Python agent by reference over HTTP, and its 5 MiB output (`bytes.reverse`) comes back
/// through an upload slot (§13.4); with `--no-http-data` the agent announces 1.0 and the same
/// job goes both ways in chunks (§13.1). The dispatcher's `http_listen` on loopback is its
/// `public_url`, so it offers references.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_agent_moves_large_payloads_over_http_and_in_chunks() {
    let Some(py) = python_or_skip() else {
        return;
    };
    let accounts = [("dispatcher", "pw-d"), ("pyagent", "pw-py")];
    let Some(server) = AnyServer::start(Kind::Prosody, &accounts).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.cert_pem()).unwrap();
    let api = spine_client::Client::new(&base, None).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let input: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();

    for (round, over_http) in [(1, true), (2, false)] {
        let log_path = dir.path().join(format!("agent-{round}.log"));
        let extra: &[&str] = if over_http { &[] } else { &["--no-http-data"] };
        let mut agent = start_agent(&py, &server, &ca, &log_path, extra);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        wait_agents(&api, "bytes.reverse", 1, log).await;
        let fetches = counter(&http, &base, "spine_blob_fetches_total").await;
        let uploads = counter(&http, &base, "spine_blob_uploads_total").await;

        let started = Instant::now();
        reverse(&http, &api, &base, &input, log).await;
        let took = started.elapsed();
        let fetched = counter(&http, &base, "spine_blob_fetches_total").await - fetches;
        let uploaded = counter(&http, &base, "spine_blob_uploads_total").await - uploads;
        eprintln!(
            "round {round} ({}): 5 MiB in and out in {took:?}",
            if over_http { "HTTP" } else { "chunks" }
        );
        if over_http {
            assert_eq!((fetched, uploaded), (1, 1), "{}", log());
            // The hello that told the agent the dispatcher's version (PROTOCOL.md §13.4): 1.2,
            // which builds on 1.1.
            assert!(
                log().contains("dispatcher@localhost/d1 speaks protocol 1.2"),
                "{}",
                log()
            );
            assert!(log().contains("fetched over HTTP"), "{}", log());
            assert!(log().contains("uploaded over HTTP"), "{}", log());
        } else {
            assert_eq!((fetched, uploaded), (0, 0), "{}", log());
            assert!(log().contains("sent in chunks"), "{}", log());
        }

        // A map/reduce over two fragments uploaded once (PROTOCOL.md §11.7.1): the map
        // outputs (over 64 KiB) are kept in the blob store, and the reduce step's list names
        // them — by signed URL, fetched by the Python agent, or inline after --no-http-data.
        let pieces: Vec<Vec<u8>> = (0..2u8)
            .map(|i| vec![b'a' + i; 100_000 + i as usize])
            .collect();
        let mut fragments = Vec::new();
        for p in &pieces {
            fragments.push(api.put_blob(p.clone(), p.len() as u64).await.unwrap());
        }
        let fetches = counter(&http, &base, "spine_blob_fetches_total").await;
        let body = serde_json::json!({
            "capability": "bytes.reverse", "reduce": "fragments.concat", "fan_in": 2,
            "fragments": fragments,
        });
        let id = api.submit(&body).await.unwrap();
        let job = api.follow(&id, |_, _| {}).await.unwrap();
        assert_eq!(job["state"], "succeeded", "{job}\n{}", log());
        let out = api.output(&job).await.unwrap();
        let want: Vec<u8> = pieces
            .iter()
            .flat_map(|p| p.iter().rev().copied())
            .collect();
        assert!(out == want, "the reversed fragments, in order\n{}", log());
        let fetched = counter(&http, &base, "spine_blob_fetches_total").await - fetches;
        // Two fragments, then the two map outputs named in the reduce's list.
        assert_eq!(fetched, if over_http { 4 } else { 0 }, "{}", log());

        stop_agent(&mut agent, log).await;
        wait_agents(&api, "bytes.reverse", 0, log).await;
    }
    dispatcher.stop();
}

/// The fast path offered but unreachable: the dispatcher's `public_url` names a closed port.
/// The Python agent answers the reference with `fetch-failed`, forgets the job, and runs the
/// same attempt when it comes again in chunks; its upload to the slot fails too, and the
/// output goes in chunks. The job succeeds in one attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_agent_falls_back_to_chunks_when_http_fails() {
    let Some(py) = python_or_skip() else {
        return;
    };
    let accounts = [("dispatcher", "pw-d"), ("pyagent", "pw-py")];
    let Some(server) = AnyServer::start(Kind::Prosody, &accounts).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (dispatcher, base) = start_http_dispatcher(
        &server,
        dir.path(),
        &format!("public_url = \"http://{closed}\"\n"),
    )
    .await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, server.cert_pem()).unwrap();
    let api = spine_client::Client::new(&base, None).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let log_path = dir.path().join("agent.log");
    let mut agent = start_agent(&py, &server, &ca, &log_path, &[]);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_agents(&api, "bytes.reverse", 1, log).await;

    let input: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let job = reverse(&http, &api, &base, &input, log).await;
    assert_eq!(job["attempts"], 1, "fetch-failed spends no attempt: {job}");
    let refused = format!("{}: connection refused", closed.ip());
    let l = log();
    assert!(
        l.contains(&format!(
            "fetching the input of job {}",
            job["id"].as_str().unwrap()
        )) && l.contains(&refused),
        "the agent tried the reference and says why it failed:\n{l}"
    );
    assert!(
        l.contains("uploading the output") && l.contains("sent in chunks"),
        "{l}"
    );
    for name in ["spine_blob_fetches_total", "spine_blob_uploads_total"] {
        assert_eq!(counter(&http, &base, name).await, 0, "{name}");
    }
    stop_agent(&mut agent, log).await;
    dispatcher.stop();
}
