//! `spine-image-agent --config agent.toml`: an agent offering the image capabilities (plus any
//! capabilities wrapped in its configuration). Stops cleanly (drains) on Ctrl-C or SIGTERM.
//! Logs go to standard error (`RUST_LOG` sets the filter; default `info`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    spine_agent::standalone_main("spine-image-agent", spine_example_image::register).await
}
