//! The audit log: one JSON line per job that ended — who submitted it, what it ran, where, in
//! how many attempts, and how it ended — appended to a file that rotates by size.
//!
//! Exactly one line per job, even across a crash: the lines of the jobs that ended are stored
//! in the same store transaction as their outcomes (an outbox, [`crate::store::Store::put`]),
//! appended to the file after that commit, and removed from the outbox by a later one, once the
//! file has been synced (at most every 200 ms). A
//! dispatcher that starts with lines still in its outbox ([`AuditLog::recover`]) appends those
//! the file does not already hold. So the log never claims an outcome the store does not hold,
//! and never misses one it does. Rotation renames `audit.jsonl` to `audit.jsonl.1` (and `.1` to
//! `.2`, …, dropping the oldest beyond `keep`) before a write that would take the file over
//! `max_bytes`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use spine_protocol::JobId;

use crate::jobs::{JobRecord, Recorded};

/// An append-only, size-rotated JSON-lines file.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    /// Lines of jobs that ended since the last commit: (job id, line with its newline).
    pending: Vec<(String, Vec<u8>)>,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, appending. It holds who ran what: a missing
    /// directory is created with mode 0700, the files are 0600, and the current and rotated
    /// files found with looser modes are tightened (with a warning).
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = open_private(path)?;
        let size = file.metadata()?.len();
        let log = AuditLog {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
            pending: Vec::new(),
        };
        crate::store::private_file(path, false)?;
        for n in 1..=keep {
            crate::store::private_file(&log.rotated(n), false)?;
        }
        Ok(log)
    }

    /// Queues the line of a job that ended (written by [`AuditLog::flush`]).
    pub fn record(&mut self, j: &JobRecord, now_ms: u64) {
        self.pending.push(line(j, now_ms));
    }

    /// The lines queued since the last call, for the store's outbox and then [`Self::append`].
    pub fn take_pending(&mut self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut self.pending)
    }

    /// Appends lines, rotating first when they would take the file over the limit.
    pub fn append(&mut self, lines: &[(String, Vec<u8>)]) -> std::io::Result<()> {
        let bytes: Vec<u8> = lines.iter().flat_map(|(_, l)| l.iter().copied()).collect();
        if bytes.is_empty() {
            return Ok(());
        }
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&bytes)?;
        self.file.flush()?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Makes what was appended durable (fsync).
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes the queued lines (without an outbox: tests, and a dispatcher without a store).
    pub fn flush(&mut self) -> std::io::Result<()> {
        let lines = self.take_pending();
        self.append(&lines)
    }

    /// After a crash: appends the outbox lines that the current file does not hold yet (the
    /// crash came between the commit and the write); returns how many it appended.
    pub fn recover(&mut self, outbox: &[(String, Vec<u8>)]) -> std::io::Result<usize> {
        if outbox.is_empty() {
            return Ok(0);
        }
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        // The current file: lines are written just after rotating, never before.
        let held: std::collections::HashSet<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["job"].as_str().map(str::to_owned))
            .collect();
        let missing: Vec<(String, Vec<u8>)> = outbox
            .iter()
            .filter(|(j, _)| !held.contains(j))
            .cloned()
            .collect();
        self.append(&missing)?;
        Ok(missing.len())
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = std::fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
            self.file = open_private(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// Opens `path` for appending, creating it with mode 0600.
fn open_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// One audit line's fields, written in this order: by name, the order of the map it was
/// built as before (a `serde_json::Value`, whose building and sorting cost about 2 % of a
/// no-op job's CPU, BENCHMARKS.md, twenty-third session), so that lines stay byte for byte
/// as they were.
#[derive(serde::Serialize)]
struct Line<'a> {
    accepted_ms: u64,
    agent: Option<&'a jid::FullJid>,
    at_ms: u64,
    attempts: u64,
    capability: &'a spine_protocol::CapabilityName,
    condition: Option<&'a str>,
    job: &'a JobId,
    message: Option<&'a str>,
    parent: Option<&'a JobId>,
    state: spine_protocol::JobState,
    submitter: &'a str,
}

/// The audit line of a job that ended, at `now_ms`: (job id, one JSON line with its newline).
/// Pure, so the dispatcher's core builds it and the driver writes it.
pub fn line(j: &JobRecord, now_ms: u64) -> (String, Vec<u8>) {
    let (condition, message) = match &j.outcome {
        Some(Recorded::Failure {
            condition, message, ..
        }) => (Some(condition.as_str()), message.as_deref()),
        _ => (None, None),
    };
    let line = Line {
        accepted_ms: j.accepted_ms,
        agent: j.agent.as_ref(),
        at_ms: now_ms,
        attempts: j.attempts,
        capability: &j.spec.capability,
        condition,
        job: &j.id,
        message,
        parent: j.spec.parent.as_ref(),
        state: j.state,
        submitter: &j.spec.submitter,
    };
    // Serialising these fields to a Vec cannot fail.
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    (j.id.to_string(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobSpec, JobTable};
    use spine_protocol::{Condition, SpineError, Strategy};

    fn job(t: &mut JobTable, id: &str) -> JobRecord {
        let spec = JobSpec {
            capability: "c.x".parse().unwrap(),
            strategy: Strategy::LeastLoaded,
            filter: None,
            sort: None,
            affinity_key: None,
            args: Default::default(),
            input: Default::default(),
            input_mime: None,
            deadline_ms: None,
            not_before_ms: None,
            priority: 0,
            max_attempts: 1,
            submitter: "http:app".into(),
            idempotency_key: None,
            progress: false,
            watch: None,
            limit: None,
            batch: None,
            target: None,
            parent: None,
            mapreduce: None,
            output_refs: false,
            input_blobs: Vec::new(),
            keep_output: false,
            input_kept: Vec::new(),
            event: None,
        };
        let id = id.parse().unwrap();
        t.submit(id, spec, 1).unwrap().clone()
    }

    /// The line as written before it had a struct of its own: a `serde_json::Value` map,
    /// whose keys serialise sorted. The bytes must not change under operators' tools.
    #[test]
    fn a_line_is_byte_for_byte_the_map_it_once_was() {
        let mut t = JobTable::new(100);
        let a = job(&mut t, "a");
        let agent: jid::FullJid = "agent1@x/w".parse().unwrap();
        t.dispatched(&a.id, &agent, 2).unwrap();
        let e = SpineError::new(Condition::BadArguments).with_text("no \"quotes\" é");
        t.attempt_failed(&a.id, Some(&agent), Some(&e), 3);
        let b = job(&mut t, "b");
        for (rec, condition, message) in [
            (
                t.get(&a.id).unwrap(),
                Some("bad-arguments"),
                Some("no \"quotes\" é"),
            ),
            (&b, None, None),
        ] {
            let was = serde_json::json!({
                "at_ms": 7,
                "job": rec.id,
                "submitter": rec.spec.submitter,
                "capability": rec.spec.capability,
                "agent": rec.agent,
                "attempts": rec.attempts,
                "state": rec.state,
                "condition": condition,
                "message": message,
                "accepted_ms": rec.accepted_ms,
                "parent": rec.spec.parent,
            });
            let mut want = serde_json::to_vec(&was).unwrap();
            want.push(b'\n');
            let (id, got) = line(rec, 7);
            assert_eq!(id, rec.id.as_str());
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }

    /// The line's cost against the map it was built as before (ignored: a measurement;
    /// `cargo test --release -p spine-dispatcher --lib audit_line_cost -- --ignored
    /// --nocapture`).
    #[test]
    #[ignore]
    fn audit_line_cost_against_the_map() {
        let mut t = JobTable::new(100);
        let a = job(&mut t, "0190f5e2-7c1a-7d3e-9a51-3b0c2f9d1e44");
        let agent: jid::FullJid = "agent1@example.com/worker".parse().unwrap();
        t.dispatched(&a.id, &agent, 2).unwrap();
        let rec = t.get(&a.id).unwrap();
        const N: u32 = 200_000;
        for round in 0..3 {
            let t0 = std::time::Instant::now();
            for i in 0..N {
                std::hint::black_box(line(std::hint::black_box(rec), u64::from(i)));
            }
            let struct_ns = t0.elapsed().as_nanos() / u128::from(N);
            let t0 = std::time::Instant::now();
            for i in 0..N {
                let rec = std::hint::black_box(rec);
                let v = serde_json::json!({
                    "at_ms": i, "job": rec.id, "submitter": rec.spec.submitter,
                    "capability": rec.spec.capability, "agent": rec.agent,
                    "attempts": rec.attempts, "state": rec.state, "condition": None::<&str>,
                    "message": None::<&str>, "accepted_ms": rec.accepted_ms,
                    "parent": rec.spec.parent,
                });
                let mut b = serde_json::to_vec(&v).unwrap();
                b.push(b'\n');
                std::hint::black_box((rec.id.to_string(), b));
            }
            let map_ns = t0.elapsed().as_nanos() / u128::from(N);
            println!("round {round}: struct {struct_ns} ns, map {map_ns} ns per line");
        }
    }

    #[test]
    fn lines_carry_the_outcome_and_the_file_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut t = JobTable::new(100);
        let mut log = AuditLog::open(&path, 600, 2).unwrap();
        let a = job(&mut t, "a");
        let agent: jid::FullJid = "agent1@x/w".parse().unwrap();
        t.dispatched(&a.id, &agent, 2).unwrap();
        let e = SpineError::new(Condition::BadArguments).with_text("no");
        t.attempt_failed(&a.id, Some(&agent), Some(&e), 3);
        log.record(t.get(&a.id).unwrap(), 3);
        assert!(
            std::fs::read_to_string(&path).unwrap().is_empty(),
            "written on flush"
        );
        log.flush().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["job"], "a");
        assert_eq!(v["submitter"], "http:app");
        assert_eq!(v["capability"], "c.x");
        assert_eq!(v["agent"], "agent1@x/w");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["state"], "failed");
        assert_eq!(v["condition"], "bad-arguments");
        // Lines of about 250 bytes, 600 per file, two old files kept.
        for i in 0..12 {
            let j = job(&mut t, &format!("j{i}"));
            log.record(&j, 10 + i);
            log.flush().unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 600);
        assert!(dir.path().join("audit.jsonl.1").exists());
        assert!(dir.path().join("audit.jsonl.2").exists());
        assert!(
            !dir.path().join("audit.jsonl.3").exists(),
            "only `keep` old files"
        );
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.contains("\"job\":\"j11\""), "{newest}");
        // Every line of every file is whole JSON.
        for f in ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"] {
            for line in std::fs::read_to_string(dir.path().join(f)).unwrap().lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap();
            }
        }
    }

    /// Issue 14, finding 12: `audit.jsonl` was 0644.
    #[test]
    fn the_audit_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/audit.jsonl");
        let mut t = JobTable::new(100);
        let mut log = AuditLog::open(&path, 600, 2).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("logs")), 0o700);
        for i in 0..6 {
            let j = job(&mut t, &format!("j{i}"));
            log.record(&j, i);
            log.flush().unwrap();
        }
        assert_eq!(mode(&dir.path().join("logs/audit.jsonl.1")), 0o600);
        assert_eq!(mode(&path), 0o600, "the new file after a rotation");
        drop(log);
        for f in ["audit.jsonl", "audit.jsonl.1"] {
            let p = dir.path().join("logs").join(f);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        AuditLog::open(&path, 600, 2).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("logs/audit.jsonl.1")), 0o600);
    }

    #[test]
    fn recovery_appends_only_the_lines_the_file_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut t = JobTable::new(100);
        let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        let a = job(&mut t, "a");
        let b = job(&mut t, "b");
        log.record(&a, 1);
        let stored_a = log.take_pending();
        log.append(&stored_a).unwrap();
        log.record(&b, 2);
        // The crash: b's line was stored in the outbox, never written.
        let stored_b = log.take_pending();
        drop(log);
        let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
        let outbox: Vec<_> = stored_a.iter().chain(&stored_b).cloned().collect();
        assert_eq!(log.recover(&outbox).unwrap(), 1);
        assert_eq!(log.recover(&outbox).unwrap(), 0, "idempotent");
        let text = std::fs::read_to_string(&path).unwrap();
        let jobs: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["job"].to_string())
            .collect();
        assert_eq!(jobs, ["\"a\"", "\"b\""]);
    }
}
