//! The dispatcher's URL signing key on disk; the URLs themselves are in
//! [`spine_protocol::signing`], shared with agents that serve the outputs they keep
//! (`data_listen`, PROTOCOL.md §13.5).

use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use rand::TryRngCore as _;
pub use spine_protocol::signing::*;

use crate::store::private_file;

fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |x| io::Error::new(x.kind(), format!("{}: {x}", path.display()))
}

/// Reads the key at `path`, or creates it with 32 random bytes from the operating system
/// (mode 0600, written to `<path>.tmp`, fsynced, renamed into place, directory fsynced),
/// so that URLs handed out before a restart stay valid after it. A looser mode found is
/// tightened to 0600. Errors name the file; a file that is not exactly 32 bytes is
/// refused rather than replaced, since replacing it invalidates every outstanding URL.
pub fn load_or_create(path: &Path) -> io::Result<UrlKey> {
    match std::fs::read(path) {
        Ok(bytes) => {
            private_file(path, false).map_err(at(path))?;
            let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: the URL signing key must be exactly 32 bytes, found {}; \
                         delete the file to make a new key (URLs already handed out \
                         then stop working)",
                        path.display(),
                        bytes.len()
                    ),
                )
            })?;
            Ok(UrlKey::from_bytes(key))
        }
        Err(x) if x.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rngs::OsRng
                .try_fill_bytes(&mut key)
                .map_err(|x| io::Error::other(format!("no randomness for the URL key: {x}")))?;
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".tmp");
            let tmp = Path::new(&tmp);
            // A leftover from a crash may have any mode: start afresh so 0600 applies.
            match std::fs::remove_file(tmp) {
                Err(x) if x.kind() != io::ErrorKind::NotFound => return Err(at(tmp)(x)),
                _ => {}
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(tmp)
                .map_err(at(tmp))?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(at(tmp))?;
            std::fs::rename(tmp, path).map_err(at(path))?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(at(dir))?;
            tracing::info!(path = %path.display(), "created the URL signing key");
            Ok(UrlKey::from_bytes(key))
        }
        Err(x) => Err(at(path)(x)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jid::BareJid;
    use std::os::unix::fs::PermissionsExt as _;

    const NOW: u64 = 1_764_000_000;

    #[test]
    fn the_key_file_persists_and_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("url.key");
        let k1 = load_or_create(&path).expect("create");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), 32);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("url.key.tmp").exists());
        let k2 = load_or_create(&path).expect("load");
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        assert_ne!(k1.to_bytes(), [0; 32]);
        // A URL signed before a restart verifies after it.
        let grant = BlobGrant {
            sha256: [0xcd; 32],
            job: "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44".parse().expect("job"),
            agent: BareJid::new("agent1@example.com").expect("jid"),
        };
        let url = grant.url("http://h", NOW + 60, &k1);
        let rest = url.strip_prefix("http://h/v1/blobs/").expect("prefix");
        let (seg, q) = rest.split_once('?').expect("query");
        assert!(BlobGrant::parse(seg, q)
            .expect("parse")
            .verify(&k2, NOW)
            .is_ok());
        // A looser mode is tightened; a wrong length is refused, not replaced.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        load_or_create(&path).expect("load");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"short").expect("write");
        let e = load_or_create(&path).expect_err("short");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("exactly 32 bytes, found 5"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), b"short");
        assert_eq!(format!("{k1:?}"), "UrlKey(…)");
    }
}
