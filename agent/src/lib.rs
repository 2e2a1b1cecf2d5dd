//! `spine-agent`: write Spine agents in Rust, or put a legacy program or HTTP service on the
//! bus with configuration alone.
//!
//! An agent joins the XMPP server, advertises its capabilities and load to its dispatchers
//! (directed presence, docs/PROTOCOL.md §4–5), runs the jobs they send within its slots and
//! deadlines, and reports progress and results. One task owns the connection (`driver`); it
//! feeds every event to an I/O-free state machine (`machine`, after `inbound` has classified
//! the stanza) and performs the effects it returns; handlers run in tasks of their own
//! (`supervisor`) and talk to the driver through channels.
//!
//! ```no_run
//! use spine_agent::{Agent, AgentConfig, JobContext, Output, JobError};
//! # async fn demo() -> Result<(), spine_agent::AgentError> {
//! let config = AgentConfig::load(Some("agent.toml".as_ref()))?;
//! let agent = Agent::builder(config)
//!     .capability("text.upper", Some(4), |ctx: JobContext| async move {
//!         let text = String::from_utf8(ctx.input).map_err(|_| JobError::bad_argument("input", "must be UTF-8"))?;
//!         Ok::<_, JobError>(Output::bytes(text.to_uppercase()).with_mime("text/plain"))
//!     })
//!     .build()?;
//! agent.run(tokio::signal::ctrl_c()).await
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod args;
pub mod config;
mod dataplane;
mod driver;
pub mod error;
pub mod exec;
mod files;
pub mod handler;
mod held;
pub mod http;
mod inbound;
mod machine;
pub mod scratch;
mod store;
mod supervisor;
pub mod sysload;
pub mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use spine_protocol::{AttrName, Attributes, CapabilityAd, CapabilityName};

pub use config::{AgentConfig, DEFAULT_CONFIG};
pub use error::AgentError;
pub use handler::{FragmentFile, Handler, JobContext, JobError, Output, SharedHandler};

/// Warns about an exec capability whose `{arg.NAME}` placeholders are not declared: each then
/// takes any string that does not start with `-`, a file name included.
fn undeclared_warning(capability: &str, argv: &[String], declared: bool) {
    if declared {
        return;
    }
    if let Ok(rules) = exec::arg_rules(argv, None) {
        let names: Vec<&str> = rules.names().collect();
        if !names.is_empty() {
            tracing::warn!(
                capability,
                args = names.join(", "),
                "exec arguments not declared: each takes any text not starting with '-' \
                 (a file name too); declare them under args (docs/agent.md)"
            );
        }
    }
}

/// A capability with its handler.
pub(crate) struct Capability {
    pub(crate) ad: CapabilityAd,
    pub(crate) handler: SharedHandler,
    /// The handler gets its input as a file ([`AgentBuilder::file_input`]).
    pub(crate) file_input: bool,
}

/// Builds an [`Agent`]: capabilities from code, plus those wrapped in the configuration.
pub struct AgentBuilder {
    config: AgentConfig,
    caps: Vec<Capability>,
    attrs: Vec<(String, String)>,
    /// Capabilities that take their input as a file, as named to [`AgentBuilder::file_input`].
    file_inputs: Vec<String>,
    errors: Vec<String>,
}

/// A configured agent, ready to run.
pub struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) caps: BTreeMap<CapabilityName, Capability>,
    pub(crate) attrs: Attributes,
}

impl Agent {
    /// Starts building an agent from its configuration.
    pub fn builder(config: AgentConfig) -> AgentBuilder {
        AgentBuilder {
            config,
            caps: Vec::new(),
            attrs: Vec::new(),
            file_inputs: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Connects and serves until `shutdown` completes; then drains (no new jobs, running ones
    /// finish within `drain_grace`), goes unavailable and returns.
    ///
    /// Errors: the first login failed (wrong password, server unreachable, TLS), or the server
    /// kept refusing the credentials after a reconnect.
    pub async fn run(
        self,
        shutdown: impl Future<Output = impl Sized> + Send,
    ) -> Result<(), AgentError> {
        driver::run(self, shutdown).await
    }

    /// The capabilities offered.
    pub fn capabilities(&self) -> impl Iterator<Item = &CapabilityName> {
        self.caps.keys()
    }
}

impl AgentBuilder {
    /// Adds a capability implemented in Rust. `slots`: at most that many of its jobs at once
    /// (besides the agent's total).
    pub fn capability(self, name: &str, slots: Option<u64>, handler: impl Handler) -> Self {
        self.capability_with(name, None, slots, &[], Arc::new(handler))
    }

    /// Adds a capability implemented in Rust that takes only the arguments named in `args`
    /// (each optional, of any JSON value: the handler reads and checks them). A job with any
    /// other argument is refused with `bad-arguments` naming it and listing these, before the
    /// handler runs, so that a misspelt argument is not silently ignored; `&[]` refuses every
    /// argument. The same declarations as an `exec` or `http` capability's `args`
    /// ([`args::ArgRules::accepting`]).
    pub fn capability_args(
        mut self,
        name: &str,
        slots: Option<u64>,
        args: &[&str],
        handler: impl Handler,
    ) -> Self {
        match args::ArgRules::accepting(args.iter().copied()) {
            Ok(rules) => self.capability_with(
                name,
                None,
                slots,
                &[],
                args::declared(rules, Arc::new(handler)),
            ),
            Err(e) => {
                self.errors
                    .push(format!("capability '{name}': {}: {}", e.key, e.why));
                self
            }
        }
    }

    /// Adds a capability with a version and attributes of its own.
    pub fn capability_with(
        mut self,
        name: &str,
        version: Option<&str>,
        slots: Option<u64>,
        attrs: &[(&str, &str)],
        handler: SharedHandler,
    ) -> Self {
        let name = match name.parse::<CapabilityName>() {
            Ok(n) => n,
            Err(e) => {
                self.errors.push(format!("capability '{name}': {e}"));
                return self;
            }
        };
        if slots == Some(0) {
            self.errors
                .push(format!("capability '{name}': slots must be at least 1"));
        }
        let mut ad = CapabilityAd::new(name);
        ad.version = version.map(str::to_owned);
        ad.slots = slots;
        for (k, v) in attrs {
            match k.parse::<AttrName>() {
                Ok(k) => {
                    ad.attrs.insert(k, (*v).to_owned());
                }
                Err(e) => self
                    .errors
                    .push(format!("capability '{}' attribute '{k}': {e}", ad.name)),
            }
        }
        self.caps.push(Capability {
            ad,
            handler,
            file_input: false,
        });
        self
    }

    /// Makes the capability `name` (added before or after this call) take its input as a
    /// file: its handler finds the input at [`JobContext::input_file`], not in
    /// [`JobContext::input`], and gets a directory of its own for output files
    /// ([`JobContext::work_dir`]). An input by reference is then streamed to that file while
    /// its size and SHA-256 are checked, never held in memory, up to `max_file_input_size`
    /// instead of `max_input_size`; an input that came inline or in chunks is written there
    /// too, so the handler sees one shape. Both are deleted after the job. For handlers that
    /// read large inputs piece by piece (a split step).
    pub fn file_input(mut self, name: &str) -> Self {
        self.file_inputs.push(name.to_owned());
        self
    }

    /// Adds an agent-wide attribute (in addition to the configuration's).
    pub fn attribute(mut self, key: &str, value: &str) -> Self {
        self.attrs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Checks everything and adds the capabilities wrapped in the configuration. An exec
    /// capability whose program cannot be started (missing, not a regular file, not
    /// executable by this user, not on its PATH) is refused here, naming the key
    /// ([`AgentConfig::check_programs`]), so that it is never advertised.
    pub fn build(mut self) -> Result<Agent, AgentError> {
        self.config.validate()?;
        self.config.check_programs()?;
        for c in self.config.capabilities.clone() {
            let handler = match &c.wrapper {
                config::WrapperConfig::Exec {
                    argv,
                    input,
                    output,
                    env,
                    cwd,
                    timeout,
                    max_output,
                    exit_codes,
                } => exec::ExecWrapper::new(
                    argv,
                    *input,
                    *output,
                    env.clone(),
                    cwd.clone(),
                    *timeout,
                    max_output.as_u64(),
                    exit_codes,
                )
                .and_then(|w| w.with_args(c.args.as_ref()))
                .map(|w| {
                    undeclared_warning(&c.name, argv, c.args.is_some());
                    w.into_handler()
                }),
                config::WrapperConfig::Http {
                    url,
                    method,
                    timeout,
                    max_output,
                    status_codes,
                } => {
                    http::HttpWrapper::new(url, method, *timeout, max_output.as_u64(), status_codes)
                        .and_then(|w| w.with_args(c.args.as_ref()))
                        .map(http::HttpWrapper::into_handler)
                }
            }
            .map_err(|e| AgentError::Config(format!("capability '{}': {e}", c.name)))?;
            let attrs: Vec<(&str, &str)> = c
                .attributes
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self = self.capability_with(&c.name, c.version.as_deref(), c.slots, &attrs, handler);
        }
        for name in std::mem::take(&mut self.file_inputs) {
            match self.caps.iter_mut().find(|c| c.ad.name.as_str() == name) {
                Some(c) => c.file_input = true,
                None => self.errors.push(format!(
                    "file_input: no capability '{name}' (add it with AgentBuilder::capability)"
                )),
            }
        }
        if !self.errors.is_empty() {
            return Err(AgentError::Config(self.errors.join("; ")));
        }
        let mut caps = BTreeMap::new();
        for c in self.caps {
            let name = c.ad.name.clone();
            if caps.insert(name.clone(), c).is_some() {
                return Err(AgentError::Config(format!(
                    "capability '{name}' is defined twice"
                )));
            }
        }
        if caps.is_empty() {
            return Err(AgentError::Config(
                "capability: the agent offers no capability".into(),
            ));
        }
        let mut attrs = Attributes::new();
        for (k, v) in self
            .config
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(self.attrs)
        {
            let key = k
                .parse::<AttrName>()
                .map_err(|e| AgentError::Config(format!("attributes.{k}: {e}")))?;
            attrs.insert(key, v);
        }
        Ok(Agent {
            config: self.config,
            caps,
            attrs,
        })
    }
}

/// Completes when the process receives SIGINT (Ctrl-C) or SIGTERM: the usual `shutdown` of
/// [`Agent::run`] (and of the dispatcher and server) in a program of its own.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops this process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The `main` of a stand-alone agent program: logs to standard error (`RUST_LOG` sets the
/// filter; default `info`), reads `--config FILE` from the command line (no file: defaults and
/// `SPINE_AGENT_*` variables), adds the program's capabilities with `register`, and serves
/// until Ctrl-C or SIGTERM, then drains. An error is printed as `PROGRAM: error` and makes
/// the exit status 1.
pub async fn standalone_main(
    program: &str,
    register: impl FnOnce(AgentBuilder) -> AgentBuilder,
) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match run_standalone(register).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_standalone(
    register: impl FnOnce(AgentBuilder) -> AgentBuilder,
) -> Result<(), AgentError> {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => {
                path = Some(
                    args.next()
                        .ok_or_else(|| AgentError::Config("--config needs a file name".into()))?,
                )
            }
            other => {
                return Err(AgentError::Config(format!(
                    "unknown argument '{other}' (usage: --config FILE)"
                )))
            }
        }
    }
    let cfg = AgentConfig::load(path.as_deref().map(std::path::Path::new))?;
    register(Agent::builder(cfg))
        .build()?
        .run(shutdown_signal())
        .await
}
