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
//! Where the file system takes it (ext4, XFS; not tmpfs), frames go down through a second
//! descriptor opened `O_DIRECT | O_DSYNC`: one system call that returns once the frame is on
//! the disk, instead of a `pwrite` into the page cache and an `fdatasync` that finds it there
//! (a probe on this project's test machine: 0.080 against 0.097 ms p50, and less CPU).
//! Direct I/O writes whole aligned blocks, so the journal keeps the last, partly filled block
//! in memory and writes it again with each frame: the bytes already acknowledged are written
//! again unchanged, so a write torn at any sector leaves them as they were.
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
/// Direct I/O's alignment of offsets, lengths and memory: a page, which covers disks of 512-
/// and 4096-byte sectors alike.
const ALIGN: usize = 4096;

/// The journal file, open for appending frames.
pub(super) struct Journal {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Where the next frame goes.
    end: u64,
    /// The file again, opened `O_DIRECT | O_DSYNC` for frames (see the module's comment), or
    /// `None` where the file system refuses it.
    direct: Option<File>,
    /// The bytes of the block `end` is in, before `end` (written again with the next frame).
    tail: Vec<u8>,
    /// Where direct writes are built, kept between frames (see [`Scratch`]).
    scratch: Scratch,
}

/// A buffer kept for building direct writes in: the kept tail, the frame's head, its payload
/// and zeros to the end of the last block, in memory aligned for direct I/O. A buffer made
/// for each frame cost every commit an allocation, the zeroing of all of it and the page
/// faults of fresh pages: about 3 % of the dispatcher's CPU with 64 jobs in flight
/// (BENCHMARKS.md, 2026-11-29, twenty-second session). One that grew past [`SCRATCH_KEEP`]
/// for a large frame is let go after it.
#[derive(Default)]
struct Scratch(Vec<u8>);

/// The most a [`Scratch`] keeps between frames.
const SCRATCH_KEEP: usize = 4 << 20;

impl Scratch {
    /// `len` bytes of it, aligned for direct I/O (their contents are whatever was there).
    fn aligned(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len + ALIGN {
            // Used from its first aligned byte: one alignment longer than that.
            self.0 = vec![0u8; (len + ALIGN).next_power_of_two()];
        }
        let at = self.0.as_ptr().align_offset(ALIGN);
        &mut self.0[at..at + len]
    }

    /// After a frame: a buffer grown past [`SCRATCH_KEEP`] is let go.
    fn trim(&mut self) {
        if self.0.len() > SCRATCH_KEEP {
            self.0 = Vec::new();
        }
    }
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
        let direct = open_direct(path);
        let mut j = Journal {
            file,
            path: path.to_owned(),
            generation: 0,
            end: FRAMES,
            direct,
            tail: Vec::new(),
            scratch: Scratch::default(),
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
        j.read_tail()?;
        Ok((j, frames))
    }

    /// [`Journal::open`] without direct I/O (the measurement compares the two).
    #[cfg(test)]
    pub(super) fn open_buffered(path: &Path) -> io::Result<(Journal, Vec<Vec<u8>>)> {
        let (mut j, frames) = Journal::open(path)?;
        j.direct = None;
        Ok((j, frames))
    }

    /// Whether frames go down with direct I/O.
    #[cfg(test)]
    pub(super) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Reads the part of `end`'s block before `end` (the next direct write starts there).
    fn read_tail(&mut self) -> io::Result<()> {
        let start = self.end - self.end % ALIGN as u64;
        self.tail = vec![0u8; (self.end - start) as usize];
        self.file.read_exact_at(&mut self.tail, start)
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
        let mut head = [0u8; FRAME_HEAD];
        head[..4].copy_from_slice(FRAME_MAGIC);
        head[4..12].copy_from_slice(&self.generation.to_le_bytes());
        head[12..16].copy_from_slice(&n.to_le_bytes());
        let sum = crc(&[&head[4..16], payload]);
        head[16..20].copy_from_slice(&sum.to_le_bytes());
        if self.direct.is_some() {
            match self.append_direct(&head, payload) {
                Ok(()) => return Ok(()),
                // A file system that opened the file for direct I/O but refuses its writes:
                // the frame goes the buffered way, and every one after it.
                Err(e) if matches!(e.raw_os_error(), Some(EINVAL | EOPNOTSUPP)) => {
                    tracing::warn!(
                        "{}: direct I/O refused ({e}); frames go through the page cache and fdatasync",
                        self.path.display()
                    );
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        let mut frame = Vec::with_capacity(FRAME_HEAD + payload.len());
        frame.extend_from_slice(&head);
        frame.extend_from_slice(payload);
        self.file.write_all_at(&frame, self.end)?;
        self.file.sync_data()?;
        self.end += frame.len() as u64;
        Ok(())
    }

    /// Writes the frame of `head` and `payload` at `end` with direct I/O: the blocks from the
    /// one `end` is in, the kept bytes of that block first and zeros after the frame (never
    /// the bytes of an older frame, which would read as one). On disk when it returns
    /// (`O_DSYNC`).
    fn append_direct(&mut self, head: &[u8; FRAME_HEAD], payload: &[u8]) -> io::Result<()> {
        let start = self.end - self.end % ALIGN as u64;
        // `tail` follows `end` (opening reads it, starting over empties it; once buffered,
        // a journal never writes directly again).
        debug_assert_eq!(self.tail.len() as u64, self.end - start);
        let Journal {
            direct,
            tail,
            scratch,
            end,
            ..
        } = self;
        let Some(direct) = direct else {
            return Err(io::Error::from_raw_os_error(EINVAL));
        };
        let frame = FRAME_HEAD + payload.len();
        let used = tail.len() + frame;
        let buf = scratch.aligned(used.next_multiple_of(ALIGN));
        let (kept, rest) = buf.split_at_mut(tail.len());
        kept.copy_from_slice(tail);
        rest[..FRAME_HEAD].copy_from_slice(head);
        rest[FRAME_HEAD..frame].copy_from_slice(payload);
        rest[frame..].fill(0);
        direct.write_all_at(buf, start)?;
        *end += frame as u64;
        let keep = (*end % ALIGN as u64) as usize;
        tail.clear();
        tail.extend_from_slice(&buf[used - keep..used]);
        scratch.trim();
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
        self.tail.clear();
        Ok(())
    }

    /// The journal's file, for errors.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

/// What Linux answers a direct write a file system cannot do.
const EINVAL: i32 = nix::libc::EINVAL;
const EOPNOTSUPP: i32 = nix::libc::EOPNOTSUPP;

/// The journal opened `O_DIRECT | O_DSYNC` for its frames, or `None` where the file system
/// refuses it (tmpfs) or the system has no such flags.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT | nix::libc::O_DSYNC)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
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
    fn frames_of_every_size_across_blocks_come_back_written_directly_or_buffered() {
        // Frames of sizes that end anywhere in a block, across many blocks; then the journal
        // opened again, buffered, appends more after them, and again with direct I/O where the
        // file system takes it (the kept part of the last block read back from the file).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let sizes = [0usize, 1, 4075, 4076, 4077, 9000, 3, 12_288, 17, 4096, 100];
        let frame = |i: usize, n: usize| vec![(i % 251) as u8; n];
        let (mut j, _) = Journal::open(&path).unwrap();
        let direct = j.is_direct();
        let file = File::open(&path).unwrap();
        for (i, n) in sizes.iter().enumerate() {
            j.append(&frame(i, *n)).unwrap();
            // After the frame, to the end of its block: zeros, never bytes of a frame
            // written before (direct writes are built in a buffer kept between them).
            let mut rest = vec![1u8; (j.end.next_multiple_of(ALIGN as u64) - j.end) as usize];
            file.read_exact_at(&mut rest, j.end).unwrap();
            assert!(
                rest.iter().all(|b| *b == 0),
                "after frame {i} (direct I/O: {direct})"
            );
        }
        drop(j);
        let (mut j, found) = Journal::open_buffered(&path).unwrap();
        let want: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| frame(i, *n))
            .collect();
        assert_eq!(found, want, "direct I/O: {direct}");
        j.append(b"buffered").unwrap();
        drop(j);
        let (mut j, found) = Journal::open(&path).unwrap();
        assert_eq!(found.len(), sizes.len() + 1);
        assert_eq!(found.last().unwrap(), b"buffered");
        j.append(b"after").unwrap();
        j.append(&[9u8; 5000]).unwrap();
        let end = j.end;
        drop(j);
        let (j, found) = Journal::open(&path).unwrap();
        assert_eq!(found.len(), sizes.len() + 3, "direct I/O: {direct}");
        assert_eq!(found[sizes.len() + 1], b"after");
        assert_eq!(found[sizes.len() + 2], vec![9u8; 5000]);
        assert_eq!(j.end, end);
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
