//! The dispatcher's authorization policy (docs/security.md), denial by denial, on the embedded
//! server with real agents, XMPP submitters and HTTP tokens.

use jid::Jid;
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher};
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Cancel, Condition, Discover, JobId, JobStatus, SpineError, Status, Submit};
use xmpp_parsers::iq::Iq;

const POLICY: &str = r#"
submitters = ["ops@localhost"]

[[submitter]]
jid = "webapp@localhost"
capabilities = ["image.*"]

[[submitter]]
jid = "admin@localhost"
capabilities = ["*"]
all_jobs = true

[[agent]]
jid = "agent1@localhost"
capabilities = ["test.*"]

[[agent]]
jid = "agent2@localhost"
capabilities = ["image.*"]

[[http_token]]
name = "t1"
token = "token-one-0123456789"
capabilities = ["test.*"]

[[http_token]]
name = "t2"
token = "token-two-0123456789"
capabilities = ["*"]
"#;

const T1: &str = "token-one-0123456789";
const T2: &str = "token-two-0123456789";

fn dispatcher() -> Jid {
    "dispatcher@localhost/d1".parse().unwrap()
}

/// An agent offering `caps`, each answering with its own name.
fn agent(server: &TestServer, n: usize, caps: &[&'static str]) -> spine_integration::farm::Running {
    let mut b = Agent::builder(agent_config(server, n, ""));
    for &cap in caps {
        b = b.capability(cap, None, move |_ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(cap.as_bytes().to_vec()))
        });
    }
    run_agent(b.build().unwrap())
}

async fn http(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = client
        .request(method, url)
        .header("authorization", format!("Bearer {token}"));
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// The JIDs the dispatcher lists for `cap` (asked with the all-capabilities token).
async fn agents_for(base: &str, cap: &str) -> Vec<String> {
    let (status, body) = http(
        reqwest::Method::GET,
        format!("{base}/v1/agents?capability={cap}"),
        T2,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["jid"].as_str().unwrap().to_owned())
        .collect()
}

async fn ask_status(c: &TestDispatcher, id: &str, job: &JobId) {
    let iq = Iq::from_get(id.to_owned(), Status { job: job.clone() }).with_to(dispatcher());
    c.conn.send(iq).await;
}

async fn refused(c: &mut TestDispatcher, id: &str) -> SpineError {
    let err = c.wait_reply(id).await.expect_err("refused");
    SpineError::from_stanza_error(&err)
        .unwrap()
        .expect("a Spine condition")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_refuses_what_it_does_not_grant() {
    let server = TestServer::start(&[
        ("dispatcher", "pw-d"),
        ("ops", "pw-o"),
        ("webapp", "pw-w"),
        ("admin", "pw-a"),
        ("stranger", "pw-s"),
        ("agent1", "pw"),
        ("agent2", "pw"),
        ("agent3", "pw"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (d, base) = start_http_dispatcher(&server, dir.path(), POLICY).await;

    // Agents: agent1 may offer test.* (not secret.run); agent2 image.* (not test.echo);
    // agent3 is named by no rule at all.
    let a1 = agent(&server, 1, &["test.echo", "secret.run"]);
    let a2 = agent(&server, 2, &["test.echo", "image.resize"]);
    let a3 = agent(&server, 3, &["image.resize"]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while agents_for(&base, "image.resize").await.is_empty()
        || agents_for(&base, "test.echo").await.is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agents did not register"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // agent2's advertisement was processed (it offers image.resize): its test.echo was not
    // taken, agent1's secret.run neither, and agent3 is not an agent here.
    assert_eq!(agents_for(&base, "test.echo").await, ["agent1@localhost/w"]);
    assert_eq!(
        agents_for(&base, "image.resize").await,
        ["agent2@localhost/w"]
    );
    assert!(agents_for(&base, "secret.run").await.is_empty());

    // XMPP submitters.
    let mut web = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
    let mut ops = TestDispatcher::new(server.client("ops", "pw-o").await).await;
    let mut admin = TestDispatcher::new(server.client("admin", "pw-a").await).await;
    let mut stranger = TestDispatcher::new(server.client("stranger", "pw-s").await).await;

    let id = web
        .send_set(&dispatcher(), Submit::new("test.echo".parse().unwrap()))
        .await;
    let e = refused(&mut web, &id).await;
    assert_eq!(e.condition, Condition::NotAuthorized);
    assert!(
        e.text.as_deref().unwrap_or("").contains("test.echo"),
        "{e:?}"
    );
    let discover = Discover {
        capability: "test.echo".parse().unwrap(),
        filter: None,
        sort: None,
        limit: None,
    };
    web.conn
        .send(Iq::from_get("disc-1", discover).with_to(dispatcher()))
        .await;
    assert_eq!(
        refused(&mut web, "disc-1").await.condition,
        Condition::NotAuthorized
    );
    // A map/reduce whose reduce step the submitter may not run is refused whole.
    let mut mr = Submit::new("image.resize".parse().unwrap());
    mr.mapreduce = Some(spine_protocol::MapReduce {
        reduce: "test.echo".parse().unwrap(),
        split: None,
        fan_in: 4,
    });
    let id = web.send_set(&dispatcher(), mr).await;
    assert_eq!(
        refused(&mut web, &id).await.condition,
        Condition::NotAuthorized
    );
    let id = stranger
        .send_set(&dispatcher(), Submit::new("image.resize".parse().unwrap()))
        .await;
    assert_eq!(
        refused(&mut stranger, &id).await.condition,
        Condition::NotAuthorized
    );
    // What it is granted works, and meanwhile the others were served.
    let id = web
        .send_set(&dispatcher(), Submit::new("image.resize".parse().unwrap()))
        .await;
    web.wait_reply(&id).await.expect("image.resize accepted");

    // ops may run anything, and its jobs are its own.
    let id = ops
        .send_set(&dispatcher(), Submit::new("test.echo".parse().unwrap()))
        .await;
    let accepted =
        spine_protocol::Accepted::try_from(ops.wait_reply(&id).await.unwrap().unwrap()).unwrap();
    let job: JobId = accepted.job;
    ask_status(&web, "st-web", &job).await;
    assert_eq!(
        refused(&mut web, "st-web").await.condition,
        Condition::NotAuthorized
    );
    let id = web
        .send_set(&dispatcher(), Cancel { job: job.clone() })
        .await;
    let e = refused(&mut web, &id).await;
    assert_eq!(e.condition, Condition::NotAuthorized);
    assert!(
        e.text.as_deref().unwrap_or("").contains("someone else"),
        "{e:?}"
    );
    ask_status(&ops, "st-ops", &job).await;
    let own = ops.wait_reply("st-ops").await.unwrap().unwrap();
    assert_eq!(JobStatus::try_from(own).unwrap().job, job);
    ask_status(&admin, "st-admin", &job).await;
    let any = admin.wait_reply("st-admin").await.unwrap().unwrap();
    assert_eq!(JobStatus::try_from(any).unwrap().job, job);

    // HTTP tokens: t1 may run test.*, t2 everything; neither sees the other's jobs.
    let (status_code, body) = http(
        reqwest::Method::POST,
        format!("{base}/v1/jobs"),
        T1,
        Some(serde_json::json!({ "capability": "image.resize" })),
    )
    .await;
    assert_eq!(status_code, 403, "{body}");
    assert_eq!(body["error"], "not-authorized");
    let (status_code, body) = http(
        reqwest::Method::POST,
        format!("{base}/v1/jobs"),
        T1,
        Some(serde_json::json!({ "capability": "test.echo" })),
    )
    .await;
    assert_eq!(status_code, 202, "{body}");
    let t1_job = body["id"].as_str().unwrap().to_owned();
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/jobs/{t1_job}")),
        (reqwest::Method::GET, format!("/v1/jobs/{t1_job}/events")),
        (reqwest::Method::DELETE, format!("/v1/jobs/{t1_job}")),
    ] {
        let (code, body) = http(method.clone(), format!("{base}{path}"), T2, None).await;
        assert_eq!(code, 403, "{method} {path}: {body}");
        assert_eq!(body["error"], "not-authorized", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("someone else"),
            "{body}"
        );
    }
    let (code, body) = http(reqwest::Method::GET, format!("{base}/v1/jobs"), T2, None).await;
    assert_eq!(code, 200);
    assert!(
        body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["id"] != t1_job.as_str()),
        "t2 lists t1's job: {body}"
    );
    let (code, body) = http(reqwest::Method::GET, format!("{base}/v1/jobs"), T1, None).await;
    assert_eq!(code, 200);
    let listed: Vec<&str> = body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(listed, [t1_job.as_str()], "t1 lists exactly its own job");
    let (code, body) = http(
        reqwest::Method::GET,
        format!("{base}/v1/jobs/{t1_job}"),
        T1,
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(
        reqwest::Method::GET,
        format!("{base}/v1/agents?capability=image.resize"),
        T1,
        None,
    )
    .await;
    assert_eq!(code, 403, "{body}");

    a1.stop();
    a2.stop();
    a3.stop();
    d.stop();
}
