//! `spine-wordcount-agent --config agent.toml`: an agent offering `wordcount.split`,
//! `wordcount.map` and `wordcount.reduce` (plus any capabilities wrapped in its configuration).
//! Stops cleanly (drains) on Ctrl-C or SIGTERM. Logs go to standard error (`RUST_LOG`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match spine_agent::run_standalone(spine_example_wordcount::register).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spine-wordcount-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
