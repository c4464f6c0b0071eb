//! The timewait report: per process, then what we cannot attribute, then
//! warnings about the ephemeral port range, as JSON or text.

use std::{fmt::Write as _, net::IpAddr};

use serde_json::{json, Map, Value};

use super::ledger::{Ledger, ProcessKey, ProcessRow};
use crate::{
    aggregate::{group_name, Group, GroupBy, Merge},
    output::{
        quantiles_json,
        text::{endpoint, max_cell, printable_comm, quantile_cell, report_kind},
        Clock,
    },
    system::sysctl::Sysctls,
};

/// Top remote endpoints listed per process.
const TOP_REMOTES: usize = 3;

/// Whose row it is.
enum RowOwner {
    Process(ProcessKey),
    /// With `--by`: the processes of one container, unit or cgroup.
    Group(String),
    /// Processes past the ledger's capacity, counted together.
    Other,
    Unknown,
}

impl RowOwner {
    fn text_cells(&self) -> (String, String) {
        match self {
            RowOwner::Process((pid, comm)) => (pid.to_string(), printable_comm(comm)),
            RowOwner::Group(name) => ("-".into(), printable_comm(name.as_bytes())),
            RowOwner::Other => ("-".into(), "(other processes)".into()),
            RowOwner::Unknown => ("-".into(), "(owner unknown)".into()),
        }
    }
}

/// Rows with most entries first (ties by owner), the unknown owner last;
/// with `by`, process rows folded into one per group.
fn ranked_rows(ledger: &Ledger, by: Option<GroupBy>) -> Vec<(RowOwner, ProcessRow)> {
    let ranked = ledger.rows.ranked(usize::MAX, |r| r.entered);
    let mut rows: Vec<(RowOwner, ProcessRow)> = match by {
        None => ranked
            .into_iter()
            .map(|(group, row)| match group {
                Group::Key(key) => (RowOwner::Process(key), row),
                Group::Other => (RowOwner::Other, row),
            })
            .collect(),
        Some(by) => {
            let mut groups: std::collections::BTreeMap<String, ProcessRow> = Default::default();
            for (group, row) in ranked {
                let name = match group {
                    Group::Key(key) => {
                        let owner = ledger.owners.get(&key);
                        group_name(by, owner, 0, 0, std::net::Ipv4Addr::UNSPECIFIED.into())
                    }
                    Group::Other => "other".into(),
                };
                groups.entry(name).or_default().merge(&row);
            }
            let mut rows: Vec<_> = groups.into_iter().collect();
            rows.sort_by(|a, b| b.1.entered.cmp(&a.1.entered).then(a.0.cmp(&b.0)));
            rows.into_iter()
                .map(|(name, row)| (RowOwner::Group(name), row))
                .collect()
        }
    };
    let unknown = &ledger.unknown_owner;
    if unknown.entered + unknown.without_timewait > 0 {
        rows.push((RowOwner::Unknown, unknown.clone()));
    }
    rows
}

fn remote_name(addr: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(p) => endpoint(addr, p),
        None => addr.to_string(),
    }
}

fn per_second(n: u64, elapsed_s: f64) -> f64 {
    if elapsed_s > 0.0 {
        n as f64 / elapsed_s
    } else {
        0.0
    }
}

fn elapsed_s(ledger: &Ledger, now_ns: u64) -> f64 {
    now_ns.saturating_sub(ledger.started_ns) as f64 / 1e9
}

pub fn json(
    ledger: &Ledger,
    by: Option<GroupBy>,
    now_ns: u64,
    last: bool,
    sysctls: &Sysctls,
    dropped: u64,
) -> Value {
    let elapsed = elapsed_s(ledger, now_ns);
    let processes: Vec<Value> = ranked_rows(ledger, by)
        .into_iter()
        .map(|(owner, row)| {
            let (pid, comm) = match owner {
                RowOwner::Process((pid, comm)) => {
                    (json!(pid), json!(String::from_utf8_lossy(&comm)))
                }
                RowOwner::Group(name) => (Value::Null, json!(name)),
                RowOwner::Other => (Value::Null, json!("(other processes)")),
                RowOwner::Unknown => (Value::Null, Value::Null),
            };
            // Under --by a row is a group: its name is `key`, not a comm.
            let (name_field, name) = match by {
                Some(_) => ("key", comm),
                None => ("comm", comm),
            };
            let remotes: Vec<Value> = row
                .top_remotes(TOP_REMOTES)
                .into_iter()
                .map(|((a, p), n)| json!({"raddr": a, "rport": p, "entered": n}))
                .collect();
            let mut line = json!({
                "pid": pid,
                "entered": row.entered,
                "entered_per_s": per_second(row.entered, elapsed),
                "lingering": row.lingering,
                "closed_without_timewait": row.without_timewait,
                "time_wait": quantiles_json(&row.stay),
                "top_remotes": remotes,
            });
            line[name_field] = name;
            if by.is_some() {
                line.as_object_mut().map(|o| o.remove("pid"));
            }
            line
        })
        .collect();
    let pressure: Vec<Value> = sysctls
        .port_range
        .map(|r| ledger.pressure(r))
        .unwrap_or_default()
        .into_iter()
        .map(|(a, p, n, f)| json!({"raddr": a, "rport": p, "lingering": n, "port_range_fraction": f}))
        .collect();
    let sysctl_values: Map<String, Value> = sysctls
        .values
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "ts_ns": now_ns,
        "final": last,
        "sysctls": sysctl_values,
        (if by.is_some() { "groups" } else { "processes" }): processes,
        "before_start": {"lingering": ledger.before_start.len()},
        "unattributed": {"lingering": ledger.unattributed.len()},
        "lingering_total": ledger.lingering_total(),
        "namespaces": ledger
            .lingering_by_netns()
            .into_iter()
            .map(|(netns, lingering)| json!({"netns": netns, "lingering": lingering}))
            .collect::<Vec<_>>(),
        "out_of_reach": ledger.out_of_reach,
        "port_pressure": pressure,
        "events_dropped": dropped,
    })
}

pub fn text(
    ledger: &Ledger,
    by: Option<GroupBy>,
    now_ns: u64,
    last: bool,
    sysctls: &Sysctls,
    dropped: u64,
    clock: &Clock,
) -> String {
    let mut s = String::new();
    let settings: Vec<String> = sysctls
        .values
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        s,
        "{} {} timewait report: {}",
        clock.local_time(now_ns),
        report_kind(last),
        settings.join(" ")
    );
    let (first, second) = match by {
        Some(by) => ("-".to_string(), by.name().to_uppercase()),
        None => ("PID".to_string(), "COMM".to_string()),
    };
    let _ = writeln!(
        s,
        "{:>7} {:<16} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}  TOP REMOTES",
        first, second, "ENTERED", "PER_S", "LINGERING", "P50", "P90", "MAX", "NO_TW"
    );
    let elapsed = elapsed_s(ledger, now_ns);
    for (owner, row) in ranked_rows(ledger, by) {
        let (pid, comm) = owner.text_cells();
        let top: Vec<String> = row
            .top_remotes(TOP_REMOTES)
            .into_iter()
            .map(|((a, p), n)| format!("{} ({n})", remote_name(a, p)))
            .collect();
        let _ = writeln!(
            s,
            "{pid:>7} {comm:<16} {:>8} {:>7.1} {:>9} {:>8} {:>8} {:>8} {:>8}  {}",
            row.entered,
            per_second(row.entered, elapsed),
            row.lingering,
            quantile_cell(&row.stay, 0.5),
            quantile_cell(&row.stay, 0.9),
            max_cell(&row.stay),
            row.without_timewait,
            top.join(", ")
        );
    }
    for (label, count) in [
        ("(before start)", ledger.before_start.len()),
        ("(unattributed)", ledger.unattributed.len()),
    ] {
        if count > 0 {
            let _ = writeln!(
                s,
                "{:>7} {:<16} {:>8} {:>7} {:>9}",
                "-", label, "-", "-", count
            );
        }
    }
    let namespaces = ledger.lingering_by_netns();
    if namespaces.len() > 1 {
        let cells: Vec<String> = namespaces
            .iter()
            .map(|(netns, n)| format!("{netns}: {n}"))
            .collect();
        let _ = writeln!(s, "lingering per network namespace: {}", cells.join(", "));
    }
    if ledger.out_of_reach > 0 {
        let _ = writeln!(
            s,
            "{} closes in network namespaces no process of which was left to read: unconfirmed",
            ledger.out_of_reach
        );
    }
    if dropped > 0 {
        let _ = writeln!(
            s,
            "{dropped} transitions dropped so far (host-wide; see the summary): \
             counts may be short by as many"
        );
    }
    if let Some(range) = sysctls.port_range {
        for (a, p, n, f) in ledger.pressure(range) {
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
