//! The `/metrics` page: a snapshot of what the kernel summed and what the
//! agent follows, encoded by `prometheus-client` as Prometheus text or
//! OpenMetrics.

use std::sync::OnceLock;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::{info::Info, MetricType},
    registry::{Registry, Unit},
};
use tcp_trace_common::{close_kind, hist, outcome, side};

use crate::{aggregate::Histogram, kernel::KernelSums, source::Totals, system::usage::Usage};

/// A histogram as exposed: `(le in seconds, count)` with `+Inf` last, sum
/// and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    pub bounds: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// Per group: TIME_WAIT entries (a counter), and sockets now lingering in
/// TIME_WAIT and waiting in CLOSE_WAIT, with the oldest CLOSE_WAIT's age.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupRow {
    pub group: String,
    pub timewait_entered: u64,
    pub timewait_sockets: u64,
    pub close_wait_sockets: u64,
    pub close_wait_oldest_seconds: f64,
}

/// Everything one scrape shows, taken at once.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub states: Vec<(&'static str, Buckets)>,
    pub transitions: Vec<(&'static str, &'static str, u64)>,
    /// By side, then outcome.
    pub handshakes: Vec<(&'static str, &'static str, Buckets)>,
    pub handshake_retrans: Vec<(&'static str, u64)>,
    pub closes: Vec<(&'static str, u64)>,
    pub groups: Vec<GroupRow>,
    pub dropped: Vec<(&'static str, u64)>,
    pub untracked: u64,
    pub usage: Usage,
    pub kernel_release: String,
}

const SIDES: [&str; side::COUNT as usize] = ["client", "server"];
const OUTCOMES: [&str; outcome::COUNT as usize] = ["established", "refused", "timeout", "aborted"];
const CLOSES: [&str; close_kind::COUNT as usize] = [
    "active", "passive", "reset", "aborted", "refused", "timeout",
];

impl Snapshot {
    pub fn new(sums: &KernelSums, totals: &Totals, close_waits_refused: u64) -> Snapshot {
        let k = &totals.kernel;
        Snapshot {
            states: sums
                .states
                .iter()
                .map(|(state, h)| (state.name(), buckets(h)))
                .collect(),
            transitions: sums
                .transitions
                .iter()
                .map(|((from, to), n)| (from.name(), to.name(), *n))
                .collect(),
            handshakes: sums
                .handshakes
                .iter()
                .zip(SIDES)
                .flat_map(|(by_outcome, side)| {
                    by_outcome
                        .iter()
                        .zip(OUTCOMES)
                        .map(move |(h, outcome)| (side, outcome, buckets(h)))
                })
                .collect(),
            handshake_retrans: SIDES.into_iter().zip(sums.handshake_retrans).collect(),
            closes: CLOSES.into_iter().zip(sums.closes).collect(),
            groups: Vec::new(),
            dropped: vec![
                ("kernel_skipped", k.skipped),
                ("ring_buffer_full", k.ringbuf_full),
                ("kernel_read_failed", k.read_failed),
                ("undecodable", totals.undecodable),
                ("close_wait_table_full", close_waits_refused),
            ],
            untracked: k.untracked,
            usage: Usage::default(),
            kernel_release: String::new(),
        }
    }
}

/// The `le` bounds: the kernel bucket boundaries nearest 1-2-5 steps from
/// 10 us to 1 h (each within 1.6 % of its step), in ns. A bucket boundary
/// never splits a kernel bucket, so every sample lies on the right side.
pub fn bounds_ns() -> &'static [u64] {
    static BOUNDS: OnceLock<Vec<u64>> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        let mut steps: Vec<u64> = Vec::new();
        let mut decade = 10_000u64; // 10 us
        while decade <= 1_000_000_000_000 {
            steps.extend([decade, 2 * decade, 5 * decade]);
            decade *= 10;
        }
        steps.retain(|&s| s < 3_600_000_000_000);
        steps.push(3_600_000_000_000); // 1 h
        steps.iter().map(|&s| nearest_boundary(s)).collect()
    })
}

/// The kernel bucket boundary (the first value of some bucket) nearest `ns`.
fn nearest_boundary(ns: u64) -> u64 {
    let (low, width) = hist::bounds(hist::bucket(ns));
    let high = low + width;
    if ns - low <= high - ns {
        low
    } else {
        high
    }
}

/// A kernel histogram on the exposed bounds. `le` is one nanosecond below
/// a boundary (values are whole nanoseconds), so a bucket's samples are all
/// at most its `le`. The sum adds bucket midpoints (within 1.6 %): the
/// kernel keeps no exact sum.
pub fn buckets(h: &Histogram) -> Buckets {
    let bounds = bounds_ns();
    let mut counts = vec![0u64; bounds.len() + 1];
    let mut sum_ns = 0f64;
    for (low, high, n) in h.ranges() {
        // The first boundary above the kernel bucket's low end is at or
        // above its high end: boundaries are bucket edges.
        let slot = bounds.partition_point(|&b| b <= low);
        counts[slot] += n;
        sum_ns += (low + (high - low - 1) / 2) as f64 * n as f64;
    }
    let mut out: Vec<(f64, u64)> = bounds
        .iter()
        .map(|&b| (b.saturating_sub(1) as f64 / 1e9, 0))
        .collect();
    out.push((f64::INFINITY, 0));
    for (slot, n) in out.iter_mut().zip(counts) {
        slot.1 = n;
    }
    Buckets {
        bounds: out,
        sum_seconds: sum_ns / 1e9,
        count: h.count(),
    }
}

/// The page in the format asked for.
pub fn encode(snapshot: Snapshot, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let build = Info::new(vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("kernel", snapshot.kernel_release.clone()),
    ]);
    registry.register(
        "tcp_trace_build",
        "tcp-trace's version and the running kernel",
        build,
    );
    registry.register_collector(Box::new(snapshot));
    let mut page = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut page, &registry)?;
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut page, &registry)?;
    }
    Ok(page)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "tcp_trace_state_duration",
            "Time sockets spent in each TCP state, by the state they left",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (state, b) in &self.states {
            histogram(&mut family, &[("state", *state)], b)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_trace_transitions",
            "TCP state transitions",
            None,
            MetricType::Counter,
        )?;
        for (from, to, n) in &self.transitions {
            counter(&mut family, &[("from", *from), ("to", *to)], *n)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_trace_handshake_duration",
            "Handshake time: client from SYN to SYN_SENT's end, server from first SYN-ACK to final ACK",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (side, outcome, b) in &self.handshakes {
            histogram(&mut family, &[("side", *side), ("outcome", *outcome)], b)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_trace_handshake_retransmits",
            "SYN (client) and SYN-ACK (server) retransmissions of finished handshakes",
            None,
            MetricType::Counter,
        )?;
        for (side, n) in &self.handshake_retrans {
            counter(&mut family, &[("side", *side)], *n)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_trace_connections_closed",
            "Connections closed, by how they closed",
            None,
            MetricType::Counter,
        )?;
        for (close, n) in &self.closes {
            counter(&mut family, &[("close", *close)], *n)?;
        }
        self.encode_groups(&mut encoder)?;
        let mut family = encoder.encode_descriptor(
            "tcp_trace_events_dropped",
            "Transitions lost before the agent saw them, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in &self.dropped {
            counter(&mut family, &[("reason", *reason)], *n)?;
        }
        encoder
            .encode_descriptor(
                "tcp_trace_sockets_untracked",
                "Transitions of sockets the kernel program had no record of (opened before start, or evicted): duration unknown",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.untracked, None)?;
        encoder
            .encode_descriptor(
                "process_cpu",
                "User and system CPU time of the agent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.usage.cpu_seconds, None)?;
        encoder
            .encode_descriptor(
                "process_resident_memory",
                "Resident memory of the agent",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?
            .encode_gauge(&(self.usage.resident_bytes as i64))?;
        Ok(())
    }
}

impl Snapshot {
    fn encode_groups(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "tcp_trace_timewait_entered",
            "Sockets that entered TIME_WAIT (confirmed in the kernel's table), by group",
            None,
            MetricType::Counter,
        )?;
        for g in &self.groups {
            counter(
                &mut family,
                &[("group", g.group.as_str())],
                g.timewait_entered,
            )?;
        }
        let gauges: [GroupGauge; 3] = [
            (
                "tcp_trace_timewait_sockets",
                "Sockets lingering in TIME_WAIT now, by group",
                |g| g.timewait_sockets as f64,
                None,
            ),
            (
                "tcp_trace_close_wait_sockets",
                "Sockets in CLOSE_WAIT now (the peer closed, the application has not), by group",
                |g| g.close_wait_sockets as f64,
                None,
            ),
            (
                "tcp_trace_close_wait_oldest",
                "Age of the group's oldest socket in CLOSE_WAIT",
                |g| g.close_wait_oldest_seconds,
                Some(Unit::Seconds),
            ),
        ];
        for (name, help, value, unit) in gauges {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for g in &self.groups {
                family
                    .encode_family(&[("group", g.group.as_str())])?
                    .encode_gauge(&value(g))?;
            }
        }
        Ok(())
    }
}

/// A per-group gauge: its name, help, value and unit.
type GroupGauge = (
    &'static str,
    &'static str,
    fn(&GroupRow) -> f64,
    Option<Unit>,
);

fn counter(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &[(&str, &str)],
    n: u64,
) -> Result<(), std::fmt::Error> {
    family
        .encode_family(&labels)?
        .encode_counter::<NoLabelSet, _, u64>(&n, None)
}

fn histogram(
    family: &mut prometheus_client::encoding::MetricEncoder,
    labels: &[(&str, &str)],
    b: &Buckets,
) -> Result<(), std::fmt::Error> {
    family
        .encode_family(&labels)?
        .encode_histogram::<NoLabelSet>(b.sum_seconds, b.count, &b.bounds, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_kernel_boundaries_near_1_2_5_steps() {
        let bounds = bounds_ns();
        assert_eq!(bounds.len(), 27, "10 us .. 2000 s in 1-2-5 steps, then 1 h");
        for (&b, step) in bounds.iter().zip([10_000u64, 20_000, 50_000]) {
            let off = (b as f64 - step as f64).abs() / step as f64;
            assert!(off < 0.016, "{b} vs {step}");
        }
        for &b in bounds {
            assert_eq!(
                hist::bounds(hist::bucket(b)).0,
                b,
                "{b} starts a kernel bucket"
            );
        }
        assert!(bounds.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn samples_land_below_their_le() {
        let mut h = Histogram::default();
        let bounds = bounds_ns();
        // Just below and at the first boundary, and an hour and more.
        for ns in [bounds[0] - 1, bounds[0], 2 * 3_600_000_000_000] {
            h.record(ns);
        }
        let b = buckets(&h);
        assert_eq!(b.count, 3);
        assert_eq!(b.bounds[0], ((bounds[0] - 1) as f64 / 1e9, 1));
        assert_eq!(b.bounds[1].1, 1, "a boundary value goes above");
        assert_eq!(b.bounds.last().unwrap(), &(f64::INFINITY, 1));
        let expected = (bounds[0] * 2 + 2 * 3_600_000_000_000) as f64 / 1e9;
        assert!((b.sum_seconds - expected).abs() / expected < 0.016);
    }

    #[test]
    fn pages_in_both_formats() {
        let mut snapshot = Snapshot::new(&KernelSums::default(), &Totals::default(), 0);
        snapshot.groups.push(GroupRow {
            group: "curl".into(),
            timewait_entered: 3,
            timewait_sockets: 2,
            close_wait_sockets: 1,
            close_wait_oldest_seconds: 1.5,
        });
        let text = encode(snapshot.clone(), false).unwrap();
        assert!(
            text.contains("tcp_trace_timewait_entered_total{group=\"curl\"} 3"),
            "{text}"
        );
        assert!(text.contains("tcp_trace_close_wait_oldest_seconds{group=\"curl\"} 1.5"));
        assert!(text.contains("tcp_trace_events_dropped_total{reason=\"kernel_skipped\"} 0"));
        assert!(!text.contains("# EOF"));
        let open = encode(snapshot, true).unwrap();
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("tcp_trace_build_info{version="));
    }
}
