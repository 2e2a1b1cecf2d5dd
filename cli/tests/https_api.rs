//! The dispatcher's HTTP API over HTTPS (issue 17, item 4), with real processes: a
//! `spine dispatcher` serving a certificate signed by a CA made for the test, and the `spine`
//! client commands talking to it: with the CA (`--ca-file`) they work; with another CA or the
//! system store they fail naming the host and `--ca-file`; plain HTTP to the HTTPS port gets a
//! 400 saying to use https://; and a dispatcher configured to listen off loopback without a
//! certificate refuses to start, naming the keys that fix it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_integration::pki::pki;
use spine_integration::{free_port, TestServer, PATIENCE};
use tokio::process::{Child, Command};

async fn spine(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        PATIENCE * 3,
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(args)
            .env_remove("SPINE_TOKEN")
            .env_remove("SPINE_CA_FILE")
            .output(),
    )
    .await
    .expect("spine command finished")
    .expect("run spine");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn spawn_dispatcher(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spine"))
        .args(["dispatcher", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start spine dispatcher")
}

/// Waits until the HTTPS API at `base` answers `/healthz`, trusting `ca`.
async fn wait_healthy(base: &str, ca: &Path) {
    let api = spine_client::Client::with_ca_file(base, None, Some(ca)).expect("a client");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let r = api
            .call(api.request(reqwest::Method::GET, "/healthz"), "healthz")
            .await;
        match r {
            Ok(_) => return,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "the HTTPS API never answered: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_verify_the_dispatcher_over_https() {
    let server = TestServer::start(&[("dispatcher", "pw-d"), ("agent1", "pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(&dir.path().join("pki"), &["127.0.0.1", "localhost"]);
    let (other_ca, _, _) = pki(&dir.path().join("other"), &["127.0.0.1", "localhost"]);
    let port = free_port().unwrap();
    let config = dir.path().join("dispatcher.toml");
    std::fs::write(
        &config,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:{port}\"\nhttp_tls_cert = \"{}\"\nhttp_tls_key = \"{}\"\n",
            server.addr,
            dir.path().join("data").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut child = spawn_dispatcher(&config);
    let base = format!("https://127.0.0.1:{port}");
    wait_healthy(&base, &ca).await;

    let agent = Agent::builder(
        AgentConfig::from_toml(&format!(
            "jid = \"agent1@localhost/w\"\npassword = \"pw\"\nserver = \"{}\"\ndispatchers = [\"dispatcher@localhost\"]\nheartbeat = \"1s\"\n",
            server.addr
        ))
        .unwrap(),
    )
    .capability("text.upper", None, |ctx: JobContext| async move {
        let text = String::from_utf8(ctx.input)
            .map_err(|_| JobError::bad_argument("input", "must be UTF-8"))?;
        Ok::<_, JobError>(Output::bytes(text.to_uppercase()))
    })
    .build()
    .unwrap();
    let (stop_agent, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent.run(async move {
        let _ = stopped.await;
    }));

    // (a) With the CA: a job submitted and followed over HTTPS, then listed.
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "over https").unwrap();
    let ca_arg = ca.display().to_string();
    let (code, out, err) = spine(&[
        "submit",
        "text.upper",
        "--input",
        input.to_str().unwrap(),
        "--wait-for-agent",
        "--wait",
        "--api",
        &base,
        "--ca-file",
        &ca_arg,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "OVER HTTPS"), "{err}");
    let (code, out, err) = spine(&["jobs", "--api", &base, "--ca-file", &ca_arg]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("text.upper") && l.contains("succeeded")),
        "{out}"
    );

    // (b) Another CA (of the same name: the signature is what fails): the certificate is
    // refused, naming the host, the reason and the fix.
    let other = other_ca.display().to_string();
    let (code, _, err) = spine(&["jobs", "--api", &base, "--ca-file", &other]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the TLS certificate of 127.0.0.1 was refused")
            && err.contains("--ca-file")
            && err.contains("(invalid peer certificate: BadSignature)"),
        "{err}"
    );
    // The system store does not know the test CA either (or the machine has no store:
    // then that is the error); both point at --ca-file.
    let (code, _, err) = spine(&["jobs", "--api", &base]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--ca-file")
            && (err.contains("certificate of 127.0.0.1 was refused")
                || err.contains("certificate store is empty")),
        "{err}"
    );

    // (c) Plain HTTP to the HTTPS port: refused with a 400 that says what to do.
    let (code, _, err) = spine(&["jobs", "--api", &format!("http://127.0.0.1:{port}")]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("400 tls-required") && err.contains("use an https:// URL"),
        "{err}"
    );

    let _ = stop_agent.send(());
    let _ = agent.await;
    child.kill().await.expect("stop the dispatcher");
}

/// (d) Off loopback without a certificate the dispatcher does not start (it validates before
/// it opens any socket, so nothing listens on the network meanwhile), and the error names the
/// keys that fix it; with `http_allow_plaintext` it asks next for `public_url`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_without_a_certificate_the_dispatcher_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatcher.toml");
    let base = format!(
        "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"127.0.0.1:1\"\ndata_dir = \"{}\"\nhttp_listen = \"0.0.0.0:8443\"\n[[http_token]]\nname = \"web\"\ntoken = \"0123456789abcdef\"\ncapabilities = [\"*\"]\n",
        dir.path().join("data").display()
    );
    std::fs::write(&config, &base).unwrap();
    let c = config.to_str().unwrap();
    let (code, _, err) = spine(&["dispatcher", "--config", c]).await;
    assert_eq!(code, 2, "{err}");
    for part in [
        "http_listen: 0.0.0.0:8443 is not a loopback address",
        "set http_tls_cert and http_tls_key",
        "http_allow_plaintext = true",
    ] {
        assert!(err.contains(part), "{part} in {err}");
    }
    std::fs::write(&config, format!("http_allow_plaintext = true\n{base}")).unwrap();
    let (code, _, err) = spine(&["dispatcher", "--config", c]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("public_url: required when http_listen is 0.0.0.0:8443"),
        "{err}"
    );
    // With both, the configuration is valid (printed, not run).
    std::fs::write(
        &config,
        format!(
            "http_allow_plaintext = true\npublic_url = \"http://spine.example.com:8443/\"\n{base}"
        ),
    )
    .unwrap();
    let (code, out, err) = spine(&["dispatcher", "--config", c, "--print-config"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("http_allow_plaintext = true"), "{out}");
}

/// (e) The web console over HTTPS: its page is served, and signing in sets both of its
/// cookies `Secure` (a browser then never sends the token over plain HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_over_https_signs_in_with_secure_cookies() {
    let server = TestServer::start(&[("dispatcher", "pw-d")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(&dir.path().join("pki"), &["127.0.0.1", "localhost"]);
    let port = free_port().unwrap();
    let config = dir.path().join("dispatcher.toml");
    std::fs::write(
        &config,
        format!(
            "jid = \"dispatcher@localhost/d1\"\npassword = \"pw-d\"\nserver = \"{}\"\ndata_dir = \"{}\"\nhttp_listen = \"127.0.0.1:{port}\"\nhttp_tls_cert = \"{}\"\nhttp_tls_key = \"{}\"\n\n[[http_token]]\nname = \"ops\"\ntoken = \"token-ops-0123456789\"\ncapabilities = [\"*\"]\nall_jobs = true\n",
            server.addr,
            dir.path().join("data").display(),
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let mut child = spawn_dispatcher(&config);
    let base = format!("https://127.0.0.1:{port}");
    wait_healthy(&base, &ca).await;
    let tls = spine_tls::client_config_for_ca_file(Some(&ca)).expect("the test CA");
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();

    let page = http.get(format!("{base}/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<main id=\"main\""));

    let r = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", "token-ops-0123456789")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookies: Vec<String> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(
        cookies.iter().all(|c| c.ends_with("; Secure")),
        "{cookies:?}"
    );
    let jar: Vec<&str> = cookies
        .iter()
        .map(|c| c.split(';').next().unwrap())
        .collect();
    let me = http
        .get(format!("{base}/v1/whoami"))
        .header("cookie", jar.join("; "))
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    assert!(me.text().await.unwrap().contains("\"name\":\"ops\""));
    child.kill().await.expect("stop the dispatcher");
}
