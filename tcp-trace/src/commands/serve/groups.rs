//! Per-group figures for `serve`, bounded for months of running: at most
//! `--max-groups` groups of their own (later ones count as "other"), each
//! dropped once idle for `--group-ttl`; and the sockets now in CLOSE_WAIT.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use clap::ValueEnum;

use crate::{
    aggregate::{group_name, GroupBy},
    model::{Owner, Transition},
    system::sock_diag::Endpoints,
};

/// What a metric's `group` label names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GroupLabel {
    /// The owning process's name.
    Comm,
    /// The owner's container id ("none" outside containers).
    Container,
    /// The owner's systemd unit ("none" outside units).
    Unit,
}

impl GroupLabel {
    /// The group of a socket owned by `owner`: "unknown" without one.
    pub fn of(self, owner: Option<&Owner>) -> String {
        let unspecified = IpAddr::from([0, 0, 0, 0]);
        match self {
            GroupLabel::Comm => owner.map_or_else(
                || "unknown".to_string(),
                |o| String::from_utf8_lossy(&o.comm).into_owned(),
            ),
            GroupLabel::Container => group_name(GroupBy::Container, owner, 0, 0, unspecified),
            GroupLabel::Unit => group_name(GroupBy::Unit, owner, 0, 0, unspecified),
        }
    }
}

/// A group's counter, and how active it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupFigures {
    pub timewait_entered: u64,
    /// Events since the last rebalance (halved at each): how busy it is.
    recent: u64,
    last_active_ns: u64,
}

/// The name of the group that holds what groups past the bound count.
pub const OTHER: &str = "other";

/// Groups by label: the `max` busiest kept apart, the rest counted as
/// "other". A group idle for the TTL is dropped, and one far busier than
/// the least busy kept group takes its place; either way the group that
/// leaves hands its count to "other", so the sum over groups never falls.
pub struct GroupTable {
    kept: HashMap<String, GroupFigures>,
    other: GroupFigures,
    /// Recent events of labels counted as "other", the busiest candidates
    /// for a place (bounded: later labels wait for the next round).
    candidates: HashMap<String, u64>,
    max: usize,
    ttl_ns: u64,
}

impl GroupTable {
    pub fn new(max: usize, ttl_ns: u64) -> GroupTable {
        GroupTable {
            kept: HashMap::new(),
            other: GroupFigures::default(),
            candidates: HashMap::new(),
            max,
            ttl_ns,
        }
    }

    /// The name `label`'s figures go under at `now_ns`: its own when kept (or
    /// when there is room), else "other". `event` counts towards busyness;
    /// either way a kept group stays alive.
    pub fn name(&mut self, label: String, now_ns: u64, event: bool) -> String {
        if !self.kept.contains_key(&label) && self.kept.len() < self.max {
            self.kept.insert(label.clone(), GroupFigures::default());
        }
        if let Some(g) = self.kept.get_mut(&label) {
            g.last_active_ns = g.last_active_ns.max(now_ns);
            g.recent += u64::from(event);
            return label;
        }
        if event {
            let room = self.candidates.len() < 4 * self.max;
            match self.candidates.get_mut(&label) {
                Some(n) => *n += 1,
                None if room => {
                    self.candidates.insert(label, 1);
                }
                None => {}
            }
        }
        OTHER.to_string()
    }

    pub fn count_timewait_entry(&mut self, label: String, now_ns: u64) {
        let name = self.name(label, now_ns, true);
        match self.kept.get_mut(&name) {
            Some(g) => g.timewait_entered += 1,
            None => self.other.timewait_entered += 1,
        }
    }

    /// Drops the groups idle past the TTL at `now_ns`, gives the places of
    /// the least busy to candidates more than twice as busy, then halves
    /// every group's recent count.
    pub fn rebalance(&mut self, now_ns: u64) {
        let ttl = self.ttl_ns;
        let idle: Vec<String> = self
            .kept
            .iter()
            .filter(|(_, g)| now_ns.saturating_sub(g.last_active_ns) > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for label in idle {
            self.retire(&label);
        }
        let mut candidates: Vec<(String, u64)> = self.candidates.drain().collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        for (label, busy) in candidates {
            if self.kept.len() >= self.max {
                let Some((least, its)) = self
                    .kept
                    .iter()
                    .min_by(|a, b| a.1.recent.cmp(&b.1.recent).then_with(|| a.0.cmp(b.0)))
                    .map(|(k, g)| (k.clone(), g.recent))
                else {
                    break;
                };
                if busy <= 2 * its {
                    break;
                }
                self.retire(&least);
            }
            let figures = GroupFigures {
                recent: busy,
                last_active_ns: now_ns,
                ..GroupFigures::default()
            };
            self.kept.insert(label, figures);
        }
        for g in self.kept.values_mut() {
            g.recent /= 2;
        }
    }

    /// Removes a kept group; "other" takes over its count.
    fn retire(&mut self, label: &str) {
        if let Some(g) = self.kept.remove(label) {
            self.other.timewait_entered += g.timewait_entered;
        }
    }

    /// Every kept group by name, then "other" once it counted anything.
    pub fn all(&self) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .kept
            .iter()
            .map(|(k, g)| (k.clone(), g.timewait_entered))
            .collect();
        all.sort();
        if self.other.timewait_entered > 0 {
            all.push((OTHER.to_string(), self.other.timewait_entered));
        }
        all
    }
}

/// A socket by its network namespace and endpoints.
pub type SocketKey = (u32, Endpoints);

/// Sockets in CLOSE_WAIT now: when each entered it, and its owner.
pub struct CloseWaits {
    sockets: HashMap<SocketKey, (u64, Option<Owner>)>,
    capacity: usize,
    /// Entries refused because the table was full.
    pub refused: u64,
}

impl CloseWaits {
    pub fn new(capacity: usize) -> CloseWaits {
        CloseWaits {
            sockets: HashMap::new(),
            capacity,
            refused: 0,
        }
    }

    /// Follows a transition into or out of CLOSE_WAIT.
    pub fn event(&mut self, t: &Transition, host_netns: u32) {
        let key = (t.netns.unwrap_or(host_netns), Endpoints::of(t));
        if t.old_state == crate::model::TcpState::CLOSE_WAIT {
            self.sockets.remove(&key);
        }
        if t.new_state == crate::model::TcpState::CLOSE_WAIT {
            if self.sockets.len() < self.capacity || self.sockets.contains_key(&key) {
                self.sockets.insert(key, (t.ts_ns, t.owner.clone()));
            } else {
                self.refused += 1;
            }
        }
    }

    /// Drops the sockets of `netns` that entered CLOSE_WAIT before a reading
    /// taken at `taken_ns` and are not in it: their exit was missed (the
    /// kernel skipped that run).
    pub fn reconcile(&mut self, netns: u32, listed: &HashSet<Endpoints>, taken_ns: u64) {
        self.sockets.retain(|(ns, e), (entered, _)| {
            *ns != netns || *entered >= taken_ns || listed.contains(e)
        });
    }

    /// Each socket: its endpoints, its owner, and when it entered CLOSE_WAIT.
    pub fn iter(&self) -> impl Iterator<Item = (&Endpoints, Option<&Owner>, u64)> {
        self.sockets
            .iter()
            .map(|((_, e), (at, owner))| (e, owner.as_ref(), *at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event, TcpState};

    const S: u64 = 1_000_000_000;

    #[test]
    fn groups_past_the_bound_count_as_other_until_one_expires() {
        let mut table = GroupTable::new(2, 10 * S);
        table.count_timewait_entry("a".into(), S);
        table.count_timewait_entry("b".into(), 2 * S);
        table.count_timewait_entry("c".into(), 3 * S);
        let all = |t: &GroupTable| t.all();
        assert_eq!(
            all(&table),
            vec![("a".into(), 1), ("b".into(), 1), (OTHER.into(), 1)]
        );
        // "a" idles past the TTL: "other" takes its count, and "c", a
        // candidate, gets its place.
        table.count_timewait_entry("b".into(), 11 * S);
        table.rebalance(11 * S + 1);
        table.count_timewait_entry("c".into(), 12 * S);
        assert_eq!(
            all(&table),
            vec![("b".into(), 2), ("c".into(), 1), (OTHER.into(), 2)]
        );
    }

    #[test]
    fn a_far_busier_group_takes_the_least_busy_ones_place() {
        let mut table = GroupTable::new(2, 600 * S);
        for label in ["quiet", "steady", "steady", "steady"] {
            table.count_timewait_entry(label.into(), S);
        }
        for _ in 0..3 {
            table.count_timewait_entry("busy".into(), S);
        }
        table.rebalance(2 * S);
        assert_eq!(
            table.all(),
            vec![("busy".into(), 0), ("steady".into(), 3), (OTHER.into(), 4)],
            "busy's 3 stay counted in other; quiet's 1 joins them"
        );
        // Merely as busy as the least busy kept group is not enough.
        for _ in 0..2 {
            table.count_timewait_entry("newer".into(), 3 * S);
            table.count_timewait_entry("busy".into(), 3 * S);
        }
        table.rebalance(4 * S);
        assert!(table.all().iter().all(|(k, _)| k != "newer"));
    }

    #[test]
    fn close_waits_follow_entries_exits_and_readings() {
        let mut t = from_event(&sample_event()).unwrap();
        let mut waits = CloseWaits::new(1);
        t.old_state = TcpState::ESTABLISHED;
        t.new_state = TcpState::CLOSE_WAIT;
        waits.event(&t, 7);
        assert_eq!(waits.iter().count(), 1);
        // Full: another socket is refused, and counted.
        let mut other = t.clone();
        other.lport += 1;
        waits.event(&other, 7);
        assert_eq!((waits.iter().count(), waits.refused), (1, 1));
        // A reading that does not list it, taken after it entered: missed exit.
        let (listed, netns) = (HashSet::new(), t.netns.unwrap_or(7));
        waits.reconcile(netns, &listed, t.ts_ns - 1);
        assert_eq!(waits.iter().count(), 1, "reading older than the entry");
        waits.reconcile(netns + 1, &listed, t.ts_ns + 1);
        assert_eq!(waits.iter().count(), 1, "another namespace's reading");
        waits.reconcile(netns, &listed, t.ts_ns + 1);
        assert_eq!(waits.iter().count(), 0);
        // Entry and exit by events.
        waits.event(&t, 7);
        t.old_state = TcpState::CLOSE_WAIT;
        t.new_state = TcpState::LAST_ACK;
        waits.event(&t, 7);
        assert_eq!(waits.iter().count(), 0);
    }

    #[test]
    fn labels() {
        let t = from_event(&sample_event()).unwrap();
        assert_eq!(GroupLabel::Comm.of(t.owner.as_ref()), "curl");
        assert_eq!(GroupLabel::Comm.of(None), "unknown");
        assert_eq!(GroupLabel::Container.of(None), "unknown");
    }
}
