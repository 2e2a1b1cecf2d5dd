//! Hostile input against the server, the dispatcher and the agent: each answers with the
//! specific error (a stream error, a stanza error with its condition, or HTTP 4xx with JSON)
//! and keeps serving its other clients meanwhile.

use std::time::Duration;

use jid::Jid;
use minidom::Element;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, wait_for_agents};
use spine_integration::{expect_stanza, RawClient, TestServer, PATIENCE};
use spine_protocol::{Condition, Job, JobState, JobStatus, SpineError, Submit, NS};
use tokio::io::AsyncWriteExt;
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::ping::Ping;
use xmpp_parsers::stanza_error::{DefinedCondition, StanzaError};

const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("dispatcher2", "pw-d2"),
    ("agent1", "pw"),
    ("webapp", "pw-w"),
    ("flood", "pw-f"),
    ("mallory", "pw-m"),
    ("alice", "pw-a"),
    ("bob", "pw-b"),
];

fn jid(s: &str) -> Jid {
    s.parse().unwrap()
}

fn el(xml: &str) -> Element {
    xml.parse().expect("test XML")
}

/// An IQ set or get with any payload, Spine or not.
fn iq(set: bool, id: &str, to: &Jid, payload: Element) -> Iq {
    let (from, to, id) = (None, Some(to.clone()), id.to_owned());
    if set {
        Iq::Set {
            from,
            to,
            id,
            payload,
        }
    } else {
        Iq::Get {
            from,
            to,
            id,
            payload,
        }
    }
}

fn spine_condition(e: &StanzaError) -> Condition {
    SpineError::from_stanza_error(e)
        .expect("a valid Spine error")
        .expect("a Spine condition")
        .condition
}

/// The server still answers `client`'s ping.
async fn server_serves(client: &mut spine_xmpp::Connection, id: &str) {
    client
        .send(Iq::from_get(id.to_owned(), Ping).with_to(jid("localhost")))
        .await;
    expect_stanza(client, "ping result", |st| match st {
        Stanza::Iq(Iq::Result { id: got, .. }) if got == id => Some(()),
        _ => None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_unbalanced_tags_a_10_mb_stanza_and_survives_an_iq_flood() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut bob = server.client("bob", "pw-b").await;

    // Unbalanced tags: the stream is closed with not-well-formed.
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-a", "unbal").await;
    raw.send("<message to='bob@localhost'><body>hi</message>")
        .await;
    let closing = raw.read_to_close().await;
    assert!(closing.contains("not-well-formed"), "got: {closing}");
    server_serves(&mut bob, "p1").await;

    // A 10 MB stanza: policy-violation once the limit (256 KiB) is passed, long before the end.
    let mut raw = RawClient::login(server.addr, &server.domain, "alice", "pw-a", "big").await;
    raw.send("<message to='bob@localhost'><body>").await;
    let chunk = vec![b'A'; 64 * 1024];
    let mut sent = 0usize;
    while sent < 10 * 1024 * 1024 && !raw.buf.contains("policy-violation") {
        if raw.tcp.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
        let mut b = [0u8; 4096];
        while let Ok(n) = raw.tcp.try_read(&mut b) {
            if n == 0 {
                break;
            }
            raw.buf.push_str(&String::from_utf8_lossy(&b[..n]));
        }
    }
    let closing = raw.read_to_close().await;
    assert!(closing.contains("policy-violation"), "got: {closing}");
    assert!(sent < 10 * 1024 * 1024, "the server read all 10 MB");
    server_serves(&mut bob, "p2").await;

    // An IQ flood from one client: 5,000 pings without waiting; every one is answered and
    // another client is served meanwhile.
    let mut flood = RawClient::login(server.addr, &server.domain, "alice", "pw-a", "flood").await;
    let mut burst = String::new();
    for i in 0..5000 {
        burst.push_str(&format!(
            "<iq type='get' id='f{i}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
    }
    flood.send(&burst).await;
    server_serves(&mut bob, "p3").await;
    // Replies come in order: everything up to the last one's id holds all 5,000.
    let replies = flood.read_until("f4999").await;
    assert_eq!(replies.matches("<iq").count(), 5000, "every ping answered");
    assert!(
        !replies.contains("<stream:error"),
        "the flooder was cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dispatcher_answers_bad_requests_precisely_and_keeps_serving() {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().unwrap();
    let (d, base) = start_http_dispatcher(
        &server,
        dir.path(),
        "submitters = [\"webapp@localhost\", \"flood@localhost\"]\nmax_queue = 50\nsubmitter_max_queued = \"100%\"\n",
    )
    .await;
    let agent = Agent::builder(agent_config(&server, 1, "slots = 4\n"))
        .capability("work.echo", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(ctx.input.to_vec()))
        })
        .build()
        .unwrap();
    let agent = run_agent(agent);
    wait_for_agents(&base, "work.echo", 1).await;
    let to = jid("dispatcher@localhost/d1");
    let mut f = TestDispatcher::new(server.client("flood", "pw-f").await).await;
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;

    // Unknown namespace: service-unavailable.
    f.conn
        .send(iq(
            true,
            "ns1",
            &to,
            el("<query xmlns='urn:example:unknown'/>"),
        ))
        .await;
    let e = f.wait_reply("ns1").await.unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::ServiceUnavailable);
    // An invalid <submit>: bad-arguments naming the attribute.
    let bad = el("<submit xmlns='urn:spine:1' capability='Not A Name!'/>");
    f.conn.send(iq(true, "bad1", &to, bad)).await;
    let e = f.wait_reply("bad1").await.unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::BadRequest);
    let se = SpineError::from_stanza_error(&e).unwrap().unwrap();
    assert_eq!(se.condition, Condition::BadArguments);
    assert_eq!(se.field.as_deref(), Some("capability"));
    // Arguments of the wrong type (an array, not an object).
    let wrong =
        el("<submit xmlns='urn:spine:1' capability='work.echo'><args>[1, 2]</args></submit>");
    f.conn.send(iq(true, "bad2", &to, wrong)).await;
    let e = f.wait_reply("bad2").await.unwrap_err();
    let se = SpineError::from_stanza_error(&e).unwrap().unwrap();
    assert_eq!(se.condition, Condition::BadArguments);
    assert_eq!(se.field.as_deref(), Some("args"));

    // A flood: 3,000 status queries and 300 submissions of a capability nobody offers, which
    // wait for an agent (its queue holds 50), all sent at once.
    for i in 0..3000 {
        let st = el(&format!("<status xmlns='{NS}' job='nope-{i}'/>"));
        f.conn.send(iq(false, &format!("st{i}"), &to, st)).await;
    }
    for i in 0..300 {
        let mut s = Submit::new("nobody.offers".parse().unwrap());
        s.wait_for_agent = true;
        f.conn
            .send(Iq::from_set(format!("q{i}"), s).with_to(to.clone()))
            .await;
    }
    // Meanwhile another submitter's job runs.
    let mut s = Submit::new("work.echo".parse().unwrap());
    s.watch = true;
    let id = w.send_set(&to, s).await;
    w.wait_reply(&id).await.expect("accepted during the flood");
    let st: JobStatus = w
        .wait_for("final status", |st| match st {
            Stanza::Message(m) => m
                .payloads
                .iter()
                .find_map(|p| JobStatus::try_from(p.clone()).ok())
                .filter(|s| s.state.is_final()),
            _ => None,
        })
        .await;
    assert_eq!(st.state, JobState::Succeeded);
    // Every flooded request got its specific answer.
    for i in 0..3000 {
        let e = f.wait_reply(&format!("st{i}")).await.unwrap_err();
        assert_eq!(spine_condition(&e), Condition::UnknownJob, "st{i}");
    }
    let (mut accepted, mut full) = (0, 0);
    for i in 0..300 {
        match f.wait_reply(&format!("q{i}")).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                assert_eq!(e.defined_condition, DefinedCondition::ResourceConstraint);
                assert_eq!(spine_condition(&e), Condition::QueueFull);
                full += 1;
            }
        }
    }
    assert_eq!((accepted, full), (50, 250));

    // HTTP: bad JSON, wrong types, a huge JSON body; another client is served after each.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post = |body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{base}/v1/jobs");
        async move {
            let r = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, v)
        }
    };
    for (body, status, error, field) in [
        (b"{not json".to_vec(), 400, "bad-request", None),
        (
            br#"{"capability": "work.echo", "args": [1]}"#.to_vec(),
            400,
            "bad-request",
            Some("args"),
        ),
        (
            br#"{"args": {}}"#.to_vec(),
            400,
            "bad-request",
            Some("capability"),
        ),
        (
            format!(
                "{{\"capability\": \"work.echo\", \"input\": \"{}\"}}",
                "A".repeat(97 * 1024 * 1024)
            )
            .into_bytes(),
            413,
            "too-large",
            None,
        ),
    ] {
        let (got, v) = post(body).await;
        assert_eq!(got, status, "{v}");
        assert_eq!(v["error"], error, "{v}");
        if let Some(f) = field {
            assert_eq!(v["field"], f, "{v}");
        }
        let (ok, v) = post(br#"{"capability": "work.echo"}"#.to_vec()).await;
        assert_eq!(ok, 202, "served meanwhile: {v}");
    }
    agent.stop();
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_bad_jobs_and_strangers_and_survives_a_job_flood() {
    let server = TestServer::start(ACCOUNTS).await;
    let mut d1 = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let mut d2 = TestDispatcher::new(server.client("dispatcher2", "pw-d2").await).await;
    let cfg = spine_agent::AgentConfig::from_toml(&format!(
        "jid = \"agent1@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\nslots = 2\ndispatchers = [\"dispatcher@localhost\", \"dispatcher2@localhost\"]\n",
        server.addr
    ))
    .unwrap();
    let agent = Agent::builder(cfg)
        .capability("work.echo", None, |ctx: JobContext| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, JobError>(Output::bytes(ctx.input.to_vec()))
        })
        .build()
        .unwrap();
    let agent = run_agent(agent);
    let (to, _, _) = d1
        .wait_advertise(&"agent1@localhost".parse().unwrap())
        .await;

    // A <job> that breaks the protocol (attempt 0): malformed, as bad-request.
    let bad = el("<job xmlns='urn:spine:1' id='j-bad' capability='work.echo' attempt='0'/>");
    d1.conn.send(iq(true, "bad1", &to, bad)).await;
    let e = d1.wait_reply("bad1").await.unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::BadRequest);
    assert_eq!(spine_condition(&e), Condition::Malformed);
    // An unknown namespace: service-unavailable.
    d1.conn
        .send(iq(
            true,
            "ns1",
            &to,
            el("<query xmlns='urn:example:unknown'/>"),
        ))
        .await;
    let e = d1.wait_reply("ns1").await.unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::ServiceUnavailable);
    // A job for a capability it does not offer.
    let id = d1
        .send_job(
            &to,
            Job::new("j-unknown".parse().unwrap(), "no.such".parse().unwrap()),
        )
        .await;
    let e = d1.wait_result(&id).await.unwrap_err();
    assert_eq!(spine_condition(&e), Condition::UnknownCapability);
    // A stranger posing as a dispatcher.
    let mut m = TestDispatcher::new(server.client("mallory", "pw-m").await).await;
    let id = m
        .send_job(
            &to,
            Job::new("j-evil".parse().unwrap(), "work.echo".parse().unwrap()),
        )
        .await;
    let e = m.wait_result(&id).await.unwrap_err();
    assert_eq!(e.defined_condition, DefinedCondition::Forbidden);
    assert_eq!(spine_condition(&e), Condition::NotAuthorized);

    // A flood of 500 jobs from one dispatcher: 2 slots, so most are refused `busy` at once;
    // every IQ is answered, and the other dispatcher's job runs meanwhile.
    let mut ids = Vec::new();
    for i in 0..500 {
        ids.push(
            d1.send_job(
                &to,
                Job::new(
                    format!("flood-{i}").parse().unwrap(),
                    "work.echo".parse().unwrap(),
                ),
            )
            .await,
        );
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let other = loop {
        let id = d2
            .send_job(
                &to,
                Job::new("j-other".parse().unwrap(), "work.echo".parse().unwrap()),
            )
            .await;
        match d2.wait_result(&id).await {
            Ok(r) => break r,
            Err(e) => {
                assert_eq!(spine_condition(&e), Condition::Busy, "{e:?}");
                assert!(tokio::time::Instant::now() < deadline, "never served");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(other.job.as_str(), "j-other");
    let (mut ok, mut busy) = (0, 0);
    for id in &ids {
        match d1.wait_result(id).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(spine_condition(&e), Condition::Busy, "{e:?}");
                busy += 1;
            }
        }
    }
    assert_eq!(ok + busy, 500);
    assert!(ok >= 1 && busy >= 400, "{ok} ran, {busy} busy");
    agent.stop();
}
