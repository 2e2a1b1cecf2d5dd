//! A killed agent's job directories do not stay behind. A real `spine agent` process runs an
//! `exec` job that takes its input as a file, and is killed with SIGKILL while the program
//! runs: nothing of it deletes the job's directory. The next agent on the machine (the same
//! `TMPDIR`) deletes it when it starts, after killing the program, which had run on in its
//! process group; an agent that stops cleanly leaves nothing. Before, each such directory
//! (`spine-exec-*`, with the job's input in it) stayed in the temporary directory for good,
//! and the program ran until it ended by itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jid::BareJid;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Args, Job};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Writes its pid to `$1`, then waits (at most 30 s) for the file `$1.go`.
const PROGRAM: &str = r#"#!/bin/sh
echo $$ > "$1.tmp" && mv "$1.tmp" "$1"
n=0
while [ ! -e "$1.go" ]; do
    n=$((n + 1))
    if [ $n -gt 600 ]; then exit 3; fi
    sleep 0.05
done
cat "$2"
"#;

fn config(dir: &Path, server: &TestServer, resource: &str) -> PathBuf {
    let program = dir.join("slow.sh");
    std::fs::write(&program, PROGRAM).expect("write the program");
    std::fs::set_permissions(
        &program,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the program");
    let config = dir.join(format!("agent-{resource}.toml"));
    let toml = format!(
        r#"jid = "agent1@localhost/{resource}"
password = "pw-a1"
server = "{addr}"
dispatchers = ["dispatcher@localhost"]
drain_grace = "2s"
[[capability]]
name = "test.slow"
kind = "exec"
argv = ["{program}", "{{arg.marker}}", "{{input}}"]
args.marker = {{ pattern = "/[A-Za-z0-9/._-]+" }}
input = "file"
"#,
        addr = server.addr,
        program = program.display(),
    );
    std::fs::write(&config, toml).expect("write the configuration");
    config
}

fn start_agent(config: &Path, tmp: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["agent", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env("TMPDIR", tmp)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine agent")
}

/// The entries of `dir`, by name, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether process `pid` has exited: gone, or a zombie not collected yet.
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Waits until `cond` holds, polling; panics with `what` after `within`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_job_directories_are_deleted_by_the_next_agent() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw-a1")]).await;
    let mut d = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    // The agents' temporary directory, seen by nothing else.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).expect("mkdir tmp");

    let mut first = start_agent(&config(dir.path(), &server, "one"), &tmp);
    let first_pid = Pid::from_raw(first.id().expect("the agent's pid") as i32);
    let (to, _, _) = d
        .wait_advertise(&"agent1@localhost".parse::<BareJid>().expect("JID"))
        .await;
    let marker = dir.path().join("job.pid");
    let mut job = Job::new(
        "scratch-1".parse().expect("job id"),
        "test.slow".parse().expect("capability"),
    );
    job.args = Args(
        serde_json::json!({ "marker": marker.display().to_string() })
            .as_object()
            .cloned()
            .expect("an object"),
    );
    job.input = Some(spine_protocol::Data::inline(b"the input".to_vec()));
    d.send_job(&to, job).await;
    until("the program started", PATIENCE, || marker.exists()).await;

    // One scratch directory, holding the job's directory with its input.
    let roots = names(&tmp);
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert!(roots[0].starts_with("spine-agent-"), "{roots:?}");
    let root = tmp.join(&roots[0]);
    let jobs = names(&root);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].starts_with("spine-exec-"), "{jobs:?}");
    assert_eq!(
        std::fs::read(root.join(&jobs[0]).join("input")).expect("the input file"),
        b"the input"
    );

    kill(first_pid, Signal::SIGKILL).expect("SIGKILL the agent");
    let _ = first.wait().await;
    // Its program runs on, in a process group of its own.
    let program: i32 = std::fs::read_to_string(&marker)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    // (Stopped however the test ends: the test started it.)
    struct Reap(i32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(-self.0), Signal::SIGKILL);
        }
    }
    let _reap = Reap(program);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!exited(program), "the program outlives the killed agent");
    assert!(
        root.is_dir(),
        "nothing deleted the killed agent's directory"
    );

    // The next agent kills the program and deletes the directory when it starts, and keeps
    // a directory of its own.
    let mut second = start_agent(&config(dir.path(), &server, "two"), &tmp);
    let bare = "agent1@localhost".parse::<BareJid>().expect("JID");
    let deadline = Instant::now() + PATIENCE;
    while d.wait_advertise(&bare).await.0.to_string() != "agent1@localhost/two" {
        assert!(Instant::now() < deadline, "the second agent advertises");
    }
    until("the killed agent's directory is deleted", PATIENCE, || {
        !root.exists()
    })
    .await;
    until("the killed agent's program is stopped", PATIENCE, || {
        exited(program)
    })
    .await;
    let now = names(&tmp);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(tmp.join(&now[0]), root);
    assert!(now[0].starts_with("spine-agent-"), "{now:?}");

    // An agent that stops cleanly leaves nothing.
    kill(
        Pid::from_raw(second.id().expect("the agent's pid") as i32),
        Signal::SIGTERM,
    )
    .expect("SIGTERM the agent");
    let status = tokio::time::timeout(PATIENCE, second.wait())
        .await
        .expect("the agent exits")
        .expect("wait for the agent");
    assert!(status.success(), "agent exit status {status}");
    assert_eq!(names(&tmp), Vec::<String>::new());
}
