//! Job inputs and outputs as files, for handlers that read or write more than memory should
//! hold (a split step cutting a 10 GiB input): the disk side of the data path.
//!
//! A capability registered with [`crate::AgentBuilder::file_input`] gets a [`WorkDir`] per
//! attempt: [`crate::dataplane`] streams a referenced input into it while hashing, or
//! [`crate::supervisor`] writes an input that came inline or in chunks there, before the
//! handler starts. A handler's [`crate::FragmentFile`]s are hashed here ([`hash_files`]) by
//! the supervisor once it returns, and the core ([`crate::machine`]) then has each uploaded to
//! a slot over HTTP, streamed from the file, or read back into a list with the bytes inline
//! ([`inline_list`]) when HTTP is not possible. Work directories and output files delete
//! themselves when dropped; the core hands them to the driver as cleanups, which drops them on
//! the blocking pool once the job's outcome is sent.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use spine_protocol::fragments::{self, Fragment};

use crate::handler::FragmentFile;

/// Bytes read at a time when hashing or reading back a file.
const READ_BUF: usize = 1 << 20;

/// The directory of one attempt of a file-input capability, under the agent's scratch
/// directory in the system's temporary directory (`TMPDIR`, [`crate::scratch`]): its input
/// file and whatever the handler writes there. Deleted, with everything in it, when dropped
/// (or by the next agent, if this one is killed first).
#[derive(Debug)]
pub(crate) struct WorkDir(crate::scratch::JobDir);

impl WorkDir {
    /// A new, empty directory.
    pub(crate) fn create() -> Result<Self, String> {
        crate::scratch::JobDir::create("spine-job-").map(WorkDir)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }

    /// Where the job's input goes.
    pub(crate) fn input(&self) -> PathBuf {
        self.0.path().join("input")
    }
}

/// A handler's output file with its size and SHA-256, as the slot request names it. The file
/// is deleted when this is dropped.
#[derive(Debug)]
pub(crate) struct OutFile {
    pub(crate) path: PathBuf,
    pub(crate) name: Option<String>,
    pub(crate) mime: Option<String>,
    pub(crate) size: u64,
    pub(crate) sha256: [u8; 32],
}

impl Drop for OutFile {
    fn drop(&mut self) {
        // Already gone (the handler's work directory went first) is fine.
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), "cannot delete an output file: {e}");
            }
        }
    }
}

/// What the core hands back to the driver to delete, off the connection task.
#[derive(Debug)]
pub(crate) enum Cleanup {
    Dir(WorkDir),
    Files(Vec<OutFile>),
}

impl Cleanup {
    /// Deletes (blocking: a large file takes a while to unlink).
    pub(crate) fn delete(self) {
        match self {
            Cleanup::Dir(w) => drop(w),
            Cleanup::Files(f) => drop(f),
        }
    }
}

/// Size and SHA-256 of each file, read once from disk (blocking: run on the blocking pool).
/// Every file given is deleted if any cannot be read.
pub(crate) fn hash_files(files: Vec<FragmentFile>) -> Result<Vec<OutFile>, String> {
    let mut out = Vec::with_capacity(files.len());
    let mut buf = vec![0u8; READ_BUF];
    let mut rest = files.into_iter();
    for f in rest.by_ref() {
        match hash_file(&f.path, &mut buf) {
            Ok((size, sha256)) => out.push(OutFile {
                path: f.path,
                name: f.name,
                mime: f.mime,
                size,
                sha256,
            }),
            Err(e) => {
                let why = format!("fragment file {}: {e}", f.path.display());
                discard(rest);
                return Err(why);
            }
        }
    }
    Ok(out)
}

/// Deletes the files of a job that failed (best effort: the outcome is decided).
pub(crate) fn discard(files: impl IntoIterator<Item = FragmentFile>) {
    for f in files {
        if std::fs::remove_file(&f.path).is_err() {
            tracing::debug!(path = %f.path.display(), "output file not deleted");
        }
    }
}

fn hash_file(path: &Path, buf: &mut [u8]) -> std::io::Result<(u64, [u8; 32])> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize().into()))
}

/// The fragment list of `files` with every fragment's bytes inline: the fallback when they
/// cannot be uploaded over HTTP (blocking). The caller checked their total against the
/// agent's `max_input_size`; a file that grew since it was hashed is refused.
pub(crate) fn inline_list(files: &[OutFile]) -> Result<Vec<u8>, String> {
    let mut list = Vec::with_capacity(files.len());
    for f in files {
        let data = std::fs::read(&f.path)
            .map_err(|e| format!("reading fragment file {}: {e}", f.path.display()))?;
        if data.len() as u64 != f.size {
            return Err(format!(
                "fragment file {} changed after the handler returned ({} bytes, then {})",
                f.path.display(),
                f.size,
                data.len()
            ));
        }
        let mut fr = Fragment::new(data);
        fr.name = f.name.clone();
        fr.mime = f.mime.clone();
        list.push(fr);
    }
    Ok(fragments::encode(&list))
}

/// The fragment list naming `files` by SHA-256 and size (each uploaded to a slot).
pub(crate) fn reference_list(files: &[OutFile]) -> Vec<u8> {
    let list: Vec<Fragment> = files
        .iter()
        .map(|f| {
            let mut fr = Fragment::reference(f.sha256, f.size);
            fr.name = f.name.clone();
            fr.mime = f.mime.clone();
            fr
        })
        .collect();
    fragments::encode(&list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_hashed_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"alpha\n").unwrap();
        std::fs::write(&b, vec![b'x'; 3 * READ_BUF + 5]).unwrap();
        let files = hash_files(vec![
            FragmentFile::new(&a)
                .with_name("part-0")
                .with_mime("text/plain"),
            FragmentFile::new(&b),
        ])
        .unwrap();
        assert_eq!(files[0].size, 6);
        assert_eq!(
            files[0].sha256,
            <[u8; 32]>::from(Sha256::digest(b"alpha\n"))
        );
        assert_eq!(files[1].size, 3 * READ_BUF as u64 + 5);
        let refs = fragments::decode(&reference_list(&files)).unwrap();
        assert_eq!(refs[0].source.as_ref().map(|r| r.size), Some(6));
        assert_eq!(refs[0].name.as_deref(), Some("part-0"));
        assert_eq!(refs[0].mime.as_deref(), Some("text/plain"));
        let inline = fragments::decode(&inline_list(&files).unwrap()).unwrap();
        assert_eq!(inline[0].data, b"alpha\n");
        assert!(inline[1].source.is_none());
        drop(files);
        assert!(!a.exists() && !b.exists(), "deleted with their OutFile");
    }

    #[test]
    fn a_missing_file_fails_and_the_others_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let c = dir.path().join("c");
        std::fs::write(&a, b"1").unwrap();
        std::fs::write(&c, b"3").unwrap();
        let e = hash_files(vec![
            FragmentFile::new(&a),
            FragmentFile::new(dir.path().join("missing")),
            FragmentFile::new(&c),
        ])
        .unwrap_err();
        assert!(e.contains("missing"), "{e}");
        assert!(!a.exists() && !c.exists());
    }
}
