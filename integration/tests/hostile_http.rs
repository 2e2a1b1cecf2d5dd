//! Hostile clients against the dispatcher's HTTP API, over real sockets (security review,
//! issue 14): huge bodies without a token, half-sent headers and idle sockets, more
//! connections than allowed, more event streams than allowed, and a limited token looking at
//! what is not its own. Each test configures small limits, so it needs a few hundred sockets
//! at most and ends on its own within seconds; each prints the figures it measured.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use spine_dispatcher::DispatcherConfig;
use spine_integration::farm::Running;
use spine_integration::{TestServer, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d")];

/// Tokens of the tests: a web app limited to `work.*`, an operator, a metrics scraper.
const TOKENS: &str = "[[http_token]]\nname = \"web\"\ntoken = \"web-token-0123456789\"\ncapabilities = [\"work.*\"]\n\
[[http_token]]\nname = \"other\"\ntoken = \"other-token-0123456789\"\ncapabilities = [\"work.*\"]\n\
[[http_token]]\nname = \"ops\"\ntoken = \"ops-token-0123456789\"\ncapabilities = [\"*\"]\nall_jobs = true\n\
[[http_token]]\nname = \"scraper\"\ntoken = \"scraper-token-0123456789\"\ncapabilities = []\nmetrics = true\n";
const WEB: &str = "web-token-0123456789";
const OTHER: &str = "other-token-0123456789";
const OPS: &str = "ops-token-0123456789";
const SCRAPER: &str = "scraper-token-0123456789";

/// The embedded XMPP server and a dispatcher with the test tokens and its HTTP API on
/// `listen` (port 0); `top` is more top-level TOML. Dropping it stops both.
struct Bus {
    port: u16,
    dispatcher: Option<Running>,
    _server: TestServer,
    _dir: tempfile::TempDir,
}

impl Bus {
    /// Starts them and waits until the dispatcher answers `/healthz` on loopback (it serves
    /// HTTP once logged in).
    async fn start(listen: &str, top: &str) -> Bus {
        let server = TestServer::start(ACCOUNTS).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = DispatcherConfig::from_toml(&format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"{listen}\"\nno_agent_wait = \"60s\"\n{top}\n{TOKENS}",
            server.addr,
            dir.path().display()
        ))
        .expect("test dispatcher configuration");
        let d = spine_dispatcher::Dispatcher::bind(cfg)
            .await
            .expect("dispatcher binds");
        let port = d.http_addr().expect("HTTP API address").port();
        let running = Running::spawn(|rx| async move {
            if let Err(e) = d.run(rx).await {
                panic!("dispatcher failed: {e}");
            }
        });
        let deadline = Instant::now() + PATIENCE;
        while !matches!(
            call(local(port), "GET", "/healthz", None, "").await,
            Ok(Some((200, _)))
        ) {
            assert!(
                Instant::now() < deadline,
                "the dispatcher never answered /healthz"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Bus {
            port,
            dispatcher: Some(running),
            _server: server,
            _dir: dir,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if let Some(d) = self.dispatcher.take() {
            d.stop();
        }
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One request on a fresh connection (`Connection: close`): status and body, or `None` if the
/// connection closed without an answer. Panics after [`PATIENCE`].
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<Option<(u16, String)>> {
    let mut tcp = TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tcp.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nhost: spine\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    Ok(read_answer(&mut tcp, PATIENCE).await)
}

/// [`call`], which must be answered: status and body.
async fn answer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    match call(addr, method, path, token, body).await {
        Ok(Some(a)) => a,
        other => panic!("{method} {path}: no answer ({other:?})"),
    }
}

/// Reads one HTTP answer (head and a `content-length` body, or up to the close): status and
/// body; `None` if the connection closed first or nothing complete came `within`.
async fn read_answer(tcp: &mut TcpStream, within: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let status: u16 = text.split(' ').nth(1)?.parse().ok()?;
            let length = text[..end].lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if let Some(n) = length {
                if text.len() >= end + 4 + n {
                    return Some((status, text[end + 4..end + 4 + n].to_owned()));
                }
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                let text = String::from_utf8_lossy(&buf).into_owned();
                let (head, body) = text.split_once("\r\n\r\n")?;
                return Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()));
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return None,
        }
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Resident memory of this process (the dispatcher runs in it), from /proc.
fn rss() -> u64 {
    spine_integration::swarm::rss_of(std::process::id()).unwrap_or(0)
}

/// An address of this machine that is not loopback (the one its default route leaves from),
/// to connect as a client the dispatcher does not count as local; `None` without one.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    s.connect("198.51.100.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// Whether the server has closed `tcp` (EOF or reset), waiting at most `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {} // an answer (such as 408) before the close
            Err(_) => return false,
        }
    }
}

/// Finding 2: the token is checked from the headers, before the body is read; a declared
/// body over the limit is refused at once; so 20 unauthenticated 90 MB uploads cost the
/// dispatcher neither their bytes nor their memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_huge_uploads_are_refused_from_the_headers() {
    let bus = Bus::start("127.0.0.1:0", "").await;
    let port = bus.port;
    let addr = local(port);
    let head = |token: Option<&str>, length: u64| {
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!("POST /v1/jobs HTTP/1.1\r\nhost: spine\r\n{auth}content-type: application/json\r\ncontent-length: {length}\r\n\r\n")
    };

    // Only the headers sent: the answer comes at once, without waiting for the body.
    for (token, length, status, error) in [
        (None, 90_000_000, 401, "not-authorized"),
        (
            Some("wrong-token-0123456789"),
            90_000_000,
            401,
            "not-authorized",
        ),
        // Over 1.5 × max_blob (96 MiB) with a good token: 413 before reading.
        (Some(WEB), 200_000_000, 413, "too-large"),
    ] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head(token, length).as_bytes()).await.unwrap();
        let t = Instant::now();
        let (got, body) = read_answer(&mut tcp, Duration::from_secs(1))
            .await
            .unwrap_or_else(|| {
                panic!("no answer within 1 s to {length} declared bytes ({token:?})")
            });
        eprintln!(
            "headers only, content-length {length}, token {token:?}: {got} after {:?}",
            t.elapsed()
        );
        assert_eq!(got, status, "{body}");
        assert_eq!(json(&body)["error"], error, "{body}");
    }
    // Any other endpoint takes a small body only, even with a good token.
    let (got, body) = answer(addr, "GET", "/v1/jobs", Some(WEB), &"x".repeat(100_000)).await;
    assert_eq!(
        (got, json(&body)["error"].as_str()),
        (413, Some("too-large"))
    );

    // 20 unauthenticated uploads at once that do send their 90 MB: the dispatcher refuses
    // each from its headers; the socket buffers take a few MB, the dispatcher drops at most
    // 256 KiB more while it closes, and it never keeps any.
    let before = rss();
    let t = Instant::now();
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let head = head(None, 90_000_000);
        uploads.spawn(async move {
            let chunk = vec![b'A'; 1 << 20];
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(head.as_bytes()).await.unwrap();
            let mut sent = 0usize;
            let deadline = Instant::now() + Duration::from_secs(10);
            while sent < 90_000_000 {
                match tokio::time::timeout_at(deadline, tcp.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len(),
                    Ok(Err(_)) | Err(_) => break, // closed by the dispatcher (or not reading)
                }
            }
            sent
        });
    }
    let mut most = 0usize;
    while let Some(sent) = uploads.join_next().await {
        let sent = sent.unwrap();
        most = most.max(sent);
        assert!(
            sent < 32 << 20,
            "the dispatcher took {sent} bytes of an unauthenticated body"
        );
    }
    let after = rss();
    eprintln!(
        "20 unauthenticated 90 MB uploads at once, done in {:?}: at most {} KiB accepted by the sockets per upload; RSS {} -> {} MiB",
        t.elapsed(),
        most / 1024,
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (64 << 20),
        "RSS grew from {before} to {after} bytes"
    );
    // A well-behaved client sending a body over the limit gets the JSON 413 too (it reads the
    // answer that came before it finished sending).
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http
        .post(format!("http://{addr}/v1/jobs"))
        .bearer_auth(WEB)
        .header("content-type", "application/json")
        .body(vec![b'A'; 97 << 20])
        .send()
        .await
        .expect("an answer to an oversized body");
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(json(&r.text().await.unwrap())["error"], "too-large");
    // Still serving.
    let (got, _) = answer(addr, "GET", "/v1/jobs", Some(WEB), "").await;
    assert_eq!(got, 200);
}

/// Finding 3: half-sent headers and silent sockets are closed after `http_header_timeout`; a
/// request whose body stalls gets 408 after `http_request_timeout`; `/healthz` answers
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_headers_idle_sockets_and_stalled_bodies_are_timed_out() {
    let bus = Bus::start(
        "127.0.0.1:0",
        "http_header_timeout = \"1s\"\nhttp_request_timeout = \"2s\"\nhttp_max_connections = 400\n",
    )
    .await;
    let port = bus.port;
    let addr = local(port);
    // 100 half-sent headers and 100 sockets that send nothing.
    let mut conns = Vec::new();
    for i in 0..200 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            tcp.write_all(b"GET /v1/jobs HTTP/1.1\r\nhost: spine\r\nauthor")
                .await
                .unwrap();
        }
        conns.push(tcp);
    }
    let opened = Instant::now();
    // A request whose declared body never comes in full.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            format!("POST /v1/jobs HTTP/1.1\r\nhost: spine\r\nauthorization: Bearer {WEB}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"capab")
                .as_bytes(),
        )
        .await
        .unwrap();
    let stalled_at = Instant::now();
    let (got, _) = answer(addr, "GET", "/healthz", None, "").await;
    assert_eq!(got, 200);
    // Headers well over 64 KiB: refused (431), the connection's buffer bounded.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let long = format!(
        "GET /v1/jobs HTTP/1.1\r\nhost: spine\r\nx-filler: {}\r\n\r\n",
        "x".repeat(200 * 1024)
    );
    // The dispatcher may close before taking every byte.
    if big.write_all(long.as_bytes()).await.is_ok() {
        let got = read_answer(&mut big, PATIENCE).await;
        assert!(
            matches!(got, Some((431, _)) | None),
            "huge headers: {got:?}"
        );
    }

    let (status, body) = read_answer(&mut stalled, Duration::from_secs(5))
        .await
        .expect("an answer to the stalled upload within 5 s");
    eprintln!("stalled body: {status} after {:?}", stalled_at.elapsed());
    assert_eq!(status, 408, "{body}");
    assert_eq!(json(&body)["error"], "request-timeout");
    assert!(stalled_at.elapsed() >= Duration::from_millis(1900));

    let mut still_open = 0;
    for tcp in &mut conns {
        // Every one closed within the header timeout plus slack.
        if !closed_within(tcp, Duration::from_secs(5).saturating_sub(opened.elapsed())).await {
            still_open += 1;
        }
    }
    eprintln!(
        "200 half-sent or silent connections: {still_open} still open {:?} after they opened (header timeout 1 s)",
        opened.elapsed()
    );
    assert_eq!(
        still_open, 0,
        "connections left open past the header timeout"
    );
    let (got, _) = answer(addr, "GET", "/healthz", None, "").await;
    assert_eq!(got, 200);
}

/// Finding 3: at `http_max_connections` further connections get 503 (JSON) and are closed,
/// while the loopback reserve keeps `/healthz` and the local operator served; TCP_NODELAY is
/// set on the accepted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_but_loopback_keeps_its_reserve() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("skipped: this machine has no non-loopback address to connect from");
        return;
    };
    // Not loopback: tokens are required (and plain HTTP must be allowed, and a public URL
    // given), and clients connecting to `ip` are not local.
    let bus = Bus::start(
        "0.0.0.0:0",
        "http_max_connections = 40\nhttp_loopback_reserve = 8\nhttp_header_timeout = \"30s\"\n\
         http_allow_plaintext = true\npublic_url = \"http://spine.test\"\n",
    )
    .await;
    let port = bus.port;
    let remote = SocketAddr::new(ip, port);
    // 32 idle connections from the network: the most it takes from non-loopback clients.
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(TcpStream::connect(remote).await.unwrap());
    }
    // Until the accept loop has taken them all (each counts from its accept; on a busy
    // machine that can take longer than any fixed pause): the gauge counts them, and the
    // loopback connection that reads it.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (got, metrics) = answer(local(port), "GET", "/metrics", Some(OPS), "").await;
        assert_eq!(got, 200, "{metrics}");
        let open = metrics
            .lines()
            .find_map(|l| l.strip_prefix("spine_http_connections "))
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if open > 32 {
            break;
        }
        assert!(Instant::now() < deadline, "{open} connections taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let mut refused = 0;
    for _ in 0..10 {
        let mut tcp = TcpStream::connect(remote).await.unwrap();
        match read_answer(&mut tcp, Duration::from_secs(2)).await {
            Some((503, body)) => {
                assert_eq!(json(&body)["error"], "too-many-connections", "{body}");
                refused += 1;
            }
            other => panic!("connection over the limit got {other:?}"),
        }
    }
    eprintln!(
        "10 connections over the limit of 32 non-loopback ones: {refused} answered 503 in {:?}",
        t.elapsed()
    );
    // The local operator still gets in, twice at once even.
    let (got, _) = answer(local(port), "GET", "/healthz", None, "").await;
    assert_eq!(got, 200);
    let (got, body) = answer(local(port), "GET", "/v1/capabilities", Some(OPS), "").await;
    assert_eq!(got, 200, "{body}");
    // The accepted ones are served: a request on one of them is answered.
    let first = &mut held[0];
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: spine\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_answer(first, PATIENCE).await.expect("held connection");
    assert_eq!(got, 200);
    // Loopback may fill the reserve too, and then it is refused as well.
    let deadline = Instant::now() + PATIENCE;
    let mut local_held = Vec::new();
    loop {
        let mut tcp = TcpStream::connect(local(port)).await.unwrap();
        if let Some((503, _)) = read_answer(&mut tcp, Duration::from_millis(200)).await {
            break;
        }
        local_held.push(tcp);
        assert!(
            local_held.len() <= 8 && Instant::now() < deadline,
            "loopback got {} connections beyond the 32",
            local_held.len()
        );
    }
    eprintln!(
        "loopback got {} connections beyond the 32 (reserve 8) before a 503",
        local_held.len()
    );
    // (A loopback request just answered may still hold its place for a moment.)
    assert!(
        local_held.len() >= 6,
        "loopback got only {}",
        local_held.len()
    );
    // Once some are closed, room comes back.
    drop(held);
    drop(local_held);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(Some((200, _))) = call(remote, "GET", "/healthz", None, "").await {
            break;
        }
        assert!(Instant::now() < deadline, "no room after closing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, metrics) = answer(local(port), "GET", "/metrics", Some(OPS), "").await;
    assert!(
        metrics.contains("spine_http_connections_refused_total"),
        "{metrics}"
    );
}

/// Opens an event stream of `job` with `token`; returns the connection once the first event
/// arrived, or the refusal (status and body).
async fn open_stream(port: u16, token: &str, job: &str) -> Result<TcpStream, (u16, String)> {
    let mut tcp = TcpStream::connect(local(port)).await.unwrap();
    tcp.write_all(
        format!("GET /v1/jobs/{job}/events HTTP/1.1\r\nhost: spine\r\nauthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + PATIENCE;
    let mut buf = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if text.starts_with("HTTP/1.1 200") && text.contains("event: state") {
            return Ok(tcp);
        }
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\n{") && text.ends_with('}') {
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            return Err((
                head.split(' ').nth(1).unwrap().parse().unwrap(),
                body.into(),
            ));
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!("event stream: {other:?} after {text:?}"),
        }
    }
}

/// A queued job of `capability`, submitted with `token` (no agent offers the capability: it
/// waits `no_agent_wait`, as `wait_for_agent` asks).
async fn queued_job(port: u16, token: &str, capability: &str) -> String {
    let job = format!(r#"{{"capability": "{capability}", "wait_for_agent": true}}"#);
    let (got, body) = answer(local(port), "POST", "/v1/jobs", Some(token), &job).await;
    assert_eq!(got, 202, "{body}");
    json(&body)["id"].as_str().unwrap().to_owned()
}

/// Opens `n` event streams of `job` with `token`, which must all be accepted, then one more,
/// which must be refused: the open streams and the refusal.
async fn fill_streams(
    port: u16,
    token: &str,
    job: &str,
    n: usize,
) -> (Vec<TcpStream>, (u16, String)) {
    let mut open = Vec::new();
    for i in 0..n {
        match open_stream(port, token, job).await {
            Ok(s) => open.push(s),
            Err(e) => panic!("stream {i} of {token} refused within the limit: {e:?}"),
        }
    }
    match open_stream(port, token, job).await {
        Ok(_) => panic!("stream {n} of {token} accepted beyond the limit"),
        Err(refusal) => (open, refusal),
    }
}

/// Finding 3: event streams are bounded per token (429) and in all (503), each with a JSON
/// error, and a stream whose client left gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_limited_per_token_and_in_all() {
    let bus = Bus::start(
        "127.0.0.1:0",
        "http_max_event_streams = 6\nhttp_max_event_streams_per_token = 4\n",
    )
    .await;
    let port = bus.port;
    let (web_job, other_job) = (
        queued_job(port, WEB, "work.nobody").await,
        queued_job(port, OTHER, "work.nobody").await,
    );
    let (mut web, (status, body)) = fill_streams(port, WEB, &web_job, 4).await;
    eprintln!("fifth stream of one token: {status} {body}");
    assert_eq!(status, 429);
    assert_eq!(json(&body)["error"], "too-many-streams");
    let (mut other, (status, body)) = fill_streams(port, OTHER, &other_job, 2).await;
    eprintln!("seventh stream in all: {status} {body}");
    assert_eq!(status, 503);
    assert_eq!(json(&body)["error"], "too-many-streams");
    // A client leaves: its stream ends and its place is free again.
    drop(web.pop());
    let deadline = Instant::now() + PATIENCE;
    loop {
        match open_stream(port, OTHER, &other_job).await {
            Ok(s) => {
                other.push(s);
                break;
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the closed stream kept its place"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Finding 13: a limited token sees only its own capabilities and no metrics; an operator
/// token and a metrics token read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_token_sees_only_its_capabilities_and_no_metrics() {
    let bus = Bus::start("127.0.0.1:0", "").await;
    let port = bus.port;
    queued_job(port, WEB, "work.nobody").await;
    queued_job(port, OPS, "payroll.run").await;
    let names = |token: &'static str| async move {
        let (got, body) = answer(local(port), "GET", "/v1/capabilities", Some(token), "").await;
        assert_eq!(got, 200, "{body}");
        let mut v: Vec<String> = json(&body)["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(WEB).await, ["work.nobody"]);
    assert_eq!(names(OPS).await, ["payroll.run", "work.nobody"]);
    assert!(names(SCRAPER).await.is_empty());

    for (token, status) in [(WEB, 403), (OTHER, 403), (OPS, 200), (SCRAPER, 200)] {
        let (got, body) = answer(local(port), "GET", "/metrics", Some(token), "").await;
        assert_eq!(got, status, "{token}: {body}");
        if status == 200 {
            assert!(
                body.contains("spine_queue_depth{capability=\"payroll.run\"}"),
                "{body}"
            );
            assert!(body.contains("spine_http_connections "), "{body}");
        } else {
            assert_eq!(json(&body)["error"], "not-authorized");
        }
    }
    // The scraper's token runs nothing.
    let (got, _) = answer(
        local(port),
        "POST",
        "/v1/jobs",
        Some(SCRAPER),
        r#"{"capability": "work.nobody"}"#,
    )
    .await;
    assert_eq!(got, 403);
}
