//! Counters operators alert on, per capability (Prometheus text in [`Core::metrics`]): jobs
//! submitted, refused (by reason), retried, ended (by final state) and duplicate results; the
//! time from acceptance to first dispatch and to the end. Kept by the core as the events
//! happen — each job's end is counted once, where its audit line is written — and lost at a
//! restart, as Prometheus counters may be.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use spine_protocol::{CapabilityName, Condition, JobState};

use super::{Histogram, BUCKETS};
use crate::jobs::JobRecord;

/// The counters and histograms, by capability.
#[derive(Default)]
pub(crate) struct Stats {
    submitted: BTreeMap<CapabilityName, u64>,
    /// (capability, final state) → jobs.
    ended: BTreeMap<(CapabilityName, &'static str), u64>,
    retried: BTreeMap<CapabilityName, u64>,
    /// (capability, reason) → submissions refused.
    refused: BTreeMap<(CapabilityName, String), u64>,
    duplicates: BTreeMap<CapabilityName, u64>,
    dispatch: BTreeMap<CapabilityName, Histogram>,
    end_to_end: BTreeMap<CapabilityName, Histogram>,
    /// The last minutes, for the console (`GET /v1/capabilities`).
    pub(super) recent: super::recent::Recent,
}

fn bump<K: Ord>(m: &mut BTreeMap<K, u64>, k: K) {
    *m.entry(k).or_default() += 1;
}

impl Stats {
    pub(super) fn submitted(&mut self, cap: &CapabilityName) {
        bump(&mut self.submitted, cap.clone());
    }

    pub(super) fn refused(&mut self, cap: &CapabilityName, why: Condition) {
        bump(&mut self.refused, (cap.clone(), why.to_string()));
    }

    pub(super) fn retried(&mut self, cap: &CapabilityName, now_ms: u64) {
        bump(&mut self.retried, cap.clone());
        self.recent.retried(cap, now_ms);
    }

    pub(super) fn duplicate(&mut self, cap: &CapabilityName) {
        bump(&mut self.duplicates, cap.clone());
    }

    /// A job's first dispatch, `secs` after its acceptance.
    pub(super) fn dispatched(&mut self, cap: &CapabilityName, secs: f64) {
        self.dispatch.entry(cap.clone()).or_default().observe(secs);
    }

    /// A job ended (called once per job).
    pub(super) fn ended(&mut self, rec: &JobRecord, now_ms: u64) {
        let cap = &rec.spec.capability;
        bump(&mut self.ended, (cap.clone(), rec.state.as_str()));
        let ms = now_ms.saturating_sub(rec.accepted_ms);
        match rec.state {
            JobState::Succeeded => self.recent.ended(cap, Some(ms), now_ms),
            JobState::Failed | JobState::TimedOut => self.recent.ended(cap, None, now_ms),
            _ => {}
        }
        let secs = ms as f64 / 1000.0;
        self.end_to_end
            .entry(cap.clone())
            .or_default()
            .observe(secs);
    }

    /// The Prometheus text of everything here.
    pub(super) fn write(&self, out: &mut String) {
        counter(
            out,
            "spine_jobs_submitted_total",
            "Jobs accepted, by capability.",
            self.submitted
                .iter()
                .map(|(c, n)| (format!("capability=\"{c}\""), *n)),
        );
        counter(
            out,
            "spine_jobs_refused_total",
            "Submissions refused, by capability and reason.",
            self.refused
                .iter()
                .map(|((c, r), n)| (format!("capability=\"{c}\",reason=\"{r}\""), *n)),
        );
        counter(
            out,
            "spine_jobs_retried_total",
            "Attempts that failed and were retried, by capability.",
            self.retried
                .iter()
                .map(|(c, n)| (format!("capability=\"{c}\""), *n)),
        );
        counter(
            out,
            "spine_jobs_ended_total",
            "Jobs ended, by capability and final state.",
            self.ended
                .iter()
                .map(|((c, s), n)| (format!("capability=\"{c}\",state=\"{s}\""), *n)),
        );
        counter(
            out,
            "spine_duplicate_results_total",
            "Results dropped because their job already had its outcome, by capability.",
            self.duplicates
                .iter()
                .map(|(c, n)| (format!("capability=\"{c}\""), *n)),
        );
        histogram(
            out,
            "spine_job_dispatch_seconds",
            "Time from acceptance to first dispatch, by capability.",
            &self.dispatch,
        );
        histogram(
            out,
            "spine_job_end_to_end_seconds",
            "Time from acceptance to the end, by capability.",
            &self.end_to_end,
        );
    }
}

fn counter(out: &mut String, name: &str, help: &str, rows: impl Iterator<Item = (String, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, n) in rows {
        let _ = writeln!(out, "{name}{{{labels}}} {n}");
    }
}

fn histogram(out: &mut String, name: &str, help: &str, h: &BTreeMap<CapabilityName, Histogram>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (c, h) in h {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{capability=\"{c}\",le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{capability=\"{c}\",le=\"+Inf\"}} {}",
            h.n
        );
        let _ = writeln!(out, "{name}_sum{{capability=\"{c}\"}} {}", h.sum_s);
        let _ = writeln!(out, "{name}_count{{capability=\"{c}\"}} {}", h.n);
    }
}
