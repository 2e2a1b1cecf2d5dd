//! The wall clock, read in one place: the driver and the HTTP front end take the
//! time from here and pass it to the pure state machines (registry, jobs) as a parameter.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it): the time unit of job
/// records, deadlines and the store.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
