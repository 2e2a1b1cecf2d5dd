//! A bad configuration file stops each program at once: exit status 2 and one line on standard
//! error naming the key at fault (the server, the dispatcher and the agent, run as processes).

use std::process::Command;

/// Runs `spine <program> --config FILE` with `toml` in FILE; returns (exit code, stderr).
fn run(program: &str, toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{program}.toml"));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args([program, "--config"])
        .arg(&path)
        // Loopback addresses only, in case a configuration were accepted after all.
        .env("SPINE_SERVER_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn each_program_names_the_bad_key_and_exits_2() {
    let cases: &[(&str, &str, &str)] = &[
        ("server", "max_connections = 0\n", "max_connections"),
        ("server", "bogus = 1\n", "bogus"),
        ("server", "[[account]]\nuser = \"a b\"\npassword = \"x\"\n", "account[0].user"),
        ("server", "rate_limit = \"fast\"\n", "rate_limit"),
        ("dispatcher", "password = \"x\"\nmax_queue = 0\n", "max_queue: must be at least 1"),
        ("dispatcher", "password = \"x\"\ncolour = \"red\"\n", "colour"),
        (
            "dispatcher",
            "password = \"x\"\n[[submitter]]\njid = \"nobody\"\ncapabilities = [\"*\"]\n",
            "submitter[0].jid",
        ),
        (
            "dispatcher",
            "password = \"x\"\n[[agent]]\njid = \"*@gpu.example.com\"\ncapabilities = [\"image..*\"]\n",
            "agent[0].capabilities[0]",
        ),
        (
            "dispatcher",
            "password = \"x\"\n[[http_token]]\nname = \"w\"\ntoken = \"short\"\ncapabilities = [\"*\"]\n",
            "http_token[0].token",
        ),
        (
            "dispatcher",
            "password = \"x\"\npeer_ca = \"/nonexistent/peers-ca.pem\"\n",
            "peer_ca: /nonexistent/peers-ca.pem",
        ),
        ("agent", "password = \"x\"\nslots = 0\n", "slots: must be at least 1"),
        ("agent", "password = \"x\"\nheartbeat = \"soon\"\n", "heartbeat"),
    ];
    for (program, toml, key) in cases {
        let (code, stderr) = run(program, toml);
        assert_eq!(code, Some(2), "{program} {toml:?}: {stderr}");
        assert!(stderr.contains(key), "{program} {toml:?}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one line: {program} {toml:?}: {stderr}"
        );
    }
}
