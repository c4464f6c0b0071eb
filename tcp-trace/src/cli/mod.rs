//! Command-line flags, turned into plain configs for the commands.

mod overview;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use tcp_trace_common::{Filter, AF_INET, AF_INET6};

pub use overview::{DoctorArgs, DoctorConfig, TopArgs, TopConfig, TopOutput};

use crate::{
    aggregate::GroupBy,
    commands::serve::GroupLabel,
    kernel::{Settings, RING_BYTES},
};

/// The installed program's name: man pages and completions are named after it.
pub const BIN_NAME: &str = "tcp-trace";

#[derive(Parser, Debug)]
#[command(
    name = BIN_NAME,
    version,
    about = "Times every TCP state transition on this host"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print every TCP state transition: owner, endpoints, and time spent in the old state.
    Watch(WatchArgs),
    /// Time spent in each state: count, p50, p90, p99, max and a histogram.
    Stats(StatsArgs),
    /// One line per connection when it closes: lifetime, states, bytes, how it closed.
    Life(LifeArgs),
    /// Connect latency on both sides: duration, retransmissions and outcome of each handshake.
    Handshake(HandshakeArgs),
    /// Which processes leave sockets in TIME_WAIT, how many linger, for how long.
    Timewait(TimewaitArgs),
    /// Watch a while, then diagnose: CLOSE_WAIT and TIME_WAIT pile-ups, failed and slow connects, resets, short connections.
    Doctor(DoctorArgs),
    /// Sockets per process or container every interval: states, new connections, handshake p99, resets, oldest CLOSE_WAIT.
    Top(TopArgs),
    /// Serve Prometheus metrics (/metrics, /healthz) until stopped: an always-on agent.
    Serve(ServeArgs),
    /// Attach an empty program to the tracepoint (the benchmark's floor).
    #[command(hide = true)]
    BenchFloor {
        /// An empty BTF tracepoint program instead of a classic one.
        #[arg(long)]
        btf: bool,
        /// A classic program that only times each socket's states.
        #[arg(long, conflicts_with = "btf")]
        timing: bool,
    },
    /// Write the man pages and shell completions that a package installs.
    #[command(hide = true)]
    GenerateAssets(GenerateAssetsArgs),
}

#[derive(Args, Debug)]
pub struct GenerateAssetsArgs {
    /// Directory to write into (created if missing); its man/ and
    /// completions/ are replaced.
    pub dir: PathBuf,
}

/// Filters shared by every tracing command; applied in the kernel.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only sockets owned by this process id.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
    /// Only sockets with this port at either end.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only sockets with this local port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub lport: Option<u16>,
    /// Only sockets with this remote port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub rport: Option<u16>,
    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Only sockets whose owner runs in this cgroup v2 or below it: a path
    /// below the cgroup2 root, e.g. /system.slice/nginx.service.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
}

impl FilterArgs {
    pub fn to_filter(&self) -> Filter {
        Filter {
            pid: self.pid.unwrap_or(0),
            port: self.port.unwrap_or(0),
            lport: self.lport.unwrap_or(0),
            rport: self.rport.unwrap_or(0),
            family: match (self.ipv4, self.ipv6) {
                (true, _) => AF_INET,
                (_, true) => AF_INET6,
                _ => 0,
            },
            close_from: 0,
            ..Filter::default()
        }
    }
}

/// `--max-sockets` unless given: sockets the kernel tracks at once.
pub const DEFAULT_MAX_SOCKETS: u32 = 131_072;

/// Flags every tracing command takes: which sockets, how many the kernel
/// tracks, and for how long.
#[derive(Args, Debug, Clone)]
pub struct TracingArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Most sockets tracked at once (LRU: the least recently active are evicted, and counted).
    #[arg(long, default_value_t = DEFAULT_MAX_SOCKETS, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_sockets: u32,
    /// Keep the kernel's per-socket state in socket-local storage (a BTF
    /// tracepoint; kernels with BTF) instead of the LRU map: no limit, no
    /// eviction, memory that follows the live sockets, at a higher cost per
    /// short-lived connection.
    #[arg(long)]
    pub socket_storage: bool,
    /// Bytes of ring buffer between the kernel and the agent: a power of two
    /// from 4096 to 1 GiB. A larger ring rides out longer bursts.
    #[arg(long, value_name = "BYTES", default_value_t = RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_bytes: u32,
    /// Stop by itself after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub duration: Option<Duration>,
}

/// The plain form of `TracingArgs`.
#[derive(Clone, Debug)]
pub struct Tracing {
    pub filter: Filter,
    /// `--cgroup`: the kernel filter's cgroup id and level are resolved from
    /// it when the program is loaded.
    pub cgroup: Option<String>,
    pub max_sockets: u32,
    pub socket_storage: bool,
    pub ring_bytes: u32,
    pub duration: Option<Duration>,
}

impl Tracing {
    /// What the kernel program is asked for when every transition is streamed.
    pub fn streaming(&self) -> Settings {
        Settings {
            filter: self.filter,
            cgroup: self.cgroup.clone(),
            max_sockets: self.max_sockets,
            socket_storage: self.socket_storage,
            ring_bytes: self.ring_bytes,
            aggregate: false,
            stream_mask: 0,
            tally: false,
            timewait: None,
        }
    }
}

impl TracingArgs {
    fn to_tracing(&self) -> Tracing {
        Tracing {
            filter: self.filter.to_filter(),
            cgroup: self.filter.cgroup.clone(),
            max_sockets: self.max_sockets,
            socket_storage: self.socket_storage,
            ring_bytes: self.ring_bytes,
            duration: self.duration,
        }
    }
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    /// One JSON object per line instead of columns.
    #[arg(long)]
    pub json: bool,
}

pub struct WatchConfig {
    pub tracing: Tracing,
    pub json: bool,
}

impl WatchArgs {
    pub fn into_config(self) -> WatchConfig {
        WatchConfig {
            tracing: self.tracing.to_tracing(),
            json: self.json,
        }
    }
}

/// `--by` and `--top`, for commands that report per group.
#[derive(Args, Debug)]
pub struct GroupArgs {
    /// Also report per owner or endpoint (for `stats`: per-event mode; without
    /// it the kernel aggregates).
    #[arg(long, value_enum)]
    pub by: Option<GroupBy>,
    /// With --by: keep the N busiest groups, fold the rest into "other".
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub top: u32,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    /// Print a report every S seconds as well as at exit.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub interval: Option<Duration>,
    /// The report as one JSON object (one per line with --interval).
    #[arg(long)]
    pub json: bool,
    /// Read a recording (`watch --json` output) instead of the kernel.
    #[arg(long, value_name = "FILE", conflicts_with = "duration")]
    pub from: Option<PathBuf>,
}

pub struct StatsConfig {
    pub tracing: Tracing,
    pub by: Option<GroupBy>,
    pub top: usize,
    pub interval: Option<Duration>,
    pub json: bool,
    pub from: Option<PathBuf>,
}

impl StatsArgs {
    pub fn into_config(self) -> StatsConfig {
        StatsConfig {
            tracing: self.tracing.to_tracing(),
            by: self.group.by,
            top: self.group.top as usize,
            interval: self.interval,
            json: self.json,
            from: self.from,
        }
    }
}

#[derive(Args, Debug)]
pub struct LifeArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    /// One JSON object per connection.
    #[arg(long)]
    pub json: bool,
    /// Read a recording (`watch --json` output) instead of the kernel.
    #[arg(long, value_name = "FILE", conflicts_with = "duration")]
    pub from: Option<PathBuf>,
}

pub struct LifeConfig {
    pub tracing: Tracing,
    pub json: bool,
    pub from: Option<PathBuf>,
}

impl LifeArgs {
    pub fn into_config(self) -> LifeConfig {
        LifeConfig {
            tracing: self.tracing.to_tracing(),
            json: self.json,
            from: self.from,
        }
    }
}

#[derive(Args, Debug)]
pub struct HandshakeArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    /// Print only handshakes that took at least this long (e.g. 100ms, 1.5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub slow: Option<Duration>,
    /// Print a summary every S seconds as well as at exit.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub interval: Option<Duration>,
    /// One JSON object per handshake, and per summary.
    #[arg(long)]
    pub json: bool,
}

pub struct HandshakeConfig {
    pub tracing: Tracing,
    pub by: Option<GroupBy>,
    pub top: usize,
    pub slow: Option<Duration>,
    pub interval: Option<Duration>,
    pub json: bool,
}

impl HandshakeArgs {
    pub fn into_config(self) -> HandshakeConfig {
        HandshakeConfig {
            tracing: self.tracing.to_tracing(),
            by: self.group.by,
            top: self.group.top as usize,
            slow: self.slow,
            interval: self.interval,
            json: self.json,
        }
    }
}

#[derive(Args, Debug)]
pub struct TimewaitArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    /// Refresh the table every S seconds.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub interval: Duration,
    /// Reports as JSON, one object per line.
    #[arg(long)]
    pub json: bool,
    /// Rows per container, systemd unit or cgroup instead of per process.
    #[arg(long, value_parser = timewait_by)]
    pub by: Option<GroupBy>,
}

pub struct TimewaitConfig {
    pub tracing: Tracing,
    pub interval: Duration,
    pub json: bool,
    pub by: Option<GroupBy>,
}

/// `timewait --by`: only groupings of owners (its rows are processes).
fn timewait_by(s: &str) -> Result<GroupBy, String> {
    match <GroupBy as clap::ValueEnum>::from_str(s, false)? {
        by @ (GroupBy::Container | GroupBy::Unit | GroupBy::Cgroup) => Ok(by),
        other => Err(format!(
            "`{}`: timewait groups its process rows by container, unit or cgroup",
            other.name()
        )),
    }
}

impl TimewaitArgs {
    pub fn into_config(self) -> TimewaitConfig {
        TimewaitConfig {
            tracing: self.tracing.to_tracing(),
            interval: self.interval,
            json: self.json,
            by: self.by,
        }
    }
}

/// `250ms`, `1.5s`, `40us`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 100ms, 1.5s)"))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ns, us, ms, s, m)")),
    };
    if !value.is_finite() || value < 0.0 || value * scale > 1e9 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let bytes: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(format!(
            "`{s}` must be a power of two from 4096 to 1073741824"
        ));
    }
    Ok(bytes)
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    /// Address to serve on. Beyond loopback, anyone who can reach it reads
    /// the host's connection figures: bind wider only on purpose.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9977")]
    pub listen: SocketAddr,
    /// What per-group metrics' `group` label names.
    #[arg(long, value_enum, default_value_t = GroupLabel::Comm)]
    pub group_by: GroupLabel,
    /// Groups kept apart at most; later ones count as group="other".
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_groups: u32,
    /// Forget a group (its series leave the page) once idle this long.
    #[arg(long, value_name = "SECONDS", default_value = "600", value_parser = parse_seconds)]
    pub group_ttl: Duration,
}

pub struct ServeConfig {
    pub tracing: Tracing,
    pub listen: SocketAddr,
    pub group_by: GroupLabel,
    pub max_groups: usize,
    pub group_ttl: Duration,
}

impl ServeArgs {
    pub fn into_config(self) -> ServeConfig {
        ServeConfig {
            tracing: self.tracing.to_tracing(),
            listen: self.listen,
            group_by: self.group_by,
            max_groups: self.max_groups as usize,
            group_ttl: self.group_ttl,
        }
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !secs.is_finite() || !(0.001..=1e9).contains(&secs) {
        return Err(format!(
            "`{s}` must be a number of seconds from 0.001 to 1e9"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tcp-trace").chain(args.iter().copied()))
    }

    #[test]
    fn filters_reach_the_kernel_config() {
        let Command::Watch(w) = parse(&["watch", "--port", "8080", "-6", "--pid", "42"])
            .unwrap()
            .command
        else {
            panic!("parsed as another command");
        };
        let f = w.into_config().tracing.filter;
        assert_eq!((f.port, f.family, f.pid, f.lport), (8080, AF_INET6, 42, 0));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("40us"), Ok(Duration::from_micros(40)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["watch", "--port", "0"][..],
            &["watch", "--port", "70000"],
            &["watch", "--pid", "x"],
            &["watch", "-4", "-6"],
            &["watch", "--duration", "-1"],
            &["watch", "--bogus"],
            &["stats", "--by", "color"],
            &["stats", "--top", "0"],
            &["stats", "--interval", "0"],
            &["stats", "--from", "x", "--duration", "1"],
            &["stats", "--interval", "1e-10"],
            &["watch", "--duration", "NaN"],
            &["watch", "--ring-bytes", "5000"],
            &["watch", "--ring-bytes", "2048"],
            &["watch", "--ring-bytes", "x"],
            &["life", "--json=3"],
            &["handshake", "--slow", "fast"],
            &["handshake", "--slow", "3parsecs"],
            &["doctor", "--timewait-percent", "0"],
            &["doctor", "--timewait-percent", "101"],
            &["doctor", "--close-wait-sockets", "0"],
            &["doctor", "--short-lifetime", "soon"],
            &["top", "--batch", "--by", "lport"],
            &["top", "--batch", "--json"],
            &["top", "--batch", "--sort", "color"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }
}
