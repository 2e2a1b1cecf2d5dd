//! Logs for machines: no colour codes when standard error is not a terminal, one JSON object
//! per line with `--log-format json`, a killed client is "connection closed by peer" (not
//! "malformed XML: invalid eof in text node"), and a server that stops is an INFO line on its
//! clients (not a WARN with tokio-xmpp's `StreamError { condition: SystemShutdown … }`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use spine_integration::RawClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

async fn start_server(dir: &Path, log: &Path, json: bool) -> (Child, SocketAddr) {
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\n[[account]]\nuser = \"alice\"\npassword = \"pw-a\"\n\
         [[account]]\nuser = \"agent1\"\npassword = \"pw-1\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spine"));
    if json {
        cmd.args(["--log-format", "json"]);
    }
    let mut child = cmd
        .args(["server", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "debug")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine server");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("listening line")
        .unwrap()
        .unwrap();
    let addr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

fn term(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

async fn wait_log(log: &Path, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_have_no_colour_codes_and_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let (server_log, agent_log) = (dir.path().join("server.log"), dir.path().join("agent.log"));
    let (mut server, addr) = start_server(dir.path(), &server_log, false).await;

    // A client that dies in the middle of a stanza.
    let mut alice = RawClient::login(addr, "localhost", "alice", "pw-a", "a").await;
    alice
        .send("<message to='alice@localhost'><body>half a")
        .await;
    // Read what the server sent (so the close is a FIN, not a reset), then end the socket.
    alice.read_to_close_or(Duration::from_millis(300)).await;
    tokio::io::AsyncWriteExt::shutdown(&mut alice.tcp)
        .await
        .unwrap();
    drop(alice);
    let text = wait_log(&server_log, "connection closed by peer").await;
    assert!(!text.contains("invalid eof"), "{text}");

    // An agent connected when the server stops.
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "jid = \"agent1@localhost/w\"\npassword = \"pw-1\"\nserver = \"{addr}\"\n\
             dispatchers = [\"dispatcher@localhost\"]\n\
             [[capability]]\nname = \"t.true\"\nkind = \"exec\"\nargv = [\"true\"]\n"
        ),
    )
    .unwrap();
    let agent = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--config"])
        .arg(&agent_cfg)
        .env("RUST_LOG", "info,spine_xmpp::wire=trace")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine agent");
    wait_log(&agent_log, "agent connected").await;
    term(&server);
    server.wait().await.unwrap();
    let text = wait_log(&agent_log, "it is shutting down (system-shutdown)").await;
    assert!(!text.contains("StreamError"), "{text}");
    // The stanza trace: the agent's advertisement out, the server's stream error in.
    assert!(text.contains("SEND <presence"), "{text}");
    assert!(text.contains("RECV <stream:error"), "{text}");
    drop(agent);

    for log in [&server_log, &agent_log] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.contains('\u{1b}'), "colour codes in a file: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let (mut server, addr) = start_server(dir.path(), &log, true).await;
    let alice = RawClient::login(addr, "localhost", "alice", "pw-a", "a").await;
    drop(alice);
    wait_log(&log, "session bound").await;
    term(&server);
    server.wait().await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        n += 1;
    }
    assert!(n >= 3, "{text}");
}
