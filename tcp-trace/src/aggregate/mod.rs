//! Aggregation: duration histograms on the kernel's buckets, and bounded
//! groups of them.

mod group_by;
mod groups;
mod histogram;

pub use group_by::{group_name, GroupBy};
pub use groups::{BoundedGroups, Group, Merge};
pub use histogram::{Histogram, StateHistograms};

impl Merge for Histogram {
    fn merge(&mut self, other: &Histogram) {
        Histogram::merge(self, other);
    }
}

impl Merge for StateHistograms {
    fn merge(&mut self, other: &StateHistograms) {
        StateHistograms::merge(self, other);
    }
}
