//! A new leader among several dispatchers asks the agents which of its account's jobs they
//! have (`<recall/>`, PROTOCOL.md §10.1), before it places the jobs it found queued.
//!
//! A leader sends a job to an agent that announced protocol 1.2 before the job's dispatch is
//! stored ([`Core::take_early`]), as a lone dispatcher does; a lone one records such requests
//! in a file of its own, which a leader on another machine cannot read. So a leader that dies
//! between the request and its commit leaves the job queued in the store while an agent runs
//! it. The next leader, before placing any job it found queued, asks every 1.2 agent it knows
//! for the jobs the account sent it: each such job goes back to its agent with the same attempt
//! ([`crate::jobs::JobTable::sent_ahead`]), which the agent attaches to the run or answers
//! from its outcome cache, instead of running a second time elsewhere. Jobs submitted after
//! the election are placed at once; the queued ones wait until every agent asked has answered,
//! errored or gone, or [`RECALL_TIMEOUT`] has passed.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use jid::{FullJid, Jid};
use spine_protocol::{JobId, JobState, Recall, Recalled};
use tracing::{info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::StanzaError;

use super::{Core, Now};

/// How long a new leader waits for the agents' answers before it places the queued jobs it
/// found anyway (an agent that has not answered by then is treated as having none).
pub(crate) const RECALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the agents' answers are kept for jobs this leader does not hold yet: a job a
/// standby stored, which the dead leader had taken and sent ahead, comes from the standbys'
/// table moments after the election ([`Core::adopt`]).
const KEEP_ANSWERS: Duration = Duration::from_secs(30);

/// Answers kept at most (jobs not held when they came).
const MAX_ANSWERS: usize = 100_000;

/// The agents' answers about jobs the leader did not hold then: job → (agent, attempt).
#[derive(Debug, Default)]
pub(crate) struct Answers {
    had: HashMap<JobId, (FullJid, u64)>,
    until: Option<Instant>,
}
/// The questions of one election.
#[derive(Debug)]
pub(crate) struct RecallRound {
    /// IQ id → the agent asked.
    asked: HashMap<String, FullJid>,
    /// Jobs found queued when this leader took over: not placed until the round ends.
    unsure: HashSet<JobId>,
    until: Instant,
    /// Jobs sent back to their agent.
    restored: usize,
}

impl Core {
    /// Just elected: asks every agent that answers `<recall/>` (protocol 1.2) which jobs it
    /// has, and holds back the queued jobs until they answer. Nothing to ask when no job is
    /// queued or no such agent is known.
    pub(super) fn start_recall(&mut self, now: Now) {
        let unsure: HashSet<JobId> = self
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Queued && !j.resume)
            .map(|j| j.id.clone())
            .collect();
        let agents: Vec<FullJid> = self
            .http_agents
            .iter()
            .filter(|(_, a)| a.recalls)
            .map(|(j, _)| j.clone())
            .collect();
        self.answers = Answers::default();
        if agents.is_empty() {
            return;
        }
        let mut asked = HashMap::new();
        for a in agents {
            let id = self.requests.id("r");
            self.send(Iq::from_get(id.clone(), Recall).with_to(Jid::from(a.clone())));
            asked.insert(id, a);
        }
        info!(
            agents = asked.len(),
            queued = unsure.len(),
            "asking the agents which queued jobs the last leader sent them"
        );
        self.recall = Some(RecallRound {
            asked,
            unsure,
            until: now.mono + RECALL_TIMEOUT,
            restored: 0,
        });
    }

    /// Whether `id` is the answer to a recall, from the agent asked: the agent, taken out of
    /// the round. An answer from anyone else is not one.
    pub(super) fn take_recall(&mut self, id: &str, from: Option<&Jid>) -> Option<FullJid> {
        let round = self.recall.as_mut()?;
        let agent = round.asked.get(id)?;
        if from != Some(&Jid::from(agent.clone())) {
            return None;
        }
        round.asked.remove(id)
    }

    /// An agent's answer: each of its jobs still queued here at the attempt after the stored
    /// one goes back to it.
    pub(super) fn recalled(
        &mut self,
        agent: FullJid,
        reply: Result<Option<minidom::Element>, StanzaError>,
        now: Now,
    ) {
        let had = match reply.map(|p| p.map(Recalled::try_from)) {
            Ok(Some(Ok(r))) => r.jobs,
            Ok(Some(Err(e))) => {
                warn!(agent = %agent, "bad answer to <recall/>: {e}");
                Vec::new()
            }
            Ok(None) => Vec::new(),
            Err(e) => {
                warn!(agent = %agent, error = ?e.defined_condition, "the agent refused <recall/>");
                Vec::new()
            }
        };
        let mut back = 0;
        for h in had {
            let unsure = self.recall_holds(&h.job);
            if !unsure {
                // Not held yet: perhaps a standby's submission, taken later.
                if self.jobs.get(&h.job).is_none() && self.answers.had.len() < MAX_ANSWERS {
                    self.answers.had.insert(h.job, (agent.clone(), h.attempt));
                    self.answers.until = Some(now.mono + KEEP_ANSWERS);
                }
                continue;
            }
            if self.send_back(&h.job, h.attempt, &agent, now) {
                back += 1;
            }
        }
        if let Some(round) = self.recall.as_mut() {
            round.restored += back;
        }
        self.end_recall_if_done(now);
    }

    /// A job the last leader sent ahead to `agent` as `attempt`: restored in flight there, if
    /// the record is still one attempt behind and queued.
    fn send_back(&mut self, job: &JobId, attempt: u64, agent: &FullJid, now: Now) -> bool {
        if !self.jobs.sent_ahead(job, attempt, agent, now.ms) {
            return false;
        }
        info!(job = %job, agent = %agent, attempt,
            "sent by the last leader before its commit: back to its agent");
        self.persist(job);
        true
    }

    /// A job a standby stored, just taken ([`Core::adopt`]): if an agent said it has it, it
    /// goes back there; if the agents are still answering, it waits for them.
    pub(super) fn recall_adopted(&mut self, job: &JobId, now: Now) {
        if self.answers.until.is_some_and(|t| now.mono >= t) {
            self.answers = Answers::default();
        }
        if let Some((agent, attempt)) = self.answers.had.remove(job) {
            self.send_back(job, attempt, &agent, now);
            return;
        }
        let queued = self
            .jobs
            .get(job)
            .is_some_and(|j| j.state == JobState::Queued);
        if let (Some(round), true) = (self.recall.as_mut(), queued) {
            round.unsure.insert(job.clone());
        }
    }

    /// An agent asked is gone: it will not answer.
    pub(super) fn recall_agent_gone(&mut self, agent: &FullJid, now: Now) {
        if let Some(round) = self.recall.as_mut() {
            round.asked.retain(|_, a| a != agent);
        }
        self.end_recall_if_done(now);
    }

    /// Whether placement holds `id` back (the round is on and the job was found queued).
    pub(super) fn recall_holds(&self, id: &JobId) -> bool {
        self.recall.as_ref().is_some_and(|r| r.unsure.contains(id))
    }

    /// When the round gives up on the agents that have not answered.
    pub(super) fn recall_deadline(&self) -> Option<Instant> {
        self.recall.as_ref().map(|r| r.until)
    }

    /// Ends the round when every agent answered or its time is up; placement runs then.
    pub(super) fn end_recall_if_done(&mut self, now: Now) {
        let Some(round) = &self.recall else { return };
        if !round.asked.is_empty() && now.mono < round.until {
            return;
        }
        if !round.asked.is_empty() {
            let silent: Vec<String> = round.asked.values().map(ToString::to_string).collect();
            warn!(agents = ?silent, "no answer to <recall/> in time: their queued jobs are placed anew");
        }
        info!(
            back = round.restored,
            queued = round.unsure.len(),
            "recall over: queued jobs are placed"
        );
        self.recall = None;
        self.place_pending = true;
    }
}
