//! The data plane of protocol 1.1 (PROTOCOL.md §13.4, docs/dispatcher.md §5–6) with real
//! parts: the embedded XMPP server, a real dispatcher with its HTTP API on loopback and real
//! Rust agents. Signed URLs refuse every alteration (403, counted by reason) and never serve
//! anything but a stored blob; an agent that cannot reach the HTTP port gets its input in
//! chunks and the job still succeeds once; the quota refuses clearly and leaves nothing
//! behind; blobs no job holds go after retention and `blob_orphan_ttl`; outputs serve ranges.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_dispatcher::signing::{BlobGrant, UploadGrant, UrlKey};
use spine_integration::farm::{
    agent_config, run_agent, start_http_dispatcher, wait_for_agents, Running,
};
use spine_integration::{TestServer, PATIENCE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("agent1", "pw"), ("agent2", "pw")];

const ALL_CAPS: &[&str] = &["hash.sha256", "text.upper", "concat.reduce"];

/// Test agent `n` with `extra` configuration, offering those of `caps` among
/// `hash.sha256`, `text.upper` and `concat.reduce` (a reduce step: its fragments' bytes,
/// concatenated in order).
fn test_agent(server: &TestServer, n: usize, extra: &str, caps: &[&str]) -> Running {
    let mut b = Agent::builder(agent_config(server, n, extra));
    if caps.contains(&"hash.sha256") {
        b = b.capability("hash.sha256", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(hex(&Sha256::digest(&ctx.input))))
        });
    }
    if caps.contains(&"text.upper") {
        b = b.capability("text.upper", None, |ctx: JobContext| async move {
            let text = String::from_utf8(ctx.input)
                .map_err(|_| JobError::bad_argument("input", "must be UTF-8 text"))?;
            Ok::<_, JobError>(Output::bytes(text.to_uppercase()).with_mime("text/plain"))
        });
    }
    if caps.contains(&"concat.reduce") {
        b = b.capability("concat.reduce", None, |ctx: JobContext| async move {
            let list = spine_protocol::fragments::decode(&ctx.input)
                .map_err(|e| JobError::bad_argument("input", e))?;
            if list.iter().any(|f| f.source.is_some()) {
                return Err(JobError::Failed(
                    "the handler got a fragment by reference".into(),
                ));
            }
            let all: Vec<u8> = list.into_iter().flat_map(|f| f.data).collect();
            Ok::<_, JobError>(Output::bytes(all).with_mime("text/plain"))
        });
    }
    run_agent(b.build().unwrap())
}

/// The embedded server, a dispatcher on `dir` (HTTP API at `base`) and, if asked, agent1
/// offering `hash.sha256` and `text.upper` (as `spine up`'s built-ins).
struct Bus {
    server: TestServer,
    dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
    dispatcher: Option<Running>,
    agent: Option<Running>,
}

impl Bus {
    async fn start(extra: &str, with_agent: bool) -> Bus {
        Bus::start_with(extra, with_agent.then_some("")).await
    }

    /// As [`Bus::start`], the agent (if any) with `agent_extra` in its configuration.
    async fn start_with(extra: &str, agent_extra: Option<&str>) -> Bus {
        let with_agent = agent_extra.is_some();
        let server = TestServer::start(ACCOUNTS).await;
        let dir = tempfile::tempdir().unwrap();
        let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), extra).await;
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        // Ready once logged in: the HTTP API answers and the signing key exists.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let up = http
                .get(format!("{base}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if up && dir.path().join("url.key").exists() {
                break;
            }
            assert!(Instant::now() < deadline, "the dispatcher never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let agent = agent_extra.map(|extra| test_agent(&server, 1, extra, ALL_CAPS));
        if with_agent {
            wait_for_agents(&base, "text.upper", 1).await;
        }
        Bus {
            server,
            dir,
            base,
            http,
            dispatcher: Some(dispatcher),
            agent,
        }
    }

    fn data(&self) -> &Path {
        self.dir.path()
    }

    fn key(&self) -> UrlKey {
        spine_dispatcher::signing::load_or_create(&self.data().join("url.key"))
            .expect("the dispatcher's key")
    }

    /// `GET path` on the API: status and body bytes.
    async fn get(&self, path_or_url: &str, range: Option<&str>) -> (u16, Vec<u8>) {
        let url = if path_or_url.starts_with("http") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.base)
        };
        let mut r = self.http.get(url);
        if let Some(v) = range {
            r = r.header("range", v);
        }
        let r = r.send().await.expect("the API answers");
        let status = r.status().as_u16();
        (status, r.bytes().await.expect("a body").to_vec())
    }

    /// `PUT /v1/blobs`: status and JSON.
    async fn put_blob(&self, body: reqwest::Body) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}/v1/blobs", self.base))
            .body(body)
            .send()
            .await
            .expect("the API answers");
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default(),
        )
    }

    /// `POST /v1/jobs` with a JSON body: status and JSON.
    async fn submit_json(&self, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the API answers");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// A job's JSON view.
    async fn job(&self, id: &str) -> Value {
        let (_, body) = self.get(&format!("/v1/jobs/{id}"), None).await;
        serde_json::from_slice(&body).unwrap_or_default()
    }

    /// Uploads each piece with `PUT /v1/blobs`: the fragment list naming them.
    async fn fragments(&self, pieces: &[Vec<u8>]) -> Value {
        let mut list = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let (status, v) = self.put_blob(p.clone().into()).await;
            assert_eq!(status, 201, "{v}");
            list.push(serde_json::json!({
                "name": format!("p{i}"), "type": "text/plain",
                "sha256": v["sha256"], "size": v["size"],
            }));
        }
        Value::Array(list)
    }

    /// Submits `input` raw to `capability`; returns the job id.
    async fn submit_raw(&self, capability: &str, input: Vec<u8>) -> String {
        let r = self
            .http
            .post(format!("{}/v1/jobs?capability={capability}", self.base))
            .header("content-type", "application/octet-stream")
            .body(input)
            .send()
            .await
            .expect("the API answers");
        let status = r.status().as_u16();
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or_default();
        assert_eq!(status, 202, "submission refused: {v}");
        v["id"].as_str().expect("job id").to_owned()
    }

    /// Waits (bounded) until the job is final; returns it.
    async fn wait_final(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get(&format!("/v1/jobs/{id}"), None).await;
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            if status == 200
                && matches!(
                    v["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled" | "timed-out")
                )
            {
                return v;
            }
            assert!(Instant::now() < deadline, "job {id} not final in 30 s: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A counter or gauge of `/metrics` (the full name with labels).
    async fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.get("/metrics", None).await;
        assert_eq!(status, 200, "/metrics");
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(a) = self.agent.take() {
            a.kill();
        }
        if let Some(d) = self.dispatcher.take() {
            d.stop();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 31 + seed as usize * 7) % 251) as u8)
        .collect()
}

/// Lowercase ASCII text of `n` bytes.
fn text(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Files under `dir`, recursively (none if it does not exist).
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Replaces the value of query parameter `name` in `url`.
fn with_param(url: &str, name: &str, value: &str) -> String {
    let (path, query) = url.split_once('?').expect("a query");
    let q: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k == name => format!("{k}={value}"),
            _ => kv.to_owned(),
        })
        .collect();
    format!("{path}?{}", q.join("&"))
}

/// One raw request line on a fresh connection (no client normalises the path): status and
/// the whole answer.
async fn raw_get(base: &str, target: &str) -> (u16, Vec<u8>) {
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {target} HTTP/1.1\r\nhost: spine\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    (status, answer)
}

/// `PUT target` with `body` in chunked encoding (no length declared), on a fresh connection:
/// status and the whole answer. The server may answer before the body is all sent.
async fn put_chunked(base: &str, target: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "PUT {target} HTTP/1.1\r\nhost: spine\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for c in body.chunks(10_000) {
        req.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        req.extend_from_slice(c);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    // A refusal may close the connection mid-body: what matters is the answer.
    let _ = tcp.write_all(&req).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer)).await;
    let head = String::from_utf8_lossy(&answer[..answer.len().min(64)]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_refuse_every_alteration_and_serve_only_stored_blobs() {
    let bus = Bus::start("", false).await;
    let key = bus.key();
    let bytes = pattern(200_000, 1);
    let (status, v) = bus.put_blob(bytes.clone().into()).await;
    assert_eq!(status, 201, "{v}");
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    assert_eq!(v["sha256"], hex(&sha));
    let grant = BlobGrant {
        sha256: sha,
        job: "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44".parse().unwrap(),
        agent: "agent1@localhost".parse().unwrap(),
    };
    let url = grant.url(&bus.base, now_s() + 60, &key);

    // The URL as the dispatcher makes it works: the test's URLs are right.
    let (status, body) = bus.get(&url, None).await;
    assert_eq!(status, 200);
    assert!(body == bytes, "the blob's bytes");
    assert_eq!(bus.metric("spine_blob_fetches_total").await, 1);

    // Each alteration: 403, counted as a bad signature.
    let sig = url.rsplit_once("sig=").unwrap().1.to_owned();
    let flipped = format!(
        "{}{}",
        if sig.starts_with('A') { 'B' } else { 'A' },
        &sig[1..]
    );
    let altered = [
        ("tampered signature", with_param(&url, "sig", &flipped)),
        (
            "replayed for another job",
            with_param(&url, "job", "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e45"),
        ),
        (
            "another agent's",
            with_param(&url, "agent", "agent2%40localhost"),
        ),
        (
            "a later expiry",
            with_param(&url, "exp", &(now_s() + 3600).to_string()),
        ),
    ];
    for (n, (what, u)) in altered.iter().enumerate() {
        let (status, body) = bus.get(u, None).await;
        assert_eq!(status, 403, "{what}: {}", String::from_utf8_lossy(&body));
        assert!(body != bytes, "{what}: no bytes");
        assert_eq!(
            bus.metric("spine_blob_url_refusals_total{reason=\"signature\"}")
                .await,
            n as u64 + 1,
            "{what}: counted"
        );
    }
    // Expired: signed right, but in the past.
    let expired = grant.url(&bus.base, now_s() - 1, &key);
    let (status, _) = bus.get(&expired, None).await;
    assert_eq!(status, 403, "expired");
    assert_eq!(
        bus.metric("spine_blob_url_refusals_total{reason=\"expired\"}")
            .await,
        1
    );

    // An upload URL altered for another size or hash: 403 before any byte is stored.
    let up = UploadGrant {
        job: grant.job.clone(),
        agent: grant.agent.clone(),
        attempt: 1,
        size: 100_000,
        sha256: Sha256::digest(pattern(100_000, 2)).into(),
    };
    let put_url = up.url(&bus.base, now_s() + 60, &key);
    let other = pattern(100_001, 3);
    for (what, u) in [
        ("another size", with_param(&put_url, "size", "100001")),
        (
            "another hash",
            with_param(&put_url, "sha256", &hex(&Sha256::digest(&other))),
        ),
    ] {
        let r = bus.http.put(&u).body(other.clone()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "upload URL for {what}");
    }
    // The right URL with other bytes: 400, nothing stored.
    let r = bus
        .http
        .put(&put_url)
        .body(pattern(100_000, 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "bytes other than the slot's");
    assert_eq!(
        bus.metric("spine_blob_url_refusals_total{reason=\"signature\"}")
            .await,
        6
    );
    assert_eq!(bus.metric("spine_blob_store_blobs").await, 1);

    // Outside the store: never the key.
    let key_bytes = std::fs::read(bus.data().join("url.key")).unwrap();
    let absent = BlobGrant {
        sha256: Sha256::digest(b"never stored").into(),
        ..grant.clone()
    };
    let absent_url = absent.url(&bus.base, now_s() + 60, &key);
    let absent_target = absent_url.trim_start_matches(&bus.base).to_owned();
    let query = url.split_once('?').unwrap().1;
    for target in [
        format!("/v1/blobs/../../url.key?{query}"),
        format!("/v1/blobs/..%2f..%2furl.key?{query}"),
        format!("/v1/blobs/%2e%2e%2f%2e%2e%2furl.key?{query}"),
        "/v1/blobs/not-hex".to_owned(),
        format!("/v1/blobs/not-hex?{query}"),
        absent_target,
    ] {
        let (status, answer) = raw_get(&bus.base, &target).await;
        assert_eq!(
            status,
            404,
            "{target}: {}",
            String::from_utf8_lossy(&answer)
        );
        assert!(
            !answer.windows(32).any(|w| w == key_bytes.as_slice()),
            "{target}: the key was served"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_reach_http_gets_chunks_and_outputs_serve_ranges() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bus = Bus::start(
        &format!("public_url = \"http://127.0.0.1:{closed}\"\n"),
        true,
    )
    .await;

    // 1 MiB by reference to a URL the agent cannot reach: fetch-failed, then chunks, once.
    let input = pattern(1 << 20, 5);
    let id = bus.submit_raw("hash.sha256", input.clone()).await;
    let job = bus.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "the fallback is not an attempt: {job}");
    let (status, out) = bus.get(&format!("/v1/jobs/{id}/output"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        hex(&Sha256::digest(&input))
    );
    assert_eq!(bus.metric("spine_blob_fetches_total").await, 0);

    // A large output: the slot's URL is unreachable too, so it comes in chunks.
    let input = text(300_000);
    let id = bus.submit_raw("text.upper", input.clone()).await;
    let job = bus.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let want = input.to_ascii_uppercase();
    let output = format!("/v1/jobs/{id}/output");
    let (status, out) = bus.get(&output, None).await;
    assert_eq!(status, 200);
    assert!(out == want, "the whole output");
    assert_eq!(bus.metric("spine_blob_uploads_total").await, 0);

    // Ranges of it.
    let (status, part) = bus.get(&output, Some("bytes=10-19")).await;
    assert_eq!((status, part.as_slice()), (206, &want[10..20]));
    let (status, part) = bus.get(&output, Some("bytes=-5")).await;
    assert_eq!((status, part.as_slice()), (206, &want[want.len() - 5..]));
    let (status, _) = bus.get(&output, Some("bytes=300000-")).await;
    assert_eq!(status, 416, "past the end");
    let (status, _) = bus.get(&output, Some("bytes=400000-400010")).await;
    assert_eq!(status, 416, "past the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_refuses_clearly_and_leaves_nothing_behind() {
    let bus = Bus::start(
        "max_blob = \"64KiB\"\nmax_input = \"128KiB\"\nblob_quota = \"128KiB\"\n",
        false,
    )
    .await;
    let first = pattern(100_000, 6);
    let (status, v) = bus.put_blob(first.clone().into()).await;
    assert_eq!(status, 201, "{v}");

    // Declared size over what is left: refused at once.
    let (status, v) = bus.put_blob(pattern(100_000, 7).into()).await;
    assert_eq!(status, 507, "{v}");
    assert_eq!(v["error"], "storage-full", "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains("blob_quota"), "names the key: {message}");
    assert_eq!(bus.metric("spine_blob_quota_refusals_total").await, 1);

    // Unknown size (chunked): refused as it grows.
    let (status, answer) = put_chunked(&bus.base, "/v1/blobs", &pattern(100_000, 8)).await;
    assert_eq!(status, 507, "{}", String::from_utf8_lossy(&answer));
    assert!(
        String::from_utf8_lossy(&answer).contains("storage-full"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(bus.metric("spine_blob_quota_refusals_total").await, 2);

    let stored = files(&bus.data().join("blobs/sha256"));
    assert_eq!(stored.len(), 1, "only the first blob: {stored:?}");
    assert!(stored[0].ends_with(hex(&Sha256::digest(&first))));
    let tmp = files(&bus.data().join("blobs/tmp"));
    assert!(tmp.is_empty(), "nothing half-written: {tmp:?}");
    assert_eq!(bus.metric("spine_blob_store_bytes").await, 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_no_job_holds_are_deleted_after_retention_and_the_orphan_ttl() {
    let bus = Bus::start("retention = \"1s\"\nblob_orphan_ttl = \"2s\"\n", true).await;
    let t0 = Instant::now();
    // An upload no job ever names.
    let (status, v) = bus.put_blob(pattern(200_000, 9).into()).await;
    assert_eq!(status, 201, "{v}");
    // 1 MiB in, 1 MiB out, both over HTTP.
    let input = text(1 << 20);
    let id = bus.submit_raw("text.upper", input.clone()).await;
    let job = bus.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, out) = bus.get(&format!("/v1/jobs/{id}/output"), None).await;
    if status == 200 {
        assert!(out == input.to_ascii_uppercase(), "the output");
    }
    assert_eq!(bus.metric("spine_blob_fetches_total").await, 1);
    assert_eq!(bus.metric("spine_blob_uploads_total").await, 1);

    let sha_dir = bus.data().join("blobs/sha256");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = files(&sha_dir);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blobs still stored 20 s after retention (1 s) and the orphan ttl (2 s): {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "every blob gone {:.1} s after the upload",
        t0.elapsed().as_secs_f64()
    );
    let (status, _) = bus.get(&format!("/v1/jobs/{id}"), None).await;
    assert_eq!(status, 404, "retention forgot the job");
    assert_eq!(bus.metric("spine_blob_store_blobs").await, 0);
}

/// A map/reduce job over fragments uploaded once (`PUT /v1/blobs`) and named by reference
/// (PROTOCOL.md §11.7.1): each map step fetches its own fragment, each reduce step the map
/// outputs it takes, by signed URL; an agent that does not fetch over HTTP gets the same bytes
/// inline; a list naming a blob the store does not hold, or carrying a URL, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_reduce_fragments_by_reference_are_stored_once_and_fetched_by_their_steps() {
    for agent_extra in ["", "http_data = false\n"] {
        let http = agent_extra.is_empty();
        let bus = Bus::start_with("", Some(agent_extra)).await;
        wait_for_agents(&bus.base, "concat.reduce", 1).await;
        // Three fragments of 100 kB: each map output (the fragment upper-cased) is over the
        // inline limit, so it is kept in the blob store and named in its reduce's list.
        let pieces: Vec<Vec<u8>> = (0..3).map(|i| text(100_000 + i)).collect();
        let mut fragments = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let (status, v) = bus.put_blob(p.clone().into()).await;
            assert_eq!(status, 201, "{v}");
            assert_eq!(v["size"], p.len());
            fragments.push(serde_json::json!({
                "name": format!("p{i}"), "type": "text/plain",
                "sha256": v["sha256"], "size": v["size"],
            }));
        }
        let blobs_before = bus.metric("spine_blob_store_blobs").await;
        let submit = |fragments: Value| {
            let body = serde_json::json!({
                "capability": "text.upper", "reduce": "concat.reduce", "fan_in": 2,
                "fragments": fragments,
            });
            let http = bus.http.clone();
            let url = format!("{}/v1/jobs", bus.base);
            async move {
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                    .expect("the API answers");
                let status = r.status().as_u16();
                let bytes = r.bytes().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_slice::<Value>(&bytes).unwrap_or_default(),
                )
            }
        };
        let (status, v) = submit(Value::Array(fragments.clone())).await;
        assert_eq!(status, 202, "{v}");
        let job = bus.wait_final(v["id"].as_str().unwrap()).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["result"]["meta"]["fragments"], 3, "{job}");
        assert_eq!(job["result"]["meta"]["reduce_steps"], 3, "{job}");
        let (status, out) = bus
            .get(
                &format!("/v1/jobs/{}/output", v["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(status, 200);
        let want: Vec<u8> = pieces.concat().to_ascii_uppercase();
        assert!(
            out == want,
            "the reduced output is every fragment, upper-cased, in order"
        );
        // The fragments were not stored again: the new blobs are the outputs of the 3 map
        // and 3 reduce steps, less one (reduce r1.1 of the one fragment p2 has the same bytes
        // as map m2's output, stored once).
        assert_eq!(
            bus.metric("spine_blob_store_blobs").await,
            blobs_before + 5,
            "agent {agent_extra:?}"
        );
        let fetches = bus.metric("spine_blob_fetches_total").await;
        if http {
            // 3 fragments, 3 map outputs by the first level's reduces, 2 of their outputs
            // by the last.
            assert!(fetches >= 8, "fetched over HTTP: {fetches}");
        } else {
            assert_eq!(fetches, 0, "an agent without http_data fetches nothing");
        }

        // A blob the store does not hold, and a URL from a submitter, are refused.
        let mut missing = fragments.clone();
        missing[1]["sha256"] = Value::String("ab".repeat(32));
        let (status, v) = submit(Value::Array(missing)).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["field"], "input", "{v}");
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains("fragment 1 names blob abab"), "{v}");
        assert!(message.contains("PUT /v1/blobs"), "{v}");
        if http {
            // A text file split at line ends by the client (`spine submit --split-lines`),
            // one fragment uploaded at a time.
            let lines: Vec<u8> = (0..6000)
                .flat_map(|i| format!("line {i} {}\n", "x".repeat(i % 40)).into_bytes())
                .collect();
            let file = bus.data().join("lines.txt");
            std::fs::write(&file, &lines).unwrap();
            let client = spine_client::Client::new(&bus.base, None).unwrap();
            let split = client.put_file_split(&file, 40_000).await.unwrap();
            assert!(
                split.len() >= lines.len() / 40_000,
                "{} fragments",
                split.len()
            );
            assert_eq!(
                split.iter().map(|f| f.size()).sum::<u64>(),
                lines.len() as u64
            );
            assert!(split.iter().all(|f| f.size() <= 40_000));
            assert_eq!(split[1].name.as_deref(), Some("lines.txt:1"));
            let (status, v) = submit(serde_json::to_value(&split).unwrap()).await;
            assert_eq!(status, 202, "{v}");
            let id = v["id"].as_str().unwrap().to_owned();
            let job = bus.wait_final(&id).await;
            assert_eq!(job["state"], "succeeded", "{job}");
            let (_, out) = bus.get(&format!("/v1/jobs/{id}/output"), None).await;
            assert!(
                out == lines.to_ascii_uppercase(),
                "every line, once, in order"
            );
            // Each fragment but the last ends at a line end: no line was cut.
            let (_, m0) = bus.get(&format!("/v1/jobs/{id}.m0/output"), None).await;
            assert_eq!(m0.last(), Some(&b'\n'));
        }

        let mut with_url = fragments.clone();
        with_url[0]["url"] = Value::String(format!("{}/v1/blobs/x", bus.base));
        let (status, v) = submit(Value::Array(with_url)).await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("fragment 0 has a url"),
            "{v}"
        );
    }
}

/// Map/reduce data locality (PROTOCOL.md §13.5): two agents with `data_listen` keep their
/// map outputs and serve them; the reduce steps fetch them from the agent that kept them (or
/// read them from disk when it is the same agent). No map output enters the dispatcher's
/// blob store; the job's output is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_with_data_listen_keep_map_outputs_and_reduces_fetch_them_from_the_agents() {
    let bus = Bus::start_with("", None).await;
    let listen = "data_listen = \"127.0.0.1:0\"\n";
    let agents: Vec<Running> = (1..=2)
        .map(|n| test_agent(&bus.server, n, listen, &["text.upper", "concat.reduce"]))
        .collect();
    wait_for_agents(&bus.base, "concat.reduce", 2).await;
    // Six fragments of 100 kB: each map output (upper-cased) is over the inline limit.
    let pieces: Vec<Vec<u8>> = (0..6).map(|i| text(100_000 + i)).collect();
    let fragments = bus.fragments(&pieces).await;
    let blobs_before = bus.metric("spine_blob_store_blobs").await;
    let (status, v) = bus
        .submit_json(&serde_json::json!({
            "capability": "text.upper", "reduce": "concat.reduce", "fan_in": 2,
            "fragments": fragments,
        }))
        .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let job = bus.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, out) = bus.get(&format!("/v1/jobs/{id}/output"), None).await;
    assert_eq!(status, 200);
    assert!(
        out == pieces.concat().to_ascii_uppercase(),
        "every fragment, upper-cased, in order"
    );
    // Each map step's output is kept by the agent that made it, not served by the dispatcher.
    for i in 0..6 {
        let m = bus.job(&format!("{id}.m{i}")).await;
        let by = m["result"]["output_kept_by"].as_str().unwrap_or_default();
        assert!(
            by.starts_with("agent1@") || by.starts_with("agent2@"),
            "{m}"
        );
        let (status, body) = bus.get(&format!("/v1/jobs/{id}.m{i}/output"), None).await;
        assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    }
    // New blobs: the reduce outputs only (r1.0, r1.1, r1.2, r2.0, r3.0; r2.1 has the bytes of
    // r1.2), none of the six map outputs.
    assert_eq!(bus.metric("spine_blob_store_blobs").await, blobs_before + 5);
    for a in agents {
        a.stop();
    }
}

/// The agent keeping the map outputs dies before the reduce runs: the reduce cannot have
/// them, so the map steps run again (their outputs uploaded to the dispatcher this time) and
/// a new reduce step takes those. The job succeeds with the right output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_agent_keeping_map_outputs_dies_the_map_steps_run_again() {
    let bus = Bus::start_with("", None).await;
    let holder = test_agent(
        &bus.server,
        1,
        "data_listen = \"127.0.0.1:0\"\n",
        &["text.upper"],
    );
    wait_for_agents(&bus.base, "text.upper", 1).await;
    let pieces: Vec<Vec<u8>> = (0..3).map(|i| text(100_000 + i)).collect();
    let fragments = bus.fragments(&pieces).await;
    let (status, v) = bus
        .submit_json(&serde_json::json!({
            "capability": "text.upper", "reduce": "concat.reduce", "fragments": fragments,
            "wait_for_agent": true,
        }))
        .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    // The maps are done and kept by agent1; no agent offers the reduce yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..3 {
        loop {
            let m = bus.job(&format!("{id}.m{i}")).await;
            if m["state"] == "succeeded" {
                assert!(m["result"]["output_kept_by"].is_string(), "{m}");
                break;
            }
            assert!(Instant::now() < deadline, "map step {i} not done: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    holder.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = bus.get("/v1/agents?capability=text.upper", None).await;
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["agents"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "agent1 still listed: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = test_agent(&bus.server, 2, "", &["text.upper", "concat.reduce"]);
    let job = bus.wait_final(&id).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, out) = bus.get(&format!("/v1/jobs/{id}/output"), None).await;
    assert_eq!(status, 200);
    assert!(
        out == pieces.concat().to_ascii_uppercase(),
        "the right output after the loss"
    );
    let children: Vec<&str> = job["children"]
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for i in 0..3 {
        assert!(
            children
                .iter()
                .any(|c| c.starts_with(&format!("{id}.m{i}.x"))),
            "map step {i} made again: {children:?}"
        );
    }
    other.stop();
}
