//! Per-group figures for `serve`, bounded for months of running: at most
//! `--max-groups` groups of their own (later ones count as "other"), each
//! dropped once idle for `--group-ttl`; and the sockets now in CLOSE_WAIT.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use clap::ValueEnum;

use crate::{
    aggregate::{group_name, BoundedGroups, Group, GroupBy, Merge},
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

/// A group's counters, and when it was last active.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupFigures {
    pub timewait_entered: u64,
    pub last_active_ns: u64,
}

impl Merge for GroupFigures {
    fn merge(&mut self, other: &GroupFigures) {
        self.timewait_entered += other.timewait_entered;
        self.last_active_ns = self.last_active_ns.max(other.last_active_ns);
    }
}

/// The name of the group that holds what groups past the bound count.
pub const OTHER: &str = "other";

/// Groups by label, bounded in number and in idle time.
pub struct GroupTable {
    groups: BoundedGroups<String, GroupFigures>,
    ttl_ns: u64,
}

impl GroupTable {
    pub fn new(max_groups: usize, ttl_ns: u64) -> GroupTable {
        GroupTable {
            groups: BoundedGroups::with_capacity(max_groups),
            ttl_ns,
        }
    }

    /// Marks `label` active at `now_ns`; returns the name its figures go
    /// under: its own, or "other" when the table is full.
    pub fn touch(&mut self, label: String, now_ns: u64) -> String {
        let kept = self.groups.contains(&label);
        let figures = self.groups.entry(label.clone());
        figures.last_active_ns = figures.last_active_ns.max(now_ns);
        if kept || self.groups.contains(&label) {
            label
        } else {
            OTHER.to_string()
        }
    }

    pub fn count_timewait_entry(&mut self, label: String, now_ns: u64) {
        let name = self.touch(label, now_ns);
        self.figures_mut(&name).timewait_entered += 1;
    }

    fn figures_mut(&mut self, name: &str) -> &mut GroupFigures {
        // `touch` made the entry (or "other" holds it).
        self.groups.entry(name.to_string())
    }

    /// Forgets the groups idle for longer than the TTL at `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        let ttl = self.ttl_ns;
        self.groups
            .retain(|_, g| now_ns.saturating_sub(g.last_active_ns) <= ttl);
    }

    /// Every group's figures, "other" last when it ever counted anything.
    pub fn all(&self) -> Vec<(String, GroupFigures)> {
        self.groups
            .ranked(usize::MAX, |g| g.timewait_entered)
            .into_iter()
            .map(|(group, figures)| match group {
                Group::Key(name) => (name, figures),
                Group::Other => (OTHER.to_string(), figures),
            })
            .collect()
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
        let key = (t.netns.unwrap_or(host_netns), endpoints(t));
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

    /// Each socket: its owner, and when it entered CLOSE_WAIT.
    pub fn iter(&self) -> impl Iterator<Item = (Option<&Owner>, u64)> {
        self.sockets
            .values()
            .map(|(at, owner)| (owner.as_ref(), *at))
    }
}

fn endpoints(t: &Transition) -> Endpoints {
    Endpoints {
        laddr: t.laddr,
        lport: t.lport,
        raddr: t.raddr,
        rport: t.rport,
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
        let names = |t: &GroupTable| {
            t.all()
                .into_iter()
                .map(|(n, g)| (n, g.timewait_entered))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&table),
            vec![("a".into(), 1), ("b".into(), 1), (OTHER.into(), 1)]
        );
        // "a" idles past the TTL; "c" then gets a group of its own.
        table.expire(11 * S + 1);
        table.count_timewait_entry("c".into(), 12 * S);
        assert_eq!(
            names(&table),
            vec![("b".into(), 1), ("c".into(), 1), (OTHER.into(), 1)]
        );
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
