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
//! the first is emptied (`set_len(0)`) — it only named dispatches that are now stored.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::core::SentAhead;

/// The two files of [`SentAheadLog`] in the data directory.
const NAMES: [&str; 2] = ["sent-ahead.0.jsonl", "sent-ahead.1.jsonl"];

/// See the module documentation.
pub(crate) struct SentAheadLog {
    files: [File; 2],
    paths: [PathBuf; 2],
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
        let mut left = Vec::new();
        for (f, p) in files.iter_mut().zip(&paths) {
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

    /// The commit started last is durable: the lines it covers are dropped.
    pub(crate) fn committed(&mut self) {
        self.truncate(self.cur ^ 1);
    }

    /// Drops every line (after the start-up commit stored what they said).
    pub(crate) fn clear(&mut self) {
        self.truncate(0);
        self.truncate(1);
    }

    fn truncate(&mut self, i: usize) {
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
    fn lines_outlive_the_process_until_a_commit_covers_them() {
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
        log.commit_started();
        log.committed();
        drop(log);
        let (_, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(3)], "only what the commit did not cover");
    }

    #[test]
    fn two_commits_empty_both_files_and_a_torn_line_is_skipped() {
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
        assert_eq!(left, vec![sent(4)]);
        log.clear();
        drop(log);
        assert!(SentAheadLog::open(dir.path()).unwrap().1.is_empty());
    }
}
