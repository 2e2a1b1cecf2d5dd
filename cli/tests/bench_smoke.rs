//! Every `spine bench` scenario runs at a tiny size in the test command, so the benchmarks
//! cannot rot: the command exits 0, prints its table and writes JSON with real figures.

use std::process::Command;

#[test]
fn placement_runs_small_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("placement.json");
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args([
            "bench",
            "placement",
            "--agents",
            "8",
            "--jobs",
            "500",
            "--bursts",
            "2",
            "--burst-interval",
            "1",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("stale least-loaded"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let outcomes = r["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 6);
    for o in outcomes {
        assert_eq!(o["completed"], 500, "{o}");
        assert!(o["ratio"].as_f64().unwrap() >= 0.999, "{o}");
    }
    assert!(r["bound_s"].as_f64().unwrap() > 0.0);

    // Nonsense is refused with the option named.
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "placement", "--agents", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agents"));
}

#[test]
fn payload_runs_small_and_checks_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("payload.json");
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "payload", "--mib", "1", "--runs", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("raw TCP loopback copy"), "{stdout}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["bytes"], 1024 * 1024);
    assert!(r["bus_mb_s"].as_f64().unwrap() > 0.0);
    assert!(r["raw_mb_s"].as_f64().unwrap() > r["bus_mb_s"].as_f64().unwrap());
}
