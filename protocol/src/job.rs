//! Job payloads between dispatcher and agent: `<job/>` (IQ set) answered by `<result/>` (IQ
//! result) or a stanza error, `<cancel/>`, the headline messages `<progress/>` and
//! `<partial/>`, and `<chunk/>` for payloads over the inline limit.

use minidom::Element;
use xmpp_parsers::iq::{IqResultPayload, IqSetPayload};
use xmpp_parsers::message::MessagePayload;

use crate::data::{decode_base64, encode_base64, Args, Data, Mime, INLINE_LIMIT};
use crate::error::ParseError;
use crate::names::{BlobId, CapabilityName, JobId};
use crate::xml::{set_once, unknown_child, Builder, Reader};

/// `<job/>`: run one attempt of a job. Sent by a dispatcher to an agent in an IQ set; the IQ's
/// reply is the job's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Globally unique; the agent runs a job id once.
    pub id: JobId,
    /// What to run.
    pub capability: CapabilityName,
    /// 1 for the first attempt.
    pub attempt: u64,
    /// Time left until the deadline when sent, in milliseconds.
    pub deadline_ms: Option<u64>,
    /// Who submitted the job (JID or `http:<token>`), for logs and audit.
    pub submitter: Option<String>,
    /// Whether the dispatcher wants progress messages (and one when the job starts).
    pub progress: bool,
    /// Arguments (a JSON object; empty when absent).
    pub args: Args,
    /// Input data.
    pub input: Option<Data>,
    /// Protocol 1.1, to an agent that `serves` (PROTOCOL.md §13.5): keep a large output and
    /// serve it, instead of uploading it to the dispatcher.
    pub keep: Option<Keep>,
}

/// `<keep key='…'/>`: an agent that serves outputs keeps this job's output when it is over
/// the inline limit, serves it at its `serves` URL, and answers with the reference form with
/// that one source. `key` checks the signed URLs to its blobs
/// ([`crate::signing::UrlKey::for_holder`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Keep {
    /// The agent's URL key (32 bytes; base64 on the wire).
    pub key: [u8; 32],
}

impl std::fmt::Debug for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keep { key: … }")
    }
}

impl Keep {
    fn parse(el: &Element) -> Result<Keep, ParseError> {
        let mut r = Reader::new(el, "keep")?;
        let key: String = r.req("key")?;
        let key = decode_base64(&key, "keep")
            .ok()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| r.invalid("key", "expected 32 bytes in base64"))?;
        r.no_text()?;
        r.finish()?;
        Ok(Keep { key })
    }

    fn to_element(&self) -> Element {
        Builder::new("keep")
            .attr("key", encode_base64(&self.key).as_str())
            .build()
    }
}

impl Job {
    /// A first attempt with no arguments, input or deadline.
    pub fn new(id: JobId, capability: CapabilityName) -> Self {
        Job {
            id,
            capability,
            attempt: 1,
            deadline_ms: None,
            submitter: None,
            progress: false,
            args: Args::default(),
            input: None,
            keep: None,
        }
    }
}

/// Reads the `<args>` and `<input>` children shared by `<job>` and `<submit>`.
fn read_args_input(
    r: &Reader<'_>,
    args: &mut Option<Args>,
    input: &mut Option<Data>,
) -> Result<(), ParseError> {
    for c in r.children() {
        let c = c?;
        match c.name() {
            "args" => set_once(args, Args::parse(c, "args")?, r.name, "args")?,
            "input" => set_once(input, Data::parse(c, "input")?, r.name, "input")?,
            _ => return Err(unknown_child(r.name, c)),
        }
    }
    Ok(())
}

pub(crate) fn args_input_children(args: &Args, input: &Option<Data>) -> Vec<Element> {
    let mut v = Vec::new();
    if !args.is_empty() {
        v.push(args.to_element("args"));
    }
    if let Some(i) = input {
        v.push(i.to_element("input"));
    }
    v
}

pub(crate) fn parse_args_input(r: &Reader<'_>) -> Result<(Args, Option<Data>), ParseError> {
    r.no_text()?;
    let (mut args, mut input) = (None, None);
    read_args_input(r, &mut args, &mut input)?;
    Ok((args.unwrap_or_default(), input))
}

fn check_attempt(r: &Reader<'_>, attempt: u64) -> Result<u64, ParseError> {
    if attempt == 0 {
        return Err(r.invalid("attempt", "attempts count from 1"));
    }
    Ok(attempt)
}

impl TryFrom<Element> for Job {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "job")?;
        let id = r.req("id")?;
        let capability = r.req("capability")?;
        let attempt = r.req("attempt")?;
        let attempt = check_attempt(&r, attempt)?;
        let deadline_ms = r.opt("deadline-ms")?;
        let submitter = r.opt("submitter")?;
        let progress = r.opt("progress")?.unwrap_or(false);
        r.no_text()?;
        let (mut args, mut input, mut keep) = (None, None, None);
        for c in r.children() {
            let c = c?;
            match c.name() {
                "args" => set_once(&mut args, Args::parse(c, "args")?, "job", "args")?,
                "input" => set_once(&mut input, Data::parse(c, "input")?, "job", "input")?,
                "keep" => set_once(&mut keep, Keep::parse(c)?, "job", "keep")?,
                _ => return Err(unknown_child("job", c)),
            }
        }
        let args = args.unwrap_or_default();
        if let Some(Data::Ref(d)) = &input {
            if d.sources.is_empty() {
                return Err(ParseError::MissingChild {
                    element: "input",
                    child: "sources",
                });
            }
        }
        r.finish()?;
        Ok(Job {
            id,
            capability,
            attempt,
            deadline_ms,
            submitter,
            progress,
            args,
            input,
            keep,
        })
    }
}

impl From<Job> for Element {
    fn from(j: Job) -> Element {
        Builder::new("job")
            .attr("id", j.id.as_str())
            .attr("capability", j.capability.as_str())
            .attr("attempt", j.attempt)
            .opt("deadline-ms", j.deadline_ms)
            .opt("submitter", j.submitter.as_deref())
            .opt("progress", j.progress.then_some(true))
            .children(args_input_children(&j.args, &j.input))
            .children(j.keep.as_ref().map(Keep::to_element))
            .build()
    }
}

impl IqSetPayload for Job {}

/// `<result/>`: a job attempt's successful outcome (IQ result of the job IQ; also inside
/// `<job-status>`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobResult {
    /// The job.
    pub job: JobId,
    /// The attempt that produced it.
    pub attempt: u64,
    /// How long the handler ran, in milliseconds.
    pub elapsed_ms: Option<u64>,
    /// Result metadata (a JSON object; empty when absent).
    pub meta: Args,
    /// Output data.
    pub output: Option<Data>,
}

impl TryFrom<Element> for JobResult {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "result")?;
        let job = r.req("job")?;
        let attempt = r.req("attempt")?;
        let attempt = check_attempt(&r, attempt)?;
        let elapsed_ms = r.opt("elapsed-ms")?;
        r.no_text()?;
        let (mut meta, mut output) = (None, None);
        for c in r.children() {
            let c = c?;
            match c.name() {
                "meta" => set_once(&mut meta, Args::parse(c, "meta")?, "result", "meta")?,
                "output" => set_once(&mut output, Data::parse(c, "output")?, "result", "output")?,
                _ => return Err(unknown_child("result", c)),
            }
        }
        if let Some(Data::Ref(d)) = &output {
            if d.sources.len() > 1 {
                return Err(ParseError::Invalid {
                    element: "output",
                    reason: "a result's reference has no <sources> (its bytes are those PUT to \
                             the job attempt's upload slot) or one (the URL where the agent \
                             keeps them)"
                        .into(),
                });
            }
        }
        r.finish()?;
        Ok(JobResult {
            job,
            attempt,
            elapsed_ms,
            meta: meta.unwrap_or_default(),
            output,
        })
    }
}

impl From<JobResult> for Element {
    fn from(res: JobResult) -> Element {
        let mut b = Builder::new("result")
            .attr("job", res.job.as_str())
            .attr("attempt", res.attempt)
            .opt("elapsed-ms", res.elapsed_ms);
        if !res.meta.is_empty() {
            b = b.child(res.meta.to_element("meta"));
        }
        if let Some(o) = &res.output {
            b = b.child(o.to_element("output"));
        }
        b.build()
    }
}

impl IqResultPayload for JobResult {}

/// Implements parse and serialise for a payload that is one empty element with a `job`
/// attribute.
macro_rules! job_ref_payload {
    ($(#[$doc:meta])* $t:ident, $name:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $t {
            /// The job.
            pub job: JobId,
        }

        impl TryFrom<Element> for $t {
            type Error = ParseError;
            fn try_from(el: Element) -> Result<Self, ParseError> {
                let mut r = Reader::new(&el, $name)?;
                let job = r.req("job")?;
                r.no_text()?;
                r.no_children()?;
                r.finish()?;
                Ok($t { job })
            }
        }

        impl From<$t> for Element {
            fn from(c: $t) -> Element {
                Builder::new($name).attr("job", c.job.as_str()).build()
            }
        }
    };
}
pub(crate) use job_ref_payload;

job_ref_payload!(
    /// `<cancel/>`: stop a job (dispatcher → agent, or submitter → dispatcher), IQ set.
    /// Answered by an empty result, also when the job already ended.
    Cancel,
    "cancel"
);
impl IqSetPayload for Cancel {}

/// `<progress/>`: how far a job attempt is (headline message, best-effort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The job.
    pub job: JobId,
    /// The attempt reporting.
    pub attempt: u64,
    /// 0 to 100.
    pub percent: Option<u8>,
    /// A short message for people.
    pub message: Option<String>,
}

impl TryFrom<Element> for Progress {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "progress")?;
        let job = r.req("job")?;
        let attempt = r.req("attempt")?;
        let attempt = check_attempt(&r, attempt)?;
        let percent = match r.opt::<u64>("percent")? {
            Some(p) if p > 100 => return Err(r.invalid("percent", "must be 0 to 100")),
            Some(p) => Some(p as u8),
            None => None,
        };
        r.no_children()?;
        r.finish()?;
        let text = el.text();
        Ok(Progress {
            job,
            attempt,
            percent,
            message: (!text.is_empty()).then_some(text),
        })
    }
}

impl From<Progress> for Element {
    fn from(p: Progress) -> Element {
        Builder::new("progress")
            .attr("job", p.job.as_str())
            .attr("attempt", p.attempt)
            .opt("percent", p.percent.map(u64::from))
            .text(p.message.unwrap_or_default())
            .build()
    }
}

impl MessagePayload for Progress {}

/// `<partial/>`: one piece of a streamed result (headline message, best-effort; `seq` counts
/// from 0 so gaps show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    /// The job.
    pub job: JobId,
    /// The attempt reporting.
    pub attempt: u64,
    /// Position in the stream of this attempt, from 0.
    pub seq: u64,
    /// MIME type.
    pub mime: Option<String>,
    /// The bytes (at most [`INLINE_LIMIT`]).
    pub bytes: Vec<u8>,
}

impl TryFrom<Element> for Partial {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "partial")?;
        let job = r.req("job")?;
        let attempt = r.req("attempt")?;
        let attempt = check_attempt(&r, attempt)?;
        let seq = r.req("seq")?;
        let mime = r.opt::<Mime>("type")?.map(|m| m.0);
        r.no_children()?;
        r.finish()?;
        let bytes = decode_base64(&el.text(), "partial")?;
        Ok(Partial {
            job,
            attempt,
            seq,
            mime,
            bytes,
        })
    }
}

impl From<Partial> for Element {
    fn from(p: Partial) -> Element {
        Builder::new("partial")
            .attr("job", p.job.as_str())
            .attr("attempt", p.attempt)
            .attr("seq", p.seq)
            .opt("type", p.mime.as_deref())
            .text(encode_base64(&p.bytes))
            .build()
    }
}

impl MessagePayload for Partial {}

/// `<chunk/>`: bytes `offset..offset+len` of a blob of `total` bytes (IQ set, acknowledged by
/// an empty result). Idempotent: a resent chunk rewrites the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The blob.
    pub blob: BlobId,
    /// Where these bytes start.
    pub offset: u64,
    /// The blob's whole length.
    pub total: u64,
    /// At most [`INLINE_LIMIT`] bytes; empty only for an empty blob.
    pub bytes: Vec<u8>,
}

impl TryFrom<Element> for Chunk {
    type Error = ParseError;
    fn try_from(el: Element) -> Result<Self, ParseError> {
        let mut r = Reader::new(&el, "chunk")?;
        let blob = r.req("blob")?;
        let offset: u64 = r.req("offset")?;
        let total: u64 = r.req("total")?;
        r.no_children()?;
        let bytes = decode_base64(&el.text(), "chunk")?;
        let end = offset.checked_add(bytes.len() as u64);
        if end.is_none_or(|end| end > total) {
            return Err(r.invalid(
                "offset",
                format!(
                    "offset {offset} + {} bytes runs past total {total}",
                    bytes.len()
                ),
            ));
        }
        if bytes.is_empty() && total != 0 {
            return Err(ParseError::Invalid {
                element: "chunk",
                reason: "an empty chunk is allowed only for an empty blob".to_owned(),
            });
        }
        r.finish()?;
        Ok(Chunk {
            blob,
            offset,
            total,
            bytes,
        })
    }
}

impl From<Chunk> for Element {
    fn from(c: Chunk) -> Element {
        Builder::new("chunk")
            .attr("blob", c.blob.as_str())
            .attr("offset", c.offset)
            .attr("total", c.total)
            .text(encode_base64(&c.bytes))
            .build()
    }
}

impl IqSetPayload for Chunk {}

/// Cuts `bytes` into the chunks of blob `blob`, each at most [`INLINE_LIMIT`] bytes.
pub fn chunks(blob: &BlobId, bytes: &[u8]) -> Vec<Chunk> {
    (0..chunk_count(bytes.len()))
        .map(|i| chunk_at(blob, bytes, i))
        .collect()
}

/// How many chunks [`chunks`] cuts `len` bytes into: an empty blob is still one (empty) chunk,
/// so that its receiver learns its size.
pub(crate) fn chunk_count(len: usize) -> usize {
    len.div_ceil(INLINE_LIMIT).max(1)
}

/// Chunk `index` of [`chunks`] alone, so that an upload can cut its chunks as it sends them
/// ([`crate::upload::UploadWindow`]) instead of holding a second copy of the bytes.
pub(crate) fn chunk_at(blob: &BlobId, bytes: &[u8], index: usize) -> Chunk {
    let start = (index * INLINE_LIMIT).min(bytes.len());
    let end = (start + INLINE_LIMIT).min(bytes.len());
    Chunk {
        blob: blob.clone(),
        offset: start as u64,
        total: bytes.len() as u64,
        bytes: bytes[start..end].to_vec(),
    }
}
