//! Every `spine bench` scenario runs at a tiny size in the test command, so the benchmarks
//! cannot rot: the command exits 0, prints its table and writes JSON with real figures.

use std::process::Command;

/// Runs `spine bench ARGS --json FILE` and asserts that it succeeded; returns what it printed
/// and the JSON it wrote.
fn bench(args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (stdout, r)
}

#[test]
fn placement_runs_small_and_writes_json() {
    let (stdout, r) = bench(&[
        "placement",
        "--agents",
        "8",
        "--jobs",
        "500",
        "--bursts",
        "2",
        "--burst-interval",
        "1",
    ]);
    assert!(stdout.contains("stale least-loaded"), "{stdout}");
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
    let (stdout, r) = bench(&["payload", "--mib", "1", "--runs", "1"]);
    assert!(stdout.contains("medians (plain HTTP)"), "{stdout}");
    assert_eq!(r["bytes"], 1024 * 1024);
    // Every leg measured, and its ratio to the raw copy beside it. (Not which is quicker: a
    // leg of 1 MiB takes milliseconds, and on a busy machine the upload once beat the raw
    // copy, 3.8 against 4.4 ms. BENCHMARKS.md has the figures at full size.)
    let raw = r["raw"]["mb_s"].as_f64().unwrap();
    assert!(raw > 0.0, "{r}");
    for leg in ["upload", "fetch", "end_to_end"] {
        let mb_s = r[leg]["mb_s"].as_f64().unwrap_or(0.0);
        assert!(mb_s > 0.0, "{leg}: {mb_s} MB/s: {r}");
        let ratio = r[leg]["ratio_to_raw"].as_f64().unwrap();
        assert!((ratio - mb_s / raw).abs() < 1e-6, "{leg}: {r}");
    }
}

#[test]
fn mapreduce_runs_small_and_matches_the_single_process_count() {
    let (stdout, r) = bench(&[
        "mapreduce",
        "--mib",
        "2",
        "--fragment-mib",
        "1",
        "--agents",
        "1,2",
        "--fan-in",
        "2",
    ]);
    assert!(stdout.contains("medians:"), "{stdout}");
    // 2 MiB in 1 MiB pieces cut between words: 2 or 3 fragments.
    let fragments = r["fragments"].as_u64().unwrap();
    assert!((2..=3).contains(&fragments), "{r}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["agents"], 1);
    assert_eq!(runs[1]["agents"], 2);
    for run in runs {
        let (took, upload) = (
            run["seconds"].as_f64().unwrap(),
            run["upload_seconds"].as_f64().unwrap(),
        );
        assert!(took > upload && upload > 0.0, "{run}");
        assert!(run["single_process_s"].as_f64().unwrap() > 0.0, "{run}");
        // fan-in 2 over 2–3 map outputs: 1 or 2 reduce steps.
        let steps = run["reduce_steps"].as_u64().unwrap();
        assert!((1..=2).contains(&steps), "{run}");
    }
    let medians = r["medians"].as_array().unwrap();
    assert_eq!(medians[0]["speedup"], 1.0);
    assert_eq!(medians[1]["ideal"], 2.0);

    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "mapreduce", "--agents", "1,0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--agents"));
}

#[test]
fn retained_runs_small_with_the_jobs_really_held() {
    let (stdout, r) = bench(&[
        "retained",
        "--retained",
        "500",
        "--jobs",
        "60",
        "--window",
        "8",
        "--runs",
        "1",
    ]);
    assert!(stdout.contains("with none held (baseline)"), "{stdout}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["retained"], 0);
    assert_eq!(runs[0]["held"], 0);
    // The 500 jobs written to the store are in the dispatcher's table (its /metrics says so).
    assert_eq!(runs[1]["retained"], 500);
    assert_eq!(runs[1]["held"], 500);
    for run in runs {
        assert!(run["jobs_per_s"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["list_ms"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["metrics_ms"].as_f64().unwrap() > 0.0, "{run}");
    }
    assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");

    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "retained", "--window", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--window"));
    // Nothing held in the second configuration either: refused, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "retained", "--retained", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--retained must be at least 1"));
}

/// `spine bench console`: every request of the console timed on an empty farm and on one
/// holding jobs, each answered (the benchmark checks that every filtered page found jobs).
#[test]
fn console_runs_small_with_the_jobs_held() {
    let (stdout, r) = bench(&["console", "--held", "2000", "--runs", "1", "--probes", "2"]);
    assert!(
        stdout.contains("slowest jobs page with 2000 held"),
        "{stdout}"
    );
    assert_eq!(r["held"], 2000);
    let rows = r["requests"].as_array().unwrap();
    assert_eq!(rows.len(), 10, "{r}");
    for row in rows {
        assert!(row["empty_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["held_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(r["slowest_page_ms"].as_f64().unwrap() > 0.0, "{r}");

    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "console", "--probes", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--probes"));
}

/// `spine bench https`: both schemes measured on their own farm, every figure a real rate.
#[test]
fn https_runs_small_over_both_schemes() {
    let (stdout, r) = bench(&[
        "https",
        "--seq-jobs",
        "10",
        "--par-jobs",
        "40",
        "--window",
        "8",
        "--connections",
        "10",
        "--runs",
        "1",
    ]);
    assert!(stdout.contains("plain HTTP (baseline) → HTTPS"), "{stdout}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| r["scheme"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["http", "https"]
    );
    for run in runs {
        for k in ["seq_jobs_per_s", "par_jobs_per_s", "new_connections_per_s"] {
            assert!(run[k].as_f64().unwrap() > 0.0, "{k} in {run}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "https", "--window", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `spine bench images`: three small photos through farms of 1 and 2 agents, every thumbnail
/// checked against the single process's, every figure a real rate.
#[test]
fn images_runs_small_and_checks_every_thumbnail() {
    let (stdout, r) = bench(&[
        "images",
        "--photos",
        "3",
        "--min-mib",
        "0.2",
        "--max-mib",
        "0.5",
        "--agents",
        "1,2",
        "--size",
        "64",
        "--runs",
        "1",
    ]);
    assert!(stdout.contains("medians: single process"), "{stdout}");
    assert_eq!(r["photos_done"], 3, "{r}");
    // 3 photos on each of the two farms, each output equal to the single process's bytes.
    assert_eq!(r["thumbnails_checked"], 6, "{r}");
    assert_eq!(r["size"], 64);
    // The sizes were asked in MiB and land near them (within 10 %).
    let (min, max) = (
        r["photo_bytes"]["min"].as_f64().unwrap(),
        r["photo_bytes"]["max"].as_f64().unwrap(),
    );
    assert!(
        min > 0.9 * 0.2 * 1048576.0 && max < 1.1 * 0.5 * 1048576.0 && min < max,
        "{r}"
    );
    let total = r["photo_bytes"]["total"].as_f64().unwrap();
    let single = &r["single_process"];
    assert!(single["photos_per_s"].as_f64().unwrap() > 0.0, "{r}");
    let s = single["s"].as_f64().unwrap();
    assert!(
        (single["mb_s"].as_f64().unwrap() - total / 1e6 / s).abs() < 1e-6,
        "{r}"
    );
    let farms = r["spine"].as_array().unwrap();
    assert_eq!(
        farms
            .iter()
            .map(|f| f["agents"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    for f in farms {
        let s = f["s"].as_f64().unwrap();
        assert!(s > 0.0, "{f}");
        assert!(
            (f["photos_per_s"].as_f64().unwrap() - 3.0 / s).abs() < 1e-6,
            "{f}"
        );
        assert!(f["mb_s"].as_f64().unwrap() > 0.0, "{f}");
        assert_eq!(f["window"], 2 * f["agents"].as_u64().unwrap(), "{f}");
        let ratio = f["over_single_process"].as_f64().unwrap();
        assert!(
            (ratio - s / single["s"].as_f64().unwrap()).abs() < 1e-6,
            "{f}"
        );
    }

    // Nonsense is refused with the option named.
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "images", "--min-mib", "5", "--max-mib", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--min-mib"));
}

/// `spine bench soak`: every part is its own process with a memory figure, jobs run with none
/// failing, and after the retention the dispatcher holds nothing and the blob store is empty.
#[test]
fn soak_runs_small_and_lets_go_of_every_job() {
    let (stdout, r) = bench(&[
        "soak",
        "--seconds",
        "6",
        "--callers",
        "8",
        "--large-percent",
        "20",
        "--retention",
        "2s",
        "--sample",
        "1s",
        "--after",
        "6s",
    ]);
    assert!(stdout.contains("dispatcher MiB"), "{stdout}");
    assert_eq!(r["failed"], 0, "{r}");
    let completed = r["completed"].as_u64().unwrap();
    let large = r["large_completed"].as_u64().unwrap();
    assert!(completed > 0 && large > 0, "{r}");
    // One job in five is large (each caller finishes the job it has in flight at the end).
    assert!(large.abs_diff(completed / 5) <= 8, "{large} of {completed}");
    let samples = r["samples"].as_array().unwrap();
    // One a second for 6 s of load and 6 s after (fewer when a sample waits on a busy machine).
    assert!((6..=13).contains(&samples.len()), "{}", samples.len());
    for s in samples {
        for p in ["server", "dispatcher", "agent1", "agent2", "bench"] {
            assert!(s["rss_bytes"][p].as_u64().unwrap() > 1 << 20, "{p} in {s}");
        }
        assert!(s["jobs_redb_bytes"].as_u64().unwrap() > 0, "{s}");
    }
    let during: Vec<_> = samples.iter().filter(|s| s["phase"] == "load").collect();
    assert!(during
        .iter()
        .all(|s| s["jobs_per_s"].as_f64().unwrap() > 0.0));
    assert!(during.iter().any(|s| s["held"].as_u64().unwrap() > 0));
    assert!(during
        .iter()
        .any(|s| s["blobs_bytes"].as_u64().unwrap() > 200 * 1024));
    // Retention 2 s (and blob_orphan_ttl 2 s): nothing held, no blob left at the end.
    let last = samples.last().unwrap();
    assert_eq!(last["phase"], "after");
    assert_eq!(last["held"], 0, "{last}");
    assert_eq!(last["blobs_bytes"], 0, "{last}");
    assert_eq!(last["blob_files"], 0, "{last}");

    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "soak", "--large-percent", "101"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--large-percent"));
}

#[test]
fn split_runs_small_and_counts_every_byte() {
    let (stdout, r) = bench(&["split", "--gib", "0.004", "--fragment-mib", "1"]);
    assert!(stdout.contains("peak RSS"), "{stdout}");
    let [run] = r["runs"].as_array().unwrap().as_slice() else {
        panic!("{r}")
    };
    // About 4 MiB in fragments of 1 MiB, each cut at a line end after 1 MiB.
    assert!(
        (4..=5).contains(&run["fragments"].as_u64().unwrap()),
        "{run}"
    );
    assert!(run["input_bytes"].as_u64().unwrap() >= 4_000_000, "{run}");
    assert!(run["peak_rss"].as_u64().unwrap() >= run["rss_before"].as_u64().unwrap());
    assert!(run["rss_before"].as_u64().unwrap() > 0, "{run}");

    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["bench", "split", "--gib", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gib"));
}

/// `spine bench cost`: a farm of separate processes measured phase by phase, every part with
/// CPU time of its own, and `--against` with this same binary as the other build: the runs
/// alternate, the other side's JSON is read back and the ratios are computed from both.
/// `--store` puts the dispatcher's jobs in PostgreSQL: the jobs of the run are its rows.
#[test]
fn cost_runs_small_on_postgres() {
    let Some(pg) = spine_integration::postgres::Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = bench(&[
        "cost",
        "--runs",
        "1",
        "--jobs",
        "100",
        "--seq-jobs",
        "10",
        "--window",
        "4",
        "--dir",
        dir.path().to_str().unwrap(),
        "--store",
        &pg.url(),
    ]);
    assert!(stdout.contains("store: PostgreSQL 127.0.0.1:"), "{stdout}");
    assert!(r["medians"]["jobs_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // Warm-up 500, then 10 one at a time and 100 in flight: each a row.
    let rows = pg.psql("spine", "SELECT count(*) FROM spine_jobs").unwrap();
    assert_eq!(rows, "610", "{stdout}");
}

/// `--dispatchers 3`: three dispatchers on the store, the jobs submitted to each in turn; the
/// standbys' submissions reach the leader (every job a row, all succeeded, none left for it
/// to take).
#[test]
fn cost_runs_small_on_three_dispatchers() {
    let Some(pg) = spine_integration::postgres::Postgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = bench(&[
        "cost",
        "--runs",
        "1",
        "--jobs",
        "60",
        "--seq-jobs",
        "9",
        "--window",
        "4",
        "--dir",
        dir.path().to_str().unwrap(),
        "--store",
        &pg.url(),
        "--dispatchers",
        "3",
    ]);
    assert!(r["medians"]["jobs_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // The leader is named, and its CPU is a part of the dispatchers'.
    let run = &r["runs"][0];
    assert!(
        ["dispatcher", "dispatcher2", "dispatcher3"].contains(&run["leader"].as_str().unwrap()),
        "{r}"
    );
    let (leader, all) = (
        run["par_cpu_us_leader"].as_f64().unwrap(),
        run["par_cpu_us_dispatcher"].as_f64().unwrap(),
    );
    assert!(leader >= 0.0 && leader <= all, "{r}");
    // The standbys passed their callers' submissions on (one or more per request).
    let per_request = run["par_passed_per_request"].as_f64().unwrap();
    assert!(per_request >= 1.0, "{r}");
    assert!(
        stdout.contains("the standbys passed submissions on to the leader"),
        "{stdout}"
    );
    let rows = pg.psql("spine", "SELECT count(*) FROM spine_jobs").unwrap();
    assert_eq!(rows, "569", "{stdout}");
    let waiting = pg
        .psql("spine", "SELECT count(*) FROM spine_submitted")
        .unwrap();
    assert_eq!(waiting, "0", "the leader took every standby's job");
}

#[test]
fn cost_runs_small_against_itself() {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().to_str().unwrap();
    let (stdout, r) = bench(&[
        "cost",
        "--runs",
        "1",
        "--jobs",
        "200",
        "--seq-jobs",
        "20",
        "--window",
        "8",
        "--dir",
        dir,
        "--against",
        env!("CARGO_BIN_EXE_spine"),
    ]);
    assert!(stdout.contains("nothing throttles 8 in flight"), "{stdout}");
    assert!(stdout.contains("after (this binary) ÷ before"), "{stdout}");
    // The default client of the jobs one at a time, on both sides (the other build knows
    // the option, so nothing is switched for the comparison).
    assert!(stdout.contains("client: one at a time own ("), "{stdout}");
    assert!(!stdout.contains("has only the client"), "{stdout}");
    for side in [&r, &r["against"]] {
        let runs = side["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 1, "{side}");
        let run = &runs[0];
        assert_eq!(run["seq_jobs"], 20, "{run}");
        assert_eq!(run["jobs"], 200, "{run}");
        assert_eq!(run["window"], 8, "{run}");
        assert!(run["jobs_per_s"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["seq_p50_ms"].as_f64().unwrap() > 0.0, "{run}");
        let (p50, p99) = (
            run["par_p50_ms"].as_f64().unwrap(),
            run["par_p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p99 >= p50, "{run}");
        // CPU times come in clock ticks (10 ms): 200 jobs take each part past one; 20 jobs
        // one at a time may not, so there only the total must be positive.
        for part in ["server", "dispatcher", "agent"] {
            assert!(
                run[format!("par_cpu_us_{part}")].as_f64().unwrap() > 0.0,
                "{part}: {run}"
            );
            assert!(
                run[format!("seq_cpu_us_{part}")].as_f64().unwrap() >= 0.0,
                "{part}: {run}"
            );
        }
        let total = run["par_cpu_us_total"].as_f64().unwrap();
        let parts: f64 = ["server", "dispatcher", "agent"]
            .iter()
            .map(|p| run[format!("par_cpu_us_{p}")].as_f64().unwrap())
            .sum();
        assert!((total - parts).abs() < 1e-6, "{run}");
        assert!(run["seq_cpu_us_total"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["filesystem"].as_str().unwrap().contains(dir), "{run}");
    }
    // The ratios are this side's medians over the other side's.
    let ratio = r["ratios"]["jobs_per_s"].as_f64().unwrap();
    let expected = r["medians"]["jobs_per_s"].as_f64().unwrap()
        / r["against"]["medians"]["jobs_per_s"].as_f64().unwrap();
    assert!((ratio - expected).abs() < 1e-9, "{r}");
    for key in ["seq_cpu_us_total", "par_cpu_us_total", "seq_p50_ms"] {
        assert!(r["ratios"][key].as_f64().unwrap() > 0.0, "{key}: {r}");
    }
    // With one run on each side, the median of the run-by-run ratios is that run's ratio.
    for key in [
        "seq_cpu_us_total",
        "par_cpu_us_total",
        "seq_p50_ms",
        "jobs_per_s",
    ] {
        let paired = r["paired_ratios"][key].as_f64().unwrap();
        let expected =
            r["runs"][0][key].as_f64().unwrap() / r["against"]["runs"][0][key].as_f64().unwrap();
        assert!((paired - expected).abs() < 1e-9, "{key}: {r}");
    }
    // Each run's farm directory (store, logs, configs) is gone.
    assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);

    for flag in ["--window", "--runs", "--seq-jobs", "--jobs"] {
        let out = Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["bench", "cost", flag, "0"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{flag} must be at least 1")),
            "{stderr}"
        );
    }
}

#[test]
fn events_runs_small_through_a_kill_9_with_one_job_per_event() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = bench(&[
        "events",
        "--rate",
        "100",
        "--seconds",
        "4",
        "--kill-at",
        "2",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert!(
        stdout.contains("jobs of the rule: 400 for 400 events"),
        "{stdout}"
    );
    assert_eq!(
        (r["jobs"].as_u64(), r["distinct_events"].as_u64()),
        (Some(400), Some(400))
    );
    assert!(r["p99_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert!(
        r["outage_ms"].as_f64().unwrap() > 0.0,
        "the dispatcher was killed: {r}"
    );
    assert!(
        r["retried"].as_u64().unwrap() > 0,
        "events sent during the outage were retried: {r}"
    );
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "the farm's directory is removed"
    );
}
