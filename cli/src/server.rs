//! `spine server`: runs the embedded XMPP server until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::distr::{Alphanumeric, SampleString};
use spine_server::{Server, ServerConfig, DEFAULT_CONFIG};

/// Arguments of `spine server`.
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// Configuration file (TOML). See --print-config for every key and its default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// XMPP domain to serve (overrides `domain`).
    #[arg(long)]
    domain: Option<String>,
    /// Development mode: any user logs in with this shared secret (overrides `dev_secret`).
    #[arg(long)]
    dev_secret: Option<String>,
    /// Write the server certificate (PEM) to this file at start, for clients to trust.
    #[arg(long)]
    write_cert: Option<PathBuf>,
    /// Print the effective configuration (or, without a config file, the commented default)
    /// and exit.
    #[arg(long)]
    print_config: bool,
    /// Print an [[account]] block for USER (SCRAM hashes, no password) and exit.
    #[arg(long, value_name = "USER")]
    add_user: Option<String>,
    /// Password for --add-user (default: a random one, printed to standard error).
    #[arg(long, requires = "add_user")]
    password: Option<String>,
    /// Log filter (RUST_LOG syntax), e.g. "info" or "spine_server=debug".
    #[arg(long, default_value = "info")]
    log: String,
}

/// Sets up logging to standard error with the given filter (RUST_LOG wins if set).
pub fn init_logging(filter: &str) {
    let env = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(env))
        .with_writer(std::io::stderr)
        .try_init();
}

pub use spine_agent::shutdown_signal;

pub fn run(args: ServerArgs) -> Result<()> {
    if let Some(user) = &args.add_user {
        let password = match &args.password {
            Some(p) => p.clone(),
            None => {
                let p = Alphanumeric.sample_string(&mut rand::rng(), 24);
                eprintln!("generated password for {user}: {p}");
                p
            }
        };
        if user.is_empty() || user.contains(['@', '/', ' ', '"']) {
            bail!("'{user}' is not a valid user name (no '@', '/', spaces or quotes)");
        }
        print!("{}", spine_server::account_block(user, &password));
        return Ok(());
    }
    let mut cfg =
        ServerConfig::load(args.config.as_deref()).context("loading the server configuration")?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(d) = args.domain {
        cfg.domain = d;
    }
    if let Some(s) = args.dev_secret {
        cfg.dev_secret = Some(s);
    }
    cfg.validate()?;
    if args.print_config {
        if args.config.is_none() {
            print!("{DEFAULT_CONFIG}");
        } else {
            print!(
                "{}",
                toml::to_string_pretty(&redacted(&cfg)).context("printing the configuration")?
            );
        }
        return Ok(());
    }
    init_logging(&args.log);
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        if let Some(path) = &args.write_cert {
            std::fs::write(path, server.cert_pem())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        // One machine-readable line on stdout so scripts and tests learn the port.
        println!(
            "spine server listening on {} (domain {})",
            server.local_addr(),
            server.domain()
        );
        server.run(shutdown_signal()).await?;
        tracing::info!("server stopped");
        Ok(())
    })
}

/// The configuration with passwords replaced, for --print-config.
fn redacted(cfg: &ServerConfig) -> ServerConfig {
    let mut c = cfg.clone();
    for a in &mut c.accounts {
        if a.password.is_some() {
            a.password = Some("<redacted>".into());
        }
    }
    if c.dev_secret.is_some() {
        c.dev_secret = Some("<redacted>".into());
    }
    c
}
