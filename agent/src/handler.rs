//! What a capability handler sees and returns: the job context (arguments, input, deadline,
//! cancellation, progress) and a result or a typed error.
//!
//! Most handlers take their input as bytes and return bytes. A capability registered with
//! [`crate::AgentBuilder::file_input`] gets its input as a file instead (a referenced input is
//! streamed to disk, never held in memory), and any handler may return its output as a list of
//! [`FragmentFile`]s, which the agent uploads one by one and turns into a fragment list of
//! references (docs/agent.md, "Inputs and outputs as files").

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};
use spine_protocol::{CapabilityName, JobId};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Progress or a piece of streamed output, from a handler to the agent's connection task.
#[derive(Debug)]
pub(crate) enum Report {
    Progress {
        percent: Option<u8>,
        message: Option<String>,
    },
    Partial {
        mime: Option<String>,
        bytes: Vec<u8>,
    },
}

/// Everything a handler gets for one job attempt.
pub struct JobContext {
    /// The job's id (globally unique).
    pub id: JobId,
    /// The capability asked for.
    pub capability: CapabilityName,
    /// Attempt number, from 1.
    pub attempt: u64,
    /// Arguments (a JSON object).
    pub args: Map<String, Value>,
    /// Input bytes (empty if none, and empty for a capability that takes its input as a
    /// file: see [`JobContext::input_file`]).
    pub input: Vec<u8>,
    /// The input as a file, for a capability registered with
    /// [`crate::AgentBuilder::file_input`] (`None` for any other): the whole input, however it
    /// came (inline, in chunks, or by reference streamed to disk with its size and SHA-256
    /// checked). The agent deletes it after the job.
    pub input_file: Option<PathBuf>,
    /// A directory of this attempt's own, for a capability that takes its input as a file
    /// (`None` for any other): where its output files ([`FragmentFile`]) can go. The agent
    /// deletes it, with everything in it, once the job's outcome is sent.
    pub work_dir: Option<PathBuf>,
    /// Input MIME type, if given.
    pub input_mime: Option<String>,
    /// When the job must be done; the handler is cancelled then.
    pub deadline: Option<Instant>,
    /// Cancelled when the dispatcher cancels the job, its deadline passes, or the agent stops.
    pub cancel: CancellationToken,
    /// Who submitted the job, for logs.
    pub submitter: Option<String>,
    pub(crate) reports: Option<mpsc::UnboundedSender<(JobId, u64, Report)>>,
}

impl JobContext {
    /// Reports progress (0..=100) with an optional message. Sent only if the dispatcher asked
    /// for progress; best-effort.
    pub fn progress(&self, percent: u8, message: impl Into<String>) {
        let message = message.into();
        self.report(Report::Progress {
            percent: Some(percent.min(100)),
            message: (!message.is_empty()).then_some(message),
        });
    }

    /// Streams a piece of output (at most 64 KiB; larger pieces are split). Best-effort.
    pub fn partial(&self, mime: Option<&str>, bytes: &[u8]) {
        for piece in bytes.chunks(spine_protocol::INLINE_LIMIT) {
            self.report(Report::Partial {
                mime: mime.map(str::to_owned),
                bytes: piece.to_vec(),
            });
        }
    }

    fn report(&self, r: Report) {
        if let Some(tx) = &self.reports {
            let _ = tx.send((self.id.clone(), self.attempt, r));
        }
    }

    /// A string argument, or an error naming it.
    pub fn arg_str(&self, name: &str) -> Result<&str, JobError> {
        match self.args.get(name) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(JobError::bad_argument(name, "must be a string")),
            None => Err(JobError::bad_argument(name, "is required")),
        }
    }

    /// An unsigned integer argument within `range`, or an error naming it.
    pub fn arg_u64(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, JobError> {
        match self.args.get(name) {
            Some(v) => match v.as_u64() {
                Some(n) if range.contains(&n) => Ok(n),
                _ => Err(JobError::bad_argument(
                    name,
                    format!("must be an integer in {}..={}", range.start(), range.end()),
                )),
            },
            None => Err(JobError::bad_argument(name, "is required")),
        }
    }

    /// The input file of a capability that takes its input as a file, or an error saying the
    /// capability was not registered so.
    pub fn input_path(&self) -> Result<&Path, JobError> {
        self.input_file.as_deref().ok_or_else(|| {
            JobError::Failed(format!(
                "{} takes its input as bytes: register it with AgentBuilder::file_input to get a file",
                self.capability
            ))
        })
    }

    /// A context for tests and local use (no connection behind it).
    pub fn for_test(capability: &str, args: Map<String, Value>, input: Vec<u8>) -> Self {
        JobContext {
            id: "test-job".parse().expect("valid id"),
            capability: capability.parse().expect("valid capability name"),
            attempt: 1,
            args,
            input,
            input_file: None,
            work_dir: None,
            input_mime: None,
            deadline: None,
            cancel: CancellationToken::new(),
            submitter: None,
            reports: None,
        }
    }

    /// A context for tests and local use whose input is the file `input` and whose work
    /// directory is `work_dir`, as a file-input capability gets them.
    pub fn for_test_file(
        capability: &str,
        args: Map<String, Value>,
        input: PathBuf,
        work_dir: PathBuf,
    ) -> Self {
        let mut ctx = JobContext::for_test(capability, args, Vec::new());
        ctx.input_file = Some(input);
        ctx.work_dir = Some(work_dir);
        ctx
    }
}

/// A file a handler returns as one fragment of a fragment list (a split step's output,
/// docs/PROTOCOL.md §11.7): the agent uploads it to an upload slot of its own over HTTP,
/// streamed from the file, and names it in the list by SHA-256 and size, so that neither the
/// agent nor the job stanza ever holds the bytes. The agent deletes the file afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FragmentFile {
    /// The file.
    pub path: PathBuf,
    /// The fragment's label (`name` in the list), carried to the reduce that uses its output.
    pub name: Option<String>,
    /// The fragment's MIME type (`type` in the list).
    pub mime: Option<String>,
}

impl FragmentFile {
    /// The file at `path`, with no label or type.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FragmentFile {
            path: path.into(),
            ..Default::default()
        }
    }

    /// With a label.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// With a MIME type.
    pub fn with_mime(mut self, mime: impl Into<String>) -> Self {
        self.mime = Some(mime.into());
        self
    }
}

/// A handler's successful result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// Output bytes.
    pub bytes: Vec<u8>,
    /// Their MIME type.
    pub mime: Option<String>,
    /// Metadata (a JSON object), e.g. image dimensions.
    pub meta: Map<String, Value>,
    /// The output as a fragment list of files ([`Output::fragment_files`]), in order; empty
    /// for an output of bytes. A handler sets one or the other, never both.
    pub fragment_files: Vec<FragmentFile>,
}

impl Output {
    /// A fragment list (docs/PROTOCOL.md §11.7) made of these files, in this order: what a
    /// split step returns to cut a large input without holding it. Over HTTP each file goes to
    /// an upload slot and the list names them by reference; an agent that cannot use HTTP
    /// sends the list with the bytes inline, up to its `max_input_size`.
    pub fn fragment_files(files: Vec<FragmentFile>) -> Self {
        Output {
            // An empty list is sent as it is.
            bytes: if files.is_empty() {
                spine_protocol::fragments::encode(&[])
            } else {
                Vec::new()
            },
            mime: Some(spine_protocol::FRAGMENTS_MIME.to_owned()),
            meta: Map::new(),
            fragment_files: files,
        }
    }

    /// Output bytes with no type or metadata.
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Output {
            bytes: bytes.into(),
            ..Default::default()
        }
    }

    /// The same output with a MIME type.
    pub fn with_mime(mut self, mime: impl Into<String>) -> Self {
        self.mime = Some(mime.into());
        self
    }

    /// The same output with one metadata entry.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.meta.insert(key.into(), value.into());
        self
    }
}

/// Why a job failed, as the handler sees it. Decides whether the dispatcher retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Transient: another attempt (maybe on another agent) may succeed.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Permanent: retrying will not help.
    #[error("failed: {0}")]
    Failed(String),
    /// An argument is wrong.
    #[error("bad argument '{field}': {message}")]
    BadArguments {
        /// The argument.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl JobError {
    /// A bad-argument error.
    pub fn bad_argument(field: &str, message: impl Into<String>) -> Self {
        JobError::BadArguments {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// Boxed future returned by handlers.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Output, JobError>> + Send + 'static>>;

/// A capability's implementation. Any `Fn(JobContext) -> impl Future<Output = Result<Output,
/// JobError>>` is one.
pub trait Handler: Send + Sync + 'static {
    /// Runs one job attempt. Dropping the future cancels it.
    fn call(&self, ctx: JobContext) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Output, JobError>> + Send + 'static,
{
    fn call(&self, ctx: JobContext) -> HandlerFuture {
        Box::pin((self)(ctx))
    }
}

/// Shared handler.
pub type SharedHandler = Arc<dyn Handler>;
