//! Every curl example of the docs runs as written (issue 15, item 4): the ```sh blocks of
//! docs/*.md and README.md that run `curl` are run, in document order, by bash with
//! `errexit` and `pipefail`, as real `curl` processes, against a live dispatcher with a token
//! and an agent offering the capabilities the examples use, the way
//! protocol/tests/doc_examples.rs parses PROTOCOL.md's XML examples.
//!
//! What the test changes in a block, and nothing else: `http://127.0.0.1:8480` becomes the
//! dispatcher's address, `$SPINE_TOKEN` is set to its token, the example job id of
//! docs/dispatcher.md becomes a job that this test ran, and `photo.png` exists in the working
//! directory. `curl` is a wrapper, first on `PATH`, that runs the real one with a time limit
//! and reports each response's status on stderr. A block fails when a command exits non-zero
//! or a response's status is 400 or more; an HTML comment on the line before the block
//! changes that: `<!-- curl-test: status 422 -->` expects that status of every response, and
//! `<!-- curl-test: skip (reason) -->` leaves the block out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher};
use spine_integration::{repo_root, TestServer, PATIENCE};

/// Where the docs' examples send their requests.
const DOC_BASE: &str = "http://127.0.0.1:8480";
/// The job id of the docs' examples (docs/dispatcher.md §6 and §8).
const DOC_JOB: &str = "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44";
const TOKEN: &str = "doc-examples-token-0123456789";
/// Longest a command may take (curl's own limit is below it).
const COMMAND_TIME: Duration = Duration::from_secs(30);
/// Fewest curl blocks the docs hold: a broken extractor must not pass by finding none.
const AT_LEAST: usize = 12;
/// A 1×1 PNG, for `--data-binary @photo.png`.
const PHOTO_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// What a marker asks of a block.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Every response below 400 (the default).
    Success,
    /// Every response with this status.
    Status(u16),
    /// Not run.
    Skip,
}

/// One curl block: where it is, what it runs and what it must answer.
#[derive(Debug)]
struct Block {
    file: String,
    line: usize,
    text: String,
    expect: Expect,
}

/// Reads a `<!-- curl-test: … -->` marker; `None` for any other line, an error for a marker
/// it does not understand.
fn marker(line: &str) -> Option<Result<Expect, String>> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("curl-test:")?
        .trim();
    Some(if inner == "skip" || inner.starts_with("skip ") {
        Ok(Expect::Skip)
    } else if let Some(code) = inner.strip_prefix("status ") {
        code.trim()
            .parse::<u16>()
            .map(Expect::Status)
            .map_err(|e| format!("'{inner}': {e}"))
    } else {
        Err(format!(
            "'{inner}': expected 'skip (reason)' or 'status NNN'"
        ))
    })
}

/// The ```sh blocks of `text` that run curl, with the marker before each; errors for a marker
/// that is not understood or not followed by a curl block.
fn curl_blocks(file: &str, text: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    // An open fence: its line, its text, and its marker (`None`: not a shell block).
    let mut current: Option<(usize, String, Option<Expect>)> = None;
    let mut pending: Option<(usize, Expect)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut current {
            Some((start, body, expect)) if trimmed.starts_with("```") => {
                let runs_curl = body.lines().any(|l| l.trim_start().starts_with("curl "));
                match expect.take() {
                    Some(expect) if runs_curl => blocks.push(Block {
                        file: file.to_owned(),
                        line: *start,
                        text: std::mem::take(body),
                        expect,
                    }),
                    Some(Expect::Success) | None => {}
                    Some(_) => {
                        return Err(format!(
                            "{file}:{start}: a curl-test marker before a block without curl"
                        ))
                    }
                }
                current = None;
            }
            Some((_, body, _)) => {
                body.push_str(line);
                body.push('\n');
            }
            None if trimmed.starts_with("```") => {
                let lang = trimmed.trim_start_matches('`').trim();
                let expect = pending.take().map(|(_, e)| e);
                let shell = matches!(lang, "sh" | "bash" | "shell");
                if !shell && expect.is_some() {
                    return Err(format!(
                        "{file}:{}: a curl-test marker before a ```{lang} block",
                        n + 1
                    ));
                }
                current = Some((
                    n + 1,
                    String::new(),
                    shell.then(|| expect.unwrap_or(Expect::Success)),
                ));
            }
            None => {
                if let Some((at, _)) = &pending {
                    if !trimmed.is_empty() {
                        return Err(format!(
                            "{file}:{at}: a curl-test marker must be right before a ```sh block"
                        ));
                    }
                }
                match marker(line) {
                    Some(Ok(e)) => pending = Some((n + 1, e)),
                    Some(Err(e)) => return Err(format!("{file}:{}: {e}", n + 1)),
                    None => {}
                }
            }
        }
    }
    if let Some((start, ..)) = current {
        return Err(format!("{file}:{start}: unterminated ``` block"));
    }
    if let Some((at, _)) = pending {
        return Err(format!(
            "{file}:{at}: a curl-test marker at the end of the file"
        ));
    }
    Ok(blocks)
}

/// docs/*.md (by name) and README.md, as (name relative to the repository, text).
fn doc_files() -> Vec<(String, String)> {
    let root = repo_root();
    let mut names: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    names.sort();
    names.push(root.join("README.md"));
    names
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let name = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            (name, text)
        })
        .collect()
}

/// The real curl on PATH, if any.
fn real_curl() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("curl"))
            .find(|p| p.is_file())
    })
}

/// A `curl` first on PATH that runs `real` with a time limit and reports each response's
/// status on stderr.
fn curl_wrapper(dir: &Path, real: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin/");
    let script = format!(
        "#!/bin/sh\nexec '{}' --max-time 20 -w '%{{stderr}}curl-test-status: %{{http_code}}\\n' \"$@\"\n",
        real.display()
    );
    let path = bin.join("curl");
    std::fs::write(&path, script).expect("curl wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// agent1 with the capabilities and attributes of the docs' examples; each job echoes its
/// input (a map/reduce's reduce joins its fragments).
fn doc_agent(server: &TestServer) -> Agent {
    let echo = |ctx: JobContext| async move { Ok::<_, JobError>(Output::bytes(ctx.input)) };
    Agent::builder(agent_config(server, 1, "slots = 4"))
        .attribute("gpu", "true")
        .attribute("zone", "eu-1")
        .attribute("cost", "0.10")
        .capability("image.thumbnail", None, echo)
        .capability("wordcount.map", None, echo)
        .capability("wordcount.reduce", None, echo)
        .build()
        .expect("doc agent")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

async fn api(method: reqwest::Method, url: String, body: Option<Value>) -> Value {
    let mut r = http().request(method, url).bearer_auth(TOKEN);
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = r.send().await.expect("API request");
    serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default()
}

/// A succeeded image.thumbnail job of this dispatcher, to stand for the docs' example job.
async fn example_job(base: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let caps = api(
            reqwest::Method::GET,
            format!("{base}/v1/capabilities"),
            None,
        )
        .await;
        let n = caps["capabilities"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|c| c["agents"] == json!(1)).count());
        if n == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the doc agent did not register: {caps}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let accepted = api(
        reqwest::Method::POST,
        format!("{base}/v1/jobs"),
        Some(json!({"capability": "image.thumbnail", "input": "aGVsbG8=", "input_type": "image/png"})),
    )
    .await;
    let id = accepted["id"].as_str().expect("job id").to_owned();
    loop {
        let job = api(reqwest::Method::GET, format!("{base}/v1/jobs/{id}"), None).await;
        if job["state"] == "succeeded" {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "the example job did not succeed: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one block; `Err` says why it failed.
async fn run(block: &Block, base: &str, job: &str, dir: &Path, bin: &Path) -> Result<(), String> {
    let script = block.text.replace(DOC_BASE, base).replace(DOC_JOB, job);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = tokio::process::Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(dir)
        .env("PATH", path)
        .env("SPINE_TOKEN", TOKEN)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(COMMAND_TIME, child)
        .await
        .map_err(|_| format!("did not finish within {COMMAND_TIME:?}"))?
        .map_err(|e| format!("cannot run bash: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let statuses: Vec<u16> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("curl-test-status: "))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let why = if !out.status.success() {
        Some(format!("exited with {}", out.status))
    } else if statuses.is_empty() {
        Some("made no request".to_owned())
    } else {
        match block.expect {
            Expect::Status(want) if statuses.iter().any(|s| *s != want) => {
                Some(format!("HTTP status {statuses:?}, expected {want}"))
            }
            Expect::Success if statuses.iter().any(|s| *s == 0 || *s >= 400) => {
                Some(format!("HTTP status {statuses:?}"))
            }
            _ => None,
        }
    };
    match why {
        None => Ok(()),
        Some(why) => Err(format!(
            "{why}\n--- command\n{script}--- stdout\n{stdout}\n--- stderr\n{stderr}"
        )),
    }
}

#[test]
fn markers_are_read_strictly() {
    let doc = "text\n\n<!-- curl-test: status 422 -->\n```sh\ncurl -sS http://x/\n```\n\n```toml\na = 1\n```\n<!-- curl-test: skip (needs a file) -->\n```sh\ncurl -sS -T big http://x/\n```\n```sh\necho no curl\n```\n```sh\ncurl http://y/\n```\n";
    let blocks = curl_blocks("t.md", doc).expect("parses");
    let got: Vec<(usize, Expect)> = blocks.iter().map(|b| (b.line, b.expect.clone())).collect();
    assert_eq!(
        got,
        vec![
            (4, Expect::Status(422)),
            (12, Expect::Skip),
            (18, Expect::Success)
        ]
    );
    for bad in [
        "<!-- curl-test: status abc -->\n```sh\ncurl x\n```\n",
        "<!-- curl-test: maybe -->\n```sh\ncurl x\n```\n",
        "<!-- curl-test: skip -->\nsome text\n```sh\ncurl x\n```\n",
        "<!-- curl-test: skip -->\n```text\ncurl x\n```\n",
        "<!-- curl-test: skip -->\n```sh\necho x\n```\n",
        "```sh\ncurl x\n",
    ] {
        assert!(curl_blocks("t.md", bad).is_err(), "accepted: {bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_curl_example_in_the_docs_runs_against_a_live_dispatcher() {
    let Some(real) = real_curl() else {
        if spine_integration::servers::required() {
            panic!("curl is not installed (SPINE_REQUIRE_SERVERS=1; .ci/run installs it)");
        }
        eprintln!("skipped: curl is not installed");
        return;
    };
    let mut blocks = Vec::new();
    for (name, text) in doc_files() {
        blocks.extend(curl_blocks(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(
        blocks.len() >= AT_LEAST,
        "found {} curl blocks in docs/*.md and README.md, expected at least {AT_LEAST}",
        blocks.len()
    );

    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    let extra = format!(
        "[[http_token]]\nname = \"docs\"\ntoken = \"{TOKEN}\"\ncapabilities = [\"*\"]\nall_jobs = true\n"
    );
    let (dispatcher, base) = start_http_dispatcher(&server, &data, &extra).await;
    let agent = run_agent(doc_agent(&server));
    let job = example_job(&base).await;
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(PHOTO_PNG)
        .expect("PNG");
    std::fs::write(work.join("photo.png"), png).expect("photo.png");
    let bin = curl_wrapper(dir.path(), &real);

    let started = Instant::now();
    let mut failures = Vec::new();
    let mut ran = 0;
    for b in blocks.iter().filter(|b| b.expect != Expect::Skip) {
        ran += 1;
        if let Err(why) = run(b, &base, &job, &work, &bin).await {
            failures.push(format!("{}:{}: {why}", b.file, b.line));
        }
    }
    println!(
        "{ran} curl examples run in {:?} ({} skipped by marker)",
        started.elapsed(),
        blocks.len() - ran
    );
    agent.stop();
    dispatcher.stop();
    assert!(
        failures.is_empty(),
        "{} of {ran} curl examples failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
