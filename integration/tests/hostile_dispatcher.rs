//! Issue 14, the dispatcher's findings, each replayed against a real embedded XMPP server, a
//! real dispatcher and a real agent over loopback sockets:
//!
//! - finding 5: a job too large for the server made the dispatcher reconnect forever. Now its
//!   arguments are refused at submission, and a job whose stanza still ends the session (a
//!   server with a smaller limit) fails after its attempts, the reconnects counted;
//! - finding 6: a flood of blob announcements reserved terabytes. Now memory follows the bytes
//!   that arrive, and the flooder is refused (`resource-constraint`) while another sender is
//!   served;
//! - finding 11: one token filled a shared queue. Now each submitter has a share, and bounds on
//!   the attempts and priority it may ask for;
//! - finding 12: the data directory and its files are private.
//!
//! The tests take a lock so that they run one at a time: the memory figures of the flood test
//! are read from this process.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jid::Jid;
use minidom::Element;
use sha2::{Digest, Sha256};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, wait_for_agents};
use spine_integration::servers::Endpoint;
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

    /// `POST /v1/jobs` with `body`, as `token` (none: loopback without tokens).
    async fn submit(
        &self,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let mut r = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let r = r.send().await.expect("POST /v1/jobs");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or_default())
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

/// A loopback TCP relay to a server that counts the connections made through it: how many
/// times the dispatcher behind it logged in.
struct CountingRelay {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl CountingRelay {
    async fn start(target: SocketAddr) -> CountingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        CountingRelay { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Endpoint for CountingRelay {
    fn endpoint(&self) -> SocketAddr {
        self.addr
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

/// Finding 5, first half: the arguments that made a job stanza too large for the server are
/// refused at submission, over HTTP and over XMPP, naming the field; other jobs are served.
/// Finding 12: the dispatcher's data directory and files are private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_arguments_are_refused_at_submission_naming_the_field() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (d, base) =
        start_http_dispatcher(&server, &data, "submitters = [\"webapp@localhost\"]\n").await;
    let agent = echo_agent(&server);
    wait_for_agents(&base, "work.echo", 1).await;
    let api = Api::new(&base);

    // A 300 KB argument over HTTP: 400 bad-arguments, field args.
    let (status, v) = api
        .submit(
            None,
            serde_json::json!({"capability": "work.echo", "args": {"blob": "A".repeat(300_000)}}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad-arguments", "{v}");
    assert_eq!(v["field"], "args", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_args"),
        "{v}"
    );

    // 100 KB over XMPP (the <submit> itself fits the server's 256 KiB): the same refusal.
    let to = jid("dispatcher@localhost/d1");
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    let big = format!(
        "<submit xmlns='{NS}' capability='work.echo'><args>{{\"blob\":\"{}\"}}</args></submit>",
        "B".repeat(100_000)
    );
    w.conn.send(set("big", &to, el(&big))).await;
    let e = w.wait_reply("big").await.unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::BadRequest);
    let se = spine_error(&e);
    assert_eq!(
        (se.condition, se.field.as_deref()),
        (Condition::BadArguments, Some("args"))
    );

    // Jobs with ordinary arguments run meanwhile, the dispatcher's session intact.
    for i in 0..5 {
        let (status, v) = api
            .submit(
                None,
                serde_json::json!({"capability": "work.echo", "args": {"i": i}, "input": "aGVsbG8="}),
            )
            .await;
        assert_eq!(status, 202, "{v}");
        let j = api.wait_final(v["id"].as_str().unwrap(), PATIENCE).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }

    // Finding 12: job inputs sit in these files in clear; nobody else may read them.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&data.join("jobs.redb")), 0o600);
    assert_eq!(mode(&data.join("audit.jsonl")), 0o600);
    agent.stop();
    d.stop();
}

/// Finding 5, second half: a job whose stanza is over the server's stanza limit (here a
/// deliberately small one, 8 KiB) ends the dispatcher's session each time it is sent. It
/// used to be sent again after every reconnect, forever (3,480 cycles in 8 s). Each such end
/// now counts as an attempt: the job fails after its 3 attempts, the reconnects stop there,
/// and the other jobs are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_server_refuses_fails_after_its_attempts_and_the_reconnects_stop() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start_with(ACCOUNTS, |c| {
        c.max_stanza_size = spine_server::config::ByteSize::kib(8);
    })
    .await;
    let relay = CountingRelay::start(server.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let (d, base) = start_http_dispatcher(&relay, dir.path(), "max_attempts = 3\n").await;
    let agent = echo_agent(&server);
    wait_for_agents(&base, "work.echo", 1).await;
    let api = Api::new(&base);
    assert_eq!(relay.connections(), 1, "one login so far");

    // 40 KB of arguments: under max_args (64 KiB), far over this server's 8 KiB (which it
    // counts to within one 8 KiB read buffer).
    let (status, v) = api
        .submit(
            None,
            serde_json::json!({"capability": "work.echo", "args": {"pad": "x".repeat(40_000)}}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let big = v["id"].as_str().unwrap().to_owned();
    // Another job, submitted while the first one ends sessions.
    let (status, v) = api
        .submit(
            None,
            serde_json::json!({"capability": "work.echo", "input": "b25l"}),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let small = v["id"].as_str().unwrap().to_owned();

    // It used to stay `dispatched` while the dispatcher logged in again and again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let j = loop {
        let j = api.job(&big).await;
        if j["state"] != "dispatched" && j["state"] != "queued" {
            break j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 30 s the job is still {} after {} logins of the dispatcher",
            j["state"],
            relay.connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let attempts = j["attempts"].clone();
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["attempts"], 3, "{j}");
    assert_eq!(j["error"]["condition"], "retryable", "{j}");
    let message = j["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("gave up after 3 attempts") && message.contains("session"),
        "{j}"
    );
    let after_failure = relay.connections();
    // The first login, then one per attempt that ended a session.
    assert!(
        (2..=5).contains(&after_failure),
        "{after_failure} logins for 3 attempts"
    );

    // Other jobs are served: the one submitted meanwhile, and new ones.
    let j = api.wait_final(&small, PATIENCE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    for i in 0..5 {
        let (status, v) = api
            .submit(
                None,
                serde_json::json!({"capability": "work.echo", "args": {"i": i}}),
            )
            .await;
        assert_eq!(status, 202, "{v}");
        let j = api.wait_final(v["id"].as_str().unwrap(), PATIENCE).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    assert_eq!(
        relay.connections(),
        after_failure,
        "no reconnect after the job failed"
    );
    eprintln!(
        "finding 5: the oversized job failed after {} attempts with {} logins in all ({} reconnects)",
        attempts,
        after_failure,
        after_failure - 1
    );
    agent.stop();
    d.stop();
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
    // Over the inline limit, the output is read from its URL (the blob store).
    let out = spine_client::Client::new(&api.base, None)
        .unwrap()
        .output(&j)
        .await
        .unwrap();
    assert!(
        out == input,
        "the input came back whole ({} bytes)",
        out.len()
    );

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

/// Finding 11: 50 jobs from one token filled `max_queue` (50) and every other token and XMPP
/// submitter got `queue-full`. Now a token stops at its share (50 % of the queue by default),
/// the others are still accepted, and a token's or account's bounds on attempts and priority
/// are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_cannot_fill_the_queue_and_bounds_name_the_field() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (d, base) = start_http_dispatcher(
        &server,
        dir.path(),
        "max_queue = 50\nmax_attempts = 2\nsubmitters = [\"webapp@localhost\"]\n\
         [[http_token]]\nname = \"a\"\ntoken = \"token-a-0123456789\"\ncapabilities = [\"*\"]\n\
         [[http_token]]\nname = \"b\"\ntoken = \"token-b-0123456789\"\ncapabilities = [\"*\"]\n\
         [[http_token]]\nname = \"small\"\ntoken = \"token-s-0123456789\"\ncapabilities = [\"*\"]\nmax_queued = 2\nmax_attempts = 2\nmax_priority = 5\n",
    )
    .await;
    let api = Api::new(&base);
    // Nobody offers it: the jobs wait for an agent, as `wait_for_agent` asks.
    let job = serde_json::json!({"capability": "nobody.offers", "wait_for_agent": true});

    let (mut accepted, mut full) = (0, 0);
    for _ in 0..50 {
        let (status, v) = api.submit(Some("token-a-0123456789"), job.clone()).await;
        match status {
            202 => accepted += 1,
            429 => {
                assert_eq!(v["error"], "queue-full", "{v}");
                assert!(
                    v["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("max_queued"),
                    "{v}"
                );
                full += 1;
            }
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!((accepted, full), (25, 25));
    // Another token and an XMPP submitter still get in.
    let (status, v) = api.submit(Some("token-b-0123456789"), job.clone()).await;
    assert_eq!(status, 202, "{v}");
    let to = jid("dispatcher@localhost/d1");
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    let s = el(&format!(
        "<submit xmlns='{NS}' capability='nobody.offers' wait-for-agent='true'/>"
    ));
    w.conn.send(set("x1", &to, s)).await;
    w.wait_reply("x1")
        .await
        .expect("the XMPP submitter is accepted");

    // Bounds of the `small` token, each refusal naming the field.
    let small = Some("token-s-0123456789");
    for (body, field) in [
        (
            serde_json::json!({"capability": "nobody.offers", "max_attempts": 3}),
            "max_attempts",
        ),
        (
            serde_json::json!({"capability": "nobody.offers", "priority": 6}),
            "priority",
        ),
    ] {
        let (status, v) = api.submit(small, body).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(
            (v["error"].as_str(), v["field"].as_str()),
            (Some("bad-arguments"), Some(field)),
            "{v}"
        );
    }
    let ok = serde_json::json!({"capability": "nobody.offers", "max_attempts": 2, "priority": 5, "wait_for_agent": true});
    assert_eq!(api.submit(small, ok.clone()).await.0, 202);
    assert_eq!(api.submit(small, ok.clone()).await.0, 202);
    assert_eq!(api.submit(small, ok).await.0, 429, "its own share is 2");
    // The defaults over XMPP: at most 100 attempts, priority 1000.
    for (attr, field) in [
        ("max-attempts='500'", "max-attempts"),
        ("priority='5000'", "priority"),
    ] {
        let s = el(&format!(
            "<submit xmlns='{NS}' capability='nobody.offers' {attr}/>"
        ));
        w.conn.send(set(field, &to, s)).await;
        let e = w.wait_reply(field).await.unwrap_err();
        let se = spine_error(&e);
        assert_eq!(
            (se.condition, se.field.as_deref()),
            (Condition::BadArguments, Some(field))
        );
    }
    d.stop();
}
