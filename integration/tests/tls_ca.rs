//! TLS with a private CA: the embedded server presents a certificate signed by a CA made for
//! the test; clients that trust that CA (`[tls] ca_file`) connect, and a job runs end to end
//! with the dispatcher and an agent both verifying; clients trusting another CA, the system
//! store, or the right CA for a certificate of another name are refused.

use std::path::{Path, PathBuf};

use spine_agent::{Agent, JobContext, JobError, Output};
use spine_integration::farm::{agent_config, run_agent, start_http_dispatcher, wait_for_agents};
use spine_integration::pki::pki;
use spine_integration::TestServer;
use spine_xmpp::{TlsConfig, TlsMode};

async fn server_with(cert: PathBuf, key: PathBuf) -> TestServer {
    TestServer::start_with(
        &[("dispatcher", "pw-d"), ("agent1", "pw"), ("user", "pw-u")],
        |cfg| {
            cfg.tls.cert = Some(cert);
            cfg.tls.key = Some(key);
        },
    )
    .await
}

/// Logs `user` in with STARTTLS required, trusting `ca_file` (or the system store).
async fn login(server: &TestServer, ca_file: Option<&Path>) -> Result<(), String> {
    let tls = TlsConfig {
        mode: TlsMode::Required,
        ca_file: ca_file.map(Path::to_path_buf),
    };
    let o = spine_xmpp::connect_options(
        "user@localhost/t",
        Some("pw-u"),
        None,
        &server.addr.to_string(),
        &tls,
        "E",
    )
    .map_err(|e| format!("{}: {}", e.key, e.message))?;
    let c = spine_xmpp::connect(o).await.map_err(|e| e.to_string())?;
    c.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_verified_and_nothing_else_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(&dir.path().join("good"), &["localhost"]);
    let (other_ca, _, _) = pki(&dir.path().join("other"), &["localhost"]);
    let server = server_with(cert, key).await;

    login(&server, Some(&ca))
        .await
        .expect("the private CA is trusted");
    for (what, ca_file) in [
        ("another CA", Some(other_ca.as_path())),
        ("the system store", None),
    ] {
        let e = login(&server, ca_file).await.expect_err(what);
        eprintln!("{what}: {e}");
        // Another CA's certificate fails its signature check; the system store does not
        // know the issuer at all.
        assert!(e.contains("invalid peer certificate"), "{what}: {e}");
    }

    // The dispatcher and an agent, both with TLS required and the private CA, run a job.
    let tls = format!(
        "[tls]\nmode = \"required\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let data = tempfile::tempdir().unwrap();
    let (d, base) = start_http_dispatcher(&server, data.path(), &tls).await;
    let agent = Agent::builder(agent_config(&server, 1, &tls))
        .capability("tls.echo", None, |ctx: JobContext| async move {
            Ok::<_, JobError>(Output::bytes(ctx.input.to_vec()))
        })
        .build()
        .unwrap();
    let agent = run_agent(agent);
    wait_for_agents(&base, "tls.echo", 1).await;
    let api = spine_client::Client::new(&base, None).unwrap();
    let id = api
        .submit(&serde_json::json!({
            "capability": "tls.echo",
            "input": spine_client::base64(b"over verified TLS"),
        }))
        .await
        .unwrap();
    let job = api.follow(&id, |_, _| {}).await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(spine_client::output(&job).unwrap(), b"over verified TLS");
    agent.stop();
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Signed by the trusted CA, but for another domain than the JIDs' (localhost).
    let (ca, cert, key) = pki(dir.path(), &["xmpp.example.org"]);
    let server = server_with(cert, key).await;
    let e = login(&server, Some(&ca)).await.expect_err("wrong name");
    eprintln!("wrong name: {e}");
    assert!(
        e.contains("invalid peer certificate: certificate not valid for name \"localhost\""),
        "{e}"
    );
}
