//! Placement and dispatch: queued `all` jobs are fanned out, queued map/reduce jobs started,
//! and queued jobs placed on the agent their strategy picks, then sent — inline, or as
//! chunks of their input first ([`super::requests`]); straggling map/reduce steps get a
//! speculative copy.
//!
//! [`Core::place`] runs once after any input that may have queued a job or freed a slot
//! (`place_pending`), and looks only at what waits: the job table's queues and its indexes
//! of `all` and map/reduce jobs waiting to start, never the whole table.

use std::sync::Arc;

use jid::{FullJid, Jid};
use spine_protocol::{AgentState, Condition, Data, Job, JobId, SpineError, Strategy, INLINE_LIMIT};
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;

use super::requests::Sent;
use super::{Core, Now, RESUME_GRACE};
use crate::jobs::{Body, JobRecord};
use crate::registry::{NoPick, PickRequest};

/// Queued jobs looked at per capability per placement round (bounds head-of-line scans).
const PLACE_SCAN: usize = 64;

impl Core {
    /// Places queued jobs on agents with room.
    pub(super) fn place(&mut self, now: Now) {
        if !self.leads {
            return;
        }
        self.fan_out_all(now);
        self.start_mapreduces(now);
        for cap in self.jobs.queued_capabilities() {
            // Look past jobs that cannot be placed (a filter nobody matches) instead of letting
            // them block their capability; stop when plain jobs find every agent busy.
            for id in self.jobs.queued_in_order(&cap, now.ms, PLACE_SCAN) {
                // A new leader's queued jobs wait for the agents' answers ([`super::recall`]).
                if self.recall_holds(&id) {
                    continue;
                }
                let Some(job) = self.jobs.get(&id) else {
                    continue;
                };
                // A child of an `all` job waits while its parent's batch is full.
                if let Some(p) = &job.spec.parent {
                    let batch = self.jobs.get(p).and_then(|p| p.spec.batch);
                    if batch.is_some_and(|b| self.jobs.running_children(p) >= b) {
                        continue;
                    }
                }
                let plain = job.spec.filter.is_none()
                    && job.excluded.is_empty()
                    && job.spec.strategy != Strategy::Affinity;
                match self.pick_for(&id, now) {
                    Ok(agent) => {
                        self.no_agent_since.remove(&id);
                        self.dispatch(&id, agent, now);
                    }
                    Err(NoPick::AllBusy) => {
                        // Capable agents exist: the no-agent clock stops.
                        self.no_agent_since.remove(&id);
                        if plain {
                            break;
                        }
                    }
                    Err(NoPick::NoCapableAgent) => {
                        self.no_agent_since.entry(id).or_insert(now.ms);
                    }
                }
            }
        }
    }

    /// Fans every queued `all` job out to the capable agents (after the filter and limit).
    fn fan_out_all(&mut self, now: Now) {
        for id in self.jobs.queued_all_parents() {
            let Some(p) = self.jobs.get(&id) else {
                continue;
            };
            let mut targets: Vec<FullJid> = self
                .registry
                .rank(
                    &p.spec.capability,
                    p.spec.filter.as_ref(),
                    p.spec.sort.as_ref(),
                    None,
                )
                .into_iter()
                .filter(|a| a.state == AgentState::Ready)
                .filter_map(|a| a.jid.try_into_full().ok())
                .filter(|a| !self.quarantined(&p.spec.capability).contains(a))
                .collect();
            if targets.is_empty() {
                self.no_agent_since.entry(id).or_insert(now.ms);
                continue;
            }
            if let Some(l) = p.spec.limit {
                targets.truncate(l.of(targets.len()));
            }
            self.no_agent_since.remove(&id);
            let children = self.jobs.fan_out(&id, &targets, now.ms);
            info!(job = %id, agents = children.len(), "job fanned out to every capable agent");
            for c in &children {
                self.persist(c);
            }
            self.persist(&id);
        }
    }

    /// Starts every queued map/reduce job: its split or map steps are queued as jobs.
    fn start_mapreduces(&mut self, now: Now) {
        for p in self.jobs.queued_mapreduces() {
            let adv = self
                .jobs
                .start_mapreduce(&p, now.ms, self.blob_store.as_ref());
            info!(job = %p, steps = adv.created.len(), "map/reduce started");
            self.apply_advance(&p, adv, now);
        }
    }

    /// The agent for a queued job, by its strategy.
    fn pick_for(&mut self, id: &JobId, now: Now) -> Result<FullJid, NoPick> {
        let job = self.jobs.get(id).ok_or(NoPick::NoCapableAgent)?;
        // Restored in flight: back to its agent (whatever its load: it attaches the repeat to
        // the running job), or, once that agent has had time to return, anywhere.
        if job.resume {
            if let Some(agent) = &job.agent {
                if self.registry.id_of(agent).is_some() {
                    return Ok(agent.clone());
                }
                if now.mono.saturating_duration_since(self.started) < RESUME_GRACE {
                    return Err(NoPick::AllBusy);
                }
            }
        }
        // A child of an `all` job runs on its own agent or waits for it.
        if let Some(target) = &job.spec.target {
            return match self.registry.id_of(target) {
                Some(a) if self.registry.has_room(a, &job.spec.capability) => Ok(target.clone()),
                Some(_) => Err(NoPick::AllBusy),
                None => Err(NoPick::NoCapableAgent),
            };
        }
        // Agents quarantined for the capability by its canaries get none of its jobs.
        let quarantined: Vec<_> = self
            .quarantined(&job.spec.capability)
            .iter()
            .filter_map(|a| self.registry.id_of(a))
            .collect();
        let mut excluded: Vec<_> = job
            .excluded
            .iter()
            .filter_map(|a| self.registry.id_of(a))
            .collect();
        let failed_here = excluded.len();
        excluded.extend(quarantined.iter().copied());
        let mut req = PickRequest {
            capability: &job.spec.capability,
            strategy: job.spec.strategy,
            filter: job.spec.filter.as_ref(),
            sort: job.spec.sort.as_ref(),
            affinity_key: job.spec.affinity_key.as_deref(),
            exclude: &excluded,
        };
        let mut picked = match self.registry.pick(&req, &mut self.rng) {
            // Every capable agent failed this job before: better one of them than none.
            Err(NoPick::NoCapableAgent) if failed_here > 0 => {
                req.exclude = &quarantined;
                self.registry.pick(&req, &mut self.rng)
            }
            other => other,
        }?;
        // A reduce step goes where most of its kept input is, when that agent is about as
        // loaded as the least-loaded one ([`Registry::near_enough`]).
        if job.spec.strategy == Strategy::LeastLoaded && job.spec.sort.is_none() {
            let mut holders = job.spec.input_kept.clone();
            holders.sort_by_key(|h| std::cmp::Reverse(h.1));
            if let Some(h) = holders
                .iter()
                .filter_map(|(a, _)| self.registry.id_of(a))
                .find(|h| self.registry.near_enough(*h, picked, &req))
            {
                if h != picked {
                    debug!(job = %id, "placed near its kept input");
                }
                picked = h;
            }
        }
        self.registry
            .jid_of(picked)
            .cloned()
            .ok_or(NoPick::NoCapableAgent)
    }

    /// Sends a job to `agent`: the job table and the registry record it, then the job IQ (or
    /// its input's chunks first) is queued.
    fn dispatch(&mut self, id: &JobId, agent: FullJid, now: Now) {
        let Some(rec) = self.jobs.dispatched(id, &agent, now.ms) else {
            return;
        };
        if rec.attempts == 1 {
            let secs = now.ms.saturating_sub(rec.accepted_ms) as f64 / 1000.0;
            self.latency.observe(secs);
            self.stats.dispatched(&rec.spec.capability, secs);
        }
        let capability = rec.spec.capability.clone();
        self.persist(id);
        if let Some(a) = self.registry.id_of(&agent) {
            self.registry
                .on_assigned(a, id.clone(), capability, &mut self.rng);
        }
        self.send_job(id, &agent, now);
    }

    /// Sends the current attempt of a job dispatched to `agent`: its input inline when it
    /// fits the job stanza; by reference when it is stored and the agent fetches over HTTP
    /// (PROTOCOL.md §13.4); otherwise in chunks ahead of the job (§13.1). Also how a job goes
    /// again, in chunks, after the agent could not fetch it ([`Core::fetch_failed`]).
    pub(super) fn send_job(&mut self, id: &JobId, agent: &FullJid, now: Now) {
        let Some(rec) = self.jobs.get(id) else {
            return;
        };
        let mut j = job_request(rec, now);
        let attempt = rec.attempts;
        let mime = rec.spec.input_mime.clone();
        let sent = |j: Job| Sent {
            job: id.clone(),
            agent: agent.clone(),
            attempt,
            payload: j,
            at: now.mono,
        };
        // A fragment list naming blobs goes with their URLs, or their bytes, for this agent.
        // (A long list may have been moved to the blob store like any large step input.)
        if rec.spec.keep_output {
            j.keep = self.keep_for(agent, now);
        }
        let kept_inputs = !rec.spec.input_kept.is_empty();
        let resolved = (!rec.spec.input_blobs.is_empty() || kept_inputs).then(|| {
            match rec.spec.input.bytes(self.blob_store.as_ref()) {
                Ok(list) => self.fragments_for(&list, id, agent, now),
                Err(e) => Err(SpineError::new(Condition::Failed).with_text(format!(
                    "the input cannot be read from the dispatcher's blob store: {e}"
                ))),
            }
        });
        let input = match resolved {
            Some(Ok(list)) => {
                if list.len() <= INLINE_LIMIT {
                    j.input = Some(Data::Inline {
                        mime: mime.clone(),
                        bytes: list.clone(),
                    });
                }
                std::borrow::Cow::Owned(Body::Inline(list))
            }
            Some(Err(e)) if kept_inputs && e.condition == Condition::FetchFailed => {
                let why = e.text.unwrap_or_default();
                return self.kept_lost(id, agent, &why, now);
            }
            Some(Err(e)) => return self.fail_attempt(&sent(j), e, now),
            None => std::borrow::Cow::Borrowed(&rec.spec.input),
        };
        // Too large for the job stanza: by reference, or in chunks.
        let large = match input.as_ref() {
            Body::Stored(b) => Some(Large::Stored(*b)),
            Body::Inline(b) if b.len() > INLINE_LIMIT => Some(Large::Held(Arc::new(b.clone()))),
            Body::Inline(_) => None,
            // Only outputs are kept by agents; a step's input never is.
            Body::Kept(k) => {
                let e = SpineError::new(Condition::Failed).with_text(format!(
                    "the input is an output kept by {}, which a job cannot take whole",
                    k.agent
                ));
                return self.fail_attempt(&sent(j), e, now);
            }
        };
        let reference = match &large {
            Some(Large::Stored(b)) => self.input_reference(b, mime.clone(), id, agent, now),
            _ => None,
        };
        if let Some(r) = reference {
            j.input = Some(Data::Ref(r));
        }
        if large.is_none() || matches!(j.input, Some(Data::Ref(_))) {
            let iq_id = self.requests.id("j");
            debug!(job = %id, agent = %agent, attempt, "dispatching");
            let s = sent(j.clone());
            self.requests.job_sent(iq_id.clone(), s);
            let ahead = super::SentAhead {
                job: id.clone(),
                attempt,
                agent: agent.clone(),
            };
            self.send_early(Iq::from_set(iq_id, j).with_to(agent.clone().into()), ahead);
            return;
        }
        // In chunks the input is held in memory while it goes: at most `max_blob` of it.
        if let Some(Large::Stored(b)) = &large {
            let max = self.cfg.max_blob.as_u64();
            if b.size > max {
                let e = SpineError::new(Condition::TooLarge).with_text(format!(
                    "the input of {} bytes is over max_blob ({max}), the most sent in chunks, and {agent} does not fetch over HTTP (protocol 1.1, PROTOCOL.md §13.4)",
                    b.size
                ));
                return self.fail_attempt(&sent(j), e, now);
            }
        }
        let data = match large {
            Some(Large::Held(d)) => Ok(d),
            Some(Large::Stored(b)) => self.blob_store.read(&b).map(Arc::new).map_err(|e| {
                warn!(job = %id, blob = %b.hex(), "the job's input cannot be read from the blob store: {e}");
                e
            }),
            None => Ok(Arc::new(Vec::new())),
        };
        let data = match data {
            Ok(d) => d,
            Err(e) => {
                let e = SpineError::new(Condition::Failed).with_text(format!(
                    "the input cannot be read from the dispatcher's blob store: {e}"
                ));
                return self.fail_attempt(&sent(j), e, now);
            }
        };
        use sha2::Digest as _;
        let sha256: [u8; 32] = sha2::Sha256::digest(data.as_slice()).into();
        let key = self.requests.number();
        let blob: spine_protocol::BlobId = format!("in-{}-{key}", self.requests.prefix())
            .parse()
            .expect("generated blob id is valid");
        j.input = Some(Data::Blob(spine_protocol::BlobRef {
            blob: blob.clone(),
            size: data.len() as u64,
            sha256,
            mime,
        }));
        debug!(job = %id, agent = %agent, bytes = data.len(), "uploading the input before the job");
        let s = sent(j.clone());
        self.requests
            .start_upload(key, s, blob, data, &mut self.ready.stanzas, now.mono);
    }

    /// Starts a speculative copy of each straggling map/reduce step that has another capable
    /// agent to go to.
    pub(super) fn speculate(&mut self, now: Now) {
        let stragglers = self.jobs.stragglers(
            now.ms,
            self.cfg.speculation_factor,
            self.cfg.speculation_min.as_millis() as u64,
        );
        for s in stragglers {
            let Some(spec) = self.jobs.get(&s.job).map(|j| &j.spec) else {
                continue;
            };
            let elsewhere = self
                .registry
                .rank(
                    &spec.capability,
                    spec.filter.as_ref(),
                    spec.sort.as_ref(),
                    None,
                )
                .iter()
                .any(|a| a.state == AgentState::Ready && a.jid.as_str() != s.agent.as_str());
            if !elsewhere {
                continue;
            }
            if let Some(copy) = self.jobs.speculate(&s, now.ms) {
                info!(job = %s.job, agent = %s.agent, running_ms = s.running_ms, median_ms = s.median_ms, copy = %copy, "straggling step: speculative copy queued");
                self.persist(&copy);
                self.persist(&s.parent);
                self.place_pending = true;
            }
        }
    }
}

/// A job's input too large for its job stanza.
enum Large {
    /// In the blob store.
    Stored(crate::blobs::Stored),
    /// Inline in the record (a record of an earlier version, or a map/reduce step's input the
    /// store's quota refused).
    Held(Arc<Vec<u8>>),
}

/// The job request for a job's current attempt (input inline when it fits; the caller
/// replaces it with a blob reference otherwise).
fn job_request(rec: &JobRecord, now: Now) -> Job {
    let mut j = Job::new(rec.id.clone(), rec.spec.capability.clone());
    j.attempt = rec.attempts;
    j.deadline_ms = rec.spec.deadline_ms.map(|d| d.saturating_sub(now.ms));
    j.submitter = Some(rec.spec.submitter.clone());
    j.progress = rec.spec.progress || rec.spec.watch.is_some();
    j.args = rec.spec.args.clone().into();
    if let Some(bytes) = rec
        .spec
        .input
        .inline()
        .filter(|b| !b.is_empty() && b.len() <= INLINE_LIMIT)
    {
        j.input = Some(Data::Inline {
            mime: rec.spec.input_mime.clone(),
            bytes: bytes.to_vec(),
        });
    }
    j
}

/// Whether `from` is the agent `job` runs on (progress counts only from there).
pub(super) fn runs_on(rec: Option<&JobRecord>, from: &Jid) -> bool {
    rec.is_some_and(|j| {
        j.agent
            .as_ref()
            .is_some_and(|a| a.as_str() == from.as_str())
    })
}
