//! `spine-image-agent --config agent.toml`: an agent offering the image capabilities (plus any
//! capabilities wrapped in its configuration). Stops cleanly (drains) on Ctrl-C or SIGTERM.

use anyhow::{Context, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let path = std::env::args().skip_while(|a| a != "--config").nth(1);
    let cfg = spine_agent::AgentConfig::load(path.as_deref().map(std::path::Path::new))
        .context("loading the agent configuration")?;
    let agent = spine_example_image::register(spine_agent::Agent::builder(cfg)).build()?;
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        }
    };
    agent
        .run(shutdown)
        .await
        .context("agent stopped with an error")
}
