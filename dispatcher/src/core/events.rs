//! Events into jobs (docs/events.md): an event from outside ([`Core::event`], answered after
//! the commit that stores its jobs) or a job's end ([`Core::fire_outcomes`], its jobs stored
//! in the commit that stores the end) fires the rules it matches ([`crate::triggers`]). Each
//! rule's job has the event's key and the rule as submitter, so an event sent twice, or an
//! outcome handled again after a restart, makes no second job.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jid::BareJid;
use serde::Serialize;
use spine_protocol::events::{EventSlot, RequestEventSlot};
use spine_protocol::{Condition, DataRef, JobId, JobState, SpineError};
use tracing::{debug, info, warn};

use super::{Core, Now};
use crate::blobs::Stored;
use crate::jobs::JobRecord;
use crate::policy::Capabilities;
use crate::triggers::{Event, EventData, JOB_SOURCE};

/// The job name in an event slot's upload URL (`/v1/uploads/events?attempt=0&…`): attempts
/// count from 1, so attempt 0 of this name is no job's.
pub(crate) const EVENT_UPLOADS: &str = "events";

/// How long an event slot is kept for the event that names its bytes.
const EVENT_SLOT_TTL: Duration = Duration::from_secs(600);

/// At most this many event slots are held at once (every agent's together): an agent that
/// asks for slots and never sends the events cannot grow the dispatcher's memory.
const MAX_EVENT_SLOTS: usize = 10_000;

/// Event slots granted, by agent and SHA-256.
pub(super) type EventSlots = HashMap<(BareJid, [u8; 32]), EventSlotGrant>;

/// An event slot granted to an agent: the bytes it said it will put, whether it did, and
/// until when the grant is kept.
#[derive(Debug)]
pub(super) struct EventSlotGrant {
    want: Stored,
    filled: bool,
    until: std::time::Instant,
}

/// A job a rule made of an event (or found made by the same event before).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fired {
    /// The rule.
    pub rule: String,
    /// Its job.
    pub id: JobId,
    /// The job's state.
    pub state: JobState,
}

/// A rule's counters since the dispatcher started, for `/metrics` and `GET /v1/rules`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RuleCounts {
    /// Events that matched it.
    pub matched: u64,
    /// Jobs it made.
    pub jobs: u64,
    /// Events it had made a job of already (sent again).
    pub duplicates: u64,
    /// Events it could not make a job of (a field the template names was missing, the
    /// queue was full, …).
    pub errors: u64,
    /// Its jobs that ended without success (failed, timed out, cancelled): dead letters.
    pub dead_letters: u64,
}

impl Core {
    /// An event from outside: the jobs of every rule it matches, accepted (or, sent again, the
    /// ones it made before). One rule's refusal refuses the event (so its sender tries again;
    /// the rules that did make their job find it then).
    pub(crate) fn event(&mut self, ev: &Event, now: Now) -> Result<Vec<Fired>, SpineError> {
        let mut fired = Vec::new();
        let mut new_jobs = 0;
        let rules: Vec<_> = self.triggers.matching(ev).cloned().collect();
        for rule in &rules {
            let counts = self.rule_counts.entry(rule.name.clone()).or_default();
            counts.matched += 1;
            let spec = rule
                .job(ev, now.ms, |s| self.blob_store.find(s))
                .map_err(|e| {
                    counts.errors += 1;
                    SpineError::new(Condition::BadArguments).with_text(e.to_string())
                })?;
            let key = (spec.submitter.clone(), ev.key());
            let before = self.idempotency.contains_key(&key);
            match self.accept(spec, true, &Capabilities::all(), now) {
                Ok((id, state)) => {
                    let counts = self.rule_counts.entry(rule.name.clone()).or_default();
                    if before {
                        counts.duplicates += 1;
                    } else {
                        counts.jobs += 1;
                        new_jobs += 1;
                        info!(rule = %rule.name, event = %ev.id, source = %ev.source, job = %id, "rule fired");
                        let data = serde_json::json!({
                            "rule": rule.name,
                            "job": id,
                            "event": {
                                "id": ev.id, "source": ev.source, "type": ev.ty,
                                "subject": ev.subject,
                            },
                        });
                        if !self.subscriptions.is_empty() {
                            self.notify(&fired_event(&rule.name, &id, data.clone(), now));
                        }
                        self.publish(&id, super::EventKind::Fired, super::Rendered::of(&data));
                    }
                    fired.push(Fired {
                        rule: rule.name.clone(),
                        id,
                        state,
                    });
                }
                Err(e) => {
                    self.rule_counts
                        .entry(rule.name.clone())
                        .or_default()
                        .errors += 1;
                    let text = format!("rule '{}': {}", rule.name, e.text.as_deref().unwrap_or(""));
                    return Err(SpineError {
                        text: Some(text),
                        ..e
                    });
                }
            }
        }
        // An event sent again that every rule had made its job of tells no one again.
        if rules.is_empty() || new_jobs > 0 {
            self.notify(ev);
        }
        Ok(fired)
    }

    /// Tells every subscription that takes `ev` (`[[subscription]]`), by message.
    fn notify(&mut self, ev: &Event) {
        if self.subscriptions.is_empty() {
            return;
        }
        let to: Vec<(String, jid::Jid)> = self
            .subscriptions
            .matching(ev)
            .map(|s| (s.name.clone(), s.jid.clone()))
            .collect();
        for (name, jid) in to {
            debug!(subscription = %name, event = %ev.id, ty = %ev.ty, "telling a subscriber");
            *self.notified.entry(name).or_default() += 1;
            self.send(crate::subscriptions::message(jid, ev));
        }
    }

    /// `<event/>` from an XMPP submitter allowed to send events: answered with `<fired/>`
    /// after the commit that stores the jobs, or with the error that refused it.
    pub(super) fn on_event(
        &mut self,
        from: jid::Jid,
        id: String,
        e: spine_protocol::events::Event,
        now: Now,
    ) {
        use spine_protocol::events::{EventData as Wire, Fired as WireFired, FiredJob};
        let time_ms = match e.time.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
            None => None,
            Some(Ok(t)) => Some(u64::try_from(t.timestamp_millis()).unwrap_or(0)),
            Some(Err(err)) => {
                let bad = SpineError::new(Condition::BadArguments)
                    .with_text(format!("time: not an RFC 3339 time ({err})"))
                    .with_field("time");
                return self.reply_error(from, id, bad);
            }
        };
        let (mime, data) = match e.data {
            Wire::None => (None, EventData::None),
            Wire::Json(v) => (Some("application/json".to_owned()), EventData::Json(v)),
            Wire::Bytes { mime, bytes } => (mime, EventData::Bytes(bytes)),
            Wire::Ref(r) => match self.event_slot_bytes(&from.to_bare(), &r) {
                Ok(stored) => (r.mime, EventData::Stored(stored)),
                Err(why) => {
                    let bad = SpineError::new(Condition::BadArguments)
                        .with_text(format!("data: {why}"))
                        .with_field("data");
                    return self.reply_error(from, id, bad);
                }
            },
        };
        let ev = Event {
            id: e.id,
            source: e.source,
            ty: e.ty,
            subject: e.subject,
            time_ms,
            mime,
            data,
            depth: 0,
        };
        match self.event(&ev, now) {
            Ok(fired) => {
                let answer = WireFired {
                    event: ev.id,
                    jobs: fired
                        .into_iter()
                        .map(|f| FiredJob {
                            rule: f.rule,
                            job: f.id,
                            state: f.state,
                        })
                        .collect(),
                };
                let iq = xmpp_parsers::iq::Iq::from_result(id, Some(answer)).with_to(from);
                self.send(iq);
            }
            Err(err) => self.reply_error(from, id, err),
        }
    }

    /// Whether an event from `from` may come in as an agent's (PROTOCOL.md §11.9.1): `from` is
    /// a registered agent and the event's source is under `/agents/<its bare JID>/`.
    pub(super) fn agent_event(&self, from: &jid::Jid, e: &spine_protocol::events::Event) -> bool {
        self.is_registered(from) && e.source.starts_with(&agent_source_prefix(&from.to_bare()))
    }

    /// `<request-event-slot/>` from a registered agent: a signed URL to put the bytes an event
    /// of its will name.
    pub(super) fn on_request_event_slot(
        &mut self,
        from: jid::Jid,
        id: String,
        r: RequestEventSlot,
        now: Now,
    ) {
        if !self.is_registered(&from) {
            let e = SpineError::new(Condition::NotAuthorized)
                .with_text("only registered agents ask for event slots");
            return self.reply_error(from, id, e);
        }
        let max = self.cfg.max_input.as_u64();
        if r.size > max {
            let mut e = SpineError::new(Condition::TooLarge).with_text(format!(
                "event data of {} bytes is over this dispatcher's limit of {max} (max_input)",
                r.size
            ));
            e.max = Some(max);
            return self.reply_error(from, id, e);
        }
        let agent = from.to_bare();
        self.event_slots.retain(|_, g| g.until > now.mono);
        if self.event_slots.len() >= MAX_EVENT_SLOTS {
            let e = SpineError::new(Condition::Busy).with_text(format!(
                "{MAX_EVENT_SLOTS} event slots are open: send the event again in a moment"
            ));
            return self.reply_error(from, id, e);
        }
        let want = Stored {
            sha256: r.sha256,
            size: r.size,
        };
        let Some((put, expires_ms)) = self.event_slot_url(&agent, &want, now) else {
            let e = SpineError::new(Condition::Malformed).with_text(
                "this dispatcher offers no upload slots (no public_url for its HTTP API): \
                 send events whose data fits inline",
            );
            return self.reply_error(from, id, e);
        };
        self.event_slots.insert(
            (agent, r.sha256),
            EventSlotGrant {
                want,
                filled: false,
                until: now.mono + EVENT_SLOT_TTL,
            },
        );
        self.send(
            xmpp_parsers::iq::Iq::from_result(id, Some(EventSlot { put, expires_ms }))
                .with_to(from),
        );
    }

    /// The HTTP side stored the bytes of an event slot of `agent`.
    pub(super) fn event_slot_filled(&mut self, agent: &str, got: Stored) -> Result<(), SpineError> {
        let key = agent.parse::<BareJid>().ok().map(|a| (a, got.sha256));
        match key.and_then(|k| self.event_slots.get_mut(&k)) {
            Some(g) if g.want == got => {
                g.filled = true;
                Ok(())
            }
            _ => Err(SpineError::new(Condition::UnknownJob).with_text(format!(
                "no event slot for these bytes of {agent} (it expired, or was never granted)"
            ))),
        }
    }

    /// The stored bytes an agent's event names by reference: put by that agent to an event
    /// slot, and still in the blob store.
    fn event_slot_bytes(&mut self, agent: &BareJid, r: &DataRef) -> Result<Stored, String> {
        let got = Stored {
            sha256: r.sha256,
            size: r.size,
        };
        match self.event_slots.get(&(agent.clone(), r.sha256)) {
            Some(g) if g.filled && g.want == got && self.blob_store.contains(&got) => {
                debug!(agent = %agent, sha256 = %got.hex(), "event data by reference");
                Ok(got)
            }
            Some(g) if !g.filled => {
                Err("the bytes were not put to their event slot before the event".into())
            }
            Some(_) => Err("the size or hash differs from what was put to the event slot".into()),
            None => Err(
                "no event slot was granted to this agent for these bytes (or it expired): ask \
                 with <request-event-slot/> and put them first"
                    .into(),
            ),
        }
    }

    /// Queues the event of a job's end, for the rules (called once per job that ends), and
    /// counts a rule's job that ended without success.
    pub(super) fn outcome_event(&mut self, job: &JobId) {
        let Some(rec) = self.jobs.get(job).filter(|r| r.state.is_final()) else {
            return;
        };
        // Steps of a map/reduce or `all` job are the parent's business; a rule sees the parent.
        if rec.spec.parent.is_some() {
            return;
        }
        if let Some(e) = &rec.spec.event {
            if rec.state != JobState::Succeeded {
                self.rule_counts
                    .entry(e.rule.clone())
                    .or_default()
                    .dead_letters += 1;
                warn!(job = %rec.id, rule = %e.rule, event = %e.id, state = %rec.state, "a rule's job ended without success: a dead letter");
            }
        }
        if self.triggers.is_empty() && self.subscriptions.is_empty() {
            return;
        }
        let depth = rec.spec.event.as_ref().map_or(0, |e| e.depth + 1);
        let ev = outcome(rec, depth);
        self.outcomes.push(ev);
    }

    /// Fires the rules for the jobs that ended in this step; their jobs are stored in the
    /// same commit as the ends. A job a rule cannot make is logged and counted (no one waits
    /// on the other end to try again).
    pub(super) fn fire_outcomes(&mut self, now: Now) {
        // A rule's job may end at once (refused by every agent): its event comes next turn.
        let events = std::mem::take(&mut self.outcomes);
        for ev in events {
            if ev.depth > crate::triggers::MAX_CHAIN
                && self.triggers.all().iter().any(|r| r.matches(&ev))
            {
                warn!(job = %ev.id, depth = ev.depth, "a job's end fires no rule: {} rules led to it already", crate::triggers::MAX_CHAIN);
                continue;
            }
            if let Err(e) = self.event(&ev, now) {
                warn!(job = %ev.id, "a job's end did not become a rule's job: {e}");
            }
        }
    }

    /// Every rule with its counters, for `GET /v1/rules`.
    pub(crate) fn rules_view(&self) -> Vec<(crate::triggers::RuleConfig, RuleCounts, bool)> {
        self.triggers
            .all()
            .iter()
            .map(|r| {
                let c = self.rule_counts.get(&r.name).copied().unwrap_or_default();
                let api = !self.cfg.rules.iter().any(|k| k.name == r.name);
                (r.config.clone(), c, api)
            })
            .collect()
    }

    /// The rules made over the API that the store held, after the configured ones; one whose
    /// name the configuration uses now is left out (the file wins), with a warning.
    pub(super) fn load_api_rules(&mut self, rules: Vec<crate::triggers::RuleConfig>) {
        for c in rules {
            if self.cfg.rules.iter().any(|k| k.name == c.name) {
                warn!(rule = %c.name, "a rule made over the API has the name of a configured rule: the configured one holds (delete the other with DELETE /v1/rules/{})", c.name);
                continue;
            }
            match crate::triggers::Rule::new(0, &c) {
                Ok(r) => {
                    self.triggers.put(r);
                }
                Err(e) => warn!(rule = %c.name, "a stored rule no longer loads: {e}"),
            }
        }
    }

    /// `PUT /v1/rules/{name}`: makes or replaces a rule (not one of the configuration),
    /// stored in the commit before the answer.
    pub(super) fn put_rule(
        &mut self,
        c: crate::triggers::RuleConfig,
    ) -> Result<bool, super::api::RuleChangeError> {
        use super::api::RuleChangeError as E;
        if !self.leads {
            return Err(E::Standby);
        }
        if self.cfg.rules.iter().any(|k| k.name == c.name) {
            return Err(E::Configured(c.name));
        }
        let rule = crate::triggers::Rule::new(0, &c).map_err(|e| {
            // `rule[0].on.type: …` names a field of the body: the body is one rule.
            E::Invalid(e.strip_prefix("rule[0].").unwrap_or(&e).to_owned())
        })?;
        let new = self.triggers.put(rule);
        info!(rule = %c.name, new, "rule made over the API");
        self.ready.rules.push((c.name.clone(), Some(c)));
        Ok(new)
    }

    /// `DELETE /v1/rules/{name}`: deletes a rule made over the API; its counters and its
    /// jobs stay.
    pub(super) fn delete_rule(&mut self, name: &str) -> Result<(), super::api::RuleChangeError> {
        use super::api::RuleChangeError as E;
        if !self.leads {
            return Err(E::Standby);
        }
        if self.cfg.rules.iter().any(|k| k.name == name) {
            return Err(E::Configured(name.to_owned()));
        }
        if !self.triggers.remove(name) {
            return Err(E::Unknown(name.to_owned()));
        }
        info!(rule = %name, "rule deleted over the API");
        self.ready.rules.push((name.to_owned(), None));
        Ok(())
    }

    /// The rules' counters as `/metrics` lines (and the subscriptions' messages).
    pub(super) fn rule_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        if !self.subscriptions.is_empty() {
            let name = "spine_subscription_messages_total";
            let _ = writeln!(
                out,
                "# HELP {name} Events told to the subscription's account.\n# TYPE {name} counter"
            );
            for s in self.subscriptions.all() {
                let n = self.notified.get(&s.name).copied().unwrap_or(0);
                let _ = writeln!(out, "{name}{{subscription=\"{}\"}} {n}", s.name);
            }
        }
        if self.triggers.is_empty() {
            return;
        }
        let counts: BTreeMap<&str, RuleCounts> = self
            .triggers
            .all()
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    self.rule_counts.get(&r.name).copied().unwrap_or_default(),
                )
            })
            .collect();
        type Family = (&'static str, &'static str, fn(&RuleCounts) -> u64);
        let families: [Family; 5] = [
            (
                "spine_rule_events_total",
                "Events that matched the rule.",
                |c| c.matched,
            ),
            ("spine_rule_jobs_total", "Jobs the rule made.", |c| c.jobs),
            (
                "spine_rule_duplicates_total",
                "Events sent again that the rule had made a job of already.",
                |c| c.duplicates,
            ),
            (
                "spine_rule_errors_total",
                "Events the rule could not make a job of.",
                |c| c.errors,
            ),
            (
                "spine_rule_dead_letters_total",
                "The rule's jobs that ended without success.",
                |c| c.dead_letters,
            ),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (rule, c) in &counts {
                let _ = writeln!(out, "{name}{{rule=\"{rule}\"}} {}", get(c));
            }
        }
    }
}

/// A rule's firing as an event (`spine.rule.fired`), as the event stream shows it.
fn fired_event(rule: &str, job: &JobId, data: serde_json::Value, now: Now) -> Event {
    Event {
        id: format!("{rule}/{job}"),
        source: format!("/spine/rules/{rule}"),
        ty: "spine.rule.fired".into(),
        subject: Some(rule.to_owned()),
        time_ms: Some(now.ms),
        mime: Some("application/json".into()),
        data: EventData::Json(data),
        depth: 0,
    }
}

/// The start every source of `agent`'s events has: `/agents/<bare JID>/`.
pub(crate) fn agent_source_prefix(agent: &BareJid) -> String {
    format!("/agents/{agent}/")
}

/// The event of `rec`'s end: `spine.job.<state>`, the capability as subject, the job as the
/// HTTP API shows it as data.
fn outcome(rec: &JobRecord, depth: u32) -> Event {
    Event {
        id: rec.id.to_string(),
        source: JOB_SOURCE.into(),
        ty: format!("spine.job.{}", rec.state),
        subject: Some(rec.spec.capability.to_string()),
        time_ms: Some(rec.updated_ms),
        mime: Some("application/json".into()),
        data: EventData::Json(super::views::job_json(rec)),
        depth,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use spine_protocol::{Condition, SpineError};

    use super::super::tests::{jobs_sent, spec, World, CAP};
    use super::super::{ApiReply, ApiRequest, Restored};
    use super::*;
    use crate::config::DispatcherConfig;

    fn world(rules: &str) -> World {
        let cfg = DispatcherConfig {
            submitters: vec!["webapp@localhost".into()],
            ..DispatcherConfig::from_toml(rules).expect("rules")
        };
        World::with(cfg, Restored::default())
    }

    fn post(w: &mut World, ev: Event) -> Result<Vec<Fired>, SpineError> {
        w.core.api(
            99,
            ApiRequest::Event {
                event: Box::new(ev),
            },
            w.now,
        );
        let replies = std::mem::take(&mut w.core.ready.replies);
        match replies.into_iter().last() {
            Some((99, ApiReply::Event(r))) => r,
            other => panic!("not an event's answer: {other:?}"),
        }
    }

    fn note(id: &str, text: &str) -> Event {
        Event {
            id: id.into(),
            source: "/notes".into(),
            ty: "com.example.note.created".into(),
            subject: None,
            time_ms: None,
            mime: Some("application/json".into()),
            data: EventData::Json(json!({ "text": text, "lang": "en" })),
            depth: 0,
        }
    }

    const RULES: &str = r#"
        [[rule]]
        name = "upper"
        on = { type = "com.example.note.*" }
        when = "data.lang = en"
        do = { capability = "c.work", args = { lang = "{{data.lang}}" }, input = "{{data.text}}" }
        retry = { attempts = 1 }

        [[rule]]
        name = "other"
        on = { type = "com.example.other" }
        do = { capability = "c.work" }

        [[rule]]
        name = "after-upper"
        on = { type = "spine.job.succeeded", source = "/spine/jobs", subject = "c.work" }
        when = "data.submitter = rule:upper"
        do = { capability = "c.work", args = { of = "{{data.id}}" } }
    "#;

    #[test]
    fn an_event_makes_the_job_of_each_rule_it_matches_once() {
        let mut w = world(RULES);
        w.agent(1, 4);
        w.ready();
        let fired = post(&mut w, note("n-1", "hello")).unwrap();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].rule, "upper");
        let id = fired[0].id.clone();
        let rec = w.core.record(&id).expect("stored").clone();
        assert_eq!(rec.spec.submitter, "rule:upper");
        assert_eq!(rec.spec.args["lang"], json!("en"));
        assert_eq!(rec.spec.input, crate::jobs::Body::Inline(b"hello".to_vec()));
        assert_eq!(rec.spec.event.as_ref().unwrap().id, "n-1");
        let r = w.ready();
        assert!(r.replies.is_empty(), "the answer was taken above");
        assert_eq!(jobs_sent(&r.stanzas).len(), 1);
        // The same event again: the same job, nothing new.
        let again = post(&mut w, note("n-1", "hello")).unwrap();
        assert_eq!(again[0].id, id);
        assert!(jobs_sent(&w.ready().stanzas).is_empty());
        // Another id of the same source is another event.
        let other = post(&mut w, note("n-2", "x")).unwrap();
        assert_ne!(other[0].id, id);
        // An event no rule takes makes nothing, and is answered.
        let mut french = note("n-3", "bonjour");
        french.data = EventData::Json(json!({ "text": "bonjour", "lang": "fr" }));
        assert_eq!(post(&mut w, french).unwrap(), vec![]);
        let m = w.core.metrics();
        for line in [
            "spine_rule_events_total{rule=\"upper\"} 3",
            "spine_rule_jobs_total{rule=\"upper\"} 2",
            "spine_rule_duplicates_total{rule=\"upper\"} 1",
            "spine_rule_jobs_total{rule=\"other\"} 0",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
        }
    }

    #[test]
    fn a_rule_that_cannot_make_its_job_refuses_the_event_naming_the_field() {
        let mut w = world(RULES);
        w.agent(1, 4);
        let mut ev = note("n-1", "x");
        ev.data = EventData::Json(json!({ "lang": "en" }));
        let e = post(&mut w, ev).unwrap_err();
        assert_eq!(e.condition, Condition::BadArguments);
        assert_eq!(
            e.text.as_deref(),
            Some("rule 'upper': do.input: the event has no data.text")
        );
        assert_eq!(w.core.rules_view()[0].1.errors, 1);
    }

    #[test]
    fn a_jobs_end_fires_rules_in_the_same_commit_and_failures_are_dead_letters() {
        let mut w = world(RULES);
        let a = w.agent(1, 4);
        w.ready();
        let first = post(&mut w, note("n-1", "hello")).unwrap()[0].id.clone();
        let sent = jobs_sent(&w.ready().stanzas);
        w.succeed(&sent[0], &a);
        // The next job is made in the step that ended the first: stored with its end.
        let r = w.ready();
        let next = jobs_sent(&r.stanzas);
        assert_eq!(next.len(), 1, "the rule on the first job's success");
        let rec = w.core.record(&next[0].job.id).unwrap().clone();
        assert_eq!(rec.spec.submitter, "rule:after-upper");
        assert_eq!(rec.spec.args["of"], json!(first.to_string()));
        let ev = rec.spec.event.as_ref().unwrap();
        assert_eq!((ev.id.as_str(), ev.depth), (first.as_str(), 1));
        // Its own success is a rule's job's success, but not rule:upper's: nothing more.
        w.succeed(&next[0], &a);
        assert!(jobs_sent(&w.ready().stanzas).is_empty());
        // A rule's job that fails is a dead letter.
        post(&mut w, note("n-2", "x")).unwrap();
        let sent = jobs_sent(&w.ready().stanzas);
        w.refuse(
            &sent[0],
            SpineError::new(Condition::BadArguments).with_text("no"),
        );
        w.ready();
        assert_eq!(w.state(&sent[0].job.id), JobState::Failed);
        let upper = w.core.rules_view()[0].1;
        assert_eq!((upper.jobs, upper.dead_letters), (2, 1));
    }

    #[test]
    fn an_event_older_than_its_rules_max_age_is_a_dead_letter_that_never_runs() {
        let mut w = world(RULES);
        w.agent(1, 4);
        w.ready();
        let mut old = note("n-old", "late");
        // Seven hours before now: past the default max_age of six.
        old.time_ms = Some(w.now.ms - 7 * 3_600_000);
        let fired = post(&mut w, old).unwrap();
        assert_eq!(fired[0].state, JobState::TimedOut);
        assert!(jobs_sent(&w.ready().stanzas).is_empty(), "nothing sent");
        assert_eq!(w.core.rules_view()[0].1.dead_letters, 1);
    }

    #[test]
    fn a_rule_that_matches_its_own_jobs_ends_after_the_chain_bound() {
        let mut w = world(
            r#"[[rule]]
            name = "again"
            on = { type = "spine.job.succeeded" }
            do = { capability = "c.work" }"#,
        );
        let a = w.agent(1, 4);
        w.ready();
        w.submit(spec(CAP)).unwrap();
        let mut made = 0;
        let mut sent = jobs_sent(&w.ready().stanzas);
        while let Some(s) = sent.pop() {
            w.succeed(&s, &a);
            sent = jobs_sent(&w.ready().stanzas);
            made += sent.len();
            assert!(made < 100, "the chain does not end");
        }
        assert_eq!(made as u32, crate::triggers::MAX_CHAIN + 1);
    }

    /// The answer to IQ `id` among the stanzas: its payload, or its error.
    fn answer(stanzas: &[tokio_xmpp::Stanza], id: &str) -> Result<minidom::Element, SpineError> {
        use xmpp_parsers::iq::Iq;
        for s in stanzas {
            match s {
                tokio_xmpp::Stanza::Iq(Iq::Result {
                    id: i,
                    payload: Some(p),
                    ..
                }) if i == id => return Ok(p.clone()),
                tokio_xmpp::Stanza::Iq(Iq::Error { id: i, error, .. }) if i == id => {
                    return Err(SpineError::from_stanza_error(error).unwrap().unwrap())
                }
                _ => {}
            }
        }
        panic!("no answer to {id}");
    }

    #[test]
    fn an_agents_file_goes_to_an_event_slot_and_the_rules_job_takes_it_by_reference() {
        use spine_protocol::events::{
            Event as WireEvent, EventData as Wire, EventSlot, Fired as WireFired, RequestEventSlot,
        };
        use xmpp_parsers::iq::Iq;
        let mut w = world(
            r#"
            [[rule]]
            name = "thumbs"
            on = { type = "spine.file.created", source = "/agents/*" }
            when = "data.size > 2"
            do = { capability = "c.work", args = { name = "{{subject}}" }, input = "{{data}}" }
            "#,
        );
        w.core.set_data_plane(super::super::data::DataPlane {
            base: "http://127.0.0.1:8080".into(),
            key: std::sync::Arc::new(crate::signing::UrlKey::from_bytes([3; 32])),
            ttl: std::time::Duration::from_secs(300),
        });
        let a = w.agent(1, 4);
        w.ready();
        let bytes = b"a photo".to_vec();
        let blob = w.core.blob_store.put(&bytes).unwrap();
        let from = jid::Jid::from(a.clone());
        let ask = |w: &mut World, id: &str| {
            let r = RequestEventSlot {
                size: blob.size,
                sha256: blob.sha256,
                mime: Some("image/jpeg".into()),
            };
            w.core
                .stanza(Iq::from_get(id, r).with_from(from.clone()).into(), w.now);
            answer(&w.ready().stanzas, id)
        };
        let slot = EventSlot::try_from(ask(&mut w, "s1").unwrap()).unwrap();
        assert!(
            slot.put.starts_with(&format!(
                "http://127.0.0.1:8080/v1/uploads/events?attempt=0&agent=agent1%40localhost&size=7&sha256={}",
                blob.hex()
            )),
            "{}",
            slot.put
        );
        let event = |id: &str, source: &str| WireEvent {
            id: id.into(),
            source: source.into(),
            ty: "spine.file.created".into(),
            subject: Some("cat.jpg".into()),
            time: None,
            data: Wire::Ref(DataRef {
                size: blob.size,
                sha256: blob.sha256,
                mime: Some("image/jpeg".into()),
                sources: Vec::new(),
            }),
        };
        let send = |w: &mut World, iq: &str, e: WireEvent| {
            w.core
                .stanza(Iq::from_set(iq, e).with_from(from.clone()).into(), w.now);
            answer(&w.ready().stanzas, iq)
        };
        // Named before the bytes were put: refused, naming data.
        let e = send(&mut w, "e0", event("f1", "/agents/agent1@localhost/up")).unwrap_err();
        assert_eq!(e.condition, Condition::BadArguments);
        assert!(e.text.unwrap().contains("not put to their event slot"));
        // The HTTP side stored them.
        let filled =
            w.core
                .slot_filled(&EVENT_UPLOADS.parse().unwrap(), 0, "agent1@localhost", blob);
        assert_eq!(filled, Ok(()));
        // Another agent's source: not this agent's to send (and it is no submitter).
        let e = send(&mut w, "e1", event("f1", "/agents/agent2@localhost/up")).unwrap_err();
        assert_eq!(e.condition, Condition::NotAuthorized);
        let fired = WireFired::try_from(
            send(&mut w, "e2", event("f1", "/agents/agent1@localhost/up")).unwrap(),
        )
        .unwrap();
        assert_eq!(fired.jobs.len(), 1);
        let rec = w.core.record(&fired.jobs[0].job).unwrap().clone();
        assert_eq!(rec.spec.input, crate::jobs::Body::Stored(blob));
        assert_eq!(rec.spec.input_mime.as_deref(), Some("image/jpeg"));
        assert_eq!(rec.spec.args["name"], serde_json::json!("cat.jpg"));
        // Sent again (the agent restarted): the same job.
        let again = WireFired::try_from(
            send(&mut w, "e3", event("f1", "/agents/agent1@localhost/up")).unwrap(),
        )
        .unwrap();
        assert_eq!(again.jobs[0].job, fired.jobs[0].job);
        // Bytes never put to a slot of this agent are refused.
        let other = w.core.blob_store.put(b"someone else's").unwrap();
        let mut e = event("f2", "/agents/agent1@localhost/up");
        e.data = Wire::Ref(DataRef {
            size: other.size,
            sha256: other.sha256,
            mime: None,
            sources: Vec::new(),
        });
        let err = send(&mut w, "e4", e).unwrap_err();
        assert!(err.text.unwrap().contains("no event slot"), "refused");
        // Over max_input: too large, naming the limit.
        let r = RequestEventSlot {
            size: u64::MAX,
            sha256: [1; 32],
            mime: None,
        };
        w.core
            .stanza(Iq::from_get("s2", r).with_from(from.clone()).into(), w.now);
        let e = answer(&w.ready().stanzas, "s2").unwrap_err();
        assert_eq!(e.condition, Condition::TooLarge);
    }

    #[test]
    fn subscribers_hear_of_new_events_rule_firings_and_job_ends_once() {
        let mut w = world(&format!(
            "{RULES}\n{}",
            r#"
            [[subscription]]
            name = "notes"
            jid = "office@localhost"
            on = { type = "com.example.note.*" }

            [[subscription]]
            name = "ends"
            jid = "ops@localhost/console"
            on = { type = "spine.*" }
            when = "subject != other"
            "#
        ));
        let a = w.agent(1, 4);
        w.ready();
        let told = |stanzas: &[tokio_xmpp::Stanza]| -> Vec<(String, String)> {
            stanzas
                .iter()
                .filter_map(|s| match s {
                    tokio_xmpp::Stanza::Message(m) => {
                        let e =
                            spine_protocol::events::Event::try_from(m.payloads[0].clone()).ok()?;
                        Some((m.to.as_ref()?.to_string(), e.ty))
                    }
                    _ => None,
                })
                .collect()
        };
        post(&mut w, note("n-1", "hello")).unwrap();
        let r = w.ready();
        assert_eq!(
            told(&r.stanzas),
            [
                (
                    "ops@localhost/console".to_owned(),
                    "spine.rule.fired".to_owned()
                ),
                (
                    "office@localhost".to_owned(),
                    "com.example.note.created".to_owned()
                ),
            ]
        );
        // Sent again: the same job, no one told again.
        post(&mut w, note("n-1", "hello")).unwrap();
        assert!(told(&w.ready().stanzas).is_empty());
        // The job's end: told once (and the rule it fires: told of that firing).
        let sent = jobs_sent(&r.stanzas);
        w.succeed(&sent[0], &a);
        let ends: Vec<_> = told(&w.ready().stanzas);
        assert!(
            ends.contains(&(
                "ops@localhost/console".to_owned(),
                "spine.job.succeeded".to_owned()
            )),
            "{ends:?}"
        );
        let m = w.core.metrics();
        assert!(
            m.lines()
                .any(|l| l == "spine_subscription_messages_total{subscription=\"notes\"} 1"),
            "{m}"
        );
    }

    #[test]
    fn rules_made_over_the_api_are_stored_fire_and_hold_across_a_restart() {
        use super::super::api::RuleChangeError as E;
        let mut w = world(RULES);
        w.agent(1, 4);
        w.ready();
        let api_rule = |ty: &str| -> crate::triggers::RuleConfig {
            serde_json::from_value(json!({
                "name": "by-api",
                "on": {"type": ty},
                "do": {"capability": "c.work", "args": {"n": "{{data.n}}"}},
            }))
            .unwrap()
        };
        let put = |w: &mut World, r: crate::triggers::RuleConfig| {
            w.core
                .api(98, ApiRequest::PutRule { rule: Box::new(r) }, w.now);
            let ready = w.ready();
            (ready.replies.clone(), ready)
        };
        let (replies, _) = put(&mut w, api_rule("com.example.api"));
        assert_eq!(replies, vec![(98, ApiReply::RulePut(Ok(true)))]);
        assert!(w.core.rules_view().last().unwrap().2, "made over the API");
        // Stored in the commit before the answer.
        w.core.api(
            98,
            ApiRequest::PutRule {
                rule: Box::new(api_rule("com.example.api2")),
            },
            w.now,
        );
        let stored = std::mem::take(&mut w.core.ready.rules);
        assert_eq!(
            stored,
            vec![("by-api".to_owned(), Some(api_rule("com.example.api2")))]
        );
        w.ready();
        let mut ev = note("a-1", "x");
        ev.ty = "com.example.api2".into();
        ev.data = EventData::Json(json!({"n": 7}));
        let fired = post(&mut w, ev.clone()).unwrap();
        assert_eq!(fired[0].rule, "by-api");
        // A configured rule is not the API's to change; a bad one names its field.
        let mut configured = api_rule("x");
        configured.name = "upper".into();
        let (replies, _) = put(&mut w, configured);
        assert_eq!(
            replies,
            vec![(98, ApiReply::RulePut(Err(E::Configured("upper".into()))))]
        );
        let mut bad = api_rule("x");
        bad.action.capability = "not a capability".into();
        let (replies, _) = put(&mut w, bad);
        let [(_, ApiReply::RulePut(Err(E::Invalid(why))))] = &replies[..] else {
            panic!("{replies:?}")
        };
        assert!(why.starts_with("do.capability:"), "{why}");
        // A restart loads the stored rule after the configured ones.
        let cfg = w.core.cfg.clone();
        let mut w = World::with(
            cfg,
            Restored {
                rules: vec![api_rule("com.example.api2")],
                ..Restored::default()
            },
        );
        w.agent(1, 4);
        w.ready();
        let names: Vec<_> = w.core.rules_view().into_iter().map(|r| r.0.name).collect();
        assert_eq!(names, ["upper", "other", "after-upper", "by-api"]);
        ev.id = "a-2".into();
        assert_eq!(post(&mut w, ev).unwrap()[0].rule, "by-api");
        // Deleted: gone, and stored as gone.
        w.core.api(
            97,
            ApiRequest::DeleteRule {
                name: "by-api".into(),
            },
            w.now,
        );
        assert_eq!(w.core.ready.rules, vec![("by-api".to_owned(), None)]);
        assert_eq!(w.ready().replies, vec![(97, ApiReply::RuleDeleted(Ok(())))]);
        w.core.api(
            97,
            ApiRequest::DeleteRule {
                name: "by-api".into(),
            },
            w.now,
        );
        assert_eq!(
            w.ready().replies,
            vec![(97, ApiReply::RuleDeleted(Err(E::Unknown("by-api".into()))))]
        );
    }
}
