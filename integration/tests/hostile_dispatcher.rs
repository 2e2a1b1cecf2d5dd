//! Issue 14, the dispatcher's findings, each replayed against a real embedded XMPP server, a
//! real dispatcher and a real agent over loopback sockets:
//!
//! - finding 6: a flood of blob announcements reserved terabytes. Now memory follows the bytes
//!   that arrive, and the flooder is refused (`resource-constraint`) while another sender is
//!   served.
//!
//! The tests take a lock so that they run one at a time: the memory figures of the flood test
//! are read from this process.

use std::time::Duration;

use base64::Engine as _;
use jid::Jid;
use minidom::Element;
use sha2::{Digest, Sha256};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, wait_for_agents};
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Chunk, Condition, SpineError, NS};
use tokio::sync::Mutex;
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::DefinedCondition;

static SERIAL: Mutex<()> = Mutex::const_new(());

const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("agent1", "pw"),
    ("webapp", "pw-w"),
    ("flood", "pw-f"),
];

fn jid(s: &str) -> Jid {
    s.parse().unwrap()
}

fn el(xml: &str) -> Element {
    xml.parse().expect("test XML")
}

fn set(id: &str, to: &Jid, payload: Element) -> Iq {
    Iq::Set {
        from: None,
        to: Some(to.clone()),
        id: id.to_owned(),
        payload,
    }
}

fn spine_error(e: &xmpp_parsers::stanza_error::StanzaError) -> SpineError {
    SpineError::from_stanza_error(e)
        .expect("a valid Spine error")
        .expect("a Spine condition")
}

/// An agent offering `work.echo` (its input back).
fn echo_agent(server: &TestServer) -> spine_integration::farm::Running {
    let agent = Agent::builder(agent_config(server, 1, "slots = 4\n"))
        .capability("work.echo", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(ctx.input.to_vec()))
        })
        .build()
        .unwrap();
    run_agent(agent)
}

/// A small HTTP client of the dispatcher's API.
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(base: &str) -> Api {
        Api {
            base: base.to_owned(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn job(&self, id: &str) -> serde_json::Value {
        let r = self
            .http
            .get(format!("{}/v1/jobs/{id}", self.base))
            .send()
            .await
            .expect("GET /v1/jobs/{id}");
        serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default()
    }

    /// Waits until job `id` has ended (within `within`), and returns it.
    async fn wait_final(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "timed-out")
            ) {
                return j;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} has not ended within {within:?}: {j}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Resident and virtual memory of this process, bytes (`/proc/self/status`).
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmSize:"))
}

/// Sends `chunks` from `conn`, at most `batch` unanswered, and counts the answers: accepted,
/// and refused with each Spine condition (the defined condition checked on the way).
async fn send_chunks(
    conn: &mut spine_xmpp::Connection,
    to: &Jid,
    chunks: Vec<Chunk>,
    batch: usize,
) -> (usize, Vec<SpineError>) {
    let (mut ok, mut refused) = (0, Vec::new());
    let total = chunks.len();
    let mut it = chunks.into_iter().enumerate();
    let mut answered = 0;
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while answered < total {
        while sent - answered < batch {
            let Some((i, c)) = it.next() else { break };
            conn.send(Iq::from_set(format!("c{i}"), c).with_to(to.clone()))
                .await;
            sent += 1;
        }
        match tokio::time::timeout_at(deadline, conn.next()).await {
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Result { id, .. })))) if id.starts_with('c') => {
                ok += 1;
                answered += 1;
            }
            Ok(Some(Event::Stanza(Stanza::Iq(Iq::Error { id, error, .. }))))
                if id.starts_with('c') =>
            {
                let se = spine_error(&error);
                if se.condition == Condition::Busy {
                    assert_eq!(
                        error.defined_condition,
                        DefinedCondition::ResourceConstraint
                    );
                }
                refused.push(se);
                answered += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection closed after {answered} answers"),
            Err(_) => panic!("only {answered} of {total} chunks answered"),
        }
    }
    (ok, refused)
}

/// Finding 6: a limited submitter announced 70,000 blobs of 64 MiB with one chunk each, and
/// the dispatcher reserved 2.6 TB of virtual memory (+158 MB resident). Now a blob holds only
/// the bytes that came, and beyond its sender's share (4 × `max_blob` announced) the flooder
/// gets `resource-constraint` while another submitter uploads an input and has its job run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_flood_is_refused_beyond_the_senders_share_while_others_are_served() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (d, base) = start_http_dispatcher(
        &server,
        dir.path(),
        "[[submitter]]\njid = \"flood@localhost\"\ncapabilities = [\"work.echo\"]\n\
         [[submitter]]\njid = \"webapp@localhost\"\ncapabilities = [\"work.echo\"]\n",
    )
    .await;
    let agent = echo_agent(&server);
    wait_for_agents(&base, "work.echo", 1).await;
    let api = Api::new(&base);
    let to = jid("dispatcher@localhost/d1");
    let mut flood = server.client("flood", "pw-f").await;
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    let (rss0, vm0) = memory();

    // 20,000 announcements of 64 MiB, 16 bytes each.
    let n = 20_000;
    let chunks: Vec<Chunk> = (0..n)
        .map(|i| Chunk {
            blob: format!("flood-{i}").parse().unwrap(),
            offset: 0,
            total: 64 << 20,
            bytes: vec![0xAB; 16],
        })
        .collect();
    let started = std::time::Instant::now();
    let (ok, refused) = send_chunks(&mut flood, &to, chunks, 1000).await;
    let (rss1, vm1) = memory();
    eprintln!(
        "finding 6: {n} announcements of 64 MiB in {:?}: {ok} taken, {} refused; resident {:+} MiB, virtual {:+} MiB",
        started.elapsed(),
        refused.len(),
        (rss1 as i64 - rss0 as i64) / (1 << 20),
        (vm1 as i64 - vm0 as i64) / (1 << 20)
    );
    // 4 × 64 MiB is the sender's share of announced bytes (4 × max_blob).
    assert_eq!(ok, 4, "blobs taken");
    assert_eq!(refused.len(), n - 4);
    assert!(
        refused.iter().all(|e| e.condition == Condition::Busy),
        "{:?}",
        refused[0]
    );
    assert!(
        refused[0].to_string().contains("open blobs"),
        "{}",
        refused[0]
    );
    // Nothing was reserved for the announced sizes: 20,000 × 64 MiB would be 1.25 TB.
    assert!(
        vm1.saturating_sub(vm0) < 2 << 30,
        "virtual memory grew by {} bytes",
        vm1 - vm0
    );
    assert!(
        rss1.saturating_sub(rss0) < 64 << 20,
        "resident memory grew by {} bytes",
        rss1 - rss0
    );

    // Another sender is served: a 200 KB input in 4 chunks, then its job.
    let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let blob: spine_protocol::BlobId = "upload-1".parse().unwrap();
    let parts = spine_protocol::chunks(&blob, &input);
    let (ok, refused) = send_chunks(&mut w.conn, &to, parts, 8).await;
    assert_eq!((ok, refused.len()), (4, 0), "{refused:?}");
    let sha = hex(&Sha256::digest(&input));
    let submit = el(&format!(
        "<submit xmlns='{NS}' capability='work.echo'><input blob='upload-1' size='{}' sha256='{sha}'/></submit>",
        input.len()
    ));
    w.conn.send(set("s1", &to, submit)).await;
    let accepted = w.wait_reply("s1").await.expect("accepted");
    let job = accepted
        .and_then(|a| a.attr("job").map(str::to_owned))
        .expect("a job id");
    let j = api.wait_final(&job, PATIENCE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let out = base64::engine::general_purpose::STANDARD
        .decode(j["result"]["output"].as_str().unwrap_or_default())
        .unwrap();
    assert_eq!(out, input, "the input came back whole");

    // The flooder's open blobs still hold its share: a new blob is refused, while a chunk of
    // one it holds is taken.
    let again = |blob: &str, offset: u64| Chunk {
        blob: blob.parse().unwrap(),
        offset,
        total: 64 << 20,
        bytes: vec![1; 16],
    };
    let (ok, refused) = send_chunks(
        &mut flood,
        &to,
        vec![again("flood-new", 0), again("flood-0", 16)],
        2,
    )
    .await;
    assert_eq!((ok, refused.len()), (1, 1));
    agent.stop();
    d.stop();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
