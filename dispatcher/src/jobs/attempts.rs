//! A job's attempts, as the core reports them to the [`JobTable`]: sent to an
//! agent, started (progress), succeeded, failed (retried with backoff while attempts and time
//! remain), refused without running (`busy`), lost with the dispatcher's session, cancelled,
//! or left without an agent. Each event is one [`JobTable::update`] (or
//! [`JobTable::finalize`]) of the record, so the indexes follow.

use jid::{FullJid, Jid};
use spine_protocol::{Condition, JobId, JobResult, JobState, SpineError};

use super::{backoff_ms, AfterFailure, Body, Duplicate, JobRecord, JobTable, Recorded};
use super::{SessionLost, UnknownJob};

impl JobTable {
    /// The job was sent to `agent`.
    pub fn dispatched(&mut self, id: &JobId, agent: &FullJid, now_ms: u64) -> Option<&JobRecord> {
        self.update(id, |j| {
            j.state = JobState::Dispatched;
            // Sent back to the agent that had it before a restart: the same attempt.
            let same = j.resume && j.agent.as_ref() == Some(agent);
            if !same || j.attempts == 0 {
                j.attempts += 1;
            }
            j.resume = false;
            j.agent = Some(agent.clone());
            j.updated_ms = now_ms;
            j.dispatched_ms = now_ms;
        })?;
        self.get(id)
    }

    /// After a restart: the job was sent to `agent` as attempt `attempt` just before the stop,
    /// and the dispatch was not stored. If the record is still one attempt behind and waiting,
    /// it becomes that attempt, restored in flight on that agent ([`JobRecord::resume`]), so
    /// that it goes back there; true if it changed.
    pub fn sent_ahead(&mut self, id: &JobId, attempt: u64, agent: &FullJid, now_ms: u64) -> bool {
        let Some(j) = self.get(id) else {
            return false;
        };
        if j.state != JobState::Queued || j.attempts + 1 != attempt {
            return false;
        }
        self.update(id, |j| {
            j.attempts = attempt;
            j.agent = Some(agent.clone());
            j.resume = true;
            j.updated_ms = now_ms;
            j.dispatched_ms = now_ms;
        })
        .is_some()
    }

    /// The agent reported progress (the first report means it started).
    pub fn progress(&mut self, id: &JobId, percent: Option<u8>, now_ms: u64) {
        self.update(id, |j| {
            if j.state == JobState::Dispatched {
                j.state = JobState::Running;
            }
            if j.state == JobState::Running {
                j.percent = percent.or(j.percent);
                j.updated_ms = now_ms;
            }
        });
    }

    /// A result arrived. `Err(Duplicate)` if the job already has its outcome. A late result
    /// of an earlier attempt while a retry was waiting in the queue is taken too.
    pub fn succeeded(
        &mut self,
        id: &JobId,
        result: &JobResult,
        output: Body,
        mime: Option<String>,
        now_ms: u64,
    ) -> Result<&JobRecord, Duplicate> {
        if self.get(id).is_none_or(|j| j.state.is_final()) {
            return Err(Duplicate);
        }
        self.update(id, |j| {
            j.state = JobState::Succeeded;
            j.percent = Some(100);
            j.outcome = Some(Recorded::Succeeded {
                meta: result.meta.0.clone(),
                output,
                mime,
                elapsed_ms: result.elapsed_ms,
            });
            j.updated_ms = now_ms;
        });
        self.get(id).ok_or(Duplicate)
    }

    /// Ends a job with a failure outcome.
    pub(super) fn finalize(
        &mut self,
        id: &JobId,
        state: JobState,
        condition: Condition,
        message: Option<String>,
        now_ms: u64,
    ) {
        self.finalize_with_field(id, state, condition, message, None, now_ms);
    }

    /// [`JobTable::finalize`], recording the argument at fault (`bad-arguments`).
    fn finalize_with_field(
        &mut self,
        id: &JobId,
        state: JobState,
        condition: Condition,
        message: Option<String>,
        field: Option<String>,
        now_ms: u64,
    ) {
        self.update(id, |j| {
            j.state = state;
            j.outcome = Some(Recorded::Failure {
                condition,
                message,
                field,
            });
            j.updated_ms = now_ms;
        });
    }

    /// An attempt failed on `agent` with `error` (`None`: the agent is gone). Retries
    /// transient failures while attempts and time remain.
    pub fn attempt_failed(
        &mut self,
        id: &JobId,
        agent: Option<&FullJid>,
        error: Option<&SpineError>,
        now_ms: u64,
    ) -> Option<AfterFailure> {
        let retryable = error.is_none_or(|e| e.condition.is_retryable());
        let ending = self.update(id, |j| {
            if j.state.is_final() || j.state == JobState::Queued {
                return None; // already decided (or a stale report of an earlier attempt)
            }
            if let Some(a) = agent {
                if !j.excluded.contains(a) {
                    j.excluded.push(a.clone());
                }
            }
            let time_left = j.spec.deadline_ms.is_none_or(|d| now_ms < d);
            if retryable && j.attempts < j.spec.max_attempts && time_left {
                j.state = JobState::Queued;
                j.not_before_ms = now_ms + backoff_ms(j.attempts);
                j.updated_ms = now_ms;
                return Some(Err(AfterFailure::Retry {
                    not_before_ms: j.not_before_ms,
                }));
            }
            Some(Ok(match error {
                Some(e) if e.condition == Condition::DeadlineExceeded => {
                    (JobState::TimedOut, e.condition, e.text.clone())
                }
                Some(e) if e.condition == Condition::Cancelled => {
                    (JobState::Cancelled, e.condition, e.text.clone())
                }
                Some(e) if retryable => (
                    JobState::Failed,
                    e.condition,
                    Some(format!(
                        "gave up after {} attempts: {}",
                        j.attempts,
                        e.text.clone().unwrap_or_default()
                    )),
                ),
                Some(e) => (JobState::Failed, e.condition, e.text.clone()),
                None if !time_left => (
                    JobState::TimedOut,
                    Condition::DeadlineExceeded,
                    Some("deadline passed while retrying".into()),
                ),
                None => (
                    JobState::Failed,
                    Condition::Retryable,
                    Some(format!(
                        "the agent was lost on each of {} attempts",
                        j.attempts
                    )),
                ),
            }))
        })??;
        let (state, condition, message) = match ending {
            Ok(end) => end,
            Err(retry) => {
                let on = agent.map_or_else(String::new, |a| format!(" on {a}"));
                let why = match error {
                    Some(e) => format!(
                        "attempt failed{on}: {}{}; retrying",
                        e.condition,
                        e.text
                            .as_deref()
                            .map(|t| format!(": {t}"))
                            .unwrap_or_default()
                    ),
                    None => format!("the agent was lost{on}; retrying"),
                };
                self.update(id, |j| j.note(why));
                return Some(retry);
            }
        };
        // The agent's `field` (the argument it refused) goes with the job's outcome.
        let field = error.and_then(|e| e.field.clone());
        self.finalize_with_field(id, state, condition, message, field, now_ms);
        Some(AfterFailure::Final(state))
    }

    /// The dispatcher's XMPP session ended right after this job's request was sent: the likely
    /// cause is the request itself (a stanza over the server's size limit makes the server
    /// close the session), and sending it again as it is would end every new session too.
    /// Counts as a failed attempt: while attempts remain the job stays with its agent, to be
    /// sent again with the next attempt number (the agent attaches a repeated job id to the
    /// running job); after the last one it fails. `None` if the job is not in flight.
    pub fn session_lost(&mut self, id: &JobId, now_ms: u64) -> Option<SessionLost> {
        let attempts = self.update(id, |j| {
            if !matches!(j.state, JobState::Dispatched | JobState::Running) {
                return None;
            }
            j.updated_ms = now_ms;
            if j.attempts < j.spec.max_attempts {
                j.attempts += 1;
                return Some(Ok(j.attempts));
            }
            Some(Err(j.attempts))
        })??;
        let attempts = match attempts {
            Ok(attempt) => return Some(SessionLost::Resend { attempt }),
            Err(n) => n,
        };
        let message = format!(
            "gave up after {attempts} attempts: the dispatcher's XMPP session ended right after the job was sent (is the job stanza over the XMPP server's size limit?)"
        );
        self.finalize(
            id,
            JobState::Failed,
            Condition::Retryable,
            Some(message),
            now_ms,
        );
        Some(SessionLost::Final)
    }

    /// The agent refused the attempt without running it (`busy`, `draining`): queue the job
    /// again without counting the attempt or excluding the agent; it was only unlucky timing.
    pub fn refused(&mut self, id: &JobId, now_ms: u64) -> bool {
        let refused = self
            .update(id, |j| {
                if !matches!(j.state, JobState::Dispatched | JobState::Running) {
                    return false;
                }
                j.state = JobState::Queued;
                j.attempts = j.attempts.saturating_sub(1);
                j.not_before_ms = now_ms + 50;
                j.updated_ms = now_ms;
                true
            })
            .unwrap_or(false);
        if refused {
            self.update(id, |j| {
                let who = j
                    .agent
                    .as_ref()
                    .map_or("the agent".into(), |a| a.to_string());
                j.note(format!("{who} was busy or draining: placed again"));
            });
        }
        refused
    }

    /// Cancels a job. Returns the agent running it (to send `<cancel/>` to), if any.
    /// `Err` if the job is unknown; a final job stays as it is.
    pub fn cancel(&mut self, id: &JobId, now_ms: u64) -> Result<Option<FullJid>, UnknownJob> {
        self.cancel_because(id, "cancelled by the submitter", now_ms)
    }

    /// Cancels a job, recording `reason`; otherwise as [`JobTable::cancel`].
    pub fn cancel_because(
        &mut self,
        id: &JobId,
        reason: &str,
        now_ms: u64,
    ) -> Result<Option<FullJid>, UnknownJob> {
        let j = self.get(id).ok_or_else(|| UnknownJob(id.clone()))?;
        if j.state.is_final() {
            return Ok(None);
        }
        let agent = matches!(j.state, JobState::Dispatched | JobState::Running)
            .then(|| j.agent.clone())
            .flatten();
        self.finalize(
            id,
            JobState::Cancelled,
            Condition::Cancelled,
            Some(reason.to_owned()),
            now_ms,
        );
        Ok(agent)
    }

    /// Fails a queued job that found no capable agent in time.
    pub fn no_agent(&mut self, id: &JobId, now_ms: u64) {
        let Some(cap) = self
            .get(id)
            .filter(|j| j.state == JobState::Queued)
            .map(|j| j.spec.capability.clone())
        else {
            return;
        };
        let why = format!("no agent offering {cap} appeared in time");
        self.fail_queued(id, Condition::NoAgent, why, now_ms);
    }

    /// Fails a job that has not reached an agent (queued, or accepted and delayed) with
    /// `condition`; false if it is not such a job.
    pub fn fail_queued(
        &mut self,
        id: &JobId,
        condition: Condition,
        why: String,
        now_ms: u64,
    ) -> bool {
        if !self
            .get(id)
            .is_some_and(|j| matches!(j.state, JobState::Queued | JobState::Accepted))
        {
            return false;
        }
        self.finalize(id, JobState::Failed, condition, Some(why), now_ms);
        true
    }

    /// Whether `agent` failed this job before.
    pub fn is_excluded(&self, id: &JobId, agent: &Jid) -> bool {
        self.get(id)
            .is_some_and(|j| j.excluded.iter().any(|a| a.as_str() == agent.as_str()))
    }
}
