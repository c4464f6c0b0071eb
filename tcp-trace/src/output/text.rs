//! Text cells every command shares: durations, process names, endpoints,
//! owners and quantiles, written the same way everywhere.

use std::{fmt::Write as _, net::IpAddr};

use crate::{aggregate::Histogram, model::Owner};

/// Formats a duration in the largest unit that keeps it readable:
/// `850ns`, `317us`, `42.1ms`, `5.10s`, `2m05s`, `1h02m`.
pub fn human_duration(ns: u64) -> String {
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    match ns {
        n if n < US => format!("{n}ns"),
        n if n < 10 * US => format!("{:.1}us", n as f64 / US as f64),
        n if n < MS => format!("{}us", n / US),
        n if n < 10 * MS => format!("{:.2}ms", n as f64 / MS as f64),
        n if n < S => format!("{:.1}ms", n as f64 / MS as f64),
        n if n < 60 * S => format!("{:.2}s", n as f64 / S as f64),
        n if n < 3600 * S => format!("{}m{:02}s", n / (60 * S), n / S % 60),
        n => format!("{}h{:02}m", n / (3600 * S), n / (60 * S) % 60),
    }
}

/// A process name made safe for a terminal: invalid UTF-8 and control
/// characters (escape sequences included) are shown as `\xNN`.
pub fn printable_comm(comm: &[u8]) -> String {
    let mut out = String::with_capacity(comm.len());
    for chunk in comm.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\x{b:02x}");
                }
            } else if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// `addr:port`, with IPv6 addresses compressed and bracketed.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Which report this is: the last one, or one of the periodic ones.
pub fn report_kind(last: bool) -> &'static str {
    if last {
        "final"
    } else {
        "interval"
    }
}

/// The PID and COMM cells of an owner, `-` for each when unknown.
pub fn owner_cells(owner: Option<&Owner>) -> (String, String) {
    match owner {
        Some(o) => (o.pid.to_string(), printable_comm(&o.comm)),
        None => ("-".into(), "-".into()),
    }
}

/// The CONTAINER cell of an owner: the container id's first 12 digits, as
/// `docker ps` shows it, `-` outside any container.
pub fn container_cell(owner: Option<&Owner>) -> String {
    owner
        .and_then(|o| o.placement.as_ref()?.container.as_deref())
        .map_or_else(|| "-".into(), |id| id.chars().take(12).collect())
}

/// The CONTAINER column of text output: absent until the first owner in a
/// container, then shown (under a header printed again) right after COMM.
#[derive(Debug, Default)]
pub struct ContainerColumn {
    shown: bool,
}

impl ContainerColumn {
    /// Whether `owner` makes the column appear now: the caller prints its
    /// header again before the line.
    pub fn joins(&mut self, owner: Option<&Owner>) -> bool {
        let contained =
            owner.is_some_and(|o| o.placement.as_ref().is_some_and(|p| p.container.is_some()));
        let joins = contained && !self.shown;
        self.shown |= contained;
        joins
    }

    /// The COMM cell, followed by the CONTAINER cell once the column shows.
    pub fn comm_cells(&self, comm: String, owner: Option<&Owner>) -> String {
        if self.shown {
            format!("{comm:<16} {:<12}", container_cell(owner))
        } else {
            comm
        }
    }

    /// `header` (whose COMM column is 16 wide) with CONTAINER after COMM
    /// once the column shows.
    pub fn header(&self, header: &str) -> String {
        match header.find("COMM") {
            Some(at) if self.shown => {
                let after = (at + 17).min(header.len());
                format!("{}CONTAINER    {}", &header[..after], &header[after..])
            }
            _ => header.to_string(),
        }
    }
}

/// The `q`-quantile as a duration cell, `-` when there are no values.
pub fn quantile_cell(h: &Histogram, q: f64) -> String {
    h.quantile(q).map_or_else(|| "-".into(), human_duration)
}

/// The maximum as a duration cell, `-` when there are no values.
pub fn max_cell(h: &Histogram) -> String {
    if h.count() > 0 {
        human_duration(h.max())
    } else {
        "-".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_container_column_joins_after_comm() {
        let mut column = ContainerColumn::default();
        let header = format!("{:<12} {:>7} {:<16} {:<21}", "TIME", "PID", "COMM", "LOCAL");
        assert_eq!(column.header(&header), header, "not shown yet");
        let mut owner = Owner::process(7, b"nginx", crate::model::OwnerSource::Task);
        assert!(!column.joins(Some(&owner)) && !column.joins(None));
        owner.placement = Some(std::sync::Arc::new(crate::model::Placement {
            cgroup: "/docker/x".into(),
            container: Some("ab".repeat(32)),
            ..Default::default()
        }));
        assert!(column.joins(Some(&owner)), "the first container");
        assert!(!column.joins(Some(&owner)), "only once");
        let shown = column.header(&header);
        let cells = column.comm_cells("nginx".into(), Some(&owner));
        assert_eq!(
            shown.find("CONTAINER"),
            Some(header.find("COMM").unwrap() + 17)
        );
        assert_eq!(cells, format!("{:<16} {}", "nginx", "ab".repeat(6)));
        assert_eq!(
            column.comm_cells("-".into(), None),
            format!("{:<16} {:<12}", "-", "-")
        );
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        let cases = [
            (0, "0ns"),
            (850, "850ns"),
            (1_500, "1.5us"),
            (317_000, "317us"),
            (4_200_000, "4.20ms"),
            (42_100_000, "42.1ms"),
            (1_000_000_000, "1.00s"),
            (5_100_000_000, "5.10s"),
            (125_000_000_000, "2m05s"),
            (3_720_000_000_000, "1h02m"),
            (u64::MAX, "5124095h34m"),
        ];
        for (ns, want) in cases {
            assert_eq!(human_duration(ns), want, "{ns}");
        }
    }

    #[test]
    fn hostile_comm_cannot_drive_the_terminal() {
        assert_eq!(printable_comm(b"curl"), "curl");
        assert_eq!(printable_comm(b"\x1b[2Jevil"), "\\x1b[2Jevil");
        assert_eq!(printable_comm(b"a\nb\tc"), "a\\x0ab\\x09c");
        assert_eq!(printable_comm(b"\xff\xfeok"), "\\xff\\xfeok");
        assert_eq!(printable_comm("größe".as_bytes()), "größe");
        assert_eq!(printable_comm(b"back\\slash"), "back\\\\slash");
    }

    #[test]
    fn endpoints_compress_ipv6() {
        assert_eq!(endpoint("127.0.0.1".parse().unwrap(), 80), "127.0.0.1:80");
        assert_eq!(endpoint("::1".parse().unwrap(), 443), "[::1]:443");
        assert_eq!(
            endpoint(
                "2001:0db8:0000:0000:0000:0000:0000:0001".parse().unwrap(),
                22
            ),
            "[2001:db8::1]:22"
        );
        assert_eq!(
            endpoint("::ffff:10.0.0.1".parse().unwrap(), 1),
            "[::ffff:10.0.0.1]:1"
        );
    }
}
