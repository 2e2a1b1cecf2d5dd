//! The agent's connection task: the one owner of the XMPP connection.
//!
//! A `select!` loop over: stanzas from the server, outcomes from job tasks, progress reports
//! from handlers, the load debounce and heartbeat timers, reconnect status, and shutdown.
//! Jobs run in tasks of their own (the handler in an inner task so that a panic or an abort
//! cannot take the agent down); they hold semaphore permits for their slots.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jid::{BareJid, Jid};
use rand::Rng as _;
use sha2::{Digest, Sha256};
use spine_protocol::{
    Advertise, AgentState, BlobId, BlobRef, Cancel, CapLoad, Chunk, Condition, Data, Job, JobId,
    JobResult, Load, Partial, Progress, ProtocolVersion, SpineError, INLINE_LIMIT,
};
use spine_xmpp::stanzastream::{Event, StreamEvent};
use spine_xmpp::{Connection, Status};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::Stanza;
use tracing::{debug, error, info, warn};
use xmpp_parsers::disco::DiscoInfoQuery;
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};

use crate::error::AgentError;
use crate::handler::{JobContext, JobError, Report};
use crate::store::{Outcome, OutcomeCache};
use crate::Agent;
use spine_protocol::blob::BlobStore;

/// Unacknowledged chunks in flight per blob upload (PROTOCOL.md §13).
const CHUNK_WINDOW: usize = 8;
/// How long an incomplete incoming blob is kept after its last chunk.
const BLOB_IDLE_TTL: Duration = Duration::from_secs(300);
/// Consecutive reconnects refused for credentials before the agent gives up.
const MAX_AUTH_REFUSALS: u32 = 3;

/// A job task's end.
struct Done {
    id: JobId,
    attempt: u64,
    result: Result<crate::handler::Output, SpineError>,
    elapsed: Duration,
}

/// A job that is running.
struct Running {
    capability: spine_protocol::CapabilityName,
    from_bare: BareJid,
    /// Full JID to send progress to.
    reply_to: Jid,
    /// IQs waiting for the outcome (the first request and any duplicates).
    waiters: Vec<(Jid, String)>,
    cancel: CancellationToken,
    progress: bool,
    attempt: u64,
    /// Sequence number of the next partial result of this attempt.
    next_partial: u64,
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Taking jobs.
    Serving,
    /// Shutdown asked: no new jobs; running ones may finish until then.
    Draining(Instant),
    /// Grace over: running jobs were stopped; their outcomes may arrive until then.
    Stopping(Instant),
}

/// An output being uploaded in chunks before its result can be sent.
struct Upload {
    to: Jid,
    pending: std::collections::VecDeque<Chunk>,
    in_flight: usize,
    job: JobId,
    result: JobResult,
    waiters: Vec<(Jid, String)>,
}

struct Runtime {
    agent: Agent,
    conn: Connection,
    dispatchers: Vec<BareJid>,
    instance: String,
    gen: u64,
    seq: u64,
    total: Arc<Semaphore>,
    per_cap: HashMap<spine_protocol::CapabilityName, Arc<Semaphore>>,
    running: HashMap<JobId, Running>,
    cache: OutcomeCache,
    blobs: BlobStore,
    uploads: HashMap<u64, Upload>,
    chunk_iqs: HashMap<String, u64>,
    next_id: u64,
    draining: bool,
    stop: CancellationToken,
    done_tx: mpsc::UnboundedSender<Done>,
    report_tx: mpsc::UnboundedSender<(JobId, u64, Report)>,
    load_dirty: bool,
    last_load: Instant,
    /// Start notifications to send once the job is registered.
    pending_reports: Vec<(Jid, Progress)>,
}

fn iq_error(id: String, to: Jid, e: SpineError) -> Iq {
    Iq::from_error(id, StanzaError::from(e)).with_to(to)
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

pub(crate) async fn run(
    agent: Agent,
    shutdown: impl Future<Output = impl Sized> + Send,
) -> Result<(), AgentError> {
    let resolved = agent.config.resolve()?;
    let opts = resolved.options.clone();
    let server = opts.addr;
    let mut conn = spine_xmpp::connect(opts).await?;
    let mut status_rx = conn
        .take_status()
        .ok_or_else(|| AgentError::Reconnect("connection status already taken".into()))?;
    info!(jid = %conn.jid(), server = %server, capabilities = agent.caps.len(), "agent connected");
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    let per_cap = agent
        .caps
        .values()
        .filter_map(|c| {
            c.ad.slots
                .map(|s| (c.ad.name.clone(), Arc::new(Semaphore::new(s as usize))))
        })
        .collect();
    let cfg = &agent.config;
    let mut rt = Runtime {
        total: Arc::new(Semaphore::new(cfg.slots as usize)),
        per_cap,
        cache: OutcomeCache::new(cfg.result_cache, cfg.result_ttl),
        blobs: BlobStore::new(cfg.max_input_size.as_u64(), BLOB_IDLE_TTL),
        dispatchers: resolved.dispatchers,
        instance: format!("{:016x}", rand::rng().random::<u64>()),
        gen: 1,
        seq: 0,
        running: HashMap::new(),
        uploads: HashMap::new(),
        chunk_iqs: HashMap::new(),
        next_id: 0,
        draining: false,
        stop: CancellationToken::new(),
        done_tx,
        report_tx,
        load_dirty: false,
        last_load: Instant::now(),
        pending_reports: Vec::new(),
        conn,
        agent,
    };
    rt.on_session_start().await;

    let heartbeat = rt.agent.config.heartbeat;
    let debounce = rt.agent.config.load_debounce;
    // After every (re)connect the heartbeat starts at 0.5 s and doubles up to `heartbeat`: a
    // dispatcher that came online after us (and so missed our advertisement) hears a load
    // report within a second, answers with a hello, and we advertise.
    let first_beat = Duration::from_millis(500).min(heartbeat);
    let mut beat_step = first_beat;
    let mut next_beat = Instant::now() + beat_step;
    tokio::pin!(shutdown);
    let mut phase = Phase::Serving;
    let mut auth_refusals = 0u32;
    loop {
        let debounce_at = rt.last_load + debounce;
        let phase_deadline = match phase {
            Phase::Serving => None,
            Phase::Draining(t) | Phase::Stopping(t) => Some(t),
        };
        tokio::select! {
            // Every branch is cancellation-safe: `Connection::next`, `recv` and timers keep
            // their state outside the future that lost the race.
            _ = &mut shutdown, if phase == Phase::Serving => {
                info!(running = rt.running.len(), grace = ?rt.agent.config.drain_grace, "draining: no new jobs");
                rt.draining = true;
                phase = Phase::Draining(Instant::now() + rt.agent.config.drain_grace);
                rt.send_load().await;
            }
            _ = tokio::time::sleep_until(phase_deadline.unwrap_or_else(Instant::now)), if phase_deadline.is_some() => {
                match phase {
                    Phase::Draining(_) => {
                        warn!(running = rt.running.len(), "drain grace over: stopping running jobs");
                        rt.stop.cancel();
                        phase = Phase::Stopping(Instant::now() + Duration::from_secs(5));
                    }
                    _ => {
                        warn!(running = rt.running.len(), "jobs did not stop in time; leaving without their outcomes");
                        break;
                    }
                }
            }
            ev = rt.conn.next() => match ev {
                Some(Event::Stanza(st)) => rt.on_stanza(st).await,
                Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => {
                    info!(jid = %bound_jid, "session re-established: advertising again");
                    auth_refusals = 0;
                    rt.on_session_start().await;
                    beat_step = first_beat;
                    next_beat = Instant::now() + beat_step;
                }
                Some(Event::Stream(other)) => debug!("stream event {other:?}"),
                None => {
                    error!("connection worker ended");
                    return Err(AgentError::Reconnect("the connection closed for good".into()));
                }
            },
            Some(status) = status_rx.recv() => {
                let Status::ReconnectFailed { error, auth, .. } = status;
                if auth {
                    auth_refusals += 1;
                    error!("server refuses the agent's credentials ({auth_refusals}/{MAX_AUTH_REFUSALS}): {error}");
                    if auth_refusals >= MAX_AUTH_REFUSALS {
                        return Err(AgentError::Reconnect(error));
                    }
                }
            }
            Some(done) = done_rx.recv() => rt.on_done(done).await,
            Some((id, attempt, report)) = report_rx.recv() => rt.on_report(id, attempt, report).await,
            _ = tokio::time::sleep_until(debounce_at), if rt.load_dirty => rt.send_load().await,
            _ = tokio::time::sleep_until(next_beat) => {
                rt.send_load().await;
                beat_step = (beat_step * 2).min(heartbeat);
                next_beat = Instant::now() + beat_step;
            }
        }
        if phase != Phase::Serving && rt.running.is_empty() && rt.uploads.is_empty() {
            break;
        }
    }
    info!("agent stopping: going unavailable");
    rt.conn.send(Presence::new(PresenceType::Unavailable)).await;
    rt.conn.close().await;
    Ok(())
}

impl Runtime {
    fn new_iq_id(&mut self) -> String {
        self.next_id += 1;
        format!("a{}", self.next_id)
    }

    fn is_dispatcher(&self, from: &Jid) -> bool {
        self.dispatchers.iter().any(|d| *d == from.to_bare())
    }

    fn advertise(&self) -> Advertise {
        Advertise {
            protocol: ProtocolVersion::CURRENT,
            instance: self.instance.clone(),
            gen: self.gen,
            slots: self.agent.config.slots,
            heartbeat_ms: self.agent.config.heartbeat.as_millis() as u64,
            attrs: self.agent.attrs.clone(),
            capabilities: self.agent.caps.values().map(|c| c.ad.clone()).collect(),
        }
    }

    fn load_for(&mut self, dispatcher: &BareJid) -> Load {
        self.seq += 1;
        let caps = self
            .agent
            .caps
            .values()
            .filter(|c| c.ad.slots.is_some())
            .map(|c| CapLoad {
                name: c.ad.name.clone(),
                in_flight: self
                    .running
                    .values()
                    .filter(|r| r.capability == c.ad.name)
                    .count() as u64,
            })
            .collect();
        let mem = crate::sysload::memory();
        Load {
            seq: self.seq,
            gen: self.gen,
            state: if self.draining {
                AgentState::Draining
            } else {
                AgentState::Ready
            },
            in_flight: self.running.len() as u64,
            yours: self
                .running
                .values()
                .filter(|r| &r.from_bare == dispatcher)
                .count() as u64,
            slots: self.agent.config.slots,
            queue: 0,
            loadavg: crate::sysload::loadavg(),
            mem_used: mem.map(|m| m.0),
            mem_total: mem.map(|m| m.1),
            caps,
        }
    }

    /// Initial presence, then the advertisement to every configured dispatcher.
    async fn on_session_start(&mut self) {
        self.conn.send(Presence::available()).await;
        for d in self.dispatchers.clone() {
            self.send_advertisement(Jid::from(d)).await;
        }
    }

    async fn send_advertisement(&mut self, to: Jid) {
        let load = self.load_for(&to.to_bare());
        let p = Presence::available()
            .with_to(to)
            .with_payload(self.advertise())
            .with_payload(load);
        self.conn.send(p).await;
        self.last_load = Instant::now();
        self.load_dirty = false;
    }

    async fn send_load(&mut self) {
        for d in self.dispatchers.clone() {
            let load = self.load_for(&d);
            self.conn
                .send(
                    Presence::available()
                        .with_to(Jid::from(d))
                        .with_payload(load),
                )
                .await;
        }
        self.last_load = Instant::now();
        self.load_dirty = false;
    }

    async fn on_stanza(&mut self, st: Stanza) {
        match st {
            Stanza::Iq(Iq::Set {
                from: Some(from),
                id,
                payload,
                ..
            }) => self.on_set(from, id, payload).await,
            Stanza::Iq(Iq::Get {
                from: Some(from),
                id,
                payload,
                ..
            }) => {
                let reply = if payload.is("query", xmpp_parsers::ns::DISCO_INFO)
                    && DiscoInfoQuery::try_from(payload.clone()).is_ok_and(|q| q.node.is_none())
                {
                    Iq::from_result(
                        id,
                        Some(spine_protocol::disco::agent_disco_info(
                            self.agent.caps.keys(),
                        )),
                    )
                } else {
                    Iq::from_error(
                        id,
                        StanzaError::new(
                            ErrorType::Cancel,
                            DefinedCondition::ServiceUnavailable,
                            "en",
                            "not supported by this agent",
                        ),
                    )
                };
                self.conn.send(reply.with_to(from)).await;
            }
            Stanza::Iq(Iq::Result { id, .. }) => self.on_chunk_ack(&id, None).await,
            Stanza::Iq(Iq::Error { id, error, .. }) => self.on_chunk_ack(&id, Some(error)).await,
            Stanza::Presence(p) => {
                let Some(from) = p.from.clone() else { return };
                if !self.is_dispatcher(&from) {
                    return;
                }
                if p.type_ == PresenceType::Unavailable {
                    debug!(dispatcher = %from, "dispatcher went unavailable");
                    return;
                }
                match spine_protocol::presence_payloads(&p.payloads) {
                    Ok(found) if found.hello.is_some() => {
                        debug!(dispatcher = %from, "hello: advertising");
                        self.send_advertisement(from).await;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(dispatcher = %from, "ignoring presence: {e}"),
                }
            }
            _ => {}
        }
    }

    async fn on_set(&mut self, from: Jid, id: String, payload: minidom::Element) {
        if !payload.ns().starts_with(spine_protocol::NS_PREFIX) {
            let e = StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "not supported by this agent",
            );
            self.conn.send(Iq::from_error(id, e).with_to(from)).await;
            return;
        }
        if !self.is_dispatcher(&from) {
            warn!(from = %from, "refused request from a JID that is not a configured dispatcher");
            let e = SpineError::new(Condition::NotAuthorized)
                .with_text("only configured dispatchers may send jobs to this agent");
            self.conn.send(iq_error(id, from, e)).await;
            return;
        }
        let reply = match spine_protocol::parse_payload(payload) {
            Ok(spine_protocol::Payload::Job(job)) => return self.on_job(from, id, job).await,
            Ok(spine_protocol::Payload::Cancel(c)) => self.on_cancel(c),
            Ok(spine_protocol::Payload::Chunk(c)) => {
                self.blobs
                    .put(from.to_bare().as_str(), c, Instant::now().into_std())
            }
            Ok(_) => Err(SpineError::new(Condition::Malformed)
                .with_text("an agent takes only <job/>, <cancel/> and <chunk/> requests")),
            Err(e) => Err(e.to_spine_error()),
        };
        let iq = match reply {
            Ok(()) => Iq::empty_result(from, id),
            Err(e) => iq_error(id, from, e),
        };
        self.conn.send(iq).await;
    }

    fn on_cancel(&mut self, c: Cancel) -> Result<(), SpineError> {
        if let Some(r) = self.running.get(&c.job) {
            info!(job = %c.job, "cancel requested");
            r.cancel.cancel();
            return Ok(());
        }
        if self.cache.get(&c.job, Instant::now()).is_some() {
            return Ok(()); // already finished: cancel is a no-op
        }
        Err(SpineError::new(Condition::UnknownJob).with_text(format!("no job {} here", c.job)))
    }

    async fn on_job(&mut self, from: Jid, iq_id: String, job: Job) {
        let now = Instant::now();
        if let Some(outcome) = self.cache.get(&job.id, now).cloned() {
            debug!(job = %job.id, "duplicate of a finished job: resending its outcome");
            self.reply(&from, iq_id, &outcome).await;
            return;
        }
        if let Some(r) = self.running.get_mut(&job.id) {
            debug!(job = %job.id, "duplicate of a running job: attached");
            r.waiters.push((from, iq_id));
            return;
        }
        let result = self.start_job(&from, &job, now);
        match result {
            Ok(()) => {
                if let Some(r) = self.running.get_mut(&job.id) {
                    r.waiters.push((from, iq_id));
                }
                self.mark_load_dirty().await;
            }
            Err(e) => {
                debug!(job = %job.id, "refused: {e}");
                self.conn.send(iq_error(iq_id, from, e)).await;
            }
        }
    }

    /// Starts a job task, or says why not.
    fn start_job(&mut self, from: &Jid, job: &Job, now: Instant) -> Result<(), SpineError> {
        let Some(cap) = self.agent.caps.get(&job.capability) else {
            return Err(SpineError::new(Condition::UnknownCapability)
                .with_text(format!("this agent does not offer {}", job.capability)));
        };
        if self.draining {
            return Err(SpineError::new(Condition::Draining).with_text("agent is shutting down"));
        }
        let total = self.total.clone().try_acquire_owned().map_err(|_| {
            SpineError::new(Condition::Busy)
                .with_text(format!("all {} slots are busy", self.agent.config.slots))
        })?;
        let cap_permit: Option<OwnedSemaphorePermit> = match self.per_cap.get(&job.capability) {
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
                SpineError::new(Condition::Busy).with_text(format!(
                    "all {} slots of {} are busy",
                    cap.ad.slots.unwrap_or(0),
                    job.capability
                ))
            })?),
            None => None,
        };
        let from_bare = from.to_bare();
        let (input, input_mime) = match &job.input {
            None => (Vec::new(), None),
            Some(Data::Inline { mime, bytes }) => (bytes.clone(), mime.clone()),
            Some(Data::Blob(r)) => {
                if r.size > self.agent.config.max_input_size.as_u64() {
                    let mut e = SpineError::new(Condition::TooLarge)
                        .with_text(format!("input of {} bytes is over the limit", r.size));
                    e.max = Some(self.agent.config.max_input_size.as_u64());
                    return Err(e);
                }
                (self.blobs.take(from_bare.as_str(), r)?, r.mime.clone())
            }
        };
        let cancel = CancellationToken::new();
        let deadline = job.deadline_ms.map(|ms| now + Duration::from_millis(ms));
        let ctx = JobContext {
            id: job.id.clone(),
            capability: job.capability.clone(),
            attempt: job.attempt,
            args: job.args.0.clone(),
            input,
            input_mime,
            deadline,
            cancel: cancel.clone(),
            submitter: job.submitter.clone(),
            reports: Some(self.report_tx.clone()),
        };
        info!(job = %job.id, capability = %job.capability, attempt = job.attempt, from = %from, "job started");
        let handler = cap.handler.clone();
        let done_tx = self.done_tx.clone();
        let stop = self.stop.clone();
        let (id, attempt) = (job.id.clone(), job.attempt);
        let token = cancel.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            // The handler runs in a task of its own: a panic there is a JoinError here, and
            // `abort` drops its future (an exec child's process group is killed then).
            let mut inner = tokio::spawn(handler.call(ctx));
            let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
            let result = tokio::select! {
                r = &mut inner => match r {
                    Ok(Ok(out)) => Ok(out),
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
            // Slots are free once the handler's future is gone.
            drop(total);
            drop(cap_permit);
            let _ = done_tx.send(Done {
                id,
                attempt,
                result,
                elapsed: started.elapsed(),
            });
        });
        self.running.insert(
            job.id.clone(),
            Running {
                capability: job.capability.clone(),
                from_bare,
                reply_to: from.clone(),
                waiters: Vec::new(),
                cancel,
                progress: job.progress,
                attempt: job.attempt,
                next_partial: 0,
            },
        );
        if job.progress {
            let p = Progress {
                job: job.id.clone(),
                attempt: job.attempt,
                percent: Some(0),
                message: Some("started".into()),
            };
            self.pending_reports.push((from.clone(), p));
        }
        Ok(())
    }

    async fn mark_load_dirty(&mut self) {
        self.load_dirty = true;
        // The start notifications queued by start_job go out right away.
        for (to, p) in std::mem::take(&mut self.pending_reports) {
            self.conn.send(headline(to, p)).await;
        }
        if Instant::now() >= self.last_load + self.agent.config.load_debounce {
            self.send_load().await;
        }
    }

    async fn on_done(&mut self, d: Done) {
        let Some(r) = self.running.remove(&d.id) else {
            return;
        };
        let elapsed_ms = d.elapsed.as_millis() as u64;
        match &d.result {
            Ok(_) => info!(job = %d.id, elapsed_ms, "job succeeded"),
            Err(e) => info!(job = %d.id, elapsed_ms, "job failed: {e}"),
        }
        match d.result {
            Ok(out) if out.bytes.len() > INLINE_LIMIT => {
                self.start_upload(d.id, d.attempt, elapsed_ms, out, r).await
            }
            Ok(out) => {
                let output =
                    (!out.bytes.is_empty() || out.mime.is_some()).then_some(Data::Inline {
                        mime: out.mime,
                        bytes: out.bytes,
                    });
                let res = JobResult {
                    job: d.id.clone(),
                    attempt: d.attempt,
                    elapsed_ms: Some(elapsed_ms),
                    meta: out.meta.into(),
                    output,
                };
                self.finish(d.id, Outcome::Result(res), r.waiters).await;
            }
            Err(e) => self.finish(d.id, Outcome::Error(e), r.waiters).await,
        }
        self.mark_load_dirty().await;
    }

    async fn finish(&mut self, id: JobId, outcome: Outcome, waiters: Vec<(Jid, String)>) {
        for (to, iq_id) in waiters {
            self.reply(&to, iq_id, &outcome).await;
        }
        // Only final outcomes answer a repeated job id: after a retryable failure the
        // dispatcher's next attempt (maybe on this same agent) must really run.
        let is_final = match &outcome {
            Outcome::Result(_) => true,
            Outcome::Error(e) => !e.condition.is_retryable(),
        };
        if is_final {
            self.cache.insert(id, outcome, Instant::now());
        }
    }

    async fn reply(&mut self, to: &Jid, iq_id: String, outcome: &Outcome) {
        let iq = match outcome {
            Outcome::Result(r) => Iq::from_result(iq_id, Some(r.clone())).with_to(to.clone()),
            Outcome::Error(e) => iq_error(iq_id, to.clone(), e.clone()),
        };
        self.conn.send(iq).await;
    }

    /// Output over the inline limit: send it as a blob (chunks, windowed), then the result.
    async fn start_upload(
        &mut self,
        job: JobId,
        attempt: u64,
        elapsed_ms: u64,
        out: crate::handler::Output,
        r: Running,
    ) {
        let blob: BlobId = format!("out-{:032x}", rand::rng().random::<u128>())
            .parse()
            .expect("generated blob id is valid");
        let sha256: [u8; 32] = Sha256::digest(&out.bytes).into();
        let result = JobResult {
            job: job.clone(),
            attempt,
            elapsed_ms: Some(elapsed_ms),
            meta: out.meta.into(),
            output: Some(Data::Blob(BlobRef {
                blob: blob.clone(),
                size: out.bytes.len() as u64,
                sha256,
                mime: out.mime,
            })),
        };
        let pending = spine_protocol::chunks(&blob, &out.bytes).into();
        self.next_id += 1;
        let key = self.next_id;
        debug!(job = %job, bytes = out.bytes.len(), "uploading output as blob {blob}");
        self.uploads.insert(
            key,
            Upload {
                to: r.reply_to,
                pending,
                in_flight: 0,
                job,
                result,
                waiters: r.waiters,
            },
        );
        self.pump_upload(key).await;
    }

    async fn pump_upload(&mut self, key: u64) {
        loop {
            let Some(u) = self.uploads.get_mut(&key) else {
                return;
            };
            if u.in_flight >= CHUNK_WINDOW {
                return;
            }
            let Some(chunk) = u.pending.pop_front() else {
                if u.in_flight == 0 {
                    if let Some(u) = self.uploads.remove(&key) {
                        self.finish(u.job, Outcome::Result(u.result), u.waiters)
                            .await;
                    }
                }
                return;
            };
            u.in_flight += 1;
            let to = u.to.clone();
            let id = self.new_iq_id();
            self.chunk_iqs.insert(id.clone(), key);
            self.conn.send(Iq::from_set(id, chunk).with_to(to)).await;
        }
    }

    async fn on_chunk_ack(&mut self, iq_id: &str, error: Option<StanzaError>) {
        let Some(key) = self.chunk_iqs.remove(iq_id) else {
            return;
        };
        match error {
            None => {
                if let Some(u) = self.uploads.get_mut(&key) {
                    u.in_flight -= 1;
                }
                self.pump_upload(key).await;
            }
            Some(err) => {
                if let Some(u) = self.uploads.remove(&key) {
                    self.chunk_iqs.retain(|_, k| *k != key);
                    let e = SpineError::new(Condition::Retryable).with_text(format!(
                        "uploading the output failed: {:?}",
                        err.defined_condition
                    ));
                    self.finish(u.job, Outcome::Error(e), u.waiters).await;
                }
            }
        }
    }

    async fn on_report(&mut self, id: JobId, attempt: u64, report: Report) {
        let Some(r) = self.running.get_mut(&id) else {
            return;
        };
        // Progress and partial results only when the dispatcher asked (PROTOCOL.md §8).
        if !r.progress || r.attempt != attempt {
            return;
        }
        let to = r.reply_to.clone();
        match report {
            Report::Progress { percent, message } => {
                self.conn
                    .send(headline(
                        to,
                        Progress {
                            job: id,
                            attempt,
                            percent,
                            message,
                        },
                    ))
                    .await;
            }
            Report::Partial { mime, bytes } => {
                let seq = r.next_partial;
                r.next_partial += 1;
                self.conn
                    .send(headline(
                        to,
                        Partial {
                            job: id,
                            attempt,
                            seq,
                            mime,
                            bytes,
                        },
                    ))
                    .await;
            }
        }
    }
}

fn headline(to: Jid, payload: impl xmpp_parsers::message::MessagePayload) -> Message {
    let mut m = Message::new(Some(to));
    m.type_ = MessageType::Headline;
    m.payloads.push(payload.into());
    m
}
