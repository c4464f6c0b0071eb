//! `tcp-trace timewait`: which processes leave sockets in TIME_WAIT, and for how long.
//!
//! The tracepoint never shows TIME_WAIT: a closing socket goes `FIN_WAIT2` (or
//! `CLOSING`) `-> CLOSE` and a timewait mini-socket lives on. A reset or an
//! abort looks the same, so such a transition only makes a *candidate*
//! (carrying the socket's owner), and a socket with an error (`ECONNRESET`,
//! `EPIPE`) none at all. sock_diag then confirms it: a candidate counts as an
//! entry once the kernel lists its 4-tuple as a timewait socket in TIME_WAIT,
//! and its stay ends when the kernel no longer lists it.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    fs,
    io::{self, BufWriter, StdoutLock, Write},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use tcp_trace_common::state;

use crate::{
    cli::TimewaitConfig,
    diag::{self, Endpoints, TimewaitSocket},
    event::{Owner, Transition},
    hist::Histogram,
    load::Settings,
    render::{endpoint, human_duration, monotonic_ns, printable_comm, Clock},
    stream::{self, Consumer, Timing, Totals},
};

/// How often the kernel's timewait table is read: the precision of exits.
const POLL: Duration = Duration::from_secs(1);
/// Candidates the kernel has not listed after this many polls closed without
/// TIME_WAIT (a reset, an abort, or a full timewait table).
const CANDIDATE_POLLS: u32 = 3;
/// Top remote endpoints listed per process.
const TOP_REMOTES: usize = 3;

/// Owner as a table key: pid and last known name.
type ProcessKey = (u32, Vec<u8>);

#[derive(Debug)]
struct Candidate {
    owner: Option<Owner>,
    closed_ns: u64,
    polls: u32,
}

#[derive(Debug)]
struct Lingering {
    owner: Option<Owner>,
    closed_ns: u64,
    /// Confirmed in TIME_WAIT (not only the FIN_WAIT2 substate).
    entered: bool,
}

#[derive(Default, Debug)]
struct ProcessRow {
    entered: u64,
    lingering: u64,
    /// Closed like a timewait but never listed by the kernel.
    without_timewait: u64,
    stay: Histogram,
    /// Per remote address, and remote port when it is the service's (our
    /// local port is ephemeral); a server's clients count per address.
    remotes: HashMap<(std::net::IpAddr, Option<u16>), u64>,
}

/// Sysctls that govern TIME_WAIT, as read at report time.
#[derive(Debug, Clone)]
struct Sysctls {
    values: Vec<(&'static str, String)>,
    port_range: Option<(u16, u16)>,
}

fn read_sysctls() -> Sysctls {
    let read = |name: &str| {
        fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join("-"))
            .unwrap_or_else(|_| "?".into())
    };
    let names = [
        "tcp_fin_timeout",
        "tcp_tw_reuse",
        "tcp_max_tw_buckets",
        "ip_local_port_range",
    ];
    let values: Vec<(&'static str, String)> = names.iter().map(|&n| (n, read(n))).collect();
    let port_range = values[3]
        .1
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    Sysctls { values, port_range }
}

struct Tracker {
    filter: tcp_trace_common::Filter,
    candidates: HashMap<Endpoints, Candidate>,
    lingering: HashMap<Endpoints, Lingering>,
    /// Listed by the kernel at start: owner unknown.
    before_start: HashSet<Endpoints>,
    /// Listed by the kernel later without any candidate (missed or unowned).
    unattributed: HashSet<Endpoints>,
    rows: HashMap<ProcessKey, ProcessRow>,
    unknown_owner: ProcessRow,
    started_ns: u64,
    polled: bool,
    /// The ephemeral port range, to tell a client's end from a server's.
    ephemeral: (u16, u16),
}

fn remote_key(e: &Endpoints, ephemeral: (u16, u16)) -> (std::net::IpAddr, Option<u16>) {
    let client_end = (ephemeral.0..=ephemeral.1).contains(&e.lport);
    (e.raddr, client_end.then_some(e.rport))
}

fn remote_name(addr: std::net::IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => endpoint(addr, p),
        None => addr.to_string(),
    }
}

impl Tracker {
    fn new(filter: tcp_trace_common::Filter, started_ns: u64) -> Tracker {
        Tracker {
            filter,
            candidates: HashMap::new(),
            lingering: HashMap::new(),
            before_start: HashSet::new(),
            unattributed: HashSet::new(),
            rows: HashMap::new(),
            unknown_owner: ProcessRow::default(),
            started_ns,
            polled: false,
            ephemeral: read_sysctls().port_range.unwrap_or((32768, 60999)),
        }
    }

    fn row(&mut self, owner: &Option<Owner>) -> &mut ProcessRow {
        match owner {
            Some(o) => self.rows.entry((o.pid, o.comm.clone())).or_default(),
            None => &mut self.unknown_owner,
        }
    }

    /// A transition from the tracepoint.
    fn event(&mut self, t: &Transition) {
        let name = (t.old_state.name(), t.new_state.name());
        let closes_like_timewait = matches!(name, ("FIN_WAIT2", "CLOSE") | ("CLOSING", "CLOSE"));
        // An error means a reset: those never leave a timewait socket.
        if !closes_like_timewait || t.sock.is_some_and(|s| s.error != 0) {
            return;
        }
        let key = Endpoints {
            laddr: t.laddr,
            lport: t.lport,
            raddr: t.raddr,
            rport: t.rport,
        };
        self.candidates.insert(
            key,
            Candidate {
                owner: t.owner.clone(),
                closed_ns: t.ts_ns,
                polls: 0,
            },
        );
    }

    fn wanted(&self, e: &Endpoints) -> bool {
        let f = &self.filter;
        let family_ok = match f.family {
            tcp_trace_common::AF_INET => e.laddr.is_ipv4(),
            tcp_trace_common::AF_INET6 => e.laddr.is_ipv6(),
            _ => true,
        };
        family_ok
            && (f.port == 0 || e.lport == f.port || e.rport == f.port)
            && (f.lport == 0 || e.lport == f.lport)
            && (f.rport == 0 || e.rport == f.rport)
    }

    /// The kernel's timewait table at `now_ns`.
    fn poll(&mut self, listed: &[TimewaitSocket], now_ns: u64) {
        let listed: Vec<&TimewaitSocket> = listed
            .iter()
            .filter(|s| self.wanted(&s.endpoints))
            .collect();
        // Listed sockets have no owner: under --pid only candidates count.
        let by_pid = self.filter.pid != 0;
        if !self.polled {
            self.polled = true;
            for s in listed.iter().filter(|_| !by_pid) {
                if !self.candidates.contains_key(&s.endpoints) {
                    self.before_start.insert(s.endpoints);
                }
            }
        }
        let present: HashSet<Endpoints> = listed.iter().map(|s| s.endpoints).collect();

        // New listings: confirm candidates.
        for s in &listed {
            let e = s.endpoints;
            if let Some(c) = self.candidates.remove(&e) {
                self.lingering.insert(
                    e,
                    Lingering {
                        owner: c.owner,
                        closed_ns: c.closed_ns,
                        entered: false,
                    },
                );
            } else if !by_pid && !self.lingering.contains_key(&e) && !self.before_start.contains(&e)
            {
                self.unattributed.insert(e);
            }
            if s.time_wait {
                if let Some(l) = self.lingering.get_mut(&e) {
                    if !l.entered {
                        l.entered = true;
                        let owner = l.owner.clone();
                        let remote = remote_key(&e, self.ephemeral);
                        let row = self.row(&owner);
                        row.entered += 1;
                        *row.remotes.entry(remote).or_default() += 1;
                    }
                }
            }
        }

        // Gone from the table: the stay is over (exit between two polls).
        let gone: Vec<Endpoints> = self
            .lingering
            .keys()
            .filter(|e| !present.contains(e))
            .copied()
            .collect();
        for e in gone {
            let l = self.lingering.remove(&e).expect("listed key");
            if l.entered {
                let exit_ns = now_ns.saturating_sub(POLL.as_nanos() as u64 / 2);
                self.row(&l.owner)
                    .stay
                    .record(exit_ns.saturating_sub(l.closed_ns));
            }
        }
        self.before_start.retain(|e| present.contains(e));
        self.unattributed.retain(|e| present.contains(e));

        // Candidates never listed: closed without TIME_WAIT.
        let mut expired = Vec::new();
        for (e, c) in self.candidates.iter_mut() {
            c.polls += 1;
            if c.polls >= CANDIDATE_POLLS {
                expired.push(*e);
            }
        }
        for e in expired {
            let c = self.candidates.remove(&e).expect("listed key");
            self.row(&c.owner).without_timewait += 1;
        }

        // Lingering now, per owner.
        for row in self.rows.values_mut() {
            row.lingering = 0;
        }
        self.unknown_owner.lingering = 0;
        let counts: Vec<Option<Owner>> = self
            .lingering
            .values()
            .filter(|l| l.entered)
            .map(|l| l.owner.clone())
            .collect();
        for owner in counts {
            self.row(&owner).lingering += 1;
        }
    }

    /// Sockets in TIME_WAIT that we hold responsible for, per endpoint.
    fn pressure(&self, range: (u16, u16)) -> Vec<(std::net::IpAddr, u16, u64, f64)> {
        let size = (range.1 - range.0 + 1) as f64;
        let mut per_remote: HashMap<(std::net::IpAddr, u16), u64> = HashMap::new();
        for (e, l) in &self.lingering {
            if l.entered && (range.0..=range.1).contains(&e.lport) {
                *per_remote.entry((e.raddr, e.rport)).or_default() += 1;
            }
        }
        let mut out: Vec<_> = per_remote
            .into_iter()
            .map(|((a, p), n)| (a, p, n, n as f64 / size))
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.2));
        out
    }

    fn ranked_rows(&self) -> Vec<(Option<&ProcessKey>, &ProcessRow)> {
        let mut rows: Vec<(Option<&ProcessKey>, &ProcessRow)> =
            self.rows.iter().map(|(k, r)| (Some(k), r)).collect();
        rows.sort_by(|a, b| b.1.entered.cmp(&a.1.entered).then(a.0.cmp(&b.0)));
        if self.unknown_owner.entered + self.unknown_owner.without_timewait > 0 {
            rows.push((None, &self.unknown_owner));
        }
        rows
    }

    fn report_json(&self, now_ns: u64, last: bool, sysctls: &Sysctls) -> Value {
        let elapsed = (now_ns.saturating_sub(self.started_ns)) as f64 / 1e9;
        let processes: Vec<Value> = self
            .ranked_rows()
            .into_iter()
            .map(|(key, row)| {
                let mut remotes: Vec<_> = row.remotes.iter().collect();
                remotes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                json!({
                    "pid": key.map(|k| k.0),
                    "comm": key.map(|k| String::from_utf8_lossy(&k.1).into_owned()),
                    "entered": row.entered,
                    "entered_per_s": if elapsed > 0.0 { row.entered as f64 / elapsed } else { 0.0 },
                    "lingering": row.lingering,
                    "closed_without_timewait": row.without_timewait,
                    "time_wait": {
                        "count": row.stay.count(),
                        "p50_ns": row.stay.quantile(0.5),
                        "p90_ns": row.stay.quantile(0.9),
                        "p99_ns": row.stay.quantile(0.99),
                        "max_ns": (row.stay.count() > 0).then(|| row.stay.max()),
                    },
                    "top_remotes": remotes.iter().take(TOP_REMOTES).map(|((a, p), n)| json!({
                        "raddr": a, "rport": p, "entered": n
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let pressure: Vec<Value> = sysctls
            .port_range
            .map(|r| self.pressure(r))
            .unwrap_or_default()
            .into_iter()
            .map(|(a, p, n, f)| json!({"raddr": a, "rport": p, "lingering": n, "port_range_fraction": f}))
            .collect();
        json!({
            "ts_ns": now_ns,
            "final": last,
            "sysctls": sysctls.values.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "processes": processes,
            "before_start": {"lingering": self.before_start.len()},
            "unattributed": {"lingering": self.unattributed.len()},
            "lingering_total": self.lingering.values().filter(|l| l.entered).count()
                + self.before_start.len() + self.unattributed.len(),
            "port_pressure": pressure,
        })
    }

    fn report_text(&self, now_ns: u64, last: bool, sysctls: &Sysctls, clock: &Clock) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} {} timewait report: {}",
            clock.local_time(now_ns),
            if last { "final" } else { "interval" },
            sysctls
                .values
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = writeln!(
            s,
            "{:>7} {:<16} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}  TOP REMOTES",
            "PID", "COMM", "ENTERED", "PER_S", "LINGERING", "P50", "P90", "MAX", "NO_TW"
        );
        let elapsed = (now_ns.saturating_sub(self.started_ns)) as f64 / 1e9;
        for (key, row) in self.ranked_rows() {
            let (pid, comm) = match key {
                Some((pid, comm)) => (pid.to_string(), printable_comm(comm)),
                None => ("-".into(), "(owner unknown)".into()),
            };
            let q = |q| row.stay.quantile(q).map_or("-".into(), human_duration);
            let mut remotes: Vec<_> = row.remotes.iter().collect();
            remotes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let top: Vec<String> = remotes
                .iter()
                .take(TOP_REMOTES)
                .map(|((a, p), n)| format!("{} ({n})", remote_name(*a, *p)))
                .collect();
            let _ = writeln!(
                s,
                "{pid:>7} {comm:<16} {:>8} {:>7.1} {:>9} {:>8} {:>8} {:>8} {:>8}  {}",
                row.entered,
                if elapsed > 0.0 {
                    row.entered as f64 / elapsed
                } else {
                    0.0
                },
                row.lingering,
                q(0.5),
                q(0.9),
                if row.stay.count() > 0 {
                    human_duration(row.stay.max())
                } else {
                    "-".into()
                },
                row.without_timewait,
                top.join(", ")
            );
        }
        if !self.before_start.is_empty() {
            let _ = writeln!(
                s,
                "{:>7} {:<16} {:>8} {:>7} {:>9}",
                "-",
                "(before start)",
                "-",
                "-",
                self.before_start.len()
            );
        }
        if !self.unattributed.is_empty() {
            let _ = writeln!(
                s,
                "{:>7} {:<16} {:>8} {:>7} {:>9}",
                "-",
                "(unattributed)",
                "-",
                "-",
                self.unattributed.len()
            );
        }
        if let Some(range) = sysctls.port_range {
            for (a, p, n, f) in self.pressure(range) {
                if f >= 0.5 {
                    let _ = writeln!(
                        s,
                        "warning: {} lingering sockets to {} hold {:.0} % of the ephemeral port range {}-{}",
                        n,
                        endpoint(a, p),
                        f * 100.0,
                        range.0,
                        range.1
                    );
                }
            }
        }
        s.push('\n');
        s
    }
}

/// One reading of the kernel's timewait table, and when it was taken.
type Dump = (u64, std::result::Result<Vec<TimewaitSocket>, String>);

struct TimewaitCommand {
    tracker: Tracker,
    json: bool,
    clock: Clock,
    out: BufWriter<StdoutLock<'static>>,
    /// Readings from the dumping thread: a dump of a busy host's table takes
    /// long enough that the event loop must not wait for it.
    dumps: Option<mpsc::Receiver<Dump>>,
    /// Report every this many ticks of `POLL`.
    report_every: u32,
    ticks: u32,
}

fn dump_now() -> Dump {
    let taken = monotonic_ns();
    (
        taken,
        diag::timewait_sockets().map_err(|e| format!("{e:#}")),
    )
}

impl TimewaitCommand {
    fn apply(&mut self, (taken, listed): Dump) -> io::Result<()> {
        let listed = listed.map_err(io::Error::other)?;
        self.tracker.poll(&listed, taken);
        Ok(())
    }

    /// Applies the readings that arrived; events up to now are already in.
    fn apply_pending(&mut self) -> io::Result<()> {
        while let Some(dump) = self.dumps.as_ref().and_then(|d| d.try_recv().ok()) {
            self.apply(dump)?;
        }
        Ok(())
    }

    fn report(&mut self, now_ns: u64, last: bool) -> io::Result<()> {
        let sysctls = read_sysctls();
        if self.json {
            serde_json::to_writer(
                &mut self.out,
                &self.tracker.report_json(now_ns, last, &sysctls),
            )?;
            writeln!(self.out)?;
        } else {
            let text = self
                .tracker
                .report_text(now_ns, last, &sysctls, &self.clock);
            self.out.write_all(text.as_bytes())?;
        }
        self.out.flush()
    }
}

impl Consumer for TimewaitCommand {
    fn start(&mut self) -> io::Result<()> {
        // The first reading marks what existed before us.
        self.apply(dump_now())?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || loop {
            thread::sleep(POLL);
            if tx.send(dump_now()).is_err() {
                break;
            }
        });
        self.dumps = Some(rx);
        Ok(())
    }

    fn event(&mut self, t: &Transition) -> io::Result<()> {
        self.tracker.event(t);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.apply_pending()
    }

    fn interval(&mut self, now_ns: u64) -> io::Result<()> {
        self.apply_pending()?;
        self.ticks += 1;
        if self.ticks.is_multiple_of(self.report_every) {
            self.report(now_ns, false)?;
        }
        Ok(())
    }

    fn finish(&mut self, _totals: &Totals) -> io::Result<()> {
        self.apply_pending()?;
        self.dumps = None;
        let dump = dump_now();
        let taken = dump.0;
        self.apply(dump)?;
        self.report(taken, true)
    }
}

pub fn run(config: TimewaitConfig) -> Result<()> {
    let report_every = (config.interval.as_secs_f64() / POLL.as_secs_f64())
        .round()
        .max(1.0) as u32;
    let mut command = TimewaitCommand {
        tracker: Tracker::new(config.filter, monotonic_ns()),
        json: config.json,
        clock: Clock::now(),
        out: BufWriter::new(io::stdout().lock()),
        dumps: None,
        report_every,
        ticks: 0,
    };
    // sock_diag must answer before we trace: fail early and clearly.
    diag::timewait_sockets().context("reading the kernel's timewait sockets")?;
    // Only the transitions that can leave a timewait socket reach userspace.
    let close_from = (1 << state::FIN_WAIT2) | (1 << state::CLOSING);
    let filter = tcp_trace_common::Filter {
        close_from,
        ..config.filter
    };
    let settings = Settings::streaming(filter, config.max_sockets);
    let timing = Timing {
        duration: config.duration,
        interval: Some(POLL),
    };
    stream::block_on(stream::live(&settings, timing, &mut command))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_event, tests::sample_event, SockFields, TcpState};

    fn close(lport: u16, old: &str, pid: u32, error: u16) -> Transition {
        let mut t = from_event(&sample_event()).unwrap();
        t.lport = lport;
        t.old_state = TcpState::from_name(old).unwrap();
        t.new_state = TcpState::from_name("CLOSE").unwrap();
        t.owner.as_mut().unwrap().pid = pid;
        t.sock = Some(SockFields {
            bytes_sent: 0,
            bytes_received: 0,
            error,
        });
        t
    }

    fn listed(t: &Transition, time_wait: bool) -> TimewaitSocket {
        TimewaitSocket {
            endpoints: Endpoints {
                laddr: t.laddr,
                lport: t.lport,
                raddr: t.raddr,
                rport: t.rport,
            },
            time_wait,
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn confirmed_entries_and_exits_are_charged_to_the_owner() {
        let mut tr = Tracker::new(Default::default(), 0);
        tr.poll(&[], 0);
        let a = close(40_001, "FIN_WAIT2", 7, 0);
        let b = close(40_002, "CLOSING", 7, 0);
        tr.event(&a);
        tr.event(&b);
        tr.poll(&[listed(&a, true), listed(&b, true)], S);
        let row = &tr.rows[&(7, b"curl".to_vec())];
        assert_eq!((row.entered, row.lingering), (2, 2));
        // 60 s later the kernel reaps them.
        tr.poll(&[], 61 * S);
        let row = &tr.rows[&(7, b"curl".to_vec())];
        assert_eq!((row.entered, row.lingering, row.stay.count()), (2, 0, 2));
        let p50 = row.stay.quantile(0.5).unwrap();
        assert!((59 * S..=61 * S).contains(&p50), "{p50}");
    }

    #[test]
    fn resets_and_unlisted_closes_are_not_entries() {
        let mut tr = Tracker::new(Default::default(), 0);
        tr.poll(&[], 0);
        tr.event(&close(40_003, "FIN_WAIT2", 8, 104)); // reset: not even a candidate
        tr.event(&close(40_004, "FIN_WAIT2", 8, 0)); // never listed
        assert_eq!(tr.candidates.len(), 1);
        for i in 1..=CANDIDATE_POLLS as u64 {
            tr.poll(&[], i * S);
        }
        let row = &tr.rows[&(8, b"curl".to_vec())];
        assert_eq!((row.entered, row.without_timewait), (0, 1));
        // Not a timewait-looking transition at all.
        tr.event(&close(40_005, "ESTABLISHED", 8, 0));
        assert!(tr.candidates.is_empty());
    }

    #[test]
    fn fin_wait2_substate_counts_once_it_reaches_time_wait() {
        let mut tr = Tracker::new(Default::default(), 0);
        tr.poll(&[], 0);
        let a = close(40_006, "FIN_WAIT2", 9, 0);
        tr.event(&a);
        tr.poll(&[listed(&a, false)], S);
        assert_eq!(
            tr.rows.get(&(9, b"curl".to_vec())).map_or(0, |r| r.entered),
            0
        );
        tr.poll(&[listed(&a, true)], 2 * S);
        assert_eq!(tr.rows[&(9, b"curl".to_vec())].entered, 1);
    }

    #[test]
    fn sockets_from_before_start_are_not_guessed() {
        let mut tr = Tracker::new(Default::default(), 0);
        let old = close(40_007, "FIN_WAIT2", 1, 0);
        tr.poll(&[listed(&old, true)], 0);
        let v = tr.report_json(S, false, &read_sysctls());
        assert_eq!(v["before_start"]["lingering"], 1);
        assert_eq!(v["processes"].as_array().unwrap().len(), 0);
        assert_eq!(v["lingering_total"], 1);
    }

    #[test]
    fn port_pressure_warns() {
        let mut tr = Tracker::new(Default::default(), 0);
        tr.poll(&[], 0);
        let mut listed_now = Vec::new();
        for port in 40_000..40_060 {
            let t = close(port, "FIN_WAIT2", 3, 0);
            tr.event(&t);
            listed_now.push(listed(&t, true));
        }
        tr.poll(&listed_now, S);
        let sysctls = Sysctls {
            values: vec![("ip_local_port_range", "40000-40099".into())],
            port_range: Some((40_000, 40_099)),
        };
        let text = tr.report_text(S, false, &sysctls, &Clock::with_offset(0));
        assert!(
            text.contains("warning: 60 lingering sockets to 10.1.2.3:80 hold 60 %"),
            "{text}"
        );
    }
}
