//! The audit log: one JSON line per job that ended — who submitted it, what it ran, where, in
//! how many attempts, and how it ended — appended to a file that rotates by size.
//!
//! Lines are buffered and written after the store commit that recorded the outcome, so the log
//! never claims an outcome the store does not hold. Rotation renames `audit.jsonl` to
//! `audit.jsonl.1` (and `.1` to `.2`, …, dropping the oldest beyond `keep`) before a write
//! that would take the file over `max_bytes`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::jobs::{JobRecord, Recorded};

/// An append-only, size-rotated JSON-lines file.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
    pending: Vec<u8>,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`, appending.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(AuditLog {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
            pending: Vec::new(),
        })
    }

    /// Queues the line of a job that ended (written by [`AuditLog::flush`]).
    pub fn record(&mut self, j: &JobRecord, now_ms: u64) {
        let (condition, message) = match &j.outcome {
            Some(Recorded::Failure { condition, message }) => {
                (Some(condition.as_str()), message.as_deref())
            }
            _ => (None, None),
        };
        let line = json!({
            "at_ms": now_ms,
            "job": j.id,
            "submitter": j.spec.submitter,
            "capability": j.spec.capability,
            "agent": j.agent,
            "attempts": j.attempts,
            "state": j.state,
            "condition": condition,
            "message": message,
            "accepted_ms": j.accepted_ms,
            "parent": j.spec.parent,
        });
        // Serialising a JSON value to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.pending, &line);
        self.pending.push(b'\n');
    }

    /// Writes the queued lines, rotating first when they would take the file over the limit.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.size > 0 && self.size + self.pending.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&self.pending)?;
        self.file.flush()?;
        self.size += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
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
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
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
            input: Vec::new(),
            input_mime: None,
            deadline_ms: None,
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
        };
        let id = id.parse().unwrap();
        t.submit(id, spec, 1).unwrap().clone()
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
}
