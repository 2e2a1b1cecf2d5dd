//! A job's input or output as the dispatcher holds it: a few bytes kept in the job record
//! (up to the inline limit, what a job stanza carries anyway), or a reference to a file of the
//! content-addressed blob store ([`crate::blobs`]). Large payloads never pass through the
//! job record, the store's transactions or a JSON body: the record holds their hash and size.
//!
//! In the record's JSON an inline body is base64 text (as every earlier version wrote
//! outputs) and a stored one `{"sha256": "<hex>", "size": n}`, so records of earlier versions
//! load unchanged.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::blobs::Stored;

/// What the dispatcher's core and job table may do with the blob store: the store is given to
/// them behind this trait (as raft-rs's `RawNode` reads its log through `Storage`), so they do
/// no I/O of their own choosing and their tests give them memory instead of files.
pub trait BlobAccess: Send {
    /// The whole blob.
    fn read(&self, blob: &Stored) -> std::io::Result<Vec<u8>>;
    /// `len` bytes from `offset` (fewer at the end).
    fn read_at(&self, blob: &Stored, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
    /// Stores `bytes` (durably, before this returns) and names them. The error says why (the
    /// disk quota, an I/O error), for the submitter.
    fn put(&self, bytes: &[u8]) -> Result<Stored, BlobRefused>;
    /// Whether the blob is in the store, complete.
    fn contains(&self, blob: &Stored) -> bool;
    /// The blob named by `sha256`, with its size, if the store has it.
    fn find(&self, sha256: &[u8; 32]) -> Option<Stored>;
}

/// A shared store (the driver keeps one handle for its deletions and the HTTP side another).
impl<T: BlobAccess + Sync> BlobAccess for std::sync::Arc<T> {
    fn read(&self, blob: &Stored) -> std::io::Result<Vec<u8>> {
        (**self).read(blob)
    }

    fn read_at(&self, blob: &Stored, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        (**self).read_at(blob, offset, len)
    }

    fn put(&self, bytes: &[u8]) -> Result<Stored, BlobRefused> {
        (**self).put(bytes)
    }

    fn contains(&self, blob: &Stored) -> bool {
        (**self).contains(blob)
    }

    fn find(&self, sha256: &[u8; 32]) -> Option<Stored> {
        (**self).find(sha256)
    }
}

/// Why the blob store did not take bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobRefused {
    /// The disk quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// Writing failed.
    #[error("{0}")]
    Io(String),
}

/// Bytes of a job, inline or in the blob store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Held in the record (at most the inline limit, except transiently: see
    /// [`Body::is_oversized`]).
    Inline(Vec<u8>),
    /// A file of the blob store.
    Stored(Stored),
    /// An output an agent keeps and serves itself (`data_listen`, PROTOCOL.md §13.5): a map
    /// step's, read by the reduce steps from that agent. Not in the blob store.
    Kept(Kept),
}

/// Where an agent keeps an output: its hash and size, the agent, and the URL (without a
/// signature) it serves it at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// The bytes' hash and length.
    #[serde(flatten)]
    pub blob: Stored,
    /// The agent that keeps them.
    pub agent: jid::FullJid,
    /// `{serves}/v1/blobs/{sha256}`: the dispatcher signs it for each reader.
    pub url: String,
}

impl Kept {
    /// The agent's `serves` base of [`Kept::url`].
    pub fn base(&self) -> &str {
        self.url
            .strip_suffix(&format!("/v1/blobs/{}", self.blob.hex()))
            .unwrap_or(&self.url)
    }
}

impl Default for Body {
    fn default() -> Self {
        Body::Inline(Vec::new())
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Body::Inline(b)
    }
}

/// An inline body equals its bytes; a stored one equals no bytes (its bytes are elsewhere).
impl<const N: usize> PartialEq<[u8; N]> for Body {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.inline() == Some(&other[..])
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Body {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.inline() == Some(&other[..])
    }
}

impl Body {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Body::Inline(b) => b.len() as u64,
            Body::Stored(s) => s.size,
            Body::Kept(k) => k.blob.size,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, if held inline.
    pub fn inline(&self) -> Option<&[u8]> {
        match self {
            Body::Inline(b) => Some(b),
            Body::Stored(_) | Body::Kept(_) => None,
        }
    }

    /// The blob, if stored.
    pub fn stored(&self) -> Option<Stored> {
        match self {
            Body::Inline(_) | Body::Kept(_) => None,
            Body::Stored(s) => Some(*s),
        }
    }

    /// Whether it is inline.
    pub fn is_inline(&self) -> bool {
        matches!(self, Body::Inline(_))
    }

    /// The bytes, read from the store if they are there.
    pub fn bytes<'a>(&'a self, blobs: &dyn BlobAccess) -> std::io::Result<Cow<'a, [u8]>> {
        match self {
            Body::Inline(b) => Ok(Cow::Borrowed(b)),
            Body::Stored(s) => blobs.read(s).map(Cow::Owned),
            Body::Kept(k) => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "the bytes are kept by the agent {}, not in the blob store",
                    k.agent
                ),
            )),
        }
    }

    /// Inline bytes over the inline limit: the core moves them to the blob store before the
    /// record is kept.
    pub fn is_oversized(&self) -> bool {
        matches!(self, Body::Inline(b) if b.len() > spine_protocol::INLINE_LIMIT)
    }
}

/// Blobs in memory, for the simulator and tests: the core as it runs, without files.
#[derive(Debug, Default)]
pub struct MemoryBlobs(std::sync::Mutex<std::collections::HashMap<Stored, Vec<u8>>>);

impl MemoryBlobs {
    fn get(&self, blob: &Stored) -> std::io::Result<Vec<u8>> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .get(blob)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

impl BlobAccess for MemoryBlobs {
    fn read(&self, blob: &Stored) -> std::io::Result<Vec<u8>> {
        self.get(blob)
    }

    fn read_at(&self, blob: &Stored, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let b = self.get(blob)?;
        let start = (offset as usize).min(b.len());
        let end = start.saturating_add(len).min(b.len());
        Ok(b[start..end].to_vec())
    }

    fn put(&self, bytes: &[u8]) -> Result<Stored, BlobRefused> {
        use sha2::Digest as _;
        let s = Stored {
            sha256: sha2::Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
        };
        self.0
            .lock()
            .map_err(|_| BlobRefused::Io("poisoned".into()))?
            .insert(s, bytes.to_vec());
        Ok(s)
    }

    fn contains(&self, blob: &Stored) -> bool {
        self.0.lock().is_ok_and(|m| m.contains_key(blob))
    }

    fn find(&self, sha256: &[u8; 32]) -> Option<Stored> {
        let m = self.0.lock().ok()?;
        m.keys().find(|s| s.sha256 == *sha256).copied()
    }
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Body::Inline(b) => spine_protocol::serde_base64::serialize(b, s),
            Body::Stored(st) => st.serialize(s),
            Body::Kept(k) => k.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            // Before `Stored`, which would take a kept body's hash and size alone.
            Kept(Kept),
            Stored(Stored),
        }
        match Either::deserialize(d)? {
            Either::Text(t) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map(Body::Inline)
                    .map_err(|e| serde::de::Error::custom(format!("data is not base64: {e}")))
            }
            Either::Kept(k) => Ok(Body::Kept(k)),
            Either::Stored(s) => Ok(Body::Stored(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_bodies_are_base64_as_before_and_stored_ones_name_their_blob() {
        let inline = Body::Inline(vec![0, 1, 2, 255]);
        assert_eq!(serde_json::to_string(&inline).unwrap(), "\"AAEC/w==\"");
        let stored = Body::Stored(Stored {
            sha256: [0xab; 32],
            size: 70_000,
        });
        let text = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            text,
            format!("{{\"sha256\":\"{}\",\"size\":70000}}", "ab".repeat(32))
        );
        // Kept by an agent (data_listen): the blob, the agent and its URL.
        let kept = Body::Kept(Kept {
            blob: Stored {
                sha256: [0xcd; 32],
                size: 90_000,
            },
            agent: "agent1@example.com/w".parse().unwrap(),
            url: format!("http://w1:7443/v1/blobs/{}", "cd".repeat(32)),
        });
        let text = serde_json::to_string(&kept).unwrap();
        assert!(
            text.contains("\"agent\":\"agent1@example.com/w\""),
            "{text}"
        );
        if let Body::Kept(k) = &kept {
            assert_eq!(k.base(), "http://w1:7443");
        }
        for b in [inline, stored, kept] {
            let back: Body = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
            assert_eq!(back, b);
        }
        assert!(serde_json::from_str::<Body>("\"not base64!\"").is_err());
    }
}
