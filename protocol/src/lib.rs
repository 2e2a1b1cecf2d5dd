//! Spine's wire protocol: every payload of `docs/PROTOCOL.md` as a Rust type with a strict
//! parser (`TryFrom<minidom::Element>`) and a serialiser (`From<T> for Element`), the mapping
//! of Spine error conditions onto XMPP stanza errors, the attribute-filter grammar and the job
//! state model.
//!
//! This crate sits below everything else: the agent, the dispatcher and any client build and
//! read stanzas with it. It does no I/O and knows nothing of tokio or of connections.
//!
//! Parsers are strict: an unknown attribute or child, a value out of range or inline data over
//! [`INLINE_LIMIT`] is a [`ParseError`] naming the element and attribute, never a panic;
//! [`ParseError::to_spine_error`] turns it into the stanza error to send back.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod xml;

pub mod blob;
pub mod client;
pub mod condition;
pub mod data;
pub mod depth;
pub mod disco;
pub mod emit;
pub mod error;
pub mod events;
pub mod filter;
pub mod fragments;
pub mod job;
pub mod names;
pub mod operator;
pub mod presence;
pub mod recall;
pub mod scan;
pub mod signing;
pub mod slot;
pub mod units;
pub mod upload;

pub use client::{
    Accepted, AgentInfo, Agents, Discover, Failure, JobState, JobStatus, Limit, MapReduce, Outcome,
    Status, Strategy, Submit, DEFAULT_FAN_IN, MAX_FAN_IN, MAX_SUBMIT_WAIT_MS,
};
pub use condition::{classify, Condition, Disposition, SpineError};
pub use data::{Args, Attributes, BlobRef, Data, DataRef, INLINE_LIMIT};
pub use error::ParseError;
pub use filter::{Clause, Filter, FilterError, Op};
pub use fragments::{Fragment, FragmentRef, FRAGMENTS_MIME};
pub use job::{chunks, Cancel, Chunk, Job, JobResult, Keep, Partial, Progress};
pub use names::{AttrName, BlobId, CapabilityName, JobId};
pub use operator::{Drain, Undrain};
pub use presence::{
    presence_payloads, Advertise, AgentState, CapLoad, CapabilityAd, DispatcherHello, Load,
    PresencePayloads, ProtocolVersion,
};
pub use recall::{Had, Recall, Recalled, MAX_RECALLED};
pub use slot::{RequestSlot, Slot};
pub use upload::UploadWindow;

/// Bytes as standard base64 text in serde formats: `#[serde(with = "spine_protocol::serde_base64")]`.
pub mod serde_base64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the bytes as base64.
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    /// Reads base64 text; the error says it is not base64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| serde::de::Error::custom(format!("data is not base64: {e}")))
    }
}

/// The namespace of every Spine payload; the major protocol version is its last part.
pub const NS: &str = "urn:spine:1";

/// What every Spine namespace starts with, whatever its version.
pub const NS_PREFIX: &str = "urn:spine:";

/// Any top-level Spine payload. [`parse_payload`] reads one from an element.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// `<advertise/>` (presence)
    Advertise(Advertise),
    /// `<load/>` (presence)
    Load(Load),
    /// `<dispatcher/>` (presence)
    DispatcherHello(DispatcherHello),
    /// `<job/>` (IQ set)
    Job(Job),
    /// `<result/>` (IQ result)
    Result(JobResult),
    /// `<cancel/>` (IQ set)
    Cancel(Cancel),
    /// `<progress/>` (message)
    Progress(Progress),
    /// `<partial/>` (message)
    Partial(Partial),
    /// `<chunk/>` (IQ set)
    Chunk(Chunk),
    /// `<submit/>` (IQ set)
    Submit(Submit),
    /// `<accepted/>` (IQ result)
    Accepted(Accepted),
    /// `<status/>` (IQ get)
    Status(Status),
    /// `<job-status/>` (IQ result or message)
    JobStatus(JobStatus),
    /// `<discover/>` (IQ get)
    Discover(Discover),
    /// `<agents/>` (IQ result)
    Agents(Agents),
    /// `<request-slot/>` (IQ get, protocol 1.1)
    RequestSlot(RequestSlot),
    /// `<slot/>` (IQ result, protocol 1.1)
    Slot(Slot),
    /// `<drain/>` (IQ set, operator)
    Drain(Drain),
    /// `<undrain/>` (IQ set, operator)
    Undrain(Undrain),
    /// `<event/>` (IQ set, submitter → dispatcher)
    Event(events::Event),
    /// `<fired/>` (IQ result)
    Fired(events::Fired),
    /// `<request-event-slot/>` (IQ get, agent → dispatcher)
    RequestEventSlot(events::RequestEventSlot),
    /// `<event-slot/>` (IQ result)
    EventSlot(events::EventSlot),
    /// `<recall/>` (IQ get, dispatcher → agent, protocol 1.2)
    Recall(Recall),
    /// `<recalled/>` (IQ result, protocol 1.2)
    Recalled(Recalled),
}

/// Reads any top-level Spine payload.
///
/// An element outside the `urn:spine:` namespaces is a [`ParseError::WrongElement`]; one in
/// another major version is [`ParseError::UnsupportedVersion`].
pub fn parse_payload(el: Element) -> Result<Payload, ParseError> {
    let ns = el.ns();
    if ns != NS {
        if ns.starts_with(NS_PREFIX) {
            return Err(ParseError::UnsupportedVersion {
                namespace: ns,
                supported: NS,
            });
        }
        return Err(ParseError::WrongElement {
            expected: "a Spine payload",
            namespace: NS,
            found_name: el.name().to_owned(),
            found_ns: ns,
        });
    }
    Ok(match el.name() {
        "advertise" => Payload::Advertise(el.try_into()?),
        "load" => Payload::Load(el.try_into()?),
        "dispatcher" => Payload::DispatcherHello(el.try_into()?),
        "job" => Payload::Job(el.try_into()?),
        "result" => Payload::Result(el.try_into()?),
        "cancel" => Payload::Cancel(el.try_into()?),
        "progress" => Payload::Progress(el.try_into()?),
        "partial" => Payload::Partial(el.try_into()?),
        "chunk" => Payload::Chunk(el.try_into()?),
        "submit" => Payload::Submit(el.try_into()?),
        "accepted" => Payload::Accepted(el.try_into()?),
        "status" => Payload::Status(el.try_into()?),
        "job-status" => Payload::JobStatus(el.try_into()?),
        "discover" => Payload::Discover(el.try_into()?),
        "agents" => Payload::Agents(el.try_into()?),
        "request-slot" => Payload::RequestSlot(el.try_into()?),
        "slot" => Payload::Slot(el.try_into()?),
        "drain" => Payload::Drain(el.try_into()?),
        "undrain" => Payload::Undrain(el.try_into()?),
        "event" => Payload::Event(el.try_into()?),
        "fired" => Payload::Fired(el.try_into()?),
        "request-event-slot" => Payload::RequestEventSlot(el.try_into()?),
        "event-slot" => Payload::EventSlot(el.try_into()?),
        "recall" => Payload::Recall(el.try_into()?),
        "recalled" => Payload::Recalled(el.try_into()?),
        _ => {
            return Err(ParseError::WrongElement {
                expected: "a Spine payload",
                namespace: NS,
                found_name: el.name().to_owned(),
                found_ns: ns,
            })
        }
    })
}

impl From<Payload> for Element {
    fn from(p: Payload) -> Element {
        match p {
            Payload::Advertise(x) => x.into(),
            Payload::Load(x) => x.into(),
            Payload::DispatcherHello(x) => x.into(),
            Payload::Job(x) => x.into(),
            Payload::Result(x) => x.into(),
            Payload::Cancel(x) => x.into(),
            Payload::Progress(x) => x.into(),
            Payload::Partial(x) => x.into(),
            Payload::Chunk(x) => x.into(),
            Payload::Submit(x) => x.into(),
            Payload::Accepted(x) => x.into(),
            Payload::Status(x) => x.into(),
            Payload::JobStatus(x) => x.into(),
            Payload::Discover(x) => x.into(),
            Payload::Agents(x) => x.into(),
            Payload::RequestSlot(x) => x.into(),
            Payload::Slot(x) => x.into(),
            Payload::Drain(x) => x.into(),
            Payload::Undrain(x) => x.into(),
            Payload::Event(x) => x.into(),
            Payload::Fired(x) => x.into(),
            Payload::RequestEventSlot(x) => x.into(),
            Payload::EventSlot(x) => x.into(),
            Payload::Recall(x) => x.into(),
            Payload::Recalled(x) => x.into(),
        }
    }
}

pub use minidom::Element;
