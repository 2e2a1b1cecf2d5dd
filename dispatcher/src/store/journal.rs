//! The embedded store's journal (`jobs.journal` beside `jobs.redb`): what makes a commit
//! durable with one small sequential write instead of redb's B-tree pages.
//!
//! A durable redb commit writes every page its transaction dirtied (a leaf and its parents
//! in each table touched, the allocator's state, the header) at scattered places in the file
//! and waits for all of them: about 9 pages and 0.17–0.29 ms of `fdatasync` per job's
//! commit on this project's test machine, most of a sequential job's time on disk. So a
//! commit first appends the batch as one frame here and waits for that (`fdatasync` of one or
//! two pages already allocated: about 0.1 ms), then applies it to redb without durability
//! (`Durability::None`: in the page cache, visible to readers). Now and then
//! ([`super::Store`]'s checkpoint) one durable redb commit makes everything before it
//! durable in the database and the journal starts over.
//!
//! After a crash, redb rolls back to its last durable commit and the journal holds every
//! batch since, in order: they are applied again ([`Journal::open`] returns them). Each
//! batch sets keys to values or removes them, so applying a batch the database already holds
//! (a crash after a checkpoint, before the journal started over) changes nothing once the
//! batches after it are applied too.
//!
//! Format (all integers little-endian). Bytes 0..4096, the header: `SPINEJL1`, then the
//! generation (u64), then the CRC-32 of those 16 bytes. From byte 4096, frames, one per
//! batch: `SJF1`, the generation (u64), the payload's length (u32), the CRC-32 of generation,
//! length and payload (u32), then the payload (the batch, [`postcard`]). Starting over writes
//! a header with the next generation and writes frames from byte 4096 again over the old
//! ones: a frame of an older generation, a bad CRC or the end of the file ends the journal
//! (a torn last frame was never acknowledged). A header of zeros is a journal created but
//! never written; any other bad header is an error, since frames it would have named may
//! hold acknowledged changes.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

const HEADER_MAGIC: &[u8; 8] = b"SPINEJL1";
const FRAME_MAGIC: &[u8; 4] = b"SJF1";
/// Where the frames start (the header has a page of its own).
const FRAMES: u64 = 4096;
const FRAME_HEAD: usize = 4 + 8 + 4 + 4;
/// A new journal is this long, in zeros, so that the frames of its first generation
/// overwrite blocks already allocated: an append that grows the file also changes its
/// metadata, which `fdatasync` must then write too (about 0.135 against 0.095 ms here).
const PREALLOCATE: u64 = 4 << 20;
/// No batch is this large; a length beyond it is damage, not a frame.
const MAX_FRAME: u32 = 1 << 30;

/// The journal file, open for appending frames.
pub(super) struct Journal {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Where the next frame goes.
    end: u64,
}

impl Journal {
    /// Opens (or creates, mode 0600) the journal at `path`, and returns it with the payloads
    /// of the frames it holds, oldest first, for the caller to apply before anything else.
    pub(super) fn open(path: &Path) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let mut head = [0u8; 20];
        let len = file.metadata()?.len();
        let have = if len >= head.len() as u64 {
            file.read_exact_at(&mut head, 0)?;
            true
        } else {
            false
        };
        let mut j = Journal {
            file,
            path: path.to_owned(),
            generation: 0,
            end: FRAMES,
        };
        if !have || head.iter().all(|b| *b == 0) {
            // New (or created and never written): zeros first, then the header.
            if len < PREALLOCATE {
                j.file
                    .write_all_at(&vec![0u8; (PREALLOCATE - len) as usize], len)?;
            }
            j.start_generation(1)?;
            return Ok((j, Vec::new()));
        }
        if &head[..8] != HEADER_MAGIC || crc(&[&head[..16]]) != u32_at(&head, 16) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the journal's header is damaged, so the changes it holds cannot be read; \
                     if jobs.redb is intact, moving the journal aside starts from the store's last checkpoint \
                     (changes acknowledged since then are lost)",
                    path.display()
                ),
            ));
        }
        j.generation = u64_at(&head, 8);
        let frames = j.read_frames(len)?;
        Ok((j, frames))
    }

    /// The frames of the current generation, from the start until the first that is not.
    fn read_frames(&mut self, len: u64) -> io::Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut r = io::BufReader::with_capacity(1 << 20, &self.file);
        io::Seek::seek(&mut r, io::SeekFrom::Start(FRAMES))?;
        let mut at = FRAMES;
        let mut head = [0u8; FRAME_HEAD];
        while at + FRAME_HEAD as u64 <= len {
            r.read_exact(&mut head)?;
            let n = u32_at(&head, 12);
            if &head[..4] != FRAME_MAGIC
                || u64_at(&head, 4) != self.generation
                || n > MAX_FRAME
                || at + (FRAME_HEAD as u64) + u64::from(n) > len
            {
                break;
            }
            let mut payload = vec![0u8; n as usize];
            r.read_exact(&mut payload)?;
            if crc(&[&head[4..16], &payload]) != u32_at(&head, 16) {
                break;
            }
            at += FRAME_HEAD as u64 + u64::from(n);
            out.push(payload);
        }
        self.end = at;
        Ok(out)
    }

    /// Appends one frame and waits until it is on disk.
    pub(super) fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let n = u32::try_from(payload.len())
            .ok()
            .filter(|n| *n <= MAX_FRAME)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a batch of {} bytes is too large to journal", payload.len()),
                )
            })?;
        let mut frame = Vec::with_capacity(FRAME_HEAD + payload.len());
        frame.extend_from_slice(FRAME_MAGIC);
        frame.extend_from_slice(&self.generation.to_le_bytes());
        frame.extend_from_slice(&n.to_le_bytes());
        let sum = crc(&[&frame[4..16], payload]);
        frame.extend_from_slice(&sum.to_le_bytes());
        frame.extend_from_slice(payload);
        self.file.write_all_at(&frame, self.end)?;
        self.file.sync_data()?;
        self.end += frame.len() as u64;
        Ok(())
    }

    /// Bytes of frames since the journal last started over.
    pub(super) fn len(&self) -> u64 {
        self.end - FRAMES
    }

    /// Starts over as `generation` (the caller made everything the frames hold durable in
    /// the database, and gives a generation above any in use): its header on disk before any
    /// frame of it.
    pub(super) fn restart(&mut self, generation: u64) -> io::Result<()> {
        self.start_generation(generation)
    }

    /// Its generation: the store applies the frames of two journals in its order.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    fn start_generation(&mut self, generation: u64) -> io::Result<()> {
        let mut head = [0u8; 20];
        head[..8].copy_from_slice(HEADER_MAGIC);
        head[8..16].copy_from_slice(&generation.to_le_bytes());
        let sum = crc(&[&head[..16]]);
        head[16..20].copy_from_slice(&sum.to_le_bytes());
        self.file.write_all_at(&head, 0)?;
        self.file.sync_data()?;
        self.generation = generation;
        self.end = FRAMES;
        Ok(())
    }

    /// The journal's file, for errors.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_in_order_until_a_torn_or_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let (mut j, found) = Journal::open(&path).unwrap();
        assert!(found.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PREALLOCATE);
        j.append(b"one").unwrap();
        j.append(&[7u8; 10_000]).unwrap();
        j.append(b"").unwrap();
        let end = j.end;
        drop(j);
        let (mut j, found) = Journal::open(&path).unwrap();
        assert_eq!(found, vec![b"one".to_vec(), vec![7u8; 10_000], Vec::new()]);
        assert_eq!(j.end, end);

        // A torn frame at the end: its bytes written in part (a bad CRC) ends the journal.
        j.append(b"torn frame").unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"X", end + FRAME_HEAD as u64 + 3).unwrap();
        drop(j);
        let (mut j, found) = Journal::open(&path).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(j.end, end, "the next frame goes over the torn one");

        // Starting over: the old frames are of an older generation and end it at once.
        j.restart(j.generation() + 2).unwrap();
        j.append(b"new").unwrap();
        drop(j);
        let (j, found) = Journal::open(&path).unwrap();
        assert_eq!(found, vec![b"new".to_vec()]);
        assert_eq!(j.len(), FRAME_HEAD as u64 + 3);
    }

    #[test]
    fn a_damaged_header_is_an_error_that_names_the_file_and_zeros_are_a_new_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.journal");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let (mut j, found) = Journal::open(&path).unwrap();
        assert!(found.is_empty());
        j.append(b"kept").unwrap();
        drop(j);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"Q", 9).unwrap();
        let err = Journal::open(&path).err().expect("a damaged header");
        let msg = err.to_string();
        assert!(
            msg.contains("jobs.journal") && msg.contains("damaged"),
            "{msg}"
        );
    }
}
