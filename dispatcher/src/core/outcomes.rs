//! How attempts end and what follows: results and errors from agents, cancellations,
//! deadlines, the no-agent wait, and the session that ended right after a request; one
//! [`Core::settle`] step for every attempt that ends; `all` jobs gathered and map/reduce jobs
//! moved on when a child ends; watchers, event streams and the audit log told of every job
//! that ended.
//!
//! Inputs come from [`super::inbound`] (replies), [`super::agents`] (agents lost),
//! [`super::submit`] (cancel) and [`super::Core::tick`] (deadlines). Every change is marked
//! for the store before anything about it is said ([`super::Ready`]).

use jid::FullJid;
use spine_protocol::{
    classify, Accepted, Condition, Data, Disposition, JobId, JobResult, JobState, Progress,
    SpineError,
};
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::{ErrorType, StanzaError};

use super::requests::Sent;
use super::{Core, EventKind, Now};
use crate::deliver::Via;
use crate::jobs::{Advance, AfterFailure, Body, SessionLost};

/// A session that ends within this time of sending a job request blames the largest such
/// request (a stanza over the server's size limit makes the server close the session).
const SESSION_SUSPECT_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);
/// A job refused as busy is placed again after this long (ms).
const REFUSED_AGAIN_MS: u64 = 50;

/// What became of a job when one of its attempts ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing (a stale or duplicate report).
    Unchanged,
    /// Queued again, not before this time (ms).
    Retry(u64),
    /// It ended now, in this state.
    Ended(JobState),
}

impl Settled {
    pub(crate) fn from_failure(after: Option<AfterFailure>) -> Settled {
        match after {
            None => Settled::Unchanged,
            Some(AfterFailure::Retry { not_before_ms }) => Settled::Retry(not_before_ms),
            Some(AfterFailure::Final(state)) => Settled::Ended(state),
        }
    }
}

impl Core {
    /// The one step for an attempt of `job` that ended, after the job table recorded how:
    /// the agent's slot is freed (`agent`: where it ran, if the registry still holds it),
    /// the job's request forgotten, the job stored, placement woken, and, if the job ended,
    /// everyone told ([`Core::notify_final`]).
    pub(super) fn settle(&mut self, job: &JobId, agent: Option<&FullJid>, how: Settled, now: Now) {
        self.release(job, agent);
        self.forget_slots(job);
        match how {
            Settled::Unchanged => {}
            Settled::Retry(at) => {
                self.persist(job);
                self.retry_at.push(std::cmp::Reverse(at));
            }
            Settled::Ended(_) => {
                self.persist(job);
                self.notify_final(job, now);
            }
        }
        self.place_pending = true;
    }

    /// Frees `agent`'s slot for `job` and forgets the job's request.
    fn release(&mut self, job: &JobId, agent: Option<&FullJid>) {
        if let Some(id) = agent.and_then(|a| self.registry.id_of(a)) {
            self.registry.on_finished(id, job, &mut self.rng);
        }
        self.requests.forget_job(job);
    }

    /// A job IQ's result.
    pub(super) fn on_job_result(&mut self, s: Sent, payload: Option<minidom::Element>, now: Now) {
        let parsed = payload
            .ok_or_else(|| "empty result".to_owned())
            .and_then(|p| JobResult::try_from(p).map_err(|e| e.to_string()));
        let result = match parsed {
            Ok(r) if r.job == s.job => r,
            Ok(r) => {
                warn!(agent = %s.agent, "result names job {} instead of {}", r.job, s.job);
                let e = SpineError::new(Condition::Retryable)
                    .with_text("agent answered for another job");
                return self.fail_attempt(&s, e, now);
            }
            Err(e) => {
                warn!(agent = %s.agent, job = %s.job, "invalid result: {e}");
                let e =
                    SpineError::new(Condition::Retryable).with_text(format!("invalid result: {e}"));
                return self.fail_attempt(&s, e, now);
            }
        };
        let (output, mime) = match &result.output {
            None => (Vec::new(), None),
            Some(Data::Inline { bytes, mime }) => (bytes.clone(), mime.clone()),
            Some(Data::Blob(r)) => match self.blobs.take(s.agent.to_bare().as_str(), r) {
                Ok(bytes) => (bytes, r.mime.clone()),
                Err(e) => {
                    let e = SpineError::new(Condition::Retryable)
                        .with_text(format!("output blob: {e}"));
                    return self.fail_attempt(&s, e, now);
                }
            },
            // Kept by the agent, which serves it (a map step's output, PROTOCOL.md §13.5).
            Some(Data::Ref(r)) if !r.sources.is_empty() => {
                let asked = s.payload.keep.is_some();
                let url = &r.sources[0];
                if !asked || !self.kept_url_ok(&s.agent, url, &r.sha256) {
                    warn!(job = %s.job, agent = %s.agent, "output kept by the agent refused: {}", if asked { "its URL is not under the agent's advertised serves URL" } else { "the job did not ask to keep it" });
                    let e = SpineError::new(Condition::Retryable).with_text(
                        "a result names a URL only for a job sent with <keep/>, and only \
                         {serves}/v1/blobs/{sha256} of the agent's advertised serves URL",
                    );
                    return self.fail_attempt(&s, e, now);
                }
                let kept = crate::jobs::Kept {
                    blob: crate::blobs::Stored {
                        sha256: r.sha256,
                        size: r.size,
                    },
                    agent: s.agent.clone(),
                    url: url.clone(),
                };
                return self.succeeded(&s, &result, Body::Kept(kept), r.mime.clone(), now);
            }
            // Uploaded to the slot this attempt was granted (PROTOCOL.md §13.4).
            Some(Data::Ref(r)) => match self.slot_output(&s.job, s.attempt, r) {
                Ok(b) => return self.succeeded(&s, &result, Body::Stored(b), r.mime.clone(), now),
                Err(why) => {
                    warn!(job = %s.job, agent = %s.agent, "output by reference refused: {why}");
                    let e = SpineError::new(Condition::Retryable)
                        .with_text(format!("output by reference: {why}"));
                    return self.fail_attempt(&s, e, now);
                }
            },
        };
        // A large output goes to the blob store before the record holding it is kept; if the
        // store refuses it (its quota), the job store keeps it, as before the blob store.
        let output = if output.len() > spine_protocol::INLINE_LIMIT {
            match self.blob_store.put(&output) {
                Ok(b) => Body::Stored(b),
                Err(e) => {
                    warn!(job = %s.job, "output kept in the job store: {e}");
                    Body::Inline(output)
                }
            }
        } else {
            Body::Inline(output)
        };
        self.succeeded(&s, &result, output, mime, now);
    }

    /// A result's outcome, its output kept where it belongs: recorded, unless the job already
    /// has one.
    fn succeeded(
        &mut self,
        s: &Sent,
        result: &JobResult,
        output: Body,
        mime: Option<String>,
        now: Now,
    ) {
        let how = match self.jobs.succeeded(&s.job, result, output, mime, now.ms) {
            Ok(_) => {
                info!(job = %s.job, agent = %s.agent, attempt = s.attempt, "job succeeded");
                Settled::Ended(JobState::Succeeded)
            }
            Err(_) => {
                if let Some(j) = self.jobs.get(&s.job) {
                    self.stats.duplicate(&j.spec.capability);
                }
                info!(job = %s.job, agent = %s.agent, "duplicate result dropped (the job already has its outcome)");
                Settled::Unchanged
            }
        };
        self.settle(&s.job, Some(&s.agent), how, now);
    }

    /// A job IQ's error (or a refused input upload).
    pub(super) fn on_job_error(&mut self, s: Sent, error: StanzaError, now: Now) {
        if classify(&error) == Disposition::Gone {
            return self.agent_gone(&s.agent, "job bounced: recipient unavailable", now);
        }
        let e = SpineError::from_stanza_error(&error)
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                let c = if error.type_ == ErrorType::Wait {
                    Condition::Retryable
                } else {
                    Condition::Failed
                };
                SpineError::new(c).with_text(format!("{:?}", error.defined_condition))
            });
        let kept_inputs = self
            .jobs
            .get(&s.job)
            .is_some_and(|j| !j.spec.input_kept.is_empty());
        if e.condition == Condition::FetchFailed && kept_inputs {
            // Agents keep some of the inputs (§13.5): the bytes are not here to send instead.
            let why = e.text.clone().unwrap_or_else(|| "no reason given".into());
            return self.kept_lost(&s.job, &s.agent, &why, now);
        }
        let by_url = matches!(s.payload.input, Some(Data::Ref(_)))
            || self
                .jobs
                .get(&s.job)
                .is_some_and(|j| !j.spec.input_blobs.is_empty());
        if e.condition == Condition::FetchFailed && by_url {
            // The agent could not fetch the input (or the fragments it names) by URL: the same
            // attempt goes again, in chunks (PROTOCOL.md §13.4, §11.7.1).
            let why = e.text.clone().unwrap_or_else(|| "no reason given".into());
            return self.fetch_failed(&s.job, &s.agent, &why, now);
        }
        if matches!(e.condition, Condition::Busy | Condition::Draining) {
            // Refused, not run: our view of its load was behind. Place it again at once,
            // without spending an attempt.
            debug!(job = %s.job, agent = %s.agent, "refused: {e}");
            let how = if self.jobs.refused(&s.job, now.ms) {
                Settled::Retry(now.ms + REFUSED_AGAIN_MS)
            } else {
                Settled::Unchanged
            };
            return self.settle(&s.job, Some(&s.agent), how, now);
        }
        self.fail_attempt(&s, e, now)
    }

    /// An attempt failed with `e`: retried or ended.
    pub(super) fn fail_attempt(&mut self, s: &Sent, e: SpineError, now: Now) {
        debug!(job = %s.job, agent = %s.agent, "attempt {} failed: {e}", s.attempt);
        let after = self
            .jobs
            .attempt_failed(&s.job, Some(&s.agent), Some(&e), now.ms);
        let how = Settled::from_failure(after);
        if let Settled::Ended(state) = how {
            info!(job = %s.job, %state, "job ended: {e}");
        }
        if let (Settled::Retry(_), Some(j)) = (how, self.jobs.get(&s.job)) {
            self.stats.retried(&j.spec.capability, now.ms);
        }
        self.settle(&s.job, Some(&s.agent), how, now);
    }

    /// The session ended: the largest job request sent just before (a stanza over the
    /// server's size limit is why servers close a session) counts as a failed attempt of its
    /// job, so that no job can end every session forever. It goes to its agent again with the
    /// next attempt number, or fails after its last attempt.
    pub(super) fn blame_lost_session(&mut self, now: Now) {
        let Some(died) = self.session_died.take() else {
            return;
        };
        let since = died.checked_sub(SESSION_SUSPECT_WINDOW).unwrap_or(died);
        let mut culprits = crate::jobs::blame(self.requests.sent_sizes(), since, died);
        culprits.sort();
        culprits.dedup();
        for job in culprits {
            match self.jobs.session_lost(&job, now.ms) {
                Some(SessionLost::Resend { attempt }) => {
                    self.requests.set_attempt(&job, attempt);
                    self.persist(&job);
                    warn!(job = %job, attempt, "the XMPP session ended right after this job was sent: counted as a failed attempt (is its stanza over the server's size limit?)");
                }
                Some(SessionLost::Final) => {
                    let agent = self.agent_of(&job);
                    warn!(job = %job, "job ended: the XMPP session ended right after each of its attempts was sent");
                    self.settle(&job, agent.as_ref(), Settled::Ended(JobState::Failed), now);
                }
                None => {}
            }
        }
    }

    /// The agent of a job's current or last attempt.
    pub(super) fn agent_of(&self, job: &JobId) -> Option<FullJid> {
        self.jobs.get(job).and_then(|j| j.agent.clone())
    }

    /// Cancels a job for any front end: the agent running it is told, and cancelling an `all`
    /// or map/reduce job cancels its children first. Returns the job's final state (a job
    /// already final stays as it was).
    pub(super) fn cancel_job(&mut self, job: &JobId, now: Now) -> Result<JobState, SpineError> {
        let children = self
            .jobs
            .get(job)
            .map(|j| j.children.clone())
            .unwrap_or_default();
        for c in children {
            self.cancel_step(&c, "cancelled by the submitter", now);
        }
        let was_final = self.jobs.get(job).is_some_and(|j| j.state.is_final());
        match self.jobs.cancel(job, now.ms) {
            Ok(agent) => {
                if let Some(a) = &agent {
                    self.send_cancel(a, job);
                }
                let state = self.jobs.get(job).map_or(JobState::Cancelled, |j| j.state);
                let how = if state == JobState::Cancelled && !was_final {
                    info!(job = %job, "job cancelled");
                    Settled::Ended(state)
                } else {
                    Settled::Unchanged
                };
                self.settle(job, agent.as_ref(), how, now);
                Ok(state)
            }
            Err(e) => Err(SpineError::new(Condition::UnknownJob).with_text(e.to_string())),
        }
    }

    /// Cancels one child job and tells its agent (no event: its parent's outcome says it).
    fn cancel_step(&mut self, job: &JobId, reason: &str, now: Now) {
        let was_final = self.jobs.get(job).is_some_and(|j| j.state.is_final());
        let cancelled = self.jobs.cancel_because(job, reason, now.ms);
        if !was_final {
            self.audit_record(job, now);
        }
        let agent = match cancelled {
            Ok(Some(a)) => Some(a),
            _ => None,
        };
        if let Some(a) = &agent {
            self.send_cancel(a, job);
        }
        self.release(job, agent.as_ref());
        self.persist(job);
    }

    /// A reduce step cannot get the map outputs agents keep for it (a holder is gone, its
    /// file aged out, or `agent` does not fetch over HTTP): the map steps whose outputs were
    /// kept run again, their outputs going to the dispatcher's blob store this time, and the
    /// reduce step is replaced by a new one once they are done. The attempt is not counted
    /// against the step (MapReduce's re-execution of lost map outputs).
    pub(super) fn kept_lost(&mut self, job: &JobId, agent: &FullJid, why: &str, now: Now) {
        let Some(parent) = self.jobs.get(job).and_then(|j| j.spec.parent.clone()) else {
            return;
        };
        warn!(job = %job, agent = %agent, "a reduce step cannot fetch the map outputs agents keep ({why}): those map steps run again");
        let adv = self.jobs.lose_kept(&parent, job, now.ms);
        self.cancel_step(
            job,
            "the map outputs it takes were lost with the agent that kept them; it runs again once they are made again",
            now,
        );
        self.forget_slots(job);
        self.apply_advance(&parent, adv, now);
    }

    /// Tells an agent to stop a job.
    pub(super) fn send_cancel(&mut self, agent: &FullJid, job: &JobId) {
        let id = self.requests.id("c");
        self.send(
            Iq::from_set(id, spine_protocol::Cancel { job: job.clone() })
                .with_to(agent.clone().into()),
        );
    }

    /// Acts on a map/reduce job's step: stores the new steps and the parent together, cancels
    /// the copies that lost (or all steps, when the job ended), reports progress, and
    /// announces the outcome.
    pub(super) fn apply_advance(&mut self, parent: &JobId, adv: Advance, now: Now) {
        let ended = self.jobs.get(parent).map(|p| p.state);
        let reason = match ended {
            Some(s) if s.is_final() => "the map/reduce job ended",
            _ => "another copy of this step finished first",
        };
        for c in &adv.cancel {
            self.cancel_step(c, reason, now);
        }
        self.keep_step_inputs(&adv.created);
        for c in &adv.created {
            self.persist(c);
        }
        self.persist(parent);
        self.place_pending = true;
        if adv.ended {
            info!(job = %parent, state = ended.map_or("unknown", JobState::as_str), "map/reduce ended");
            self.notify_one(parent, now);
        } else if adv.progressed || !adv.created.is_empty() {
            if let Some((percent, message)) = self
                .jobs
                .get(parent)
                .and_then(|p| p.mr.as_ref().map(|m| (m.percent(), m.describe())))
            {
                let p = Progress {
                    job: parent.clone(),
                    attempt: 1,
                    percent: Some(percent),
                    message: Some(message),
                };
                self.forward(parent, p.into());
            }
        }
    }

    /// Tells watchers that `job` ended; when it was the last child of an `all` job, records
    /// and announces the parent's gathered outcome too; when it was a step of a map/reduce
    /// job, moves that job on.
    pub(super) fn notify_final(&mut self, job: &JobId, now: Now) {
        self.notify_one(job, now);
        let Some(parent) = self.jobs.get(job).and_then(|j| j.spec.parent.clone()) else {
            return;
        };
        if self.jobs.get(&parent).is_some_and(|p| p.mr.is_some()) {
            let adv = self.jobs.advance(&parent, now.ms, self.blob_store.as_ref());
            return self.apply_advance(&parent, adv, now);
        }
        if self.jobs.gather(&parent, now.ms) {
            self.persist(&parent);
            info!(job = %parent, "all agents answered: job ended");
            self.notify_one(&parent, now);
        }
    }

    /// Tells the audit log, the event streams and the XMPP watcher that `job` ended.
    pub(super) fn notify_one(&mut self, job: &JobId, now: Now) {
        self.audit_record(job, now);
        self.outcome_event(job);
        self.canary_outcome(job, now);
        let Some(rec) = self.jobs.get(job) else {
            return;
        };
        // Event streams (HTTP SSE) and waiting requests get the whole job, after the commit,
        // rendered once for all of them; left for the driver if none may be there.
        let data = if self.listened {
            super::Rendered::job(rec)
        } else {
            super::Rendered::later()
        };
        let mut watch = rec.spec.watch.clone();
        self.publish(job, EventKind::Final, data);
        // Submissions waiting for this end (protocol 1.3) are answered with it; a watcher
        // that waits gets it in the answer, not again in a message.
        for w in self.submit_waits.take(job) {
            match self.send_status(w.to.clone(), Via::Reply(w.id.clone()), job, now) {
                Ok(()) if watch.as_ref() == Some(&w.to) => watch = None,
                Ok(()) => {}
                Err(e) => {
                    // (The watch message, if any, is still tried below.)
                    warn!(job = %job, "final status not sent to a waiting submitter: {e}");
                    self.reply_error(w.to, w.id, e);
                }
            }
        }
        if let Some(watch) = watch {
            // A watch message is never refused (it waits its turn behind other transfers).
            if let Err(e) = self.send_status(watch, Via::Message, job, now) {
                warn!(job = %job, "final status not sent: {e}");
            }
        }
    }

    /// Queues the audit line of a job that ended (stored with the outcome, then written).
    fn audit_record(&mut self, job: &JobId, now: Now) {
        let Some(rec) = self.jobs.get(job).filter(|r| r.state.is_final()) else {
            return;
        };
        // Counted here: like the audit line, once per job that ends.
        self.stats.ended(rec, now.ms);
        if self.cfg.audit_log.trim() == "off" {
            return;
        }
        self.ready.audit.push(crate::audit::line(rec, now.ms));
    }

    /// Submissions whose wait is over before their job's end are answered with `<accepted>`
    /// and the job's state then (protocol 1.3, PROTOCOL.md §11.2.1).
    pub(super) fn expire_submit_waits(&mut self, now: Now) {
        for (job, w) in self.submit_waits.expired(now.ms) {
            let state = self.jobs.get(&job).map_or(w.state, |r| r.state);
            self.send(Iq::from_result(w.id, Some(Accepted { job, state })).with_to(w.to));
        }
    }

    /// Jobs whose deadline passed time out (from the table's deadline index).
    pub(super) fn expire_deadlines(&mut self, now: Now) {
        for (job, agent) in self.jobs.expire(now.ms) {
            info!(job = %job, "job timed out");
            if let Some(a) = &agent {
                self.send_cancel(a, &job);
            }
            self.settle(
                &job,
                agent.as_ref(),
                Settled::Ended(JobState::TimedOut),
                now,
            );
        }
    }

    /// Queued jobs that found no capable agent within `no_agent_wait` fail.
    pub(super) fn expire_no_agent(&mut self, now: Now) {
        let wait = self.cfg.no_agent_wait.as_millis() as u64;
        let expired: Vec<JobId> = self
            .no_agent_since
            .iter()
            .filter(|(_, t)| now.ms.saturating_sub(**t) > wait)
            .map(|(j, _)| j.clone())
            .collect();
        for job in expired {
            self.no_agent_since.remove(&job);
            if self
                .jobs
                .get(&job)
                .is_some_and(|j| j.state == JobState::Queued)
            {
                self.jobs.no_agent(&job, now.ms);
                info!(job = %job, "job failed: no capable agent appeared");
                self.settle(&job, None, Settled::Ended(JobState::Failed), now);
            }
        }
    }
}
