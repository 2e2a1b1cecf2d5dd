//! The driver: the one task that owns the dispatcher's XMPP connection, its store and audit
//! file, and the [`Core`]. It reads the clock, feeds the core every input, and performs what
//! the core decided, in the order [`Ready`] states: store, then send, then answer.
//!
//! A `select!` loop over stanzas, HTTP commands, the connection's status, the commit in
//! flight and a timer set to the core's next deadline ([`Core::next_wake`]). While events are
//! ready (up to [`BATCH`]), they are all fed to the core before anything is committed.
//!
//! **The commit pipeline.** Commits run on a blocking thread while the core goes on: at most
//! one at a time, and all the changes made while one runs go into the next — group commit,
//! one fsync for every job that changed meanwhile, and no stanza or answer leaves before the
//! changes it tells of are durable. Two things do not wait: job requests to agents
//! ([`Core::take_early`]: they promise nothing, so a job runs while its acceptance is being
//! stored; each is first written to the [`SentAheadLog`], so that after a crash the job goes
//! back to the same agent instead of running on another), and changes no one waits for yet ([`Pending::Lazy`]), which wait up to
//! [`LINGER`] for a commit something else asks for — so a fast job's acceptance and outcome
//! are stored in one commit.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use spine_xmpp::stanzastream::{Event, StreamEvent};
use spine_xmpp::Connection;
use tokio::sync::{broadcast, oneshot, watch};
use tracing::{error, info, warn};
use xmpp_parsers::presence::{Presence, Type as PresenceType};

use crate::audit::AuditLog;
use crate::blob_gc::BlobGc;
use crate::blobs::BlobStore;
use crate::config::DispatcherConfig;
use crate::core::data::DataPlane;
use crate::core::rates::RateUse;
use crate::core::standby::{Looked, Lookup, LookupFor};
use crate::core::{
    ApiReply, ApiRequest, ApiToken, Command, Core, Early, EventKind, JobEvent, Now, Pending, Ready,
    Restored,
};
use crate::error::DispatcherError;
use crate::http::Handle;
use crate::jobs::JobRecord;
use crate::leadership::{Campaign, Leadership};
use crate::policy::Policy;
use crate::sent_ahead::SentAheadLog;
use crate::store::postgres::{Contact, Ended};
use crate::store::{Batch, Fence, JobStore, OwnedBatch, StoreError};

/// Most events handled in one turn of the loop, before the commit pipeline is looked at.
const BATCH: usize = 256;

/// How long changes no one waits for yet ([`Pending::Lazy`]) may wait for a commit that
/// something else asks for: longer than a no-op job's round trip to an agent (about 0.2 ms on
/// loopback), so that its acceptance and outcome share a commit; short enough that an
/// accepted job is not held unstored for long.
const LINGER: Duration = Duration::from_millis(2);

/// How often, at most, the audit file is synced so that the lines it holds can leave the
/// store's outbox. Short enough that most lines leave before the store's next checkpoint,
/// which would otherwise write them into redb to remove them again later (the store's
/// `Outbox`); each sync costs the driver one `fdatasync`, five a second at most.
const AUDIT_SYNC: Duration = Duration::from_millis(200);

/// The time now, read once per input.
pub(crate) fn now() -> Now {
    Now {
        ms: crate::clock::now_ms(),
        mono: Instant::now(),
    }
}

/// A dispatcher with its HTTP listener open (port 0 allowed: see [`Dispatcher::http_addr`]).
pub struct Dispatcher {
    cfg: DispatcherConfig,
    http: Option<crate::http::Listener>,
}

impl Dispatcher {
    /// Validates the configuration and opens the HTTP listener (HTTPS with `http_tls_cert`);
    /// from then on the configuration's `public_url` is the API's effective base URL.
    pub async fn bind(mut cfg: DispatcherConfig) -> Result<Self, DispatcherError> {
        cfg.validate()?;
        crate::http::ensure_open_files(&cfg)?;
        let http = crate::http::Listener::bind(&cfg).await?;
        if let Some(l) = &http {
            let addr = l.local_addr().map_err(|e| {
                DispatcherError::Config(format!("http_listen: the listener's address: {e}"))
            })?;
            cfg.public_url = Some(cfg.public_url_or_default(addr)?);
        }
        Ok(Dispatcher { cfg, http })
    }

    /// The HTTP API's base URL (`public_url`, or derived from the listener), if it has one.
    pub fn public_url(&self) -> Option<&str> {
        self.cfg.public_url.as_deref()
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

/// The driver's state: the core and the I/O it performs for it.
struct Driver {
    core: Core,
    conn: Connection,
    store: JobStore,
    /// Set while the job store cannot be reached ([`JobStore::unreachable`]).
    store_down: Arc<std::sync::atomic::AtomicBool>,
    audit: Option<AuditLog>,
    /// Jobs whose audit lines reached the file since it was last synced (to leave the outbox).
    audited: Vec<String>,
    /// When the audit file was last synced to disk.
    audit_synced: Instant,
    events: broadcast::Sender<JobEvent>,
    /// The HTTP requests waiting for jobs to end, woken by the final events.
    waiters: Option<Arc<crate::http::wait::Waiters>>,
    /// HTTP requests waiting for the commit of the changes they made.
    waiting: HashMap<ApiToken, oneshot::Sender<ApiReply>>,
    next_token: ApiToken,
    /// Deletes blobs no job holds.
    blob_gc: BlobGc,
    /// The commit running on a blocking thread, and what waits for it.
    in_flight: Option<InFlight>,
    /// Since when changes no one waits for have been waiting ([`LINGER`]).
    lazy_since: Option<Instant>,
    /// Job requests sent ahead of their commit, recorded for the next process.
    sent_ahead: SentAheadLog,
    /// Among dispatchers electing a leader (PostgreSQL): this one's part. None: it always
    /// leads (the embedded store).
    elected: Option<Elected>,
}

/// A dispatcher that leads only when elected ([`crate::leadership`]).
struct Elected {
    /// Its id in the lease row.
    holder: String,
    /// The epoch the core leads with; None while it stands by.
    epoch: Option<u64>,
    rx: watch::Receiver<Leadership>,
    /// What a fresh standby core is made of, when this one stops leading.
    cfg: DispatcherConfig,
    policy: Policy,
    blobs: BlobStore,
    data_plane: Option<DataPlane>,
    /// Blobs known to be in the shared store (PostgreSQL), so that a commit copies each once.
    mirrored: HashSet<[u8; 32]>,
    /// Blobs deleted here (no job holds them), to delete from the shared store with the next
    /// commit.
    blob_deletes: Vec<[u8; 32]>,
    /// Jobs standbys stored that this leader took, to strike from their table next commit.
    adopted: Vec<String>,
    /// Jobs standbys stored that this leader took and that have not ended: announced with
    /// their views when they end ([`OwnedBatch::ended`]).
    from_standbys: HashSet<spine_protocol::JobId>,
    /// Cancels asked of standbys that this leader made, likewise.
    cancelled: Vec<String>,
    /// Woken when a standby stored a submission ([`crate::store::postgres::PgStore::listen`]).
    submitted: tokio::sync::mpsc::Receiver<()>,
    /// Submissions whose notification held the jobs whole: taken without a read.
    taken: tokio::sync::mpsc::Receiver<Vec<JobRecord>>,
    /// The read of the standbys' submissions under way, and whether a wake-up came since it
    /// started (another read follows).
    reading: Option<Reading>,
    read_again: bool,
    /// The sweep of the shared store's blobs under way (see [`Driver::sweep_shared`]), with
    /// the epoch it began in, and when the next one begins.
    sweeping: Option<(u64, Sweeping)>,
    next_sweep: tokio::time::Instant,
    /// Leading, its jobs' progress and partial events go to the standbys' streams through
    /// this ([`spawn_relay`]).
    relay: Option<tokio::sync::mpsc::Sender<JobEvent>>,
    /// What the other dispatchers charged to rate budgets ([`crate::core::rates`]).
    rates_in: tokio::sync::mpsc::Receiver<Vec<RateUse>>,
    /// What this one charged goes to them through this ([`spawn_rate_share`]).
    rates_out: Option<tokio::sync::mpsc::Sender<Vec<RateUse>>>,
    /// The reads a standby's core asked for ([`Driver::start_lookups`]) end here.
    looked_tx: tokio::sync::mpsc::UnboundedSender<(Lookup, Looked)>,
    looked: tokio::sync::mpsc::UnboundedReceiver<(Lookup, Looked)>,
    /// Job requests sent ahead of their commit ([`Driver::send_early`]): since the commit in
    /// flight started, and those it stores.
    ahead: usize,
    ahead_committing: usize,
}

/// Job requests a leader among several dispatchers sends ahead of their commits at most: the
/// next leader learns of them from the agents, whose answers list their newest jobs
/// ([`spine_protocol::MAX_RECALLED`]); past this many, requests wait for the commit.
const MAX_AHEAD: usize = spine_protocol::MAX_RECALLED / 4;

impl Elected {
    /// Whether a job request may leave before its commit: leading, the lease renewed within
    /// the last half of its length (a leader paused past its lease, which may have been
    /// taken over, sends nothing ahead when it wakes), and fewer than [`MAX_AHEAD`] requests
    /// waiting for their commits.
    fn may_send_ahead(&self) -> bool {
        let renewed = self.rx.borrow().renewed;
        self.epoch.is_some()
            && renewed.is_some_and(|r| r.elapsed() < self.cfg.lease / 2)
            && self.ahead + self.ahead_committing < MAX_AHEAD
    }
}

/// The read of the shared store's old blobs, on a task of its own.
type Sweeping = tokio::task::JoinHandle<Result<Vec<crate::blobs::Stored>, String>>;

/// Blobs one sweep looks at.
const SHARED_SWEEP_BATCH: i64 = 10_000;

impl Elected {
    /// Blobs deleted from this dispatcher's store: from the shared one too, next commit.
    fn forget_blobs(&mut self, deleted: Vec<crate::blobs::Stored>) {
        for b in deleted {
            self.mirrored.remove(&b.sha256);
            self.blob_deletes.push(b.sha256);
        }
    }
}

fn holder_of(rx: &watch::Receiver<Leadership>) -> String {
    rx.borrow().holder.clone()
}

/// What woke an elected dispatcher's driver.
enum Wake {
    /// Its part in the election changed.
    Leadership,
    /// A standby stored a submission (or a second went by: [`crate::store::postgres::PgStore::listen`]).
    Submitted,
    /// The read of the standbys' submissions ended.
    Read(Result<Submissions, String>),
    /// Time to sweep the shared store's blobs.
    Sweep,
    /// The sweep's read ended (begun in that epoch).
    Swept(u64, Result<Vec<crate::blobs::Stored>, String>),
    /// A read the core asked for ended.
    Looked(Box<(Lookup, Looked)>),
    /// A standby's submissions, whole in their notification.
    Taken(Vec<JobRecord>),
    /// What the other dispatchers charged to rate budgets.
    Rates(Vec<RateUse>),
}

/// The read of the standbys' submissions, with the blobs they reference: on a task of its own,
/// so the driver goes on meanwhile.
type Reading = tokio::task::JoinHandle<Result<Submissions, String>>;

/// What standbys stored for the leader: jobs, and ids of jobs to cancel.
type Submissions = (Vec<JobRecord>, Vec<String>);

/// The next [`Wake`] (never without an election, or once the election has ended).
async fn elected_wake(elected: &mut Option<Elected>) -> Option<Wake> {
    async fn read_end(r: &mut Option<Reading>) -> Result<Submissions, String> {
        match r {
            Some(h) => h.await.unwrap_or_else(|e| Err(e.to_string())),
            None => std::future::pending().await,
        }
    }
    match elected {
        Some(e) => tokio::select! {
            r = e.rx.changed() => r.ok().map(|()| Wake::Leadership),
            r = e.submitted.recv() => r.map(|()| Wake::Submitted),
            r = read_end(&mut e.reading) => {
                e.reading = None;
                Some(Wake::Read(r))
            }
            _ = tokio::time::sleep_until(e.next_sweep), if e.sweeping.is_none() => Some(Wake::Sweep),
            r = async {
                match &mut e.sweeping {
                    Some((epoch, h)) => (*epoch, h.await.unwrap_or_else(|x| Err(x.to_string()))),
                    None => std::future::pending().await,
                }
            } => {
                e.sweeping = None;
                Some(Wake::Swept(r.0, r.1))
            }
            r = e.looked.recv() => r.map(|l| Wake::Looked(Box::new(l))),
            r = e.taken.recv() => r.map(Wake::Taken),
            r = e.rates_in.recv() => r.map(Wake::Rates),
        },
        None => std::future::pending().await,
    }
}

/// The task that relays a leader's progress and partial events to the standbys
/// (PostgreSQL's `spine_events`), as many per notification as fit; best effort, apart from the
/// commits: an event it cannot send is dropped (a standby's stream misses it).
fn spawn_relay(pg: Arc<crate::store::postgres::PgStore>) -> tokio::sync::mpsc::Sender<JobEvent> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<JobEvent>(4096);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 512).await > 0 {
            let payloads = crate::store::postgres::relay_payloads(&batch);
            batch.clear();
            if payloads.is_empty() {
                continue;
            }
            if let Err(e) = pg.relay(&payloads).await {
                warn!("could not relay events to the standbys: {e}");
            }
        }
    });
    tx
}

/// How often a dispatcher tells the others what it charged to rate budgets: the budgets
/// several dispatchers share may be overrun by about what they accept in this time.
const RATE_SHARE: Duration = Duration::from_millis(250);

/// The task that tells the other dispatchers sharing the store what this one charged to
/// submitters' rate budgets (PostgreSQL's `spine_rates`), summed over [`RATE_SHARE`]; best
/// effort: a report it cannot send leaves the budgets looser for a moment.
fn spawn_rate_share(
    pg: Arc<crate::store::postgres::PgStore>,
    me: String,
) -> tokio::sync::mpsc::Sender<Vec<RateUse>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<RateUse>>(1024);
    tokio::spawn(async move {
        let mut sum: HashMap<(String, Option<usize>), u32> = HashMap::new();
        while let Some(uses) = rx.recv().await {
            let until = tokio::time::Instant::now() + RATE_SHARE;
            let mut next = Some(uses);
            while let Some(uses) = next.take() {
                for u in uses {
                    let n = sum.entry((u.submitter, u.budget)).or_default();
                    *n = n.saturating_add(u.n);
                }
                next = tokio::time::timeout_at(until, rx.recv())
                    .await
                    .ok()
                    .flatten();
            }
            let uses = sum
                .drain()
                .map(|((submitter, budget), n)| RateUse {
                    submitter,
                    budget,
                    n,
                })
                .collect();
            let payloads = crate::store::postgres::rate_payloads(&me, uses);
            if let Err(e) = pg.share_rates(&payloads).await {
                warn!("could not tell the other dispatchers of rate limits used: {e}");
            }
        }
    });
    tx
}

/// A commit on its way to disk, and what leaves once it is there.
struct InFlight {
    done: crate::store::Committing,
    ready: Ready,
}

/// The end of the commit in flight (never, if there is none).
async fn committed(
    slot: &mut Option<InFlight>,
) -> Result<Result<(), StoreError>, tokio::task::JoinError> {
    match slot {
        Some(f) => (&mut f.done).await,
        None => std::future::pending().await,
    }
}

/// Opens the audit log named by the configuration (`off`: none).
fn open_audit(cfg: &DispatcherConfig) -> Result<Option<AuditLog>, DispatcherError> {
    match cfg.audit_log.trim() {
        "off" => Ok(None),
        name => {
            let path = cfg.data_dir.join(name);
            Ok(Some(
                AuditLog::open(&path, cfg.audit_max_size.as_u64(), cfg.audit_keep).map_err(
                    |e| DispatcherError::Config(format!("audit_log: {}: {e}", path.display())),
                )?,
            ))
        }
    }
}

/// Appends to the audit log the lines of jobs that ended just before the last leader stopped,
/// which the store's outbox holds, and empties the outbox (a commit fenced by `fence`).
async fn recover_audit(
    audit: Option<&mut AuditLog>,
    store: &JobStore,
    fence: Option<Fence>,
) -> Result<(), DispatcherError> {
    let outbox = store.audit_outbox().await?;
    if outbox.is_empty() {
        return Ok(());
    }
    if let Some(a) = audit {
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
    let batch = OwnedBatch {
        audited: done,
        ..OwnedBatch::default()
    }
    .fenced(fence);
    store
        .commit(batch)
        .await
        .map_err(|e| StoreError(format!("the commit did not finish: {e}")))??;
    Ok(())
}

async fn run_inner(
    cfg: DispatcherConfig,
    http: Option<crate::http::Listener>,
    shutdown: impl Future<Output = impl Sized> + Send,
) -> Result<(), DispatcherError> {
    let opts = cfg.connect_options()?;
    // The XMPP login goes on while the store is read (a restart with many jobs held spends
    // most of its time reading them).
    let connecting = tokio::spawn(spine_xmpp::connect(opts));
    let store = JobStore::open(&cfg).await?;
    // On PostgreSQL, dispatchers elect a leader (several may share the store): this one
    // starts as a standby that holds no job, and loads them when it wins.
    let elected = matches!(store, JobStore::Postgres(_));
    let mut audit = open_audit(&cfg)?;
    let h = if elected {
        store.fleet().await?
    } else {
        recover_audit(audit.as_mut(), &store, None).await?;
        store.held().await?
    };
    let restored = Restored {
        jobs: h.jobs,
        capabilities: h.capabilities,
        agents: h.agents,
        rules: h.rules,
    };
    let held = restored.jobs.len();
    let unfinished = restored.jobs.iter().filter(|j| !j.state.is_final()).count();
    let (sent_ahead, sent_before) = SentAheadLog::open(&cfg.data_dir).map_err(|e| {
        DispatcherError::Store(StoreError(format!(
            "{}: the file of jobs sent ahead of their commit: {e}",
            cfg.data_dir.display()
        )))
    })?;
    let policy = Policy::from_config(&cfg)?;
    let mut conn = connecting
        .await
        .map_err(|e| DispatcherError::Connection(format!("the XMPP login task failed: {e}")))??;
    let mut status_rx = conn
        .take_status()
        .ok_or_else(|| DispatcherError::Connection("connection status already taken".into()))?;
    if elected {
        info!(jid = %conn.jid(), store = %store.describe(), "dispatcher connected: standing by until it wins the election");
    } else {
        info!(jid = %conn.jid(), jobs = held, unfinished, store = %store.describe(), "dispatcher connected");
    }
    // Ids of jobs the leader announces ended, for the callers a standby has waiting.
    let ended = elected.then(|| broadcast::channel::<Ended>(4096).0);
    // The leader's progress and partial events, relayed to a standby's event streams.
    let relayed = elected.then(|| broadcast::channel::<JobEvent>(4096).0);
    let campaign = match &store {
        JobStore::Postgres(pg) => {
            let holder = format!("{}#{:016x}", conn.jid(), rand::rng().random::<u64>());
            let contact = Contact {
                url: cfg.public_url.clone().unwrap_or_default(),
                jid: conn.jid().to_string(),
            };
            Some(Campaign::start(
                pg.clone(),
                holder,
                contact,
                cfg.election_timing(),
            ))
        }
        JobStore::Redb(_) => None,
    };
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::channel::<Command>(1024);
    let (events, _) = broadcast::channel::<JobEvent>(4096);
    let http_stop = tokio_util::sync::CancellationToken::new();
    // Payloads over the inline limit live in the blob store; agents fetch and upload them
    // over HTTP with URLs this key signs (kept in the data directory: they survive a restart).
    let blob_dir = cfg.data_dir.join("blobs");
    let blobs_err = |why: String| DispatcherError::Blobs {
        path: blob_dir.clone(),
        why,
    };
    let (blobs, found) = BlobStore::open(&blob_dir, cfg.blob_quota.map(|q| q.as_u64()))
        .map_err(|e| blobs_err(e.to_string()))?;
    let key = Arc::new(
        crate::signing::load_or_create(&cfg.data_dir.join("url.key"))
            .map_err(|e| blobs_err(format!("url.key: {e}")))?,
    );
    // Webhooks' secret files are read once, at start.
    let webhooks =
        crate::triggers::webhooks(&cfg.webhooks, true).map_err(DispatcherError::Config)?;
    let mut data_plane = None;
    let mut waiters = None;
    if let Some(listener) = http {
        // Dispatchers sharing PostgreSQL: a standby passes on to the leader what only it does.
        let forward = match &store {
            JobStore::Postgres(_) => Some(
                crate::http::forward::Forwarder::new(
                    cfg.peer_ca.as_deref(),
                    conn.jid().to_string(),
                )
                .map_err(DispatcherError::Config)?,
            ),
            JobStore::Redb(_) => None,
        };
        let handle = Handle::new(&cfg, &policy, cmd_tx.clone(), events.clone())
            .with_forward(forward)
            .with_webhooks(webhooks)
            .with_data(blobs.clone(), key.clone())
            .with_store_health(store.unreachable())
            .with_leadership(campaign.as_ref().map(|(_, rx)| rx.clone()))
            .with_shared(
                match &store {
                    JobStore::Postgres(pg) => Some(pg.clone()),
                    JobStore::Redb(_) => None,
                },
                ended.clone(),
                relayed.clone(),
            );
        if let Ok(addr) = listener.local_addr() {
            let scheme = listener.scheme();
            match cfg.public_url_or_default(addr) {
                Ok(base) => {
                    info!(%addr, scheme, public_url = %base, "HTTP API listening");
                    data_plane = Some(DataPlane {
                        base,
                        key: key.clone(),
                        ttl: cfg.blob_url_ttl,
                    });
                }
                Err(e) => {
                    warn!(%addr, scheme, "HTTP API listening; large payloads go in chunks: {e}")
                }
            }
        }
        waiters = Some(handle.waiters.clone());
        tokio::spawn(crate::http::serve(listener, handle, http_stop.clone()));
    }
    drop(cmd_tx);
    let t = now();
    let orphan_ttl = cfg.blob_orphan_ttl;
    let looked = tokio::sync::mpsc::unbounded_channel();
    let taken = tokio::sync::mpsc::channel(1024);
    let rates = tokio::sync::mpsc::channel(1024);
    let (campaign, elected) = match campaign {
        Some((c, rx)) => (
            Some(c),
            Some(Elected {
                holder: holder_of(&rx),
                rates_in: rates.1,
                rates_out: match &store {
                    JobStore::Postgres(pg) => Some(spawn_rate_share(pg.clone(), holder_of(&rx))),
                    JobStore::Redb(_) => None,
                },
                submitted: {
                    let (tx, woken) = tokio::sync::mpsc::channel(1);
                    if let (JobStore::Postgres(pg), Some(ended), Some(relayed)) =
                        (&store, &ended, &relayed)
                    {
                        pg.listen(
                            tx,
                            ended.clone(),
                            relayed.clone(),
                            taken.0,
                            (holder_of(&rx), rates.0),
                            rx.clone(),
                        );
                    }
                    woken
                },
                epoch: None,
                rx,
                cfg: cfg.clone(),
                policy: policy.clone(),
                blobs: blobs.clone(),
                data_plane: data_plane.clone(),
                mirrored: HashSet::new(),
                blob_deletes: Vec::new(),
                adopted: Vec::new(),
                from_standbys: HashSet::new(),
                cancelled: Vec::new(),
                reading: None,
                read_again: false,
                sweeping: None,
                next_sweep: tokio::time::Instant::now() + orphan_ttl,
                looked_tx: looked.0,
                looked: looked.1,
                ahead: 0,
                ahead_committing: 0,
                taken: taken.1,
                relay: match &store {
                    JobStore::Postgres(pg) => Some(spawn_relay(pg.clone())),
                    JobStore::Redb(_) => None,
                },
            }),
        ),
        None => (None, None),
    };
    let mut core = if elected.is_some() {
        if !sent_before.is_empty() {
            warn!(
                lines = sent_before.len(),
                "the files of jobs sent ahead of their commit by an earlier run on the embedded store are ignored on PostgreSQL"
            );
        }
        Core::standby(
            cfg,
            policy,
            restored,
            rand::rng().random(),
            t,
            Box::new(blobs.clone()),
        )
    } else {
        Core::new(
            cfg,
            policy,
            restored,
            rand::rng().random(),
            t,
            Box::new(blobs.clone()),
        )
    };
    if let Some(dp) = data_plane {
        core.set_data_plane(dp);
    }
    let blob_gc = BlobGc::new(blobs, orphan_ttl, found, &core.referenced_blobs());
    let mut d = Driver {
        core,
        conn,
        store_down: store.unreachable(),
        store,
        audit,
        audited: Vec::new(),
        audit_synced: Instant::now(),
        events,
        waiters,
        waiting: HashMap::new(),
        next_token: 0,
        blob_gc,
        in_flight: None,
        lazy_since: None,
        sent_ahead,
        elected,
    };
    d.core.session_started(t);
    if d.elected.is_none() {
        // The files also hold lines of dispatches stored since (stale): the core leaves
        // those jobs alone and counts the others.
        let lines = sent_before.len();
        let back = d.core.recover(sent_before, t);
        if back > 0 {
            info!(
                jobs = back,
                lines,
                "the last process sent jobs ahead of their commit: they go back to their agents"
            );
        }
    }
    d.commit_all().await?;
    // What the last process sent ahead is stored now (as jobs restored in flight).
    d.sent_ahead.clear();
    let mut auth_refusals = 0u32;
    tokio::pin!(shutdown);
    loop {
        let listened = d.events.receiver_count() > 0 || d.waiters.as_ref().is_some_and(|w| w.any());
        d.core.set_listened(listened);
        let mut wake = d.core.next_wake(now()).min(d.blob_gc.next_wake());
        // Lingering changes start a commit when the linger is over (with one in flight,
        // they join the next when it ends).
        if let (Some(since), None) = (d.lazy_since, &d.in_flight) {
            wake = wake.min(LINGER.saturating_sub(since.elapsed()));
        }
        tokio::select! {
            // Cancellation-safe branches: the connection, the channels, the join handle and
            // the sleep keep no state a cancelled branch would lose.
            _ = &mut shutdown => break,
            ev = d.conn.next() => d.on_event(ev)?,
            r = committed(&mut d.in_flight), if d.in_flight.is_some() => d.on_committed(r).await?,
            _ = tokio::time::sleep(wake) => {
                d.core.tick(now());
                // A standby holds no job (but the submissions it is storing): its blobs —
                // bodies it stored, outputs it fetched to serve, those of an earlier
                // leadership — are copies of PostgreSQL's, deleted here like any other
                // unreferenced blob. Only a leader deletes them from PostgreSQL too.
                let core = &d.core;
                let deleted = d.blob_gc.run(|b| core.blob_refs(b));
                if let (true, Some(e)) = (d.core.leads(), d.elected.as_mut()) {
                    e.forget_blobs(deleted);
                }
            }
            Some(wake) = elected_wake(&mut d.elected) => match wake {
                Wake::Leadership => d.on_leadership().await?,
                Wake::Submitted => d.read_submitted(),
                Wake::Read(r) => d.take_submitted(r).await,
                Wake::Sweep => d.sweep_shared(orphan_ttl),
                Wake::Swept(epoch, r) => d.swept(epoch, r).await?,
                Wake::Looked(l) => d.core.looked_up(l.0, l.1, now()),
                Wake::Taken(jobs) => d.take_notified(jobs).await,
                Wake::Rates(uses) => d.core.charge_rate_uses(uses, now()),
            },
            Some(cmd) = cmd_rx.recv() => d.on_command(cmd),
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
        // Whatever else is ready joins the turn; then job requests leave and, if nothing is
        // being committed, a commit starts for what waits (see `flush`).
        for _ in 1..BATCH {
            if let Some(ev) = futures::FutureExt::now_or_never(d.conn.next()) {
                d.on_event(ev)?;
            } else if let Ok(cmd) = cmd_rx.try_recv() {
                d.on_command(cmd);
            } else {
                break;
            }
        }
        d.flush().await?;
        if let Some(tx) = d.elected.as_ref().and_then(|e| e.rates_out.as_ref()) {
            if d.core.has_rate_uses() {
                // A full queue: the share task is behind; these are dropped, not waited for.
                let _ = tx.try_send(d.core.take_rate_uses());
            }
        }
    }
    http_stop.cancel();
    info!("dispatcher stopping");
    if let Some(w) = &d.waiters {
        w.close();
    }
    let last = d.commit_all().await;
    // Leading, it hands over at once: a standby takes the released lease.
    if let Some(c) = campaign {
        c.stop().await;
    }
    last?;
    // Every dispatch sent ahead is stored now: a clean stop leaves the files empty.
    d.sent_ahead.clear();
    d.conn.send(Presence::new(PresenceType::Unavailable)).await;
    d.conn.close().await;
    Ok(())
}

impl Driver {
    /// One event of the connection.
    fn on_event(&mut self, ev: Option<Event>) -> Result<(), DispatcherError> {
        match ev {
            Some(Event::Stanza(st)) => {
                self.core
                    .set_store_down(self.store_down.load(std::sync::atomic::Ordering::Relaxed));
                self.core.stanza(st, now())
            }
            Some(Event::Stream(StreamEvent::Suspended)) => self.core.session_suspended(now()),
            Some(Event::Stream(StreamEvent::Reset { .. })) => self.core.session_reset(now()),
            Some(Event::Stream(_)) => {}
            None => {
                return Err(DispatcherError::Connection(
                    "the connection worker ended".into(),
                ))
            }
        }
        Ok(())
    }

    /// One HTTP command: a read is answered at once, a change after the commit.
    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Read { query, reply } => {
                // A dropped reply channel means the HTTP client went away: nothing to do.
                let _ = reply.send(self.core.query(query, now()));
            }
            // A standby accepts submissions (it stores them for the leader) and nothing else:
            // the HTTP side answers 503 `standby` when the reply channel closes (a change
            // that reached it as it stopped leading).
            Command::Change { request, .. }
                if !self.core.leads() && !matches!(request, ApiRequest::Submit { .. }) => {}
            Command::Change { request, reply } => {
                self.next_token += 1;
                let token = self.next_token;
                self.waiting.insert(token, reply);
                self.core.api(token, request, now());
            }
        }
    }

    /// After a turn of the loop: job requests go to agents at once; a commit starts if none
    /// is running and something waits for one (or has lingered long enough).
    async fn flush(&mut self) -> Result<(), DispatcherError> {
        self.start_lookups();
        for st in self.core.take_now() {
            self.conn.send(st).await;
        }
        self.send_early().await;
        if self.in_flight.is_some() {
            // The changes join the next commit, which starts when this one ends.
            return Ok(());
        }
        match self.core.pending() {
            Pending::Nothing => self.lazy_since = None,
            Pending::Urgent => self.start_commit().await?,
            // Job requests wait for their commit here: one need not linger.
            Pending::Lazy if self.core.has_early() => self.start_commit().await?,
            Pending::Lazy => {
                let since = *self.lazy_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= LINGER {
                    self.start_commit().await?;
                }
            }
        }
        Ok(())
    }

    /// The reads of the shared store a standby's core asked for (its XMPP submitters'
    /// requests: [`crate::core::standby`]), each on a task of its own; the answers come back
    /// as [`Wake::Looked`]. (The core bounds how many wait at once.)
    fn start_lookups(&mut self) {
        let lookups = self.core.take_lookups();
        if lookups.is_empty() {
            return;
        }
        let (Some(e), JobStore::Postgres(pg)) = (self.elected.as_ref(), &self.store) else {
            // Only a standby asks, and only dispatchers sharing PostgreSQL stand by.
            for l in lookups {
                self.core.looked_up(l, Err("no shared store".into()), now());
            }
            return;
        };
        for l in lookups {
            let (pg, tx) = (pg.clone(), e.looked_tx.clone());
            tokio::spawn(async move {
                let r = match &l.what {
                    LookupFor::Key { submitter, key, .. } => pg.idempotent(submitter, key).await,
                    LookupFor::Status { job, .. } | LookupFor::Cancel { job, .. } => {
                        pg.job(job.as_str()).await
                    }
                    LookupFor::PassCancel { job } => {
                        pg.request_cancel(job.as_str()).await.map(|()| None)
                    }
                };
                // The driver is gone: nothing to answer.
                let _ = tx.send((l, r.map_err(|x| x.to_string())));
            });
        }
    }

    /// Job requests that leave before their commit: recorded first ([`SentAheadLog`]). Among
    /// elected dispatchers the next leader may be on another machine, where this file is not:
    /// it learns from the agents instead (`<recall/>`, [`crate::core::recall`]), so the core
    /// sends ahead only to agents that answer it, and only while [`Elected::may_send_ahead`];
    /// otherwise the requests leave after the commit of their dispatch.
    async fn send_early(&mut self) {
        if let Some(e) = self.elected.as_mut() {
            if !e.may_send_ahead() {
                return;
            }
            let early: Early = self.core.take_early();
            e.ahead += early.sent.len();
            for st in early.stanzas {
                self.conn.send(st).await;
            }
            return;
        }
        let early: Early = self.core.take_early();
        self.sent_ahead.record(&early.sent);
        for st in early.stanzas {
            self.conn.send(st).await;
        }
    }

    /// The commit in flight ended: what waited for it leaves, and the next one starts if
    /// something waits.
    async fn on_committed(
        &mut self,
        r: Result<Result<(), StoreError>, tokio::task::JoinError>,
    ) -> Result<(), DispatcherError> {
        let Some(f) = self.in_flight.take() else {
            return Ok(());
        };
        match r {
            Ok(Ok(())) => {}
            // Among elected dispatchers a failed commit (deposed, or the database gone past
            // store_timeout) ends this leadership, not the process: what it held is in the
            // store, and the next leader (perhaps this one again) goes on from there.
            Ok(Err(e)) if self.elected.is_some() => {
                self.stand_by(&e.to_string()).await;
                return Ok(());
            }
            Ok(Err(e)) => {
                // The store failed: nothing can be promised any more.
                error!("{e}");
                return Err(e.into());
            }
            Err(e) => {
                error!("the job store's commit did not finish: {e}");
                return Err(StoreError(format!("the commit did not finish: {e}")).into());
            }
        }
        self.sent_ahead.committed();
        if let Some(e) = self.elected.as_mut() {
            e.ahead_committing = 0;
        }
        self.stored(f.ready).await;
        self.flush().await
    }

    /// Commits everything the core decided and waits for it (at start and at shutdown).
    async fn commit_all(&mut self) -> Result<(), DispatcherError> {
        loop {
            self.send_early().await;
            if self.in_flight.is_none() {
                if self.core.pending() == Pending::Nothing {
                    return Ok(());
                }
                self.start_commit().await?;
            }
            if self.in_flight.is_some() {
                let r = committed(&mut self.in_flight).await;
                self.on_committed(r).await?;
            }
        }
    }

    /// Takes what the core decided and stores it on a blocking thread ([`InFlight`]); with
    /// nothing to store, it leaves at once.
    async fn start_commit(&mut self) -> Result<(), DispatcherError> {
        self.lazy_since = None;
        self.sent_ahead.commit_started();
        if let Some(e) = self.elected.as_mut() {
            e.ahead_committing += std::mem::take(&mut e.ahead);
        }
        let ready = self.core.take_ready();
        // Lines leave the store's outbox once the file holding them is on disk: synced at
        // most every AUDIT_SYNC, so a power loss cannot lose a line either.
        let mut written = Vec::new();
        if !self.audited.is_empty() && self.audit_synced.elapsed() >= AUDIT_SYNC {
            if let Some(a) = self.audit.as_mut() {
                match a.sync() {
                    Ok(()) => written = std::mem::take(&mut self.audited),
                    Err(e) => error!("cannot sync the audit log: {e}"),
                }
            }
            self.audit_synced = Instant::now();
        }
        // A leader's blobs to delete from the shared store go with any commit, or alone.
        let shared = self
            .elected
            .as_ref()
            .is_some_and(|e| e.epoch.is_some() && !e.blob_deletes.is_empty());
        if !ready.must_store() && written.is_empty() && !shared {
            self.sent_ahead.committed();
            if let Some(e) = self.elected.as_mut() {
                e.ahead_committing = 0;
            }
            self.stored(ready).await;
            return Ok(());
        }
        let jobs: Vec<&JobRecord> = ready
            .persist
            .iter()
            .filter_map(|id| self.core.record(id))
            .collect();
        let batch = OwnedBatch::encode(&Batch {
            jobs: &jobs,
            delete: &ready.delete,
            audit: &ready.audit,
            audited: &written,
            agents: &ready.agents_seen,
            capabilities: &ready.capabilities_learned,
        })
        .map_err(|e| {
            error!("{e}");
            DispatcherError::from(e)
        })?;
        let mut batch = batch.fenced(self.fence());
        for (name, rule) in &ready.rules {
            let json = rule
                .as_ref()
                .map(serde_json::to_vec)
                .transpose()
                .map_err(|e| DispatcherError::Store(StoreError(format!("rule {name}: {e}"))))?;
            batch.rules.push((name.clone(), json));
        }
        if let Some(e) = self.elected.as_mut() {
            // The next leader may be on another machine: the blobs these jobs reference go
            // to the shared store first, and blobs deleted here leave it.
            for j in &jobs {
                for s in j.blobs() {
                    if e.mirrored.insert(s.sha256) {
                        batch.blobs.push((s, e.blobs.path(&s.sha256)));
                    }
                }
            }
            if batch.fence.is_some() {
                batch.blob_deletes = std::mem::take(&mut e.blob_deletes);
                // A blob this batch copies (a job took it again since it was let go) stays.
                let copied: HashSet<[u8; 32]> = batch.blobs.iter().map(|(b, _)| b.sha256).collect();
                batch.blob_deletes.retain(|s| !copied.contains(s));
                batch.adopted = std::mem::take(&mut e.adopted);
                batch.cancelled = std::mem::take(&mut e.cancelled);
                // Callers waiting at standbys hear of these once they are stored; of a job a
                // standby accepted, whose caller there most likely waits, with its view.
                batch.ended = jobs
                    .iter()
                    .filter(|j| j.state.is_final())
                    .map(|j| {
                        let view = e
                            .from_standbys
                            .remove(&j.id)
                            .then(|| crate::core::Rendered::job(j).get().to_owned());
                        (j.id.to_string(), view)
                    })
                    .collect();
            } else {
                // A standby's jobs are its submissions: the leader takes them from the store.
                batch.submitted = jobs.iter().map(|j| j.id.to_string()).collect();
            }
        }
        let done = self.store.commit(batch);
        self.in_flight = Some(InFlight { done, ready });
        Ok(())
    }

    /// What may leave once the changes are stored.
    async fn stored(&mut self, mut ready: Ready) {
        // A standby's submissions are the leader's now.
        self.core.hand_over(&ready.persist);
        // The jobs that let these blobs go are forgotten on disk now.
        self.blob_gc.released(std::mem::take(&mut ready.released));
        self.deliver(ready).await;
    }

    /// The second half of a commit: what may leave once the changes are stored.
    async fn deliver(&mut self, ready: Ready) {
        for st in ready
            .now
            .into_iter()
            .chain(ready.early)
            .chain(ready.stanzas)
        {
            self.conn.send(st).await;
        }
        for (token, reply) in ready.replies {
            if let Some(tx) = self.waiting.remove(&token) {
                let _ = tx.send(reply);
            }
        }
        let relay = self
            .elected
            .as_ref()
            .filter(|_| self.core.leads())
            .and_then(|e| e.relay.as_ref());
        for mut ev in ready.events {
            // A job's end published unrendered (no reader then, `Core::set_listened`) gets its
            // view now if a reader has come since; the job is read as it is now, ended.
            if ev.kind == EventKind::Final && ev.data.is_later() {
                let wanted = self.events.receiver_count() > 0
                    || self.waiters.as_ref().is_some_and(|w| w.waits_for(&ev.job));
                if let Some(rec) = self.core.record(&ev.job).filter(|_| wanted) {
                    ev.data = crate::core::Rendered::job(rec);
                }
            }
            if let Some(w) = &self.waiters {
                w.event(&ev);
            }
            if let (Some(r), EventKind::Progress | EventKind::Partial) = (relay, ev.kind) {
                // A full relay drops the event: a standby's stream misses it, nothing waits.
                let _ = r.try_send(ev.clone());
            }
            // No receiver is fine. An end still without a view (its job forgotten since) is
            // not sent: a stream that opened meanwhile reads the job itself.
            if !ev.data.is_later() {
                let _ = self.events.send(ev);
            }
        }
        // After the answers: a sequential job's end need not wait for this write. The
        // outcomes are stored now; an audit write failure is reported, not fatal (the lines
        // stay in the outbox and are written at the next start).
        if let Some(a) = self.audit.as_mut() {
            match a.append(&ready.audit) {
                Ok(()) => self.audited.extend(ready.audit.into_iter().map(|(j, _)| j)),
                Err(e) => error!("cannot write the audit log: {e}"),
            }
        }
    }

    /// Leading: reads the jobs standbys stored, with the blobs they reference that this
    /// machine lacks, on a task of its own (one at a time: a wake-up meanwhile reads again
    /// after it).
    /// A leader's sweep of the shared store (PostgreSQL), every `blob_orphan_ttl`: the blobs
    /// copied there more than `blob_orphan_ttl` ago (at least a minute) are read on a task of
    /// their own; those no held job references
    /// then go with the next commit. A blob copied for a commit that failed (the leader
    /// deposed, a key conflict) is referenced by no job, and this dispatcher's collector never
    /// saw it referenced, so nothing else would delete it.
    fn sweep_shared(&mut self, orphan_ttl: Duration) {
        let (Some(e), JobStore::Postgres(pg)) = (self.elected.as_mut(), &self.store) else {
            return;
        };
        e.next_sweep = tokio::time::Instant::now() + orphan_ttl;
        let Some(epoch) = e.epoch else {
            return;
        };
        // At least a minute: a standby's submission copies its blobs before the leader takes
        // the job (within a second, normally).
        let grace = orphan_ttl.max(Duration::from_secs(60));
        let before = crate::clock::now_ms()
            .saturating_sub(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
        let pg = pg.clone();
        e.sweeping = Some((
            epoch,
            tokio::spawn(async move {
                pg.stale_blobs(before, SHARED_SWEEP_BATCH)
                    .await
                    .map_err(|x| x.to_string())
            }),
        ));
    }

    /// The sweep's read ended: the blobs no held job references leave the shared store with
    /// the next commit, if this dispatcher still leads in the epoch the sweep began in.
    async fn swept(
        &mut self,
        epoch: u64,
        r: Result<Vec<crate::blobs::Stored>, String>,
    ) -> Result<(), DispatcherError> {
        let Some(e) = self.elected.as_mut() else {
            return Ok(());
        };
        if e.epoch != Some(epoch) || !self.core.leads() {
            return Ok(());
        }
        match r {
            Ok(old) => {
                let before = e.blob_deletes.len();
                for b in old {
                    if self.core.blob_refs(&b) == 0 && !e.blob_deletes.contains(&b.sha256) {
                        e.mirrored.remove(&b.sha256);
                        e.blob_deletes.push(b.sha256);
                    }
                }
                let n = e.blob_deletes.len() - before;
                if n > 0 {
                    info!(
                        blobs = n,
                        "shared store: blobs no job references, copied over blob_orphan_ttl ago, leave it"
                    );
                    // With a commit of their own if none is under way.
                    if self.in_flight.is_none() {
                        self.start_commit().await?;
                    }
                }
            }
            Err(x) => {
                warn!("shared store: the sweep of old blobs failed ({x}); it runs again later")
            }
        }
        Ok(())
    }

    fn read_submitted(&mut self) {
        let (Some(e), JobStore::Postgres(pg)) = (self.elected.as_mut(), &self.store) else {
            return;
        };
        if e.epoch.is_none() {
            return;
        }
        if e.reading.is_some() {
            e.read_again = true;
            return;
        }
        let (pg, blobs) = (pg.clone(), e.blobs.clone());
        e.reading = Some(tokio::spawn(async move {
            // Both on read connections of their own, at once.
            let (records, cancels) = tokio::join!(pg.submitted(), pg.cancels());
            let records = records.map_err(|x| x.to_string())?;
            let cancels = cancels.map_err(|x| x.to_string())?;
            let mut want: Vec<crate::blobs::Stored> =
                records.iter().flat_map(|j| j.blobs()).collect();
            want.sort_unstable_by_key(|s| s.sha256);
            want.dedup();
            pg.fetch_blobs(&want, &blobs)
                .await
                .map_err(|x| x.to_string())?;
            Ok((records, cancels))
        }));
    }

    /// A standby's submissions, whole in their notification: the leader takes them without a
    /// read — unless one references a blob, which this machine may lack (the read fetches
    /// it). A standby lets them be: the next leader reads them.
    async fn take_notified(&mut self, jobs: Vec<JobRecord>) {
        if self.elected.as_ref().is_none_or(|e| e.epoch.is_none()) {
            return;
        }
        if jobs.iter().any(|j| j.blobs().next().is_some()) {
            return self.read_submitted();
        }
        self.adopt(jobs, Vec::new()).await;
    }

    /// The read of the standbys' submissions ended: the leader takes the jobs
    /// ([`Core::adopt`]); their rows in the store's table of submissions go with the next
    /// commit. A failure is logged and the read made again at the next wake-up.
    async fn take_submitted(&mut self, read: Result<Submissions, String>) {
        let Some(e) = self.elected.as_mut() else {
            return;
        };
        if std::mem::take(&mut e.read_again) {
            self.read_submitted();
        }
        let (records, cancels) = match read {
            Ok(r) => r,
            Err(x) => {
                warn!("cannot read the jobs standbys stored: {x}");
                return;
            }
        };
        self.adopt(records, cancels).await;
    }

    /// Takes jobs standbys stored, and makes the cancels asked of them.
    async fn adopt(&mut self, records: Vec<JobRecord>, cancels: Vec<String>) {
        let Some(e) = self.elected.as_mut() else {
            return;
        };
        // Stood down meanwhile: the next leader takes them.
        if (records.is_empty() && cancels.is_empty()) || e.epoch.is_none() {
            return;
        }
        e.mirrored
            .extend(records.iter().flat_map(|j| j.blobs()).map(|s| s.sha256));
        e.adopted.extend(records.iter().map(|r| r.id.to_string()));
        let t = now();
        e.from_standbys.extend(self.core.adopt(records, t));
        // After the taking: a cancel may name a job just taken.
        self.core.cancel_for_standby(&cancels, t);
        e.cancelled.extend(cancels);
        if let Err(x) = self.flush().await {
            warn!("{x}");
        }
    }

    /// The lease this core's commits are conditional on (none when it always leads).
    fn fence(&self) -> Option<Fence> {
        let e = self.elected.as_ref()?;
        Some(Fence {
            holder: e.holder.clone(),
            epoch: e.epoch?,
        })
    }

    /// This process's part in the election changed: it leads now, or no longer.
    async fn on_leadership(&mut self) -> Result<(), DispatcherError> {
        let Some(e) = self.elected.as_mut() else {
            return Ok(());
        };
        let l = e.rx.borrow_and_update().clone();
        self.core.set_leader_hint(l.leader_jid().map(str::to_owned));
        match (e.epoch, l.epoch()) {
            (None, Some(epoch)) => self.lead(epoch).await,
            (Some(a), Some(b)) if a == b => Ok(()),
            (Some(a), Some(b)) => {
                self.stand_by(&format!(
                    "the lease of epoch {a} ran out before it was renewed"
                ))
                .await;
                self.lead(b).await
            }
            (Some(a), None) => {
                self.stand_by(&format!("the lease of epoch {a} ran out or was taken"))
                    .await;
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// Won the election with `epoch`: what the standby still had to store goes first, then
    /// the jobs are read from the store (every commit of the last leader is in it: its commits
    /// and this taking are ordered by the lease row's lock) and the core leads.
    async fn lead(&mut self, epoch: u64) -> Result<(), DispatcherError> {
        self.commit_all().await?;
        let started = Instant::now();
        let h = self.store.held().await?;
        let Some(e) = self.elected.as_mut() else {
            return Ok(());
        };
        e.epoch = Some(epoch);
        // Blobs the jobs reference that this machine lacks come from the shared store before
        // anything is placed (an agent fetches inputs from the leader).
        if let JobStore::Postgres(pg) = &self.store {
            let mut want: Vec<crate::blobs::Stored> =
                h.jobs.iter().flat_map(|j| j.blobs()).collect();
            want.sort_unstable_by_key(|s| s.sha256);
            want.dedup();
            e.mirrored = want.iter().map(|s| s.sha256).collect();
            let t0 = Instant::now();
            let (bytes, missing) = pg.fetch_blobs(&want, &e.blobs).await?;
            if bytes > 0 || !missing.is_empty() {
                info!(
                    bytes,
                    ms = t0.elapsed().as_millis() as u64,
                    missing = missing.len(),
                    "blobs copied from the shared store"
                );
            }
            for m in missing {
                e.mirrored.remove(&m.sha256);
                warn!(blob = %m.hex(), "a blob a job references is in neither this dispatcher's store nor the shared one");
            }
        }
        let fence = self.fence();
        recover_audit(self.audit.as_mut(), &self.store, fence).await?;
        let (jobs, unfinished) = (
            h.jobs.len(),
            h.jobs.iter().filter(|j| !j.state.is_final()).count(),
        );
        let t = now();
        self.core.lead(
            Restored {
                jobs: h.jobs,
                capabilities: h.capabilities,
                agents: h.agents,
                rules: h.rules,
            },
            t,
        );
        self.core.recover(Vec::new(), t);
        self.commit_all().await?;
        info!(
            epoch,
            jobs,
            unfinished,
            agents = self.core.agent_count(),
            load_ms = started.elapsed().as_millis() as u64,
            "leading: jobs loaded from the store, the fleet already known"
        );
        Ok(())
    }

    /// No longer leads: the core is replaced by a standby that greets the fleet afresh. What
    /// waited for a commit is dropped (HTTP callers get 503 `standby`; agents keep their
    /// outcomes for the next leader, which sends their jobs again, PROTOCOL.md §10).
    async fn stand_by(&mut self, why: &str) {
        let Some(e) = self.elected.as_mut() else {
            return;
        };
        warn!("no longer leading: {why}; standing by (the new leader goes on from the store)");
        e.epoch = None;
        e.mirrored.clear();
        e.blob_deletes.clear();
        e.adopted.clear();
        e.cancelled.clear();
        e.from_standbys.clear();
        if let Some(r) = e.reading.take() {
            r.abort();
        }
        if let Some((_, h)) = e.sweeping.take() {
            h.abort();
        }
        e.read_again = false;
        e.ahead = 0;
        e.ahead_committing = 0;
        self.in_flight = None;
        self.lazy_since = None;
        self.waiting.clear();
        self.audited.clear();
        let t = now();
        let mut core = Core::standby(
            e.cfg.clone(),
            e.policy.clone(),
            self.core.fleet_memory(),
            rand::rng().random(),
            t,
            Box::new(e.blobs.clone()),
        );
        if let Some(dp) = &e.data_plane {
            core.set_data_plane(dp.clone());
        }
        core.set_leader_hint(e.rx.borrow().leader_jid().map(str::to_owned));
        self.core = core;
        self.core.session_started(t);
    }
}
