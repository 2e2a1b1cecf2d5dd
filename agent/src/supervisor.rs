//! The handler tasks: where the core's [`Start`] effects become running handlers and their
//! ends come back as [`Done`] inputs.
//!
//! [`crate::driver`] hands each [`Start`] to [`Supervisor::start`], which spawns a task per job
//! (the handler in an inner task of its own, so that a panic or an abort cannot take the agent
//! down) watching the job's cancellation token, the agent-wide stop token and the job's
//! deadline. Whatever ends the job, the task sends one [`Done`] on the channel the driver
//! reads, after the handler's future is gone; the driver passes it to
//! [`crate::machine::Core::job_done`]. Handlers' progress reports travel on the second
//! channel to [`crate::machine::Core::report`].
//!
//! Around a handler the task also does the disk work of files ([`crate::files`]): for a
//! capability that takes its input as a file it writes an input that came in memory to the
//! attempt's work directory first, and after the handler it hashes the fragment files the
//! handler returned; both travel back in the [`Done`], for the core to upload and delete.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use spine_protocol::{CapabilityName, Condition, JobId, SpineError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::files::{OutFile, WorkDir};
use crate::handler::{JobContext, JobError, Output, Report, SharedHandler};
use crate::machine::{Done, Start};

/// A handler's progress report: job, attempt, report.
pub(crate) type ReportMsg = (JobId, u64, Report);

/// The channels the driver reads: job ends and handlers' reports.
pub(crate) struct Inbox {
    pub(crate) done: mpsc::UnboundedReceiver<Done>,
    pub(crate) reports: mpsc::UnboundedReceiver<ReportMsg>,
}

/// Runs handlers in tasks and stops them on request.
pub(crate) struct Supervisor {
    handlers: BTreeMap<CapabilityName, SharedHandler>,
    /// Cancellation of each running job, until its [`Done`] is taken.
    tokens: HashMap<JobId, CancellationToken>,
    /// Stops every job at once (the drain grace is over).
    stop: CancellationToken,
    done_tx: mpsc::UnboundedSender<Done>,
    report_tx: mpsc::UnboundedSender<ReportMsg>,
}

fn job_error(e: JobError) -> SpineError {
    match e {
        JobError::Retryable(m) => SpineError::new(Condition::Retryable).with_text(m),
        JobError::Failed(m) => SpineError::new(Condition::Failed).with_text(m),
        JobError::BadArguments { field, message } => {
            let mut e = SpineError::new(Condition::BadArguments).with_text(message);
            if !field.is_empty() {
                e.field = Some(field);
            }
            e
        }
    }
}

impl Supervisor {
    /// A supervisor for these handlers, and the channels its tasks report on.
    pub(crate) fn new(handlers: BTreeMap<CapabilityName, SharedHandler>) -> (Self, Inbox) {
        let (done_tx, done) = mpsc::unbounded_channel();
        let (report_tx, reports) = mpsc::unbounded_channel();
        let sup = Supervisor {
            handlers,
            tokens: HashMap::new(),
            stop: CancellationToken::new(),
            done_tx,
            report_tx,
        };
        (sup, Inbox { done, reports })
    }

    /// Cancels one job's handler (the dispatcher cancelled it); its outcome is `cancelled`.
    pub(crate) fn cancel(&self, id: &JobId) {
        if let Some(t) = self.tokens.get(id) {
            t.cancel();
        }
    }

    /// Stops every handler; their outcomes are `retryable`.
    pub(crate) fn stop_all(&self) {
        self.stop.cancel();
    }

    /// The job's [`Done`] was taken: its token is no longer needed.
    pub(crate) fn finished(&mut self, id: &JobId) {
        self.tokens.remove(id);
    }

    /// Starts a handler task for `s`.
    pub(crate) fn start(&mut self, s: Start) {
        let cancel = CancellationToken::new();
        self.tokens.insert(s.id.clone(), cancel.clone());
        let Some(handler) = self.handlers.get(&s.capability).cloned() else {
            // The core starts only the capabilities it was given, which are these.
            let _ = self.done_tx.send(Done {
                id: s.id,
                attempt: s.attempt,
                result: Err(SpineError::new(Condition::UnknownCapability)
                    .with_text(format!("this agent does not offer {}", s.capability))),
                elapsed: Duration::ZERO,
                work: s.work,
                files: Vec::new(),
            });
            return;
        };
        let (file_input, work) = (s.file_input, s.work);
        let mut ctx = JobContext {
            id: s.id.clone(),
            capability: s.capability,
            attempt: s.attempt,
            args: s.args,
            input: s.input,
            input_file: None,
            work_dir: None,
            input_mime: s.input_mime,
            deadline: s.deadline,
            cancel: cancel.clone(),
            submitter: s.submitter,
            reports: Some(self.report_tx.clone()),
        };
        let done_tx = self.done_tx.clone();
        let stop = self.stop.clone();
        let (id, attempt, deadline, token) = (s.id, s.attempt, s.deadline, cancel);
        tokio::spawn(async move {
            let started = Instant::now();
            let work = match file_input {
                true => match input_file(&mut ctx, work).await {
                    Ok(w) => Some(w),
                    Err(why) => {
                        let _ = done_tx.send(Done {
                            id,
                            attempt,
                            result: Err(SpineError::new(Condition::Retryable).with_text(why)),
                            elapsed: started.elapsed(),
                            work: None,
                            files: Vec::new(),
                        });
                        return;
                    }
                },
                false => work,
            };
            // The handler runs in a task of its own: a panic there is a JoinError here, and
            // `abort` drops its future (an exec child's process group is killed then). Its
            // output files are hashed there too, so that a cancel stops that as well.
            let mut inner = tokio::spawn(async move {
                let out = handler.call(ctx).await?;
                output_files(out).await
            });
            let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
            let mut files = Vec::new();
            let result = tokio::select! {
                r = &mut inner => match r {
                    Ok(Ok((out, f))) => {
                        files = f;
                        Ok(out)
                    }
                    Ok(Err(e)) => Err(job_error(e)),
                    Err(je) if je.is_panic() => {
                        let msg = je.into_panic();
                        let text = msg.downcast_ref::<&str>().map(|s| s.to_string())
                            .or_else(|| msg.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "handler panicked".into());
                        error!(job = %id, "handler panicked: {text}");
                        Err(SpineError::new(Condition::Failed).with_text(format!("handler panicked: {text}")))
                    }
                    Err(_) => Err(SpineError::new(Condition::Cancelled).with_text("handler aborted")),
                },
                _ = token.cancelled() => {
                    inner.abort();
                    Err(SpineError::new(Condition::Cancelled).with_text("cancelled by the dispatcher"))
                }
                _ = stop.cancelled() => {
                    token.cancel();
                    inner.abort();
                    Err(SpineError::new(Condition::Retryable).with_text("agent stopped before the job finished"))
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)) => {
                    token.cancel();
                    inner.abort();
                    Err(SpineError::new(Condition::DeadlineExceeded).with_text("deadline passed; the handler was stopped"))
                }
            };
            // The driver receives this only after the handler's future is gone: the core frees
            // the job's slots then.
            let _ = done_tx.send(Done {
                id,
                attempt,
                result,
                elapsed: started.elapsed(),
                work,
                files,
            });
        });
    }
}

/// Gives a file-input handler its input as a file: the one fetched into `work` over HTTP, or
/// else the bytes that came inline or in chunks, written to a new work directory.
async fn input_file(ctx: &mut JobContext, work: Option<WorkDir>) -> Result<WorkDir, String> {
    let work = match work {
        Some(w) => w,
        None => {
            let w = tokio::task::spawn_blocking(WorkDir::create)
                .await
                .map_err(|e| format!("creating the job directory: {e}"))??;
            let bytes = std::mem::take(&mut ctx.input);
            tokio::fs::write(w.input(), bytes)
                .await
                .map_err(|e| format!("writing the input file {}: {e}", w.input().display()))?;
            w
        }
    };
    ctx.input_file = Some(work.input());
    ctx.work_dir = Some(work.path().to_owned());
    Ok(work)
}

/// A handler's fragment files, hashed (on the blocking pool): the output without them, and
/// them. Bytes and files together are refused.
async fn output_files(mut out: Output) -> Result<(Output, Vec<OutFile>), JobError> {
    if out.fragment_files.is_empty() {
        return Ok((out, Vec::new()));
    }
    let files = std::mem::take(&mut out.fragment_files);
    if !out.bytes.is_empty() {
        drop(tokio::task::spawn_blocking(move || {
            crate::files::discard(files)
        }));
        return Err(JobError::Failed(
            "the handler returned both output bytes and fragment files: an output is one or the other".into(),
        ));
    }
    let files = tokio::task::spawn_blocking(move || crate::files::hash_files(files))
        .await
        .map_err(|e| JobError::Failed(format!("hashing the fragment files: {e}")))?
        .map_err(JobError::Failed)?;
    Ok((out, files))
}
