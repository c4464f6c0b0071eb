//! Flags of the operator's overview commands, `doctor` and `top`.

use std::time::Duration;

use clap::Args;

use super::{parse_duration, parse_seconds, Tracing, TracingArgs};
use crate::{
    aggregate::GroupBy,
    commands::{doctor::Thresholds, top::SortBy},
};

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    /// The findings as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// A process holding this many sockets in CLOSE_WAIT is piling them up.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub close_wait_sockets: u64,
    /// So is one holding a socket in CLOSE_WAIT this long (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub close_wait_age: Duration,
    /// Percent of the ephemeral port range in TIME_WAIT toward one remote
    /// endpoint that counts as pressure.
    #[arg(long, value_name = "PERCENT", default_value_t = 10.0, value_parser = parse_percent)]
    pub timewait_percent: f64,
    /// Refused or timed-out connects toward one endpoint worth a finding.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_failures: u64,
    /// Handshakes with a retransmitted SYN or SYN-ACK toward one endpoint
    /// worth a finding (each costs at least a second).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub retransmitted_handshakes: u64,
    /// Connections reset by one remote endpoint worth a finding.
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub resets: u64,
    /// Short connections a process opens to one endpoint before reuse is suggested.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub short_connections: u64,
    /// A connection living less than this (handshake to close) is short...
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub short_lifetime: Duration,
    /// ...when it also carries fewer bytes than this, both ways together.
    #[arg(long, value_name = "BYTES", default_value_t = 16384)]
    pub short_bytes: u64,
    /// A stay in FIN_WAIT2 or LAST_ACK this long makes a half-closed finding.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub half_closed_age: Duration,
    /// Established connections ended by a timeout (keep-alive probes or
    /// retransmissions unanswered) toward one endpoint worth a finding.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub keepalive_timeouts: u64,
}

pub struct DoctorConfig {
    pub tracing: Tracing,
    pub json: bool,
    pub thresholds: Thresholds,
}

/// How long `doctor` watches without `--duration`.
const DOCTOR_DURATION: Duration = Duration::from_secs(30);

impl DoctorArgs {
    pub fn into_config(self) -> DoctorConfig {
        let mut tracing = self.tracing.to_tracing();
        tracing.duration = Some(tracing.duration.unwrap_or(DOCTOR_DURATION));
        DoctorConfig {
            tracing,
            json: self.json,
            thresholds: Thresholds {
                close_wait_sockets: self.close_wait_sockets,
                close_wait_age_ns: self.close_wait_age.as_nanos() as u64,
                timewait_share: self.timewait_percent / 100.0,
                connect_failures: self.connect_failures,
                retransmitted_handshakes: self.retransmitted_handshakes,
                resets: self.resets,
                short_connections: self.short_connections,
                short_lifetime_ns: self.short_lifetime.as_nanos() as u64,
                short_bytes: self.short_bytes,
                half_closed_age_ns: self.half_closed_age.as_nanos() as u64,
                keepalive_timeouts: self.keepalive_timeouts,
            },
        }
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!("`{s}` must be a percentage above 0, at most 100")),
    }
}

#[derive(Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    pub tracing: TracingArgs,
    /// Print the table as plain text every interval (like `top -b`).
    #[arg(long, conflicts_with = "json")]
    pub batch: bool,
    /// Print one JSON object every interval.
    #[arg(long)]
    pub json: bool,
    /// Seconds between tables.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds)]
    pub interval: Duration,
    /// Rows per process, or per container.
    #[arg(long, default_value = "process", value_parser = top_by)]
    pub by: GroupBy,
    /// The column rows are sorted by, largest first.
    #[arg(long, value_enum, default_value_t = SortBy::Sockets)]
    pub sort: SortBy,
    /// Rows shown at most; the rest are summed in a row named "other".
    #[arg(long, value_name = "N", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rows: u32,
}

/// Where `top` shows its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopOutput {
    Screen,
    Batch,
    Json,
}

pub struct TopConfig {
    pub tracing: Tracing,
    pub output: TopOutput,
    pub interval: Duration,
    pub by: GroupBy,
    pub sort: SortBy,
    pub rows: usize,
}

/// `top --by`: process or container.
fn top_by(s: &str) -> Result<GroupBy, String> {
    match <GroupBy as clap::ValueEnum>::from_str(s, false)? {
        by @ (GroupBy::Process | GroupBy::Container) => Ok(by),
        other => Err(format!(
            "`{}`: top has rows per process or per container",
            other.name()
        )),
    }
}

impl TopArgs {
    pub fn into_config(self) -> TopConfig {
        TopConfig {
            tracing: self.tracing.to_tracing(),
            output: match (self.batch, self.json) {
                (true, _) => TopOutput::Batch,
                (_, true) => TopOutput::Json,
                _ => TopOutput::Screen,
            },
            interval: self.interval,
            by: self.by,
            sort: self.sort,
            rows: self.rows as usize,
        }
    }
}
