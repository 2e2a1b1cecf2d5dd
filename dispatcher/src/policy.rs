//! The authorization policy (docs/security.md): which XMPP submitters may run which
//! capabilities and see which jobs, and which accounts may offer which capabilities as agents.
//! HTTP tokens carry the same grant ([`crate::config::HttpToken`]). Pure logic, no I/O.
//!
//! Everything not granted is refused: a JID that matches no rule may not submit, and an
//! account that matches no agent rule is not registered.

use jid::BareJid;
use spine_protocol::CapabilityName;

use crate::config::DispatcherConfig;
use crate::error::DispatcherError;

/// Capability patterns: exact names, `prefix.*` (everything under the prefix) or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities(Vec<String>);

impl Capabilities {
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
}

impl Grant {
    /// Whether a caller known as `me` (a bare JID, or `http:<token>`) may read or cancel a
    /// job whose submitter is `submitter`.
    pub fn may_see(&self, me: &str, submitter: &str) -> bool {
        self.all_jobs || me == submitter
    }
}

/// The whole policy, built from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    submitters: Vec<(Accounts, Grant)>,
    /// `None`: no agent rules, every account of `own_domain` may offer everything.
    agents: Option<Vec<(Accounts, Capabilities)>>,
    own_domain: String,
}

impl Policy {
    /// The policy of a (validated or not) configuration; errors name the key.
    pub fn from_config(cfg: &DispatcherConfig) -> Result<Self, DispatcherError> {
        let mut submitters = Vec::new();
        for (i, s) in cfg.submitters.iter().enumerate() {
            let who = Accounts::parse(s, &format!("submitters[{i}]"))?;
            submitters.push((
                who,
                Grant {
                    capabilities: Capabilities::all(),
                    all_jobs: false,
                },
            ));
        }
        for (i, r) in cfg.submitter_rules.iter().enumerate() {
            let who = Accounts::parse(&r.jid, &format!("submitter[{i}].jid"))?;
            let caps =
                Capabilities::parse(&r.capabilities, &format!("submitter[{i}].capabilities"))?;
            submitters.push((
                who,
                Grant {
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
        let own_domain = jid::Jid::new(&cfg.jid)
            .map(|j| j.domain().as_str().to_owned())
            .map_err(|e| DispatcherError::Config(format!("jid: {e}")))?;
        Ok(Policy {
            submitters,
            agents: (!agents.is_empty()).then_some(agents),
            own_domain,
        })
    }

    /// The HTTP tokens with their grants (`capabilities`, `all_jobs`); errors name the key.
    pub fn http_tokens(
        cfg: &DispatcherConfig,
    ) -> Result<Vec<(crate::config::HttpToken, Grant)>, DispatcherError> {
        cfg.http_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let capabilities =
                    Capabilities::parse(&t.capabilities, &format!("http_token[{i}].capabilities"))?;
                let grant = Grant {
                    capabilities,
                    all_jobs: t.all_jobs,
                };
                Ok((t.clone(), grant))
            })
            .collect()
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
                    })
                    .collect();
                merge(grants.iter()).map(|g| g.capabilities)
            }
        }
    }
}

fn merge<'a>(grants: impl Iterator<Item = &'a Grant>) -> Option<Grant> {
    let mut out: Option<Grant> = None;
    for g in grants {
        let o = out.get_or_insert_with(Grant::default);
        o.capabilities.extend(&g.capabilities);
        o.all_jobs |= g.all_jobs;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(s: &str) -> CapabilityName {
        s.parse().unwrap()
    }

    fn policy(toml: &str) -> Policy {
        let cfg = DispatcherConfig::from_toml(&format!(
            "jid = \"dispatcher@example.com/d1\"\npassword = \"x\"\n{toml}"
        ))
        .unwrap();
        Policy::from_config(&cfg).unwrap()
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
        ] {
            let e = DispatcherConfig::from_toml(&format!(
                "jid = \"d@example.com/d\"\npassword = \"x\"\n{toml}"
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }
}
