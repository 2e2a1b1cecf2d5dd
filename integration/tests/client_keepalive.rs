//! The client's keepalive and backpressure (`spine_xmpp`): a quiet but live server keeps the
//! session; a server that stops answering is given up after the read and response timeouts,
//! and the client logs in again; an owner that falls behind keeps its session and loses
//! nothing, and what was read before a session ends is delivered before `Suspended`. Between the client and the embedded server sits a TCP relay on loopback
//! that can stop passing bytes on the connections it carries (a dead peer whose socket stays
//! open), while passing those made afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spine_integration::{TestServer, PATIENCE};
use spine_xmpp::stanzastream::{Event, StreamEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_xmpp::xmlstream::Timeouts;

/// A relay that can freeze the connections it carries so far.
struct Relay {
    addr: SocketAddr,
    carried: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let carried: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let list = carried.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                list.lock().expect("lock").push(frozen.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pass(cr, sw, frozen.clone()));
                tokio::spawn(pass(sr, cw, frozen));
            }
        });
        Relay { addr, carried }
    }

    /// Stops passing bytes either way on every connection carried so far.
    fn freeze(&self) {
        for f in self.carried.lock().expect("lock").iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` until either ends; while `frozen`, holds what it read.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The next stream event within `within`, skipping stanzas (the keepalive's answers among
/// them); `None` if none came.
async fn next_stream_event(
    c: &mut spine_xmpp::Connection,
    within: Duration,
) -> Option<StreamEvent> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, c.next()).await {
            Ok(Some(Event::Stream(ev))) => return Some(ev),
            Ok(Some(Event::Stanza(_))) => continue,
            Ok(None) => panic!("the connection ended"),
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_quiet_server_keeps_the_session_and_a_dead_one_is_left_for_a_new_login() {
    let server = TestServer::start(&[("alice", "pw-alice")]).await;
    let relay = Relay::start(server.addr).await;
    let mut opts = server.tls_options("alice", "pw-alice");
    opts.addr = relay.addr;
    opts.timeouts = Timeouts {
        read_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_millis(500),
    };
    let mut c = spine_xmpp::connect(opts).await.expect("login");
    let first = c.jid().clone();

    // Nothing to read for five times the read timeout: the client's pings are answered and
    // the session stays.
    if let Some(ev) = next_stream_event(&mut c, Duration::from_millis(2500)).await {
        panic!("a live server's session was dropped: {ev:?}");
    }
    assert_eq!(c.jid(), &first);

    // The relay stops passing bytes: no answer to the next ping, so the client gives the
    // session up (after the read and response timeouts, 1 s here) and logs in again through
    // a new connection.
    relay.freeze();
    match next_stream_event(&mut c, PATIENCE).await {
        Some(StreamEvent::Suspended) => {}
        other => panic!("expected the session suspended, got {other:?}"),
    }
    match next_stream_event(&mut c, PATIENCE).await {
        Some(StreamEvent::Reset { bound_jid, .. }) => {
            assert_eq!(bound_jid.to_bare(), first.to_bare());
        }
        other => panic!("expected a new session, got {other:?}"),
    }
    c.close().await;
}

/// Messages bob sends to alice in the tests of backpressure.
const FLOOD: usize = 2000;

/// A server, alice (with `timeouts`) and bob, and `FLOOD` numbered messages from bob to
/// alice, none taken by alice yet.
async fn flooded(
    timeouts: Timeouts,
) -> (TestServer, spine_xmpp::Connection, spine_xmpp::Connection) {
    use tokio_xmpp::parsers::message::Message;
    let server = TestServer::start(&[("alice", "pw-alice"), ("bob", "pw-bob")]).await;
    let mut opts = server.tls_options("alice", "pw-alice");
    opts.timeouts = timeouts;
    let alice = spine_xmpp::connect(opts).await.expect("alice logs in");
    let bob = spine_xmpp::connect(server.tls_options("bob", "pw-bob"))
        .await
        .expect("bob logs in");
    let to = alice.jid().clone();
    for i in 0..FLOOD {
        bob.send(
            Message::new(Some(to.clone().into())).with_body(String::new().into(), i.to_string()),
        )
        .await;
    }
    (server, alice, bob)
}

/// Alice's next event: `Ok(())` for the message numbered `next`, `Err` for a stream event.
async fn next_message(alice: &mut spine_xmpp::Connection, next: usize) -> Result<(), StreamEvent> {
    use tokio_xmpp::Stanza;
    loop {
        match tokio::time::timeout(PATIENCE, alice.next()).await {
            Ok(Some(Event::Stanza(Stanza::Message(m)))) => {
                let body = m.bodies.values().next().expect("a body");
                assert_eq!(body, &next.to_string(), "messages out of order");
                return Ok(());
            }
            Ok(Some(Event::Stanza(_))) => {}
            Ok(Some(Event::Stream(ev))) => return Err(ev),
            Ok(None) => panic!("the connection ended after {next} messages"),
            Err(_) => panic!("nothing after {next} of {FLOOD} messages"),
        }
    }
}

/// An owner that stops taking events stops the client's reading (the server then holds what
/// waits for it), and that silence is not taken for a dead server: after a pause of three
/// times the read and response timeouts every message arrives, in order, on the same session.
#[tokio::test]
async fn an_owner_that_falls_behind_keeps_its_session_and_loses_nothing() {
    let (_server, mut alice, bob) = flooded(Timeouts {
        read_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
    })
    .await;
    let me = alice.jid().clone();
    // More than both of alice's queues hold, and nothing taken for 1.8 s.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    for next in 0..FLOOD {
        if let Err(ev) = next_message(&mut alice, next).await {
            panic!("after {next} messages the session changed: {ev:?}");
        }
    }
    assert_eq!(alice.jid(), &me);
    bob.close().await;
    alice.close().await;
}

/// What the client had read when its session ends is still delivered, before `Suspended`:
/// here the session is replaced (stream error `conflict`) while 2,000 messages wait unread.
#[tokio::test]
async fn what_was_read_before_a_session_ends_is_delivered_before_suspended() {
    let (server, mut alice, bob) = flooded(Timeouts::tight()).await;
    // The server has written them all to alice's connection; alice has taken none.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut opts = server.tls_options("alice", "pw-alice");
    opts.jid = alice.jid().clone().into();
    let usurper = spine_xmpp::connect(opts)
        .await
        .expect("the same resource logs in");
    let mut next = 0usize;
    loop {
        match next_message(&mut alice, next).await {
            Ok(()) => next += 1,
            Err(StreamEvent::Suspended) => break,
            Err(ev) => panic!("after {next} messages: {ev:?}"),
        }
    }
    assert_eq!(
        next, FLOOD,
        "messages read before the session ended were lost"
    );
    usurper.close().await;
    bob.close().await;
    alice.close().await;
}
