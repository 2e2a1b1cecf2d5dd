//! The embedded XMPP server against real clients on loopback: tokio-xmpp clients over
//! STARTTLS + SCRAM, and a hand-driven raw client for hostile input.

use std::time::{Duration, Instant};

use jid::Jid;
use spine_integration::{expect_stanza, RawClient, TestServer, PATIENCE};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Lang, Message, MessageType};
use xmpp_parsers::ping::Ping;
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::stanza_error::DefinedCondition;
use xmpp_parsers::version::{VersionQuery, VersionResult};

const USERS: &[(&str, &str)] = &[
    ("alice", "pw-alice"),
    ("bob", "pw-bob"),
    ("carol", "pw-carol"),
];

#[tokio::test]
async fn two_clients_exchange_iq_message_and_directed_presence_over_starttls_scram() {
    let server = TestServer::start(USERS).await;
    let mut alice = server.client("alice", "pw-alice").await;
    let mut bob = server.client("bob", "pw-bob").await;
    let (a, b): (Jid, Jid) = (alice.jid().clone().into(), bob.jid().clone().into());
    assert_eq!(a.to_bare().as_str(), "alice@localhost");

    // IQ: alice asks bob, bob answers, alice gets the answer with bob's full JID as sender.
    alice
        .send(Iq::from_get("v1", VersionQuery).with_to(b.clone()))
        .await;
    let (id, from) = expect_stanza(&mut bob, "version request", |st| match st {
        Stanza::Iq(Iq::Get { id, from, .. }) => Some((id, from)),
        _ => None,
    })
    .await;
    assert_eq!(
        from.as_ref(),
        Some(&a),
        "server stamps the sender's full JID"
    );
    let answer = VersionResult {
        name: "bob".into(),
        version: "1".into(),
        os: None,
    };
    bob.send(Iq::from_result(id, Some(answer)).with_to(a.clone()))
        .await;
    let got = expect_stanza(&mut alice, "version result", |st| match st {
        Stanza::Iq(Iq::Result {
            id,
            from,
            payload: Some(p),
            ..
        }) if id == "v1" => Some((from, VersionResult::try_from(p).ok())),
        _ => None,
    })
    .await;
    assert_eq!(got.0.as_ref(), Some(&b));
    assert_eq!(got.1.map(|v| v.name), Some("bob".to_owned()));

    // Message to the bare JID reaches bob's available resource.
    let mut m = Message::new(Some(Jid::from(b.to_bare())));
    m.type_ = MessageType::Chat;
    m.bodies.insert(Lang::default(), "hello bob".to_owned());
    alice.send(m).await;
    let body = expect_stanza(&mut bob, "message", |st| match st {
        Stanza::Message(m) if m.type_ == MessageType::Chat => m
            .bodies
            .values()
            .next()
            .map(|b| (b.clone(), m.from.clone())),
        _ => None,
    })
    .await;
    assert_eq!(body, ("hello bob".to_owned(), Some(a.clone())));

    // Directed presence.
    let mut p = Presence::available().with_to(b.clone());
    p.set_status("en", "busy");
    alice.send(p).await;
    let from = expect_stanza(&mut bob, "directed presence", |st| match st {
        Stanza::Presence(p)
            if p.type_ == PresenceType::None
                && p.statuses.get("en").map(String::as_str) == Some("busy") =>
        {
            Some(p.from)
        }
        _ => None,
    })
    .await;
    assert_eq!(from, Some(a));
}

#[tokio::test]
async fn scram_plus_with_tls_exporter_binding_logs_in() {
    let server = TestServer::start(USERS).await;
    let mut opts = server.tls_options("carol", "pw-carol");
    opts.security = spine_xmpp::Security::StartTls {
        trust: spine_xmpp::Trust::Pem(server.cert_pem.clone()),
        channel_binding: true,
    };
    let c = spine_xmpp::connect(opts)
        .await
        .expect("SCRAM-SHA-256-PLUS login");
    assert_eq!(c.jid().to_bare().as_str(), "carol@localhost");
}

#[tokio::test]
async fn wrong_password_is_a_clear_error_not_a_retry_loop() {
    let server = TestServer::start(USERS).await;
    let started = Instant::now();
    let err = match spine_xmpp::connect(server.tls_options("alice", "wrong")).await {
        Err(e) => e,
        Ok(_) => panic!("login with a wrong password succeeded"),
    };
    assert!(
        matches!(err, spine_xmpp::ConnectError::Auth { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("NotAuthorized"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let err = match spine_xmpp::connect(server.tls_options("mallory", "pw")).await {
        Err(e) => e,
        Ok(_) => panic!("unknown user logged in"),
    };
    assert!(
        matches!(err, spine_xmpp::ConnectError::Auth { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn abrupt_disconnect_sends_unavailable_to_directed_presence_recipients() {
    let server = TestServer::start(USERS).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let bob_jid = bob.jid().to_string();
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "agent").await;
    raw.send(&format!("<presence to='{bob_jid}'/>")).await;
    expect_stanza(&mut bob, "alice's directed presence", |st| match st {
        Stanza::Presence(p)
            if p.type_ == PresenceType::None
                && p.from.as_ref().map(|f| f.as_str()) == Some("alice@localhost/agent") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    // Drop the socket: no </stream:stream>, no unavailable from the client.
    drop(raw);
    let t0 = Instant::now();
    expect_stanza(&mut bob, "unavailable after the drop", |st| match st {
        Stanza::Presence(p)
            if p.type_ == PresenceType::Unavailable
                && p.from.as_ref().map(|f| f.as_str()) == Some("alice@localhost/agent") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "unavailable took {took:?}");
}

#[tokio::test]
async fn directed_presence_to_a_bare_jid_gets_unavailable_too() {
    let server = TestServer::start(USERS).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "agent").await;
    raw.send("<presence to='bob@localhost'><status>hi</status></presence>")
        .await;
    expect_stanza(&mut bob, "presence to bare JID", |st| match st {
        Stanza::Presence(p)
            if p.type_ == PresenceType::None
                && p.from.as_ref().map(|f| f.as_str()) == Some("alice@localhost/agent") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    raw.send("</stream:stream>").await;
    expect_stanza(&mut bob, "unavailable", |st| match st {
        Stanza::Presence(p) if p.type_ == PresenceType::Unavailable => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test]
async fn iq_to_offline_full_jid_and_to_bare_jid_get_service_unavailable() {
    let server = TestServer::start(USERS).await;
    let mut alice = server.client("alice", "pw-alice").await;
    let offline: Jid = "bob@localhost/gone".parse().unwrap();
    alice
        .send(Iq::from_get("q1", Ping).with_to(offline.clone()))
        .await;
    let (from, cond) = expect_stanza(&mut alice, "error for the offline JID", |st| match st {
        Stanza::Iq(Iq::Error {
            id, from, error, ..
        }) if id == "q1" => Some((from, error.defined_condition)),
        _ => None,
    })
    .await;
    assert_eq!(cond, DefinedCondition::ServiceUnavailable);
    assert_eq!(
        from,
        Some(offline),
        "error comes from the address asked (slixmpp matches on it)"
    );

    alice
        .send(Iq::from_get("q2", Ping).with_to("bob@localhost".parse::<Jid>().unwrap()))
        .await;
    let cond = expect_stanza(&mut alice, "error for the bare JID", |st| match st {
        Stanza::Iq(Iq::Error { id, error, .. }) if id == "q2" => Some(error.defined_condition),
        _ => None,
    })
    .await;
    assert_eq!(cond, DefinedCondition::ServiceUnavailable);

    alice
        .send(Iq::from_get("q3", Ping).with_to("x@elsewhere.example".parse::<Jid>().unwrap()))
        .await;
    let cond = expect_stanza(&mut alice, "error for a foreign domain", |st| match st {
        Stanza::Iq(Iq::Error { id, error, .. }) if id == "q3" => Some(error.defined_condition),
        _ => None,
    })
    .await;
    assert_eq!(cond, DefinedCondition::RemoteServerNotFound);
}

#[tokio::test]
async fn spoofed_from_is_rewritten() {
    let server = TestServer::start(USERS).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let bob_jid = bob.jid().to_string();
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "r1").await;
    raw.send(&format!("<message from='admin@localhost/console' to='{bob_jid}' type='chat'><body>trust me</body></message>")).await;
    let from = expect_stanza(&mut bob, "spoofed message", |st| match st {
        Stanza::Message(m) if m.bodies.values().next().map(String::as_str) == Some("trust me") => {
            Some(m.from)
        }
        _ => None,
    })
    .await;
    assert_eq!(
        from.map(|f| f.to_string()).as_deref(),
        Some("alice@localhost/r1")
    );
}

#[tokio::test]
async fn oversized_stanza_gets_policy_violation_and_others_keep_working() {
    let server = TestServer::start_with(USERS, |c| c.max_stanza_size = bytesize_kib(64)).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let bob_jid = bob.jid().to_string();
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "big").await;
    let big = "x".repeat(200 * 1024);
    raw.send(&format!(
        "<message to='{bob_jid}'><body>{big}</body></message>"
    ))
    .await;
    let closing = raw.read_to_close().await;
    assert!(
        closing.contains("policy-violation"),
        "got: {}",
        &closing[..closing.len().min(500)]
    );
    assert!(
        closing.contains("</stream:stream>"),
        "stream closed properly: {}",
        &closing[..closing.len().min(500)]
    );
    assert_server_serves(&mut bob).await;
}

fn bytesize_kib(n: u64) -> bytesize_compat::ByteSize {
    bytesize_compat::ByteSize::kib(n)
}
mod bytesize_compat {
    pub use spine_server::config::ByteSize;
}

/// The server reads a bound session's stream with its own reader, taking over from the one
/// that negotiated it: what a client sent right behind its bind request (before the answer)
/// is read, relayed and answered all the same.
#[tokio::test]
async fn stanzas_sent_before_the_bind_answer_are_not_lost() {
    let server = TestServer::start(USERS).await;
    let mut bob = RawClient::login(server.addr, &server.domain, "bob", "pw-bob", "b").await;
    let early = format!(
        "<message to='bob@{d}/b' id='m1'><x xmlns='urn:t'>early</x></message>\
         <iq type='get' id='p1' to='{d}'><ping xmlns='urn:xmpp:ping'/></iq>",
        d = server.domain
    );
    let mut alice = RawClient::login_sending(
        server.addr,
        &server.domain,
        "alice",
        "pw-alice",
        "early",
        &early,
    )
    .await;
    let got = bob.read_until("</message>").await;
    assert!(got.contains("early"), "bob got: {got}");
    assert!(
        got.contains(&format!("from='alice@{}/early'", server.domain)),
        "stamped with alice's full JID: {got}"
    );
    let pong = alice.read_iq("p1").await;
    assert!(pong.contains("type='result'"), "{pong}");
}

#[tokio::test]
async fn garbage_gets_a_stream_error_and_others_keep_working() {
    let server = TestServer::start(USERS).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "junk").await;
    raw.send("<<<\u{1}not xml at all&&&>").await;
    let closing = raw.read_to_close().await;
    assert!(closing.contains("not-well-formed"), "got: {closing}");
    // A billion-laughs attempt never gets expanded: DTDs are refused outright.
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "dtd").await;
    raw.send(
        "<!DOCTYPE lol [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><message>&lol2;</message>",
    )
    .await;
    let closing = raw.read_to_close().await;
    assert!(closing.contains("not-well-formed"), "got: {closing}");
    assert!(
        !closing.contains("lollol"),
        "an entity was expanded: {closing}"
    );
    assert_server_serves(&mut bob).await;
}

#[tokio::test]
async fn invalid_stanza_gets_bad_request_and_the_stream_stays_open() {
    let server = TestServer::start(USERS).await;
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "r").await;
    // An IQ get must carry exactly one payload; this one carries none.
    raw.send("<iq type='get' id='bad1' to='bob@localhost/x'/>")
        .await;
    let reply = raw.read_iq("bad1").await;
    assert!(
        reply.contains("bad-request") && reply.contains("bad1"),
        "got: {reply}"
    );
    raw.send("<iq type='get' id='ok1'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let reply = raw.read_until("ok1").await;
    assert!(reply.contains("result"), "got: {reply}");
}

#[tokio::test]
async fn same_full_jid_twice_newer_wins_older_gets_conflict() {
    let server = TestServer::start(USERS).await;
    let mut first = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "dup").await;
    let _second = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "dup").await;
    let closing = first.read_to_close().await;
    assert!(closing.contains("conflict"), "got: {closing}");
}

#[tokio::test]
async fn server_answers_ping_disco_and_roster() {
    let server = TestServer::start(USERS).await;
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "r").await;
    raw.send("<iq type='get' id='p1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert!(raw.read_iq("p1").await.contains("result"));
    raw.send("<iq type='get' id='d1' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let disco = raw.read_iq("d1").await;
    assert!(
        disco.contains("category='server'") || disco.contains("category=\"server\""),
        "{disco}"
    );
    assert!(disco.contains("urn:xmpp:ping"), "{disco}");
    raw.send("<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let roster = raw.read_iq("r1").await;
    assert!(
        roster.contains("r1") && roster.contains("result") && roster.contains("jabber:iq:roster"),
        "{roster}"
    );
    raw.send("<iq type='get' id='v1' to='localhost'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    let version = raw.read_iq("v1").await;
    assert!(
        version.contains("v1") && version.contains("service-unavailable"),
        "{version}"
    );
}

#[tokio::test]
async fn broadcast_presence_reaches_the_accounts_own_resources() {
    let server = TestServer::start(USERS).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let _other = RawClient::login(server.addr, &server.domain, "bob", "pw-bob", "second").await;
    let from = expect_stanza(
        &mut bob,
        "presence of bob's other resource",
        |st| match st {
            Stanza::Presence(p)
                if p.type_ == PresenceType::None
                    && p.from.as_ref().map(|f| f.as_str()) == Some("bob@localhost/second") =>
            {
                Some(p.from)
            }
            _ => None,
        },
    )
    .await;
    assert!(from.is_some());
}

#[tokio::test]
async fn shutdown_closes_every_stream_with_system_shutdown() {
    let server = TestServer::start(USERS).await;
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "r").await;
    let addr = server.addr;
    server.stop().await;
    let closing = raw.read_to_close().await;
    assert!(closing.contains("system-shutdown"), "got: {closing}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn plain_tcp_login_works_on_loopback() {
    let server = TestServer::start(USERS).await;
    let opts = spine_xmpp::ConnectOptions::new(
        "bob@localhost".parse().unwrap(),
        "pw-bob",
        server.addr,
        spine_xmpp::Security::Plain { insecure: false },
    );
    let c = spine_xmpp::connect(opts)
        .await
        .expect("plain login on loopback");
    assert_eq!(c.jid().to_bare().as_str(), "bob@localhost");
}

/// The server still routes for `client`: a ping to the server comes back.
async fn assert_server_serves(client: &mut spine_xmpp::Connection) {
    let id = format!("alive-{}", rand_id());
    client
        .send(Iq::from_get(id.clone(), Ping).with_to("localhost".parse::<Jid>().unwrap()))
        .await;
    let deadline = PATIENCE;
    let ok = tokio::time::timeout(
        deadline,
        expect_stanza(client, "ping result", |st| match st {
            Stanza::Iq(Iq::Result { id: got, .. }) if got == id => Some(()),
            _ => None,
        }),
    )
    .await;
    assert!(ok.is_ok(), "server stopped serving other clients");
}

fn rand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The round-trip benchmark at tiny size, so it cannot rot (the real run is `xmpp-bench`).
#[tokio::test]
async fn roundtrip_benchmark_smoke() {
    let server = TestServer::start(&[("bench-a", "pw-a"), ("bench-b", "pw-b")]).await;
    let b = server.client("bench-b", "pw-b").await;
    let to: Jid = b.jid().clone().into();
    tokio::spawn(spine_integration::bench::responder(b));
    let mut a = server.client("bench-a", "pw-a").await;
    let seq = spine_integration::bench::measure(&mut a, &to, 50, 1)
        .await
        .expect("sequential");
    let par = spine_integration::bench::measure(&mut a, &to, 200, 64)
        .await
        .expect("windowed");
    assert_eq!((seq.n, par.n), (50, 200));
    assert!(seq.p50 <= seq.p99 && par.p50 <= par.p99);
    assert!(seq.per_sec > 0.0 && par.per_sec > 0.0);
}

#[tokio::test]
async fn idle_client_is_pinged_then_disconnected_with_unavailable_sent() {
    let server = TestServer::start_with(USERS, |c| {
        c.idle_timeout = Duration::from_millis(300);
        c.ping_timeout = Duration::from_millis(400);
    })
    .await;
    let mut bob = server.client("bob", "pw-bob").await;
    let bob_jid = bob.jid().to_string();
    let mut raw =
        RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "sleepy").await;
    raw.send(&format!("<presence to='{bob_jid}'/>")).await;
    let ping = raw.read_until("urn:xmpp:ping").await;
    assert!(
        ping.contains("type='get'") || ping.contains("type=\"get\""),
        "{ping}"
    );
    // Never answer: the server must give up and tell bob.
    let t0 = Instant::now();
    expect_stanza(
        &mut bob,
        "unavailable of the silent client",
        |st| match st {
            Stanza::Presence(p)
                if p.type_ == PresenceType::Unavailable
                    && p.from.as_ref().map(|f| f.as_str()) == Some("alice@localhost/sleepy") =>
            {
                Some(())
            }
            _ => None,
        },
    )
    .await;
    assert!(t0.elapsed() < PATIENCE);
    let rest = raw.read_to_close().await;
    assert!(!rest.contains("<message"), "{rest}");
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let server = TestServer::start_with(USERS, |c| {
        c.idle_timeout = Duration::from_millis(200);
        c.ping_timeout = Duration::from_millis(400);
    })
    .await;
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "awake").await;
    for _ in 0..3 {
        let ping = raw.read_until("urn:xmpp:ping").await;
        let id = ping
            .rsplit("id='")
            .next()
            .and_then(|s| s.split('\'').next())
            .map(str::to_owned)
            .or_else(|| {
                ping.rsplit("id=\"")
                    .next()
                    .and_then(|s| s.split('"').next())
                    .map(str::to_owned)
            })
            .expect("ping id");
        raw.send(&format!("<iq type='result' id='{id}' to='localhost'/>"))
            .await;
    }
    raw.send("<iq type='get' id='still'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert!(raw.read_until("still").await.contains("iq"));
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_others_unaffected() {
    let server = TestServer::start_with(USERS, |c| c.max_connections = 2).await;
    let mut bob = server.client("bob", "pw-bob").await;
    let _alice = RawClient::login(server.addr, &server.domain, "alice", "pw-alice", "one").await;
    let mut third = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("tcp connect");
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, third.read(&mut buf))
        .await
        .expect("refused at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed without a stream");
    assert_server_serves(&mut bob).await;
}
