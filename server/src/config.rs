//! Server configuration: a serde struct read from TOML (plus `SPINE_SERVER_*` environment
//! variables) by the `config` crate, with an embedded commented default (`server.toml`) and
//! validation that names the bad key before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::error::ServerError;
use crate::scram::ScramKeys;

/// The commented default configuration (what `spine server --print-config` starts from).
pub const DEFAULT_CONFIG: &str = include_str!("server.toml");

/// A rate limit in bytes per second, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub struct RateLimit(pub Option<ByteSize>);

impl TryFrom<String> for RateLimit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.trim() == "off" {
            return Ok(RateLimit(None));
        }
        s.parse::<ByteSize>()
            .map(|b| RateLimit(Some(b)))
            .map_err(|e| format!("expected a size per second such as \"1MiB\", or \"off\": {e}"))
    }
}

impl From<RateLimit> for String {
    fn from(r: RateLimit) -> String {
        match r.0 {
            None => "off".to_owned(),
            Some(b) => spine_protocol::units::format_size(b.as_u64()),
        }
    }
}

/// TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key`. Absent: a self-signed certificate is generated.
    pub cert: Option<PathBuf>,
    /// PEM private key; with `cert`.
    pub key: Option<PathBuf>,
    /// Without cert/key: keep the generated self-signed certificate in this directory
    /// (`cert.pem`, `key.pem`) and reuse it on later starts, so that clients that trust it keep
    /// working across restarts.
    pub self_signed_dir: Option<PathBuf>,
}

/// One account.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// Local part of the JID.
    pub user: String,
    /// Password, hashed at start.
    pub password: Option<String>,
    /// RFC 5803 SCRAM-SHA-256 hash.
    pub scram_sha256: Option<String>,
    /// RFC 5803 SCRAM-SHA-1 hash.
    pub scram_sha1: Option<String>,
}

impl std::fmt::Debug for AccountConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountConfig")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("scram_sha256", &self.scram_sha256.is_some())
            .field("scram_sha1", &self.scram_sha1.is_some())
            .finish()
    }
}

/// Everything the server needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// XMPP domain served.
    pub domain: String,
    /// Largest stanza accepted.
    #[serde(with = "spine_protocol::units::size")]
    pub max_stanza_size: ByteSize,
    /// Most concurrent client connections.
    pub max_connections: usize,
    /// Inbound bytes per second per non-loopback connection.
    pub rate_limit: RateLimit,
    /// Silence before the server pings a client.
    #[serde(with = "spine_protocol::units::duration")]
    pub idle_timeout: Duration,
    /// Wait for data after that ping.
    #[serde(with = "spine_protocol::units::duration")]
    pub ping_timeout: Duration,
    /// Time allowed for TLS, SASL and bind.
    #[serde(with = "spine_protocol::units::duration")]
    pub login_timeout: Duration,
    /// Time allowed from connecting to authenticating (TLS and SASL).
    #[serde(with = "spine_protocol::units::duration")]
    pub auth_timeout: Duration,
    /// Unauthenticated connections open at once from one IP address.
    pub max_unauthenticated_per_address: usize,
    /// Unauthenticated connections open at once in all (default: a quarter of
    /// `max_connections`), so that the rest stay for clients that log in.
    pub max_unauthenticated: Option<usize>,
    /// Failed logins from one IP address before it is refused for a while (1 s, doubling
    /// per further failure, up to 5 minutes).
    pub auth_failures_before_backoff: u32,
    /// Stanzas queued per client.
    pub outbound_queue: usize,
    /// TLS.
    pub tls: TlsConfig,
    /// Shared secret for development mode.
    pub dev_secret: Option<String>,
    /// Accounts.
    #[serde(rename = "account")]
    pub accounts: Vec<AccountConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 5222)),
            domain: "localhost".to_owned(),
            max_stanza_size: ByteSize::kib(256),
            max_connections: 10_000,
            rate_limit: RateLimit(None),
            idle_timeout: Duration::from_secs(300),
            ping_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            auth_timeout: Duration::from_secs(10),
            max_unauthenticated_per_address: 32,
            max_unauthenticated: None,
            auth_failures_before_backoff: 5,
            outbound_queue: 8192,
            tls: TlsConfig::default(),
            dev_secret: None,
            accounts: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Loads the configuration: defaults, then the TOML file if given, then `SPINE_SERVER_*`
    /// environment variables; then validates it.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ServerError> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            b = b.add_source(
                config::File::from(f)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        b = b.add_source(config::Environment::with_prefix("SPINE_SERVER"));
        let cfg: ServerConfig = b
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ServerError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment), then validates.
    pub fn from_toml(text: &str) -> Result<Self, ServerError> {
        let cfg: ServerConfig =
            toml::from_str(text).map_err(|e| ServerError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value that deserialisation alone cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |key: &str, why: String| Err(ServerError::Config(format!("{key}: {why}")));
        if let Err(e) = jid::BareJid::new(&self.domain) {
            return bad(
                "domain",
                format!("'{}' is not a valid XMPP domain: {e}", self.domain),
            );
        }
        if self.domain.contains('@') || self.domain.contains('/') {
            return bad(
                "domain",
                format!("'{}' must be a bare domain, not a JID", self.domain),
            );
        }
        if self.max_stanza_size.as_u64() < 4096 {
            return bad(
                "max_stanza_size",
                "must be at least 4KiB (stream negotiation needs it)".into(),
            );
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1".into());
        }
        if self.outbound_queue == 0 {
            return bad("outbound_queue", "must be at least 1".into());
        }
        if self.max_unauthenticated_per_address == 0 {
            return bad(
                "max_unauthenticated_per_address",
                "must be at least 1".into(),
            );
        }
        if let Some(n) = self.max_unauthenticated {
            if n == 0 || n > self.max_connections {
                return bad(
                    "max_unauthenticated",
                    format!(
                        "must be from 1 to max_connections ({})",
                        self.max_connections
                    ),
                );
            }
        }
        if self.auth_failures_before_backoff == 0 {
            return bad("auth_failures_before_backoff", "must be at least 1".into());
        }
        if self.auth_timeout > self.login_timeout {
            return bad(
                "auth_timeout",
                format!(
                    "must not be longer than login_timeout ({})",
                    spine_protocol::units::format_duration(self.login_timeout)
                ),
            );
        }
        for (key, d) in [
            ("idle_timeout", self.idle_timeout),
            ("ping_timeout", self.ping_timeout),
            ("login_timeout", self.login_timeout),
            ("auth_timeout", self.auth_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return bad(key, "must be at least 100ms".into());
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad(
                "tls",
                "give both cert and key, or neither (for a self-signed certificate)".into(),
            );
        }
        if matches!(&self.dev_secret, Some(s) if s.is_empty()) {
            return bad("dev_secret", "must not be empty".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let key = format!("account[{i}]");
            if jid::BareJid::new(&format!("{}@{}", a.user, self.domain)).is_err()
                || a.user.is_empty()
            {
                return bad(
                    &format!("{key}.user"),
                    format!("'{}' is not a valid JID local part", a.user),
                );
            }
            if !seen.insert(a.user.as_str()) {
                return bad(
                    &format!("{key}.user"),
                    format!("account '{}' is defined twice", a.user),
                );
            }
            if a.password.is_none() && a.scram_sha256.is_none() && a.scram_sha1.is_none() {
                return bad(&key, "needs password, scram_sha256 or scram_sha1".into());
            }
            if a.password.is_some() && (a.scram_sha256.is_some() || a.scram_sha1.is_some()) {
                return bad(&key, "give a password or SCRAM hashes, not both".into());
            }
            for (field, v) in [
                ("scram_sha256", &a.scram_sha256),
                ("scram_sha1", &a.scram_sha1),
            ] {
                if let Some(v) = v {
                    match ScramKeys::from_rfc5803(v) {
                        Ok((h, _))
                            if h.scheme() != field.replace("scram_sha", "SCRAM-SHA-").as_str() =>
                        {
                            return bad(
                                &format!("{key}.{field}"),
                                format!("holds a {} hash", h.scheme()),
                            );
                        }
                        Ok(_) => {}
                        Err(e) => return bad(&format!("{key}.{field}"), e),
                    }
                }
            }
        }
        Ok(())
    }

    /// Unauthenticated connections allowed in all.
    pub fn unauthenticated_limit(&self) -> usize {
        self.max_unauthenticated
            .unwrap_or((self.max_connections / 4).max(1))
    }

    /// Whether a connection from `peer` may skip TLS and is exempt from the rate limit.
    pub fn is_local(peer: &SocketAddr) -> bool {
        peer.ip().is_loopback()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `spine server --print-config` (issue 15, item 12): the documented forms, and text that
    /// parses back to the same configuration.
    #[test]
    fn printed_config_uses_the_documented_forms_and_reads_back_the_same() {
        let printed = toml::to_string_pretty(&ServerConfig::default()).unwrap();
        assert_eq!(
            spine_protocol::units::forms_not_printed(DEFAULT_CONFIG, &printed),
            Vec::<&str>::new(),
            "{printed}"
        );
        let cfg = ServerConfig::from_toml(
            "idle_timeout = \"1day\"\nping_timeout = \"1m 30s\"\nmax_stanza_size = \"1000000\"\n\
             rate_limit = \"1 MiB\"\n",
        )
        .unwrap();
        let printed = toml::to_string_pretty(&cfg).unwrap();
        for line in [
            "idle_timeout = \"24h\"",
            "ping_timeout = \"90s\"",
            "login_timeout = \"30s\"",
            "max_stanza_size = \"1000000B\"",
            "rate_limit = \"1MiB\"",
        ] {
            assert!(printed.lines().any(|l| l == line), "{line} in\n{printed}");
        }
        assert_eq!(ServerConfig::from_toml(&printed).unwrap(), cfg);
    }

    #[test]
    fn embedded_default_is_the_default() {
        let cfg = ServerConfig::from_toml(DEFAULT_CONFIG).unwrap();
        assert_eq!(cfg, ServerConfig::default());
    }

    #[test]
    fn durations_and_sizes_carry_units() {
        let cfg = ServerConfig::from_toml(
            "idle_timeout = \"90s\"\nmax_stanza_size = \"1MiB\"\nrate_limit = \"64KiB\"",
        )
        .unwrap();
        assert_eq!(cfg.idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.max_stanza_size, ByteSize::mib(1));
        assert_eq!(cfg.rate_limit, RateLimit(Some(ByteSize::kib(64))));
        assert!(
            ServerConfig::from_toml("idle_timeout = 90").is_err(),
            "bare integers are refused"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("domain = \"a@b\"", "domain"),
            ("max_connections = 0", "max_connections"),
            ("ping_timeout = \"1ms\"", "ping_timeout"),
            ("[tls]\ncert = \"/x\"", "tls"),
            ("listen = \"nope\"", "listen"),
            ("bogus = 1", "bogus"),
            ("[[account]]\nuser = \"a\"", "account[0]"),
            ("[[account]]\nuser = \"a b\"\npassword = \"x\"", "account[0].user"),
            ("[[account]]\nuser = \"a\"\npassword = \"x\"\n[[account]]\nuser = \"a\"\npassword = \"y\"", "account[1].user"),
            ("[[account]]\nuser = \"a\"\nscram_sha256 = \"junk\"", "account[0].scram_sha256"),
            ("rate_limit = \"fast\"", "rate_limit"),
        ];
        for (toml, key) in cases {
            let e = ServerConfig::from_toml(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml:?} -> {e}");
        }
    }

    #[test]
    fn passwords_are_not_debug_printed() {
        let cfg =
            ServerConfig::from_toml("[[account]]\nuser = \"a\"\npassword = \"hunter2\"").unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
