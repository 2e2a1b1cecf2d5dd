//! A standby's XMPP submitters (docs/dispatcher.md, "Running several dispatchers";
//! PROTOCOL.md §11.8): a standby holds no job, so it stores a `<submit/>` for the leader as it
//! stores an HTTP submission, answers `<discover/>` from the fleet it keeps warm, and answers
//! `<status/>` and `<cancel/>` — and a keyed `<submit/>`, whose key the leader may know
//! already — after a read of the shared store. The core makes no read itself: it asks the
//! driver for one ([`Lookup`], [`Core::take_lookups`]) and goes on when the driver gives the
//! answer back ([`Core::looked_up`]), as it goes on after a commit.
//!
//! A large input's chunks are kept here as at the leader until the `<submit/>` that names
//! them, whose job is then stored with its input. What a standby still refuses, naming the
//! leader: events, agents' requests (their outputs' chunks among them), and a status whose
//! output is in the blob store (the leader sends it in chunks or as a reference).

use jid::Jid;
use spine_protocol::{Condition, JobId, Payload, SpineError, Submit};
use xmpp_parsers::iq::Iq;

use super::{Core, Now};
use crate::deliver::{Out, Via};
use crate::jobs::{Body, JobRecord, Recorded};
use crate::policy::{Capabilities, Grant};

/// Reads of the shared store a standby may wait for at once; past it, requests that need one
/// are refused (`wait`: try again in a moment).
pub(crate) const MAX_LOOKUPS: usize = 256;

/// A request a standby answers after a read of the shared store.
#[derive(Debug)]
pub(crate) struct Lookup {
    /// Who asked, and the id of its IQ.
    pub from: Jid,
    pub id: String,
    pub what: LookupFor,
}

/// What the read is for, and what it reads.
#[derive(Debug)]
pub(crate) enum LookupFor {
    /// A submission with an idempotency key: the job the key made, if any (read the job
    /// whose key (`submitter`, `key`) is).
    Key {
        submitter: String,
        key: String,
        submit: Box<Submit>,
        visible: Capabilities,
    },
    /// `<status/>`: the job.
    Status { job: JobId, grant: Grant },
    /// `<cancel/>`: the job, to check that the caller may cancel it.
    Cancel { job: JobId, grant: Grant },
    /// `<cancel/>` of a job the caller may cancel: pass it on to the leader (write a cancel
    /// request; the answer is `None`).
    PassCancel { job: JobId },
}

/// The driver's answer to a [`Lookup`]: the job read (`None`: none), or why the store could
/// not be read.
pub(crate) type Looked = Result<Option<JobRecord>, String>;

impl Core {
    /// The reads of the shared store this standby waits for, to make now.
    pub(crate) fn take_lookups(&mut self) -> Vec<Lookup> {
        std::mem::take(&mut self.lookups)
    }

    /// The driver made a read this core asked for: the request goes on.
    pub(crate) fn looked_up(&mut self, l: Lookup, found: Looked, now: Now) {
        self.lookups_waiting = self.lookups_waiting.saturating_sub(1);
        let Lookup { from, id, what } = l;
        let found = match found {
            Ok(f) => f,
            Err(why) => {
                tracing::warn!(from = %from, "a standby could not read the shared store: {why}");
                return self.try_again(from, id, "the job store cannot be reached; try again");
            }
        };
        match what {
            LookupFor::Key { .. } | LookupFor::Status { .. } | LookupFor::Cancel { .. }
                if self.leads =>
            {
                // This dispatcher began to lead meanwhile: it holds every job now, and
                // answers as a leader does.
                self.answer_as_leader(from, id, what, now)
            }
            LookupFor::Key {
                submit, visible, ..
            } => match found {
                Some(rec) => self.send(
                    Iq::from_result(
                        id,
                        Some(spine_protocol::Accepted {
                            job: rec.id,
                            state: rec.state,
                        }),
                    )
                    .with_to(from),
                ),
                None => self.on_submit(from, id, *submit, visible, now),
            },
            LookupFor::Status { job, grant } => match found {
                Some(rec) if !grant.may_see(from.to_bare().as_str(), &rec.spec.submitter) => {
                    self.reply_error(from, id, super::submit::not_yours(&job))
                }
                Some(rec) if output_not_inline(&rec) => self.standby_refusal(from, id),
                Some(rec) => self.send(Out::Status {
                    to: from,
                    via: Via::Reply(id),
                    status: Box::new(super::views::status(&rec)),
                }),
                None => self.reply_error(from, id, unknown(&job)),
            },
            LookupFor::Cancel { job, grant } => match found {
                Some(rec) if !grant.may_see(from.to_bare().as_str(), &rec.spec.submitter) => {
                    self.reply_error(from, id, super::submit::not_yours(&job))
                }
                // An ended job keeps its outcome: nothing to pass on.
                Some(rec) if rec.state.is_final() => self.send(Iq::empty_result(from, id)),
                Some(_) => self.ask(from, id, LookupFor::PassCancel { job }),
                None => self.reply_error(from, id, unknown(&job)),
            },
            // The leader makes the cancel (it reads the requests with the submissions).
            LookupFor::PassCancel { .. } => self.send(Iq::empty_result(from, id)),
        }
    }

    /// A request the core asked a read for, answered by the leader this core has become.
    fn answer_as_leader(&mut self, from: Jid, id: String, what: LookupFor, now: Now) {
        match what {
            LookupFor::Key {
                submit, visible, ..
            } => self.on_submit(from, id, *submit, visible, now),
            LookupFor::Status { job, grant } => self.status_of(from, id, job, &grant, now),
            LookupFor::Cancel { job, grant } => self.cancel_of(from, id, job, &grant, now),
            LookupFor::PassCancel { .. } => self.send(Iq::empty_result(from, id)),
        }
    }

    /// Asks the driver for a read, if not too many wait already.
    fn ask(&mut self, from: Jid, id: String, what: LookupFor) {
        if self.lookups_waiting >= MAX_LOOKUPS {
            let text = format!(
                "this standby waits for {MAX_LOOKUPS} reads of the job store already; try again in a moment, or at the leader"
            );
            return self.try_again(from, id, &text);
        }
        self.lookups_waiting += 1;
        self.lookups.push(Lookup { from, id, what });
    }

    /// An IQ set of a submitter (`grant`) at a standby.
    pub(super) fn standby_set(
        &mut self,
        from: Jid,
        id: String,
        grant: Grant,
        parsed: Payload,
        now: Now,
    ) {
        match parsed {
            // A large input's chunks came here first: the submission takes them, and its
            // input is stored with it for the leader.
            Payload::Submit(s) => {
                if let Some(e) = self.refuse_steps(&from, &grant, &s) {
                    return self.reply_error(from, id, e);
                }
                match s.idempotency_key.clone() {
                    Some(key) => self.ask(
                        from.clone(),
                        id,
                        LookupFor::Key {
                            submitter: from.to_bare().to_string(),
                            key,
                            submit: Box::new(s),
                            visible: grant.capabilities,
                        },
                    ),
                    None => self.on_submit(from, id, s, grant.capabilities, now),
                }
            }
            Payload::Cancel(c) => self.ask(from, id, LookupFor::Cancel { job: c.job, grant }),
            _ => self.standby_refusal(from, id),
        }
    }

    /// `<status/>` of a submitter at a standby.
    pub(super) fn standby_status(&mut self, from: Jid, id: String, job: JobId, grant: Grant) {
        self.ask(from, id, LookupFor::Status { job, grant });
    }

    /// `<status/>` of a job this core holds (or not).
    pub(super) fn status_of(&mut self, from: Jid, id: String, job: JobId, grant: &Grant, now: Now) {
        if !self.may_see(grant, &from, &job) {
            return self.reply_error(from, id, super::submit::not_yours(&job));
        }
        if self.jobs.get(&job).is_none() {
            return self.reply_error(from, id, unknown(&job));
        }
        if let Err(e) = self.send_status(from.clone(), Via::Reply(id.clone()), &job, now) {
            self.reply_error(from, id, e);
        }
    }

    /// `<cancel/>` of a job this core holds (or not).
    pub(super) fn cancel_of(&mut self, from: Jid, id: String, job: JobId, grant: &Grant, now: Now) {
        if !self.may_see(grant, &from, &job) {
            return self.reply_error(from, id, super::submit::not_yours(&job));
        }
        match self.cancel_job(&job, now) {
            Ok(_) => self.send(Iq::empty_result(from, id)),
            Err(e) => self.reply_error(from, id, e),
        }
    }
}

/// Whether a job's output is too large for a status to carry inline: the leader sends such a
/// status (the output in chunks, or by reference).
fn output_not_inline(rec: &JobRecord) -> bool {
    match &rec.outcome {
        Some(Recorded::Succeeded {
            output: Body::Stored(_),
            ..
        }) => true,
        Some(Recorded::Succeeded {
            output: Body::Inline(b),
            ..
        }) => b.len() > spine_protocol::INLINE_LIMIT,
        _ => false,
    }
}

/// The answer about a job no one knows.
fn unknown(job: &JobId) -> SpineError {
    SpineError::new(Condition::UnknownJob).with_text(format!("no job {job}"))
}
