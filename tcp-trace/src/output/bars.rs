//! Histograms folded onto the 1-2-5 series of bounds (1ns, 2ns, 5ns, 10ns,
//! ...), the scale people read and Prometheus buckets can share.

use std::fmt::Write as _;

use super::text::human_duration;
use crate::aggregate::Histogram;

/// The 1-2-5 series of range bounds in ns: 1ns, 2ns, 5ns, 10ns, ...
pub fn one_two_five() -> impl Iterator<Item = u64> {
    (0..19u32).flat_map(|e| [1, 2, 5].map(|m| m * 10u64.pow(e)))
}

/// Counts per 1-2-5 range, each fine bucket counted in the range holding its
/// lower bound: `(bounds, counts)` with `counts[i]` in `[bounds[i], bounds[i + 1])`.
pub fn fold_one_two_five(h: &Histogram) -> (Vec<u64>, Vec<u64>) {
    let bounds: Vec<u64> = one_two_five().collect();
    let mut counts = vec![0u64; bounds.len()];
    for (low, _, n) in h.ranges() {
        let i = bounds.partition_point(|&b| b <= low).saturating_sub(1);
        counts[i] += n;
    }
    (bounds, counts)
}

/// A bar chart over 1-2-5 ranges, from the first to the last non-empty range.
pub fn bars(s: &mut String, h: &Histogram) {
    const WIDTH: u64 = 40;
    let (bounds, counts) = fold_one_two_five(h);
    let (Some(first), Some(last)) = (
        counts.iter().position(|&n| n > 0),
        counts.iter().rposition(|&n| n > 0),
    ) else {
        return;
    };
    let peak = counts.iter().copied().max().unwrap_or(1).max(1);
    for i in first..=last {
        let low = human_duration(bounds[i]);
        let high = bounds
            .get(i + 1)
            .map_or("inf".to_string(), |&b| human_duration(b));
        let filled = (counts[i] * WIDTH).div_ceil(peak) as usize;
        let _ = writeln!(
            s,
            "  {low:>7} .. {high:<7} |{:<w$}| {}",
            "*".repeat(filled),
            counts[i],
            w = WIDTH as usize
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_counts_each_bucket_in_the_range_of_its_lower_bound() {
        let mut h = Histogram::default();
        for ns in [1, 3, 4, 999, 1_000, 1_999, 2_000, 7_000_000_000] {
            h.record(ns);
        }
        let (bounds, counts) = fold_one_two_five(&h);
        assert_eq!(counts.iter().sum::<u64>(), 8);
        let at = |b: u64| counts[bounds.iter().position(|&x| x == b).unwrap()];
        // 1000 and 2000 share fine buckets with 992 and 1984: a value counts
        // in the range holding its bucket's lower bound.
        assert_eq!(
            (at(1), at(2), at(500), at(1_000), at(2_000)),
            (1, 2, 2, 2, 0)
        );
        assert_eq!(at(5_000_000_000), 1);
    }
}
