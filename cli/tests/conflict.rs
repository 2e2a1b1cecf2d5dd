//! Two `spine agent` processes with one account and resource: the server closes the older
//! session with a `conflict` stream error each time the other logs in. Before, both logged
//! back in at once, about 400 times a second (1,655 reconnects and 1 MB of log in 4 s); now a
//! session that ends within 5 s of its login makes the next login wait (250 ms doubling to
//! 30 s), and the log says what is probably wrong.

use std::process::Stdio;
use std::time::Duration;

use spine_integration::TestServer;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_resource_back_off_instead_of_storming() {
    let server = TestServer::start(&[("agent1", "pw-a1")]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "jid = \"agent1@localhost/w1\"\npassword = \"pw-a1\"\nserver = \"{}\"\n\
             dispatchers = [\"dispatcher@localhost\"]\n\
             [[capability]]\nname = \"t.true\"\nkind = \"exec\"\nargv = [\"true\"]\n",
            server.addr
        ),
    )
    .unwrap();
    let start = |n: usize| {
        let log = std::fs::File::create(dir.path().join(format!("agent{n}.log"))).unwrap();
        Command::new(env!("CARGO_BIN_EXE_spine"))
            .args(["agent", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start spine agent")
    };
    let a = start(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = start(2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop((a, b));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs: String = (1..=2)
        .map(|n| std::fs::read_to_string(dir.path().join(format!("agent{n}.log"))).unwrap())
        .collect();
    let reconnects = logs.matches("reconnected").count();
    println!(
        "{reconnects} reconnects in 4 s, {} bytes of log",
        logs.len()
    );
    assert!(
        (1..=16).contains(&reconnects),
        "{reconnects} reconnects in 4 s (a storm was ~1,600): {}",
        &logs[logs.len().saturating_sub(3000)..]
    );
    assert!(
        logs.contains("check that only one process uses this account and resource"),
        "{logs}"
    );
}
