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
    /// Password for --add-user (or SPINE_ADD_USER_PASSWORD; default: a random one, printed to
    /// standard error). On the command line it is visible to every user of the machine (ps,
    /// /proc): prefer the variable or --password-file.
    #[arg(long, env = "SPINE_ADD_USER_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// File holding the password for --add-user (a trailing newline is stripped).
    #[arg(long, value_name = "FILE", requires = "add_user")]
    password_file: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax), e.g. "info" or "spine_server=debug".
    #[arg(long, default_value = "info")]
    log: String,
}

pub use crate::logging::init as init_logging;

pub use spine_agent::shutdown_signal;

/// Runs a component's main future on a multi-threaded runtime of `threads` worker threads
/// (None: one per core) **as a spawned task**, not on the thread that called `block_on`.
/// `block_on`'s thread is not one of the runtime's workers: every wake-up between a future
/// running there (the dispatcher's or the agent's driver) and the tasks it talks to (HTTP
/// connections, the XMPP stream, the commit thread's answers) is a futex wake of another
/// thread. Spawned, the driver runs on the workers beside those tasks, and a task it wakes
/// usually runs next on the same thread. Measured with `spine bench cost` (BENCHMARKS.md,
/// "Cost per job over HTTP"): a sequential job's p50 and CPU drop by about a sixth; the jobs
/// per second in flight do not fall.
pub fn run_spawned_on<T: Send + 'static>(
    what: &str,
    threads: Option<usize>,
    main: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    let rt = b
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match tokio::spawn(main).await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("{what} stopped: {e}")),
        }
    })
}

/// On SIGHUP: reads the configuration again (file, environment, command-line overrides) and
/// puts its accounts and TLS certificate in force (`spine server --add-user` output, a renewed
/// certificate) without dropping a session. A bad file is logged and changes nothing.
async fn reload_on_sighup(
    reloader: spine_server::Reloader,
    load: impl Fn() -> Result<ServerConfig> + Send + 'static,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}): configuration reload disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match load().and_then(|cfg| Ok((cfg.accounts.len(), reloader.reload(&cfg)?))) {
            Ok((n, restart)) => {
                tracing::info!(
                    accounts = n,
                    "SIGHUP: configuration reloaded (accounts and TLS certificate)"
                );
                if !restart.is_empty() {
                    tracing::warn!(
                        "SIGHUP: changed keys that take effect only after a restart: {}",
                        restart.join(", ")
                    );
                }
            }
            Err(e) => {
                tracing::error!("SIGHUP: reload failed, the running configuration stays: {e:#}")
            }
        }
    }
}

pub fn run(args: ServerArgs) -> Result<()> {
    if let Some(user) = &args.add_user {
        let password = match (&args.password, &args.password_file) {
            (Some(_), Some(_)) => bail!(
                "a password (--password or SPINE_ADD_USER_PASSWORD) and --password-file are both given: use one"
            ),
            (Some(p), None) => p.clone(),
            (None, Some(f)) => {
                let p = std::fs::read_to_string(f)
                    .with_context(|| format!("--password-file {}", f.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                if p.is_empty() {
                    bail!("--password-file {}: the file is empty", f.display());
                }
                p
            }
            (None, None) => {
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
    let load = {
        let (path, listen, domain, dev_secret) = (
            args.config.clone(),
            args.listen,
            args.domain.clone(),
            args.dev_secret.clone(),
        );
        move || -> Result<ServerConfig> {
            let mut cfg =
                ServerConfig::load(path.as_deref()).context("loading the server configuration")?;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(d) = &domain {
                cfg.domain = d.clone();
            }
            if let Some(s) = &dev_secret {
                cfg.dev_secret = Some(s.clone());
            }
            cfg.validate()?;
            Ok(cfg)
        }
    };
    let cfg = load()?;
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
        tokio::spawn(reload_on_sighup(server.reloader(), load));
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
