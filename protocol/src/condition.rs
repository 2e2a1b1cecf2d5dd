//! Spine error conditions and their mapping onto XMPP stanza errors (RFC 6120 §8.3).
//!
//! A Spine error travels as an ordinary `<error/>` whose defined condition and type tell any
//! XMPP entity what to do (`wait`: retry elsewhere or later; `cancel`/`modify`/`auth`: give up),
//! plus a `<condition xmlns='urn:spine:1'/>` child that names the precise Spine reason. The
//! table lives in [`Condition::xmpp`] and is the one PROTOCOL.md documents.

use std::fmt;
use std::str::FromStr;

use minidom::Element;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::error::ParseError;
use crate::xml::{Builder, Reader};
use crate::NS;

/// A Spine error condition: the `urn:spine:1` child of a stanza `<error/>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// No free slot on the agent. Retry on another agent.
    Busy,
    /// The agent is shutting down and takes no new jobs. Retry on another agent.
    Draining,
    /// The dispatcher's queue for the capability is full. Retry later.
    QueueFull,
    /// Nobody here offers the capability.
    UnknownCapability,
    /// No capable agent appeared within the dispatcher's wait.
    NoAgent,
    /// Status or cancel of a job id nobody knows.
    UnknownJob,
    /// The job's arguments are wrong (the `field` attribute may name the argument).
    BadArguments,
    /// The payload does not follow the protocol.
    Malformed,
    /// A payload is over a size limit (the `max` attribute may give it in bytes).
    TooLarge,
    /// The sender may not do this.
    NotAuthorized,
    /// The job's deadline passed; its handler was cancelled.
    DeadlineExceeded,
    /// The job was cancelled.
    Cancelled,
    /// The handler failed and retrying will not help.
    Failed,
    /// The handler failed transiently; another attempt may succeed.
    Retryable,
    /// The payload is in a Spine namespace of another major version.
    UnsupportedVersion,
    /// The agent could not fetch a job's input by reference (protocol 1.1); the dispatcher
    /// sends the same attempt again with the input in chunks.
    FetchFailed,
    /// The dispatcher's blob store is over its disk quota (protocol 1.1). Retry later.
    StorageFull,
    /// The submitter is over its rate limit (the HTTP API's condition; over XMPP a
    /// dispatcher sends `queue-full` to submitters, which speak 1.0). Retry later.
    RateLimited,
}

impl Condition {
    /// Every condition, in table order.
    pub const ALL: [Condition; 18] = [
        Condition::Busy,
        Condition::Draining,
        Condition::QueueFull,
        Condition::UnknownCapability,
        Condition::NoAgent,
        Condition::UnknownJob,
        Condition::BadArguments,
        Condition::Malformed,
        Condition::TooLarge,
        Condition::NotAuthorized,
        Condition::DeadlineExceeded,
        Condition::Cancelled,
        Condition::Failed,
        Condition::Retryable,
        Condition::UnsupportedVersion,
        Condition::FetchFailed,
        Condition::StorageFull,
        Condition::RateLimited,
    ];

    /// The element name of this condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Busy => "busy",
            Condition::Draining => "draining",
            Condition::QueueFull => "queue-full",
            Condition::UnknownCapability => "unknown-capability",
            Condition::NoAgent => "no-agent",
            Condition::UnknownJob => "unknown-job",
            Condition::BadArguments => "bad-arguments",
            Condition::Malformed => "malformed",
            Condition::TooLarge => "too-large",
            Condition::NotAuthorized => "not-authorized",
            Condition::DeadlineExceeded => "deadline-exceeded",
            Condition::Cancelled => "cancelled",
            Condition::Failed => "failed",
            Condition::Retryable => "retryable",
            Condition::UnsupportedVersion => "unsupported-version",
            Condition::FetchFailed => "fetch-failed",
            Condition::StorageFull => "storage-full",
            Condition::RateLimited => "rate-limited",
        }
    }

    /// The XMPP defined condition and error type this condition travels with.
    pub fn xmpp(self) -> (DefinedCondition, ErrorType) {
        use DefinedCondition as D;
        use ErrorType as T;
        match self {
            Condition::Busy => (D::ResourceConstraint, T::Wait),
            Condition::Draining => (D::ServiceUnavailable, T::Wait),
            Condition::QueueFull => (D::ResourceConstraint, T::Wait),
            Condition::UnknownCapability => (D::ItemNotFound, T::Cancel),
            Condition::NoAgent => (D::ItemNotFound, T::Cancel),
            Condition::UnknownJob => (D::ItemNotFound, T::Cancel),
            Condition::BadArguments => (D::BadRequest, T::Modify),
            Condition::Malformed => (D::BadRequest, T::Modify),
            Condition::TooLarge => (D::NotAcceptable, T::Modify),
            Condition::NotAuthorized => (D::Forbidden, T::Auth),
            Condition::DeadlineExceeded => (D::RemoteServerTimeout, T::Cancel),
            Condition::Cancelled => (D::UndefinedCondition, T::Cancel),
            Condition::Failed => (D::UndefinedCondition, T::Cancel),
            Condition::Retryable => (D::InternalServerError, T::Wait),
            Condition::UnsupportedVersion => (D::FeatureNotImplemented, T::Cancel),
            Condition::FetchFailed => (D::RecipientUnavailable, T::Wait),
            Condition::StorageFull => (D::ResourceConstraint, T::Wait),
            Condition::RateLimited => (D::ResourceConstraint, T::Wait),
        }
    }

    /// Whether another attempt (elsewhere or later) may succeed.
    pub fn is_retryable(self) -> bool {
        self.xmpp().1 == ErrorType::Wait
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stored as its wire name (`busy`, `no-agent`, …).
impl serde::Serialize for Condition {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Condition {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Condition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Condition::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("'{s}' is not a Spine error condition"))
    }
}

crate::xml::attr_via_str!(Condition);

/// A Spine error: condition, optional human text and the condition's optional details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpineError {
    /// What went wrong.
    pub condition: Condition,
    /// A message for people (e.g. a handler's error or the tail of a program's stderr).
    pub text: Option<String>,
    /// For `bad-arguments`: the argument at fault.
    pub field: Option<String>,
    /// For `too-large`: the limit in bytes.
    pub max: Option<u64>,
    /// For `unsupported-version`: the namespace(s) the sender of the error speaks.
    pub supported: Option<String>,
    /// For a refusal that passes (`queue-full`, `rate-limited`): when to try again, in
    /// seconds. Not an attribute on the wire (1.0 has none): a dispatcher says it in the
    /// `<text>`; the HTTP API sends it as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl SpineError {
    /// An error with the condition only.
    pub fn new(condition: Condition) -> Self {
        SpineError {
            condition,
            text: None,
            field: None,
            max: None,
            supported: None,
            retry_after: None,
        }
    }

    /// The same error saying when to try again (seconds).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The same error with a human-readable text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// The same error naming the argument at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The `<condition xmlns='urn:spine:1'/>` element carried inside `<error/>`.
    pub fn condition_element(&self) -> Element {
        Builder::new(self.condition.as_str())
            .opt("field", self.field.as_deref())
            .opt("max", self.max)
            .opt("supported", self.supported.as_deref())
            .build()
    }

    /// Reads the Spine condition element of an `<error/>`.
    pub fn from_condition_element(el: &Element, text: Option<String>) -> Result<Self, ParseError> {
        let condition: Condition = if el.ns() == NS {
            el.name().parse().map_err(|reason| ParseError::Invalid {
                element: "error",
                reason,
            })?
        } else {
            return Err(crate::xml::unknown_child("error", el));
        };
        let mut r = Reader::unchecked(el, condition.as_str());
        let field = r.opt::<String>("field")?;
        let max = r.opt::<u64>("max")?;
        let supported = r.opt::<String>("supported")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(SpineError {
            condition,
            text,
            field,
            max,
            supported,
            retry_after: None,
        })
    }

    /// Reads the Spine error in a stanza error, if it carries one.
    ///
    /// `Ok(None)`: a plain XMPP error (from a server or a non-Spine entity); use [`classify`].
    pub fn from_stanza_error(err: &StanzaError) -> Result<Option<Self>, ParseError> {
        match &err.other {
            Some(el) if el.ns() == NS => {
                let text = err.texts.values().next().cloned();
                Self::from_condition_element(el, text).map(Some)
            }
            _ => Ok(None),
        }
    }
}

impl fmt::Display for SpineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.condition)?;
        if let Some(field) = &self.field {
            write!(f, " (field '{field}')")?;
        }
        if let Some(text) = &self.text {
            write!(f, ": {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpineError {}

impl From<SpineError> for StanzaError {
    fn from(e: SpineError) -> StanzaError {
        let (defined_condition, type_) = e.condition.xmpp();
        let mut err = match &e.text {
            Some(t) => StanzaError::new(type_, defined_condition, "en", t.clone()),
            None => StanzaError {
                type_,
                by: None,
                defined_condition,
                texts: Default::default(),
                other: None,
            },
        };
        err.other = Some(e.condition_element());
        err
    }
}

/// What the sender of a request should do after receiving a stanza error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The recipient is gone (offline, unknown): treat as agent loss, retry elsewhere.
    Gone,
    /// Transient: retry elsewhere or later.
    Retry,
    /// Final: do not retry.
    GiveUp,
}

/// Classifies any stanza error, Spine's or a server's, per PROTOCOL.md "Errors".
pub fn classify(err: &StanzaError) -> Disposition {
    let spine = matches!(&err.other, Some(el) if el.ns() == NS);
    if !spine
        && matches!(
            err.defined_condition,
            DefinedCondition::ServiceUnavailable
                | DefinedCondition::RecipientUnavailable
                | DefinedCondition::RemoteServerNotFound
                | DefinedCondition::ItemNotFound
                | DefinedCondition::Gone { .. }
        )
    {
        return Disposition::Gone;
    }
    match err.type_ {
        ErrorType::Wait => Disposition::Retry,
        _ => Disposition::GiveUp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BUSY: &str = "<error xmlns='jabber:client' type='wait'>\
        <resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
        <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>all 8 slots are busy</text>\
        <busy xmlns='urn:spine:1'/></error>";

    #[test]
    fn parse_literal_busy() {
        let el: Element = BUSY.parse().unwrap();
        let se = StanzaError::try_from(el).unwrap();
        let e = SpineError::from_stanza_error(&se).unwrap().unwrap();
        assert_eq!(e.condition, Condition::Busy);
        assert_eq!(e.text.as_deref(), Some("all 8 slots are busy"));
        assert_eq!(classify(&se), Disposition::Retry);
    }

    #[test]
    fn table_is_consistent() {
        for c in Condition::ALL {
            assert_eq!(c.as_str().parse::<Condition>(), Ok(c));
            let retry = matches!(
                c,
                Condition::Busy
                    | Condition::Draining
                    | Condition::QueueFull
                    | Condition::Retryable
                    | Condition::FetchFailed
                    | Condition::StorageFull
                    | Condition::RateLimited
            );
            assert_eq!(c.is_retryable(), retry, "{c}");
            let se = StanzaError::from(SpineError::new(c));
            let expected = if retry {
                Disposition::Retry
            } else {
                Disposition::GiveUp
            };
            assert_eq!(classify(&se), expected, "{c}");
        }
        assert!("nope".parse::<Condition>().is_err());
    }

    #[test]
    fn server_errors_mean_gone() {
        let se = StanzaError::new(
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "en",
            "offline",
        );
        assert_eq!(classify(&se), Disposition::Gone);
        assert_eq!(SpineError::from_stanza_error(&se), Ok(None));
    }

    #[test]
    fn rejects_bad_condition_elements() {
        for bad in [
            "<frobnicated xmlns='urn:spine:1'/>",
            "<busy xmlns='urn:spine:1' extra='1'/>",
            "<too-large xmlns='urn:spine:1' max='many'/>",
            "<busy xmlns='urn:spine:1'>text</busy>",
            "<busy xmlns='urn:other'/>",
        ] {
            let el: Element = bad.parse().unwrap();
            assert!(
                SpineError::from_condition_element(&el, None).is_err(),
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn roundtrip(idx in 0usize..Condition::ALL.len(), text in proptest::option::of("[ -~]{1,40}"),
                     field in proptest::option::of("[a-z]{1,10}"), max in proptest::option::of(any::<u64>())) {
            let e = SpineError { condition: Condition::ALL[idx], text, field, max, supported: None, retry_after: None };
            let se = StanzaError::from(e.clone());
            let el: Element = se.into();
            let back = StanzaError::try_from(el).unwrap();
            prop_assert_eq!(SpineError::from_stanza_error(&back).unwrap(), Some(e));
        }
    }
}
