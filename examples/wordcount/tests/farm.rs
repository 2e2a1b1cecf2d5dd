//! Word count as a map/reduce job on a real farm: the embedded XMPP server, a real dispatcher,
//! agents as real processes (one killed mid-run) or in-process (one artificially slow), and
//! the counts checked against a plain single-process count.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use spine_agent::{Agent, JobContext};
use spine_integration::farm::{start_http_dispatcher, wait_for_agents, Running};
use spine_integration::TestServer;
use spine_protocol::Fragment;

const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("agent1", "pw"),
    ("agent2", "pw"),
    ("agent3", "pw"),
    ("agent4", "pw"),
];

/// `n` texts of about `bytes` bytes each: words from a vocabulary with accents, other scripts,
/// digits and mixed case, joined by assorted punctuation. Seeded: the same every run.
fn corpus(n: usize, bytes: usize) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut vocab: Vec<String> = [
        "état",
        "Straße",
        "東京",
        "naïve",
        "ÉCOLE",
        "x86",
        "42",
        "Ünïcödé",
        "don't",
        "e-mail",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let syllables = [
        "ka", "lo", "mi", "ren", "to", "sa", "vu", "ne", "dor", "pi", "qua", "zeb",
    ];
    for _ in 0..300 {
        let len = rng.random_range(1..4);
        let w: String = (0..len)
            .map(|_| syllables[rng.random_range(0..syllables.len())])
            .collect();
        vocab.push(w);
    }
    let seps = [" ", " ", " ", ", ", ". ", "\n", " — ", "; ", "(", ") "];
    (0..n)
        .map(|_| {
            let mut t = String::new();
            while t.len() < bytes {
                // Zipf-like: low indices far more often.
                let i = (rng.random::<f64>().powi(3) * vocab.len() as f64) as usize;
                let w = &vocab[i.min(vocab.len() - 1)];
                if rng.random_range(0..10) == 0 {
                    t.push_str(&w.to_uppercase());
                } else {
                    t.push_str(w);
                }
                t.push_str(seps[rng.random_range(0..seps.len())]);
            }
            t
        })
        .collect()
}

/// The plain single-process count the farm must match.
fn reference(texts: &[String]) -> Vec<(String, u64)> {
    spine_integration::farm::plain_word_count(texts.iter().map(String::as_str))
}

fn fragments(texts: &[String]) -> Vec<Fragment> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| Fragment::new(t.as_bytes().to_vec()).with_name(format!("text-{i:03}")))
        .collect()
}

/// An agent process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(n: usize, server: std::net::SocketAddr, log: &std::path::Path) -> Proc {
    let log = std::fs::File::create(log.join(format!("agent{n}.log"))).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_spine-wordcount-agent"))
            .env_clear()
            .env("SPINE_AGENT_JID", format!("agent{n}@localhost/p"))
            .env("SPINE_AGENT_PASSWORD", "pw")
            .env("SPINE_AGENT_SERVER", server.to_string())
            .env("SPINE_AGENT_DISPATCHERS", "dispatcher@localhost")
            .env("SPINE_AGENT_HEARTBEAT", "1s")
            .env("SPINE_AGENT_SLOTS", "2")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the agent program starts"),
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get(url: String) -> Value {
    let text = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// The dispatcher's effective in-flight count for the agent whose JID starts with `who`.
async fn in_flight(base: &str, who: &str) -> Option<u64> {
    get(format!("{base}/v1/agents?capability=wordcount.map")).await["agents"]
        .as_array()?
        .iter()
        .find(|a| a["jid"].as_str().is_some_and(|j| j.starts_with(who)))
        .and_then(|a| a["in_flight"].as_u64())
}

async fn counts_of(api: &spine_client::Client, job: &Value) -> Vec<(String, u64)> {
    serde_json::from_slice(&api.output(job).await.expect("the job succeeded")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_count_over_64_fragments_survives_an_agent_killed_mid_run() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    // No speculative copies here: the lost fragments must come back through the retry path.
    let (dispatcher, base) =
        start_http_dispatcher(&server, dir.path(), "speculation_factor = 0\n").await;
    let mut agents: Vec<Proc> = (1..=4)
        .map(|n| spawn_agent(n, server.addr, dir.path()))
        .collect();
    wait_for_agents(&base, "wordcount.map", 4).await;

    let texts = corpus(64, 40_000);
    let api = spine_client::Client::new(&base, None).unwrap();
    let id = api
        .submit(&json!({
            "capability": "wordcount.map",
            "reduce": "wordcount.reduce",
            "fan_in": 4,
            "fragments": fragments(&texts),
        }))
        .await
        .unwrap();

    // Once the run is under way and agent 4 holds fragments, freeze it: whatever it holds now
    // cannot finish. Then kill it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = api.job(&id).await.unwrap();
        assert!(
            !job["state"]
                .as_str()
                .is_some_and(|s| s != "running" && s != "queued"),
            "the job ended before agent 4 could be killed: {job}"
        );
        let done = job["mapreduce"]["fragments_done"].as_u64().unwrap_or(0);
        if done >= 4 && in_flight(&base, "agent4@").await.unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "agent 4 never got a fragment");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let victim = agents.pop().unwrap();
    let pid = Pid::from_raw(victim.0.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = in_flight(&base, "agent4@").await.unwrap_or(0);
    assert!(held > 0, "frozen agent 4 holds no fragment");
    kill(pid, Signal::SIGKILL).unwrap();
    drop(victim);
    let killed_at = api.job(&id).await.unwrap()["mapreduce"].clone();

    // Progress over server-sent events: steps done ÷ steps, never going back.
    let mut reports: Vec<(u64, String)> = Vec::new();
    let job = tokio::time::timeout(
        Duration::from_secs(60),
        api.follow(&id, |p, m| reports.push((p.unwrap_or(0), m.to_owned()))),
    )
    .await
    .expect("the job ends")
    .unwrap();
    // (The stream opens with the job's state, read after the subscription: progress events
    // already on their way may follow it with a lower percent. The reports themselves are
    // sent in order.)
    reports.retain(|(_, m)| m.starts_with("fragments "));
    assert!(!reports.is_empty(), "no progress reported");
    assert!(
        reports.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress went back: {reports:?}"
    );
    let last = reports.last().unwrap();
    assert!(
        last.1.starts_with("fragments 64/64, reduce steps "),
        "{reports:?}"
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    let farm = counts_of(&api, &job).await;
    let expected = reference(&texts);
    assert_eq!(farm.len(), expected.len());
    assert_eq!(
        farm, expected,
        "the farm's counts equal a single-process count"
    );
    let meta = &job["result"]["meta"];
    assert_eq!(meta["fragments"], 64);
    // 64 → 16 → 4 → 1.
    assert_eq!(meta["reduce_steps"], 21);
    assert_eq!(meta["speculative"], 0);
    let total: u64 = expected.iter().map(|(_, n)| n).sum();
    assert_eq!(meta["words"], total);

    // The fragments agent 4 held ran again elsewhere.
    let mut retried = 0;
    for c in job["children"].as_array().unwrap() {
        let child = api.job(c.as_str().unwrap()).await.unwrap();
        assert_eq!(child["state"], "succeeded", "{child}");
        if child["attempts"].as_u64().unwrap() > 1 {
            retried += 1;
            assert!(!child["agent"].as_str().unwrap().starts_with("agent4@"));
        }
    }
    assert!(
        retried >= held,
        "{retried} steps retried, agent 4 held {held}"
    );
    eprintln!(
        "killed agent 4 at {killed_at} holding {held} steps; {retried} steps retried; {} words, {} distinct",
        total,
        expected.len()
    );
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggling_fragment_is_re_executed_on_another_agent() {
    const SLOW: Duration = Duration::from_secs(30);
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    // Default speculation settings: 4 × the median, at least 2 s.
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    let mut agents: Vec<Running> = Vec::new();
    for n in 1..=4 {
        let cfg = spine_integration::farm::agent_config(&server, n, "slots = 2");
        let builder = Agent::builder(cfg);
        let builder = if n == 4 {
            // Agent 4 is a machine in trouble: every map takes 30 s.
            builder.capability("wordcount.map", None, |ctx: JobContext| async move {
                tokio::time::sleep(SLOW).await;
                spine_example_wordcount::map(&ctx.input)
            })
        } else {
            spine_example_wordcount::register(builder)
        };
        let agent = builder.build().unwrap();
        agents.push(spine_integration::farm::run_agent(agent));
    }
    wait_for_agents(&base, "wordcount.map", 4).await;

    let texts = corpus(60, 8_000);
    let api = spine_client::Client::new(&base, None).unwrap();
    let started = Instant::now();
    let id = api
        .submit(&json!({
            "capability": "wordcount.map",
            "reduce": "wordcount.reduce",
            "fan_in": 8,
            "fragments": fragments(&texts),
        }))
        .await
        .unwrap();
    let job = tokio::time::timeout(SLOW, api.follow(&id, |_, _| {}))
        .await
        .expect("the job ends before the slow agent's maps would")
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(counts_of(&api, &job).await, reference(&texts));
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}; the slow agent needs {SLOW:?} per fragment"
    );
    let copies = job["result"]["meta"]["speculative"].as_u64().unwrap();
    assert!(copies >= 1, "{job}");

    // Each copy ran off agent 4 and won; the original on agent 4 was cancelled.
    let children: Vec<String> = job["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let backups: Vec<&String> = children.iter().filter(|c| c.ends_with(".b")).collect();
    assert_eq!(backups.len() as u64, copies);
    for b in backups {
        let copy = api.job(b).await.unwrap();
        assert_eq!(copy["state"], "succeeded", "{copy}");
        assert!(!copy["agent"].as_str().unwrap().starts_with("agent4@"));
        let original = api.job(b.trim_end_matches(".b")).await.unwrap();
        assert_eq!(original["state"], "cancelled", "{original}");
        assert!(original["agent"].as_str().unwrap().starts_with("agent4@"));
        assert_eq!(
            original["error"]["message"],
            "another copy of this step finished first"
        );
    }
    eprintln!("straggler test: {copies} speculative copies, job done in {elapsed:?}");
    for a in agents {
        a.kill();
    }
    dispatcher.stop();
}
