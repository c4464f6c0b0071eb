//! `tcp-trace handshake`: connect latency on both sides of each connection.
//!
//! Client: `CLOSE -> SYN_SENT` (the SYN) to `SYN_SENT -> ESTABLISHED` or to
//! `CLOSE` (refused, timed out, aborted), with the SYN retransmissions.
//! Server: the kernel holds only a request socket until the final ACK, so the
//! child's `SYN_RECV -> ESTABLISHED` carries the figure the kernel program
//! computed: from the server's first SYN-ACK to the final ACK (the kernel's
//! own first RTT sample, or, after SYN-ACK retransmissions, the first SYN-ACK's
//! time kept by the request socket), with the SYN-ACK retransmissions.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, BufWriter, StdoutLock, Write},
    net::IpAddr,
    time::Duration,
};

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::{
    cli::{GroupBy, HandshakeConfig},
    event::{Owner, Transition},
    hist::Histogram,
    load::Settings,
    record::{errno_name, ECONNREFUSED, ETIMEDOUT},
    render::{endpoint, human_duration, monotonic_ns, printable_comm, Clock},
    stats::{bars, group_name},
    stream::{self, Consumer, Timing, Totals},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// One finished handshake.
#[derive(Clone, Debug, PartialEq)]
pub struct Handshake {
    pub ts_ns: u64,
    pub side: Side,
    pub owner: Option<Owner>,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    /// `None`: the kernel gave no way to time it.
    pub duration_ns: Option<u64>,
    pub retransmits: Option<u32>,
    pub outcome: String,
}

/// The handshake a transition ends, if it ends one.
pub fn handshake(t: &Transition) -> Option<Handshake> {
    let (side, duration_ns, outcome) = match (t.old_state.name(), t.new_state.name()) {
        ("SYN_SENT", "ESTABLISHED") => (Side::Client, t.duration_ns, "established".to_string()),
        ("SYN_SENT", "CLOSE") => {
            let outcome = match t.sock.map(|s| s.error) {
                Some(ECONNREFUSED) => "refused".to_string(),
                Some(ETIMEDOUT) => "timeout".to_string(),
                Some(0) => "aborted".to_string(),
                Some(e) => format!("failed:{}", errno_name(e)),
                None => "closed".to_string(),
            };
            (Side::Client, t.duration_ns, outcome)
        }
        ("SYN_RECV", "ESTABLISHED") => (Side::Server, t.handshake_ns, "established".to_string()),
        _ => return None,
    };
    Some(Handshake {
        ts_ns: t.ts_ns,
        side,
        owner: t.owner.clone(),
        laddr: t.laddr,
        lport: t.lport,
        raddr: t.raddr,
        rport: t.rport,
        duration_ns,
        retransmits: t.retransmits,
        outcome,
    })
}

/// Figures for one side (or one group of it).
#[derive(Default, Debug)]
struct Summary {
    durations: Histogram,
    untimed: u64,
    retransmits: u64,
    outcomes: HashMap<String, u64>,
}

impl Summary {
    fn add(&mut self, h: &Handshake) {
        match h.duration_ns {
            Some(d) => self.durations.record(d),
            None => self.untimed += 1,
        }
        self.retransmits += u64::from(h.retransmits.unwrap_or(0));
        *self.outcomes.entry(h.outcome.clone()).or_default() += 1;
    }

    fn merge(&mut self, other: &Summary) {
        self.durations.merge(&other.durations);
        self.untimed += other.untimed;
        self.retransmits += other.retransmits;
        for (k, v) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += v;
        }
    }

    fn count(&self) -> u64 {
        self.durations.count() + self.untimed
    }

    fn json(&self) -> Value {
        let outcomes: Map<String, Value> = self
            .outcomes
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "count": self.count(),
            "timed": self.durations.count(),
            "p50_ns": self.durations.quantile(0.5),
            "p90_ns": self.durations.quantile(0.9),
            "p99_ns": self.durations.quantile(0.99),
            "max_ns": (self.durations.count() > 0).then(|| self.durations.max()),
            "retransmits": self.retransmits,
            "outcomes": outcomes,
        })
    }
}

fn group_key(by: GroupBy, h: &Handshake) -> String {
    group_name(by, h.owner.as_ref(), h.lport, h.rport, h.raddr)
}

struct HandshakeCommand {
    json: bool,
    slow_ns: Option<u64>,
    by: Option<GroupBy>,
    top: usize,
    sides: HashMap<Side, Summary>,
    groups: HashMap<(Side, String), Summary>,
    other: HashMap<Side, Summary>,
    clock: Clock,
    out: BufWriter<StdoutLock<'static>>,
}

impl HandshakeCommand {
    fn line(&mut self, h: &Handshake) -> io::Result<()> {
        if self.json {
            let v = json!({
                "type": "handshake",
                "ts_ns": h.ts_ns,
                "side": h.side.name(),
                "pid": h.owner.as_ref().map(|o| o.pid),
                "comm": h.owner.as_ref().map(|o| String::from_utf8_lossy(&o.comm)),
                "family": if h.laddr.is_ipv4() { "ipv4" } else { "ipv6" },
                "laddr": h.laddr,
                "lport": h.lport,
                "raddr": h.raddr,
                "rport": h.rport,
                "duration_ns": h.duration_ns,
                "retransmits": h.retransmits,
                "outcome": h.outcome,
            });
            serde_json::to_writer(&mut self.out, &v)?;
            return writeln!(self.out);
        }
        let (pid, comm) = match &h.owner {
            Some(o) => (o.pid.to_string(), printable_comm(&o.comm)),
            None => ("-".into(), "-".into()),
        };
        writeln!(
            self.out,
            "{:<12} {pid:>7} {comm:<16} {:<6} {:<21} {:<21} {:>9} {:>7} {}",
            self.clock.local_time(h.ts_ns),
            h.side.name(),
            endpoint(h.laddr, h.lport),
            endpoint(h.raddr, h.rport),
            h.duration_ns.map_or("unmeasured".into(), human_duration),
            h.retransmits.map_or("-".into(), |r| r.to_string()),
            h.outcome,
        )
    }

    fn report(&mut self, now_ns: u64, last: bool) -> io::Result<()> {
        let ranked = self.ranked();
        if self.json {
            let sides: Map<String, Value> = self
                .sides
                .iter()
                .map(|(side, s)| (side.name().to_string(), s.json()))
                .collect();
            let mut v = json!({"type": "summary", "ts_ns": now_ns, "final": last, "sides": sides});
            if self.by.is_some() {
                v["groups"] = Value::Array(
                    ranked
                        .iter()
                        .map(|(side, key, s)| json!({"side": side.name(), "key": key, "figures": s.json()}))
                        .collect(),
                );
            }
            serde_json::to_writer(&mut self.out, &v)?;
            writeln!(self.out)?;
            return self.out.flush();
        }
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n{} {} handshake report",
            self.clock.local_time(now_ns),
            if last { "final" } else { "interval" }
        );
        let _ = writeln!(
            s,
            "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}  OUTCOMES",
            "SIDE", "COUNT", "P50", "P90", "P99", "MAX", "RETRANS"
        );
        let mut rows: Vec<(String, &Summary)> = [Side::Client, Side::Server]
            .iter()
            .filter_map(|side| Some((side.name().to_string(), self.sides.get(side)?)))
            .collect();
        for (side, key, summary) in &ranked {
            rows.push((format!("{} {key}", side.name()), summary));
        }
        for (name, summary) in &rows {
            let q = |q| {
                summary
                    .durations
                    .quantile(q)
                    .map_or("-".into(), human_duration)
            };
            let mut outcomes: Vec<_> = summary.outcomes.iter().collect();
            outcomes.sort();
            let outcomes: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}  {}",
                name,
                summary.count(),
                q(0.5),
                q(0.9),
                q(0.99),
                if summary.durations.count() > 0 {
                    human_duration(summary.durations.max())
                } else {
                    "-".into()
                },
                summary.retransmits,
                outcomes.join(" ")
            );
        }
        for side in [Side::Client, Side::Server] {
            if let Some(summary) = self.sides.get(&side) {
                let _ = writeln!(s, "\n{} handshakes", side.name());
                bars(&mut s, &summary.durations);
            }
        }
        self.out.write_all(s.as_bytes())?;
        self.out.flush()
    }

    fn ranked(&self) -> Vec<(Side, String, Summary)> {
        let mut groups: Vec<(&(Side, String), &Summary)> = self.groups.iter().collect();
        groups.sort_by(|a, b| b.1.count().cmp(&a.1.count()).then(a.0.cmp(b.0)));
        let mut out = Vec::new();
        let mut other: HashMap<Side, Summary> = HashMap::new();
        for (side, s) in &self.other {
            other.entry(*side).or_default().merge(s);
        }
        for (i, ((side, key), s)) in groups.into_iter().enumerate() {
            if i < self.top {
                let mut copy = Summary::default();
                copy.merge(s);
                out.push((*side, key.clone(), copy));
            } else {
                other.entry(*side).or_default().merge(s);
            }
        }
        for (side, s) in other {
            if s.count() > 0 {
                out.push((side, "other".into(), s));
            }
        }
        out
    }
}

impl Consumer for HandshakeCommand {
    fn start(&mut self) -> io::Result<()> {
        if !self.json {
            writeln!(
                self.out,
                "{:<12} {:>7} {:<16} {:<6} {:<21} {:<21} {:>9} {:>7} OUTCOME",
                "TIME", "PID", "COMM", "SIDE", "LOCAL", "REMOTE", "DURATION", "RETRANS"
            )?;
        }
        Ok(())
    }

    fn event(&mut self, t: &Transition) -> io::Result<()> {
        let Some(h) = handshake(t) else { return Ok(()) };
        self.sides.entry(h.side).or_default().add(&h);
        if let Some(by) = self.by {
            let key = (h.side, group_key(by, &h));
            let capacity = (self.top * 4).max(64);
            if let Some(g) = self.groups.get_mut(&key) {
                g.add(&h);
            } else if self.groups.len() < capacity {
                self.groups.entry(key).or_default().add(&h);
            } else {
                self.other.entry(h.side).or_default().add(&h);
            }
        }
        let slow_enough = match (self.slow_ns, h.duration_ns) {
            (None, _) => true,
            (Some(min), Some(d)) => d >= min,
            (Some(_), None) => false,
        };
        if slow_enough {
            self.line(&h)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn interval(&mut self, now_ns: u64) -> io::Result<()> {
        self.report(now_ns, false)
    }

    fn finish(&mut self, _totals: &Totals) -> io::Result<()> {
        self.report(monotonic_ns(), true)
    }
}

pub fn run(config: HandshakeConfig) -> Result<()> {
    let mut command = HandshakeCommand {
        json: config.json,
        slow_ns: config.slow.map(|d: Duration| d.as_nanos() as u64),
        by: config.by,
        top: config.top,
        sides: HashMap::new(),
        groups: HashMap::new(),
        other: HashMap::new(),
        clock: Clock::now(),
        out: BufWriter::new(io::stdout().lock()),
    };
    let settings = Settings::streaming(config.filter, config.max_sockets);
    let timing = Timing {
        duration: config.duration,
        interval: config.interval,
    };
    stream::block_on(stream::live(&settings, timing, &mut command))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_event, tests::sample_event, SockFields, TcpState};

    fn t(old: &str, new: &str, d: Option<u64>, err: Option<u16>) -> Transition {
        let mut t = from_event(&sample_event()).unwrap();
        t.old_state = TcpState::from_name(old).unwrap();
        t.new_state = TcpState::from_name(new).unwrap();
        t.duration_ns = d;
        t.retransmits = Some(1);
        t.sock = err.map(|error| SockFields {
            bytes_sent: 0,
            bytes_received: 0,
            error,
        });
        t
    }

    #[test]
    fn outcomes() {
        let h = handshake(&t("SYN_SENT", "ESTABLISHED", Some(5), None)).unwrap();
        assert_eq!(
            (h.side, h.outcome.as_str(), h.duration_ns, h.retransmits),
            (Side::Client, "established", Some(5), Some(1))
        );
        let outcome = |err| {
            handshake(&t("SYN_SENT", "CLOSE", Some(5), err))
                .unwrap()
                .outcome
        };
        assert_eq!(outcome(Some(111)), "refused");
        assert_eq!(outcome(Some(110)), "timeout");
        assert_eq!(outcome(Some(0)), "aborted");
        assert_eq!(outcome(Some(113)), "failed:EHOSTUNREACH");
        assert_eq!(outcome(None), "closed");
        assert!(handshake(&t("ESTABLISHED", "FIN_WAIT1", Some(5), None)).is_none());
    }

    #[test]
    fn server_side_uses_the_kernels_figure_not_the_child_state() {
        let mut tr = t("SYN_RECV", "ESTABLISHED", Some(7_000), None);
        tr.handshake_ns = Some(1_000_000_000);
        let h = handshake(&tr).unwrap();
        assert_eq!((h.side, h.duration_ns), (Side::Server, Some(1_000_000_000)));
        tr.handshake_ns = None;
        assert_eq!(
            handshake(&tr).unwrap().duration_ns,
            None,
            "unmeasured, not 7 us"
        );
    }

    #[test]
    fn summaries_count_untimed_and_outcomes() {
        let mut s = Summary::default();
        s.add(&handshake(&t("SYN_SENT", "ESTABLISHED", Some(1_000), None)).unwrap());
        s.add(&handshake(&t("SYN_SENT", "CLOSE", Some(3_000), Some(111))).unwrap());
        let mut server = t("SYN_RECV", "ESTABLISHED", None, None);
        server.handshake_ns = None;
        s.add(&handshake(&server).unwrap());
        let v = s.json();
        assert_eq!(
            (
                v["count"].as_u64(),
                v["timed"].as_u64(),
                v["retransmits"].as_u64()
            ),
            (Some(3), Some(2), Some(3))
        );
        assert_eq!(v["outcomes"]["refused"], 1);
        assert_eq!(v["outcomes"]["established"], 2);
    }
}
