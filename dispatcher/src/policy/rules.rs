//! The rule shapes of the configuration's authorization keys (`[[submitter]]`, `[[agent]]`,
//! `[[http_token]]`, and the queue shares they may set), as serde reads them from TOML. The
//! configuration (`config.rs`) holds them; [`Policy::new`](super::Policy::new) turns them into
//! the grants the dispatcher checks. They live with the policy so that the policy never needs
//! the configuration's shape.

use serde::{Deserialize, Serialize};

/// A `[[submitter]]` rule: an account (or `*@domain`) and the capabilities it may submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitterRule {
    /// Bare JID or `*@domain`.
    pub jid: String,
    /// Capabilities it may submit and discover: exact names, `prefix.*`, or `*`.
    pub capabilities: Vec<String>,
    /// May read and cancel other submitters' jobs too.
    #[serde(default)]
    pub all_jobs: bool,
    /// Its queued jobs per capability at most (default `submitter_max_queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<QueueShare>,
    /// Most attempts its jobs may ask for (default `submitter_max_attempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    /// Highest priority its jobs may ask for (default `submitter_max_priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<i64>,
}

/// An `[[agent]]` rule: an account (or `*@domain`) and the capabilities it may offer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRule {
    /// Bare JID or `*@domain`.
    pub jid: String,
    /// Capabilities it may offer: exact names, `prefix.*`, or `*`.
    pub capabilities: Vec<String>,
}

/// One bearer token of the HTTP API.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToken {
    /// Who holds it (logs, `submitter` of its jobs).
    pub name: String,
    /// The secret.
    pub token: String,
    /// Capabilities it may run: exact names, `prefix.*`, or `*`.
    pub capabilities: Vec<String>,
    /// May read and cancel jobs submitted with other tokens too.
    #[serde(default)]
    pub all_jobs: bool,
    /// May read `GET /metrics` (a scraper's token; `capabilities` may then be empty).
    #[serde(default)]
    pub metrics: bool,
    /// Its queued jobs per capability at most (default `submitter_max_queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<QueueShare>,
    /// Most attempts its jobs may ask for (default `submitter_max_attempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    /// Highest priority its jobs may ask for (default `submitter_max_priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<i64>,
}

/// A part of a queue: a number of jobs, or a percentage of `max_queue` (`"50%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueShare {
    /// At most this many jobs (at least 1).
    Count(usize),
    /// At most this percentage of `max_queue` (1 to 100, rounded up).
    Percent(u8),
}

impl QueueShare {
    /// The number of jobs it allows of a queue of `max_queue` (at least 1).
    pub fn of(self, max_queue: usize) -> usize {
        match self {
            QueueShare::Count(n) => n.max(1),
            QueueShare::Percent(p) => (max_queue.saturating_mul(usize::from(p)))
                .div_ceil(100)
                .max(1),
        }
    }
}

impl std::str::FromStr for QueueShare {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("'{s}': a number of jobs (100) or a percentage of max_queue (\"50%\")");
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(QueueShare::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.trim().parse::<usize>() {
                Ok(n @ 1..) => Ok(QueueShare::Count(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for QueueShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueShare::Count(n) => write!(f, "{n}"),
            QueueShare::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for QueueShare {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            QueueShare::Count(n) => s.serialize_u64(*n as u64),
            QueueShare::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for QueueShare {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .map(QueueShare::Count)
                .ok_or_else(|| serde::de::Error::custom(format!("{n}: must be at least 1"))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpToken")
            .field("name", &self.name)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}
