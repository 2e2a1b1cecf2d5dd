//! Subscriptions (`[[subscription]]`, docs/events.md, PROTOCOL.md §11.9.2): XMPP accounts that
//! receive events as directed messages — the events that come in (posted, from webhooks,
//! agents' watchers and schedules), every top-level job's end (`spine.job.<state>`) and every
//! rule's firing (`spine.rule.fired`) — picked by the same `on` and `when` as rules.
//!
//! Pure: the core asks [`Subscriptions::matching`] and sends what [`message`] builds. A
//! message is sent once, by the leader, when the event happens; delivery is the XMPP
//! server's (offline storage keeps it for an account that is away, where the server offers
//! it). For events that must not be missed, a rule's job is the durable path.

use jid::Jid;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spine_protocol::events::{Event as WireEvent, EventData as Wire};
use spine_protocol::INLINE_LIMIT;
use xmpp_parsers::message::{Lang, Message, MessageType};

use crate::triggers::{check_name, Event, EventData, OnConfig, Selector};

/// Longest text of a message's `<body>` taken from the event's data.
const BODY_TEXT: usize = 1000;

/// One `[[subscription]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Its name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// The account that receives the events (a bare JID: every session of it, as the server
    /// routes a message to a bare JID; or a full JID: that session only).
    pub jid: String,
    /// The events it takes.
    pub on: OnConfig,
    /// A condition over the event's fields (the rules' `when`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

/// A subscription, checked.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Its name.
    pub name: String,
    /// Where its messages go.
    pub jid: Jid,
    selector: Selector,
}

/// The configured subscriptions, checked.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions(Vec<Subscription>);

impl Subscriptions {
    /// Checks every `[[subscription]]`: errors name the key (`subscription[0].jid: …`).
    pub fn new(configs: &[SubscriptionConfig]) -> Result<Subscriptions, String> {
        let mut subs: Vec<Subscription> = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let key = |k: &str| format!("subscription[{i}].{k}");
            check_name(&key("name"), &c.name, true)?;
            if subs.iter().any(|s| s.name == c.name) {
                return Err(format!("{}: '{}' is used twice", key("name"), c.name));
            }
            let jid = c
                .jid
                .parse::<Jid>()
                .map_err(|e| format!("{}: '{}' is not a JID: {e}", key("jid"), c.jid))?;
            if jid.node().is_none() {
                return Err(format!(
                    "{}: '{}' needs a user part (user@domain)",
                    key("jid"),
                    c.jid
                ));
            }
            let selector = Selector::new(&c.on, c.when.as_deref(), key)?;
            subs.push(Subscription {
                name: c.name.clone(),
                jid,
                selector,
            });
        }
        Ok(Subscriptions(subs))
    }

    /// No subscription configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The subscriptions that take `ev`.
    pub fn matching<'a>(&'a self, ev: &'a Event) -> impl Iterator<Item = &'a Subscription> + 'a {
        self.0.iter().filter(move |s| s.selector.matches(ev))
    }

    /// Every subscription.
    pub fn all(&self) -> &[Subscription] {
        &self.0
    }
}

/// The message that tells `to` of `ev`: a `<body>` for people (the type, the subject, and the
/// data as text when it is short) and the event itself (`<event>` of PROTOCOL.md §11.9, its
/// data inline when it fits, left out otherwise).
pub fn message(to: Jid, ev: &Event) -> Message {
    let data = match &ev.data {
        EventData::None => Wire::None,
        EventData::Json(v) => Wire::Json(v.clone()),
        EventData::Bytes(b) => Wire::Bytes {
            mime: ev.mime.clone(),
            bytes: b.clone(),
        },
        EventData::Stored(s) => Wire::Json(serde_json::json!({"sha256": s.hex(), "size": s.size})),
    };
    let fits = match &data {
        Wire::Json(v) => v.to_string().len() <= INLINE_LIMIT,
        Wire::Bytes { bytes, .. } => bytes.len() <= INLINE_LIMIT,
        _ => true,
    };
    let mut body = ev.ty.clone();
    if let Some(s) = &ev.subject {
        body.push(' ');
        body.push_str(s);
    }
    if let Some(text) = summary(ev) {
        body.push_str(": ");
        body.push_str(&text);
    }
    if !fits {
        body.push_str(" (its data is over 64 KiB: left out of this message)");
    }
    let wire = WireEvent {
        id: ev.id.clone(),
        source: ev.source.clone(),
        ty: ev.ty.clone(),
        subject: ev.subject.clone(),
        time: ev.time_ms.map(crate::core::rfc3339_ms),
        data: if fits { data } else { Wire::None },
    };
    let mut m = Message::new(Some(to)).with_body(Lang(String::new()), body);
    m.type_ = MessageType::Normal;
    m.payloads.push(wire.into());
    m
}

/// A short text of the event for people: a job's output when it is short text, else the data
/// when it is short text or JSON.
fn summary(ev: &Event) -> Option<String> {
    let short = |s: String| (s.chars().count() <= BODY_TEXT && !s.is_empty()).then_some(s);
    match &ev.data {
        EventData::Json(v) if ev.source == crate::triggers::JOB_SOURCE => {
            let out = v.pointer("/result/output")?.as_str()?;
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(out).ok()?;
            short(String::from_utf8(bytes).ok()?.trim().to_owned())
        }
        EventData::Json(Value::String(s)) => short(s.clone()),
        EventData::Json(v) => short(v.to_string()),
        EventData::Bytes(b) => short(String::from_utf8(b.clone()).ok()?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn subs(toml_text: &str) -> Result<Subscriptions, String> {
        #[derive(Deserialize)]
        struct C {
            subscription: Vec<SubscriptionConfig>,
        }
        let c: C = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Subscriptions::new(&c.subscription)
    }

    fn marks() -> Event {
        Event {
            id: "m-1".into(),
            source: "/gradebook".into(),
            ty: "edu.school.marks.changed".into(),
            subject: Some("maths".into()),
            time_ms: Some(1_764_237_600_000),
            mime: Some("application/json".into()),
            data: EventData::Json(json!({"teacher": "alice", "students": 3})),
            depth: 0,
        }
    }

    #[test]
    fn a_subscription_takes_the_events_its_on_and_when_pick() {
        let s = subs(
            r#"
            [[subscription]]
            name = "exams-office"
            jid = "exams@school.example"
            on = { type = "edu.school.marks.*", source = "/gradebook" }
            when = "data.students > 0"

            [[subscription]]
            name = "all-ends"
            jid = "ops@school.example/console"
            on = { type = "spine.job.*" }
            "#,
        )
        .unwrap();
        let ev = marks();
        let names: Vec<_> = s.matching(&ev).map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["exams-office"]);
        let mut none = marks();
        none.data = EventData::Json(json!({"teacher": "alice", "students": 0}));
        assert_eq!(s.matching(&none).count(), 0);
        let m = message("exams@school.example".parse().unwrap(), &ev);
        assert_eq!(m.type_, MessageType::Normal);
        let body = &m.bodies[&Lang(String::new())];
        assert_eq!(
            body,
            r#"edu.school.marks.changed maths: {"students":3,"teacher":"alice"}"#
        );
        let wire = WireEvent::try_from(m.payloads[0].clone()).unwrap();
        assert_eq!(wire.id, "m-1");
        assert_eq!(wire.time.as_deref(), Some("2025-11-27T10:00:00.000Z"));
        assert_eq!(
            wire.data,
            Wire::Json(json!({"teacher": "alice", "students": 3}))
        );
    }

    #[test]
    fn a_jobs_end_says_its_short_text_output_and_large_data_is_left_out() {
        let ev = Event {
            id: "j-1".into(),
            source: crate::triggers::JOB_SOURCE.into(),
            ty: "spine.job.succeeded".into(),
            subject: Some("exams.update".into()),
            time_ms: None,
            mime: Some("application/json".into()),
            data: EventData::Json(
                json!({"id": "j-1", "result": {"output": "QWxpY2UgY2hhbmdlZCAzIG1hcmtz"}}),
            ),
            depth: 1,
        };
        let m = message("exams@school.example".parse().unwrap(), &ev);
        assert_eq!(
            m.bodies[&Lang(String::new())],
            "spine.job.succeeded exams.update: Alice changed 3 marks"
        );
        let mut big = marks();
        big.data = EventData::Json(json!({"text": "x".repeat(INLINE_LIMIT + 1)}));
        let m = message("exams@school.example".parse().unwrap(), &big);
        assert!(m.bodies[&Lang(String::new())].ends_with("left out of this message)"));
        let wire = WireEvent::try_from(m.payloads[0].clone()).unwrap();
        assert_eq!(wire.data, Wire::None);
    }

    #[test]
    fn bad_subscriptions_are_refused_naming_the_key() {
        for (text, want) in [
            (
                "name = \"a b\"\njid = \"x@y\"\non = { type = \"t\" }",
                "subscription[0].name",
            ),
            (
                "name = \"a\"\njid = \"y\"\non = { type = \"t\" }",
                "subscription[0].jid",
            ),
            (
                "name = \"a\"\njid = \"x@y\"\non = { type = \"\" }",
                "subscription[0].on.type",
            ),
            (
                "name = \"a\"\njid = \"x@y\"\non = { type = \"t\" }\nwhen = \"data.a >\"",
                "subscription[0].when",
            ),
        ] {
            let e = subs(&format!("[[subscription]]\n{text}\n")).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
