//! `spine dispatcher`: runs a dispatcher until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use spine_dispatcher::{DispatcherConfig, DEFAULT_CONFIG};

/// Arguments of `spine dispatcher`.
#[derive(Args, Debug)]
pub struct DispatcherArgs {
    /// Configuration file (TOML); SPINE_DISPATCHER_* variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective configuration (or, without a file, the commented default) and exit.
    #[arg(long)]
    print_config: bool,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    log: String,
}

pub fn run(args: DispatcherArgs) -> Result<()> {
    if args.print_config
        && args.config.is_none()
        && std::env::vars().all(|(k, _)| !k.starts_with("SPINE_DISPATCHER_"))
    {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let cfg = DispatcherConfig::load(args.config.as_deref())
        .context("loading the dispatcher configuration")?;
    if args.print_config {
        let mut shown = cfg.clone();
        if shown.password.is_some() {
            shown.password = Some("<redacted>".into());
        }
        for t in &mut shown.http_tokens {
            t.token = "<redacted>".into();
        }
        print!(
            "{}",
            toml::to_string_pretty(&shown).context("printing the configuration")?
        );
        return Ok(());
    }
    crate::server::init_logging(&args.log);
    let threads = Some(cfg.runtime_threads());
    crate::server::run_spawned_on("dispatcher", threads, async move {
        spine_dispatcher::run(cfg, crate::server::shutdown_signal())
            .await
            .context("dispatcher stopped with an error")
    })?;
    tracing::info!("dispatcher stopped");
    Ok(())
}
