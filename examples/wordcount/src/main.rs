//! `spine-wordcount-agent --config agent.toml`: an agent offering `wordcount.split`,
//! `wordcount.map` and `wordcount.reduce` (plus any capabilities wrapped in its configuration).
//! Stops cleanly (drains) on Ctrl-C or SIGTERM. Logs go to standard error (`RUST_LOG`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    spine_agent::standalone_main("spine-wordcount-agent", spine_example_wordcount::register).await
}
