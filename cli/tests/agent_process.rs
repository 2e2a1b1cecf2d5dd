//! `spine agent` as a real process: SIGTERM drains (the running job finishes, a new job is
//! refused as draining, the agent goes unavailable) and the process exits 0; a wrong password
//! exits non-zero at once with a clear message.

use std::process::Stdio;
use std::time::Duration;

use jid::{BareJid, Jid};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{AgentState, Args, Condition, Data, Job, SpineError};
use tokio::process::Command;
use tokio_xmpp::Stanza;
use xmpp_parsers::presence::Type as PresenceType;

fn write_config(dir: &std::path::Path, server: &TestServer, password: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    let toml = format!(
        r#"jid = "agent1@localhost/w1"
password = "{password}"
server = "{}"
dispatchers = ["dispatcher@localhost"]
drain_grace = "20s"
[[capability]]
name = "slow.sleep"
kind = "exec"
argv = ["sleep", "{{arg.secs}}"]
"#,
        server.addr
    );
    std::fs::write(&path, toml).unwrap();
    path
}

fn sleep_job(id: &str, secs: &str) -> Job {
    let mut j = Job::new(id.parse().unwrap(), "slow.sleep".parse().unwrap());
    j.args = Args(
        serde_json::json!({"secs": secs})
            .as_object()
            .cloned()
            .unwrap(),
    );
    j.input = None::<Data>;
    j
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw-a1")]).await;
    let mut d = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &server, "pw-a1");
    let mut child = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine agent");
    let me: BareJid = "agent1@localhost".parse().unwrap();
    let (to, _, _) = d.wait_advertise(&me).await;

    let first = d.send_job(&to, sleep_job("long", "1.5")).await;
    d.wait_load(&me, |l| l.in_flight == 1).await;
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");

    d.wait_load(&me, |l| l.state == AgentState::Draining).await;
    let second = d.send_job(&to, sleep_job("late", "0")).await;
    let err = d
        .wait_result(&second)
        .await
        .expect_err("a draining agent takes no new job");
    let e = SpineError::from_stanza_error(&err).unwrap().unwrap();
    assert_eq!(e.condition, Condition::Draining);

    let r = d
        .wait_result(&first)
        .await
        .expect("the running job finishes");
    assert_eq!(r.job.as_str(), "long");
    d.wait_for("unavailable", |st| match st {
        Stanza::Presence(p)
            if p.type_ == PresenceType::Unavailable && p.from.as_ref() == Some(&to) =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("agent exits")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    let _: Jid = to;
}

#[tokio::test]
async fn wrong_password_exits_non_zero_with_a_clear_error() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw-a1")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &server, "not-the-password");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["agent", "--config"])
            .arg(&cfg)
            .output(),
    )
    .await
    .expect("exits promptly")
    .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refused by the server"), "{stderr}");
}

#[tokio::test]
async fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "slots = 0\npassword = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("slots: must be at least 1"));
}

#[tokio::test]
async fn environment_overrides_the_file_and_is_validated_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "slots = 3\npassword = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--print-config", "--config"])
        .arg(&path)
        .env("SPINE_AGENT_SLOTS", "7")
        .env("SPINE_AGENT_PASSWORD", "0123")
        .env("SPINE_AGENT_DISPATCHERS", "d1@example.com, d2@example.com")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("slots = 7"), "{text}");
    assert!(
        text.contains("dispatchers = [\n    \"d1@example.com\",\n    \"d2@example.com\",\n]"),
        "{text}"
    );
    assert!(
        text.contains("<redacted>") && !text.contains("from-env"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--config"])
        .arg(&path)
        .env("SPINE_AGENT_SLOTS", "0")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("slots: must be at least 1"));
}

#[tokio::test]
async fn environment_values_are_not_type_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("server.toml");
    std::fs::write(&empty, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["server", "--print-config", "--config"])
        .arg(&empty)
        .env("SPINE_SERVER_DOMAIN", "0123")
        .env("SPINE_SERVER_MAX_CONNECTIONS", "17")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("domain = \"0123\""), "{text}");
    assert!(text.contains("max_connections = 17"), "{text}");
}
