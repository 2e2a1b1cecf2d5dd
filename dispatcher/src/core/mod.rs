//! The dispatcher's core: every decision, and no I/O. No `async`, no connection, no store, no
//! file, no clock read — rumqttc's `MqttState` and quinn-proto's `Connection` are the model.
//!
//! The driver ([`crate::driver`]) feeds it every input with the time as a parameter — the
//! XMPP session's start and end ([`Core::session_started`], [`Core::session_reset`]), each
//! stanza ([`Core::stanza`]), timers ([`Core::tick`], at [`Core::next_wake`]), each API
//! request ([`Core::api`], [`Core::query`]) — and then takes the effects with
//! [`Core::take_ready`]: a [`Ready`] that lists, in the order they must happen, what to store,
//! what to send, and whom to answer. The submodules each own one concern: [`inbound`]
//! classifies stanzas, [`agents`] keeps the fleet and its liveness, [`place`] places and
//! dispatches queued jobs, [`outcomes`] settles attempts and moves `all` and map/reduce jobs
//! on, [`submit`] serves submitters over XMPP and HTTP alike, [`views`] renders statuses,
//! events and metrics, [`requests`] tracks the requests in flight, [`payloads`] moves large
//! payloads to the blob store, [`operator`] relays an operator's drain or undrain to an agent.
//!
//! The one exception to "no file": the blob store's bytes, which the core reads and writes
//! only through the [`BlobAccess`](crate::jobs::BlobAccess) the driver gives it, as raft-rs's
//! `RawNode` reads its log through the `Storage` it is given; the core's tests give it
//! memory.

pub(crate) mod agents;
pub(crate) mod api;
pub(crate) mod canary;
pub(crate) mod data;
#[cfg(test)]
mod data_tests;
pub(crate) mod events;
#[cfg(test)]
mod harness;
pub(crate) mod inbound;
pub(crate) mod operator;
pub(crate) mod outcomes;
pub(crate) mod payloads;
pub(crate) mod place;
pub(crate) mod rates;
pub(crate) mod recall;
#[cfg(test)]
mod recall_tests;
pub(crate) mod recent;
pub(crate) mod requests;
pub(crate) mod standby;
mod stats;
pub(crate) mod submit;
#[cfg(test)]
mod tests;
pub(crate) mod ticks;
pub(crate) mod tree;
pub(crate) mod views;
mod waits;

use crate::fastmap::{HashMap, HashSet};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use jid::BareJid;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use spine_protocol::blob::BlobStore;
use spine_protocol::{CapabilityName, JobId};
use tokio_xmpp::Stanza;

use crate::config::DispatcherConfig;
use crate::deliver::Deliveries;
use crate::jobs::{BlobAccess, JobRecord, JobTable};
use crate::policy::Policy;
use crate::registry::Registry;

pub(crate) use api::{
    Answer, ApiReply, ApiRequest, ApiToken, CapabilityStats, Command, FleetAnswer, Query,
    RuleChangeError,
};
pub use api::{EventKind, JobEvent};
use requests::Requests;
pub use views::{
    job_json, rfc3339_ms, FailureView, InputView, JobStateName, JobView, MapReduceView, Rendered,
    ResultView, StepView,
};

/// Incomplete blobs are dropped this long after their last chunk.
const BLOB_IDLE_TTL: Duration = Duration::from_secs(300);
/// After a restart, how long a job that was in flight waits for its agent to come back.
pub(crate) const RESUME_GRACE: Duration = Duration::from_secs(10);
/// Housekeeping without a deadline of its own (silent agents, idle blobs and output
/// transfers, straggling map/reduce steps) runs at least this often.
const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// The time, as the driver read it: wall-clock milliseconds since the UNIX epoch (recorded in
/// jobs, deadlines, retention) and a monotonic instant (timeouts of requests and agents).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub ms: u64,
    pub mono: Instant,
}

impl Now {
    /// This instant plus `d` (for tests and simulations in virtual time).
    #[cfg(test)]
    pub(crate) fn after(self, d: Duration) -> Now {
        Now {
            ms: self.ms + d.as_millis() as u64,
            mono: self.mono + d,
        }
    }
}

/// What the core decided since the last [`Core::take_ready`], in the order the driver must
/// act on it: **store** (`persist`, `delete`, `audit`, `agents_seen`, `capabilities_learned`,
/// in one transaction), then **send** `stanzas`, then **answer** (`replies`, `events`).
/// Nothing about a change leaves before the change is durable — except `early`: job requests
/// to agents, which promise nothing to anyone ([`Core::take_early`]).
#[derive(Debug, Default)]
pub(crate) struct Ready {
    /// Refusals that tell of nothing stored or to store (a standby's, the store's being
    /// unreachable): they leave at once, even while a commit waits ([`Core::take_now`]).
    pub now: Vec<Stanza>,
    /// Job requests to agents, which may leave before the commit: see [`Core::take_early`].
    pub early: Vec<Stanza>,
    /// What `early` sends, for the driver's log of jobs sent ahead of their commit.
    pub sent_ahead: Vec<SentAhead>,
    /// How many of `stanzas` and `replies` may wait for a commit that something else asks
    /// for ([`Core::pending`]).
    pub lazy: usize,
    /// Jobs new or changed (read them with [`Core::record`]).
    pub persist: Vec<JobId>,
    /// Jobs past their retention, to delete.
    pub delete: Vec<JobId>,
    /// Audit lines of jobs that ended: (job id, line).
    pub audit: Vec<(String, Vec<u8>)>,
    /// Agents (bare JIDs) registered, with when (ms), for the hello after a restart.
    pub agents_seen: Vec<(String, u64)>,
    /// Capabilities offered for the first time, with when (ms).
    pub capabilities_learned: Vec<(CapabilityName, u64)>,
    /// Event rules made (`Some`) or deleted (`None`) over the HTTP API, by name.
    pub rules: Vec<(String, Option<crate::triggers::RuleConfig>)>,
    /// Stanzas to send, in order.
    pub stanzas: Vec<Stanza>,
    /// Answers to API requests.
    pub replies: Vec<(ApiToken, ApiReply)>,
    /// The `replies` of submissions whose caller waits for the job's end: one that ended
    /// before its acceptance left is answered with its end ([`ApiReply::Ended`]).
    pub waiting: Vec<ApiToken>,
    /// Events for the HTTP event streams.
    pub events: Vec<JobEvent>,
    /// Blobs no held job references any more: the driver deletes each after a grace, if it
    /// is still unreferenced then ([`Core::blob_refs`]).
    pub released: Vec<crate::blobs::Stored>,
}

/// What waits for a commit ([`Core::pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pending {
    /// Nothing: no commit is needed.
    Nothing,
    /// Changes no one waits for yet: a job accepted for a submitter who waits for its end, a
    /// job dispatched, progress. They may wait a moment (the driver's linger) to share a
    /// commit with what comes next — a fast job's outcome, typically.
    Lazy,
    /// Someone waits: an answer, a stanza, a job's end to announce.
    Urgent,
}

impl Ready {
    /// Whether anything must be stored before the rest goes out.
    pub(crate) fn must_store(&self) -> bool {
        !(self.persist.is_empty()
            && self.delete.is_empty()
            && self.audit.is_empty()
            && self.agents_seen.is_empty()
            && self.capabilities_learned.is_empty()
            && self.rules.is_empty())
    }
}

/// A job request that left before the commit of its dispatch ([`Core::take_early`]). The
/// driver writes these to a file before the requests leave and empties it once a commit
/// covers them; after a crash, [`Core::recover`] sends such a job back to the same agent with
/// the same attempt, where it attaches to the run (PROTOCOL.md §10), instead of placing it
/// afresh — possibly on another agent, where it would run a second time.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SentAhead {
    pub job: JobId,
    pub attempt: u64,
    pub agent: jid::FullJid,
}

/// Job requests to send now, before the commit ([`Core::take_early`]).
#[derive(Debug, Default)]
pub(crate) struct Early {
    /// The requests.
    pub stanzas: Vec<Stanza>,
    /// What they send, to record before they leave.
    pub sent: Vec<SentAhead>,
}

/// What the store held at start.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    pub jobs: Vec<JobRecord>,
    /// Every capability an agent has offered.
    pub capabilities: Vec<CapabilityName>,
    /// Agents (bare JIDs) with when they were last seen (ms).
    pub agents: Vec<(String, u64)>,
    /// Event rules made over the HTTP API.
    pub rules: Vec<crate::triggers::RuleConfig>,
}

/// Dispatch latency (accepted → first dispatch), for /metrics.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    pub counts: [u64; 12],
    pub sum_s: f64,
    pub n: u64,
}

pub(crate) const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum_s += secs;
        self.n += 1;
    }
}

/// The dispatcher's state and decisions.
pub(crate) struct Core {
    cfg: DispatcherConfig,
    policy: Policy,
    registry: Registry,
    jobs: JobTable,
    rng: StdRng,
    requests: Requests,
    /// Operators' drains and undrains waiting for their agents' answers.
    state_requests: operator::StateRequests,
    /// Chunks of large inputs and outputs being assembled.
    blobs: BlobStore,
    /// The blob store, where payloads over the inline limit are kept.
    blob_store: Box<dyn BlobAccess>,
    /// The fast path for large payloads, when the HTTP API has a public URL.
    data: Option<data::DataPlane>,
    /// Agents that announced protocol 1.1 (they fetch and upload over HTTP).
    http_agents: HashMap<jid::FullJid, data::AgentData>,
    /// Upload slots granted, by (job, attempt, SHA-256).
    slots: data::Slots,
    /// Event slots granted to agents' watchers (PROTOCOL.md §11.9.1).
    event_slots: events::EventSlots,
    /// Large outputs on their way to XMPP submitters, ahead of their statuses.
    deliveries: Deliveries,
    /// Queued jobs that found no capable agent, since when (ms).
    no_agent_since: HashMap<JobId, u64>,
    /// Idempotency keys ((submitter, key) → job) of the jobs held, and back.
    idempotency: std::collections::HashMap<(String, String), JobId>,
    idempotency_of: HashMap<JobId, (String, String)>,
    /// Agents (bare JIDs) seen, with when (ms): greeted after a restart.
    known_agents: HashMap<String, u64>,
    /// When this core started (the resume grace counts from it).
    started: Instant,
    /// Jobs restored in flight wait for their agents until the resume grace ends; placement
    /// runs again then.
    grace_pending: bool,
    /// When retry backoffs end (ms): placement runs again then.
    retry_at: BinaryHeap<Reverse<u64>>,
    next_prune_ms: u64,
    next_housekeeping: Instant,
    latency: Histogram,
    /// Per-capability counters and latencies for /metrics.
    stats: stats::Stats,
    /// Submitters' rate-limit buckets.
    rates: rates::RateLimits,
    /// When the XMPP session ended, until the next one starts.
    session_died: Option<Instant>,
    /// Jobs changed since the last `take_ready`.
    dirty: HashSet<JobId>,
    /// Placement may have something to do (a job queued, a slot freed, an agent came).
    place_pending: bool,
    ready: Ready,
    /// Whether a job's end may have a reader of its JSON view (an HTTP event stream open, a
    /// request waiting for a job), as the driver last said ([`Core::set_listened`]).
    listened: bool,
    /// False for a standby ([`Core::standby`]) until it leads.
    leads: bool,
    /// One of several dispatchers sharing a store ([`Core::standby`]): a job request leaves
    /// before its dispatch's commit only to an agent that answers `<recall/>`.
    among_several: bool,
    /// A new leader's questions to the agents ([`recall`]), until they are answered.
    recall: Option<recall::RecallRound>,
    /// The agents' answers about jobs not held yet ([`recall`]).
    answers: recall::Answers,
    /// A standby's word on who leads (the leader's JID), for its refusals.
    leader_hint: Option<String>,
    /// A standby's reads of the shared store to make ([`standby::Lookup`]), and how many it
    /// waits for.
    lookups: Vec<standby::Lookup>,
    lookups_waiting: usize,
    /// The job store cannot be reached (the driver says so: [`Core::set_store_down`]):
    /// submitters' changes are refused at once rather than left waiting for a commit.
    store_down: bool,
    /// Event rules (`[[rule]]`).
    triggers: crate::triggers::Rules,
    /// Each rule's counters.
    rule_counts: HashMap<String, events::RuleCounts>,
    /// Events of jobs that ended in this step, for the rules ([`Core::fire_outcomes`]).
    outcomes: Vec<crate::triggers::Event>,
    /// XMPP accounts told of events (`[[subscription]]`).
    subscriptions: crate::subscriptions::Subscriptions,
    /// Messages sent per subscription since the start.
    notified: HashMap<String, u64>,
    /// Schedules (`[[schedule]]`), whose ticks the leader fires.
    schedules: Vec<ticks::Ticking>,
    /// Canaries (`[[canary]]`) and each agent's health by them.
    canaries: canary::Canaries,
    /// `<submit wait-ms>` requests waiting for their jobs' ends ([`waits`]).
    submit_waits: waits::SubmitWaits,
}

impl Core {
    /// A core holding what the store held; `seed` seeds its random choices (placement ties,
    /// job ids, the IQ id prefix).
    pub(crate) fn new(
        cfg: DispatcherConfig,
        policy: Policy,
        restored: Restored,
        seed: u64,
        now: Now,
        blob_store: Box<dyn BlobAccess>,
    ) -> Core {
        let mut rng = StdRng::seed_from_u64(seed);
        let prefix = format!("{:08x}", rng.random::<u32>());
        let mut registry = Registry::new();
        registry.remember(restored.capabilities);
        let mut core = Core {
            blobs: BlobStore::with_limits(cfg.blob_limits(BLOB_IDLE_TTL)),
            blob_store,
            data: None,
            http_agents: HashMap::default(),
            slots: Default::default(),
            event_slots: Default::default(),
            deliveries: Deliveries::new(format!("{:08x}", rng.random::<u32>())),
            requests: Requests::new(prefix),
            state_requests: operator::StateRequests::default(),
            no_agent_since: HashMap::default(),
            idempotency: std::collections::HashMap::new(),
            idempotency_of: HashMap::default(),
            known_agents: restored.agents.into_iter().collect(),
            started: now.mono,
            grace_pending: false,
            retry_at: BinaryHeap::new(),
            next_prune_ms: 0,
            next_housekeeping: now.mono,
            latency: Histogram::default(),
            stats: stats::Stats::default(),
            rates: rates::RateLimits::default(),
            session_died: None,
            dirty: HashSet::default(),
            place_pending: true,
            among_several: false,
            recall: None,
            answers: recall::Answers::default(),
            ready: Ready::default(),
            listened: true,
            leads: true,
            leader_hint: None,
            lookups: Vec::new(),
            lookups_waiting: 0,
            store_down: false,
            triggers: crate::triggers::Rules::new(&cfg.rules).unwrap_or_else(|e| {
                // `DispatcherConfig::validate` refused such a configuration at load.
                tracing::error!("event rules not loaded: {e}");
                crate::triggers::Rules::default()
            }),
            rule_counts: HashMap::default(),
            outcomes: Vec::new(),
            subscriptions: crate::subscriptions::Subscriptions::new(&cfg.subscriptions)
                .unwrap_or_else(|e| {
                    // `DispatcherConfig::validate` refused such a configuration at load.
                    tracing::error!("subscriptions not loaded: {e}");
                    crate::subscriptions::Subscriptions::default()
                }),
            notified: HashMap::default(),
            schedules: crate::schedules::schedules(&cfg.schedules)
                .unwrap_or_else(|e| {
                    // `DispatcherConfig::validate` refused such a configuration at load.
                    tracing::error!("schedules not loaded: {e}");
                    Vec::new()
                })
                .into_iter()
                .map(ticks::Ticking::new)
                .collect(),
            canaries: canary::Canaries::new(
                crate::canaries::canaries(&cfg.canaries).unwrap_or_else(|e| {
                    // `DispatcherConfig::validate` refused such a configuration at load.
                    tracing::error!("canaries not loaded: {e}");
                    Vec::new()
                }),
            ),
            jobs: JobTable::new(cfg.max_queue).with_max_delayed(cfg.max_delayed),
            submit_waits: waits::SubmitWaits::default(),
            cfg,
            policy,
            registry,
            rng,
        };
        core.load_jobs(restored.jobs, now);
        core.load_api_rules(restored.rules);
        core.start_schedules(now);
        core
    }

    /// A standby among several dispatchers ([`crate::election`]): it keeps the fleet's
    /// registry warm (advertisements, loads, liveness) and holds no job; it places nothing and
    /// refuses submitters' requests, naming the leader ([`Core::set_leader_hint`]), until
    /// [`Core::lead`].
    pub(crate) fn standby(
        cfg: DispatcherConfig,
        policy: Policy,
        fleet: Restored,
        seed: u64,
        now: Now,
        blob_store: Box<dyn BlobAccess>,
    ) -> Core {
        let mut core = Core::new(cfg, policy, fleet, seed, now, blob_store);
        core.leads = false;
        core.among_several = true;
        core
    }

    /// A standby won the election: it takes the jobs the store holds (`restored`, read after
    /// the taking, so every commit of the last leader is in it) and leads, with the fleet it
    /// already knows. Jobs that were in flight go back to their agents, which attach them
    /// (the resume grace counts from now); [`Core::recover`] follows.
    pub(crate) fn lead(&mut self, restored: Restored, now: Now) {
        self.leads = true;
        self.leader_hint = None;
        self.started = now.mono;
        self.registry.remember(restored.capabilities);
        for (a, t) in restored.agents {
            let seen = self.known_agents.entry(a).or_insert(t);
            *seen = (*seen).max(t);
        }
        self.load_jobs(restored.jobs, now);
        self.load_api_rules(restored.rules);
        self.start_schedules(now);
        self.start_recall(now);
        self.place_pending = true;
    }

    /// A standby's submissions are stored (for the leader, which takes them from the store):
    /// it lets them go.
    pub(crate) fn hand_over(&mut self, ids: &[JobId]) {
        if self.leads {
            return;
        }
        for id in ids {
            if self.jobs.hand_over(id).is_some() {
                if let Some(key) = self.idempotency_of.remove(id) {
                    self.idempotency.remove(&key);
                }
                self.no_agent_since.remove(id);
            }
        }
    }

    /// The leader takes jobs that standbys accepted and stored; those it holds already (it
    /// loaded them from the store) are left as they are. They are stored: nothing to commit
    /// for them until they change. The ids taken.
    pub(crate) fn adopt(&mut self, records: Vec<JobRecord>, now: Now) -> Vec<JobId> {
        let new: Vec<JobRecord> = records
            .into_iter()
            .filter(|r| self.jobs.get(&r.id).is_none())
            .collect();
        let ids: Vec<JobId> = new.iter().map(|r| r.id.clone()).collect();
        for r in new {
            tracing::info!(job = %r.id, capability = %r.spec.capability, "job accepted by a standby: taken");
            self.stats.submitted(&r.spec.capability);
            // A standby counts only what it accepted itself: the queue's bounds hold here,
            // where the whole queue is. A job over them ends failed, `queue-full`.
            let limits = self.policy.limits(&r.spec.submitter);
            let over = (r.state == spine_protocol::JobState::Queued)
                .then(|| self.jobs.over_bounds(&r.spec, limits.max_queued))
                .flatten();
            let id = r.id.clone();
            self.load_jobs(vec![r], now);
            self.recall_adopted(&id, now);
            let Some(e) = over else { continue };
            use spine_protocol::{Condition, JobState};
            let why = format!(
                "{e}; it was accepted by a standby, and over the bound when the leader took it"
            );
            if self
                .jobs
                .fail_queued(&id, Condition::QueueFull, why, now.ms)
            {
                tracing::warn!(job = %id, "job accepted by a standby failed: {e}");
                self.settle(&id, None, outcomes::Settled::Ended(JobState::Failed), now);
            }
        }
        self.place_pending = true;
        self.fire_outcomes(now);
        if std::mem::take(&mut self.place_pending) {
            self.place(now);
        }
        ids
    }

    /// The leader makes cancels that standbys were asked for (an unknown or ended job: nothing
    /// to do).
    pub(crate) fn cancel_for_standby(&mut self, jobs: &[String], now: Now) {
        for j in jobs {
            let Ok(id) = j.parse::<JobId>() else { continue };
            match self.cancel_job(&id, now) {
                Ok(state) => tracing::info!(job = %id, ?state, "cancel asked of a standby: made"),
                Err(e) => tracing::debug!(job = %id, "cancel asked of a standby: {e}"),
            }
        }
    }

    /// Whether this core leads (places jobs, accepts submissions): always, but for a standby.
    pub(crate) fn leads(&self) -> bool {
        self.leads
    }

    /// Whether the job store can be reached, as the driver last saw (PostgreSQL: a commit
    /// is retrying a lost connection).
    pub(crate) fn set_store_down(&mut self, down: bool) {
        self.store_down = down;
    }

    /// What a standby says of the leader when it refuses a request (its JID), if known.
    pub(crate) fn set_leader_hint(&mut self, leader: Option<String>) {
        self.leader_hint = leader;
    }

    /// The fleet this core remembers (agents seen, capabilities known), for the standby that
    /// replaces it when it stops leading.
    pub(crate) fn fleet_memory(&self) -> Restored {
        Restored {
            jobs: Vec::new(),
            capabilities: self.registry.known_capabilities(),
            agents: self
                .known_agents
                .iter()
                .map(|(a, t)| (a.clone(), *t))
                .collect(),
            rules: Vec::new(),
        }
    }

    /// Takes jobs from the store into the table, their idempotency keys, the capabilities of
    /// those that reached an agent, and their timers.
    fn load_jobs(&mut self, jobs: Vec<JobRecord>, now: Now) {
        self.jobs.reserve(jobs.len());
        self.idempotency.reserve(jobs.len());
        self.idempotency_of.reserve(jobs.len());
        let mut ids = Vec::with_capacity(jobs.len());
        for j in jobs {
            // Capabilities of stored jobs that reached an agent (a store written before the
            // list of capabilities existed).
            if j.agent.is_some() {
                self.registry.remember([j.spec.capability.clone()]);
            }
            let id = j.id.clone();
            self.jobs.restore(j);
            ids.push(id);
        }
        // Backoffs that were running at the stop end when they were due to; jobs restored in
        // flight are placed again when the resume grace ends.
        for id in ids {
            self.index_key(&id);
            let Some(j) = self.jobs.get(&id) else {
                continue;
            };
            if j.state == spine_protocol::JobState::Queued && j.not_before_ms > now.ms {
                self.retry_at.push(Reverse(j.not_before_ms));
            }
            self.grace_pending |= j.resume;
        }
    }

    /// After a restart: map/reduce jobs whose last step ended just before the stop move on;
    /// then jobs the last process sent ahead of their commit ([`SentAhead`], read back from
    /// the driver's file) go back to the agent they went to, as jobs restored in flight do
    /// (after the map/reduce steps, which may only now be made again, under the same ids).
    /// Returns how many jobs go back to their agent (a line whose dispatch was stored since,
    /// or whose job is gone, changes nothing).
    pub(crate) fn recover(&mut self, sent_ahead: Vec<SentAhead>, now: Now) -> usize {
        for parent in self.jobs.running_mapreduces() {
            let adv = self.jobs.advance(&parent, now.ms, self.blob_store.as_ref());
            self.apply_advance(&parent, adv, now);
        }
        let mut back = 0;
        for s in sent_ahead {
            if self.jobs.sent_ahead(&s.job, s.attempt, &s.agent, now.ms) {
                tracing::info!(job = %s.job, agent = %s.agent, attempt = s.attempt,
                    "restored as sent before the stop: back to its agent");
                self.grace_pending = true;
                self.persist(&s.job);
                back += 1;
            }
        }
        back
    }

    /// The XMPP session (re)started: initial presence, then a hello to every agent seen in the
    /// last day (PROTOCOL.md §4.4), so a restarted dispatcher re-learns the fleet at once.
    pub(crate) fn session_started(&mut self, now: Now) {
        self.greet_fleet(now);
    }

    /// The XMPP session was interrupted (the connection is trying to resume or reconnect).
    pub(crate) fn session_suspended(&mut self, now: Now) {
        self.session_died.get_or_insert(now.mono);
    }

    /// A new XMPP session replaced one that ended: the request likely to have ended it is
    /// blamed, the fleet greeted again, and every request in flight sent again.
    pub(crate) fn session_reset(&mut self, now: Now) {
        self.blame_lost_session(now);
        tracing::info!(
            in_flight = self.requests.in_flight(),
            "session re-established: greeting agents, re-sending jobs in flight"
        );
        self.greet_fleet(now);
        self.requests.resend_all(&mut self.ready.stanzas, now.mono);
        self.deliveries.on_session_reset(now.mono);
        self.pump_deliveries(now);
        self.place(now);
    }

    /// One inbound stanza.
    pub(crate) fn stanza(&mut self, st: Stanza, now: Now) {
        for inbound in self.classify(st, now) {
            self.handle(inbound, now);
        }
        self.fire_outcomes(now);
        if std::mem::take(&mut self.place_pending) {
            self.place(now);
        }
    }

    /// Timers: deadlines, retry backoffs, agents that found no job, pings, retention,
    /// stragglers. Call it at [`Core::next_wake`] (earlier is harmless).
    pub(crate) fn tick(&mut self, now: Now) {
        // A standby's jobs wait only for their commit, after which the leader has them: their
        // timers are the leader's.
        if self.leads {
            self.expire_deadlines(now);
            self.expire_no_agent(now);
            self.release_delayed(now);
            self.fire_schedules(now);
        }
        self.end_recall_if_done(now);
        if self.grace_pending && now.mono.saturating_duration_since(self.started) >= RESUME_GRACE {
            self.grace_pending = false;
            self.place_pending = true;
        }
        while self.retry_at.peek().is_some_and(|Reverse(t)| *t <= now.ms) {
            self.retry_at.pop();
            self.place_pending = true;
        }
        if now.mono >= self.next_housekeeping {
            self.next_housekeeping = now.mono + HOUSEKEEPING;
            // Idle blobs go even when no chunk comes (in deadline order: nothing is scanned).
            self.blobs.expire(now.mono);
            // Outputs to submitters that stopped acknowledging chunks are given up.
            self.pump_deliveries(now);
            self.check_silent(now);
            self.speculate(now);
            self.rates.forget_full(now.mono);
            self.sample_capabilities(now);
            self.run_canaries(now);
        }
        for agent in self.requests.overdue_pings(now.mono) {
            self.agent_gone(&agent, "no answer to a ping", now);
        }
        self.expire_state_requests(now);
        self.expire_submit_waits(now);
        self.prune(now);
        self.fire_outcomes(now);
        if std::mem::take(&mut self.place_pending) {
            self.place(now);
        }
    }

    /// How long the driver may sleep before calling [`Core::tick`]: until the earliest
    /// deadline the core holds (a job's deadline, a retry, a ping's timeout, the no-agent
    /// wait, retention), and at most until the next housekeeping.
    pub(crate) fn next_wake(&self, now: Now) -> Duration {
        let mut wake = self.next_housekeeping;
        let at_ms = |ms: u64| now.mono + Duration::from_millis(ms.saturating_sub(now.ms));
        let wall = [
            self.jobs.next_deadline(),
            self.jobs.next_due(),
            self.retry_at.peek().map(|Reverse(t)| *t),
            self.no_agent_since
                .values()
                .min()
                .map(|t| t + self.cfg.no_agent_wait.as_millis() as u64 + 1),
            self.jobs
                .next_prune_at(self.cfg.retention.as_millis() as u64)
                .map(|t| t.max(self.next_prune_ms)),
            self.next_tick(),
            self.submit_waits.next_due(),
        ];
        for t in wall.into_iter().flatten() {
            wake = wake.min(at_ms(t));
        }
        if self.grace_pending {
            wake = wake.min(self.started + RESUME_GRACE);
        }
        if let Some(t) = self.requests.next_ping_timeout() {
            wake = wake.min(t + Duration::from_millis(1));
        }
        if let Some(t) = self.state_requests.next_deadline() {
            wake = wake.min(t);
        }
        if let Some(t) = self.recall_deadline() {
            wake = wake.min(t);
        }
        wake.saturating_duration_since(now.mono)
    }

    /// Job requests to agents decided since the last call, which the driver sends at once,
    /// before the commit of the changes that decided them: telling an agent to run a job
    /// promises nothing to its submitter or anyone else. Saving this wait is what lets a job
    /// run while its acceptance is being stored, and a fast job's acceptance and outcome
    /// share one commit.
    ///
    /// If the dispatcher dies before the commit, the stored record still says what it said
    /// before (queued, or no job at all if its acceptance was not stored either, which no one
    /// was told of then), and the agent's answer goes to a request id the next process does
    /// not know. The driver records each request ([`Early::sent`]) before it leaves, so the
    /// next process sends the job back to the same agent with the same attempt, which the
    /// agent attaches to the run or answers from its outcome cache (PROTOCOL.md §10; see
    /// [`Core::recover`]).
    pub(crate) fn take_early(&mut self) -> Early {
        Early {
            stanzas: std::mem::take(&mut self.ready.early),
            sent: std::mem::take(&mut self.ready.sent_ahead),
        }
    }

    /// Refusals to send now, whatever the commits ([`Ready::now`]).
    pub(crate) fn take_now(&mut self) -> Vec<Stanza> {
        std::mem::take(&mut self.ready.now)
    }

    /// Whether job requests wait to be sent ([`Core::take_early`]).
    pub(crate) fn has_early(&self) -> bool {
        !self.ready.early.is_empty()
    }

    /// How many agents the registry holds.
    pub(crate) fn agent_count(&self) -> usize {
        self.registry.len()
    }

    /// Whether a commit is needed now ([`Pending::Urgent`]), may wait a moment
    /// ([`Pending::Lazy`]), or is not needed.
    pub(crate) fn pending(&self) -> Pending {
        let r = &self.ready;
        if r.stanzas.len() + r.replies.len() > r.lazy
            || r.events.iter().any(|e| e.kind == EventKind::Final)
        {
            Pending::Urgent
        } else if r.must_store()
            || !self.dirty.is_empty()
            || !r.stanzas.is_empty()
            || !r.replies.is_empty()
            || !r.events.is_empty()
            || !r.released.is_empty()
            || !r.early.is_empty()
        {
            Pending::Lazy
        } else {
            Pending::Nothing
        }
    }

    /// Everything decided since the last call, in the order to act on it.
    pub(crate) fn take_ready(&mut self) -> Ready {
        let mut ready = std::mem::take(&mut self.ready);
        ready.persist = self.dirty.drain().collect();
        ready.released = self.jobs.take_released();
        // A submitter waiting for the end of a job that ended already (within the linger,
        // so in this very commit) gets it with the acceptance: no second request to the core
        // after it, no wait for the event. Its view is the one the job's final event carries
        // (rendered when it ended).
        for token in std::mem::take(&mut ready.waiting) {
            for (t, reply) in &mut ready.replies {
                if *t != token {
                    continue;
                }
                let ApiReply::Submitted(Ok((id, _))) = reply else {
                    continue;
                };
                let Some(rec) = self.jobs.get(id).filter(|r| r.state.is_final()) else {
                    continue;
                };
                let view = ready
                    .events
                    .iter()
                    .rev()
                    .find(|e| e.kind == EventKind::Final && e.job == rec.id && !e.data.is_later())
                    .map_or_else(|| Rendered::job(rec), |e| e.data.clone());
                *reply = ApiReply::Ended {
                    id: rec.id.clone(),
                    state: rec.state,
                    view,
                };
            }
        }
        ready
    }

    /// How many held jobs reference `blob`: the driver deletes a released blob only when
    /// none does (a new job may have taken it since).
    pub(crate) fn blob_refs(&self, blob: &crate::blobs::Stored) -> u32 {
        self.jobs.blob_refs(blob)
    }

    /// Every blob a held job references (the start-up sweep keeps these).
    pub(crate) fn referenced_blobs(&self) -> std::collections::HashSet<crate::blobs::Stored> {
        self.jobs.referenced_blobs().copied().collect()
    }

    /// A job held, to store it (see [`Ready::persist`]).
    pub(crate) fn record(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// Delayed jobs whose time has come join their queues (stored, then placed).
    fn release_delayed(&mut self, now: Now) {
        for id in self.jobs.release_due(now.ms) {
            tracing::info!(job = %id, "delayed job due: queued");
            self.persist(&id);
            self.place_pending = true;
        }
    }

    /// Marks a job changed: stored before anything said about it leaves.
    fn persist(&mut self, job: &JobId) {
        self.dirty.insert(job.clone());
    }

    /// Queues a stanza (sent after the commit).
    fn send(&mut self, st: impl Into<Stanza>) {
        self.ready.stanzas.push(st.into());
    }

    /// Queues a stanza sent after the commit, which need not hurry it ([`Pending::Lazy`]).
    fn send_lazy(&mut self, st: impl Into<Stanza>) {
        self.ready.stanzas.push(st.into());
        self.ready.lazy += 1;
    }

    /// Queues a job request to an agent, sent before the commit ([`Core::take_early`]); among
    /// several dispatchers only to an agent that would tell the next leader it has the job
    /// (`<recall/>`, [`recall`]), else after the commit.
    fn send_early(&mut self, st: impl Into<Stanza>, sent: SentAhead) {
        if self.among_several && !self.recalls(&sent.agent) {
            self.send(st);
            return;
        }
        self.ready.early.push(st.into());
        self.ready.sent_ahead.push(sent);
    }

    /// Whether anyone may read the JSON view of a job that ends: an HTTP event stream open
    /// or a request waiting for a job. Without one, a job's end is published unrendered
    /// ([`Rendered::later`]): a job submitted over XMPP and not watched over HTTP needs no
    /// JSON, whose rendering was about 3 % of the CPU of such a job (BENCHMARKS.md,
    /// twenty-third session). The driver renders an event left so when it sends it out, if a
    /// reader has come since ([`Rendered::is_later`]). True until told otherwise.
    pub(crate) fn set_listened(&mut self, listened: bool) {
        self.listened = listened;
    }

    /// Queues an event for the HTTP event streams.
    fn publish(&mut self, job: &JobId, kind: EventKind, data: Rendered) {
        let submitter = self
            .jobs
            .get(job)
            .map(|j| j.spec.submitter.clone())
            .unwrap_or_default();
        self.ready.events.push(JobEvent {
            job: job.clone(),
            submitter,
            kind,
            data,
        });
    }

    /// Remembers a held job's idempotency key.
    fn index_key(&mut self, id: &JobId) {
        let Some(j) = self.jobs.get(id) else { return };
        if let Some(k) = &j.spec.idempotency_key {
            let key = (j.spec.submitter.clone(), k.clone());
            self.idempotency.insert(key.clone(), id.clone());
            self.idempotency_of.insert(id.clone(), key);
        }
    }

    /// Retention: finished jobs (and their idempotency keys) are forgotten when due, from the
    /// table's time-ordered index, in batches at most every `prune_every`.
    fn prune(&mut self, now: Now) {
        let retention = self.cfg.retention.as_millis() as u64;
        let due = self
            .jobs
            .next_prune_at(retention)
            .is_some_and(|t| t <= now.ms);
        if now.ms < self.next_prune_ms || !due {
            return;
        }
        self.next_prune_ms = now.ms + self.prune_every();
        let old = self.jobs.prune(now.ms, retention);
        if old.is_empty() {
            return;
        }
        for id in &old {
            if let Some(key) = self.idempotency_of.remove(id) {
                self.idempotency.remove(&key);
            }
            self.dirty.remove(id);
        }
        tracing::info!(
            jobs = old.len(),
            "forgot finished jobs past their retention"
        );
        self.ready.delete.extend(old);
    }

    /// How often retention forgets jobs at most (ms): half the retention, from 100 ms to a
    /// minute, so that a steady stream of jobs ending does not wake the driver for each one.
    fn prune_every(&self) -> u64 {
        (self.cfg.retention.as_millis() as u64 / 2).clamp(100, 60_000)
    }

    /// A new globally unique job id: 128 bits, time-ordered prefix (UUIDv7 layout: 48 bits
    /// of milliseconds, then randomness from the core's generator).
    fn new_job_id(&mut self, now: Now) -> JobId {
        let ms = now.ms & 0xFFFF_FFFF_FFFF;
        let r: u128 = self.rng.random();
        let v = (u128::from(ms) << 80) | (r & ((1u128 << 80) - 1));
        hyphenated(v).parse().expect("hex id is a valid job id")
    }
}

/// `v` as 32 lowercase hex digits in groups of 8-4-4-4-12, written directly (two `format!`s
/// were about 1 % of the dispatcher's CPU under load).
fn hyphenated(v: u128) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for digit in 0..32 {
        if matches!(digit, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        let nibble = (v >> (4 * (31 - digit))) & 0xF;
        id.push(char::from(HEX[nibble as usize]));
    }
    id
}

/// Known agents as bare JIDs (ignoring any the store holds that no longer parse).
fn bare(s: &str) -> Option<BareJid> {
    BareJid::new(s).ok()
}
