//! SIGTERM while the XMPP server is unreachable: the agent and the dispatcher exit (status 0)
//! within their grace, instead of reconnecting until killed (before: `agent stopping`, then
//! `next attempt in 19.7s` forever). Shutdown wins over reconnect.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use spine_integration::TestServer;
use tokio::process::{Child, Command};

fn spawn(role: &str, config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spine"))
        .args([role, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine")
}

async fn wait_log(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to `child`, then the time it takes to exit (panics past `within`).
async fn terminate(child: &mut Child, within: Duration, log: &Path) -> Duration {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let t0 = Instant::now();
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "still running {within:?} after SIGTERM: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .expect("wait");
    assert!(status.success(), "exit status {status}");
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_server_gone_exits_the_agent_and_the_dispatcher() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw-a1")]).await;
    let dir = tempfile::tempdir().unwrap();
    let agent_cfg = dir.path().join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "jid = \"agent1@localhost/w1\"\npassword = \"pw-a1\"\nserver = \"{}\"\n\
             dispatchers = [\"dispatcher@localhost\"]\ndrain_grace = \"1s\"\n\
             [[capability]]\nname = \"t.true\"\nkind = \"exec\"\nargv = [\"true\"]\n",
            server.addr
        ),
    )
    .unwrap();
    let disp_cfg = dir.path().join("dispatcher.toml");
    std::fs::write(
        &disp_cfg,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\n\
             data_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\n",
            server.addr,
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let (agent_log, disp_log) = (dir.path().join("agent.log"), dir.path().join("d.log"));
    let mut agent = spawn("agent", &agent_cfg, &agent_log);
    let mut dispatcher = spawn("dispatcher", &disp_cfg, &disp_log);
    wait_log(&agent_log, "agent connected").await;
    wait_log(&disp_log, "dispatcher connected").await;
    // Logs for machines: display forms, not Debug (was `addr=Some(127.0.0.1:8480)`).
    let text = wait_log(&disp_log, "HTTP API listening addr=127.0.0.1:").await;
    assert!(!text.contains("Some("), "{text}");

    server.stop().await;
    // Both notice and start reconnecting.
    wait_log(&agent_log, "reconnect failed").await;
    wait_log(&disp_log, "reconnect failed").await;

    // drain_grace (1 s) + 5 s, as docs/agent.md promises.
    let took = terminate(&mut agent, Duration::from_secs(6), &agent_log).await;
    println!("agent exited {took:?} after SIGTERM with the server down");
    let took = terminate(&mut dispatcher, Duration::from_secs(6), &disp_log).await;
    println!("dispatcher exited {took:?} after SIGTERM with the server down");
}
