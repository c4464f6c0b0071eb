//! The precise TIME_WAIT path: whether this kernel offers it (the kprobe
//! PMU, the timewait functions as symbols, the timewait socket's fields in
//! BTF), attaching its kprobes, and the start-up line's word on how TIME_WAIT
//! is followed. Without it the commands confirm timewait sockets by reading
//! the kernel's table through sock_diag, as before.

use std::{
    fmt,
    io::{BufRead as _, BufReader},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::{programs::KProbe, Ebpf};
use tcp_trace_common::TwOffsets;

use super::{btf::Btf, owners::Members, probe::Probe, program::program_as};

/// The start-up notes' name for the path.
const PRECISE: &str = "TIME_WAIT timed by kprobes on the kernel's timewait functions";

/// Where the kernel's kprobe PMU announces itself.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// Functions that hash a new timewait socket, newest kernels first (6.10
/// merged the scheduling into it).
const ENTRIES: [&str; 2] = ["inet_twsk_hashdance_schedule", "inet_twsk_hashdance"];
/// Re-arming a timewait socket's timer (the peer's FIN moves it to TIME_WAIT).
const REARM: &str = "__inet_twsk_schedule";
/// Every timewait socket's death goes through it: from its timer
/// (`tw_timer_handler`) and from `inet_twsk_deschedule_put` (a SYN or a
/// `connect()` reusing it, a reset, its namespace's teardown).
const EXIT: &str = "inet_twsk_kill";

/// The BPF programs, in `tcp-trace-ebpf/src/timewait.rs`.
const ENTRY_PROGRAM: &str = "timewait_entry";
const REARM_PROGRAM: &str = "timewait_rearmed";
const EXIT_PROGRAM: &str = "timewait_exit";
/// The programs whose skipped runs are records lost.
pub(super) const PROGRAMS: [&str; 3] = [ENTRY_PROGRAM, REARM_PROGRAM, EXIT_PROGRAM];

/// How TIME_WAIT is followed, for the start-up line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimewaitMethod {
    /// Kprobes on these entry and exit functions.
    Probes {
        entry: &'static str,
        exit: &'static str,
    },
    /// Readings of the timewait table through sock_diag, this often.
    Table(Duration),
}

impl fmt::Display for TimewaitMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimewaitMethod::Probes { entry, exit } => {
                write!(f, "TIME_WAIT from kprobes on {entry} and {exit}")
            }
            TimewaitMethod::Table(every) => write!(
                f,
                "TIME_WAIT confirmed by sock_diag every {} s",
                every.as_secs_f64()
            ),
        }
    }
}

/// What attaching the path takes: the offsets and the entry function found.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plan {
    pub offsets: TwOffsets,
    pub entry: &'static str,
}

/// Whether to try the path: unless `TCP_TRACE_TIMEWAIT_PROBES=0` (the test
/// suite's way to run the sock_diag path on kernels that have kprobes).
fn wanted() -> bool {
    std::env::var("TCP_TRACE_TIMEWAIT_PROBES").as_deref() != Ok("0")
}

/// The plan where this kernel offers the path; `None` and a note saying
/// why where it does not.
pub(super) fn plan(btf: Option<&Btf>, probe: &mut Probe) -> Option<Plan> {
    if !wanted() {
        probe.missing(PRECISE, "TCP_TRACE_TIMEWAIT_PROBES=0");
        return None;
    }
    if !Path::new(KPROBE_PMU).exists() {
        probe.missing(PRECISE, "no kprobes in this kernel (no kprobe PMU)");
        return None;
    }
    let Some(btf) = btf else {
        probe.missing(PRECISE, "no kernel BTF");
        return None;
    };
    let symbols = match kernel_symbols(&[ENTRIES[0], ENTRIES[1], REARM, EXIT]) {
        Ok(found) => found,
        Err(err) => {
            probe.missing(PRECISE, format!("{err:#}"));
            return None;
        }
    };
    let Some(entry) = ENTRIES.into_iter().find(|e| symbols.contains(e)) else {
        probe.missing(
            PRECISE,
            format!("no {} in /proc/kallsyms", ENTRIES.join(" or ")),
        );
        return None;
    };
    if let Some(absent) = [REARM, EXIT].into_iter().find(|s| !symbols.contains(s)) {
        probe.missing(PRECISE, format!("no {absent} in /proc/kallsyms"));
        return None;
    }
    let offsets = offsets(btf, probe)?;
    Some(Plan { offsets, entry })
}

/// The timewait socket's fields: its `sock_common` comes first, so they
/// sit where a full socket's do.
fn offsets(btf: &Btf, probe: &mut Probe) -> Option<TwOffsets> {
    let mut members = Members::new(btf);
    let mut member = |ty: &str, name: &str, size: u32| members.offset(ty, name, size);
    let mut offsets = TwOffsets {
        family: member("sock_common", "skc_family", 2),
        num: member("sock_common", "skc_num", 2),
        dport: member("sock_common", "skc_dport", 2),
        rcv_saddr: member("sock_common", "skc_rcv_saddr", 4),
        daddr: member("sock_common", "skc_daddr", 4),
        v6_rcv_saddr: member("sock_common", "skc_v6_rcv_saddr", 16),
        v6_daddr: member("sock_common", "skc_v6_daddr", 16),
        net: member("sock_common", "skc_net", 8),
        net_inum: 0,
        substate: member("inet_timewait_sock", "tw_substate", 1),
    };
    match btf.member("net", "ns").zip(btf.member("ns_common", "inum")) {
        Some(((ns, _), (inum, 4))) => offsets.net_inum = ns + inum,
        _ => members.missing.push("net.ns.inum".into()),
    }
    if btf
        .member("inet_timewait_sock", "__tw_common")
        .map(|(offset, _)| offset)
        != Some(0)
    {
        members
            .missing
            .push("inet_timewait_sock.__tw_common at offset 0".into());
    }
    members.all_found(probe, PRECISE).then_some(offsets)
}

/// Which of `names` the kernel lists as symbols.
fn kernel_symbols(names: &[&'static str]) -> Result<Vec<&'static str>> {
    let file = std::fs::File::open("/proc/kallsyms").context("reading /proc/kallsyms")?;
    let mut found = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.context("reading /proc/kallsyms")?;
        // "ADDRESS TYPE NAME [MODULE]"
        let Some(name) = line.split_whitespace().nth(2) else {
            continue;
        };
        if let Some(&known) = names.iter().find(|&&n| n == name) {
            if !found.contains(&known) {
                found.push(known);
            }
        }
    }
    Ok(found)
}

/// Loads and attaches the three probes.
pub(super) fn attach(ebpf: &mut Ebpf, plan: &Plan) -> Result<()> {
    for (program, function) in [
        (ENTRY_PROGRAM, plan.entry),
        (REARM_PROGRAM, REARM),
        (EXIT_PROGRAM, EXIT),
    ] {
        let kprobe: &mut KProbe = program_as(ebpf, program, "kprobe")?;
        kprobe
            .load()
            .with_context(|| format!("the kernel's verifier rejected {program}"))?;
        kprobe
            .attach(function, 0)
            .with_context(|| format!("attaching a kprobe to {function}"))?;
    }
    Ok(())
}

/// The method for the start-up line once attached.
pub(super) fn probes(plan: &Plan) -> TimewaitMethod {
    TimewaitMethod::Probes {
        entry: plan.entry,
        exit: EXIT,
    }
}

/// Records that the path could not be attached, and why.
pub(super) fn fell_back(probe: &mut Probe, err: &anyhow::Error) {
    probe.missing(PRECISE, format!("{err:#}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_the_method() {
        let probes = TimewaitMethod::Probes {
            entry: "inet_twsk_hashdance",
            exit: EXIT,
        };
        assert_eq!(
            probes.to_string(),
            "TIME_WAIT from kprobes on inet_twsk_hashdance and inet_twsk_kill"
        );
        assert_eq!(
            TimewaitMethod::Table(Duration::from_secs(1)).to_string(),
            "TIME_WAIT confirmed by sock_diag every 1 s"
        );
    }

    #[test]
    fn this_kernel_offers_the_fields() {
        let btf = Btf::from_sys_fs().unwrap();
        let mut probe = Probe::default();
        let offsets = offsets(&btf, &mut probe)
            .unwrap_or_else(|| panic!("{:?}", probe.notes().collect::<Vec<_>>()));
        assert_eq!(offsets.family, 16, "as in a full socket");
        assert!(offsets.substate > offsets.v6_daddr, "after sock_common");
    }
}
