//! The dispatcher's connection task: the one owner of its XMPP connection, the registry, the
//! job table and the store.
//!
//! A `select!` loop over stanzas and a 50 ms tick. Stanzas become registry and job events;
//! after each event, queued jobs are placed (`place`). The tick times out jobs, retries those
//! whose backoff ended, pings silent agents and fails jobs that found no capable agent in time.
//! Every job state change is written to the store before anyone is told about it, by **group
//! commit**: while the task handles the events that are ready (up to [`BATCH`]), changed jobs
//! are only marked and every stanza and API reply is held; then one durable transaction
//! stores all the changes, and only after it commits do the held stanzas and replies go out.
//! One fsync per batch instead of three per job.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jid::{BareJid, FullJid, Jid};
use rand::rngs::StdRng;
use rand::SeedableRng;
use spine_protocol::blob::BlobStore;
use spine_protocol::{
    classify, presence_payloads, Accepted, Agents, Cancel, Condition, Data, Discover,
    DispatcherHello, Disposition, Failure, Job, JobId, JobResult, JobState, JobStatus, Outcome,
    Payload, Progress, SpineError, Status, Submit, INLINE_LIMIT,
};
use spine_xmpp::stanzastream::{Event, StreamEvent};
use spine_xmpp::Connection;
use tokio_xmpp::Stanza;
use tracing::{debug, error, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::config::DispatcherConfig;
use crate::deliver::{Out, Via};
use crate::error::DispatcherError;
use crate::http::{job_json, Command, Handle, JobEvent};
use crate::jobs::{Advance, AfterFailure, JobRecord, JobSpec, JobTable, Recorded, SessionLost};
use crate::policy::Policy;
use crate::registry::{AdvertiseOutcome, LoadOutcome, NoPick, PickRequest, Registry};
use crate::store::Store;

/// How often timers are checked.
const TICK: Duration = Duration::from_millis(50);
/// Time a silent agent has to answer a ping.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// After a restart, how long a job that was in flight waits for its agent to come back.
const RESUME_GRACE: Duration = Duration::from_secs(10);
/// Queued jobs looked at per capability per placement round (bounds head-of-line scans).
const PLACE_SCAN: usize = 64;
/// How often map/reduce jobs are checked for straggling steps.
const STRAGGLER_CHECK_MS: u64 = 250;
/// Most events handled before the changes they made are committed and their replies sent.
const BATCH: usize = 256;
/// A session that ends within this time of sending a job request blames the largest such
/// request (a stanza over the server's size limit makes the server close the session).
const SESSION_SUSPECT_WINDOW: Duration = Duration::from_secs(5);
/// Incomplete blobs are dropped this long after their last chunk.
const BLOB_IDLE_TTL: Duration = Duration::from_secs(300);

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A job IQ in flight.
struct Sent {
    job: JobId,
    agent: FullJid,
    attempt: u64,
    /// The request, to send again after our own reconnect (its reply may have been lost).
    payload: Job,
    /// When it was last sent, and its size as serialised: if the session ends right after,
    /// the largest recent request is blamed ([`crate::jobs::blame`]).
    at: Instant,
    bytes: usize,
}

/// A large input being sent to an agent in chunks before its job (PROTOCOL.md §13).
struct Upload {
    sent: Sent,
    data: std::sync::Arc<Vec<u8>>,
    blob: spine_protocol::BlobId,
    pending: std::collections::VecDeque<spine_protocol::Chunk>,
    in_flight: usize,
    /// When the last chunk was sent, and the largest chunk stanza's size (an estimate).
    last_chunk: Option<(Instant, usize)>,
}

/// Unacknowledged chunks per upload.
const CHUNK_WINDOW: usize = 8;

struct Runtime {
    cfg: DispatcherConfig,
    conn: Connection,
    registry: Registry,
    jobs: JobTable,
    store: Store,
    rng: StdRng,
    sent: HashMap<String, Sent>,
    uploads: HashMap<u64, Upload>,
    chunk_iqs: HashMap<String, u64>,
    pings: HashMap<String, (FullJid, Instant)>,
    blobs: BlobStore,
    /// Large outputs on their way to XMPP submitters, ahead of their statuses (crate::deliver).
    deliveries: crate::deliver::Deliveries,
    no_agent_since: HashMap<JobId, u64>,
    policy: Policy,
    next_id: u64,
    id_prefix: String,
    next_prune_ms: u64,
    next_straggler_ms: u64,
    started: Instant,
    events: tokio::sync::broadcast::Sender<JobEvent>,
    latency: Histogram,
    /// Jobs changed since the last commit.
    dirty: HashSet<JobId>,
    /// Jobs whose audit lines reached the file since the last commit (to leave the outbox).
    audited: Vec<String>,
    /// When the audit file was last synced to disk.
    audit_synced: Instant,
    /// Idempotency keys of jobs accepted since the last commit (the store has them after it).
    fresh_keys: HashMap<(String, String), JobId>,
    /// Stanzas held until the changes before them are committed.
    outbox: Vec<Stanza>,
    /// HTTP API replies held until the changes before them are committed.
    replies: Vec<Box<dyn FnOnce() + Send>>,
    /// One line per job that ended.
    audit: Option<crate::audit::AuditLog>,
    /// When the XMPP session ended, until the next one starts.
    session_died: Option<Instant>,
}

/// Dispatch latency (accepted → first dispatch), for /metrics.
#[derive(Default)]
struct Histogram {
    counts: [u64; 12],
    sum_s: f64,
    n: u64,
}

const BUCKETS: [f64; 12] = [
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

/// A dispatcher with its HTTP listener open (port 0 allowed: see [`Dispatcher::http_addr`]).
pub struct Dispatcher {
    cfg: DispatcherConfig,
    http: Option<tokio::net::TcpListener>,
}

impl Dispatcher {
    /// Validates the configuration and opens the HTTP listener.
    pub async fn bind(cfg: DispatcherConfig) -> Result<Self, DispatcherError> {
        cfg.validate()?;
        crate::http::ensure_open_files(&cfg)?;
        let http = match cfg.http_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                DispatcherError::Config(format!("http_listen: cannot listen on {addr}: {e}"))
            })?),
            None => None,
        };
        Ok(Dispatcher { cfg, http })
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = impl Sized> + Send,
    ) -> Result<(), DispatcherError> {
        run_inner(self.cfg, self.http, shutdown).await
    }
}

/// Runs a dispatcher until `shutdown` completes.
pub async fn run(
    cfg: DispatcherConfig,
    shutdown: impl Future<Output = impl Sized> + Send,
) -> Result<(), DispatcherError> {
    Dispatcher::bind(cfg).await?.run(shutdown).await
}

async fn run_inner(
    cfg: DispatcherConfig,
    http: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = impl Sized> + Send,
) -> Result<(), DispatcherError> {
    let opts = cfg.connect_options()?;
    let store = Store::open(&cfg.data_dir.join("jobs.redb"))?;
    let mut jobs = JobTable::new(cfg.max_queue);
    let stored = store.load()?;
    let unfinished = stored.iter().filter(|j| !j.state.is_final()).count();
    // Capabilities offered in earlier runs: the store's list, and those of stored jobs that
    // reached an agent (a store written before the list existed).
    let mut registry = Registry::new();
    registry.remember(store.known_capabilities()?);
    for j in stored {
        if j.agent.is_some() {
            registry.remember([j.spec.capability.clone()]);
        }
        jobs.restore(j);
    }
    let mut audit = match cfg.audit_log.trim() {
        "off" => None,
        name => {
            let path = cfg.data_dir.join(name);
            Some(
                crate::audit::AuditLog::open(&path, cfg.audit_max_size.as_u64(), cfg.audit_keep)
                    .map_err(|e| {
                        DispatcherError::Config(format!("audit_log: {}: {e}", path.display()))
                    })?,
            )
        }
    };
    // Audit lines stored with their outcomes just before a crash, perhaps not yet written.
    let outbox = store.audit_outbox()?;
    if !outbox.is_empty() {
        if let Some(a) = audit.as_mut() {
            let n = a.recover(&outbox).map_err(|e| {
                DispatcherError::Config(format!("audit_log: recovering stored lines: {e}"))
            })?;
            if n > 0 {
                info!(
                    lines = n,
                    "audit log: appended the lines of jobs that ended just before the last stop"
                );
            }
        }
        let done: Vec<String> = outbox.into_iter().map(|(j, _)| j).collect();
        store.put_with_audit(&[], &[], &done)?;
    }
    let mut conn = spine_xmpp::connect(opts).await?;
    let mut status_rx = conn
        .take_status()
        .ok_or_else(|| DispatcherError::Connection("connection status already taken".into()))?;
    let mut auth_refusals = 0u32;
    info!(jid = %conn.jid(), jobs = jobs.len(), unfinished, "dispatcher connected");
    let policy = Policy::from_config(&cfg)?;
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<Command>(1024);
    let (events, _) = tokio::sync::broadcast::channel::<JobEvent>(4096);
    let http_stop = tokio_util::sync::CancellationToken::new();
    if let Some(listener) = http {
        let handle = Handle::new(&cfg, cmd_tx.clone(), events.clone())?;
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "HTTP API listening");
        }
        tokio::spawn(crate::http::serve(listener, handle, http_stop.clone()));
    }
    drop(cmd_tx);
    let mut rt = Runtime {
        blobs: BlobStore::with_limits(cfg.blob_limits(BLOB_IDLE_TTL)),
        deliveries: crate::deliver::Deliveries::new(),
        cfg,
        conn,
        registry,
        jobs,
        store,
        rng: StdRng::from_os_rng(),
        sent: HashMap::new(),
        uploads: HashMap::new(),
        chunk_iqs: HashMap::new(),
        pings: HashMap::new(),
        no_agent_since: HashMap::new(),
        policy,
        next_id: 0,
        next_prune_ms: 0,
        next_straggler_ms: 0,
        started: Instant::now(),
        id_prefix: {
            use rand::Rng as _;
            format!("{:08x}", rand::rng().random::<u32>())
        },
        events,
        latency: Histogram::default(),
        dirty: HashSet::new(),
        audited: Vec::new(),
        audit_synced: Instant::now(),
        fresh_keys: HashMap::new(),
        outbox: Vec::new(),
        replies: Vec::new(),
        audit,
        session_died: None,
    };
    rt.on_session_start().await;
    // Map/reduce jobs whose last step ended just before a crash move on now.
    for parent in rt.jobs.running_mapreduces() {
        let adv = rt.jobs.advance(&parent, now_ms());
        rt.apply_advance(&parent, adv).await?;
    }
    rt.commit().await?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            // Cancellation-safe branches: the connection and the interval keep their state.
            _ = &mut shutdown => break,
            ev = rt.conn.next() => rt.on_event(ev).await?,
            _ = tick.tick() => rt.on_tick().await?,
            Some(cmd) = cmd_rx.recv() => rt.on_command(cmd).await?,
            Some(spine_xmpp::Status::ReconnectFailed { error, auth, .. }) = status_rx.recv() => {
                if auth {
                    auth_refusals += 1;
                    error!("server refuses the dispatcher's credentials ({auth_refusals}/3): {error}");
                    if auth_refusals >= 3 {
                        return Err(DispatcherError::Connection(format!("credentials refused: {error}")));
                    }
                } else {
                    auth_refusals = 0;
                }
            }
        }
        // Whatever else is ready joins the batch, then one commit for all of it.
        for _ in 1..BATCH {
            if let Some(ev) = futures::FutureExt::now_or_never(rt.conn.next()) {
                rt.on_event(ev).await?;
            } else if let Ok(cmd) = cmd_rx.try_recv() {
                rt.on_command(cmd).await?;
            } else {
                break;
            }
        }
        rt.commit().await?;
    }
    http_stop.cancel();
    info!("dispatcher stopping");
    rt.commit().await?;
    rt.conn.send(Presence::new(PresenceType::Unavailable)).await;
    rt.conn.close().await;
    Ok(())
}

impl Runtime {
    /// One event of the connection.
    async fn on_event(&mut self, ev: Option<Event>) -> Result<(), DispatcherError> {
        match ev {
            Some(Event::Stanza(st)) => {
                if let Err(e) = self.on_stanza(st).await {
                    // The store failed: nothing can be promised any more.
                    error!("{e}");
                    return Err(e);
                }
            }
            Some(Event::Stream(StreamEvent::Suspended)) => {
                self.session_died.get_or_insert_with(Instant::now);
            }
            Some(Event::Stream(StreamEvent::Reset { .. })) => {
                self.blame_lost_session().await?;
                info!(
                    in_flight = self.sent.len(),
                    "session re-established: greeting agents, re-sending jobs in flight"
                );
                self.on_session_start().await;
                self.resend_in_flight().await;
                self.deliveries.on_session_reset(Instant::now());
                self.pump_deliveries().await;
            }
            Some(Event::Stream(_)) => {}
            None => {
                return Err(DispatcherError::Connection(
                    "the connection worker ended".into(),
                ))
            }
        }
        Ok(())
    }

    /// Stores every job changed since the last commit in one durable transaction, then sends
    /// the stanzas and API replies held meanwhile.
    async fn commit(&mut self) -> Result<(), DispatcherError> {
        // Audit lines go into the store's outbox with their outcomes, then into the file; the
        // next commit removes them from the outbox (crate::audit).
        let lines = self
            .audit
            .as_mut()
            .map(|a| a.take_pending())
            .unwrap_or_default();
        // Lines leave the outbox once the file holding them is on disk: synced at most once a
        // second, so a power loss cannot lose a line either.
        let mut written = Vec::new();
        if !self.audited.is_empty() && self.audit_synced.elapsed() >= Duration::from_secs(1) {
            if let Some(a) = self.audit.as_mut() {
                match a.sync() {
                    Ok(()) => written = std::mem::take(&mut self.audited),
                    Err(e) => error!("cannot sync the audit log: {e}"),
                }
            }
            self.audit_synced = Instant::now();
        }
        if !self.dirty.is_empty() || !lines.is_empty() || !written.is_empty() {
            let recs: Vec<&JobRecord> = self
                .dirty
                .iter()
                .filter_map(|id| self.jobs.get(id))
                .collect();
            self.store.put_with_audit(&recs, &lines, &written)?;
            self.dirty.clear();
        }
        self.fresh_keys.clear();
        if let Some(a) = self.audit.as_mut() {
            // The outcomes are stored now; an audit write failure is reported, not fatal (the
            // lines stay in the outbox and are written at the next start).
            match a.append(&lines) {
                Ok(()) => self.audited.extend(lines.into_iter().map(|(j, _)| j)),
                Err(e) => error!("cannot write the audit log: {e}"),
            }
        }
        for st in std::mem::take(&mut self.outbox) {
            self.conn.send(st).await;
        }
        for reply in std::mem::take(&mut self.replies) {
            reply();
        }
        Ok(())
    }

    /// Publishes a job event to the HTTP event streams after the next commit.
    fn publish(&mut self, ev: JobEvent) {
        let tx = self.events.clone();
        self.replies.push(Box::new(move || {
            let _ = tx.send(ev);
        }));
    }

    /// Holds a stanza until the next commit.
    async fn send(&mut self, stanza: impl Into<Stanza>) {
        self.outbox.push(stanza.into());
    }

    /// IQ ids: a random per-process prefix, so a late reply meant for an earlier process (or
    /// a guessed id) never matches a request of this one.
    fn iq_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}-{}", self.id_prefix, self.next_id)
    }

    /// Initial presence, then a hello to every agent seen in the last day (PROTOCOL.md §4.4):
    /// a restarted dispatcher re-learns the fleet at once.
    async fn on_session_start(&mut self) {
        self.send(Presence::available()).await;
        let since = now_ms().saturating_sub(86_400_000);
        match self.store.known_agents(since) {
            Ok(agents) => {
                for a in agents {
                    if let Ok(j) = BareJid::new(&a) {
                        self.hello(Jid::from(j)).await;
                    }
                }
            }
            Err(e) => warn!("cannot read known agents: {e}"),
        }
    }

    async fn hello(&mut self, to: Jid) {
        self.send(
            Presence::available()
                .with_to(to)
                .with_payload(DispatcherHello::default()),
        )
        .await;
    }

    async fn reply_error(&mut self, to: Jid, id: String, e: SpineError) {
        self.send(Iq::from_error(id, StanzaError::from(e)).with_to(to))
            .await;
    }

    async fn on_stanza(&mut self, st: Stanza) -> Result<(), DispatcherError> {
        match st {
            Stanza::Presence(p) => self.on_presence(p).await?,
            Stanza::Iq(Iq::Result {
                id, from, payload, ..
            }) => {
                // A reply counts only from the entity the request went to.
                if self
                    .sent
                    .get(&id)
                    .is_some_and(|s| from.as_ref() == Some(&Jid::from(s.agent.clone())))
                {
                    if let Some(s) = self.sent.remove(&id) {
                        self.on_job_result(s, payload).await?;
                    }
                } else if self
                    .pings
                    .get(&id)
                    .is_some_and(|(a, _)| from.as_ref() == Some(&Jid::from(a.clone())))
                {
                    if let Some((agent, _)) = self.pings.remove(&id) {
                        debug!(agent = %agent, "silent agent answered a ping: asking for its load");
                        self.hello(Jid::from(agent)).await;
                    }
                } else if let Some(key) = self.chunk_ack_key(&id, from.as_ref()) {
                    self.on_chunk_reply(key, None).await?;
                } else if self
                    .deliveries
                    .on_reply(&id, from.as_ref(), None, Instant::now())
                {
                    self.pump_deliveries().await;
                } else if self.sent.contains_key(&id) {
                    warn!(from = %show_jid(from.as_ref()), "ignoring a job result from the wrong sender");
                } else if let Some(job) = payload
                    .as_ref()
                    .filter(|p| p.is("result", spine_protocol::NS))
                    .and_then(|p| p.attr("job"))
                {
                    // The request was given up (its agent declared gone, or this dispatcher
                    // restarted and sent the job again): the job's outcome comes, or came,
                    // from the request that replaced it.
                    info!(job = %job, from = %show_jid(from.as_ref()), "duplicate result dropped (a late reply to a request given up)");
                }
            }
            Stanza::Iq(Iq::Error {
                id, from, error, ..
            }) => {
                let from_agent = |a: &FullJid| from.as_ref() == Some(&Jid::from(a.clone()));
                if self.sent.get(&id).is_some_and(|s| from_agent(&s.agent)) {
                    if let Some(s) = self.sent.remove(&id) {
                        self.on_job_error(s, error).await?;
                    }
                } else if self.pings.get(&id).is_some_and(|(a, _)| from_agent(a)) {
                    if let Some((agent, _)) = self.pings.remove(&id) {
                        self.agent_gone(&agent, "ping failed").await?;
                    }
                } else if let Some(key) = self.chunk_ack_key(&id, from.as_ref()) {
                    self.on_chunk_reply(key, Some(error)).await?;
                } else if self
                    .deliveries
                    .on_reply(&id, from.as_ref(), Some(&error), Instant::now())
                {
                    self.pump_deliveries().await;
                }
            }
            Stanza::Iq(Iq::Set {
                id,
                from: Some(from),
                payload,
                ..
            }) => self.on_set(from, id, payload).await?,
            Stanza::Iq(Iq::Get {
                id,
                from: Some(from),
                payload,
                ..
            }) => self.on_get(from, id, payload).await,
            Stanza::Message(m) => self.on_message(m).await,
            _ => {}
        }
        Ok(())
    }

    async fn on_presence(&mut self, p: Presence) -> Result<(), DispatcherError> {
        let Some(Ok(from)) = p.from.clone().map(Jid::try_into_full) else {
            return Ok(());
        };
        if p.type_ == PresenceType::Unavailable {
            if self.registry.id_of(&from).is_some() {
                self.agent_gone(&from, "went unavailable").await?;
            }
            return Ok(());
        }
        let Some(allowed) = self.policy.agent(&from.to_bare()) else {
            if presence_payloads(&p.payloads).is_ok_and(|f| f.advertise.is_some()) {
                warn!(from = %from, "ignoring an advertisement from an account not allowed as an agent (see `agents` and [[agent]])");
            }
            return Ok(());
        };
        let found = match presence_payloads(&p.payloads) {
            Ok(f) => f,
            Err(e) => {
                warn!(from = %from, "ignoring presence: {e}");
                return Ok(());
            }
        };
        let now = Instant::now();
        match (found.advertise, found.load) {
            (Some(mut ad), Some(load)) => {
                // Capabilities this account may not offer are dropped, each with a warning;
                // an agent left with none is not registered.
                ad.capabilities.retain(|c| {
                    let ok = allowed.allows(&c.name);
                    if !ok {
                        warn!(agent = %from, capability = %c.name, "ignoring a capability this agent is not allowed to offer (see [[agent]])");
                    }
                    ok
                });
                if ad.capabilities.is_empty() {
                    warn!(agent = %from, "ignoring an agent that offers no capability it is allowed to");
                    if self.registry.id_of(&from).is_some() {
                        self.agent_gone(&from, "no allowed capability").await?;
                    }
                    return Ok(());
                }
                match self
                    .registry
                    .on_advertise(&from, &ad, &load, now, &mut self.rng)
                {
                    AdvertiseOutcome::Added(_) => {
                        info!(agent = %from, capabilities = ad.capabilities.len(), slots = ad.slots, "agent registered");
                        if let Err(e) = self
                            .store
                            .saw_agents(&[(from.to_bare().to_string(), now_ms())])
                        {
                            warn!("cannot remember agent: {e}");
                        }
                    }
                    AdvertiseOutcome::Updated(_) => {}
                    AdvertiseOutcome::Restarted(_, lost) => {
                        warn!(agent = %from, lost = lost.len(), "agent restarted: retrying its jobs");
                        self.retry_lost(&from, lost).await?;
                    }
                }
                // Capabilities offered for the first time are remembered across restarts.
                let learned = self.registry.take_learned();
                if !learned.is_empty() {
                    if let Err(e) = self.store.saw_capabilities(&learned, now_ms()) {
                        warn!("cannot remember capabilities: {e}");
                    }
                }
                self.place().await?;
            }
            (None, Some(load)) => match self.registry.on_load(&from, &load, now, &mut self.rng) {
                LoadOutcome::Updated => self.place().await?,
                LoadOutcome::Stale => {}
                LoadOutcome::NeedHello => self.hello(Jid::from(from)).await,
            },
            _ => {}
        }
        Ok(())
    }

    /// An agent's session ended: forget it and retry its jobs elsewhere.
    async fn agent_gone(&mut self, agent: &FullJid, why: &str) -> Result<(), DispatcherError> {
        let lost = self.registry.on_agent_gone(agent);
        info!(agent = %agent, jobs = lost.len(), "agent gone ({why})");
        self.forget_requests_where(|s| &s.agent == agent);
        self.retry_lost(agent, lost).await
    }

    async fn retry_lost(
        &mut self,
        agent: &FullJid,
        lost: Vec<JobId>,
    ) -> Result<(), DispatcherError> {
        let now = now_ms();
        for job in lost {
            self.forget_requests(&job);
            if let Some(after) = self.jobs.attempt_failed(&job, Some(agent), None, now) {
                self.persist(&job)?;
                if let AfterFailure::Final(state) = after {
                    info!(job = %job, %state, "job ended: its agent was lost");
                    self.notify_final(&job).await;
                }
            }
        }
        self.place().await
    }

    /// Marks a job changed: the next commit stores it, before anything said about it leaves.
    fn persist(&mut self, job: &JobId) -> Result<(), DispatcherError> {
        self.dirty.insert(job.clone());
        Ok(())
    }

    async fn on_job_result(
        &mut self,
        s: Sent,
        payload: Option<minidom::Element>,
    ) -> Result<(), DispatcherError> {
        if let Some(id) = self.registry.id_of(&s.agent) {
            self.registry.on_finished(id, &s.job, &mut self.rng);
        }
        let parsed = payload
            .ok_or_else(|| "empty result".to_owned())
            .and_then(|p| JobResult::try_from(p).map_err(|e| e.to_string()));
        let result = match parsed {
            Ok(r) if r.job == s.job => r,
            Ok(r) => {
                warn!(agent = %s.agent, "result names job {} instead of {}", r.job, s.job);
                return self
                    .fail_attempt(
                        &s,
                        SpineError::new(Condition::Retryable)
                            .with_text("agent answered for another job"),
                    )
                    .await;
            }
            Err(e) => {
                warn!(agent = %s.agent, job = %s.job, "invalid result: {e}");
                return self
                    .fail_attempt(
                        &s,
                        SpineError::new(Condition::Retryable)
                            .with_text(format!("invalid result: {e}")),
                    )
                    .await;
            }
        };
        let (output, mime) = match &result.output {
            None => (Vec::new(), None),
            Some(Data::Inline { bytes, mime }) => (bytes.clone(), mime.clone()),
            Some(Data::Blob(r)) => match self.blobs.take(s.agent.to_bare().as_str(), r) {
                Ok(bytes) => (bytes, r.mime.clone()),
                Err(e) => {
                    return self
                        .fail_attempt(
                            &s,
                            SpineError::new(Condition::Retryable)
                                .with_text(format!("output blob: {e}")),
                        )
                        .await
                }
            },
        };
        match self.jobs.succeeded(&s.job, &result, output, mime, now_ms()) {
            Ok(_) => {
                self.persist(&s.job)?;
                info!(job = %s.job, agent = %s.agent, attempt = s.attempt, "job succeeded");
                self.notify_final(&s.job).await;
            }
            Err(_) => {
                info!(job = %s.job, agent = %s.agent, "duplicate result dropped (the job already has its outcome)")
            }
        }
        self.place().await
    }

    async fn on_job_error(&mut self, s: Sent, error: StanzaError) -> Result<(), DispatcherError> {
        let spine = SpineError::from_stanza_error(&error).ok().flatten();
        match classify(&error) {
            Disposition::Gone => {
                let agent = s.agent.clone();
                self.agent_gone(&agent, "job bounced: recipient unavailable")
                    .await
            }
            _ => {
                if let Some(id) = self.registry.id_of(&s.agent) {
                    self.registry.on_finished(id, &s.job, &mut self.rng);
                }
                let e = spine.unwrap_or_else(|| {
                    let c = if error.type_ == ErrorType::Wait {
                        Condition::Retryable
                    } else {
                        Condition::Failed
                    };
                    SpineError::new(c).with_text(format!("{:?}", error.defined_condition))
                });
                if matches!(e.condition, Condition::Busy | Condition::Draining) {
                    // Refused, not run: our view of its load was behind. Place it again at once,
                    // without spending an attempt.
                    debug!(job = %s.job, agent = %s.agent, "refused: {e}");
                    if self.jobs.refused(&s.job, now_ms()) {
                        self.persist(&s.job)?;
                    }
                    return self.place().await;
                }
                self.fail_attempt(&s, e).await
            }
        }
    }

    /// The session ended: the largest job request sent just before (a stanza over the server's
    /// size limit is why servers close a session) counts as a failed attempt of its job, so
    /// that no job can end every session forever (issue 14, finding 5). It goes to its agent
    /// again with the next attempt number, or fails after its last attempt.
    async fn blame_lost_session(&mut self) -> Result<(), DispatcherError> {
        let Some(died) = self.session_died.take() else {
            return Ok(());
        };
        let since = died.checked_sub(SESSION_SUSPECT_WINDOW).unwrap_or(died);
        let sent = self.sent.values().map(|s| (s.job.clone(), s.bytes, s.at));
        let chunks = self.uploads.values().filter_map(|u| {
            u.last_chunk
                .map(|(at, bytes)| (u.sent.job.clone(), bytes.max(u.sent.bytes), at))
        });
        let mut culprits = crate::jobs::blame(sent.chain(chunks), since, died);
        culprits.sort();
        culprits.dedup();
        for job in culprits {
            match self.jobs.session_lost(&job, now_ms()) {
                Some(SessionLost::Resend { attempt }) => {
                    let requests = self
                        .sent
                        .values_mut()
                        .chain(self.uploads.values_mut().map(|u| &mut u.sent));
                    for s in requests.filter(|s| s.job == job) {
                        s.attempt = attempt;
                        s.payload.attempt = attempt;
                    }
                    self.persist(&job)?;
                    warn!(job = %job, attempt, "the XMPP session ended right after this job was sent: counted as a failed attempt (is its stanza over the server's size limit?)");
                }
                Some(SessionLost::Final) => {
                    let agent = self
                        .jobs
                        .get(&job)
                        .and_then(|j| j.agent.as_deref())
                        .and_then(|a| a.parse::<FullJid>().ok());
                    if let Some(id) = agent.and_then(|a| self.registry.id_of(&a)) {
                        self.registry.on_finished(id, &job, &mut self.rng);
                    }
                    self.forget_requests(&job);
                    self.persist(&job)?;
                    warn!(job = %job, "job ended: the XMPP session ended right after each of its attempts was sent");
                    self.notify_final(&job).await;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Re-sends every job in flight (new IQ ids): after our reconnect, replies to the old
    /// requests are lost; the agent attaches a repeated job id to the running job, or answers
    /// from its outcome cache, so nothing runs twice.
    async fn resend_in_flight(&mut self) {
        // Uploads start over: acknowledgements of the old session are lost.
        self.chunk_iqs.clear();
        let keys: Vec<u64> = self.uploads.keys().copied().collect();
        for k in keys {
            if let Some(u) = self.uploads.get_mut(&k) {
                u.pending = spine_protocol::chunks(&u.blob, &u.data).into();
                u.in_flight = 0;
            }
            self.pump_upload(k).await;
        }
        let old: Vec<(String, Sent)> = self.sent.drain().collect();
        for (_, mut s) in old {
            s.at = Instant::now();
            let id = self.iq_id("j");
            let to: Jid = s.agent.clone().into();
            self.send(Iq::from_set(id.clone(), s.payload.clone()).with_to(to))
                .await;
            self.sent.insert(id, s);
        }
    }

    async fn fail_attempt(&mut self, s: &Sent, e: SpineError) -> Result<(), DispatcherError> {
        debug!(job = %s.job, agent = %s.agent, "attempt {} failed: {e}", s.attempt);
        if let Some(after) = self
            .jobs
            .attempt_failed(&s.job, Some(&s.agent), Some(&e), now_ms())
        {
            self.persist(&s.job)?;
            if let AfterFailure::Final(state) = after {
                info!(job = %s.job, %state, "job ended: {e}");
                self.notify_final(&s.job).await;
            }
        }
        self.place().await
    }

    /// Places queued jobs on agents with room.
    async fn place(&mut self) -> Result<(), DispatcherError> {
        let now = now_ms();
        self.fan_out_all(now)?;
        self.start_mapreduces(now).await?;
        for cap in self.jobs.queued_capabilities() {
            // Look past jobs that cannot be placed (a filter nobody matches) instead of letting
            // them block their capability; stop when plain jobs find every agent busy.
            for id in self.jobs.queued_in_order(&cap, now, PLACE_SCAN) {
                let Some(job) = self.jobs.get(&id).cloned() else {
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
                    && job.spec.strategy != spine_protocol::Strategy::Affinity;
                match self.pick_for(&job) {
                    Ok(agent) => {
                        self.no_agent_since.remove(&job.id);
                        self.dispatch(job, agent).await?;
                    }
                    Err(NoPick::AllBusy) => {
                        // Capable agents exist: the no-agent clock stops.
                        self.no_agent_since.remove(&job.id);
                        if plain {
                            break;
                        }
                    }
                    Err(NoPick::NoCapableAgent) => {
                        self.no_agent_since.entry(job.id.clone()).or_insert(now);
                    }
                }
            }
        }
        Ok(())
    }

    /// Fans every queued `all` job out to the capable agents (after the filter and limit).
    fn fan_out_all(&mut self, now: u64) -> Result<(), DispatcherError> {
        // From the table's index: no walk over the jobs held.
        let parents: Vec<JobRecord> = self
            .jobs
            .queued_all_parents()
            .iter()
            .filter_map(|id| self.jobs.get(id).cloned())
            .collect();
        for p in parents {
            let filter = p.spec.parsed_filter();
            let mut targets: Vec<String> = self
                .registry
                .rank(
                    &p.spec.capability,
                    filter.as_ref(),
                    p.spec.sort.as_ref(),
                    None,
                )
                .into_iter()
                .filter(|a| a.state == spine_protocol::AgentState::Ready)
                .map(|a| a.jid.to_string())
                .collect();
            if targets.is_empty() {
                self.no_agent_since.entry(p.id.clone()).or_insert(now);
                continue;
            }
            if let Some(l) = p.spec.limit {
                targets.truncate(l.of(targets.len()));
            }
            self.no_agent_since.remove(&p.id);
            let children = self.jobs.fan_out(&p.id, &targets, now);
            info!(job = %p.id, agents = children.len(), "job fanned out to every capable agent");
            let mut recs: Vec<&JobRecord> =
                children.iter().filter_map(|c| self.jobs.get(c)).collect();
            if let Some(parent) = self.jobs.get(&p.id) {
                recs.push(parent);
            }
            self.dirty.extend(recs.iter().map(|r| r.id.clone()));
        }
        Ok(())
    }

    /// Starts every queued map/reduce job: its split or map steps are queued as jobs.
    async fn start_mapreduces(&mut self, now: u64) -> Result<(), DispatcherError> {
        for p in self.jobs.queued_mapreduces() {
            let adv = self.jobs.start_mapreduce(&p, now);
            info!(job = %p, steps = adv.created.len(), "map/reduce started");
            self.apply_advance(&p, adv).await?;
        }
        Ok(())
    }

    /// Acts on a map/reduce job's step: stores the new steps and the parent together, cancels
    /// the copies that lost (or all steps, when the job ended), reports progress, and announces
    /// the outcome.
    async fn apply_advance(&mut self, parent: &JobId, adv: Advance) -> Result<(), DispatcherError> {
        let now = now_ms();
        let ended = self.jobs.get(parent).map(|p| p.state);
        let reason = match ended {
            Some(s) if s.is_final() => "the map/reduce job ended",
            _ => "another copy of this step finished first",
        };
        for c in &adv.cancel {
            self.cancel_step(c, reason, now).await;
        }
        let mut recs: Vec<&JobRecord> = adv
            .created
            .iter()
            .chain(&adv.cancel)
            .filter_map(|c| self.jobs.get(c))
            .collect();
        if let Some(p) = self.jobs.get(parent) {
            recs.push(p);
        }
        self.dirty.extend(recs.iter().map(|r| r.id.clone()));
        if adv.ended {
            info!(job = %parent, state = ended.map_or("unknown", JobState::as_str), "map/reduce ended");
            self.notify_one(parent).await;
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
                self.forward(parent, p.into()).await;
            }
        }
        Ok(())
    }

    /// Queues the audit line of a job that ended.
    fn audit_record(&mut self, job: &JobId) {
        if let (Some(a), Some(rec)) = (self.audit.as_mut(), self.jobs.get(job)) {
            if rec.state.is_final() {
                a.record(rec, now_ms());
            }
        }
    }

    /// Cancels one job and tells its agent (the caller stores it).
    async fn cancel_step(&mut self, job: &JobId, reason: &str, now: u64) {
        let was_final = self.jobs.get(job).is_some_and(|j| j.state.is_final());
        let cancelled = self.jobs.cancel_because(job, reason, now);
        if !was_final {
            self.audit_record(job);
        }
        if let Ok(Some(a)) = cancelled {
            if let Ok(a) = a.parse::<FullJid>() {
                if let Some(aid) = self.registry.id_of(&a) {
                    self.registry.on_finished(aid, job, &mut self.rng);
                }
                self.send_cancel(&a, job).await;
            }
        }
        self.forget_requests(job);
    }

    /// Starts a speculative copy of each straggling map/reduce step that has another capable
    /// agent to go to.
    async fn speculate(&mut self, now: u64) -> Result<(), DispatcherError> {
        if now < self.next_straggler_ms {
            return Ok(());
        }
        self.next_straggler_ms = now + STRAGGLER_CHECK_MS;
        let stragglers = self.jobs.stragglers(
            now,
            self.cfg.speculation_factor,
            self.cfg.speculation_min.as_millis() as u64,
        );
        for s in stragglers {
            let Some(spec) = self.jobs.get(&s.job).map(|j| j.spec.clone()) else {
                continue;
            };
            let filter = spec.parsed_filter();
            let elsewhere = self
                .registry
                .rank(&spec.capability, filter.as_ref(), spec.sort.as_ref(), None)
                .iter()
                .any(|a| a.state == spine_protocol::AgentState::Ready && a.jid.as_str() != s.agent);
            if !elsewhere {
                continue;
            }
            if let Some(copy) = self.jobs.speculate(&s, now) {
                info!(job = %s.job, agent = %s.agent, running_ms = s.running_ms, median_ms = s.median_ms, copy = %copy, "straggling step: speculative copy queued");
                let recs: Vec<&JobRecord> = [&copy, &s.parent]
                    .into_iter()
                    .filter_map(|c| self.jobs.get(c))
                    .collect();
                self.dirty.extend(recs.iter().map(|r| r.id.clone()));
            }
        }
        Ok(())
    }

    fn pick_for(&mut self, job: &JobRecord) -> Result<FullJid, NoPick> {
        // Restored in flight: back to its agent (whatever its load: it attaches the repeat to
        // the running job), or, once that agent has had time to return, anywhere.
        if job.resume {
            if let Some(agent) = job.agent.as_deref().and_then(|a| a.parse::<FullJid>().ok()) {
                if self.registry.id_of(&agent).is_some() {
                    return Ok(agent);
                }
                if self.started.elapsed() < RESUME_GRACE {
                    return Err(NoPick::AllBusy);
                }
            }
        }
        // A child of an `all` job runs on its own agent or waits for it.
        if let Some(target) = &job.spec.target {
            let agent: FullJid = target.parse().map_err(|_| NoPick::NoCapableAgent)?;
            return match self.registry.id_of(&agent) {
                Some(id) if self.registry.has_room(id, &job.spec.capability) => Ok(agent),
                Some(_) => Err(NoPick::AllBusy),
                None => Err(NoPick::NoCapableAgent),
            };
        }
        let filter = job.spec.parsed_filter();
        let excluded: Vec<_> = job
            .excluded
            .iter()
            .filter_map(|a| a.parse::<FullJid>().ok())
            .filter_map(|a| self.registry.id_of(&a))
            .collect();
        let mut req = PickRequest {
            capability: &job.spec.capability,
            strategy: job.spec.strategy,
            filter: filter.as_ref(),
            sort: job.spec.sort.as_ref(),
            affinity_key: job.spec.affinity_key.as_deref(),
            exclude: &excluded,
        };
        let picked = match self.registry.pick(&req, &mut self.rng) {
            // Every capable agent failed this job before: better one of them than none.
            Err(NoPick::NoCapableAgent) if !excluded.is_empty() => {
                req.exclude = &[];
                self.registry.pick(&req, &mut self.rng)
            }
            other => other,
        }?;
        self.registry
            .jid_of(picked)
            .cloned()
            .ok_or(NoPick::NoCapableAgent)
    }

    async fn dispatch(&mut self, job: JobRecord, agent: FullJid) -> Result<(), DispatcherError> {
        let now = now_ms();
        let Some(rec) = self.jobs.dispatched(&job.id, &agent, now).cloned() else {
            return Ok(());
        };
        if rec.attempts == 1 {
            self.latency
                .observe(now.saturating_sub(rec.accepted_ms) as f64 / 1000.0);
        }
        self.dirty.insert(rec.id.clone());
        if let Some(id) = self.registry.id_of(&agent) {
            self.registry.on_assigned(
                id,
                job.id.clone(),
                job.spec.capability.clone(),
                &mut self.rng,
            );
        }
        let mut j = Job::new(rec.id.clone(), rec.spec.capability.clone());
        j.attempt = rec.attempts;
        j.deadline_ms = rec.spec.deadline_ms.map(|d| d.saturating_sub(now));
        j.submitter = Some(rec.spec.submitter.clone());
        j.progress = rec.spec.progress || rec.spec.watch.is_some();
        j.args = rec.spec.args.clone().into();
        if rec.spec.input.len() > INLINE_LIMIT {
            // Too large to travel in the job: chunks first, the job when they are all in.
            use sha2::Digest as _;
            self.next_id += 1;
            let blob: spine_protocol::BlobId = format!("in-{}-{}", self.id_prefix, self.next_id)
                .parse()
                .expect("generated blob id is valid");
            let data = std::sync::Arc::new(rec.spec.input.clone());
            let sha256: [u8; 32] = sha2::Sha256::digest(data.as_slice()).into();
            j.input = Some(Data::Blob(spine_protocol::BlobRef {
                blob: blob.clone(),
                size: data.len() as u64,
                sha256,
                mime: rec.spec.input_mime.clone(),
            }));
            let pending = spine_protocol::chunks(&blob, &data).into();
            let key = self.next_id;
            debug!(job = %rec.id, agent = %agent, bytes = data.len(), "uploading the input before the job");
            let sent = Sent {
                job: rec.id.clone(),
                agent: agent.clone(),
                attempt: rec.attempts,
                bytes: stanza_bytes(&j),
                payload: j,
                at: Instant::now(),
            };
            self.uploads.insert(
                key,
                Upload {
                    sent,
                    data,
                    blob,
                    pending,
                    in_flight: 0,
                    last_chunk: None,
                },
            );
            self.pump_upload(key).await;
            return Ok(());
        }
        if !rec.spec.input.is_empty() {
            j.input = Some(Data::Inline {
                mime: rec.spec.input_mime.clone(),
                bytes: rec.spec.input.clone(),
            });
        }
        let iq_id = self.iq_id("j");
        debug!(job = %rec.id, agent = %agent, attempt = rec.attempts, "dispatching");
        self.sent.insert(
            iq_id.clone(),
            Sent {
                job: rec.id.clone(),
                agent: agent.clone(),
                attempt: rec.attempts,
                payload: j.clone(),
                at: Instant::now(),
                bytes: stanza_bytes(&j),
            },
        );
        self.send(Iq::from_set(iq_id, j).with_to(agent.into()))
            .await;
        Ok(())
    }

    /// Sends chunks up to the window; when all are acknowledged, the job itself.
    async fn pump_upload(&mut self, key: u64) {
        loop {
            let Some(u) = self.uploads.get_mut(&key) else {
                return;
            };
            if u.in_flight >= CHUNK_WINDOW {
                return;
            }
            match u.pending.pop_front() {
                Some(chunk) => {
                    u.in_flight += 1;
                    // Base64 of the bytes and the element around them.
                    let bytes = chunk.bytes.len().div_ceil(3) * 4 + 256;
                    let largest = u.last_chunk.map_or(0, |(_, b)| b);
                    u.last_chunk = Some((Instant::now(), bytes.max(largest)));
                    let to: Jid = u.sent.agent.clone().into();
                    let id = self.iq_id("b");
                    self.chunk_iqs.insert(id.clone(), key);
                    self.send(Iq::from_set(id, chunk).with_to(to)).await;
                }
                None if u.in_flight == 0 => {
                    let Some(mut u) = self.uploads.remove(&key) else {
                        return;
                    };
                    u.sent.at = Instant::now();
                    let id = self.iq_id("j");
                    let to: Jid = u.sent.agent.clone().into();
                    self.send(Iq::from_set(id.clone(), u.sent.payload.clone()).with_to(to))
                        .await;
                    self.sent.insert(id, u.sent);
                    return;
                }
                None => return,
            }
        }
    }

    /// A chunk was acknowledged (or refused) by the agent it was sent to.
    async fn on_chunk_reply(
        &mut self,
        key: u64,
        error: Option<StanzaError>,
    ) -> Result<(), DispatcherError> {
        match error {
            None => {
                if let Some(u) = self.uploads.get_mut(&key) {
                    u.in_flight = u.in_flight.saturating_sub(1);
                }
                self.pump_upload(key).await;
                Ok(())
            }
            Some(e) => {
                self.chunk_iqs.retain(|_, k| *k != key);
                match self.uploads.remove(&key) {
                    Some(u) => {
                        warn!(job = %u.sent.job, agent = %u.sent.agent, "input upload refused: {:?}", e.defined_condition);
                        self.on_job_error(u.sent, e).await
                    }
                    None => Ok(()),
                }
            }
        }
    }

    /// The upload a chunk reply belongs to, if it comes from that upload's agent.
    fn chunk_ack_key(&mut self, id: &str, from: Option<&Jid>) -> Option<u64> {
        let key = *self.chunk_iqs.get(id)?;
        let agent: Jid = self.uploads.get(&key)?.sent.agent.clone().into();
        if from != Some(&agent) {
            return None;
        }
        self.chunk_iqs.remove(id);
        Some(key)
    }

    /// Forgets every request of a job (job IQ and input upload), e.g. when it is cancelled.
    fn forget_requests(&mut self, job: &JobId) {
        self.forget_requests_where(|s| &s.job == job);
    }

    /// Forgets the job IQs and input uploads whose request matches `pred`.
    fn forget_requests_where(&mut self, pred: impl Fn(&Sent) -> bool) {
        self.sent.retain(|_, s| !pred(s));
        let keys: Vec<u64> = self
            .uploads
            .iter()
            .filter(|(_, u)| pred(&u.sent))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.uploads.remove(&k);
            self.chunk_iqs.retain(|_, v| *v != k);
        }
    }

    async fn on_tick(&mut self) -> Result<(), DispatcherError> {
        let now = now_ms();
        for (job, agent) in self.jobs.expire(now) {
            self.persist(&job)?;
            info!(job = %job, "job timed out");
            if let Some(a) = agent.and_then(|a| a.parse::<FullJid>().ok()) {
                if let Some(id) = self.registry.id_of(&a) {
                    self.registry.on_finished(id, &job, &mut self.rng);
                }
                self.send_cancel(&a, &job).await;
            }
            self.forget_requests(&job);
            self.notify_final(&job).await;
        }
        let wait = self.cfg.no_agent_wait.as_millis() as u64;
        let expired: Vec<JobId> = self
            .no_agent_since
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) > wait)
            .map(|(j, _)| j.clone())
            .collect();
        for job in expired {
            self.no_agent_since.remove(&job);
            if self
                .jobs
                .get(&job)
                .is_some_and(|j| j.state == JobState::Queued)
            {
                self.jobs.no_agent(&job, now);
                self.persist(&job)?;
                info!(job = %job, "job failed: no capable agent appeared");
                self.notify_final(&job).await;
            }
        }
        let instant = Instant::now();
        // Idle blobs go even when no chunk comes (in deadline order: nothing is scanned).
        self.blobs.expire(instant);
        // Outputs to submitters that stopped acknowledging chunks are given up.
        self.pump_deliveries().await;
        for agent in self.registry.check_silent(instant) {
            let id = self.iq_id("ping");
            self.pings.insert(id.clone(), (agent.clone(), instant));
            self.send(Iq::from_get(id, xmpp_parsers::ping::Ping).with_to(agent.into()))
                .await;
        }
        let overdue: Vec<(String, FullJid)> = self
            .pings
            .iter()
            .filter(|(_, (_, t))| instant.duration_since(*t) > PING_TIMEOUT)
            .map(|(id, (a, _))| (id.clone(), a.clone()))
            .collect();
        for (id, agent) in overdue {
            self.pings.remove(&id);
            self.agent_gone(&agent, "no answer to a ping").await?;
        }
        // Retention: forget finished jobs (and their idempotency keys) once a minute.
        if now >= self.next_prune_ms {
            self.next_prune_ms =
                now + (self.cfg.retention.as_millis() as u64 / 2).clamp(100, 60_000);
            // The due jobs only (an index by end time), forgotten without copies; a failed
            // delete stops the dispatcher, and the next start loads and prunes them again.
            let old = self.jobs.prune(now, self.cfg.retention.as_millis() as u64);
            if !old.is_empty() {
                self.store.delete(&old)?;
                info!(
                    jobs = old.len(),
                    "forgot finished jobs past their retention"
                );
            }
        }
        self.speculate(now).await?;
        // Jobs whose retry backoff just ended.
        self.place().await
    }

    async fn send_cancel(&mut self, agent: &FullJid, job: &JobId) {
        let id = self.iq_id("c");
        self.send(Iq::from_set(id, Cancel { job: job.clone() }).with_to(agent.clone().into()))
            .await;
    }

    fn status(&self, job: &JobRecord) -> JobStatus {
        let outcome = match &job.outcome {
            Some(Recorded::Succeeded {
                meta,
                output,
                mime,
                elapsed_ms,
            }) => Some(Outcome::Result(JobResult {
                job: job.id.clone(),
                attempt: job.attempts.max(1),
                elapsed_ms: *elapsed_ms,
                meta: meta.clone().into(),
                // Outputs over the inline limit would break stanza limits: `send_status` sends
                // them in chunks ahead of the status, which then references them.
                output: (!output.is_empty() && output.len() <= INLINE_LIMIT).then(|| {
                    Data::Inline {
                        mime: mime.clone(),
                        bytes: output.clone(),
                    }
                }),
            })),
            Some(Recorded::Failure {
                condition,
                message,
                field,
            }) => Some(Outcome::Failure(Failure {
                condition: condition.parse().unwrap_or(Condition::Failed),
                message: message.clone(),
                field: field.clone(),
            })),
            None => None,
        };
        JobStatus {
            job: job.id.clone(),
            capability: job.spec.capability.clone(),
            state: job.state,
            attempts: job.attempts,
            agent: job.agent.as_deref().and_then(|a| Jid::new(a).ok()),
            percent: job.percent,
            outcome,
        }
    }

    /// Tells watchers that `job` ended; when it was the last child of an `all` job, records and
    /// announces the parent's gathered outcome too; when it was a step of a map/reduce job,
    /// moves that job on.
    async fn notify_final(&mut self, job: &JobId) {
        self.notify_one(job).await;
        let Some(parent) = self.jobs.get(job).and_then(|j| j.spec.parent.clone()) else {
            return;
        };
        if self.jobs.get(&parent).is_some_and(|p| p.mr.is_some()) {
            let adv = self.jobs.advance(&parent, now_ms());
            if let Err(e) = self.apply_advance(&parent, adv).await {
                error!(job = %parent, "cannot store the map/reduce job's progress: {e}");
            }
            return;
        }
        if self.jobs.gather(&parent, now_ms()) {
            if let Err(e) = self.persist(&parent) {
                error!(job = %parent, "cannot store the gathered outcome: {e}");
            }
            info!(job = %parent, "all agents answered: job ended");
            self.notify_one(&parent).await;
        }
    }

    async fn notify_one(&mut self, job: &JobId) {
        self.audit_record(job);
        let Some(rec) = self.jobs.get(job) else {
            return;
        };
        // Event streams (HTTP SSE) get the whole job, after the commit; no receiver is fine.
        self.publish(JobEvent {
            job: job.clone(),
            kind: "final",
            data: job_json(rec),
        });
        let Some(rec) = self.jobs.get(job) else {
            return;
        };
        let Some(watch) = rec.spec.watch.as_deref().and_then(|w| Jid::new(w).ok()) else {
            return;
        };
        // A watch message is never refused (it waits its turn behind other transfers).
        if let Err(e) = self.send_status(watch, Via::Message, job).await {
            warn!(job = %job, "final status not sent: {e}");
        }
    }

    /// Sends `job`'s `<job-status>` to an XMPP submitter, `via` a reply to its `<status>` or a
    /// watch message: at once, or, when the output is over the inline limit, after the output
    /// in chunks (PROTOCOL.md §11.3; crate::deliver), the status then referencing that blob,
    /// or saying the output was left out if the submitter did not take it. `Err`: a reply
    /// refused because too many outputs are already on their way to `to`.
    async fn send_status(&mut self, to: Jid, via: Via, job: &JobId) -> Result<(), SpineError> {
        let Some(rec) = self.jobs.get(job) else {
            return Ok(());
        };
        let status = self.status(rec);
        let large = match &rec.outcome {
            Some(Recorded::Succeeded { output, mime, .. }) if output.len() > INLINE_LIMIT => {
                let sha256 = self.deliveries.digest(job, output);
                Some((output.len() as u64, sha256, mime.clone()))
            }
            _ => None,
        };
        let Some((size, sha256, mime)) = large else {
            self.send(Out::Status {
                to,
                via,
                status: Box::new(status),
            })
            .await;
            return Ok(());
        };
        let req = crate::deliver::Request {
            to,
            via,
            status,
            job: job.clone(),
            size,
            sha256,
            mime,
        };
        self.deliveries.offer(req, Instant::now())?;
        self.pump_deliveries().await;
        Ok(())
    }

    /// Sends what the transfers of large outputs to submitters have ready: chunks, and the
    /// statuses of the transfers that ended.
    async fn pump_deliveries(&mut self) {
        let jobs = &self.jobs;
        let held = |job: &JobId| match jobs.get(job).and_then(|j| j.outcome.as_ref()) {
            Some(Recorded::Succeeded { output, .. }) => Some(output.as_slice()),
            _ => None,
        };
        for out in self.deliveries.poll(held, Instant::now()) {
            self.send(out).await;
        }
    }

    /// What `from` may do as a submitter (`submitters` and `[[submitter]]`).
    fn grant(&self, from: &Jid) -> Option<crate::policy::Grant> {
        self.policy.submitter(&from.to_bare())
    }

    fn may_submit(&self, from: &Jid) -> bool {
        self.grant(from).is_some()
    }

    /// Whether `from` may read or cancel `job`: its own, or any with `all_jobs`. An unknown
    /// job passes (the request then gets `unknown-job`).
    fn may_see(&self, grant: &crate::policy::Grant, from: &Jid, job: &JobId) -> bool {
        self.jobs
            .get(job)
            .is_none_or(|j| grant.may_see(from.to_bare().as_str(), &j.spec.submitter))
    }

    async fn on_set(
        &mut self,
        from: Jid,
        id: String,
        payload: minidom::Element,
    ) -> Result<(), DispatcherError> {
        if !payload.ns().starts_with(spine_protocol::NS_PREFIX) {
            let e = StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "not supported by this dispatcher",
            );
            self.send(Iq::from_error(id, e).with_to(from)).await;
            return Ok(());
        }
        let parsed = spine_protocol::parse_payload(payload);
        // Chunks come from agents (their outputs); everything else from submitters.
        if let Ok(Payload::Chunk(c)) = &parsed {
            let known = from
                .clone()
                .try_into_full()
                .ok()
                .and_then(|f| self.registry.id_of(&f))
                .is_some()
                || self.may_submit(&from);
            let reply = if known {
                self.blobs
                    .put(from.to_bare().as_str(), c.clone(), Instant::now())
                    .map(|()| Iq::empty_result(from.clone(), id.clone()))
            } else {
                Err(SpineError::new(Condition::NotAuthorized)
                    .with_text("only registered agents and allowed submitters send chunks"))
            };
            match reply {
                Ok(iq) => {
                    self.send(iq).await;
                }
                Err(e) => self.reply_error(from, id, e).await,
            }
            return Ok(());
        }
        let Some(grant) = self.grant(&from) else {
            warn!(from = %from, "refused XMPP API request from a JID not in `submitters` or [[submitter]]");
            self.reply_error(
                from,
                id,
                SpineError::new(Condition::NotAuthorized)
                    .with_text("this JID may not submit to this dispatcher"),
            )
            .await;
            return Ok(());
        };
        match parsed {
            Ok(Payload::Submit(s)) => {
                let steps = std::iter::once(&s.capability).chain(
                    s.mapreduce
                        .iter()
                        .flat_map(|m| std::iter::once(&m.reduce).chain(m.split.as_ref())),
                );
                let refused = steps.into_iter().find(|c| !grant.capabilities.allows(c));
                match refused {
                    Some(c) => {
                        warn!(from = %from, capability = %c, "refused a submission of a capability this submitter may not run");
                        let e = SpineError::new(Condition::NotAuthorized)
                            .with_text(format!("this JID may not run {c}"));
                        self.reply_error(from, id, e).await;
                    }
                    None => self.on_submit(from, id, s).await?,
                }
            }
            Ok(Payload::Cancel(c)) if !self.may_see(&grant, &from, &c.job) => {
                self.reply_error(from, id, not_yours(&c.job)).await
            }
            Ok(Payload::Cancel(c)) => match self.cancel_job(&c.job).await? {
                Ok(_) => {
                    self.send(Iq::empty_result(from, id)).await;
                }
                Err(e) => self.reply_error(from, id, e).await,
            },
            Ok(_) => {
                self.reply_error(
                    from,
                    id,
                    SpineError::new(Condition::Malformed)
                        .with_text("a dispatcher takes <submit/>, <cancel/> and <chunk/> requests"),
                )
                .await
            }
            Err(e) => self.reply_error(from, id, e.to_spine_error()).await,
        }
        Ok(())
    }

    /// Cancels a job for any front end: the agent running it is told; the job's final state is
    /// returned (a job already final stays as it was).
    async fn cancel_job(
        &mut self,
        job: &JobId,
    ) -> Result<Result<JobState, SpineError>, DispatcherError> {
        // Cancelling an `all` job cancels its children first (their agents are told).
        let children = self
            .jobs
            .get(job)
            .map(|j| j.children.clone())
            .unwrap_or_default();
        for c in children {
            self.cancel_step(&c, "cancelled by the submitter", now_ms())
                .await;
            self.persist(&c)?;
        }
        let was_final = self.jobs.get(job).is_some_and(|j| j.state.is_final());
        match self.jobs.cancel(job, now_ms()) {
            Ok(agent) => {
                self.persist(job)?;
                if let Some(a) = agent.and_then(|a| a.parse::<FullJid>().ok()) {
                    if let Some(aid) = self.registry.id_of(&a) {
                        self.registry.on_finished(aid, job, &mut self.rng);
                    }
                    self.forget_requests(job);
                    self.send_cancel(&a, job).await;
                }
                let state = self.jobs.get(job).map_or(JobState::Cancelled, |j| j.state);
                if state == JobState::Cancelled && !was_final {
                    info!(job = %job, "job cancelled");
                    self.notify_final(job).await;
                }
                Ok(Ok(state))
            }
            Err(e) => Ok(Err(
                SpineError::new(Condition::UnknownJob).with_text(e.to_string())
            )),
        }
    }

    /// Serves a request of the HTTP API.
    async fn on_command(&mut self, cmd: Command) -> Result<(), DispatcherError> {
        // A dropped reply channel means the HTTP client went away: nothing to do.
        match cmd {
            Command::Submit {
                spec,
                wait_for_agent,
                visible,
                reply,
            } => {
                let r = self.accept(*spec, wait_for_agent, &visible).await?;
                self.replies.push(Box::new(move || {
                    let _ = reply.send(r);
                }));
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.jobs.get(&id).cloned());
            }
            Command::Cancel { id, reply } => {
                let r = self.cancel_job(&id).await?;
                self.replies.push(Box::new(move || {
                    let _ = reply.send(r);
                }));
            }
            Command::Agents {
                capability,
                filter,
                sort,
                limit,
                reply,
            } => {
                let _ = reply.send(self.registry.rank(
                    &capability,
                    filter.as_ref(),
                    sort.as_ref(),
                    limit,
                ));
            }
            Command::Capabilities { reply } => {
                let mut caps: std::collections::BTreeMap<
                    spine_protocol::CapabilityName,
                    (usize, usize),
                > = self
                    .registry
                    .capabilities()
                    .into_iter()
                    .map(|(c, n)| (c, (n, 0)))
                    .collect();
                for c in self.jobs.queued_capabilities() {
                    caps.entry(c.clone()).or_default().1 = self.jobs.queued(&c);
                }
                let _ = reply.send(caps.into_iter().map(|(c, (a, q))| (c, a, q)).collect());
            }
            Command::List {
                state,
                submitter,
                limit,
                reply,
            } => {
                // A page from the table's ordered indexes: only the listed jobs are copied.
                let list: Vec<JobRecord> = self
                    .jobs
                    .page(state, submitter.as_deref(), None, limit)
                    .into_iter()
                    .cloned()
                    .collect();
                let _ = reply.send(list);
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.metrics());
            }
        }
        Ok(())
    }

    /// Prometheus text exposition.
    fn metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        out.push_str("# HELP spine_jobs Jobs known to this dispatcher, by capability and state.\n# TYPE spine_jobs gauge\n");
        let mut counts: Vec<_> = self.jobs.counts().into_iter().collect();
        counts.sort_by(|a, b| {
            (a.0 .0.as_str(), a.0 .1.as_str()).cmp(&(b.0 .0.as_str(), b.0 .1.as_str()))
        });
        for ((cap, state), n) in counts {
            let _ = writeln!(
                out,
                "spine_jobs{{capability=\"{cap}\",state=\"{state}\"}} {n}"
            );
        }
        out.push_str("# HELP spine_queue_depth Jobs waiting for an agent, by capability.\n# TYPE spine_queue_depth gauge\n");
        for c in self.jobs.queued_capabilities() {
            let _ = writeln!(
                out,
                "spine_queue_depth{{capability=\"{c}\"}} {}",
                self.jobs.queued(&c)
            );
        }
        out.push_str("# HELP spine_agents Registered agents.\n# TYPE spine_agents gauge\n");
        let _ = writeln!(out, "spine_agents {}", self.registry.len());
        out.push_str("# HELP spine_dispatch_latency_seconds Time from acceptance to first dispatch.\n# TYPE spine_dispatch_latency_seconds histogram\n");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "spine_dispatch_latency_seconds_bucket{{le=\"{b}\"}} {}",
                self.latency.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "spine_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            self.latency.n
        );
        let _ = writeln!(
            out,
            "spine_dispatch_latency_seconds_sum {}",
            self.latency.sum_s
        );
        let _ = writeln!(
            out,
            "spine_dispatch_latency_seconds_count {}",
            self.latency.n
        );
        out
    }

    /// Accepts a job from any front end (XMPP or HTTP): idempotency, known capabilities (unless
    /// `wait_for_agent`; `visible`: the capabilities the submitter may run, which the refusal
    /// may list), queue bound, written to the store before it is acknowledged. `Ok(Err(..))`:
    /// refused, with the reason.
    pub(crate) async fn accept(
        &mut self,
        spec: JobSpec,
        wait_for_agent: bool,
        visible: &crate::policy::Capabilities,
    ) -> Result<Result<(JobId, JobState), SpineError>, DispatcherError> {
        if let Some(key) = &spec.idempotency_key {
            let fresh = self
                .fresh_keys
                .get(&(spec.submitter.clone(), key.clone()))
                .cloned();
            if let Some(existing) = fresh.map_or_else(
                || self.store.idempotent(&spec.submitter, key),
                |id| Ok(Some(id)),
            )? {
                let state = self
                    .jobs
                    .get(&existing)
                    .map_or(JobState::Accepted, |j| j.state);
                return Ok(Ok((existing, state)));
            }
        }
        if let Err(e) = spec.check_input() {
            return Ok(Err(e));
        }
        if let Err(e) = spec.check_args(self.cfg.max_args.as_u64()) {
            return Ok(Err(e));
        }
        let limits = self.policy.limits(&spec.submitter);
        if let Err(e) = spec.check_limits(&limits) {
            return Ok(Err(e));
        }
        if !wait_for_agent {
            // A capability never offered is refused now rather than after `no_agent_wait`.
            let steps =
                crate::registry::submission_steps(&spec.capability, spec.mapreduce.as_ref());
            let hint = if spec.submitter.starts_with("http:") {
                "\"wait_for_agent\": true"
            } else {
                "wait-for-agent='true'"
            };
            if let Err(e) = self
                .registry
                .check_known(&steps, |c| visible.allows(c), hint)
            {
                return Ok(Err(e));
            }
        }
        let job_id: JobId = new_job_id();
        let rec = match self
            .jobs
            .submit_within(job_id.clone(), spec, now_ms(), limits.max_queued)
        {
            Ok(r) => r.clone(),
            Err(
                e @ (crate::jobs::SubmitError::QueueFull { .. }
                | crate::jobs::SubmitError::SubmitterQuota { .. }),
            ) => {
                return Ok(Err(
                    SpineError::new(Condition::QueueFull).with_text(e.to_string())
                ))
            }
            Err(e) => {
                return Ok(Err(
                    SpineError::new(Condition::Malformed).with_text(e.to_string())
                ))
            }
        };
        // Stored before it is acknowledged (the acknowledgement waits for the commit): an
        // accepted job survives a crash.
        self.dirty.insert(job_id.clone());
        if let Some(key) = &rec.spec.idempotency_key {
            self.fresh_keys
                .insert((rec.spec.submitter.clone(), key.clone()), job_id.clone());
        }
        info!(job = %job_id, capability = %rec.spec.capability, submitter = %rec.spec.submitter, "job accepted");
        self.place().await?;
        let state = self.jobs.get(&job_id).map_or(rec.state, |j| j.state);
        Ok(Ok((job_id, state)))
    }

    async fn on_submit(&mut self, from: Jid, id: String, s: Submit) -> Result<(), DispatcherError> {
        let input = match s.input {
            None => (Vec::new(), None),
            Some(Data::Inline { bytes, mime }) => (bytes, mime),
            // A large input the submitter sent in chunks beforehand.
            Some(Data::Blob(r)) => match self.blobs.take(from.to_bare().as_str(), &r) {
                Ok(bytes) => (bytes, r.mime.clone()),
                Err(e) => {
                    self.reply_error(from, id, e).await;
                    return Ok(());
                }
            },
        };
        let spec = JobSpec {
            capability: s.capability,
            strategy: s.strategy,
            filter: s.filter.map(|f| f.to_string()),
            sort: s.sort,
            affinity_key: s.affinity_key,
            args: s.args.0,
            input: input.0,
            input_mime: input.1,
            deadline_ms: s.deadline_ms.map(|d| now_ms() + d),
            priority: s.priority,
            max_attempts: s.max_attempts.unwrap_or(self.cfg.max_attempts),
            submitter: from.to_bare().to_string(),
            idempotency_key: s.idempotency_key,
            progress: s.watch,
            watch: s.watch.then(|| from.to_string()),
            limit: s.limit,
            batch: s.batch,
            mapreduce: s.mapreduce,
            target: None,
            parent: None,
        };
        let visible = self
            .grant(&from)
            .map(|g| g.capabilities)
            .unwrap_or_default();
        match self.accept(spec, s.wait_for_agent, &visible).await? {
            Ok((job, state)) => {
                self.send(Iq::from_result(id, Some(Accepted { job, state })).with_to(from))
                    .await;
            }
            Err(e) => self.reply_error(from, id, e).await,
        }
        Ok(())
    }

    async fn on_get(&mut self, from: Jid, id: String, payload: minidom::Element) {
        if !payload.ns().starts_with(spine_protocol::NS_PREFIX) {
            let e = StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "not supported by this dispatcher",
            );
            self.send(Iq::from_error(id, e).with_to(from)).await;
            return;
        }
        let Some(grant) = self.grant(&from) else {
            self.reply_error(
                from,
                id,
                SpineError::new(Condition::NotAuthorized)
                    .with_text("this JID may not query this dispatcher"),
            )
            .await;
            return;
        };
        match spine_protocol::parse_payload(payload) {
            Ok(Payload::Status(Status { job })) if !self.may_see(&grant, &from, &job) => {
                self.reply_error(from, id, not_yours(&job)).await
            }
            Ok(Payload::Discover(Discover { capability, .. }))
                if !grant.capabilities.allows(&capability) =>
            {
                let e = SpineError::new(Condition::NotAuthorized)
                    .with_text(format!("this JID may not run {capability}"));
                self.reply_error(from, id, e).await
            }
            Ok(Payload::Status(Status { job })) => match self.jobs.get(&job) {
                Some(_) => {
                    if let Err(e) = self
                        .send_status(from.clone(), Via::Reply(id.clone()), &job)
                        .await
                    {
                        self.reply_error(from, id, e).await;
                    }
                }
                None => {
                    self.reply_error(
                        from,
                        id,
                        SpineError::new(Condition::UnknownJob).with_text(format!("no job {job}")),
                    )
                    .await
                }
            },
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
                    .await;
            }
            Ok(_) => {
                self.reply_error(
                    from,
                    id,
                    SpineError::new(Condition::Malformed)
                        .with_text("a dispatcher answers <status/> and <discover/>"),
                )
                .await
            }
            Err(e) => self.reply_error(from, id, e.to_spine_error()).await,
        }
    }

    async fn on_message(&mut self, m: Message) {
        let Some(from) = m.from.clone() else { return };
        // Reports count only from the agent running the job.
        let from_text = from.to_string();
        let runs_on = |jobs: &JobTable, job: &JobId| {
            jobs.get(job)
                .is_some_and(|j| j.agent.as_deref() == Some(from_text.as_str()))
        };
        for p in &m.payloads {
            if p.is("progress", spine_protocol::NS) {
                if let Ok(pr) = Progress::try_from(p.clone())
                    .map_err(|_| ())
                    .and_then(|pr| {
                        if runs_on(&self.jobs, &pr.job) {
                            Ok(pr)
                        } else {
                            Err(())
                        }
                    })
                {
                    self.jobs.progress(&pr.job, pr.percent, now_ms());
                    self.forward(&pr.job, p.clone()).await;
                }
            } else if p.is("partial", spine_protocol::NS) {
                if let Ok(part) = spine_protocol::Partial::try_from(p.clone())
                    .map_err(|_| ())
                    .and_then(|pt| {
                        if runs_on(&self.jobs, &pt.job) {
                            Ok(pt)
                        } else {
                            Err(())
                        }
                    })
                {
                    self.jobs.progress(&part.job, None, now_ms());
                    self.forward(&part.job, p.clone()).await;
                }
            }
        }
        debug!(from = %from, "message handled");
    }

    /// Forwards a progress or partial message to the job's XMPP watcher.
    async fn forward(&mut self, job: &JobId, payload: minidom::Element) {
        let kind = if payload.name() == "progress" {
            "progress"
        } else {
            "partial"
        };
        let data = match kind {
            "progress" => Progress::try_from(payload.clone())
                .map(|p| serde_json::json!({ "percent": p.percent, "message": p.message }))
                .unwrap_or_default(),
            _ => spine_protocol::Partial::try_from(payload.clone())
                .map(|p| {
                    use base64::Engine as _;
                    serde_json::json!({ "seq": p.seq, "type": p.mime, "data": base64::engine::general_purpose::STANDARD.encode(&p.bytes) })
                })
                .unwrap_or_default(),
        };
        self.publish(JobEvent {
            job: job.clone(),
            kind,
            data,
        });
        let Some(watch) = self
            .jobs
            .get(job)
            .and_then(|j| j.spec.watch.as_deref())
            .and_then(|w| Jid::new(w).ok())
        else {
            return;
        };
        let mut m = Message::new(Some(watch));
        m.type_ = MessageType::Headline;
        m.payloads.push(payload);
        self.send(m).await;
    }
}

/// A new globally unique job id: 128 random bits, time-ordered prefix (UUIDv7 layout without
/// the dependency: 48 bits of milliseconds, then randomness).
fn new_job_id() -> JobId {
    use rand::Rng as _;
    let ms = now_ms() & 0xFFFF_FFFF_FFFF;
    let r: u128 = rand::rng().random();
    let v = (u128::from(ms) << 80) | (r & ((1u128 << 80) - 1));
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
    .parse()
    .expect("hex id is a valid job id")
}

/// The size of a job IQ's payload as serialised (what counts against a server's stanza limit,
/// less the few bytes of the `<iq>` around it).
fn stanza_bytes(job: &Job) -> usize {
    let size = crate::jobs::serialized_size(&minidom::Element::from(job.clone()));
    usize::try_from(size).unwrap_or(usize::MAX)
}

/// The refusal of a request about another submitter's job.
fn not_yours(job: &JobId) -> SpineError {
    SpineError::new(Condition::NotAuthorized)
        .with_text(format!("job {job} was submitted by someone else"))
}

/// A JID for a log line: its text, or "(none)" (never the Debug form `Some(Jid("…"))`).
fn show_jid(j: Option<&Jid>) -> String {
    j.map_or_else(|| "(none)".to_owned(), ToString::to_string)
}
