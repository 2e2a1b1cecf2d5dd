//! Inbound stanzas, classified once: each becomes one [`Inbound`] value — a job's reply or
//! error, a ping's answer, a chunk acknowledgement, a reply to an output transfer, a late
//! result, presence, a submitter's request, a progress report — with the sender checked here
//! and nowhere else. [`Core::handle`] is then one flat `match` onto synchronous handlers.
//!
//! The first step of [`super::Core::stanza`]: replies are matched against the requests in
//! flight ([`super::requests`]) and the output transfers ([`crate::deliver`]); progress and
//! partial results count only from the agent the job runs on.

use jid::{FullJid, Jid};
use spine_protocol::{JobId, Partial, Progress};
use tokio_xmpp::Stanza;
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::Message;
use xmpp_parsers::presence::Presence;
use xmpp_parsers::stanza_error::StanzaError;

use super::place::runs_on;
use super::requests::{Matched, Sent};
use super::{Core, Now};

/// One inbound stanza, classified.
pub(crate) enum Inbound {
    /// The result of a job IQ, from its agent.
    JobResult {
        sent: Sent,
        payload: Option<minidom::Element>,
    },
    /// The error of a job IQ, from its agent.
    JobError {
        sent: Sent,
        error: StanzaError,
    },
    /// The agent's answer to an operator's drain or undrain.
    StateAnswer {
        pending: super::operator::Pending,
        answer: Result<(), StanzaError>,
    },
    /// A pinged agent answered.
    PingAnswer(FullJid),
    /// A pinged agent answered with an error: it is gone.
    PingError(FullJid),
    /// A chunk of an input upload was acknowledged (`None`) or refused.
    ChunkReply {
        upload: u64,
        error: Option<StanzaError>,
    },
    /// A reply to a chunk of an output sent to a submitter (already applied).
    DeliveryReply,
    /// A reply to one of our job IQs from someone else than its agent.
    WrongSender {
        from: Option<Jid>,
    },
    /// A result for a request given up (its agent declared gone, or this dispatcher
    /// restarted and sent the job again).
    LateResult {
        job: String,
        from: Option<Jid>,
    },
    Presence(Presence),
    /// A request (IQ set) from a submitter or an agent's chunk.
    Set {
        from: Jid,
        id: String,
        payload: minidom::Element,
    },
    /// A query (IQ get) from a submitter.
    Get {
        from: Jid,
        id: String,
        payload: minidom::Element,
    },
    /// A progress report from the agent running the job.
    Progress {
        job: JobId,
        percent: Option<u8>,
        payload: minidom::Element,
    },
    /// A partial result from the agent running the job.
    Partial {
        job: JobId,
        payload: minidom::Element,
    },
    /// An agent's answer to a new leader's `<recall/>` ([`super::recall`]).
    Recalled {
        agent: FullJid,
        reply: Result<Option<minidom::Element>, StanzaError>,
    },
    /// Nothing for the dispatcher.
    Ignored,
}

impl Core {
    /// Classifies a stanza (taking a reply's request out of the requests in flight).
    pub(super) fn classify(&mut self, st: Stanza, now: Now) -> Vec<Inbound> {
        match st {
            Stanza::Presence(p) => vec![Inbound::Presence(p)],
            Stanza::Iq(Iq::Result {
                id, from, payload, ..
            }) => vec![self.classify_reply(id, from, Ok(payload), now)],
            Stanza::Iq(Iq::Error {
                id, from, error, ..
            }) => vec![self.classify_reply(id, from, Err(error), now)],
            Stanza::Iq(Iq::Set {
                id,
                from: Some(from),
                payload,
                ..
            }) => vec![Inbound::Set { from, id, payload }],
            Stanza::Iq(Iq::Get {
                id,
                from: Some(from),
                payload,
                ..
            }) => vec![Inbound::Get { from, id, payload }],
            Stanza::Message(m) => self.classify_message(m),
            _ => vec![Inbound::Ignored],
        }
    }

    fn classify_reply(
        &mut self,
        id: String,
        from: Option<Jid>,
        reply: Result<Option<minidom::Element>, StanzaError>,
        now: Now,
    ) -> Inbound {
        if let Some(agent) = self.take_recall(&id, from.as_ref()) {
            return Inbound::Recalled { agent, reply };
        }
        match self.state_requests.take(&id, from.as_ref()) {
            Some(Ok(pending)) => {
                return Inbound::StateAnswer {
                    pending,
                    answer: reply.map(|_| ()),
                }
            }
            Some(Err(())) => return Inbound::WrongSender { from },
            None => {}
        }
        match (self.requests.take_reply(&id, from.as_ref()), reply) {
            (Matched::Job(sent), Ok(payload)) => Inbound::JobResult {
                sent: *sent,
                payload,
            },
            (Matched::Job(sent), Err(error)) => Inbound::JobError { sent: *sent, error },
            (Matched::Ping(agent), Ok(_)) => Inbound::PingAnswer(agent),
            (Matched::Ping(agent), Err(_)) => Inbound::PingError(agent),
            (Matched::Chunk(upload), r) => Inbound::ChunkReply {
                upload,
                error: r.err(),
            },
            (Matched::WrongSender, _) => Inbound::WrongSender { from },
            (Matched::Unknown, r) => {
                let error = r.as_ref().err();
                if self
                    .deliveries
                    .on_reply(&id, from.as_ref(), error, now.mono)
                {
                    return Inbound::DeliveryReply;
                }
                match r {
                    Ok(Some(p)) if p.is("result", spine_protocol::NS) => match p.attr("job") {
                        Some(job) => Inbound::LateResult {
                            job: job.to_owned(),
                            from,
                        },
                        None => Inbound::Ignored,
                    },
                    _ => Inbound::Ignored,
                }
            }
        }
    }

    /// Progress and partial results, counted only from the agent running the job.
    fn classify_message(&self, m: Message) -> Vec<Inbound> {
        let Some(from) = m.from else {
            return vec![Inbound::Ignored];
        };
        let mut out = Vec::new();
        for p in m.payloads {
            if p.is("progress", spine_protocol::NS) {
                if let Ok(pr) = Progress::try_from(p.clone()) {
                    if runs_on(self.jobs.get(&pr.job), &from) {
                        out.push(Inbound::Progress {
                            job: pr.job,
                            percent: pr.percent,
                            payload: p,
                        });
                    }
                }
            } else if p.is("partial", spine_protocol::NS) {
                if let Ok(pt) = Partial::try_from(p.clone()) {
                    if runs_on(self.jobs.get(&pt.job), &from) {
                        out.push(Inbound::Partial {
                            job: pt.job,
                            payload: p,
                        });
                    }
                }
            }
        }
        debug!(from = %from, reports = out.len(), "message handled");
        out
    }

    /// Acts on a classified stanza.
    pub(super) fn handle(&mut self, inbound: Inbound, now: Now) {
        match inbound {
            Inbound::JobResult { sent, payload } => self.on_job_result(sent, payload, now),
            Inbound::JobError { sent, error } => self.on_job_error(sent, error, now),
            Inbound::StateAnswer { pending, answer } => self.state_answered(pending, answer),
            Inbound::PingAnswer(agent) => self.ping_answered(agent),
            Inbound::Recalled { agent, reply } => self.recalled(agent, reply, now),
            Inbound::PingError(agent) => self.agent_gone(&agent, "ping failed", now),
            Inbound::ChunkReply {
                upload,
                error: None,
            } => self
                .requests
                .chunk_acked(upload, &mut self.ready.stanzas, now.mono),
            Inbound::ChunkReply {
                upload,
                error: Some(e),
            } => {
                if let Some(sent) = self.requests.upload_refused(upload) {
                    warn!(job = %sent.job, agent = %sent.agent, "input upload refused: {:?}", e.defined_condition);
                    self.on_job_error(sent, e, now);
                }
            }
            Inbound::DeliveryReply => self.pump_deliveries(now),
            Inbound::WrongSender { from } => {
                warn!(from = %show_jid(from.as_ref()), "ignoring a reply to a request sent to another entity");
            }
            Inbound::LateResult { job, from } => {
                // The job's outcome comes, or came, from the request that replaced it.
                info!(job = %job, from = %show_jid(from.as_ref()), "duplicate result dropped (a late reply to a request given up)");
            }
            Inbound::Presence(p) => self.on_presence(p, now),
            Inbound::Set { from, id, payload } => self.on_set(from, id, payload, now),
            Inbound::Get { from, id, payload } => self.on_get(from, id, payload, now),
            Inbound::Progress {
                job,
                percent,
                payload,
            } => {
                self.jobs.progress(&job, percent, now.ms);
                self.forward(&job, payload);
            }
            Inbound::Partial { job, payload } => {
                self.jobs.progress(&job, None, now.ms);
                self.forward(&job, payload);
            }
            Inbound::Ignored => {}
        }
    }
}

/// A JID for a log line: its text, or "(none)" (never the Debug form `Some(Jid("…"))`).
fn show_jid(j: Option<&Jid>) -> String {
    j.map_or_else(|| "(none)".to_owned(), ToString::to_string)
}
