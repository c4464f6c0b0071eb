//! A running tcp-trace, as `bench` and `soak` drive it: its programs, CPU
//! time, memory and exit summary.

use std::{
    collections::HashSet,
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::programs::loaded_programs;

/// A running agent.
pub struct Agent {
    /// What the start-up owner scan said it found, and how long it took.
    pub scan: Option<String>,
    child: Child,
    stderr: mpsc::Receiver<String>,
    /// Its programs on `inet_sock_set_state`.
    pub programs: Vec<u32>,
    /// Every program it loaded (`accept()`'s, exits', SYN-ACK's too).
    pub every_program: Vec<u32>,
}

/// Names (as the kernel keeps them: 15 bytes) of the programs that run on
/// `inet_sock_set_state`: the classic one, the BTF one and its classic
/// helper, and the floors.
const TRANSITION_PROGRAMS: [&str; 4] = [
    "inet_sock_set",
    "sock_set_state",
    "task_context",
    "bench_floor",
];
/// The helper that runs beside the BTF program: its time counts, its runs
/// do not (one transition, two runs).
const HELPER: &str = "task_context";

/// The ids of the programs loaded now: all, or only those on the tracepoint.
fn loaded(on_transitions_only: bool) -> HashSet<u32> {
    loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| {
            !on_transitions_only
                || p.name_as_str()
                    .is_some_and(|n| TRANSITION_PROGRAMS.iter().any(|t| n.starts_with(t)))
        })
        .map(|p| p.id())
        .collect()
}

/// Run time (ns) of the agent's programs on the tracepoint, and the
/// transitions they ran for.
pub fn program_stats(ids: &[u32]) -> (u64, u64) {
    loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| ids.contains(&p.id()))
        .fold((0, 0), |(t, c), p| {
            let runs = if p.name_as_str() == Some(HELPER) {
                0
            } else {
                p.run_count()
            };
            (t + p.run_time().as_nanos() as u64, c + runs)
        })
}

impl Agent {
    pub fn start(bin: &Path, args: &[&str]) -> Result<Agent> {
        let before = loaded(false);
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcp-trace")?;
        let (tx, stderr) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().expect("piped"));
        thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut scan = None;
        loop {
            let line = stderr
                .recv_timeout(Duration::from_secs(60))
                .context("tcp-trace did not start tracing")?;
            if line.starts_with("tcp-trace: tracing") {
                break;
            }
            if let Some(rest) = line.strip_prefix("tcp-trace: start-up scan: ") {
                scan = Some(rest.to_string());
            }
        }
        let programs = loaded(true).difference(&before).copied().collect();
        let every_program = loaded(false).difference(&before).copied().collect();
        Ok(Agent {
            child,
            stderr,
            programs,
            every_program,
            scan,
        })
    }

    /// utime + stime in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at state.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kernel memory of the agent's maps, from /proc/PID/fdinfo.
    pub fn map_memlock(&self) -> u64 {
        let dir = format!("/proc/{}/fdinfo", self.child.id());
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| fs::read_to_string(e.ok()?.path()).ok())
            .filter(|info| info.contains("map_type:"))
            .filter_map(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// Stops with SIGTERM; returns the figures of its exit summary.
    pub fn stop(mut self) -> Result<Summary> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("tcp-trace exited with {status}");
        }
        // The floor prints no summary: its figures stay 0.
        // The reader thread ends at EOF, which follows the exit.
        let summary = self
            .stderr
            .iter()
            .find(|l| l.contains("events received"))
            .unwrap_or_default();
        let number_before = |word: &str| -> u64 {
            summary
                .split_once(word)
                .and_then(|(head, _)| {
                    head.split_whitespace()
                        .last()?
                        .trim_start_matches('(')
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        Ok(Summary {
            received: number_before(" events received"),
            dropped: number_before(" dropped"),
            skipped: number_before(" skipped by the kernel"),
            ring_full: number_before(" ring buffer full"),
            mid_life: number_before(" transitions of sockets first seen mid-life"),
        })
    }
}

/// The figures of an agent's exit summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub received: u64,
    pub dropped: u64,
    /// Runs the kernel skipped (part of `dropped`).
    pub skipped: u64,
    /// Records lost to a full ring buffer (part of `dropped`).
    pub ring_full: u64,
    pub mid_life: u64,
}
