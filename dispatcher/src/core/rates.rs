//! Submission rate limits: one token bucket per submitter (its `rate`, all capabilities
//! together) and per submitter and capability pattern (its `capability_rates`), as the
//! policy's [`SubmitLimits`] say. [`Core::accept`](super::Core::accept) asks
//! [`RateLimits::check`] before it stores a job and [`RateLimits::take`] once it has: a
//! refused submission (a bad field, a full queue) costs nothing, and a submission over a
//! limit is refused with when to come back.
//!
//! Buckets exist only for submitters that submitted lately: one that has refilled to its
//! burst is the same as none, and [`RateLimits::forget_full`] drops those.
//!
//! Several dispatchers sharing a store hold one budget between them (docs/dispatcher.md,
//! "Running several dispatchers"): each tells the others what it charged
//! ([`RateLimits::take_report`], a few times a second over PostgreSQL's `NOTIFY`) and charges
//! what they tell it to its own buckets too ([`RateLimits::charge`]). Every bucket then
//! drains at what all of them accept, so a submitter that spreads its jobs over them gets its
//! rate, not a multiple of it; the overshoot is bounded by what they accept between two
//! reports.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use spine_protocol::CapabilityName;

use crate::policy::{Rate, SubmitLimits};

/// Which budget a bucket is: a submitter's, or a submitter's for one capability pattern
/// (by its index in the submitter's `capability_rates`).
type Key = (String, Option<usize>);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    rate: Rate,
}

impl Bucket {
    /// The tokens at `now`, refilled since the last look (at the rate the bucket was
    /// charged with: a configuration is fixed for the dispatcher's life).
    fn level(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + dt * self.rate.per_sec).min(self.rate.burst)
    }
}

/// A refusal: the budget that ran out, and when it has a token again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct OverRate {
    /// `rate` or `capability_rates."pattern"`.
    pub limit: String,
    /// The rate, for the message.
    pub rate: Rate,
    /// Until a submission fits.
    pub wait: Duration,
}

impl OverRate {
    /// Whole seconds to wait (`Retry-After`), at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.wait.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Every submitter's buckets.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    buckets: HashMap<Key, Bucket>,
    /// Submissions charged here since the last [`RateLimits::take_report`], per budget.
    charged: HashMap<Key, u32>,
}

/// Submissions one dispatcher charged to one budget: what the others sharing its store
/// charge to theirs. `budget` is `None` for the submitter's `rate`, else the index of the
/// pattern in its `capability_rates` (dispatchers sharing a store share their configuration).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RateUse {
    pub submitter: String,
    pub budget: Option<usize>,
    pub n: u32,
}

/// The budgets a submission passed, to charge once it is accepted.
pub(crate) struct Passed(Vec<(Key, Rate)>);

impl RateLimits {
    /// Whether `submitter` may submit a job of `cap` now under `limits`.
    pub fn check(
        &self,
        submitter: &str,
        cap: &CapabilityName,
        limits: &SubmitLimits,
        now: Instant,
    ) -> Result<Passed, OverRate> {
        let mut passed = Vec::new();
        let own = limits
            .rate
            .map(|r| ((submitter.to_owned(), None), r, "rate".to_owned()));
        let per_cap = limits
            .capability_rates
            .iter()
            .enumerate()
            .filter(|(_, (pattern, _))| pattern.allows(cap))
            .map(|(i, (pattern, r))| {
                let name = format!("capability_rates.\"{pattern}\"");
                ((submitter.to_owned(), Some(i)), *r, name)
            });
        for (key, rate, name) in own.into_iter().chain(per_cap) {
            let level = self.buckets.get(&key).map_or(rate.burst, |b| b.level(now));
            if level < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - level) / rate.per_sec);
                return Err(OverRate {
                    limit: name,
                    rate,
                    wait,
                });
            }
            passed.push((key, rate));
        }
        Ok(Passed(passed))
    }

    /// Charges one submission to the budgets it passed.
    pub fn take(&mut self, passed: Passed, now: Instant) {
        for (key, rate) in passed.0 {
            *self.charged.entry(key.clone()).or_default() += 1;
            let level = self.buckets.get(&key).map_or(rate.burst, |b| b.level(now));
            self.buckets.insert(
                key,
                Bucket {
                    tokens: level - 1.0,
                    at: now,
                    rate,
                },
            );
        }
    }

    /// What was charged here since the last call (for the other dispatchers).
    pub fn take_report(&mut self) -> Vec<RateUse> {
        self.charged
            .drain()
            .map(|((submitter, budget), n)| RateUse {
                submitter,
                budget,
                n,
            })
            .collect()
    }

    /// Whether anything was charged since the last report.
    pub fn has_report(&self) -> bool {
        !self.charged.is_empty()
    }

    /// Charges `n` submissions another dispatcher accepted to the budget `key` (of `rate`):
    /// the bucket may go below zero, and refuses until it has refilled past one.
    pub fn charge(&mut self, key: Key, n: u32, rate: Rate, now: Instant) {
        let level = self.buckets.get(&key).map_or(rate.burst, |b| b.level(now));
        // At most a burst's worth of debt per report: a report cannot lock a submitter out
        // for longer than its bucket takes to fill.
        let tokens = (level - f64::from(n)).max(level.min(0.0) - rate.burst);
        self.buckets.insert(
            key,
            Bucket {
                tokens,
                at: now,
                rate,
            },
        );
    }

    /// Drops the buckets that have refilled (as good as none): a submitter that stopped
    /// submitting holds no memory. Called with housekeeping.
    pub fn forget_full(&mut self, now: Instant) {
        self.buckets.retain(|_, b| b.level(now) < b.rate.burst);
    }

    /// Buckets held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }
}

/// Rate budgets shared with the other dispatchers of a store (see the module's comment).
impl super::Core {
    /// Whether anything was charged to a rate budget since the last [`Self::take_rate_uses`].
    pub(crate) fn has_rate_uses(&self) -> bool {
        self.rates.has_report()
    }

    /// What this dispatcher charged to rate budgets since the last call, for the others.
    pub(crate) fn take_rate_uses(&mut self) -> Vec<RateUse> {
        self.rates.take_report()
    }

    /// Charges what another dispatcher accepted to this one's budgets too. A budget this
    /// dispatcher does not have (another configuration) is skipped.
    pub(crate) fn charge_rate_uses(&mut self, uses: Vec<RateUse>, now: super::Now) {
        for u in uses {
            let limits = self.policy.limits(&u.submitter);
            let rate = match u.budget {
                None => limits.rate,
                Some(i) => limits.capability_rates.get(i).map(|(_, r)| *r),
            };
            if let Some(rate) = rate {
                self.rates
                    .charge((u.submitter, u.budget), u.n, rate, now.mono);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Capabilities;

    fn limits(rate: &str, caps: &[(&str, &str)]) -> SubmitLimits {
        SubmitLimits {
            rate: Some(rate.parse().unwrap()),
            capability_rates: caps
                .iter()
                .map(|(p, r)| {
                    (
                        Capabilities::parse(&[(*p).to_owned()], "t").unwrap(),
                        r.parse().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
                .into(),
            ..SubmitLimits::default()
        }
    }

    fn cap(s: &str) -> CapabilityName {
        s.parse().unwrap()
    }

    fn submit(r: &mut RateLimits, who: &str, c: &str, l: &SubmitLimits, now: Instant) -> bool {
        match r.check(who, &cap(c), l, now) {
            Ok(p) => {
                r.take(p, now);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let l = limits("10/s", &[]);
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        let ok = (0..15)
            .filter(|_| submit(&mut r, "http:web", "a.b", &l, t0))
            .count();
        assert_eq!(ok, 10, "the burst is one second's worth");
        let e = r.check("http:web", &cap("a.b"), &l, t0).err().unwrap();
        assert_eq!(e.limit, "rate");
        assert!((e.wait.as_secs_f64() - 0.1).abs() < 1e-6, "{:?}", e.wait);
        assert_eq!(e.retry_after_secs(), 1);
        // Half a second later: five more fit, not six.
        let t1 = t0 + Duration::from_millis(500);
        let ok = (0..6)
            .filter(|_| submit(&mut r, "http:web", "a.b", &l, t1))
            .count();
        assert_eq!(ok, 5);
        // Another submitter has its own bucket.
        assert!(submit(&mut r, "http:other", "a.b", &l, t1));
    }

    #[test]
    fn a_capability_budget_limits_only_its_capabilities_and_refusals_cost_nothing() {
        let l = limits("100/s", &[("image.*", "2/min")]);
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        assert!(submit(&mut r, "u@x", "image.thumbnail", &l, t0));
        let e = r.check("u@x", &cap("image.resize"), &l, t0).err().unwrap();
        assert_eq!(e.limit, "capability_rates.\"image.*\"");
        assert_eq!(e.retry_after_secs(), 30);
        // Other capabilities still pass, and the refusal took nothing from `rate`.
        let ok = (0..200)
            .filter(|_| submit(&mut r, "u@x", "text.upper", &l, t0))
            .count();
        assert_eq!(ok, 99, "100 at once, one spent on the thumbnail");
        assert!(submit(
            &mut r,
            "u@x",
            "image.resize",
            &l,
            t0 + Duration::from_secs(31)
        ));
    }

    /// Two dispatchers, a submitter sending a job every 10 ms to each in turn for 2 s, its
    /// `rate` 10/s (burst 10): how many each accepts, with reports exchanged every
    /// `every` (never: `None`).
    fn spread(every: Option<Duration>, only_a: bool) -> (usize, usize) {
        let l = limits("10/s", &[]);
        let (mut a, mut b) = (RateLimits::default(), RateLimits::default());
        let t0 = Instant::now();
        let (mut na, mut nb) = (0, 0);
        let mut last = t0;
        for i in 0..200u64 {
            let now = t0 + Duration::from_millis(10 * i);
            if every.is_some_and(|e| now - last >= e) {
                last = now;
                for u in a.take_report() {
                    b.charge((u.submitter, u.budget), u.n, l.rate.unwrap(), now);
                }
                for u in b.take_report() {
                    a.charge((u.submitter, u.budget), u.n, l.rate.unwrap(), now);
                }
            }
            if i % 2 == 0 || only_a {
                na += usize::from(submit(&mut a, "http:web", "a.b", &l, now));
            } else {
                nb += usize::from(submit(&mut b, "http:web", "a.b", &l, now));
            }
        }
        (na, nb)
    }

    #[test]
    fn dispatchers_that_report_to_each_other_hold_one_budget() {
        // Alone, each holds its own: twice the rate between them.
        let (a, b) = spread(None, false);
        assert!(a + b >= 55, "{a} + {b}");
        // Reporting every 250 ms: the burst and 2 s of the rate, and what one report's lag
        // lets through (at most a few).
        let (a, b) = spread(Some(Duration::from_millis(250)), false);
        assert!((28..=34).contains(&(a + b)), "{a} + {b}");
        assert!(a > 0 && b > 0);
        // A submitter that keeps to one dispatcher still gets its whole rate there.
        let (a, b) = spread(Some(Duration::from_millis(250)), true);
        assert_eq!(b, 0);
        assert!((29..=31).contains(&a), "{a}");
    }

    #[test]
    fn a_report_is_what_was_charged_since_the_last_and_cannot_sink_a_bucket_past_a_burst() {
        let l = limits("10/s", &[("image.*", "1/s")]);
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        assert!(!r.has_report());
        assert!(submit(&mut r, "u@x", "image.resize", &l, t0));
        assert!(submit(&mut r, "u@x", "text.upper", &l, t0));
        let mut report = r.take_report();
        report.sort_by_key(|u| u.budget);
        assert_eq!(
            report,
            vec![
                RateUse {
                    submitter: "u@x".into(),
                    budget: None,
                    n: 2
                },
                RateUse {
                    submitter: "u@x".into(),
                    budget: Some(0),
                    n: 1
                },
            ]
        );
        assert!(r.take_report().is_empty(), "taken");
        // Charged from elsewhere: not reported again; a huge count costs one burst of debt.
        let mut other = RateLimits::default();
        other.charge(("u@x".into(), None), 1_000_000, l.rate.unwrap(), t0);
        assert!(!other.has_report());
        let e = other
            .check("u@x", &cap("text.upper"), &l, t0)
            .err()
            .unwrap();
        assert!((e.wait.as_secs_f64() - 1.1).abs() < 1e-6, "{:?}", e.wait);
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let l = limits("1/s", &[]);
        let mut r = RateLimits::default();
        let t0 = Instant::now();
        assert!(submit(&mut r, "a@x", "c.d", &l, t0));
        assert_eq!(r.len(), 1);
        r.forget_full(t0 + Duration::from_millis(500));
        assert_eq!(r.len(), 1, "half refilled");
        r.forget_full(t0 + Duration::from_secs(2));
        assert_eq!(r.len(), 0);
        assert!(submit(
            &mut r,
            "a@x",
            "c.d",
            &l,
            t0 + Duration::from_secs(2)
        ));
    }

    #[test]
    fn rates_parse_with_their_units_and_bursts() {
        let r: Rate = "600/min".parse().unwrap();
        assert_eq!((r.per_sec, r.burst), (10.0, 10.0));
        let r: Rate = "10/h".parse().unwrap();
        assert_eq!(r.burst, 1.0);
        let r: Rate = "5/s burst 50".parse().unwrap();
        assert_eq!((r.per_sec, r.burst), (5.0, 50.0));
        for bad in [
            "5",
            "5/day",
            "0/s",
            "-1/s",
            "x/s",
            "5/s burst 0",
            "5/s burst x",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}
