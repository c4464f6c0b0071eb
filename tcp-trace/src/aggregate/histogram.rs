//! Duration histograms: the same log-linear buckets the kernel aggregates
//! into (`tcp_trace_common::hist`), so kernel-aggregated, per-event and
//! replayed reports agree exactly for the same events.

use tcp_trace_common::hist;

use crate::model::TcpState;

/// Durations spent in one state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; hist::BUCKETS as usize],
            count: 0,
            max: 0,
        }
    }
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.buckets[hist::bucket(ns) as usize] += 1;
        self.count += 1;
        self.max = self.max.max(ns);
    }

    /// Adds `n` values to bucket `b` (from the kernel's per-CPU counts).
    pub fn add_bucket(&mut self, b: u32, n: u64) {
        if let Some(slot) = self.buckets.get_mut(b as usize) {
            *slot += n;
            self.count += n;
        }
    }

    /// Raises the maximum to at least `ns` (the kernel tracks it exactly).
    pub fn observe_max(&mut self, ns: u64) {
        self.max = self.max.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The `q`-quantile (0 < q <= 1): the midpoint of the bucket holding the
    /// value of rank ceil(q * count), never above the exact maximum; the top
    /// rank is the maximum itself.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        if rank == self.count {
            // The top rank is the maximum, which is kept exactly.
            return Some(self.max);
        }
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(hist::midpoint(b as u32).min(self.max));
            }
        }
        Some(self.max)
    }

    /// Non-empty buckets as (low, high-exclusive, count), for drawing.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(b, &n)| {
                let (low, width) = hist::bounds(b as u32);
                (low, low.saturating_add(width), n)
            })
    }
}

/// Histograms per TCP state (the state the socket left).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateHistograms {
    states: Vec<(TcpState, Histogram)>,
}

impl StateHistograms {
    pub fn state_mut(&mut self, state: TcpState) -> &mut Histogram {
        let i = match self.states.binary_search_by_key(&state, |(s, _)| *s) {
            Ok(i) => i,
            Err(i) => {
                self.states.insert(i, (state, Histogram::default()));
                i
            }
        };
        &mut self.states[i].1
    }

    pub fn record(&mut self, state: TcpState, ns: u64) {
        self.state_mut(state).record(ns);
    }

    pub fn merge(&mut self, other: &StateHistograms) {
        for (state, h) in &other.states {
            self.state_mut(*state).merge(h);
        }
    }

    /// States in kernel order, with at least one value.
    pub fn iter(&self) -> impl Iterator<Item = (TcpState, &Histogram)> {
        self.states
            .iter()
            .filter(|(_, h)| h.count > 0)
            .map(|(s, h)| (*s, h))
    }

    pub fn total(&self) -> u64 {
        self.states.iter().map(|(_, h)| h.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact quantile of a sorted sample, by the same rank rule.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    #[test]
    fn quantiles_within_two_percent_from_1us_to_hours() {
        // Log-uniform values from 1 us to 10 h, deterministic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut values = Vec::new();
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let exp = 3.0 + (x % 1_000_000) as f64 / 1_000_000.0 * 10.6; // 1e3 .. 3.6e13 ns
            values.push(10f64.powf(exp) as u64);
        }
        let mut h = Histogram::default();
        values.iter().for_each(|&v| h.record(v));
        values.sort_unstable();
        for q in [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0] {
            let (want, got) = (exact(&values, q), h.quantile(q).unwrap());
            let err = (got as f64 - want as f64).abs() / want as f64;
            assert!(
                err <= 0.02,
                "q={q}: got {got}, exact {want}, error {:.2}%",
                err * 100.0
            );
        }
        assert_eq!(h.max(), *values.last().unwrap());
    }

    #[test]
    fn single_values_and_small_values_are_exact() {
        let mut h = Histogram::default();
        h.record(17);
        assert_eq!(h.quantile(0.5), Some(17));
        let mut h = Histogram::default();
        h.record(1_000_000_000);
        assert_eq!(
            h.quantile(0.5),
            Some(1_000_000_000),
            "one value: it is the max"
        );
        h.record(2_000_000_000);
        let p50 = h.quantile(0.5).unwrap();
        assert!(p50.abs_diff(1_000_000_000) < 16_000_000, "{p50}");
        assert_eq!(h.quantile(0.99), Some(2_000_000_000));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn merging_equals_recording_together() {
        let (mut a, mut b, mut both) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for v in [5, 500, 5_000_000] {
            a.record(v);
            both.record(v);
        }
        for v in [7, 70_000] {
            b.record(v);
            both.record(v);
        }
        a.merge(&b);
        assert_eq!(a, both);
    }

    #[test]
    fn states_iterate_in_kernel_order() {
        let mut s = StateHistograms::default();
        s.record(TcpState(8), 1);
        s.record(TcpState(1), 2);
        s.record(TcpState(8), 3);
        let order: Vec<_> = s.iter().map(|(st, h)| (st.name(), h.count())).collect();
        assert_eq!(order, [("ESTABLISHED", 1), ("CLOSE_WAIT", 2)]);
        assert_eq!(s.total(), 3);
    }
}
