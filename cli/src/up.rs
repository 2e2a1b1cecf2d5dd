//! `spine up`: the whole bus on one machine in one process — the embedded XMPP server, a
//! dispatcher and local agents — until Ctrl-C or SIGTERM, then a clean shutdown (agents drain,
//! the dispatcher stops, the server closes every stream).
//!
//! The banner's first line is the web console's URL (`/ui` on the dispatcher's HTTP API,
//! docs/console.md), where a person watches the fleet and the jobs of this farm.
//!
//! With `--demo` it runs the example workloads end to end instead of waiting for a signal
//! (see `demo.rs`), then shuts down the same way and exits 0 if they succeeded; with
//! `--demo --stay` it stays up after the demo until a signal, so that the demo's jobs can be
//! looked at in the console, and still exits with the demo's outcome.
//!
//! Accounts get random passwords for this run only (never printed); state (job store,
//! certificate) goes in `--data-dir` or a temporary directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rand::distr::{Alphanumeric, SampleString};
use sha2::Digest as _;
use spine_agent::{Agent, AgentConfig, JobContext, JobError, Output};
use spine_dispatcher::{Dispatcher, DispatcherConfig};
use spine_server::{Server, ServerConfig};
use tokio::sync::watch;

/// Arguments of `spine up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Local agents to run (default: the number of CPU cores).
    #[arg(long)]
    agents: Option<usize>,
    /// Slots per agent.
    #[arg(long, default_value_t = 2)]
    slots: u64,
    /// Directory for the job store and the server certificate (default: a temporary one,
    /// removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address of the XMPP server (port 0: any free port).
    /// [default: 127.0.0.1:5222; with --demo a free port]
    #[arg(long)]
    xmpp_listen: Option<SocketAddr>,
    /// Address of the dispatcher's HTTP API (port 0: any free port).
    /// [default: 127.0.0.1:8480; with --demo a free port]
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Run the demo (an image batch and a word-count map/reduce), print the results and
    /// timings, stop, and exit 0 if both succeeded. Results go in --data-dir when given.
    #[arg(long)]
    demo: bool,
    /// With --demo: keep running after the demo (to look at its jobs in the console) until
    /// Ctrl-C or SIGTERM; the exit code is still the demo's.
    #[arg(long, requires = "demo")]
    stay: bool,
    /// Log filter (RUST_LOG syntax); default "warn,spine=info", with --demo "warn".
    #[arg(long)]
    log: Option<String>,
    /// Also run an agent from this agent configuration (docs/agent.md): its wrapped `exec`
    /// and `http` capabilities, slots and attributes, joined to this bus (its jid, password,
    /// server and dispatchers are replaced by the local ones). Repeatable.
    #[arg(long = "agent-config", value_name = "FILE")]
    agent_configs: Vec<PathBuf>,
    /// Run canary jobs for the built-in text.upper and hash.sha256 on every local agent every
    /// CANARIES (like "1m"; docs/events.md, "Canaries"): an agent whose canaries fail gets no
    /// real jobs of that capability until they pass. They are jobs of their own, listed
    /// with the others.
    #[arg(long, value_name = "INTERVAL", value_parser = humantime::parse_duration)]
    canaries: Option<std::time::Duration>,
}

/// The canaries of the built-in capabilities (`spine up --canaries`), every `interval`.
pub(crate) fn builtin_canaries(
    interval: std::time::Duration,
) -> Vec<spine_dispatcher::canaries::CanaryConfig> {
    let canary =
        |capability: &str, input: &str, expect: String| spine_dispatcher::canaries::CanaryConfig {
            capability: capability.into(),
            args: Default::default(),
            input: Some(input.into()),
            input_base64: None,
            expect: Some(expect),
            expect_sha256: None,
            expect_json: None,
            interval,
            timeout: std::time::Duration::from_secs(30),
            quarantine_after: 3,
            release_after: 2,
        };
    let digest: String = sha2::Sha256::digest(b"spine canary")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    vec![
        canary("text.upper", "spine canary", "SPINE CANARY".into()),
        canary("hash.sha256", "spine canary", digest),
    ]
}

fn secret() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// The capabilities every local agent offers. `text.upper` and `hash.sha256` take no
/// arguments: a job giving any is refused with `bad-arguments` naming it.
pub(crate) fn builtin(builder: spine_agent::AgentBuilder) -> spine_agent::AgentBuilder {
    spine_example_wordcount::register(spine_example_image::register(builder))
        .capability_args("text.upper", None, &[], |ctx: JobContext| async move {
            let text = String::from_utf8(ctx.input)
                .map_err(|_| JobError::bad_argument("input", "must be UTF-8 text"))?;
            let upper = off_the_runtime(text.len(), move || text.to_uppercase()).await?;
            Ok::<_, JobError>(Output::bytes(upper).with_mime("text/plain; charset=utf-8"))
        })
        .capability_args("hash.sha256", None, &[], |ctx: JobContext| async move {
            let input = ctx.input;
            let digest = off_the_runtime(input.len(), move || sha2::Sha256::digest(&input)).await?;
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            Ok::<_, JobError>(Output::bytes(hex).with_mime("text/plain"))
        })
}

/// Inputs from this size on are handled on the blocking pool: a 64 MiB input takes
/// 0.1–0.3 s, which on the runtime's thread (`spine agent` has one by default) would hold
/// the agent's other jobs and its XMPP stream meanwhile.
const BLOCKING_FROM: usize = 1 << 20;

/// Runs `f` (CPU work over `len` bytes) on the blocking pool if `len` is large, else here.
async fn off_the_runtime<T: Send + 'static>(
    len: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobError> {
    if len < BLOCKING_FROM {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobError::Retryable(format!("the handler's thread failed: {e}")))
}

pub fn run(args: UpArgs) -> Result<()> {
    let default_log = if args.demo { "warn" } else { "warn,spine=info" };
    crate::server::init_logging(args.log.as_deref().unwrap_or(default_log));
    let n_agents = args
        .agents
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        })
        .max(1);
    if args.slots == 0 {
        anyhow::bail!("--slots must be at least 1");
    }
    // A temporary data directory is held by this process while it runs, so that the next
    // `spine up` deletes it if this one is killed before it can (spine_agent::scratch).
    let temp = match &args.data_dir {
        Some(_) => None,
        None => {
            let (dir, swept) = spine_agent::scratch::held_temp_dir("spine-up-data-").with_context(|| {
                format!(
                    "creating a temporary data directory under {} (set TMPDIR to a writable directory, or pass --data-dir DIR)",
                    std::env::temp_dir().display()
                )
            })?;
            if swept > 0 {
                tracing::info!(
                    "deleted {swept} temporary data {} that killed `spine up` runs left",
                    if swept == 1 {
                        "directory"
                    } else {
                        "directories"
                    }
                );
            }
            Some(dir)
        }
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let extra: Vec<(String, AgentConfig)> = args
        .agent_configs
        .iter()
        .map(|p| {
            let cfg = AgentConfig::load(Some(p))
                .map_err(|e| anyhow::anyhow!("--agent-config {}: {e}", p.display()))?;
            anyhow::ensure!(
                !cfg.capabilities.is_empty(),
                "--agent-config {}: it wraps no capability ([[capability]] sections): nothing to run",
                p.display()
            );
            Ok((p.display().to_string(), cfg))
        })
        .collect::<Result<_>>()?;
    let extra_caps: Vec<String> = extra
        .iter()
        .flat_map(|(_, c)| c.capabilities.iter().map(|c| c.name.clone()))
        .collect();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let farm = Farm::start(FarmOptions {
            agents: n_agents,
            slots: args.slots,
            // The demo is self-contained: free ports unless asked otherwise, so that it runs
            // beside a system XMPP server or another `spine up`.
            xmpp_listen: args.xmpp_listen.unwrap_or_else(|| {
                SocketAddr::from(([127, 0, 0, 1], if args.demo { 0 } else { 5222 }))
            }),
            http_listen: args.http_listen.unwrap_or_else(|| {
                SocketAddr::from(([127, 0, 0, 1], if args.demo { 0 } else { 8480 }))
            }),
            data_dir: data_dir.clone(),
            max_blob: None,
            dispatcher: args.canaries.map(|interval| -> crate::up::DispatcherChange {
                Box::new(move |d: &mut DispatcherConfig| d.canaries = builtin_canaries(interval))
            }),
            agent: None,
            extra_agents: extra,
        })
        .await?;
        let (xmpp, http) = (farm.xmpp, farm.http);
        // Ready means ready: the banner (and a script's first submission) comes after every
        // local agent has registered, so no job meets an unknown capability.
        let api = spine_client::Client::new(&format!("http://{http}"), None)?;
        crate::demo::wait_for_agents(&api, n_agents).await?;
        crate::demo::wait_for_capabilities(&api, &extra_caps).await?;
        // `spine up` serves loopback only (it has no tokens), so this address is one a
        // browser on this machine opens.
        let console = format!("http://{http}/ui");
        // First, so that a person (or a script) finds it without reading the rest.
        println!("console: {console}");
        println!("spine up: XMPP server {xmpp} (domain localhost), HTTP API http://{http}, {n_agents} agents with {} slots each", args.slots);
        println!("capabilities: text.upper, hash.sha256, image.thumbnail, image.resize, image.grayscale, image.blur, image.contact-sheet, wordcount.split, wordcount.map, wordcount.reduce");
        if !extra_caps.is_empty() {
            println!("from --agent-config: {}", extra_caps.join(", "));
        }
        println!("try: spine submit text.upper --input FILE --wait --api http://{http}");
        println!("data: {}{}", data_dir.display(), if temp.is_some() { " (temporary)" } else { "" });
        use std::io::Write as _;
        let _ = std::io::stdout().flush();

        let outcome = if args.demo {
            let started = std::time::Instant::now();
            let r = tokio::select! {
                r = crate::demo::run(&api, &data_dir, temp.is_none()) => {
                    match &r {
                        Ok(()) => println!("demo finished in {:.2} s{}", started.elapsed().as_secs_f64(),
                            if temp.is_some() { " (pass --data-dir DIR to keep its results)" } else { "" }),
                        Err(e) => eprintln!("spine up: the demo failed: {e:#}"),
                    }
                    r
                }
                _ = crate::server::shutdown_signal() => return stop(farm, temp, Err(anyhow::anyhow!("interrupted"))).await,
            };
            if args.stay {
                println!("open the console at {console} to look at the demo's jobs; Ctrl-C stops");
                let _ = std::io::stdout().flush();
                crate::server::shutdown_signal().await;
            } else {
                println!("open the console at {console}: run `spine up --demo --stay` to keep it up after the demo");
            }
            r
        } else {
            crate::server::shutdown_signal().await;
            Ok(())
        };
        stop(farm, temp, outcome).await
    })
}

/// Stops the farm cleanly, removes the temporary data directory, and returns `outcome`.
async fn stop(
    farm: Farm,
    temp: Option<spine_agent::scratch::HeldDir>,
    outcome: Result<()>,
) -> Result<()> {
    eprintln!("spine up: stopping (agents drain, then the dispatcher and the server)");
    farm.stop().await;
    drop(temp);
    outcome
}

/// The accounts of a local farm (a dispatcher and `agents` agents, each with a random password
/// for this run only) and the configuration of each part that uses them: [`Farm`] runs the
/// parts in this process, `spine bench soak` writes the same configurations to files for
/// `spine server`, `spine dispatcher` and `spine agent` child processes.
pub(crate) struct FarmAccounts {
    /// Agent accounts: `agent1` … `agent<agents>`.
    agents: usize,
    dispatcher_pw: String,
    agent_pw: String,
}

impl FarmAccounts {
    pub(crate) fn new(agents: usize) -> FarmAccounts {
        FarmAccounts {
            agents,
            dispatcher_pw: secret(),
            agent_pw: secret(),
        }
    }

    /// The embedded server on `listen`, with one account per part; its self-signed
    /// certificate is kept under `data_dir/tls`.
    pub(crate) fn server_config(
        &self,
        listen: SocketAddr,
        data_dir: &std::path::Path,
    ) -> ServerConfig {
        let mut scfg = ServerConfig {
            listen,
            ..ServerConfig::default()
        };
        scfg.tls.self_signed_dir = Some(data_dir.join("tls"));
        let account = |user: String, pw: &str| spine_server::config::AccountConfig {
            user,
            password: Some(pw.to_owned()),
            scram_sha256: None,
            scram_sha1: None,
        };
        scfg.accounts = std::iter::once(account("dispatcher".into(), &self.dispatcher_pw))
            .chain((1..=self.agents).map(|i| account(format!("agent{i}"), &self.agent_pw)))
            .collect();
        scfg
    }

    /// The dispatcher, logging in to the server at `xmpp`, its HTTP API on `http_listen`, its
    /// job store under `data_dir/dispatcher`.
    pub(crate) fn dispatcher_config(
        &self,
        xmpp: SocketAddr,
        http_listen: SocketAddr,
        data_dir: &std::path::Path,
    ) -> DispatcherConfig {
        DispatcherConfig {
            jid: "dispatcher@localhost/up".into(),
            password: Some(self.dispatcher_pw.clone()),
            server: xmpp.to_string(),
            data_dir: data_dir.join("dispatcher"),
            http_listen: Some(http_listen),
            ..DispatcherConfig::default()
        }
    }

    /// Agent number `i` (from 1), logging in to the server at `xmpp`.
    pub(crate) fn agent_config(&self, i: usize, xmpp: SocketAddr, slots: u64) -> AgentConfig {
        AgentConfig {
            jid: format!("agent{i}@localhost/up"),
            password: Some(self.agent_pw.clone()),
            server: xmpp.to_string(),
            dispatchers: vec!["dispatcher@localhost".into()],
            slots,
            drain_grace: Duration::from_secs(10),
            ..AgentConfig::default()
        }
    }
}

/// A change to the farm's dispatcher configuration.
pub type DispatcherChange = Box<dyn FnOnce(&mut DispatcherConfig) + Send>;

/// A change to each local agent's configuration (benchmarks: the CA of an HTTPS dispatcher,
/// `http_data = false`, input limits).
pub type AgentChange = Box<dyn Fn(&mut AgentConfig) + Send>;

/// What a local farm is made of.
pub struct FarmOptions {
    /// Local agents.
    pub agents: usize,
    /// Slots per agent.
    pub slots: u64,
    /// Address of the XMPP server (port 0: any free port).
    pub xmpp_listen: SocketAddr,
    /// Address of the dispatcher's HTTP API (port 0: any free port).
    pub http_listen: SocketAddr,
    /// Job store and server certificate go here.
    pub data_dir: PathBuf,
    /// The dispatcher's `max_blob` (largest input and output), when not the default.
    pub max_blob: Option<bytesize::ByteSize>,
    /// Changes to the dispatcher's configuration beyond these (benchmarks: HTTPS, limits).
    pub dispatcher: Option<DispatcherChange>,
    /// Changes to every agent's configuration beyond these.
    pub agent: Option<AgentChange>,
    /// Agents from agent configurations (`spine up --agent-config`), each with where it came
    /// from: their wrapped capabilities only, joined to this bus.
    pub extra_agents: Vec<(String, AgentConfig)>,
}

/// The whole bus in this process: the embedded server, a dispatcher and local agents offering
/// the built-in and example capabilities, each account with a random password for this run.
pub struct Farm {
    /// Where the XMPP server listens.
    pub xmpp: SocketAddr,
    /// Where the HTTP API listens.
    pub http: SocketAddr,
    agents_stop: watch::Sender<bool>,
    dispatcher_stop: watch::Sender<bool>,
    server_stop: watch::Sender<bool>,
    agent_tasks: Vec<tokio::task::JoinHandle<Result<(), spine_agent::AgentError>>>,
    dispatcher_task: tokio::task::JoinHandle<Result<(), spine_dispatcher::DispatcherError>>,
    server_task: tokio::task::JoinHandle<Result<(), spine_server::ServerError>>,
}

impl Farm {
    /// Starts the server, the dispatcher and the agents.
    pub async fn start(o: FarmOptions) -> Result<Farm> {
        // Server, with one account per component.
        let accounts = FarmAccounts::new(o.agents + o.extra_agents.len());
        let scfg = accounts.server_config(o.xmpp_listen, &o.data_dir);
        let server = Server::bind(scfg).await.map_err(|e| {
            let hint = match &e {
                spine_server::ServerError::Bind { error, .. }
                    if error.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    " (another process holds the port, often a system Prosody or ejabberd on \
                     5222: pass --xmpp-listen 127.0.0.1:0 to take a free one)"
                }
                _ => "",
            };
            anyhow::anyhow!("starting the XMPP server: {e}{hint}")
        })?;
        let xmpp = server.local_addr();
        // One stop signal per component, so that they stop in order.
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let (server_stop, server_rx) = watch::channel(false);
        let (agents_stop, agents_rx) = watch::channel(false);
        let server_task = tokio::spawn(server.run(stopped(server_rx)));

        let mut dcfg = accounts.dispatcher_config(xmpp, o.http_listen, &o.data_dir);
        if let Some(max_blob) = o.max_blob {
            dcfg.max_blob = max_blob;
        }
        if let Some(change) = o.dispatcher {
            change(&mut dcfg);
        }
        let dispatcher = Dispatcher::bind(dcfg).await.map_err(|e| {
            let hint = if e.to_string().contains("in use") {
                " (another process holds the port: pass --http-listen 127.0.0.1:0 to take a free one)"
            } else {
                ""
            };
            anyhow::anyhow!("starting the dispatcher's HTTP API on {}: {e}{hint}", o.http_listen)
        })?;
        let http = dispatcher
            .http_addr()
            .context("the HTTP API has no address")?;
        let (dispatcher_stop, dispatcher_rx) = watch::channel(false);
        let dispatcher_task = tokio::spawn(dispatcher.run(stopped(dispatcher_rx)));

        let mut agent_tasks = Vec::new();
        for (k, (from, cfg)) in o.extra_agents.into_iter().enumerate() {
            // Its capabilities, slots and attributes; the account and bus are the farm's.
            let local = accounts.agent_config(o.agents + 1 + k, xmpp, cfg.slots);
            let acfg = AgentConfig {
                jid: local.jid,
                password: local.password,
                password_file: None,
                server: local.server,
                dispatchers: local.dispatchers,
                tls: local.tls,
                ..cfg
            };
            let agent = Agent::builder(acfg)
                .build()
                .with_context(|| format!("--agent-config {from}"))?;
            agent_tasks.push(tokio::spawn(agent.run(stopped(agents_rx.clone()))));
        }
        for i in 1..=o.agents {
            let mut acfg = accounts.agent_config(i, xmpp, o.slots);
            if let Some(change) = &o.agent {
                change(&mut acfg);
            }
            let agent = builtin(Agent::builder(acfg))
                .build()
                .context("building a local agent")?;
            agent_tasks.push(tokio::spawn(agent.run(stopped(agents_rx.clone()))));
        }
        Ok(Farm {
            xmpp,
            http,
            agents_stop,
            dispatcher_stop,
            server_stop,
            agent_tasks,
            dispatcher_task,
            server_task,
        })
    }

    /// Stops in order: the agents (they drain), the dispatcher, the server.
    pub async fn stop(self) {
        let _ = self.agents_stop.send(true);
        for t in self.agent_tasks {
            match tokio::time::timeout(Duration::from_secs(15), t).await {
                Ok(Ok(Err(e))) => eprintln!("spine up: an agent stopped with an error: {e}"),
                Err(_) => eprintln!("spine up: an agent did not stop in time"),
                _ => {}
            }
        }
        let _ = self.dispatcher_stop.send(true);
        if let Ok(Ok(Err(e))) =
            tokio::time::timeout(Duration::from_secs(5), self.dispatcher_task).await
        {
            eprintln!("spine up: the dispatcher stopped with an error: {e}");
        }
        let _ = self.server_stop.send(true);
        if let Ok(Ok(Err(e))) =
            tokio::time::timeout(Duration::from_secs(10), self.server_task).await
        {
            eprintln!("spine up: the server stopped with an error: {e}");
        }
    }
}
