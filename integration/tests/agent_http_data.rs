//! Protocol 1.1 on a real agent (docs/PROTOCOL.md §13.4): the agent runs in-process against
//! the embedded XMPP server, a test dispatcher drives it over XMPP, and a small real HTTP
//! server on loopback stands in for the dispatcher's blob endpoints (signed URLs are opaque to
//! the agent, so plain paths do here). Inputs by reference are fetched and checked, every
//! failed fetch is answered `fetch-failed` and the same attempt in chunks then runs, and large
//! outputs go to an upload slot, or in chunks when the slot is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use jid::{BareJid, Jid};
use serde_json::json;
use sha2::{Digest, Sha256};
use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::TestServer;
use spine_protocol::{
    Args, BlobRef, Condition, Data, DataRef, DispatcherHello, Job, JobResult, ProtocolVersion,
    RequestSlot, Slot, SpineError,
};
use tokio::sync::oneshot;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::presence::Presence;
use xmpp_parsers::stanza_error::StanzaError;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("agent1", "pw-a1")];

/// One PUT received: path name, body, Content-Length, Content-Type.
type Upload = (String, Vec<u8>, Option<String>, Option<String>);

/// What the blob server serves and what it received.
#[derive(Default)]
struct Blobs {
    /// GET /blob/{name}.
    served: HashMap<String, Vec<u8>>,
    /// PUT /upload/{name}.
    uploads: Vec<Upload>,
}

type Shared = Arc<Mutex<Blobs>>;

async fn serve_blob(State(s): State<Shared>, Path(name): Path<String>) -> (StatusCode, Vec<u8>) {
    if name == "forbidden" {
        return (StatusCode::FORBIDDEN, b"bad signature".to_vec());
    }
    match s.lock().expect("state").served.get(&name) {
        Some(b) => (StatusCode::OK, b.clone()),
        None => (StatusCode::NOT_FOUND, Vec::new()),
    }
}

async fn take_upload(
    State(s): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let header = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    s.lock().expect("state").uploads.push((
        name,
        body.to_vec(),
        header("content-length"),
        header("content-type"),
    ));
    StatusCode::CREATED
}

/// The blob server on 127.0.0.1:0: its base URL and state. Stops with the test's runtime.
async fn blob_server() -> (String, Shared) {
    let state = Shared::default();
    let app = axum::Router::new()
        .route("/blob/{name}", get(serve_blob))
        .route("/upload/{name}", put(take_upload))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), state)
}

fn config(server: &TestServer) -> AgentConfig {
    let toml = format!(
        "jid = \"agent1@localhost/w1\"\npassword = \"pw-a1\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\ndrain_grace = \"5s\"\n",
        server.addr
    );
    AgentConfig::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// Starts the agent with `test.digest` (SHA-256 and length of its input) and `test.big` (an
/// output of `bytes` bytes); returns its stop switch and its full JID.
async fn start_agent(
    server: &TestServer,
    d: &mut TestDispatcher,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>, Jid) {
    let agent = Agent::builder(config(server))
        .capability("test.digest", None, |ctx: JobContext| async move {
            let mut out = Output::bytes(Sha256::digest(&ctx.input).to_vec());
            out.meta.insert("len".into(), json!(ctx.input.len()));
            Ok::<_, JobError>(out)
        })
        .capability("test.big", None, |ctx: JobContext| async move {
            let n = ctx.arg_u64("bytes", 1..=10_000_000)?;
            Ok::<_, JobError>(Output::bytes(pattern(n as usize)).with_mime("application/x-test"))
        })
        .build()
        .expect("agent builds");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        agent
            .run(async move {
                let _ = rx.await;
            })
            .await
            .expect("agent runs");
    });
    let (jid, ad, _) = d
        .wait_advertise(&"agent1@localhost".parse::<BareJid>().expect("bare JID"))
        .await;
    assert_eq!(
        ad.protocol,
        ProtocolVersion::V1_2,
        "http_data is on by default (1.2: 1.1 and <recall/>)"
    );
    (tx, task, jid)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn digest_job(id: &str, input: Data) -> Job {
    let mut j = Job::new(
        id.parse().expect("job id"),
        "test.digest".parse().expect("capability"),
    );
    j.input = Some(input);
    j
}

fn reference(bytes: &[u8], sources: Vec<String>) -> Data {
    Data::Ref(DataRef {
        size: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
        mime: None,
        sources,
    })
}

fn digest_of(r: &JobResult) -> (Vec<u8>, u64) {
    let Some(Data::Inline { bytes, .. }) = &r.output else {
        panic!("inline output expected: {r:?}")
    };
    let len = r.meta.get("len").and_then(|v| v.as_u64()).expect("len");
    (bytes.clone(), len)
}

fn spine_error(e: &StanzaError) -> SpineError {
    SpineError::from_stanza_error(e)
        .expect("a valid condition")
        .expect("a Spine condition")
}

#[tokio::test]
async fn inputs_by_reference_are_fetched_and_every_failure_falls_back_to_chunks() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let (base, blobs) = blob_server().await;
    let (stop, task, to) = start_agent(&server, &mut d).await;
    let input = pattern(300_000);
    let sha: Vec<u8> = Sha256::digest(&input).to_vec();
    blobs
        .lock()
        .expect("state")
        .served
        .insert("good".into(), input.clone());

    // (a) Fetched and hashed; the handler sees the bytes. The first source is refused (403),
    // the second works.
    let j = digest_job(
        "ref-ok",
        reference(
            &input,
            vec![
                format!("{base}/blob/forbidden"),
                format!("{base}/blob/good"),
            ],
        ),
    );
    let id = d.send_job(&to, j).await;
    let r = d.wait_result(&id).await.expect("a result");
    assert_eq!(digest_of(&r), (sha.clone(), 300_000));

    // (b) Wrong hash, 403, a closed port: fetch-failed naming the host, then the same id and
    // attempt with the input in chunks runs.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address").port()
    };
    let mut wrong = reference(&input, vec![format!("{base}/blob/good")]);
    if let Data::Ref(r) = &mut wrong {
        r.sha256[0] ^= 1;
    }
    let cases = [
        ("ref-hash", wrong, "SHA-256"),
        (
            "ref-403",
            reference(&input, vec![format!("{base}/blob/forbidden")]),
            "403",
        ),
        (
            "ref-closed",
            reference(&input, vec![format!("http://127.0.0.1:{closed}/blob/good")]),
            "127.0.0.1",
        ),
    ];
    for (n, (job, data, needle)) in cases.into_iter().enumerate() {
        let id = d.send_job(&to, digest_job(job, data)).await;
        let e = spine_error(&d.wait_result(&id).await.expect_err("fetch-failed"));
        assert_eq!(e.condition, Condition::FetchFailed, "{job}: {e}");
        let text = e.text.unwrap_or_default();
        assert!(
            text.contains("127.0.0.1"),
            "{job}: the host is named: {text}"
        );
        assert!(text.contains(needle), "{job}: {text}");
        // The dispatcher's resend: same id, same attempt, chunks.
        let blob: spine_protocol::BlobId = format!("in-{n}").parse().expect("blob id");
        for c in spine_protocol::chunks(&blob, &input) {
            let cid = d.send_set(&to, c).await;
            d.wait_reply(&cid).await.expect("chunk accepted");
        }
        let resend = digest_job(
            job,
            Data::Blob(BlobRef {
                blob,
                size: input.len() as u64,
                sha256: Sha256::digest(&input).into(),
                mime: None,
            }),
        );
        let id = d.send_job(&to, resend).await;
        let r = d.wait_result(&id).await.expect("the resend runs");
        assert_eq!(digest_of(&r), (sha.clone(), 300_000), "{job}");
    }
    let _ = stop.send(());
    task.await.expect("agent task");
}

/// Waits for the agent's `<request-slot/>`: (IQ id, sender, request).
async fn wait_slot_request(d: &mut TestDispatcher) -> (String, Jid, RequestSlot) {
    d.wait_for("a slot request", |st| match st {
        Stanza::Iq(Iq::Get {
            id,
            from: Some(from),
            payload,
            ..
        }) => Some((
            id.clone(),
            from.clone(),
            RequestSlot::try_from(payload.clone()).ok()?,
        )),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn large_outputs_go_to_the_upload_slot_or_in_chunks_when_it_is_refused() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let (base, blobs) = blob_server().await;
    let (stop, task, to) = start_agent(&server, &mut d).await;
    // The agent learns that this dispatcher speaks 1.1 from its hello.
    d.conn
        .send(
            Presence::available()
                .with_to(to.clone())
                .with_payload(DispatcherHello {
                    protocol: ProtocolVersion::V1_1,
                }),
        )
        .await;
    d.wait_advertise(&to.to_bare()).await;
    let expected = pattern(300_000);
    let sha: [u8; 32] = Sha256::digest(&expected).into();
    let big = |id: &str| {
        let mut j = Job::new(
            id.parse().expect("job id"),
            "test.big".parse().expect("capability"),
        );
        j.args = Args(
            json!({"bytes": 300_000})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        j
    };

    // (c) Slot granted: the PUT carries the bytes and headers, the result refers to them.
    let id = d.send_job(&to, big("out-slot")).await;
    let (iq, from, req) = wait_slot_request(&mut d).await;
    assert_eq!(
        (
            req.job.as_str(),
            req.attempt,
            req.size,
            req.sha256,
            req.mime.as_deref()
        ),
        ("out-slot", 1, 300_000, sha, Some("application/x-test"))
    );
    let slot = Slot {
        job: req.job.clone(),
        put: format!("{base}/upload/out-slot?sig=opaque"),
        expires_ms: 300_000,
    };
    d.conn
        .send(Iq::from_result(iq, Some(slot)).with_to(from))
        .await;
    let payload = d.wait_reply(&id).await.expect("a result").expect("payload");
    let r = JobResult::try_from(payload).expect("a <result/>");
    assert_eq!(
        r.output,
        Some(Data::Ref(DataRef {
            size: 300_000,
            sha256: sha,
            mime: Some("application/x-test".into()),
            sources: vec![],
        }))
    );
    {
        let b = blobs.lock().expect("state");
        let [(name, body, len, mime)] = &b.uploads[..] else {
            panic!("one upload, got {}", b.uploads.len())
        };
        assert_eq!(name, "out-slot");
        assert!(*body == expected, "the PUT body is the output");
        assert_eq!(len.as_deref(), Some("300000"));
        assert_eq!(mime.as_deref(), Some("application/x-test"));
    }

    // (d) Slot refused: the output comes back in chunks.
    let id = d.send_job(&to, big("out-chunks")).await;
    let (iq, from, _) = wait_slot_request(&mut d).await;
    let refusal = StanzaError::from(
        SpineError::new(Condition::StorageFull).with_text("blob store is over its quota"),
    );
    d.conn.send(Iq::from_error(iq, refusal).with_to(from)).await;
    let r = d.wait_result(&id).await.expect("a result");
    let Some(Data::Inline { bytes, .. }) = &r.output else {
        panic!("the chunked output, resolved: {:?}", r.output)
    };
    assert!(*bytes == expected, "the chunked output is the output");
    assert_eq!(
        blobs.lock().expect("state").uploads.len(),
        1,
        "no second PUT"
    );
    let _ = stop.send(());
    task.await.expect("agent task");
}
