//! Dispatcher configuration: serde struct from TOML plus `SPINE_DISPATCHER_*` variables, with
//! the commented default embedded (`dispatcher.toml`) and validation naming the bad key.
//!
//! Data flow: `spine dispatcher` loads it ([`DispatcherConfig::load`]) and hands it to the
//! runtime, which builds the [`Policy`] from its rule keys once ([`Policy::from_config`]).
//! The rule shapes themselves (`[[submitter]]`, `[[agent]]`, `[[http_token]]`) live with the
//! policy (`policy/rules.rs`): this module imports from the policy, never the reverse.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use spine_xmpp::TlsConfig;

use crate::error::DispatcherError;
use crate::policy::{
    AgentRule, DefaultLimits, HttpToken, Policy, QueueShare, Rules, SubmitterRule,
};

/// The commented default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("dispatcher.toml");

/// Everything a dispatcher needs.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// Account (full JID recommended).
    pub jid: String,
    /// Password.
    pub password: Option<String>,
    /// File holding the password.
    pub password_file: Option<PathBuf>,
    /// Server address.
    pub server: String,
    /// Job store directory.
    pub data_dir: PathBuf,
    /// Accounts allowed to use the XMPP API with every capability (bare JIDs or `*@domain`).
    pub submitters: Vec<String>,
    /// Submitters allowed some capabilities (`[[submitter]]`).
    #[serde(rename = "submitter")]
    pub submitter_rules: Vec<SubmitterRule>,
    /// Accounts allowed to register as agents offering anything: bare JIDs or `*@domain`.
    /// With neither this nor `[[agent]]`: every account of the dispatcher's own domain.
    pub agents: Vec<String>,
    /// Agents allowed to offer some capabilities (`[[agent]]`).
    #[serde(rename = "agent")]
    pub agent_rules: Vec<AgentRule>,
    /// Threads of `spine dispatcher`'s runtime (its HTTP API's, and the one its core runs on);
    /// unset: [`DispatcherConfig::runtime_threads`] chooses by the store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// Queue bound per capability.
    pub max_queue: usize,
    /// Delayed jobs (`not_before`) waiting for their time, at most, in all.
    pub max_delayed: usize,
    /// How far ahead `not_before` may be.
    #[serde(with = "spine_protocol::units::duration")]
    pub max_delay: Duration,
    /// Default attempts per job.
    pub max_attempts: u64,
    /// Wait for a capable agent.
    #[serde(with = "spine_protocol::units::duration")]
    pub no_agent_wait: Duration,
    /// Retention of finished jobs.
    #[serde(with = "spine_protocol::units::duration")]
    pub retention: Duration,
    /// Largest payload sent in chunks over XMPP (assembled in memory): an output from an
    /// agent that does not upload over HTTP, an input to one that does not fetch, a
    /// submitter's chunked input.
    #[serde(with = "spine_protocol::units::size")]
    pub max_blob: ByteSize,
    /// Largest input or output that travels over HTTP (streamed to and from the blob store,
    /// never held in memory): uploads, `PUT /v1/blobs`, agents' upload slots.
    #[serde(with = "spine_protocol::units::size")]
    pub max_input: ByteSize,
    /// Disk the blob store may use (large inputs, outputs and map/reduce data); unset: the
    /// file system's free space is the limit. New payloads over it are refused (HTTP 507,
    /// XMPP `storage-full`).
    #[serde(
        with = "spine_protocol::units::size::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub blob_quota: Option<ByteSize>,
    /// Memory redb may use to cache pages of the job store (`jobs.redb`), on top of what the
    /// dispatcher holds itself. redb's own default is 1 GiB, which a busy store fills: the
    /// cache, not the jobs, then sets the dispatcher's resident memory.
    #[serde(with = "spine_protocol::units::size")]
    pub store_cache: ByteSize,
    /// Where jobs are stored: unset or `"redb"`, the embedded store in `data_dir/jobs.redb`;
    /// or a PostgreSQL URL (`"postgres://spine@db.example.com:5432/spine?sslmode=require"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// A file holding the PostgreSQL password (instead of one in the URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_password_file: Option<PathBuf>,
    /// CA certificates (PEM) that PostgreSQL's certificate is verified against, instead of
    /// the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_ca: Option<PathBuf>,
    /// Several dispatchers: CA certificates (PEM) a standby verifies the leader's HTTPS
    /// certificate against when it passes a request on to it, instead of
    /// the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_ca: Option<PathBuf>,
    /// How long a commit keeps trying to reach PostgreSQL (reconnecting) before the
    /// dispatcher gives up and stops.
    #[serde(with = "spine_protocol::units::duration")]
    pub store_timeout: Duration,
    /// Several dispatchers on one PostgreSQL store: how long a leader's lease lasts (in the
    /// database's clock). A dead leader is replaced within about this plus `lease_poll`.
    #[serde(with = "spine_protocol::units::duration")]
    pub lease: Duration,
    /// How often a leader renews its lease (under half of `lease`).
    #[serde(with = "spine_protocol::units::duration")]
    pub lease_renew: Duration,
    /// How often a standby asks for the lease.
    #[serde(with = "spine_protocol::units::duration")]
    pub lease_poll: Duration,
    /// A blob no job references is deleted once it is older than this (uploads awaiting
    /// the job that names them, outputs of jobs forgotten by retention).
    #[serde(with = "spine_protocol::units::duration")]
    pub blob_orphan_ttl: Duration,
    /// How long a signed blob URL (an agent's fetch or upload) stays valid.
    #[serde(with = "spine_protocol::units::duration")]
    pub blob_url_ttl: Duration,
    /// The audit log (JSON lines, one per job that ended): a path, relative to `data_dir`
    /// unless absolute, or `"off"`.
    pub audit_log: String,
    /// Size at which the audit log rotates.
    #[serde(with = "spine_protocol::units::size")]
    pub audit_max_size: ByteSize,
    /// Rotated audit files kept (`audit.jsonl.1` …).
    pub audit_keep: usize,
    /// Map/reduce: a step running longer than this many times the median of its finished
    /// siblings gets a speculative copy on another agent (0: never).
    pub speculation_factor: f64,
    /// Map/reduce: ... and longer than this.
    #[serde(with = "spine_protocol::units::duration")]
    pub speculation_min: Duration,
    /// Largest `<args>` of a job as it travels in the job stanza (JSON escaped for XML): larger
    /// arguments are refused at submission (`bad-arguments`, field `args`), so that no job
    /// stanza can exceed an XMPP server's stanza limit.
    #[serde(with = "spine_protocol::units::size")]
    pub max_args: ByteSize,
    /// Open blobs (chunks arriving, or complete and not yet referenced) one sender may have.
    pub max_open_blobs_per_sender: usize,
    /// Bytes announced by one sender's open blobs; default 4 × `max_blob`.
    #[serde(
        with = "spine_protocol::units::size::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_open_blob_bytes_per_sender: Option<ByteSize>,
    /// Open blobs of all senders together.
    pub max_open_blobs: usize,
    /// Bytes announced by all open blobs together; default 16 × `max_blob`.
    #[serde(
        with = "spine_protocol::units::size::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_open_blob_bytes: Option<ByteSize>,
    /// Queued jobs one submitter may have per capability, unless its `[[submitter]]` or
    /// `[[http_token]]` says otherwise: a count, or a percentage of `max_queue`.
    pub submitter_max_queued: QueueShare,
    /// Most attempts a submitter may ask for, unless its rule says otherwise.
    pub submitter_max_attempts: u64,
    /// Highest priority a submitter may ask for, unless its rule says otherwise.
    pub submitter_max_priority: i64,
    /// Submissions a submitter may make, unless its rule says otherwise (none: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitter_rate: Option<crate::policy::Rate>,
    /// TLS.
    pub tls: TlsConfig,
    /// Address of the HTTP API, or none (`"off"`) for no HTTP API.
    #[serde(with = "listen_or_off")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// HTTP API: certificate chain (PEM, server certificate first) for HTTPS. With it and
    /// `http_tls_key` the listener speaks HTTPS only; without, plain HTTP, which only a
    /// loopback address or `http_allow_plaintext` allows.
    pub http_tls_cert: Option<PathBuf>,
    /// HTTP API: the private key (PEM) of `http_tls_cert`.
    pub http_tls_key: Option<PathBuf>,
    /// HTTP API: serve plain HTTP on an address that is not loopback (behind a TLS-terminating
    /// proxy, or on a network trusted as it is): tokens and job data then cross it in clear.
    pub http_allow_plaintext: bool,
    /// The base URL agents and web apps reach the HTTP API at (what signed blob URLs start
    /// with), e.g. `https://dispatcher.example.com:8443`. Optional when `http_listen` is a
    /// concrete address (then derived from it); required for `0.0.0.0` / `[::]`. After
    /// [`crate::Dispatcher::bind`] it holds the effective URL (the derived default filled in,
    /// port 0 resolved, no trailing `/`).
    pub public_url: Option<String>,
    /// HTTP API tokens. None configured: loopback clients only.
    #[serde(rename = "http_token")]
    pub http_tokens: Vec<HttpToken>,
    /// Event rules (`[[rule]]`, docs/events.md): on an event, when a condition holds, do a
    /// job.
    #[serde(rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<crate::triggers::RuleConfig>,
    /// Schedules whose ticks are events for the rules (`[[schedule]]`, docs/events.md).
    #[serde(rename = "schedule", skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<crate::schedules::ScheduleConfig>,
    /// Canary jobs proving each capability on each agent (`[[canary]]`, docs/events.md).
    #[serde(rename = "canary", skip_serializing_if = "Vec::is_empty")]
    pub canaries: Vec<crate::canaries::CanaryConfig>,
    /// Webhook senders that sign instead of holding a token (`[[webhook]]`, docs/events.md).
    #[serde(rename = "webhook", skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<crate::triggers::WebhookConfig>,
    /// XMPP accounts told of events by message (`[[subscription]]`, docs/events.md).
    #[serde(rename = "subscription", skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<crate::subscriptions::SubscriptionConfig>,
    /// HTTP API: time a client has to send a request's headers, from the connection's start
    /// or the end of its previous answer (so also how long an idle connection stays open).
    #[serde(with = "spine_protocol::units::duration")]
    pub http_header_timeout: Duration,
    /// HTTP API: time from a request's headers to the start of its answer, body upload
    /// included (an event stream's events, once it has started, are not bounded).
    #[serde(with = "spine_protocol::units::duration")]
    pub http_request_timeout: Duration,
    /// HTTP API: open connections at most; further ones are refused at once.
    pub http_max_connections: usize,
    /// HTTP API: how many of `http_max_connections` only loopback clients may use, so that
    /// the local operator (and `/healthz`) still gets in when the network has taken the rest.
    pub http_loopback_reserve: usize,
    /// HTTP API: open event streams (`GET /v1/jobs/{id}/events`) at most, all tokens together.
    pub http_max_event_streams: usize,
    /// HTTP API: open event streams at most per token (per the local caller without tokens).
    pub http_max_event_streams_per_token: usize,
}

impl std::fmt::Debug for DispatcherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherConfig")
            .field("jid", &self.jid)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("server", &self.server)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            jid: "dispatcher@localhost/d1".into(),
            password: None,
            password_file: None,
            server: "127.0.0.1:5222".into(),
            data_dir: PathBuf::from("spine-data"),
            submitters: Vec::new(),
            submitter_rules: Vec::new(),
            agents: Vec::new(),
            agent_rules: Vec::new(),
            max_queue: 10_000,
            max_delayed: 100_000,
            threads: None,
            max_delay: Duration::from_secs(720 * 3600),
            max_attempts: 3,
            no_agent_wait: Duration::from_secs(30),
            retention: Duration::from_secs(86_400),
            max_blob: ByteSize::mib(64),
            max_input: ByteSize::gib(4),
            blob_quota: None,
            store_cache: ByteSize::b(crate::store::DEFAULT_CACHE),
            store: None,
            store_password_file: None,
            store_ca: None,
            peer_ca: None,
            store_timeout: Duration::from_secs(30),
            lease: crate::election::Timing::default().lease,
            lease_renew: crate::election::Timing::default().renew,
            lease_poll: crate::election::Timing::default().poll,
            blob_orphan_ttl: Duration::from_secs(15 * 60),
            blob_url_ttl: Duration::from_secs(5 * 60),
            audit_log: "audit.jsonl".into(),
            audit_max_size: ByteSize::mib(64),
            audit_keep: 5,
            speculation_factor: 4.0,
            speculation_min: Duration::from_secs(2),
            max_args: ByteSize::kib(64),
            max_open_blobs_per_sender: 64,
            max_open_blob_bytes_per_sender: None,
            max_open_blobs: 4096,
            max_open_blob_bytes: None,
            submitter_max_queued: QueueShare::Percent(50),
            submitter_max_attempts: 100,
            submitter_max_priority: 1000,
            submitter_rate: None,
            tls: TlsConfig::default(),
            http_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8480))),
            http_tls_cert: None,
            http_tls_key: None,
            http_allow_plaintext: false,
            public_url: None,
            http_tokens: Vec::new(),
            rules: Vec::new(),
            webhooks: Vec::new(),
            subscriptions: Vec::new(),
            schedules: Vec::new(),
            canaries: Vec::new(),
            http_header_timeout: Duration::from_secs(10),
            http_request_timeout: Duration::from_secs(120),
            http_max_connections: 512,
            http_loopback_reserve: 16,
            http_max_event_streams: 256,
            http_max_event_streams_per_token: 32,
        }
    }
}

/// `http_listen`: an address, or `"off"`.
mod listen_or_off {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::SocketAddr;

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim() == "off" {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "'{s}': {e} (an address such as 127.0.0.1:8480, or \"off\")"
            ))
        })
    }
}

/// `public_url` checked (an http or https URL with a host, no query or fragment) and without
/// its trailing `/`, so that callers append paths such as `/v1/blobs/…`.
fn normalise_public_url(u: &str) -> Result<String, DispatcherError> {
    let why = |w: &str| {
        bad(
            "public_url",
            format!("'{u}': {w} (expected a base URL such as https://dispatcher.example.com:8443)"),
        )
    };
    let uri: axum::http::Uri = u.parse().map_err(|e| why(&format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(why("the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(why("no host"));
    }
    if uri.query().is_some() || u.contains('#') {
        return Err(why("no query or fragment allowed"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(why("no user or password allowed"));
    }
    Ok(u.trim_end_matches('/').to_owned())
}

fn bad(key: &str, why: impl std::fmt::Display) -> DispatcherError {
    DispatcherError::Config(format!("{key}: {why}"))
}

impl DispatcherConfig {
    /// The election's times, from `lease`, `lease_renew` and `lease_poll`.
    pub fn election_timing(&self) -> crate::election::Timing {
        crate::election::Timing {
            lease: self.lease,
            renew: self.lease_renew,
            poll: self.lease_poll,
            ..crate::election::Timing::default()
        }
    }

    /// Defaults, then the TOML file, then `SPINE_DISPATCHER_*` variables; validated.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, DispatcherError> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            b = b.add_source(
                config::File::from(f)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        // Values are not type-guessed (a password "0123" stays "0123").
        b = b.add_source(config::Environment::with_prefix("SPINE_DISPATCHER"));
        for (key, items) in
            spine_xmpp::account::env_lists("SPINE_DISPATCHER", &["submitters", "agents"])
        {
            b = b
                .set_override(key.as_str(), items)
                .map_err(|e| bad(&key, e))?;
        }
        let cfg: DispatcherConfig = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| DispatcherError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment) and validates.
    pub fn from_toml(text: &str) -> Result<Self, DispatcherError> {
        let cfg: DispatcherConfig =
            toml::from_str(text).map_err(|e| DispatcherError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what deserialisation cannot.
    pub fn validate(&self) -> Result<(), DispatcherError> {
        let j = jid::Jid::new(&self.jid).map_err(|e| bad("jid", format!("'{}': {e}", self.jid)))?;
        if j.node().is_none() {
            return Err(bad("jid", "needs a user part (user@domain/resource)"));
        }
        // Submitter, agent and token grants (each error names its key).
        Policy::from_config(self)?;
        if self.max_queue == 0 {
            return Err(bad("max_queue", "must be at least 1"));
        }
        if self.threads.is_some_and(|n| !(1..=1024).contains(&n)) {
            return Err(bad(
                "threads",
                "must be from 1 to 1024 (unset: 1 with the embedded store, which keeps the dispatcher's core, its commits and its connections on one thread; 2 with PostgreSQL)",
            ));
        }
        if self.max_delay.is_zero() {
            return Err(bad(
                "max_delay",
                "must be more than 0 (set max_delayed = 0 to refuse delayed jobs)",
            ));
        }
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1"));
        }
        if !(self.speculation_factor == 0.0 || (1.0..=1000.0).contains(&self.speculation_factor)) {
            return Err(bad(
                "speculation_factor",
                "must be 0 (no speculative copies) or 1 to 1000",
            ));
        }
        if self.audit_log.trim().is_empty() {
            return Err(bad("audit_log", "a file name, or \"off\""));
        }
        if self.audit_max_size.as_u64() < 4096 {
            return Err(bad("audit_max_size", "must be at least 4KiB"));
        }
        if self.audit_keep > 1000 {
            return Err(bad("audit_keep", "at most 1000 rotated files"));
        }
        self.validate_limits()?;
        crate::triggers::Rules::new(&self.rules).map_err(DispatcherError::Config)?;
        crate::triggers::webhooks(&self.webhooks, false).map_err(DispatcherError::Config)?;
        crate::schedules::schedules(&self.schedules).map_err(DispatcherError::Config)?;
        crate::canaries::canaries(&self.canaries).map_err(DispatcherError::Config)?;
        crate::subscriptions::Subscriptions::new(&self.subscriptions)
            .map_err(DispatcherError::Config)?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.http_tokens.iter().enumerate() {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(bad(
                    &format!("http_token[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if t.token.len() < 16 {
                return Err(bad(
                    &format!("http_token[{i}].token"),
                    "must be at least 16 characters",
                ));
            }
        }
        self.validate_http_limits()?;
        self.validate_blobs()?;
        self.http_tls()?;
        // Read now, so that a bad file stops the start, not the first event a standby passes on.
        if let Some(ca) = &self.peer_ca {
            spine_tls::client_config_for_ca_file(Some(ca))
                .map_err(|e| bad("peer_ca", e.to_string()))?;
        }
        if let Some(addr) = self.http_listen {
            if !addr.ip().is_loopback()
                && self.http_tls_cert.is_none()
                && !self.http_allow_plaintext
            {
                return Err(bad("http_listen", format!("{addr} is not a loopback address and the HTTP API has no certificate: set http_tls_cert and http_tls_key (PEM files) to serve HTTPS, or http_allow_plaintext = true if a TLS-terminating proxy or a trusted network protects it (tokens and job data then cross the network in clear)")));
            }
            self.public_url_or_default(addr)?;
            if !addr.ip().is_loopback() && self.http_tokens.is_empty() {
                return Err(bad("http_listen", format!("{addr} is not a loopback address: configure [[http_token]] entries (without them the API serves loopback clients only)")));
            }
        }
        Ok(())
    }

    /// The HTTPS configuration of the HTTP listener, from `http_tls_cert` and `http_tls_key`
    /// (read and checked now: files missing, not PEM, or a key that is not the certificate's
    /// are refused naming the key), or none for plain HTTP. ALPN offers HTTP/1.1 only.
    pub fn http_tls(
        &self,
    ) -> Result<Option<std::sync::Arc<spine_tls::rustls::ServerConfig>>, DispatcherError> {
        let (cert, key) = match (&self.http_tls_cert, &self.http_tls_key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                return Err(bad(
                    "http_tls_key",
                    "not set: http_tls_cert needs the private key (PEM) that goes with it",
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "http_tls_cert",
                    "not set: http_tls_key needs the certificate chain (PEM) that goes with it",
                ))
            }
        };
        use spine_tls::TlsError;
        let mut tls = spine_tls::server_config_from_files(cert, key).map_err(|e| match e {
            TlsError::Cert { .. } => bad("http_tls_cert", e),
            TlsError::Key { .. } => bad("http_tls_key", e),
            e => bad(
                "http_tls_key",
                format!(
                    "{e} (http_tls_cert {}, http_tls_key {})",
                    cert.display(),
                    key.display()
                ),
            ),
        })?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(std::sync::Arc::new(tls)))
    }

    /// The base URL of the HTTP API listening on `bound`: `public_url` as configured (without
    /// a trailing `/`), or else `http(s)://address:port` of the listener. Refused for a
    /// listener on every interface without `public_url`: no address there names the machine.
    pub fn public_url_or_default(
        &self,
        bound: std::net::SocketAddr,
    ) -> Result<String, DispatcherError> {
        if let Some(u) = &self.public_url {
            return normalise_public_url(u);
        }
        if bound.ip().is_unspecified() {
            return Err(bad(
                "public_url",
                format!("required when http_listen is {bound} (every interface): the base URL agents and web apps reach this API at, e.g. {}://dispatcher.example.com:{}", self.http_scheme(), bound.port()),
            ));
        }
        Ok(format!("{}://{bound}", self.http_scheme()))
    }

    /// `https` with a certificate, else `http`.
    fn http_scheme(&self) -> &'static str {
        if self.http_tls_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The HTTP API's timeouts and limits (docs/dispatcher.md §6, "Limits").
    fn validate_blobs(&self) -> Result<(), DispatcherError> {
        if self.max_input.as_u64() < self.max_blob.as_u64() {
            return Err(bad(
                "max_input",
                format!("must be at least max_blob ({})", self.max_blob),
            ));
        }
        if let Some(q) = self.blob_quota {
            if q.as_u64() < self.max_input.as_u64() {
                return Err(bad("blob_quota", format!("must be at least max_input ({}), or no input of that size could ever be stored", self.max_input)));
            }
        }
        if !(1 << 20..=1 << 40).contains(&self.store_cache.as_u64()) {
            return Err(bad(
                "store_cache",
                format!(
                    "{} is outside 1MiB to 1TiB (a size such as \"64MiB\": memory for redb's page cache of jobs.redb)",
                    spine_protocol::units::format_size(self.store_cache.as_u64())
                ),
            ));
        }
        crate::store::target(self.store.as_deref(), None).map_err(|m| bad("store", m))?;
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.store_timeout) {
            return Err(bad(
                "store_timeout",
                "must be 1s to 1h (how long a commit waits for PostgreSQL to come back)",
            ));
        }
        if !(Duration::from_millis(300)..=Duration::from_secs(600)).contains(&self.lease) {
            return Err(bad(
                "lease",
                "must be 300ms to 10m (a dead leader is replaced about this long after it dies)",
            ));
        }
        if let Err(m) = self.election_timing().check() {
            let field = if self.lease_poll.is_zero() {
                "lease_poll"
            } else {
                "lease_renew"
            };
            return Err(bad(field, m));
        }
        if self.lease_poll > self.lease {
            return Err(bad(
                "lease_poll",
                format!(
                    "must not exceed lease ({:?}): standbys would notice a dead leader late",
                    self.lease
                ),
            ));
        }
        if self.blob_orphan_ttl < Duration::from_secs(1) {
            return Err(bad(
                "blob_orphan_ttl",
                "must be at least 1s (minutes are wise: a web app uploads a blob, then names it in jobs)",
            ));
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(3600)).contains(&self.blob_url_ttl) {
            return Err(bad(
                "blob_url_ttl",
                "must be 10s to 1h (an agent fetches its input when the job arrives)",
            ));
        }
        Ok(())
    }

    fn validate_http_limits(&self) -> Result<(), DispatcherError> {
        let between = |key: &str, v: Duration, lo: Duration, hi: Duration| {
            if v < lo || v > hi {
                let f = spine_protocol::units::format_duration;
                return Err(bad(
                    key,
                    format!("must be {} to {}, not {}", f(lo), f(hi), f(v)),
                ));
            }
            Ok(())
        };
        let secs = Duration::from_secs;
        between(
            "http_header_timeout",
            self.http_header_timeout,
            Duration::from_millis(100),
            secs(300),
        )?;
        between(
            "http_request_timeout",
            self.http_request_timeout,
            secs(1),
            secs(86_400),
        )?;
        if !(1..=1_000_000).contains(&self.http_max_connections) {
            return Err(bad("http_max_connections", "must be 1 to 1000000"));
        }
        if self.http_loopback_reserve >= self.http_max_connections {
            return Err(bad(
                "http_loopback_reserve",
                format!(
                    "must be less than http_max_connections ({}): the rest is what non-loopback clients may use",
                    self.http_max_connections
                ),
            ));
        }
        if self.http_max_event_streams == 0 {
            return Err(bad("http_max_event_streams", "must be at least 1"));
        }
        if !(1..=self.http_max_event_streams).contains(&self.http_max_event_streams_per_token) {
            return Err(bad(
                "http_max_event_streams_per_token",
                format!(
                    "must be 1 to http_max_event_streams ({})",
                    self.http_max_event_streams
                ),
            ));
        }
        Ok(())
    }

    /// The bounds of job arguments, blob uploads and submitters' shares (docs/dispatcher.md §2).
    fn validate_limits(&self) -> Result<(), DispatcherError> {
        if !(1024..=128 * 1024).contains(&self.max_args.as_u64()) {
            return Err(bad(
                "max_args",
                "must be 1KiB to 128KiB (a job stanza carries its arguments and up to 64 KiB of inline input, about 88 KiB in base64, under the 256 KiB stanza limit of stock XMPP servers)",
            ));
        }
        let blobs = self.blob_limits(std::time::Duration::from_secs(1));
        if self.max_open_blobs_per_sender == 0 {
            return Err(bad("max_open_blobs_per_sender", "must be at least 1"));
        }
        if self.max_open_blobs < self.max_open_blobs_per_sender {
            return Err(bad(
                "max_open_blobs",
                "must be at least max_open_blobs_per_sender",
            ));
        }
        if blobs.per_sender_bytes < self.max_blob.as_u64() {
            return Err(bad(
                "max_open_blob_bytes_per_sender",
                format!("must be at least max_blob ({})", self.max_blob),
            ));
        }
        if blobs.total_bytes < blobs.per_sender_bytes {
            return Err(bad(
                "max_open_blob_bytes",
                "must be at least max_open_blob_bytes_per_sender",
            ));
        }
        // A job that does not ask gets `max_attempts`: no submitter's bound may be below it.
        let attempts_floor = |key: &str, v: u64| {
            if v < self.max_attempts {
                return Err(bad(
                    key,
                    format!(
                        "must be at least max_attempts ({}), the attempts of a job that does not ask",
                        self.max_attempts
                    ),
                ));
            }
            Ok(())
        };
        attempts_floor("submitter_max_attempts", self.submitter_max_attempts)?;
        let rules = self
            .submitter_rules
            .iter()
            .map(|r| r.max_attempts)
            .enumerate()
            .map(|(i, a)| (format!("submitter[{i}].max_attempts"), a))
            .chain(
                self.http_tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (format!("http_token[{i}].max_attempts"), t.max_attempts)),
            );
        for (key, attempts) in rules {
            if let Some(a) = attempts {
                attempts_floor(&key, a)?;
            }
        }
        Ok(())
    }

    /// The rule keys the policy is built from.
    pub fn rules(&self) -> Rules<'_> {
        Rules {
            own_jid: &self.jid,
            submitters: &self.submitters,
            submitter_rules: &self.submitter_rules,
            agents: &self.agents,
            agent_rules: &self.agent_rules,
            http_tokens: &self.http_tokens,
            defaults: DefaultLimits {
                max_queue: self.max_queue,
                submitter_max_queued: self.submitter_max_queued,
                submitter_max_attempts: self.submitter_max_attempts,
                submitter_max_priority: self.submitter_max_priority,
                submitter_rate: self.submitter_rate,
            },
        }
    }

    /// The bounds of the blobs submitters and agents upload to this dispatcher.
    pub fn blob_limits(&self, idle_ttl: Duration) -> spine_protocol::blob::BlobLimits {
        let max = self.max_blob.as_u64();
        spine_protocol::blob::BlobLimits {
            max_size: max,
            per_sender: self.max_open_blobs_per_sender,
            per_sender_bytes: self
                .max_open_blob_bytes_per_sender
                .map_or(max.saturating_mul(4), |b| b.as_u64()),
            total: self.max_open_blobs,
            total_bytes: self
                .max_open_blob_bytes
                .map_or(max.saturating_mul(16), |b| b.as_u64()),
            idle_ttl,
        }
    }

    /// Threads of `spine dispatcher`'s runtime: `threads`, or by the store. On the embedded
    /// store 1: a job's whole path (HTTP, the core, XMPP, the journal's write) stays on one
    /// thread and wakes no other. On PostgreSQL 2: a commit is a round trip on the database
    /// connection's task, which on one thread waits behind the core and the HTTP API (measured:
    /// one PostgreSQL dispatcher 0.97–0.98 of redb's jobs a second on 2 threads, 0.85–0.91 on
    /// 1; BENCHMARKS.md, "The PostgreSQL store against redb").
    pub fn runtime_threads(&self) -> usize {
        let postgres = self.store.as_deref().is_some_and(crate::store::is_postgres);
        self.threads.unwrap_or(if postgres { 2 } else { 1 })
    }

    /// The PostgreSQL store the configuration names (its password file read), or none for
    /// the embedded store.
    pub fn store_target(&self) -> Result<Option<crate::store::postgres::PgTarget>, String> {
        let password = match &self.store_password_file {
            None => None,
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("store_password_file: {}: {e}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        };
        crate::store::target(self.store.as_deref(), password.as_deref())
            .map_err(|m| format!("store: {m}"))
    }

    /// Connection options (password read, address resolved, TLS decided).
    pub fn connect_options(&self) -> Result<spine_xmpp::ConnectOptions, DispatcherError> {
        spine_xmpp::connect_options(
            &self.jid,
            self.password.as_deref(),
            self.password_file.as_deref(),
            &self.server,
            &self.tls,
            "SPINE_DISPATCHER_PASSWORD",
        )
        .map_err(|e| bad(e.key, e.message))
    }
}

impl Policy {
    /// The policy of a (validated or not) configuration; errors name the key. Defined here,
    /// beside the configuration, so that `policy.rs` need not know the configuration's shape.
    pub fn from_config(cfg: &DispatcherConfig) -> Result<Self, DispatcherError> {
        Policy::new(&cfg.rules())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spine dispatcher --print-config` (issue 15, item 12): durations and sizes in the forms
    /// of the embedded default and the docs (it printed `retention = "1day"` and
    /// `max_blob = "64.0 MiB"`), and text that parses back to the same configuration.
    #[test]
    fn printed_config_uses_the_documented_forms_and_reads_back_the_same() {
        let printed = toml::to_string_pretty(&DispatcherConfig::default()).unwrap();
        assert_eq!(
            spine_protocol::units::forms_not_printed(DEFAULT_CONFIG, &printed),
            Vec::<&str>::new(),
            "{printed}"
        );
        let cfg = DispatcherConfig::from_toml(
            "retention = \"1day\"\nno_agent_wait = \"1m 30s\"\nspeculation_min = \"250ms\"\n\
             max_blob = \"1000\"\nmax_open_blob_bytes = \"1.5GiB\"\nhttp_listen = \"0.0.0.0:8480\"\n\
             http_allow_plaintext = true\npublic_url = \"http://spine.example.com:8480\"\n\
             submitters = [\"ops@example.com\"]\n\
             [[submitter]]\njid = \"*@example.org\"\ncapabilities = [\"image.*\"]\nmax_queued = \"10%\"\n\
             [[http_token]]\nname = \"web\"\ntoken = \"0123456789abcdef\"\ncapabilities = [\"*\"]\nmax_queued = 7\n",
        )
        .unwrap();
        let printed = toml::to_string_pretty(&cfg).unwrap();
        for line in [
            "retention = \"24h\"",
            "no_agent_wait = \"90s\"",
            "speculation_min = \"250ms\"",
            "http_request_timeout = \"2m\"",
            "max_blob = \"1000B\"",
            "max_open_blob_bytes = \"1536MiB\"",
            "audit_max_size = \"64MiB\"",
            "max_args = \"64KiB\"",
            "store_cache = \"64MiB\"",
        ] {
            assert!(printed.lines().any(|l| l == line), "{line} in\n{printed}");
        }
        assert_eq!(DispatcherConfig::from_toml(&printed).unwrap(), cfg);
    }

    #[test]
    fn runtime_threads_follow_the_store_unless_set() {
        let with = |toml: &str| DispatcherConfig::from_toml(toml).unwrap().runtime_threads();
        assert_eq!(with(""), 1);
        assert_eq!(with("store = \"redb\""), 1);
        assert_eq!(with("store = \"postgres://spine@127.0.0.1:5432/spine\""), 2);
        assert_eq!(
            with("store = \"postgresql://spine@127.0.0.1/spine\"\nthreads = 1"),
            1
        );
        assert_eq!(with("threads = 4"), 4);
    }

    #[test]
    fn default_file_is_the_default_and_errors_name_keys() {
        assert_eq!(
            DispatcherConfig::from_toml(DEFAULT_CONFIG).unwrap(),
            DispatcherConfig::default()
        );
        for (toml, key) in [
            ("jid = \"nouser\"", "jid"),
            ("submitters = [\"a@b/c\"]", "submitters[0]"),
            ("max_queue = 0", "max_queue"),
            ("threads = 0", "threads"),
            ("threads = 2000", "threads"),
            ("speculation_factor = 0.5", "speculation_factor"),
            ("audit_log = \"\"", "audit_log"),
            ("audit_max_size = \"1KiB\"", "audit_max_size"),
            ("store_cache = \"512KiB\"", "store_cache"),
            ("store_cache = 64", "store_cache"),
            ("speculation_min = 2", "speculation_min"),
            ("no_agent_wait = 30", "no_agent_wait"),
            ("http_listen = \"nowhere\"", "http_listen"),
            ("bogus = 1", "bogus"),
            ("http_header_timeout = \"0s\"", "http_header_timeout"),
            ("http_header_timeout = 10", "http_header_timeout"),
            ("http_request_timeout = \"500ms\"", "http_request_timeout"),
            ("http_max_connections = 0", "http_max_connections"),
            ("http_loopback_reserve = 512", "http_loopback_reserve"),
            ("http_max_event_streams = 0", "http_max_event_streams"),
            (
                "http_max_event_streams_per_token = 300",
                "http_max_event_streams_per_token",
            ),
        ] {
            let e = DispatcherConfig::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml} -> {e}");
        }
    }

    /// A listener off loopback needs a certificate or an explicit `http_allow_plaintext`, and
    /// on every interface a `public_url`; the certificate files are checked at start, each
    /// error naming its key (issue 17, item 4).
    #[test]
    fn https_settings_are_checked_and_errors_name_the_key_and_the_fix() {
        let token = "[[http_token]]\nname = \"web\"\ntoken = \"0123456789abcdef\"\ncapabilities = [\"*\"]\n";
        let e = DispatcherConfig::from_toml(&format!("http_listen = \"0.0.0.0:8443\"\n{token}"))
            .unwrap_err()
            .to_string();
        for part in [
            "http_listen",
            "0.0.0.0:8443",
            "http_tls_cert",
            "http_tls_key",
            "http_allow_plaintext = true",
        ] {
            assert!(e.contains(part), "{part} in {e}");
        }
        let e = DispatcherConfig::from_toml(&format!("http_listen = \"192.0.2.7:8480\"\n{token}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("http_tls_cert"), "{e}");
        let e = DispatcherConfig::from_toml(&format!(
            "http_listen = \"[::]:8480\"\nhttp_allow_plaintext = true\n{token}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("public_url: required when http_listen is [::]:8480"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = write("cert.pem", &a.cert.pem());
        let key = write("key.pem", &a.key_pair.serialize_pem());
        let other_key = write("other.pem", &b.key_pair.serialize_pem());
        let junk = write("junk.pem", "not PEM\n");
        let missing = dir.path().join("missing.pem").display().to_string();
        let tls = |c: &str, k: &str| format!("http_tls_cert = \"{c}\"\nhttp_tls_key = \"{k}\"\n");
        let cfg = DispatcherConfig::from_toml(&format!(
            "http_listen = \"0.0.0.0:8443\"\npublic_url = \"https://spine.example.com:8443/\"\n{}{token}",
            tls(&cert, &key)
        ))
        .unwrap();
        assert!(cfg.http_tls().unwrap().is_some());
        assert_eq!(
            cfg.public_url_or_default("0.0.0.0:8443".parse().unwrap())
                .unwrap(),
            "https://spine.example.com:8443"
        );
        for (toml, key_at_fault, says) in [
            (tls(&missing, &key), "http_tls_cert", "missing.pem"),
            (tls(&junk, &key), "http_tls_cert", "BEGIN CERTIFICATE"),
            (tls(&cert, &junk), "http_tls_key", "BEGIN PRIVATE KEY"),
            (tls(&cert, &other_key), "http_tls_key", "does not fit"),
            (
                format!("http_tls_cert = \"{cert}\"\n"),
                "http_tls_key",
                "not set",
            ),
            (
                format!("http_tls_key = \"{key}\"\n"),
                "http_tls_cert",
                "not set",
            ),
            (
                "public_url = \"ftp://x\"\n".to_owned(),
                "public_url",
                "http or https",
            ),
            (
                "public_url = \"https://x/?a=b\"\n".to_owned(),
                "public_url",
                "no query",
            ),
            (
                "public_url = \"/v1\"\n".to_owned(),
                "public_url",
                "https://dispatcher.example.com",
            ),
        ] {
            let e = DispatcherConfig::from_toml(&toml).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{key_at_fault}: ")) && e.contains(says),
                "{toml} -> {e}"
            );
        }

        // The default URL: the listener's address and scheme.
        let plain = DispatcherConfig::default();
        for (addr, url) in [
            ("127.0.0.1:8480", "http://127.0.0.1:8480"),
            ("[::1]:8480", "http://[::1]:8480"),
            ("192.0.2.7:8480", "http://192.0.2.7:8480"),
        ] {
            assert_eq!(
                plain.public_url_or_default(addr.parse().unwrap()).unwrap(),
                url
            );
        }
        let https = DispatcherConfig::from_toml(&tls(&cert, &key)).unwrap();
        assert_eq!(
            https
                .public_url_or_default("127.0.0.1:8443".parse().unwrap())
                .unwrap(),
            "https://127.0.0.1:8443"
        );
    }
}
