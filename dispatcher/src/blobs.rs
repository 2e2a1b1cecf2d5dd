//! PLACEHOLDER replaced by the blob store module at merge.

use serde::{Deserialize, Serialize};

/// A blob in the store: its SHA-256 and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stored {
    /// SHA-256.
    #[serde(with = "hex_sha")]
    pub sha256: [u8; 32],
    /// Bytes.
    pub size: u64,
}

impl Stored {
    /// Lowercase hex of the hash.
    pub fn hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

mod hex_sha {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(serde::de::Error::custom("sha256 must be 64 hex digits"));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

/// PLACEHOLDER: a minimal store until the real one is merged.
pub struct BlobStore {
    dir: std::path::PathBuf,
}

impl BlobStore {
    /// Opens.
    pub fn open(dir: std::path::PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(BlobStore { dir })
    }
    fn path(&self, s: &Stored) -> std::path::PathBuf {
        self.dir.join(s.hex())
    }
}

impl crate::jobs::BlobAccess for BlobStore {
    fn read(&self, blob: &Stored) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(blob))
    }
    fn read_at(&self, blob: &Stored, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::File::open(self.path(blob))?;
        let mut buf = vec![0; len];
        let n = f.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }
    fn put(&self, bytes: &[u8]) -> Result<Stored, crate::jobs::BlobRefused> {
        use sha2::Digest as _;
        let s = Stored {
            sha256: sha2::Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
        };
        std::fs::write(self.path(&s), bytes)
            .map_err(|e| crate::jobs::BlobRefused::Io(e.to_string()))?;
        Ok(s)
    }
    fn contains(&self, blob: &Stored) -> bool {
        self.path(blob).exists()
    }
}
