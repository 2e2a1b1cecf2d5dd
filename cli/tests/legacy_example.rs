//! examples/legacy/agent.toml is a valid configuration, and its exec capabilities run the real
//! programs (gzip, sha256sum, sort) as configured.

use spine_agent::config::WrapperConfig;
use spine_agent::exec::ExecWrapper;
use spine_agent::{AgentConfig, JobContext};

fn example() -> AgentConfig {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/legacy/agent.toml");
    let text = std::fs::read_to_string(path).expect("example config");
    AgentConfig::from_toml(&text).expect("the example configuration is valid")
}

async fn run(cap: &str, args: serde_json::Value, input: &[u8]) -> Vec<u8> {
    let cfg = example();
    let c = cfg
        .capabilities
        .iter()
        .find(|c| c.name == cap)
        .expect("capability in the example");
    let WrapperConfig::Exec {
        argv,
        input: im,
        output,
        env,
        cwd,
        timeout,
        max_output,
        exit_codes,
    } = &c.wrapper
    else {
        panic!("{cap} is not exec")
    };
    let handler = ExecWrapper::new(
        argv,
        *im,
        *output,
        env.clone(),
        cwd.clone(),
        *timeout,
        max_output.as_u64(),
        exit_codes,
    )
    .unwrap()
    .into_handler();
    let ctx = JobContext::for_test(cap, args.as_object().cloned().unwrap(), input.to_vec());
    handler
        .call(ctx)
        .await
        .unwrap_or_else(|e| panic!("{cap}: {e}"))
        .bytes
}

#[tokio::test]
async fn the_legacy_example_runs_its_programs() {
    let cfg = example();
    assert_eq!(cfg.capabilities.len(), 4);
    assert!(
        spine_agent::Agent::builder(cfg).build().is_ok(),
        "the agent builds from the example"
    );

    let sorted = run(
        "legacy.sort-lines",
        serde_json::json!({}),
        b"pear\napple\nfig\n",
    )
    .await;
    assert_eq!(sorted, b"apple\nfig\npear\n");
    let hash = run("legacy.sha256", serde_json::json!({}), b"abc").await;
    assert!(String::from_utf8(hash)
        .unwrap()
        .starts_with("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    let data = b"spine ".repeat(1000);
    let gz = run("legacy.gzip", serde_json::json!({"level": 9}), &data).await;
    assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    assert!(
        gz.len() < 100,
        "6000 repetitive bytes compress to {} bytes",
        gz.len()
    );
}
