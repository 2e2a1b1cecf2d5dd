//! Schedules (`[[schedule]]`, docs/events.md): cron expressions in a time zone whose ticks are
//! events (`spine.schedule`, the schedule's name as subject) for the rules. Pure: the core
//! asks [`Schedule::next_after`] when the next tick is and makes its event
//! ([`Schedule::event`]); each tick's `id` is its time, so a tick fired twice (a restart, a new
//! leader) makes each rule's job once.

use chrono::TimeZone as _;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::triggers::{Event, EventData};

/// The `type` of a schedule's events.
pub const SCHEDULE_TYPE: &str = "spine.schedule";

/// What a dispatcher does, when it starts leading, with the ticks no dispatcher fired while
/// none led (downtime, a failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Nothing: the next tick is the next one due.
    #[default]
    Skip,
    /// The latest missed tick, once, at once.
    Once,
}

/// `[[schedule]]` as written in the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Its name (the subject of its events): letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// When: a cron expression, five fields (minute hour day-of-month month day-of-week) or
    /// six (seconds first), or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
    pub cron: String,
    /// The time zone the expression is read in (an IANA name: `Europe/Berlin`).
    #[serde(default = "utc")]
    pub timezone: String,
    /// Skip a tick while a job an earlier tick made has not ended.
    #[serde(default)]
    pub prohibit_overlap: bool,
    /// Ticks missed while no dispatcher led: `skip` (the default) or `once`.
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn utc() -> String {
    "UTC".into()
}

/// A schedule, checked.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// As configured.
    pub config: ScheduleConfig,
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Schedule {
    /// Checks `c` (the `i`th schedule); errors name the key.
    pub fn new(i: usize, c: &ScheduleConfig) -> Result<Schedule, String> {
        let key = |k: &str| format!("schedule[{i}].{k}");
        crate::triggers::check_name(&key("name"), &c.name, true)?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(&c.cron)
            .map_err(|e| {
                format!(
                    "{}: '{}': {e} (five fields, minute first, or six, seconds first)",
                    key("cron"),
                    c.cron
                )
            })?;
        let tz: chrono_tz::Tz = c.timezone.parse().map_err(|_| {
            format!(
                "{}: '{}' is not a time zone (an IANA name, like UTC or Europe/Berlin)",
                key("timezone"),
                c.timezone
            )
        })?;
        let s = Schedule {
            config: c.clone(),
            cron,
            tz,
        };
        if s.next_after(0).is_none() {
            return Err(format!("{}: '{}' never fires", key("cron"), c.cron));
        }
        Ok(s)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The `source` of its events.
    pub fn source(&self) -> String {
        format!("/spine/schedules/{}", self.config.name)
    }

    /// `ms` in the schedule's time zone, to the second below (ticks fall on whole seconds).
    fn at(&self, ms: u64) -> Option<chrono::DateTime<chrono_tz::Tz>> {
        let ms = i64::try_from(ms - ms % 1000).ok()?;
        self.tz.timestamp_millis_opt(ms).single()
    }

    /// The first tick strictly after `ms` (ms since the UNIX epoch).
    pub fn next_after(&self, ms: u64) -> Option<u64> {
        let t = self.cron.find_next_occurrence(&self.at(ms)?, false).ok()?;
        u64::try_from(t.timestamp_millis()).ok()
    }

    /// The last tick at or before `ms`.
    pub fn latest_at_or_before(&self, ms: u64) -> Option<u64> {
        let t = self
            .cron
            .find_previous_occurrence(&self.at(ms)?, true)
            .ok()?;
        u64::try_from(t.timestamp_millis()).ok()
    }

    /// The event of the tick at `tick_ms`: its id the tick's time (RFC 3339, UTC).
    pub fn event(&self, tick_ms: u64) -> Event {
        let tick = crate::core::rfc3339_ms(tick_ms);
        Event {
            id: tick.clone(),
            source: self.source(),
            ty: SCHEDULE_TYPE.into(),
            subject: Some(self.config.name.clone()),
            time_ms: Some(tick_ms),
            mime: Some("application/json".into()),
            data: EventData::Json(json!({ "schedule": self.config.name, "tick": tick })),
            depth: 0,
        }
    }

    /// The tick an event of this schedule was (its id), if it is one.
    pub fn tick_of(&self, source: &str, id: &str) -> Option<u64> {
        if source != self.source() {
            return None;
        }
        let t = chrono::DateTime::parse_from_rfc3339(id).ok()?;
        u64::try_from(t.timestamp_millis()).ok()
    }
}

/// Checks every `[[schedule]]`; names must be unique.
pub fn schedules(configs: &[ScheduleConfig]) -> Result<Vec<Schedule>, String> {
    let mut out: Vec<Schedule> = Vec::with_capacity(configs.len());
    for (i, c) in configs.iter().enumerate() {
        let s = Schedule::new(i, c)?;
        if out.iter().any(|o| o.name() == s.name()) {
            return Err(format!("schedule[{i}].name: '{}' is used twice", c.name));
        }
        out.push(s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, tz: &str) -> Result<Schedule, String> {
        Schedule::new(
            0,
            &ScheduleConfig {
                name: "s".into(),
                cron: cron.into(),
                timezone: tz.into(),
                prohibit_overlap: false,
                catch_up: CatchUp::Skip,
            },
        )
    }

    fn ms(rfc3339: &str) -> u64 {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis() as u64
    }

    #[test]
    fn ticks_follow_the_expression_in_its_time_zone() {
        let every_second = schedule("* * * * * *", "UTC").unwrap();
        let t = ms("2026-11-26T10:00:00.500Z");
        assert_eq!(every_second.next_after(t), Some(ms("2026-11-26T10:00:01Z")));
        assert_eq!(
            every_second.next_after(ms("2026-11-26T10:00:01Z")),
            Some(ms("2026-11-26T10:00:02Z")),
            "strictly after"
        );
        assert_eq!(
            every_second.latest_at_or_before(t),
            Some(ms("2026-11-26T10:00:00Z"))
        );
        // 02:30 every day in Berlin: 01:30 UTC in winter, 00:30 UTC in summer.
        let nightly = schedule("30 2 * * *", "Europe/Berlin").unwrap();
        assert_eq!(
            nightly.next_after(ms("2026-11-26T10:00:00Z")),
            Some(ms("2026-11-27T01:30:00Z"))
        );
        assert_eq!(
            nightly.next_after(ms("2026-07-01T10:00:00Z")),
            Some(ms("2026-07-02T00:30:00Z"))
        );
        let ev = every_second.event(ms("2026-11-26T10:00:01Z"));
        assert_eq!(ev.id, "2026-11-26T10:00:01.000Z");
        assert_eq!(
            (ev.ty.as_str(), ev.subject.as_deref()),
            ("spine.schedule", Some("s"))
        );
        assert_eq!(
            every_second.tick_of(&ev.source, &ev.id),
            Some(ms("2026-11-26T10:00:01Z"))
        );
        assert_eq!(every_second.tick_of("/other", &ev.id), None);
    }

    #[test]
    fn bad_schedules_are_refused_naming_the_key() {
        assert!(schedule("61 * * * *", "UTC")
            .unwrap_err()
            .starts_with("schedule[0].cron: '61 * * * *'"));
        assert!(schedule("* * * * *", "Mars/Olympus")
            .unwrap_err()
            .starts_with("schedule[0].timezone: 'Mars/Olympus' is not a time zone"));
        let c = ScheduleConfig {
            name: "a".into(),
            cron: "@hourly".into(),
            timezone: utc(),
            prohibit_overlap: false,
            catch_up: CatchUp::Once,
        };
        assert_eq!(
            schedules(&[c.clone(), c]).unwrap_err(),
            "schedule[1].name: 'a' is used twice"
        );
    }
}
