//! The bus-versus-transport benchmark runs at a tiny size in the test command, so it cannot
//! rot: it exits 0 and writes its eight measurements and the ratios, for every installed server
//! (all three required under `SPINE_REQUIRE_SERVERS=1`, as in CI); and its `--profile` mode.

#[test]
fn bus_bench_runs_small() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bus.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bus-bench"))
        .arg("40")
        .arg(&json)
        .args(["--servers", "all"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let mut kinds = vec!["embedded"];
    if spine_integration::servers::required() {
        kinds.extend(["prosody", "ejabberd"]);
    }
    for kind in kinds {
        let r = &r[kind];
        for k in [
            "raw_sequential",
            "raw_window64",
            "bus_sequential",
            "bus_window64",
            "wait_sequential",
            "wait_window64",
            "raw_sequential_worker",
            "wait_sequential_worker",
        ] {
            assert!(r[k]["per_sec"].as_f64().unwrap() > 0.0, "{kind} {k}: {r}");
            assert!(r[k]["p50_ms"].as_f64().unwrap() > 0.0, "{kind} {k}: {r}");
        }
        assert_eq!(r["bus_window64"]["n"], 40, "{kind}");
        assert_eq!(r["wait_window64"]["n"], 40, "{kind}");
        assert!(r["throughput_ratio"]["window64"].as_f64().unwrap() > 0.0);
        assert!(r["throughput_ratio"]["wait_window64"].as_f64().unwrap() > 0.0);
        assert!(
            stdout.contains(&format!("{kind:<10} bus ÷ raw")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("{kind:<10} waited ÷ raw")),
            "{stdout}"
        );
        assert!(
            r["p50_latency_ratio"]["wait_sequential_worker"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        assert!(
            stdout.contains(&format!("{kind:<10} waited ÷ raw, both on a worker")),
            "{stdout}"
        );
    }

    // `--profile`: waited jobs with 64 in flight only, the process id said, no file written;
    // with `--window 1`, one at a time.
    let json = dir.path().join("profile.json");
    let json_arg = json.to_string_lossy().into_owned();
    for (args, said, mode) in [
        (
            vec!["40", &json_arg, "--profile"],
            "measuring 40 waited jobs with 64 in flight in process",
            "waited job, 64 in flight",
        ),
        (
            vec!["30", "--profile", "--window", "1"],
            "measuring 30 waited jobs with 1 in flight in process",
            "waited job, sequential",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bus-bench"))
            .args(&args)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stderr.contains(said), "{stderr}");
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("embedded"))
            .collect();
        assert_eq!(rows.len(), 1, "{stdout}");
        assert!(rows[0].contains(mode), "{stdout}");
        // The row's count and window.
        let cols: Vec<&str> = rows[0].split_whitespace().collect();
        let window = if args.contains(&"--window") {
            "1"
        } else {
            "64"
        };
        assert_eq!(
            cols[cols.len() - 5..cols.len() - 3],
            [args[0], window],
            "{stdout}"
        );
    }
    assert!(!json.exists(), "nothing written");

    // A window without --profile, or of none, is refused with the usage.
    for args in [&["--window", "4"][..], &["--profile", "--window", "0"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bus-bench"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("--window") && stderr.contains("usage:"),
            "{stderr}"
        );
    }

    // A bad argument is refused with the usage.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bus-bench"))
        .args(["--servers", "openfire"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown server \"openfire\""));
}

/// The swarm benchmark at a tiny size: the server and the dispatcher run as child processes,
/// every simulated agent registers, jobs run with the fleet idle and busy (and busy with a
/// fleet stream open), memory is read, and the console's fleet page is timed.
#[test]
fn swarm_bench_runs_small() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("swarm.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_swarm-bench"))
        .args(["3,30", "--jobs", "50", "--json"])
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
    let sizes = r["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2, "{r}");
    // CPU per job of the server and the dispatcher in each phase, read from /proc: each a
    // number, and together more than nothing (one reading may round to no clock tick).
    let mut cpu = 0.0;
    for s in sizes {
        for phase in ["idle", "busy"] {
            for process in ["server", "dispatcher"] {
                let ms = s["cpu_ms_per_job"][phase][process].as_f64();
                assert!(ms.is_some_and(|ms| ms >= 0.0), "{phase} {process}: {s}");
                cpu += ms.unwrap_or(0.0);
            }
        }
    }
    assert!(cpu > 0.0, "no CPU time read: {r}");
    for (s, n) in sizes.iter().zip([3u64, 30]) {
        assert_eq!(s["agents"], n, "{s}");
        assert!(s["register_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["server_rss_after"].as_u64().unwrap() > 0, "{s}");
        assert!(s["dispatcher_rss_after"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["idle"]["n"], 50, "{s}");
        assert_eq!(s["busy"]["n"], 50, "{s}");
        // Every no-op job (warm-up, idle, busy, busy with a fleet stream open) was answered
        // by a simulated agent.
        assert_eq!(s["answered"], 5 + 50 + 50 + 50, "{s}");
        assert_eq!(s["busy_with_fleet_stream"]["n"], 50, "{s}");
        // The console's view: the fleet listed whole (checked by the benchmark), the stream's
        // snapshot came, and the page drew the fleet in Chromium where there is one.
        assert!(s["console"]["fleet_ms"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["console"]["fleet_bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(
            s["fleet_stream"]["snapshot_ms"].as_f64().unwrap() > 0.0,
            "{s}"
        );
        match s["console"]["browser"]["first_view_ms"].as_f64() {
            Some(ms) => assert!(ms > 0.0, "{s}"),
            None => assert!(
                spine_integration::browser::missing().is_some()
                    && !spine_integration::servers::required(),
                "no first view measured with a browser installed: {s}"
            ),
        }
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_swarm-bench"))
        .args(["10,x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad size list"));
}
