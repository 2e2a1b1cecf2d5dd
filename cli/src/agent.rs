//! `spine agent`: runs an agent from a configuration file until SIGINT or SIGTERM, then drains.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use spine_agent::{Agent, AgentConfig, DEFAULT_CONFIG};

/// Arguments of `spine agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Configuration file (TOML); SPINE_AGENT_* variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the effective configuration (or, without a file, the commented default) and exit.
    #[arg(long)]
    print_config: bool,
    /// Check the configuration as the agent does at start (each exec program included), print
    /// what was checked and exit 0, or 2 with the error; nothing is connected to.
    #[arg(long, conflicts_with = "print_config")]
    check: bool,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    log: String,
    /// Also offer the in-process capabilities of `spine up`'s local agents (`text.upper`,
    /// `hash.sha256`, the image and word-count examples). Hidden: it exists so that `spine
    /// bench soak` can run its agents as separate processes, each with its own memory figure.
    #[arg(long, hide = true)]
    builtin: bool,
}

pub fn run(args: AgentArgs) -> Result<()> {
    if args.print_config
        && args.config.is_none()
        && std::env::vars().all(|(k, _)| !k.starts_with("SPINE_AGENT_"))
    {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let cfg =
        AgentConfig::load(args.config.as_deref()).context("loading the agent configuration")?;
    if args.print_config {
        let mut shown = cfg.clone();
        if shown.password.is_some() {
            shown.password = Some("<redacted>".into());
        }
        print!(
            "{}",
            toml::to_string_pretty(&shown).context("printing the configuration")?
        );
        return Ok(());
    }
    // Before --check too: building the agent warns about undeclared exec arguments.
    crate::server::init_logging(&args.log);
    if args.check {
        return check(args.config.as_deref(), cfg);
    }
    let mut builder = Agent::builder(cfg);
    if args.builtin {
        builder = crate::up::builtin(builder);
    }
    let agent = builder.build().context("building the agent")?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(agent.run(crate::server::shutdown_signal()))
        .context("agent stopped with an error")?;
    tracing::info!("agent stopped");
    Ok(())
}

/// `spine agent --check`: everything `run` checks before it connects — validation, password,
/// server address, TLS trust, each exec program — and the capabilities built as at start.
fn check(file: Option<&Path>, cfg: AgentConfig) -> Result<()> {
    let lines = cfg.check().context("checking the agent configuration")?;
    let agent = Agent::builder(cfg)
        .build()
        .context("checking the agent configuration")?;
    let source = file.map_or_else(
        || "the default configuration".to_owned(),
        |f| f.display().to_string(),
    );
    println!("checking {source} (and SPINE_AGENT_* variables)");
    for line in lines {
        println!("  {line}");
    }
    println!(
        "ok: {} capabilities; nothing was connected to",
        agent.capabilities().count()
    );
    Ok(())
}
