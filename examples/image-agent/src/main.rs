//! `spine-image-agent --config agent.toml`: an agent offering the image capabilities (plus any
//! capabilities wrapped in its configuration). Stops cleanly (drains) on Ctrl-C or SIGTERM.
//! Logs go to standard error (`RUST_LOG` sets the filter; default `info`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match spine_agent::run_standalone(spine_example_image::register).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spine-image-agent: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
