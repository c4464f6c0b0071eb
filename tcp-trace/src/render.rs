//! Turning transitions into text: aligned columns for people, JSON lines for programs.

use std::{
    fmt::Write as _,
    io::{self, Write},
    net::IpAddr,
};

use crate::{event::Transition, record};

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

/// Converts the kernel's monotonic timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Realtime minus monotonic, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let offset_ns = clock_ns(libc::CLOCK_REALTIME) as i128 - monotonic_ns() as i128;
        Self { offset_ns }
    }

    #[cfg(test)]
    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Local wall-clock time of a monotonic timestamp, as `HH:MM:SS.mmm`.
    pub fn local_time(&self, mono_ns: u64) -> String {
        let real_ns = (mono_ns as i128 + self.offset_ns).max(0);
        let secs = (real_ns / 1_000_000_000) as libc::time_t;
        let millis = (real_ns / 1_000_000 % 1000) as u32;
        // SAFETY: localtime_r writes into the zeroed tm we own.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
        if !ok {
            return format!("{secs}.{millis:03}");
        }
        format!(
            "{:02}:{:02}:{:02}.{millis:03}",
            tm.tm_hour, tm.tm_min, tm.tm_sec
        )
    }
}

/// Now on the clock the kernel stamps events with (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How transitions are written out.
pub enum Format {
    Json,
    Text(TextColumns),
}

impl Format {
    pub fn new(json: bool, clock: Clock) -> Self {
        if json {
            Format::Json
        } else {
            Format::Text(TextColumns::new(clock))
        }
    }

    pub fn header(&mut self, out: &mut impl Write) -> io::Result<()> {
        match self {
            Format::Json => Ok(()),
            Format::Text(t) => t.header(out),
        }
    }

    pub fn write(&mut self, out: &mut impl Write, t: &Transition) -> io::Result<()> {
        match self {
            Format::Json => record::write(out, t),
            Format::Text(cols) => cols.write(out, t),
        }
    }
}

/// Aligned columns. Endpoint columns start wide enough for IPv4 and widen
/// (for the rest of the run) when a longer IPv6 endpoint shows up.
pub struct TextColumns {
    clock: Clock,
    endpoint_width: usize,
}

impl TextColumns {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            endpoint_width: 21,
        }
    }

    fn header(&self, out: &mut impl Write) -> io::Result<()> {
        let w = self.endpoint_width;
        writeln!(
            out,
            "{:<12} {:>7} {:<16} {:<w$} {:<w$} {:<11}    {:<11} {:>8}",
            "TIME", "PID", "COMM", "LOCAL", "REMOTE", "OLDSTATE", "NEWSTATE", "DURATION"
        )
    }

    fn write(&mut self, out: &mut impl Write, t: &Transition) -> io::Result<()> {
        let local = endpoint(t.laddr, t.lport);
        let remote = endpoint(t.raddr, t.rport);
        self.endpoint_width = self.endpoint_width.max(local.len()).max(remote.len());
        let w = self.endpoint_width;
        let (pid, comm) = match &t.owner {
            Some(o) => (o.pid.to_string(), printable_comm(&o.comm)),
            None => ("-".to_string(), "-".to_string()),
        };
        let duration = t
            .duration_ns
            .map_or_else(|| "-".to_string(), human_duration);
        writeln!(
            out,
            "{:<12} {pid:>7} {comm:<16} {local:<w$} {remote:<w$} {:<11} -> {:<11} {duration:>8}",
            self.clock.local_time(t.ts_ns),
            t.old_state.name(),
            t.new_state.name(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_event, tests::sample_event};

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

    #[test]
    fn text_columns_line_up() {
        let clock = Clock::with_offset(0);
        let mut cols = TextColumns::new(clock);
        let mut out = Vec::new();
        cols.header(&mut out).unwrap();
        let t = from_event(&sample_event()).unwrap();
        cols.write(&mut out, &t).unwrap();
        let mut unknown = sample_event();
        unknown.flags = 0;
        cols.write(&mut out, &from_event(&unknown).unwrap())
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str, what: &str| l.find(what).unwrap();
        assert_eq!(col(lines[0], "OLDSTATE"), col(lines[1], "SYN_SENT"));
        assert_eq!(col(lines[1], "SYN_SENT"), col(lines[2], "SYN_SENT"));
        assert!(lines[1].contains(" 4242 curl "), "{}", lines[1]);
        assert!(lines[1].contains("127.0.0.1:45678") && lines[1].ends_with("317us"));
        assert!(
            lines[2].contains("      - -  ") && lines[2].ends_with(" -"),
            "{}",
            lines[2]
        );
    }
}
