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
    /// May send events for the rules (`<event/>`, docs/events.md); an operator (`all_jobs`
    /// and `*`) may anyway.
    #[serde(default)]
    pub events: bool,
    /// Its queued jobs per capability at most (default `submitter_max_queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<QueueShare>,
    /// Most attempts its jobs may ask for (default `submitter_max_attempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    /// Highest priority its jobs may ask for (default `submitter_max_priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<i64>,
    /// Its submissions at most, all capabilities together (default `submitter_rate`):
    /// `"50/s"`, `"600/min"`, `"100/h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Its submissions at most per capability pattern (`"image.*" = "10/s"`), each pattern
    /// its own budget, on top of `rate`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub capability_rates: std::collections::BTreeMap<String, Rate>,
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
    /// May post events (`POST /v1/events`, docs/events.md): a webhook sender's token
    /// (`capabilities` may then be empty; the rules' jobs run as the rules).
    #[serde(default)]
    pub events: bool,
    /// Its queued jobs per capability at most (default `submitter_max_queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<QueueShare>,
    /// Most attempts its jobs may ask for (default `submitter_max_attempts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u64>,
    /// Highest priority its jobs may ask for (default `submitter_max_priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<i64>,
    /// Its submissions at most, all capabilities together (default `submitter_rate`):
    /// `"50/s"`, `"600/min"`, `"100/h"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Its submissions at most per capability pattern (`"image.*" = "10/s"`), each pattern
    /// its own budget, on top of `rate`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub capability_rates: std::collections::BTreeMap<String, Rate>,
}

/// A submission rate (a token bucket): `per_sec` sustained, bursts of `burst` at once.
/// Written `"N/s"`, `"N/min"` or `"N/h"` (N may have decimals); the burst is the count of
/// one second, at least 1 (`"50/s"`: 50 at once, then 50 a second; `"10/min"`: 1 at once,
/// then one every 6 s). A `"N/s burst M"` suffix sets the burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Submissions a second, sustained.
    pub per_sec: f64,
    /// Submissions at once after a quiet time.
    pub burst: f64,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}': a rate like \"50/s\", \"600/min\" or \"100/h\" (optionally \"… burst 20\")"
            )
        };
        let (rate, burst) = match s.split_once("burst") {
            Some((r, b)) => (r.trim(), Some(b.trim())),
            None => (s.trim(), None),
        };
        let (n, unit) = rate.split_once('/').ok_or_else(bad)?;
        let n: f64 = n.trim().parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("'{s}': the rate must be more than 0"));
        }
        let per_sec = n / secs;
        let burst = match burst {
            None => per_sec.ceil().max(1.0),
            Some(b) => match b.parse::<u32>() {
                Ok(b @ 1..) => f64::from(b),
                _ => {
                    return Err(format!(
                        "'{s}': the burst must be a whole number, at least 1"
                    ))
                }
            },
        };
        Ok(Rate { per_sec, burst })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s burst {}", self.per_sec, self.burst)
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
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
