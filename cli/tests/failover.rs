//! Several `spine dispatcher` processes on one PostgreSQL store (docs/dispatcher.md, "Running
//! several dispatchers"): three dispatchers, four agents, jobs submitted over HTTP at a steady
//! rate to each dispatcher in turn (standbys store submissions for the leader) by a client that
//! moves on to another when one refuses or is gone, and read back from any of them; the leader is killed with SIGKILL again and again, and once paused (SIGSTOP) past its
//! lease and woken. Every accepted job ends succeeded exactly once with its right output, no
//! handler runs twice, the paused leader is fenced off, and the failover times are printed.
//!
//! Every 8th job has a 200 KiB input (a blob), and each killed leader's blob directory is
//! deleted before it comes back, as if its disk were lost: the blobs come from PostgreSQL.
//!
//! `SPINE_FAILOVER_JOBS` and `SPINE_FAILOVER_KILLS` scale it (defaults 240 and 3 on the
//! embedded server, 96 and 2 on ejabberd; the figures in BENCHMARKS.md come from 2,000 and 10).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::Digest as _;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::postgres::Postgres;
use spine_integration::servers::{AnyServer, Kind};
use tokio::process::{Child, Command};

const TOKEN: &str = "failover-token-0123456789";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// One dispatcher process and how to reach it.
struct Node {
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    http: String,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("dispatcher log");
        let child = Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["dispatcher", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start spine dispatcher");
        self.child = Some(child);
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().and_then(|c| c.id()).expect("running") as i32)
    }

    async fn kill_9(&mut self) {
        kill(self.pid(), Signal::SIGKILL).expect("SIGKILL");
        if let Some(mut c) = self.child.take() {
            let _ = c.wait().await;
        }
    }
}

/// Kills every dispatcher still running.
async fn stop_all(nodes: &mut [Node]) {
    for n in nodes {
        if let Some(mut c) = n.child.take() {
            let _ = c.kill().await;
        }
    }
}

/// What `/healthz` says: "ok leader", "ok standby", or nothing (down).
async fn health(api: &reqwest::Client, http: &str) -> Option<String> {
    let r = api
        .get(format!("http://{http}/healthz"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    Some(r.text().await.ok()?.trim().to_owned())
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn every_thread_stopped(pid: Pid) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|st| {
                st.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
            })
            .is_some_and(|state| state == 'T' || state == 't')
    })
}

/// The index of the one node that says it leads, waiting up to `within`; every other answering
/// node must say standby.
async fn leader(api: &reqwest::Client, nodes: &[Node], within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut leaders = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.child.is_some() && health(api, &n.http).await.as_deref() == Some("ok leader") {
                leaders.push(i);
            }
        }
        assert!(
            leaders.len() <= 1,
            "two dispatchers say they lead: {leaders:?}"
        );
        if let [i] = leaders[..] {
            return i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every `LARGE`th job has a large input (a blob): `work.digest` of [`large_input`].
const LARGE: usize = 8;

/// Job `n`'s input when it is a large one: 200 KiB, over the inline limit.
/// Sends `req` with the test's token; the answer's JSON.
async fn json_of(req: reqwest::RequestBuilder) -> serde_json::Value {
    req.bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn large_input(n: usize) -> Vec<u8> {
    (0..200 * 1024).map(|i| (i * 31 + n) as u8).collect()
}

/// What `work.digest` answers: the length and the sum of the bytes.
fn digest(input: &[u8]) -> String {
    let sum: u64 = input.iter().map(|b| u64::from(*b)).sum();
    format!("{}:{sum}", input.len())
}

/// Job `n`'s right output.
fn expected(n: usize) -> Vec<u8> {
    if n % LARGE == 0 {
        digest(&large_input(n)).into_bytes()
    } else {
        (n * n).to_string().into_bytes()
    }
}

/// Submits job `n` to the dispatcher after the one that took the last (the leader or a
/// standby: both store submissions), moving on when one refuses or does not answer; the
/// idempotency key makes a retry after a lost answer the same job. A large job's input is the
/// raw body (it goes to the blob store).
async fn submit_any(
    api: &reqwest::Client,
    https: &[String],
    start: &mut usize,
    n: usize,
) -> String {
    let large = (n % LARGE == 0).then(|| large_input(n));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        for k in 0..https.len() {
            let i = (*start + k) % https.len();
            let req = match &large {
                Some(input) => api
                    .post(format!(
                        "http://{}/v1/jobs?capability=work.digest&idempotency_key=job-{n}",
                        https[i]
                    ))
                    .header("content-type", "application/octet-stream")
                    .body(input.clone()),
                None => api
                    .post(format!("http://{}/v1/jobs", https[i]))
                    .json(&serde_json::json!({
                        "capability": "work.square",
                        "args": {"n": n},
                        "idempotency_key": format!("job-{n}"),
                    })),
            };
            // A paused dispatcher accepts connections and answers nothing: move on after a
            // second (the failover times include this client's search for the leader).
            let r = req
                .bearer_auth(TOKEN)
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            let Ok(r) = r else { continue };
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            match status {
                200..=202 => {
                    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON answer");
                    // The next job goes to the next dispatcher: standbys take submissions.
                    *start = i + 1;
                    return v["id"].as_str().expect("job id").to_owned();
                }
                503 => {
                    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON refusal");
                    assert!(
                        v["error"] == "standby" || v["error"] == "unavailable",
                        "{text}"
                    );
                }
                other => panic!("job {n}: HTTP {other}: {text}"),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {n}: no dispatcher accepted it for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dispatcher `n`'s configuration: the shared account with resource `d{n}`, its own data
/// directory and port, the shared store, the XMPP server's certificate to trust (`tls`), and
/// more top-level settings (`extra`).
fn config(
    dir: &Path,
    n: usize,
    server: &str,
    store: &str,
    http: &str,
    tls: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("d{n}.toml"));
    std::fs::write(
        &path,
        format!(
            "jid = \"dispatcher@localhost/d{n}\"\npassword = \"pw-d\"\nserver = \"{server}\"\n\
             data_dir = \"{}\"\nhttp_listen = \"{http}\"\nstore = \"{store}\"\n{extra}\
             [[http_token]]\nname = \"web\"\ntoken = \"{TOKEN}\"\ncapabilities = [\"*\"]\nmetrics = true\n{tls}",
            dir.join(format!("data{n}")).display()
        ),
    )
    .expect("config");
    path
}

/// `count` dispatchers (not started) on the XMPP server at `server` and the store at `store`,
/// each with its own port, data directory and log under `dir`.
fn nodes(count: usize, dir: &Path, server: &str, store: &str, tls: &str) -> Vec<Node> {
    nodes_with(count, dir, server, store, tls, "")
}

/// [`nodes`] with more top-level settings in each configuration.
fn nodes_with(
    count: usize,
    dir: &Path,
    server: &str,
    store: &str,
    tls: &str,
    extra: &str,
) -> Vec<Node> {
    (1..=count)
        .map(|n| {
            let http = format!("127.0.0.1:{}", spine_integration::free_port().unwrap());
            Node {
                data: dir.join(format!("data{n}")),
                config: config(dir, n, server, store, &http, tls, extra),
                log: dir.join(format!("d{n}.log")),
                http,
                child: None,
            }
        })
        .collect()
}

/// Two dispatchers on PostgreSQL with `extra` settings, the embedded server (with the
/// accounts of the dispatchers, the agent and the `webapp` submitter) and the [`sleeper`]
/// agent; the first started and leading. `None`: no PostgreSQL here.
struct Pair {
    pg: Postgres,
    server: spine_integration::TestServer,
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
    stop: tokio::sync::oneshot::Sender<()>,
    api: reqwest::Client,
}

async fn pair_leading(extra: &str) -> Option<Pair> {
    let pg = Postgres::start_or_skip()?;
    let server = spine_integration::TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("webapp", "pw-w"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nodes_with(
        2,
        dir.path(),
        &server.addr.to_string(),
        &pg.url(),
        "",
        extra,
    );
    let stop = sleeper(&server);
    nodes[0].spawn();
    let api = reqwest::Client::new();
    leader(&api, &nodes, Duration::from_secs(20)).await;
    Some(Pair {
        pg,
        server,
        _dir: dir,
        nodes,
        stop,
        api,
    })
}

/// [`pair_leading`] with the second dispatcher started and standing by.
async fn pair_standing_by(extra: &str) -> Option<Pair> {
    let mut p = pair_leading(extra).await?;
    p.nodes[1].spawn();
    until_standby(&p.api, &p.nodes[1].http).await;
    Some(p)
}

/// An agent (account agent1) with 4 slots of `work.sleep` (sleeps `ms`, outputs `slept {ms}`),
/// `work.big` (a 200 KiB output), `work.halves` (reports 50 % after 0.4 s, ends 0.4 s
/// later) and `work.digest` ([`digest`] of its input); it stops when the sender is dropped or
/// sent to.
fn sleeper(server: &spine_integration::TestServer) -> tokio::sync::oneshot::Sender<()> {
    let cfg = spine_integration::farm::agent_config(server, 1, "slots = 4");
    let agent = Agent::builder(cfg)
        .capability("work.sleep", None, |ctx: JobContext| async move {
            let ms = ctx.args.get("ms").and_then(|v| v.as_u64()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, JobError>(Output::bytes(format!("slept {ms}")))
        })
        .capability("work.big", None, |_ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(large_input(7)))
        })
        .capability("work.halves", None, |ctx: JobContext| async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            ctx.progress(50, "half way");
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok::<_, JobError>(Output::bytes("done"))
        })
        .capability("work.digest", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(digest(&ctx.input)))
        })
        .build()
        .unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(agent.run(async move {
        let _ = rx.await;
    }));
    stop
}

/// Waits up to 20 s for the dispatcher at `http` to say it stands by.
async fn until_standby(api: &reqwest::Client, http: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while health(api, http).await.as_deref() != Some("ok standby") {
        assert!(tokio::time::Instant::now() < deadline, "no standby");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole of an event stream that ends (a job's own), read within 20 s.
async fn stream_text(api: &reqwest::Client, url: String) -> String {
    api.get(url)
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// An open event stream that does not end (every job's).
async fn open_stream(api: &reqwest::Client, url: String) -> reqwest::Response {
    let r = api.get(url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r
}

/// What `stream` sends until it has sent `needle`, within 20 s.
async fn read_until(stream: &mut reqwest::Response, needle: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("the stream ended or stalled ({other:?}): {seen}"),
        }
    }
    seen
}

/// How many times `line` is in the dispatchers' logs, all together.
fn logged(nodes: &[Node], line: &str) -> usize {
    nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .matches(line)
                .count()
        })
        .sum()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dispatchers_fail_over_on_kill_9_and_fence_a_paused_leader() {
    let jobs = env_or("SPINE_FAILOVER_JOBS", 240);
    let kills = env_or("SPINE_FAILOVER_KILLS", 3);
    fail_over(Kind::Embedded, jobs, kills).await;
}

/// The same on ejabberd, smaller: the account's three sessions, presence to the bare JID
/// reaching each, and IQ answers reaching the leader's full JID are the server's part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dispatchers_fail_over_on_ejabberd() {
    let jobs = env_or("SPINE_FAILOVER_JOBS", 96);
    let kills = env_or("SPINE_FAILOVER_KILLS", 2);
    fail_over(Kind::Ejabberd, jobs, kills).await;
}

async fn fail_over(kind: Kind, jobs: usize, kills: usize) {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let Some(server) = AnyServer::start(
        kind,
        &[
            ("dispatcher", "pw-d"),
            ("agent1", "pw"),
            ("agent2", "pw"),
            ("agent3", "pw"),
            ("agent4", "pw"),
        ],
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("xmpp-ca.pem");
    std::fs::write(&ca, server.cert_pem()).expect("CA file");
    let tls = format!("[tls]\nca_file = \"{}\"\n", ca.display());
    let mut nodes = nodes(3, dir.path(), &server.addr.to_string(), &pg.url(), &tls);

    // Four agents; every handler run is recorded by job id.
    let runs: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut stops = Vec::new();
    for n in 1..=4 {
        let cfg = spine_integration::farm::agent_config(&server, n, &format!("slots = 4\n{tls}"));
        let runs = runs.clone();
        let agent = Agent::builder(cfg)
            .capability("work.square", None, {
                let runs = runs.clone();
                move |ctx: JobContext| {
                    let runs = runs.clone();
                    async move {
                        runs.lock().unwrap().push(ctx.id.to_string());
                        tokio::time::sleep(Duration::from_millis(60)).await;
                        let n = ctx.args.get("n").and_then(|v| v.as_u64()).unwrap_or(0);
                        Ok::<_, JobError>(Output::bytes((n * n).to_string()))
                    }
                }
            })
            .capability("work.digest", None, move |ctx: JobContext| {
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push(ctx.id.to_string());
                    tokio::time::sleep(Duration::from_millis(60)).await;
                    Ok::<_, JobError>(Output::bytes(digest(&ctx.input)))
                }
            })
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        stops.push(tx);
    }
    for n in &mut nodes {
        n.spawn();
    }
    let api = reqwest::Client::new();
    // Every dispatcher, standbys too, knows the four agents (the registry is warm everywhere).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        loop {
            let agents = async {
                let v: serde_json::Value = api
                    .get(format!(
                        "http://{}/v1/agents?capability=work.square",
                        n.http
                    ))
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                Some(v["agents"].as_array()?.len())
            };
            if agents.await == Some(4) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} does not know the four agents",
                n.http
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    leader(&api, &nodes, Duration::from_secs(20)).await;

    // The client: jobs at a steady rate for as long as the faults take.
    let https: Vec<String> = nodes.iter().map(|n| n.http.clone()).collect();
    let span = Duration::from_millis(3_500 * kills as u64 + 9_000);
    let every = span / jobs as u32;
    let client = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut start = 0;
            let mut accepted = Vec::new();
            let mut tick = tokio::time::interval(every);
            for n in 0..jobs {
                tick.tick().await;
                accepted.push((n, submit_any(&api, &https, &mut start, n).await));
            }
            accepted
        })
    };

    // kill -9 of the leader, again and again; each time it comes back as a standby.
    let mut killed_at = Vec::new();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for _ in 0..kills {
        let l = leader(&api, &nodes, Duration::from_secs(10)).await;
        killed_at.push(now_ms());
        nodes[l].kill_9().await;
        let next = leader(&api, &nodes, Duration::from_secs(10)).await;
        assert_ne!(next, l);
        // Its machine's disk is lost with it: the blobs are read from the shared store.
        let _ = std::fs::remove_dir_all(nodes[l].data.join("blobs"));
        nodes[l].spawn();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }

    // SIGSTOP past the lease: another takes over; woken, the old leader is fenced off and
    // stands by.
    let l = leader(&api, &nodes, Duration::from_secs(10)).await;
    let paused = nodes[l].pid();
    kill(paused, Signal::SIGSTOP).expect("SIGSTOP");
    let stopped_at = now_ms();
    // The stop takes hold once one of the process's threads is scheduled to handle it; until
    // then the others run on (a loaded machine: milliseconds), and may still say they lead.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !every_thread_stopped(paused) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader did not stop"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let next = leader(&api, &nodes, Duration::from_secs(10)).await;
    assert_ne!(next, l, "a paused leader was replaced");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    kill(paused, Signal::SIGCONT).expect("SIGCONT");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if health(&api, &nodes[l].http).await.as_deref() == Some("ok standby") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the woken leader did not stand by"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(leader(&api, &nodes, Duration::from_secs(5)).await, next);
    // `/healthz` reads the election's state, which changes before the driver hears of it and
    // logs: on two runtime threads the line can follow the answer by a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(&nodes[l].log).unwrap_or_default();
        if log.contains("no longer leading") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the paused leader's log says it stood down:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let accepted = client.await.expect("client");
    assert_eq!(accepted.len(), jobs);
    let distinct_ids: HashSet<&String> = accepted.iter().map(|(_, id)| id).collect();
    assert_eq!(
        distinct_ids.len(),
        jobs,
        "each job accepted once (idempotency keys)"
    );

    // Every accepted job ends succeeded, with its own output.
    let mut dispatched: Vec<u64> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut pending: HashMap<String, usize> =
        accepted.iter().map(|(n, id)| (id.clone(), *n)).collect();
    while !pending.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} jobs did not end, such as {:?}",
            pending.len(),
            pending.iter().next()
        );
        let l = leader(&api, &nodes, Duration::from_secs(10)).await;
        let ids: Vec<(String, usize)> = pending.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (k, (id, n)) in ids.into_iter().enumerate() {
            // Any dispatcher answers: a standby reads the shared store.
            let reader = &nodes[(l + k) % nodes.len()];
            let Ok(r) = api
                .get(format!("http://{}/v1/jobs/{id}", reader.http))
                .bearer_auth(TOKEN)
                .send()
                .await
            else {
                break;
            };
            if r.status().as_u16() != 200 {
                break;
            }
            let v: serde_json::Value = r.json().await.expect("job JSON");
            match v["state"].as_str() {
                Some("succeeded") => {
                    let out = base64::engine::general_purpose::STANDARD
                        .decode(v["result"]["output"].as_str().expect("output"))
                        .expect("base64");
                    assert_eq!(out, expected(n), "job {n}'s output");
                    if let Some(t) = v["dispatched_at"].as_str() {
                        let t = humantime::parse_rfc3339(t).expect("RFC 3339");
                        dispatched.push(t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64);
                    }
                    pending.remove(&id);
                }
                Some("failed" | "cancelled") => panic!("job {n} ended {v}"),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken = logged(&nodes, "job accepted by a standby: taken");
    println!("{}: {taken} jobs were accepted by a standby", kind.name());
    // Jobs a dead leader sent ahead of their commit, found by the next one from the agents'
    // answers to <recall/> (PROTOCOL.md §10.1): as many as the kills happened to catch.
    let recalled = logged(
        &nodes,
        "sent by the last leader before its commit: back to its agent",
    );
    println!(
        "{}: {recalled} jobs sent ahead by a dead leader went back to their agents",
        kind.name()
    );
    assert!(taken > 0, "standbys accepted submissions for the leader");
    // Every accepted job ran exactly once. A submission whose answer the client never got
    // (the leader died after sending the job ahead and before storing its acceptance, and the
    // client sent it again: a new job) may have run too, once, as on a lone dispatcher after a
    // kill -9 (docs/dispatcher.md §5): at most one per fault, the client sending one at a time.
    let ran = runs.lock().unwrap().clone();
    let mut times_run: HashMap<&String, usize> = HashMap::new();
    for id in &ran {
        *times_run.entry(id).or_default() += 1;
    }
    for id in &distinct_ids {
        assert_eq!(times_run.get(id), Some(&1), "accepted job {id} ran once");
    }
    let unacknowledged: Vec<&&String> = times_run
        .keys()
        .filter(|id| !distinct_ids.contains(**id))
        .collect();
    println!(
        "{}: {} runs of submissions never acknowledged (sent ahead, the leader dead before their acceptance was stored)",
        kind.name(),
        unacknowledged.len()
    );
    assert!(
        times_run.values().all(|n| *n == 1),
        "no job ran twice: {times_run:?}"
    );
    assert!(
        unacknowledged.len() <= kills + 1,
        "at most one unacknowledged submission per fault: {unacknowledged:?}"
    );

    // Failover: a leader's death to the first placement after it (by the next leader).
    killed_at.push(stopped_at);
    let mut times: Vec<u64> = Vec::new();
    for (i, t) in killed_at.iter().enumerate() {
        let until = killed_at.get(i + 1).copied().unwrap_or(u64::MAX);
        if let Some(first) = dispatched.iter().filter(|d| **d >= *t && **d < until).min() {
            times.push(first - t);
        }
    }
    println!(
        "{}: failover per fault, in order (the last: SIGSTOP): {times:?} ms",
        kind.name()
    );
    times.sort_unstable();
    println!(
        "{}: failover (death or pause of the leader → first placement by the next), {} faults: p50 {} ms, p99 {} ms, max {} ms; {} jobs, {} runs",
        kind.name(),
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or(0),
        jobs,
        ran.len()
    );
    assert!(
        times.len() >= kills,
        "a placement after each kill: {times:?}"
    );
    assert!(
        times.iter().all(|t| *t <= 5_000),
        "each failover within 5 s: {times:?}"
    );
    stop_all(&mut nodes).await;
    drop(stops);
    // Every accepted job's audit line is in the audit log of the dispatcher that led when it
    // ended, through the kills. (A kill between a commit and the append of its lines, which
    // the next leader then writes from PostgreSQL's spine_audit_batches, is too narrow for
    // this test to hit: postgres_store.rs reads such lines back.)
    let mut audited: HashSet<String> = HashSet::new();
    for node in &nodes {
        let Ok(text) = std::fs::read_to_string(node.data.join("audit.jsonl")) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("an audit line is JSON");
            if let Some(job) = v["job"].as_str() {
                audited.insert(job.to_owned());
            }
        }
    }
    let missing: Vec<&&String> = distinct_ids
        .iter()
        .filter(|id| !audited.contains(id.as_str()))
        .collect();
    println!(
        "{}: {} accepted jobs, {} in the dispatchers' audit logs",
        kind.name(),
        distinct_ids.len(),
        distinct_ids.len() - missing.len()
    );
    assert!(
        missing.is_empty(),
        "accepted jobs without an audit line: {missing:?}"
    );
}

/// A standby passes a cancel on to the leader and answers with the job's end, and its event
/// stream of a job ends with the job's final event (the leader's announcement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cancels_and_follows_jobs_through_the_leader() {
    // The leader sweeps the shared store's blobs every second (blob_orphan_ttl); a blob
    // copied there long ago for a commit that failed, which no job references, leaves it.
    let Some(Pair {
        pg,
        mut nodes,
        stop,
        api,
        server: _server,
        _dir,
    }) = pair_leading("blob_orphan_ttl = \"1s\"\n").await
    else {
        return;
    };
    let leaked = "'\\x".to_owned() + &"ab".repeat(32) + "'::bytea";
    pg.psql(
        "spine",
        &format!(
            "INSERT INTO spine_blobs VALUES ({leaked}, 3, 1); \
             INSERT INTO spine_blob_chunks VALUES ({leaked}, 0, 'abc')"
        ),
    )
    .unwrap();
    nodes[1].spawn();
    let standby = nodes[1].http.clone();
    until_standby(&api, &standby).await;
    let submit = |ms: u64| {
        api.post(format!("http://{standby}/v1/jobs"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({
                "capability": "work.sleep", "args": {"ms": ms}, "wait_for_agent": true
            }))
            .send()
    };
    // Every job's events at the standby: the final ones, read from the shared store.
    let mut all = open_stream(&api, format!("http://{standby}/v1/jobs/events")).await;
    // A short job, followed through the standby's event stream to its end.
    let short: serde_json::Value = submit(300).await.unwrap().json().await.unwrap();
    let short = short["id"].as_str().expect("id").to_owned();
    let seen = read_until(&mut all, &format!("\"id\":\"{short}\"")).await;
    assert!(seen.contains("event: final"), "{seen}");
    assert!(seen.contains("\"state\":\"succeeded\""), "{seen}");
    drop(all);
    let events = stream_text(&api, format!("http://{standby}/v1/jobs/{short}/events")).await;
    assert!(events.contains("event: final"), "{events}");
    assert!(events.contains("\"state\":\"succeeded\""), "{events}");
    // The leader's progress reaches the standby's streams (relayed through PostgreSQL): the
    // job's own, and every job's.
    let mut all = open_stream(&api, format!("http://{standby}/v1/jobs/events")).await;
    let halves = json_of(api.post(format!("http://{standby}/v1/jobs")).json(
        &serde_json::json!({"capability": "work.halves", "progress": true, "wait_for_agent": true}),
    ))
    .await;
    let halves = halves["id"].as_str().expect("id").to_owned();
    let own = stream_text(&api, format!("http://{standby}/v1/jobs/{halves}/events")).await;
    let progress = own.find("event: progress").unwrap_or_else(|| {
        panic!(
            "{own}\n{}\n{}",
            std::fs::read_to_string(&nodes[0].log).unwrap_or_default(),
            std::fs::read_to_string(&nodes[1].log).unwrap_or_default()
        )
    });
    assert!(own[progress..].contains("half way"), "{own}");
    assert!(
        own[progress..].contains("event: final"),
        "after the progress: {own}"
    );
    let seen = read_until(&mut all, &format!("\"id\":\"{halves}\"")).await;
    assert!(
        seen.contains(&format!("\"job\":\"{halves}\"")) && seen.contains("half way"),
        "{seen}"
    );
    drop(all);
    // A large output (a blob the leader stored) read at the standby, whose blob directory
    // never had it.
    let big = json_of(
        api.post(format!("http://{standby}/v1/jobs?wait=20s"))
            .json(&serde_json::json!({"capability": "work.big", "wait_for_agent": true})),
    )
    .await;
    assert_eq!(big["state"], "succeeded", "{big}");
    let output = api
        .get(format!(
            "http://{standby}/v1/jobs/{}/output",
            big["id"].as_str().expect("id")
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(output.status().as_u16(), 200);
    assert_eq!(output.bytes().await.unwrap().to_vec(), large_input(7));
    // The standby kept that output as a copy in its blob store; its collector deletes it once
    // older than blob_orphan_ttl (a standby holds no job: PostgreSQL has the blob).
    let blobs = nodes[1].data.join("blobs/sha256");
    let stored = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|sub| std::fs::read_dir(sub.path()).map_or(0, |f| f.count()))
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    assert_eq!(stored(&blobs), 1, "the output's copy at the standby");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored(&blobs) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby kept its copy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A long one, cancelled at the standby: the answer is its end.
    let long: serde_json::Value = submit(30_000).await.unwrap().json().await.unwrap();
    let long = long["id"].as_str().expect("id").to_owned();
    let cancelled: serde_json::Value =
        json_of(api.delete(format!("http://{standby}/v1/jobs/{long}"))).await;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(
        pg.psql("spine", "SELECT count(*) FROM spine_cancels")
            .unwrap(),
        "0",
        "the leader made the cancel and struck it"
    );
    // Retried at the standby: a new job, stored there for the leader, which runs it.
    let retried = api
        .post(format!("http://{standby}/v1/jobs/{long}/retry"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status().as_u16(), 202);
    let retried: serde_json::Value = retried.json().await.unwrap();
    let again = retried["id"].as_str().expect("id").to_owned();
    assert_ne!(again, long);
    assert_eq!(retried["retry_of"], long.as_str());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let job: serde_json::Value =
            json_of(api.get(format!("http://{standby}/v1/jobs/{again}"))).await;
        // (A standby reads the shared store, where a job on its agent is "dispatched":
        // "running" is progress, kept in the leader's memory.)
        if job["state"] == "dispatched" || job["state"] == "running" {
            assert_eq!(job["args"]["ms"], 30_000, "{job}");
            assert_eq!(job["agent"], "agent1@localhost/w", "{job}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not placed: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The leaked blob leaves at the leader's first sweep (a second after it began to lead);
    // the large output, which a held job references, stays.
    let count = |table: &str| {
        pg.psql(
            "spine",
            &format!("SELECT count(*) FROM {table} WHERE sha256 = {leaked}"),
        )
        .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count("spine_blobs") != "0" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leaked blob stayed: {}",
            std::fs::read_to_string(&nodes[0].log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count("spine_blob_chunks"), "0");
    assert_eq!(
        pg.psql("spine", "SELECT count(*) FROM spine_blobs")
            .unwrap(),
        "1",
        "the job's output"
    );
    stop_all(&mut nodes).await;
    drop(stop);
}

/// An XMPP submitter served by a standby (PROTOCOL.md §11.8): its `<submit/>` is stored for
/// the leader, which runs the job and tells the watcher; a keyed submission sent again is
/// answered with the same job, read from the shared store; `<status/>` and `<cancel/>` work
/// through the store, `<discover/>` from the standby's warm fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_xmpp_submitters() {
    use spine_protocol::{Accepted, Agents, Cancel, Discover, JobState, Outcome, Submit};
    let Some(Pair {
        pg: _pg,
        server,
        mut nodes,
        stop,
        api: _,
        _dir,
    }) = pair_standing_by("submitters = [\"webapp@localhost\"]\n").await
    else {
        return;
    };
    let standby: jid::Jid = "dispatcher@localhost/d2".parse().unwrap();
    let mut w =
        spine_integration::dispatcher::TestDispatcher::new(server.client("webapp", "pw-w").await)
            .await;

    // <discover/> at the standby, from the fleet it keeps warm (the agent may still be on its
    // way to it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let d = Discover {
            capability: "work.sleep".parse().unwrap(),
            filter: None,
            sort: None,
            limit: None,
        };
        let iq = xmpp_parsers::iq::Iq::from_get("disco-1", d).with_to(standby.clone());
        w.conn.send(iq).await;
        let el = w
            .wait_reply("disco-1")
            .await
            .expect("agents")
            .expect("payload");
        if Agents::try_from(el).unwrap().agents.len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never saw the agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A keyed, watched submission at the standby: accepted there, run by the leader, whose
    // final status reaches the watcher.
    let keyed = || {
        let mut s = Submit::new("work.sleep".parse().unwrap());
        s.args.0.insert("ms".into(), serde_json::json!(50));
        s.idempotency_key = Some("order-17".into());
        s.watch = true;
        s
    };
    let id = w.send_set(&standby, keyed()).await;
    let el = w.wait_reply(&id).await.expect("accepted").expect("payload");
    let first = Accepted::try_from(el).unwrap();
    let end = w.wait_final_status(&first.job).await;
    assert_eq!(end.state, JobState::Succeeded);
    match &end.outcome {
        Some(Outcome::Result(r)) => assert!(
            matches!(&r.output, Some(spine_protocol::Data::Inline { bytes, .. }) if bytes == b"slept 50"),
            "{r:?}"
        ),
        other => panic!("a result: {other:?}"),
    }
    // The same key again, at the standby: the same job, read from the shared store.
    let id = w.send_set(&standby, keyed()).await;
    let el = w.wait_reply(&id).await.expect("accepted").expect("payload");
    let again = Accepted::try_from(el).unwrap();
    assert_eq!((&again.job, again.state), (&first.job, JobState::Succeeded));
    // <status/> at the standby.
    let st = w.status(&standby, &first.job).await.expect("a status");
    assert_eq!(st.state, JobState::Succeeded);

    // A large input sent in chunks to the standby, then submitted there: stored with the job
    // for the leader, whose agent gets every byte.
    let input = large_input(3);
    let blob: spine_protocol::BlobId = "standby-in-1".parse().unwrap();
    for c in spine_protocol::chunks(&blob, &input) {
        let id = w.send_set(&standby, c).await;
        assert!(w.wait_reply(&id).await.expect("chunk taken").is_none());
    }
    let mut big = Submit::new("work.digest".parse().unwrap());
    big.input = Some(spine_protocol::Data::Blob(spine_protocol::BlobRef {
        blob,
        size: input.len() as u64,
        sha256: sha2::Sha256::digest(&input).into(),
        mime: None,
    }));
    big.watch = true;
    let id = w.send_set(&standby, big).await;
    let el = w.wait_reply(&id).await.expect("accepted").expect("payload");
    let job = Accepted::try_from(el).unwrap().job;
    let end = w.wait_final_status(&job).await;
    assert_eq!(end.state, JobState::Succeeded);
    match &end.outcome {
        Some(Outcome::Result(r)) => assert!(
            matches!(&r.output, Some(spine_protocol::Data::Inline { bytes, .. }) if bytes == digest(&input).as_bytes()),
            "{r:?}"
        ),
        other => panic!("a result: {other:?}"),
    }

    // A long job submitted at the standby, cancelled at the standby: the leader cancels it.
    let mut long = Submit::new("work.sleep".parse().unwrap());
    long.args.0.insert("ms".into(), serde_json::json!(60_000));
    long.watch = true;
    let id = w.send_set(&standby, long).await;
    let el = w.wait_reply(&id).await.expect("accepted").expect("payload");
    let job = Accepted::try_from(el).unwrap().job;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // (Placed and sent to the agent: as of the leader's last commit.)
    while !matches!(
        w.status(&standby, &job).await.expect("a status").state,
        JobState::Dispatched | JobState::Running
    ) {
        assert!(tokio::time::Instant::now() < deadline, "never placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = w.send_set(&standby, Cancel { job: job.clone() }).await;
    assert!(w.wait_reply(&id).await.expect("cancel passed on").is_none());
    assert_eq!(w.wait_final_status(&job).await.state, JobState::Cancelled);
    stop_all(&mut nodes).await;
    drop(stop);
}

/// Two dispatchers share a submitter's rate: a client that sends a job to each in turn, 100 a
/// second for 4 s, under `submitter_rate = "10/s"`, gets about the rate — not twice it, as when
/// each dispatcher counted only what it accepted itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_hold_one_rate_limit() {
    let Some(Pair {
        pg: _pg,
        mut nodes,
        stop,
        api,
        server: _server,
        _dir,
    }) = pair_standing_by("submitter_rate = \"10/s\"\n").await
    else {
        return;
    };
    let (mut accepted, mut limited) = ([0usize; 2], 0usize);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..400 {
        tick.tick().await;
        let node = &nodes[i % 2];
        let r = api
            .post(format!("http://{}/v1/jobs", node.http))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"capability": "work.sleep", "args": {"ms": 0}, "wait_for_agent": true}))
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 | 202 => accepted[i % 2] += 1,
            429 => limited += 1,
            other => panic!(
                "job {i} at {}: {other}: {}",
                node.http,
                r.text().await.unwrap()
            ),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let total = accepted[0] + accepted[1];
    println!(
        "{total} accepted ({} by the leader, {} by the standby), {limited} limited, in {secs:.2} s",
        accepted[0], accepted[1]
    );
    // The burst (10) and the rate over the run, plus what the reports' lag lets through
    // (each starts with a full burst of its own, and learns of the other's a moment late);
    // counted apart, the two would accept about twice 10 + 10/s.
    let rate_limit = 10.0 + 10.0 * secs;
    assert!(
        (total as f64) <= rate_limit + 15.0,
        "{total} accepted in {secs:.2} s: over the shared rate ({rate_limit:.0})"
    );
    assert!(
        (total as f64) >= 10.0 * secs - 5.0,
        "{total} accepted in {secs:.2} s: the rate is not delivered"
    );
    assert!(accepted[0] > 0 && accepted[1] > 0, "{accepted:?}");
    stop_all(&mut nodes).await;
    drop(stop);
}

/// A standby passes on to the leader what only the leader does: a webhook sender, the console
/// or a load balancer knows one URL. Posted to the standby, a CloudEvent and a signed webhook
/// request each make their job on the leader (the standby's answer is the leader's 202,
/// naming the job), the same event again makes no second job, a request with a bad signature
/// is refused by the standby itself, a drain and an undrain reach the agent through the
/// leader, the job list, a rule made and deleted over the API and the canaries are the
/// leader's, and a request passed on already is not passed on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_passes_on_what_only_the_leader_does() {
    const SECRET: &str = "a-webhook-secret-of-some-length";
    // An operator's token: it may post events, and read the rules' jobs.
    const EVENTS: &str = "failover-events-token-0123456789";
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("hook.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let extra = format!(
        "[[rule]]\nname = \"notes\"\non = {{ type = \"com.example.note\" }}\n\
         do = {{ capability = \"work.digest\", input = \"{{{{data.text}}}}\" }}\n\
         [[rule]]\nname = \"pushes\"\non = {{ type = \"com.example.hook.push\" }}\n\
         do = {{ capability = \"work.digest\", input = \"{{{{data.ref}}}}\" }}\n\
         [[webhook]]\nname = \"hook\"\nsecret_file = \"{}\"\ntype = \"com.example.hook\"\n\
         type_header = \"X-Hook-Event\"\nid_header = \"X-Hook-Delivery\"\n\
         [[http_token]]\nname = \"ops\"\ntoken = \"{EVENTS}\"\ncapabilities = [\"*\"]\nall_jobs = true\n",
        secret_file.display()
    );
    let Some(Pair {
        pg: _pg,
        mut nodes,
        stop,
        api,
        server: _server,
        _dir,
    }) = pair_standing_by(&extra).await
    else {
        return;
    };
    let (leader_http, standby) = (nodes[0].http.clone(), nodes[1].http.clone());
    let note = serde_json::json!({
        "specversion": "1.0", "id": "note-1", "source": "/notes",
        "type": "com.example.note", "data": {"text": "hello, leader"},
    });
    let post_note = || {
        api.post(format!("http://{standby}/v1/events"))
            .bearer_auth(EVENTS)
            .header("content-type", "application/cloudevents+json")
            .body(note.to_string())
            .send()
    };
    // Standing by from its start, the standby names the leader once it has read the lease
    // row (within `lease_poll`): until then it refuses, naming no one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = post_note().await.unwrap();
        if r.status().as_u16() != 503 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    let first: serde_json::Value = r.json().await.unwrap();
    assert_eq!(first["jobs"][0]["rule"], "notes", "{first}");
    let job = first["jobs"][0]["id"].as_str().expect("a job").to_owned();
    // The same event again, through the standby: the leader's key makes no second job.
    let again: serde_json::Value = post_note().await.unwrap().json().await.unwrap();
    assert_eq!(again["jobs"][0]["id"], job.as_str(), "{again}");
    // The leader ran it.
    // (The jobs are the rules', so an operator's token reads them.)
    let read = |id: String| {
        let req = api
            .get(format!("http://{leader_http}/v1/jobs/{id}?wait=20s"))
            .bearer_auth(EVENTS);
        async move {
            req.send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let done = read(job.clone()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let out = base64::engine::general_purpose::STANDARD
        .decode(done["result"]["output"].as_str().expect("output"))
        .unwrap();
    assert_eq!(out, digest(b"hello, leader").into_bytes());

    // The leader's stream of ends and firings, through the standby (opened before the next
    // event, whose job's end it then carries).
    let mut ends = api
        .get(format!("http://{standby}/v1/events/stream"))
        .bearer_auth(EVENTS)
        .send()
        .await
        .unwrap();
    assert_eq!(ends.status().as_u16(), 200);

    // A signed webhook request, through the standby.
    let body = r#"{"ref":"refs/heads/main"}"#;
    let hook = |sig: String| {
        api.post(format!("http://{standby}/v1/events/hook"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sig)
            .header("x-hook-event", "push")
            .header("x-hook-delivery", "delivery-1")
            .body(body)
            .send()
    };
    let r = hook(spine_integration::webhook_signature(
        SECRET,
        body.as_bytes(),
    ))
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    let pushed: serde_json::Value = r.json().await.unwrap();
    assert_eq!(pushed["jobs"][0]["rule"], "pushes", "{pushed}");
    let push_job = pushed["jobs"][0]["id"].as_str().expect("a job").to_owned();
    let done = read(push_job.clone()).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // (Only what happened after it opened: the firing and the end of the webhook's job.)
    let seen = read_until(&mut ends, "spine.job.succeeded").await;
    assert!(seen.contains("spine.rule.fired"), "{seen}");
    assert!(seen.contains(push_job.as_str()), "{seen}");
    assert!(!seen.contains(job.as_str()), "{seen}");
    let out = base64::engine::general_purpose::STANDARD
        .decode(done["result"]["output"].as_str().expect("output"))
        .unwrap();
    assert_eq!(out, digest(b"refs/heads/main").into_bytes());
    // A bad signature: the standby refuses it itself.
    let r = hook(format!("sha256={}", "0".repeat(64))).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // A drain through the standby: the leader sends it to the agent and answers with the
    // agent as it sees it; an undrain puts it back.
    for (verb, body, state) in [
        ("drain", r#"{"reason":"kernel upgrade"}"#, "draining"),
        ("undrain", "", "ready"),
    ] {
        let r = api
            .post(format!(
                "http://{standby}/v1/agents/agent1@localhost/{verb}"
            ))
            .bearer_auth(EVENTS)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            200,
            "{verb}: {}",
            r.text().await.unwrap()
        );
        let agent: serde_json::Value = r.json().await.unwrap();
        assert_eq!(agent["state"], state, "{verb}: {agent}");
    }

    // Reads only the leader can answer, through the standby: the job list (both jobs, the
    // rules' own), a rule made, listed and deleted over the API, the canaries.
    let get = |path: &str| {
        let req = api
            .get(format!("http://{standby}{path}"))
            .bearer_auth(EVENTS);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, list) = get("/v1/jobs?capability=work.digest").await;
    assert_eq!(status, 200, "{list}");
    let listed: HashSet<&str> = list["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(
        listed,
        HashSet::from([job.as_str(), push_job.as_str()]),
        "{list}"
    );
    let rule = serde_json::json!({
        "on": {"type": "com.example.later"},
        "do": {"capability": "work.digest", "input": "{{data.text}}"},
    });
    let r = api
        .put(format!("http://{standby}/v1/rules/later"))
        .bearer_auth(EVENTS)
        .json(&rule)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let (status, rules) = get("/v1/rules").await;
    assert_eq!(status, 200, "{rules}");
    let names: Vec<&str> = rules["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        names.contains(&"later") && names.contains(&"notes"),
        "{rules}"
    );
    let r = api
        .delete(format!("http://{standby}/v1/rules/later"))
        .bearer_auth(EVENTS)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204, "{}", r.text().await.unwrap());
    let (_, rules) = get("/v1/rules").await;
    assert!(!rules.to_string().contains("\"later\""), "{rules}");
    let (status, canaries) = get("/v1/canaries").await;
    assert_eq!(status, 200, "{canaries}");
    assert!(canaries["canaries"].is_array(), "{canaries}");

    // A request passed on already is not passed on again: the standby refuses it, naming the
    // leader.
    let r = api
        .post(format!("http://{standby}/v1/events"))
        .bearer_auth(EVENTS)
        .header("content-type", "application/cloudevents+json")
        .header("spine-forwarded-by", "dispatcher@localhost/elsewhere")
        .body(note.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let refusal: serde_json::Value = r.json().await.unwrap();
    assert_eq!(refusal["error"], "standby", "{refusal}");
    assert_eq!(
        refusal["leader"].as_str(),
        Some(format!("http://{leader_http}").as_str()),
        "{refusal}"
    );
    stop_all(&mut nodes).await;
    drop(stop);
}

/// Uploads reach every dispatcher: bytes put with `PUT /v1/blobs` to the standby are named
/// by a job submitted to the leader, and bytes put to the leader by a job submitted to the
/// standby (a load balancer sends the upload and the job where it likes); each job's agent
/// digests every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_reach_every_dispatcher() {
    let Some(Pair {
        pg: _pg,
        mut nodes,
        stop,
        api,
        server: _server,
        _dir,
    }) = pair_standing_by("").await
    else {
        return;
    };
    let (leader_http, standby) = (nodes[0].http.clone(), nodes[1].http.clone());
    for (k, (upload_to, submit_to)) in [(&standby, &leader_http), (&leader_http, &standby)]
        .into_iter()
        .enumerate()
    {
        let bytes = large_input(100 + k);
        let r = api
            .put(format!("http://{upload_to}/v1/blobs"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/octet-stream")
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
        let stored: serde_json::Value = r.json().await.unwrap();
        assert_eq!(stored["size"], bytes.len() as u64, "{stored}");
        let sha = stored["sha256"].as_str().expect("sha256").to_owned();
        let done = json_of(
            api.post(format!("http://{submit_to}/v1/jobs?wait=20s"))
                .json(&serde_json::json!({
                    "capability": "work.digest", "input_ref": sha,
                    // The agent may still be registering.
                    "wait_for_agent": true,
                })),
        )
        .await;
        assert_eq!(done["state"], "succeeded", "upload {k}: {done}");
        let out = base64::engine::general_purpose::STANDARD
            .decode(done["result"]["output"].as_str().expect("output"))
            .unwrap();
        assert_eq!(out, digest(&bytes).into_bytes(), "upload {k}");
    }
    stop_all(&mut nodes).await;
    drop(stop);
}

/// A job the leader sent ahead of its commit, the leader killed before that commit: the next
/// leader learns from the agents which one has it (`<recall/>`, PROTOCOL.md §10.1) and sends
/// it back there, so it runs once although another agent is idle. The commit is held back
/// by a lock on the job's row, taken in a `psql` session, so the moment is certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_sent_ahead_of_its_commit_runs_once_after_the_leader_dies() {
    let Some(pg) = Postgres::start_or_skip() else {
        return;
    };
    let server = spine_integration::TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("agent1", "pw"),
        ("agent2", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nodes(2, dir.path(), &server.addr.to_string(), &pg.url(), "");
    nodes[0].spawn();
    let api = reqwest::Client::new();
    assert_eq!(leader(&api, &nodes, Duration::from_secs(20)).await, 0);
    nodes[1].spawn();
    until_standby(&api, &nodes[1].http).await;

    // Stored queued: no agent offers the capability yet.
    let r = api
        .post(format!("http://{}/v1/jobs", nodes[0].http))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"capability": "work.once", "wait_for_agent": true}))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status().as_u16(), 202);
    let v: serde_json::Value = r.json().await.expect("JSON");
    let id = v["id"].as_str().expect("job id").to_owned();
    assert_eq!(v["state"], "queued", "{v}");

    // The job's row locked: the leader's next commit that writes it waits.
    let mut psql = tokio::process::Command::from(pg.psql_command("spine"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql");
    let mut sql = psql.stdin.take().expect("psql input");
    let mut out = tokio::io::BufReader::new(psql.stdout.take().expect("psql output"));
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    sql.write_all(
        format!("BEGIN;\nSELECT id FROM spine_jobs WHERE id = '{id}' FOR UPDATE;\n").as_bytes(),
    )
    .await
    .expect("lock");
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut line))
        .await
        .expect("the row locked in time")
        .expect("psql output");
    assert_eq!(line.trim(), id, "the locked row");

    // Two agents come; the job goes ahead to one of them, whose handler runs for 2 s.
    let runs: Arc<Mutex<Vec<(usize, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut stops = Vec::new();
    for n in 1..=2 {
        let cfg = spine_integration::farm::agent_config(&server, n, "slots = 2");
        let runs = runs.clone();
        let agent = Agent::builder(cfg)
            .capability("work.once", None, move |ctx: JobContext| {
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push((n, ctx.id.to_string()));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok::<_, JobError>(Output::bytes(format!("ran on agent{n}")))
                }
            })
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(agent.run(async move {
            let _ = rx.await;
        }));
        stops.push(tx);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while runs.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never reached an agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ran_on, _) = runs.lock().unwrap()[0].clone();

    // The leader dies with the dispatch not stored, and its connection with it (its commit,
    // one statement in autocommit, would otherwise run on once the lock goes, and land
    // before the next leader's epoch: see docs/dispatcher.md); then the lock goes.
    nodes[0].kill_9().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pg
        .psql(
            "spine",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE 'SELECT spine_commit(%'",
        )
        .unwrap()
        != "1"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader's commit never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sql.write_all(b"ROLLBACK;\n").await.expect("unlock");
    drop(sql);
    let _ = tokio::time::timeout(Duration::from_secs(10), psql.wait()).await;
    assert_eq!(leader(&api, &nodes, Duration::from_secs(10)).await, 1);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v: serde_json::Value = api
            .get(format!("http://{}/v1/jobs/{id}", nodes[1].http))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("JSON");
        if v["state"] == "succeeded" {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job did not end: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = base64::engine::general_purpose::STANDARD
        .decode(v["result"]["output"].as_str().expect("output"))
        .expect("base64");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("ran on agent{ran_on}")
    );
    assert_eq!(v["attempts"], 1, "the same attempt: {v}");
    assert_eq!(
        runs.lock().unwrap().clone(),
        vec![(ran_on, id.clone())],
        "it ran once, although another agent was idle"
    );
    let log = std::fs::read_to_string(&nodes[1].log).unwrap_or_default();
    assert!(
        log.contains("sent by the last leader before its commit: back to its agent"),
        "{log}"
    );
    stop_all(&mut nodes).await;
    drop(stops);
}

/// A standby passes a submission on to the leader, which stores and places it in one go;
/// when the leader cannot be reached, the standby stores it for the next leader instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_passes_submissions_on_and_stores_them_when_the_leader_is_gone() {
    let Some(Pair {
        pg: _pg,
        mut nodes,
        stop,
        api,
        server: _server,
        _dir,
    }) = pair_standing_by("").await
    else {
        return;
    };
    let standby = nodes[1].http.clone();
    let submit = |query: &'static str, key: &'static str| {
        api.post(format!("http://{standby}/v1/jobs{query}"))
            .bearer_auth(TOKEN)
            .header("idempotency-key", key)
            .json(&serde_json::json!({"capability": "work.sleep", "args": {"ms": 10}}))
            .send()
    };
    // The standby names the leader once it has read the lease row; the agent may not have
    // reached the leader yet (422 `unknown-capability`).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = submit("?wait=10s", "first").await.unwrap();
        let again = [503, 422].contains(&r.status().as_u16());
        if !again || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["state"], "succeeded", "{v}");
    let out = base64::engine::general_purpose::STANDARD
        .decode(v["result"]["output"].as_str().expect("output"))
        .expect("base64");
    assert_eq!(out, b"slept 10");
    let leader_log = std::fs::read_to_string(&nodes[0].log).unwrap_or_default();
    assert!(
        leader_log.contains("job accepted") && !leader_log.contains("job accepted by a standby"),
        "passed on, not stored by the standby:\n{leader_log}"
    );
    let standby_log = std::fs::read_to_string(&nodes[1].log).unwrap_or_default();
    assert!(!standby_log.contains("job accepted"), "{standby_log}");
    let first = v["id"].as_str().expect("job id").to_owned();

    // Many at once: gathered into fewer requests to the leader, each answered on its own;
    // the same idempotency key (as a header) answers with the job it made.
    let keys: Vec<String> = (0..40).map(|i| format!("many-{i}")).collect();
    let answers = futures::future::join_all(keys.iter().map(|k| {
        api.post(format!("http://{standby}/v1/jobs"))
            .bearer_auth(TOKEN)
            .header("idempotency-key", k.as_str())
            .json(&serde_json::json!({"capability": "work.sleep", "args": {"ms": 1}}))
            .send()
    }))
    .await;
    let mut ids = std::collections::HashSet::new();
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
        let v: serde_json::Value = r.json().await.unwrap();
        ids.insert(v["id"].as_str().expect("job id").to_owned());
    }
    assert_eq!(ids.len(), 40, "one job per key");
    let r = submit("", "first").await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["id"], first.as_str(), "the key's job: {v}");
    let metrics = api
        .get(format!("http://{standby}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let figure = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
    };
    let (passed, requests) = (
        figure("spine_passed_submissions_total"),
        figure("spine_passed_requests_total"),
    );
    println!("passed on: {passed} submissions in {requests} requests");
    // (The first one's tries while the agent was not yet known to the leader count too.)
    assert!(
        passed >= 42,
        "every submission went to the leader: {passed}"
    );
    assert!(
        requests < passed,
        "gathered: {requests} requests for {passed}"
    );

    // The leader's end of it takes only what a standby passes on, and checks each
    // submission's own token.
    let leader = nodes[0].http.clone();
    let passed_on = |by: Option<&'static str>, at: &str| {
        let mut r = api.post(format!("http://{at}/v1/jobs:passed"));
        if let Some(by) = by {
            r = r.header("spine-forwarded-by", by);
        }
        r.json(&serde_json::json!({"submissions": [
            {"headers": [["authorization", format!("Bearer {TOKEN}")]],
             "body": {"capability": "work.sleep", "args": {"ms": 1}}},
            {"headers": [["authorization", "Bearer not-a-token"]],
             "body": {"capability": "work.sleep", "args": {"ms": 1}}},
            {"headers": [["authorization", format!("Bearer {TOKEN}")]],
             "body": {"capability": "work.sleep", "bogus": 1}},
            {"headers": [["authorization", format!("Bearer {TOKEN}")]], "wait_ms": 10000,
             "body": {"capability": "work.sleep", "args": {"ms": 300}}},
        ]}))
        .send()
    };
    let r = passed_on(Some("test"), &leader).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A line per answer as it is known, and the mark once all are stored: the waiting
    // caller's answer comes after it, when its job ends.
    let text = r.text().await.unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let order: Vec<String> = lines
        .iter()
        .map(|l| match l["i"].as_u64() {
            Some(i) => format!("{i}:{}", l["status"]),
            None => format!("stored:{}", l["stored"]),
        })
        .collect();
    assert_eq!(
        order,
        ["0:202", "1:401", "2:400", "stored:true", "3:200"],
        "{text}"
    );
    assert_eq!(lines[1]["body"]["error"], "not-authorized", "{text}");
    let refused = lines[2]["body"]["message"].as_str().expect("message");
    assert!(refused.contains("bogus"), "{text}");
    assert_eq!(lines[4]["body"]["state"], "succeeded", "{text}");
    let r = passed_on(None, &leader).await.unwrap();
    assert_eq!(r.status().as_u16(), 400, "{}", r.text().await.unwrap());
    let r = passed_on(Some("test"), &standby).await.unwrap();
    assert_eq!(r.status().as_u16(), 503, "a standby takes none");

    // A paused leader: a caller that waits hears within seconds (503 `standby` when its
    // submission went on to the paused leader, or its job's end when the standby stored it
    // and ran it once it led), not after its wait.
    let paused = nodes[0].pid();
    kill(paused, Signal::SIGSTOP).expect("SIGSTOP");
    while !every_thread_stopped(paused) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t = std::time::Instant::now();
    let r = submit("?wait=10s", "paused").await.unwrap();
    let took = t.elapsed();
    let status = r.status().as_u16();
    assert!(
        [200, 503].contains(&status),
        "{status}: {}",
        r.text().await.unwrap()
    );
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    println!("a submission while the leader was paused: {status} after {took:?}");

    // The leader dies: the standby cannot reach it and stores the job for the next leader
    // (itself, once the lease runs out).
    nodes[0].kill_9().await;
    let r = submit("", "second").await.unwrap();
    assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
    let id = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .expect("job id")
        .to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v: serde_json::Value = api
            .get(format!("http://{standby}/v1/jobs/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["state"] == "succeeded" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not run: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&nodes[1].log).unwrap_or_default();
    assert!(
        log.contains(&format!("job accepted job={id}")),
        "stored by the standby (and run once it led):\n{log}"
    );
    stop_all(&mut nodes).await;
    drop(stop);
}
