//! The account part of a client's configuration (agent, dispatcher): JID, password, server
//! address and TLS, resolved into [`ConnectOptions`] with errors that name the key at fault.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};

use jid::Jid;
use serde::{Deserialize, Serialize};

use crate::{ConnectOptions, Security, Trust};

/// When the connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// TLS off loopback, plain TCP on loopback.
    #[default]
    Auto,
    /// Always STARTTLS.
    Required,
    /// Plain TCP everywhere (credentials in clear; never in production).
    InsecurePlain,
}

/// TLS settings (`[tls]` in agent and dispatcher configuration).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// When to use TLS.
    #[serde(default)]
    pub mode: TlsMode,
    /// CA certificates to trust (PEM file); without it, the operating system's store.
    pub ca_file: Option<PathBuf>,
}

/// A configuration error: the key at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The configuration key.
    pub key: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(key: &'static str, message: impl Into<String>) -> KeyError {
    KeyError {
        key,
        message: message.into(),
    }
}

/// The list-valued keys of a configuration read from `<PREFIX>_<KEY>` environment variables,
/// split at commas with blanks trimmed (`SPINE_AGENT_DISPATCHERS=d1@x, d2@x`).
///
/// Written here because the `config` crate splits lists only when it also guesses the types
/// of every value, which would turn a password "0123" into the number 123.
pub fn env_lists(prefix: &str, keys: &[&str]) -> Vec<(String, Vec<String>)> {
    keys.iter()
        .filter_map(|k| {
            let v = std::env::var(format!("{prefix}_{}", k.to_uppercase())).ok()?;
            let items = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            Some(((*k).to_owned(), items))
        })
        .collect()
}

/// Resolves account settings: reads the password (inline or from a file), resolves the
/// server address, decides on TLS and loads the CA file. `env` names the environment variable
/// that can hold the password, for the error message.
pub fn connect_options(
    jid: &str,
    password: Option<&str>,
    password_file: Option<&Path>,
    server: &str,
    tls: &TlsConfig,
    env: &str,
) -> Result<ConnectOptions, KeyError> {
    let jid = Jid::new(jid).map_err(|e| bad("jid", format!("'{jid}' is not a JID: {e}")))?;
    if jid.node().is_none() {
        return Err(bad(
            "jid",
            format!("'{jid}' needs a user part (user@domain)"),
        ));
    }
    let password = match (password, password_file) {
        (Some(_), Some(_)) => {
            return Err(bad("password", "give password or password_file, not both"))
        }
        (Some(p), None) => p.to_owned(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| bad("password_file", format!("{}: {e}", f.display())))?
            .trim_end_matches(['\n', '\r'])
            .to_owned(),
        (None, None) => {
            return Err(bad(
                "password",
                format!("not set (password, password_file or {env})"),
            ))
        }
    };
    let addr = server
        .to_socket_addrs()
        .map_err(|e| bad("server", format!("'{server}': {e}")))?
        .next()
        .ok_or_else(|| bad("server", format!("'{server}' resolves to no address")))?;
    let use_tls = match tls.mode {
        TlsMode::Required => true,
        TlsMode::Auto => !addr.ip().is_loopback(),
        TlsMode::InsecurePlain => false,
    };
    let security = if use_tls {
        // A private CA from the file, or else the operating system's store.
        let trust = match &tls.ca_file {
            Some(f) => Trust::Pem(
                std::fs::read_to_string(f)
                    .map_err(|e| bad("tls.ca_file", format!("{}: {e}", f.display())))?,
            ),
            None => Trust::System,
        };
        Security::StartTls {
            trust,
            // Used only when the server lists tls-exporter (XEP-0440) and offers -PLUS.
            channel_binding: true,
        }
    } else {
        Security::Plain {
            insecure: tls.mode == TlsMode::InsecurePlain,
        }
    };
    Ok(ConnectOptions::new(jid, password, addr, security))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_required_off_loopback_and_errors_name_keys() {
        let tls = TlsConfig::default();
        // Off loopback: STARTTLS, verified against the system store without a CA file.
        let o = connect_options("a@x", Some("pw"), None, "192.0.2.1:5222", &tls, "ENV").unwrap();
        assert!(matches!(
            o.security,
            Security::StartTls {
                trust: Trust::System,
                ..
            }
        ));
        let o = connect_options("a@x", Some("pw"), None, "127.0.0.1:5222", &tls, "ENV").unwrap();
        assert!(matches!(o.security, Security::Plain { insecure: false }));
        let req = TlsConfig {
            mode: TlsMode::Required,
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let e =
            connect_options("a@x", Some("pw"), None, "127.0.0.1:5222", &req, "ENV").unwrap_err();
        assert_eq!(e.key, "tls.ca_file");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{}", e.message);
        assert_eq!(
            connect_options("nouser", Some("pw"), None, "127.0.0.1:1", &tls, "ENV")
                .unwrap_err()
                .key,
            "jid"
        );
        assert!(
            connect_options("a@x", None, None, "127.0.0.1:1", &tls, "SPINE_X")
                .unwrap_err()
                .message
                .contains("SPINE_X")
        );
        assert_eq!(
            connect_options("a@x", Some("p"), None, "no-such-host.invalid:1", &tls, "E")
                .unwrap_err()
                .key,
            "server"
        );
    }
}
