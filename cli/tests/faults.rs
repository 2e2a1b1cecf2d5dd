//! Fault injection with real processes and real signals: 1,000 jobs submitted over HTTP to a
//! `spine dispatcher`, run by 4 `spine agent` processes (an exec capability), while
//!
//! - an agent is `kill -9`ed and restarted, 10 times;
//! - the XMPP server is stopped and restarted once (the embedded `spine server`, then Prosody);
//! - the dispatcher is `kill -9`ed and restarted, twice;
//! - an agent is frozen with SIGSTOP for longer than its heartbeat timeout, then resumed.
//!
//! One job in 25 has a 1 MiB input, kept in the dispatcher's blob store and fetched by its
//! agent over HTTP, so kills land during large transfers too; afterwards no torn upload is
//! left in the blob store's `tmp/`.
//!
//! Afterwards every accepted job must have exactly one final outcome, succeeded with the right
//! output, and none may be recorded twice (the audit log has at most one line per job). The
//! run prints: accepted, succeeded, retried, duplicates suppressed, re-executions, lost.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use sha2::Digest as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

const JOBS: usize = 1000;
const AGENTS: usize = 4;
/// The agent frozen with SIGSTOP (the others are the ones killed).
const FROZEN: usize = 4;
const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("agent1", "pw"),
    ("agent2", "pw"),
    ("agent3", "pw"),
    ("agent4", "pw"),
];

fn spine() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spine"));
    c.kill_on_drop(true).stdin(Stdio::null());
    c
}

fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), sig);
    }
}

/// Standard error appended to `log` (kept across restarts).
fn log_to(log: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// The XMPP server under test.
enum Xmpp {
    Embedded {
        child: Child,
        config: PathBuf,
        log: PathBuf,
        addr: SocketAddr,
    },
    Prosody(spine_integration::prosody::Prosody),
}

impl Xmpp {
    async fn embedded(dir: &Path) -> Xmpp {
        let port = spine_integration::free_port().unwrap();
        let mut toml = format!("listen = \"127.0.0.1:{port}\"\ndomain = \"localhost\"\n");
        for (u, p) in ACCOUNTS {
            toml.push_str(&format!(
                "[[account]]\nuser = \"{u}\"\npassword = \"{p}\"\n"
            ));
        }
        let config = dir.join("server.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.join("server.log");
        let child = Self::start_embedded(&config, &log).await;
        Xmpp::Embedded {
            child,
            config,
            log,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    async fn start_embedded(config: &Path, log: &Path) -> Child {
        let mut child = spine()
            .args(["server", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log_to(log))
            .spawn()
            .expect("start spine server");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            BufReader::new(out).read_line(&mut line),
        )
        .await
        .expect("spine server prints its address")
        .unwrap();
        assert!(line.contains("listening on"), "spine server said {line:?}");
        child
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Xmpp::Embedded { addr, .. } => *addr,
            Xmpp::Prosody(p) => p.addr,
        }
    }

    /// Stops the server (SIGTERM: every stream is closed) and starts it again on the same
    /// address.
    async fn restart(&mut self) {
        match self {
            Xmpp::Embedded {
                child, config, log, ..
            } => {
                signal(child, Signal::SIGTERM);
                let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                *child = Self::start_embedded(config, log).await;
            }
            Xmpp::Prosody(p) => {
                tokio::time::sleep(Duration::from_millis(0)).await;
                tokio::task::block_in_place(|| p.restart()).expect("prosody restarts");
            }
        }
    }
}

/// The dispatcher process, restarted on the same configuration and data.
struct Dispatcher {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Dispatcher {
    fn spawn(config: &Path, log: &Path) -> Child {
        spine()
            .args(["dispatcher", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_to(log))
            .spawn()
            .expect("start spine dispatcher")
    }

    async fn kill_9_and_restart(&mut self) {
        signal(&self.child, Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.child = Self::spawn(&self.config, &self.log);
    }
}

/// One agent process.
struct AgentProc {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl AgentProc {
    fn spawn(config: &Path, log: &Path) -> Child {
        spine()
            .args(["agent", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_to(log))
            .spawn()
            .expect("start spine agent")
    }

    async fn kill_9_and_restart(&mut self) {
        signal(&self.child, Signal::SIGKILL);
        let _ = self.child.wait().await;
        self.child = Self::spawn(&self.config, &self.log);
    }
}

/// Every `LARGE_EVERY`th job has an input of `LARGE` bytes: it is kept in the dispatcher's blob
/// store and fetched by its agent over HTTP (protocol 1.1), through the same kills.
const LARGE_EVERY: usize = 25;
const LARGE: usize = 1 << 20;

/// Job `i`'s input.
fn input(i: usize) -> Vec<u8> {
    let small = format!("job-{i}").into_bytes();
    if i % LARGE_EVERY != 0 {
        return small;
    }
    small.iter().copied().cycle().take(LARGE).collect()
}

fn expected_output(i: usize) -> Vec<u8> {
    let hex: String = sha2::Sha256::digest(input(i))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{hex}  -\n").into_bytes()
}

/// Submits job `i`, retrying while the dispatcher is down; the idempotency key makes a retry
/// of a submission that was stored (but not answered) return the same job.
async fn submit(http: &reqwest::Client, base: &str, i: usize) -> String {
    let body = json!({
        "capability": "fault.work",
        "input": spine_client::base64(&input(i)),
        "idempotency_key": format!("k-{i}"),
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = http
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await;
        if let Ok(r) = r {
            let status = r.status().as_u16();
            let v: Value =
                serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
            if status == 202 || status == 200 {
                return v["id"].as_str().expect("job id").to_owned();
            }
            assert!(status >= 500, "submission {i} refused: {status} {v}");
        }
        assert!(
            Instant::now() < deadline,
            "job {i} could not be submitted in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job, as the dispatcher lists them (None while it is down).
async fn list(http: &reqwest::Client, base: &str) -> Option<Vec<Value>> {
    let r = http
        .get(format!("{base}/v1/jobs?limit=10000"))
        .send()
        .await
        .ok()?;
    let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
    v["jobs"].as_array().cloned()
}

async fn run(kind: &str, mut xmpp: Xmpp, dir: &Path) {
    let work = dir.join("work.sh");
    let runlog = dir.join("runs.log");
    std::fs::write(
        &work,
        "#!/bin/sh\necho \"$SPINE_JOB_ID $SPINE_ATTEMPT\" >> \"$RUNLOG\"\nsleep 0.1\nexec sha256sum\n",
    )
    .unwrap();
    let addr = xmpp.addr();
    let http_port = spine_integration::free_port().unwrap();
    let base = format!("http://127.0.0.1:{http_port}");
    let data = dir.join("data");
    let dconfig = dir.join("dispatcher.toml");
    std::fs::write(
        &dconfig,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{addr}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\nno_agent_wait = \"5m\"\nmax_attempts = 20\n",
            data.display()
        ),
    )
    .unwrap();
    let dlog = dir.join("dispatcher.log");
    let mut dispatcher = Dispatcher {
        child: Dispatcher::spawn(&dconfig, &dlog),
        config: dconfig,
        log: dlog.clone(),
    };
    let mut agents = Vec::new();
    for n in 1..=AGENTS {
        let config = dir.join(format!("agent{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "jid = \"agent{n}@localhost/w\"\npassword = \"pw\"\nserver = \"{addr}\"\ndispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"1s\"\nslots = 4\n\n[[capability]]\nname = \"fault.work\"\nkind = \"exec\"\nargv = [\"/bin/sh\", \"{}\"]\ntimeout = \"30s\"\nenv = {{ RUNLOG = \"{}\" }}\n",
                work.display(),
                runlog.display()
            ),
        )
        .unwrap();
        let log = dir.join(format!("agent{n}.log"));
        agents.push(AgentProc {
            child: AgentProc::spawn(&config, &log),
            config,
            log,
        });
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    spine_integration::farm::wait_for_agents(&base, "fault.work", AGENTS as u64).await;

    // Submissions at about 100 per second, in a task of their own.
    let submitter = {
        let (http, base) = (http.clone(), base.clone());
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(JOBS);
            for i in 0..JOBS {
                ids.push(submit(&http, &base, i).await);
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            ids
        })
    };

    // The faults, on a schedule.
    let t0 = Instant::now();
    let at = |s: f64| t0 + Duration::from_secs_f64(s);
    let mut kills = 0;
    let mut next_kill = 1.0;
    let mut events: Vec<(f64, &str)> = vec![
        (4.0, "freeze"),
        (6.0, "dispatcher"),
        (10.0, "server"),
        (14.5, "thaw"),
        (16.0, "dispatcher"),
    ];
    events.reverse();
    while kills < 10 || !events.is_empty() {
        let next_event = events.last().map(|e| e.0).unwrap_or(f64::MAX);
        if kills < 10 && next_kill <= next_event {
            tokio::time::sleep_until(at(next_kill)).await;
            // Agents 1–3 in turn; agent 4 is the frozen one.
            agents[kills % (AGENTS - 1)].kill_9_and_restart().await;
            kills += 1;
            next_kill += 1.7;
            continue;
        }
        let (t, what) = events.pop().unwrap();
        tokio::time::sleep_until(at(t)).await;
        match what {
            "freeze" => signal(&agents[FROZEN - 1].child, Signal::SIGSTOP),
            "thaw" => signal(&agents[FROZEN - 1].child, Signal::SIGCONT),
            "dispatcher" => dispatcher.kill_9_and_restart().await,
            "server" => xmpp.restart().await,
            _ => unreachable!(),
        }
    }
    let faults_s = t0.elapsed().as_secs_f64();
    let ids = submitter.await.expect("submitter task");

    // Every job ends.
    let deadline = Instant::now() + Duration::from_secs(180);
    let jobs = loop {
        if let Some(jobs) = list(&http, &base).await {
            let done = jobs
                .iter()
                .filter(|j| {
                    matches!(
                        j["state"].as_str(),
                        Some("succeeded" | "failed" | "cancelled" | "timed-out")
                    )
                })
                .count();
            if done >= jobs.len() && jobs.len() >= JOBS {
                break jobs;
            }
            assert!(
                Instant::now() < deadline,
                "{kind}: {done} of {} jobs final after 180 s; dispatcher log:\n{}",
                jobs.len(),
                tail(&dlog)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Counts.
    let accepted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let listed: HashSet<&str> = jobs.iter().filter_map(|j| j["id"].as_str()).collect();
    let mut succeeded = 0;
    let mut retried = 0;
    for (i, id) in ids.iter().enumerate() {
        let r = http
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap();
        let job: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        if job["state"] == "succeeded" {
            assert_eq!(
                spine_client::output(&job).unwrap(),
                expected_output(i),
                "{kind}: job {i} ({id}) has another job's output"
            );
            succeeded += 1;
        }
        retried += job["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
    }
    let dlog_text = std::fs::read_to_string(&dlog).unwrap_or_default();
    let suppressed = dlog_text.matches("duplicate result dropped").count();
    let gone = dlog_text.matches("agent gone").count();
    let restarted = dlog_text.matches("agent restarted").count();
    let runs = std::fs::read_to_string(&runlog).unwrap_or_default();
    let executions = runs.lines().count();
    let mut audit: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(data.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
    {
        let v: Value = serde_json::from_str(line).expect("audit line is JSON");
        *audit
            .entry(v["job"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    let recorded_twice = audit.values().filter(|n| **n > 1).count();
    let audit_missing = accepted
        .iter()
        .filter(|id| !audit.contains_key(**id))
        .count();
    let lost = accepted.len() - succeeded;
    let report = format!(
        "faults on {kind} ({faults_s:.1} s of faults: 10 agent kills, 1 server restart, 2 dispatcher kills, 1 freeze of 10.5 s): accepted {}, succeeded {succeeded}, retried {retried}, duplicates suppressed {suppressed}, re-executions {}, recorded twice {recorded_twice}, audit lines missing {audit_missing}, lost {lost} (the dispatcher saw {gone} agents gone and {restarted} restarted)",
        accepted.len(),
        executions.saturating_sub(JOBS),
    );
    println!("{report}");
    // Kept for the CI log (.ci/run prints it after the tests).
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-{kind}.txt")),
        format!("{report}\n"),
    );
    assert_eq!(
        accepted.len(),
        JOBS,
        "{kind}: a resubmission created a second job"
    );
    assert_eq!(
        listed, accepted,
        "{kind}: the dispatcher holds other jobs than those accepted"
    );
    assert_eq!(lost, 0, "{kind}: jobs lost or failed");
    assert_eq!(recorded_twice, 0, "{kind}: an outcome recorded twice");
    assert_eq!(audit_missing, 0, "{kind}: jobs without their audit line");
    assert!(
        executions >= JOBS,
        "{kind}: {executions} executions for {JOBS} jobs"
    );
    // The faults took effect: the dispatcher lost agents (kill -9, the freeze, the server
    // restart) and saw restarted ones.
    assert!(
        gone + restarted >= 5,
        "{kind}: {gone} gone, {restarted} restarted"
    );
    // The large inputs went over HTTP, and no upload cut short by a kill was left behind
    // (the start-up sweep of the blob store's tmp/).
    let fetched = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("spine_blob_fetches_total ")?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    assert!(fetched > 0, "{kind}: no input was fetched over HTTP");
    let torn: Vec<_> = std::fs::read_dir(data.join("blobs").join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(torn.is_empty(), "{kind}: torn uploads left: {torn:?}");

    signal(&dispatcher.child, Signal::SIGTERM);
    for a in &agents {
        signal(&a.child, Signal::SIGCONT);
        signal(&a.child, Signal::SIGTERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), dispatcher.child.wait()).await;
    for a in &mut agents {
        let _ = tokio::time::timeout(Duration::from_secs(15), a.child.wait()).await;
    }
    drop(xmpp);
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_under_faults_on_the_embedded_server() {
    let dir = tempfile::tempdir().unwrap();
    let xmpp = Xmpp::embedded(dir.path()).await;
    run("embedded", xmpp, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_under_faults_on_prosody() {
    if !spine_integration::prosody::available() {
        assert!(
            !spine_integration::servers::required(),
            "SPINE_REQUIRE_SERVERS=1 but prosody is not installed"
        );
        eprintln!("skipping: prosody is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = tokio::task::spawn_blocking(|| spine_integration::prosody::Prosody::start(ACCOUNTS))
        .await
        .unwrap()
        .expect("prosody starts");
    run("prosody", Xmpp::Prosody(p), dir.path()).await;
}
