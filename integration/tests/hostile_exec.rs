//! Hostile job arguments at wrapped capabilities (security review, issue 14): a real agent on
//! the embedded server, driven by the test dispatcher over XMPP.
//!
//! - Finding 7: `argv = ["sort", "{arg.mode}", "{input}"]` let a job read any file
//!   (`mode = "/etc/hostname"` returned its contents) and write one (`mode = "-o…/INJECTED"`
//!   wrote the job's input there). Options are now refused unless declared, and a declared
//!   argument takes only its declared values.
//! - Finding 13a: the http wrapper passed every argument as a query parameter, so a job could
//!   add `mode=unsafe` after the URL's own `mode=safe`. Only declared arguments pass now.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use jid::{BareJid, Jid};
use serde_json::json;
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{agent_config, run_agent, Running};
use spine_integration::TestServer;
use spine_protocol::{Args, Condition, Data, Job, SpineError};

/// The capability of finding 7, as it was configured: `mode` stands alone in argv.
const SORT: &str = r#"
[[capability]]
name = "legacy.sort"
kind = "exec"
argv = ["sort", "{arg.mode}", "{input}"]
input = "file"
"#;

/// Some lines for `sort`, and a marker that must never appear anywhere but in the job's output.
const INPUT: &[u8] = b"10\n9\n100\nsecret job input\n";

/// A server, the test dispatcher and agent1 running the capabilities of `extra` (TOML).
async fn setup(extra: &str) -> (TestServer, TestDispatcher, Running, Jid) {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let mut d = TestDispatcher::new(server.client("dispatcher", "pw-d").await).await;
    let agent = spine_agent::Agent::builder(agent_config(&server, 1, extra))
        .build()
        .expect("the agent builds");
    let agent = run_agent(agent);
    let (to, _, _) = d
        .wait_advertise(&"agent1@localhost".parse::<BareJid>().expect("JID"))
        .await;
    (server, d, agent, to)
}

/// Runs one job and returns its inline output (empty if none) or its Spine error.
async fn run(
    d: &mut TestDispatcher,
    to: &Jid,
    id: &str,
    capability: &str,
    args: serde_json::Value,
) -> Result<Vec<u8>, SpineError> {
    let mut job = Job::new(
        id.parse().expect("job id"),
        capability.parse().expect("capability"),
    );
    job.args = Args(args.as_object().cloned().expect("an object"));
    job.input = Some(Data::inline(INPUT.to_vec()));
    let id = d.send_job(to, job).await;
    match d.wait_result(&id).await {
        Ok(r) => match r.output {
            Some(Data::Inline { bytes, .. }) => Ok(bytes),
            None => Ok(Vec::new()),
            other => panic!("{id}: expected inline output, got {other:?}"),
        },
        Err(e) => Err(SpineError::from_stanza_error(&e)
            .expect("a valid condition")
            .expect("a Spine condition")),
    }
}

/// Asserts a `bad-arguments` refusal naming `field` with exactly `message`.
fn assert_refused(r: Result<Vec<u8>, SpineError>, field: &str, message: &str) {
    match r {
        Err(e) => assert_eq!(
            (e.condition, e.field.as_deref(), e.text.as_deref()),
            (Condition::BadArguments, Some(field), Some(message)),
            "{e}"
        ),
        Ok(out) => panic!(
            "expected bad-arguments for {field}, but the job ran and returned {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

fn assert_not_written(path: &Path) {
    assert!(
        !path.exists(),
        "{} was written: {:?}",
        path.display(),
        std::fs::read_to_string(path)
    );
}

/// The attack of finding 7, against the template of the finding with `mode` declared.
#[tokio::test]
async fn sort_mode_takes_only_its_declared_values() {
    let (_server, mut d, agent, to) = setup(&format!(
        "{SORT}args.mode = {{ values = [\"-n\", \"-r\"] }}\n"
    ))
    .await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let injected = dir.path().join("INJECTED");
    let allowed = "must be one of \"-n\", \"-r\"";

    // Before: sorted /etc/hostname together with the input and returned it.
    let r = run(
        &mut d,
        &to,
        "read",
        "legacy.sort",
        json!({"mode": "/etc/hostname"}),
    )
    .await;
    assert_refused(r, "mode", allowed);
    // Before: `sort -o…/INJECTED` wrote the job's input to a path of the submitter's choice.
    let mode = format!("-o{}", injected.display());
    let r = run(&mut d, &to, "write", "legacy.sort", json!({ "mode": mode })).await;
    assert_refused(r, "mode", allowed);
    assert_not_written(&injected);
    // An option smuggled beside an allowed one, or an extra argument, is no better.
    let r = run(
        &mut d,
        &to,
        "two",
        "legacy.sort",
        json!({"mode": "-n -o/x"}),
    )
    .await;
    assert_refused(r, "mode", allowed);
    let r = run(
        &mut d,
        &to,
        "extra",
        "legacy.sort",
        json!({"mode": "-n", "o": injected.display().to_string()}),
    )
    .await;
    assert_refused(
        r,
        "o",
        "is not an argument of this capability: this capability accepts only mode",
    );
    assert_not_written(&injected);

    // The legitimate use still works.
    let out = run(&mut d, &to, "numeric", "legacy.sort", json!({"mode": "-n"}))
        .await
        .expect("sort -n runs");
    assert_eq!(out, b"secret job input\n9\n10\n100\n");
    let out = run(&mut d, &to, "reverse", "legacy.sort", json!({"mode": "-r"}))
        .await
        .expect("sort -r runs");
    assert_eq!(out, b"secret job input\n9\n100\n10\n");
    agent.stop();
}

/// The exact configuration of finding 7, no declaration: an option is refused by default.
#[tokio::test]
async fn an_undeclared_argument_cannot_be_an_option() {
    let (_server, mut d, agent, to) = setup(SORT).await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let injected = dir.path().join("INJECTED");
    let allowed = "must be a string not starting with '-'";
    let mode = format!("-o{}", injected.display());
    let r = run(&mut d, &to, "write", "legacy.sort", json!({ "mode": mode })).await;
    assert_refused(r, "mode", allowed);
    for (i, mode) in ["--output=/tmp/x", "-", "-n"].iter().enumerate() {
        let r = run(
            &mut d,
            &to,
            &format!("opt-{i}"),
            "legacy.sort",
            json!({ "mode": mode }),
        )
        .await;
        assert_refused(r, "mode", allowed);
    }
    assert_not_written(&injected);
    agent.stop();
}

/// Finding 13a: only declared arguments reach the service, and never one the URL sets.
#[tokio::test]
async fn http_passes_only_declared_arguments() {
    use axum::routing::post;
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = axum::Router::new().route(
        "/svc",
        post(move |q: axum::extract::RawQuery| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { q.0.unwrap_or_default() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (_server, mut d, agent, to) = setup(&format!(
        r#"
        [[capability]]
        name = "legacy.svc"
        kind = "http"
        url = "http://{http}/svc?mode=safe"
        args.page = {{ type = "integer", min = 1, required = false }}
        [[capability]]
        name = "legacy.bare"
        kind = "http"
        url = "http://{http}/svc"
        "#
    ))
    .await;

    // Before: the service saw `mode=safe&admin=true&mode=unsafe`.
    let r = run(
        &mut d,
        &to,
        "override",
        "legacy.svc",
        json!({"mode": "unsafe", "admin": true}),
    )
    .await;
    assert_refused(
        r,
        "admin",
        "is not an argument of this capability: this capability accepts only page",
    );
    let r = run(&mut d, &to, "mode", "legacy.svc", json!({"mode": "unsafe"})).await;
    assert_refused(
        r,
        "mode",
        "is not an argument of this capability: this capability accepts only page",
    );
    let r = run(&mut d, &to, "page0", "legacy.svc", json!({"page": 0})).await;
    assert_refused(r, "page", "must be an integer of at least 1");
    let r = run(&mut d, &to, "bare", "legacy.bare", json!({"x": 1})).await;
    assert_refused(
        r,
        "x",
        "is not an argument of this capability: this capability takes no arguments",
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a refused job reached the service"
    );

    // Declared arguments pass, once each, after the URL's own query.
    let out = run(&mut d, &to, "page2", "legacy.svc", json!({"page": 2}))
        .await
        .expect("declared argument");
    assert_eq!(out, b"mode=safe&page=2");
    let out = run(&mut d, &to, "nopage", "legacy.svc", json!({}))
        .await
        .expect("optional argument left out");
    assert_eq!(out, b"mode=safe");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    agent.stop();
}

/// A declaration that would let a job add a second value to the URL's own parameter, or one
/// that contradicts itself, stops the agent at start with the key named.
#[test]
fn bad_declarations_are_refused_at_start() {
    let base = "jid = \"agent1@localhost/w\"\npassword = \"pw\"\nserver = \"127.0.0.1:5222\"\n";
    for (capability, key) in [
        (
            "kind = \"http\"\nurl = \"http://127.0.0.1:9/svc?mode=safe\"\nargs.mode = {}",
            "capability[0].args.mode: is already set in the url's query",
        ),
        (
            "kind = \"exec\"\nargv = [\"sort\", \"{arg.mode}\", \"{input}\"]\ninput = \"file\"\nargs.mode.pattern = \"[a-z\"",
            "capability[0].args.mode.pattern: \"[a-z\" is not a valid regular expression: unclosed character class",
        ),
        (
            "kind = \"exec\"\nargv = [\"sort\", \"{arg.mode}\", \"{input}\"]\ninput = \"file\"\nargs.other = {}",
            "capability[0].argv: {arg.mode} is not declared in args",
        ),
    ] {
        let text = format!("{base}[[capability]]\nname = \"legacy.x\"\n{capability}\n");
        let e = spine_agent::AgentConfig::from_toml(&text)
            .expect_err("a bad declaration")
            .to_string();
        assert!(e.contains(key), "{e}\n{text}");
    }
}
