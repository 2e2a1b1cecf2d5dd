//! The job store on PostgreSQL (`store = "postgres://…"`): the same tables and promises as the
//! embedded redb store (docs/dispatcher.md §5) — a batch of changes is one transaction,
//! committed (PostgreSQL's `synchronous_commit`, on by default: the WAL is flushed) before
//! anything it tells of leaves — on the database a web app already runs, and the ground the
//! several-dispatcher work stands on.
//!
//! - **Schema**: versioned SQL files in `dispatcher/migrations/`, compiled in and applied at
//!   start, each in a transaction, under an advisory lock (two dispatchers starting at once
//!   apply each once); `spine_migrations` records them. A database migrated by a newer Spine
//!   is refused rather than misread.
//! - **Writes**: a batch is one call of the function `spine_commit` (migration 10) in
//!   autocommit, its rows as arrays (`UNNEST`), prepared once per connection: one round trip
//!   and one transaction. Every write is an upsert or a delete by key, so a batch whose
//!   commit was cut off by a lost connection is simply written again on a new one.
//! - **Connection**: one, since the dispatcher commits one batch at a time. When it is lost,
//!   a commit reconnects (backing off up to 2 s) and retries for up to `store_timeout`; beyond
//!   that the dispatcher stops rather than acknowledge what it did not store.
//! - **TLS**: off loopback, the URL must say `sslmode=require`; the server's certificate is
//!   then verified (rustls with ring) against the system's roots or `store_ca`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spine_protocol::CapabilityName;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::{decode_job, OwnedBatch, StoreError};
use crate::blobs::Stored;
use crate::core::rates::RateUse;
use crate::core::{EventKind, JobEvent};
use crate::election::{Answer, Ask};
use crate::jobs::JobRecord;

/// The schema, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "jobs", include_str!("../../migrations/0001_jobs.sql")),
    (2, "lease", include_str!("../../migrations/0002_lease.sql")),
    (
        3,
        "leader contact",
        include_str!("../../migrations/0003_leader_contact.sql"),
    ),
    (4, "blobs", include_str!("../../migrations/0004_blobs.sql")),
    (
        5,
        "submitted",
        include_str!("../../migrations/0005_submitted.sql"),
    ),
    (
        6,
        "cancels",
        include_str!("../../migrations/0006_cancels.sql"),
    ),
    (7, "rules", include_str!("../../migrations/0007_rules.sql")),
    (
        8,
        "byte-order keys",
        include_str!("../../migrations/0008_byte_order_keys.sql"),
    ),
    (
        9,
        "audit batches",
        include_str!("../../migrations/0009_audit_batches.sql"),
    ),
    (
        10,
        "commit function",
        include_str!("../../migrations/0010_commit_function.sql"),
    ),
];

/// The channel a standby notifies when it stored a submission for the leader, with the jobs
/// ([`submitted_payloads`]); an empty payload (a cancel asked of a standby) only wakes the
/// leader to read. `spine_commit` (migration 10) names it too.
const SUBMITTED: &str = "spine_submitted";
/// The channel the leader notifies with the jobs that ended ([`ended_payloads`]);
/// `spine_commit` (migration 10) names it too.
const ENDED: &str = "spine_ended";
/// The channel the leader relays its jobs' progress and partial results on, for the event
/// streams of standbys ([`relay_payloads`]).
const EVENTS: &str = "spine_events";
/// The channel every dispatcher tells the others on what it charged to submitters' rate
/// budgets ([`rate_payloads`], [`crate::core::rates`]).
const RATES: &str = "spine_rates";
/// Bytes of one notification of [`EVENTS`] or [`ENDED`] (PostgreSQL's limit is 8000).
const RELAY_PAYLOAD: usize = 7900;

/// Connections for reads ([`PgStore::job`] and the like).
const READERS: usize = 4;

/// Bytes of a blob per row of `spine_blob_chunks`.
const BLOB_CHUNK: usize = 1 << 20;

/// The advisory lock held while migrations run (any fixed number; "spine" in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_7069_6e65;

fn e(x: impl std::fmt::Display) -> StoreError {
    StoreError(x.to_string())
}

/// A parsed `store` URL, checked: where it points (without the password) and whether TLS
/// is required for it.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    /// host:port/db, for messages.
    name: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "PgTarget({})", self.name)
    }
}

impl PgTarget {
    /// Parses `url` (a `postgres://` URL or a `key=value` string, as libpq takes) with the
    /// password from `password` if given. Off loopback the URL must require TLS.
    pub fn parse(url: &str, password: Option<&str>) -> Result<PgTarget, String> {
        let mut config = tokio_postgres::Config::from_str(url).map_err(|x| {
            format!(
                "not a PostgreSQL URL ({x}); for example \"postgres://spine@127.0.0.1:5432/spine\""
            )
        })?;
        if let Some(p) = password {
            config.password(p);
        }
        if config.get_user().is_none() {
            return Err("names no user: \"postgres://USER@host/db\"".into());
        }
        let hosts = config.get_hosts();
        if hosts.is_empty() {
            return Err("names no host: \"postgres://user@HOST:5432/db\"".into());
        }
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or_default()
            .to_owned();
        let mut remote = Vec::new();
        let mut names = Vec::new();
        for h in hosts {
            match h {
                Host::Tcp(name) => {
                    if !is_loopback(name) {
                        remote.push(name.clone());
                    }
                    names.push(format!("{name}:{port}"));
                }
                Host::Unix(dir) => names.push(format!("{}", dir.display())),
            }
        }
        if !remote.is_empty() && config.get_ssl_mode() != SslMode::Require {
            return Err(format!(
                "{} is not on loopback: add sslmode=require to the URL (\"…/{db}?sslmode=require\"); the server's certificate is verified against the system's roots, or store_ca",
                remote.join(", ")
            ));
        }
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("spine-dispatcher");
        Ok(PgTarget {
            config,
            name: format!("{}/{db}", names.join(",")),
        })
    }

    /// host:port/database (no user, no password).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What [`PgStore::read_jobs`] reads.
enum Read<'a> {
    Job(&'a str),
    Key(&'a [u8]),
    Submitted,
}

/// The prepared statements of one connection.
struct Statements {
    read_jobs: Statement,
    read_key: Statement,
    read_submitted: Statement,
    read_cancels: Statement,
    take: Statement,
    leader: Statement,
    renew: Statement,
    release: Statement,
    /// A batch's writes: `spine_commit` (migration 10).
    commit: Statement,
}

struct Conn {
    client: Client,
    st: Statements,
}

/// The store (see the module documentation).
pub struct PgStore {
    target: PgTarget,
    tls: MakeRustlsConnect,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// The election's own connection: a commit retrying through an outage holds `conn`, and
    /// must not keep a leader from renewing (or a standby from asking) meanwhile.
    lease_conn: tokio::sync::Mutex<Option<Conn>>,
    /// Blob copies' own connection: a large blob takes a while, and must not hold the
    /// election up, nor the commits of jobs that need no blob.
    blob_conn: tokio::sync::Mutex<Option<Conn>>,
    /// Connections for reads of single jobs and of the standbys' submissions (a standby's
    /// status answers and waits, the leader's taking of submissions), taken in turn, so that
    /// they neither wait behind a commit nor behind one another. (Four slots with the same
    /// reconnection as the others rather than a pool crate: what a slot holds besides the
    /// client — its prepared statements — is this store's.)
    read_conns: [tokio::sync::Mutex<Option<Conn>>; READERS],
    next_read: std::sync::atomic::AtomicUsize,
    /// How long a commit keeps trying to reach the database.
    timeout: Duration,
    /// The election's lease: no session may sit in a transaction, or wait for a lock, longer
    /// (see [`PgStore::connect_client`]).
    lease: Duration,
    /// Set while the database cannot be reached: from a lost connection or a failed commit
    /// until a connection is made again ([`PgStore::watch`]).
    down: Arc<AtomicBool>,
}

/// A commit of a leader whose lease row names another holder or epoch: it stored nothing.
pub const DEPOSED: &str = "deposed";

/// The SQLSTATE `spine_commit` raises when the lease no longer names the caller (migration
/// 10).
const DEPOSED_CODE: &str = "SP001";
/// The SQLSTATE `spine_commit` raises when an idempotency key names another job.
const KEY_TAKEN_CODE: &str = "SP002";

/// Who holds the lease row, read by [`PgStore::leader`].
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderRow {
    /// The holder's id ("" when the row is free).
    pub holder: String,
    /// The epoch of the last taking.
    pub epoch: u64,
    /// The holder's HTTP API base URL ("" if it has none).
    pub url: String,
    /// The holder's XMPP full JID.
    pub jid: String,
    /// Milliseconds until the lease runs out, in the database's clock (negative: ran out, or
    /// free).
    pub expires_in_ms: f64,
}

/// How a candidate can be reached, written into the row when it takes it.
#[derive(Debug, Clone, Default)]
pub struct Contact {
    /// Its HTTP API base URL ("" if it has none).
    pub url: String,
    /// Its XMPP full JID.
    pub jid: String,
}

impl PgStore {
    /// Connects, applies the migrations this build has and the database lacks, and prepares
    /// the statements.
    pub async fn open(
        target: PgTarget,
        tls: tokio_rustls::rustls::ClientConfig,
        timeout: Duration,
        lease: Duration,
    ) -> Result<PgStore, StoreError> {
        let store = PgStore {
            lease,
            target,
            tls: MakeRustlsConnect::new(tls),
            conn: tokio::sync::Mutex::new(None),
            lease_conn: tokio::sync::Mutex::new(None),
            blob_conn: tokio::sync::Mutex::new(None),
            read_conns: Default::default(),
            next_read: Default::default(),
            timeout,
            down: Arc::default(),
        };
        // A dispatcher that starts before its database (boot order) waits for it.
        let started = Instant::now();
        let mut pause = Duration::from_millis(200);
        let mut client = loop {
            match store.connect_client().await {
                Ok(c) => break c,
                Err(x) if started.elapsed() + pause < store.timeout => {
                    warn!("cannot reach PostgreSQL yet, trying again in {pause:?}: {x}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(x) => return Err(x),
            }
        };
        migrate(&mut client)
            .await
            .map_err(|x| e(format!("{}: applying the schema: {x}", store.target.name)))?;
        let st = prepare(&client).await.map_err(|x| store.err(x))?;
        *store.conn.lock().await = Some(Conn { client, st });
        Ok(store)
    }

    /// Set while the database cannot be reached.
    pub fn health(&self) -> Arc<AtomicBool> {
        self.down.clone()
    }

    /// While the database cannot be reached, tries to connect every half second, and clears
    /// [`PgStore::health`] when it can (a commit that succeeds clears it too); ends with the
    /// store.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(store) = weak.upgrade() else { return };
                if !store.down.load(Ordering::Relaxed) {
                    continue;
                }
                let mut slot = store.conn.lock().await;
                let ok = match store.live(&mut slot).await {
                    Ok(c) => c.client.simple_query("SELECT 1").await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    info!(store = %store.target.name, "PostgreSQL can be reached again");
                    store.down.store(false, Ordering::Relaxed);
                }
            }
        });
    }

    /// Where it is (no password), for logs.
    pub fn name(&self) -> &str {
        self.target.name()
    }

    fn err(&self, x: tokio_postgres::Error) -> StoreError {
        e(format!("{}: {}", self.target.name, describe(&x)))
    }

    /// A new session. A leader's commit holds the lease row (FOR SHARE) until it ends; a
    /// leader paused mid-transaction (SIGSTOP, a VM frozen) would thus keep every standby from
    /// taking over for as long as it stays paused. So no session may sit idle in a transaction
    /// longer than the lease (PostgreSQL then ends it, which rolls it back), and none waits
    /// longer than that for a lock (the question fails, and is asked again).
    async fn connect_client(&self) -> Result<Client, StoreError> {
        let (client, connection) = self
            .target
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|x| self.err(x))?;
        let name = self.target.name.clone();
        let down = self.down.clone();
        tokio::spawn(async move {
            if let Err(x) = connection.await {
                warn!(store = %name, "PostgreSQL connection ended: {}", describe(&x));
                down.store(true, Ordering::Relaxed);
            }
        });
        let ms = self.lease.as_millis().max(100);
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {ms}; SET lock_timeout = {ms}"
            ))
            .await
            .map_err(|x| self.err(x))?;
        Ok(client)
    }

    /// A live connection, made again if it was lost.
    async fn live<'a>(&self, slot: &'a mut Option<Conn>) -> Result<&'a mut Conn, StoreError> {
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = None;
            // Boxed: connecting is rare and its future large (the TLS and protocol
            // handshakes, the statements prepared), and every future awaiting `live` —
            // an HTTP request's read of a job at a standby, say — would carry it inline.
            let conn = Box::pin(async {
                let client = self.connect_client().await?;
                let st = prepare(&client).await.map_err(|x| self.err(x))?;
                Ok::<_, StoreError>(Conn { client, st })
            })
            .await?;
            info!(store = %self.target.name, "connected to PostgreSQL again");
            *slot = Some(conn);
        }
        slot.as_mut().ok_or_else(|| e("no connection"))
    }

    /// Stores one batch in one transaction (see [`super::Store::commit`]). A lost connection
    /// is made again and the batch written again (every write is by key), for up to the
    /// store's timeout.
    pub async fn commit(&self, b: &OwnedBatch) -> Result<(), StoreError> {
        if b.is_empty() {
            return Ok(());
        }
        let fence = b
            .fence
            .as_ref()
            .map(|f| (f.holder.clone(), i64::try_from(f.epoch).unwrap_or(i64::MAX)));
        // The blobs the batch's jobs reference are in the database before the jobs are.
        self.put_blobs(&b.blobs).await?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        let mut slot = self.conn.lock().await;
        loop {
            let attempt = match self.live(&mut slot).await {
                Ok(c) => match write(c, b, fence.as_ref()).await {
                    Ok(Written::Stored) => Ok(()),
                    Ok(Written::KeyTaken) => {
                        return Err(e(
                            "an idempotency key of this batch names another job, which another dispatcher accepted meanwhile; nothing of this commit was stored",
                        ));
                    }
                    Ok(Written::Deposed) => {
                        let (holder, epoch) = fence.clone().unwrap_or_default();
                        return Err(e(format!(
                            "{DEPOSED}: the lease is no longer {holder}'s at epoch {epoch}; nothing of this commit was stored"
                        )));
                    }
                    Err(x) => {
                        let lost = c.client.is_closed();
                        Err((self.err(x), lost))
                    }
                },
                // Could not connect: the database is down or unreachable.
                Err(x) => Err((x, true)),
            };
            match attempt {
                Ok(()) => {
                    self.down.store(false, Ordering::Relaxed);
                    return Ok(());
                }
                Err((x, true)) if started.elapsed() + pause < self.timeout => {
                    self.down.store(true, Ordering::Relaxed);
                    warn!(store = %self.target.name, "commit failed, trying again in {pause:?}: {x}");
                    *slot = None;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err((x, _)) => return Err(x),
            }
        }
    }

    /// Asks the lease row ([`crate::election`]) as `holder`, with a lease of `lease`; the
    /// answer. A taking writes `contact` into the row, for standbys to name the leader. Runs
    /// on a connection of its own, so that a commit retrying through an outage does not hold
    /// the election up. (A leader's commits name their epoch: [`OwnedBatch::fence`].)
    pub async fn lease(
        &self,
        holder: &str,
        ask: Ask,
        lease: Duration,
        contact: &Contact,
    ) -> Answer {
        let ms = lease.as_secs_f64() * 1e3;
        let mut slot = self.lease_conn.lock().await;
        let c = match self.live(&mut slot).await {
            Ok(c) => c,
            Err(x) => {
                warn!(store = %self.target.name, "lease: {x}");
                return Answer::Failed;
            }
        };
        let epoch_of = |e: u64| i64::try_from(e).unwrap_or(i64::MAX);
        let rows = match ask {
            Ask::Take => {
                c.client
                    .query(&c.st.take, &[&holder, &ms, &contact.url, &contact.jid])
                    .await
            }
            Ask::Renew { epoch } => {
                c.client
                    .query(&c.st.renew, &[&holder, &epoch_of(epoch), &ms])
                    .await
            }
            Ask::Release { epoch } => {
                c.client
                    .query(&c.st.release, &[&holder, &epoch_of(epoch)])
                    .await
            }
        };
        let rows = match rows {
            Ok(r) => r,
            Err(x) => {
                warn!(store = %self.target.name, "lease: {}", describe(&x));
                return Answer::Failed;
            }
        };
        let got: Option<i64> = rows.first().map(|r| r.get(0));
        match (ask, got) {
            (Ask::Take, Some(e)) => Answer::Took {
                epoch: e.max(0) as u64,
            },
            (Ask::Take, None) => Answer::HeldByOther,
            (Ask::Renew { .. }, Some(_)) => Answer::Renewed,
            (Ask::Release { .. }, Some(_)) => Answer::Released,
            (_, None) => Answer::Lost,
        }
    }

    /// A stored job, with its input (a standby's answer to a status request).
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.read_jobs(Read::Job(id)).await.map(|mut v| v.pop())
    }

    /// The job an idempotency key of a submitter created, if it is stored.
    pub async fn idempotent(
        &self,
        submitter: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, StoreError> {
        let k = format!("{submitter}\u{0}{key}").into_bytes();
        self.read_jobs(Read::Key(&k)).await.map(|mut v| v.pop())
    }

    /// The jobs standbys accepted that the leader has not taken yet ([`OwnedBatch::adopted`]),
    /// the oldest first, a thousand at most.
    pub async fn submitted(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read_jobs(Read::Submitted).await
    }

    /// Asks the leader to cancel `job` (a standby's cancel): stored, then the leader is woken
    /// (`spine_submitted`).
    pub async fn request_cancel(&self, job: &str) -> Result<(), StoreError> {
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % READERS;
        let mut slot = self.read_conns[i].lock().await;
        let c = self.live(&mut slot).await?;
        let now = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX);
        let tx = c.client.transaction().await.map_err(|x| self.err(x))?;
        tx.execute(
            "INSERT INTO spine_cancels (job, at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&job, &now],
        )
        .await
        .map_err(|x| self.err(x))?;
        tx.execute("SELECT pg_notify($1, '')", &[&SUBMITTED])
            .await
            .map_err(|x| self.err(x))?;
        tx.commit().await.map_err(|x| self.err(x))
    }

    /// Relays events to the standbys' event streams ([`EVENTS`]; payloads of
    /// [`relay_payloads`]), in one statement.
    pub async fn relay(&self, payloads: &[String]) -> Result<(), StoreError> {
        self.notify_all(EVENTS, payloads).await
    }

    /// Tells the other dispatchers what this one charged to rate budgets ([`RATES`];
    /// payloads of [`rate_payloads`]).
    pub async fn share_rates(&self, payloads: &[String]) -> Result<(), StoreError> {
        self.notify_all(RATES, payloads).await
    }

    /// Notifies `channel` with each of `payloads`, in order, in one statement.
    async fn notify_all(&self, channel: &str, payloads: &[String]) -> Result<(), StoreError> {
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % READERS;
        let mut slot = self.read_conns[i].lock().await;
        let c = self.live(&mut slot).await?;
        c.client
            .execute(
                "SELECT pg_notify($1, p) FROM UNNEST($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n",
                &[&channel, &payloads],
            )
            .await
            .map_err(|x| self.err(x))?;
        Ok(())
    }

    /// The cancels standbys were asked for that the leader has not made yet.
    pub async fn cancels(&self) -> Result<Vec<String>, StoreError> {
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % READERS;
        let mut slot = self.read_conns[i].lock().await;
        let c = self.live(&mut slot).await?;
        Ok(c.client
            .query(&c.st.read_cancels, &[])
            .await
            .map_err(|x| self.err(x))?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Blobs in the shared store copied before `before_ms` (ms since the UNIX epoch), at most
    /// `limit` of them: what the leader's sweep looks at (a blob copied for a commit that then
    /// failed is referenced by no job, and nothing else would delete it).
    pub async fn stale_blobs(&self, before_ms: u64, limit: i64) -> Result<Vec<Stored>, StoreError> {
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % READERS;
        let mut slot = self.read_conns[i].lock().await;
        let c = self.live(&mut slot).await?;
        let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
        let rows = c
            .client
            .query(
                "SELECT sha256, size FROM spine_blobs WHERE stored_ms < $1 LIMIT $2",
                &[&before, &limit],
            )
            .await
            .map_err(|x| self.err(x))?;
        rows.iter()
            .map(|r| {
                let sha: &[u8] = r.get(0);
                let sha256 = <[u8; 32]>::try_from(sha)
                    .map_err(|_| e(format!("spine_blobs: a name of {} bytes", sha.len())))?;
                let size = u64::try_from(r.get::<_, i64>(1)).unwrap_or(0);
                Ok(Stored { sha256, size })
            })
            .collect()
    }

    /// Reads jobs on a read connection, each by its primary key (prepared statements, no
    /// scan of the jobs' table however large it is).
    async fn read_jobs(&self, what: Read<'_>) -> Result<Vec<JobRecord>, StoreError> {
        let i = self.next_read.fetch_add(1, Ordering::Relaxed) % READERS;
        let mut slot = self.read_conns[i].lock().await;
        let c = self.live(&mut slot).await?;
        let ids: Vec<String> = match what {
            Read::Job(id) => vec![id.to_owned()],
            Read::Key(k) => c
                .client
                .query(&c.st.read_key, &[&k])
                .await
                .map_err(|x| self.err(x))?
                .iter()
                .map(|r| r.get(0))
                .collect(),
            Read::Submitted => c
                .client
                .query(&c.st.read_submitted, &[])
                .await
                .map_err(|x| self.err(x))?
                .iter()
                .map(|r| r.get(0))
                .collect(),
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = c
            .client
            .query(&c.st.read_jobs, &[&ids])
            .await
            .map_err(|x| self.err(x))?;
        rows.iter()
            .map(|row| decode_job(row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    /// Wakes `tx` whenever a standby stored a submission (the `spine_submitted` channel), on
    /// a connection of its own, made again when lost; also once a second and after each
    /// reconnection, so a notification lost with a connection delays a job by a second at
    /// most. Sends on `ended` the id of each job the leader announces ended (`spine_ended`),
    /// for the callers a standby has waiting; on `rates` what the other dispatchers charged
    /// to rate budgets (`spine_rates`, its own reports, from `rates.0`, left out).
    ///
    /// The ends and events are for a standby's callers: while `leadership` says this
    /// dispatcher leads, the connection does not listen to them (they are its own, and its
    /// callers hear of them directly), and PostgreSQL does not send them to it. Whenever it
    /// begins to listen to them (standing by again, or on a new connection), it sends
    /// [`Ended::Missed`] on `ended`: what was announced before may not have been heard.
    pub(crate) fn listen(
        self: &Arc<Self>,
        tx: tokio::sync::mpsc::Sender<()>,
        ended: tokio::sync::broadcast::Sender<Ended>,
        relayed: tokio::sync::broadcast::Sender<JobEvent>,
        taken: tokio::sync::mpsc::Sender<Vec<JobRecord>>,
        rates: (String, tokio::sync::mpsc::Sender<Vec<RateUse>>),
        leadership: tokio::sync::watch::Receiver<crate::leadership::Leadership>,
    ) {
        let weak = Arc::downgrade(self);
        let leads = |l: &tokio::sync::watch::Receiver<crate::leadership::Leadership>| {
            matches!(l.borrow().role, crate::election::Role::Leader { .. })
        };
        let standby_listen = format!("LISTEN {ENDED}; LISTEN {EVENTS}");
        tokio::spawn(async move {
            loop {
                let Some(store) = weak.upgrade() else { return };
                let conn = store.target.config.connect(store.tls.clone()).await;
                drop(store);
                let (client, mut connection) = match conn {
                    Ok(c) => c,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
                let heard = ended.clone();
                let (ended, relayed, taken) = (ended.clone(), relayed.clone(), taken.clone());
                let (me, rates_tx) = (rates.0.clone(), rates.1.clone());
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(m)) = futures::StreamExt::next(&mut messages).await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = m {
                            if n.channel() == ENDED {
                                // No standby waiting is fine.
                                let _ = ended.send(Ended::Jobs(Arc::from(n.payload())));
                            } else if n.channel() == RATES {
                                let uses = rates_reported(n.payload(), &me);
                                // A report lost to a full queue: the budget is a little
                                // looser for a moment.
                                if !uses.is_empty() {
                                    let _ = rates_tx.try_send(uses);
                                }
                            } else if n.channel() == EVENTS {
                                for ev in relayed_events(n.payload()) {
                                    // No stream open is fine.
                                    let _ = relayed.send(ev);
                                }
                            } else if n.channel() == SUBMITTED && !n.payload().is_empty() {
                                // The jobs, when the payload holds them whole: the leader
                                // takes them without a read. Any other line: it reads.
                                let (jobs, whole) = submitted_jobs(n.payload());
                                if !jobs.is_empty() && taken.try_send(jobs).is_err() {
                                    let _ = ntx.send(());
                                }
                                if !whole {
                                    let _ = ntx.send(());
                                }
                            } else {
                                let _ = ntx.send(());
                            }
                        }
                    }
                });
                let mut leadership = leadership.clone();
                let mut following = !leads(&leadership);
                let mut sql = format!("LISTEN {SUBMITTED}; LISTEN {RATES}");
                if following {
                    sql = format!("{sql}; {standby_listen}");
                }
                if client.batch_execute(&sql).await.is_ok() {
                    if following {
                        let _ = heard.send(Ended::Missed);
                    }
                    let _ = tx.try_send(());
                    let mut watching = true;
                    loop {
                        tokio::select! {
                            n = nrx.recv() => if n.is_none() { break },
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            changed = leadership.changed(), if watching => {
                                watching = changed.is_ok();
                                let follow = !leads(&leadership);
                                if follow != following {
                                    let sql = if follow {
                                        standby_listen.clone()
                                    } else {
                                        format!("UNLISTEN {ENDED}; UNLISTEN {EVENTS}")
                                    };
                                    if client.batch_execute(&sql).await.is_err() {
                                        break;
                                    }
                                    following = follow;
                                    if follow {
                                        let _ = heard.send(Ended::Missed);
                                    }
                                }
                                continue;
                            }
                        }
                        if tx.is_closed() {
                            return;
                        }
                        let _ = tx.try_send(());
                    }
                }
                driver.abort();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Copies blobs into the database (`spine_blobs`, `spine_blob_chunks`) unless it has them,
    /// reading their local files a MiB at a time; each blob in one transaction, its
    /// `spine_blobs` row last. A file that is gone is skipped with a warning (its job then
    /// fails on the next leader as it would here). The bytes copied.
    pub async fn put_blobs(&self, blobs: &[(Stored, PathBuf)]) -> Result<u64, StoreError> {
        use tokio::io::AsyncReadExt as _;
        if blobs.is_empty() {
            return Ok(0);
        }
        let mut slot = self.blob_conn.lock().await;
        let c = self.live(&mut slot).await?;
        let shas: Vec<&[u8]> = blobs.iter().map(|(s, _)| &s.sha256[..]).collect();
        let have: HashSet<Vec<u8>> = c
            .client
            .query(
                "SELECT sha256 FROM spine_blobs WHERE sha256 = ANY($1)",
                &[&shas],
            )
            .await
            .map_err(|x| self.err(x))?
            .iter()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .collect();
        let mut copied = 0;
        let mut buf = vec![0u8; BLOB_CHUNK];
        for (s, path) in blobs {
            if have.contains(&s.sha256[..]) {
                continue;
            }
            let mut f = match tokio::fs::File::open(path).await {
                Ok(f) => f,
                Err(x) => {
                    warn!(blob = %s.hex(), path = %path.display(), "cannot copy a blob to PostgreSQL: {x}");
                    continue;
                }
            };
            let tx = c.client.transaction().await.map_err(|x| self.err(x))?;
            let mut n: i32 = 0;
            loop {
                let mut filled = 0;
                while filled < buf.len() {
                    let k = f
                        .read(&mut buf[filled..])
                        .await
                        .map_err(|x| e(format!("{}: {x}", path.display())))?;
                    if k == 0 {
                        break;
                    }
                    filled += k;
                }
                if filled == 0 && n > 0 {
                    break;
                }
                tx.execute(
                    "INSERT INTO spine_blob_chunks (sha256, n, data) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                    &[&&s.sha256[..], &n, &&buf[..filled]],
                )
                .await
                .map_err(|x| self.err(x))?;
                n += 1;
                if filled < buf.len() {
                    break;
                }
            }
            let size = i64::try_from(s.size).unwrap_or(i64::MAX);
            let now = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX);
            tx.execute(
                "INSERT INTO spine_blobs (sha256, size, stored_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&&s.sha256[..], &size, &now],
            )
            .await
            .map_err(|x| self.err(x))?;
            tx.commit().await.map_err(|x| self.err(x))?;
            copied += s.size;
        }
        Ok(copied)
    }

    /// The size of blob `sha256` in the database, if it is there (its row is written with its
    /// chunks, in one transaction: [`PgStore::put_blobs`]).
    pub async fn blob_size(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        let mut slot = self.blob_conn.lock().await;
        let c = self.live(&mut slot).await?;
        let sha: &[u8] = sha256;
        let row = c
            .client
            .query_opt("SELECT size FROM spine_blobs WHERE sha256 = $1", &[&sha])
            .await
            .map_err(|x| self.err(x))?;
        Ok(row.map(|r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
    }

    /// Copies into `local` the blobs of `want` it lacks, from the database, each checked
    /// against its size and SHA-256. The bytes copied, and the blobs the database lacks too.
    pub async fn fetch_blobs(
        &self,
        want: &[Stored],
        local: &crate::blobs::BlobStore,
    ) -> Result<(u64, Vec<Stored>), StoreError> {
        use futures::TryStreamExt as _;
        let mut slot = self.blob_conn.lock().await;
        let c = self.live(&mut slot).await?;
        let mut bytes = 0;
        let mut missing = Vec::new();
        for s in want {
            if local.contains(&s.sha256) {
                continue;
            }
            let sha: &[u8] = &s.sha256;
            let rows = c
                .client
                .query_raw(
                    "SELECT data FROM spine_blob_chunks WHERE sha256 = $1 ORDER BY n",
                    [sha],
                )
                .await
                .map_err(|x| self.err(x))?;
            futures::pin_mut!(rows);
            let blob_err = |x: crate::blobs::BlobError| e(format!("blob {}: {x}", s.hex()));
            let mut w = local.writer(Some(s.size)).map_err(blob_err)?;
            let mut any = false;
            while let Some(row) = rows.try_next().await.map_err(|x| self.err(x))? {
                let data: &[u8] = row.get(0);
                w.write(data).await.map_err(blob_err)?;
                any = true;
            }
            if !any {
                missing.push(*s);
                continue;
            }
            w.finish(Some((s.size, s.sha256))).await.map_err(blob_err)?;
            bytes += s.size;
        }
        Ok((bytes, missing))
    }

    /// Who holds the lease row now (on the election's connection).
    pub async fn leader(&self) -> Result<LeaderRow, StoreError> {
        let mut slot = self.lease_conn.lock().await;
        let c = self.live(&mut slot).await?;
        let row = c
            .client
            .query_one(&c.st.leader, &[])
            .await
            .map_err(|x| self.err(x))?;
        Ok(LeaderRow {
            holder: row.get(0),
            epoch: row.get::<_, i64>(1).max(0) as u64,
            url: row.get(2),
            jid: row.get(3),
            expires_in_ms: row.get(4),
        })
    }

    /// Every stored job, with its input.
    pub async fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut slot = self.conn.lock().await;
        let c = self.live(&mut slot).await?;
        let mut inputs: HashMap<String, Vec<u8>> = HashMap::new();
        for row in c
            .client
            .query("SELECT id, input FROM spine_inputs", &[])
            .await
            .map_err(|x| self.err(x))?
        {
            inputs.insert(row.get(0), row.get(1));
        }
        let rows = c
            .client
            .query("SELECT id, record FROM spine_jobs", &[])
            .await
            .map_err(|x| self.err(x))?;
        rows.iter()
            .map(|row| {
                let id: &str = row.get(0);
                let record: &[u8] = row.get(1);
                decode_job(id, record, inputs.remove(id))
            })
            .collect()
    }

    /// Every agent (bare JID) seen, with when (ms).
    pub async fn agents(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.query("SELECT jid, seen_ms FROM spine_agents").await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect())
    }

    /// The event rules made over the HTTP API.
    pub async fn rules(&self) -> Result<Vec<crate::triggers::RuleConfig>, StoreError> {
        let rows = self
            .query("SELECT name, config FROM spine_rules ORDER BY name")
            .await?;
        rows.iter()
            .map(|r| super::decode_rule(r.get::<_, &str>(0), r.get::<_, &[u8]>(1)))
            .collect()
    }

    /// Every capability an agent has offered.
    pub async fn known_capabilities(&self) -> Result<Vec<CapabilityName>, StoreError> {
        let rows = self.query("SELECT name FROM spine_capabilities").await?;
        rows.iter()
            .map(|r| {
                let name: &str = r.get(0);
                name.parse().map_err(|x: String| {
                    e(format!(
                        "spine_capabilities: '{name}' is not a capability name: {x}"
                    ))
                })
            })
            .collect()
    }

    /// The audit lines stored but perhaps not yet in the audit file, in the order they were
    /// stored, one per job: the rows an earlier version left in the outbox, then the batches.
    pub async fn audit_outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let rows = self
            .query(
                "SELECT job, line FROM (\
                   SELECT 0::bigint AS n, 0::bigint AS k, job, line FROM spine_audit_outbox \
                   UNION ALL \
                   SELECT b.n, u.k, u.job, u.line FROM spine_audit_batches b, \
                     UNNEST(b.jobs, b.lines) WITH ORDINALITY AS u(job, line, k)\
                 ) AS t ORDER BY n, k",
            )
            .await?;
        let lines = rows.iter().map(|r| (r.get::<_, String>(0), r.get(1)));
        Ok(one_per_job(lines))
    }

    async fn query(&self, sql: &str) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let mut slot = self.conn.lock().await;
        let c = self.live(&mut slot).await?;
        c.client.query(sql, &[]).await.map_err(|x| self.err(x))
    }
}

/// Drops every table (and the function) of Spine's schema from the database `target` names,
/// so that the next dispatcher starts on an empty store: for benchmarks and tests on a
/// scratch database.
pub async fn drop_schema(target: &PgTarget) -> Result<(), StoreError> {
    let (client, task) = scratch_connection(target).await?;
    let r = client
        .batch_execute(
            "DROP TABLE IF EXISTS spine_jobs, spine_inputs, spine_idempotency, spine_agents, \
             spine_capabilities, spine_audit_outbox, spine_audit_batches, spine_lease, spine_blobs, \
             spine_blob_chunks, spine_submitted, spine_cancels, spine_rules, spine_migrations; \
             DROP FUNCTION IF EXISTS spine_commit",
        )
        .await
        .map_err(|x| e(format!("{}: {}", target.name, describe(&x))));
    drop(client);
    let _ = task.await;
    r
}

/// A connection of its own to `target` (for [`drop_schema`], [`server_process`]), and the
/// task that drives it, which ends once the client is dropped.
async fn scratch_connection(
    target: &PgTarget,
) -> Result<
    (
        Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    StoreError,
> {
    let tls = MakeRustlsConnect::new(
        spine_tls::client_config_for_ca_file(None).map_err(|x| e(x.to_string()))?,
    );
    let (client, connection) = target
        .config
        .connect(tls)
        .await
        .map_err(|x| e(format!("{}: {}", target.name, describe(&x))))?;
    Ok((client, tokio::spawn(connection)))
}

/// The PostgreSQL server's main process (the postmaster) when it runs on this machine and
/// `/proc` shows it: the parent of this connection's backend. For benchmarks that count the
/// database's CPU beside the dispatchers'. None for a server elsewhere.
pub async fn server_process(target: &PgTarget) -> Result<Option<u32>, StoreError> {
    let (client, task) = scratch_connection(target).await?;
    let r = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|x| e(format!("{}: {}", target.name, describe(&x))))
        // Read while the backend lives (it ends with the connection).
        .map(|row| parent_of(row.get::<_, i32>(0)));
    drop(client);
    let _ = task.await;
    r
}

/// The parent of process `pid` on this machine, from `/proc/<pid>/stat` (None if it is not
/// here, or not a PostgreSQL process).
fn parent_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (name, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
    if !name.starts_with("postgres") {
        return None;
    }
    // After the name: state, then the parent's id.
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// An error with PostgreSQL's own message and code when it has them (the `Display` of
/// tokio-postgres says only "db error").
fn describe(x: &tokio_postgres::Error) -> String {
    match x.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => x.to_string(),
    }
}

async fn prepare(c: &Client) -> Result<Statements, tokio_postgres::Error> {
    Ok(Statements {
        read_jobs: c
            .prepare(
                "SELECT j.id, j.record, i.input FROM spine_jobs j \
                 LEFT JOIN spine_inputs i ON i.id = j.id WHERE j.id = ANY($1::text[])",
            )
            .await?,
        read_key: c
            .prepare("SELECT job FROM spine_idempotency WHERE key = $1")
            .await?,
        read_submitted: c
            .prepare("SELECT id FROM spine_submitted ORDER BY at_ms LIMIT 1000")
            .await?,
        read_cancels: c
            .prepare("SELECT job FROM spine_cancels ORDER BY at_ms LIMIT 1000")
            .await?,
        // The lease row (migration 2), in the database's clock (`clock_timestamp`, not the
        // transaction's start).
        take: c
            .prepare(
                "UPDATE spine_lease SET holder = $1, epoch = epoch + 1, \
                 expires_at = clock_timestamp() + $2::float8 * interval '1 millisecond', \
                 url = $3, jid = $4 \
                 WHERE name = 'leader' AND (holder = '' OR holder = $1 OR expires_at <= clock_timestamp()) \
                 RETURNING epoch",
            )
            .await?,
        leader: c
            .prepare(
                "SELECT holder, epoch, url, jid, \
                 CASE WHEN holder = '' OR expires_at = '-infinity' THEN -1::float8 \
                 ELSE EXTRACT(EPOCH FROM (expires_at - clock_timestamp()))::float8 * 1000 END \
                 FROM spine_lease WHERE name = 'leader'",
            )
            .await?,
        renew: c
            .prepare(
                "UPDATE spine_lease SET expires_at = clock_timestamp() + $3::float8 * interval '1 millisecond' \
                 WHERE name = 'leader' AND holder = $1 AND epoch = $2 RETURNING epoch",
            )
            .await?,
        release: c
            .prepare(
                "UPDATE spine_lease SET holder = '', expires_at = '-infinity' \
                 WHERE name = 'leader' AND holder = $1 AND epoch = $2 RETURNING epoch",
            )
            .await?,
        commit: c
            .prepare(
                "SELECT spine_commit($1::text, $2::int8, $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[], $8::bytea[], $9::text[], $10::bytea[], $11::bytea[], $12::text[], $13::text[], $14::int8, $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::bytea[], $21::text[], $22::int8[], $23::text[], $24::int8[], $25::text[], $26::bytea[])",
            )
            .await?,
    })
}

/// A commit's audit lines as one row's two arrays, one line per job (the last given), in
/// the order given.
fn audit_batch(audit: &[(String, Vec<u8>)]) -> (Vec<&str>, Vec<&[u8]>) {
    last_per_job(audit.iter().map(|(j, l)| (j.as_str(), l.as_slice())))
        .into_iter()
        .unzip()
}

/// Stored audit lines, one per job (the last stored), in the order first stored.
fn one_per_job(lines: impl Iterator<Item = (String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    last_per_job(lines)
}

/// One line per job, the last of each, in the order the jobs first come.
fn last_per_job<K: Eq + std::hash::Hash + Clone, L>(
    lines: impl Iterator<Item = (K, L)>,
) -> Vec<(K, L)> {
    let mut at: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<(K, L)> = Vec::new();
    for (job, line) in lines {
        match at.get(&job) {
            Some(&i) => out[i].1 = line,
            None => {
                at.insert(job.clone(), out.len());
                out.push((job, line));
            }
        }
    }
    out
}

/// One entry per key, with the latest time: an upsert may not touch a row twice in one
/// statement, and a batch may name an agent or a capability twice.
fn latest<'a>(pairs: impl Iterator<Item = (&'a str, u64)>) -> (Vec<&'a str>, Vec<i64>) {
    let mut m: HashMap<&str, i64> = HashMap::new();
    for (k, t) in pairs {
        let t = i64::try_from(t).unwrap_or(i64::MAX);
        let e = m.entry(k).or_insert(t);
        *e = (*e).max(t);
    }
    m.into_iter().unzip()
}

/// One batch in one transaction; the statements of the batch are pipelined. With a fence,
/// the lease row is checked first (and held against a taking until the commit): false, and
/// nothing stored, if it names another holder or epoch.
async fn write(
    c: &mut Conn,
    b: &OwnedBatch,
    fence: Option<&(String, i64)>,
) -> Result<Written, tokio_postgres::Error> {
    let ids: Vec<&str> = b.jobs.iter().map(|j| j.id.as_str()).collect();
    let records: Vec<&[u8]> = b.jobs.iter().map(|j| j.record.as_slice()).collect();
    let (with_input, inputs): (Vec<&str>, Vec<&[u8]>) = b
        .jobs
        .iter()
        .filter_map(|j| j.input.as_deref().map(|i| (j.id.as_str(), i)))
        .unzip();
    let without_input: Vec<&str> = b
        .jobs
        .iter()
        .filter(|j| j.input.is_none())
        .map(|j| j.id.as_str())
        .collect();
    let mut idem: HashMap<&[u8], &str> = HashMap::new();
    for j in &b.jobs {
        if let Some(k) = &j.idempotency {
            idem.insert(k.as_bytes(), j.id.as_str());
        }
    }
    let (idem_keys, idem_jobs): (Vec<&[u8]>, Vec<&str>) = idem.into_iter().unzip();
    let deleted: Vec<&str> = b.delete.iter().map(|j| j.as_str()).collect();
    let dropped: Vec<&[u8]> = b.blob_deletes.iter().map(|s| &s[..]).collect();
    let now = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX);
    let submitted: Vec<&str> = b.submitted.iter().map(String::as_str).collect();
    let submitted_notes = submitted_payloads(b);
    let adopted: Vec<&str> = b.adopted.iter().map(String::as_str).collect();
    let ended = ended_payloads(&b.ended);
    let cancelled: Vec<&str> = b.cancelled.iter().map(String::as_str).collect();
    let audited: Vec<&str> = b.audited.iter().map(String::as_str).collect();
    let (audit_jobs, audit_lines) = audit_batch(&b.audit);
    let (agents, seen) = latest(b.agents.iter().map(|(a, t)| (a.as_str(), *t)));
    let (caps, first) = latest(b.capabilities.iter().map(|(c, t)| (c.as_str(), *t)));
    let (rule_names, rule_configs): (Vec<&str>, Vec<Option<&[u8]>>) = b
        .rules
        .iter()
        .map(|(name, rule)| (name.as_str(), rule.as_deref()))
        .unzip();
    let (holder, epoch) = match fence {
        Some((holder, epoch)) => (Some(holder.as_str()), Some(*epoch)),
        None => (None, None),
    };
    // One statement in autocommit: one round trip, one transaction (migration 10). The
    // function's checks raise, which stores nothing of the call.
    let called = c
        .client
        .execute(
            &c.st.commit,
            &[
                &holder,
                &epoch,
                &audited,
                &dropped,
                &deleted,
                &without_input,
                &ids,
                &records,
                &with_input,
                &inputs,
                &idem_keys,
                &idem_jobs,
                &submitted,
                &now,
                &submitted_notes,
                &adopted,
                &cancelled,
                &ended,
                &audit_jobs,
                &audit_lines,
                &agents,
                &seen,
                &caps,
                &first,
                &rule_names,
                &rule_configs,
            ],
        )
        .await;
    match called {
        Ok(_) => Ok(Written::Stored),
        Err(x) => match x.code().map(|c| c.code()) {
            Some(DEPOSED_CODE) => Ok(Written::Deposed),
            Some(KEY_TAKEN_CODE) => Ok(Written::KeyTaken),
            _ => Err(x),
        },
    }
}

/// How a batch's transaction ended.
enum Written {
    Stored,
    /// The lease names another holder or epoch: nothing stored.
    Deposed,
    /// An idempotency key of the batch names another job (accepted by a standby meanwhile):
    /// nothing stored.
    KeyTaken,
}

/// Applies the migrations the database lacks, under an advisory lock.
async fn migrate(client: &mut Client) -> Result<(), String> {
    let describe = |x: tokio_postgres::Error| describe(&x);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(describe)?;
    let result = async {
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS spine_migrations (
                    version    integer     PRIMARY KEY,
                    name       text        NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await
            .map_err(describe)?;
        let applied: i32 = client
            .query_one("SELECT COALESCE(MAX(version), 0) FROM spine_migrations", &[])
            .await
            .map_err(describe)?
            .get(0);
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if applied > known {
            return Err(format!(
                "the database is at schema version {applied}, which a newer Spine applied; this dispatcher knows versions up to {known}: run the newer dispatcher, or another database"
            ));
        }
        for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > applied) {
            let tx = client.transaction().await.map_err(describe)?;
            tx.batch_execute(sql)
                .await
                .map_err(|x| format!("migration {version} ({name}): {}", describe(x)))?;
            tx.execute(
                "INSERT INTO spine_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .map_err(describe)?;
            tx.commit().await.map_err(describe)?;
            info!(version, name, "job store: schema migration applied");
        }
        Ok(())
    }
    .await;
    // The lock ends with the session anyway; released now so others need not wait.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

/// Notifications of [`SUBMITTED`] for a standby's batch: a line per submitted job, its id,
/// then a tab and its record (JSON) when it has no inline input and the line fits in
/// [`RELAY_PAYLOAD`] bytes.
fn submitted_payloads(b: &super::OwnedBatch) -> Vec<String> {
    let records: HashMap<&str, &super::EncodedJob> =
        b.jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    pack_lines(b.submitted.iter().map(|id| {
        let whole = records
            .get(id.as_str())
            .filter(|j| j.input.is_none())
            .and_then(|j| std::str::from_utf8(&j.record).ok())
            .filter(|r| id.len() + 1 + r.len() <= RELAY_PAYLOAD);
        match whole {
            Some(r) => format!("{id}\t{r}"),
            None => id.clone(),
        }
    }))
}

/// The jobs a notification of [`SUBMITTED`] holds whole, and whether it held every one so.
fn submitted_jobs(payload: &str) -> (Vec<JobRecord>, bool) {
    let mut jobs = Vec::new();
    let mut whole = true;
    for line in payload.lines().filter(|l| !l.is_empty()) {
        match line
            .split_once('\t')
            .and_then(|(id, r)| super::decode_job(id, r.as_bytes(), None).ok())
        {
            Some(j) => jobs.push(j),
            None => whole = false,
        }
    }
    (jobs, whole)
}

/// What a standby hears on [`ENDED`]: the jobs of one notification of the leader's, as sent.
///
/// A notification is passed on whole, unparsed: a standby where no caller waits for any of
/// its jobs only counts its lines ([`crate::http`]'s `Announced` reads them when a caller
/// registers), rather than making an entry for each ended job of the whole farm.
#[derive(Debug, Clone)]
pub enum Ended {
    /// One notification's payload: a line per job, its id, then a tab and its JSON view if
    /// the leader sent one (a job whose caller waits at a standby, whose view fit).
    Jobs(Arc<str>),
    /// Not an end: the standby began to listen (again), and ends announced before may not
    /// have reached it; its waiting callers look for themselves.
    Missed,
}

impl Ended {
    /// The jobs announced: each one's id and, when the leader sent it, its JSON view
    /// (unparsed; none for [`Ended::Missed`]).
    pub fn jobs(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        let payload = match self {
            Ended::Jobs(p) => &p[..],
            Ended::Missed => "",
        };
        ended_lines(payload)
    }
}

/// The lines of a notification of [`ENDED`]: each job's id and its view, if it has one.
pub(crate) fn ended_lines(payload: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    payload
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once('\t') {
            Some((id, view)) => (id, Some(view)),
            None => (l, None),
        })
}

/// Notifications of [`ENDED`]: one line per job, its id, then a tab and its JSON view if it
/// has one; as many lines per payload as fit in [`RELAY_PAYLOAD`] bytes. A view that would not
/// fit is left out (the standby reads the job).
fn ended_payloads(ended: &[(String, Option<String>)]) -> Vec<String> {
    pack_lines(ended.iter().map(|(id, view)| match view {
        Some(v) if id.len() + 1 + v.len() <= RELAY_PAYLOAD => format!("{id}\t{v}"),
        _ => id.clone(),
    }))
}

/// Lines (each at most [`RELAY_PAYLOAD`] bytes) joined into as few payloads as fit.
fn pack_lines(lines: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in lines {
        if !current.is_empty() && current.len() + 1 + line.len() > RELAY_PAYLOAD {
            out.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(&line);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// One line of a [`RATES`] notification: a budget's use, and who reports it.
#[derive(serde::Serialize, serde::Deserialize)]
struct RateLine {
    from: String,
    #[serde(flatten)]
    used: RateUse,
}

/// The notifications of [`RATES`] that tell `uses` from the dispatcher `from`: a JSON line
/// each, as many per notification as fit.
pub(crate) fn rate_payloads(from: &str, uses: Vec<RateUse>) -> Vec<String> {
    pack_lines(uses.into_iter().filter_map(|used| {
        let line = serde_json::to_string(&RateLine {
            from: from.to_owned(),
            used,
        })
        .ok()?;
        (line.len() <= RELAY_PAYLOAD).then_some(line)
    }))
}

/// What a [`RATES`] notification tells, unless `me` sent it (lines that do not parse are
/// skipped).
fn rates_reported(payload: &str, me: &str) -> Vec<RateUse> {
    payload
        .lines()
        .filter_map(|l| serde_json::from_str::<RateLine>(l).ok())
        .filter(|l| l.from != me)
        .map(|l| l.used)
        .collect()
}

/// One relayed event, as a line of a notification of [`EVENTS`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Relayed<'a> {
    job: &'a str,
    submitter: &'a str,
    kind: &'a str,
    data: crate::core::Rendered,
}

/// The progress and partial events among `events` as payloads of [`EVENTS`]: one JSON object
/// per line, as many lines per payload as fit in [`RELAY_PAYLOAD`] bytes. An event that alone
/// does not fit (a partial result of several KiB) is left out: a standby's streams miss it.
pub fn relay_payloads<'a>(events: impl IntoIterator<Item = &'a JobEvent>) -> Vec<String> {
    pack_lines(events.into_iter().filter_map(|ev| {
        if !matches!(ev.kind, EventKind::Progress | EventKind::Partial) {
            return None;
        }
        let line = serde_json::to_string(&Relayed {
            job: ev.job.as_str(),
            submitter: &ev.submitter,
            kind: ev.kind.as_str(),
            data: ev.data.clone(),
        })
        .unwrap_or_default();
        if line.is_empty() || line.len() > RELAY_PAYLOAD {
            tracing::debug!(job = %ev.job, bytes = line.len(), "an event too large to relay to standbys");
            return None;
        }
        Some(line)
    }))
}

/// The events of a payload of [`EVENTS`] (lines that do not parse are skipped).
fn relayed_events(payload: &str) -> Vec<JobEvent> {
    payload
        .lines()
        .filter_map(|l| {
            let r: Relayed<'_> = serde_json::from_str(l).ok()?;
            let kind = match r.kind {
                "progress" => EventKind::Progress,
                "partial" => EventKind::Partial,
                _ => return None,
            };
            Some(JobEvent {
                job: r.job.parse().ok()?,
                submitter: r.submitter.to_owned(),
                kind,
                data: r.data,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commits_audit_lines_go_in_one_row_and_come_back_one_per_job_in_order() {
        let given = vec![
            ("b".to_string(), b"b1".to_vec()),
            ("a".to_string(), b"a1".to_vec()),
            ("b".to_string(), b"b2".to_vec()),
        ];
        let (jobs, lines) = audit_batch(&given);
        assert_eq!(jobs, ["b", "a"]);
        assert_eq!(lines, [&b"b2"[..], &b"a1"[..]]);
        // Read back: an earlier version's outbox row first, then two batches naming "a" twice.
        let stored = [
            ("z", "z1"),
            ("b", "b2"),
            ("a", "a1"),
            ("c", "c1"),
            ("a", "a2"),
        ]
        .map(|(j, l)| (j.to_string(), l.as_bytes().to_vec()));
        let read = one_per_job(stored.into_iter());
        let read: Vec<(&str, &[u8])> = read.iter().map(|(j, l)| (j.as_str(), &l[..])).collect();
        assert_eq!(
            read,
            [("z", &b"z1"[..]), ("b", b"b2"), ("a", b"a2"), ("c", b"c1")]
        );
    }

    #[test]
    fn submissions_travel_whole_in_their_notification_unless_they_carry_an_input() {
        use crate::jobs::{JobSpec, JobTable};
        let mut t = JobTable::new(10);
        let plain = JobSpec::new("c.plain".parse().unwrap(), "http:app");
        let mut with_input = JobSpec::new("c.input".parse().unwrap(), "http:app");
        with_input.input = vec![1, 2, 3].into();
        let a = t.submit("a".parse().unwrap(), plain, 5).unwrap().clone();
        let b = t
            .submit("b".parse().unwrap(), with_input, 5)
            .unwrap()
            .clone();
        let mut batch = super::super::OwnedBatch::encode(&super::super::Batch {
            jobs: &[&a, &b],
            delete: &[],
            audit: &[],
            audited: &[],
            agents: &[],
            capabilities: &[],
        })
        .unwrap();
        batch.submitted = vec!["a".into(), "b".into()];
        let payloads = submitted_payloads(&batch);
        assert_eq!(payloads.len(), 1);
        let (jobs, whole) = submitted_jobs(&payloads[0]);
        // The job with an inline input goes by its id: the leader reads it (and its input).
        assert!(!whole);
        assert_eq!(jobs, vec![a]);
        assert_eq!(submitted_jobs(""), (Vec::new(), true));
    }

    #[test]
    fn ended_jobs_are_announced_with_their_views_when_they_fit() {
        let view = serde_json::json!({"id": "j-1", "state": "succeeded", "result": {"output": "ZG9uZQ=="}});
        let mut ended: Vec<(String, Option<String>)> = vec![("j-1".into(), Some(view.to_string()))];
        // Job ids are 36 bytes.
        ended.extend((2..400).map(|n| (format!("j-{n:034}"), None)));
        ended.push(("j-big".into(), Some(format!("\"{}\"", "x".repeat(8000)))));
        let payloads = ended_payloads(&ended);
        assert!(payloads.len() >= 2, "{}", payloads.len());
        assert!(payloads.iter().all(|p| p.len() <= RELAY_PAYLOAD));
        let heard: Vec<Ended> = payloads
            .iter()
            .map(|p| Ended::Jobs(Arc::from(p.as_str())))
            .collect();
        let back: Vec<(&str, Option<&str>)> = heard.iter().flat_map(Ended::jobs).collect();
        assert_eq!(back.len(), 400);
        assert_eq!(back[0].0, "j-1");
        let parsed: serde_json::Value = serde_json::from_str(back[0].1.expect("a view")).unwrap();
        assert_eq!(parsed, view);
        assert_eq!(back[1], (format!("j-{:034}", 2).as_str(), None));
        // A view too large for a notification: the id alone, the standby reads the job.
        assert_eq!(back[399], ("j-big", None));
        assert_eq!(Ended::Missed.jobs().count(), 0);
    }

    #[test]
    fn relayed_events_fill_payloads_under_the_limit_and_read_back() {
        let ev = |n: usize, kind: EventKind, bytes: usize| JobEvent {
            job: format!("job-{n}").parse().unwrap(),
            submitter: "http:web".into(),
            kind,
            data: crate::core::Rendered::of(
                &serde_json::json!({ "percent": n, "message": "x".repeat(bytes) }),
            ),
        };
        let mut events: Vec<JobEvent> = (0..100).map(|n| ev(n, EventKind::Progress, 100)).collect();
        events.push(ev(100, EventKind::Final, 10));
        events.push(ev(101, EventKind::Partial, 9000));
        events.push(ev(102, EventKind::Partial, 10));
        let payloads = relay_payloads(&events);
        assert!(payloads.len() >= 2, "{}", payloads.len());
        assert!(payloads.iter().all(|p| p.len() <= RELAY_PAYLOAD));
        let back: Vec<JobEvent> = payloads.iter().flat_map(|p| relayed_events(p)).collect();
        // The final event is not relayed (standbys read ends from the store), nor the one
        // too large; the rest arrive in order, whole.
        assert_eq!(back.len(), 101);
        assert_eq!(back[0].job.as_str(), "job-0");
        assert_eq!(back[0].submitter, "http:web");
        assert_eq!(back[0].kind, EventKind::Progress);
        assert_eq!(back[0].data, events[0].data);
        assert_eq!(back[100].job.as_str(), "job-102");
        assert_eq!(back[100].kind, EventKind::Partial);
        assert!(relayed_events("not json\n{\"job\":1}").is_empty());
    }

    #[test]
    fn rate_reports_fill_payloads_under_the_limit_and_skip_their_sender() {
        let uses: Vec<RateUse> = (0..500)
            .map(|i| RateUse {
                submitter: format!("http:token-{i}"),
                budget: (i % 3 == 0).then_some(i % 7),
                n: i as u32 + 1,
            })
            .collect();
        let payloads = rate_payloads("d1#01", uses.clone());
        assert!(payloads.len() > 1, "500 lines do not fit one notification");
        assert!(payloads.iter().all(|p| p.len() <= RELAY_PAYLOAD));
        let back: Vec<RateUse> = payloads
            .iter()
            .flat_map(|p| rates_reported(p, "d2#02"))
            .collect();
        assert_eq!(back, uses);
        assert!(payloads
            .iter()
            .all(|p| rates_reported(p, "d1#01").is_empty()));
        assert!(rates_reported("not json\n{}", "d2").is_empty());
    }

    #[test]
    fn urls_off_loopback_must_require_tls_and_messages_never_show_the_password() {
        let t = PgTarget::parse("postgres://spine:secret@127.0.0.1:5433/jobs", None).unwrap();
        assert_eq!(t.name(), "127.0.0.1:5433/jobs");
        assert!(!format!("{t:?}").contains("secret"));
        assert!(PgTarget::parse("postgres://spine@localhost/jobs", None).is_ok());
        assert!(PgTarget::parse("postgres://spine@[::1]:5432/jobs", None).is_ok());
        assert!(PgTarget::parse("host=/run/postgresql user=spine dbname=jobs", None).is_ok());
        let off = PgTarget::parse("postgres://spine@db.internal/jobs", None).unwrap_err();
        assert!(off.contains("db.internal is not on loopback"), "{off}");
        assert!(off.contains("sslmode=require"), "{off}");
        let t = PgTarget::parse("postgres://spine@db.internal/jobs?sslmode=require", None).unwrap();
        assert_eq!(t.name(), "db.internal:5432/jobs");
        let bad = PgTarget::parse("mysql://x", None).unwrap_err();
        assert!(bad.contains("not a PostgreSQL URL"), "{bad}");
        let nouser = PgTarget::parse("host=127.0.0.1 dbname=jobs", None).unwrap_err();
        assert!(nouser.contains("no user"), "{nouser}");
    }
}
