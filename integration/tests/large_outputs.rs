//! Outputs over the inline limit reach an XMPP submitter whole (issue 15, item 13): a real
//! agent returns them to the dispatcher as a blob, and the dispatcher sends them on to the
//! submitter as chunks before the `<job-status>` that references them (PROTOCOL.md §11.3,
//! §13.1), in watch mode and in a `<status>` reply alike. A submitter that does not take
//! chunks is told what was left out, never given a result that silently lacks its output.

use jid::Jid;
use sha2::{Digest as _, Sha256};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::dispatcher::TestDispatcher;
use spine_integration::farm::{
    agent_config, run_agent, start_http_dispatcher, wait_for_agents, Running,
};
use spine_integration::TestServer;
use spine_protocol::{Accepted, Args, Data, JobId, JobState, JobStatus, Outcome, Submit};

const ACCOUNTS: &[(&str, &str)] = &[("dispatcher", "pw-d"), ("webapp", "pw-w"), ("agent1", "pw")];

/// The 300 KiB the issue names: well over the 64 KiB inline limit, five chunks.
const LARGE: u64 = 300 * 1024;

fn dispatcher() -> Jid {
    "dispatcher@localhost/d1".parse().unwrap()
}

/// `n` bytes that differ from one job to the next (`seed`) and along the output.
fn pattern(n: u64, seed: u64) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97) >> 7) as u8)
        .collect()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The embedded server, a dispatcher (with its HTTP API at `base`), an agent offering
/// `work.big` and an XMPP submitter, `webapp@localhost`.
struct Bus {
    _server: TestServer,
    _dir: tempfile::TempDir,
    dispatcher: Running,
    base: String,
    agent: Running,
    w: TestDispatcher,
}

impl Bus {
    async fn start() -> Bus {
        let server = TestServer::start(ACCOUNTS).await;
        let dir = tempfile::tempdir().unwrap();
        let submitters = "submitters = [\"webapp@localhost\"]\n";
        let (dispatcher, base) = start_http_dispatcher(&server, dir.path(), submitters).await;
        let agent = big_agent(&server);
        wait_for_agents(&base, "work.big", 1).await;
        let w = TestDispatcher::new(server.client("webapp", "pw-w").await).await;
        Bus {
            _server: server,
            _dir: dir,
            dispatcher,
            base,
            agent,
            w,
        }
    }

    fn stop(self) {
        self.agent.stop();
        self.dispatcher.stop();
    }
}

/// An agent whose `work.big` answers `{"bytes": n, "seed": s}` with [`pattern`]`(n, s)`.
fn big_agent(server: &TestServer) -> Running {
    let agent = Agent::builder(agent_config(server, 1, ""))
        .capability("work.big", None, |ctx: JobContext| async move {
            let n = ctx.arg_u64("bytes", 0..=(64 << 20))?;
            let seed = ctx.arg_u64("seed", 0..=u64::MAX)?;
            Ok::<_, JobError>(
                Output::bytes(pattern(n, seed))
                    .with_mime("application/octet-stream")
                    .with_meta("bytes", n),
            )
        })
        .build()
        .unwrap();
    run_agent(agent)
}

/// Submits a `work.big` job of `bytes` bytes over XMPP, watched; returns its id.
async fn submit(w: &mut TestDispatcher, bytes: u64, seed: u64) -> JobId {
    submit_with(w, bytes, seed, false).await
}

/// The same, taking a large output by reference (`refs='true'`, protocol 1.1) or not.
async fn submit_with(w: &mut TestDispatcher, bytes: u64, seed: u64, refs: bool) -> JobId {
    let mut s = Submit::new("work.big".parse().unwrap());
    s.watch = true;
    s.refs = refs;
    s.args = Args(
        serde_json::json!({ "bytes": bytes, "seed": seed })
            .as_object()
            .cloned()
            .unwrap(),
    );
    let id = w.send_set(&dispatcher(), s).await;
    let reply = w.wait_reply(&id).await.expect("submission accepted");
    Accepted::try_from(reply.expect("an <accepted/> payload"))
        .unwrap()
        .job
}

/// The output of a succeeded status, which must be whole (inline once resolved).
fn output_of(st: &JobStatus) -> (&[u8], Option<&str>, &Args) {
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    match &st.outcome {
        Some(Outcome::Result(r)) => match &r.output {
            Some(Data::Inline { bytes, mime }) => (bytes, mime.as_deref(), &r.meta),
            other => panic!(
                "job {}: the result carries no output ({other:?}): {} bytes silently lost",
                st.job, r.meta.0["bytes"]
            ),
        },
        other => panic!("job {}: not a result: {other:?}", st.job),
    }
}

fn check_whole(st: &JobStatus, bytes: u64, seed: u64, how: &str) {
    let (out, mime, meta) = output_of(st);
    let want = pattern(bytes, seed);
    assert_eq!(out.len() as u64, bytes, "{how}: output length");
    assert_eq!(sha256(out), sha256(&want), "{how}: output SHA-256");
    assert_eq!(mime, Some("application/octet-stream"), "{how}: type");
    assert_eq!(meta.0["bytes"], bytes, "{how}: meta");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_output_reaches_an_xmpp_submitter_whole_by_watch_and_by_status() {
    let mut bus = Bus::start().await;
    let w = &mut bus.w;

    // 300 KiB: pushed to the watcher, then asked for with <status>.
    let job = submit(w, LARGE, 1).await;
    let pushed = w.wait_final_status(&job).await;
    check_whole(&pushed, LARGE, 1, "watch message");
    let asked = w.status(&dispatcher(), &job).await.expect("status reply");
    check_whole(&asked, LARGE, 1, "status reply");
    // Asked again: a second transfer, as whole as the first.
    let again = w.status(&dispatcher(), &job).await.expect("status reply");
    check_whole(&again, LARGE, 1, "second status reply");

    // Around the inline limit: the largest inline output, and one byte more in a blob.
    for (bytes, seed) in [(65_536, 2), (65_537, 3), (0, 4)] {
        let job = submit(w, bytes, seed).await;
        let pushed = w.wait_final_status(&job).await;
        let asked = w.status(&dispatcher(), &job).await.expect("status reply");
        if bytes == 0 {
            // An empty output is no output (as before).
            for st in [&pushed, &asked] {
                assert!(
                    matches!(&st.outcome, Some(Outcome::Result(r)) if r.output.is_none()),
                    "{st:?}"
                );
            }
            continue;
        }
        check_whole(
            &pushed,
            bytes,
            seed,
            &format!("watch message, {bytes} bytes"),
        );
        check_whole(&asked, bytes, seed, &format!("status reply, {bytes} bytes"));
    }

    // Several large outputs finishing together all arrive whole, to the same watcher.
    let jobs: Vec<(JobId, u64)> = {
        let mut v = Vec::new();
        for seed in 10..16 {
            v.push((submit(w, LARGE + seed, seed).await, seed));
        }
        v
    };
    for (job, seed) in &jobs {
        let st = w.wait_final_status(job).await;
        check_whole(&st, LARGE + seed, *seed, "one of six watch messages");
    }
    bus.stop();
}

/// A submitter without PROTOCOL.md §13 (as slixmpp answers an IQ it has no handler for) is
/// not given a result that silently lacks its output: the status says the output was left
/// out, with its size and SHA-256, and the HTTP API serves it whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_that_refuses_chunks_is_told_what_was_left_out() {
    let mut bus = Bus::start().await;
    let w = &mut bus.w;
    w.refuse_chunks = true;

    let job = submit(w, LARGE, 5).await;
    let want = pattern(LARGE, 5);
    let pushed = w.wait_final_status(&job).await;
    let asked = w.status(&dispatcher(), &job).await.expect("status reply");
    for (st, how) in [(&pushed, "watch message"), (&asked, "status reply")] {
        assert_eq!(st.state, JobState::Succeeded, "{how}: {st:?}");
        match &st.outcome {
            Some(Outcome::Truncated(r, left_out)) => {
                assert_eq!(r.output, None, "{how}");
                assert_eq!(r.meta.0["bytes"], LARGE, "{how}: meta");
                assert_eq!(left_out.size, LARGE, "{how}: size");
                assert_eq!(left_out.sha256, sha256(&want), "{how}: SHA-256");
                assert_eq!(
                    left_out.mime.as_deref(),
                    Some("application/octet-stream"),
                    "{how}: type"
                );
            }
            other => panic!("{how}: the output was not marked left out: {other:?}"),
        }
    }

    // Where the status says to fetch it: the HTTP API, whole.
    let api = spine_client::Client::new(&bus.base, None).unwrap();
    let out = api
        .output(&api.job(job.as_str()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(sha256(&out), sha256(&want));
    let w = &mut bus.w;

    // The same submitter, taking chunks again, gets the next large output whole.
    w.refuse_chunks = false;
    let job = submit(w, LARGE, 6).await;
    check_whole(&w.wait_final_status(&job).await, LARGE, 6, "watch message");
    bus.stop();
}

/// A submitter that asked for references (`refs='true'`) gets a 50 MiB output as a signed URL
/// in its watch message and status reply, and fetches it whole over HTTP: the bytes never
/// cross the XMPP server (issue 17). The agent uploaded it to its slot (protocol 1.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xmpp_submitter_fetches_a_50_mib_output_by_its_url() {
    const BIG: u64 = 50 << 20;
    let mut bus = Bus::start().await;
    let w = &mut bus.w;
    let job = submit_with(w, BIG, 21, true).await;
    let pushed = w.wait_final_status(&job).await;
    let asked = w.status(&dispatcher(), &job).await.expect("status reply");
    let want = sha256(&pattern(BIG, 21));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for (st, how) in [(&pushed, "watch message"), (&asked, "status reply")] {
        assert_eq!(st.state, JobState::Succeeded, "{how}: {st:?}");
        let Some(Outcome::Result(r)) = &st.outcome else {
            panic!("{how}: {st:?}");
        };
        let Some(Data::Ref(d)) = &r.output else {
            panic!("{how}: not a reference: {:?}", r.output);
        };
        assert_eq!((d.size, d.sha256), (BIG, want), "{how}");
        let url = &d.sources[0];
        assert!(url.contains("agent=webapp%40localhost"), "{how}: {url}");
        let body = http.get(url).send().await.unwrap();
        assert_eq!(body.status().as_u16(), 200, "{how}");
        let bytes = body.bytes().await.unwrap();
        assert_eq!(bytes.len() as u64, BIG, "{how}");
        assert_eq!(sha256(&bytes), want, "{how}: the bytes behind the URL");
        // Signed for this submitter and job: another's name in it is refused.
        let forged = url.replace("agent=webapp%40localhost", "agent=other%40localhost");
        assert_eq!(
            http.get(&forged).send().await.unwrap().status().as_u16(),
            403,
            "{how}"
        );
    }
    bus.stop();
}
