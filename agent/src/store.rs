//! Bounded bookkeeping the agent's connection task keeps: finished outcomes (to answer a
//! repeated job id without running it again) and incoming blobs being assembled from chunks.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use jid::BareJid;
use sha2::{Digest, Sha256};
use spine_protocol::{BlobId, BlobRef, Chunk, Condition, JobId, SpineError};
use tokio::time::Instant;

/// A finished job's outcome as the agent replies with it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Result(spine_protocol::JobResult),
    Error(SpineError),
}

/// Outcomes of finished jobs, bounded in count and age.
pub(crate) struct OutcomeCache {
    max: usize,
    ttl: Duration,
    order: VecDeque<(JobId, Instant)>,
    map: HashMap<JobId, Outcome>,
}

impl OutcomeCache {
    pub(crate) fn new(max: usize, ttl: Duration) -> Self {
        OutcomeCache {
            max,
            ttl,
            order: VecDeque::new(),
            map: HashMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, id: JobId, outcome: Outcome, now: Instant) {
        if self.map.insert(id.clone(), outcome).is_none() {
            self.order.push_back((id, now));
        }
        self.expire(now);
        while self.order.len() > self.max {
            if let Some((old, _)) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub(crate) fn get(&mut self, id: &JobId, now: Instant) -> Option<&Outcome> {
        self.expire(now);
        self.map.get(id)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, t)) = self.order.front() {
            if now.duration_since(*t) <= self.ttl {
                break;
            }
            let id = id.clone();
            self.order.pop_front();
            self.map.remove(&id);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

struct Partial {
    total: u64,
    bytes: Vec<u8>,
    /// Byte ranges received, sorted and merged (chunks may come in any order, and twice).
    ranges: Vec<(u64, u64)>,
    touched: Instant,
}

impl Partial {
    fn add_range(&mut self, start: u64, end: u64) {
        self.ranges.push((start, end));
        self.ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.ranges.len());
        for (s, e) in self.ranges.drain(..) {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.ranges = merged;
    }

    fn received(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// Blobs received in chunks, per sender, until a job references them.
pub(crate) struct BlobStore {
    max_size: u64,
    idle_ttl: Duration,
    blobs: HashMap<(BareJid, BlobId), Partial>,
}

fn err(condition: Condition, text: String) -> SpineError {
    SpineError::new(condition).with_text(text)
}

impl BlobStore {
    pub(crate) fn new(max_size: u64, idle_ttl: Duration) -> Self {
        BlobStore {
            max_size,
            idle_ttl,
            blobs: HashMap::new(),
        }
    }

    /// Stores one chunk (idempotent: a resent chunk rewrites the same bytes).
    pub(crate) fn put(&mut self, from: &BareJid, c: Chunk, now: Instant) -> Result<(), SpineError> {
        self.expire(now);
        if c.total > self.max_size {
            let mut e = err(
                Condition::TooLarge,
                format!(
                    "blob of {} bytes is over the limit of {}",
                    c.total, self.max_size
                ),
            );
            e.max = Some(self.max_size);
            return Err(e);
        }
        let key = (from.clone(), c.blob.clone());
        let p = self.blobs.entry(key).or_insert_with(|| Partial {
            total: c.total,
            bytes: vec![0; c.total as usize],
            ranges: Vec::new(),
            touched: now,
        });
        if p.total != c.total {
            return Err(err(
                Condition::Malformed,
                format!(
                    "blob {} was announced with {} bytes, this chunk says {}",
                    c.blob, p.total, c.total
                ),
            ));
        }
        // Chunk parsing guarantees offset + len <= total.
        let start = c.offset as usize;
        p.bytes[start..start + c.bytes.len()].copy_from_slice(&c.bytes);
        p.add_range(c.offset, c.offset + c.bytes.len() as u64);
        p.touched = now;
        Ok(())
    }

    /// Takes a complete blob that matches `r`.
    pub(crate) fn take(&mut self, from: &BareJid, r: &BlobRef) -> Result<Vec<u8>, SpineError> {
        let key = (from.clone(), r.blob.clone());
        let Some(p) = self.blobs.get(&key) else {
            return Err(err(
                Condition::Malformed,
                format!("blob {} was never sent (or expired)", r.blob),
            ));
        };
        if p.total != r.size || p.received() != p.total {
            return Err(err(
                Condition::Malformed,
                format!(
                    "blob {} is incomplete: {} of {} bytes",
                    r.blob,
                    p.received(),
                    r.size
                ),
            ));
        }
        let p = self.blobs.remove(&key).map(|p| p.bytes).unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(&p).into();
        if digest != r.sha256 {
            return Err(err(
                Condition::Malformed,
                format!("blob {} does not match its sha256", r.blob),
            ));
        }
        Ok(p)
    }

    fn expire(&mut self, now: Instant) {
        let ttl = self.idle_ttl;
        self.blobs
            .retain(|_, p| now.duration_since(p.touched) <= ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> JobId {
        s.parse().unwrap()
    }

    #[test]
    fn cache_is_bounded_by_count_and_age() {
        let t0 = Instant::now();
        let mut c = OutcomeCache::new(2, Duration::from_secs(10));
        let e = || Outcome::Error(SpineError::new(Condition::Failed));
        c.insert(id("a"), e(), t0);
        c.insert(id("b"), e(), t0);
        c.insert(id("c"), e(), t0);
        assert_eq!(c.len(), 2);
        assert!(c.get(&id("a"), t0).is_none());
        assert!(c.get(&id("c"), t0).is_some());
        assert!(c.get(&id("c"), t0 + Duration::from_secs(11)).is_none());
    }

    #[test]
    fn blobs_assemble_check_and_refuse() {
        let from: BareJid = "d@x".parse().unwrap();
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        let blob: BlobId = "b1".parse().unwrap();
        let now = Instant::now();
        let mut s = BlobStore::new(1 << 20, Duration::from_secs(60));
        let parts = spine_protocol::chunks(&blob, &data);
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let r = BlobRef {
            blob: blob.clone(),
            size: data.len() as u64,
            sha256: sha,
            mime: None,
        };
        s.put(&from, parts[0].clone(), now).unwrap();
        s.put(&from, parts[0].clone(), now).unwrap(); // resent: idempotent
        assert!(s.take(&from, &r).is_err(), "incomplete");
        for p in &parts[1..] {
            s.put(&from, p.clone(), now).unwrap();
        }
        let other: BareJid = "e@x".parse().unwrap();
        assert!(s.take(&other, &r).is_err(), "blobs are per sender");
        assert_eq!(s.take(&from, &r).unwrap(), data);
        let big = Chunk {
            blob: "b2".parse().unwrap(),
            offset: 0,
            total: 2 << 20,
            bytes: vec![1],
        };
        assert_eq!(
            s.put(&from, big, now).unwrap_err().condition,
            Condition::TooLarge
        );
    }
}
