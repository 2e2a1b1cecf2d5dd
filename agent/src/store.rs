//! Bounded bookkeeping the agent's connection task keeps: finished outcomes, to answer a
//! repeated job id without running it again.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use spine_protocol::{JobId, SpineError};
use tokio::time::Instant;

/// A finished job's outcome as the agent replies with it.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Result(spine_protocol::JobResult),
    Error(SpineError),
}

/// Outcomes of finished jobs, bounded in count and age.
pub(crate) struct OutcomeCache {
    max: usize,
    ttl: Duration,
    order: VecDeque<(JobId, Instant)>,
    map: HashMap<JobId, Outcome>,
}

impl OutcomeCache {
    pub(crate) fn new(max: usize, ttl: Duration) -> Self {
        OutcomeCache {
            max,
            ttl,
            order: VecDeque::new(),
            map: HashMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, id: JobId, outcome: Outcome, now: Instant) {
        if self.map.insert(id.clone(), outcome).is_none() {
            self.order.push_back((id, now));
        }
        self.expire(now);
        while self.order.len() > self.max {
            if let Some((old, _)) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub(crate) fn get(&mut self, id: &JobId, now: Instant) -> Option<&Outcome> {
        self.expire(now);
        self.map.get(id)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, t)) = self.order.front() {
            if now.duration_since(*t) <= self.ttl {
                break;
            }
            let id = id.clone();
            self.order.pop_front();
            self.map.remove(&id);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spine_protocol::Condition;

    fn id(s: &str) -> JobId {
        s.parse().unwrap()
    }

    #[test]
    fn cache_is_bounded_by_count_and_age() {
        let t0 = Instant::now();
        let mut c = OutcomeCache::new(2, Duration::from_secs(10));
        let e = || Outcome::Error(SpineError::new(Condition::Failed));
        c.insert(id("a"), e(), t0);
        c.insert(id("b"), e(), t0);
        c.insert(id("c"), e(), t0);
        assert_eq!(c.len(), 2);
        assert!(c.get(&id("a"), t0).is_none());
        assert!(c.get(&id("c"), t0).is_some());
        assert!(c.get(&id("c"), t0 + Duration::from_secs(11)).is_none());
    }
}
