//! What a submitter asks for: the [`JobSpec`] every front end (HTTP, XMPP, a map/reduce or
//! `all` parent making its steps) builds before [`super::JobTable::submit`], and the checks
//! that refuse a job at submission rather than letting it fail later: its filter parses, its
//! fragment list decodes, its arguments fit a job stanza, its attempts and priority are within
//! its submitter's limits.

use jid::{FullJid, Jid};
use serde::{Deserialize, Serialize};
use spine_protocol::{
    AttrName, CapabilityName, Condition, Filter, JobId, MapReduce, SpineError, Strategy,
};

use super::Body;
use crate::blobs::Stored;

/// What the submitter asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The capability.
    pub capability: CapabilityName,
    /// Placement strategy.
    pub strategy: Strategy,
    /// Attribute filter, parsed once at submission (stored as its canonical text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
    /// Numeric attribute to sort agents by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<AttrName>,
    /// Key of the affinity strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_key: Option<String>,
    /// Arguments (a JSON object).
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Input. An inline input is not part of the record's JSON: the store keeps it in a table
    /// of its own, written once (records written by earlier versions, input included, still
    /// load). A stored one is: its hash and size.
    #[serde(default, skip_serializing_if = "Body::is_inline")]
    pub input: Body,
    /// Input MIME type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_mime: Option<String>,
    /// Absolute deadline, ms since the UNIX epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// A delayed job: not placed before this time (ms since the UNIX epoch). It stays
    /// `accepted` until then, outside the queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// Higher first.
    pub priority: i64,
    /// Attempts before failing.
    pub max_attempts: u64,
    /// Who submitted (JID or `http:<token>`).
    pub submitter: String,
    /// Idempotency key given by the submitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Whether progress reports are wanted.
    pub progress: bool,
    /// Full JID to push progress and the final status to (XMPP watch mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Jid>,
    /// `all` strategy: how many capable agents to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<spine_protocol::Limit>,
    /// `all` strategy: how many children run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    /// A child of an `all` job: the agent (full JID) it must run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<FullJid>,
    /// A child of an `all` or map/reduce job: its parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<JobId>,
    /// A map/reduce job: `capability` is the map step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapreduce: Option<MapReduce>,
    /// An XMPP submitter that takes a large output by reference (a signed URL) in its
    /// `<job-status>` rather than in chunks (protocol 1.1, `refs='true'`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub output_refs: bool,
    /// Blobs its input names without carrying them (the references of a fragment list,
    /// PROTOCOL.md §11.7.1): held by this job like its own input, so that retention releases
    /// them only with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_blobs: Vec<Stored>,
    /// A map/reduce map step: an agent that serves kept outputs (`data_listen`) keeps this
    /// step's large output instead of uploading it (PROTOCOL.md §13.5).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_output: bool,
    /// A reduce step whose input list names outputs agents keep: those agents, with the bytes
    /// each keeps, for placement near the data and for running the map steps again if an
    /// agent is lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_kept: Vec<(FullJid, u64)>,
    /// A job a rule made from an event (docs/events.md): which rule, which event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventRef>,
}

/// The event a rule made a job from, and the rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    /// The rule.
    pub rule: String,
    /// The event's `id`.
    pub id: String,
    /// The event's `source`.
    pub source: String,
    /// The event's `type`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Rules that led to the event (0: it came from outside).
    #[serde(default)]
    pub depth: u32,
}

impl JobSpec {
    /// A plain job of `capability` from `submitter`: least-loaded placement, one attempt, no
    /// arguments, input, deadline or options (set the fields that differ).
    pub fn new(capability: CapabilityName, submitter: impl Into<String>) -> JobSpec {
        JobSpec {
            capability,
            strategy: Strategy::LeastLoaded,
            filter: None,
            sort: None,
            affinity_key: None,
            args: serde_json::Map::new(),
            input: Body::default(),
            input_mime: None,
            deadline_ms: None,
            not_before_ms: None,
            priority: 0,
            max_attempts: 1,
            submitter: submitter.into(),
            idempotency_key: None,
            progress: false,
            watch: None,
            limit: None,
            batch: None,
            target: None,
            parent: None,
            mapreduce: None,
            output_refs: false,
            input_blobs: Vec::new(),
            keep_output: false,
            input_kept: Vec::new(),
            event: None,
        }
    }

    /// What must hold of a job before it is stored, so that it is refused at once instead of
    /// failing (or worse, running otherwise) later: a map/reduce job without a split step has
    /// a fragment list as its input, and every blob the list names is in the store (a
    /// submitter never gives their URLs). (Its filter was parsed by the front end that built
    /// it.) Returns the blobs the list names, for [`JobSpec::input_blobs`].
    pub fn check_input(&self, blobs: &dyn super::BlobAccess) -> Result<Vec<Stored>, SpineError> {
        let bad = |text: String| {
            SpineError::new(Condition::BadArguments)
                .with_field("input")
                .with_text(text)
        };
        match &self.mapreduce {
            Some(m) if m.split.is_none() => {
                let bytes = self.input.bytes(blobs).map_err(|e| {
                    SpineError::new(Condition::Failed)
                        .with_text(format!("the stored input cannot be read: {e}"))
                })?;
                let list = spine_protocol::fragments::decode(&bytes).map_err(bad)?;
                let mut named = Vec::new();
                for (i, f) in list.iter().enumerate() {
                    let Some(r) = &f.source else { continue };
                    if r.url.is_some() {
                        return Err(bad(format!(
                            "fragment {i} has a url: name a blob by its sha256 and size only (the dispatcher gives agents the URLs)"
                        )));
                    }
                    let b = Stored {
                        sha256: r.sha256,
                        size: r.size,
                    };
                    if !blobs.contains(&b) {
                        return Err(bad(format!(
                            "fragment {i} names blob {} of {} bytes, which is not in the blob store: upload it with PUT /v1/blobs first (blobs no job holds are deleted after blob_orphan_ttl)",
                            b.hex(),
                            b.size
                        )));
                    }
                    named.push(b);
                }
                Ok(named)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Its arguments fit `max_args` bytes as they travel in the job stanza, so that no job
    /// stanza can exceed an XMPP server's stanza limit (issue 14, finding 5): otherwise
    /// `bad-arguments`, field `args`.
    pub fn check_args(&self, max_args: u64) -> Result<(), SpineError> {
        let args = args_wire_size(&self.args);
        if args > max_args {
            return Err(SpineError::new(Condition::BadArguments)
                .with_field("args")
                .with_text(format!(
                    "the arguments take {args} bytes in the job stanza, over the limit of {max_args} (max_args): send large data as the job's input"
                )));
        }
        Ok(())
    }

    /// Its `max-attempts` and `priority` are within its submitter's `limits` (issue 14,
    /// finding 11; the limits are never below the configured default attempts, so only a job
    /// that asked can be over). Errors are `bad-arguments` naming the field as the submitter
    /// wrote it (`max_attempts` over HTTP, `max-attempts` over XMPP).
    pub fn check_limits(&self, limits: &crate::policy::SubmitLimits) -> Result<(), SpineError> {
        let bad = |field: &str, text: String| {
            Err(SpineError::new(Condition::BadArguments)
                .with_field(field)
                .with_text(text))
        };
        let http = self.submitter.starts_with("http:");
        if self.max_attempts > limits.max_attempts {
            return bad(
                if http { "max_attempts" } else { "max-attempts" },
                format!(
                    "{} attempts asked, over this submitter's limit of {}",
                    self.max_attempts, limits.max_attempts
                ),
            );
        }
        if self.priority > limits.max_priority {
            return bad(
                "priority",
                format!(
                    "priority {} is over this submitter's limit of {}",
                    self.priority, limits.max_priority
                ),
            );
        }
        Ok(())
    }
}

/// The size of a job's arguments as they travel in its job stanza: the `<args>` element,
/// serialised as the XMPP stream will carry it (JSON text escaped for XML, so up to several
/// times the JSON's own length). 0 for no arguments (the element is left out).
pub fn args_wire_size(args: &serde_json::Map<String, serde_json::Value>) -> u64 {
    if args.is_empty() {
        return 0;
    }
    let text = serde_json::Value::Object(args.clone()).to_string();
    let el = minidom::Element::builder("args", spine_protocol::NS)
        .append(text)
        .build();
    serialized_size(&el)
}

/// The size of an element as serialised, counted without building the text.
pub fn serialized_size(el: &minidom::Element) -> u64 {
    /// Counts what is written.
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    match el.write_to(&mut n) {
        Ok(()) => n.0,
        // Unreachable for a counter; never let such an element pass as small.
        Err(_) => u64::MAX,
    }
}
