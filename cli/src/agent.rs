//! `spine agent`: runs an agent from a configuration file until SIGINT or SIGTERM, then drains;
//! `spine agent drain JID` / `spine agent undrain JID` ask a dispatcher to take a running agent
//! out of rotation, or put it back (PROTOCOL.md §5.6, `POST /v1/agents/{jid}/drain`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use spine_agent::{Agent, AgentConfig, DEFAULT_CONFIG};
use spine_client::ApiArgs as Api;

/// Arguments of `spine agent`: run one (the options), or act on a running one (a
/// subcommand). The two do not mix, so `spine agent --config agent.toml` runs as it always
/// did.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    action: Option<AgentAction>,
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

/// What to do to a running agent, through a dispatcher's HTTP API.
#[derive(Subcommand, Debug)]
enum AgentAction {
    /// Take an agent out of rotation: it finishes its running jobs, takes no new ones and
    /// keeps running (every dispatcher stops placing jobs on it) until `spine agent undrain`.
    Drain {
        /// The agent's JID: agent1@example.com/worker, or its bare JID when one agent runs on
        /// that account (`spine agents` lists them).
        jid: String,
        /// Why, for the agent's log and its state file.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        api: Api,
    },
    /// Put a drained agent back into rotation.
    Undrain {
        /// The agent's JID, as for drain.
        jid: String,
        #[command(flatten)]
        api: Api,
    },
}

/// `spine agent …`: exit 0 when the agent ran (or changed state), 1 when a dispatcher
/// refused the drain or undrain, 2 on any other error.
pub fn main(args: AgentArgs) -> Result<bool> {
    match args.action {
        Some(AgentAction::Drain { jid, reason, api }) => set_state(&api, &jid, true, reason),
        Some(AgentAction::Undrain { jid, api }) => set_state(&api, &jid, false, None),
        None => run(args).map(|()| true),
    }
}

/// Asks the dispatcher to drain or undrain `jid`, and prints the agent's state after it.
fn set_state(api: &Api, jid: &str, drain: bool, reason: Option<String>) -> Result<bool> {
    let verb = if drain { "drain" } else { "undrain" };
    // The JID is one path segment: its '/' travels as %2F.
    let mut url = reqwest::Url::parse("http://x/v1/agents/").context("building the path")?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("building the path"))?
        .pop_if_empty()
        .push(jid)
        .push(verb);
    let body = match reason {
        Some(r) => serde_json::json!({ "reason": r }),
        None => serde_json::json!({}),
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let c = api.client()?;
        let req = c
            .request(reqwest::Method::POST, url.path())
            .header("content-type", "application/json")
            .body(body.to_string());
        match c.call(req, &format!("{verb}ing {jid}")).await {
            Ok(a) => {
                println!(
                    "{} {} (in flight {}/{})",
                    a["jid"].as_str().unwrap_or(jid),
                    a["state"].as_str().unwrap_or("?"),
                    a["in_flight"],
                    a["slots"],
                );
                Ok(true)
            }
            Err(spine_client::ClientError::Api {
                status,
                condition,
                message,
                ..
            }) => {
                eprintln!("spine: cannot {verb} {jid}: {message} ({condition}, HTTP {status})");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    })
}

fn run(args: AgentArgs) -> Result<()> {
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
    let threads = cfg.threads;
    let mut builder = Agent::builder(cfg);
    if args.builtin {
        builder = crate::up::builtin(builder);
    }
    let agent = builder.build().context("building the agent")?;
    crate::server::run_spawned_on("agent", Some(threads), async move {
        agent
            .run(crate::server::shutdown_signal())
            .await
            .context("agent stopped with an error")
    })?;
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
