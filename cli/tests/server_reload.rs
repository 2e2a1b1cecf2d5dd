//! `spine server` and SIGHUP: before, the process died (exit 129) and a user added with
//! `--add-user` needed a restart. Now SIGHUP reloads accounts and the TLS certificate; a
//! broken file changes nothing and the server keeps serving.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use spine_xmpp::{ConnectOptions, Security};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn hup(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
}

async fn login(addr: SocketAddr, user: &str, pw: &str) -> Result<(), String> {
    let opts = ConnectOptions::new(
        format!("{user}@localhost").parse().unwrap(),
        pw,
        addr,
        Security::Plain { insecure: false },
    );
    match spine_xmpp::connect(opts).await {
        Ok(c) => {
            c.close().await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_accounts_and_survives_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    let base = "listen = \"127.0.0.1:0\"\n[[account]]\nuser = \"alice\"\npassword = \"pw-a\"\n";
    std::fs::write(&cfg, base).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["server", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine server");
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("listening line")
        .unwrap()
        .unwrap();
    let addr: SocketAddr = line
        .split_whitespace()
        .nth(4)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    login(addr, "alice", "pw-a").await.unwrap();
    assert!(
        login(addr, "bob", "pw-b").await.is_err(),
        "bob does not exist yet"
    );

    // A plain SIGHUP: the server lives on.
    hup(pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the server"
    );

    // Bob added (as `spine server --add-user` prints it), then SIGHUP: bob logs in.
    let block = spine_server::account_block("bob", "pw-b");
    std::fs::write(&cfg, format!("{base}{block}")).unwrap();
    hup(pid);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = login(addr, "bob", "pw-b").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob after reload: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken file: nothing changes, the server keeps serving both.
    std::fs::write(&cfg, "max_connections = 0\n").unwrap();
    hup(pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none());
    login(addr, "alice", "pw-a").await.unwrap();
    login(addr, "bob", "pw-b").await.unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status}");
}
