//! The kernel's own TCP counters, `/proc/net/netstat` and `/proc/net/snmp`
//! (what `nstat` and `netstat -s` read), for the agent's network namespace.

use std::{collections::BTreeMap, fs};

use anyhow::{bail, Context as _, Result};

/// Counters by `Group.Name` (`TcpExt.ListenOverflows`, `Tcp.OutRsts`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub BTreeMap<String, i64>);

/// The counters the doctor shows as context, with what each counts.
pub const CONTEXT: [(&str, &str); 12] = [
    (
        "TcpExt.ListenOverflows",
        "connections dropped: an accept queue was full",
    ),
    (
        "TcpExt.ListenDrops",
        "SYNs or final ACKs a listener dropped",
    ),
    ("TcpExt.TCPSynRetrans", "SYN and SYN-ACK retransmissions"),
    (
        "TcpExt.TCPTimeWaitOverflow",
        "TIME_WAIT sockets not created: tcp_max_tw_buckets reached",
    ),
    (
        "TcpExt.TCPAbortOnTimeout",
        "connections aborted after their retransmissions or keep-alive probes ran out",
    ),
    (
        "TcpExt.TCPAbortOnData",
        "resets sent on close with unread data, or data after close",
    ),
    (
        "TcpExt.TCPAbortOnClose",
        "resets sent on close with unread data",
    ),
    (
        "TcpExt.TCPAbortOnLinger",
        "resets sent on close with SO_LINGER 0",
    ),
    (
        "Tcp.AttemptFails",
        "connects that failed (refused, reset or timed out in the handshake)",
    ),
    ("Tcp.EstabResets", "established connections reset"),
    ("Tcp.OutRsts", "resets sent"),
    ("Tcp.RetransSegs", "segments retransmitted"),
];

/// Reads both files.
pub fn read() -> Result<Counters> {
    let mut all = BTreeMap::new();
    for path in ["/proc/net/netstat", "/proc/net/snmp"] {
        let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        all.extend(parse(&text).with_context(|| format!("parsing {path}"))?.0);
    }
    Ok(Counters(all))
}

/// Pairs of lines, `Group: Name Name...` then `Group: value value...`.
pub fn parse(text: &str) -> Result<Counters> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(names) = lines.next() {
        let Some(values) = lines.next() else {
            bail!("a header line without values: {names:?}");
        };
        let (Some((group, names)), Some((vgroup, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            bail!("lines without a `Group:` prefix: {names:?}");
        };
        if group != vgroup {
            bail!("names of {group} followed by values of {vgroup}");
        }
        let (names, values): (Vec<&str>, Vec<&str>) = (
            names.split_whitespace().collect(),
            values.split_whitespace().collect(),
        );
        if names.len() != values.len() {
            bail!("{group}: {} names, {} values", names.len(), values.len());
        }
        for (name, value) in names.into_iter().zip(values) {
            let value: i64 = value
                .parse()
                .with_context(|| format!("{group}.{name}: {value:?} is not a number"))?;
            out.insert(format!("{group}.{name}"), value);
        }
    }
    Ok(Counters(out))
}

impl Counters {
    /// How much each of `names` grew since `start`: (name, growth), only
    /// those present in both.
    pub fn growth<'a>(
        &self,
        start: &Counters,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(&'a str, i64)> {
        names
            .into_iter()
            .filter_map(|n| Some((n, self.0.get(n)? - start.0.get(n)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                          TcpExt: 0 7 9\n\
                          Tcp: RtoAlgorithm MaxConn OutRsts\n\
                          Tcp: 1 -1 12\n";

    #[test]
    fn pairs_of_lines_become_named_counters() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.0["TcpExt.ListenOverflows"], 7);
        assert_eq!(c.0["Tcp.MaxConn"], -1);
        assert_eq!(c.0.len(), 6);
    }

    #[test]
    fn growth_is_end_minus_start_of_known_counters() {
        let start = parse(SAMPLE).unwrap();
        let end = parse(&SAMPLE.replace("0 7 9", "0 10 9")).unwrap();
        assert_eq!(
            end.growth(
                &start,
                ["TcpExt.ListenOverflows", "TcpExt.ListenDrops", "Tcp.Absent"]
            ),
            vec![("TcpExt.ListenOverflows", 3), ("TcpExt.ListenDrops", 0)]
        );
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(parse("TcpExt: A B\n").is_err());
        assert!(parse("TcpExt: A B\nTcpExt: 1\n").is_err());
        assert!(parse("TcpExt: A\nIpExt: 1\n").is_err());
        assert!(parse("TcpExt: A\nTcpExt: x\n").is_err());
    }

    #[test]
    fn this_hosts_counters_hold_the_context() {
        let c = read().unwrap();
        for (name, _) in CONTEXT {
            assert!(c.0.contains_key(name), "{name} missing");
        }
    }
}
