//! Figures for the start-up owner scan: CONNECTIONS loopback connections
//! held by helper processes (both ends, so twice as many sockets), then
//! `owners::scan` timed from this process, with the resident memory it adds.
//!
//! `owner_scan [CONNECTIONS [RUNS]]` (default 20,000 and 5), as root, since
//! the scan reads every process's descriptors. Helpers (`owner_scan hold N`)
//! split the connections so each stays under its descriptor limit; they exit
//! when this process closes their stdin.

use std::{
    collections::HashSet,
    env,
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Child, ChildStdout, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use tcp_trace::owners::{self, Scan};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("hold") => number(&args, 1, 1).and_then(hold),
        _ => measure(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("owner_scan: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Argument `i` as a number, `default` if absent.
fn number(args: &[String], i: usize, default: usize) -> Result<usize> {
    args.get(i).map_or(Ok(default), |a| Ok(a.parse()?))
}

fn measure(args: &[String]) -> Result<()> {
    let connections = number(args, 0, 20_000)?;
    let runs = number(args, 1, 5)?.max(1);
    // As the agent runs: one malloc arena.
    // SAFETY: mallopt only tunes glibc's allocator.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let started = Instant::now();
    let helpers = Helpers::start(connections)?;
    eprintln!(
        "{connections} connections held in {} ms",
        ms(started.elapsed())
    );

    let before = memory()?;
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        drop(last.take());
        let scan = owners::scan()?;
        times.push(scan.stats.elapsed);
        last = Some(scan);
    }
    let scan = last.context("no run")?;
    let with_result = memory()?;
    let walk = time_walk_alone(&scan)?;
    let theirs = helpers.sockets_charged(&scan);
    let stats = scan.stats;
    drop(scan);
    let after = memory()?;

    times.sort();
    println!("last scan: {stats:?}; {theirs} sockets charged to the helpers");
    println!(
        "scan over {runs} runs: min {} ms, median {} ms, max {} ms; the /proc walk alone {} ms",
        ms(times[0]),
        ms(times[runs / 2]),
        ms(times[runs - 1]),
        ms(walk)
    );
    println!(
        "RSS: {} KiB before, {} KiB with the last scan held (+{}), {} KiB after dropping it; \
         peak {} KiB before, {} KiB after (+{})",
        before.rss,
        with_result.rss,
        with_result.rss.saturating_sub(before.rss),
        after.rss,
        before.peak,
        after.peak,
        after.peak.saturating_sub(before.peak)
    );
    let held = helpers.sockets;
    ensure!(
        theirs == held,
        "{theirs} of the helpers' {held} sockets charged to them"
    );
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Helper processes, each holding its share of the connections.
struct Helpers {
    children: Vec<(Child, ChildStdout)>,
    sockets: usize,
}

impl Helpers {
    fn start(connections: usize) -> Result<Helpers> {
        let share = (fd_limit()?.saturating_sub(64) / 2).clamp(1, 20_000);
        let exe = env::current_exe()?;
        let mut helpers = Helpers {
            children: Vec::new(),
            sockets: 0,
        };
        let mut left = connections;
        while left > 0 {
            let n = left.min(share);
            let mut child = Command::new(&exe)
                .args(["hold", &n.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let stdout = child.stdout.take().context("helper stdout")?;
            helpers.children.push((child, stdout));
            helpers.sockets += 1 + 2 * n;
            left -= n;
        }
        for (_, stdout) in &mut helpers.children {
            let mut ready = String::new();
            BufReader::new(stdout).read_line(&mut ready)?;
            ensure!(ready.trim() == "ready", "a helper failed");
        }
        Ok(helpers)
    }

    fn sockets_charged(&self, scan: &Scan) -> usize {
        let pids: HashSet<u32> = self.children.iter().map(|(c, _)| c.id()).collect();
        let all = scan.listeners.iter().chain(&scan.connections);
        all.filter(|o| pids.contains(&o.holder.pid)).count()
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// A helper: one listener and `connections` connections to it, both ends
/// held until stdin closes.
fn hold(connections: usize) -> Result<()> {
    raise_fd_limit()?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let at = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(connections);
    for i in 0..connections {
        let client = TcpStream::connect(at).with_context(|| format!("connection {i}"))?;
        pairs.push((client, listener.accept()?.0));
    }
    println!("ready");
    std::io::stdin().read_to_end(&mut Vec::new())?;
    Ok(())
}

/// The /proc walk on its own, for the inodes the scan charged.
fn time_walk_alone(scan: &Scan) -> Result<Duration> {
    let all = scan.listeners.iter().chain(&scan.connections);
    let inodes: HashSet<u64> = all.map(|o| o.socket.inode).collect();
    let started = Instant::now();
    owners::socket_holders(&inodes)?;
    Ok(started.elapsed())
}

fn fd_limit() -> Result<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to our own struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    ensure!(rc == 0, "getrlimit: {}", std::io::Error::last_os_error());
    Ok(usize::try_from(limit.rlim_max).unwrap_or(usize::MAX))
}

/// Soft descriptor limit up to the hard one.
fn raise_fd_limit() -> Result<()> {
    let hard = fd_limit()? as libc::rlim_t;
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads our own struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    ensure!(rc == 0, "setrlimit: {}", std::io::Error::last_os_error());
    Ok(())
}

struct Memory {
    rss: u64,
    peak: u64,
}

/// VmRSS and VmHWM of this process, in KiB.
fn memory() -> Result<Memory> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in /proc/self/status"))?;
        Ok(line.trim().trim_end_matches("kB").trim().parse()?)
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}
