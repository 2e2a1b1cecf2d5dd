//! The machine's load average and memory, for load reports.
//!
//! Read from /proc by hand (two small files) rather than with a system-information crate that
//! would scan every process; elsewhere than Linux the figures are simply absent.

/// A /proc file whole. /proc reports a size of 0, so `fs::read_to_string` starts with a
/// 32-byte buffer and doubles it: eight `read`s for `/proc/meminfo`. One buffer of a page
/// takes it in one (and one more to see its end).
fn proc_file(path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut s = String::with_capacity(4096);
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// 1-minute load average.
pub fn loadavg() -> Option<f64> {
    let s = proc_file("/proc/loadavg")?;
    s.split_whitespace().next()?.parse().ok()
}

/// (used, total) memory in bytes; used = total − available.
pub fn memory() -> Option<(u64, u64)> {
    let s = proc_file("/proc/meminfo")?;
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
