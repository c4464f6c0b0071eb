//! `tcp-trace top`: the host's sockets per owner, every interval: counts
//! by state, new connections, handshake p99, resets, the oldest CLOSE_WAIT.
//!
//! Sockets that existed before start come from the kernel's table
//! (sock_diag) with their owners from the start-up scan; transitions move
//! them on. TIME_WAIT, which the tracepoint never shows, comes from
//! `timewait`'s tracker (confirmed against the kernel's timewait table).

mod screen;
mod table;

use std::{fmt::Write as _, io::IsTerminal as _, time::Duration};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Map, Value};

use super::timewait::Tracker;
use crate::{
    aggregate::GroupBy,
    cli::{TopConfig, TopOutput},
    model::{family, Owner, OwnerSource, TcpState, Transition},
    output::{
        add_owner_origin, monotonic_ns, owner_json,
        text::{human_duration, printable_comm},
        Clock, Sink,
    },
    source::{self, Consumer, Timing, Totals},
    system::{owners, sock_diag},
};
use screen::{Screen, View};
use table::{fold, Row, Table, STATES};

/// Columns by which rows sort, as `--sort` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Name,
    Sockets,
    Established,
    SynSent,
    SynRecv,
    CloseWait,
    FinWait1,
    FinWait2,
    LastAck,
    TimeWait,
    NewIn,
    NewOut,
    HandshakeP99,
    Resets,
    OldestCloseWait,
}

impl SortBy {
    /// Sorts busiest (or largest) first; names alphabetically.
    pub fn sort(self, rows: &mut [Row]) {
        let state = |s: TcpState| STATES.iter().position(|x| *x == s).expect("a column");
        let key = |r: &Row| -> u64 {
            match self {
                SortBy::Name => 0,
                SortBy::Sockets => r.sockets(),
                SortBy::Established => r.states[state(TcpState::ESTABLISHED)],
                SortBy::SynSent => r.states[state(TcpState::SYN_SENT)],
                SortBy::SynRecv => r.states[state(TcpState::SYN_RECV)],
                SortBy::CloseWait => r.states[state(TcpState::CLOSE_WAIT)],
                SortBy::FinWait1 => r.states[state(TcpState::FIN_WAIT1)],
                SortBy::FinWait2 => r.states[state(TcpState::FIN_WAIT2)],
                SortBy::LastAck => r.states[state(TcpState::LAST_ACK)],
                SortBy::TimeWait => r.states[state(TcpState::TIME_WAIT)],
                SortBy::NewIn => r.new_in,
                SortBy::NewOut => r.new_out,
                SortBy::HandshakeP99 => r.handshakes.quantile(0.99).unwrap_or(0),
                SortBy::Resets => r.resets,
                SortBy::OldestCloseWait => r.oldest_close_wait.map_or(0, |(age, _)| age),
            }
        };
        rows.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
    }
}

/// Short column headings, in `STATES` order.
const STATE_HEADINGS: [&str; STATES.len()] = [
    "ESTAB",
    "SYN_SENT",
    "SYN_RECV",
    "CLOSE_WAIT",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "LAST_ACK",
    "TIME_WAIT",
];

/// The header and cells of the table, shared by `--batch` and the screen.
pub fn header(by: GroupBy) -> Vec<String> {
    let mut cells = vec![match by {
        GroupBy::Container => "CONTAINER".to_string(),
        _ => "PID COMM".to_string(),
    }];
    cells.extend(STATE_HEADINGS.iter().map(|h| h.to_string()));
    cells.extend(["IN/s", "OUT/s", "HS_P99", "RST/s", "OLDEST_CW"].map(String::from));
    cells
}

pub fn cells(row: &Row, seconds: f64) -> Vec<String> {
    let rate = |n: u64| format!("{:.1}", n as f64 / seconds);
    let mut cells = vec![printable_comm(row.name.as_bytes())];
    cells.extend(row.states.iter().map(u64::to_string));
    cells.push(rate(row.new_in));
    cells.push(rate(row.new_out));
    cells.push(
        row.handshakes
            .quantile(0.99)
            .map_or("-".into(), human_duration),
    );
    cells.push(rate(row.resets));
    cells.push(match row.oldest_close_wait {
        Some((age, lower_bound)) => format!(
            "{}{}",
            if lower_bound { ">=" } else { "" },
            human_duration(age)
        ),
        None => "-".into(),
    });
    cells
}

/// The line above the table.
fn title(rows: &[Row], when: &str, dropped: u64) -> String {
    let sockets: u64 = rows.iter().map(Row::sockets).sum();
    format!(
        "{when}  {} rows, {sockets} sockets, {dropped} transitions dropped",
        rows.len()
    )
}

fn text(rows: &[Row], by: GroupBy, seconds: f64, when: &str, dropped: u64) -> String {
    let mut lines = vec![header(by)];
    lines.extend(rows.iter().map(|r| cells(r, seconds)));
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = title(rows, when, dropped);
    out.push('\n');
    for line in lines {
        let (first, rest) = line.split_first().expect("a name cell");
        let _ = write!(out, "{first:<w$}", w = widths[0]);
        for (cell, w) in rest.iter().zip(&widths[1..]) {
            let _ = write!(out, " {cell:>w$}");
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

fn json_report(rows: &[Row], by: GroupBy, seconds: f64, now_ns: u64, dropped: u64) -> Value {
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| {
            let states: Map<String, Value> = STATES
                .iter()
                .zip(r.states)
                .map(|(s, n)| (s.name().to_string(), json!(n)))
                .collect();
            // A container's row is many processes: no pid or comm of one.
            let process = (by == GroupBy::Process)
                .then_some(r.owner.as_ref())
                .flatten();
            let (pid, comm) = owner_json(process);
            let mut v = json!({
                "name": r.name,
                "pid": pid,
                "comm": comm,
                "states": states,
                "new_in_per_s": r.new_in as f64 / seconds,
                "new_out_per_s": r.new_out as f64 / seconds,
                "handshake_p99_ns": r.handshakes.quantile(0.99),
                "resets_per_s": r.resets as f64 / seconds,
                "oldest_close_wait_ns": r.oldest_close_wait.map(|o| o.0),
                "oldest_close_wait_lower_bound": r.oldest_close_wait.map(|o| o.1),
            });
            add_owner_origin(&mut v, r.owner.as_ref());
            v
        })
        .collect();
    json!({"type": "top", "ts_ns": now_ns, "interval_s": seconds, "dropped": dropped, "rows": rows})
}

struct Top {
    table: Table,
    tracker: Tracker,
    by: GroupBy,
    sort: SortBy,
    /// Rows shown; the rest fold into `other`.
    max_rows: usize,
    out: Output,
    last_ns: u64,
    /// Time between tables (the screen's ticks come faster, for its keys).
    every_ns: u64,
}

enum Output {
    /// `--batch` or `--json`.
    Lines(Sink),
    /// The full-screen view; the terminal is open from `start` until the
    /// end or `q`.
    Screen(View, Option<Screen>),
}

/// `q` on the screen: the run ends there, as any stop does.
#[derive(Debug)]
struct Quit;

impl std::fmt::Display for Quit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("quit")
    }
}

impl std::error::Error for Quit {}

/// How often the screen reads the keys.
const KEY_TICK: Duration = Duration::from_millis(100);

impl Top {
    /// The rows as of now, sorted, and the seconds since the last ones.
    fn rows(&mut self, now_ns: u64) -> Result<(Vec<Row>, f64)> {
        self.tracker.apply_pending()?;
        let mut rows = self
            .table
            .rows(now_ns, self.tracker.ledger.timewait_states());
        self.sort.sort(&mut rows);
        let rows = fold(rows, self.max_rows);
        let seconds = (now_ns.saturating_sub(self.last_ns) as f64 / 1e9).max(1e-3);
        self.last_ns = now_ns;
        Ok((rows, seconds))
    }

    fn report(&mut self, now_ns: u64, totals: &Totals) -> Result<()> {
        let (rows, seconds) = self.rows(now_ns)?;
        let (by, dropped) = (self.by, totals.dropped());
        match &mut self.out {
            Output::Lines(sink) => sink.report(
                || json_report(&rows, by, seconds, now_ns, dropped),
                |clock: &Clock| text(&rows, by, seconds, &clock.local_time(now_ns), dropped),
            ),
            Output::Screen(view, screen) => {
                let when = Clock::now().local_time(now_ns);
                view.update(rows.clone(), seconds, title(&rows, &when, dropped));
                match screen {
                    Some(screen) => screen.draw(view),
                    None => Ok(()),
                }
            }
        }
    }

    /// The screen's tick: keys now, a new table when one is due.
    fn tick(&mut self, now_ns: u64, totals: &Totals) -> Result<()> {
        if let Output::Screen(view, Some(screen)) = &mut self.out {
            let (quit, changed) = screen.keys(view)?;
            if quit {
                // Restore the terminal before the exit summary is printed.
                self.out = Output::Screen(View::new(self.sort, self.by), None);
                return Err(anyhow!(Quit));
            }
            if changed {
                screen.draw(view)?;
            }
        }
        if now_ns.saturating_sub(self.last_ns) >= self.every_ns {
            self.report(now_ns, totals)?;
        }
        Ok(())
    }
}

impl Consumer for Top {
    fn start(&mut self) -> Result<()> {
        self.last_ns = monotonic_ns();
        self.tracker.start()?;
        if let Output::Screen(_, screen) = &mut self.out {
            *screen = Some(Screen::open()?);
        }
        Ok(())
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        self.tracker.event(t);
        self.table.event(t);
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, totals: &Totals) -> Result<()> {
        self.tick(now_ns, totals)
    }

    fn finish(&mut self, _totals: &Totals) -> Result<()> {
        if let Output::Screen(_, screen) = &mut self.out {
            *screen = None;
        }
        Ok(())
    }
}

/// Every socket in the kernel's table now, with its holder where the scan
/// found one (orphans and unaccepted connections have none), as far as the
/// filter lets them through. A failed scan leaves owners unknown.
fn existing_sockets(table: &mut Table, filter: &tcp_trace_common::Filter) -> Result<()> {
    let holders: std::collections::HashMap<u64, owners::Holder> = match owners::scan() {
        Ok(scan) => scan
            .connections
            .into_iter()
            .map(|o| (o.socket.inode, o.holder))
            .collect(),
        Err(err) => {
            eprintln!("tcp-trace: warning: owners of existing sockets stay unknown: {err:#}");
            Default::default()
        }
    };
    for s in sock_diag::tcp_sockets()? {
        let e = s.endpoints;
        let holder = holders.get(&s.inode);
        if !filter.matches(family(e.laddr), e.lport, e.rport, holder.map(|h| h.pid)) {
            continue;
        }
        let owner = holder.map(|h| Owner::process(h.pid, h.comm.as_bytes(), OwnerSource::Scan));
        table.existing(e, TcpState(s.state), owner);
    }
    Ok(())
}

pub fn run(config: TopConfig) -> Result<()> {
    if config.output == TopOutput::Screen && !std::io::stdout().is_terminal() {
        bail!("the full-screen view needs a terminal: use --batch or --json for a pipe or a file");
    }
    let filter = config.tracing.filter;
    let mut table = Table::new(
        config.by,
        config.tracing.max_sockets as usize,
        monotonic_ns(),
    );
    // Read with full privileges, before attaching drops them.
    existing_sockets(&mut table, &filter)?;
    let mut top = Top {
        table,
        tracker: Tracker::new(filter)?,
        by: config.by,
        sort: config.sort,
        max_rows: config.rows,
        out: match config.output {
            TopOutput::Screen => Output::Screen(View::new(config.sort, config.by), None),
            TopOutput::Batch => Output::Lines(Sink::stdout(false)),
            TopOutput::Json => Output::Lines(Sink::stdout(true)),
        },
        last_ns: 0,
        every_ns: config.interval.as_nanos() as u64,
    };
    let tick = match config.output {
        TopOutput::Screen => KEY_TICK.min(config.interval),
        _ => config.interval,
    };
    let timing = Timing {
        duration: config.tracing.duration,
        interval: Some(tick),
    };
    let ran = source::block_on(source::live(&config.tracing.streaming(), timing, &mut top));
    match ran {
        Err(err) if err.is::<Quit>() => Ok(()),
        ran => ran,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, established: u64, resets: u64) -> Row {
        let mut r = Row {
            name: name.into(),
            resets,
            ..Default::default()
        };
        r.states[0] = established;
        r
    }

    #[test]
    fn rows_sort_by_any_column_busiest_first() {
        let mut rows = vec![row("b", 1, 9), row("a", 5, 0), row("c", 5, 1)];
        SortBy::Established.sort(&mut rows);
        let names: Vec<_> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "c", "b"]);
        SortBy::Resets.sort(&mut rows);
        assert_eq!(rows[0].name, "b");
        SortBy::Name.sort(&mut rows);
        assert_eq!(rows[0].name, "a");
    }

    #[test]
    fn json_rows_name_a_process_only_when_rows_are_processes() {
        let mut r = row("42 app", 3, 0);
        r.owner = Some(Owner::process(42, b"app", OwnerSource::Task));
        let rows = [r];
        let v = json_report(&rows, GroupBy::Process, 1.0, 0, 0);
        assert_eq!(
            (
                v["rows"][0]["pid"].clone(),
                v["rows"][0]["states"]["ESTABLISHED"].clone()
            ),
            (json!(42), json!(3))
        );
        let v = json_report(&rows, GroupBy::Container, 1.0, 0, 0);
        assert_eq!(v["rows"][0]["pid"], Value::Null);
    }

    #[test]
    fn the_text_table_aligns_and_marks_lower_bounds() {
        let mut r = row("42 app", 3, 2);
        r.oldest_close_wait = Some((5_000_000_000, true));
        let out = text(&[r], GroupBy::Process, 2.0, "12:00:00", 0);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("1 rows, 3 sockets"), "{out}");
        assert!(
            lines[1].starts_with("PID COMM") && lines[1].ends_with("OLDEST_CW"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("42 app") && lines[2].ends_with(">=5.00s"),
            "{out}"
        );
        assert!(lines[2].contains(" 1.0 "), "2 resets in 2 s: {out}");
        assert_eq!(lines[1].len(), lines[2].len(), "{out}");
    }
}
