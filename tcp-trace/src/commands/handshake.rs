//! `tcp-trace handshake`: connect latency on both sides of each connection.
//!
//! Client: `CLOSE -> SYN_SENT` (the SYN) to `SYN_SENT -> ESTABLISHED` or to
//! `CLOSE` (refused, timed out, aborted), with the SYN retransmissions.
//! Server: the kernel holds only a request socket until the final ACK, so the
//! child's `SYN_RECV -> ESTABLISHED` carries the figure the kernel program
//! computed: from the server's first SYN-ACK to the final ACK (the kernel's
//! own first RTT sample, or, after SYN-ACK retransmissions, the first SYN-ACK's
//! time kept by the request socket), with the SYN-ACK retransmissions.
//! A server line waits for `accept()`: it names the process that accepted
//! the connection and how long the connection waited in the accept queue.

use std::{collections::HashMap, fmt::Write as _, net::IpAddr, time::Duration};

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::{
    aggregate::{group_name, BoundedGroups, Group, GroupBy, Histogram, Merge},
    cli::HandshakeConfig,
    model::{
        errno::{self, ECONNREFUSED, ETIMEDOUT},
        Owner, TcpState, Transition,
    },
    output::{
        add_owner_origin,
        bars::bars,
        monotonic_ns, owner_json, quantiles_json,
        text::{
            endpoint, human_duration, max_cell, owner_cells, printable_comm, quantile_cell,
            report_kind, ContainerColumn,
        },
        Clock, Sink,
    },
    source::{self, Consumer, Timing, Totals},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    const BOTH: [Side; 2] = [Side::Client, Side::Server];

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
    /// Server side: from ESTABLISHED to `accept()` returning the connection;
    /// `None` until accepted (or never accepted).
    pub accept_wait_ns: Option<u64>,
}

/// Server handshakes waiting for their `accept()`, at most this many; past
/// it they are reported at once, without accept figures.
const AWAITING_ACCEPT: usize = 65_536;

/// The handshake a transition ends, if it ends one.
pub fn handshake(t: &Transition) -> Option<Handshake> {
    let (side, duration_ns, outcome) = match (t.old_state, t.new_state) {
        (TcpState::SYN_SENT, TcpState::ESTABLISHED) => {
            (Side::Client, t.duration_ns, "established".to_string())
        }
        (TcpState::SYN_SENT, TcpState::CLOSE) => {
            let outcome = match t.sock.map(|s| s.error) {
                Some(ECONNREFUSED) => "refused".to_string(),
                Some(ETIMEDOUT) => "timeout".to_string(),
                Some(0) => "aborted".to_string(),
                Some(e) => format!("failed:{}", errno::name(e)),
                None => "closed".to_string(),
            };
            (Side::Client, t.duration_ns, outcome)
        }
        (TcpState::SYN_RECV, TcpState::ESTABLISHED) => {
            (Side::Server, t.handshake_ns, "established".to_string())
        }
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
        accept_wait_ns: None,
    })
}

/// Figures for one side (or one group of it).
#[derive(Clone, Default, Debug)]
struct Summary {
    durations: Histogram,
    /// Server side: time in the accept queue.
    accept_waits: Histogram,
    untimed: u64,
    retransmits: u64,
    outcomes: HashMap<String, u64>,
}

impl Merge for Summary {
    fn merge(&mut self, other: &Summary) {
        self.durations.merge(&other.durations);
        self.accept_waits.merge(&other.accept_waits);
        self.untimed += other.untimed;
        self.retransmits += other.retransmits;
        for (k, v) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += v;
        }
    }
}

impl Summary {
    fn add(&mut self, h: &Handshake) {
        match h.duration_ns {
            Some(d) => self.durations.record(d),
            None => self.untimed += 1,
        }
        if let Some(wait) = h.accept_wait_ns {
            self.accept_waits.record(wait);
        }
        self.retransmits += u64::from(h.retransmits.unwrap_or(0));
        *self.outcomes.entry(h.outcome.clone()).or_default() += 1;
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
        let mut v = quantiles_json(&self.durations);
        v["count"] = json!(self.count());
        v["timed"] = json!(self.durations.count());
        v["retransmits"] = json!(self.retransmits);
        v["outcomes"] = Value::Object(outcomes);
        v["accept_wait"] = quantiles_json(&self.accept_waits);
        v
    }

    /// `name=count` pairs, sorted.
    fn outcome_cells(&self) -> String {
        let mut outcomes: Vec<_> = self.outcomes.iter().collect();
        outcomes.sort();
        let cells: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        cells.join(" ")
    }
}

struct HandshakeCommand {
    sink: Sink,
    slow_ns: Option<u64>,
    by: Option<GroupBy>,
    top: usize,
    sides: HashMap<Side, Summary>,
    /// Per side, with --by: the busiest groups of that side's handshakes.
    groups: HashMap<Side, BoundedGroups<String, Summary>>,
    /// Server handshakes by socket, until their `accept()`.
    awaiting_accept: HashMap<u64, Handshake>,
    container: ContainerColumn,
}

impl HandshakeCommand {
    /// Counts a finished handshake and prints it if it is slow enough.
    fn done(&mut self, h: Handshake) -> Result<()> {
        self.sides.entry(h.side).or_default().add(&h);
        if let Some(by) = self.by {
            let key = group_name(by, h.owner.as_ref(), h.lport, h.rport, h.raddr);
            let top = self.top;
            self.groups
                .entry(h.side)
                .or_insert_with(|| BoundedGroups::for_top(top))
                .entry(key)
                .add(&h);
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

    /// Server handshakes still waiting for `accept()` at the end: reported
    /// without accept figures.
    fn flush_awaiting(&mut self) -> Result<()> {
        let mut waiting: Vec<Handshake> = self.awaiting_accept.drain().map(|(_, h)| h).collect();
        waiting.sort_by_key(|h| h.ts_ns);
        waiting.into_iter().try_for_each(|h| self.done(h))
    }

    fn line(&mut self, h: &Handshake) -> Result<()> {
        if self.sink.is_json() {
            let (pid, comm) = owner_json(h.owner.as_ref());
            let mut line = json!({
                "type": "handshake",
                "ts_ns": h.ts_ns,
                "side": h.side.name(),
                "pid": pid,
                "comm": comm,
                "family": if h.laddr.is_ipv4() { "ipv4" } else { "ipv6" },
                "laddr": h.laddr,
                "lport": h.lport,
                "raddr": h.raddr,
                "rport": h.rport,
                "duration_ns": h.duration_ns,
                "retransmits": h.retransmits,
                "outcome": h.outcome,
                "accept_wait_ns": h.accept_wait_ns,
            });
            add_owner_origin(&mut line, h.owner.as_ref());
            return self.sink.json_line(&line);
        }
        if self.container.joins(h.owner.as_ref()) {
            let header = self.container.header(&header());
            self.sink.text(&header)?;
        }
        let (pid, comm) = owner_cells(h.owner.as_ref());
        let comm = self.container.comm_cells(comm, h.owner.as_ref());
        let line = format!(
            "{:<12} {pid:>7} {comm:<16} {:<6} {:<21} {:<21} {:>9} {:>7} {:>11} {}\n",
            self.sink.clock.local_time(h.ts_ns),
            h.side.name(),
            endpoint(h.laddr, h.lport),
            endpoint(h.raddr, h.rport),
            h.duration_ns.map_or("unmeasured".into(), human_duration),
            h.retransmits.map_or("-".into(), |r| r.to_string()),
            h.accept_wait_ns.map_or("-".into(), human_duration),
            h.outcome,
        );
        self.sink.text(&line)
    }

    /// Per side, its `top` busiest groups, then its "other".
    fn ranked(&self) -> Vec<(Side, String, Summary)> {
        let mut out = Vec::new();
        for side in Side::BOTH {
            let Some(groups) = self.groups.get(&side) else {
                continue;
            };
            for (group, summary) in groups.ranked(self.top, Summary::count) {
                let key = match group {
                    Group::Key(key) => key,
                    Group::Other => "other".into(),
                };
                out.push((side, key, summary));
            }
        }
        out
    }

    fn report(&mut self, now_ns: u64, last: bool) -> Result<()> {
        let ranked = self.ranked();
        let (sides, grouped) = (&self.sides, self.by.is_some());
        self.sink.report(
            || {
                let sides: Map<String, Value> = sides
                    .iter()
                    .map(|(side, s)| (side.name().to_string(), s.json()))
                    .collect();
                let mut v =
                    json!({"type": "summary", "ts_ns": now_ns, "final": last, "sides": sides});
                if grouped {
                    v["groups"] = ranked
                        .iter()
                        .map(|(side, key, s)| {
                            json!({"side": side.name(), "key": key, "figures": s.json()})
                        })
                        .collect();
                }
                v
            },
            |clock| report_text(sides, &ranked, clock, now_ns, last),
        )
    }
}

fn report_text(
    sides: &HashMap<Side, Summary>,
    ranked: &[(Side, String, Summary)],
    clock: &Clock,
    now_ns: u64,
    last: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} {} handshake report",
        clock.local_time(now_ns),
        report_kind(last)
    );
    let _ = writeln!(
        s,
        "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}  OUTCOMES",
        "SIDE", "COUNT", "P50", "P90", "P99", "MAX", "RETRANS"
    );
    let mut rows: Vec<(String, &Summary)> = Side::BOTH
        .iter()
        .filter_map(|side| Some((side.name().to_string(), sides.get(side)?)))
        .collect();
    for (side, key, summary) in ranked {
        let key = printable_comm(key.as_bytes());
        rows.push((format!("{} {key}", side.name()), summary));
    }
    for (name, summary) in &rows {
        let h = &summary.durations;
        let _ = writeln!(
            s,
            "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}  {}",
            name,
            summary.count(),
            quantile_cell(h, 0.5),
            quantile_cell(h, 0.9),
            quantile_cell(h, 0.99),
            max_cell(h),
            summary.retransmits,
            summary.outcome_cells()
        );
    }
    // The server's wait in the accept queue, after its handshake.
    if let Some(waits) = sides.get(&Side::Server).map(|s| &s.accept_waits) {
        if waits.count() > 0 {
            let _ = writeln!(
                s,
                "{:<28} {:>7} {:>9} {:>9} {:>9} {:>9}",
                "server accept-queue wait",
                waits.count(),
                quantile_cell(waits, 0.5),
                quantile_cell(waits, 0.9),
                quantile_cell(waits, 0.99),
                max_cell(waits),
            );
        }
    }
    for side in Side::BOTH {
        if let Some(summary) = sides.get(&side) {
            let _ = writeln!(s, "\n{} handshakes", side.name());
            bars(&mut s, &summary.durations);
        }
    }
    s
}

/// The column header of handshake lines.
fn header() -> String {
    format!(
        "{:<12} {:>7} {:<16} {:<6} {:<21} {:<21} {:>9} {:>7} {:>11} OUTCOME\n",
        "TIME", "PID", "COMM", "SIDE", "LOCAL", "REMOTE", "DURATION", "RETRANS", "ACCEPT-WAIT"
    )
}

impl Consumer for HandshakeCommand {
    fn start(&mut self) -> Result<()> {
        if self.sink.is_json() {
            return Ok(());
        }
        self.sink.text(&header())
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        if t.accept {
            if let Some(mut h) = self.awaiting_accept.remove(&t.sk) {
                // The accepting process served the connection: name it.
                h.owner.clone_from(&t.owner);
                h.accept_wait_ns = t.duration_ns;
                self.done(h)?;
            }
            return Ok(());
        }
        if t.new_state == TcpState::CLOSE {
            // Gone without being accepted.
            if let Some(h) = self.awaiting_accept.remove(&t.sk) {
                self.done(h)?;
            }
        }
        let Some(h) = handshake(t) else { return Ok(()) };
        if h.side == Side::Server && self.awaiting_accept.len() < AWAITING_ACCEPT {
            self.awaiting_accept.insert(t.sk, h);
            return Ok(());
        }
        self.done(h)
    }

    fn flush(&mut self) -> Result<()> {
        self.sink.flush()
    }

    fn interval(&mut self, now_ns: u64, _totals: &Totals) -> Result<()> {
        self.report(now_ns, false)
    }

    fn finish(&mut self, _totals: &Totals) -> Result<()> {
        self.flush_awaiting()?;
        self.report(monotonic_ns(), true)
    }
}

pub fn run(config: HandshakeConfig) -> Result<()> {
    let mut command = HandshakeCommand {
        sink: Sink::stdout(config.json),
        slow_ns: config.slow.map(|d: Duration| d.as_nanos() as u64),
        by: config.by,
        top: config.top,
        sides: HashMap::new(),
        groups: HashMap::new(),
        awaiting_accept: HashMap::new(),
        container: ContainerColumn::default(),
    };
    let settings = config.tracing.streaming();
    let timing = Timing {
        duration: config.tracing.duration,
        interval: config.interval,
    };
    source::block_on(source::live(&settings, timing, &mut command))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event, SockFields};

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
