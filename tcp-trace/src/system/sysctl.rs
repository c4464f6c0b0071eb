//! TCP sysctls, read from /proc/sys: those that govern TIME_WAIT, and any one by name.

use std::fs;

/// Sysctls that govern TIME_WAIT, as read at report time.
#[derive(Debug, Clone)]
pub struct Sysctls {
    /// Name and value (`?` when unreadable), multi-valued ones joined by `-`.
    pub values: Vec<(&'static str, String)>,
    /// `ip_local_port_range`, when readable.
    pub port_range: Option<(u16, u16)>,
}

const NAMES: [&str; 4] = [
    "tcp_fin_timeout",
    "tcp_tw_reuse",
    "tcp_max_tw_buckets",
    "ip_local_port_range",
];

/// `net.ipv4.NAME` as the agent's network namespace has it, multi-valued
/// ones joined by `-`; `?` when unreadable.
pub fn read_ipv4(name: &str) -> String {
    fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join("-"))
        .unwrap_or_else(|_| "?".into())
}

pub fn read_timewait_sysctls() -> Sysctls {
    let values: Vec<(&'static str, String)> = NAMES.iter().map(|&n| (n, read_ipv4(n))).collect();
    let port_range = parse_port_range(&values[3].1);
    Sysctls { values, port_range }
}

/// `32768-60999` as the two ports.
fn parse_port_range(value: &str) -> Option<(u16, u16)> {
    let (low, high) = value.split_once('-')?;
    Some((low.parse().ok()?, high.parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_ranges_parse_or_do_not() {
        assert_eq!(super::parse_port_range("32768-60999"), Some((32768, 60999)));
        assert_eq!(super::parse_port_range("?"), None);
        assert_eq!(super::parse_port_range("1-99999"), None);
    }

    #[test]
    fn this_host_has_a_port_range() {
        let s = super::read_timewait_sysctls();
        assert_eq!(s.values.len(), 4);
        assert!(s.port_range.is_some(), "{s:?}");
    }
}
