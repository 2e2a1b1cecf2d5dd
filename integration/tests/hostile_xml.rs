//! Deeply nested XML, the attack that crashed every Spine process: a 35 KB `<message>` nested
//! 5,000 deep sent before authentication overflowed the embedded server's stack, and an IQ
//! nested 6,000 deep from any account on Prosody did the same to the dispatcher and an agent.
//!
//! Here at depth 10,000: the embedded server closes the stream with `policy-violation`
//! before and after authentication and keeps serving; through Prosody and ejabberd, which
//! relay the stanza, the dispatcher and the agent (each reading through its nesting filter)
//! answer it with an error and go on running jobs.

use std::time::Duration;

use serde_json::json;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, wait_for_agents};
use spine_integration::servers::{AnyServer, Kind};
use spine_integration::RawClient;
use spine_protocol::depth::MAX_STANZA_DEPTH;

const ACCOUNTS: &[(&str, &str)] = &[
    ("dispatcher", "pw-d"),
    ("agent1", "pw"),
    ("mallory", "pw-m"),
    ("alice", "pw-a"),
];

const DEPTH: usize = 10_000;

/// ejabberd 23.01 itself drops a client that sends a stanza nested 4,000 deep or more (the
/// connection closes without a stream error); 3,000 it relays, which crashed Spine's
/// clients before they read through the nesting filter.
const EJABBERD_DEPTH: usize = 3_000;

fn nested(depth: usize) -> String {
    format!("{}{}", "<a>".repeat(depth), "</a>".repeat(depth))
}

/// Reads stanzas up to the reply to the IQ `id`, and returns them.
async fn reply_to(c: &mut RawClient, id: &str) -> String {
    c.read_iq(id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_server_refuses_deep_nesting_before_and_after_login() {
    let Some(server) = AnyServer::start(Kind::Embedded, ACCOUNTS).await else {
        return;
    };
    // Before authentication: a <message> 10,000 deep (about 70 KB).
    let mut stranger = RawClient::open(server.addr, "localhost").await;
    stranger
        .send(&format!("<message>{}</message>", nested(DEPTH)))
        .await;
    let got = stranger.read_to_close().await;
    assert!(got.contains("policy-violation"), "pre-auth: {got}");
    assert!(
        got.contains(&format!("nested deeper than {MAX_STANZA_DEPTH} levels")),
        "pre-auth: {got}"
    );

    // After authentication: an IQ 10,000 deep.
    let mut mallory = RawClient::login(server.addr, "localhost", "mallory", "pw-m", "m").await;
    mallory
        .send(&format!(
            "<iq type='get' id='deep' to='localhost'><query xmlns='urn:x'>{}</query></iq>",
            nested(DEPTH)
        ))
        .await;
    let got = mallory.read_to_close().await;
    assert!(got.contains("policy-violation"), "post-auth: {got}");

    // Nesting up to the limit is fine: a stanza MAX_STANZA_DEPTH deep is routed as usual.
    let mut alice = RawClient::login(server.addr, "localhost", "alice", "pw-a", "a").await;
    alice
        .send(&format!(
            "<iq type='get' id='ok' to='localhost'><query xmlns='urn:x'>{}</query></iq>",
            nested(MAX_STANZA_DEPTH as usize - 2)
        ))
        .await;
    let got = reply_to(&mut alice, "ok").await;
    assert!(
        got.contains("type='error'") || got.contains("type=\"error\""),
        "a stanza {MAX_STANZA_DEPTH} deep is answered as usual: {got}"
    );
}

/// An account of the same server sends the dispatcher and an agent an IQ nested 10,000 deep
/// (and a message): each answers the IQ with an error and keeps working.
async fn deep_stanzas_reach_the_dispatcher_and_an_agent(kind: Kind, depth: usize) {
    let Some(server) = AnyServer::start(kind, ACCOUNTS).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_dispatcher, base) = start_http_dispatcher(&server, dir.path(), "").await;
    let agent = Agent::builder(agent_config(&server, 1, ""))
        .capability("t.echo", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(ctx.input))
        })
        .build()
        .unwrap();
    let _agent = run_agent(agent);
    wait_for_agents(&base, "t.echo", 1).await;

    let mut mallory =
        RawClient::login_scram(server.addr, "localhost", "mallory", "pw-m", "m").await;
    for (n, to) in ["dispatcher@localhost/d1", "agent1@localhost/w"]
        .into_iter()
        .enumerate()
    {
        mallory
            .send(&format!(
                "<message to='{to}'><body>{}</body></message>",
                nested(depth)
            ))
            .await;
        let id = format!("deep{n}");
        mallory
            .send(&format!(
                "<iq type='set' id='{id}' to='{to}'><status xmlns='urn:spine:1' job='x'>{}</status></iq>",
                nested(depth)
            ))
            .await;
        let got = reply_to(&mut mallory, &id).await;
        assert!(
            got.contains("type='error'") || got.contains("type=\"error\""),
            "{} → {to}: {got}\nserver log: {}",
            kind.name(),
            server.log()
        );
    }

    // Both still work: a job goes through the dispatcher to the agent.
    let client = spine_client::Client::new(&base, None).unwrap();
    let id = client
        .submit(&json!({ "capability": "t.echo", "input": "c3RpbGwgaGVyZQ==" }))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let j = client.job(&id).await.unwrap();
        if j["state"] == "succeeded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: job after the attack: {j}",
            kind.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_stanzas_through_prosody() {
    deep_stanzas_reach_the_dispatcher_and_an_agent(Kind::Prosody, DEPTH).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_stanzas_through_ejabberd() {
    deep_stanzas_reach_the_dispatcher_and_an_agent(Kind::Ejabberd, EJABBERD_DEPTH).await;
}
