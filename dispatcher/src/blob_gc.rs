//! Deleting blobs no job holds (docs/dispatcher.md §5): the driver's part of the blob store's
//! life. The core says when a blob's last referencing job went ([`crate::core::Ready`]'s
//! `released`); this deletes the file once it is also older than `blob_orphan_ttl` — so
//! that bytes a web app just uploaded (`PUT /v1/blobs`, to be named by a job soon) or an
//! agent just put in its slot (its result on the way) are not deleted under them — and only
//! after the commit that forgot the job, so a crash never leaves a record without its blob.
//!
//! Blobs that no job ever referenced (an upload never named, a slot whose result never came,
//! files left by a `kill -9`) are found by a walk of the store at start and every
//! `blob_orphan_ttl`: no orphan is kept forever.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use crate::blobs::{BlobInfo, BlobStore, Stored};

/// When to look at the released blobs and the store again.
pub(crate) struct BlobGc {
    store: BlobStore,
    ttl: Duration,
    /// Blobs to delete at (or after) a time, if still unreferenced then.
    due: BTreeMap<SystemTime, Vec<Stored>>,
    next_walk: Instant,
}

impl BlobGc {
    /// Starts with the blobs found in the store at start: those no held job references are
    /// deleted when old enough.
    pub(crate) fn new(
        store: BlobStore,
        ttl: Duration,
        found: Vec<BlobInfo>,
        referenced: &HashSet<Stored>,
    ) -> BlobGc {
        let mut gc = BlobGc {
            store,
            ttl,
            due: BTreeMap::new(),
            next_walk: Instant::now() + ttl,
        };
        let orphans: Vec<BlobInfo> = found
            .into_iter()
            .filter(|b| !referenced.contains(&b.stored))
            .collect();
        if !orphans.is_empty() {
            info!(
                blobs = orphans.len(),
                "blobs no job references: deleted once older than blob_orphan_ttl"
            );
        }
        for b in orphans {
            gc.schedule(b.stored, b.modified);
        }
        gc
    }

    fn schedule(&mut self, blob: Stored, modified: SystemTime) {
        self.due.entry(modified + self.ttl).or_default().push(blob);
    }

    /// Blobs whose last job went (the commit that forgot it is done).
    pub(crate) fn released(&mut self, blobs: Vec<Stored>) {
        for b in blobs {
            match std::fs::metadata(self.store.path(&b.sha256)).and_then(|m| m.modified()) {
                Ok(modified) => self.schedule(b, modified),
                Err(_) => debug!(blob = %b.hex(), "released blob already gone"),
            }
        }
    }

    /// How long until something may be due.
    pub(crate) fn next_wake(&self) -> Duration {
        let walk = self.next_walk.saturating_duration_since(Instant::now());
        let due = self.due.keys().next().map_or(walk, |t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        walk.min(due)
    }

    /// Deletes what is due and unreferenced (`refs` counts a blob's held jobs, from the
    /// core); walks the store when its time comes. The blobs deleted.
    pub(crate) fn run(&mut self, refs: impl Fn(&Stored) -> u32) -> Vec<Stored> {
        let now = SystemTime::now();
        if Instant::now() >= self.next_walk {
            self.next_walk = Instant::now() + self.ttl;
            match self.store.list() {
                Ok(all) => {
                    for b in all.into_iter().filter(|b| refs(&b.stored) == 0) {
                        self.schedule(b.stored, b.modified);
                    }
                }
                Err(e) => warn!("cannot list the blob store: {e}"),
            }
        }
        let later = self.due.split_off(&now);
        let due = std::mem::replace(&mut self.due, later);
        let mut deleted = Vec::new();
        let mut seen = HashSet::new();
        for b in due.into_values().flatten() {
            if !seen.insert(b) || refs(&b) > 0 {
                continue;
            }
            // Written again since (its mtime moved): a new upload; it waits its own ttl.
            let modified = std::fs::metadata(self.store.path(&b.sha256)).and_then(|m| m.modified());
            match modified {
                Ok(m) if m + self.ttl > now => self.schedule(b, m),
                Ok(_) => match self.store.remove(&b.sha256) {
                    Ok(_) => deleted.push(b),
                    Err(e) => warn!(blob = %b.hex(), "cannot delete an unreferenced blob: {e}"),
                },
                Err(_) => {}
            }
        }
        if !deleted.is_empty() {
            debug!(deleted = deleted.len(), "unreferenced blobs deleted");
        }
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreferenced_blob_goes_once_old_enough_and_a_referenced_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BlobStore::open(dir.path(), None).unwrap();
        let a = store.put(&[1u8; 100]).unwrap();
        let b = store.put(&[2u8; 100]).unwrap();
        let ttl = Duration::from_secs(60);
        let mut gc = BlobGc::new(store.clone(), ttl, Vec::new(), &HashSet::new());
        gc.released(vec![a, b]);
        // Young: nothing yet, whatever the references.
        gc.run(|_| 0);
        assert!(store.contains(&a.sha256) && store.contains(&b.sha256));
        assert!(gc.next_wake() > Duration::from_secs(50));
        // Age them: `b` is referenced again (a new job took it), `a` is not.
        let old = SystemTime::now() - Duration::from_secs(120);
        for s in [a, b] {
            std::fs::File::options()
                .write(true)
                .open(store.path(&s.sha256))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        gc.due.clear();
        gc.released(vec![a, b]);
        gc.run(|s| u32::from(*s == b));
        assert!(!store.contains(&a.sha256), "unreferenced and old: deleted");
        assert!(store.contains(&b.sha256), "referenced: kept");
    }

    #[test]
    fn the_start_sweep_schedules_orphans_and_keeps_what_jobs_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BlobStore::open(dir.path(), None).unwrap();
        let held = store.put(&[1u8; 10]).unwrap();
        let orphan = store.put(&[2u8; 10]).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for s in [held, orphan] {
            std::fs::File::options()
                .write(true)
                .open(store.path(&s.sha256))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let (store, found) = BlobStore::open(dir.path(), None).unwrap();
        let referenced: HashSet<Stored> = [held].into_iter().collect();
        let mut gc = BlobGc::new(store.clone(), Duration::from_secs(60), found, &referenced);
        assert_eq!(gc.next_wake(), Duration::ZERO);
        gc.run(|s| u32::from(*s == held));
        assert!(store.contains(&held.sha256));
        assert!(!store.contains(&orphan.sha256));
    }
}
