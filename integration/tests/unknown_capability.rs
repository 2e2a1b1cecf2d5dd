//! A capability no agent has offered is refused at submission (issue 15, item 7), over HTTP
//! (422 `unknown-capability`, naming the field and the known capabilities closest first) and
//! XMPP (`item-not-found` with Spine's `<unknown-capability/>`, PROTOCOL.md §11.1), instead of
//! being accepted and failing `no_agent_wait` later. A capability that is known but whose
//! agents are momentarily away still queues and waits, `wait_for_agent` queues an unknown one,
//! map/reduce steps are checked the same way, and a restarted dispatcher remembers what its
//! store saw.

use std::time::{Duration, Instant};

use jid::Jid;
use serde_json::{json, Value};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, Running};
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Accepted, Condition, Data, JobState, MapReduce, SpineError, Submit};
use xmpp_parsers::stanza_error::DefinedCondition;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("webapp", "pw-w"), ("agent1", "pw")];

const EXTRA: &str = "submitters = [\"webapp@localhost\"]\n";

/// agent1 offering `t.echo`, `t.upper` and `wc.reduce` (each echoes its input).
fn start_agent(server: &TestServer) -> Running {
    let echo = |ctx: JobContext| async move { Ok::<_, JobError>(Output::bytes(ctx.input)) };
    let agent = Agent::builder(agent_config(server, 1, ""))
        .capability("t.echo", None, echo)
        .capability("t.upper", None, echo)
        .capability("wc.reduce", None, echo)
        .build()
        .expect("agent");
    run_agent(agent)
}

/// The embedded server, a dispatcher (its data directory, its task, its HTTP API's base URL)
/// and agent1, registered.
async fn start() -> (TestServer, tempfile::TempDir, Running, String, Running) {
    let server = TestServer::start(ACCOUNTS).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), EXTRA).await;
    let agent = start_agent(&server);
    wait_agents(&base, "t.echo", 1).await;
    (server, dir, dispatcher, base, agent)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

async fn post(base: &str, body: Value) -> (u16, Value) {
    let r = http()
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST /v1/jobs");
    let code = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// How many agents the dispatcher lists for `capability`.
async fn agents(base: &str, capability: &str) -> usize {
    let r = http()
        .get(format!("{base}/v1/agents?capability={capability}"))
        .send()
        .await
        .expect("GET /v1/agents");
    let v: Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
    v["agents"].as_array().map_or(0, Vec::len)
}

async fn wait_agents(base: &str, capability: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while agents(base, capability).await != n {
        assert!(
            Instant::now() < deadline,
            "the dispatcher does not list {n} agents for {capability}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until job `id` is final; returns it.
async fn wait_final(base: &str, id: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = http()
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .expect("GET /v1/jobs/{id}");
        let v: Value =
            serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
        if ["succeeded", "failed", "cancelled", "timed-out"]
            .contains(&v["state"].as_str().unwrap_or(""))
        {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_refuses_a_capability_never_offered_at_once_naming_the_closest() {
    let (server, _dir, dispatcher, base, agent) = start().await;

    // A typo: refused at once, the right name first in the list.
    let t0 = Instant::now();
    let (code, body) = post(&base, json!({"capability": "t.ecoh"})).await;
    let took = t0.elapsed();
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"], "unknown-capability", "{body}");
    assert_eq!(body["field"], "capability", "{body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("no agent has offered t.ecoh to this dispatcher; known capabilities, closest first: t.echo, "),
        "{msg}"
    );
    assert!(msg.contains("\"wait_for_agent\": true"), "{msg}");
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
    println!("unknown capability refused in {took:?}");

    // The same as a raw upload, fields in the query string.
    let r = http()
        .post(format!("{base}/v1/jobs?capability=t.ecoh"))
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .expect("raw upload");
    assert_eq!(r.status().as_u16(), 422);

    // A map/reduce names the step at fault.
    let frags = json!([{"data": "YQ=="}]);
    let (code, body) = post(
        &base,
        json!({"capability": "t.echo", "reduce": "wc.reduse", "fragments": frags}),
    )
    .await;
    assert_eq!((code, &body["field"]), (422, &json!("reduce")), "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("closest first: wc.reduce,"),
        "{body}"
    );
    let (code, body) = post(
        &base,
        json!({"capability": "t.echo", "reduce": "wc.reduce", "split": "wc.split", "input": "YQ=="}),
    )
    .await;
    assert_eq!((code, &body["field"]), (422, &json!("split")), "{body}");
    let (code, body) = post(
        &base,
        json!({"capability": "t.echo", "reduce": "wc.reduce", "fragments": frags}),
    )
    .await;
    assert_eq!(code, 202, "{body}");

    // wait_for_agent queues it; it runs once an agent offers it... or fails with no-agent
    // after no_agent_wait (2 s here), as every job without an agent does.
    let (code, body) = post(
        &base,
        json!({"capability": "t.later", "wait_for_agent": true}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let done = wait_final(&base, body["id"].as_str().unwrap_or_default()).await;
    assert_eq!(done["error"]["condition"], "no-agent", "{done}");
    // As a query parameter of a raw upload.
    let r = http()
        .post(format!(
            "{base}/v1/jobs?capability=t.later&wait_for_agent=true"
        ))
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .expect("raw upload");
    assert_eq!(r.status().as_u16(), 202);

    // Known, its agent gone: accepted and queued, and it runs when the agent is back.
    agent.stop();
    wait_agents(&base, "t.echo", 0).await;
    let (code, body) = post(&base, json!({"capability": "t.upper", "input": "aGk="})).await;
    assert_eq!((code, &body["state"]), (202, &json!("queued")), "{body}");
    let agent = start_agent(&server);
    let done = wait_final(&base, body["id"].as_str().unwrap_or_default()).await;
    assert_eq!(done["state"], "succeeded", "{done}");

    agent.stop();
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xmpp_answers_item_not_found_with_unknown_capability() {
    let (server, _dir, dispatcher, _base, agent) = start().await;
    let mut w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    let to: Jid = "dispatcher@localhost/d1".parse().expect("JID");

    let id = w
        .send_set(&to, Submit::new("t.ecoh".parse().expect("name")))
        .await;
    let err = w
        .wait_reply(&id)
        .await
        .expect_err("an unknown capability is refused");
    assert_eq!(err.defined_condition, DefinedCondition::ItemNotFound);
    let spine = SpineError::from_stanza_error(&err)
        .expect("a Spine condition that parses")
        .expect("a Spine condition");
    assert_eq!(spine.condition, Condition::UnknownCapability);
    assert_eq!(spine.field.as_deref(), Some("capability"));
    let text = spine.text.unwrap_or_default();
    assert!(text.contains("closest first: t.echo, "), "{text}");
    assert!(text.contains("wait-for-agent='true'"), "{text}");

    let mut s = Submit::new("t.echo".parse().expect("name"));
    s.mapreduce = Some(MapReduce::new("wc.reduse".parse().expect("name")));
    s.input = Some(Data::Inline {
        bytes: br#"[{"data":"YQ=="}]"#.to_vec(),
        mime: Some(spine_protocol::FRAGMENTS_MIME.to_owned()),
    });
    let id = w.send_set(&to, s).await;
    let err = w.wait_reply(&id).await.expect_err("unknown reduce");
    let spine = SpineError::from_stanza_error(&err).ok().flatten();
    assert_eq!(
        spine.and_then(|e| e.field),
        Some("reduce".to_owned()),
        "{err:?}"
    );

    let mut s = Submit::new("t.later".parse().expect("name"));
    s.wait_for_agent = true;
    let id = w.send_set(&to, s).await;
    let accepted = w
        .wait_reply(&id)
        .await
        .expect("wait-for-agent='true' is accepted")
        .map(Accepted::try_from)
        .and_then(Result::ok)
        .expect("<accepted/>");
    assert_eq!(accepted.state, JobState::Queued);

    agent.stop();
    dispatcher.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_dispatcher_remembers_the_capabilities_its_store_saw() {
    let (server, dir, dispatcher, base, agent) = start().await;
    agent.stop();
    wait_agents(&base, "t.echo", 0).await;
    dispatcher.stop();
    // The store is free once the old dispatcher has closed it.
    let store = dir.path().join("jobs.redb");
    let deadline = Instant::now() + PATIENCE;
    while spine_dispatcher::store::Store::open(&store).is_err() {
        assert!(
            Instant::now() < deadline,
            "the first dispatcher kept its store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // No agent anywhere, but the store remembers t.echo: queued; t.ecoh is still unknown.
    let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), EXTRA).await;
    let (code, body) = post(&base, json!({"capability": "t.echo", "input": "aGk="})).await;
    assert_eq!((code, &body["state"]), (202, &json!("queued")), "{body}");
    let (code, body) = post(&base, json!({"capability": "t.ecoh"})).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("closest first: t.echo, "),
        "{body}"
    );
    dispatcher.stop();
}
