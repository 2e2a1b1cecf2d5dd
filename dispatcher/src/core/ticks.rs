//! Schedules in the core: the leader fires each due tick of every `[[schedule]]` as an event
//! for the rules ([`Core::event`]), its jobs stored like any other. A tick's event id is its
//! time, so a tick fired again (after a restart, by a new leader) makes no second job; what a
//! dispatcher does with the ticks missed while none led is the schedule's `catch_up`.

use serde::Serialize;
use spine_protocol::JobId;
use tracing::{info, warn};

use super::{Core, Now};
use crate::schedules::{CatchUp, Schedule};

/// Ticks fired late at most in one go (the loop was late, the clock jumped): older ones are
/// counted as missed.
const MAX_LATE: usize = 60;

/// A schedule's counters since the dispatcher started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ScheduleCounts {
    /// Ticks fired.
    pub ticks: u64,
    /// Ticks skipped because a job of an earlier tick had not ended (`prohibit_overlap`).
    pub overlapping: u64,
    /// Ticks not fired: missed while no dispatcher led (`catch_up = "skip"`, or all but the
    /// latest with `"once"`), or more than 60 due at once.
    pub missed: u64,
    /// Ticks whose rules could not make their jobs.
    pub errors: u64,
}

/// A schedule and where it is.
#[derive(Debug, Clone)]
pub(crate) struct Ticking {
    pub schedule: Schedule,
    /// The next tick to fire (ms since the UNIX epoch).
    pub next_ms: Option<u64>,
    /// The last tick fired (or found fired in the jobs held).
    pub last_ms: Option<u64>,
    /// The jobs the last tick made.
    running: Vec<JobId>,
    pub counts: ScheduleCounts,
}

impl Ticking {
    pub(crate) fn new(schedule: Schedule) -> Ticking {
        Ticking {
            schedule,
            next_ms: None,
            last_ms: None,
            running: Vec::new(),
            counts: ScheduleCounts::default(),
        }
    }
}

impl Core {
    /// Where each schedule stands when this core starts leading: the last tick whose jobs it
    /// holds, and the next tick — or, with `catch_up = "once"` and ticks missed since that
    /// last one, the latest missed tick at once.
    pub(super) fn start_schedules(&mut self, now: Now) {
        let Core {
            schedules, jobs, ..
        } = self;
        for t in schedules.iter_mut() {
            let s = &t.schedule;
            let mut last: Option<u64> = None;
            let mut running = Vec::new();
            for rec in jobs.iter() {
                let Some(tick) = rec
                    .spec
                    .event
                    .as_ref()
                    .and_then(|e| s.tick_of(&e.source, &e.id))
                else {
                    continue;
                };
                if last.is_none_or(|l| tick > l) {
                    last = Some(tick);
                    running.clear();
                }
                if Some(tick) == last {
                    running.push(rec.id.clone());
                }
            }
            t.last_ms = last.max(t.last_ms);
            t.running = running;
            t.next_ms = s.next_after(now.ms);
            let due = s.latest_at_or_before(now.ms);
            if let (Some(due), Some(last)) = (due, t.last_ms) {
                if due > last {
                    // Ticks between the last fired and now were missed.
                    let mut missed = 0u64;
                    let mut k = s.next_after(last);
                    while let Some(x) = k.filter(|x| *x <= due && missed < 1_000_000) {
                        missed += 1;
                        k = s.next_after(x);
                    }
                    if s.config.catch_up == CatchUp::Once {
                        t.next_ms = Some(due);
                        missed = missed.saturating_sub(1);
                    }
                    t.counts.missed += missed;
                    if missed > 0 {
                        info!(schedule = %s.name(), missed, catch_up = ?s.config.catch_up, "ticks missed while no dispatcher led");
                    }
                }
            }
        }
    }

    /// Fires the ticks that are due (the leader only).
    pub(super) fn fire_schedules(&mut self, now: Now) {
        if !self.leads {
            return;
        }
        for i in 0..self.schedules.len() {
            let Some(first) = self.schedules[i].next_ms.filter(|n| *n <= now.ms) else {
                continue;
            };
            let s = self.schedules[i].schedule.clone();
            let mut due = Vec::new();
            let mut k = Some(first);
            while let Some(x) = k.filter(|x| *x <= now.ms) {
                if due.len() >= 100_000 {
                    // The clock jumped far ahead: start again from now.
                    k = s.next_after(now.ms);
                    break;
                }
                due.push(x);
                k = s.next_after(x);
            }
            let missed = due.len().saturating_sub(MAX_LATE);
            if missed > 0 {
                warn!(schedule = %s.name(), missed, "more ticks due at once than are fired late: the older ones are missed");
                self.schedules[i].counts.missed += missed as u64;
            }
            self.schedules[i].next_ms = k;
            for tick in due.into_iter().skip(missed) {
                self.fire_tick(i, tick, now);
            }
        }
    }

    fn fire_tick(&mut self, i: usize, tick: u64, now: Now) {
        let t = &self.schedules[i];
        if t.schedule.config.prohibit_overlap
            && t.running
                .iter()
                .any(|j| self.jobs.get(j).is_some_and(|r| !r.state.is_final()))
        {
            info!(schedule = %t.schedule.name(), "tick skipped: a job of an earlier tick has not ended (prohibit_overlap)");
            self.schedules[i].counts.overlapping += 1;
            return;
        }
        let ev = t.schedule.event(tick);
        let fired = self.event(&ev, now);
        let t = &mut self.schedules[i];
        t.last_ms = Some(tick);
        match fired {
            Ok(fired) => {
                t.counts.ticks += 1;
                t.running = fired.into_iter().map(|f| f.id).collect();
            }
            Err(e) => {
                t.counts.errors += 1;
                warn!(schedule = %t.schedule.name(), tick = %ev.id, "a tick's rules did not make their jobs: {e}");
            }
        }
    }

    /// The next tick of any schedule (the leader's wake-up).
    pub(super) fn next_tick(&self) -> Option<u64> {
        if !self.leads {
            return None;
        }
        self.schedules.iter().filter_map(|t| t.next_ms).min()
    }

    /// The schedules' counters as `/metrics` lines.
    pub(super) fn schedule_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        if self.schedules.is_empty() {
            return;
        }
        type Family = (&'static str, &'static str, fn(&ScheduleCounts) -> u64);
        let families: [Family; 4] = [
            ("spine_schedule_ticks_total", "Ticks fired.", |c| c.ticks),
            (
                "spine_schedule_overlapping_total",
                "Ticks skipped while a job of an earlier tick ran (prohibit_overlap).",
                |c| c.overlapping,
            ),
            (
                "spine_schedule_missed_total",
                "Ticks missed while no dispatcher led, or too many due at once.",
                |c| c.missed,
            ),
            (
                "spine_schedule_errors_total",
                "Ticks whose rules could not make their jobs.",
                |c| c.errors,
            ),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for t in &self.schedules {
                let _ = writeln!(
                    out,
                    "{name}{{schedule=\"{}\"}} {}",
                    t.schedule.name(),
                    get(&t.counts)
                );
            }
        }
        let _ = writeln!(out, "# HELP spine_schedule_next_tick_seconds When the schedule fires next (UNIX time).\n# TYPE spine_schedule_next_tick_seconds gauge");
        for t in &self.schedules {
            if let Some(n) = t.next_ms.filter(|_| self.leads) {
                let _ = writeln!(
                    out,
                    "spine_schedule_next_tick_seconds{{schedule=\"{}\"}} {:.3}",
                    t.schedule.name(),
                    n as f64 / 1000.0
                );
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn counts_reset_for_test(&mut self) {
        for t in &mut self.schedules {
            t.counts = ScheduleCounts::default();
        }
    }

    /// Every schedule with where it stands, for `GET /v1/rules`.
    pub(crate) fn schedules_view(&self) -> Vec<Ticking> {
        self.schedules.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::tests::{jobs_sent, World};
    use super::super::Restored;
    use super::*;
    use crate::config::DispatcherConfig;

    fn config(catch_up: &str, overlap: bool) -> DispatcherConfig {
        DispatcherConfig::from_toml(&format!(
            r#"
            [[schedule]]
            name = "every-second"
            cron = "* * * * * *"
            catch_up = "{catch_up}"
            prohibit_overlap = {overlap}

            [[rule]]
            name = "tick"
            on = {{ type = "spine.schedule", subject = "every-second" }}
            do = {{ capability = "c.work", args = {{ tick = "{{{{data.tick}}}}" }} }}
            "#
        ))
        .unwrap()
    }

    /// Runs the world until `until_ms`, in uneven steps (some longer than a tick), the agent
    /// finishing every job it gets at once; returns the ticks of the jobs it ran.
    fn run(w: &mut World, until_ms: u64, seed: &mut u64) -> Vec<u64> {
        let a = super::super::tests::agent(1);
        let mut ticks = Vec::new();
        while w.now.ms < until_ms {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let step = 100 + (*seed >> 33) % 1800;
            w.advance(step.min(until_ms - w.now.ms));
            // The agent's heartbeat, so that it stays in the registry.
            w.report(&a, w.now.ms);
            w.tick();
            for sent in jobs_sent(&w.ready().stanzas) {
                let tick = sent.job.args.0["tick"].as_str().unwrap().to_owned();
                let t = chrono::DateTime::parse_from_rfc3339(&tick).unwrap();
                ticks.push(t.timestamp_millis() as u64);
                w.succeed(&sent, &a);
            }
        }
        ticks
    }

    #[test]
    fn a_schedule_every_second_fires_every_tick_of_ten_virtual_minutes_once() {
        let mut w = World::with(config("skip", false), Restored::default());
        w.agent(1, 8);
        w.ready();
        let t0 = w.now.ms;
        let ticks = run(&mut w, t0 + 600_000, &mut 7);
        let want: Vec<u64> = (1..=600).map(|k| t0 + k * 1000).collect();
        assert_eq!(ticks, want, "every tick once, in order");
        let t = &w.core.schedules[0];
        assert_eq!((t.counts.ticks, t.counts.missed), (600, 0));
        assert_eq!(t.next_ms, Some(t0 + 601_000));
    }

    /// Ten seconds, then five seconds with no dispatcher, then a new core on what the first
    /// stored: the missed ticks follow `catch_up`.
    fn downtime(catch_up: &str) -> (Vec<u64>, Vec<u64>, ScheduleCounts, u64) {
        let mut w = World::with(config(catch_up, false), Restored::default());
        w.agent(1, 8);
        w.ready();
        let t0 = w.now.ms;
        let before = run(&mut w, t0 + 10_400, &mut 3);
        let jobs: Vec<_> = w.core.jobs.iter().cloned().collect();
        let mut w2 = World::with(
            config(catch_up, false),
            Restored {
                jobs,
                ..Restored::default()
            },
        );
        w2.now = w.now.after(std::time::Duration::from_millis(5_000));
        w2.core.counts_reset_for_test();
        w2.core.start_schedules(w2.now);
        w2.agent(1, 8);
        w2.ready();
        let after = run(&mut w2, t0 + 20_000, &mut 5);
        (before, after, w2.core.schedules[0].counts, t0)
    }

    #[test]
    fn ticks_missed_while_no_dispatcher_led_are_skipped_or_run_once() {
        let (before, after, counts, t0) = downtime("skip");
        assert_eq!(before, (1..=10).map(|k| t0 + k * 1000).collect::<Vec<_>>());
        // Down from 10.4 s to 15.4 s: the ticks 11 to 15 are missed, 16 comes.
        assert_eq!(after, (16..=20).map(|k| t0 + k * 1000).collect::<Vec<_>>());
        assert_eq!((counts.missed, counts.ticks), (5, 5));
        let (_, after, counts, t0) = downtime("once");
        // The latest missed tick (15) runs at start, once; 11 to 14 are missed.
        assert_eq!(after, (15..=20).map(|k| t0 + k * 1000).collect::<Vec<_>>());
        assert_eq!((counts.missed, counts.ticks), (4, 6));
    }

    #[test]
    fn prohibit_overlap_skips_ticks_while_the_last_ones_job_runs() {
        let mut w = World::with(config("skip", true), Restored::default());
        let a = w.agent(1, 8);
        w.ready();
        let mut held = Vec::new();
        for _ in 0..5 {
            w.advance(1000);
            w.report(&a, w.now.ms);
            w.tick();
            held.extend(jobs_sent(&w.ready().stanzas));
        }
        assert_eq!(held.len(), 1, "one job while it runs");
        w.succeed(&held[0], &a);
        w.ready();
        w.advance(1000);
        w.report(&a, w.now.ms);
        w.tick();
        assert_eq!(
            jobs_sent(&w.ready().stanzas).len(),
            1,
            "the next tick after it ended"
        );
        let c = w.core.schedules[0].counts;
        assert_eq!((c.ticks, c.overlapping), (2, 4));
        let ids: BTreeSet<_> = w.core.jobs.iter().map(|j| j.id.clone()).collect();
        assert_eq!(ids.len(), 2);
    }
}
