//! An exec capability whose program cannot be started stops `spine agent` at start (issue 15,
//! item 8): exit status 2 and one line naming the key, before any connection. Before, the agent
//! advertised the capability and every job failed with `cannot start`. And `spine agent --check`
//! validates a configuration — these checks included — without connecting: it prints what it
//! checked and exits 0, or 2 with the same one line.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

/// A configuration with three exec capabilities, the third running `program` (TOML-quoted
/// here), with `extra` keys; the server is `server`.
fn config(dir: &Path, server: &str, program: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    let toml = format!(
        r#"jid = "agent1@localhost/w1"
password = "pw"
server = "{server}"
dispatchers = ["dispatcher@localhost"]
[[capability]]
name = "hash.sha256"
kind = "exec"
argv = ["sha256sum"]
[[capability]]
name = "legacy.sort"
kind = "exec"
argv = ["sort", "-o", "{{output}}", "--", "{{input}}"]
input = "file"
output = "file"
[[capability]]
name = "legacy.invoice"
kind = "exec"
argv = ["{program}", "{{input}}"]
input = "file"
{extra}
[[capability]]
name = "legacy.render"
kind = "http"
url = "http://127.0.0.1:9/render"
"#
    );
    std::fs::write(&path, toml).expect("write the configuration");
    path
}

/// Runs `spine ARGS --config CONFIG`; returns (exit code, stdout, stderr).
fn spine(args: &[&str], config: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("SPINE_AGENT_PASSWORD")
        .output()
        .expect("run spine");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// A listener standing in for the XMPP server: nothing may connect to it.
fn silent_server() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.set_nonblocking(true).expect("non-blocking");
    let addr = l.local_addr().expect("address").to_string();
    (l, addr)
}

fn assert_not_contacted(l: &TcpListener) {
    match l.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("something connected to the server: {other:?}"),
    }
}

#[test]
fn an_exec_program_that_cannot_be_started_stops_the_agent_naming_the_key() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    let plain = d.join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").expect("write");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (listener, server) = silent_server();
    let dd = d.display();
    // (argv[0] of capability[2], its other keys, the one line expected)
    let cases = [
        (
            "/opt/legacy/bin/invoice-tool".to_owned(),
            String::new(),
            "capability[2].argv[0]: /opt/legacy/bin/invoice-tool: no such file".to_owned(),
        ),
        (
            plain.display().to_string(),
            String::new(),
            format!("capability[2].argv[0]: {dd}/not-executable: is not executable by this user"),
        ),
        (
            dd.to_string(),
            String::new(),
            format!("capability[2].argv[0]: {dd}: is a directory, not a program"),
        ),
        (
            "invoice-tool".to_owned(),
            String::new(),
            "capability[2].argv[0]: invoice-tool: not found on PATH (".to_owned(),
        ),
        // Looked up in the PATH the program gets, never through a shell.
        (
            "sh".to_owned(),
            format!("env = {{ PATH = \"{dd}\" }}"),
            format!("capability[2].argv[0]: sh: not found on PATH ({dd})"),
        ),
        (
            "invoice-tool".to_owned(),
            "cwd = \"/nonexistent/spool\"".to_owned(),
            "capability[2].cwd: /nonexistent/spool: no such directory".to_owned(),
        ),
    ];
    for (program, extra, expected) in &cases {
        let cfg = config(d, &server, program, extra);
        for args in [&["agent"][..], &["agent", "--check"]] {
            let (code, stdout, stderr) = spine(args, &cfg);
            assert_eq!(code, Some(2), "{args:?} {program}: {stderr}");
            assert!(
                stderr.contains(expected.as_str()),
                "{args:?} {program}: {stderr}"
            );
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(stdout.is_empty(), "{args:?}: {stdout}");
        }
    }
    assert_not_contacted(&listener);
}

#[test]
fn check_validates_without_connecting_and_says_what_it_checked() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let d = dir.path();
    // A program found through the capability's own PATH and a relative one under its cwd.
    let bin = d.join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let tool = bin.join("invoice-tool");
    std::fs::write(&tool, "#!/bin/sh\ncat \"$1\"\n").expect("write");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (listener, server) = silent_server();
    let cfg = config(
        d,
        &server,
        "invoice-tool",
        &format!("env = {{ PATH = \"{}\" }}", bin.display()),
    );
    let (code, stdout, stderr) = spine(&["agent", "--check"], &cfg);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    for expected in [
        format!("server: {server} -> {server}, plain TCP (a loopback address); not contacted"),
        "capability[0] hash.sha256 (exec): program sha256sum: /".to_owned(),
        "capability[1] legacy.sort (exec): program sort: /".to_owned(),
        format!(
            "capability[2] legacy.invoice (exec): program invoice-tool: {}, executable",
            tool.display()
        ),
        "capability[3] legacy.render (http): POST http://127.0.0.1:9/render; not called".to_owned(),
        "ok: 4 capabilities; nothing was connected to".to_owned(),
    ] {
        assert!(stdout.contains(&expected), "{expected}\n{stdout}");
    }
    assert_not_contacted(&listener);

    let cfg = config(
        d,
        &server,
        "./bin/invoice-tool",
        &format!("cwd = \"{}\"", d.display()),
    );
    let (code, stdout, stderr) = spine(&["agent", "--check"], &cfg);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("program ./bin/invoice-tool: "), "{stdout}");

    // Other configuration errors come out of --check as out of the agent itself.
    std::fs::write(&cfg, "password = \"x\"\nslots = 0\n").expect("write");
    let (code, _, stderr) = spine(&["agent", "--check"], &cfg);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("slots: must be at least 1"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert_not_contacted(&listener);
}
