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

    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("stops in time")
        .unwrap();
    assert!(status.success(), "{status}");
}
