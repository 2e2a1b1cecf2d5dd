//! An exec capability's `timeout` is about the program, not the agent's wall clock (issue 15,
//! item 9). A real `spine agent` process runs a program that finishes about 0.2 s after it
//! starts; the agent is frozen with SIGSTOP right after the start, for longer than the
//! `timeout`, then continued. The program exited while the agent was stopped, so it did not run
//! past the timeout: the job succeeds with its output. Before the fix the agent woke up, saw its
//! clock past the timeout and answered `'…' ran longer than 1s and was killed`, throwing the
//! output away.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jid::BareJid;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Args, Data, Job, SpineError};
use tokio::process::Command;
use tokio::time::Instant;

/// The capability's limit; the agent stays stopped at least this long plus a margin.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Jobs run at once through the same stall: each one is a separate chance for the frozen-clock
/// race to go wrong, so a regression cannot pass by luck.
const JOBS: usize = 4;

/// The program: writes its pid to `$1` when it starts, waits (at most 5 s) for the file `$1.go`
/// that the test creates once the agent is stopped, then works for 0.2 s and prints a line.
const PROGRAM: &str = r#"#!/bin/sh
echo $$ > "$1.tmp" && mv "$1.tmp" "$1"
n=0
while [ ! -e "$1.go" ]; do
    n=$((n + 1))
    if [ $n -gt 100 ]; then exit 3; fi
    sleep 0.05
done
sleep 0.2
echo "output of $SPINE_JOB_ID"
"#;

fn write_files(dir: &Path, server: &TestServer) -> PathBuf {
    let program = dir.join("quick.sh");
    std::fs::write(&program, PROGRAM).expect("write the program");
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the program");
    let config = dir.join("agent.toml");
    let toml = format!(
        r#"jid = "agent1@localhost/w1"
password = "pw-a1"
server = "{addr}"
dispatchers = ["dispatcher@localhost"]
slots = {JOBS}
drain_grace = "2s"
[[capability]]
name = "test.quick"
kind = "exec"
argv = ["{program}", "{{arg.marker}}"]
args.marker = {{ pattern = "/[A-Za-z0-9/._-]+" }}
input = "none"
timeout = "{secs}s"
"#,
        addr = server.addr,
        program = program.display(),
        secs = TIMEOUT.as_secs(),
    );
    std::fs::write(&config, toml).expect("write the configuration");
    config
}

fn job(id: &str, marker: &Path) -> Job {
    let mut j = Job::new(
        id.parse().expect("job id"),
        "test.quick".parse().expect("capability"),
    );
    j.args = Args(
        serde_json::json!({ "marker": marker.display().to_string() })
            .as_object()
            .cloned()
            .expect("an object"),
    );
    j
}

/// Waits until `cond` holds, polling; panics with `what` after `within`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether process `pid` has exited: gone, or a zombie that its (stopped) parent has not
/// collected yet.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_finished_while_the_agent_was_frozen_is_not_a_timeout() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw-a1")]).await;
    let mut d = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_files(dir.path(), &server);
    let mut agent = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine agent");
    let agent_pid = Pid::from_raw(agent.id().expect("the agent's pid") as i32);
    let (to, _, _) = d
        .wait_advertise(&"agent1@localhost".parse::<BareJid>().expect("JID"))
        .await;

    let markers: Vec<PathBuf> = (0..JOBS)
        .map(|i| dir.path().join(format!("job{i}.pid")))
        .collect();
    let mut ids = Vec::new();
    for (i, m) in markers.iter().enumerate() {
        ids.push(d.send_job(&to, job(&format!("quick-{i}"), m)).await);
    }
    until("every program started", PATIENCE, || {
        markers.iter().all(|m| m.exists())
    })
    .await;

    // Freeze the agent (only the agent: its programs run on), then let the programs finish.
    kill(agent_pid, Signal::SIGSTOP).expect("SIGSTOP the agent");
    let stopped = Instant::now();
    let pids: Vec<i32> = markers
        .iter()
        .map(|m| {
            std::fs::read_to_string(m)
                .expect("pid file")
                .trim()
                .parse()
                .expect("a pid")
        })
        .collect();
    for m in &markers {
        std::fs::write(m.with_extension("pid.go"), b"").expect("go file");
    }
    let stall = TIMEOUT + Duration::from_millis(700);
    until(
        "every program exited while the agent was stopped",
        PATIENCE,
        || pids.iter().all(|p| exited(*p)),
    )
    .await;
    // The agent's clock must pass the timeout while it cannot act on it.
    tokio::time::sleep_until(stopped + stall).await;
    kill(agent_pid, Signal::SIGCONT).expect("SIGCONT the agent");
    println!(
        "agent stopped for {:?} (timeout {TIMEOUT:?})",
        stopped.elapsed()
    );

    // Every outcome first, so a failure shows how many jobs the stall broke.
    let mut outcomes = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let outcome = match d.wait_result(id).await {
            Ok(r) => match r.output {
                Some(Data::Inline { bytes, .. }) => {
                    Ok(String::from_utf8_lossy(&bytes).into_owned())
                }
                other => Err(format!("no inline output: {other:?}")),
            },
            Err(e) => Err(SpineError::from_stanza_error(&e)
                .ok()
                .flatten()
                .map_or_else(|| format!("{e:?}"), |e| e.to_string())),
        };
        println!("quick-{i}: {outcome:?}");
        outcomes.push(outcome);
    }
    let expected: Vec<Result<String, String>> = (0..JOBS)
        .map(|i| Ok(format!("output of quick-{i}\n")))
        .collect();
    assert_eq!(outcomes, expected, "outcomes after the stall");

    kill(agent_pid, Signal::SIGTERM).expect("SIGTERM the agent");
    let status = tokio::time::timeout(PATIENCE, agent.wait())
        .await
        .expect("the agent exits")
        .expect("wait for the agent");
    assert!(status.success(), "agent exit status {status}");
}
