//! The content-addressed blob store: large job inputs, outputs and map/reduce intermediate
//! data live here as files named by their SHA-256, instead of as redb values. HTTP request
//! bodies (uploads, `PUT /v1/blobs`) stream into it through the async [`BlobWriter`]; the
//! driver stores payloads assembled from in-band chunks with [`BlobStore::put`]; the core
//! cuts a stored blob into 64 KiB chunks for agents without HTTP with
//! [`BlobStore::read_at`]; downloads stream from [`BlobStore::file`]. Job records keep only
//! the [`Stored`] reference (hash and size).
//!
//! Layout under the directory given to [`BlobStore::open`] (the dispatcher passes
//! `<data_dir>/blobs`): `tmp/` holds files being written; `sha256/<first 2 hex>/<64 hex>` holds
//! complete blobs. A blob is written once and fsynced once: the writer streams into
//! `tmp/<random>` while hashing, then [`BlobWriter::finish`] fsyncs the file, hard-links it
//! under `sha256/` (which fails if that name exists, so two writers of the same bytes store
//! one file, and the second counts as a dedup hit) and fsyncs that directory. A file under
//! `sha256/` is therefore always complete; a kill -9 leaves at most files in `tmp/`, which the
//! next [`BlobStore::open`] removes.
//!
//! The optional disk quota covers complete blobs plus the bytes reserved by open writers, so
//! concurrent uploads cannot together overrun it. All counters are atomics: one store (a
//! cheap [`Clone`] handle) is shared by the HTTP tasks and the driver.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use tokio::task::{spawn_blocking, JoinHandle};

use crate::store::private_dir;

/// The async writer hands the disk this much at a time (one `spawn_blocking` per batch):
/// large enough that the hop to the blocking pool is noise, small enough to keep two batches
/// (one filling, one being written) cheap per upload.
const BATCH: usize = 1 << 20;

/// A complete blob: what a job record keeps instead of the bytes.
///
/// Serialised as `{"sha256":"<64 lowercase hex>","size":n}`, the shape of the HTTP API's
/// `PUT /v1/blobs` answer and of job records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    /// The SHA-256 of the bytes: the blob's name.
    #[serde(with = "sha256_serde")]
    pub sha256: [u8; 32],
    /// Length in bytes.
    pub size: u64,
}

impl Stored {
    /// The hash as 64 lowercase hex digits, as in URLs and file names.
    pub fn hex(&self) -> String {
        sha256_hex(&self.sha256)
    }
}

/// A blob found by [`BlobStore::open`] or [`BlobStore::list`]: the start-up sweep deletes
/// those no job references, and retention may use `modified` to spare recent uploads whose
/// job is not stored yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its hash and size.
    pub stored: Stored,
    /// When it was stored (the file's mtime).
    pub modified: SystemTime,
}

/// A snapshot of the store's counters, for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlobMetrics {
    /// Bytes in complete blobs.
    pub used_bytes: u64,
    /// Bytes reserved by writers still open.
    pub reserved_bytes: u64,
    /// Number of complete blobs.
    pub blobs: u64,
    /// The quota, if any.
    pub quota: Option<u64>,
    /// Writers refused, at creation or while growing, because of the quota.
    pub quota_refusals: u64,
    /// Writes that found their blob already stored (the bytes were not stored twice).
    pub dedup_hits: u64,
    /// Bytes accepted by writers and `put`s, duplicates and failed writes included.
    pub bytes_written: u64,
}

/// Why a blob could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Storing `wanted` more bytes would take the store over its quota. The HTTP API answers
    /// 507, XMPP `storage-full`.
    #[error(
        "the blob store is full: {used} bytes stored or reserved, quota {quota} bytes, \
         {wanted} more wanted; raise `blob_quota` in the dispatcher's configuration, or wait \
         for retention to delete the blobs of old jobs"
    )]
    QuotaExceeded {
        /// Bytes in complete blobs plus bytes reserved by open writers.
        used: u64,
        /// The quota.
        quota: u64,
        /// The bytes this write asked for.
        wanted: u64,
    },
    /// The bytes are not as long as declared (at [`BlobStore::writer`] or in `finish`'s
    /// `expect`).
    #[error("blob size differs: {expected} bytes declared, {got} received")]
    SizeMismatch {
        /// Declared length.
        expected: u64,
        /// Length received (so far, when too long).
        got: u64,
    },
    /// The bytes do not hash to the SHA-256 given in `finish`'s `expect`.
    #[error("blob hash differs: sha256 {expected} declared, {got} received")]
    HashMismatch {
        /// Declared hash, hex.
        expected: String,
        /// Hash of the bytes received, hex.
        got: String,
    },
    /// A write after an earlier failure, or after a `write` was cancelled mid-way.
    #[error("this blob writer failed earlier (or a write was cancelled); start a new one")]
    Broken,
    /// The file system failed.
    #[error("blob store: {path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

pub use spine_protocol::data::{parse_sha256, ParseSha256Error};

/// The hash as 64 lowercase hex digits.
pub fn sha256_hex(sha256: &[u8; 32]) -> String {
    spine_protocol::data::hex(sha256)
}

mod sha256_serde {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::sha256_hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        super::parse_sha256(&s).map_err(serde::de::Error::custom)
    }
}

/// The blob store: a cheap handle ([`Clone`]) on one directory.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    tmp: PathBuf,
    sha_dir: PathBuf,
    quota: Option<u64>,
    /// `used` plus the bytes reserved by open writers: the figure the quota bounds. One
    /// atomic, so that checking and reserving is one compare-and-swap.
    committed: AtomicU64,
    used: AtomicU64,
    blobs: AtomicU64,
    quota_refusals: AtomicU64,
    dedup_hits: AtomicU64,
    bytes_written: AtomicU64,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore")
            .field("sha256", &self.inner.sha_dir)
            .field("metrics", &self.metrics())
            .finish()
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(x) if x.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(x) => Err(x),
    }
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl BlobStore {
    /// Opens (or creates) the store in `dir`, made private (0700), with an optional quota in
    /// bytes; returns it with every blob present, for the start-up sweep.
    ///
    /// Cleans up after a crash first: everything in `tmp/` is a torn write and is removed;
    /// under `sha256/`, anything whose name is not a 2-hex-digit directory holding
    /// 64-hex-digit regular files of its prefix is removed too, with a warning (nothing this
    /// store writes looks like that). A store already over a lowered quota opens, and
    /// refuses writes until retention brings it under.
    pub fn open(dir: &Path, quota: Option<u64>) -> Result<(BlobStore, Vec<BlobInfo>), BlobError> {
        let tmp = dir.join("tmp");
        let sha_dir = dir.join("sha256");
        for d in [dir, &tmp, &sha_dir] {
            private_dir(d).map_err(io_err(d))?;
        }
        let mut torn = 0usize;
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            remove_any(&path).map_err(io_err(&path))?;
            torn += 1;
        }
        if torn > 0 {
            tracing::info!(
                dir = %tmp.display(),
                "blob store: removed {torn} unfinished write(s) left by the last stop"
            );
        }
        let found = scan(&sha_dir, true)?;
        // Every prefix directory exists from now on, so storing a blob fsyncs one directory.
        let mut created = false;
        for p in 0..=255u8 {
            let d = sha_dir.join(format!("{p:02x}"));
            if !d.is_dir() {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .map_err(io_err(&d))?;
                created = true;
            }
        }
        if created {
            sync_dir(&sha_dir)?;
        }
        let used: u64 = found.iter().map(|b| b.stored.size).sum();
        if let Some(q) = quota.filter(|&q| used > q) {
            tracing::warn!(
                "blob store: {used} bytes stored, over the quota of {q} bytes; new blobs are \
                 refused until retention deletes old ones (or raise `blob_quota`)"
            );
        }
        let store = BlobStore {
            inner: Arc::new(Inner {
                tmp,
                sha_dir,
                quota,
                committed: AtomicU64::new(used),
                used: AtomicU64::new(used),
                blobs: AtomicU64::new(found.len() as u64),
                quota_refusals: AtomicU64::new(0),
                dedup_hits: AtomicU64::new(0),
                bytes_written: AtomicU64::new(0),
            }),
        };
        Ok((store, found))
    }

    /// Every blob present now, with size and mtime (a directory walk: for sweeps, not for
    /// each request).
    pub fn list(&self) -> Result<Vec<BlobInfo>, BlobError> {
        scan(&self.inner.sha_dir, false)
    }

    /// Where the blob `sha256` is (or would be) stored.
    pub fn path(&self, sha256: &[u8; 32]) -> PathBuf {
        let hex = sha256_hex(sha256);
        self.inner.sha_dir.join(&hex[..2]).join(hex)
    }

    /// Opens a stored blob for reading (streamed downloads). `NotFound` if absent.
    pub fn file(&self, sha256: &[u8; 32]) -> io::Result<File> {
        File::open(self.path(sha256))
    }

    /// Whether the blob is stored.
    pub fn contains(&self, sha256: &[u8; 32]) -> bool {
        self.path(sha256).is_file()
    }

    /// The blob's length in bytes; `NotFound` if absent.
    pub fn len(&self, sha256: &[u8; 32]) -> io::Result<u64> {
        std::fs::metadata(self.path(sha256)).map(|m| m.len())
    }

    /// Up to `len` bytes of the blob from `offset` (fewer at its end, none past it); the
    /// core cuts blobs into in-band chunks with this. `NotFound` if absent.
    pub fn read_at(&self, sha256: &[u8; 32], offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let f = self.file(sha256)?;
        let size = f.metadata()?.len();
        let n = usize::try_from(size.saturating_sub(offset)).map_or(len, |rest| rest.min(len));
        let mut buf = vec![0u8; n];
        let mut done = 0;
        while done < n {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(x) if x.kind() == io::ErrorKind::Interrupted => {}
                Err(x) => return Err(x),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Deletes a blob; `Ok(false)` if it was not there. The caller makes sure no job still
    /// references it.
    pub fn remove(&self, sha256: &[u8; 32]) -> io::Result<bool> {
        let path = self.path(sha256);
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(x) if x.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(x) => return Err(x),
        };
        match std::fs::remove_file(&path) {
            // Counted only by the remover that succeeded: two concurrent removals of one blob
            // subtract its size once.
            Ok(()) => {
                let i = &self.inner;
                i.used.fetch_sub(size, Ordering::AcqRel);
                i.committed.fetch_sub(size, Ordering::AcqRel);
                i.blobs.fetch_sub(1, Ordering::AcqRel);
                Ok(true)
            }
            Err(x) if x.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(x) => Err(x),
        }
    }

    /// The counters now.
    pub fn metrics(&self) -> BlobMetrics {
        let i = &self.inner;
        let used = i.used.load(Ordering::Acquire);
        BlobMetrics {
            used_bytes: used,
            reserved_bytes: i.committed.load(Ordering::Acquire).saturating_sub(used),
            blobs: i.blobs.load(Ordering::Acquire),
            quota: i.quota,
            quota_refusals: i.quota_refusals.load(Ordering::Relaxed),
            dedup_hits: i.dedup_hits.load(Ordering::Relaxed),
            bytes_written: i.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Stores `bytes` (synchronously: for the driver, whose payloads are already in memory).
    /// Bytes already stored are not written again.
    pub fn put(&self, bytes: &[u8]) -> Result<Stored, BlobError> {
        let stored = Stored {
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
        };
        self.inner
            .bytes_written
            .fetch_add(stored.size, Ordering::Relaxed);
        if self.contains(&stored.sha256) {
            self.inner.dedup_hits.fetch_add(1, Ordering::Relaxed);
            touch(&self.path(&stored.sha256));
            return Ok(stored);
        }
        let mut reservation = self.reserve(stored.size)?;
        let mut temp = TempFile::create(&self.inner.tmp)?;
        temp.write(bytes)?;
        commit(self, temp, stored.sha256, &mut reservation, None)
    }

    /// A writer for bytes that arrive in pieces (HTTP request bodies). With `size`, that many
    /// bytes are reserved against the quota at once (refused now if they do not fit) and
    /// exactly that many must arrive; without, the reservation grows with the bytes. Does
    /// no I/O: the temporary file is created by the first batch written.
    pub fn writer(&self, size: Option<u64>) -> Result<BlobWriter, BlobError> {
        let reservation = self.reserve(size.unwrap_or(0))?;
        Ok(BlobWriter {
            store: self.clone(),
            declared: size,
            received: 0,
            reservation: Some(reservation),
            batch_size: BATCH,
            pieces: Vec::new(),
            filled: 0,
            hasher: Some(Sha256::new()),
            hashing: None,
            temp: Some(None),
            writing: None,
        })
    }

    fn reserve(&self, wanted: u64) -> Result<Reservation, BlobError> {
        let mut r = Reservation {
            store: self.clone(),
            bytes: 0,
        };
        r.grow(wanted)?;
        Ok(r)
    }
}

fn scan(sha_dir: &Path, sweep: bool) -> Result<Vec<BlobInfo>, BlobError> {
    let junk = |path: &Path, why: &str| -> Result<(), BlobError> {
        if sweep {
            tracing::warn!(path = %path.display(), "blob store: removing {}: {why}", path.display());
            remove_any(path).map_err(io_err(path))?;
        }
        Ok(())
    };
    let mut found = Vec::new();
    for prefix in std::fs::read_dir(sha_dir).map_err(io_err(sha_dir))? {
        let prefix = prefix.map_err(io_err(sha_dir))?;
        let ppath = prefix.path();
        let pname = prefix.file_name();
        let is_dir = prefix.file_type().map_err(io_err(&ppath))?.is_dir();
        let pname = match pname.to_str() {
            Some(p) if is_dir && is_lower_hex(p, 2) => p.to_owned(),
            _ => {
                junk(&ppath, "not a 2-hex-digit directory")?;
                continue;
            }
        };
        for entry in std::fs::read_dir(&ppath).map_err(io_err(&ppath))? {
            let entry = entry.map_err(io_err(&ppath))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().unwrap_or("");
            let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
            if !meta.is_file() || !is_lower_hex(name, 64) || !name.starts_with(&pname) {
                junk(
                    &path,
                    "not a blob of this directory (64 hex digits starting with its name)",
                )?;
                continue;
            }
            let sha256 = parse_sha256(name).map_err(|x| BlobError::Io {
                path: path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, x),
            })?;
            found.push(BlobInfo {
                stored: Stored {
                    sha256,
                    size: meta.len(),
                },
                modified: meta.modified().map_err(io_err(&path))?,
            });
        }
    }
    found.sort_by_key(|b| b.stored.sha256);
    Ok(found)
}

/// Bytes counted against the quota for a write in progress; released on drop unless the
/// blob was stored (then they stay, as the blob's size).
struct Reservation {
    store: BlobStore,
    bytes: u64,
}

impl Reservation {
    fn grow(&mut self, wanted: u64) -> Result<(), BlobError> {
        let i = &self.store.inner;
        if wanted == 0 {
            return Ok(());
        }
        // Without a quota the bound is u64::MAX: the counter never wraps.
        let quota = i.quota.unwrap_or(u64::MAX);
        i.committed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                c.checked_add(wanted).filter(|&n| n <= quota)
            })
            .map_err(|used| {
                i.quota_refusals.fetch_add(1, Ordering::Relaxed);
                BlobError::QuotaExceeded {
                    used,
                    quota,
                    wanted,
                }
            })?;
        self.bytes += wanted;
        Ok(())
    }

    /// The blob of `size` bytes was stored: keep `size` bytes, release the rest.
    fn keep(&mut self, size: u64) {
        let i = &self.store.inner;
        i.used.fetch_add(size, Ordering::AcqRel);
        i.blobs.fetch_add(1, Ordering::AcqRel);
        if size > self.bytes {
            // Unreachable through the writers (they reserve every byte first); keeps the
            // counters consistent if that ever changes.
            i.committed.fetch_add(size - self.bytes, Ordering::AcqRel);
            self.bytes = 0;
        } else {
            self.bytes -= size;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.store
                .inner
                .committed
                .fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// A file in `tmp/` being written. Always removed on drop: once committed, the blob's
/// name under `sha256/` is a second link to it.
struct TempFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl TempFile {
    fn create(tmp: &Path) -> Result<TempFile, BlobError> {
        let name = format!("{:032x}", rand::rng().random::<u128>());
        let path = tmp.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(TempFile { path, file, len: 0 })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.file.write_all(bytes).map_err(io_err(&self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Writes the pieces in order, as few system calls as the kernel takes them in.
    fn write_pieces(&mut self, pieces: &[Bytes]) -> Result<(), BlobError> {
        let mut slices: Vec<IoSlice<'_>> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match self.file.write_vectored(rest) {
                Ok(0) => return Err(io_err(&self.path)(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.len += n as u64;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(x) if x.kind() == io::ErrorKind::Interrupted => {}
                Err(x) => return Err(io_err(&self.path)(x)),
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(x) = std::fs::remove_file(&self.path) {
            tracing::warn!(
                path = %self.path.display(),
                "blob store: cannot remove the temporary file {}: {x} (the next start \
                 removes it)",
                self.path.display()
            );
        }
    }
}

/// Checks the bytes (whose hash is `sha256`) against `expect`, makes the temporary file durable and links it under
/// `sha256/` (or drops it if that blob exists), and settles the reservation.
/// Marks a stored blob as written again now: the sweep deletes a blob no job references only
/// once it is older than `blob_orphan_ttl`, so bytes uploaded again (to be named by a job
/// soon) are not deleted under the uploader's feet because an old job let them go.
fn touch(path: &Path) {
    if let Ok(f) = File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

fn commit(
    store: &BlobStore,
    temp: TempFile,
    sha256: [u8; 32],
    reservation: &mut Reservation,
    expect: Option<(u64, [u8; 32])>,
) -> Result<Stored, BlobError> {
    let stored = Stored {
        sha256,
        size: temp.len,
    };
    if let Some((size, sha256)) = expect {
        if size != stored.size {
            return Err(BlobError::SizeMismatch {
                expected: size,
                got: stored.size,
            });
        }
        if sha256 != stored.sha256 {
            return Err(BlobError::HashMismatch {
                expected: sha256_hex(&sha256),
                got: stored.hex(),
            });
        }
    }
    let dest = store.path(&stored.sha256);
    if dest.is_file() {
        // Already stored: skip the fsync; `temp` is removed on drop.
        store.inner.dedup_hits.fetch_add(1, Ordering::Relaxed);
        touch(&dest);
        return Ok(stored);
    }
    temp.file.sync_data().map_err(io_err(&temp.path))?;
    // A hard link, not a rename: it fails if the name exists, so of two writers finishing
    // the same bytes at once exactly one stores the blob and counts its size.
    match std::fs::hard_link(&temp.path, &dest) {
        Ok(()) => {
            reservation.keep(stored.size);
            // From here the blob is stored and counted, whatever happens to the temp name.
            drop(temp);
            let dir = dest.parent().unwrap_or(&store.inner.sha_dir);
            sync_dir(dir)?;
        }
        Err(x) if x.kind() == io::ErrorKind::AlreadyExists => {
            store.inner.dedup_hits.fetch_add(1, Ordering::Relaxed);
            touch(&dest);
        }
        Err(x) => return Err(io_err(&dest)(x)),
    }
    Ok(stored)
}

/// Streams bytes that arrive in pieces (HTTP request bodies) into the store, without
/// blocking the runtime: pieces are gathered, as they came (not copied), into ~1 MiB
/// batches; each batch is hashed and written by two tasks of the blocking pool at once
/// (hashing costs about as much as writing), while the next batch fills. Dropping the
/// writer (or a failure) removes the temporary file and releases its reservation; nothing
/// is stored until [`BlobWriter::finish`] succeeds.
pub struct BlobWriter {
    store: BlobStore,
    declared: Option<u64>,
    received: u64,
    /// `None` once the writer failed, and while a `write` awaits (so that a cancelled
    /// `write` leaves it broken).
    reservation: Option<Reservation>,
    /// [`BATCH`], except in the benchmark that compares sizes.
    batch_size: usize,
    /// The batch filling: the pieces as they came (an HTTP body's are slices of hyper's
    /// read buffer, so holding them copies nothing), `filled` bytes in all.
    pieces: Vec<Bytes>,
    filled: usize,
    /// `None` while in `hashing`.
    hasher: Option<Sha256>,
    hashing: Option<JoinHandle<Sha256>>,
    /// `Some(None)`: no file yet; `Some(Some(_))`: idle; `None`: in `writing`, or failed.
    temp: Option<Option<TempFile>>,
    writing: Option<JoinHandle<Result<TempFile, BlobError>>>,
}

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobWriter")
            .field("declared", &self.declared)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

fn join_error(x: tokio::task::JoinError) -> BlobError {
    BlobError::Io {
        path: PathBuf::from("(blob store: blocking task)"),
        source: io::Error::other(x),
    }
}

impl BlobWriter {
    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Accepts the next piece (copied: [`write_bytes`](Self::write_bytes) takes a piece
    /// the caller already holds as [`Bytes`] without a copy).
    pub async fn write(&mut self, piece: &[u8]) -> Result<(), BlobError> {
        self.write_bytes(Bytes::copy_from_slice(piece)).await
    }

    /// Accepts the next piece, kept as it is until its batch is written. Fails at once if
    /// it would exceed the declared size or the quota (the writer is then broken: drop it).
    /// Cancel safety: a cancelled `write_bytes` breaks the writer, and its temporary file is
    /// still removed.
    pub async fn write_bytes(&mut self, piece: Bytes) -> Result<(), BlobError> {
        let n = piece.len() as u64;
        let got = self.received + n;
        let Some(reservation) = self.reservation.as_mut() else {
            return Err(BlobError::Broken);
        };
        if let Some(expected) = self.declared {
            if got > expected {
                self.fail();
                return Err(BlobError::SizeMismatch { expected, got });
            }
        } else if let Err(x) = reservation.grow(n) {
            self.fail();
            return Err(x);
        }
        self.received = got;
        self.store
            .inner
            .bytes_written
            .fetch_add(n, Ordering::Relaxed);
        self.filled += piece.len();
        if !piece.is_empty() {
            self.pieces.push(piece);
        }
        if self.filled >= self.batch_size {
            let r = self.reservation.take();
            let out = self.flush().await;
            self.reservation = r;
            if let Err(x) = out {
                self.fail();
                return Err(x);
            }
        }
        Ok(())
    }

    /// Waits for the batch in flight, then sends the full batch to be hashed and written.
    async fn flush(&mut self) -> Result<(), BlobError> {
        self.wait().await?;
        let (Some(mut hasher), Some(temp)) = (self.hasher.take(), self.temp.take()) else {
            return Err(BlobError::Broken);
        };
        self.filled = 0;
        let batch = Arc::new(std::mem::take(&mut self.pieces));
        let b = batch.clone();
        self.hashing = Some(spawn_blocking(move || {
            for p in b.iter() {
                hasher.update(p);
            }
            hasher
        }));
        let b = batch;
        let tmp_dir = self.store.inner.tmp.clone();
        self.writing = Some(spawn_blocking(move || {
            let mut temp = match temp {
                Some(t) => t,
                None => TempFile::create(&tmp_dir)?,
            };
            temp.write_pieces(&b)?;
            Ok(temp)
        }));
        Ok(())
    }

    /// Waits for the batch in flight, if any.
    async fn wait(&mut self) -> Result<(), BlobError> {
        if let Some(h) = self.hashing.take() {
            self.hasher = Some(h.await.map_err(join_error)?);
        }
        if let Some(w) = self.writing.take() {
            self.temp = Some(Some(w.await.map_err(join_error)??));
        }
        Ok(())
    }

    fn fail(&mut self) {
        self.reservation = None;
        self.hasher = None;
        self.temp = None;
        self.pieces = Vec::new();
        self.filled = 0;
    }

    /// Writes what is left, checks the bytes against `expect` (size, SHA-256) and the
    /// declared size, and stores the blob: fsync, link into place, fsync the directory. If
    /// the blob was already stored the new copy is dropped (a dedup hit). On any error
    /// nothing is stored, the temporary file is removed and the reservation released.
    pub async fn finish(mut self, expect: Option<(u64, [u8; 32])>) -> Result<Stored, BlobError> {
        if self.reservation.is_none() {
            return Err(BlobError::Broken);
        }
        if let Some(expected) = self.declared.filter(|&d| d != self.received) {
            return Err(BlobError::SizeMismatch {
                expected,
                got: self.received,
            });
        }
        self.wait().await?;
        let (Some(mut hasher), Some(temp), Some(mut reservation)) = (
            self.hasher.take(),
            self.temp.take(),
            self.reservation.take(),
        ) else {
            return Err(BlobError::Broken);
        };
        let pieces = std::mem::take(&mut self.pieces);
        let store = self.store.clone();
        // Everything from here runs to completion on the blocking pool even if this future
        // is dropped, so the counters always match the files.
        spawn_blocking(move || {
            for p in &pieces {
                hasher.update(p);
            }
            let mut temp = match temp {
                Some(t) => t,
                None => TempFile::create(&store.inner.tmp)?,
            };
            temp.write_pieces(&pieces)?;
            commit(
                &store,
                temp,
                hasher.finalize().into(),
                &mut reservation,
                expect,
            )
        })
        .await
        .map_err(join_error)?
    }
}

/// The store as the dispatcher's core sees it ([`BlobAccess`](crate::jobs::BlobAccess)): the
/// core moves payloads over the inline limit here and reads them back for agents that take
/// chunks.
impl crate::jobs::BlobAccess for BlobStore {
    fn read(&self, blob: &Stored) -> io::Result<Vec<u8>> {
        let len = usize::try_from(blob.size).map_err(io::Error::other)?;
        self.read_at(&blob.sha256, 0, len)
    }

    fn read_at(&self, blob: &Stored, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        BlobStore::read_at(self, &blob.sha256, offset, len)
    }

    fn put(&self, bytes: &[u8]) -> Result<Stored, crate::jobs::BlobRefused> {
        BlobStore::put(self, bytes).map_err(|e| match e {
            BlobError::QuotaExceeded { .. } => crate::jobs::BlobRefused::Quota(e.to_string()),
            other => crate::jobs::BlobRefused::Io(other.to_string()),
        })
    }

    fn contains(&self, blob: &Stored) -> bool {
        self.len(&blob.sha256).is_ok_and(|n| n == blob.size)
    }

    fn find(&self, sha256: &[u8; 32]) -> Option<Stored> {
        let size = self.len(sha256).ok()?;
        Some(Stored {
            sha256: *sha256,
            size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn open(dir: &Path, quota: Option<u64>) -> BlobStore {
        BlobStore::open(dir, quota).expect("open").0
    }

    fn sha(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    fn tmp_count(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).expect("tmp").count()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    async fn write_in_pieces(
        store: &BlobStore,
        bytes: &[u8],
        declared: Option<u64>,
        piece: usize,
    ) -> Result<Stored, BlobError> {
        let mut w = store.writer(declared)?;
        for p in bytes.chunks(piece) {
            w.write(p).await?;
        }
        w.finish(Some((bytes.len() as u64, sha(bytes)))).await
    }

    #[tokio::test]
    async fn round_trip_async_and_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), None);
        // 3.5 MiB in 256 KiB pieces: several batches, one in flight while the next fills.
        let big = pattern(3 * BATCH + BATCH / 2, 7);
        let s = write_in_pieces(&store, &big, None, 256 << 10)
            .await
            .expect("stored");
        assert_eq!(s.size, big.len() as u64);
        assert_eq!(s.sha256, sha(&big));
        assert_eq!(std::fs::read(store.path(&s.sha256)).expect("read"), big);
        assert_eq!(store.len(&s.sha256).expect("len"), big.len() as u64);
        assert!(store.contains(&s.sha256));
        let mode = std::fs::metadata(store.path(&s.sha256))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(dir.path().join("sha256"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        // Chunks as the core cuts them, including the short last one and past the end.
        let chunk = store.read_at(&s.sha256, 65536, 65536).expect("read_at");
        assert_eq!(chunk, &big[65536..131072]);
        let end = big.len() as u64 - 10;
        assert_eq!(
            store.read_at(&s.sha256, end, 65536).expect("tail"),
            &big[big.len() - 10..]
        );
        assert!(store
            .read_at(&s.sha256, big.len() as u64 + 5, 10)
            .expect("past")
            .is_empty());

        let small = b"hello blobs".to_vec();
        let t = store.put(&small).expect("put");
        assert_eq!(
            t,
            Stored {
                sha256: sha(&small),
                size: 11
            }
        );
        let mut f = store.file(&t.sha256).expect("file");
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut back).expect("read");
        assert_eq!(back, small);
        // Empty blobs are blobs too.
        let e = store
            .writer(Some(0))
            .expect("w")
            .finish(None)
            .await
            .expect("empty");
        assert_eq!(e.size, 0);
        assert_eq!(store.len(&e.sha256).expect("len"), 0);

        let m = store.metrics();
        assert_eq!(m.blobs, 3);
        assert_eq!(m.used_bytes, big.len() as u64 + 11);
        assert_eq!(m.reserved_bytes, 0);
        assert_eq!(m.bytes_written, big.len() as u64 + 11);
        assert_eq!(tmp_count(dir.path()), 0);

        assert!(store.remove(&t.sha256).expect("remove"));
        assert!(!store.remove(&t.sha256).expect("remove again"));
        assert!(!store.contains(&t.sha256));
        assert_eq!(
            store.len(&t.sha256).expect_err("gone").kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(store.metrics().used_bytes, big.len() as u64);
        assert_eq!(store.metrics().blobs, 2);
    }

    #[tokio::test]
    async fn same_bytes_are_stored_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), None);
        let bytes = pattern(100_000, 1);
        let a = store.put(&bytes).expect("put");
        let b = store.put(&bytes).expect("put again");
        let c = write_in_pieces(&store, &bytes, Some(100_000), 4096)
            .await
            .expect("async");
        assert_eq!((a, b), (c, c));
        let m = store.metrics();
        assert_eq!((m.blobs, m.used_bytes, m.dedup_hits), (1, 100_000, 2));
        assert_eq!(m.reserved_bytes, 0);
        assert_eq!(store.list().expect("list").len(), 1);
        assert_eq!(tmp_count(dir.path()), 0);
    }

    #[tokio::test]
    async fn a_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Some(10 << 20));
        let bytes = pattern(2 * BATCH + 3, 2);
        let mut w = store.writer(None).expect("w");
        for p in bytes.chunks(256 << 10) {
            w.write(p).await.expect("write");
        }
        let mut wrong = sha(&bytes);
        wrong[0] ^= 1;
        match w.finish(Some((bytes.len() as u64, wrong))).await {
            Err(BlobError::HashMismatch { expected, got }) => {
                assert_eq!(expected, sha256_hex(&wrong));
                assert_eq!(got, sha256_hex(&sha(&bytes)));
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        let mut w = store.writer(None).expect("w");
        w.write(&bytes).await.expect("write");
        match w.finish(Some((5, sha(&bytes)))).await {
            Err(BlobError::SizeMismatch { expected: 5, got }) => {
                assert_eq!(got, bytes.len() as u64)
            }
            other => panic!("expected a size mismatch, got {other:?}"),
        }
        // Declared size: too many bytes fail at the write, too few at finish.
        let mut w = store.writer(Some(10)).expect("w");
        assert!(matches!(
            w.write(&[0; 11]).await,
            Err(BlobError::SizeMismatch {
                expected: 10,
                got: 11
            })
        ));
        assert!(matches!(w.write(b"x").await, Err(BlobError::Broken)));
        let mut w = store.writer(Some(10)).expect("w");
        w.write(&[0; 9]).await.expect("write");
        assert!(matches!(
            w.finish(None).await,
            Err(BlobError::SizeMismatch {
                expected: 10,
                got: 9
            })
        ));
        assert!(store.list().expect("list").is_empty());
        assert_eq!(store.metrics().used_bytes, 0);
        assert_eq!(store.metrics().reserved_bytes, 0);
        assert_eq!(tmp_count(dir.path()), 0);
    }

    /// Pieces kept as they came: thousands of small ones per batch (more than one
    /// `writev` takes), empty ones, and pieces larger than a batch, in one blob.
    #[tokio::test]
    async fn pieces_of_any_size_are_stored_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), None);
        let bytes = Bytes::from(pattern(3 * BATCH + 12_345, 11));
        let mut w = store.writer(Some(bytes.len() as u64)).expect("w");
        let mut at = 0;
        for (i, size) in std::iter::repeat([100usize, 0, 7, 300, 2 * BATCH + 5])
            .flatten()
            .enumerate()
        {
            // 12,000 small pieces (1.2 MB: the first batch, and more than the 1,024 slices
            // one `writev` takes), then the large piece, cut at the end of the bytes.
            let size = if size > BATCH && i < 3000 * 5 {
                1
            } else {
                size
            };
            let n = size.min(bytes.len() - at);
            w.write_bytes(bytes.slice(at..at + n)).await.expect("write");
            at += n;
            if at == bytes.len() {
                break;
            }
        }
        let s = w
            .finish(Some((bytes.len() as u64, sha(&bytes))))
            .await
            .expect("stored");
        assert_eq!(std::fs::read(store.path(&s.sha256)).expect("read"), bytes);
        assert_eq!(tmp_count(dir.path()), 0);
    }

    #[tokio::test]
    async fn the_quota_refuses_and_releases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Some(3 * BATCH as u64));
        store.put(&pattern(BATCH, 3)).expect("first MiB fits");
        // Known size: refused at once.
        match store.writer(Some(2 * BATCH as u64 + 1)) {
            Err(BlobError::QuotaExceeded {
                used,
                quota,
                wanted,
            }) => {
                assert_eq!(
                    (used, quota, wanted),
                    (BATCH as u64, 3 * BATCH as u64, 2 * BATCH as u64 + 1)
                );
            }
            other => panic!("expected a quota refusal, got {other:?}"),
        }
        let msg = store
            .put(&pattern(3 * BATCH, 4))
            .expect_err("sync over")
            .to_string();
        assert!(msg.contains("raise `blob_quota`"), "{msg}");
        // A known-size writer holds its reservation: a second one no longer fits.
        let held = store.writer(Some(BATCH as u64)).expect("fits");
        assert_eq!(store.metrics().reserved_bytes, BATCH as u64);
        assert!(store.writer(Some(BATCH as u64 + 1)).is_err());
        drop(held);
        assert_eq!(store.metrics().reserved_bytes, 0);
        // Unknown size: refused while growing, after batches were written to tmp/.
        let mut w = store.writer(None).expect("w");
        let piece = pattern(256 << 10, 5);
        let mut refused = None;
        for _ in 0..16 {
            if let Err(x) = w.write(&piece).await {
                refused = Some(x);
                break;
            }
        }
        assert!(
            matches!(refused, Some(BlobError::QuotaExceeded { .. })),
            "{refused:?}"
        );
        assert!(matches!(w.write(&piece).await, Err(BlobError::Broken)));
        drop(w);
        let m = store.metrics();
        assert_eq!(m.quota_refusals, 4);
        assert_eq!(
            (m.used_bytes, m.reserved_bytes, m.blobs),
            (BATCH as u64, 0, 1)
        );
        // The released room is usable: exactly up to the quota.
        write_in_pieces(&store, &pattern(2 * BATCH, 6), None, 256 << 10)
            .await
            .expect("fills the quota exactly");
        assert_eq!(store.metrics().used_bytes, 3 * BATCH as u64);
        // Dropping a writer on the blocking pool's side still removes its file.
        wait_until(|| tmp_count(dir.path()) == 0);
    }

    fn wait_until(cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not met in 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn a_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Some(100 << 20));
        let mut w = store.writer(Some(4 * BATCH as u64)).expect("w");
        for p in pattern(3 * BATCH, 8).chunks(256 << 10) {
            w.write(p).await.expect("write");
        }
        drop(w);
        // The batch in flight finishes on the blocking pool, then its file is removed.
        wait_until(|| tmp_count(dir.path()) == 0);
        let m = store.metrics();
        assert_eq!((m.used_bytes, m.reserved_bytes, m.blobs), (0, 0, 0));
    }

    #[tokio::test]
    async fn a_cancelled_write_breaks_the_writer_and_leaves_nothing() {
        use futures::FutureExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Some(100 << 20));
        let mut w = store.writer(None).expect("w");
        let piece = pattern(BATCH, 10);
        // The first full batch is handed to the blocking pool without waiting.
        w.write(&piece).await.expect("first batch");
        // The second must wait for the first: poll once, then drop the future mid-way.
        let mut cancelled = false;
        for _ in 0..100 {
            if w.write(&piece).now_or_never().is_none() {
                cancelled = true;
                break;
            }
        }
        assert!(cancelled, "no write ever had to wait");
        assert!(matches!(w.write(b"x").await, Err(BlobError::Broken)));
        assert!(matches!(w.finish(None).await, Err(BlobError::Broken)));
        wait_until(|| tmp_count(dir.path()) == 0);
        let m = store.metrics();
        assert_eq!((m.used_bytes, m.reserved_bytes, m.blobs), (0, 0, 0));
    }

    #[test]
    fn open_sweeps_torn_writes_and_junk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (store, found) = BlobStore::open(d, None).expect("open");
        assert!(found.is_empty());
        let kept = store.put(b"kept").expect("put");
        drop(store);
        std::fs::write(d.join("tmp/0123"), b"torn").expect("torn");
        std::fs::create_dir(d.join("tmp/somedir")).expect("dir");
        let good = sha256_hex(&sha(b"other"));
        let wrong_prefix = if good.starts_with("00") { "01" } else { "00" };
        let junk = [
            format!("sha256/{}/{}", &good[..2], good.to_uppercase()),
            format!("sha256/{}/{}", &good[..2], &good[..63]),
            format!("sha256/{}/{good}.part", &good[..2]),
            format!("sha256/{wrong_prefix}/{good}"),
            "sha256/stray-file".to_owned(),
        ];
        for j in &junk {
            std::fs::write(d.join(j), b"junk").expect("junk");
        }
        std::fs::create_dir(d.join("sha256/zz")).expect("zz");
        let (store, found) = BlobStore::open(d, None).expect("reopen");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].stored, kept);
        assert!(found[0].modified <= SystemTime::now());
        assert_eq!(tmp_count(d), 0);
        for j in junk.iter().map(String::as_str).chain(["sha256/zz"]) {
            assert!(!d.join(j).exists(), "{j} survived");
        }
        assert_eq!(store.metrics().used_bytes, 4);
        assert_eq!(store.metrics().blobs, 1);
        assert_eq!(store.list().expect("list"), found);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_of_the_same_bytes_store_one_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path(), Some(64 << 20));
        let bytes = Arc::new(pattern(2 * BATCH + 17, 9));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (store, bytes) = (store.clone(), bytes.clone());
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    write_in_pieces(&store, &bytes, Some(bytes.len() as u64), 256 << 10).await
                } else {
                    tokio::task::spawn_blocking(move || store.put(&bytes))
                        .await
                        .expect("join")
                }
            }));
        }
        for t in tasks {
            let s = t.await.expect("join").expect("stored");
            assert_eq!(s.sha256, sha(&bytes));
        }
        let m = store.metrics();
        assert_eq!(
            (m.blobs, m.used_bytes, m.reserved_bytes),
            (1, bytes.len() as u64, 0)
        );
        assert_eq!(m.dedup_hits, 3);
        assert_eq!(store.list().expect("list").len(), 1);
        assert_eq!(tmp_count(dir.path()), 0);
    }

    #[test]
    fn stored_serde_and_hex() {
        let s = Stored {
            sha256: sha(b"abc"),
            size: 3,
        };
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(
            json,
            r#"{"sha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","size":3}"#
        );
        assert_eq!(serde_json::from_str::<Stored>(&json).expect("back"), s);
        assert_eq!(parse_sha256(&s.hex()), Ok(s.sha256));
        for bad in [
            "",
            "ab",
            &s.hex().to_uppercase(),
            &format!("{}0", s.hex()),
            &"g".repeat(64),
        ] {
            let e = parse_sha256(bad).expect_err(bad);
            assert!(
                e.to_string().contains("64 lowercase hexadecimal digits"),
                "{e}"
            );
        }
        let e = serde_json::from_str::<Stored>(r#"{"sha256":"xyz","size":3}"#).expect_err("bad");
        assert!(e.to_string().contains("\"xyz\""), "{e}");
    }

    /// Throughput of the async writer against the alternatives, on this machine's disk:
    /// `SPINE_BLOB_BENCH_MIB=20,1024 cargo test -p spine-dispatcher --lib blob_throughput --
    /// --ignored --nocapture` (`SPINE_BLOB_BENCH_DIR` picks the file system; default `.`).
    /// Each round writes the same bytes, in 256 KiB pieces, with the final fsync, through
    /// [`BlobWriter`] with 1 MiB and with 256 KiB batches, through a `tokio::fs::File`
    /// hashing on the runtime's thread, and with one `std::fs::write` (no hash); 3 rounds in
    /// rotated order, medians of the wall time and of the process's CPU time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: writes hundreds of MiB; run by hand"]
    async fn blob_throughput() {
        use nix::sys::resource::{getrusage, UsageWho};
        use tokio::io::AsyncWriteExt as _;
        const NAMES: [&str; 4] = [
            "BlobWriter, 1 MiB batches",
            "BlobWriter, 256 KiB batches",
            "tokio::fs::File + hash on the runtime",
            "std::fs::write, no hash",
        ];
        let cpu = || {
            let r = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
            let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            s(r.user_time()) + s(r.system_time())
        };
        let sizes = std::env::var("SPINE_BLOB_BENCH_MIB").unwrap_or_else(|_| "20".to_owned());
        let dir = tempfile::tempdir_in(
            std::env::var("SPINE_BLOB_BENCH_DIR").unwrap_or_else(|_| ".".to_owned()),
        )
        .expect("tempdir");
        let store = open(&dir.path().join("blobs"), None);
        for mib in sizes
            .split(',')
            .map(|s| s.trim().parse::<usize>().expect("MiB"))
        {
            let mut wall: [Vec<f64>; 4] = Default::default();
            let mut cpus: [Vec<f64>; 4] = Default::default();
            for round in 0..3usize {
                let data = pattern(mib << 20, (round + mib) as u8);
                let want = sha(&data);
                // Rotated each round, so that no variant always follows the same other.
                for v in (0..4).map(|k| (k + round) % 4) {
                    let path = dir.path().join(format!("plain-{v}"));
                    let (t, c) = (std::time::Instant::now(), cpu());
                    match v {
                        0 | 1 => {
                            let mut w = store.writer(None).expect("w");
                            if v == 1 {
                                w.batch_size = 256 << 10;
                            }
                            for p in data.chunks(256 << 10) {
                                w.write(p).await.expect("write");
                            }
                            let expect = Some((data.len() as u64, want));
                            let s = w.finish(expect).await.expect("finish");
                            wall[v].push(t.elapsed().as_secs_f64());
                            assert!(store.remove(&s.sha256).expect("remove"));
                        }
                        2 => {
                            let mut f = tokio::fs::File::create(&path).await.expect("create");
                            let mut h = Sha256::new();
                            for p in data.chunks(256 << 10) {
                                h.update(p);
                                f.write_all(p).await.expect("write");
                            }
                            f.sync_data().await.expect("fsync");
                            wall[v].push(t.elapsed().as_secs_f64());
                            assert_eq!(<[u8; 32]>::from(h.finalize()), want);
                        }
                        _ => {
                            std::fs::write(&path, &data).expect("write");
                            File::open(&path)
                                .and_then(|f| f.sync_data())
                                .expect("fsync");
                            wall[v].push(t.elapsed().as_secs_f64());
                        }
                    }
                    cpus[v].push(cpu() - c);
                    let _ = std::fs::remove_file(&path);
                }
            }
            for ((name, mut w), mut c) in NAMES.into_iter().zip(wall).zip(cpus) {
                w.sort_by(f64::total_cmp);
                c.sort_by(f64::total_cmp);
                let mbs = |s: f64| (mib << 20) as f64 / s / 1e6;
                println!(
                    "{mib} MiB, {name}: median {:.0} MB/s (runs {:.0} / {:.0} / {:.0}), \
                     CPU {:.2} s",
                    mbs(w[1]),
                    mbs(w[2]),
                    mbs(w[1]),
                    mbs(w[0]),
                    c[1]
                );
            }
        }
    }
}
