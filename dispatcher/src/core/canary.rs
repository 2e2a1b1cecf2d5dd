//! Canaries in the core: the leader runs each `[[canary]]` on every agent that offers its
//! capability (a job pinned to the agent, at a low priority, one at a time per agent), judges
//! its outcome, and keeps agents that fail `quarantine_after` in a row out of placement for
//! that capability ([`Core::quarantined`]) until `release_after` pass.

use std::collections::HashMap;

use jid::FullJid;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use spine_protocol::{CapabilityName, JobId, JobState};
use tracing::{info, warn};

use super::{Core, Now};
use crate::canaries::{Canary, Health, Transition};
use crate::jobs::{Body, JobSpec, Recorded};
use crate::policy::Capabilities;

/// A canary's priority: behind any job a submitter may ask for.
const CANARY_PRIORITY: i64 = -1_000_000;

/// Where the canary of one capability stands on one agent.
#[derive(Debug, Clone)]
pub(crate) struct Pair {
    pub health: Health,
    /// When it runs next (ms since the UNIX epoch).
    pub next_ms: u64,
    /// The canary job running (or waiting for a slot).
    running: Option<JobId>,
    /// Canaries that waited for a slot until their timeout (the agent busy with real work).
    pub skipped: u64,
}

/// The canaries' state.
#[derive(Debug, Default)]
pub(crate) struct Canaries {
    pub list: Vec<Canary>,
    pub pairs: HashMap<(FullJid, CapabilityName), Pair>,
    /// Agents out of placement, by capability.
    quarantined: HashMap<CapabilityName, Vec<FullJid>>,
    /// Quarantines since the dispatcher started.
    pub quarantines: u64,
}

impl Canaries {
    pub(crate) fn new(list: Vec<Canary>) -> Canaries {
        Canaries {
            list,
            ..Canaries::default()
        }
    }
}

/// One (agent, capability) as `GET /v1/canaries` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CanaryView {
    pub capability: String,
    pub agent: String,
    #[serde(flatten)]
    pub health: Health,
    /// Canaries that did not run: the agent was busy with real work until their timeout.
    pub skipped: u64,
    /// When it runs next (RFC 3339).
    pub next_run: String,
}

impl Core {
    /// Agents quarantined for `cap` (none, mostly).
    pub(super) fn quarantined(&self, cap: &CapabilityName) -> &[FullJid] {
        self.canaries
            .quarantined
            .get(cap)
            .map_or(&[], Vec::as_slice)
    }

    /// Starts the canaries that are due (the leader, at housekeeping).
    pub(super) fn run_canaries(&mut self, now: Now) {
        if !self.leads || self.canaries.list.is_empty() {
            return;
        }
        for k in 0..self.canaries.list.len() {
            let cap = self.canaries.list[k].capability.clone();
            let agents: Vec<FullJid> = self
                .registry
                .rank(&cap, None, None, None)
                .into_iter()
                .filter_map(|a| a.jid.try_into_full().ok())
                .collect();
            // Agents gone (or no longer offering it) leave; their quarantine with them.
            self.canaries
                .pairs
                .retain(|(a, c), _| *c != cap || agents.contains(a));
            if let Some(q) = self.canaries.quarantined.get_mut(&cap) {
                q.retain(|a| agents.contains(a));
            }
            for agent in agents {
                let key = (agent.clone(), cap.clone());
                let pair = self.canaries.pairs.entry(key.clone()).or_insert(Pair {
                    health: Health::default(),
                    next_ms: now.ms,
                    running: None,
                    skipped: 0,
                });
                if pair.running.is_some() || pair.next_ms > now.ms {
                    continue;
                }
                let canary = &self.canaries.list[k];
                pair.next_ms = now.ms + canary.config.interval.as_millis() as u64;
                let mut spec = JobSpec::new(cap.clone(), format!("canary:{cap}"));
                spec.target = Some(agent.clone());
                spec.args = canary.config.args.clone();
                spec.input = Body::Inline(canary.input.clone());
                spec.priority = CANARY_PRIORITY;
                spec.max_attempts = 1;
                spec.deadline_ms = Some(now.ms + canary.config.timeout.as_millis() as u64);
                match self.accept(spec, true, &Capabilities::all(), now) {
                    Ok((id, _)) => {
                        if let Some(p) = self.canaries.pairs.get_mut(&key) {
                            p.running = Some(id);
                        }
                    }
                    Err(e) => warn!(capability = %cap, agent = %agent, "canary not started: {e}"),
                }
            }
        }
    }

    /// Judges a canary job that ended (called once per job that ends).
    pub(super) fn canary_outcome(&mut self, job: &JobId, now: Now) {
        let Some(rec) = self.jobs.get(job) else {
            return;
        };
        if !rec.spec.submitter.starts_with("canary:") {
            return;
        }
        let Some(agent) = rec.spec.target.clone() else {
            return;
        };
        let cap = rec.spec.capability.clone();
        let Some(canary) = self.canaries.list.iter().find(|k| k.capability == cap) else {
            return;
        };
        let outcome = match (&rec.state, &rec.outcome) {
            (JobState::Succeeded, Some(Recorded::Succeeded { output, .. })) => {
                let sha: [u8; 32] = match output {
                    Body::Inline(b) => Sha256::digest(b).into(),
                    Body::Stored(s) => s.sha256,
                    Body::Kept(k) => k.blob.sha256,
                };
                if !canary.output_ok(&sha) {
                    Err(format!(
                        "its output (sha256 {}) is not the expected one",
                        crate::blobs::sha256_hex(&sha)
                    ))
                } else if canary.config.expect_json.is_some() {
                    let bytes = match output {
                        Body::Inline(b) => Ok(b.clone()),
                        Body::Stored(s) => self
                            .blob_store
                            .read(s)
                            .map_err(|e| format!("its output could not be read: {e}")),
                        Body::Kept(_) => Err("its output is kept by the agent".to_owned()),
                    };
                    bytes.and_then(|b| canary.json_ok(&b))
                } else {
                    Ok(())
                }
            }
            (JobState::TimedOut, _) if rec.attempts == 0 => {
                // Waited for a slot all along: the agent was busy, not broken.
                if let Some(p) = self.canaries.pairs.get_mut(&(agent, cap)) {
                    p.running = None;
                    p.skipped += 1;
                }
                return;
            }
            (
                state,
                Some(Recorded::Failure {
                    condition, message, ..
                }),
            ) => Err(format!(
                "{state}: {condition}{}",
                message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )),
            (state, _) => Err(format!("{state}")),
        };
        let duration =
            (rec.dispatched_ms > 0).then(|| rec.updated_ms.saturating_sub(rec.dispatched_ms));
        let config = canary.config.clone();
        let key = (agent.clone(), cap.clone());
        let Some(pair) = self.canaries.pairs.get_mut(&key) else {
            return;
        };
        if pair.running.as_ref() != Some(job) {
            return;
        }
        pair.running = None;
        if let Err(why) = &outcome {
            warn!(capability = %cap, agent = %agent, "canary failed: {why}");
        }
        match pair.health.record(outcome, duration, now.ms, &config) {
            Some(Transition::Quarantined) => {
                warn!(capability = %cap, agent = %agent, failures = pair.health.failures, "agent quarantined for the capability: it gets no real jobs of it until its canaries pass");
                self.canaries.quarantines += 1;
                self.canaries
                    .quarantined
                    .entry(cap)
                    .or_default()
                    .push(agent);
            }
            Some(Transition::Released) => {
                info!(capability = %cap, agent = %agent, "agent released from quarantine: its canaries pass again");
                if let Some(q) = self.canaries.quarantined.get_mut(&cap) {
                    q.retain(|a| *a != agent);
                }
                self.place_pending = true;
            }
            None => {}
        }
    }

    /// Every (agent, capability) with a canary, for `GET /v1/canaries`.
    pub(crate) fn canaries_view(&self) -> Vec<CanaryView> {
        let mut out: Vec<CanaryView> = self
            .canaries
            .pairs
            .iter()
            .map(|((agent, cap), p)| CanaryView {
                capability: cap.to_string(),
                agent: agent.to_string(),
                health: p.health.clone(),
                skipped: p.skipped,
                next_run: super::rfc3339_ms(p.next_ms),
            })
            .collect();
        out.sort_by(|a, b| (&a.capability, &a.agent).cmp(&(&b.capability, &b.agent)));
        out
    }

    /// The canaries as `/metrics` lines.
    pub(super) fn canary_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        if self.canaries.list.is_empty() {
            return;
        }
        let view = self.canaries_view();
        let _ = writeln!(out, "# HELP spine_canary_success Whether the last canary of the capability passed on the agent.\n# TYPE spine_canary_success gauge");
        for v in view.iter().filter(|v| v.health.last_ok.is_some()) {
            let ok = u8::from(v.health.last_ok == Some(true));
            let _ = writeln!(
                out,
                "spine_canary_success{{capability=\"{}\",agent=\"{}\"}} {ok}",
                v.capability, v.agent
            );
        }
        let _ = writeln!(out, "# HELP spine_canary_duration_seconds How long the last canary ran.\n# TYPE spine_canary_duration_seconds gauge");
        for v in &view {
            if let Some(ms) = v.health.last_duration_ms {
                let _ = writeln!(
                    out,
                    "spine_canary_duration_seconds{{capability=\"{}\",agent=\"{}\"}} {:.3}",
                    v.capability,
                    v.agent,
                    ms as f64 / 1000.0
                );
            }
        }
        let _ = writeln!(out, "# HELP spine_canary_last_success_timestamp_seconds When the last canary passed (UNIX time).\n# TYPE spine_canary_last_success_timestamp_seconds gauge");
        for v in &view {
            if let Some(ms) = v.health.last_success_ms {
                let _ = writeln!(out, "spine_canary_last_success_timestamp_seconds{{capability=\"{}\",agent=\"{}\"}} {:.3}", v.capability, v.agent, ms as f64 / 1000.0);
            }
        }
        let _ = writeln!(out, "# HELP spine_canaries_total Canaries judged, by result.\n# TYPE spine_canaries_total counter");
        for v in &view {
            for (result, n) in [
                ("passed", v.health.passed),
                ("failed", v.health.failed),
                ("skipped", v.skipped),
            ] {
                let _ = writeln!(out, "spine_canaries_total{{capability=\"{}\",agent=\"{}\",result=\"{result}\"}} {n}", v.capability, v.agent);
            }
        }
        let _ = writeln!(out, "# HELP spine_agent_quarantined Whether the agent is quarantined for the capability (no real jobs of it): alert on 1.\n# TYPE spine_agent_quarantined gauge");
        for v in &view {
            let _ = writeln!(
                out,
                "spine_agent_quarantined{{capability=\"{}\",agent=\"{}\"}} {}",
                v.capability,
                v.agent,
                u8::from(v.health.quarantined)
            );
        }
        let _ = writeln!(out, "# HELP spine_quarantines_total Agents quarantined for a capability since the dispatcher started.\n# TYPE spine_quarantines_total counter\nspine_quarantines_total {}", self.canaries.quarantines);
    }
}

#[cfg(test)]
mod tests {
    use jid::Jid;
    use spine_protocol::{Data, JobResult};
    use xmpp_parsers::iq::Iq;

    use super::super::tests::{jobs_sent, spec, SentJob, World, CAP};
    use super::super::Restored;
    use super::*;
    use crate::config::DispatcherConfig;

    fn world() -> World {
        let cfg = DispatcherConfig::from_toml(&format!(
            r#"
            submitters = ["webapp@localhost"]
            [[canary]]
            capability = "{CAP}"
            input = "ping"
            expect = "done"
            interval = "1s"
            timeout = "500ms"
            quarantine_after = 2
            release_after = 2
            "#
        ))
        .unwrap();
        World::with(cfg, Restored::default())
    }

    /// Agent `from` answers `sent` with `output`.
    fn answer(w: &mut World, sent: &SentJob, from: &FullJid, output: &[u8]) {
        let r = JobResult {
            job: sent.job.id.clone(),
            attempt: sent.job.attempt,
            elapsed_ms: Some(1),
            meta: Default::default(),
            output: Some(Data::Inline {
                mime: None,
                bytes: output.to_vec(),
            }),
        };
        let iq = Iq::from_result(sent.iq.clone(), Some(r)).with_from(Jid::from(from.clone()));
        w.core.stanza(iq.into(), w.now);
    }

    /// One interval: heartbeats, housekeeping, and each canary sent answered — agent 1 with
    /// the right output, agent 2 with `agent2_output`. Returns the canaries sent, by agent.
    fn round(w: &mut World, a1: &FullJid, a2: &FullJid, agent2_output: &[u8]) -> (usize, usize) {
        w.advance(1000);
        w.report(a1, w.now.ms);
        w.report(a2, w.now.ms);
        w.tick();
        let (mut n1, mut n2) = (0, 0);
        for sent in jobs_sent(&w.ready().stanzas) {
            assert_eq!(
                w.core.record(&sent.job.id).unwrap().spec.priority,
                CANARY_PRIORITY
            );
            if sent.to == *a1 {
                n1 += 1;
                answer(w, &sent, a1, b"done");
            } else {
                n2 += 1;
                answer(w, &sent, a2, agent2_output);
            }
        }
        w.ready();
        (n1, n2)
    }

    #[test]
    fn an_agent_that_fails_its_canaries_is_quarantined_and_released_when_they_pass() {
        let mut w = world();
        let a1 = w.agent(1, 4);
        let a2 = w.agent(2, 4);
        w.ready();
        assert_eq!(
            round(&mut w, &a1, &a2, b"garbage"),
            (1, 1),
            "one canary on each"
        );
        assert!(
            w.core.quarantined(&CAP.parse().unwrap()).is_empty(),
            "one failure is not enough"
        );
        round(&mut w, &a1, &a2, b"garbage");
        assert_eq!(
            w.core.quarantined(&CAP.parse().unwrap()),
            std::slice::from_ref(&a2)
        );
        let view = w.core.canaries_view();
        let bad = view.iter().find(|v| v.agent == a2.to_string()).unwrap();
        assert!(bad.health.quarantined);
        assert!(bad
            .health
            .last_error
            .as_deref()
            .unwrap()
            .contains("not the expected one"));
        // Real jobs go to agent 1 only, one at a time (its one slot), while agent 2 is idle.
        for _ in 0..6 {
            w.submit(spec(CAP)).unwrap();
        }
        let mut done = 0;
        while done < 6 {
            let sent = jobs_sent(&w.ready().stanzas);
            assert!(!sent.is_empty(), "the jobs wait for agent 1 ({done} done)");
            for s in &sent {
                assert_eq!(s.to, a1, "none to the quarantined agent");
                w.succeed(s, &a1);
                done += 1;
            }
        }
        w.ready();
        // Fixed: two passes release it.
        round(&mut w, &a1, &a2, b"done");
        assert_eq!(w.core.quarantined(&CAP.parse().unwrap()).len(), 1);
        round(&mut w, &a1, &a2, b"done");
        assert!(w.core.quarantined(&CAP.parse().unwrap()).is_empty());
        let m = w.core.metrics();
        for line in [
            format!("spine_agent_quarantined{{capability=\"{CAP}\",agent=\"{a2}\"}} 0"),
            format!("spine_canary_success{{capability=\"{CAP}\",agent=\"{a2}\"}} 1"),
            format!(
                "spine_canaries_total{{capability=\"{CAP}\",agent=\"{a2}\",result=\"failed\"}} 2"
            ),
            "spine_quarantines_total 1".to_owned(),
        ] {
            assert!(m.lines().any(|l| l == line), "{line} not in\n{m}");
        }
    }

    #[test]
    fn a_canary_that_waits_for_a_busy_agent_is_skipped_not_failed() {
        let mut w = world();
        let a1 = w.agent(1, 1);
        w.ready();
        // A real job holds agent 1's one slot.
        w.submit(spec(CAP)).unwrap();
        let real = jobs_sent(&w.ready().stanzas);
        assert_eq!(real.len(), 1);
        w.advance(300);
        w.report(&a1, w.now.ms);
        w.tick();
        assert!(
            jobs_sent(&w.ready().stanzas).is_empty(),
            "the canary waits for the slot"
        );
        w.advance(600);
        w.report(&a1, w.now.ms);
        w.tick();
        w.ready();
        let v = &w.core.canaries_view()[0];
        assert_eq!(
            (v.skipped, v.health.failed, v.health.quarantined),
            (1, 0, false)
        );
    }
}
