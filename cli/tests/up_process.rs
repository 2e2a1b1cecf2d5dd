//! `spine up` as a real process: server, dispatcher and agents in one; a job submitted with
//! `spine submit --wait` runs; SIGTERM stops everything and the process exits 0.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const PATIENCE: Duration = Duration::from_secs(20);

async fn spine(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        PATIENCE,
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(args)
            .output(),
    )
    .await
    .expect("spine finished")
    .expect("run spine");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn up_runs_jobs_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args([
            "up",
            "--agents",
            "2",
            "--xmpp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (console, api) = tokio::time::timeout(PATIENCE, async {
        // The console's URL comes first, on a line of its own.
        let first = lines.next_line().await.unwrap().expect("a banner");
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("HTTP API ").nth(1) {
                return (first, rest.split(',').next().unwrap().to_owned());
            }
        }
        panic!("spine up printed no HTTP API address");
    })
    .await
    .expect("spine up started");
    assert_eq!(console, format!("console: {api}/ui"));
    // The console is there: its page, embedded in the binary.
    let page = reqwest::get(format!("{api}/ui")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html")));
    assert!(page.text().await.unwrap().contains("<main id=\"main\""));

    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, out, _) = spine(&["agents", "--capability", "text.upper", "--api", &api]).await;
        if out.lines().filter(|l| l.contains("@localhost/up")).count() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agents not registered:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "spine up").unwrap();
    let (code, out, err) = spine(&[
        "submit",
        "text.upper",
        "--input",
        &input.display().to_string(),
        "--wait",
        "--api",
        &api,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "SPINE UP");
    assert!(
        dir.path().join("dispatcher/jobs.redb").exists(),
        "state in --data-dir"
    );

    // An image job: a 100×60 PNG thumbnailed to fit 32×32.
    let png = dir.path().join("in.png");
    image::RgbImage::from_fn(100, 60, |x, _| {
        if x < 50 {
            image::Rgb([200, 10, 10])
        } else {
            image::Rgb([10, 10, 200])
        }
    })
    .save(&png)
    .unwrap();
    let thumb = dir.path().join("thumb.png");
    let (code, _, err) = spine(&[
        "submit",
        "image.thumbnail",
        "--arg",
        "size=32",
        "--input",
        &png.display().to_string(),
        "--wait",
        "--output",
        &thumb.display().to_string(),
        "--api",
        &api,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let t = image::open(&thumb).unwrap();
    assert_eq!(t.width(), 32);
    assert!(
        (19..=20).contains(&t.height()),
        "aspect ratio kept: {}x{}",
        t.width(),
        t.height()
    );

    // A map/reduce from the command line: one fragment per file, counted by the local agents.
    let texts = dir.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    let files = [
        "The cat sat on the mat.",
        "THE DOG; the cat!",
        "Été, été, ÉTÉ 42",
    ];
    for (i, t) in files.iter().enumerate() {
        std::fs::write(texts.join(format!("{i}.txt")), t).unwrap();
    }
    let (code, out, err) = spine(&[
        "submit",
        "wordcount.map",
        "--reduce",
        "wordcount.reduce",
        "--fan-in",
        "2",
        "--fragments-dir",
        &texts.display().to_string(),
        "--wait",
        "--api",
        &api,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let counts: Vec<(String, u64)> = serde_json::from_str(&out).unwrap();
    assert_eq!(counts, spine_integration::farm::plain_word_count(files));
    assert_eq!(counts[0], ("the".to_string(), 4));

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("stops in time")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn up_demo_exits_0_and_its_counts_equal_a_single_process_count() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    // The default ports taken (by us, or by whoever holds them already): --demo picks free
    // ones by itself.
    let _hold = hold_default_ports();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["up", "--demo", "--agents", "2", "--data-dir", &data])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the demo finishes")
    .expect("run spine up --demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("equal to a single-process count"),
        "{stdout}"
    );
    assert!(stdout.contains("demo finished in"), "{stdout}");
    // The console first; at the end, how to keep it up to look at the demo's jobs.
    let lines: Vec<&str> = stdout.lines().collect();
    let api = stdout
        .split("HTTP API ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("the banner names the HTTP API");
    assert_eq!(lines[0], format!("console: {api}/ui"), "{stdout}");
    assert_eq!(
        lines.last().copied(),
        Some(format!("open the console at {api}/ui: run `spine up --demo --stay` to keep it up after the demo").as_str()),
        "{stdout}"
    );

    // The word counts, against a plain count of the same bundled corpus.
    let counts: Vec<(String, u64)> =
        serde_json::from_slice(&std::fs::read(dir.path().join("wordcount.json")).unwrap()).unwrap();
    let expected = spine_integration::farm::plain_word_count(
        spine_example_wordcount::CORPUS.iter().map(|(_, t)| *t),
    );
    assert!(
        expected.len() > 1000,
        "a real corpus: {} words",
        expected.len()
    );
    assert_eq!(counts, expected);

    // The contact sheet: 16 thumbnails (96×64) in a 4×4 grid of 96 px cells, 8 px apart on a
    // dark background, each in its own colour.
    let sheet = image::open(dir.path().join("contact-sheet.png"))
        .unwrap()
        .to_rgba8();
    assert_eq!(sheet.dimensions(), (424, 424));
    let background = image::Rgba([32, 32, 32, 255]);
    assert_eq!(*sheet.get_pixel(3, 3), background);
    assert_eq!(
        *sheet.get_pixel(8 + 20, 8 + 10),
        background,
        "above a thumbnail"
    );
    let mut seen = Vec::new();
    for i in 0..16u32 {
        let (x, y) = (8 + (i % 4) * 104, 8 + (i / 4) * 104 + 16);
        // The bottom-right corner of each thumbnail: gradient colour, never the disc.
        let p = *sheet.get_pixel(x + 92, y + 60);
        assert_ne!(p, background, "thumbnail {i}");
        assert!(!seen.contains(&p), "thumbnail {i} repeats a colour: {p:?}");
        seen.push(p);
    }
}

/// `spine up --demo --stay`: the demo runs and succeeds, then the farm stays up (its API
/// still answers) with the console's URL printed, until SIGTERM; the exit code is the demo's.
#[tokio::test]
async fn up_demo_stay_keeps_the_farm_up_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().display().to_string();
    // The default ports taken (by us, or by whoever holds them already): --demo picks free
    // ones by itself.
    let _hold = hold_default_ports();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args([
            "up",
            "--demo",
            "--stay",
            "--agents",
            "2",
            "--data-dir",
            &data,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run spine up --demo --stay");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = Vec::new();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.starts_with("open the console at ");
            stdout.push(line);
            if done {
                return;
            }
        }
        panic!("spine up --demo --stay ended early:\n{}", stdout.join("\n"));
    })
    .await
    .expect("the demo finishes");
    let api = stdout
        .iter()
        .find_map(|l| l.split("HTTP API ").nth(1))
        .and_then(|rest| rest.split(',').next())
        .expect("the banner names the HTTP API")
        .to_owned();
    assert_eq!(stdout[0], format!("console: {api}/ui"), "the console first");
    assert_eq!(
        stdout.last().map(String::as_str),
        Some(
            format!("open the console at {api}/ui to look at the demo's jobs; Ctrl-C stops")
                .as_str()
        )
    );
    // Still up after the demo: the API answers.
    let (code, out, err) = spine(&["agents", "--capability", "text.upper", "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("@localhost/up")).count(),
        2,
        "{out}"
    );
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("stops in time")
        .unwrap();
    let stdout = stdout.join("\n");
    assert!(status.success(), "{status}\n{stdout}");
    assert!(
        stdout.contains("equal to a single-process count"),
        "{stdout}"
    );
    assert!(stdout.contains("demo finished in"), "{stdout}");
}

/// Listeners on 127.0.0.1:5222 and :8480 where they are free (where they are not, someone else
/// holds them, which serves as well).
fn hold_default_ports() -> Vec<std::net::TcpListener> {
    [5222, 8480]
        .into_iter()
        .filter_map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok())
        .collect()
}

/// `--stay` means "after the demo": alone it is refused, naming what it needs.
#[tokio::test]
async fn stay_without_demo_is_refused() {
    let (code, _, err) = spine(&["up", "--stay"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--demo"), "{err}");
}

#[tokio::test]
async fn a_taken_port_is_one_line_with_a_hint_and_exit_2() {
    let _hold = hold_default_ports();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["up", "--agents", "1"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("exits promptly")
    .expect("run spine up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "the cause once: {stderr}"
    );
    assert!(
        stderr.contains("pass --xmpp-listen 127.0.0.1:0 to take a free one"),
        "{stderr}"
    );
}

/// `spine up --agent-config FILE` runs an agent from an ordinary agent configuration (its
/// wrapped program), joined to the local bus whatever account and server the file names; a
/// file that wraps nothing is refused naming it.
#[tokio::test]
async fn up_runs_an_agent_from_an_agent_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("legacy.toml");
    std::fs::write(
        &cfg,
        "jid = \"build-07@example.com\"\npassword = \"not used\"\nserver = \"xmpp.example.com:5222\"\n\
         dispatchers = [\"dispatcher@example.com\"]\nslots = 3\n[attributes]\nsite = \"lab\"\n\
         [[capability]]\nname = \"legacy.shout\"\nkind = \"exec\"\nargv = [\"tr\", \"a-z\", \"A-Z\"]\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["up", "--agents", "1", "--xmpp-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0", "--agent-config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (api, banner) = tokio::time::timeout(PATIENCE, async {
        let mut api = None;
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("HTTP API ").nth(1) {
                api = Some(rest.split(',').next().unwrap().to_owned());
            }
            if line.starts_with("from --agent-config") {
                return (api.expect("the API line comes first"), line);
            }
        }
        panic!("spine up did not announce the configured agent");
    })
    .await
    .expect("spine up started");
    assert_eq!(banner, "from --agent-config: legacy.shout");
    let (code, out, err) = spine(&["agents", "--capability", "legacy.shout", "--api", &api]).await;
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("@localhost/up"))
        .unwrap_or_default();
    assert!(line.contains("0/3") && line.contains("site=lab"), "{out}");
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "wrapped").unwrap();
    let (code, out, err) = spine(&[
        "submit",
        "legacy.shout",
        "--input",
        &input.display().to_string(),
        "--wait",
        "--api",
        &api,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "WRAPPED");
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");

    // A configuration that wraps nothing: refused at once, naming the file.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "jid = \"a@b\"\ndispatchers = [\"d@b\"]\n").unwrap();
    let (code, _, err) = spine(&[
        "up",
        "--xmpp-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--agent-config",
        &empty.display().to_string(),
    ])
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("empty.toml") && err.contains("wraps no capability"),
        "{err}"
    );
}

/// `spine up --canaries 1s`: the built-in capabilities' canaries run on every local agent and
/// pass (their expected outputs are what the built-in handlers give).
#[tokio::test]
async fn up_canaries_run_on_every_local_agent_and_pass() {
    let (_child, api, _lines) = start_up(&["--agents", "2", "--canaries", "1s"], None).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let list: serde_json::Value = serde_json::from_str(
            &reqwest::get(format!("{api}/v1/canaries"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
        let all = list["canaries"].as_array().cloned().unwrap_or_default();
        let passed = all
            .iter()
            .filter(|c| c["last_ok"] == true && c["quarantined"] == false)
            .count();
        // Two agents, two capabilities each.
        if all.len() == 4 && passed == 4 {
            break;
        }
        assert!(
            all.iter().all(|c| c["failed"] == 0),
            "a built-in canary failed: {list}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the canaries did not all pass: {list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The output of a `spine up` process, by line.
type Output = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// `spine up ARGS` on free loopback ports (with `TMPDIR` = `tmp` when given), once its HTTP API
/// listens: the process, the API's URL and the rest of its output.
async fn start_up(
    args: &[&str],
    tmp: Option<&std::path::Path>,
) -> (tokio::process::Child, String, Output) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spine"));
    cmd.args(["up", "--xmpp-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(tmp) = tmp {
        cmd.env("TMPDIR", tmp);
    }
    let mut child = cmd.spawn().expect("start spine up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let api = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.split("HTTP API ").nth(1) {
                return rest.split(',').next().unwrap().to_owned();
            }
        }
        panic!("spine up printed no HTTP API address");
    })
    .await
    .expect("spine up started");
    (child, api, lines)
}

/// [`start_up`] without `--data-dir`, its temporary directories in `tmp`, one local agent.
async fn up_in(tmp: &std::path::Path) -> tokio::process::Child {
    let (child, _, mut lines) = start_up(&["--agents", "1"], Some(tmp)).await;
    // The rest of its output, read so that nothing it prints meets a closed pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// The entries of `dir` whose name starts with `prefix`.
fn entries(dir: &std::path::Path, prefix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_killed_ups_temporary_directories_are_deleted_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let mut first = up_in(tmp).await;
    // Its data directory (the job store, TLS keys) and its local agent's scratch directory.
    let data = entries(tmp, "spine-up-data-");
    assert_eq!(data.len(), 1, "{data:?}");
    assert!(data[0].join("dispatcher").is_dir());
    let scratch = entries(tmp, "spine-agent-");
    assert_eq!(scratch.len(), 1, "{scratch:?}");

    first.start_kill().expect("SIGKILL spine up");
    first.wait().await.expect("wait for spine up");
    assert!(
        data[0].is_dir() && scratch[0].is_dir(),
        "nothing deleted them"
    );

    // The next one deletes both and has its own.
    let mut second = up_in(tmp).await;
    let now = (entries(tmp, "spine-up-data-"), entries(tmp, "spine-agent-"));
    assert_eq!((now.0.len(), now.1.len()), (1, 1), "{now:?}");
    assert!(now.0[0] != data[0] && now.1[0] != scratch[0], "{now:?}");
    assert!(!data[0].exists() && !scratch[0].exists());

    // A clean stop leaves nothing.
    let pid = nix::unistd::Pid::from_raw(second.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(PATIENCE, second.wait())
        .await
        .expect("spine up stops")
        .expect("wait for spine up");
    assert!(status.success(), "exit status {status}");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}
