//! A job refused for one of its arguments says which, to every submitter (issue 15, items 5
//! and 6): a real agent (the image example and a wrapped `gzip`) refuses with `bad-arguments`
//! and a `field`; the dispatcher records that field with the job's outcome and passes it on in
//! the HTTP job (`error.field`) and the XMPP `<failure field='…'>` of a watch message and a
//! status reply. A capability written in Rust that declares its arguments refuses any other
//! (`width` on `image.thumbnail`, which reads `size`) instead of ignoring it.

use std::io::Cursor;

use jid::Jid;
use serde_json::{json, Value};
use spine_agent::Agent;
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{
    agent_config, run_agent, start_http_dispatcher, wait_for_agents, Running,
};
use spine_integration::{TestServer, PATIENCE};
use spine_protocol::{Args, Condition, Fragment, JobState, JobStatus, Outcome, Status, Submit};
use tokio_xmpp::Stanza;
use xmpp_parsers::iq::Iq;

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("agent1", "pw"), ("webapp", "pw-w")];

/// The wrapped program of the issue's first example: `level` is declared and required.
const GZIP: &str = r#"slots = 2
[[capability]]
name = "compress.gzip"
kind = "exec"
argv = ["gzip", "-c", "-{arg.level}"]
args.level = { type = "integer", min = 1, max = 9 }
"#;

/// A server, a dispatcher with its HTTP API (webapp@localhost may submit over XMPP) and one
/// agent offering the image capabilities and `compress.gzip`.
struct Farm {
    server: TestServer,
    _dir: tempfile::TempDir,
    dispatcher: Running,
    agent: Running,
    api: spine_client::Client,
}

impl Farm {
    async fn start() -> Farm {
        let server = TestServer::start(ACCOUNTS).await;
        let dir = tempfile::tempdir().unwrap();
        let (dispatcher, base) =
            start_http_dispatcher(&server, dir.path(), "submitters = [\"webapp@localhost\"]\n")
                .await;
        let agent = Agent::builder(agent_config(&server, 1, GZIP));
        let agent = run_agent(spine_example_image::register(agent).build().unwrap());
        for cap in ["image.thumbnail", "image.contact-sheet", "compress.gzip"] {
            wait_for_agents(&base, cap, 1).await;
        }
        Farm {
            server,
            _dir: dir,
            dispatcher,
            agent,
            api: spine_client::Client::new(&base, None).unwrap(),
        }
    }

    /// Submits over HTTP and follows the job to its end.
    async fn run(&self, body: Value) -> Value {
        let id = self.api.submit(&body).await.unwrap();
        tokio::time::timeout(PATIENCE, self.api.follow(&id, |_, _| {}))
            .await
            .expect("the job ended in time")
            .unwrap()
    }

    async fn stop(self) {
        self.agent.stop();
        self.dispatcher.stop();
        self.server.stop().await;
    }
}

/// A 100×60 PNG, red and blue halves.
fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(100, 60, |x, _| {
        if x < 50 {
            image::Rgb([200, 10, 10])
        } else {
            image::Rgb([10, 10, 200])
        }
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn thumbnail(args: Value) -> Value {
    json!({
        "capability": "image.thumbnail",
        "args": args,
        "input": spine_client::base64(&png()),
    })
}

/// The job's `error` object, asserting that it failed with `bad-arguments`.
fn bad_arguments(job: &Value) -> &Value {
    assert_eq!(job["state"], "failed", "{job}");
    let e = &job["error"];
    assert_eq!(e["condition"], "bad-arguments", "{job}");
    e
}

fn dispatcher_jid() -> Jid {
    "dispatcher@localhost/d1".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refused_argument_is_named_over_http_and_xmpp() {
    let farm = Farm::start().await;

    // A value out of range, refused by the Rust handler.
    let job = farm.run(thumbnail(json!({"size": -5}))).await;
    let e = bad_arguments(&job);
    assert_eq!(e["field"], "size", "{job}");
    assert_eq!(e["message"], "must be an integer from 1 to 16384", "{job}");
    // What `spine submit --wait` prints (spine_client's error for a failed job).
    let line = spine_client::output(&job).unwrap_err().to_string();
    assert!(
        line.ends_with("failed: field 'size': must be an integer from 1 to 16384 (bad-arguments)"),
        "{line}"
    );

    // A required argument left out, refused by the exec wrapper before gzip runs.
    let job = farm
        .run(json!({"capability": "compress.gzip", "input": spine_client::base64(b"big log")}))
        .await;
    let e = bad_arguments(&job);
    assert_eq!(e["field"], "level", "{job}");
    assert_eq!(
        e["message"], "is required by this capability; it must be an integer in 1..=9",
        "{job}"
    );

    // An input the agent cannot read is named `input`.
    let job = farm
        .run(json!({"capability": "image.thumbnail", "input": spine_client::base64(b"not an image")}))
        .await;
    assert_eq!(bad_arguments(&job)["field"], "input", "{job}");

    // Over XMPP: the watch message at the end, and a status reply.
    let mut w = TestDispatcher::new(farm.server.client("webapp", "pw-w").await).await;
    let mut s = Submit::new("image.thumbnail".parse().unwrap());
    s.watch = true;
    s.args = Args(json!({"size": -5}).as_object().cloned().unwrap());
    s.input = Some(spine_protocol::Data::Inline {
        mime: Some("image/png".into()),
        bytes: png(),
    });
    let iq = w.send_set(&dispatcher_jid(), s).await;
    let accepted = spine_protocol::Accepted::try_from(
        w.wait_reply(&iq).await.unwrap().expect("an <accepted/>"),
    )
    .unwrap();
    let watched = w
        .wait_for("the final <job-status> message", |st| match st {
            Stanza::Message(m) => m
                .payloads
                .iter()
                .find_map(|p| JobStatus::try_from(p.clone()).ok())
                .filter(|st| st.job == accepted.job && st.state.is_final()),
            _ => None,
        })
        .await;
    let expected = Some(Outcome::Failure(spine_protocol::Failure {
        condition: Condition::BadArguments,
        message: Some("must be an integer from 1 to 16384".into()),
        field: Some("size".into()),
    }));
    assert_eq!(watched.state, JobState::Failed);
    assert_eq!(watched.outcome, expected, "{watched:?}");

    let q = "status-1";
    w.conn
        .send(
            Iq::from_get(
                q,
                Status {
                    job: accepted.job.clone(),
                },
            )
            .with_to(dispatcher_jid()),
        )
        .await;
    let reply = w.wait_reply(q).await.unwrap().expect("a <job-status/>");
    let failure = reply
        .get_child("failure", spine_protocol::NS)
        .expect("a <failure/>");
    assert_eq!(failure.attr("field"), Some("size"), "{reply:?}");
    assert_eq!(JobStatus::try_from(reply).unwrap().outcome, expected);

    farm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_argument_is_refused_naming_the_accepted_ones() {
    let farm = Farm::start().await;

    // The issue's case: `width` (the old docs' name) on a capability that reads `size` used to
    // return a 128×96 thumbnail.
    let job = farm.run(thumbnail(json!({"width": 64}))).await;
    let e = bad_arguments(&job);
    assert_eq!(e["field"], "width", "{job}");
    assert_eq!(
        e["message"],
        "is not an argument of this capability: this capability accepts only columns, format, size, tile",
        "{job}"
    );

    // The right name works.
    let job = farm.run(thumbnail(json!({"size": 64}))).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["meta"]["width"], 64, "{job}");

    // An image batch still runs: each step gets every argument of the submission (the
    // thumbnails `columns`, the contact sheet `size`), and each takes its partner's.
    let fragments: Vec<Fragment> = (0..2)
        .map(|i| Fragment::new(png()).with_name(format!("{i}.png")))
        .collect();
    let job = farm
        .run(json!({
            "capability": "image.thumbnail",
            "reduce": "image.contact-sheet",
            "args": {"size": 32, "columns": 2},
            "fragments": fragments,
        }))
        .await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["meta"]["images"], 2, "{job}");
    // Two 32 px cells across with 8 px gaps: 8 + 2 × 40.
    assert_eq!(job["result"]["meta"]["width"], 88, "{job}");

    farm.stop().await;
}
