//! Submission rate limits: one token bucket per submitter (its `rate`, all capabilities
//! together) and per submitter and capability pattern (its `capability_rates`), as the
//! policy's [`SubmitLimits`] say. [`Core::accept`](super::Core::accept) asks
//! [`RateLimits::check`] before it stores a job and [`RateLimits::take`] once it has: a
//! refused submission (a bad field, a full queue) costs nothing, and a submission over a
//! limit is refused with when to come back.
//!
//! Buckets exist only for submitters that submitted lately: one that has refilled to its
//! burst is the same as none, and [`RateLimits::forget_full`] drops those.

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
