//! Events for a dispatcher's rules over XMPP (PROTOCOL.md §11.9, docs/events.md): `<event/>`
//! (IQ set, submitter → dispatcher) carries one CloudEvent — its attributes and its data as
//! JSON (`<json/>`) or bytes (`<data/>`); `<fired/>` (IQ result) answers with the jobs the
//! rules made of it, once they are stored. An agent's watcher (§11.9.1) sends larger bytes by
//! reference: it asks for an upload URL with `<request-event-slot/>`, answered with
//! `<event-slot/>`, puts the bytes there over HTTP and names them in the event's `<data>`.

use minidom::Element;
use xmpp_parsers::iq::{IqGetPayload, IqResultPayload, IqSetPayload};

use crate::client::JobState;
use crate::data::{hex, Data, DataRef, Mime, Sha256Hex, SourceUrl, INLINE_LIMIT};
use crate::error::ParseError;
use crate::names::JobId;
use crate::xml::{set_once, unknown_child, Builder, Reader};

/// Longest `id`, `source`, `type` or `subject`, in bytes.
pub const MAX_EVENT_ATTRIBUTE: usize = 1024;

/// An event's data.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EventData {
    /// None.
    #[default]
    None,
    /// A JSON value (`<json>`), any type.
    Json(serde_json::Value),
    /// Bytes with their MIME type (`<data>`, base64, inline only).
    Bytes {
        /// Their type.
        mime: Option<String>,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Bytes the sender put to an event slot (`<data>` in the reference form without
    /// sources, §11.9.1): their size, SHA-256 and type; `sources` is empty.
    Ref(DataRef),
}

/// `<event/>`: one event (CloudEvents 1.0 attributes).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique within its source: the same source and id sent again make no second job.
    pub id: String,
    /// Who produced it (a URI reference).
    pub source: String,
    /// What happened.
    pub ty: String,
    /// What it is about.
    pub subject: Option<String>,
    /// When it happened (RFC 3339), as sent: the dispatcher checks it.
    pub time: Option<String>,
    /// Its data.
    pub data: EventData,
}

impl TryFrom<Element> for Event {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "event")?;
        let id: String = r.req("id")?;
        let source: String = r.req("source")?;
        let ty: String = r.req("type")?;
        let subject: Option<String> = r.opt("subject")?;
        let time: Option<String> = r.opt("time")?;
        for (attr, v) in [
            ("id", Some(&id)),
            ("source", Some(&source)),
            ("type", Some(&ty)),
            ("subject", subject.as_ref()),
        ] {
            if v.is_some_and(|v| v.is_empty() || v.len() > MAX_EVENT_ATTRIBUTE) {
                return Err(r.invalid(attr, format!("must be 1 to {MAX_EVENT_ATTRIBUTE} bytes")));
            }
        }
        r.no_text()?;
        let mut data = None;
        for c in r.children() {
            let c = c?;
            let d = match c.name() {
                "json" => {
                    let cr = Reader::unchecked(c, "json");
                    cr.no_children()?;
                    cr.finish()?;
                    let text = c.text();
                    if text.len() > INLINE_LIMIT {
                        return Err(ParseError::TooLarge {
                            element: "json",
                            limit: INLINE_LIMIT as u64,
                            actual: text.len() as u64,
                        });
                    }
                    EventData::Json(serde_json::from_str(&text).map_err(|e| {
                        ParseError::InvalidJson {
                            element: "json",
                            reason: e.to_string(),
                        }
                    })?)
                }
                "data" => match Data::parse(c, "data")? {
                    Data::Inline { mime, bytes } => EventData::Bytes { mime, bytes },
                    Data::Ref(r) if r.sources.is_empty() => EventData::Ref(r),
                    Data::Ref(_) => {
                        return Err(ParseError::Invalid {
                            element: "data",
                            reason: "an event's data by reference names no <sources>: it is \
                                     the bytes put to an event slot (request-event-slot)"
                                .into(),
                        })
                    }
                    Data::Blob(_) => {
                        return Err(ParseError::Invalid {
                            element: "data",
                            reason: "an event's data is inline (base64) or by reference to \
                                     an event slot, not a blob of chunks"
                                .into(),
                        })
                    }
                },
                _ => return Err(unknown_child("event", c)),
            };
            set_once(&mut data, d, "event", "json or data")?;
        }
        r.finish()?;
        Ok(Event {
            id,
            source,
            ty,
            subject,
            time,
            data: data.unwrap_or_default(),
        })
    }
}

impl From<Event> for Element {
    fn from(e: Event) -> Element {
        let b = Builder::new("event")
            .attr("id", e.id)
            .attr("source", e.source)
            .attr("type", e.ty)
            .opt("subject", e.subject)
            .opt("time", e.time);
        match e.data {
            EventData::None => b.build(),
            EventData::Json(v) => b
                .child(Builder::new("json").text(v.to_string()).build())
                .build(),
            EventData::Bytes { mime, bytes } => b
                .child(Data::Inline { mime, bytes }.to_element("data"))
                .build(),
            EventData::Ref(r) => b.child(Data::Ref(r).to_element("data")).build(),
        }
    }
}

impl IqSetPayload for Event {}

/// One job a rule made of an event, in `<fired/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiredJob {
    /// The rule.
    pub rule: String,
    /// The job.
    pub job: JobId,
    /// Its state when the answer was sent.
    pub state: JobState,
}

/// `<fired/>`: the jobs the rules made of an event (none when it matched no rule), stored
/// before this answer; the same event sent again is answered with the same jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The event's id.
    pub event: String,
    /// The jobs, in the order of the rules.
    pub jobs: Vec<FiredJob>,
}

impl TryFrom<Element> for Fired {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "fired")?;
        let event = r.req("event")?;
        r.no_text()?;
        let mut jobs = Vec::new();
        for c in r.children() {
            let c = c?;
            if c.name() != "job" {
                return Err(unknown_child("fired", c));
            }
            let mut jr = Reader::unchecked(c, "job");
            let rule = jr.req("rule")?;
            let job = jr.req("id")?;
            let state = jr.req("state")?;
            jr.no_text()?;
            jr.no_children()?;
            jr.finish()?;
            jobs.push(FiredJob { rule, job, state });
        }
        r.finish()?;
        Ok(Fired { event, jobs })
    }
}

impl From<Fired> for Element {
    fn from(f: Fired) -> Element {
        Builder::new("fired")
            .attr("event", f.event)
            .children(f.jobs.into_iter().map(|j| {
                Builder::new("job")
                    .attr("rule", j.rule)
                    .attr("id", j.job.as_str())
                    .attr("state", j.state)
                    .build()
            }))
            .build()
    }
}

impl IqResultPayload for Fired {}

/// `<request-event-slot/>`: where may an agent put `size` bytes with this SHA-256, to name
/// in an event's data (§11.9.1)? Agent → dispatcher, IQ get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEventSlot {
    /// Length in bytes.
    pub size: u64,
    /// SHA-256 of the bytes; the dispatcher refuses a `PUT` of other bytes.
    pub sha256: [u8; 32],
    /// MIME type, if known.
    pub mime: Option<String>,
}

impl TryFrom<Element> for RequestEventSlot {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "request-event-slot")?;
        let size = r.req("size")?;
        let sha256 = r.req::<Sha256Hex>("sha256")?.0;
        let mime = r.opt::<Mime>("type")?.map(|m| m.0);
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(RequestEventSlot { size, sha256, mime })
    }
}

impl From<RequestEventSlot> for Element {
    fn from(s: RequestEventSlot) -> Element {
        Builder::new("request-event-slot")
            .attr("size", s.size)
            .attr("sha256", hex(&s.sha256))
            .opt("type", s.mime.as_deref())
            .build()
    }
}

impl IqGetPayload for RequestEventSlot {}

/// `<event-slot/>`: the answer to [`RequestEventSlot`]: a signed URL to `PUT` the bytes to,
/// valid for `expires_ms` milliseconds, opaque to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSlot {
    /// Where to `PUT` the bytes (an `http://` or `https://` URL).
    pub put: String,
    /// How long the URL stays valid, in milliseconds.
    pub expires_ms: u64,
}

impl TryFrom<Element> for EventSlot {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "event-slot")?;
        let put = r.req::<SourceUrl>("put")?.0;
        let expires_ms = r.req("expires-ms")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(EventSlot { put, expires_ms })
    }
}

impl From<EventSlot> for Element {
    fn from(s: EventSlot) -> Element {
        Builder::new("event-slot")
            .attr("put", s.put)
            .attr("expires-ms", s.expires_ms)
            .build()
    }
}

impl IqResultPayload for EventSlot {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<Event, ParseError> {
        Event::try_from(xml.parse::<Element>().unwrap())
    }

    #[test]
    fn an_event_round_trips_with_json_bytes_or_no_data() {
        for data in [
            EventData::None,
            EventData::Json(serde_json::json!({"n": 9007199254740993u64, "s": "<&>"})),
            EventData::Bytes {
                mime: Some("text/plain".into()),
                bytes: b"raw bytes".to_vec(),
            },
            EventData::Ref(DataRef {
                size: 3,
                sha256: [7; 32],
                mime: Some("image/png".into()),
                sources: Vec::new(),
            }),
        ] {
            let e = Event {
                id: "u-1".into(),
                source: "/uploads".into(),
                ty: "com.example.upload.created".into(),
                subject: Some("photos/cat.jpg".into()),
                time: Some("2026-11-26T10:00:00Z".into()),
                data,
            };
            let el: Element = e.clone().into();
            assert_eq!(Event::try_from(el).unwrap(), e);
        }
        let f = Fired {
            event: "u-1".into(),
            jobs: vec![FiredJob {
                rule: "thumbs".into(),
                job: "01a2".parse().unwrap(),
                state: JobState::Queued,
            }],
        };
        assert_eq!(Fired::try_from(Element::from(f.clone())).unwrap(), f);
        let r = RequestEventSlot {
            size: 1 << 40,
            sha256: [9; 32],
            mime: None,
        };
        assert_eq!(
            RequestEventSlot::try_from(Element::from(r.clone())).unwrap(),
            r
        );
        let s = EventSlot {
            put: "https://d.example.com/v1/uploads/events?x=1".into(),
            expires_ms: 300_000,
        };
        assert_eq!(EventSlot::try_from(Element::from(s.clone())).unwrap(), s);
    }

    #[test]
    fn bad_events_are_refused_naming_what_is_wrong() {
        let ns = "xmlns='urn:spine:1'";
        let e = parse(&format!("<event {ns} source='/s' type='t'/>")).unwrap_err();
        assert!(
            matches!(
                e,
                ParseError::MissingAttribute {
                    attribute: "id",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(&format!("<event {ns} id='' source='/s' type='t'/>")).unwrap_err();
        assert!(
            matches!(
                e,
                ParseError::InvalidAttribute {
                    attribute: "id",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(&format!(
            "<event {ns} id='1' source='/s' type='t'><json>{{nope</json></event>"
        ))
        .unwrap_err();
        assert!(
            matches!(
                e,
                ParseError::InvalidJson {
                    element: "json",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(&format!(
            "<event {ns} id='1' source='/s' type='t'><json>1</json><json>2</json></event>"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("json or data"), "{e}");
        let e = parse(&format!(
            "<event {ns} id='1' source='/s' type='t' colour='red'/>"
        ))
        .unwrap_err();
        assert!(matches!(e, ParseError::UnknownAttribute { .. }), "{e}");
    }
}
