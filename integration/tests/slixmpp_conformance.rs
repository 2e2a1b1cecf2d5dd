//! A third-party client proves the embedded server's conformance: Python slixmpp logs in
//! (STARTTLS + SCRAM), talks to a Rust tokio-xmpp client through the server, and checks the
//! server's own answers (integration/python/slixmpp_conformance.py).
//!
//! Needs a Python with slixmpp: `SPINE_PYTHON`, or `.venv/bin/python` at the repository root
//! (`.ci/run` creates it). Without one the test says why and passes, unless
//! `SPINE_REQUIRE_SERVERS=1` (set by `.ci/run`), where it fails.

use jid::Jid;
use spine_integration::{TestServer, PATIENCE};
use tokio_xmpp::stanzastream::Event;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Lang, Message, MessageType};
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::version::VersionResult;

use spine_integration::{python, repo_root};

/// Answers what the script asks: version IQs, chat echo, directed presence.
async fn responder(mut conn: spine_xmpp::Connection) {
    while let Some(ev) = conn.next().await {
        let Event::Stanza(st) = ev else { continue };
        match st {
            Stanza::Iq(Iq::Get {
                id,
                from: Some(from),
                payload,
                ..
            }) if payload.is("query", "jabber:iq:version") => {
                let v = VersionResult {
                    name: "spine-responder".into(),
                    version: "1".into(),
                    os: None,
                };
                conn.send(Iq::from_result(id, Some(v)).with_to(from)).await;
            }
            Stanza::Message(m) if m.type_ == MessageType::Chat => {
                let (Some(from), Some(body)) = (m.from.clone(), m.bodies.values().next().cloned())
                else {
                    continue;
                };
                let mut reply = Message::new(Some(from));
                reply.type_ = MessageType::Chat;
                reply
                    .bodies
                    .insert(Lang::default(), format!("echo: {body}"));
                conn.send(reply).await;
            }
            Stanza::Presence(p)
                if p.type_ == PresenceType::None
                    && p.to.as_ref().is_some_and(|t| t.resource().is_some()) =>
            {
                let Some(from) = p.from.clone() else { continue };
                if from.to_bare().as_str() == "responder@localhost" {
                    continue;
                }
                let mut back = Presence::available().with_to(from);
                back.set_status("en", "seen");
                conn.send(back).await;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn slixmpp_talks_to_a_rust_client_through_the_embedded_server() {
    let python = match python() {
        Ok(p) => p,
        Err(why) if std::env::var("SPINE_REQUIRE_SERVERS").as_deref() == Ok("1") => {
            panic!("SPINE_REQUIRE_SERVERS=1 but {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED slixmpp conformance: {why}");
            return;
        }
    };
    let server = TestServer::start(&[("pyclient", "pw-py"), ("responder", "pw-resp")]).await;
    let mut opts = server.tls_options("responder", "pw-resp");
    opts.jid = "responder@localhost/r1".parse::<Jid>().unwrap();
    let conn = spine_xmpp::connect(opts).await.expect("responder login");
    conn.send(Presence::available()).await;
    let target = conn.jid().to_string();
    let task = tokio::spawn(responder(conn));

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &server.cert_pem).expect("write CA");
    let script = repo_root().join("integration/python/slixmpp_conformance.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .args([
            "--addr",
            &server.addr.to_string(),
            "--jid",
            "pyclient@localhost/conf",
            "--password",
            "pw-py",
        ])
        .arg("--ca")
        .arg(&ca)
        .args(["--target", &target, "--timeout", "10"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(PATIENCE * 9, run)
        .await
        .expect("script timed out")
        .expect("run python");
    task.abort();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "slixmpp conformance failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("conformance: all checks passed"),
        "{stdout}"
    );
    for check in [
        "iq-roundtrip",
        "iq-offline",
        "server-ping",
        "server-disco",
        "message",
        "directed-presence",
    ] {
        assert!(
            stdout.contains(&format!("CHECK {check}: ok")),
            "check {check} missing:\n{stdout}"
        );
    }
}
