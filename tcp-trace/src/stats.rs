//! `tcp-trace stats`: where the time goes, per state, optionally per group.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, BufWriter, StdoutLock, Write},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Map, Value};

use crate::{
    cli::{GroupBy, StatsConfig},
    event::Transition,
    hist::{Histogram, StateHistograms},
    load::{Settings, Tracer},
    render::{human_duration, monotonic_ns, printable_comm, Clock},
    stream::{self, Consumer, Stop, Timing, Totals},
};

/// Name of the group that collects everything past `--top`.
const OTHER: &str = "other";

pub fn run(config: StatsConfig) -> Result<()> {
    let mut report = Report {
        json: config.json,
        by: config.by,
        top: config.top,
        clock: Clock::now(),
        out: BufWriter::new(io::stdout().lock()),
    };
    let mut stats = Stats::new(config.by, config.top);
    if let Some(path) = &config.from {
        stats.mode = "replay";
        let mut consumer = Aggregating {
            stats,
            report: &mut report,
        };
        return stream::replay(path, &config.filter, config.interval, &mut consumer);
    }
    let settings = Settings {
        filter: config.filter,
        max_sockets: config.max_sockets,
        aggregate: config.by.is_none(),
    };
    let timing = Timing {
        duration: config.duration,
        interval: config.interval,
    };
    if settings.aggregate {
        stream::block_on(in_kernel(&settings, timing, &mut report))
    } else {
        stats.mode = "per-event";
        let mut consumer = Aggregating {
            stats,
            report: &mut report,
        };
        stream::block_on(stream::live(&settings, timing, &mut consumer))
    }
}

/// Lowest-overhead mode: the kernel aggregates, nothing is streamed; reports
/// read its histograms.
async fn in_kernel(settings: &Settings, timing: Timing, report: &mut Report) -> Result<()> {
    let (tracer, _events) = Tracer::attach(settings)?;
    let mut stop = Stop::new(timing.duration)?;
    let mut ticks = stream::ticker(timing.interval);
    stream::announce();
    let snapshot = |tracer: &Tracer| -> Result<(Stats, Totals)> {
        let kernel = tracer.counters()?;
        let mut stats = Stats::new(None, 0);
        stats.mode = "kernel";
        stats.total = tracer.histograms()?;
        stats.seen = kernel.aggregated;
        let totals = Totals {
            received: kernel.aggregated,
            undecodable: 0,
            kernel,
        };
        Ok((stats, totals))
    };
    loop {
        tokio::select! {
            _ = stream::next_tick(&mut ticks) => {
                let (stats, totals) = snapshot(&tracer)?;
                report.write(&stats, &totals, monotonic_ns(), false)?;
            }
            _ = stop.wait() => break,
        }
    }
    let (stats, totals) = snapshot(&tracer)?;
    drop(tracer);
    eprintln!("{}", totals.summary());
    report
        .write(&stats, &totals, monotonic_ns(), true)
        .context("writing the report")
}

/// Aggregates per-event (live with --by, or replay).
struct Aggregating<'a> {
    stats: Stats,
    report: &'a mut Report,
}

impl Consumer for Aggregating<'_> {
    fn event(&mut self, t: &Transition) -> io::Result<()> {
        self.stats.record(t);
        Ok(())
    }

    fn interval(&mut self, now_ns: u64) -> io::Result<()> {
        let totals = Totals {
            received: self.stats.seen,
            ..Totals::default()
        };
        self.report.write(&self.stats, &totals, now_ns, false)
    }

    fn finish(&mut self, totals: &Totals) -> io::Result<()> {
        let now = if self.stats.mode == "replay" {
            self.stats.last_ts
        } else {
            monotonic_ns()
        };
        self.report.write(&self.stats, totals, now, true)
    }
}

/// Everything since start: per state overall, and per group with --by.
pub struct Stats {
    mode: &'static str,
    by: Option<GroupBy>,
    /// Groups kept apart; new groups past this many go to "other".
    capacity: usize,
    total: StateHistograms,
    groups: HashMap<String, StateHistograms>,
    other: StateHistograms,
    /// Transitions seen (timed or not).
    seen: u64,
    last_ts: u64,
}

impl Stats {
    pub fn new(by: Option<GroupBy>, top: usize) -> Stats {
        Stats {
            mode: "per-event",
            by,
            // Room beyond --top so that the busiest groups are found among
            // more candidates, yet memory stays bounded.
            capacity: (top * 4).max(64),
            total: StateHistograms::default(),
            groups: HashMap::new(),
            other: StateHistograms::default(),
            seen: 0,
            last_ts: 0,
        }
    }

    pub fn record(&mut self, t: &Transition) {
        self.seen += 1;
        self.last_ts = self.last_ts.max(t.ts_ns);
        let Some(ns) = t.duration_ns else { return };
        self.total.record(t.old_state, ns);
        let Some(by) = self.by else { return };
        let key = group_key(by, t);
        let len = self.groups.len();
        let group = match self.groups.get_mut(&key) {
            Some(g) => g,
            None if len < self.capacity => self.groups.entry(key).or_default(),
            None => &mut self.other,
        };
        group.record(t.old_state, ns);
    }

    /// The `top` busiest groups, busiest first, then "other" if not empty.
    fn ranked(&self, top: usize) -> Vec<(String, StateHistograms)> {
        let mut groups: Vec<(&String, &StateHistograms)> = self.groups.iter().collect();
        groups.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(b.0)));
        let mut other = self.other.clone();
        for (_, h) in groups.iter().skip(top) {
            other.merge(h);
        }
        let mut out: Vec<(String, StateHistograms)> = groups
            .into_iter()
            .take(top)
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        if other.total() > 0 {
            out.push((OTHER.to_string(), other));
        }
        out
    }
}

fn group_key(by: GroupBy, t: &Transition) -> String {
    group_name(by, t.owner.as_ref(), t.lport, t.rport, t.raddr)
}

/// The name of the group a socket belongs to under `--by`.
pub fn group_name(
    by: GroupBy,
    owner: Option<&crate::event::Owner>,
    lport: u16,
    rport: u16,
    raddr: std::net::IpAddr,
) -> String {
    match by {
        GroupBy::Process => match owner {
            Some(o) => format!("{} {}", o.pid, printable_comm(&o.comm)),
            None => "unknown".to_string(),
        },
        GroupBy::Lport => lport.to_string(),
        GroupBy::Rport => rport.to_string(),
        GroupBy::Raddr => raddr.to_string(),
    }
}

struct Report {
    json: bool,
    by: Option<GroupBy>,
    top: usize,
    clock: Clock,
    out: BufWriter<StdoutLock<'static>>,
}

impl Report {
    fn write(&mut self, stats: &Stats, totals: &Totals, now_ns: u64, last: bool) -> io::Result<()> {
        if self.json {
            let mut v = json!({
                "ts_ns": now_ns,
                "final": last,
                "mode": stats.mode,
                "events_seen": stats.seen.max(totals.received),
                "events_dropped": totals.dropped(),
                "states": states_json(&stats.total),
            });
            if let Some(by) = self.by {
                let groups: Vec<Value> = stats
                    .ranked(self.top)
                    .iter()
                    .map(|(key, h)| json!({"key": key, "states": states_json(h)}))
                    .collect();
                v["by"] = json!(format!("{by:?}").to_lowercase());
                v["groups"] = Value::Array(groups);
            }
            serde_json::to_writer(&mut self.out, &v)?;
            writeln!(self.out)?;
        } else {
            let text = render_text(
                stats,
                totals,
                self.by.map(|_| self.top),
                &self.clock,
                now_ns,
                last,
            );
            self.out.write_all(text.as_bytes())?;
        }
        self.out.flush()
    }
}

fn states_json(h: &StateHistograms) -> Value {
    let mut states = Map::new();
    for (state, hist) in h.iter() {
        states.insert(
            state.name().to_string(),
            json!({
                "count": hist.count(),
                "p50_ns": hist.quantile(0.50),
                "p90_ns": hist.quantile(0.90),
                "p99_ns": hist.quantile(0.99),
                "max_ns": hist.max(),
            }),
        );
    }
    Value::Object(states)
}

fn render_text(
    stats: &Stats,
    totals: &Totals,
    top: Option<usize>,
    clock: &Clock,
    now_ns: u64,
    last: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} report: {} transitions seen, {} timed, {} dropped ({} aggregation)",
        clock.local_time(now_ns),
        if last { "final" } else { "interval" },
        stats.seen.max(totals.received),
        stats.total.total(),
        totals.dropped(),
        stats.mode,
    );
    table(&mut s, &stats.total);
    for (state, h) in stats.total.iter() {
        let _ = writeln!(s, "\n{} ({} exits)", state.name(), h.count());
        bars(&mut s, h);
    }
    if let Some(top) = top {
        for (key, h) in stats.ranked(top) {
            let _ = writeln!(s, "\n== {key} ({} timed)", h.total());
            table(&mut s, &h);
        }
    }
    s.push('\n');
    s
}

fn table(s: &mut String, h: &StateHistograms) {
    let _ = writeln!(
        s,
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "STATE", "COUNT", "P50", "P90", "P99", "MAX"
    );
    for (state, hist) in h.iter() {
        let q = |q| hist.quantile(q).map_or("-".into(), human_duration);
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            state.name(),
            hist.count(),
            q(0.5),
            q(0.9),
            q(0.99),
            human_duration(hist.max())
        );
    }
}

/// The 1-2-5 series of range bounds in ns: 1ns, 2ns, 5ns, 10ns, ...
fn one_two_five() -> impl Iterator<Item = u64> {
    (0..19u32).flat_map(|e| [1, 2, 5].map(|m| m * 10u64.pow(e)))
}

/// A bar chart over 1-2-5 ranges (each fine bucket counted in the range
/// holding its lower bound), from the first to the last non-empty range.
pub fn bars(s: &mut String, h: &Histogram) {
    const WIDTH: u64 = 40;
    let bounds: Vec<u64> = one_two_five().collect();
    let mut counts = vec![0u64; bounds.len()];
    for (low, _, n) in h.ranges() {
        let i = bounds.partition_point(|&b| b <= low).saturating_sub(1);
        counts[i] += n;
    }
    let (Some(first), Some(last)) = (
        counts.iter().position(|&n| n > 0),
        counts.iter().rposition(|&n| n > 0),
    ) else {
        return;
    };
    let peak = counts.iter().copied().max().unwrap_or(1).max(1);
    for i in first..=last {
        let low = human_duration(bounds[i]);
        let high = bounds
            .get(i + 1)
            .map_or("inf".to_string(), |&b| human_duration(b));
        let filled = (counts[i] * WIDTH).div_ceil(peak) as usize;
        let _ = writeln!(
            s,
            "  {low:>7} .. {high:<7} |{:<w$}| {}",
            "*".repeat(filled),
            counts[i],
            w = WIDTH as usize
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{from_event, tests::sample_event, TcpState};

    fn transition(old: u8, ns: Option<u64>, pid: u32, rport: u16) -> Transition {
        let mut t = from_event(&sample_event()).unwrap();
        t.old_state = TcpState(old);
        t.duration_ns = ns;
        t.owner.as_mut().unwrap().pid = pid;
        t.rport = rport;
        t
    }

    #[test]
    fn counts_and_quantiles_per_state() {
        let mut s = Stats::new(None, 10);
        for ms in 1..=100 {
            s.record(&transition(1, Some(ms * 1_000_000), 1, 80));
        }
        s.record(&transition(8, Some(5_000), 1, 80));
        s.record(&transition(2, None, 1, 80)); // untimed: seen, not counted
        let v = states_json(&s.total);
        assert_eq!(v["ESTABLISHED"]["count"], 100);
        let p50 = v["ESTABLISHED"]["p50_ns"].as_u64().unwrap();
        assert!((49_000_000..=51_000_000).contains(&p50), "{p50}");
        assert_eq!(v["ESTABLISHED"]["max_ns"], 100_000_000);
        assert_eq!(v["CLOSE_WAIT"]["count"], 1);
        assert!(v.get("SYN_SENT").is_none());
        assert_eq!(s.seen, 102);
    }

    #[test]
    fn top_groups_and_other() {
        let mut s = Stats::new(Some(GroupBy::Rport), 2);
        for (rport, n) in [(80, 5), (443, 3), (22, 2), (25, 1)] {
            for _ in 0..n {
                s.record(&transition(1, Some(1_000), 1, rport));
            }
        }
        let ranked: Vec<(String, u64)> = s
            .ranked(2)
            .into_iter()
            .map(|(k, h)| (k, h.total()))
            .collect();
        assert_eq!(
            ranked,
            [("80".into(), 5), ("443".into(), 3), ("other".into(), 3)]
        );
    }

    #[test]
    fn groups_stay_bounded() {
        let mut s = Stats::new(Some(GroupBy::Rport), 1);
        for rport in 1..=1000 {
            s.record(&transition(1, Some(1_000), 1, rport));
        }
        assert_eq!(s.groups.len(), 64);
        assert_eq!(s.other.total(), 1000 - 64);
        assert_eq!(
            s.ranked(1).iter().map(|(_, h)| h.total()).sum::<u64>(),
            1000
        );
    }

    #[test]
    fn process_groups_name_pid_and_comm() {
        let t = transition(1, Some(1), 42, 80);
        assert_eq!(group_key(GroupBy::Process, &t), "42 curl");
        let mut anon = t.clone();
        anon.owner = None;
        assert_eq!(group_key(GroupBy::Process, &anon), "unknown");
        assert_eq!(group_key(GroupBy::Raddr, &t), "10.1.2.3");
    }

    #[test]
    fn text_report_has_table_and_bars() {
        let mut s = Stats::new(None, 10);
        for us in [3, 3, 3, 40, 700] {
            s.record(&transition(1, Some(us * 1000), 1, 80));
        }
        let text = render_text(
            &s,
            &Totals::default(),
            None,
            &Clock::with_offset(0),
            0,
            true,
        );
        assert!(
            text.contains("final report: 5 transitions seen, 5 timed, 0 dropped"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("ESTABLISHED "))
            .unwrap();
        assert!(row.contains(" 5 ") && row.ends_with("700us"), "{row}");
        let bars: Vec<&str> = text.lines().filter(|l| l.contains('|')).collect();
        // 2us..5us (3), then 5us..1ms empty ranges between, last 500us..1ms (1).
        assert!(
            bars[0].contains("2.0us .. 5.0us") && bars[0].ends_with("| 3"),
            "{text}"
        );
        assert!(bars.last().unwrap().contains("500us .. 1.00ms"), "{text}");
        assert!(bars.iter().any(|b| b.ends_with("| 0")));
    }
}
