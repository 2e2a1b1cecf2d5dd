//! The submitter API, one function per request kind for every front end: submit
//! ([`Core::accept`]), cancel, status and discover exist once; XMPP requests (`<submit/>`,
//! `<cancel/>`, `<status/>`, `<discover/>`, chunks of large inputs) and HTTP requests
//! ([`Core::api`], [`Core::query`]) only translate, after one permission check per request.
//!
//! Inputs come from [`super::inbound`] (IQ sets and gets) and the driver (HTTP commands).
//! An accepted job is marked for the store, and its acknowledgement waits in [`super::Ready`]
//! behind the commit.

use jid::Jid;
use spine_protocol::{
    Accepted, Agents, Condition, Data, Discover, JobId, JobState, Payload, SpineError, Status,
    Submit,
};
use tracing::{info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use super::api::{Answer, ApiReply, ApiRequest, ApiToken, Query};
use super::{Core, Now};
use crate::deliver::Via;
use crate::jobs::{Body, JobSpec, SubmitError};
use crate::policy::{Capabilities, Grant};

impl Core {
    /// An HTTP request that changes jobs; its answer goes to [`super::Ready::replies`].
    pub(crate) fn api(&mut self, token: ApiToken, req: ApiRequest, now: Now) {
        let reply = match req {
            ApiRequest::Submit {
                spec,
                wait_for_agent,
                visible,
                wait,
            } => {
                let answer = self.accept(*spec, wait_for_agent, &visible, now);
                // A caller who waits for the job's end hears nothing before it (or its wait)
                // is over: its acceptance can share a commit with a fast job's outcome.
                // (Not at a standby: the job ends at the leader, nothing joins its commit.)
                if wait && answer.is_ok() && self.leads {
                    self.ready.lazy += 1;
                    self.ready.waiting.push(token);
                }
                ApiReply::Submitted(answer)
            }
            ApiRequest::Cancel { id } => ApiReply::Cancelled(self.cancel_job(&id, now)),
            ApiRequest::Event { event } => ApiReply::Event(self.event(&event, now)),
            ApiRequest::PutRule { rule } => ApiReply::RulePut(self.put_rule(*rule)),
            ApiRequest::DeleteRule { name } => ApiReply::RuleDeleted(self.delete_rule(&name)),
            ApiRequest::SetAgentState {
                agent,
                drain,
                reason,
            } => {
                // Answered when the agent answers (or does not, in time).
                self.set_agent_state(token, &agent, drain, reason, now);
                return;
            }
            ApiRequest::SlotFilled {
                job,
                attempt,
                agent,
                blob,
            } => ApiReply::SlotFilled(self.slot_filled(&job, attempt, &agent, blob)),
        };
        self.ready.replies.push((token, reply));
        self.fire_outcomes(now);
        if std::mem::take(&mut self.place_pending) {
            self.place(now);
        }
    }

    /// A read, answered at once from the core's state.
    pub(crate) fn query(&self, q: Query, now: Now) -> Answer {
        match q {
            Query::Get { id } => Answer::Job(self.jobs.get(&id).cloned().map(Box::new)),
            Query::Agents {
                capability,
                filter,
                sort,
                limit,
            } => Answer::Agents(self.registry.rank(
                &capability,
                filter.as_ref(),
                sort.as_ref(),
                limit,
            )),
            Query::Capabilities => Answer::Capabilities(self.capability_stats(now)),
            Query::List {
                filter,
                before,
                limit,
            } => {
                // At most this many records are looked at per page (see JobTable::find).
                const BUDGET: usize = 20_000;
                let page = self.jobs.find(&filter, before, limit, BUDGET);
                Answer::Jobs {
                    jobs: page.jobs.into_iter().cloned().collect(),
                    next: page.next,
                }
            }
            Query::Fleet {
                capability,
                filter,
                visible,
                since,
            } => {
                let see = |c: &spine_protocol::CapabilityName| visible.allows(c);
                let view = crate::registry::FleetView {
                    capability: capability.as_ref(),
                    filter: filter.as_ref(),
                    visible: &see,
                };
                let changes = self.registry.fleet(&view, since, now.mono);
                let capabilities = self
                    .capability_loads()
                    .into_iter()
                    .filter(|(c, ..)| visible.allows(c))
                    .collect();
                Answer::Fleet(Box::new(super::FleetAnswer {
                    changes,
                    capabilities,
                    at_ms: now.ms,
                }))
            }
            Query::Tree { id } => {
                Answer::Tree(self.jobs.get(&id).map(|p| super::tree::tree(&self.jobs, p)))
            }
            Query::Metrics => Answer::Metrics(self.metrics()),
            Query::Canaries => Answer::Canaries(self.canaries_view()),
            Query::Rules => Answer::Rules(Box::new(super::api::RulesAnswer {
                rules: self.rules_view(),
                schedules: self.schedules_view(),
                leads: self.leads,
            })),
        }
    }

    /// Accepts a job from any front end (XMPP or HTTP): idempotency, input and argument
    /// checks, the submitter's limits, known capabilities (unless `wait_for_agent`;
    /// `visible`: the capabilities the submitter may run, which the refusal may list), the
    /// queue bound. The job is stored before it is acknowledged (the acknowledgement waits in
    /// `Ready` behind the commit).
    pub(crate) fn accept(
        &mut self,
        spec: JobSpec,
        wait_for_agent: bool,
        visible: &Capabilities,
        now: Now,
    ) -> Result<(JobId, JobState), SpineError> {
        let cap = spec.capability.clone();
        let r = self.accept_counted(spec, wait_for_agent, visible, now);
        match &r {
            Ok(_) => {}
            Err(e) => self.stats.refused(&cap, e.condition),
        }
        r
    }

    fn accept_counted(
        &mut self,
        spec: JobSpec,
        wait_for_agent: bool,
        visible: &Capabilities,
        now: Now,
    ) -> Result<(JobId, JobState), SpineError> {
        if let Some(key) = &spec.idempotency_key {
            if let Some(existing) = self.idempotency.get(&(spec.submitter.clone(), key.clone())) {
                let state = self
                    .jobs
                    .get(existing)
                    .map_or(JobState::Accepted, |j| j.state);
                return Ok((existing.clone(), state));
            }
        }
        let mut spec = spec;
        spec.input = self.keep_body(std::mem::take(&mut spec.input), "input")?;
        spec.input_blobs = spec.check_input(self.blob_store.as_ref())?;
        spec.check_args(self.cfg.max_args.as_u64())?;
        let limits = self.policy.limits(&spec.submitter);
        spec.check_limits(&limits)?;
        if !wait_for_agent {
            // A capability never offered is refused now rather than after `no_agent_wait`.
            let steps =
                crate::registry::submission_steps(&spec.capability, spec.mapreduce.as_ref());
            let hint = if spec.submitter.starts_with("http:") {
                "\"wait_for_agent\": true"
            } else {
                "wait-for-agent='true'"
            };
            self.registry
                .check_known(&steps, |c| visible.allows(c), hint)?;
        }
        let passed = self
            .rates
            .check(&spec.submitter, &spec.capability, &limits, now.mono)
            .map_err(|over| {
                let secs = over.retry_after_secs();
                SpineError::new(Condition::RateLimited)
                    .with_text(format!(
                        "{} is over its rate limit for {} ({} = {}); retry in {secs} s",
                        spec.submitter, spec.capability, over.limit, over.rate
                    ))
                    .with_retry_after(secs)
            })?;
        let job_id = self.new_job_id(now);
        let accepted = match self.jobs.submit_within(
            job_id.clone(),
            spec,
            now.ms,
            limits.max_queued,
        ) {
            Ok(r) => {
                self.rates.take(passed, now.mono);
                info!(job = %job_id, capability = %r.spec.capability, submitter = %r.spec.submitter, "job accepted");
                self.stats.submitted(&r.spec.capability);
                r.state
            }
            Err(
                e @ (SubmitError::QueueFull { .. }
                | SubmitError::SubmitterQuota { .. }
                | SubmitError::TooManyDelayed { .. }),
            ) => {
                // A queue drains in about a second at the rates agents work at.
                return Err(SpineError::new(Condition::QueueFull)
                    .with_text(format!("{e}; retry in 1 s"))
                    .with_retry_after(1));
            }
            Err(e) => return Err(SpineError::new(Condition::Malformed).with_text(e.to_string())),
        };
        self.index_key(&job_id);
        self.persist(&job_id);
        // A deadline already past (an event older than its rule's max_age): the job times out
        // now rather than run late.
        if self
            .jobs
            .get(&job_id)
            .and_then(|j| j.spec.deadline_ms)
            .is_some_and(|d| d <= now.ms)
        {
            self.expire_deadlines(now);
        }
        // Placed at once, so the acknowledgement says whether it is already on its way.
        self.place(now);
        let state = self.jobs.get(&job_id).map_or(accepted, |j| j.state);
        Ok((job_id, state))
    }

    /// What `from` may do as a submitter (`submitters` and `[[submitter]]`).
    /// Whether `from` is a registered agent (a full JID that advertised).
    pub(super) fn is_registered(&self, from: &Jid) -> bool {
        from.clone()
            .try_into_full()
            .ok()
            .and_then(|f| self.registry.id_of(&f))
            .is_some()
    }

    fn grant(&self, from: &Jid) -> Option<Grant> {
        self.policy.submitter(&from.to_bare())
    }

    /// Whether `from` may read or cancel `job`: its own, or any with `all_jobs`. An unknown
    /// job passes (the request then gets `unknown-job`).
    pub(super) fn may_see(&self, grant: &Grant, from: &Jid, job: &JobId) -> bool {
        self.jobs
            .get(job)
            .is_none_or(|j| grant.may_see(from.to_bare().as_str(), &j.spec.submitter))
    }

    pub(super) fn reply_error(&mut self, to: Jid, id: String, e: SpineError) {
        self.send(Iq::from_error(id, StanzaError::from(e)).with_to(to));
    }

    /// A request in another namespace than Spine's.
    fn not_ours(&mut self, to: Jid, id: String) {
        let e = StanzaError::new(
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "en",
            "not supported by this dispatcher",
        );
        self.send(Iq::from_error(id, e).with_to(to));
    }

    /// A standby's answer to any request (PROTOCOL.md §11.8): try again in a moment, at the
    /// leader it names if it knows one.
    pub(super) fn standby_refusal(&mut self, to: Jid, id: String) {
        let text = match &self.leader_hint {
            Some(l) => format!("standby: this dispatcher does not lead; the leader is {l}"),
            None => "standby: this dispatcher does not lead, and no leader is known yet".into(),
        };
        self.try_again(to, id, &text);
    }

    /// A refusal of the moment: `service-unavailable` of type `wait`, with why. It tells of
    /// nothing stored, so it leaves at once ([`super::Ready::now`]), even while a commit
    /// waits for an unreachable store.
    pub(super) fn try_again(&mut self, to: Jid, id: String, text: &str) {
        let e = StanzaError::new(
            ErrorType::Wait,
            DefinedCondition::ServiceUnavailable,
            "en",
            text,
        );
        self.ready
            .now
            .push(Iq::from_error(id, e).with_to(to).into());
    }

    /// An IQ set: a chunk (from agents and submitters), `<submit/>` or `<cancel/>`.
    pub(super) fn on_set(&mut self, from: Jid, id: String, payload: minidom::Element, now: Now) {
        if !payload.ns().starts_with(spine_protocol::NS_PREFIX) {
            return self.not_ours(from, id);
        }
        let parsed = spine_protocol::parse_payload(payload);
        // A change would wait for a commit that cannot happen: the submitter hears it now
        // (as an HTTP caller gets 503), and sends it again.
        if self.store_down
            && matches!(
                parsed,
                Ok(Payload::Submit(_) | Payload::Cancel(_) | Payload::Event(_))
            )
        {
            return self.try_again(
                from,
                id,
                "the job store cannot be reached: nothing can be stored until it is back; try again",
            );
        }
        if !self.leads {
            // Its submitters' requests are served (stored for the leader, or read from the
            // shared store) — their inputs' chunks too, kept here until their `<submit/>`
            // takes them; agents and the rest are told to go to the leader.
            return match (self.grant(&from), parsed) {
                (Some(_), Ok(Payload::Chunk(c))) => self.on_chunk(from, id, c, now),
                (Some(grant), Ok(p)) => self.standby_set(from, id, grant, p, now),
                (Some(_), Err(e)) => self.reply_error(from, id, e.to_spine_error()),
                (None, _) => self.standby_refusal(from, id),
            };
        }
        // Chunks come from agents (their outputs) and submitters (their inputs).
        if let Ok(Payload::Chunk(c)) = parsed {
            if self.is_registered(&from) || self.grant(&from).is_some() {
                return self.on_chunk(from, id, c, now);
            }
            let e = SpineError::new(Condition::NotAuthorized)
                .with_text("only registered agents and allowed submitters send chunks");
            return self.reply_error(from, id, e);
        }
        // An agent's watcher sends events of its own source (PROTOCOL.md §11.9.1).
        let parsed = match parsed {
            Ok(Payload::Event(e)) if self.agent_event(&from, &e) => {
                return self.on_event(from, id, e, now);
            }
            other => other,
        };
        let Some(grant) = self.grant(&from) else {
            warn!(from = %from, "refused XMPP API request from a JID not in `submitters` or [[submitter]]");
            let e = SpineError::new(Condition::NotAuthorized)
                .with_text("this JID may not submit to this dispatcher");
            return self.reply_error(from, id, e);
        };
        match parsed {
            Ok(Payload::Submit(s)) => match self.refuse_steps(&from, &grant, &s) {
                Some(e) => self.reply_error(from, id, e),
                None => self.on_submit(from, id, s, grant.capabilities, now),
            },
            Ok(Payload::Event(e)) if !grant.events => {
                warn!(from = %from, event = %e.id, "refused an event from a submitter that may not send events");
                let err = SpineError::new(Condition::NotAuthorized)
                    .with_text("this JID may not send events (events = true in its [[submitter]])");
                self.reply_error(from, id, err)
            }
            Ok(Payload::Event(e)) => self.on_event(from, id, e, now),
            Ok(Payload::Cancel(c)) => self.cancel_of(from, id, c.job, &grant, now),
            Ok(_) => self.reply_error(
                from,
                id,
                SpineError::new(Condition::Malformed).with_text(
                    "a dispatcher takes <submit/>, <cancel/>, <event/> and <chunk/> requests",
                ),
            ),
            Err(e) => self.reply_error(from, id, e.to_spine_error()),
        }
    }

    /// A chunk of a large input or output from a sender that may send one, kept until the
    /// request that names its blob takes it (PROTOCOL.md §13).
    fn on_chunk(&mut self, from: Jid, id: String, c: spine_protocol::Chunk, now: Now) {
        match self.blobs.put(from.to_bare().as_str(), c, now.mono) {
            Ok(()) => self.send(Iq::empty_result(from, id)),
            Err(e) => self.reply_error(from, id, e),
        }
    }

    /// The refusal of a submission naming a capability (a step's included) the submitter may
    /// not run, if it does.
    pub(super) fn refuse_steps(&self, from: &Jid, grant: &Grant, s: &Submit) -> Option<SpineError> {
        let steps = std::iter::once(&s.capability).chain(
            s.mapreduce
                .iter()
                .flat_map(|m| std::iter::once(&m.reduce).chain(m.split.as_ref())),
        );
        let c = steps.into_iter().find(|c| !grant.capabilities.allows(c))?;
        warn!(from = %from, capability = %c, "refused a submission of a capability this submitter may not run");
        Some(
            SpineError::new(Condition::NotAuthorized)
                .with_text(format!("this JID may not run {c}")),
        )
    }

    /// `<submit/>` over XMPP: the job's spec from the request.
    pub(super) fn on_submit(
        &mut self,
        from: Jid,
        id: String,
        s: Submit,
        visible: Capabilities,
        now: Now,
    ) {
        let wait_ms = s.wait_ms;
        let max_delay = u64::try_from(self.cfg.max_delay.as_millis()).unwrap_or(u64::MAX);
        if let Some(d) = s.delay_ms.filter(|d| *d > max_delay) {
            let e = SpineError::new(Condition::BadArguments)
                .with_field("delay-ms")
                .with_text(format!(
                    "a delay of {d} ms is more than the dispatcher's max_delay ({max_delay} ms)"
                ));
            return self.reply_error(from, id, e);
        }
        let input = match s.input {
            None => (Vec::new(), None),
            Some(Data::Inline { bytes, mime }) => (bytes, mime),
            // A large input the submitter sent in chunks beforehand.
            Some(Data::Blob(r)) => match self.blobs.take(from.to_bare().as_str(), &r) {
                Ok(bytes) => (bytes, r.mime.clone()),
                Err(e) => return self.reply_error(from, id, e),
            },
            // The parser refuses a reference in <submit> (PROTOCOL.md §13.4).
            Some(Data::Ref(_)) => {
                let e = SpineError::new(Condition::Malformed)
                    .with_text("a submit's input is inline or a blob, not a reference");
                return self.reply_error(from, id, e);
            }
        };
        let spec = JobSpec {
            capability: s.capability,
            strategy: s.strategy,
            filter: s.filter,
            sort: s.sort,
            affinity_key: s.affinity_key,
            args: s.args.0,
            input: Body::Inline(input.0),
            input_mime: input.1,
            // A delayed job's deadline counts from the end of its delay.
            deadline_ms: s.deadline_ms.map(|d| now.ms + s.delay_ms.unwrap_or(0) + d),
            not_before_ms: s.delay_ms.map(|d| now.ms + d),
            priority: s.priority,
            max_attempts: s.max_attempts.unwrap_or(self.cfg.max_attempts),
            submitter: from.to_bare().to_string(),
            idempotency_key: s.idempotency_key,
            progress: s.watch,
            watch: s.watch.then(|| from.clone()),
            limit: s.limit,
            batch: s.batch,
            mapreduce: s.mapreduce,
            output_refs: s.refs,
            input_blobs: Vec::new(),
            keep_output: false,
            input_kept: Vec::new(),
            event: None,
            target: None,
            parent: None,
        };
        // (A standby's acceptance hurries: the job ends at the leader, which tells the
        // watcher; nothing joins this commit. Nor does a standby wait for the end: it
        // answers `<accepted>` at once, which a waiting submitter must accept.)
        let watched = spec.watch.is_some() && self.leads;
        let wait = wait_ms.filter(|w| *w > 0 && self.leads);
        match self.accept(spec, s.wait_for_agent, &visible, now) {
            // Protocol 1.3: the answer waits for the job's end ([`super::waits`]). Nothing is
            // sent now, so the acceptance's commit need not hurry: it shares one with a fast
            // job's outcome, after which the final status answers.
            Ok((job, state)) if wait.is_some() => {
                if state.is_final() {
                    // The same idempotency key again, for a job that ended: its end at once.
                    if let Err(e) =
                        self.send_status(from.clone(), Via::Reply(id.clone()), &job, now)
                    {
                        self.reply_error(from, id, e);
                    }
                } else {
                    let until = now.ms.saturating_add(wait.unwrap_or(0));
                    if !self
                        .submit_waits
                        .add(job.clone(), from.clone(), id.clone(), state, until)
                    {
                        self.send(Iq::from_result(id, Some(Accepted { job, state })).with_to(from));
                    }
                }
            }
            // A watcher hears of the job's end too: its acceptance need not hurry the commit,
            // and shares one with a fast job's outcome.
            Ok((job, state)) if watched => {
                self.send_lazy(Iq::from_result(id, Some(Accepted { job, state })).with_to(from))
            }
            Ok((job, state)) => {
                self.send(Iq::from_result(id, Some(Accepted { job, state })).with_to(from))
            }
            // Submitters speak 1.0 (PROTOCOL.md §2.1): a rate limit goes as `queue-full`,
            // its text saying which limit and when to come back.
            Err(e) if e.condition == Condition::RateLimited => {
                let e = SpineError {
                    condition: Condition::QueueFull,
                    ..e
                };
                self.reply_error(from, id, e)
            }
            Err(e) => self.reply_error(from, id, e),
        }
    }

    /// An IQ get: `<status/>` or `<discover/>`.
    pub(super) fn on_get(&mut self, from: Jid, id: String, payload: minidom::Element, now: Now) {
        if !payload.ns().starts_with(spine_protocol::NS_PREFIX) {
            return self.not_ours(from, id);
        }
        // An agent's request for an upload slot: answered by whether the job runs there, not
        // by a submitter's grant (the leader's).
        if !self.leads && self.grant(&from).is_none() {
            return self.standby_refusal(from, id);
        }
        if payload.name() == "request-slot" || payload.name() == "request-event-slot" {
            if !self.leads {
                return self.standby_refusal(from, id);
            }
            return match spine_protocol::parse_payload(payload) {
                Ok(Payload::RequestSlot(r)) => self.on_request_slot(from, id, r, now),
                Ok(Payload::RequestEventSlot(r)) => self.on_request_event_slot(from, id, r, now),
                Ok(_) => self.reply_error(from, id, SpineError::new(Condition::Malformed)),
                Err(e) => self.reply_error(from, id, e.to_spine_error()),
            };
        }
        let Some(grant) = self.grant(&from) else {
            let e = SpineError::new(Condition::NotAuthorized)
                .with_text("this JID may not query this dispatcher");
            return self.reply_error(from, id, e);
        };
        match spine_protocol::parse_payload(payload) {
            // A standby holds no job: it reads the shared store.
            Ok(Payload::Status(Status { job })) if !self.leads => {
                self.standby_status(from, id, job, grant)
            }
            Ok(Payload::Status(Status { job })) => self.status_of(from, id, job, &grant, now),
            Ok(Payload::Discover(Discover { capability, .. }))
                if !grant.capabilities.allows(&capability) =>
            {
                let e = SpineError::new(Condition::NotAuthorized)
                    .with_text(format!("this JID may not run {capability}"));
                self.reply_error(from, id, e)
            }
            Ok(Payload::Discover(Discover {
                capability,
                filter,
                sort,
                limit,
            })) => {
                let agents = self.registry.rank(
                    &capability,
                    filter.as_ref(),
                    sort.as_ref(),
                    limit.map(|l| l as usize),
                );
                self.send(Iq::from_result(id, Some(Agents { capability, agents })).with_to(from))
            }
            Ok(_) => self.reply_error(
                from,
                id,
                SpineError::new(Condition::Malformed)
                    .with_text("a dispatcher answers <status/> and <discover/>"),
            ),
            Err(e) => self.reply_error(from, id, e.to_spine_error()),
        }
    }
}

/// The refusal of a request about another submitter's job.
pub(super) fn not_yours(job: &JobId) -> SpineError {
    SpineError::new(Condition::NotAuthorized)
        .with_text(format!("job {job} was submitted by someone else"))
}
