//! A fake XMPP server against Spine's client (what agents, the dispatcher and the CLI log in
//! with). Before: an agent pointed at `127.0.0.2` with TLS `auto` sent its password with
//! PLAIN over plain TCP, and accepted a `<success/>` from a server that did not know the
//! password. Now PLAIN needs TLS (or `insecure-plain`), and SCRAM's server signature is checked.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use spine_xmpp::{ConnectError, ConnectOptions, Security};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Reads from `s` into `seen` until `needle` appears after `from`; false on close or timeout.
async fn read_until(s: &mut TcpStream, seen: &mut String, from: usize, needle: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen[from..].contains(needle) {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => return false,
        }
    }
    true
}

/// A one-connection fake server on `ip` offering `mechanisms`; for SCRAM-SHA-1 it answers
/// with a challenge and then a `<success/>` whose server signature is made up. Returns its
/// address and, when the client is done, everything the client sent.
async fn fake_server(
    ip: &str,
    mechanisms: &[&str],
) -> (SocketAddr, tokio::task::JoinHandle<String>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let mechs: String = mechanisms
        .iter()
        .map(|m| format!("<mechanism>{m}</mechanism>"))
        .collect();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut seen = String::new();
        if !read_until(&mut s, &mut seen, 0, "version='1.0'>").await {
            return seen;
        }
        let header = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='localhost' id='fake' version='1.0'>";
        let features = format!("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{mechs}</mechanisms></stream:features>");
        s.write_all(format!("{header}{features}").as_bytes())
            .await
            .unwrap();
        let at = seen.len();
        if !read_until(&mut s, &mut seen, at, "</auth>").await {
            return seen;
        }
        if seen.contains("SCRAM-SHA-1") {
            // client-first-message: n,,n=user,r=NONCE
            let data = seen[at..]
                .split('>')
                .nth(1)
                .and_then(|t| t.split('<').next())
                .unwrap_or_default();
            let first = String::from_utf8(B64.decode(data).unwrap_or_default()).unwrap_or_default();
            let nonce = first.split("r=").nth(1).unwrap_or_default().to_owned();
            let challenge = format!("r={nonce}fake,s={},i=4096", B64.encode(b"salt-of-no-one"));
            s.write_all(
                format!(
                    "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</challenge>",
                    B64.encode(challenge)
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let at = seen.len();
            if read_until(&mut s, &mut seen, at, "</response>").await {
                let bogus = B64.encode(format!("v={}", B64.encode([0u8; 20])));
                s.write_all(
                    format!("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{bogus}</success>")
                        .as_bytes(),
                )
                .await
                .unwrap();
            }
        }
        // Whatever else the client sends until it gives up.
        let at = seen.len();
        read_until(&mut s, &mut seen, at, "never sent").await;
        seen
    });
    (addr, task)
}

fn options(addr: SocketAddr, security: Security) -> ConnectOptions {
    ConnectOptions::new(
        "agent1@localhost".parse().unwrap(),
        "secret-password",
        addr,
        security,
    )
}

#[tokio::test]
async fn plain_tcp_never_sends_plain_or_accepts_a_server_that_does_not_know_the_password() {
    let secret = B64.encode("\0agent1\0secret-password");

    // A fake server on another loopback address offering only PLAIN (and ANONYMOUS).
    let (addr, task) = fake_server("127.0.0.2", &["PLAIN", "ANONYMOUS"]).await;
    let err = spine_xmpp::connect(options(addr, Security::Plain { insecure: false }))
        .await
        .err()
        .expect("login must fail");
    let text = err.to_string();
    assert!(matches!(err, ConnectError::Auth { .. }), "{text}");
    assert!(
        text.contains("only PLAIN on an unencrypted connection"),
        "{text}"
    );
    assert!(
        text.contains("tls.mode"),
        "the error says what to set: {text}"
    );
    let sent = task.await.unwrap();
    assert!(!sent.contains("<auth"), "no SASL attempt at all: {sent}");
    assert!(!sent.contains(&secret), "password sent in clear: {sent}");

    // Explicitly insecure: PLAIN is what the operator asked for.
    let (addr, task) = fake_server("127.0.0.2", &["PLAIN"]).await;
    let _ = spine_xmpp::connect(options(addr, Security::Plain { insecure: true })).await;
    assert!(task.await.unwrap().contains(&secret));

    // A fake server offering SCRAM, then claiming success without knowing the password.
    let (addr, task) = fake_server("127.0.0.2", &["SCRAM-SHA-1", "PLAIN"]).await;
    let err = spine_xmpp::connect(options(addr, Security::Plain { insecure: false }))
        .await
        .err()
        .expect("a bogus <success/> must not log in");
    let text = err.to_string();
    assert!(matches!(err, ConnectError::Auth { .. }), "{text}");
    assert!(text.contains("SCRAM proof"), "{text}");
    let sent = task.await.unwrap();
    assert!(
        sent.contains("mechanism='SCRAM-SHA-1'") || sent.contains("mechanism=\"SCRAM-SHA-1\""),
        "{sent}"
    );
    assert!(
        !sent.contains("bind"),
        "nothing after the failed proof: {sent}"
    );
    assert!(!sent.contains(&secret), "{sent}");
}
