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
//! the first names only dispatches that are now stored. Such a line is stale. A file is emptied
//! (`set_len(0)`) only once it holds [`EMPTY_AT`] bytes, not after every commit: an
//! `ftruncate` and the block the next `write` allocates again cost about 10 µs on ext4, a
//! tenth of a millisecond-long sequential job's own work in the dispatcher (BENCHMARKS.md,
//! "Cost per job over HTTP"). Stale lines are harmless because every line carries a sequence
//! number and only each job's **last** line is read back: it names the job's last request.
//! If that request's dispatch was stored, recovery leaves the job alone (its stored record
//! counts that attempt, [`crate::jobs::JobTable::sent_ahead`]) — unless the agent refused it
//! since (`busy`, which does not count the attempt), and then the job runs nowhere, so sending
//! it back to that agent runs it once. An earlier line of a job refused and sent again
//! elsewhere would name the wrong agent, and is why the last one alone counts.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use spine_protocol::JobId;
use tracing::warn;

use crate::core::SentAhead;

/// One line of the files: a request and its place in the order they were sent.
#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    /// Increasing over the lines of both files (a line without one, from a build before
    /// sequence numbers, counts as 0: those files were emptied after every commit).
    #[serde(default)]
    seq: u64,
    #[serde(flatten)]
    sent: SentAhead,
}

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
    /// The sequence number of the next line.
    next: u64,
    /// The file lines go to now.
    cur: usize,
    /// A write failed and was reported; reported again only after one succeeds.
    failing: bool,
}

impl SentAheadLog {
    /// Opens the log in `dir`, with what a previous process left in it: each job's last line,
    /// in the order they were sent (lines that cannot be read — the last one of a write cut
    /// short — are skipped with a warning).
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
        let mut last: HashMap<JobId, Line> = HashMap::new();
        let mut next = 0;
        for ((f, p), len) in files.iter_mut().zip(&paths).zip(&mut lens) {
            *len = f.metadata()?.len();
            f.rewind()?;
            for (n, line) in BufReader::new(&*f).lines().enumerate() {
                let line = line?;
                match serde_json::from_str::<Line>(&line) {
                    Ok(l) => {
                        next = next.max(l.seq + 1);
                        // Equal numbers (old lines, all 0): the later line in the files.
                        if last.get(&l.sent.job).is_none_or(|had| had.seq <= l.seq) {
                            last.insert(l.sent.job.clone(), l);
                        }
                    }
                    Err(e) => {
                        warn!(file = %p.display(), line = n + 1, "skipping an unreadable line: {e}")
                    }
                }
            }
        }
        let mut left: Vec<Line> = last.into_values().collect();
        left.sort_by_key(|l| l.seq);
        let left = left.into_iter().map(|l| l.sent).collect();
        let log = SentAheadLog {
            files,
            paths,
            lens,
            next,
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
            let line = Line {
                seq: self.next,
                sent: s.clone(),
            };
            self.next += 1;
            // A struct of strings and numbers: serialising cannot fail.
            if serde_json::to_writer(&mut buf, &line).is_ok() {
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
        to(n, "agent1@localhost/w")
    }

    fn to(n: u64, agent: &str) -> SentAhead {
        SentAhead {
            job: format!("job-{n}").parse().unwrap(),
            attempt: n,
            agent: agent.parse().unwrap(),
        }
    }

    /// What the log counts against the files' real sizes.
    fn sizes(log: &SentAheadLog) -> [u64; 2] {
        log.paths
            .clone()
            .map(|p| std::fs::metadata(p).unwrap().len())
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
        assert_eq!(log.lens, sizes(&log), "lengths found");
        let covered = log.lens[0];
        log.commit_started();
        log.committed();
        // Covered but small: kept (stale lines; recovery leaves their jobs alone).
        assert_eq!(log.lens[0], covered);
        drop(log);
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(1), sent(2), sent(3)]);
        // Fill file 0 past EMPTY_AT while file 1 takes the lines of a commit under way.
        let mut n = 10;
        while log.lens[0] < EMPTY_AT {
            log.record(&[sent(n)]);
            n += 1;
        }
        assert_eq!(log.lens, sizes(&log));
        log.commit_started();
        log.record(&[sent(4)]);
        log.committed();
        assert_eq!(log.lens[0], 0, "emptied once covered and large");
        assert_eq!(sizes(&log)[0], 0);
        drop(log);
        let (_, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(3), sent(4)], "file 1: not covered yet");
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
            .write_all(b"{\"seq\":9,\"job\":\"job-5\",\"att")
            .unwrap();
        drop(log);
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        // In the order sent, whatever the file; the stale lines 1 and 2 are the core's to
        // ignore.
        assert_eq!(left, vec![sent(1), sent(2), sent(4)]);
        log.clear();
        assert_eq!(log.lens, [0, 0]);
        drop(log);
        assert!(SentAheadLog::open(dir.path()).unwrap().1.is_empty());
    }

    #[test]
    fn only_a_jobs_last_request_is_read_back() {
        // Job 1's attempt 1 went to agent a, which refused it (not counted); the attempt went
        // to agent b next. The line naming a is stale and must not send the job back there
        // while b runs it — whichever file each line is in, and across a restart.
        let (a, b, c) = ("a@localhost/w", "b@localhost/w", "c@localhost/w");
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SentAheadLog::open(dir.path()).unwrap();
        log.record(&[to(1, a), sent(2)]);
        log.commit_started();
        log.record(&[to(1, b)]);
        drop(log);
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(2), to(1, b)], "file 0 holds the older line");
        // The next process numbers on from the last: its line beats both, in file 0 again.
        log.record(&[to(1, c)]);
        drop(log);
        let (_, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(2), to(1, c)]);
    }

    #[test]
    fn a_line_of_an_older_build_without_a_number_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_string(&sent(7)).unwrap();
        std::fs::write(dir.path().join(NAMES[1]), format!("{line}\n")).unwrap();
        let (mut log, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![sent(7)]);
        log.record(&[to(7, "b@localhost/w")]);
        drop(log);
        let (_, left) = SentAheadLog::open(dir.path()).unwrap();
        assert_eq!(left, vec![to(7, "b@localhost/w")], "numbered from 1 on");
    }
}
