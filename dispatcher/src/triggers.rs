//! Event rules (docs/events.md): `on` an event of some type (and source, subject), `when` a
//! condition over its fields holds, `do` a job made from a template, with `retry` bounds.
//!
//! Pure: the core ([`crate::core`]) asks [`Rules::matching`] which rules an event fires and
//! [`Rule::job`] for each job; the HTTP layer parses events ([`Event`]) from CloudEvents.
//! An event fires each rule at most once: the job's idempotency key is derived from the event's
//! `source` and `id` ([`Event::key`]), and its submitter is the rule (`rule:<name>`), so the same
//! event sent again names the job it made the first time.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use spine_protocol::{CapabilityName, Filter, Strategy};

use crate::jobs::{Body, JobSpec};

/// How many rules may follow one another through job outcomes (a job made by a rule ends,
/// its outcome fires a rule, …): an outcome event deeper than this fires nothing, so that a
/// rule that matches its own jobs' outcomes cannot loop.
pub const MAX_CHAIN: u32 = 8;

/// The source of the events the dispatcher makes when a job ends (`spine.job.<state>`).
pub const JOB_SOURCE: &str = "/spine/jobs";

/// One event (a CloudEvent, specversion 1.0): its attributes and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique within its source.
    pub id: String,
    /// Who produced it (a URI reference).
    pub source: String,
    /// What happened, e.g. `com.example.upload.created`.
    pub ty: String,
    /// What it is about, within the source (a file name, a capability).
    pub subject: Option<String>,
    /// When it happened, ms since the UNIX epoch, when it says.
    pub time_ms: Option<u64>,
    /// Its data's media type, when it says.
    pub mime: Option<String>,
    /// Its data.
    pub data: EventData,
    /// How many rules led to it: 0 for an event from outside, the job's depth + 1 for a job's
    /// outcome.
    pub depth: u32,
}

/// An event's data.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EventData {
    /// None.
    #[default]
    None,
    /// JSON (a structured event's `data`, or a binary event whose content type is JSON).
    Json(Value),
    /// Anything else (`data_base64`, or a binary event's body).
    Bytes(Vec<u8>),
    /// Bytes in the blob store, named by reference (an agent's watcher put them to an event
    /// slot, PROTOCOL.md §11.9.1). Rules see `data.sha256` and `data.size`; `input =
    /// "{{data}}"` gives the job these bytes by reference, not a copy.
    Stored(crate::blobs::Stored),
}

impl EventData {
    /// The data as JSON, for filters and templates: a stored blob is `{"sha256", "size"}`.
    fn json(&self) -> Option<Value> {
        match self {
            EventData::None => None,
            EventData::Json(v) => Some(v.clone()),
            EventData::Bytes(b) => Some(Value::String(String::from_utf8_lossy(b).into())),
            EventData::Stored(s) => Some(serde_json::json!({"sha256": s.hex(), "size": s.size})),
        }
    }
}

impl Event {
    /// The idempotency key of the jobs this event makes (with the rule as submitter): the
    /// SHA-256 of its source and id, so any length and any characters make a key of 70.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.source.as_bytes());
        h.update([0]);
        h.update(self.id.as_bytes());
        format!("event:{}", crate::blobs::sha256_hex(&h.finalize().into()))
    }

    /// The value at `path`: an attribute (`id`, `source`, `type`, `subject`, `time`,
    /// `datacontenttype`), `data`, or a field of JSON data (`data.a.b`, `data.items.0`).
    pub fn field(&self, path: &str) -> Option<Value> {
        let (head, rest) = match path.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (path, None),
        };
        let attr = |v: Option<&str>| v.map(|s| Value::String(s.to_owned()));
        match (head, rest) {
            ("id", None) => attr(Some(&self.id)),
            ("source", None) => attr(Some(&self.source)),
            ("type", None) => attr(Some(&self.ty)),
            ("subject", None) => attr(self.subject.as_deref()),
            ("datacontenttype", None) => attr(self.mime.as_deref()),
            ("time", None) => self
                .time_ms
                .map(|ms| Value::String(crate::core::rfc3339_ms(ms))),
            ("data", None) => self.data.json(),
            ("data", Some(rest)) => {
                let root = match &self.data {
                    EventData::Json(_) | EventData::Stored(_) => self.data.json()?,
                    EventData::None | EventData::Bytes(_) => return None,
                };
                let mut v = &root;
                for part in rest.split('.') {
                    v = match v {
                        Value::Object(m) => m.get(part)?,
                        Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
                        _ => return None,
                    };
                }
                Some(v.clone())
            }
            _ => None,
        }
    }
}

/// A value as a filter compares it and a template writes it into text: a string as it is, a
/// number or a boolean in JSON, `null` as absent, a list or map as JSON text.
fn text(v: Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// Checks the name of a rule, schedule or webhook (`key` names it in the error): 1 to 64
/// ASCII letters, digits, `_`, `-`, and `.` when `dot`.
pub(crate) fn check_name(key: &str, name: &str, dot: bool) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (dot && b == b'.'));
    if ok {
        return Ok(());
    }
    let allowed = if dot { "'.', '_' or '-'" } else { "'_' or '-'" };
    Err(format!(
        "{key}: '{name}': 1 to 64 letters, digits, {allowed}"
    ))
}

/// The roots a template or a `when` may name.
const ROOTS: [&str; 7] = [
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
];

fn check_path(path: &str) -> Result<(), String> {
    let root = path.split('.').next().unwrap_or(path);
    if !ROOTS.contains(&root) {
        return Err(format!(
            "'{path}' names no field of an event: start with one of {}",
            ROOTS.join(", ")
        ));
    }
    if root != "data" && root != path {
        return Err(format!("'{path}': only data has fields"));
    }
    if path.split('.').any(str::is_empty) {
        return Err(format!("'{path}': an empty field name"));
    }
    Ok(())
}

/// The `{{path}}` references of a template string, with their byte ranges; `Err` on an
/// unclosed `{{` or a path that names nothing.
fn references(s: &str) -> Result<Vec<(std::ops::Range<usize>, &str)>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = s[at..].find("{{").map(|i| i + at) {
        let Some(close) = s[open..].find("}}").map(|i| i + open) else {
            return Err(format!(
                "'{s}': '{{{{' at byte {open} is not closed by '}}}}'"
            ));
        };
        let path = s[open + 2..close].trim();
        check_path(path)?;
        out.push((open..close + 2, path));
        at = close + 2;
    }
    Ok(out)
}

/// Fills a template: a string that is one reference becomes the value it names (a number stays
/// a number); references inside longer text are written as text; maps and lists are filled
/// item by item. `Err` names the first field the event does not have.
fn fill(template: &Value, ev: &Event) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => {
            let refs = references(s)?;
            match refs.as_slice() {
                [] => template.clone(),
                [(r, path)] if *r == (0..s.len()) => ev
                    .field(path)
                    .ok_or_else(|| format!("the event has no {path}"))?,
                _ => {
                    let mut out = String::with_capacity(s.len());
                    let mut at = 0;
                    for (r, path) in refs {
                        out.push_str(&s[at..r.start]);
                        let v = ev
                            .field(path)
                            .and_then(text)
                            .ok_or_else(|| format!("the event has no {path}"))?;
                        out.push_str(&v);
                        at = r.end;
                    }
                    out.push_str(&s[at..]);
                    Value::String(out)
                }
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| fill(v, ev))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), fill(v, ev)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn check_template(v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) => references(s).map(|_| ()),
        Value::Array(items) => items.iter().try_for_each(check_template),
        Value::Object(m) => m.values().try_for_each(check_template),
        _ => Ok(()),
    }
}

/// `[[rule]]` as written in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Its name: letters, digits, `.`, `_`, `-` (the submitter of its jobs is `rule:<name>`).
    pub name: String,
    /// The events it takes.
    pub on: OnConfig,
    /// A condition over the event's fields, in the filter grammar (`data.size > 1000,
    /// subject in (a, b)`); none: every event `on` takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// The job it makes.
    #[serde(rename = "do")]
    pub action: ActionConfig,
    /// How long and how often its jobs are tried.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `on`: which events a rule takes. Each pattern is exact, `prefix*`, or `*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnConfig {
    /// The event's `type`.
    #[serde(rename = "type")]
    pub ty: String,
    /// The event's `source` (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The event's `subject` (any when absent; an event without one does not match a pattern).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

/// `do`: the job a rule makes. Strings may name the event's fields: `"{{data.path}}"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// The capability.
    pub capability: String,
    /// Arguments (a map; templates filled from the event).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub args: Map<String, Value>,
    /// The input: a template; a string gives its text, anything else its JSON.
    /// `"{{data}}"` gives the event's data as it came (bytes stay bytes). None: no input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Instead of `input`: a template naming a blob of the dispatcher's store by its SHA-256
    /// (64 hex digits; uploaded with `PUT /v1/blobs`), e.g. `"{{data.sha256}}"`: the job's
    /// input by reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ref: Option<String>,
    /// How long the job may take from its acceptance (`"30s"`), within the rule's `max_age`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub deadline: Option<Duration>,
    /// Placement strategy (default least-loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Agent filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Priority (higher first).
    #[serde(default)]
    pub priority: i64,
}

/// `retry`: like an asynchronous invocation's, attempts in all and the age after which an
/// event's job is given up (it then times out and is a dead letter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all (the first and its retries).
    pub attempts: u64,
    /// From the event's time (or its arrival, when it has none or says a later one).
    #[serde(with = "spine_protocol::units::duration")]
    pub max_age: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            max_age: Duration::from_secs(6 * 3600),
        }
    }
}

/// A pattern of `on`: exact, `prefix*`, or `*`.
#[derive(Debug, Clone, PartialEq)]
struct Pattern(String);

impl Pattern {
    fn matches(&self, s: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => s.starts_with(prefix),
            None => self.0 == s,
        }
    }
}

/// Which events a rule or a subscription takes: `on` (type, source, subject patterns) and
/// `when` (a condition over the event's fields), checked.
#[derive(Debug, Clone)]
pub(crate) struct Selector {
    ty: Pattern,
    source: Option<Pattern>,
    subject: Option<Pattern>,
    when: Option<Filter>,
}

impl Selector {
    /// Checks `on` and `when`; `key` names a field in errors (`rule[0].on.type`).
    pub(crate) fn new(
        on: &OnConfig,
        when: Option<&str>,
        key: impl Fn(&str) -> String,
    ) -> Result<Selector, String> {
        if on.ty.is_empty() {
            return Err(format!(
                "{}: empty: an event type, 'prefix*' or '*'",
                key("on.type")
            ));
        }
        let when = when
            .map(|w| {
                let f = Filter::parse(w).map_err(|e| format!("{}: {e}", key("when")))?;
                for name in filter_names(&f) {
                    check_path(name).map_err(|e| format!("{}: {e}", key("when")))?;
                }
                Ok::<_, String>(f)
            })
            .transpose()?;
        Ok(Selector {
            ty: Pattern(on.ty.clone()),
            source: on.source.clone().map(Pattern),
            subject: on.subject.clone().map(Pattern),
            when,
        })
    }

    /// Whether it takes `ev`.
    pub(crate) fn matches(&self, ev: &Event) -> bool {
        if !self.ty.matches(&ev.ty) || self.source.as_ref().is_some_and(|p| !p.matches(&ev.source))
        {
            return false;
        }
        if let Some(p) = &self.subject {
            if !ev.subject.as_deref().is_some_and(|s| p.matches(s)) {
                return false;
            }
        }
        let Some(when) = &self.when else {
            return true;
        };
        let values: HashMap<&str, String> = filter_names(when)
            .filter_map(|n| Some((n, text(ev.field(n)?)?)))
            .collect();
        when.matches(|n| values.get(n).map(String::as_str))
    }
}

/// A rule, checked.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// As configured (for `GET /v1/rules`).
    pub config: RuleConfig,
    selector: Selector,
    capability: CapabilityName,
    filter: Option<Filter>,
}

/// Why an event did not become a rule's job.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rule '{rule}': {why}")]
pub struct RuleError {
    /// The rule.
    pub rule: String,
    /// What was wrong (the field the event lacks).
    pub why: String,
}

impl Rule {
    /// Checks `c` (the `i`th rule): every error names its key, as `rule[i].field`.
    pub fn new(i: usize, c: &RuleConfig) -> Result<Rule, String> {
        let key = |k: &str| format!("rule[{i}].{k}");
        check_name(&key("name"), &c.name, true)?;
        let selector = Selector::new(&c.on, c.when.as_deref(), key)?;
        let capability = c
            .action
            .capability
            .parse::<CapabilityName>()
            .map_err(|e| format!("{}: {e}", key("do.capability")))?;
        let filter = c
            .action
            .filter
            .as_deref()
            .map(|f| Filter::parse(f).map_err(|e| format!("{}: {e}", key("do.filter"))))
            .transpose()?;
        for (k, v) in &c.action.args {
            check_template(v).map_err(|e| format!("{}: {e}", key(&format!("do.args.{k}"))))?;
        }
        if let Some(input) = &c.action.input {
            references(input).map_err(|e| format!("{}: {e}", key("do.input")))?;
        }
        if let Some(r) = &c.action.input_ref {
            if c.action.input.is_some() {
                return Err(format!(
                    "{}: give input or input_ref, not both",
                    key("do.input_ref")
                ));
            }
            references(r).map_err(|e| format!("{}: {e}", key("do.input_ref")))?;
        }
        if c.action.deadline.is_some_and(|d| d.is_zero()) {
            return Err(format!("{}: must be more than 0", key("do.deadline")));
        }
        if c.retry.attempts == 0 {
            return Err(format!("{}: must be at least 1", key("retry.attempts")));
        }
        if c.retry.max_age.is_zero() {
            return Err(format!("{}: must be more than 0", key("retry.max_age")));
        }
        Ok(Rule {
            name: c.name.clone(),
            config: c.clone(),
            selector,
            capability,
            filter,
        })
    }

    /// The submitter of its jobs.
    pub fn submitter(&self) -> String {
        format!("rule:{}", self.name)
    }

    /// Whether `ev` fires this rule.
    pub fn matches(&self, ev: &Event) -> bool {
        self.selector.matches(ev)
    }

    /// The job `ev` makes, at `now_ms`; `Err` names the field the event lacks. `find` looks a
    /// blob up in the store by its SHA-256 (for `input_ref`).
    pub fn job(
        &self,
        ev: &Event,
        now_ms: u64,
        find: impl Fn(&[u8; 32]) -> Option<crate::blobs::Stored>,
    ) -> Result<JobSpec, RuleError> {
        let err = |why: String| RuleError {
            rule: self.name.clone(),
            why,
        };
        let a = &self.config.action;
        let mut spec = JobSpec::new(self.capability.clone(), self.submitter());
        for (k, v) in &a.args {
            let filled = fill(v, ev).map_err(|e| err(format!("do.args.{k}: {e}")))?;
            spec.args.insert(k.clone(), filled);
        }
        if let Some(input) = &a.input {
            let (body, mime) = if input.trim() == "{{data}}" || input.trim() == "{{ data }}" {
                match &ev.data {
                    EventData::None => return Err(err("do.input: the event has no data".into())),
                    EventData::Json(v) => (
                        Body::Inline(json_bytes(v)),
                        Some("application/json".to_owned()),
                    ),
                    EventData::Bytes(b) => (Body::Inline(b.clone()), ev.mime.clone()),
                    // By reference: the job names the stored bytes, no copy.
                    EventData::Stored(s) => (Body::Stored(*s), ev.mime.clone()),
                }
            } else {
                match fill(&Value::String(input.clone()), ev)
                    .map_err(|e| err(format!("do.input: {e}")))?
                {
                    Value::String(s) => {
                        (Body::Inline(s.into_bytes()), Some("text/plain".to_owned()))
                    }
                    other => (
                        Body::Inline(json_bytes(&other)),
                        Some("application/json".to_owned()),
                    ),
                }
            };
            spec.input = body;
            spec.input_mime = mime;
        }
        if let Some(r) = &a.input_ref {
            let hex = match fill(&Value::String(r.clone()), ev)
                .map_err(|e| err(format!("do.input_ref: {e}")))?
            {
                Value::String(s) => s,
                other => other.to_string(),
            };
            let sha = spine_protocol::data::parse_sha256(hex.trim()).map_err(|e| {
                err(format!(
                    "do.input_ref: '{hex}' is not a SHA-256 (64 hex digits): {e}"
                ))
            })?;
            let stored = find(&sha).ok_or_else(|| {
                err(format!(
                    "do.input_ref: blob {hex} is not in the blob store (upload it with PUT /v1/blobs first)"
                ))
            })?;
            spec.input = Body::Stored(stored);
            spec.input_mime = None;
        }
        if let Some(s) = a.strategy {
            spec.strategy = s;
        }
        spec.filter = self.filter.clone();
        spec.priority = a.priority;
        spec.max_attempts = self.config.retry.attempts;
        let since = ev.time_ms.map_or(now_ms, |t| t.min(now_ms));
        let max_age = since.saturating_add(self.config.retry.max_age.as_millis() as u64);
        spec.deadline_ms = Some(match a.deadline {
            Some(d) => max_age.min(now_ms.saturating_add(d.as_millis() as u64)),
            None => max_age,
        });
        spec.idempotency_key = Some(ev.key());
        spec.event = Some(crate::jobs::EventRef {
            rule: self.name.clone(),
            id: ev.id.clone(),
            source: ev.source.clone(),
            ty: ev.ty.clone(),
            depth: ev.depth,
        });
        Ok(spec)
    }
}

fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// An optional duration in the configuration's forms (`"30s"`, `"1h 30m"`).
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&spine_protocol::units::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        spine_protocol::units::parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// The attribute names a filter reads.
fn filter_names(f: &Filter) -> impl Iterator<Item = &str> {
    use spine_protocol::Clause;
    f.clauses.iter().map(|c| match c {
        Clause::Truthy(n) | Clause::Falsy(n) | Clause::Compare(n, ..) => n.as_str(),
        Clause::In { name, .. } => name.as_str(),
    })
}

/// The configured rules, checked.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// Checks every `[[rule]]`; names must be unique.
    pub fn new(configs: &[RuleConfig]) -> Result<Rules, String> {
        let mut rules: Vec<Rule> = Vec::with_capacity(configs.len());
        for (i, c) in configs.iter().enumerate() {
            let r = Rule::new(i, c)?;
            if rules.iter().any(|o| o.name == r.name) {
                return Err(format!("rule[{i}].name: '{}' is used twice", r.name));
            }
            rules.push(r);
        }
        Ok(Rules { rules })
    }

    /// Every rule, in configuration order.
    pub fn all(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules `ev` fires, in configuration order; none for an event past [`MAX_CHAIN`].
    pub fn matching<'a>(&'a self, ev: &'a Event) -> impl Iterator<Item = &'a Rule> + 'a {
        let deep = ev.depth > MAX_CHAIN;
        self.rules.iter().filter(move |r| !deep && r.matches(ev))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule named `name`.
    pub fn get(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Adds `rule`, or replaces the rule of its name in place; true if it is new.
    pub fn put(&mut self, rule: Rule) -> bool {
        match self.rules.iter_mut().find(|r| r.name == rule.name) {
            Some(old) => {
                *old = rule;
                false
            }
            None => {
                self.rules.push(rule);
                true
            }
        }
    }

    /// Removes the rule named `name`; false if there was none.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.name != name);
        self.rules.len() != before
    }
}

/// `[[webhook]]` as written in the configuration: a sender that signs its requests with a
/// shared secret (HMAC-SHA256 of the body, GitHub's `X-Hub-Signature-256: sha256=<hex>`)
/// instead of holding a token; it posts to `POST /v1/events/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Its name, the last part of its URL: letters, digits, `_`, `-`.
    pub name: String,
    /// The shared secret (at least 16 bytes); or `secret_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A file holding the secret (its trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<std::path::PathBuf>,
    /// The header carrying `sha256=<hex>`.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// A body that is not a CloudEvent becomes one with this `source` (default
    /// `/webhooks/<name>`)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// …this `type` (default `webhook.<name>`), followed by `.` and the value of
    /// `type_header` when the request has it (`X-GitHub-Event`: `webhook.github.push`)…
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub ty: Option<String>,
    /// (see `type`)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_header: Option<String>,
    /// …and as `id` the value of this header (`X-GitHub-Delivery`), or else the SHA-256 of the
    /// body (the same body sent again is the same event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_header: Option<String>,
}

fn default_signature_header() -> String {
    "X-Hub-Signature-256".into()
}

/// A webhook, checked, its secret read.
#[derive(Clone)]
pub struct Webhook {
    /// As configured (the secret in it is not used from there).
    pub config: WebhookConfig,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

/// Why a webhook request is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header.
    #[error("missing the {0} header (sha256=<hex of the HMAC-SHA256 of the body>)")]
    Missing(String),
    /// Not `sha256=<64 hex digits>`.
    #[error("{0}: not sha256=<64 hex digits>")]
    Malformed(String),
    /// Signed with another secret, or the body changed on the way.
    #[error("{0}: the signature does not match the body")]
    Mismatch(String),
}

impl Webhook {
    /// Checks `c` (the `i`th webhook); reads its secret file when `read` (not at `--check`).
    pub fn new(i: usize, c: &WebhookConfig, read: bool) -> Result<Webhook, String> {
        let key = |k: &str| format!("webhook[{i}].{k}");
        // The last part of a URL path, beside `GET /v1/events/stream`.
        check_name(&key("name"), &c.name, false)?;
        if c.name == "stream" {
            return Err(format!(
                "{}: 'stream' is taken (GET /v1/events/stream)",
                key("name")
            ));
        }
        let secret = match (&c.secret, &c.secret_file) {
            (Some(s), None) => s.clone().into_bytes(),
            (None, Some(f)) if read => std::fs::read_to_string(f)
                .map_err(|e| format!("{}: {}: {e}", key("secret_file"), f.display()))?
                .trim_end_matches(['\r', '\n'])
                .as_bytes()
                .to_vec(),
            (None, Some(_)) => vec![0; 16],
            _ => {
                return Err(format!(
                    "{}: give secret or secret_file, one of them",
                    key("secret")
                ))
            }
        };
        if secret.len() < 16 {
            return Err(format!(
                "{}: at least 16 bytes (e.g. `openssl rand -hex 32`)",
                key("secret")
            ));
        }
        for (k, h) in [
            ("signature_header", Some(&c.signature_header)),
            ("type_header", c.type_header.as_ref()),
            ("id_header", c.id_header.as_ref()),
        ] {
            if let Some(h) = h {
                axum::http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("{}: '{h}' is not a header name", key(k)))?;
            }
        }
        Ok(Webhook {
            config: c.clone(),
            secret,
        })
    }

    /// Checks the signature header's value against `body`.
    pub fn verify(&self, header: Option<&str>, body: &[u8]) -> Result<(), SignatureError> {
        use hmac::Mac as _;
        let name = self.config.signature_header.clone();
        let value = header.ok_or_else(|| SignatureError::Missing(name.clone()))?;
        let hex_sig = value
            .trim()
            .strip_prefix("sha256=")
            .filter(|h| h.len() == 64)
            .ok_or_else(|| SignatureError::Malformed(name.clone()))?;
        let mut sig = [0u8; 32];
        for (i, b) in sig.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex_sig[2 * i..2 * i + 2], 16)
                .map_err(|_| SignatureError::Malformed(name.clone()))?;
        }
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(&self.secret)
            .map_err(|_| SignatureError::Mismatch(name.clone()))?;
        mac.update(body);
        // Compared in constant time.
        mac.verify_slice(&sig)
            .map_err(|_| SignatureError::Mismatch(name))
    }

    /// The event a body that is not a CloudEvent makes: `header` reads the request's headers.
    pub fn event<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        mime: Option<String>,
        body: Vec<u8>,
        data: EventData,
    ) -> Event {
        let c = &self.config;
        let base =
            c.ty.clone()
                .unwrap_or_else(|| format!("webhook.{}", c.name));
        let ty = match c.type_header.as_deref().and_then(&header) {
            Some(t) if !t.is_empty() => format!("{base}.{t}"),
            _ => base,
        };
        let id = c
            .id_header
            .as_deref()
            .and_then(&header)
            .filter(|v| !v.is_empty())
            .map_or_else(
                || crate::blobs::sha256_hex(&Sha256::digest(&body).into()),
                str::to_owned,
            );
        Event {
            id,
            source: c
                .source
                .clone()
                .unwrap_or_else(|| format!("/webhooks/{}", c.name)),
            ty,
            subject: None,
            time_ms: None,
            mime,
            data,
            depth: 0,
        }
    }
}

/// Checks every `[[webhook]]`; names must be unique. `read`: read the secret files.
pub fn webhooks(configs: &[WebhookConfig], read: bool) -> Result<HashMap<String, Webhook>, String> {
    let mut out = HashMap::new();
    for (i, c) in configs.iter().enumerate() {
        let w = Webhook::new(i, c, read)?;
        if out.insert(c.name.clone(), w).is_some() {
            return Err(format!("webhook[{i}].name: '{}' is used twice", c.name));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(toml_text: &str) -> Result<Rule, String> {
        #[derive(Deserialize)]
        struct Doc {
            rule: Vec<RuleConfig>,
        }
        let d: Doc = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        Rule::new(0, &d.rule[0])
    }

    fn upload(data: Value) -> Event {
        Event {
            id: "e-1".into(),
            source: "ftp://files.example.com".into(),
            ty: "com.example.upload.created".into(),
            subject: Some("photos/cat.jpg".into()),
            time_ms: Some(1_700_000_000_000),
            mime: Some("application/json".into()),
            data: EventData::Json(data),
            depth: 0,
        }
    }

    const THUMBS: &str = r#"
        [[rule]]
        name = "thumbs"
        on = { type = "com.example.upload.*", source = "ftp://*", subject = "photos/*" }
        when = "data.size > 1000, data.kind in (jpeg, png)"
        do = { capability = "image.thumbnail", args = { width = "{{data.width}}", path = "/in/{{subject}}", fixed = 7 }, input = "{{data.name}}", priority = 5 }
        retry = { attempts = 2, max_age = "1h" }
    "#;

    #[test]
    fn a_rule_takes_events_by_type_source_subject_and_condition() {
        let r = rule(THUMBS).unwrap();
        let ev = upload(json!({"size": 5000, "kind": "jpeg", "width": 256, "name": "cat"}));
        assert!(r.matches(&ev));
        let small = upload(json!({"size": 10, "kind": "jpeg"}));
        assert!(!r.matches(&small), "the condition on data.size");
        let gif = upload(json!({"size": 5000, "kind": "gif"}));
        assert!(!r.matches(&gif), "the condition on data.kind");
        let mut other_type = ev.clone();
        other_type.ty = "com.example.delete".into();
        assert!(!r.matches(&other_type));
        let mut other_source = ev.clone();
        other_source.source = "https://x".into();
        assert!(!r.matches(&other_source));
        let mut no_subject = ev.clone();
        no_subject.subject = None;
        assert!(!r.matches(&no_subject), "a subject pattern needs a subject");
        let mut deep = ev.clone();
        deep.depth = MAX_CHAIN + 1;
        let rules = Rules {
            rules: vec![r.clone()],
        };
        assert_eq!(rules.matching(&ev).count(), 1);
        assert_eq!(rules.matching(&deep).count(), 0, "past the chain's bound");
    }

    #[test]
    fn a_rule_fills_its_job_from_the_event() {
        let r = rule(THUMBS).unwrap();
        let ev = upload(json!({"size": 5000, "kind": "jpeg", "width": 256, "name": "cat"}));
        let now = 1_700_000_005_000;
        let spec = r.job(&ev, now, |_| None).unwrap();
        assert_eq!(spec.capability.as_str(), "image.thumbnail");
        assert_eq!(spec.submitter, "rule:thumbs");
        assert_eq!(
            spec.args["width"],
            json!(256),
            "a whole reference keeps its type"
        );
        assert_eq!(spec.args["path"], json!("/in/photos/cat.jpg"));
        assert_eq!(spec.args["fixed"], json!(7));
        assert_eq!(spec.input, Body::Inline(b"cat".to_vec()));
        assert_eq!(spec.input_mime.as_deref(), Some("text/plain"));
        assert_eq!(spec.priority, 5);
        assert_eq!(spec.max_attempts, 2);
        // An hour from the event's time, not from now.
        assert_eq!(spec.deadline_ms, Some(1_700_000_000_000 + 3_600_000));
        assert_eq!(spec.idempotency_key, Some(ev.key()));
        assert_eq!(spec.event.as_ref().unwrap().rule, "thumbs");
        // The same source and id: the same key; another id: another.
        let mut again = upload(json!({}));
        again.ty = "x".into();
        assert_eq!(again.key(), ev.key());
        again.id = "e-2".into();
        assert_ne!(again.key(), ev.key());
        assert_eq!(ev.key().len(), 70);
        // A missing field is named.
        let lacking = upload(json!({"size": 5000, "kind": "jpeg", "name": "cat"}));
        let e = r.job(&lacking, now, |_| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rule 'thumbs': do.args.width: the event has no data.width"
        );
    }

    #[test]
    fn data_as_input_keeps_bytes_and_json() {
        let r = rule(
            r#"[[rule]]
            name = "raw"
            on = { type = "*" }
            do = { capability = "text.upper", input = "{{data}}" }"#,
        )
        .unwrap();
        let mut ev = upload(json!({"a": [1, 2]}));
        let spec = r.job(&ev, 0, |_| None).unwrap();
        assert_eq!(spec.input, Body::Inline(br#"{"a":[1,2]}"#.to_vec()));
        assert_eq!(spec.input_mime.as_deref(), Some("application/json"));
        ev.data = EventData::Bytes(vec![0, 159, 146, 150]);
        ev.mime = Some("application/octet-stream".into());
        let spec = r.job(&ev, 0, |_| None).unwrap();
        assert_eq!(spec.input, Body::Inline(vec![0, 159, 146, 150]));
        assert_eq!(spec.input_mime.as_deref(), Some("application/octet-stream"));
        assert_eq!(ev.field("data.a"), None, "bytes have no fields");
        ev.data = EventData::Json(json!({"items": [{"n": "x"}]}));
        assert_eq!(ev.field("data.items.0.n"), Some(json!("x")));
        assert_eq!(ev.field("time"), Some(json!("2023-11-14T22:13:20.000Z")));
    }

    #[test]
    fn configuration_errors_name_the_key() {
        let cases = [
            (r#"name = "a b""#, "rule[0].name"),
            (r#"when = "data.size >""#, "rule[0].when"),
            (
                r#"when = "size > 1""#,
                "rule[0].when: 'size' names no field",
            ),
            (
                r#"do = { capability = "Bad Cap" }"#,
                "rule[0].do.capability",
            ),
            (
                r#"do = { capability = "a.b", args = { x = "{{data.y" } }"#,
                "rule[0].do.args.x: '{{data.y': '{{' at byte 0 is not closed",
            ),
            (
                r#"do = { capability = "a.b", input = "{{nope}}" }"#,
                "rule[0].do.input: 'nope' names no field",
            ),
            (r#"retry = { attempts = 0 }"#, "rule[0].retry.attempts"),
        ];
        for (line, want) in cases {
            let mut text = String::from("[[rule]]\nname = \"r\"\non = { type = \"t\" }\n");
            if !line.starts_with("do =") {
                text.push_str("do = { capability = \"a.b\" }\n");
            }
            // A later key of the same name replaces nothing in TOML: build without it.
            let text = if line.starts_with("name =") {
                text.replace("name = \"r\"\n", "")
            } else {
                text
            };
            let e = rule(&format!("{text}{line}\n")).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        let two = [rule_config_default(), rule_config_default()];
        assert_eq!(
            Rules::new(&two).unwrap_err(),
            "rule[1].name: 'x' is used twice"
        );
    }

    #[test]
    fn a_webhook_checks_the_signature_and_maps_a_plain_body_to_an_event() {
        use hmac::Mac as _;
        let c: WebhookConfig = toml::from_str(
            r#"name = "github"
            secret = "0123456789abcdef-secret"
            type_header = "X-GitHub-Event"
            id_header = "X-GitHub-Delivery"
            type = "com.github""#,
        )
        .unwrap();
        let w = Webhook::new(0, &c, true).unwrap();
        let body = br#"{"ref":"refs/heads/main"}"#;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(b"0123456789abcdef-secret").unwrap();
        mac.update(body);
        let good = format!(
            "sha256={}",
            crate::blobs::sha256_hex(&mac.finalize().into_bytes().into())
        );
        assert_eq!(w.verify(Some(&good), body), Ok(()));
        assert!(matches!(
            w.verify(Some(&good), b"{}"),
            Err(SignatureError::Mismatch(_))
        ));
        assert!(matches!(
            w.verify(None, body),
            Err(SignatureError::Missing(_))
        ));
        assert!(matches!(
            w.verify(Some("sha1=ab"), body),
            Err(SignatureError::Malformed(_))
        ));
        let headers = |h: &str| match h {
            "X-GitHub-Event" => Some("push"),
            "X-GitHub-Delivery" => Some("d-42"),
            _ => None,
        };
        let ev = w.event(headers, None, body.to_vec(), EventData::None);
        assert_eq!(
            (ev.ty.as_str(), ev.id.as_str(), ev.source.as_str()),
            ("com.github.push", "d-42", "/webhooks/github")
        );
        // Without the headers: the base type, the body's hash as id.
        let ev = w.event(|_| None, None, body.to_vec(), EventData::None);
        assert_eq!(ev.ty, "com.github");
        assert_eq!(ev.id.len(), 64);
        let short = WebhookConfig {
            secret: Some("short".into()),
            ..c.clone()
        };
        assert!(Webhook::new(3, &short, true)
            .unwrap_err()
            .starts_with("webhook[3].secret: at least 16 bytes"));
        let stream = WebhookConfig {
            name: "stream".into(),
            ..c.clone()
        };
        assert_eq!(
            Webhook::new(0, &stream, true).unwrap_err(),
            "webhook[0].name: 'stream' is taken (GET /v1/events/stream)"
        );
        let two = [c.clone(), c];
        assert_eq!(
            webhooks(&two, true).unwrap_err(),
            "webhook[1].name: 'github' is used twice"
        );
    }

    /// Every TOML example of docs/events.md is a valid configuration.
    #[test]
    fn docs_examples_parse() {
        let doc = include_str!("../../docs/events.md");
        let mut blocks = 0;
        for block in doc.split("```toml\n").skip(1) {
            let toml_text = block.split("```").next().unwrap();
            // An agent's configuration (its watchers): the agent's tests parse it.
            if toml_text.starts_with("# agent.toml") {
                continue;
            }
            crate::config::DispatcherConfig::from_toml(toml_text)
                .unwrap_or_else(|e| panic!("{e}\n{toml_text}"));
            blocks += 1;
        }
        assert_eq!(blocks, 9);
    }

    fn rule_config_default() -> RuleConfig {
        RuleConfig {
            name: "x".into(),
            on: OnConfig {
                ty: "t".into(),
                source: None,
                subject: None,
            },
            when: None,
            action: ActionConfig {
                capability: "a.b".into(),
                args: Map::new(),
                input: None,
                input_ref: None,
                deadline: None,
                strategy: None,
                filter: None,
                priority: 0,
            },
            retry: RetryConfig::default(),
        }
    }

    #[test]
    fn input_ref_names_a_stored_blob_and_deadline_bounds_the_job() {
        let c: RuleConfig = serde_json::from_value(json!({
            "name": "by-ref",
            "on": {"type": "t"},
            "do": {"capability": "a.b", "input_ref": "{{data.sha256}}", "deadline": "30s"},
        }))
        .unwrap();
        let r = Rule::new(0, &c).unwrap();
        let blob = crate::blobs::Stored {
            sha256: [0xab; 32],
            size: 9,
        };
        let mut ev = upload(json!({"sha256": blob.hex()}));
        ev.time_ms = None;
        let spec = r
            .job(&ev, 1_000, |s| (*s == blob.sha256).then_some(blob))
            .unwrap();
        assert_eq!(spec.input, Body::Stored(blob));
        assert_eq!(spec.deadline_ms, Some(31_000), "30 s, within max_age");
        let e = r.job(&ev, 1_000, |_| None).unwrap_err();
        assert!(e.why.contains("not in the blob store"), "{e}");
        ev.data = EventData::Json(json!({"sha256": "xyz"}));
        let e = r.job(&ev, 1_000, |_| Some(blob)).unwrap_err();
        assert!(e.why.contains("not a SHA-256"), "{e}");
        let mut both = c.clone();
        both.action.input = Some("x".into());
        let e = Rule::new(0, &both).unwrap_err();
        assert!(
            e.starts_with("rule[0].do.input_ref: give input or input_ref"),
            "{e}"
        );
    }
}
