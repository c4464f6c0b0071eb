//! `tcp-trace stats`: where the time goes, per state, optionally per group.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::{
    aggregate::{group_name, BoundedGroups, Group, GroupBy, StateHistograms},
    cli::StatsConfig,
    kernel::{Program, Settings},
    model::Transition,
    output::{
        bars::bars,
        monotonic_ns, quantiles_json,
        text::{human_duration, printable_comm, quantile_cell, report_kind},
        Clock, Sink,
    },
    source::{self, Consumer, Stop, Timing, Totals},
};

/// Name of the group that collects everything past `--top`.
const OTHER: &str = "other";

/// How the figures were gathered, as reports say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Kernel,
    PerEvent,
    Replay,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::PerEvent => "per-event",
            Mode::Replay => "replay",
        }
    }
}

pub fn run(config: StatsConfig) -> Result<()> {
    let mut report = Report {
        sink: Sink::stdout(config.json),
        by: config.by,
        top: config.top,
    };
    if let Some(path) = &config.from {
        let mut consumer = Aggregating {
            stats: Stats::new(Mode::Replay, config.by, config.top),
            report: &mut report,
        };
        return source::replay(
            path,
            &config.tracing.filter,
            config.tracing.cgroup.as_deref(),
            config.interval,
            &mut consumer,
        );
    }
    let settings = Settings {
        aggregate: config.by.is_none(),
        ..config.tracing.streaming()
    };
    let timing = Timing {
        duration: config.tracing.duration,
        interval: config.interval,
    };
    if settings.aggregate {
        source::block_on(in_kernel(&settings, timing, &mut report))
    } else {
        let mut consumer = Aggregating {
            stats: Stats::new(Mode::PerEvent, config.by, config.top),
            report: &mut report,
        };
        source::block_on(source::live(&settings, timing, &mut consumer))
    }
}

/// Lowest-overhead mode: the kernel aggregates, nothing is streamed; reports
/// read its histograms.
async fn in_kernel(settings: &Settings, timing: Timing, report: &mut Report) -> Result<()> {
    let (program, _events) = Program::attach(settings)?;
    let mut stop = Stop::new(timing.duration)?;
    let mut ticks = source::ticker(timing.interval);
    source::announce(&program.mechanism());
    let snapshot = |program: &Program| -> Result<(Stats, Totals)> {
        let kernel = program.counters()?;
        let mut stats = Stats::new(Mode::Kernel, None, 0);
        stats.total = program.sums()?.states;
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
            _ = source::next_tick(&mut ticks) => {
                let (stats, totals) = snapshot(&program)?;
                report.write(&stats, &totals, Some(monotonic_ns()), false)?;
            }
            _ = stop.wait() => break,
        }
    }
    let (stats, totals) = snapshot(&program)?;
    drop(program);
    eprintln!("{}", totals.summary());
    report.write(&stats, &totals, Some(monotonic_ns()), true)
}

/// Aggregates per-event (live with --by, or replay).
struct Aggregating<'a> {
    stats: Stats,
    report: &'a mut Report,
}

impl Consumer for Aggregating<'_> {
    fn event(&mut self, t: &Transition) -> Result<()> {
        // An accept is no stay in a state: the kernel's aggregation skips it too.
        if !t.accept {
            self.stats.record(t);
        }
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, totals: &Totals) -> Result<()> {
        self.report.write(&self.stats, totals, Some(now_ns), false)
    }

    fn finish(&mut self, totals: &Totals) -> Result<()> {
        // A replay ends at its last event; an empty one has no time at all.
        let now = match self.stats.mode {
            Mode::Replay => (self.stats.seen > 0).then_some(self.stats.last_ts),
            _ => Some(monotonic_ns()),
        };
        self.report.write(&self.stats, totals, now, true)
    }
}

/// Everything since start: per state overall, and per group with --by.
pub struct Stats {
    mode: Mode,
    by: Option<GroupBy>,
    total: StateHistograms,
    groups: BoundedGroups<String, StateHistograms>,
    /// Transitions seen (timed or not).
    seen: u64,
    last_ts: u64,
}

impl Stats {
    fn new(mode: Mode, by: Option<GroupBy>, top: usize) -> Stats {
        Stats {
            mode,
            by,
            total: StateHistograms::default(),
            groups: BoundedGroups::for_top(top),
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
        self.groups.entry(group_key(by, t)).record(t.old_state, ns);
    }

    /// The `top` busiest groups, busiest first, then "other" if not empty.
    fn ranked(&self, top: usize) -> Vec<(String, StateHistograms)> {
        self.groups
            .ranked(top, StateHistograms::total)
            .into_iter()
            .map(|(group, h)| match group {
                Group::Key(key) => (key, h),
                Group::Other => (OTHER.to_string(), h),
            })
            .collect()
    }
}

fn group_key(by: GroupBy, t: &Transition) -> String {
    group_name(by, t.owner.as_ref(), t.lport, t.rport, t.raddr)
}

struct Report {
    sink: Sink,
    by: Option<GroupBy>,
    top: usize,
}

impl Report {
    /// One report as of `now_ns` (`None`: a replay without events).
    fn write(
        &mut self,
        stats: &Stats,
        totals: &Totals,
        now_ns: Option<u64>,
        last: bool,
    ) -> Result<()> {
        let (by, top) = (self.by, self.top);
        self.sink.report(
            || {
                let mut v = json!({
                    "ts_ns": now_ns,
                    "final": last,
                    "mode": stats.mode.name(),
                    "events_seen": stats.seen.max(totals.received),
                    "events_dropped": totals.dropped(),
                    "states": states_json(&stats.total),
                });
                if let Some(by) = by {
                    let groups: Vec<Value> = stats
                        .ranked(top)
                        .iter()
                        .map(|(key, h)| json!({"key": key, "states": states_json(h)}))
                        .collect();
                    v["by"] = json!(by.name());
                    v["groups"] = Value::Array(groups);
                }
                v
            },
            |clock| render_text(stats, totals, by.map(|_| top), clock, now_ns, last),
        )
    }
}

fn states_json(h: &StateHistograms) -> Value {
    let states: Map<String, Value> = h
        .iter()
        .map(|(state, hist)| (state.name().to_string(), quantiles_json(hist)))
        .collect();
    Value::Object(states)
}

fn render_text(
    stats: &Stats,
    totals: &Totals,
    top: Option<usize>,
    clock: &Clock,
    now_ns: Option<u64>,
    last: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} report: {} transitions seen, {} timed, {} dropped ({} aggregation)",
        now_ns.map_or_else(|| "-".into(), |ns| clock.local_time(ns)),
        report_kind(last),
        stats.seen.max(totals.received),
        stats.total.total(),
        totals.dropped(),
        stats.mode.name(),
    );
    table(&mut s, &stats.total);
    for (state, h) in stats.total.iter() {
        let _ = writeln!(s, "\n{} ({} exits)", state.name(), h.count());
        bars(&mut s, h);
    }
    if let Some(top) = top {
        for (key, h) in stats.ranked(top) {
            let key = printable_comm(key.as_bytes());
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
        let _ = writeln!(
            s,
            "{:<12} {:>9} {:>9} {:>9} {:>9} {:>9}",
            state.name(),
            hist.count(),
            quantile_cell(hist, 0.5),
            quantile_cell(hist, 0.9),
            quantile_cell(hist, 0.99),
            human_duration(hist.max())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event, TcpState};

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
        let mut s = Stats::new(Mode::PerEvent, None, 10);
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
        let mut s = Stats::new(Mode::PerEvent, Some(GroupBy::Rport), 2);
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
        let mut s = Stats::new(Mode::PerEvent, Some(GroupBy::Rport), 1);
        for rport in 1..=1000 {
            s.record(&transition(1, Some(1_000), 1, rport));
        }
        assert_eq!(s.groups.len(), 64);
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
    fn an_empty_replay_invents_no_time() {
        let s = Stats::new(Mode::Replay, None, 10);
        let text = render_text(
            &s,
            &Totals::default(),
            None,
            &Clock::with_offset(0),
            None,
            true,
        );
        assert!(
            text.starts_with("- final report: 0 transitions seen"),
            "{text}"
        );
    }

    #[test]
    fn text_report_has_table_and_bars() {
        let mut s = Stats::new(Mode::PerEvent, None, 10);
        for us in [3, 3, 3, 40, 700] {
            s.record(&transition(1, Some(us * 1000), 1, 80));
        }
        let text = render_text(
            &s,
            &Totals::default(),
            None,
            &Clock::with_offset(0),
            Some(0),
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
