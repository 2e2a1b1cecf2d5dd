//! An agent in another language: `examples/python-agent/agent.py` (slixmpp, written from
//! docs/PROTOCOL.md) runs jobs that the Rust dispatcher sends through Prosody, and
//! `submit.py` submits over XMPP. Needs Prosody and a Python with slixmpp; without them the
//! test says why and passes, unless `SPINE_REQUIRE_SERVERS=1` (set by `.ci/run`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spine_integration::farm::start_http_dispatcher;
use spine_integration::servers::{required, AnyServer, Kind};
use spine_integration::{python, repo_root};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_agent_runs_jobs_from_the_rust_dispatcher_through_prosody() {
    let py = match python() {
        Ok(p) => p,
        Err(why) if required() => panic!("SPINE_REQUIRE_SERVERS=1 but {why}"),
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
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
    let mut agent = Command::new(&py)
        .arg(examples.join("agent.py"))
        .args(["--jid", "pyagent@localhost/py", "--server"])
        .arg(server.addr.to_string())
        .args(["--dispatcher", "dispatcher@localhost", "--slots", "3"])
        .args(["--heartbeat-ms", "1000", "--ca-file"])
        .arg(&ca)
        .env("SPINE_AGENT_PASSWORD", "pw-py")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python agent");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let api = spine_client::Client::new(&base, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let agents = api
            .call(
                api.request(reqwest::Method::GET, "/v1/agents?capability=text.upper"),
                "agents",
            )
            .await
            .unwrap();
        if agents["agents"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Python agent did not register; its log:\n{}\nProsody's log:\n{}",
            log(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
        .arg("text.upper")
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

    // SIGTERM: the agent drains, goes unavailable and exits 0; the dispatcher forgets it.
    let pid = nix::unistd::Pid::from_raw(agent.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .expect("the agent stops")
        .unwrap();
    assert!(status.success(), "{status}\n{}", log());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let agents = api
            .call(
                api.request(reqwest::Method::GET, "/v1/agents?capability=text.upper"),
                "agents",
            )
            .await
            .unwrap();
        if agents["agents"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "still registered: {agents}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dispatcher.stop();
}
