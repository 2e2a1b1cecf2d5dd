//! The upload slot of protocol 1.1 (PROTOCOL.md §13.4): an agent whose output is over the
//! inline limit asks its dispatcher for a signed `PUT` URL with `<request-slot/>` (IQ get),
//! the dispatcher answers `<slot/>`, the agent uploads the bytes over HTTP and then answers the
//! job with the reference form of `<output>` without sources. The XEP-0363 request/slot
//! pattern, answered by the dispatcher itself rather than an upload service.

use minidom::Element;
use xmpp_parsers::iq::{IqGetPayload, IqResultPayload};

use crate::data::{hex, Mime, Sha256Hex};
use crate::error::ParseError;
use crate::names::JobId;
use crate::xml::{Builder, Reader};

/// `<request-slot/>`: where may this job attempt's output of `size` bytes with this SHA-256
/// be uploaded? Agent → the dispatcher that sent the job, IQ get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSlot {
    /// The job whose output this is.
    pub job: JobId,
    /// The attempt that produced it (the slot is valid for this attempt only).
    pub attempt: u64,
    /// Length of the output in bytes.
    pub size: u64,
    /// SHA-256 of the output; the dispatcher refuses a `PUT` of other bytes.
    pub sha256: [u8; 32],
    /// MIME type, if known.
    pub mime: Option<String>,
}

impl TryFrom<Element> for RequestSlot {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "request-slot")?;
        let job = r.req("job")?;
        let attempt: u64 = r.req("attempt")?;
        if attempt == 0 {
            return Err(r.invalid("attempt", "attempts count from 1"));
        }
        let size = r.req("size")?;
        let sha256 = r.req::<Sha256Hex>("sha256")?.0;
        let mime = r.opt::<Mime>("type")?.map(|m| m.0);
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(RequestSlot {
            job,
            attempt,
            size,
            sha256,
            mime,
        })
    }
}

impl From<RequestSlot> for Element {
    fn from(s: RequestSlot) -> Element {
        Builder::new("request-slot")
            .attr("job", s.job.as_str())
            .attr("attempt", s.attempt)
            .attr("size", s.size)
            .attr("sha256", hex(&s.sha256))
            .opt("type", s.mime.as_deref())
            .build()
    }
}

impl IqGetPayload for RequestSlot {}

/// `<slot/>`: the dispatcher's answer to [`RequestSlot`]: a signed URL to `PUT` the bytes to,
/// valid for `expires_ms` milliseconds. The URL is opaque to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The job the slot is for.
    pub job: JobId,
    /// Where to `PUT` the bytes (an `http://` or `https://` URL).
    pub put: String,
    /// How long the URL stays valid, in milliseconds.
    pub expires_ms: u64,
}

impl TryFrom<Element> for Slot {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "slot")?;
        let job = r.req("job")?;
        let put = r.req::<crate::data::SourceUrl>("put")?.0;
        let expires_ms = r.req("expires-ms")?;
        r.no_text()?;
        r.no_children()?;
        r.finish()?;
        Ok(Slot {
            job,
            put,
            expires_ms,
        })
    }
}

impl From<Slot> for Element {
    fn from(s: Slot) -> Element {
        Builder::new("slot")
            .attr("job", s.job.as_str())
            .attr("put", s.put)
            .attr("expires-ms", s.expires_ms)
            .build()
    }
}

impl IqResultPayload for Slot {}
