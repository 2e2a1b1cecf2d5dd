//! The agent's state machine: everything the agent decides, with no I/O.
//!
//! [`crate::driver`] feeds [`Core`] its inputs, each with the time as a parameter — a session
//! start, a stanza (classified by [`crate::inbound`]), a finished job from
//! [`crate::supervisor`], a handler's progress report, the shutdown, a timer — and then takes
//! the effects from [`Core::take_ready`]: jobs to stop, handler invocations to start, stanzas to
//! send. The core owns the running jobs and their slots, the outcome cache, the input blobs
//! being assembled, the inputs fetched and outputs uploaded over HTTP (`refs`, protocol 1.1:
//! the transfers themselves are the driver's), the output uploads in chunks (`outputs`,
//! windowed), the fragment files a handler returned, each to a slot of its own
//! (`file_outputs`), the phase (serving,
//! draining, stopping, gone), the operator's drain (which only refuses new jobs: the process
//! stays) and the load reports with their sequence numbers (`load`). It has no
//! `async fn`, reads no clock, no file and no socket, so plain `#[test]`s drive it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use jid::{BareJid, Jid};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Map, Value};
use spine_protocol::blob::BlobStore;
use spine_protocol::{
    Advertise, Attributes, Cancel, CapabilityAd, CapabilityName, Condition, Data, DataRef, Job,
    JobId, JobResult, Load, Partial, Progress, ProtocolVersion, SpineError, INLINE_LIMIT,
};
use tokio::time::Instant;
use tokio_xmpp::Stanza;
use tracing::{debug, info, warn};
use xmpp_parsers::iq::Iq;
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::presence::{Presence, Type as PresenceType};
use xmpp_parsers::stanza_error::StanzaError;

use crate::config::AgentConfig;
use crate::files::{Cleanup, OutFile, WorkDir};
use crate::handler::{Output, Report};
use crate::inbound::{classify, Inbound};
use crate::store::{Drained, Outcome, OutcomeCache, Received};

mod events;
mod file_outputs;
mod load;
mod outputs;
mod refs;

pub(crate) use events::EventAck;
pub(crate) use file_outputs::{FilePut, InlineFiles};

/// Unacknowledged chunks in flight per blob upload (PROTOCOL.md §13).
pub(crate) const CHUNK_WINDOW: usize = 8;
/// How long an incomplete incoming blob is kept after its last chunk.
const BLOB_IDLE_TTL: Duration = Duration::from_secs(300);
/// Job requests remembered per dispatcher account for a new leader's `<recall/>`
/// (PROTOCOL.md §10.1): repeats take room too, so twice what an answer lists.
const RECEIVED: usize = 2 * spine_protocol::MAX_RECALLED;
/// How long stopped jobs may take to report their outcome once the drain grace is over.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A handler invocation to start: everything its [`crate::JobContext`] gets but the
/// cancellation token and the report channel, which the supervisor adds.
#[derive(Debug)]
pub(crate) struct Start {
    pub(crate) id: JobId,
    pub(crate) capability: CapabilityName,
    pub(crate) attempt: u64,
    pub(crate) args: Map<String, Value>,
    pub(crate) input: Vec<u8>,
    pub(crate) input_mime: Option<String>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) submitter: Option<String>,
    /// The capability takes its input as a file ([`crate::AgentBuilder::file_input`]).
    pub(crate) file_input: bool,
    /// The work directory the input was fetched into, when it was.
    pub(crate) work: Option<WorkDir>,
}

/// A handler invocation's end, as the supervisor reports it.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) id: JobId,
    pub(crate) attempt: u64,
    pub(crate) result: Result<Output, SpineError>,
    pub(crate) elapsed: Duration,
    /// The attempt's work directory (file-input capabilities), to delete once the outcome is
    /// sent.
    pub(crate) work: Option<WorkDir>,
    /// The fragment files the handler returned, hashed (the output then has none).
    pub(crate) files: Vec<OutFile>,
}

/// An input to fetch over HTTP (protocol 1.1): the driver GETs the sources in order, checks
/// size and SHA-256, and calls [`Core::fetched`] with `key`.
#[derive(Debug)]
pub(crate) struct Fetch {
    pub(crate) key: u64,
    pub(crate) source: Source,
    /// The whole fetch ends by then (the job's deadline, or [`FETCH_TIMEOUT`]).
    pub(crate) deadline: Instant,
    /// Stream the input into the input file of a new work directory instead of memory
    /// (a file-input capability's input by reference, not a fragment list).
    pub(crate) to_file: bool,
}

/// A fetched input: bytes, or the work directory whose input file holds it.
#[derive(Debug)]
pub(crate) enum Fetched {
    Bytes(Vec<u8>),
    File(WorkDir),
}

/// What an input fetch gets.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    /// The input by reference; when it is a fragment list, the blobs it names too.
    Ref(DataRef),
    /// A fragment list that came inline and names blobs by signed URL (PROTOCOL.md
    /// §11.7.1): each is fetched, and the handler gets the list with every fragment inline.
    Fragments(Vec<spine_protocol::Fragment>),
}

impl Source {
    /// Bytes it brings in, at most (what is checked against `max_input_size`).
    pub(crate) fn size(&self) -> u64 {
        match self {
            Source::Ref(r) => r.size,
            Source::Fragments(f) => f.iter().map(spine_protocol::Fragment::size).sum(),
        }
    }
}

/// An output to upload to its slot: the driver PUTs the bytes and calls [`Core::put_done`]
/// with `key` (success only on `201`).
#[derive(Debug)]
pub(crate) struct Put {
    pub(crate) key: u64,
    pub(crate) url: String,
    pub(crate) bytes: Arc<Vec<u8>>,
    pub(crate) mime: Option<String>,
    /// The upload ends by then (the slot's validity, bounded).
    pub(crate) deadline: Instant,
}

/// An output to keep and serve (`data_listen`, PROTOCOL.md §13.5): the driver writes it to
/// the keep directory and calls [`Core::kept`] with `key`.
#[derive(Debug)]
pub(crate) struct KeepOut {
    pub(crate) key: u64,
    pub(crate) sha256: [u8; 32],
    pub(crate) bytes: Arc<Vec<u8>>,
    /// The key the dispatcher's URLs to this agent's blobs are signed with.
    pub(crate) holder_key: [u8; 32],
}

/// How long an input fetch may take when the job has no deadline.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(300);

/// Handlers to stop.
#[derive(Debug, PartialEq)]
pub(crate) enum Stop {
    /// The dispatcher cancelled this job.
    Job(JobId),
    /// The drain grace is over: every running job is stopped (their outcome is `retryable`).
    All,
}

/// Something to send.
// Stanzas are the common case and the large one; boxing them would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Out {
    /// A stanza, as it is.
    Stanza(Stanza),
    /// A directed presence with a load report, and the advertisement when the dispatcher needs
    /// it (session start, hello). The driver adds the machine's load average and memory,
    /// which the core does not read.
    Load {
        to: Jid,
        advertise: Option<Box<Advertise>>,
        load: Load,
    },
}

/// The effects of the inputs since the last [`Core::take_ready`], performed by the driver in
/// this order: stop handlers and abort transfers, start handlers and transfers, then send the
/// stanzas in order. A start's "started" progress notification is held back for
/// [`START_NOTICE_HOLD`] and goes into `out` before anything the new handler reports.
#[derive(Debug, Default)]
pub(crate) struct Ready {
    pub(crate) stops: Vec<Stop>,
    /// HTTP transfers no longer wanted (by key).
    pub(crate) aborts: Vec<u64>,
    pub(crate) starts: Vec<Start>,
    pub(crate) fetches: Vec<Fetch>,
    pub(crate) puts: Vec<Put>,
    pub(crate) keeps: Vec<KeepOut>,
    /// Fragment files to PUT to their slots, streamed from disk.
    pub(crate) file_puts: Vec<FilePut>,
    /// Fragment files to read back into a list with the bytes inline (HTTP not possible).
    pub(crate) inlines: Vec<InlineFiles>,
    /// Work directories and files to delete, off the connection task.
    pub(crate) cleanups: Vec<Cleanup>,
    /// The operator's drain changed: the driver writes it to the state file first, before
    /// anything in `out` (its answer among them) leaves.
    pub(crate) save: Option<Drained>,
    /// Watched events taken by a dispatcher (with the jobs made) or given up, for their
    /// watchers.
    pub(crate) acks: Vec<EventAck>,
    pub(crate) out: Vec<Out>,
}

/// A job whose handler is running.
struct Running {
    capability: CapabilityName,
    from_bare: BareJid,
    /// Full JID to send progress, and an output's chunks, to.
    reply_to: Jid,
    /// IQs waiting for the outcome (the first request and any duplicates).
    waiters: Vec<(Jid, String)>,
    progress: bool,
    attempt: u64,
    /// The start notification is held back ([`START_NOTICE_HOLD`]) and not sent yet.
    start_notice: bool,
    /// Sequence number of the next partial result of this attempt.
    next_partial: u64,
    /// The input is being fetched over HTTP (transfer key): the handler starts with
    /// [`Start`] once the bytes are in.
    fetching: Option<(u64, Start)>,
    /// The job's `<keep/>` key, when this agent serves kept outputs: a large output is kept
    /// here rather than uploaded.
    keep: Option<[u8; 32]>,
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
    /// Unavailable presence queued: the driver closes the connection.
    Gone,
}

/// The agent's settings the core needs, taken from the configuration once.
struct Settings {
    slots: u64,
    heartbeat: Duration,
    load_debounce: Duration,
    drain_grace: Duration,
    max_input_size: u64,
    max_file_input_size: u64,
    http_data: bool,
    /// The `serves` URL of `data_listen`, once bound.
    serves: Option<String>,
    /// Capabilities that take their input as a file.
    file_inputs: HashSet<CapabilityName>,
}

/// The agent's state machine (see the module documentation).
pub(crate) struct Core {
    settings: Settings,
    dispatchers: Vec<BareJid>,
    caps: BTreeMap<CapabilityName, CapabilityAd>,
    attrs: Attributes,
    /// Identifies this run of the agent in advertisements.
    instance: String,
    gen: u64,
    /// Sequence number of the last load report (one sequence for every dispatcher).
    seq: u64,
    rng: StdRng,
    running: HashMap<JobId, Running>,
    /// Start notifications held back, with when each is due, in time order (a job's entry
    /// may outlive its notification: the job ended or reported first).
    start_notices: VecDeque<(Instant, JobId, u64)>,
    cache: OutcomeCache,
    /// The job requests received last from each dispatcher account: a new leader's
    /// `<recall/>` is answered from here (PROTOCOL.md §10.1).
    received: Received,
    blobs: BlobStore,
    uploads: HashMap<u64, outputs::Upload>,
    /// Chunk IQ id → upload key.
    chunk_iqs: HashMap<String, u64>,
    /// Outputs going to an upload slot over HTTP, by key.
    puts: HashMap<u64, refs::PutUpload>,
    /// Outputs being written to the keep directory, by key, with their SHA-256.
    keeps: HashMap<u64, (outputs::Finished, [u8; 32])>,
    /// Slot request IQ id → put key.
    slot_iqs: HashMap<String, u64>,
    /// When each unanswered slot request is given up, in time order.
    slot_deadlines: BTreeSet<(Instant, u64)>,
    /// Dispatchers known to speak protocol 1.1 (from their hello, or a job with a reference).
    speaks_1_1: HashSet<BareJid>,
    /// Dispatchers whose input fetch failed, or whose upload fell back to chunks, since the
    /// last success: their next failure is logged at debug level only.
    fetch_warned: HashSet<BareJid>,
    upload_warned: HashSet<BareJid>,
    /// Fragment files on their way to slots, by key.
    file_outputs: HashMap<u64, file_outputs::FileOutput>,
    /// Slot request IQ id → (file output key, file index).
    file_slot_iqs: HashMap<String, (u64, usize)>,
    /// When each unanswered slot request of a file is given up, in time order.
    file_slot_deadlines: BTreeSet<(Instant, String)>,
    /// PUT transfer key → (file output key, file index).
    file_put_keys: HashMap<u64, (u64, usize)>,
    /// This agent's bare JID (its watchers' events come from `/agents/<it>/…`).
    me: BareJid,
    /// Watched events on their way to a dispatcher, by key ([`crate::watch`]).
    outgoing: BTreeMap<u64, events::Outgoing>,
    /// Event and event-slot IQ id → event key.
    event_iqs: HashMap<String, u64>,
    /// PUT transfer key → event key.
    event_puts: HashMap<u64, u64>,
    /// The full JID of the dispatcher that last sent a hello or a job: where events go.
    heard_from: Option<Jid>,
    /// The leader a standby named when it refused an event.
    leader_hint: Option<Jid>,
    /// Fragment files being read back into an inline list, by key.
    inlining: HashMap<u64, file_outputs::Inlining>,
    next_id: u64,
    phase: Phase,
    /// An operator drained the agent (PROTOCOL.md §5.6): no new jobs, with this reason, until
    /// an undrain. Apart from `phase`: the process keeps running, and a shutdown still
    /// drains and ends it.
    drained: Option<Option<String>>,
    load_dirty: bool,
    last_load: Instant,
    /// The heartbeat's current interval: 0.5 s after a session start, doubling up to the
    /// configured heartbeat (a dispatcher that came online after us hears a load report
    /// within a second, answers with a hello, and we advertise).
    beat_step: Duration,
    next_beat: Instant,
    ready: Ready,
}

fn iq_error(id: String, to: Jid, e: SpineError) -> Iq {
    Iq::from_error(id, StanzaError::from(e)).with_to(to)
}

/// How long a job's start notification is held back (PROTOCOL.md §8.1). A job that ends
/// within it is reported by its outcome alone: two stanzas fewer through the server for a
/// watched job (the notification and the dispatcher's relay to the watcher), and one change of
/// state fewer in the dispatcher's store. Short enough that no one watching sees the
/// difference.
pub(crate) const START_NOTICE_HOLD: Duration = Duration::from_millis(10);

/// The start notification of attempt `attempt` of job `job` (PROTOCOL.md §8.1), to `to`.
fn start_notice(to: Jid, job: JobId, attempt: u64) -> Message {
    headline(
        to,
        Progress {
            job,
            attempt,
            percent: Some(0),
            message: Some("started".into()),
        },
    )
}

fn headline(to: Jid, payload: impl xmpp_parsers::message::MessagePayload) -> Message {
    let mut m = Message::new(Some(to));
    m.type_ = MessageType::Headline;
    m.payloads.push(payload.into());
    m
}

impl Core {
    /// A core for `caps`, serving `dispatchers`; `seed` makes its random choices (instance
    /// id, output blob ids). Nothing is sent before [`Core::session_started`].
    pub(crate) fn new(
        config: &AgentConfig,
        dispatchers: Vec<BareJid>,
        caps: BTreeMap<CapabilityName, CapabilityAd>,
        attrs: Attributes,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Core {
            settings: Settings {
                slots: config.slots,
                heartbeat: config.heartbeat,
                load_debounce: config.load_debounce,
                drain_grace: config.drain_grace,
                max_input_size: config.max_input_size.as_u64(),
                max_file_input_size: config.max_file_input_size.as_u64(),
                http_data: config.http_data,
                serves: None,
                file_inputs: HashSet::new(),
            },
            dispatchers,
            caps,
            attrs,
            instance: format!("{:016x}", rng.random::<u64>()),
            gen: 1,
            seq: 0,
            rng,
            running: HashMap::new(),
            start_notices: VecDeque::new(),
            cache: OutcomeCache::new(config.result_cache, config.result_ttl),
            received: Received::new(RECEIVED),
            blobs: BlobStore::new(config.max_input_size.as_u64(), BLOB_IDLE_TTL),
            uploads: HashMap::new(),
            chunk_iqs: HashMap::new(),
            puts: HashMap::new(),
            keeps: HashMap::new(),
            slot_iqs: HashMap::new(),
            slot_deadlines: BTreeSet::new(),
            speaks_1_1: HashSet::new(),
            fetch_warned: HashSet::new(),
            upload_warned: HashSet::new(),
            file_outputs: HashMap::new(),
            file_slot_iqs: HashMap::new(),
            file_slot_deadlines: BTreeSet::new(),
            file_put_keys: HashMap::new(),
            me: config
                .jid
                .parse::<Jid>()
                .map(|j| j.to_bare())
                .unwrap_or_else(|_| BareJid::new("agent@invalid").expect("a valid JID")),
            outgoing: BTreeMap::new(),
            event_iqs: HashMap::new(),
            event_puts: HashMap::new(),
            heard_from: None,
            leader_hint: None,
            inlining: HashMap::new(),
            next_id: 0,
            phase: Phase::Serving,
            drained: None,
            load_dirty: false,
            last_load: now,
            beat_step: Duration::ZERO,
            next_beat: now + config.heartbeat,
            ready: Ready::default(),
        }
    }

    /// The same core with these capabilities taking their input as a file.
    pub(crate) fn with_file_inputs(
        mut self,
        caps: impl IntoIterator<Item = CapabilityName>,
    ) -> Self {
        self.settings.file_inputs = caps.into_iter().collect();
        self
    }

    /// The same core, drained by an operator before this process started (the state file
    /// said so): it takes no jobs until an undrain.
    pub(crate) fn with_drained(mut self, reason: Option<String>) -> Self {
        self.drained = Some(reason);
        self
    }

    /// The effects of the inputs so far, leaving none.
    pub(crate) fn take_ready(&mut self) -> Ready {
        std::mem::take(&mut self.ready)
    }

    /// When [`Core::tick`] must be called next: the heartbeat, a debounced load report, or
    /// the end of the drain or stop grace, whichever is first.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let mut at = self.next_beat;
        if self.load_dirty {
            at = at.min(self.last_load + self.settings.load_debounce);
        }
        if let Phase::Draining(t) | Phase::Stopping(t) = self.phase {
            at = at.min(t);
        }
        if let Some(&(t, _)) = self.slot_deadlines.first() {
            at = at.min(t);
        }
        if let Some((t, _)) = self.file_slot_deadlines.first() {
            at = at.min(*t);
        }
        if let Some(t) = self.events_timeout() {
            at = at.min(t);
        }
        if let Some(&(t, _, _)) = self.start_notices.front() {
            at = at.min(t);
        }
        at
    }

    /// Still taking jobs (no shutdown asked).
    pub(crate) fn is_serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// Done: the unavailable presence is queued; the driver closes the connection.
    pub(crate) fn is_gone(&self) -> bool {
        self.phase == Phase::Gone
    }

    /// Jobs whose handler is running.
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }

    /// The XMPP session (re)started: initial presence, the advertisement to every dispatcher,
    /// the heartbeat from its shortest step, and output uploads from their first chunk (the
    /// acknowledgements of the old session are lost).
    pub(crate) fn session_started(&mut self, now: Instant) {
        self.push(Presence::available());
        for d in self.dispatchers.clone() {
            self.send_advertisement(Jid::from(d), now);
        }
        self.beat_step = Duration::from_millis(500).min(self.settings.heartbeat);
        self.next_beat = now + self.beat_step;
        self.restart_uploads(now);
        // Answers to slot requests of the old session are lost: those outputs go in chunks.
        self.slots_lost(now);
        self.file_slots_lost(now);
        self.events_session_started(now);
    }

    /// A stanza from the server.
    pub(crate) fn stanza(&mut self, st: Stanza, now: Instant) {
        let Some(inbound) = classify(st, &self.dispatchers) else {
            return;
        };
        match inbound {
            Inbound::Job { from, id, job } => self.on_job(from, id, job, now),
            Inbound::Cancel { from, id, cancel } => {
                let r = self.on_cancel(cancel, now);
                self.answer(from, id, r);
            }
            Inbound::Drain {
                from,
                id,
                drain: None,
            } if self.phase != Phase::Serving => {
                let e = SpineError::new(Condition::Draining)
                    .with_text("agent is shutting down: an undrain cannot stop that");
                self.answer(from, id, Err(e));
            }
            Inbound::Drain { from, id, drain } => {
                self.on_drain(drain.map(|d| d.reason), now);
                // After the load that tells every dispatcher (PROTOCOL.md §5.6).
                self.answer(from, id, Ok(()));
            }
            Inbound::Chunk { from, id, chunk } => {
                let r = self
                    .blobs
                    .put(from.to_bare().as_str(), chunk, now.into_std());
                self.answer(from, id, r);
            }
            Inbound::Recall { from, id } => {
                let had = self.received.recall(&from.to_bare());
                info!(dispatcher = %from, jobs = had.jobs.len(), "a new leader asked for its jobs");
                self.push(Iq::from_result(id, Some(had)).with_to(from));
            }
            Inbound::DiscoInfo { from, id } => {
                let info = spine_protocol::disco::agent_disco_info(self.caps.keys());
                self.push(Iq::from_result(id, Some(info)).with_to(from));
            }
            Inbound::Reply { id, payload, error } if self.slot_iqs.contains_key(&id) => {
                self.on_slot_reply(&id, payload, error, now)
            }
            Inbound::Reply { id, payload, error } if self.file_slot_iqs.contains_key(&id) => {
                self.on_file_slot_reply(&id, payload, error, now)
            }
            Inbound::Reply { id, payload, error } if self.is_event_reply(&id) => {
                self.on_event_reply(&id, payload, error, now)
            }
            Inbound::Reply { id, error, .. } => self.on_chunk_reply(&id, error, now),
            Inbound::Hello { from, protocol } => {
                debug!(dispatcher = %from, %protocol, "hello: advertising");
                self.heard_from = Some(from.clone());
                if protocol >= ProtocolVersion::V1_1 {
                    self.speaks_1_1.insert(from.to_bare());
                } else {
                    self.speaks_1_1.remove(&from.to_bare());
                }
                self.send_advertisement(from, now);
            }
            Inbound::Refused { to, id, error } => {
                self.push(Iq::from_error(id, error).with_to(to));
            }
        }
        self.check_end();
    }

    /// A handler's progress or partial output, sent only when the dispatcher asked for
    /// progress and only for the attempt that is running (PROTOCOL.md §8).
    pub(crate) fn report(&mut self, id: JobId, attempt: u64, report: Report) {
        let Some(r) = self.running.get_mut(&id) else {
            return;
        };
        if !r.progress || r.attempt != attempt {
            return;
        }
        let to = r.reply_to.clone();
        if std::mem::take(&mut r.start_notice) {
            // The handler speaks first: its start was before, and is reported before.
            let n = start_notice(to.clone(), id.clone(), attempt);
            self.push(n);
            self.forget_start_notices();
        }
        let Some(r) = self.running.get_mut(&id) else {
            return;
        };
        let m = match report {
            Report::Progress { percent, message } => headline(
                to,
                Progress {
                    job: id,
                    attempt,
                    percent,
                    message,
                },
            ),
            Report::Partial { mime, bytes } => {
                let seq = r.next_partial;
                r.next_partial += 1;
                headline(
                    to,
                    Partial {
                        job: id,
                        attempt,
                        seq,
                        mime,
                        bytes,
                    },
                )
            }
        };
        self.push(m);
    }

    /// A handler ended: its outcome to every waiting IQ (after uploading a large output), the
    /// cache, and a load report.
    pub(crate) fn job_done(&mut self, mut d: Done, now: Instant) {
        let files = std::mem::take(&mut d.files);
        let Some(r) = self.running.remove(&d.id) else {
            self.clean_up(d.work, files);
            return;
        };
        self.forget_start_notices();
        // An outcome that leaves now makes a held start notification needless; one that
        // waits for an upload first does not.
        let outcome_waits = match &d.result {
            Ok(out) => !files.is_empty() || out.bytes.len() > INLINE_LIMIT,
            Err(_) => false,
        };
        if r.start_notice && outcome_waits {
            self.push(start_notice(r.reply_to.clone(), d.id.clone(), r.attempt));
        }
        let elapsed_ms = d.elapsed.as_millis() as u64;
        match &d.result {
            Ok(_) => info!(job = %d.id, elapsed_ms, "job succeeded"),
            Err(e) => info!(job = %d.id, elapsed_ms, "job failed: {e}"),
        }
        match d.result {
            Ok(out) if !files.is_empty() => {
                let fin = outputs::Finished {
                    job: d.id,
                    attempt: d.attempt,
                    elapsed_ms,
                    meta: out.meta.into(),
                    mime: out.mime,
                    bytes: Arc::new(Vec::new()),
                    to: r.reply_to,
                    from_bare: r.from_bare,
                    waiters: r.waiters,
                };
                self.start_file_output(fin, files, d.work, now);
                self.mark_load_dirty(now);
                self.check_end();
                return;
            }
            Ok(out) if out.bytes.len() > INLINE_LIMIT => {
                let fin = outputs::Finished {
                    job: d.id,
                    attempt: d.attempt,
                    elapsed_ms,
                    meta: out.meta.into(),
                    mime: out.mime,
                    bytes: Arc::new(out.bytes),
                    to: r.reply_to,
                    from_bare: r.from_bare,
                    waiters: r.waiters,
                };
                if let Some(k) = r.keep.filter(|_| self.settings.serves.is_some()) {
                    self.keep_output(fin, k)
                } else if self.settings.http_data && self.speaks_1_1.contains(&fin.from_bare) {
                    self.request_slot(fin, now)
                } else {
                    self.start_upload(fin, now)
                }
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
                self.finish(d.id, Outcome::Result(res), r.waiters, now);
            }
            Err(e) => self.finish(d.id, Outcome::Error(e), r.waiters, now),
        }
        self.clean_up(d.work, files);
        self.mark_load_dirty(now);
        self.check_end();
    }

    /// Shutdown asked: no new jobs; running ones may finish within the drain grace.
    pub(crate) fn shutdown(&mut self, now: Instant) {
        if self.phase != Phase::Serving {
            return;
        }
        info!(running = self.running.len(), grace = ?self.settings.drain_grace, "draining: no new jobs");
        self.phase = Phase::Draining(now + self.settings.drain_grace);
        self.send_load(now);
        self.check_end();
    }

    /// Time passed: the drain or stop grace may be over, a load report due.
    pub(crate) fn tick(&mut self, now: Instant) {
        match self.phase {
            Phase::Draining(t) if now >= t => {
                warn!(
                    running = self.running.len(),
                    "drain grace over: stopping running jobs"
                );
                self.ready.stops.push(Stop::All);
                self.stop_fetches(now);
                self.phase = Phase::Stopping(now + STOP_GRACE);
            }
            Phase::Stopping(t) if now >= t => {
                warn!(
                    running = self.running.len(),
                    "jobs did not stop in time; leaving without their outcomes"
                );
                self.go_unavailable();
                return;
            }
            _ => {}
        }
        if now >= self.next_beat {
            self.send_load(now);
            self.beat_step = (self.beat_step * 2).min(self.settings.heartbeat);
            self.next_beat = now + self.beat_step;
        } else if self.load_dirty && now >= self.last_load + self.settings.load_debounce {
            self.send_load(now);
        }
        self.slot_timeouts(now);
        self.file_slot_timeouts(now);
        self.events_tick(now);
        self.start_notices_due(now);
    }

    /// Holds back the start notification of a job just started, if its dispatcher asked
    /// for progress: it goes out at [`START_NOTICE_HOLD`] unless the job reports or ends
    /// first.
    fn hold_start_notice(&mut self, id: &JobId, now: Instant) {
        let Some(r) = self.running.get_mut(id) else {
            return;
        };
        if !r.progress {
            return;
        }
        r.start_notice = true;
        let attempt = r.attempt;
        self.start_notices
            .push_back((now + START_NOTICE_HOLD, id.clone(), attempt));
    }

    /// Sends the held start notifications that are due.
    fn start_notices_due(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.start_notices.front() {
            if *at > now {
                break;
            }
            let Some((_, id, attempt)) = self.start_notices.pop_front() else {
                break;
            };
            let Some(r) = self.running.get_mut(&id) else {
                continue;
            };
            if r.attempt == attempt && std::mem::take(&mut r.start_notice) {
                let to = r.reply_to.clone();
                self.push(start_notice(to, id, attempt));
            }
        }
        self.forget_start_notices();
    }

    /// Drops the entries at the front of the queue whose notification is no longer held
    /// (the job ended or reported), so that the timer does not wake for them.
    fn forget_start_notices(&mut self) {
        while let Some((_, id, attempt)) = self.start_notices.front() {
            let held = self
                .running
                .get(id)
                .is_some_and(|r| r.attempt == *attempt && r.start_notice);
            if held {
                break;
            }
            self.start_notices.pop_front();
        }
    }

    fn push(&mut self, st: impl Into<Stanza>) {
        self.ready.out.push(Out::Stanza(st.into()));
    }

    /// Answers an IQ set with an empty result or the error.
    fn answer(&mut self, to: Jid, id: String, r: Result<(), SpineError>) {
        let iq = match r {
            Ok(()) => Iq::empty_result(to, id),
            Err(e) => iq_error(id, to, e),
        };
        self.push(iq);
    }

    /// Leaves once a shutdown was asked and nothing is left to report.
    fn check_end(&mut self) {
        if matches!(self.phase, Phase::Draining(_) | Phase::Stopping(_))
            && self.running.is_empty()
            && self.uploads.is_empty()
            && self.puts.is_empty()
            && self.keeps.is_empty()
            && self.file_outputs.is_empty()
            && self.inlining.is_empty()
        {
            self.go_unavailable();
        }
    }

    fn go_unavailable(&mut self) {
        info!("agent stopping: going unavailable");
        self.push(Presence::new(PresenceType::Unavailable));
        self.phase = Phase::Gone;
    }

    fn new_iq_id(&mut self) -> String {
        self.next_id += 1;
        format!("a{}", self.next_id)
    }

    /// An operator's drain (`Some(reason)`) or undrain (`None`): kept, and reported to every
    /// dispatcher at once, without the debounce, so none of them places another job here.
    /// Running jobs are untouched.
    fn on_drain(&mut self, drain: Option<Option<String>>, now: Instant) {
        match &drain {
            Some(reason) => info!(
                running = self.running.len(),
                reason = reason.as_deref().unwrap_or(""),
                "drained by an operator: taking no new jobs, running ones continue"
            ),
            None if self.drained.is_some() => info!("undrained by an operator: taking jobs again"),
            None => debug!("undrain of an agent that was not drained"),
        }
        self.ready.save = Some(Drained {
            drained: drain.is_some(),
            reason: drain.clone().flatten(),
        });
        self.drained = drain;
        self.send_load(now);
    }

    /// Drained by an operator (new jobs are refused, the process stays).
    #[cfg(test)]
    pub(crate) fn is_drained(&self) -> bool {
        self.drained.is_some()
    }

    fn on_cancel(&mut self, c: Cancel, now: Instant) -> Result<(), SpineError> {
        if self.cancel_fetch(&c.job, now) || self.cancel_file_output(&c.job, now) {
            return Ok(());
        }
        if self.running.contains_key(&c.job) {
            info!(job = %c.job, "cancel requested");
            self.ready.stops.push(Stop::Job(c.job));
            return Ok(());
        }
        if self.cache.get(&c.job, now).is_some() {
            return Ok(()); // already finished: cancel is a no-op
        }
        Err(SpineError::new(Condition::UnknownJob).with_text(format!("no job {} here", c.job)))
    }

    fn on_job(&mut self, from: Jid, iq_id: String, job: Job, now: Instant) {
        // Jobs come from the leader: where events go too.
        self.heard_from = Some(from.clone());
        self.received.push(&job.id, job.attempt, &from.to_bare());
        if let Some(outcome) = self.cache.get(&job.id, now).cloned() {
            debug!(job = %job.id, "duplicate of a finished job: resending its outcome");
            self.reply(from, iq_id, &outcome);
            return;
        }
        if let Some(r) = self.running.get_mut(&job.id) {
            debug!(job = %job.id, "duplicate of a running job: attached");
            r.waiters.push((from, iq_id));
            return;
        }
        let Some((from, iq_id)) = self.attach_to_upload(&job.id, from, iq_id) else {
            return;
        };
        let Some((from, iq_id)) = self.attach_to_file_output(&job.id, from, iq_id) else {
            return;
        };
        match self.start_job(&from, &job, now) {
            Ok(()) => {
                if let Some(r) = self.running.get_mut(&job.id) {
                    r.waiters.push((from, iq_id));
                }
                self.mark_load_dirty(now);
            }
            Err(e) => {
                debug!(job = %job.id, "refused: {e}");
                self.push(iq_error(iq_id, from, e));
            }
        }
    }

    /// Takes a slot and queues the handler's start, or says why not.
    fn start_job(&mut self, from: &Jid, job: &Job, now: Instant) -> Result<(), SpineError> {
        let Some(cap) = self.caps.get(&job.capability) else {
            return Err(SpineError::new(Condition::UnknownCapability)
                .with_text(format!("this agent does not offer {}", job.capability)));
        };
        if self.phase != Phase::Serving {
            return Err(SpineError::new(Condition::Draining).with_text("agent is shutting down"));
        }
        if let Some(reason) = &self.drained {
            let text = match reason {
                Some(r) => format!("agent is drained by an operator: {r}"),
                None => "agent is drained by an operator".to_owned(),
            };
            return Err(SpineError::new(Condition::Draining).with_text(text));
        }
        if self.running.len() as u64 >= self.settings.slots {
            return Err(SpineError::new(Condition::Busy)
                .with_text(format!("all {} slots are busy", self.settings.slots)));
        }
        if let Some(slots) = cap.slots {
            if self.in_flight(&job.capability) as u64 >= slots {
                return Err(SpineError::new(Condition::Busy)
                    .with_text(format!("all {slots} slots of {} are busy", job.capability)));
            }
        }
        let from_bare = from.to_bare();
        let file_input = self.settings.file_inputs.contains(&job.capability);
        let mut fetch = None;
        let mut to_file = false;
        let (input, input_mime) = match &job.input {
            None => (Vec::new(), None),
            Some(Data::Inline { mime, bytes }) => match fragment_refs(mime.as_deref(), bytes) {
                Some(list) => {
                    fetch = Some(self.fragments_source(list)?);
                    (Vec::new(), mime.clone())
                }
                None => (bytes.clone(), mime.clone()),
            },
            Some(Data::Blob(r)) => {
                let max = self.settings.max_input_size;
                if r.size > max {
                    let mut e = SpineError::new(Condition::TooLarge)
                        .with_text(format!("input of {} bytes is over the limit", r.size));
                    e.max = Some(max);
                    return Err(e);
                }
                let bytes = self.blobs.take(from_bare.as_str(), r)?;
                // A fragment list too long for the job stanza came in chunks: it may name
                // blobs by URL too.
                match fragment_refs(r.mime.as_deref(), &bytes) {
                    Some(list) => {
                        fetch = Some(self.fragments_source(list)?);
                        (Vec::new(), r.mime.clone())
                    }
                    None => (bytes, r.mime.clone()),
                }
            }
            Some(Data::Ref(r)) => {
                // A job with a reference comes only from a dispatcher that speaks 1.1.
                self.speaks_1_1.insert(from_bare.clone());
                if !self.settings.http_data {
                    return Err(SpineError::new(Condition::FetchFailed).with_text(
                        "this agent does not fetch inputs over HTTP (http_data = false)",
                    ));
                }
                // A file input streamed to disk is bounded by the disk, not by memory.
                to_file = file_input && r.mime.as_deref() != Some(spine_protocol::FRAGMENTS_MIME);
                let (max, key) = match to_file {
                    true => (self.settings.max_file_input_size, "max_file_input_size"),
                    false => (self.settings.max_input_size, "max_input_size"),
                };
                if r.size > max {
                    let mut e = SpineError::new(Condition::TooLarge).with_text(format!(
                        "input of {} bytes is over the limit ({key})",
                        r.size
                    ));
                    e.max = Some(max);
                    return Err(e);
                }
                fetch = Some(Source::Ref(r.clone()));
                (Vec::new(), r.mime.clone())
            }
        };
        let start = Start {
            id: job.id.clone(),
            capability: job.capability.clone(),
            attempt: job.attempt,
            args: job.args.0.clone(),
            input,
            input_mime,
            deadline: job.deadline_ms.map(|ms| now + Duration::from_millis(ms)),
            submitter: job.submitter.clone(),
            file_input,
            work: None,
        };
        let fetching = match fetch {
            Some(source) => {
                self.next_id += 1;
                let key = self.next_id;
                info!(job = %job.id, capability = %job.capability, attempt = job.attempt, from = %from, bytes = source.size(), "job accepted: fetching its input over HTTP");
                self.ready.fetches.push(Fetch {
                    key,
                    source,
                    deadline: start.deadline.unwrap_or(now + FETCH_TIMEOUT),
                    to_file,
                });
                Some((key, start))
            }
            None => {
                info!(job = %job.id, capability = %job.capability, attempt = job.attempt, from = %from, "job started");
                self.ready.starts.push(start);
                None
            }
        };
        self.running.insert(
            job.id.clone(),
            Running {
                capability: job.capability.clone(),
                from_bare,
                reply_to: from.clone(),
                waiters: Vec::new(),
                progress: job.progress,
                attempt: job.attempt,
                start_notice: false,
                next_partial: 0,
                fetching: None,
                keep: job
                    .keep
                    .as_ref()
                    .filter(|_| self.settings.serves.is_some())
                    .map(|k| k.key),
            },
        );
        if let Some(f) = fetching {
            // The handler starts, and "started" is reported, when the input is in.
            if let Some(r) = self.running.get_mut(&job.id) {
                r.fetching = Some(f);
            }
            return Ok(());
        }
        self.hold_start_notice(&job.id, now);
        Ok(())
    }

    /// The fetch of a fragment list's references, if this agent fetches over HTTP and they
    /// fit `max_input_size`.
    fn fragments_source(&self, list: Vec<spine_protocol::Fragment>) -> Result<Source, SpineError> {
        if !self.settings.http_data {
            return Err(SpineError::new(Condition::FetchFailed)
                .with_text("this agent does not fetch inputs over HTTP (http_data = false)"));
        }
        let source = Source::Fragments(list);
        let max = self.settings.max_input_size;
        if source.size() > max {
            let mut e = SpineError::new(Condition::TooLarge).with_text(format!(
                "the input's fragments take {} bytes, over the limit",
                source.size()
            ));
            e.max = Some(max);
            return Err(e);
        }
        Ok(source)
    }

    /// The outcome to every waiting IQ; a final one is kept to answer a repeated job id.
    fn finish(&mut self, id: JobId, outcome: Outcome, waiters: Vec<(Jid, String)>, now: Instant) {
        for (to, iq_id) in waiters {
            self.reply(to, iq_id, &outcome);
        }
        // Only final outcomes answer a repeated job id: after a retryable failure the
        // dispatcher's next attempt (maybe on this same agent) must really run.
        let is_final = match &outcome {
            Outcome::Result(_) => true,
            Outcome::Error(e) => !e.condition.is_retryable(),
        };
        if is_final {
            self.cache.insert(id, outcome, now);
        }
    }

    fn reply(&mut self, to: Jid, iq_id: String, outcome: &Outcome) {
        let iq = match outcome {
            Outcome::Result(r) => Iq::from_result(iq_id, Some(r.clone())).with_to(to),
            Outcome::Error(e) => iq_error(iq_id, to, e.clone()),
        };
        self.push(iq);
    }
}

/// The fragment list of an inline input, when it names blobs by signed URL (a reduce step's
/// map outputs, PROTOCOL.md §11.7.1); `None` for any other input. A list that does not parse
/// goes to the handler as it is, which says what is wrong with it.
fn fragment_refs(mime: Option<&str>, bytes: &[u8]) -> Option<Vec<spine_protocol::Fragment>> {
    if mime != Some(spine_protocol::FRAGMENTS_MIME) {
        return None;
    }
    let list = spine_protocol::fragments::decode(bytes).ok()?;
    list.iter()
        .any(|f| f.source.as_ref().is_some_and(|r| r.url.is_some()))
        .then_some(list)
}

#[cfg(test)]
mod tests;
