//! Assembling blobs from `<chunk/>`s (docs/PROTOCOL.md §13): per sender, idempotent (a resent
//! chunk rewrites the same bytes), expired when idle, checked against the size and SHA-256 of
//! the reference that uses them. A pure data structure: time is a parameter; both agents and
//! dispatchers use it.
//!
//! Everything a peer can make it hold is bounded ([`BlobLimits`]): the size of one blob, the
//! number of open blobs (receiving, or complete and not yet referenced) and the bytes they
//! announce, per sender and in total. Memory follows the bytes that arrived, never the size a
//! first chunk announces: a chunk is kept as it came (pieces keyed by offset), and the blob is
//! put together once, when a reference takes it. Idle blobs expire in deadline order from a
//! time index, so a chunk costs O(log n), not a scan of every blob.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{BlobId, BlobRef, Chunk, Condition, Data, SpineError, INLINE_LIMIT};

/// What a [`BlobStore`] may hold. A blob is *open* from its first chunk until a reference takes
/// it or it expires; it counts against these bounds with the size its chunks announce
/// (`total`), so a sender never has a blob refused halfway through (only at its first chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLimits {
    /// Largest blob, bytes: a larger `total` is refused with `too-large`.
    pub max_size: u64,
    /// Open blobs per sender.
    pub per_sender: usize,
    /// Bytes announced by one sender's open blobs together.
    pub per_sender_bytes: u64,
    /// Open blobs of every sender together.
    pub total: usize,
    /// Bytes announced by every open blob together.
    pub total_bytes: u64,
    /// An open blob is dropped this long after its last chunk.
    pub idle_ttl: Duration,
}

impl BlobLimits {
    /// Bounds for receivers whose largest blob is `max_size` bytes: 64 open blobs and 4 ×
    /// `max_size` per sender, 4096 open blobs and 16 × `max_size` in total.
    pub fn for_max_size(max_size: u64, idle_ttl: Duration) -> Self {
        BlobLimits {
            max_size,
            per_sender: 64,
            per_sender_bytes: max_size.saturating_mul(4),
            total: 4096,
            total_bytes: max_size.saturating_mul(16),
            idle_ttl,
        }
    }
}

/// An open blob.
struct Partial {
    total: u64,
    /// The chunks as they came, by offset (a resent chunk replaces its copy).
    pieces: BTreeMap<u64, Vec<u8>>,
    /// Byte ranges received, sorted and merged (chunks may come in any order, and twice).
    ranges: Vec<(u64, u64)>,
    /// Its key in [`BlobStore::deadlines`].
    touched: (Instant, u64),
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

    fn covers(&self, start: u64, end: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| s <= start && end <= e)
    }

    fn received(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Most pieces kept: what chunks of the full size need, and some slack for chunks cut
    /// otherwise or sent out of order. Bounds the bookkeeping a sender of tiny scattered
    /// chunks could make us keep per announced byte.
    fn max_pieces(&self) -> usize {
        usize::try_from(self.total.div_ceil(INLINE_LIMIT as u64))
            .unwrap_or(usize::MAX)
            .saturating_add(64)
    }

    /// The whole blob, once every byte arrived: the pieces in offset order, overlaps skipped.
    fn assemble(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.total).unwrap_or(0));
        for (offset, bytes) in self.pieces {
            let have = out.len() as u64;
            // Complete: no piece starts past the bytes before it.
            let skip = usize::try_from(have.saturating_sub(offset)).unwrap_or(usize::MAX);
            if let Some(rest) = bytes.get(skip..) {
                out.extend_from_slice(rest);
            }
        }
        out
    }
}

type Key = (String, BlobId);

/// Blobs received in chunks, per sender (a bare JID as text), until a reference uses them.
pub struct BlobStore {
    limits: BlobLimits,
    blobs: HashMap<Key, Partial>,
    /// Open blobs by last chunk (then arrival order): expiry pops from the front.
    deadlines: BTreeMap<(Instant, u64), Key>,
    /// Per sender: open blobs and the bytes they announce.
    senders: HashMap<String, (usize, u64)>,
    /// Bytes announced by every open blob.
    bytes: u64,
    seq: u64,
}

fn err(condition: Condition, text: String) -> SpineError {
    SpineError::new(condition).with_text(text)
}

impl BlobStore {
    /// A store refusing blobs over `max_size` bytes and dropping those idle for `idle_ttl`,
    /// with the other bounds of [`BlobLimits::for_max_size`].
    pub fn new(max_size: u64, idle_ttl: Duration) -> Self {
        Self::with_limits(BlobLimits::for_max_size(max_size, idle_ttl))
    }

    /// A store with these bounds.
    pub fn with_limits(limits: BlobLimits) -> Self {
        BlobStore {
            limits,
            blobs: HashMap::new(),
            deadlines: BTreeMap::new(),
            senders: HashMap::new(),
            bytes: 0,
            seq: 0,
        }
    }

    /// Its bounds.
    pub fn limits(&self) -> &BlobLimits {
        &self.limits
    }

    /// Open blobs, and the bytes their chunks announce, in total.
    pub fn open(&self) -> (usize, u64) {
        (self.blobs.len(), self.bytes)
    }

    /// Bytes of chunk data held.
    pub fn held_bytes(&self) -> u64 {
        self.blobs
            .values()
            .flat_map(|p| p.pieces.values())
            .map(|b| b.len() as u64)
            .sum()
    }

    /// Stores one chunk (idempotent: a resent chunk rewrites the same bytes). Refusals: a blob
    /// over the size limit is `too-large`; a chunk that disagrees with the blob's earlier ones
    /// is `malformed`; a new blob beyond the open-blob bounds, or a chunk that would scatter
    /// a blob into too many pieces, is `busy` (try later).
    pub fn put(&mut self, from: &str, c: Chunk, now: Instant) -> Result<(), SpineError> {
        self.expire(now);
        let l = self.limits;
        if c.total > l.max_size {
            let mut e = err(
                Condition::TooLarge,
                format!(
                    "blob of {} bytes is over the limit of {}",
                    c.total, l.max_size
                ),
            );
            e.max = Some(l.max_size);
            return Err(e);
        }
        let key = (from.to_owned(), c.blob.clone());
        if !self.blobs.contains_key(&key) {
            self.admit(from, &c)?;
            self.seq += 1;
            let touched = (now, self.seq);
            self.deadlines.insert(touched, key.clone());
            self.blobs.insert(
                key.clone(),
                Partial {
                    total: c.total,
                    pieces: BTreeMap::new(),
                    ranges: Vec::new(),
                    touched,
                },
            );
            let s = self.senders.entry(from.to_owned()).or_default();
            s.0 += 1;
            s.1 = s.1.saturating_add(c.total);
            self.bytes = self.bytes.saturating_add(c.total);
        }
        let Some(p) = self.blobs.get_mut(&key) else {
            return Ok(());
        };
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
        let (start, end) = (c.offset, c.offset + c.bytes.len() as u64);
        let known = p.covers(start, end);
        if !known && !p.pieces.contains_key(&start) && p.pieces.len() >= p.max_pieces() {
            return Err(err(
                Condition::Busy,
                format!(
                    "blob {} is scattered over {} pieces: send its chunks in order",
                    c.blob,
                    p.pieces.len()
                ),
            ));
        }
        if !known {
            p.pieces.insert(start, c.bytes);
            p.add_range(start, end);
        }
        // Touched: it moves to the back of the expiry order.
        self.seq += 1;
        let old = std::mem::replace(&mut p.touched, (now, self.seq));
        self.deadlines.remove(&old);
        self.deadlines.insert(p.touched, key);
        Ok(())
    }

    /// Whether a new blob from `from` of `c.total` bytes fits the bounds.
    fn admit(&self, from: &str, c: &Chunk) -> Result<(), SpineError> {
        let l = &self.limits;
        let (open, bytes) = self.senders.get(from).copied().unwrap_or_default();
        let busy = |why: String| {
            Err(err(
                Condition::Busy,
                format!(
                    "blob {} refused: {why}; send it when earlier blobs were used or expired",
                    c.blob
                ),
            ))
        };
        if open >= l.per_sender {
            return busy(format!(
                "this sender has {open} open blobs, the most one sender may have"
            ));
        }
        if bytes.saturating_add(c.total) > l.per_sender_bytes {
            return busy(format!(
                "this sender's open blobs would announce {} bytes, over its limit of {}",
                bytes.saturating_add(c.total),
                l.per_sender_bytes
            ));
        }
        if self.blobs.len() >= l.total {
            return busy(format!(
                "{} blobs are open, the most this receiver holds",
                self.blobs.len()
            ));
        }
        if self.bytes.saturating_add(c.total) > l.total_bytes {
            return busy(format!(
                "open blobs would announce {} bytes, over this receiver's limit of {}",
                self.bytes.saturating_add(c.total),
                l.total_bytes
            ));
        }
        Ok(())
    }

    /// Forgets an open blob.
    fn remove(&mut self, key: &Key) -> Option<Partial> {
        let p = self.blobs.remove(key)?;
        self.deadlines.remove(&p.touched);
        self.bytes = self.bytes.saturating_sub(p.total);
        if let Some(s) = self.senders.get_mut(&key.0) {
            s.0 = s.0.saturating_sub(1);
            s.1 = s.1.saturating_sub(p.total);
            if s.0 == 0 {
                self.senders.remove(&key.0);
            }
        }
        Some(p)
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
        let bytes = self.remove(&key).map(Partial::assemble).unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest != r.sha256 {
            return Err(err(
                Condition::Malformed,
                format!("blob {} does not match its sha256", r.blob),
            ));
        }
        Ok(bytes)
    }

    /// The bytes and MIME type that an `<input>` or `<output>` from `from` stands for: inline
    /// data as it came, a blob reference [taken](Self::take) from the blobs `from` sent before
    /// it (complete, of the referenced size and SHA-256, or `malformed`). What a receiver of a
    /// referencing stanza (a dispatcher reading a result, a submitter reading a status) does
    /// with every `Data` it gets. A reference to bytes over HTTP (protocol 1.1) is not in this
    /// store: it is `malformed` here, and a receiver that accepts references handles them
    /// before calling this.
    pub fn resolve(
        &mut self,
        from: &str,
        data: Data,
    ) -> Result<(Vec<u8>, Option<String>), SpineError> {
        match data {
            Data::Inline { mime, bytes } => Ok((bytes, mime)),
            Data::Blob(r) => self.take(from, &r).map(|bytes| (bytes, r.mime)),
            Data::Ref(_) => Err(err(
                Condition::Malformed,
                "a reference to bytes over HTTP is not a blob sent in chunks".to_owned(),
            )),
        }
    }

    /// Drops the blobs idle for longer than the limit, oldest first, stopping at the first one
    /// still in time.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.limits.idle_ttl;
        while let Some((&(touched, seq), _)) = self.deadlines.first_key_value() {
            if now.saturating_duration_since(touched) <= ttl {
                break;
            }
            let Some(key) = self.deadlines.remove(&(touched, seq)) else {
                break;
            };
            self.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(blob: &str, offset: u64, total: u64, len: usize) -> Chunk {
        Chunk {
            blob: blob.parse().unwrap(),
            offset,
            total,
            bytes: vec![7; len],
        }
    }

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
        assert_eq!(s.open(), (0, 0), "taken blobs are forgotten");
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

    #[test]
    fn overlapping_chunks_cut_otherwise_still_assemble() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let sha: [u8; 32] = Sha256::digest(&data).into();
        let r = BlobRef {
            blob: "b".parse().unwrap(),
            size: 1000,
            sha256: sha,
            mime: None,
        };
        let mut s = BlobStore::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        for (from, to) in [(500, 1000), (0, 300), (200, 600), (250, 260)] {
            let c = Chunk {
                blob: "b".parse().unwrap(),
                offset: from,
                total: 1000,
                bytes: data[from as usize..to].to_vec(),
            };
            s.put("a@x", c, now).unwrap();
        }
        assert_eq!(s.take("a@x", &r).unwrap(), data);
        // The empty blob.
        s.put("a@x", chunk("e", 0, 0, 0), now).unwrap();
        let empty = BlobRef {
            blob: "e".parse().unwrap(),
            size: 0,
            sha256: Sha256::digest([]).into(),
            mime: None,
        };
        assert_eq!(s.take("a@x", &empty).unwrap(), Vec::<u8>::new());
    }

    /// A flood of announcements of the largest size, one small chunk each (issue 14, finding
    /// 6): memory follows the bytes sent, and beyond the bounds the sender is told `busy`
    /// while another sender is still served.
    #[test]
    fn announced_sizes_are_bounded_not_reserved() {
        let mib = 1 << 20;
        let limits = BlobLimits {
            max_size: 64 * mib,
            per_sender: 8,
            per_sender_bytes: 256 * mib + 1024,
            total: 10,
            total_bytes: 1024 * mib,
            idle_ttl: Duration::from_secs(300),
        };
        let mut s = BlobStore::with_limits(limits);
        let now = Instant::now();
        let mut refused = 0;
        for i in 0..70_000u64 {
            match s.put("flood@x", chunk(&format!("f{i}"), 0, 64 * mib, 16), now) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e.condition, Condition::Busy, "{e}");
                    refused += 1;
                }
            }
        }
        // 4 × 64 MiB reach the sender's 256 MiB of announced bytes.
        assert_eq!(refused, 70_000 - 4);
        assert_eq!(s.open(), (4, 256 * mib));
        assert_eq!(s.held_bytes(), 64, "only the bytes that came are kept");
        // Small blobs of the same sender stop at its count.
        let mut small = 0;
        while s
            .put("flood@x", chunk(&format!("s{small}"), 0, 10, 10), now)
            .is_ok()
        {
            small += 1;
        }
        assert_eq!(small, 4, "8 open blobs per sender");
        // Another sender is served until the total count (10) is reached.
        s.put("other@x", chunk("o1", 0, 10, 10), now).unwrap();
        s.put("other@x", chunk("o2", 0, 10, 10), now).unwrap();
        let e = s.put("other@x", chunk("o3", 0, 10, 10), now).unwrap_err();
        assert_eq!(e.condition, Condition::Busy);
        assert!(e.to_string().contains("10 blobs are open"), "{e}");
        // An open blob still takes its next chunks.
        s.put("other@x", chunk("o1", 0, 10, 10), now).unwrap();
        // Idle blobs expire in time order, freeing room.
        let later = now + Duration::from_secs(301);
        s.put("other@x", chunk("o3", 0, 10, 10), later).unwrap();
        assert_eq!(s.open(), (1, 10));
    }

    #[test]
    fn scattered_tiny_chunks_are_bounded() {
        let mut s = BlobStore::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        // 1 MiB in 64 KiB chunks is 16 pieces; 64 more are allowed.
        let mut kept = 0;
        let mut last = Ok(());
        for i in 0..1000u64 {
            last = s.put("a@x", chunk("b", i * 2, 1 << 20, 1), now);
            if last.is_err() {
                break;
            }
            kept += 1;
        }
        assert_eq!(kept, 16 + 64);
        assert_eq!(last.unwrap_err().condition, Condition::Busy);
        // A resent chunk is still taken.
        s.put("a@x", chunk("b", 0, 1 << 20, 1), now).unwrap();
    }

    /// What a submitter does with a `<job-status>` output: inline as it came, a reference
    /// resolved from the sender's chunks, checked.
    #[test]
    fn resolve_takes_inline_data_or_the_referenced_blob() {
        let mut s = BlobStore::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        let inline = Data::Inline {
            mime: Some("text/plain".into()),
            bytes: b"hi".to_vec(),
        };
        assert_eq!(
            s.resolve("d@x", inline).unwrap(),
            (b"hi".to_vec(), Some("text/plain".into()))
        );
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 249) as u8).collect();
        let blob: BlobId = "out-1".parse().unwrap();
        for c in crate::chunks(&blob, &data) {
            s.put("d@x", c, now).unwrap();
        }
        let r = BlobRef {
            blob,
            size: data.len() as u64,
            sha256: Sha256::digest(&data).into(),
            mime: Some("text/csv".into()),
        };
        let e = s.resolve("e@x", Data::Blob(r.clone())).unwrap_err();
        assert_eq!(e.condition, Condition::Malformed, "another sender's blob");
        assert_eq!(
            s.resolve("d@x", Data::Blob(r.clone())).unwrap(),
            (data, Some("text/csv".into()))
        );
        assert!(s.resolve("d@x", Data::Blob(r)).is_err(), "taken once");
    }

    #[test]
    fn expiry_follows_the_last_chunk() {
        let mut s = BlobStore::new(1 << 20, Duration::from_secs(60));
        let t0 = Instant::now();
        s.put("a@x", chunk("old", 0, 100, 10), t0).unwrap();
        s.put("a@x", chunk("kept", 0, 100, 10), t0).unwrap();
        s.put(
            "a@x",
            chunk("kept", 10, 100, 10),
            t0 + Duration::from_secs(50),
        )
        .unwrap();
        s.expire(t0 + Duration::from_secs(61));
        assert_eq!(s.open(), (1, 100), "only the blob idle too long went");
        s.expire(t0 + Duration::from_secs(111));
        assert_eq!(s.open(), (0, 0));
    }
}
