//! Assembling blobs from `<chunk/>`s (docs/PROTOCOL.md §13): per sender, idempotent (a resent
//! chunk rewrites the same bytes), bounded in size, expired when idle, checked against the
//! size and SHA-256 of the reference that uses them. A pure data structure: time is a
//! parameter; both agents and dispatchers use it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{BlobId, BlobRef, Chunk, Condition, SpineError};

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

/// Blobs received in chunks, per sender (a bare JID as text), until a reference uses them.
pub struct BlobStore {
    max_size: u64,
    idle_ttl: Duration,
    blobs: HashMap<(String, BlobId), Partial>,
}

fn err(condition: Condition, text: String) -> SpineError {
    SpineError::new(condition).with_text(text)
}

impl BlobStore {
    /// A store refusing blobs over `max_size` bytes and dropping those idle for `idle_ttl`.
    pub fn new(max_size: u64, idle_ttl: Duration) -> Self {
        BlobStore {
            max_size,
            idle_ttl,
            blobs: HashMap::new(),
        }
    }

    /// Stores one chunk (idempotent: a resent chunk rewrites the same bytes).
    pub fn put(&mut self, from: &str, c: Chunk, now: Instant) -> Result<(), SpineError> {
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
        let key = (from.to_owned(), c.blob.clone());
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
    pub fn take(&mut self, from: &str, r: &BlobRef) -> Result<Vec<u8>, SpineError> {
        let key = (from.to_owned(), r.blob.clone());
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

    #[test]
    fn blobs_assemble_check_and_refuse() {
        let from = "d@x";
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        let blob: BlobId = "b1".parse().unwrap();
        let now = Instant::now();
        let mut s = BlobStore::new(1 << 20, Duration::from_secs(60));
        let parts = crate::chunks(&blob, &data);
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let r = BlobRef {
            blob: blob.clone(),
            size: data.len() as u64,
            sha256: sha,
            mime: None,
        };
        s.put(from, parts[0].clone(), now).unwrap();
        s.put(from, parts[0].clone(), now).unwrap(); // resent: idempotent
        assert!(s.take(from, &r).is_err(), "incomplete");
        for p in parts[1..].iter().rev() {
            s.put(from, p.clone(), now).unwrap();
        }
        assert!(s.take("e@x", &r).is_err(), "blobs are per sender");
        assert_eq!(s.take(from, &r).unwrap(), data);
        let big = Chunk {
            blob: "b2".parse().unwrap(),
            offset: 0,
            total: 2 << 20,
            bytes: vec![1],
        };
        assert_eq!(
            s.put(from, big, now).unwrap_err().condition,
            Condition::TooLarge
        );
        let mut wrong = r.clone();
        wrong.sha256[0] ^= 1;
        for p in &parts {
            s.put(from, p.clone(), now).unwrap();
        }
        assert!(s
            .take(from, &wrong)
            .unwrap_err()
            .to_string()
            .contains("sha256"));
        s.put(from, parts[0].clone(), now).unwrap();
        s.put(from, parts[1].clone(), now + Duration::from_secs(61))
            .unwrap();
        assert!(
            s.take(from, &r)
                .unwrap_err()
                .to_string()
                .contains("incomplete"),
            "idle parts expire"
        );
    }
}
