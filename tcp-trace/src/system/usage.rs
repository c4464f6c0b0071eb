//! The agent's own CPU time and resident memory, from `/proc/self`.

use anyhow::{Context as _, Result};

/// What the agent has cost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// User and system CPU time.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

pub fn own_usage() -> Result<Usage> {
    let stat = std::fs::read("/proc/self/stat").context("reading /proc/self/stat")?;
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    // SAFETY: sysconf only reads a configuration value.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    parse(&stat, &statm, ticks.max(1) as f64, page.max(1) as u64)
        .context("unexpected /proc/self/stat or statm")
}

/// `utime` and `stime` (fields 14 and 15 of `stat`, after the comm, which
/// ends at the last `)`), and the resident pages (field 2 of `statm`).
fn parse(stat: &[u8], statm: &str, ticks_per_s: f64, page: u64) -> Option<Usage> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let mut fields = stat[close + 1..]
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty())
        .skip(11);
    let mut number = || -> Option<u64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
    let (utime, stime) = (number()?, number()?);
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Usage {
        cpu_seconds: (utime + stime) as f64 / ticks_per_s,
        resident_bytes: resident * page,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_and_resident_pages() {
        let stat = b"42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 99 1000 10";
        let usage = parse(stat, "2500 300 100 1 0 200 0\n", 100.0, 4096).unwrap();
        assert_eq!(usage.cpu_seconds, 3.0);
        assert_eq!(usage.resident_bytes, 300 * 4096);
        assert_eq!(parse(b"42 (x) S 1", "1 2", 100.0, 4096), None);
    }

    #[test]
    fn our_own_usage_is_plausible() {
        let usage = own_usage().unwrap();
        assert!(usage.resident_bytes > 1 << 20, "{usage:?}");
        assert!(usage.cpu_seconds >= 0.0);
    }
}
