//! `cargo xtask bench`: the overhead of each tracing mode, measured against
//! untraced runs of the same workload in the same session.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::agent::{program_stats, Agent, Summary};

/// Interleaved (untraced, traced) pairs per configuration and load.
const PAIRS: usize = 5;
/// Concurrent connections held for the map-memory measurement.
const HELD_CONNECTIONS: usize = 100_000;
/// Connections per holding process (each end costs a descriptor; the hard
/// limit here is 20,000 per process).
const HELD_PER_PROCESS: usize = 9_000;

struct Config {
    name: &'static str,
    args: &'static [&'static str],
    what: &'static str,
}

const CONFIGS: &[Config] = &[
    Config {
        name: "floor (empty classic program)",
        args: &["bench-floor"],
        what: "the tracepoint's own dispatch (a perf record built per transition) plus an empty classic tracepoint program",
    },
    Config {
        name: "floor (empty BTF program)",
        args: &["bench-floor", "--btf"],
        what: "the tracepoint's dispatch to an empty BTF (raw) tracepoint program: no record is built",
    },
    Config {
        name: "floor (timing only)",
        args: &["bench-floor", "--timing"],
        what: "what any tool that times each socket's states pays per transition: the record read, the socket's entry time kept in the LRU map (lookup, insert, delete at close) and one histogram increment; no owners, filters, tallies or streaming",
    },
    Config {
        name: "watch --json --socket-storage",
        args: &["watch", "--json", "--socket-storage"],
        what: "as `watch --json`, with the BTF program, per-socket state in socket storage, and its classic helper telling task context",
    },
    Config {
        name: "watch --json",
        args: &["watch", "--json"],
        what: "writing one ring-buffer record per transition and formatting it as JSON in userspace",
    },
    Config {
        name: "stats --socket-storage",
        args: &["stats", "--socket-storage"],
        what: "as `stats`, with the BTF program and socket storage",
    },
    Config {
        name: "stats (kernel aggregation)",
        args: &["stats"],
        what: "the per-socket state update and one per-CPU histogram increment per transition; nothing is streamed",
    },
    Config {
        name: "stats --by process",
        args: &["stats", "--by", "process"],
        what: "streaming every transition plus a userspace histogram update per event",
    },
    Config {
        name: "life",
        args: &["life"],
        what: "streaming every transition plus following each connection in a hash map",
    },
    Config {
        name: "handshake",
        args: &["handshake", "--slow", "10s"],
        what: "streaming every transition (the handshake ends are picked in userspace); almost nothing is printed",
    },
    Config {
        name: "serve --socket-storage",
        args: &["serve", "--listen", "127.0.0.1:0", "--socket-storage"],
        what: "as `serve`, with the BTF program and socket storage",
    },
    Config {
        name: "serve",
        args: &["serve", "--listen", "127.0.0.1:0"],
        what: "the kernel aggregation of stats plus tallies of transitions, handshakes and closes; only closes out of FIN_WAIT2/CLOSING and moves into or out of CLOSE_WAIT are streamed (about 3 of 10 transitions here), plus the timewait confirmation's sock_diag dump every 5 s",
    },
    Config {
        name: "timewait",
        args: &["timewait", "--interval", "60"],
        what: "streaming every transition plus a sock_diag dump of every timewait socket each second (tens of thousands under this churn)",
    },
];

struct Load {
    name: &'static str,
    rate: u64,
    seconds: f64,
}

const LOADS: &[Load] = &[
    Load {
        name: "low (2,000 conn/s)",
        rate: 2_000,
        seconds: 2.0,
    },
    Load {
        name: "medium (10,000 conn/s)",
        rate: 10_000,
        seconds: 2.0,
    },
    Load {
        name: "flat out",
        rate: 0,
        seconds: 3.0,
    },
];

#[derive(Default, Clone, Copy)]
struct Churn {
    per_second: f64,
    connections: u64,
    transitions: u64,
}

fn churn(bin: &Path, load: &Load) -> Result<Churn> {
    let out = Command::new(bin)
        .args([load.seconds.to_string(), load.rate.to_string()])
        .output()
        .context("running churn")?;
    if !out.status.success() {
        bail!("churn failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("churn's output")?;
    Ok(Churn {
        per_second: v["per_second"].as_f64().unwrap_or(0.0),
        connections: v["connections"].as_u64().unwrap_or(0),
        transitions: v["transitions"].as_u64().unwrap_or(0),
    })
}

#[derive(Default)]
struct Row {
    ratios: Vec<f64>,
    bpf_ns: u64,
    bpf_runs: u64,
    /// Run time of all of the agent's programs, not only the tracepoint's.
    every_program_ns: u64,
    agent_cpu: f64,
    connections: u64,
    transitions: u64,
    received: u64,
    dropped: u64,
    peak_rss_kib: u64,
    untraced_rate: Vec<f64>,
}

impl Row {
    fn median_ratio(&self) -> (f64, f64, f64) {
        let mut r = self.ratios.clone();
        r.sort_by(f64::total_cmp);
        (r[r.len() / 2], r[0], r[r.len() - 1])
    }
}

pub fn bench(
    quick: bool,
    only: &[String],
    root: &Path,
    tracer: &Path,
    churn_bin: &Path,
) -> Result<()> {
    if let Some(unknown) = only
        .iter()
        .find(|name| !CONFIGS.iter().any(|c| c.name == **name))
    {
        let names: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
        bail!(
            "no configuration named {unknown:?}; there are: {}",
            names.join(", ")
        );
    }
    let configs: Vec<&Config> = CONFIGS
        .iter()
        .filter(|c| only.is_empty() || only.iter().any(|name| name == c.name))
        .collect();
    // Keeps run-time statistics on while held.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let started = Instant::now();
    let mut table = String::new();
    let mut notes = String::new();
    let mut flat_out: Vec<FlatOut> = Vec::new();
    let (loads, pairs) = if quick {
        (&LOADS[2..], 3)
    } else {
        (LOADS, PAIRS)
    };
    for load in loads {
        for config in &configs {
            let mut row = Row::default();
            for _ in 0..pairs {
                let base = churn(churn_bin, load)?;
                let agent = Agent::start(tracer, config.args)?;
                let (t0, c0) = program_stats(&agent.programs);
                let (all0, _) = program_stats(&agent.every_program);
                let cpu0 = agent.cpu_seconds();
                let traced = churn(churn_bin, load)?;
                let cpu1 = agent.cpu_seconds();
                let (t1, c1) = program_stats(&agent.programs);
                let (all1, _) = program_stats(&agent.every_program);
                row.peak_rss_kib = row.peak_rss_kib.max(agent.peak_rss_kib());
                let summary = agent.stop()?;
                let (received, dropped) = (summary.received, summary.dropped);
                row.ratios.push(traced.per_second / base.per_second);
                row.untraced_rate.push(base.per_second);
                row.bpf_ns += t1 - t0;
                row.bpf_runs += c1 - c0;
                row.every_program_ns += all1 - all0;
                row.agent_cpu += cpu1 - cpu0;
                row.connections += traced.connections;
                row.transitions += traced.transitions;
                row.received += received;
                row.dropped += dropped;
            }
            let (median, min, max) = row.median_ratio();
            let mut rates = row.untraced_rate.clone();
            rates.sort_by(f64::total_cmp);
            // Both sides' tracing CPU: all its programs' run time and the agent's.
            let cpu_us_per_connection = (row.every_program_ns as f64 / 1e3 + row.agent_cpu * 1e6)
                / row.connections.max(1) as f64;
            let line = format!(
                "| {} | {} | {:.0} | {median:.3} ({min:.3}-{max:.3}) | {:.0} | {:.2} | {cpu_us_per_connection:.1} | {} | {} | {:.1} |",
                load.name,
                config.name,
                rates[rates.len() / 2],
                row.bpf_ns as f64 / row.bpf_runs.max(1) as f64,
                row.agent_cpu / (row.transitions.max(1) as f64 / 1e6),
                row.received,
                row.dropped,
                row.peak_rss_kib as f64 / 1024.0,
            );
            if load.rate == 0 {
                flat_out.push(FlatOut {
                    name: config.name,
                    ratio: median,
                    cpu_us_per_connection,
                    untraced_rate: rates[rates.len() / 2],
                });
            }
            println!("{line}");
            table.push_str(&line);
            table.push('\n');
        }
    }
    let against_floors = against_floors(&flat_out);
    if quick || !only.is_empty() {
        println!("{against_floors}");
        return Ok(());
    }
    for config in CONFIGS {
        notes.push_str(&format!("- **{}**: {}.\n", config.name, config.what));
    }

    let memory = held_memory(tracer, churn_bin)?;
    println!("{memory}");
    let skips = skips(tracer, churn_bin)?;
    println!("{skips}");
    let scrapes = serve_scrapes(tracer, churn_bin)?;
    println!("{scrapes}");
    let report = format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench` on {date}. Machine: Linux {kernel}, {cpus} CPUs. \
         Run time: {secs:.0} s.\n\n\
         Workload: `churn` (xtask/src/bin/churn.rs), {clients} client and {servers} server threads on \
         loopback; each connection exchanges 8 bytes each way and makes 10 transitions. \
         Each row is {PAIRS} interleaved pairs of runs (untraced, traced). *Speed ratio* is the \
         median of traced/untraced connection rates per pair (min-max in brackets); *BPF ns/run* is \
         the agent's programs' run time over their run count (`kernel.bpf_stats_enabled`); *agent \
         CPU* is the agent's user+system time during the traced runs per million transitions the \
         workload made; *tracing CPU per connection* is the run time of all the agent's programs \
         (`accept()`'s handler's too) and the agent's CPU, over the connections the traced runs \
         made, in microseconds; the agent's CPU includes its start (the owner scan and, for \
         `timewait` and `serve`, its first reading of the timewait table, which the untraced run \
         just filled), which dominates at the rate-limited loads; the tracepoint's dispatch and \
         other indirect costs are not in it (the speed ratio has them); *received*/*dropped* (transitions and accepts) are summed over the pairs; *RSS* is the agent's peak \
         resident memory. Rate-limited loads cannot run faster than asked, so their ratios sit near \
         1 whenever the machine keeps up.\n\n\
         | load | configuration | untraced conn/s | speed ratio | BPF ns/run | agent CPU s per M transitions | tracing CPU per connection (us) | received | dropped | peak RSS MiB |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n{table}\n\
         {against_floors}\n\
         What dominates each configuration's cost:\n\n{notes}\n\
         Wake-ups: the kernel program submits each record with `BPF_RB_NO_WAKEUP` unless an \
         eighth of the 4 MiB ring is queued (`BPF_RB_FORCE_WAKEUP`), and the reader also drains \
         every 50 ms. Flat out that is one wake-up per ~40,000 records instead of one per record, \
         which is why the agent's CPU per event stays flat across loads; the cost at low rates is \
         the 20 drains a second, spread over fewer events.\n\n\
         ## Kernel memory at {HELD_CONNECTIONS} open connections\n\n{memory}\n\
         ## Runs the kernel skips\n\n{skips}\n\
         ## `serve` under many process names\n\n{scrapes}\n",
        date = date(),
        kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        cpus = thread::available_parallelism().map_or(0, |n| n.get()),
        secs = started.elapsed().as_secs_f64(),
        clients = 4,
        servers = 4,
    );
    let path = root.join("docs/BENCHMARKS.md");
    fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// One configuration's flat-out figures.
struct FlatOut {
    name: &'static str,
    /// Median traced/untraced speed ratio.
    ratio: f64,
    cpu_us_per_connection: f64,
    /// Median untraced connections per second of its pairs.
    untraced_rate: f64,
}

/// The flat-out figures that matter to `serve`'s cost, against both floors
/// of the same run: the empty program (being attached at all) and the
/// timing floor (what timing each socket's states costs at the least).
fn against_floors(flat_out: &[FlatOut]) -> String {
    let find = |name: &str| flat_out.iter().find(|f| f.name == name);
    let (Some(empty), Some(timing), Some(serve)) = (
        find("floor (empty classic program)"),
        find("floor (timing only)"),
        find("serve"),
    ) else {
        return String::new();
    };
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    format!(
        "**Flat out, against the floors.** `serve` keeps {:.3} of the untraced rate, at {:.1} us \
         of tracing CPU per connection. The empty program keeps {:.3}; the timing floor, which \
         does only what any tool timing each socket's states must do, keeps {:.3} at {:.1} us. \
         So `serve`'s owners, tallies, streamed closes and timewait confirmation cost {:.1} us \
         per connection over timing alone. Untraced, a connection of this workload costs about \
         {:.0} us of CPU ({cpus:.0} CPUs over the untraced rate): fixed work per transition \
         weighs heavily here, while at the rate-limited loads every mode keeps pace.\n",
        serve.ratio,
        serve.cpu_us_per_connection,
        empty.ratio,
        timing.ratio,
        timing.cpu_us_per_connection,
        serve.cpu_us_per_connection - timing.cpu_us_per_connection,
        cpus * 1e6 / serve.untraced_rate.max(1.0),
    )
}

/// Kernel memory with HELD_CONNECTIONS connections (2 sockets each, both
/// traced) open: socket storage, then the classic path's LRU map at its
/// default size and at one that holds them all; then SCALE_CONNECTIONS
/// under socket storage.
fn held_memory(tracer: &Path, churn_bin: &Path) -> Result<String> {
    let sockets = 2 * HELD_CONNECTIONS as u32;
    let max_sockets = sockets.next_power_of_two().to_string();
    let mut lines = String::new();
    // What holding the connections costs the kernel without an agent, to
    // tell socket storage's share of the slab from the sockets' own.
    let before = slab_kib()?;
    let holders = hold(churn_bin, HELD_CONNECTIONS)?;
    let untraced_kib = slab_kib()?.saturating_sub(before);
    release(holders)?;
    let runs: [&[&str]; 3] = [
        &["watch", "--json", "--socket-storage"],
        &["watch", "--json"],
        &["watch", "--json", "--max-sockets", &max_sockets],
    ];
    for args in runs {
        let agent = Agent::start(tracer, args)?;
        let before = slab_kib()?;
        let holders = hold(churn_bin, HELD_CONNECTIONS)?;
        let traced_kib = slab_kib()?.saturating_sub(before);
        let memlock = agent.map_memlock();
        let rss = agent.peak_rss_kib();
        release(holders)?;
        let Summary {
            received,
            dropped,
            skipped,
            ring_full,
            mid_life,
        } = agent.stop()?;
        let store = if args.contains(&"--socket-storage") {
            let per_socket =
                traced_kib.saturating_sub(untraced_kib) as f64 * 1024.0 / f64::from(sockets);
            format!(
                "socket storage: {per_socket:.0} bytes of slab per traced socket (slab growth \
                 {:.1} MiB traced, {:.1} MiB untraced), maps {:.1} MiB (memlock: nothing per socket \
                 is preallocated)",
                traced_kib as f64 / 1024.0,
                untraced_kib as f64 / 1024.0,
                memlock as f64 / 1048576.0,
            )
        } else {
            format!(
                "classic path: maps {:.1} MiB (memlock, fixed at load: the LRU socket map is \
                 preallocated)",
                memlock as f64 / 1048576.0,
            )
        };
        lines.push_str(&format!(
            "- `tcp-trace {}`: {store}, agent peak RSS {:.1} MiB; {received} events received, \
             {dropped} dropped ({skipped} skipped by the kernel, {ring_full} ring buffer full), \
             {mid_life} transitions of sockets the agent had evicted or never saw.\n",
            args.join(" "),
            rss as f64 / 1024.0,
        ));
    }
    lines.push_str(&at_scale(tracer, churn_bin)?);
    lines.push_str(&scan_cost(tracer, churn_bin, &max_sockets)?);
    Ok(lines)
}

/// Connections held for the socket-storage scale check.
const SCALE_CONNECTIONS: usize = 500_000;

/// SCALE_CONNECTIONS connections (a million sockets) opened and closed under
/// `watch --json` with socket storage: every one tracked from its birth.
fn at_scale(tracer: &Path, churn_bin: &Path) -> Result<String> {
    let agent = Agent::start(tracer, &["watch", "--json", "--socket-storage"])?;
    let before = slab_kib()?;
    let holders = hold(churn_bin, SCALE_CONNECTIONS)?;
    let grown = slab_kib()?.saturating_sub(before);
    let rss = agent.peak_rss_kib();
    release(holders)?;
    let Summary {
        received,
        dropped,
        mid_life,
        ..
    } = agent.stop()?;
    Ok(format!(
        "- {SCALE_CONNECTIONS} connections held open at once (from {} processes) under \
         `tcp-trace watch --json --socket-storage`: {received} events received, {dropped} \
         dropped, {mid_life} transitions of sockets the agent had not tracked from birth \
         (host-wide); slab grew {:.0} MiB with the sockets and their storage; agent peak RSS \
         {:.1} MiB.\n",
        SCALE_CONNECTIONS.div_ceil(HELD_PER_PROCESS),
        grown as f64 / 1024.0,
        rss as f64 / 1024.0,
    ))
}

/// The kernel's slab memory (`Slab:` in /proc/meminfo), KiB.
fn slab_kib() -> Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .context("no Slab: in /proc/meminfo")
}

/// The start-up owner scan with HELD_CONNECTIONS connections already open
/// (2 sockets each, plus their holders' listeners): its time, and the
/// agent's peak memory with it.
fn scan_cost(tracer: &Path, churn_bin: &Path, max_sockets: &str) -> Result<String> {
    let holders = hold(churn_bin, HELD_CONNECTIONS)?;
    let agent = Agent::start(tracer, &["watch", "--json", "--max-sockets", max_sockets])?;
    let rss = agent.peak_rss_kib();
    let scan = agent
        .scan
        .clone()
        .unwrap_or_else(|| "(no start-up scan line)".into());
    release(holders)?;
    agent.stop()?;
    Ok(format!(
        "- Started with the {HELD_CONNECTIONS} connections already open, \
         `tcp-trace watch --json --max-sockets {max_sockets}` found their owners at start \
         ({scan}); agent peak RSS {:.1} MiB, the scan included.\n",
        rss as f64 / 1024.0,
    ))
}

/// `count` connections held open by `churn hold` processes.
fn hold(churn_bin: &Path, count: usize) -> Result<Vec<std::process::Child>> {
    let mut holders = Vec::new();
    let mut left = count;
    while left > 0 {
        let n = left.min(HELD_PER_PROCESS);
        left -= n;
        let mut child = Command::new(churn_bin)
            .args(["hold", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting churn hold")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != format!("held {n}") {
            bail!("churn hold said {line:?}");
        }
        holders.push(child);
    }
    Ok(holders)
}

/// Lets `churn hold` processes close their connections and exit.
fn release(holders: Vec<std::process::Child>) -> Result<()> {
    for mut h in holders {
        if let Some(mut stdin) = h.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        h.wait()?;
    }
    Ok(())
}

/// Agents attached at once for the skip measurement.
const SKIP_AGENTS: [usize; 3] = [1, 2, 4];
/// The skip measurement's workload: `churn burst` with this many threads.
const SKIP_CONNECTIONS: u64 = 10_000;
const SKIP_THREADS: u64 = 8;
/// Bursts per row.
const SKIP_RUNS: usize = 3;

/// Transitions the kernel skipped (a tracing program already running on the
/// CPU) in a concurrent burst, with more agents and with a shorter program.
fn skips(tracer: &Path, churn_bin: &Path) -> Result<String> {
    let mut table = String::from(
        "| agents attached | each agent's program | BPF ns/run | skipped per burst (each run) |\n\
         | --- | --- | --- | --- |\n",
    );
    let configs: [(&str, &[&str]); 4] = [
        ("watch --json", &["watch", "--json"]),
        (
            "watch --json --socket-storage",
            &["watch", "--json", "--socket-storage"],
        ),
        ("stats (kernel aggregation)", &["stats"]),
        ("stats --socket-storage", &["stats", "--socket-storage"]),
    ];
    for (name, args) in configs {
        for count in SKIP_AGENTS {
            let mut per_run = Vec::new();
            let (mut ns, mut runs) = (0, 0);
            for _ in 0..SKIP_RUNS {
                let agents: Vec<Agent> = (0..count)
                    .map(|_| Agent::start(tracer, args))
                    .collect::<Result<_>>()?;
                let programs: Vec<u32> = agents.iter().flat_map(|a| a.programs.clone()).collect();
                let (t0, c0) = program_stats(&programs);
                let out = Command::new(churn_bin)
                    .args([
                        "burst",
                        &SKIP_CONNECTIONS.to_string(),
                        &SKIP_THREADS.to_string(),
                    ])
                    .output()
                    .context("running churn burst")?;
                if !out.status.success() {
                    bail!(
                        "churn burst failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                let (t1, c1) = program_stats(&programs);
                ns += t1 - t0;
                runs += c1 - c0;
                let mut skipped = 0;
                for agent in agents {
                    skipped = skipped.max(agent.stop()?.skipped);
                }
                per_run.push(skipped);
            }
            let _ = writeln!(
                table,
                "| {count} | {name} | {:.0} | {per_run:?} |",
                ns as f64 / runs.max(1) as f64,
            );
        }
    }
    Ok(format!(
        "Workload: `churn burst {SKIP_CONNECTIONS} {SKIP_THREADS}` ({SKIP_CONNECTIONS} connections \
         from {SKIP_THREADS} threads on one listener, {} transitions and {SKIP_CONNECTIONS} \
         accepts), {SKIP_RUNS} runs per row; \
         a one-thread burst makes no skips here.\n\n{table}\n\
         The kernel does not run a tracing program on a CPU where one is already running; for \
         classic tracepoints the guard is shared by every kprobe and tracepoint program on the \
         CPU, so every agent's classic program skips the same runs and counts them \
         (`recursion_misses`, Linux 6.7+). tcp-trace reports them as dropped. More programs \
         attached, and longer ones, widen the window in which a softirq's transition finds the \
         guard taken. The BTF program (`--socket-storage`) has a guard of its own: only \
         its own runs on the CPU make it skip, however many other programs are attached (its \
         classic helper `task_context` still shares the common guard; a skip of the helper \
         costs an owner update, not an event, and is not in these counts).\n",
        SKIP_CONNECTIONS * 10 + 2
    ))
}

/// Seconds of churn from client threads cycling through `SCRAPE_NAMES`
/// names before `serve`'s page is timed.
const SCRAPE_CHURN_SECONDS: u64 = 30;
const SCRAPE_NAMES: u32 = 10_000;
const SCRAPES: usize = 20;

/// `serve` at its group bound: the agent's memory and the time a scrape
/// takes, after churn from thousands of distinct process names.
fn serve_scrapes(tracer: &Path, churn_bin: &Path) -> Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(tracer, &["serve", "--listen", &listen])?;
    let out = Command::new(churn_bin)
        .args([SCRAPE_CHURN_SECONDS.to_string(), "2000".into()])
        .env("CHURN_NAMES", SCRAPE_NAMES.to_string())
        .output()
        .context("running churn")?;
    if !out.status.success() {
        bail!("churn failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut times = Vec::new();
    let mut page = String::new();
    for _ in 0..SCRAPES {
        let started = Instant::now();
        page = http_get(&listen, "/metrics")?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let groups: std::collections::BTreeSet<&str> = page
        .lines()
        .filter(|l| l.starts_with("tcp_trace_timewait_entered_total{"))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    let rss = agent.rss_kib();
    let peak = agent.peak_rss_kib();
    agent.stop()?;
    Ok(format!(
        "`tcp-trace serve` (default `--max-groups 20`) after {SCRAPE_CHURN_SECONDS} s of churn at \
         2,000 connections/s from client threads cycling through {SCRAPE_NAMES} names: {} groups \
         on the page ({} lines, {} bytes); a scrape took {:.1} ms (median of {SCRAPES}, max {:.1} \
         ms); agent RSS {:.1} MiB (peak {:.1} MiB). Hour-long memory under the same names: \
         docs/SOAK.md.\n",
        groups.len(),
        page.lines().count(),
        page.len(),
        times[times.len() / 2],
        times[times.len() - 1],
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
    ))
}

/// The body of `http://addr/path` (HTTP/1.1, connection closed after).
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::Read as _;
    let mut stream =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}

pub fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
