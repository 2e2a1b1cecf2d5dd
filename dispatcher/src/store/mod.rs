//! The durable job store. This module is the embedded one (redb), the default; [`postgres`]
//! keeps the same tables on PostgreSQL, and [`JobStore`] is whichever the configuration names.
//!
//! The embedded store (redb): every accepted job is written, and the transaction committed
//! to disk, before the submitter hears "accepted"; state changes are written as they happen;
//! a restarted dispatcher reloads unfinished jobs and the agents it knew.
//!
//! Tables: `jobs` (job id → the job record as JSON, without its input), `inputs` (job id → the
//! input bytes, written once: a record changes state several times and a 20 MB input must not
//! be rewritten each time), `idempotency` (submitter NUL key → job id), `agents` (agent bare
//! JID → last seen, ms since the UNIX epoch), `capabilities` (every capability an agent has
//! offered → when it was first seen: after a restart, submissions for them are queued while
//! their agents come back instead of being refused as `unknown-capability`).
//!
//! The data directory and the files in it hold job inputs and outputs in clear, so they are
//! private to the dispatcher's user: the directory is created with mode 0700 and the files
//! 0600, and looser modes found at start are tightened, with a warning ([`private_dir`],
//! [`private_file`]).

use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use spine_protocol::{CapabilityName, JobId};

use crate::jobs::{Body, JobRecord};

mod apply_queue;
mod backend;
mod journal;
use apply_queue::ApplyQueue;
pub mod postgres;

pub(crate) use backend::{is_postgres, target};
pub use backend::{Committing, Held, JobStore};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const INPUTS: TableDefinition<&str, &[u8]> = TableDefinition::new("inputs");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
const AGENTS: TableDefinition<&str, u64> = TableDefinition::new("agents");
const CAPABILITIES: TableDefinition<&str, u64> = TableDefinition::new("capabilities");
/// Audit lines of jobs that ended, stored with their outcomes until the audit file has them.
const AUDIT_OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_outbox");
/// Event rules made over the HTTP API (`PUT /v1/rules/{name}`): name → the rule as JSON.
const RULES: TableDefinition<&str, &[u8]> = TableDefinition::new("rules");

/// Why the store failed. Fatal for the operation that asked; the dispatcher reports it (an
/// HTTP 503 / XMPP `internal-server-error`) rather than acknowledging a job it did not store.
#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(pub(crate) String);

fn e(x: impl std::fmt::Display) -> StoreError {
    StoreError(x.to_string())
}

/// redb's page cache when the caller does not choose (the dispatcher's `store_cache`
/// default): 64 MiB, not redb's 1 GiB.
pub const DEFAULT_CACHE: u64 = 64 << 20;

/// The journal starts over (after a durable redb commit, the checkpoint) once it holds this
/// many bytes of frames: bounds what a start after a crash applies again.
const CHECKPOINT_BYTES: u64 = 16 << 20;
/// … or once it holds this many batches (the same bound, for small ones) …
const CHECKPOINT_COMMITS: u32 = 8192;
/// … or once the applier made this many redb transactions since the last: redb frees the
/// pages a transaction replaced only at a durable commit, so the database file grows with
/// the transactions between checkpoints (about 30 KiB each). Under load a transaction holds
/// many batches (up to [`APPLY_GROUP`]), so counting batches, as this did, checkpointed
/// several times as often as the file needs: every 0.3 s at 12,000 jobs a second, each a
/// durable redb commit and the audit lines still pending written into redb ([`Outbox`]).
const CHECKPOINT_TRANSACTIONS: u32 = 1024;

/// The store.
///
/// A commit is durable once its batch is a frame of the journal on disk ([`journal`]); a
/// thread of the store's own (`spine-store`) then applies the batches to redb, in order,
/// without waiting for the disk, and makes them durable there now and then (the
/// checkpoint). There are two journal files, `jobs.journal` and `jobs.journal2`: at a
/// checkpoint the commits move to the other one, so that they never wait for the checkpoint's
/// long write; once it is on disk, the first starts over (a generation above the other's).
/// Reads wait until every batch committed before them is applied.
pub struct Store {
    db: Arc<Database>,
    journal: Arc<Mutex<Journaled>>,
    /// The audit lines the applier keeps out of redb until a checkpoint ([`Outbox`]).
    outbox: Arc<Mutex<Outbox>>,
    applied: Arc<(Mutex<Applied>, Condvar)>,
    applier: Option<std::thread::JoinHandle<()>>,
    /// Batches the journal held at open, applied again (a crash since the last checkpoint).
    replayed: usize,
    /// How long a commit took lately (µs, a moving average): see [`Store::commits_fast`].
    recent_us: std::sync::atomic::AtomicU64,
}

/// A commit expected to take at most this long (µs) is made on the dispatcher's own thread
/// ([`Store::commits_fast`]).
const FAST_COMMIT_US: u64 = 500;

/// The journal, and the queue to the applier (fed under the same lock, so in the journal's
/// order).
struct Journaled {
    files: [journal::Journal; 2],
    /// The file commits go to.
    active: usize,
    queue: Option<Arc<ApplyQueue<Box<Applying>>>>,
    /// The sequence number of the last batch appended.
    appended: u64,
    /// Where batches are encoded for the journal, kept between commits (a new buffer for
    /// each grew several times over while encoding); one grown past [`PAYLOAD_KEEP`] for a
    /// large batch is let go after it.
    payload: Vec<u8>,
}

/// The most [`Journaled::payload`] keeps between commits.
const PAYLOAD_KEEP: usize = 4 << 20;

/// How long the applier waits for more batches to apply with the first (see [`applier`]).
const APPLY_LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// … and how many it applies in one transaction at most.
const APPLY_GROUP: usize = 512;

/// A batch on its way to redb.
struct Applying {
    seq: u64,
    batch: OwnedBatch,
    bytes: u64,
}

/// The audit outbox's lines added since the last checkpoint, which the applier keeps here
/// instead of in redb's `audit_outbox` table, and the keys that table holds.
///
/// A job's line is added with its outcome and removed once the audit file holding it is
/// synced (the driver syncs it every 200 ms at most): two B-tree changes of redb per job,
/// a few % of the dispatcher's CPU per job (BENCHMARKS.md, 2026-11-29, twenty-second
/// session). Between
/// two checkpoints the journal holds every batch, so redb need not: a line added and removed
/// between them never reaches the table, and a checkpoint writes the lines still here into
/// it, in its durable transaction, before the journal that held them starts over. After a
/// crash the journal's batches are applied to the table itself, as before. Readers see the
/// table and these lines together ([`Store::audit_outbox`]).
#[derive(Default)]
struct Outbox {
    /// Lines added since the last checkpoint (not in the table), by job id.
    lines: std::collections::HashMap<String, Vec<u8>>,
    /// The keys the table holds.
    in_table: std::collections::HashSet<String>,
}

impl Outbox {
    /// None kept yet, with the keys `db`'s table holds.
    fn of(db: &Database) -> Result<Outbox, StoreError> {
        let mut outbox = Outbox::default();
        let tx = db.begin_read().map_err(e)?;
        let t = tx.open_table(AUDIT_OUTBOX).map_err(e)?;
        for row in t.iter().map_err(e)? {
            outbox.in_table.insert(row.map_err(e)?.0.value().to_owned());
        }
        Ok(outbox)
    }

    /// Adds or removes a line; a removal reaches `table` only if it holds the key.
    fn change(
        &mut self,
        table: &mut redb::Table<&str, &[u8]>,
        job: &str,
        line: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        match line {
            Some(line) => {
                self.lines.insert(job.to_owned(), line.to_vec());
            }
            None => {
                self.lines.remove(job);
                if self.in_table.remove(job) {
                    table.remove(job).map_err(e)?;
                }
            }
        }
        Ok(())
    }

    /// Writes the lines kept here into the table of `tx`.
    fn flush(&mut self, tx: &WriteTransaction) -> Result<(), StoreError> {
        if self.lines.is_empty() {
            return Ok(());
        }
        let mut t = tx.open_table(AUDIT_OUTBOX).map_err(e)?;
        for (job, line) in self.lines.drain() {
            t.insert(job.as_str(), line.as_slice()).map_err(e)?;
            self.in_table.insert(job);
        }
        Ok(())
    }
}

/// How far the applier got, and why it stopped if it did.
#[derive(Default)]
struct Applied {
    seq: u64,
    failed: Option<String>,
}

fn idem_key(submitter: &str, key: &str) -> String {
    format!("{submitter}\u{0}{key}")
}

impl Store {
    /// Opens (or creates) the store at `path`; its directory and file are made private.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE)
    }

    /// [`Store::open`] with at most `cache` bytes of redb's page cache (the dispatcher's
    /// `store_cache`; redb's own default, 1 GiB, is what a busy store keeps resident).
    pub fn open_with_cache(path: &Path, cache: u64) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_dir(dir).map_err(|x| e(format!("{}: {x}", dir.display())))?;
        }
        // redb creates its file with the process's umask (0644 usually): create it first.
        private_file(path, true).map_err(|x| e(format!("{}: {x}", path.display())))?;
        let db = redb::Builder::new()
            .set_cache_size(usize::try_from(cache).unwrap_or(usize::MAX))
            .create(path)
            .map_err(|x| e(format!("{}: {x}", path.display())))?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(JOBS).map_err(e)?;
            tx.open_table(INPUTS).map_err(e)?;
            tx.open_table(IDEMPOTENCY).map_err(e)?;
            tx.open_table(AGENTS).map_err(e)?;
            tx.open_table(CAPABILITIES).map_err(e)?;
            tx.open_table(AUDIT_OUTBOX).map_err(e)?;
            tx.open_table(RULES).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        // The batches committed since the last checkpoint, which a crash took from redb: the
        // older generation's first.
        let mut files = Vec::new();
        let mut replayed = 0;
        for p in [
            path.with_extension("journal"),
            path.with_extension("journal2"),
        ] {
            private_file(&p, false).map_err(|x| e(format!("{}: {x}", p.display())))?;
            let (j, frames) =
                journal::Journal::open(&p).map_err(|x| e(format!("{}: {x}", p.display())))?;
            files.push((j, frames, p));
        }
        files.sort_by_key(|(j, _, _)| j.generation());
        for (_, frames, p) in &files {
            for (i, frame) in frames.iter().enumerate() {
                let b = decode_frame(frame).map_err(|x| {
                    e(format!(
                        "{}: batch {} of {}: {x}",
                        p.display(),
                        i + 1,
                        frames.len()
                    ))
                })?;
                apply(&db, &b)?;
                replayed += 1;
            }
        }
        let top = files.last().map_or(0, |(j, _, _)| j.generation());
        let mut files = files.into_iter().map(|(j, _, _)| j);
        let (Some(mut first), Some(mut second)) = (files.next(), files.next()) else {
            return Err(e("the store's journals did not open"));
        };
        if replayed > 0 {
            checkpoint(&db)?;
        }
        // Both start over (a clean stop left them empty; else the checkpoint has them).
        for (j, generation) in [(&mut first, top + 1), (&mut second, top + 2)] {
            j.restart(generation)
                .map_err(|x| e(format!("{}: {x}", j.path().display())))?;
        }
        let outbox = Arc::new(Mutex::new(Outbox::of(&db)?));
        let db = Arc::new(db);
        let queue = Arc::new(ApplyQueue::new(APPLY_GROUP));
        let rx = queue.clone();
        let journal = Arc::new(Mutex::new(Journaled {
            files: [first, second],
            active: 0,
            queue: Some(queue),
            appended: 0,
            payload: Vec::new(),
        }));
        let applied = Arc::new((Mutex::new(Applied::default()), Condvar::new()));
        let applier = {
            let (db, journal, applied, outbox) =
                (db.clone(), journal.clone(), applied.clone(), outbox.clone());
            std::thread::Builder::new()
                .name("spine-store".into())
                .spawn(move || applier(&db, &journal, &outbox, &applied, &rx))
                .map_err(|x| e(format!("starting the store's thread: {x}")))?
        };
        Ok(Store {
            db,
            journal,
            outbox,
            applied,
            applier: Some(applier),
            replayed,
            recent_us: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many batches the journal held at open and were applied again (after a crash).
    pub fn replayed(&self) -> usize {
        self.replayed
    }

    /// Waits until every batch committed so far is in redb (before a read).
    fn settle(&self) -> Result<(), StoreError> {
        let want = {
            let j = lock(&self.journal);
            if let Some(q) = &j.queue {
                // Nothing to apply is fine: the applier may have stopped (its reason below).
                q.now();
            }
            j.appended
        };
        let (m, cv) = &*self.applied;
        let mut a = lock(m);
        while a.seq < want && a.failed.is_none() {
            a = cv
                .wait(a)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        match &a.failed {
            Some(x) => Err(e(x)),
            None => Ok(()),
        }
    }
}

/// A lock, whether or not a thread panicked holding it: nothing under these locks is left
/// half-done by a panic that matters (a frame is whole or ends the journal; redb's
/// transaction rolls back).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes one batch to redb without waiting for the disk (the journal holds it).
fn apply(db: &Database, b: &OwnedBatch) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(e)?;
    tx.set_durability(Durability::None);
    write(&tx, b)?;
    tx.commit().map_err(e)
}

/// [`apply`] of several batches, in order, in one transaction: what they leave, written once
/// ([`Net`]).
fn apply_all(
    db: &Database,
    outbox: &Mutex<Outbox>,
    batches: impl Iterator<Item = Box<Applying>>,
) -> Result<(), StoreError> {
    let batches: Vec<Box<Applying>> = batches.collect();
    let mut tx = db.begin_write().map_err(e)?;
    tx.set_durability(Durability::None);
    let net = Net::of(batches.iter().map(|w| &w.batch));
    // Held until the table changed with it ([`Store::audit_outbox`] reads both under it).
    let mut kept = lock(outbox);
    write_net(&tx, &net, Some(&mut kept))?;
    tx.commit().map_err(e)
}

/// [`checkpoint`], with the audit lines `outbox` kept out of redb written into it first.
fn checkpoint_with(db: &Database, outbox: &Mutex<Outbox>) -> Result<(), StoreError> {
    let tx = durable(db)?;
    let mut kept = lock(outbox);
    kept.flush(&tx)?;
    tx.commit().map_err(e)
}

/// Makes every batch applied so far durable in redb.
fn checkpoint(db: &Database) -> Result<(), StoreError> {
    durable(db)?.commit().map_err(e)
}

/// A write transaction whose commit is durable: everything before it too.
fn durable(db: &Database) -> Result<WriteTransaction, StoreError> {
    let mut tx = db.begin_write().map_err(e)?;
    tx.set_durability(Durability::Immediate);
    // The allocator's state with it: a start after a crash then need not walk the whole
    // database to rebuild it (redb's "quick repair").
    tx.set_quick_repair(true);
    Ok(tx)
}

impl Journaled {
    /// Moves the commits to the other file; returns the one they left.
    fn switch(&mut self) -> usize {
        let left = self.active;
        self.active = 1 - left;
        left
    }

    /// Starts file `i` over, above both files' generations (what it held is in redb).
    fn restart(&mut self, i: usize) -> Result<(), StoreError> {
        let top = self.files[0].generation().max(self.files[1].generation());
        let j = &mut self.files[i];
        j.restart(top + 1)
            .map_err(|x| e(format!("{}: {x}", j.path().display())))
    }
}

/// The `spine-store` thread: applies the batches in order, many to a redb transaction, and
/// checkpoints now and then, until the queue closes (the store is dropped) or redb fails
/// (then every later commit and read fails with the reason, and the dispatcher stops; the
/// journal still holds the batches).
///
/// It lingers up to [`APPLY_LINGER`] after a batch for more: the journal already made them
/// durable, so nothing waits for redb, and one transaction of many jobs costs little more than
/// one of a single job (the same B-tree pages are copied once, not once per job).
fn applier(
    db: &Database,
    journal: &Mutex<Journaled>,
    outbox: &Mutex<Outbox>,
    applied: &(Mutex<Applied>, Condvar),
    rx: &ApplyQueue<Box<Applying>>,
) {
    let done = |seq: u64, r: Result<(), StoreError>| {
        let mut a = lock(&applied.0);
        match r {
            Ok(()) => a.seq = a.seq.max(seq),
            Err(x) => a.failed = Some(format!("applying committed batches: {}", x.0)),
        }
        applied.1.notify_all();
        a.failed.is_none()
    };
    let (mut commits, mut transactions, mut bytes) = (0u32, 0u32, 0u64);
    // A group: the first batch, then what comes within the linger (less if a reader waits,
    // the group is large, or the queue closed).
    while let apply_queue::Next::Group(mut group) = rx.next_group(APPLY_LINGER) {
        if group.is_empty() {
            // Asked to apply now with nothing waiting: say so to the reader.
            applied.1.notify_all();
            continue;
        }
        commits += group.len() as u32;
        transactions += 1;
        bytes += group.iter().map(|w| w.bytes).sum::<u64>();
        let last = group.last().map_or(0, |w| w.seq);
        if !done(last, apply_all(db, outbox, group.drain(..))) {
            return;
        }
        if commits >= CHECKPOINT_COMMITS
            || transactions >= CHECKPOINT_TRANSACTIONS
            || bytes >= CHECKPOINT_BYTES
        {
            // Under the journal's lock, every batch appended is already queued: apply them
            // all, then move the commits to the other file. The checkpoint covers every frame
            // of the file they left, which then starts over.
            let left = {
                let mut j = lock(journal);
                let rest = rx.take_all();
                let last = rest.last().map_or(0, |w| w.seq);
                if !rest.is_empty() && !done(last, apply_all(db, outbox, rest.into_iter())) {
                    return;
                }
                j.switch()
            };
            let r = checkpoint_with(db, outbox).and_then(|()| lock(journal).restart(left));
            if let Err(x) = r {
                done(0, Err(x));
                return;
            }
            (commits, transactions, bytes) = (0, 0, 0);
        }
    }
}

impl Drop for Store {
    /// Closes the queue, lets the applier finish, and checkpoints: a clean stop leaves the
    /// journal empty, and the next start has nothing to apply again.
    fn drop(&mut self) {
        if let Some(q) = lock(&self.journal).queue.take() {
            q.close();
        }
        if let Some(h) = self.applier.take() {
            let _ = h.join();
        }
        if lock(&self.applied.0).failed.is_some() {
            return;
        }
        let mut j = lock(&self.journal);
        if j.files.iter().any(|f| f.len() > 0) {
            let r = checkpoint_with(&self.db, &self.outbox)
                .and_then(|()| j.restart(0))
                .and_then(|()| j.restart(1));
            if let Err(x) = r {
                tracing::warn!("job store: the checkpoint at close failed ({x}); the next start applies the journal again");
            }
        }
    }
}

impl Store {
    /// Writes jobs (new or changed) in one durable transaction; records idempotency keys of
    /// new ones.
    pub fn put(&self, jobs: &[&JobRecord]) -> Result<(), StoreError> {
        self.put_with_audit(jobs, &[], &[])
    }

    /// [`Store::put`], and in the same transaction: adds the audit lines of jobs that ended to
    /// the outbox, and removes those the audit file now holds (`audited`, by job id).
    pub fn put_with_audit(
        &self,
        jobs: &[&JobRecord],
        audit: &[(String, Vec<u8>)],
        audited: &[String],
    ) -> Result<(), StoreError> {
        self.commit(&Batch {
            jobs,
            audit,
            audited,
            ..Batch::default()
        })
    }

    /// Stores one batch of the dispatcher's changes in one durable transaction: jobs new or
    /// changed (with new idempotency keys), jobs past their retention deleted (with their
    /// inputs and keys), audit lines added to the outbox and those the audit file now holds
    /// removed, agents seen and capabilities offered for the first time.
    pub fn commit(&self, b: &Batch<'_>) -> Result<(), StoreError> {
        self.commit_owned(OwnedBatch::encode(b)?)
    }

    /// [`Store::commit`] of a batch already encoded ([`OwnedBatch::encode`]): what the
    /// dispatcher's commit pipeline runs on a thread of its own while the dispatcher goes on.
    pub fn commit_owned(&self, b: OwnedBatch) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let r = self.append(b);
        // A moving average over about the last eight commits.
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let avg = self.recent_us.load(std::sync::atomic::Ordering::Relaxed);
        let avg = avg - avg / 8 + took / 8;
        self.recent_us
            .store(avg, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// Whether commits have lately been fast (an `fdatasync` of a local SSD: about 0.1 ms
    /// here): then the dispatcher makes them on its own thread instead of handing each to a
    /// blocking thread and waiting to be woken — two thread switches that cost a sequential
    /// job more than the commit (BENCHMARKS.md, "Cost per job over HTTP"). A slow disk (a
    /// network volume, a spinning one) makes them slow, and the commits go to a blocking
    /// thread again, so that the dispatcher is not held for milliseconds at a time.
    pub fn commits_fast(&self) -> bool {
        self.recent_us.load(std::sync::atomic::Ordering::Relaxed) <= FAST_COMMIT_US
    }

    /// Appends a batch to the journal (durable on return) and queues it for redb.
    fn append(&self, b: OwnedBatch) -> Result<(), StoreError> {
        let mut j = lock(&self.journal);
        if let Some(x) = &lock(&self.applied.0).failed {
            return Err(e(x));
        }
        let mut payload = std::mem::take(&mut j.payload);
        payload.clear();
        let payload = encode_frame_into(&b, payload)?;
        let active = j.active;
        let file = &mut j.files[active];
        file.append(&payload)
            .map_err(|x| e(format!("{}: {x}", file.path().display())))?;
        let bytes = payload.len() as u64;
        if payload.capacity() <= PAYLOAD_KEEP {
            j.payload = payload;
        }
        j.appended += 1;
        let w = Applying {
            seq: j.appended,
            batch: b,
            bytes,
        };
        match &j.queue {
            Some(q) if q.push(Box::new(w)).is_ok() => Ok(()),
            _ => Err(e("the store's thread stopped (the batch is in the journal: the next start applies it)")),
        }
    }

    /// The event rules made over the HTTP API.
    pub fn rules(&self) -> Result<Vec<crate::triggers::RuleConfig>, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(RULES).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.push(decode_rule(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every agent (bare JID) seen, with when (ms since the UNIX epoch).
    pub fn agents(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(AGENTS).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.push((k.value().to_owned(), v.value()));
        }
        Ok(out)
    }

    /// The audit lines stored but perhaps not yet in the audit file (after a crash).
    pub fn audit_outbox(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.settle()?;
        // The table and the lines the applier keeps out of it until the next checkpoint
        // ([`Outbox`]), under its lock: no batch is applied meanwhile.
        let kept = lock(&self.outbox);
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(AUDIT_OUTBOX).map_err(e)?;
        let mut out = std::collections::BTreeMap::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.insert(k.value().to_owned(), v.value().to_vec());
        }
        out.extend(kept.lines.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(out.into_iter().collect())
    }

    /// The job an idempotency key of a submitter already created.
    pub fn idempotent(&self, submitter: &str, key: &str) -> Result<Option<JobId>, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(IDEMPOTENCY).map_err(e)?;
        let got = t.get(idem_key(submitter, key).as_str()).map_err(e)?;
        Ok(got.and_then(|v| v.value().parse().ok()))
    }

    /// Every stored job.
    pub fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(JOBS).map_err(e)?;
        let inputs = tx.open_table(INPUTS).map_err(e)?;
        // The rows are read first, then decoded on every core: decoding is most of a
        // restart's time with many jobs held (30,000: 130 ms on one core), and the dispatcher
        // answers nothing until it is done.
        let mut rows = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let input = inputs
                .get(k.value())
                .map_err(e)?
                .map(|i| i.value().to_vec());
            rows.push((k.value().to_owned(), v.value().to_vec(), input));
        }
        decode_all(rows)
    }

    /// Deletes jobs (after their retention) and their idempotency keys. Takes ids, so that
    /// the job table can forget its records without copying them: the idempotency key is
    /// read from the stored record.
    pub fn delete(&self, jobs: &[JobId]) -> Result<(), StoreError> {
        self.commit_owned(OwnedBatch {
            delete: jobs.to_vec(),
            ..OwnedBatch::default()
        })
    }

    /// Remembers agents (bare JIDs) seen, for the hello after a restart.
    pub fn saw_agents(&self, agents: &[(String, u64)]) -> Result<(), StoreError> {
        self.commit_owned(OwnedBatch {
            agents: agents.to_vec(),
            ..OwnedBatch::default()
        })
    }

    /// Remembers capabilities offered for the first time, at `at` (ms since the UNIX epoch).
    pub fn saw_capabilities(&self, caps: &[CapabilityName], at: u64) -> Result<(), StoreError> {
        self.commit_owned(OwnedBatch {
            capabilities: caps.iter().map(|c| (c.clone(), at)).collect(),
            ..OwnedBatch::default()
        })
    }

    /// Every capability an agent has offered in this store's life.
    pub fn known_capabilities(&self) -> Result<Vec<CapabilityName>, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(CAPABILITIES).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, _) = row.map_err(e)?;
            let name = k.value();
            out.push(name.parse().map_err(|x: String| {
                e(format!(
                    "capabilities table: '{name}' is not a capability name: {x}"
                ))
            })?);
        }
        Ok(out)
    }

    /// Agents seen since `since_ms`.
    pub fn known_agents(&self, since_ms: u64) -> Result<Vec<String>, StoreError> {
        self.settle()?;
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(AGENTS).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            if v.value() >= since_ms {
                out.push(k.value().to_owned());
            }
        }
        Ok(out)
    }
}

/// A stored record with its input (stored apart, [`EncodedJob`]).
/// Decodes stored rows (id, record, inline input) in order, on up to four threads.
fn decode_all(rows: Vec<(String, Vec<u8>, Option<Vec<u8>>)>) -> Result<Vec<JobRecord>, StoreError> {
    const PER_THREAD: usize = 2_000;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(rows.len() / PER_THREAD)
        .max(1);
    let decode = |chunk: Vec<(String, Vec<u8>, Option<Vec<u8>>)>| {
        chunk
            .into_iter()
            .map(|(id, record, input)| decode_job(&id, &record, input))
            .collect::<Result<Vec<_>, _>>()
    };
    if threads == 1 {
        return decode(rows);
    }
    let per = rows.len().div_ceil(threads);
    let mut chunks = Vec::with_capacity(threads);
    let mut rest = rows;
    while rest.len() > per {
        let tail = rest.split_off(per);
        chunks.push(rest);
        rest = tail;
    }
    chunks.push(rest);
    let decoded: Vec<Result<Vec<JobRecord>, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|c| s.spawn(move || decode(c)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(e("a thread decoding the jobs panicked")))
            })
            .collect()
    });
    let mut out = Vec::new();
    for part in decoded {
        out.extend(part?);
    }
    Ok(out)
}

/// A stored rule: unreadable is an error, not a rule silently gone.
pub(crate) fn decode_rule(
    name: &str,
    json: &[u8],
) -> Result<crate::triggers::RuleConfig, StoreError> {
    serde_json::from_slice(json)
        .map_err(|x| e(format!("rules table: rule '{name}' is unreadable: {x}")))
}

fn decode_job(id: &str, record: &[u8], input: Option<Vec<u8>>) -> Result<JobRecord, StoreError> {
    let mut j = serde_json::from_slice::<JobRecord>(record)
        .map_err(|x| e(format!("job {id} is unreadable: {x}")))?;
    if let Some(i) = input.filter(|_| j.spec.input.is_empty()) {
        j.spec.input = Body::Inline(i);
    }
    Ok(j)
}

/// One batch of changes for [`Store::commit`].
#[derive(Debug, Default)]
pub struct Batch<'a> {
    /// Jobs new or changed.
    pub jobs: &'a [&'a JobRecord],
    /// Jobs to forget.
    pub delete: &'a [JobId],
    /// Audit lines to add to the outbox: (job id, line).
    pub audit: &'a [(String, Vec<u8>)],
    /// Jobs whose audit lines the audit file now holds.
    pub audited: &'a [String],
    /// Agents (bare JIDs) seen, with when.
    pub agents: &'a [(String, u64)],
    /// Capabilities offered for the first time, with when.
    pub capabilities: &'a [(CapabilityName, u64)],
}

/// A [`Batch`] that owns its data, the job records already encoded: it can cross to another
/// thread while the job table goes on changing.
#[derive(Debug, Default)]
pub struct OwnedBatch {
    /// Jobs new or changed.
    pub jobs: Vec<EncodedJob>,
    /// Jobs to forget.
    pub delete: Vec<JobId>,
    /// Audit lines to add to the outbox: (job id, line).
    pub audit: Vec<(String, Vec<u8>)>,
    /// Jobs whose audit lines the audit file now holds.
    pub audited: Vec<String>,
    /// Agents (bare JIDs) seen, with when.
    pub agents: Vec<(String, u64)>,
    /// Capabilities offered for the first time, with when.
    pub capabilities: Vec<(CapabilityName, u64)>,
    /// Event rules made (the rule as JSON) or deleted (`None`) over the HTTP API.
    pub rules: Vec<(String, Option<Vec<u8>>)>,
    /// A leader's commit among several dispatchers (PostgreSQL): stored only if the lease row
    /// still names this holder and epoch when the transaction runs, else nothing of it is
    /// (`deposed`). None: unconditional (a lone dispatcher on redb; a standby's agents).
    pub fence: Option<Fence>,
    /// Blobs to copy into a shared store before the batch is stored (PostgreSQL among several
    /// dispatchers: the next leader reads them there), with their local files.
    pub blobs: Vec<(crate::blobs::Stored, std::path::PathBuf)>,
    /// Blobs deleted from this dispatcher's store (no job holds them), to delete from the
    /// shared store too.
    pub blob_deletes: Vec<[u8; 32]>,
    /// Jobs a standby accepted in this batch, for the leader to take (PostgreSQL: the
    /// `spine_submitted` table and channel).
    pub submitted: Vec<String>,
    /// Jobs standbys accepted that the leader took into its table.
    pub adopted: Vec<String>,
    /// Jobs that ended in this batch, announced to the other dispatchers once it is stored
    /// (PostgreSQL: the `spine_ended` channel), whose callers may wait for them: the id, and
    /// the job's JSON view (`GET /v1/jobs/{id}`) for a job a standby accepted, whose caller
    /// there most likely waits for it.
    pub ended: Vec<(String, Option<String>)>,
    /// Cancels asked of standbys that the leader made.
    pub cancelled: Vec<String>,
}

/// The lease a leader's commit is conditional on ([`OwnedBatch::fence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The holder's id in the lease row.
    pub holder: String,
    /// The epoch it took.
    pub epoch: u64,
}

impl OwnedBatch {
    /// The batch, conditional on `fence`.
    pub fn fenced(mut self, fence: Option<Fence>) -> OwnedBatch {
        self.fence = fence;
        self
    }

    /// Encodes the records of `b` and copies the rest.
    pub fn encode(b: &Batch<'_>) -> Result<OwnedBatch, StoreError> {
        Ok(OwnedBatch {
            jobs: b
                .jobs
                .iter()
                .map(|j| EncodedJob::new(j))
                .collect::<Result<_, _>>()?,
            delete: b.delete.to_vec(),
            audit: b.audit.to_vec(),
            audited: b.audited.to_vec(),
            agents: b.agents.to_vec(),
            capabilities: b.capabilities.to_vec(),
            rules: Vec::new(),
            fence: None,
            blobs: Vec::new(),
            blob_deletes: Vec::new(),
            submitted: Vec::new(),
            adopted: Vec::new(),
            ended: Vec::new(),
            cancelled: Vec::new(),
        })
    }

    /// Whether there is nothing to store.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
            && self.delete.is_empty()
            && self.audit.is_empty()
            && self.audited.is_empty()
            && self.agents.is_empty()
            && self.capabilities.is_empty()
            && self.rules.is_empty()
            && self.blobs.is_empty()
            && self.blob_deletes.is_empty()
            && self.submitted.is_empty()
            && self.adopted.is_empty()
            && self.cancelled.is_empty()
    }
}

/// One job record as the store writes it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct EncodedJob {
    id: String,
    /// The record as JSON, without its input.
    #[serde(with = "serde_bytes")]
    record: Vec<u8>,
    /// An inline input (written once), or none (a stored input, or one the job let go of).
    #[serde(with = "serde_bytes")]
    input: Option<Vec<u8>>,
    /// The idempotency key, as the `idempotency` table's key.
    idempotency: Option<String>,
}

impl EncodedJob {
    /// Encodes `j`.
    pub fn new(j: &JobRecord) -> Result<EncodedJob, StoreError> {
        Ok(EncodedJob {
            id: j.id.as_str().to_owned(),
            record: serde_json::to_vec(j).map_err(e)?,
            input: j
                .spec
                .input
                .inline()
                .filter(|i| !i.is_empty())
                .map(<[u8]>::to_vec),
            idempotency: j
                .spec
                .idempotency_key
                .as_ref()
                .map(|k| idem_key(&j.spec.submitter, k)),
        })
    }
}

/// Writes a batch's tables in `tx` (the caller commits).
fn write(tx: &WriteTransaction, b: &OwnedBatch) -> Result<(), StoreError> {
    write_net(tx, &Net::of(std::iter::once(b)), None)
}

/// What a job's changes in several batches leave: a delete (of the record stored before
/// them), then the last record written after it, if any.
#[derive(Default)]
struct NetJob<'a> {
    delete: bool,
    write: Option<&'a EncodedJob>,
}

/// What several batches, applied in order, leave in the tables: each job written once with
/// its last record, each audit line added or removed once. In one transaction this is what
/// writing them one after the other would leave (a batch's jobs are written before its
/// deletes, its `audited` removed before its `audit` added), with fewer B-tree changes: a job
/// accepted in one batch and ended in the next is written once, not twice, and a job written
/// and forgotten within them never is.
#[derive(Default)]
struct Net<'a> {
    jobs: Vec<(&'a str, NetJob<'a>)>,
    /// Where each job is in `jobs`.
    job_at: std::collections::HashMap<&'a str, usize>,
    /// Audit lines to add (`Some`) or remove, in the order first seen.
    audit: Vec<(&'a str, Option<&'a [u8]>)>,
    audit_at: std::collections::HashMap<&'a str, usize>,
    agents: Vec<&'a (String, u64)>,
    capabilities: Vec<&'a (CapabilityName, u64)>,
    rules: Vec<&'a (String, Option<Vec<u8>>)>,
}

impl<'a> Net<'a> {
    fn of(batches: impl Iterator<Item = &'a OwnedBatch>) -> Net<'a> {
        let mut n = Net::default();
        for b in batches {
            for j in &b.jobs {
                n.job(&j.id).write = Some(j);
            }
            for id in &b.delete {
                *n.job(id.as_str()) = NetJob {
                    delete: true,
                    write: None,
                };
            }
            for job in &b.audited {
                n.audit(job, None);
            }
            for (job, line) in &b.audit {
                n.audit(job, Some(line));
            }
            n.agents.extend(&b.agents);
            n.capabilities.extend(&b.capabilities);
            n.rules.extend(&b.rules);
        }
        n
    }

    fn job(&mut self, id: &'a str) -> &mut NetJob<'a> {
        let at = *self.job_at.entry(id).or_insert_with(|| {
            self.jobs.push((id, NetJob::default()));
            self.jobs.len() - 1
        });
        &mut self.jobs[at].1
    }

    fn audit(&mut self, job: &'a str, line: Option<&'a [u8]>) {
        match self.audit_at.get(job) {
            Some(&at) => self.audit[at].1 = line,
            None => {
                self.audit_at.insert(job, self.audit.len());
                self.audit.push((job, line));
            }
        }
    }
}

/// Writes what batches leave ([`Net`]) in `tx` (the caller commits); their audit lines to
/// `kept` when given (the applier's, see [`Outbox`]), else to the table.
fn write_net(
    tx: &WriteTransaction,
    n: &Net<'_>,
    kept: Option<&mut Outbox>,
) -> Result<(), StoreError> {
    if !n.audit.is_empty() {
        let mut table = tx.open_table(AUDIT_OUTBOX).map_err(e)?;
        match kept {
            Some(kept) => {
                for (job, line) in &n.audit {
                    kept.change(&mut table, job, *line)?;
                }
            }
            None => {
                for (job, line) in &n.audit {
                    match line {
                        Some(line) => table.insert(*job, *line).map_err(e)?,
                        None => table.remove(*job).map_err(e)?,
                    };
                }
            }
        }
    }
    if !n.jobs.is_empty() {
        let mut t = tx.open_table(JOBS).map_err(e)?;
        let mut inputs = tx.open_table(INPUTS).map_err(e)?;
        let mut idem = tx.open_table(IDEMPOTENCY).map_err(e)?;
        for (id, job) in &n.jobs {
            if job.delete {
                // The key is in the stored record (the job is no longer held in memory).
                let removed = t.remove(*id).map_err(e)?;
                let key = removed
                    .and_then(|v| serde_json::from_slice::<JobRecord>(v.value()).ok())
                    .and_then(|j| {
                        j.spec
                            .idempotency_key
                            .map(|k| idem_key(&j.spec.submitter, &k))
                    });
                if let Some(k) = key {
                    idem.remove(k.as_str()).map_err(e)?;
                }
                inputs.remove(*id).map_err(e)?;
            }
            let Some(j) = job.write else { continue };
            t.insert(*id, j.record.as_slice()).map_err(e)?;
            // An inline input once; dropped when the job let go of it (a started
            // map/reduce). A stored input is in the record (its hash and size).
            match &j.input {
                Some(i) => {
                    if inputs.get(*id).map_err(e)?.is_none() {
                        inputs.insert(*id, i.as_slice()).map_err(e)?;
                    }
                }
                None => {
                    inputs.remove(*id).map_err(e)?;
                }
            }
            if let Some(k) = &j.idempotency {
                idem.insert(k.as_str(), *id).map_err(e)?;
            }
        }
    }
    if !n.agents.is_empty() {
        let mut t = tx.open_table(AGENTS).map_err(e)?;
        for (jid, at) in &n.agents {
            t.insert(jid.as_str(), *at).map_err(e)?;
        }
    }
    if !n.capabilities.is_empty() {
        let mut t = tx.open_table(CAPABILITIES).map_err(e)?;
        for (c, at) in &n.capabilities {
            if t.get(c.as_str()).map_err(e)?.is_none() {
                t.insert(c.as_str(), *at).map_err(e)?;
            }
        }
    }
    if !n.rules.is_empty() {
        let mut t = tx.open_table(RULES).map_err(e)?;
        for (name, rule) in &n.rules {
            match rule {
                Some(json) => t.insert(name.as_str(), json.as_slice()).map_err(e)?,
                None => t.remove(name.as_str()).map_err(e)?,
            };
        }
    }
    Ok(())
}

/// [`encode_frame_into`] a new buffer.
#[cfg(test)]
fn encode_frame(b: &OwnedBatch) -> Result<Vec<u8>, StoreError> {
    encode_frame_into(b, Vec::new())
}

/// A batch's tables as a journal frame, appended to `out`.
fn encode_frame_into(b: &OwnedBatch, out: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    #[derive(serde::Serialize)]
    struct Frame<'a> {
        jobs: &'a [EncodedJob],
        delete: &'a [JobId],
        audit: Vec<(&'a str, &'a serde_bytes::Bytes)>,
        audited: &'a [String],
        agents: &'a [(String, u64)],
        capabilities: &'a [(CapabilityName, u64)],
        rules: Vec<(&'a str, Option<&'a serde_bytes::Bytes>)>,
    }
    postcard::to_extend(
        &Frame {
            jobs: &b.jobs,
            delete: &b.delete,
            audit: b
                .audit
                .iter()
                .map(|(j, l)| (j.as_str(), serde_bytes::Bytes::new(l)))
                .collect(),
            audited: &b.audited,
            agents: &b.agents,
            capabilities: &b.capabilities,
            rules: b
                .rules
                .iter()
                .map(|(n, r)| (n.as_str(), r.as_deref().map(serde_bytes::Bytes::new)))
                .collect(),
        },
        out,
    )
    .map_err(|x| e(format!("encoding a batch for the journal: {x}")))
}

/// [`encode_frame_into`] undone: the batch's tables (nothing else of a batch is journaled).
fn decode_frame(frame: &[u8]) -> Result<OwnedBatch, String> {
    #[derive(serde::Deserialize)]
    struct Frame {
        jobs: Vec<EncodedJob>,
        delete: Vec<JobId>,
        audit: Vec<(String, serde_bytes::ByteBuf)>,
        audited: Vec<String>,
        agents: Vec<(String, u64)>,
        capabilities: Vec<(CapabilityName, u64)>,
        rules: Vec<(String, Option<serde_bytes::ByteBuf>)>,
    }
    let f: Frame = postcard::from_bytes(frame).map_err(|x| x.to_string())?;
    Ok(OwnedBatch {
        jobs: f.jobs,
        delete: f.delete,
        audit: f
            .audit
            .into_iter()
            .map(|(j, l)| (j, l.into_vec()))
            .collect(),
        audited: f.audited,
        agents: f.agents,
        capabilities: f.capabilities,
        rules: f
            .rules
            .into_iter()
            .map(|(n, r)| (n, r.map(serde_bytes::ByteBuf::into_vec)))
            .collect(),
        ..OwnedBatch::default()
    })
}

/// Creates `dir` (and missing parents) with mode 0700, or tightens an existing one that other
/// users may read or enter to 0700, with a warning.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) => tighten(dir, m.permissions().mode(), 0o700),
        Err(x) if x.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(x) => Err(x),
    }
}

/// Makes `file` private: an existing one that other users may read or write is tightened to
/// 0600, with a warning; a missing one is created empty with mode 0600 when `create` is set.
pub fn private_file(file: &Path, create: bool) -> std::io::Result<()> {
    match std::fs::metadata(file) {
        Ok(m) => tighten(file, m.permissions().mode(), 0o600),
        Err(x) if x.kind() == std::io::ErrorKind::NotFound && create => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(file)
            .map(drop),
        Err(x) if x.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(x) => Err(x),
    }
}

fn tighten(path: &Path, mode: u32, private: u32) -> std::io::Result<()> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))?;
    tracing::warn!(
        path = %path.display(),
        "{} was readable by other users (mode {:04o}): now {private:04o}",
        path.display(),
        mode & 0o7777
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobSpec, JobTable};
    use spine_protocol::{JobState, Strategy};

    fn spec(key: Option<&str>) -> JobSpec {
        JobSpec {
            capability: "c".parse().unwrap(),
            strategy: Strategy::LeastLoaded,
            filter: Some("gpu".parse().unwrap()),
            sort: None,
            affinity_key: None,
            args: serde_json::json!({"n": 9007199254740993u64})
                .as_object()
                .cloned()
                .unwrap(),
            input: vec![0, 1, 2, 255].into(),
            input_mime: Some("application/octet-stream".into()),
            deadline_ms: Some(1_900_000_000_000),
            not_before_ms: None,
            priority: -2,
            max_attempts: 3,
            submitter: "http:app".into(),
            idempotency_key: key.map(str::to_owned),
            progress: true,
            watch: None,
            limit: None,
            batch: None,
            mapreduce: None,
            output_refs: false,
            input_blobs: Vec::new(),
            keep_output: false,
            input_kept: Vec::new(),
            event: None,
            target: None,
            parent: None,
        }
    }

    #[test]
    fn the_audit_outbox_is_written_and_cleared_with_the_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let mut t = JobTable::new(10);
        let a = t
            .submit("a".parse().unwrap(), spec(None), 5)
            .unwrap()
            .clone();
        let store = Store::open(&path).unwrap();
        let line = (a.id.to_string(), b"{\"job\":\"a\"}\n".to_vec());
        store
            .put_with_audit(&[&a], std::slice::from_ref(&line), &[])
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.audit_outbox().unwrap(), vec![line]);
        assert_eq!(store.load().unwrap().len(), 1, "the job came with it");
        store.put_with_audit(&[], &[], &["a".into()]).unwrap();
        assert!(store.audit_outbox().unwrap().is_empty());
    }

    #[test]
    fn jobs_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let mut t = JobTable::new(10);
        let a = t
            .submit("a".parse().unwrap(), spec(Some("upload-1")), 5)
            .unwrap()
            .clone();
        let b = t
            .submit("b".parse().unwrap(), spec(None), 6)
            .unwrap()
            .clone();
        {
            let s = Store::open(&path).unwrap();
            s.put(&[&a, &b]).unwrap();
            s.saw_agents(&[("agent1@x".into(), 100), ("agent2@x".into(), 5)])
                .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let mut loaded = s.load().unwrap();
        loaded.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(loaded, vec![a.clone(), b.clone()]);
        assert_eq!(
            s.idempotent("http:app", "upload-1").unwrap(),
            Some("a".parse().unwrap())
        );
        assert_eq!(
            s.idempotent("http:other", "upload-1").unwrap(),
            None,
            "keys are per submitter"
        );
        assert_eq!(s.known_agents(50).unwrap(), vec!["agent1@x".to_owned()]);
        assert_eq!(
            s.known_capabilities().unwrap(),
            Vec::<CapabilityName>::new()
        );
        let caps: Vec<CapabilityName> = vec!["b.two".parse().unwrap(), "a.one".parse().unwrap()];
        s.saw_capabilities(&caps, 7).unwrap();
        s.saw_capabilities(&caps[..1], 9).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(
            s.known_capabilities().unwrap(),
            vec![
                "a.one".parse::<CapabilityName>().unwrap(),
                "b.two".parse().unwrap()
            ],
            "capabilities are remembered across a reopening, in name order"
        );
        let mut done = a.clone();
        done.state = JobState::Succeeded;
        s.put(&[&done]).unwrap();
        assert_eq!(
            s.load()
                .unwrap()
                .iter()
                .find(|j| j.id.as_str() == "a")
                .unwrap()
                .state,
            JobState::Succeeded
        );
        s.delete(&[done.id.clone()]).unwrap();
        assert_eq!(s.load().unwrap().len(), 1);
        assert_eq!(s.idempotent("http:app", "upload-1").unwrap(), None);
    }

    #[test]
    fn inputs_are_written_once_apart_from_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        let mut t = JobTable::new(10);
        let mut a = t
            .submit("a".parse().unwrap(), spec(None), 5)
            .unwrap()
            .clone();
        s.put(&[&a]).unwrap();
        // The record itself carries no input.
        let json = serde_json::to_string(&a).unwrap();
        assert!(!json.contains("AAEC/w=="), "{json}");
        let input_of = |s: &Store| {
            s.settle().unwrap();
            let tx = s.db.begin_read().unwrap();
            let t = tx.open_table(INPUTS).unwrap();
            t.get("a").unwrap().map(|v| v.value().to_vec())
        };
        assert_eq!(input_of(&s), Some(vec![0, 1, 2, 255]));
        a.state = JobState::Running;
        s.put(&[&a]).unwrap();
        assert_eq!(
            s.load().unwrap()[0].spec.input,
            Body::Inline(vec![0, 1, 2, 255])
        );
        // A job that let its input go (a started map/reduce) drops it from the store.
        a.spec.input = Body::default();
        s.put(&[&a]).unwrap();
        assert_eq!(input_of(&s), None);
        assert!(s.load().unwrap()[0].spec.input.is_empty());
        // A record written with its input inside (earlier versions) still loads it.
        let mut old: serde_json::Value = serde_json::to_value(&a).unwrap();
        old["spec"]["input"] = serde_json::json!("AAEC/w==");
        {
            let tx = s.db.begin_write().unwrap();
            {
                let mut t = tx.open_table(JOBS).unwrap();
                let bytes = serde_json::to_vec(&old).unwrap();
                t.insert("a", bytes.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        assert_eq!(
            s.load().unwrap()[0].spec.input,
            Body::Inline(vec![0, 1, 2, 255])
        );
        // A stored input is in the record, its hash and size, and not in the table.
        let stored = crate::blobs::Stored {
            sha256: [7; 32],
            size: 1 << 20,
        };
        a.spec.input = Body::Stored(stored);
        s.put(&[&a]).unwrap();
        assert_eq!(input_of(&s), None);
        assert_eq!(s.load().unwrap()[0].spec.input, Body::Stored(stored));
        // Deleting the job deletes its input.
        a.spec.input = vec![9].into();
        s.put(&[&a]).unwrap();
        s.delete(&[a.id.clone()]).unwrap();
        assert_eq!(input_of(&s), None);
    }

    /// Issue 14, finding 12: the data directory was 0755 and `jobs.redb` 0644, job inputs in
    /// clear for every local user.
    #[test]
    fn the_data_directory_and_the_store_are_private() {
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/data");
        let path = dir.join("jobs.redb");
        drop(Store::open(&path).unwrap());
        let journals = [dir.join("jobs.journal"), dir.join("jobs.journal2")];
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
        for j in &journals {
            assert_eq!(mode(j), 0o600, "{}", j.display());
        }
        // Found open to others (an earlier version, or a careless copy): tightened at start,
        // the jobs still there.
        let mut t = JobTable::new(10);
        let a = t
            .submit("a".parse().unwrap(), spec(None), 5)
            .unwrap()
            .clone();
        Store::open(&path).unwrap().put(&[&a]).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&journals[1], std::fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(
            (mode(&dir), mode(&path), mode(&journals[1])),
            (0o700, 0o600, 0o600)
        );
        assert_eq!(s.load().unwrap().len(), 1);
    }

    #[test]
    fn unreadable_records_are_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let s = Store::open(&path).unwrap();
        let tx = s.db.begin_write().unwrap();
        tx.open_table(JOBS)
            .unwrap()
            .insert("broken", b"{not json".as_slice())
            .unwrap();
        tx.commit().unwrap();
        let err = s.load().unwrap_err().to_string();
        assert!(err.contains("job broken is unreadable"), "{err}");
    }

    /// Four batches of every kind the journal carries: jobs with and without a key, an audit
    /// line and its removal, a deletion, a key used again by a later job, agents and
    /// capabilities.
    fn four_batches() -> Vec<OwnedBatch> {
        let mut t = JobTable::new(10);
        let mut job = |id: &str, key: Option<&str>, order: u64| {
            t.submit(id.parse().unwrap(), spec(key), order)
                .unwrap()
                .clone()
        };
        let (a, b) = (job("a", Some("upload-1"), 5), job("b", None, 6));
        let c = job("c", Some("upload-1"), 7);
        let enc = |j: &JobRecord| EncodedJob::new(j).unwrap();
        vec![
            OwnedBatch {
                jobs: vec![enc(&a), enc(&b)],
                audit: vec![("a".into(), b"{\"job\":\"a\"}\n".to_vec())],
                ..OwnedBatch::default()
            },
            OwnedBatch {
                delete: vec!["a".parse().unwrap()],
                agents: vec![("agent1@x".into(), 100)],
                ..OwnedBatch::default()
            },
            OwnedBatch {
                jobs: vec![enc(&c)],
                audited: vec!["a".into()],
                capabilities: vec![("c".parse().unwrap(), 7)],
                ..OwnedBatch::default()
            },
            OwnedBatch {
                agents: vec![("agent1@x".into(), 200), ("agent2@x".into(), 150)],
                capabilities: vec![("c".parse().unwrap(), 9), ("d".parse().unwrap(), 9)],
                ..OwnedBatch::default()
            },
        ]
    }

    /// What a store holds, for comparing.
    fn held(s: &Store) -> String {
        let mut jobs = s.load().unwrap();
        jobs.sort_by(|x, y| x.id.cmp(&y.id));
        let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
        let mut agents = s.agents().unwrap();
        agents.sort();
        format!(
            "jobs {ids:?} key {:?} agents {agents:?} caps {:?} outbox {:?}",
            s.idempotent("http:app", "upload-1").unwrap(),
            s.known_capabilities().unwrap(),
            s.audit_outbox().unwrap()
        )
    }

    const EXPECTED: &str = "jobs [\"b\", \"c\"] key Some(JobId(\"c\")) agents [(\"agent1@x\", 200), (\"agent2@x\", 150)] caps [CapabilityName(\"c\"), CapabilityName(\"d\")] outbox []";

    /// Every table's rows, for comparing two databases.
    fn dump(db: &Database) -> String {
        use redb::TableHandle as _;
        let tx = db.begin_read().unwrap();
        let mut out = String::new();
        for def in [JOBS, INPUTS, AUDIT_OUTBOX, RULES] {
            let t = tx.open_table(def).unwrap();
            for row in t.iter().unwrap() {
                let (k, v) = row.unwrap();
                out += &format!(
                    "{} {} {}\n",
                    def.name(),
                    k.value(),
                    String::from_utf8_lossy(v.value())
                );
            }
        }
        let t = tx.open_table(IDEMPOTENCY).unwrap();
        for row in t.iter().unwrap() {
            let (k, v) = row.unwrap();
            out += &format!("idempotency {} {}\n", k.value(), v.value());
        }
        for def in [AGENTS, CAPABILITIES] {
            let t = tx.open_table(def).unwrap();
            for row in t.iter().unwrap() {
                let (k, v) = row.unwrap();
                out += &format!("{} {} {}\n", def.name(), k.value(), v.value());
            }
        }
        out
    }

    #[test]
    fn batches_applied_together_leave_what_they_leave_one_by_one() {
        let mut t = JobTable::new(10);
        let mut job = |id: &str, key: Option<&str>, order: u64| {
            t.submit(id.parse().unwrap(), spec(key), order)
                .unwrap()
                .clone()
        };
        let (a, b) = (job("a", Some("k-a"), 5), job("b", Some("k-b"), 6));
        let (c, d) = (job("c", Some("k-c"), 7), job("d", None, 8));
        let enc = |j: &JobRecord| EncodedJob::new(j).unwrap();
        let mut a_ended = a.clone();
        a_ended.state = JobState::Succeeded;
        let mut c_again = c.clone();
        c_again.spec.idempotency_key = Some("k-c2".into());
        c_again.spec.input = Vec::new().into();
        let mut b_let_go = b.clone();
        b_let_go.spec.input = Vec::new().into();
        let line = |s: &str| (s.to_owned(), format!("{{\"job\":\"{s}\"}}\n").into_bytes());
        let rule = |s: &str| (s.to_owned(), Some(s.as_bytes().to_vec()));
        // Stored before the group: c with its key and input, an audit line for d, a rule.
        let before = OwnedBatch {
            jobs: vec![enc(&c)],
            audit: vec![line("d")],
            rules: vec![rule("r1")],
            ..OwnedBatch::default()
        };
        let group = || {
            vec![
                // a accepted, b accepted; d's line written to the file; r1 deleted.
                OwnedBatch {
                    jobs: vec![enc(&a), enc(&b)],
                    audited: vec!["d".into()],
                    rules: vec![("r1".into(), None)],
                    agents: vec![("agent1@x".into(), 100)],
                    ..OwnedBatch::default()
                },
                // a ends (its audit line); c and d forgotten (d never stored); b lets its
                // input go; d's line comes again; a rule made.
                OwnedBatch {
                    jobs: vec![enc(&a_ended), enc(&b_let_go), enc(&d)],
                    delete: vec!["c".parse().unwrap(), "d".parse().unwrap()],
                    audit: vec![line("a"), line("d")],
                    rules: vec![rule("r2")],
                    capabilities: vec![("c".parse().unwrap(), 7)],
                    ..OwnedBatch::default()
                },
                // c written again under a new key, without its input; a's line in the file.
                OwnedBatch {
                    jobs: vec![enc(&c_again)],
                    audited: vec!["a".into()],
                    agents: vec![("agent1@x".into(), 200)],
                    capabilities: vec![("c".parse().unwrap(), 9)],
                    ..OwnedBatch::default()
                },
            ]
        };
        let open = |dir: &tempfile::TempDir| {
            let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
            apply(&s.db, &before).unwrap();
            s
        };
        let (one_by_one, together) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s1 = open(&one_by_one);
        for b in group() {
            apply(&s1.db, &b).unwrap();
        }
        let s2 = open(&together);
        let batches: Vec<Box<Applying>> = group()
            .into_iter()
            .enumerate()
            .map(|(i, batch)| {
                Box::new(Applying {
                    seq: i as u64,
                    batch,
                    bytes: 0,
                })
            })
            .collect();
        // The audit lines the applier keeps out of redb, written into it (as a checkpoint does).
        let kept = Mutex::new(Outbox::of(&s2.db).unwrap());
        apply_all(&s2.db, &kept, batches.into_iter()).unwrap();
        let tx = s2.db.begin_write().unwrap();
        lock(&kept).flush(&tx).unwrap();
        tx.commit().unwrap();
        let (d1, d2) = (dump(&s1.db), dump(&s2.db));
        assert_eq!(d1, d2);
        // And what that is, in words: a ended, b without its input, c under its new key only,
        // d gone with its input but its second audit line kept.
        assert!(d1.contains("\"state\":\"succeeded\""), "{d1}");
        assert!(
            !d1.contains("inputs b ") && !d1.contains("inputs c ") && !d1.contains("inputs d "),
            "{d1}"
        );
        assert!(d1.contains("inputs a "), "{d1}");
        assert!(d1.contains("idempotency http:app\u{0}k-c2 c\n"), "{d1}");
        assert!(!d1.contains("k-c c"), "{d1}");
        assert!(
            d1.contains("audit_outbox d ") && !d1.contains("audit_outbox a "),
            "{d1}"
        );
        assert!(
            d1.contains("rules r2 ") && !d1.contains("rules r1 "),
            "{d1}"
        );
        assert!(d1.contains("agents agent1@x 200"), "{d1}");
        assert!(d1.contains("capabilities c 7"), "{d1}");
        // Written once each: a and b once, not twice; d, written and forgotten, never.
        let group = group();
        let net = Net::of(group.iter());
        let writes: Vec<&str> = net
            .jobs
            .iter()
            .filter(|(_, j)| j.write.is_some())
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(writes, ["a", "b", "c"]);
    }

    #[test]
    fn applying_batches_the_store_already_holds_changes_nothing() {
        // A crash after a checkpoint and before the journal started over: every batch of the
        // journal is applied again over a database that holds them all.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        for b in four_batches() {
            s.commit_owned(b).unwrap();
        }
        assert_eq!(held(&s), EXPECTED);
        for b in four_batches() {
            let frame = encode_frame(&b).unwrap();
            let tx = s.db.begin_write().unwrap();
            write(&tx, &decode_frame(&frame).unwrap()).unwrap();
            tx.commit().unwrap();
        }
        assert_eq!(held(&s), EXPECTED);
    }

    /// Runs `child` in a process of its own (this test binary again, this test alone) that
    /// dies at once when it returns (abort: no destructor, no checkpoint), as a `kill -9`
    /// leaves the store; returns the store's directory.
    fn crashed(test: &str, child: impl FnOnce(&Store)) -> Option<tempfile::TempDir> {
        if let Ok(d) = std::env::var("SPINE_STORE_CRASH_DIR") {
            let s = Store::open(&std::path::Path::new(&d).join("jobs.redb")).unwrap();
            child(&s);
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture"])
            .env("SPINE_STORE_CRASH_DIR", dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "the child aborted");
        Some(dir)
    }

    #[test]
    fn a_crash_loses_no_commit_the_journal_holds_them() {
        let dir = crashed(
            "store::tests::a_crash_loses_no_commit_the_journal_holds_them",
            |s| {
                for b in four_batches() {
                    s.commit_owned(b).unwrap();
                }
            },
        )
        .unwrap();
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        assert_eq!(s.replayed(), 4, "the journal held the four batches");
        assert_eq!(held(&s), EXPECTED);
        drop(s);
        // A clean close checkpointed: nothing to apply again.
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        assert_eq!(s.replayed(), 0);
        assert_eq!(held(&s), EXPECTED);
    }

    /// The keys of redb's audit outbox table itself.
    fn outbox_table(s: &Store) -> Vec<String> {
        let tx = s.db.begin_read().unwrap();
        let t = tx.open_table(AUDIT_OUTBOX).unwrap();
        t.iter()
            .unwrap()
            .map(|r| r.unwrap().0.value().to_owned())
            .collect()
    }

    fn audit_line(job: &str) -> (String, Vec<u8>) {
        (
            job.to_owned(),
            format!("{{\"job\":\"{job}\"}}\n").into_bytes(),
        )
    }

    /// Enough redb transactions for the applier to checkpoint (each commit applied before
    /// the next), then time for it to finish.
    fn past_a_checkpoint(s: &Store) {
        for i in 0..=u64::from(CHECKPOINT_TRANSACTIONS) {
            s.commit_owned(OwnedBatch {
                agents: vec![("agent@x".into(), i)],
                ..OwnedBatch::default()
            })
            .unwrap();
            s.settle().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }

    #[test]
    fn audit_lines_reach_redb_only_when_a_checkpoint_finds_them_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.redb");
        let s = Store::open(&path).unwrap();
        // Added and removed between two checkpoints: never in the table, always in the outbox.
        s.put_with_audit(&[], &[audit_line("a")], &[]).unwrap();
        assert_eq!(s.audit_outbox().unwrap(), vec![audit_line("a")]);
        assert!(outbox_table(&s).is_empty());
        s.put_with_audit(&[], &[audit_line("b")], &["a".into()])
            .unwrap();
        assert_eq!(s.audit_outbox().unwrap(), vec![audit_line("b")]);
        assert!(outbox_table(&s).is_empty());
        // A checkpoint writes what is still there into the table; removing it then removes
        // it from the table.
        past_a_checkpoint(&s);
        assert_eq!(outbox_table(&s), vec!["b".to_owned()]);
        s.put_with_audit(&[], &[audit_line("c")], &["b".into()])
            .unwrap();
        assert_eq!(s.audit_outbox().unwrap(), vec![audit_line("c")]);
        assert!(outbox_table(&s).is_empty());
        // A clean close writes it too.
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(outbox_table(&s), vec!["c".to_owned()]);
        assert_eq!(s.audit_outbox().unwrap(), vec![audit_line("c")]);
    }

    #[test]
    fn audit_lines_kept_out_of_redb_survive_a_crash_before_and_after_a_checkpoint() {
        // "early" is in a journal file that the checkpoint started over: only the table has
        // it then. "late" and the removal of "gone" are in the journal only.
        let dir = crashed(
            "store::tests::audit_lines_kept_out_of_redb_survive_a_crash_before_and_after_a_checkpoint",
            |s| {
                s.put_with_audit(&[], &[audit_line("early"), audit_line("gone")], &[])
                    .unwrap();
                past_a_checkpoint(s);
                s.put_with_audit(&[], &[audit_line("late")], &["gone".into()])
                    .unwrap();
            },
        )
        .unwrap();
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        assert!(s.replayed() > 0);
        assert_eq!(
            s.audit_outbox().unwrap(),
            vec![audit_line("early"), audit_line("late")]
        );
    }

    #[test]
    fn a_crash_after_checkpoints_loses_nothing_either() {
        // Past two checkpoints: the commits moved from one journal file to the other and
        // back; what the last checkpoint left in them is applied again in order.
        let n = 2 * CHECKPOINT_COMMITS as u64 + 300;
        let dir = crashed(
            "store::tests::a_crash_after_checkpoints_loses_nothing_either",
            |s| {
                for i in 0..n {
                    s.commit_owned(OwnedBatch {
                        agents: vec![(format!("agent{}@x", i % 500), i)],
                        ..OwnedBatch::default()
                    })
                    .unwrap();
                    if i % 512 == 511 {
                        // Lets the applier catch up and finish its checkpoint (on a fast
                        // disk the commits run far ahead of it).
                        s.settle().unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            },
        )
        .unwrap();
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        assert!(
            s.replayed() > 0 && s.replayed() < 2 * CHECKPOINT_COMMITS as usize,
            "{} applied again",
            s.replayed()
        );
        let agents = s.agents().unwrap();
        assert_eq!(agents.len(), 500);
        // Each agent's last sighting is the last batch that named it.
        assert!(
            agents
                .iter()
                .all(|(jid, at)| *at >= n - 500 && format!("agent{}@x", at % 500) == *jid),
            "{:?}",
            &agents[..3]
        );
    }

    #[test]
    #[ignore = "a measurement, not a test (BENCHMARKS.md, \"The store's journal\"): cargo test --release -p spine-dispatcher --lib commit_latency -- --ignored --nocapture"]
    fn commit_latency() {
        // One job's batch at a time, 3,000 per mode and round, in a directory under
        // SPINE_TIMING_DIR (default: the current one, on the disk being measured). Modes: a
        // durable redb transaction (the store before the journal), a journaled commit, the
        // journal's append alone (direct I/O where the file system takes it), a redb
        // transaction without durability, and the append through the page cache and
        // `fdatasync` (the journal before direct I/O).
        let dir = std::env::var("SPINE_TIMING_DIR").unwrap_or_else(|_| ".".into());
        let dir = tempfile::tempdir_in(dir).unwrap();
        let s = Store::open(&dir.path().join("jobs.redb")).unwrap();
        let mut t = JobTable::new(100_000);
        let mut n = 0;
        let (mut buffered, _) =
            journal::Journal::open_buffered(&dir.path().join("buffered.journal")).unwrap();
        let direct = lock(&s.journal).files[0].is_direct();
        let mut time = |mode: u8| {
            let mut ts = Vec::new();
            for _ in 0..3000 {
                n += 1;
                let a = t
                    .submit(format!("j{n}").parse().unwrap(), spec(None), 5)
                    .unwrap()
                    .clone();
                let b = OwnedBatch {
                    jobs: vec![EncodedJob::new(&a).unwrap()],
                    ..OwnedBatch::default()
                };
                let at = std::time::Instant::now();
                match mode {
                    0 => {
                        let tx = s.db.begin_write().unwrap();
                        write(&tx, &b).unwrap();
                        tx.commit().unwrap();
                    }
                    1 => s.commit_owned(b).unwrap(),
                    2 => {
                        let mut tx = s.db.begin_write().unwrap();
                        tx.set_durability(Durability::None);
                        write(&tx, &b).unwrap();
                        tx.commit().unwrap();
                    }
                    3 => {
                        let f = encode_frame(&b).unwrap();
                        let mut j = lock(&s.journal);
                        let a = j.active;
                        j.files[a].append(&f).unwrap();
                    }
                    _ => buffered.append(&encode_frame(&b).unwrap()).unwrap(),
                }
                ts.push(at.elapsed().as_micros());
            }
            ts.sort();
            (
                ts[ts.len() / 2],
                ts[ts.len() * 9 / 10],
                ts[ts.len() * 99 / 100],
            )
        };
        for round in 0..3 {
            let d = time(0);
            let j = time(1);
            let n = time(2);
            let a = time(3);
            let b = time(4);
            println!("round {round}: redb durable p50/p90/p99 {d:?} us; journaled {j:?} us; redb non-durable {n:?}; journal append (direct I/O: {direct}) {a:?}; buffered append + fdatasync {b:?}");
        }
    }
}
