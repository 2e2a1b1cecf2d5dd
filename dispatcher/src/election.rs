//! Leadership among dispatchers that share a PostgreSQL store: the pure part.
//!
//! One row of the store says who leads: a holder, an **epoch** and an expiry, in the
//! database's own clock. A standby takes the row when it has expired, and every taking adds one
//! to the epoch: the fencing token. The leader renews the row well before it expires. Every
//! commit of a leader checks, inside its transaction, that the row still holds its epoch (and
//! locks it against a taking meanwhile), so a leader paused past its lease that wakes up cannot
//! store anything any more.
//!
//! A leader also stops acting by its own clock: it counts its lease from the moment it *asked*
//! for it (the database's expiry is later than that), shortened by the clock drift it allows,
//! so it gives up before the database could let another take over — two leaders never both
//! believe they lead, even without the fence, as long as clocks drift less than that.
//!
//! [`Election`] is told the time and the store's answers and says what to ask the store next
//! and whether this process leads; the SQL and the waiting are elsewhere.

use std::time::{Duration, Instant};

/// This process's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Follows: keeps the registry warm, serves the APIs, places nothing.
    Standby,
    /// Places jobs; its writes carry `epoch`.
    Leader {
        /// The fencing token.
        epoch: u64,
    },
}

/// A question for the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Take the row if it has expired (or is free), adding one to its epoch.
    Take,
    /// Extend the row if it still holds this epoch and this holder.
    Renew {
        /// The epoch held.
        epoch: u64,
    },
    /// Free the row at once if it still holds this epoch (a clean shutdown).
    Release {
        /// The epoch held.
        epoch: u64,
    },
}

/// The store's answer to an [`Ask`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Taken, with this epoch.
    Took {
        /// The new epoch.
        epoch: u64,
    },
    /// Extended.
    Renewed,
    /// Another holds it and it has not expired.
    HeldByOther,
    /// The row holds another epoch: deposed.
    Lost,
    /// Released.
    Released,
    /// The store could not be asked (down, unreachable, timed out).
    Failed,
}

/// The times of an election.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// How long a taking or a renewal lasts, in the database's clock.
    pub lease: Duration,
    /// A leader renews this long after its last renewal was asked.
    pub renew: Duration,
    /// A standby asks to take the row this often.
    pub poll: Duration,
    /// The relative clock drift allowed between a dispatcher and the database (0.01: 1 %): a
    /// leader counts its lease as `lease × (1 − drift)` from when it asked.
    pub drift: f64,
}

impl Default for Timing {
    /// Failover within about 1.5 s of a leader's death: the lease runs out after at most
    /// 1.2 s, and a standby asks within 0.2 s of that.
    fn default() -> Self {
        Timing {
            lease: Duration::from_millis(1200),
            renew: Duration::from_millis(300),
            poll: Duration::from_millis(200),
            drift: 0.05,
        }
    }
}

impl Timing {
    /// Checks the times fit together; the error names the problem.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..0.5).contains(&self.drift) {
            return Err("the clock drift must be at least 0 and less than 0.5".into());
        }
        if self.poll.is_zero() || self.renew.is_zero() {
            return Err("the renewal and poll intervals must be more than 0".into());
        }
        // Two renewals must fit in the lease a leader counts, so one lost renewal does not
        // cost the leadership.
        if self.renew * 2 >= self.local_lease() {
            return Err(format!(
                "the renewal interval ({:?}) must be under half the lease as the leader counts it ({:?})",
                self.renew,
                self.local_lease()
            ));
        }
        Ok(())
    }

    fn local_lease(&self) -> Duration {
        self.lease.mul_f64(1.0 - self.drift)
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Election {
    timing: Timing,
    /// The epoch held, while it may be held.
    epoch: Option<u64>,
    /// Until when this process may act as leader, by its own clock.
    valid_until: Option<Instant>,
    /// The question on its way, and when it was asked.
    asked: Option<(Ask, Instant)>,
    /// When to ask next.
    next_ask: Instant,
    /// Leaving: the row is released, nothing is taken any more.
    leaving: bool,
    /// Times this process became leader.
    pub elections: u64,
}

impl Election {
    /// A standby that asks for the row at once.
    pub fn new(timing: Timing, now: Instant) -> Election {
        Election {
            timing,
            epoch: None,
            valid_until: None,
            asked: None,
            next_ask: now,
            leaving: false,
            elections: 0,
        }
    }

    /// Its part now: leader only while the lease it counts lasts.
    pub fn role(&self, now: Instant) -> Role {
        match (self.epoch, self.valid_until) {
            (Some(epoch), Some(t)) if now < t => Role::Leader { epoch },
            _ => Role::Standby,
        }
    }

    /// What to ask the store now, if anything (one question at a time).
    pub fn poll(&mut self, now: Instant) -> Option<Ask> {
        if self.asked.is_some() || now < self.next_ask {
            return None;
        }
        // A lease that ran out by this clock is gone: ask to take the row afresh.
        if self.role(now) == Role::Standby {
            self.epoch = None;
            self.valid_until = None;
        }
        let ask = match (self.leaving, self.epoch) {
            (true, _) => return None,
            (false, Some(epoch)) => Ask::Renew { epoch },
            (false, None) => Ask::Take,
        };
        self.asked = Some((ask, now));
        Some(ask)
    }

    /// Leaving (a clean shutdown): what to ask so that another takes over at once, if this
    /// process leads. Nothing is taken or renewed afterwards.
    pub fn step_down(&mut self, now: Instant) -> Option<Ask> {
        self.leaving = true;
        let epoch = self.epoch.take()?;
        self.valid_until = None;
        let ask = Ask::Release { epoch };
        self.asked = Some((ask, now));
        Some(ask)
    }

    /// The store answered the question asked last.
    pub fn answer(&mut self, answer: Answer, now: Instant) {
        let Some((ask, asked_at)) = self.asked.take() else {
            return;
        };
        let t = &self.timing;
        match (ask, answer) {
            (Ask::Take, Answer::Took { epoch }) if !self.leaving => {
                self.epoch = Some(epoch);
                self.valid_until = Some(asked_at + t.local_lease());
                self.next_ask = asked_at + t.renew;
                self.elections += 1;
            }
            (Ask::Renew { epoch }, Answer::Renewed) if self.epoch == Some(epoch) => {
                self.valid_until = Some(asked_at + t.local_lease());
                self.next_ask = asked_at + t.renew;
            }
            (Ask::Renew { .. }, Answer::Lost) => {
                self.epoch = None;
                self.valid_until = None;
                self.next_ask = now + t.poll;
            }
            // Could not ask: try again soon; a leader keeps its part until its lease runs out.
            (_, Answer::Failed) => {
                self.next_ask = now + t.poll.min(t.renew);
            }
            _ => self.next_ask = now + t.poll,
        }
    }

    /// When [`Election::poll`] next has something to ask, or the leadership runs out.
    pub fn next_wake(&self) -> Option<Instant> {
        if self.leaving {
            return None;
        }
        let ask = self.asked.is_none().then_some(self.next_ask);
        match (ask, self.valid_until) {
            (Some(a), Some(v)) => Some(a.min(v)),
            (a, v) => a.or(v),
        }
    }
}

#[cfg(test)]
mod tests;
