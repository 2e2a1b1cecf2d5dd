//! Connection floods, password guessing and account enumeration against the embedded server,
//! with real sockets from several loopback addresses (127.0.0.x plays other machines).
//!
//! Before: 496 idle sockets filled `max_connections = 500` and a real user got `Connection
//! reset`; 22,725 wrong passwords for one account went through in 10 s, each a WARN line;
//! an unknown user's SCRAM salt was a slice of one server-wide salt, and a wrong PLAIN
//! password cost 0.50 ms for a known user against 0.03 ms for an unknown one.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use spine_integration::{connect_from, RawClient, TestServer};
use tokio::io::AsyncReadExt;

const ACCOUNTS: &[(&str, &str)] = &[("alice", "pw-a"), ("agent1", "pw-1")];
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn ip(last: u8) -> IpAddr {
    [127, 0, 0, last].into()
}

/// Whether the server closed `s` within `within` (EOF or reset), reading and dropping data.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_socket_flood_neither_locks_out_users_nor_lasts() {
    let server = TestServer::start_with(ACCOUNTS, |c| {
        c.max_connections = 500;
        c.auth_timeout = Duration::from_secs(2);
        c.login_timeout = Duration::from_secs(2);
    })
    .await;
    // 496 sockets that connect and say nothing, from one address.
    let mut flood = Vec::new();
    for _ in 0..496 {
        flood.push(connect_from(server.addr, ip(9)).await.expect("connect"));
    }
    // Past the per-address limit (32) the server closes them at once.
    let mut refused = 0;
    for s in flood.iter_mut().skip(32) {
        if closed_within(s, Duration::from_millis(500)).await {
            refused += 1;
        }
    }
    assert_eq!(
        refused,
        496 - 32,
        "every socket past the first 32 is refused"
    );
    assert_eq!(
        server.admission.refused_per_address.load(Ordering::Relaxed),
        464
    );
    // A real user from another address logs in meanwhile.
    let mut alice = RawClient::open_from(server.addr, "localhost", ip(10)).await;
    alice
        .send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
            B64.encode("\0alice\0pw-a")
        ))
        .await;
    alice.read_until("<success").await;
    // The 32 that were let in are closed at auth_timeout (2 s), not login_timeout's default
    // 30 s; and their address may connect again.
    let t0 = Instant::now();
    for s in flood.iter_mut().take(32) {
        assert!(closed_within(s, Duration::from_secs(5)).await);
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(flood);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = RawClient::open_from(server.addr, "localhost", ip(9)).await;
    assert!(again.buf.is_empty() || !again.buf.contains("stream:error"));
}

/// Sends one PLAIN attempt on a fresh stream from `from`; returns the server's answer.
async fn plain_attempt(server: &TestServer, from: IpAddr, user: &str, pw: &str) -> String {
    let mut c = RawClient::open_from(server.addr, "localhost", from).await;
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        B64.encode(format!("\0{user}\0{pw}"))
    ))
    .await;
    answer(&mut c).await
}

/// Reads until the SASL outcome (`<success` or the end of `<failure>`) or the connection's end.
async fn answer(c: &mut RawClient) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = std::mem::take(&mut c.buf);
    while !got.contains("<success") && !got.contains("</failure>") {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, c.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.push_str(&String::from_utf8_lossy(&chunk[..n])),
            Ok(_) => break,
            Err(_) => panic!("no SASL outcome within 10 s: {got}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_backs_off_per_address_and_slows_per_account() {
    let server = TestServer::start(ACCOUNTS).await;
    // 60 wrong passwords from one address, as fast as the server answers.
    let (mut wrong, mut throttled) = (0, 0);
    for i in 0..60 {
        let got = plain_attempt(&server, ip(20), "agent1", &format!("guess{i}")).await;
        if got.contains("temporary-auth-failure") {
            assert!(got.contains("try again in"), "{got}");
            throttled += 1;
        } else {
            assert!(got.contains("not-authorized"), "{got}");
            wrong += 1;
        }
    }
    // 5 failures, then refused unchecked for 1 s, 2 s, 4 s…: the 60 take a few seconds at
    // most, so only the first 5 (and one per expired backoff) are checked.
    assert!(wrong <= 8, "{wrong} passwords were checked");
    assert_eq!(wrong + throttled, 60);
    assert_eq!(
        server.admission.auth_throttled.load(Ordering::Relaxed),
        throttled as u64
    );
    // The owner, from its own address, logs in at once: the account is not locked.
    let t0 = Instant::now();
    let got = plain_attempt(&server, ip(21), "agent1", "pw-1").await;
    assert!(got.contains("<success"), "{got}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());

    // Guessing one account from many addresses: past 10 failures its answers slow down.
    for n in 0..12u8 {
        plain_attempt(&server, ip(30 + n), "alice", "nope").await;
    }
    assert!(server.admission.auth_delayed.load(Ordering::Relaxed) >= 2);
    let t0 = Instant::now();
    let got = plain_attempt(&server, ip(50), "alice", "nope").await;
    assert!(got.contains("not-authorized"), "{got}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "the 13th failure waits 250 ms × 2³: {:?}",
        t0.elapsed()
    );
}

/// The salt of a SCRAM-SHA-256 exchange for `user`: the `s=` of the server's first message.
async fn scram_salt(server: &TestServer, from: IpAddr, user: &str) -> (String, Duration) {
    let mut c = RawClient::open_from(server.addr, "localhost", from).await;
    let first = format!("n,,n={user},r=abcdefghijklmnop");
    let t0 = Instant::now();
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
        B64.encode(first)
    ))
    .await;
    c.read_until("<challenge").await;
    let data = c.read_until("</challenge>").await;
    let took = t0.elapsed();
    let b64 = data
        .trim_end_matches("</challenge>")
        .rsplit('>')
        .next()
        .unwrap_or_default()
        .to_owned();
    let text = String::from_utf8(B64.decode(b64.trim()).unwrap()).unwrap();
    let salt = text
        .split(',')
        .find_map(|p| p.strip_prefix("s="))
        .unwrap()
        .to_owned();
    (salt, took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_and_unknown_accounts_look_and_cost_the_same() {
    let server =
        TestServer::start_with(ACCOUNTS, |c| c.auth_failures_before_backoff = 10_000).await;
    // Unknown users get a salt of their own, stable across attempts, unrelated to others'.
    let (ghost1, _) = scram_salt(&server, ip(60), "ghost").await;
    let (ghost2, _) = scram_salt(&server, ip(60), "ghost").await;
    let (other, _) = scram_salt(&server, ip(60), "ghost2").await;
    let (real, _) = scram_salt(&server, ip(60), "alice").await;
    assert_eq!(ghost1, ghost2);
    assert_ne!(ghost1, other);
    for s in [&ghost1, &other, &real] {
        assert_eq!(B64.decode(s).unwrap().len(), 16, "salts are all 16 bytes");
    }

    // Costs, interleaved so that machine noise hits both alike; medians of 15.
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    let (mut known_plain, mut unknown_plain) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        known.push(scram_salt(&server, ip(61), "alice").await.1);
        unknown.push(scram_salt(&server, ip(61), "nobody").await.1);
        let t0 = Instant::now();
        plain_attempt(&server, ip(62), "alice", "wrong").await;
        known_plain.push(t0.elapsed());
        let t0 = Instant::now();
        plain_attempt(&server, ip(62), "nobody", "wrong").await;
        unknown_plain.push(t0.elapsed());
    }
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    let scram = ratio(median(unknown), median(known));
    let plain = ratio(median(unknown_plain), median(known_plain));
    println!("unknown/known: SCRAM first message {scram:.2}, wrong PLAIN password {plain:.2}");
    // Before: 0.47 ms / 0.03 ms ≈ 16 for SCRAM, 0.03 / 0.50 ≈ 0.06 for PLAIN.
    assert!(
        (0.33..3.0).contains(&scram),
        "SCRAM unknown/known = {scram:.2}"
    );
    assert!(
        (0.33..3.0).contains(&plain),
        "PLAIN unknown/known = {plain:.2}"
    );
}
