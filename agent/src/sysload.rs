//! The machine's load average and memory, for load reports.
//!
//! Read from /proc by hand (two small files) rather than with a system-information crate that
//! would scan every process; elsewhere than Linux the figures are simply absent.

/// 1-minute load average.
pub fn loadavg() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// (used, total) memory in bytes; used = total − available.
pub fn memory() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    let total = field("MemTotal:")?;
    let available = field("MemAvailable:")?;
    Some((total.saturating_sub(available), total))
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn reads_proc() {
        assert!(super::loadavg().is_some_and(|l| l >= 0.0));
        let (used, total) = super::memory().expect("meminfo");
        assert!(total > 0 && used <= total);
    }
}
