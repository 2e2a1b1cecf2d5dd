//! The split step by reference (issue 17, item 5) on a real farm: the embedded XMPP server, a
//! real dispatcher with its HTTP API on loopback, and `spine-wordcount-agent` processes. A
//! large input uploaded once (`PUT /v1/blobs`) and named by `input_ref` is streamed to a file
//! by the split agent, cut into fragment files, each uploaded to a slot of its own; the split
//! step's output is a list of references only, and the counts equal a single-process count.
//! An agent that does not use HTTP still splits (a smaller input), with the bytes inline.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use spine_integration::farm::{plain_word_count, start_http_dispatcher, wait_for_agents};
use spine_integration::TestServer;
use spine_protocol::fragments;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")];
const MIB: usize = 1 << 20;

/// An agent process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `spine-wordcount-agent` as agent `n`, with `env` added; its log goes to `agent<n>.log`.
fn spawn_agent(n: usize, server: std::net::SocketAddr, dir: &Path, env: &[(&str, &str)]) -> Proc {
    let log = std::fs::File::create(dir.join(format!("agent{n}.log"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spine-wordcount-agent"));
    cmd.env_clear()
        .env("SPINE_AGENT_JID", format!("agent{n}@localhost/p"))
        .env("SPINE_AGENT_PASSWORD", "pw")
        .env("SPINE_AGENT_SERVER", server.to_string())
        .env("SPINE_AGENT_DISPATCHERS", "dispatcher@localhost")
        .env("SPINE_AGENT_HEARTBEAT", "1s")
        .env("SPINE_AGENT_SLOTS", "2")
        // Work directories under the test's own directory, deleted with it.
        .env("TMPDIR", dir)
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the agent program starts"),
    )
}

/// A text of `copies` × 1 MiB (and a few bytes) written to `path` (the same generated MiB again and again, so
/// the expected count is that of one MiB times `copies`), and that expected count.
fn write_corpus(path: &Path, copies: u64) -> Vec<(String, u64)> {
    let base = spine_example_wordcount::generated_corpus(MIB);
    // It ends with a separator: copies never join two words.
    assert!(base.ends_with([' ', '\n']));
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..copies {
        f.write_all(base.as_bytes()).unwrap();
    }
    f.flush().unwrap();
    plain_word_count([base.as_str()])
        .into_iter()
        .map(|(w, n)| (w, n * copies))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The dispatcher's `/metrics` value of `name`.
async fn metric(base: &str, name: &str) -> u64 {
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Uploads `path`, submits a word count of it with a split step cutting `fragment_bytes`
/// pieces, and waits for it: (the final job, the split step's output list).
async fn split_count(
    api: &spine_client::Client,
    path: &Path,
    fragment_bytes: usize,
) -> (Value, Vec<spine_protocol::Fragment>) {
    let blob = api.put_file(path).await.expect("the upload");
    let sha256 = blob.source.as_ref().expect("a reference").sha256;
    let id = api
        .submit(&json!({
            "capability": "wordcount.map",
            "reduce": "wordcount.reduce",
            "split": "wordcount.split",
            "fan_in": 4,
            "args": { "fragment_bytes": fragment_bytes },
            "input_ref": hex(&sha256),
            "input_type": "text/plain; charset=utf-8",
        }))
        .await
        .unwrap();
    let job = tokio::time::timeout(Duration::from_secs(300), api.follow(&id, |_, _| {}))
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    let split = api.job(&format!("{id}.split")).await.unwrap();
    let list = api.output(&split).await.expect("the split step's output");
    (job, fragments::decode(&list).expect("a fragment list"))
}

async fn counts_of(api: &spine_client::Client, job: &Value) -> Vec<(String, u64)> {
    serde_json::from_slice(&api.output(job).await.expect("the job succeeded")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_input_is_split_by_reference_into_fragment_files_uploaded_to_slots() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    // No agent may hold an input over 16 MiB in memory: the 64 MiB input can only reach the
    // split step as a file streamed over HTTP, and its fragments can only leave by slot (the
    // inline fallback is bounded by the same limit).
    let limit = [("SPINE_AGENT_MAX_INPUT_SIZE", "16MiB")];
    let _agents: Vec<Proc> = (1..=2)
        .map(|n| spawn_agent(n, server.addr, dir.path(), &limit))
        .collect();
    wait_for_agents(&base, "wordcount.split", 2).await;
    let input = dir.path().join("corpus.txt");
    let expected = write_corpus(&input, 64);
    let api = spine_client::Client::new(&base, None).unwrap();
    let uploads_before = metric(&base, "spine_blob_uploads_total").await;

    let (job, list) = split_count(&api, &input, 4 * MIB).await;

    assert_eq!(counts_of(&api, &job).await, expected, "equal to one count");
    // 64 MiB in pieces of 4 MiB, each cut at the first line end after 4 MiB.
    assert_eq!(list.len(), 16, "{list:?}");
    assert_eq!(job["result"]["meta"]["fragments"], 16);
    assert_eq!(
        list.iter().map(|f| f.size()).sum::<u64>(),
        std::fs::metadata(&input).unwrap().len(),
        "every byte in one fragment"
    );
    for (i, f) in list.iter().enumerate() {
        assert!(f.data.is_empty(), "fragment {i} came inline");
        let r = f.source.as_ref().expect("by reference");
        assert!(r.url.is_none());
        assert!((4 * MIB as u64..4 * MIB as u64 + 200).contains(&r.size) || i == 15);
        assert_eq!(f.name, Some(format!("part-{i:05}")));
    }
    let uploads = metric(&base, "spine_blob_uploads_total").await - uploads_before;
    assert!(
        uploads >= 16,
        "{uploads} slot uploads: the 16 fragments and map outputs"
    );
    // The split agent says how its input came and how its fragments left.
    let logs: String = (1..=2)
        .map(|n| std::fs::read_to_string(dir.path().join(format!("agent{n}.log"))).unwrap())
        .collect::<String>()
        // Without the terminal colours.
        .split('\x1b')
        .enumerate()
        .map(|(i, piece)| match i {
            0 => piece,
            _ => piece.split_once('m').map_or(piece, |(_, rest)| rest),
        })
        .collect();
    assert!(
        logs.contains("input fetched over HTTP into a file"),
        "{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("fragment files uploaded over HTTP") && l.contains("files=16")),
        "{logs}"
    );
    // The work directories are gone: the input file and the fragment files. (They are made
    // under each agent's scratch directory, `spine-agent-*` in its TMPDIR, here `dir`.)
    let scratch: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("spine-agent-"))
        .map(|e| e.path())
        .collect();
    assert!(!scratch.is_empty(), "the agents' scratch directories");
    let left: Vec<_> = scratch
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("spine-job-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_agent_without_http_sends_its_fragments_inline() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    let _agent = spawn_agent(
        1,
        server.addr,
        dir.path(),
        &[("SPINE_AGENT_HTTP_DATA", "false")],
    );
    wait_for_agents(&base, "wordcount.split", 1).await;
    let input = dir.path().join("corpus.txt");
    let expected = write_corpus(&input, 2);
    let api = spine_client::Client::new(&base, None).unwrap();

    let (job, list) = split_count(&api, &input, 256 * 1024).await;

    assert_eq!(counts_of(&api, &job).await, expected, "equal to one count");
    assert_eq!(list.len(), 8);
    assert!(
        list.iter()
            .all(|f| f.source.is_none() && !f.data.is_empty()),
        "every fragment inline"
    );
    assert_eq!(metric(&base, "spine_blob_fetches_total").await, 0);
    dispatcher.stop();
}
