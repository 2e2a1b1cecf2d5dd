//! The file of job requests sent ahead of their commit ([`SentAhead`]).
//!
//! A job request leaves before the commit that stores its dispatch (docs/dispatcher.md §5).
//! If the process dies in between, the next one finds the job queued and would place it
//! afresh — perhaps on another agent, where it would run a second time. So the driver appends
//! one line per request to this file **before** the request leaves, and the next process sends
//! those jobs back to the same agent with the same attempt ([`crate::core::Core::recover`]),
//! where they attach to the run or are answered from the outcome cache (PROTOCOL.md §10).
//!
//! The lines are written, not synced: a write survives the death of the process (`kill -9`,
//! a panic, the OOM killer), which is what this is for, at the cost of one `write` per turn of
//! the driver. A power loss may lose them; the job then runs again elsewhere, which is the
//! at-least-once promise the dispatcher makes anyway.
//!
//! Two files take turns so that nothing is rewritten: the lines written before a commit
//! starts go to one, those written while it runs go to the other, and when the commit ends
//! the first names only dispatches that are now stored. Such a line is stale, and harmless: at
//! recovery a job whose stored record already counts that attempt is left as it is
//! ([`crate::jobs::JobTable::sent_ahead`]). So a file is emptied (`set_len(0)`) only once it
//! holds [`EMPTY_AT`] bytes, not after every commit: an `ftruncate` and the block the next
//! `write` allocates again cost about 10 µs on ext4, a tenth of a millisecond-long sequential
//! job's own work in the dispatcher (BENCHMARKS.md, "Cost per job over HTTP").

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::core::SentAhead;

/// The two files of [`SentAheadLog`] in the data directory.
const NAMES: [&str; 2] = ["sent-ahead.0.jsonl", "sent-ahead.1.jsonl"];

/// A file whose lines a finished commit covers is emptied once it holds this many bytes
/// (about 2,000 lines): what a restart reads back stays small, and most commits truncate
/// nothing.
const EMPTY_AT: u64 = 256 * 1024;

/// See the module documentation.
pub(crate) struct SentAheadLog {
    files: [File; 2],
    paths: [PathBuf; 2],
    /// The bytes in each file (as far as this process knows: what it found plus what it wrote).
    lens: [u64; 2],
    /// The file lines go to now.
    cur: usize,
    /// A write failed and was reported; reported again only after one succeeds.
    failing: bool,
}

impl SentAheadLog {
    /// Opens the log in `dir`, with what a previous process left in it (lines that cannot
    /// be read — the last one of a write cut short — are skipped with a warning).
    pub(crate) fn open(dir: &Path) -> io::Result<(SentAheadLog, Vec<SentAhead>)> {
        let paths = NAMES.map(|n| dir.join(n));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(p)
        };
        let mut files = [open(&paths[0])?, open(&paths[1])?];
        let mut lens = [0; 2];
        let mut left = Vec::new();
        for ((f, p), len) in files.iter_mut().zip(&paths).zip(&mut lens) {
            *len = f.metadata()?.len();
            f.rewind()?;
            for (n, line) in BufReader::new(&*f).lines().enumerate() {
                let line = line?;
                match serde_json::from_str::<SentAhead>(&line) {
                    Ok(s) => left.push(s),
                    Err(e) => {
                        warn!(file = %p.display(), line = n + 1, "skipping an unreadable line: {e}")
                    }
                }
            }
        }
        let log = SentAheadLog {
            files,
            paths,
            lens,
            cur: 0,
            failing: false,
        };
        Ok((log, left))
    }

    /// Appends the requests about to leave, in one write. A failure is reported (once until
    /// a write succeeds again) and the requests leave anyway: after a crash their jobs may
    /// then run twice, which is the at-least-once promise, never a loss.
    pub(crate) fn record(&mut self, sent: &[SentAhead]) {
        if sent.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(sent.len() * 160);
        for s in sent {
            // A struct of strings and a number: serialising cannot fail.
            if serde_json::to_writer(&mut buf, s).is_ok() {
                buf.push(b'\n');
            }
        }
        // Counted even if the write fails part-way: the length only decides when to empty.
        self.lens[self.cur] += buf.len() as u64;
        match self.files[self.cur].write_all(&buf) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                warn!(file = %self.paths[self.cur].display(),
                    "cannot record jobs sent ahead of their commit (after a crash they may run again elsewhere): {e}");
            }
            Err(_) => {}
        }
    }

    /// A commit starts: it stores every dispatch recorded so far; what follows goes to the
    /// other file.
    pub(crate) fn commit_started(&mut self) {
        self.cur ^= 1;
    }

    /// The commit started last is durable: the lines it covers are stale; their file is
    /// emptied if it has grown to [`EMPTY_AT`].
    pub(crate) fn committed(&mut self) {
        let done = self.cur ^ 1;
        if self.lens[done] >= EMPTY_AT {
            self.truncate(done);
        }
    }

    /// Drops every line (after the start-up commit stored what they said).
    pub(crate) fn clear(&mut self) {
        self.truncate(0);
        self.truncate(1);
    }

    fn truncate(&mut self, i: usize) {
        self.lens[i] = 0;
        if let Err(e) = self.files[i].set_len(0) {
            warn!(file = %self.paths[i].display(), "cannot empty the file of jobs sent ahead: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(n: u64) -> SentAhead {
        SentAhead {
            job: format!("job-{n}").parse().unwrap(),
            attempt: n,
            agent: "agent1@localhost/w".parse().unwrap(),
        }
    }

    #[test]
    fn lines_outlive_the_process_and_a_covered_file_is_emptied_once_large() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        assert!(left.is_empty());
        log.record(&[sent(1), sent(2)]);
        log.commit_started();
        // Sent while the commit runs: not covered by it.
        log.record(&[sent(3)]);
        drop(log);
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(1), sent(2), sent(3)], "all survive a crash");
        assert_eq!(log.lens, [2 * line_len(1), line_len(3)], "lengths found");
        log.commit_started();
        log.committed();
        // Covered but small: kept (stale lines; recovery leaves their jobs alone).
        assert_eq!(log.lens[0], 2 * line_len(1));
        drop(log);
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(1), sent(2), sent(3)]);
        // Fill file 0 past EMPTY_AT while file 1 takes the lines of a commit under way.
        let many: Vec<SentAhead> = (10..10 + EMPTY_AT / line_len(10) + 1).map(sent).collect();
        log.record(&many);
        assert!(log.lens[0] >= EMPTY_AT);
        log.commit_started();
        log.record(&[sent(4)]);
        log.committed();
        assert_eq!(log.lens[0], 0, "emptied once covered and large");
        assert_eq!(std::fs::metadata(&log.paths[0]).unwrap().len(), 0);
        drop(log);
        let (_, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(3), sent(4)], "file 1: not covered yet");
    }

    /// The bytes one line of `sent(n)` takes.
    fn line_len(n: u64) -> u64 {
        serde_json::to_vec(&sent(n)).unwrap().len() as u64 + 1
    }

    #[test]
    fn a_torn_line_is_skipped_and_clear_empties_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SentAheadLog::open(dir.path()).unwrap();
        log.record(&[sent(1)]);
        log.commit_started();
        log.record(&[sent(2)]);
        log.committed();
        log.commit_started();
        log.committed();
        // A write cut short by the crash.
        log.record(&[sent(4)]);
        log.files[log.cur]
            .write_all(b"{\"job\":\"job-5\",\"att")
            .unwrap();
        drop(log);
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        // File 0, then file 1; the stale lines 1 and 2 are the core's to ignore.
        assert_eq!(left, vec![sent(1), sent(4), sent(2)]);
        log.clear();
        assert_eq!(log.lens, [0, 0]);
        drop(log);
        assert!(SentAheadLog::open(dir.path()).unwrap().1.is_empty());
    }
}
