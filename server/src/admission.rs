//! Who may try to log in, and how often: limits on unauthenticated connections (per address
//! and in total, so that a flood of idle sockets cannot take the slots of real clients) and
//! backoff after failed logins (per address: refused for a while; per account: answers slowed
//! down, so that guessing one password from many addresses is slow without locking the real
//! owner out).
//!
//! Time is a parameter of the pure parts ([`Failures`]), so they are tested without waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failed logins are forgotten this long after the last one.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);
/// First refusal period of an address once it reached the threshold; doubles per failure.
const ADDRESS_BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest refusal period of an address.
pub(crate) const ADDRESS_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Failed logins of one account (from anywhere) before its answers are slowed down.
const ACCOUNT_THRESHOLD: u32 = 10;
/// First delay of an account's answers past the threshold; doubles per failure.
const ACCOUNT_DELAY_START: Duration = Duration::from_millis(250);
/// Longest delay of an account's answers.
const ACCOUNT_DELAY_MAX: Duration = Duration::from_secs(5);
/// Entries kept at most per table; past it, entries not in backoff are dropped first.
const MAX_ENTRIES: usize = 100_000;

/// Counters for operators and tests.
#[derive(Debug, Default)]
pub struct AdmissionStats {
    /// Failed logins.
    pub auth_failures: AtomicU64,
    /// Logins refused because their address was in backoff.
    pub auth_throttled: AtomicU64,
    /// Logins whose answer was delayed because their account was being guessed.
    pub auth_delayed: AtomicU64,
    /// Connections refused because their address had too many unauthenticated ones open.
    pub refused_per_address: AtomicU64,
    /// Connections refused because too many unauthenticated ones were open in all.
    pub refused_unauthenticated: AtomicU64,
}

impl AdmissionStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// Failed logins per key (an address or an account), with their consequences.
#[derive(Debug)]
pub(crate) struct Failures<K> {
    entries: HashMap<K, Entry>,
}

impl<K> Default for Failures<K> {
    fn default() -> Self {
        Failures {
            entries: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Failures<K> {
    fn live(&mut self, key: &K, now: Instant) -> Option<&mut Entry> {
        let stale = self
            .entries
            .get(key)
            .is_some_and(|e| now.duration_since(e.last) > FAILURE_MEMORY);
        if stale {
            self.entries.remove(key);
        }
        self.entries.get_mut(key)
    }

    /// Counts a failure; returns the number of failures remembered for `key`.
    pub(crate) fn fail(&mut self, key: &K, now: Instant) -> u32 {
        if self.entries.len() >= MAX_ENTRIES {
            self.entries
                .retain(|_, e| e.blocked_until.is_some_and(|t| t > now));
        }
        match self.live(key, now) {
            Some(e) => {
                e.failures = e.failures.saturating_add(1);
                e.last = now;
                e.failures
            }
            None => {
                self.entries.insert(
                    key.clone(),
                    Entry {
                        failures: 1,
                        last: now,
                        blocked_until: None,
                    },
                );
                1
            }
        }
    }

    /// Blocks `key` until `until`.
    fn block(&mut self, key: &K, until: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.blocked_until = Some(until);
        }
    }

    /// How much longer `key` is blocked, if it is.
    pub(crate) fn blocked(&mut self, key: &K, now: Instant) -> Option<Duration> {
        self.live(key, now)
            .and_then(|e| e.blocked_until)
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Failures remembered for `key`.
    pub(crate) fn count(&mut self, key: &K, now: Instant) -> u32 {
        self.live(key, now).map_or(0, |e| e.failures)
    }

    /// A successful login: forget `key`'s failures.
    pub(crate) fn forget(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

/// Refusal period of an address after its `n`-th failure, given the threshold.
pub(crate) fn address_backoff(n: u32, threshold: u32) -> Option<Duration> {
    let over = n.checked_sub(threshold)?;
    Some(
        ADDRESS_BACKOFF_START
            .saturating_mul(1u32 << over.min(16))
            .min(ADDRESS_BACKOFF_MAX),
    )
}

/// Delay of an account's answers after `n` failures.
pub(crate) fn account_delay(n: u32) -> Option<Duration> {
    let over = n.checked_sub(ACCOUNT_THRESHOLD)?;
    Some(
        ACCOUNT_DELAY_START
            .saturating_mul(1u32 << over.min(16))
            .min(ACCOUNT_DELAY_MAX),
    )
}

/// What a login attempt may do before its credentials are checked.
pub(crate) enum Verdict {
    /// Go ahead (after waiting this long, if the account is being guessed).
    Proceed(Option<Duration>),
    /// Refuse without checking: the address is in backoff for this much longer.
    Refuse(Duration),
}

/// The server's admission state, shared by every connection.
pub(crate) struct Admission {
    per_address: usize,
    total: usize,
    pending: Mutex<HashMap<IpAddr, usize>>,
    pending_total: std::sync::atomic::AtomicUsize,
    threshold: u32,
    addresses: Mutex<Failures<IpAddr>>,
    accounts: Mutex<Failures<String>>,
    pub(crate) stats: Arc<AdmissionStats>,
}

/// An unauthenticated connection's place; given back when dropped (or on authentication).
pub(crate) struct Pending {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut map = self
            .admission
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.admission.pending_total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lets a repeated log line through at most once per period, counting what it held back.
pub(crate) struct LogGate {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl LogGate {
    pub(crate) fn new(every: Duration) -> Self {
        LogGate {
            every,
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if the line may be logged now (`n` lines were held back since the last);
    /// `None` if it is held back.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held.swap(0, Ordering::Relaxed))
    }

    /// " (and N more like it)" for a count of held-back lines, or nothing.
    pub(crate) fn and_more(n: u64) -> String {
        if n == 0 {
            String::new()
        } else {
            format!(" (and {n} more like it since the last report)")
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its address has this many unauthenticated connections open.
    PerAddress(usize),
    /// This many unauthenticated connections are open in all.
    Total(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::PerAddress(n) => write!(
                f,
                "{n} unauthenticated connections from this address already open \
                 (max_unauthenticated_per_address)"
            ),
            Refusal::Total(n) => write!(
                f,
                "{n} unauthenticated connections already open (max_unauthenticated)"
            ),
        }
    }
}

impl Admission {
    pub(crate) fn new(per_address: usize, total: usize, threshold: u32) -> Self {
        Admission {
            per_address,
            total,
            pending: Mutex::new(HashMap::new()),
            pending_total: std::sync::atomic::AtomicUsize::new(0),
            threshold,
            addresses: Mutex::new(Failures::default()),
            accounts: Mutex::new(Failures::default()),
            stats: Arc::new(AdmissionStats::default()),
        }
    }

    /// A new connection from `ip`, unauthenticated until its [`Pending`] is dropped.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pending, Refusal> {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let total = self.pending_total.load(Ordering::Relaxed);
        if total >= self.total {
            AdmissionStats::bump(&self.stats.refused_unauthenticated);
            return Err(Refusal::Total(total));
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_address {
            AdmissionStats::bump(&self.stats.refused_per_address);
            return Err(Refusal::PerAddress(*n));
        }
        *n += 1;
        self.pending_total.fetch_add(1, Ordering::Relaxed);
        Ok(Pending {
            admission: self.clone(),
            ip,
        })
    }

    /// Before checking a login of `user` from `ip`.
    pub(crate) fn before_login(&self, ip: IpAddr, user: &str) -> Verdict {
        let now = Instant::now();
        let blocked = self
            .addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .blocked(&ip, now);
        if let Some(left) = blocked {
            AdmissionStats::bump(&self.stats.auth_throttled);
            return Verdict::Refuse(left);
        }
        let n = self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count(&user.to_owned(), now);
        let delay = account_delay(n);
        if delay.is_some() {
            AdmissionStats::bump(&self.stats.auth_delayed);
        }
        Verdict::Proceed(delay)
    }

    /// A failed login of `user` from `ip`. Returns the address's failure count and, if the
    /// address is now in backoff, for how long.
    pub(crate) fn failed(&self, ip: IpAddr, user: &str) -> (u32, Option<Duration>) {
        let now = Instant::now();
        AdmissionStats::bump(&self.stats.auth_failures);
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail(&user.to_owned(), now);
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let n = addresses.fail(&ip, now);
        let backoff = address_backoff(n, self.threshold);
        if let Some(d) = backoff {
            addresses.block(&ip, now + d);
        }
        (n, backoff)
    }

    /// A successful login: the address and the account start afresh.
    pub(crate) fn succeeded(&self, ip: IpAddr, user: &str) {
        self.addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&ip);
        self.accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&user.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_back_off_after_the_threshold_and_forget_in_time() {
        let mut f = Failures::default();
        let ip: IpAddr = [192, 0, 2, 1].into();
        let t0 = Instant::now();
        for i in 1..=5 {
            assert_eq!(f.fail(&ip, t0), i);
            assert_eq!(
                address_backoff(i, 5),
                (i == 5).then_some(Duration::from_secs(1))
            );
        }
        assert_eq!(address_backoff(6, 5), Some(Duration::from_secs(2)));
        assert_eq!(address_backoff(40, 5), Some(ADDRESS_BACKOFF_MAX));
        f.block(&ip, t0 + Duration::from_secs(1));
        assert_eq!(f.blocked(&ip, t0), Some(Duration::from_secs(1)));
        assert_eq!(f.blocked(&ip, t0 + Duration::from_secs(1)), None);
        // Forgotten after FAILURE_MEMORY of quiet.
        let later = t0 + FAILURE_MEMORY + Duration::from_secs(1);
        assert_eq!(f.count(&ip, later), 0);
        assert_eq!(f.fail(&ip, later), 1);
        f.forget(&ip);
        assert_eq!(f.count(&ip, later), 0);
    }

    #[test]
    fn accounts_are_slowed_not_locked() {
        assert_eq!(account_delay(ACCOUNT_THRESHOLD - 1), None);
        assert_eq!(account_delay(ACCOUNT_THRESHOLD), Some(ACCOUNT_DELAY_START));
        assert_eq!(
            account_delay(ACCOUNT_THRESHOLD + 1),
            Some(ACCOUNT_DELAY_START * 2)
        );
        assert_eq!(account_delay(u32::MAX), Some(ACCOUNT_DELAY_MAX));
        let a = Admission::new(4, 100, 3);
        let ip: IpAddr = [192, 0, 2, 7].into();
        for _ in 0..ACCOUNT_THRESHOLD {
            // Different addresses each time: only the account's count grows.
            let other: IpAddr = [198, 51, 100, rand::random::<u8>()].into();
            a.failed(other, "agent1");
        }
        assert!(matches!(
            a.before_login(ip, "agent1"),
            Verdict::Proceed(Some(_))
        ));
        assert!(matches!(
            a.before_login(ip, "agent2"),
            Verdict::Proceed(None)
        ));
        a.succeeded(ip, "agent1");
        assert!(matches!(
            a.before_login(ip, "agent1"),
            Verdict::Proceed(None)
        ));
    }

    #[test]
    fn unauthenticated_connections_are_bounded_per_address_and_in_total() {
        let a = Arc::new(Admission::new(2, 3, 5));
        let x: IpAddr = [192, 0, 2, 1].into();
        let y: IpAddr = [192, 0, 2, 2].into();
        let p1 = a.admit(x).unwrap();
        let _p2 = a.admit(x).unwrap();
        assert_eq!(a.admit(x).err(), Some(Refusal::PerAddress(2)));
        let _p3 = a.admit(y).unwrap();
        assert_eq!(a.admit(y).err(), Some(Refusal::Total(3)));
        drop(p1);
        let _p4 = a.admit(x).unwrap();
        assert_eq!(a.stats.refused_per_address.load(Ordering::Relaxed), 1);
        assert_eq!(a.stats.refused_unauthenticated.load(Ordering::Relaxed), 1);
    }
}
