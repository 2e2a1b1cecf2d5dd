//! Secrets on the command line (security review, issue 14, finding 13): the API token comes
//! from a file or the environment instead of argv, is not sent in clear off loopback without
//! `--insecure`, and `spine server --add-user` takes its password from a file or a variable.

use spine_dispatcher::{Dispatcher, DispatcherConfig};
use spine_integration::{TestServer, PATIENCE};
use tokio::process::Command;

const TOKEN: &str = "cli-token-0123456789";

/// Runs `spine args…` with `env` (and none of the SPINE_* variables of the caller's shell).
async fn spine(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spine"));
    cmd.args(args);
    for v in [
        "SPINE_TOKEN",
        "SPINE_TOKEN_FILE",
        "SPINE_INSECURE",
        "SPINE_API",
        "SPINE_ADD_USER_PASSWORD",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let out = tokio::time::timeout(PATIENCE * 3, cmd.output())
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
async fn a_token_is_never_sent_in_clear_off_loopback_without_insecure() {
    // 0.0.0.0 is not loopback; connecting to it reaches this machine, where the port is closed.
    let port = spine_integration::free_port().unwrap();
    let api = format!("http://0.0.0.0:{port}");
    let (code, _, err) = spine(&["jobs", "--api", &api, "--token", TOKEN], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refusing to send the API token in clear") && err.contains("--insecure"),
        "{err}"
    );
    // The same from the environment.
    let (code, _, err) = spine(&["jobs"], &[("SPINE_API", &api), ("SPINE_TOKEN", TOKEN)]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing"), "{err}");
    // With --insecure it is sent, with a warning (and here fails to connect).
    let (code, _, err) = spine(
        &["jobs", "--api", &api, "--token", TOKEN, "--insecure"],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("warning: sending the API token in clear"),
        "{err}"
    );
    assert!(!err.contains("refusing"), "{err}");
    // Without a token there is nothing to protect: no refusal, no warning.
    let (code, _, err) = spine(&["jobs", "--api", &api], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        !err.contains("refusing") && !err.contains("warning"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_a_file_or_the_environment() {
    let server = TestServer::start(&[("dispatcher", "pw-d")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = DispatcherConfig::from_toml(&format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:0\"\n[[http_token]]\nname = \"cli\"\ntoken = \"{TOKEN}\"\ncapabilities = [\"*\"]\n",
        server.addr,
        dir.path().join("d").display()
    ))
    .unwrap();
    let d = Dispatcher::bind(cfg).await.unwrap();
    let api = format!("http://{}", d.http_addr().unwrap());
    tokio::spawn(d.run(std::future::pending::<()>()));
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let file = file.to_str().unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token-0123456789\n").unwrap();

    // The dispatcher answers once logged in.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (code, out, err) = spine(&["jobs", "--api", &api, "--token-file", file], &[]).await;
        if code == 0 {
            assert!(out.starts_with("job "), "{out}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{err}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, _, err) = spine(&["jobs", "--api", &api], &[("SPINE_TOKEN_FILE", file)]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = spine(&["jobs", "--api", &api], &[("SPINE_TOKEN", TOKEN)]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = spine(
        &[
            "jobs",
            "--api",
            &api,
            "--token-file",
            wrong.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("401 not-authorized: unknown token"), "{err}");
    let (code, _, err) = spine(
        &["jobs", "--api", &api, "--token-file", file],
        &[("SPINE_TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use one"), "{err}");
    let (code, _, err) = spine(
        &["jobs", "--api", &api, "--token-file", "/nonexistent/token"],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_user_takes_its_password_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "file-password\n").unwrap();
    let file = file.to_str().unwrap();
    for (args, env, password) in [
        (
            vec!["server", "--add-user", "alice", "--password-file", file],
            vec![],
            "file-password",
        ),
        (
            vec!["server", "--add-user", "alice"],
            vec![("SPINE_ADD_USER_PASSWORD", "env-password")],
            "env-password",
        ),
    ] {
        let (code, out, err) = spine(&args, &env).await;
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("generated password"), "{err}");
        assert!(
            !out.contains(password),
            "no clear password in the block: {out}"
        );
        // The block lets alice log in with that password.
        let accounts = spine_server::ServerConfig::from_toml(&out)
            .unwrap_or_else(|e| panic!("{e}: {out}"))
            .accounts;
        let server = TestServer::start_with(&[], |c| c.accounts.extend(accounts)).await;
        server.client("alice", password).await;
    }
    let (code, _, err) = spine(
        &["server", "--add-user", "alice", "--password-file", file],
        &[("SPINE_ADD_USER_PASSWORD", "env-password")],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("use one"), "{err}");
}
