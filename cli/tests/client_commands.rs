//! `spine submit --wait`, `spine agents` and `spine jobs` as real processes against a
//! dispatcher's HTTP API, with a real agent on the embedded server.

use std::time::Duration;

use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_dispatcher::{Dispatcher, DispatcherConfig};
use spine_integration::{TestServer, PATIENCE};
use tokio::process::Command;

async fn spine(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        PATIENCE * 3,
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(args)
            .env_remove("SPINE_TOKEN")
            .output(),
    )
    .await
    .expect("spine command finished")
    .expect("run spine");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_agents_and_jobs() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\n",
        server.addr,
        dir.path().display()
    ))
    .unwrap();
    let d = Dispatcher::bind(cfg).await.unwrap();
    let api = format!("http://{}", d.http_addr().unwrap());
    tokio::spawn(d.run(std::future::pending::<()>()));
    let agent_cfg = AgentConfig::from_toml(&format!(
        "jid = \"agent1@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"1s\"\n[attributes]\nzone = \"eu-1\"\n",
        server.addr
    ))
    .unwrap();
    let agent = Agent::builder(agent_cfg)
        .capability("text.upper", None, |ctx: JobContext| async move {
            ctx.progress(50, "shouting");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let times = ctx.args.get("times").and_then(|v| v.as_u64()).unwrap_or(1) as usize;
            let text = String::from_utf8(ctx.input)
                .map_err(|_| JobError::bad_argument("input", "must be UTF-8"))?;
            Ok::<_, JobError>(
                Output::bytes(text.to_uppercase().repeat(times)).with_mime("text/plain"),
            )
        })
        .build()
        .unwrap();
    tokio::spawn(agent.run(std::future::pending::<()>()));

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let table = loop {
        let (code, out, err) =
            spine(&["agents", "--capability", "text.upper", "--api", &api]).await;
        assert_eq!(code, 0, "{err}");
        if out.contains("agent1@localhost/w") {
            break out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never listed:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        table.contains("zone=eu-1") && table.contains("ready"),
        "{table}"
    );

    let input = dir.path().join("in.txt");
    std::fs::write(&input, "hello").unwrap();
    let in_arg = input.display().to_string();
    let (code, out, err) = spine(&[
        "submit",
        "text.upper",
        "--input",
        &in_arg,
        "--arg",
        "times=2",
        "--wait",
        "--api",
        &api,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "HELLOHELLO");
    assert!(err.contains("accepted"), "{err}");

    let outfile = dir.path().join("out.txt");
    let out_arg = outfile.display().to_string();
    let (code, _, err) = spine(&[
        "submit",
        "text.upper",
        "--input",
        &in_arg,
        "--wait",
        "--output",
        &out_arg,
        "--api",
        &api,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&outfile).unwrap(), "HELLO");

    let (code, out, _) = spine(&["jobs", "--api", &api]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("text.upper") && l.contains("succeeded"))
            .count(),
        2,
        "{out}"
    );
    let id = out
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (code, out, _) = spine(&["jobs", &id, "--api", &api]).await;
    assert_eq!(code, 0);
    assert!(out.contains("\"state\": \"succeeded\""), "{out}");
    // Its output to a file; --follow of a finished job shows it at once.
    let outfile2 = dir.path().join("out2.txt");
    let out2 = outfile2.display().to_string();
    let (code, _, err) = spine(&["jobs", &id, "--output", &out2, "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&outfile2).unwrap(), "HELLO");
    let (code, out, err) = spine(&["jobs", &id, "--follow", "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"state\": \"succeeded\""), "{out}");

    // Every agent, with the capabilities each offers; the capabilities with their agents.
    let (code, out, err) = spine(&["agents", "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("agent1@localhost/w"))
        .unwrap_or_default();
    assert!(
        line.contains("text.upper") && line.contains("ready"),
        "{out}"
    );
    let (code, out, err) = spine(&["agents", "--where", "zone == \"us-1\"", "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("agent1@localhost/w"), "filtered out:\n{out}");
    let (code, out, err) = spine(&["capabilities", "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("text.upper"))
        .unwrap_or_default();
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        ["text.upper", "1", "0"],
        "{out}"
    );

    // Cancel: a job that has not ended, then an unknown one (exit 1, named).
    let (code, id, err) = spine(&["submit", "text.upper", "--input", &in_arg, "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();
    let (code, out, err) = spine(&["cancel", &id, "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim() == format!("{id} cancelled") || out.trim() == format!("{id} succeeded"),
        "cancelled, or already done: {out}"
    );
    let (code, _, err) = spine(&["cancel", "no-such-job", "--api", &api]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no-such-job") && err.contains("404"), "{err}");

    let (code, _, err) = spine(&[
        "submit",
        "text.upper",
        "--strategy",
        "fastest",
        "--api",
        &api,
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("400 bad-request (field 'strategy')"), "{err}");
    let (code, _, err) = spine(&["submit", "text.upper", "--arg", "novalue", "--api", &api]).await;
    assert_ne!(code, 0);
    assert!(err.contains("expected NAME=VALUE"), "{err}");
}

/// `spine submit --wait` of a job an agent refused for one of its arguments names the argument
/// (issue 15, items 5 and 6): a value out of range, and an argument the capability does not
/// take, each with the image example's agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_argument_is_named_on_the_failure_line() {
    use spine_integration::farm::{
        agent_config, run_agent, start_http_dispatcher, wait_for_agents,
    };
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (dispatcher, api) = start_http_dispatcher(&server, dir.path(), "").await;
    let agent = spine_example_image::register(Agent::builder(agent_config(&server, 1, "")));
    let agent = run_agent(agent.build().unwrap());
    wait_for_agents(&api, "image.thumbnail", 1).await;
    let png = dir.path().join("in.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([200, 10, 10]))
        .save(&png)
        .unwrap();
    let png = png.display().to_string();
    for (arg, line) in [
        (
            "size=-5",
            "failed: field 'size': must be an integer from 1 to 16384 (bad-arguments)",
        ),
        (
            "width=64",
            "failed: field 'width': is not an argument of this capability: this capability accepts only columns, format, size, tile (bad-arguments)",
        ),
    ] {
        let (code, out, err) = spine(&[
            "submit",
            "image.thumbnail",
            "--arg",
            arg,
            "--input",
            &png,
            "--wait",
            "--api",
            &api,
        ])
        .await;
        assert_eq!(code, 1, "--arg {arg}: {err}");
        assert!(out.is_empty(), "--arg {arg}: no output: {out}");
        assert!(err.contains(line), "--arg {arg}: {err}");
    }
    agent.stop();
    dispatcher.stop();
}
