//! What a capability handler sees and returns: the job context (arguments, input, deadline,
//! cancellation, progress) and a result or a typed error.

use std::future::Future;
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
    /// Input bytes (empty if none).
    pub input: Vec<u8>,
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

    /// A context for tests and local use (no connection behind it).
    pub fn for_test(capability: &str, args: Map<String, Value>, input: Vec<u8>) -> Self {
        JobContext {
            id: "test-job".parse().expect("valid id"),
            capability: capability.parse().expect("valid capability name"),
            attempt: 1,
            args,
            input,
            input_mime: None,
            deadline: None,
            cancel: CancellationToken::new(),
            submitter: None,
            reports: None,
        }
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
}

impl Output {
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
