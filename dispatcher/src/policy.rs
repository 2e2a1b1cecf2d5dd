//! The authorization policy (docs/security.md): which XMPP submitters may run which
//! capabilities and see which jobs, and which accounts may offer which capabilities as agents.
//! HTTP tokens carry the same grant ([`HttpToken`]). Pure logic, no I/O.
//!
//! Data flow: the configuration's rule keys ([`rules`]) are checked and turned into a
//! [`Policy`] once, at start ([`Policy::new`]); the core asks it about every
//! submitter and agent, and the HTTP front end authenticates tokens against its grants.
//! Everything not granted is refused: a JID that matches no rule may not submit, and an
//! account that matches no agent rule is not registered. This module does not know the
//! configuration's shape: `config.rs` imports from here, never the reverse.

pub mod rules;

use jid::BareJid;
use spine_protocol::CapabilityName;

pub use self::rules::{AgentRule, HttpToken, QueueShare, Rate, SubmitterRule};
use crate::error::DispatcherError;

/// Capability patterns: exact names, `prefix.*` (everything under the prefix) or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities(Vec<String>);

impl Capabilities {
    /// The patterns, as configured (`*`, `image.*`, `text.upper`).
    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    /// Every capability.
    pub fn all() -> Self {
        Capabilities(vec!["*".into()])
    }

    /// Checks a configured list; `key` names it in the error.
    pub fn parse(list: &[String], key: &str) -> Result<Self, DispatcherError> {
        if list.is_empty() {
            return Err(DispatcherError::Config(format!(
                "{key}: list the capabilities allowed (\"*\" for all)"
            )));
        }
        for (i, p) in list.iter().enumerate() {
            let name = p.strip_suffix(".*").unwrap_or(p);
            if p != "*" && name.parse::<CapabilityName>().is_err() {
                return Err(DispatcherError::Config(format!(
                    "{key}[{i}]: '{p}' is not a capability name, 'prefix.*' or '*'"
                )));
            }
        }
        Ok(Capabilities(list.to_vec()))
    }

    /// Whether they are every capability (`*` among them): with `all_jobs`, an operator's.
    pub fn is_all(&self) -> bool {
        self.0.iter().any(|p| p == "*")
    }

    /// Whether `cap` is among them.
    pub fn allows(&self, cap: &CapabilityName) -> bool {
        let cap = cap.as_str();
        self.0.iter().any(|p| {
            p == "*"
                || p == cap
                || p.strip_suffix('*')
                    .is_some_and(|prefix| prefix.ends_with('.') && cap.starts_with(prefix))
        })
    }

    fn extend(&mut self, other: &Capabilities) {
        self.0.extend(other.0.iter().cloned());
    }
}

/// The patterns as configured, joined with `, `.
impl std::fmt::Display for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

/// Whom a rule is about: one account, or every account of a domain (`*@domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accounts {
    /// One bare JID.
    One(BareJid),
    /// `*@domain`.
    Domain(String),
}

impl Accounts {
    /// Reads `user@domain` or `*@domain`; `key` names it in the error.
    pub fn parse(s: &str, key: &str) -> Result<Self, DispatcherError> {
        let bad = |why: &str| DispatcherError::Config(format!("{key}: '{s}' {why}"));
        match s.strip_prefix("*@") {
            Some(domain) => {
                if domain.contains('@') || BareJid::new(domain).is_err() {
                    return Err(bad("has no valid domain after '*@'"));
                }
                Ok(Accounts::Domain(domain.to_ascii_lowercase()))
            }
            None => match BareJid::new(s) {
                Ok(j) if j.node().is_some() => Ok(Accounts::One(j)),
                _ => Err(bad("is neither a bare JID (user@domain) nor *@domain")),
            },
        }
    }

    fn matches(&self, jid: &BareJid) -> bool {
        match self {
            Accounts::One(j) => j == jid,
            Accounts::Domain(d) => jid.domain().as_str().eq_ignore_ascii_case(d),
        }
    }
}

/// What a submitter may do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    /// Capabilities it may submit and discover.
    pub capabilities: Capabilities,
    /// Whether it may read and cancel jobs other submitters submitted (an operator).
    pub all_jobs: bool,
    /// Whether it may send events for the rules (docs/events.md).
    pub events: bool,
}

impl Grant {
    /// Whether a caller known as `me` (a bare JID, or `http:<token>`) may read or cancel a
    /// job whose submitter is `submitter`.
    pub fn may_see(&self, me: &str, submitter: &str) -> bool {
        self.all_jobs || me == submitter
    }
}

/// What one submitter may ask of the queues: how many of its jobs may wait per capability,
/// the highest `max-attempts` and `priority` its jobs may ask for, and how fast it may submit.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitLimits {
    /// Its queued jobs per capability at most (`max_queued`, resolved against `max_queue`).
    pub max_queued: usize,
    /// Most attempts a job may ask for (`max_attempts` of its rule).
    pub max_attempts: u64,
    /// Highest priority a job may ask for (`max_priority` of its rule).
    pub max_priority: i64,
    /// Its submissions, all capabilities together (`rate`, else `submitter_rate`).
    pub rate: Option<Rate>,
    /// Its submissions per capability pattern (`capability_rates`), each its own budget.
    pub capability_rates: std::sync::Arc<[(Capabilities, Rate)]>,
}

impl Default for SubmitLimits {
    /// No bound.
    fn default() -> Self {
        SubmitLimits {
            max_queued: usize::MAX,
            max_attempts: u64::MAX,
            max_priority: i64::MAX,
            rate: None,
            capability_rates: std::sync::Arc::new([]),
        }
    }
}

impl SubmitLimits {
    /// The top-level defaults (`submitter_max_queued`, …) overridden by a rule's own keys.
    fn of(d: &DefaultLimits, rule: RuleLimits<'_>, key: &str) -> Result<Self, DispatcherError> {
        let mut capability_rates = Vec::new();
        for (pattern, rate) in rule.capability_rates {
            let caps = Capabilities::parse(
                std::slice::from_ref(pattern),
                &format!("{key}.capability_rates"),
            )?;
            capability_rates.push((caps, *rate));
        }
        Ok(SubmitLimits {
            max_queued: rule
                .max_queued
                .unwrap_or(d.submitter_max_queued)
                .of(d.max_queue),
            max_attempts: rule.max_attempts.unwrap_or(d.submitter_max_attempts),
            max_priority: rule.max_priority.unwrap_or(d.submitter_max_priority),
            rate: rule.rate.or(d.submitter_rate),
            capability_rates: capability_rates.into(),
        })
    }

    /// The most generous of two (rules naming the same account add up): a rate one rule
    /// leaves unlimited is unlimited.
    fn max(self, o: SubmitLimits) -> SubmitLimits {
        let faster = |a: Option<Rate>, b: Option<Rate>| match (a, b) {
            (Some(a), Some(b)) => Some(if a.per_sec >= b.per_sec { a } else { b }),
            _ => None,
        };
        // Per pattern: the faster of the two when both rules name it, else no budget (one
        // rule lets it through).
        let capability_rates: Vec<(Capabilities, Rate)> = self
            .capability_rates
            .iter()
            .filter_map(|(p, r)| {
                let other = o.capability_rates.iter().find(|(q, _)| q == p)?;
                Some((p.clone(), faster(Some(*r), Some(other.1))?))
            })
            .collect();
        SubmitLimits {
            max_queued: self.max_queued.max(o.max_queued),
            max_attempts: self.max_attempts.max(o.max_attempts),
            max_priority: self.max_priority.max(o.max_priority),
            rate: faster(self.rate, o.rate),
            capability_rates: capability_rates.into(),
        }
    }
}

/// The submit limits of every submitter.
#[derive(Debug, Clone, Default)]
struct Limits {
    /// For a submitter no rule names (the local HTTP operator without tokens).
    defaults: SubmitLimits,
    /// Per `submitters` entry (the defaults) and `[[submitter]]` rule.
    rules: Vec<(Accounts, SubmitLimits)>,
    /// Per `[[http_token]]`, by name.
    tokens: std::collections::HashMap<String, SubmitLimits>,
}

/// The top-level keys a rule falls back on when it does not set its own limits.
#[derive(Debug, Clone, Copy)]
pub struct DefaultLimits {
    /// `max_queue`: the queue bound per capability, which a percentage share is of.
    pub max_queue: usize,
    /// `submitter_max_queued`.
    pub submitter_max_queued: QueueShare,
    /// `submitter_max_attempts`.
    pub submitter_max_attempts: u64,
    /// `submitter_max_priority`.
    pub submitter_max_priority: i64,
    /// `submitter_rate`.
    pub submitter_rate: Option<Rate>,
}

/// A rule's own limit keys (`[[submitter]]`, `[[http_token]]`), each falling back on the
/// top-level default.
#[derive(Debug, Clone, Copy)]
struct RuleLimits<'a> {
    max_queued: Option<QueueShare>,
    max_attempts: Option<u64>,
    max_priority: Option<i64>,
    rate: Option<Rate>,
    capability_rates: &'a std::collections::BTreeMap<String, Rate>,
}

/// What a policy is built from: the rule keys of the configuration, borrowed (`config.rs`
/// fills it, so that this module need not know the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The dispatcher's own JID (`jid`): without agent rules, every account of its domain may
    /// be an agent.
    pub own_jid: &'a str,
    /// `submitters`: accounts allowed every capability, own jobs only.
    pub submitters: &'a [String],
    /// `[[submitter]]` rules.
    pub submitter_rules: &'a [SubmitterRule],
    /// `agents`: accounts allowed to offer every capability.
    pub agents: &'a [String],
    /// `[[agent]]` rules.
    pub agent_rules: &'a [AgentRule],
    /// `[[http_token]]` entries.
    pub http_tokens: &'a [HttpToken],
    /// The limits of a rule that sets none.
    pub defaults: DefaultLimits,
}

/// The whole policy, built once from the configuration's rules.
#[derive(Debug, Clone)]
pub struct Policy {
    submitters: Vec<(Accounts, Grant)>,
    /// `None`: no agent rules, every account of `own_domain` may offer everything.
    agents: Option<Vec<(Accounts, Capabilities)>>,
    own_domain: String,
    limits: Limits,
    /// The HTTP tokens with their grants (capability patterns checked once, here).
    tokens: Vec<(HttpToken, Grant)>,
}

impl Policy {
    /// The policy of a configuration's rules (validated or not); errors name the key.
    pub fn new(cfg: &Rules<'_>) -> Result<Self, DispatcherError> {
        let mut submitters = Vec::new();
        for (i, s) in cfg.submitters.iter().enumerate() {
            let who = Accounts::parse(s, &format!("submitters[{i}]"))?;
            submitters.push((
                who,
                // May run anything, so may send events too.
                Grant {
                    capabilities: Capabilities::all(),
                    all_jobs: false,
                    events: true,
                },
            ));
        }
        for (i, r) in cfg.submitter_rules.iter().enumerate() {
            let who = Accounts::parse(&r.jid, &format!("submitter[{i}].jid"))?;
            // A sender of events (`events = true`) may run nothing itself.
            let caps = if r.events && r.capabilities.is_empty() {
                Capabilities::default()
            } else {
                Capabilities::parse(&r.capabilities, &format!("submitter[{i}].capabilities"))?
            };
            submitters.push((
                who,
                Grant {
                    events: r.events || (r.all_jobs && caps.is_all()),
                    capabilities: caps,
                    all_jobs: r.all_jobs,
                },
            ));
        }
        let mut agents = Vec::new();
        for (i, a) in cfg.agents.iter().enumerate() {
            agents.push((
                Accounts::parse(a, &format!("agents[{i}]"))?,
                Capabilities::all(),
            ));
        }
        for (i, r) in cfg.agent_rules.iter().enumerate() {
            agents.push((
                Accounts::parse(&r.jid, &format!("agent[{i}].jid"))?,
                Capabilities::parse(&r.capabilities, &format!("agent[{i}].capabilities"))?,
            ));
        }
        let own_domain = jid::Jid::new(cfg.own_jid)
            .map(|j| j.domain().as_str().to_owned())
            .map_err(|e| DispatcherError::Config(format!("jid: {e}")))?;
        let d = &cfg.defaults;
        let none = std::collections::BTreeMap::new();
        let defaults = SubmitLimits::of(
            d,
            RuleLimits {
                max_queued: None,
                max_attempts: None,
                max_priority: None,
                rate: None,
                capability_rates: &none,
            },
            "submitter_rate",
        )?;
        let mut limits = vec![defaults.clone(); cfg.submitters.len()];
        for (i, r) in cfg.submitter_rules.iter().enumerate() {
            let own = RuleLimits {
                max_queued: r.max_queued,
                max_attempts: r.max_attempts,
                max_priority: r.max_priority,
                rate: r.rate,
                capability_rates: &r.capability_rates,
            };
            limits.push(SubmitLimits::of(d, own, &format!("submitter[{i}]"))?);
        }
        let rules = submitters
            .iter()
            .map(|(who, _)| who.clone())
            .zip(limits)
            .collect();
        let mut tokens = std::collections::HashMap::new();
        for (i, t) in cfg.http_tokens.iter().enumerate() {
            let own = RuleLimits {
                max_queued: t.max_queued,
                max_attempts: t.max_attempts,
                max_priority: t.max_priority,
                rate: t.rate,
                capability_rates: &t.capability_rates,
            };
            tokens.insert(
                t.name.clone(),
                SubmitLimits::of(d, own, &format!("http_token[{i}]"))?,
            );
        }
        Ok(Policy {
            submitters,
            agents: (!agents.is_empty()).then_some(agents),
            own_domain,
            limits: Limits {
                defaults,
                rules,
                tokens,
            },
            tokens: http_tokens(cfg.http_tokens)?,
        })
    }

    /// What a submitter (`http:<token name>`, or a bare JID) may ask of the queues: its rule's
    /// limits (the most generous when several rules name it), else the defaults.
    pub fn limits(&self, submitter: &str) -> SubmitLimits {
        let l = &self.limits;
        if let Some(name) = submitter.strip_prefix("http:") {
            return l
                .tokens
                .get(name)
                .cloned()
                .unwrap_or_else(|| l.defaults.clone());
        }
        let Ok(jid) = BareJid::new(submitter) else {
            return l.defaults.clone();
        };
        l.rules
            .iter()
            .filter(|(who, _)| who.matches(&jid))
            .map(|(_, lim)| lim.clone())
            .reduce(SubmitLimits::max)
            .unwrap_or_else(|| l.defaults.clone())
    }

    /// The HTTP tokens with their grants (`capabilities`, `all_jobs`).
    pub fn http_tokens(&self) -> &[(HttpToken, Grant)] {
        &self.tokens
    }

    /// What `jid` may do as a submitter over XMPP: the union of every rule that names it;
    /// `None` when none does.
    pub fn submitter(&self, jid: &BareJid) -> Option<Grant> {
        merge(
            self.submitters
                .iter()
                .filter(|(who, _)| who.matches(jid))
                .map(|(_, g)| g),
        )
    }

    /// The capabilities `jid` may offer as an agent: the union of every rule that names it;
    /// `None` when it may not be an agent at all.
    pub fn agent(&self, jid: &BareJid) -> Option<Capabilities> {
        match &self.agents {
            None => jid
                .domain()
                .as_str()
                .eq_ignore_ascii_case(&self.own_domain)
                .then(Capabilities::all),
            Some(rules) => {
                let grants: Vec<Grant> = rules
                    .iter()
                    .filter(|(who, _)| who.matches(jid))
                    .map(|(_, c)| Grant {
                        capabilities: c.clone(),
                        all_jobs: false,
                        events: false,
                    })
                    .collect();
                merge(grants.iter()).map(|g| g.capabilities)
            }
        }
    }
}

/// The HTTP tokens with their grants; errors name the key.
fn http_tokens(tokens: &[HttpToken]) -> Result<Vec<(HttpToken, Grant)>, DispatcherError> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            // A scraper's token (`metrics = true`) or a sender of events (`events = true`)
            // may run nothing.
            let capabilities = if (t.metrics || t.events) && t.capabilities.is_empty() {
                Capabilities::default()
            } else {
                Capabilities::parse(&t.capabilities, &format!("http_token[{i}].capabilities"))?
            };
            let operator = t.all_jobs && t.capabilities.iter().any(|c| c == "*");
            let grant = Grant {
                capabilities,
                all_jobs: t.all_jobs,
                events: t.events || operator,
            };
            Ok((t.clone(), grant))
        })
        .collect()
}

fn merge<'a>(grants: impl Iterator<Item = &'a Grant>) -> Option<Grant> {
    let mut out: Option<Grant> = None;
    for g in grants {
        let o = out.get_or_insert_with(Grant::default);
        o.capabilities.extend(&g.capabilities);
        o.all_jobs |= g.all_jobs;
        o.events |= g.events;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(s: &str) -> CapabilityName {
        s.parse().unwrap()
    }

    /// The rule keys of a configuration file, read as `config.rs` reads them.
    #[derive(serde::Deserialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct RuleKeys {
        submitters: Vec<String>,
        submitter: Vec<SubmitterRule>,
        agents: Vec<String>,
        agent: Vec<AgentRule>,
        http_token: Vec<HttpToken>,
    }

    fn build(toml: &str) -> Result<Policy, DispatcherError> {
        let k: RuleKeys = toml::from_str(toml).unwrap();
        Policy::new(&Rules {
            own_jid: "dispatcher@example.com/d1",
            submitters: &k.submitters,
            submitter_rules: &k.submitter,
            agents: &k.agents,
            agent_rules: &k.agent,
            http_tokens: &k.http_token,
            defaults: DefaultLimits {
                max_queue: 10_000,
                submitter_max_queued: QueueShare::Percent(50),
                submitter_max_attempts: 100,
                submitter_max_priority: 1000,
                submitter_rate: None,
            },
        })
    }

    fn policy(toml: &str) -> Policy {
        build(toml).unwrap()
    }

    #[test]
    fn patterns_match_names_prefixes_and_everything() {
        let c = Capabilities::parse(&["image.*".into(), "wordcount.map".into()], "k").unwrap();
        assert!(c.allows(&cap("image.thumbnail")));
        assert!(c.allows(&cap("image.batch.resize")));
        assert!(c.allows(&cap("wordcount.map")));
        assert!(!c.allows(&cap("wordcount.reduce")));
        // The prefix ends at a dot: "image.*" is not "imagemagick.run".
        assert!(!c.allows(&cap("imagemagick.run")));
        assert!(Capabilities::all().allows(&cap("any.thing")));
        assert!(Capabilities::parse(&[], "k").is_err());
        let e = Capabilities::parse(
            &["ok.x".into(), "bad name".into()],
            "submitter[0].capabilities",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("submitter[0].capabilities[1]"), "{e}");
    }

    #[test]
    fn submitters_get_the_union_of_their_rules() {
        let p = policy(
            "submitters = [\"ops@example.com\"]\n\
             [[submitter]]\njid = \"webapp@example.com\"\ncapabilities = [\"image.*\"]\n\
             [[submitter]]\njid = \"*@partners.example\"\ncapabilities = [\"wordcount.*\"]\n\
             [[submitter]]\njid = \"webapp@example.com\"\ncapabilities = [\"hash.sha256\"]\n\
             [[submitter]]\njid = \"admin@example.com\"\ncapabilities = [\"*\"]\nall_jobs = true\n",
        );
        let j = |s: &str| s.parse::<BareJid>().unwrap();
        let web = p.submitter(&j("webapp@example.com")).unwrap();
        assert!(web.capabilities.allows(&cap("image.thumbnail")));
        assert!(web.capabilities.allows(&cap("hash.sha256")));
        assert!(!web.capabilities.allows(&cap("wordcount.map")));
        assert!(!web.all_jobs);
        assert!(web.may_see("webapp@example.com", "webapp@example.com"));
        assert!(!web.may_see("webapp@example.com", "ops@example.com"));
        let partner = p.submitter(&j("anyone@partners.example")).unwrap();
        assert!(partner.capabilities.allows(&cap("wordcount.map")));
        assert!(!partner.capabilities.allows(&cap("image.thumbnail")));
        // The plain list grants every capability, own jobs only.
        let ops = p.submitter(&j("ops@example.com")).unwrap();
        assert!(ops.capabilities.allows(&cap("x.y")) && !ops.all_jobs);
        assert!(p.submitter(&j("admin@example.com")).unwrap().all_jobs);
        assert!(p.submitter(&j("stranger@example.com")).is_none());
    }

    #[test]
    fn agents_default_to_the_own_domain_and_rules_restrict_them() {
        let j = |s: &str| s.parse::<BareJid>().unwrap();
        let open = policy("");
        assert!(open.agent(&j("agent1@example.com")).is_some());
        assert!(open.agent(&j("agent1@elsewhere.example")).is_none());
        let p = policy(
            "agents = [\"trusted@example.com\"]\n\
             [[agent]]\njid = \"*@gpu.example.com\"\ncapabilities = [\"image.*\"]\n",
        );
        assert!(p
            .agent(&j("trusted@example.com"))
            .unwrap()
            .allows(&cap("x.y")));
        let gpu = p.agent(&j("w1@gpu.example.com")).unwrap();
        assert!(gpu.allows(&cap("image.thumbnail")) && !gpu.allows(&cap("exec.run")));
        // With rules, the own domain is no longer implied.
        assert!(p.agent(&j("agent1@example.com")).is_none());
    }

    #[test]
    fn bad_rules_name_the_key() {
        for (toml, key) in [
            (
                "[[submitter]]\njid = \"nobody\"\ncapabilities = [\"*\"]\n",
                "submitter[0].jid",
            ),
            (
                "[[submitter]]\njid = \"a@b.c\"\ncapabilities = []\n",
                "submitter[0].capabilities",
            ),
            (
                "[[agent]]\njid = \"*@\"\ncapabilities = [\"*\"]\n",
                "agent[0].jid",
            ),
            (
                "[[agent]]\njid = \"a@b.c\"\ncapabilities = [\"x..y\"]\n",
                "agent[0].capabilities[0]",
            ),
            (
                "[[http_token]]\nname = \"t\"\ntoken = \"0123456789abcdef\"\ncapabilities = [\"*x\"]\n",
                "http_token[0].capabilities[0]",
            ),
        ] {
            let e = build(toml).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
