//! Agent configuration: a serde struct read from TOML plus `SPINE_AGENT_*` environment
//! variables (the `config` crate), with the commented default embedded (`agent.toml`) and
//! validation before start that names the bad key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use jid::{BareJid, Jid};
use serde::{Deserialize, Serialize};
use spine_protocol::{AttrName, CapabilityName};

use crate::args::{ArgSpec, DeclError};
use crate::error::AgentError;

/// The commented default configuration (`spine agent --print-config` without a file).
pub const DEFAULT_CONFIG: &str = include_str!("agent.toml");

pub use spine_xmpp::{TlsConfig, TlsMode};

/// What an exec capability feeds the program and reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InputMode {
    /// Job input on standard input.
    #[default]
    Stdin,
    /// Job input in a temporary file named by `{input}`.
    File,
    /// No input.
    None,
}

/// Where an exec capability's output comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OutputMode {
    /// Standard output.
    #[default]
    Stdout,
    /// The temporary file named by `{output}`.
    File,
}

/// What an exit code or HTTP status means for the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Success.
    Ok,
    /// Transient failure: the dispatcher may retry elsewhere.
    Retryable,
    /// The arguments are wrong.
    BadArguments,
    /// Permanent failure.
    Failed,
}

/// A capability wrapped from an existing program or service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum WrapperConfig {
    /// Run a program.
    Exec {
        /// Program and arguments; `{arg.NAME}`, `{input}`, `{output}` are substituted per element.
        argv: Vec<String>,
        /// Input mode.
        #[serde(default)]
        input: InputMode,
        /// Output mode.
        #[serde(default)]
        output: OutputMode,
        /// Extra environment (the program also gets PATH and LANG, nothing else).
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Working directory.
        cwd: Option<PathBuf>,
        /// Time limit per run.
        #[serde(
            default = "default_exec_timeout",
            with = "spine_protocol::units::duration"
        )]
        timeout: Duration,
        /// Largest output read.
        #[serde(default = "default_max_output", with = "spine_protocol::units::size")]
        max_output: ByteSize,
        /// Exit code → verdict (0 is ok unless mapped; others failed unless mapped).
        #[serde(default)]
        exit_codes: BTreeMap<String, Verdict>,
    },
    /// Call a local HTTP service.
    Http {
        /// The URL.
        url: String,
        /// POST (input as body) or GET.
        #[serde(default = "default_method")]
        method: String,
        /// Time limit per call.
        #[serde(
            default = "default_exec_timeout",
            with = "spine_protocol::units::duration"
        )]
        timeout: Duration,
        /// Largest response read.
        #[serde(default = "default_max_output", with = "spine_protocol::units::size")]
        max_output: ByteSize,
        /// Status code → verdict, overriding the defaults.
        #[serde(default)]
        status_codes: BTreeMap<String, Verdict>,
    },
}

fn default_exec_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_output() -> ByteSize {
    ByteSize::mib(64)
}
fn default_method() -> String {
    "POST".to_owned()
}

/// One configured capability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapabilityConfig {
    /// Capability name.
    pub name: String,
    /// Version advertised.
    pub version: Option<String>,
    /// Jobs of this capability at once.
    pub slots: Option<u64>,
    /// Attributes of this capability.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// The job arguments it accepts, by name (`[capability.args.NAME]`); any other is refused.
    /// Absent: an exec capability takes the `{arg.NAME}` of its argv as plain strings, an http
    /// capability takes none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<BTreeMap<String, ArgSpec>>,
    /// How it runs.
    #[serde(flatten)]
    pub wrapper: WrapperConfig,
}

/// Everything an agent needs.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Account.
    pub jid: String,
    /// Password.
    pub password: Option<String>,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
    /// Server address.
    pub server: String,
    /// Allowed dispatchers (bare JIDs).
    pub dispatchers: Vec<String>,
    /// Total slots.
    pub slots: u64,
    /// Worker threads of `spine agent`'s runtime (1 to 1024). The agent's own work — the XMPP
    /// stream, job bookkeeping, HTTP transfers, child processes' pipes — is I/O; CPU-heavy
    /// handlers run on the blocking pool, whatever this says. An agent built with the
    /// library runs on the caller's runtime and ignores it.
    pub threads: usize,
    /// Heartbeat interval.
    #[serde(with = "spine_protocol::units::duration")]
    pub heartbeat: Duration,
    /// Minimum interval between load reports.
    #[serde(with = "spine_protocol::units::duration")]
    pub load_debounce: Duration,
    /// Drain time on shutdown.
    #[serde(with = "spine_protocol::units::duration")]
    pub drain_grace: Duration,
    /// Outcomes cached.
    pub result_cache: usize,
    /// How long outcomes are cached.
    #[serde(with = "spine_protocol::units::duration")]
    pub result_ttl: Duration,
    /// Largest job input.
    #[serde(with = "spine_protocol::units::size")]
    pub max_input_size: ByteSize,
    /// Largest input by reference of a capability that takes its input as a file: streamed
    /// to disk, so bounded by the disk rather than by memory.
    #[serde(with = "spine_protocol::units::size")]
    pub max_file_input_size: ByteSize,
    /// Protocol 1.1's fast path (docs/PROTOCOL.md §13.4): fetch job inputs from, and upload
    /// outputs to, the dispatcher's HTTP port. On, the agent announces protocol 1.1; off, 1.0,
    /// and large payloads always travel as chunks over XMPP.
    pub http_data: bool,
    /// Map/reduce data locality (docs/PROTOCOL.md §13.5): listen here and serve the outputs
    /// this agent keeps when a dispatcher asks it to (map steps), so that reduce steps fetch
    /// them from this agent, or read them from disk when they run here, instead of the
    /// outputs travelling through the dispatcher. Unset: every output goes to the dispatcher.
    pub data_listen: Option<std::net::SocketAddr>,
    /// The base URL other agents reach `data_listen` at (`https://worker1.example.com:7443`).
    /// Default: the scheme and the listen address as bound; required when that address is
    /// unspecified (`0.0.0.0`, `[::]`).
    pub data_url: Option<String>,
    /// Certificate chain (PEM) `data_listen` serves HTTPS with; with `data_tls_key`.
    pub data_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `data_tls_cert`.
    pub data_tls_key: Option<PathBuf>,
    /// Serve kept outputs over plain HTTP on an address other than loopback (a network
    /// trusted not to read or alter them). Off: such an address needs `data_tls_cert`.
    pub data_allow_plain_http: bool,
    /// How long a kept output is served after it was made; a reduce that asks later fails
    /// its fetch, and the dispatcher runs the map step again.
    #[serde(with = "spine_protocol::units::duration")]
    pub data_keep_for: Duration,
    /// Where kept outputs are written. Default: a temporary directory removed at exit.
    pub data_keep_dir: Option<PathBuf>,
    /// Where the agent keeps an operator's drain (`spine agent drain`, PROTOCOL.md §5.6)
    /// across restarts. Unset: a drain lasts until the process ends.
    pub state_file: Option<PathBuf>,
    /// TLS.
    pub tls: TlsConfig,
    /// Agent attributes.
    pub attributes: BTreeMap<String, String>,
    /// Wrapped capabilities.
    #[serde(rename = "capability")]
    pub capabilities: Vec<CapabilityConfig>,
    /// Watchers: events for the dispatcher's rules (docs/agent.md, "Watchers").
    #[serde(rename = "watch", skip_serializing_if = "Vec::is_empty")]
    pub watches: Vec<crate::watch::WatchConfig>,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("jid", &self.jid)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("server", &self.server)
            .field("dispatchers", &self.dispatchers)
            .field("slots", &self.slots)
            .field(
                "capabilities",
                &self
                    .capabilities
                    .iter()
                    .map(|c| &c.name)
                    .collect::<Vec<_>>(),
            )
            .field(
                "watches",
                &self.watches.iter().map(|w| &w.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            jid: "agent1@localhost".into(),
            password: None,
            password_file: None,
            server: "127.0.0.1:5222".into(),
            dispatchers: vec!["dispatcher@localhost".into()],
            slots: 4,
            threads: 1,
            heartbeat: Duration::from_secs(10),
            load_debounce: Duration::from_millis(50),
            drain_grace: Duration::from_secs(30),
            result_cache: 4096,
            result_ttl: Duration::from_secs(600),
            max_input_size: ByteSize::mib(64),
            max_file_input_size: ByteSize::tib(1),
            http_data: true,
            data_listen: None,
            data_url: None,
            data_tls_cert: None,
            data_tls_key: None,
            data_allow_plain_http: false,
            data_keep_for: Duration::from_secs(3600),
            data_keep_dir: None,
            state_file: None,
            tls: TlsConfig::default(),
            attributes: BTreeMap::new(),
            capabilities: Vec::new(),
            watches: Vec::new(),
        }
    }
}

/// A configuration checked and resolved: what the runtime uses.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// How to connect and log in.
    pub options: spine_xmpp::ConnectOptions,
    /// Allowed dispatchers.
    pub dispatchers: Vec<BareJid>,
}

fn bad(key: &str, why: impl std::fmt::Display) -> AgentError {
    AgentError::Config(format!("{key}: {why}"))
}

/// A bad declaration of the capability at `capability` (`capability[2]`).
fn decl(capability: &str, e: DeclError) -> AgentError {
    bad(&format!("{capability}.{}", e.key), e.why)
}

impl AgentConfig {
    /// Checks the `data_*` settings of kept outputs.
    fn validate_data_listen(&self) -> Result<(), AgentError> {
        let tls = match (&self.data_tls_cert, &self.data_tls_key) {
            (Some(_), Some(_)) => true,
            (None, None) => false,
            (Some(_), None) => return Err(bad("data_tls_key", "data_tls_cert needs data_tls_key")),
            (None, Some(_)) => {
                return Err(bad("data_tls_cert", "data_tls_key needs data_tls_cert"))
            }
        };
        let Some(addr) = self.data_listen else {
            for (set, key) in [
                (self.data_url.is_some(), "data_url"),
                (tls, "data_tls_cert"),
                (self.data_keep_dir.is_some(), "data_keep_dir"),
            ] {
                if set {
                    return Err(bad(key, "has no effect without data_listen"));
                }
            }
            return Ok(());
        };
        if !self.http_data {
            return Err(bad(
                "data_listen",
                "needs http_data = true (kept outputs are protocol 1.1's fast path)",
            ));
        }
        if !tls && !addr.ip().is_loopback() && !self.data_allow_plain_http {
            return Err(bad(
                "data_listen",
                format!(
                    "{addr} is not a loopback address: serve kept outputs over HTTPS \
                     (data_tls_cert and data_tls_key), or set data_allow_plain_http = true \
                     on a network trusted not to read or alter them"
                ),
            ));
        }
        match &self.data_url {
            None if addr.ip().is_unspecified() => {
                return Err(bad(
                    "data_url",
                    format!(
                        "data_listen {addr} listens on every address: say which URL other \
                         agents reach it at, e.g. {}://worker1.example.com:{}",
                        if tls { "https" } else { "http" },
                        addr.port()
                    ),
                ))
            }
            None => {}
            Some(u) => {
                let want = if tls { "https://" } else { "http://" };
                let rest = u.strip_prefix(want).ok_or_else(|| {
                    bad(
                        "data_url",
                        format!(
                            "'{u}' must start with {want} (HTTPS is {})",
                            if tls { "on" } else { "off" }
                        ),
                    )
                })?;
                if rest.is_empty() || rest.trim_end_matches('/').contains(['/', '?', '#', '@']) {
                    return Err(bad(
                        "data_url",
                        format!("'{u}': give the scheme, host and port only"),
                    ));
                }
            }
        }
        if self.data_keep_for < Duration::from_secs(60) {
            return Err(bad(
                "data_keep_for",
                "must be at least 1m (reduce steps fetch kept outputs minutes later)",
            ));
        }
        Ok(())
    }

    /// Defaults, then the TOML file, then `SPINE_AGENT_*` variables; validated.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, AgentError> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            b = b.add_source(
                config::File::from(f)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        // No type guessing of values: a password "0123" must stay "0123". Numbers and
        // durations are parsed by the fields' own types; lists are split here.
        b = b.add_source(config::Environment::with_prefix("SPINE_AGENT"));
        for (key, items) in spine_xmpp::account::env_lists("SPINE_AGENT", &["dispatchers"]) {
            b = b
                .set_override(key.as_str(), items)
                .map_err(|e| AgentError::Config(format!("{key}: {e}")))?;
        }
        let cfg: AgentConfig = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| AgentError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment) and validates.
    pub fn from_toml(text: &str) -> Result<Self, AgentError> {
        let cfg: AgentConfig =
            toml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what deserialisation cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), AgentError> {
        let jid = Jid::new(&self.jid)
            .map_err(|e| bad("jid", format!("'{}' is not a JID: {e}", self.jid)))?;
        if jid.node().is_none() {
            return Err(bad(
                "jid",
                format!("'{}' needs a user part (user@domain)", self.jid),
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(bad("password", "give password or password_file, not both"));
        }
        if self.dispatchers.is_empty() {
            return Err(bad(
                "dispatchers",
                "at least one dispatcher JID is needed (nobody else may send jobs)",
            ));
        }
        for (i, d) in self.dispatchers.iter().enumerate() {
            BareJid::new(d).map_err(|e| {
                bad(
                    &format!("dispatchers[{i}]"),
                    format!("'{d}' is not a bare JID: {e}"),
                )
            })?;
        }
        if self.slots == 0 {
            return Err(bad("slots", "must be at least 1"));
        }
        if !(1..=1024).contains(&self.threads) {
            return Err(bad(
                "threads",
                format!("must be 1 to 1024 (it was {})", self.threads),
            ));
        }
        if self.heartbeat < Duration::from_millis(spine_protocol::presence::MIN_HEARTBEAT_MS) {
            return Err(bad("heartbeat", "must be at least 100ms"));
        }
        if self.load_debounce > self.heartbeat {
            return Err(bad("load_debounce", "must not exceed heartbeat"));
        }
        if self.result_cache == 0 {
            return Err(bad(
                "result_cache",
                "must be at least 1 (duplicate jobs must not run twice)",
            ));
        }
        for k in self.attributes.keys() {
            k.parse::<AttrName>()
                .map_err(|e| bad(&format!("attributes.{k}"), e))?;
        }
        self.validate_data_listen()?;
        let mut watch_names = std::collections::HashSet::new();
        for (i, w) in self.watches.iter().enumerate() {
            let key = format!("watch[{i}]");
            w.validate(&key).map_err(AgentError::Config)?;
            if !watch_names.insert(w.name.as_str()) {
                return Err(bad(
                    &format!("{key}.name"),
                    format!("'{}' is used twice", w.name),
                ));
            }
            if w.directory.is_some() && !self.http_data {
                return Err(bad(
                    &format!("{key}.directory"),
                    "needs http_data = true (files go to the dispatcher by reference, over HTTP)",
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.capabilities.iter().enumerate() {
            let key = format!("capability[{i}]");
            c.name
                .parse::<CapabilityName>()
                .map_err(|e| bad(&format!("{key}.name"), format!("'{}': {e}", c.name)))?;
            if !names.insert(c.name.as_str()) {
                return Err(bad(
                    &format!("{key}.name"),
                    format!("'{}' is defined twice", c.name),
                ));
            }
            if c.slots == Some(0) {
                return Err(bad(&format!("{key}.slots"), "must be at least 1"));
            }
            for k in c.attributes.keys() {
                k.parse::<AttrName>()
                    .map_err(|e| bad(&format!("{key}.attributes.{k}"), e))?;
            }
            match &c.wrapper {
                WrapperConfig::Exec {
                    argv,
                    input,
                    output,
                    exit_codes,
                    ..
                } => {
                    if argv.is_empty() || argv[0].is_empty() {
                        return Err(bad(&format!("{key}.argv"), "needs at least the program"));
                    }
                    let all = argv.join(" ");
                    if *input == InputMode::File && !all.contains("{input}") {
                        return Err(bad(
                            &format!("{key}.argv"),
                            "input = \"file\" needs {input} in argv",
                        ));
                    }
                    if *output == OutputMode::File && !all.contains("{output}") {
                        return Err(bad(
                            &format!("{key}.argv"),
                            "output = \"file\" needs {output} in argv",
                        ));
                    }
                    crate::exec::arg_rules(argv, c.args.as_ref()).map_err(|e| decl(&key, e))?;
                    for code in exit_codes.keys() {
                        code.parse::<i32>().map_err(|_| {
                            bad(
                                &format!("{key}.exit_codes"),
                                format!("'{code}' is not an exit code"),
                            )
                        })?;
                    }
                }
                WrapperConfig::Http {
                    url,
                    method,
                    status_codes,
                    ..
                } => {
                    let u = reqwest::Url::parse(url)
                        .map_err(|e| bad(&format!("{key}.url"), format!("'{url}': {e}")))?;
                    if u.scheme() != "http" {
                        return Err(bad(
                            &format!("{key}.url"),
                            "only http:// URLs (a local service) are supported",
                        ));
                    }
                    crate::http::arg_rules(url, c.args.as_ref()).map_err(|e| decl(&key, e))?;
                    if !matches!(method.as_str(), "POST" | "GET") {
                        return Err(bad(
                            &format!("{key}.method"),
                            format!("'{method}': expected POST or GET"),
                        ));
                    }
                    for code in status_codes.keys() {
                        match code.parse::<u16>() {
                            Ok(100..=599) => {}
                            _ => {
                                return Err(bad(
                                    &format!("{key}.status_codes"),
                                    format!("'{code}' is not an HTTP status"),
                                ))
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks what only this machine can tell about each exec capability: its program exists,
    /// is a regular file and is executable by this user, found where starting it will look
    /// ([`crate::exec::find_program`]: a path, or the program's PATH; never a shell), and its
    /// `cwd` is a directory. Without this an agent advertised a capability whose every job
    /// failed with `cannot start`. [`crate::AgentBuilder::build`] runs it, so the agent refuses
    /// to start; errors name the key (`capability[2].argv[0]: /opt/x/tool: no such file`).
    /// Returns one line per exec capability saying what was found.
    pub fn check_programs(&self) -> Result<Vec<String>, AgentError> {
        let mut found = Vec::new();
        for (i, c) in self.capabilities.iter().enumerate() {
            let WrapperConfig::Exec { argv, env, cwd, .. } = &c.wrapper else {
                continue;
            };
            let key = format!("capability[{i}]");
            if let Some(dir) = cwd {
                let why = match std::fs::metadata(dir) {
                    Ok(m) if m.is_dir() => None,
                    Ok(_) => Some("is not a directory".to_owned()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Some("no such directory".to_owned())
                    }
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = why {
                    return Err(bad(
                        &format!("{key}.cwd"),
                        format!("{}: {why}", dir.display()),
                    ));
                }
            }
            let program = argv.first().map(String::as_str).unwrap_or_default();
            let what = if program.contains('{') {
                format!("program {program} is chosen by each job: not checked")
            } else {
                let path = crate::exec::find_program(program, env, cwd.as_deref())
                    .map_err(|why| bad(&format!("{key}.argv[0]"), why))?;
                if path.as_os_str() == program {
                    format!("program {program}: executable")
                } else {
                    format!("program {program}: {}, executable", path.display())
                }
            };
            found.push(format!("{key} {} (exec): {what}", c.name));
        }
        Ok(found)
    }

    /// What `spine agent --check` verifies without connecting: [`validate`](Self::validate),
    /// [`resolve`](Self::resolve) (the password, the server's address, the TLS trust) and
    /// [`check_programs`](Self::check_programs). Returns what was checked, one line per item.
    pub fn check(&self) -> Result<Vec<String>, AgentError> {
        let resolved = self.resolve()?;
        let mut lines = vec![format!("jid: {}", self.jid)];
        lines.push(match &self.password_file {
            Some(f) => format!("password: read from {}", f.display()),
            None => "password: set".to_owned(),
        });
        let security = match (&resolved.options.security, &self.tls.ca_file) {
            (spine_xmpp::Security::StartTls { .. }, Some(ca)) => {
                format!("STARTTLS, certificate verified against {}", ca.display())
            }
            (spine_xmpp::Security::StartTls { .. }, None) => {
                "STARTTLS, certificate verified against the system's store".to_owned()
            }
            (spine_xmpp::Security::Plain { insecure: true }, _) => {
                "plain TCP (insecure-plain)".to_owned()
            }
            (spine_xmpp::Security::Plain { .. }, _) => "plain TCP (a loopback address)".to_owned(),
        };
        lines.push(format!(
            "server: {} -> {}, {security}; not contacted",
            self.server, resolved.options.addr
        ));
        lines.push(format!("dispatchers: {}", self.dispatchers.join(", ")));
        lines.push(format!("slots: {}", self.slots));
        let mut programs = self.check_programs()?.into_iter();
        for (i, c) in self.capabilities.iter().enumerate() {
            match &c.wrapper {
                WrapperConfig::Exec { .. } => lines.extend(programs.next()),
                WrapperConfig::Http { url, method, .. } => lines.push(format!(
                    "capability[{i}] {} (http): {method} {url}; not called",
                    c.name
                )),
            }
        }
        Ok(lines)
    }

    /// Resolves password, server address and TLS trust (reads files, resolves the host).
    pub fn resolve(&self) -> Result<Resolved, AgentError> {
        self.validate()?;
        let options = spine_xmpp::connect_options(
            &self.jid,
            self.password.as_deref(),
            self.password_file.as_deref(),
            &self.server,
            &self.tls,
            "SPINE_AGENT_PASSWORD",
        )
        .map_err(|e| bad(e.key, e.message))?;
        let dispatchers = self
            .dispatchers
            .iter()
            .filter_map(|d| BareJid::new(d).ok())
            .collect();
        Ok(Resolved {
            options,
            dispatchers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spine agent --print-config` (issue 15, item 12): the documented forms, and text that
    /// parses back to the same configuration.
    #[test]
    fn printed_config_uses_the_documented_forms_and_reads_back_the_same() {
        let printed = toml::to_string_pretty(&AgentConfig::default()).unwrap();
        assert_eq!(
            spine_protocol::units::forms_not_printed(DEFAULT_CONFIG, &printed),
            Vec::<&str>::new(),
            "{printed}"
        );
        let cfg = AgentConfig::from_toml(
            "heartbeat = \"1m\"\nresult_ttl = \"1day\"\nmax_input_size = \"1.5 MiB\"\n\
             [[capability]]\nname = \"legacy.cat\"\nkind = \"exec\"\nargv = [\"cat\"]\n\
             timeout = \"1m 30s\"\nmax_output = \"1000\"\n",
        )
        .unwrap();
        let printed = toml::to_string_pretty(&cfg).unwrap();
        for line in [
            "heartbeat = \"1m\"",
            "load_debounce = \"50ms\"",
            "result_ttl = \"24h\"",
            "max_input_size = \"1536KiB\"",
            "timeout = \"90s\"",
            "max_output = \"1000B\"",
        ] {
            assert!(printed.lines().any(|l| l == line), "{line} in\n{printed}");
        }
        assert_eq!(AgentConfig::from_toml(&printed).unwrap(), cfg);
    }

    #[test]
    fn data_listen_settings_are_checked_and_errors_name_the_key() {
        let err = |extra: &str| {
            AgentConfig::from_toml(&format!("dispatchers = [\"d@x\"]\n{extra}"))
                .expect_err(extra)
                .to_string()
        };
        let ok = |extra: &str| AgentConfig::from_toml(&format!("dispatchers = [\"d@x\"]\n{extra}"));
        assert!(ok("data_listen = \"127.0.0.1:0\"").is_ok());
        assert!(ok("data_listen = \"0.0.0.0:7443\"\ndata_url = \"http://w1:7443\"\ndata_allow_plain_http = true").is_ok());
        let e = err("data_listen = \"10.0.0.7:7443\"");
        assert!(
            e.contains("data_listen") && e.contains("data_tls_cert"),
            "{e}"
        );
        let e = err("data_listen = \"0.0.0.0:7443\"\ndata_allow_plain_http = true");
        assert!(
            e.contains("data_url") && e.contains("http://worker1.example.com:7443"),
            "{e}"
        );
        let e = err("data_listen = \"127.0.0.1:0\"\nhttp_data = false");
        assert!(e.contains("data_listen: needs http_data = true"), "{e}");
        let e = err("data_listen = \"127.0.0.1:0\"\ndata_tls_cert = \"c.pem\"");
        assert!(e.contains("data_tls_key"), "{e}");
        let e = err("data_listen = \"127.0.0.1:0\"\ndata_url = \"https://w1:7443\"");
        assert!(
            e.contains("data_url") && e.contains("must start with http://"),
            "{e}"
        );
        let e = err("data_listen = \"127.0.0.1:0\"\ndata_url = \"http://w1:7443/x\"");
        assert!(e.contains("scheme, host and port only"), "{e}");
        let e = err("data_listen = \"127.0.0.1:0\"\ndata_keep_for = \"10s\"");
        assert!(e.contains("data_keep_for"), "{e}");
        let e = err("data_url = \"http://w1:7443\"");
        assert!(
            e.contains("data_url: has no effect without data_listen"),
            "{e}"
        );
    }

    #[test]
    fn embedded_default_parses_and_equals_default() {
        let cfg = AgentConfig::from_toml(DEFAULT_CONFIG).unwrap();
        assert_eq!(cfg, AgentConfig::default());
    }

    #[test]
    fn wrappers_parse() {
        let cfg = AgentConfig::from_toml(
            r#"
            dispatchers = ["d@x"]
            [[capability]]
            name = "legacy.gzip"
            kind = "exec"
            argv = ["gzip", "-c", "-{arg.level}"]
            slots = 2
            timeout = "5s"
            exit_codes = { "75" = "retryable" }
            [[capability]]
            name = "legacy.render"
            kind = "http"
            url = "http://127.0.0.1:9/render"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.capabilities.len(), 2);
        match &cfg.capabilities[0].wrapper {
            WrapperConfig::Exec {
                argv,
                timeout,
                exit_codes,
                ..
            } => {
                assert_eq!(argv[2], "-{arg.level}");
                assert_eq!(*timeout, Duration::from_secs(5));
                assert_eq!(exit_codes.get("75"), Some(&Verdict::Retryable));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&cfg.capabilities[1].wrapper, WrapperConfig::Http { method, .. } if method == "POST")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("jid = \"nouser.example\"", "jid"),
            ("dispatchers = []", "dispatchers"),
            ("dispatchers = [\"a@b/c\"]", "dispatchers[0]"),
            ("slots = 0", "slots"),
            ("threads = 0", "threads"),
            ("threads = 2000", "threads"),
            ("heartbeat = \"10ms\"", "heartbeat"),
            ("heartbeat = 10", "heartbeat"),
            ("[attributes]\n\"9x\" = \"1\"", "attributes.9x"),
            (
                "[[capability]]\nname = \"Bad\"\nkind = \"exec\"\nargv = [\"x\"]",
                "capability[0].name",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = []",
                "capability[0].argv",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"x\", \"{arg.}\"]",
                "capability[0].argv",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"x\"]\ninput = \"file\"",
                "capability[0].argv",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"http\"\nurl = \"ftp://x\"",
                "capability[0].url",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"teleport\"",
                "teleport",
            ),
            ("bogus = 1", "bogus"),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"sort\", \"{arg.mode}\"]\nargs.mode.pattern = \"(\"",
                "capability[0].args.mode.pattern: \"(\" is not a valid regular expression: unclosed group",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"sort\", \"{arg.mode}\"]\nargs.mode.values = [\"-n\", 1]",
                "capability[0].args.mode.values[1]: 1 is not of the argument's type (string)",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"sort\", \"{arg.mode}\"]\nargs = {}",
                "capability[0].argv: {arg.mode} is not declared in args",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"sort\", \"--\", \"{arg.m}\"]\nargs.m = { values = [\"-n\"], option = true }",
                "capability[0].args.m.option",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/?mode=safe\"\nargs.mode = {}",
                "capability[0].args.mode: is already set in the url's query",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\nargs.m = { option = true }",
                "capability[0].args.m.option",
            ),
            (
                "[[capability]]\nname = \"a\"\nkind = \"exec\"\nargv = [\"x\", \"{arg.m}\"]\nargs.m = { kind = \"string\" }",
                "unknown field `kind`",
            ),
        ];
        for (toml, key) in cases {
            let e = AgentConfig::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml:?} -> {e}");
        }
    }

    /// Argument declarations read the same from a file through `config` (as `spine agent`
    /// does) as from TOML text, names and value types kept.
    #[test]
    fn argument_declarations_load_from_a_file() {
        let text = r#"
            dispatchers = ["d@x"]
            [[capability]]
            name = "legacy.sort"
            kind = "exec"
            argv = ["sort", "{arg.Mode}", "-{arg.level}", "{arg.fold}", "--", "{input}"]
            input = "file"
            [capability.args.Mode]
            values = ["-n", "-r"]
            [capability.args.level]
            type = "integer"
            values = [1, 2]
            [capability.args.fold]
            type = "boolean"
            values = [true]
        "#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let loaded = AgentConfig::load(Some(&path)).unwrap();
        let parsed = AgentConfig::from_toml(text).unwrap();
        assert_eq!(loaded.capabilities, parsed.capabilities);
        let args = loaded.capabilities[0].args.as_ref().unwrap();
        use crate::args::{ArgType, Literal};
        assert_eq!(
            args["Mode"].values,
            Some(vec![
                Literal::String("-n".into()),
                Literal::String("-r".into())
            ])
        );
        assert_eq!(args["level"].kind, ArgType::Integer);
        assert_eq!(
            args["level"].values,
            Some(vec![Literal::Integer(1), Literal::Integer(2)])
        );
        assert_eq!(args["fold"].values, Some(vec![Literal::Boolean(true)]));
        // What --print-config shows parses back to the same.
        let shown = toml::to_string(&loaded).unwrap();
        assert_eq!(AgentConfig::from_toml(&shown).unwrap(), loaded, "{shown}");
    }

    /// An exec capability whose program cannot be started stops the agent at start, naming
    /// the key (issue 15, item 8): each way a program can be missing, and the ways it is found.
    #[test]
    fn exec_programs_are_checked_where_the_wrapper_looks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let write = |name: &str, mode: u32| {
            let p = d.join(name);
            std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p.display().to_string()
        };
        let tool = write("tool", 0o755);
        let plain = write("plain", 0o644);
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink(d.join("gone"), d.join("dangling")).unwrap();
        let dd = d.display();
        // (argv[0] and other keys of the capability, the error or what was found)
        let cases: Vec<(String, String, Result<String, String>)> = vec![
            (tool.clone(), String::new(), Ok(format!("program {tool}: executable"))),
            ("sh".into(), String::new(), Ok("program sh: /".into())),
            (
                "./tool".into(),
                format!("cwd = \"{dd}\""),
                Ok(format!("program ./tool: {dd}/./tool, executable")),
            ),
            (
                "tool".into(),
                format!("env = {{ PATH = \"/nonexistent:{dd}\" }}"),
                Ok(format!("program tool: {dd}/tool, executable")),
            ),
            ("{arg.prog}".into(), String::new(), Ok("is chosen by each job".into())),
            (
                format!("{dd}/invoice-tool"),
                String::new(),
                Err(format!("capability[0].argv[0]: {dd}/invoice-tool: no such file")),
            ),
            (
                plain.clone(),
                String::new(),
                Err(format!("capability[0].argv[0]: {plain}: is not executable by this user (mode 644")),
            ),
            (
                format!("{dd}/sub"),
                String::new(),
                Err(format!("capability[0].argv[0]: {dd}/sub: is a directory, not a program")),
            ),
            (
                format!("{dd}/dangling"),
                String::new(),
                Err(format!("capability[0].argv[0]: {dd}/dangling: a symbolic link to a file that does not exist")),
            ),
            (
                "spine-no-such-program".into(),
                String::new(),
                Err("capability[0].argv[0]: spine-no-such-program: not found on PATH (".into()),
            ),
            // The program's own PATH is searched, not the agent's: sh is not in this one.
            (
                "sh".into(),
                format!("env = {{ PATH = \"{dd}\" }}"),
                Err(format!("capability[0].argv[0]: sh: not found on PATH ({dd})")),
            ),
            // Not executable on PATH: skipped as execvp does, and named.
            (
                "plain".into(),
                format!("env = {{ PATH = \"{dd}\" }}"),
                Err(format!("plain: not found on PATH ({dd}) except {plain}: is not executable")),
            ),
            (
                "tool".into(),
                "cwd = \"/nonexistent/dir\"".into(),
                Err("capability[0].cwd: /nonexistent/dir: no such directory".into()),
            ),
            (
                "tool".into(),
                format!("cwd = \"{tool}\""),
                Err(format!("capability[0].cwd: {tool}: is not a directory")),
            ),
        ];
        for (program, extra, expected) in cases {
            let text = format!(
                "dispatchers = [\"d@x\"]\n[[capability]]\nname = \"a.b\"\nkind = \"exec\"\n\
                 argv = [\"{program}\"]\n{extra}\n"
            );
            let cfg = AgentConfig::from_toml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            match (cfg.check_programs(), expected) {
                (Ok(found), Ok(want)) => {
                    assert_eq!(found.len(), 1);
                    assert!(found[0].contains(&want), "{text}: {found:?}, want {want}");
                }
                (Err(e), Err(want)) => {
                    let e = e.to_string();
                    assert!(e.contains(&want), "{text}: {e}, want {want}");
                    assert!(
                        crate::Agent::builder(cfg).build().is_err(),
                        "build refuses it too: {text}"
                    );
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn tls_is_required_off_loopback() {
        let mut cfg = AgentConfig {
            password: Some("pw".into()),
            ..AgentConfig::default()
        };
        cfg.server = "192.0.2.1:5222".into();
        assert!(matches!(
            cfg.resolve().unwrap().options.security,
            spine_xmpp::Security::StartTls {
                trust: spine_xmpp::Trust::System,
                ..
            }
        ));
        cfg.tls.ca_file = Some("/nonexistent/ca.pem".into());
        let e = cfg.resolve().unwrap_err().to_string();
        assert!(e.contains("tls.ca_file"), "{e}");
        cfg.tls.ca_file = None;
        cfg.server = "127.0.0.1:5222".into();
        assert!(matches!(
            cfg.resolve().unwrap().options.security,
            spine_xmpp::Security::Plain { insecure: false }
        ));
        // Required TLS on loopback too, verified against the system store without a CA file.
        cfg.tls.mode = TlsMode::Required;
        assert!(matches!(
            cfg.resolve().unwrap().options.security,
            spine_xmpp::Security::StartTls {
                trust: spine_xmpp::Trust::System,
                ..
            }
        ));
    }
}
