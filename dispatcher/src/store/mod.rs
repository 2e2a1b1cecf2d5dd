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

use redb::{Database, ReadableTable, TableDefinition};
use spine_protocol::{CapabilityName, JobId};

use crate::jobs::{Body, JobRecord};

mod backend;
pub mod postgres;

pub(crate) use backend::target;
pub use backend::{Held, JobStore};

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

/// The store.
pub struct Store {
    db: Database,
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
        Ok(Store { db })
    }

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
        self.commit_owned(&OwnedBatch::encode(b)?)
    }

    /// [`Store::commit`] of a batch already encoded ([`OwnedBatch::encode`]): what the
    /// dispatcher's commit pipeline runs on a thread of its own while the dispatcher goes on.
    pub fn commit_owned(&self, b: &OwnedBatch) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut outbox = tx.open_table(AUDIT_OUTBOX).map_err(e)?;
            for job in &b.audited {
                outbox.remove(job.as_str()).map_err(e)?;
            }
            for (job, line) in &b.audit {
                outbox.insert(job.as_str(), line.as_slice()).map_err(e)?;
            }
        }
        {
            let mut t = tx.open_table(JOBS).map_err(e)?;
            let mut inputs = tx.open_table(INPUTS).map_err(e)?;
            let mut idem = tx.open_table(IDEMPOTENCY).map_err(e)?;
            for j in &b.jobs {
                t.insert(j.id.as_str(), j.record.as_slice()).map_err(e)?;
                // An inline input once; dropped when the job let go of it (a started
                // map/reduce). A stored input is in the record (its hash and size).
                match &j.input {
                    Some(i) => {
                        if inputs.get(j.id.as_str()).map_err(e)?.is_none() {
                            inputs.insert(j.id.as_str(), i.as_slice()).map_err(e)?;
                        }
                    }
                    None => {
                        inputs.remove(j.id.as_str()).map_err(e)?;
                    }
                }
                if let Some(k) = &j.idempotency {
                    idem.insert(k.as_str(), j.id.as_str()).map_err(e)?;
                }
            }
            for id in &b.delete {
                // The key is in the stored record (the job is no longer held in memory).
                let removed = t.remove(id.as_str()).map_err(e)?;
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
                inputs.remove(id.as_str()).map_err(e)?;
            }
        }
        if !b.agents.is_empty() {
            let mut t = tx.open_table(AGENTS).map_err(e)?;
            for (jid, at) in &b.agents {
                t.insert(jid.as_str(), *at).map_err(e)?;
            }
        }
        if !b.capabilities.is_empty() {
            let mut t = tx.open_table(CAPABILITIES).map_err(e)?;
            for (c, at) in &b.capabilities {
                if t.get(c.as_str()).map_err(e)?.is_none() {
                    t.insert(c.as_str(), *at).map_err(e)?;
                }
            }
        }
        if !b.rules.is_empty() {
            let mut t = tx.open_table(RULES).map_err(e)?;
            for (name, rule) in &b.rules {
                match rule {
                    Some(json) => t.insert(name.as_str(), json.as_slice()).map_err(e)?,
                    None => t.remove(name.as_str()).map_err(e)?,
                };
            }
        }
        tx.commit().map_err(e)
    }

    /// The event rules made over the HTTP API.
    pub fn rules(&self) -> Result<Vec<crate::triggers::RuleConfig>, StoreError> {
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
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(AUDIT_OUTBOX).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// The job an idempotency key of a submitter already created.
    pub fn idempotent(&self, submitter: &str, key: &str) -> Result<Option<JobId>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(IDEMPOTENCY).map_err(e)?;
        let got = t.get(idem_key(submitter, key).as_str()).map_err(e)?;
        Ok(got.and_then(|v| v.value().parse().ok()))
    }

    /// Every stored job.
    pub fn load(&self) -> Result<Vec<JobRecord>, StoreError> {
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
    /// read from the stored record (only its submitter and key are decoded).
    pub fn delete(&self, jobs: &[JobId]) -> Result<(), StoreError> {
        /// The part of a stored record that names its idempotency key.
        #[derive(serde::Deserialize)]
        struct Keyed {
            spec: KeyedSpec,
        }
        #[derive(serde::Deserialize)]
        struct KeyedSpec {
            submitter: String,
            idempotency_key: Option<String>,
        }
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(JOBS).map_err(e)?;
            let mut inputs = tx.open_table(INPUTS).map_err(e)?;
            let mut idem = tx.open_table(IDEMPOTENCY).map_err(e)?;
            for id in jobs {
                let keyed = t
                    .remove(id.as_str())
                    .map_err(e)?
                    .and_then(|v| serde_json::from_slice::<Keyed>(v.value()).ok());
                inputs.remove(id.as_str()).map_err(e)?;
                if let Some(Keyed {
                    spec:
                        KeyedSpec {
                            submitter,
                            idempotency_key: Some(k),
                        },
                }) = keyed
                {
                    idem.remove(idem_key(&submitter, &k).as_str()).map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)
    }

    /// Remembers agents (bare JIDs) seen, for the hello after a restart.
    pub fn saw_agents(&self, agents: &[(String, u64)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(AGENTS).map_err(e)?;
            for (jid, at) in agents {
                t.insert(jid.as_str(), *at).map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    /// Remembers capabilities offered for the first time, at `at` (ms since the UNIX epoch).
    pub fn saw_capabilities(&self, caps: &[CapabilityName], at: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(CAPABILITIES).map_err(e)?;
            for c in caps {
                if t.get(c.as_str()).map_err(e)?.is_none() {
                    t.insert(c.as_str(), at).map_err(e)?;
                }
            }
        }
        tx.commit().map_err(e)
    }

    /// Every capability an agent has offered in this store's life.
    pub fn known_capabilities(&self) -> Result<Vec<CapabilityName>, StoreError> {
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
    /// (PostgreSQL: the `spine_ended` channel), whose callers may wait for them.
    pub ended: Vec<String>,
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
#[derive(Debug)]
pub struct EncodedJob {
    id: String,
    /// The record as JSON, without its input.
    record: Vec<u8>,
    /// An inline input (written once), or none (a stored input, or one the job let go of).
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
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
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
        let s = Store::open(&path).unwrap();
        assert_eq!((mode(&dir), mode(&path)), (0o700, 0o600));
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
}
