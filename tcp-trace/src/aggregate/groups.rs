//! A bounded "top N and other" grouping: memory stays bounded however many
//! distinct keys arrive, and reports name the busiest groups.

use std::{collections::HashMap, hash::Hash};

/// Figures that can be added together (to fold groups into "other").
pub trait Merge {
    fn merge(&mut self, other: &Self);
}

/// One row of a ranked report: a key kept apart, or everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Group<K> {
    Key(K),
    Other,
}

/// Groups keyed by `K`. Keys past `capacity` go to "other" as they arrive;
/// `ranked` folds every group past the top N into it as well.
#[derive(Clone, Debug)]
pub struct BoundedGroups<K, V> {
    groups: HashMap<K, V>,
    other: V,
    capacity: usize,
    /// Some key arrived when there was no room, so "other" holds figures.
    overflowed: bool,
}

impl<K: Hash + Eq + Clone + Ord, V: Default + Merge + Clone> BoundedGroups<K, V> {
    /// Room for `top` groups with margin, so the busiest are found among more
    /// candidates than are shown, yet memory stays bounded.
    pub fn for_top(top: usize) -> Self {
        Self::with_capacity((top * 4).max(64))
    }

    pub fn with_capacity(capacity: usize) -> Self {
        BoundedGroups {
            groups: HashMap::new(),
            other: V::default(),
            capacity,
            overflowed: false,
        }
    }

    /// The figures of `key`'s group, or of "other" when there is no room.
    pub fn entry(&mut self, key: K) -> &mut V {
        let len = self.groups.len();
        if self.groups.contains_key(&key) {
            return self.groups.get_mut(&key).expect("present");
        }
        if len < self.capacity {
            self.groups.entry(key).or_default()
        } else {
            self.overflowed = true;
            &mut self.other
        }
    }

    /// Every group kept apart, and "other", for updates in place.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.groups
            .values_mut()
            .chain(std::iter::once(&mut self.other))
    }

    /// The `top` heaviest groups by `weight`, heaviest first (ties by key),
    /// then "other" (groups past `top` folded in) when any key went there.
    pub fn ranked(&self, top: usize, weight: impl Fn(&V) -> u64) -> Vec<(Group<K>, V)> {
        let mut groups: Vec<(&K, &V)> = self.groups.iter().collect();
        groups.sort_by(|a, b| weight(b.1).cmp(&weight(a.1)).then_with(|| a.0.cmp(b.0)));
        let mut other = self.other.clone();
        for (_, v) in groups.iter().skip(top) {
            other.merge(v);
        }
        let mut out: Vec<(Group<K>, V)> = groups
            .into_iter()
            .take(top)
            .map(|(k, v)| (Group::Key(k.clone()), v.clone()))
            .collect();
        if self.overflowed || self.groups.len() > top {
            out.push((Group::Other, other));
        }
        out
    }

    #[cfg(test)]
    pub fn get(&self, key: &K) -> Option<&V> {
        self.groups.get(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Merge for u64 {
        fn merge(&mut self, other: &u64) {
            *self += other;
        }
    }

    #[test]
    fn top_groups_then_other() {
        let mut g = BoundedGroups::<u16, u64>::for_top(2);
        for (key, n) in [(80, 5), (443, 3), (22, 2), (25, 1)] {
            *g.entry(key) += n;
        }
        let ranked = g.ranked(2, |v| *v);
        assert_eq!(
            ranked,
            [(Group::Key(80), 5), (Group::Key(443), 3), (Group::Other, 3)]
        );
    }

    #[test]
    fn ties_rank_by_key_and_empty_other_is_left_out() {
        let mut g = BoundedGroups::<u16, u64>::for_top(10);
        *g.entry(9) += 1;
        *g.entry(3) += 1;
        assert_eq!(
            g.ranked(10, |v| *v),
            [(Group::Key(3), 1), (Group::Key(9), 1)]
        );
    }

    #[test]
    fn memory_stays_bounded() {
        let mut g = BoundedGroups::<u16, u64>::with_capacity(64);
        for key in 1..=1000 {
            *g.entry(key) += 1;
        }
        assert_eq!(g.len(), 64);
        let ranked = g.ranked(1, |v| *v);
        assert_eq!(ranked.len(), 2);
        assert_eq!(ranked.iter().map(|(_, v)| v).sum::<u64>(), 1000);
        // A key already kept apart keeps counting apart.
        *g.entry(1) += 5;
        assert_eq!(g.ranked(1, |v| *v)[0], (Group::Key(1), 6));
    }
}
