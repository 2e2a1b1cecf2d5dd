//! The bus-versus-transport benchmark runs at a tiny size in the test command, so it cannot
//! rot: it exits 0 and writes its four measurements and the ratios.

#[test]
fn bus_bench_runs_small() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bus.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bus-bench"))
        .arg("40")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for k in [
        "raw_sequential",
        "raw_window64",
        "bus_sequential",
        "bus_window64",
    ] {
        assert!(r[k]["per_sec"].as_f64().unwrap() > 0.0, "{k}: {r}");
        assert!(r[k]["p50_ms"].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    assert_eq!(r["bus_window64"]["n"], 40);
    assert!(r["throughput_ratio"]["window64"].as_f64().unwrap() > 0.0);
}
