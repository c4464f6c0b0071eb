//! The state `top` keeps: every socket's state and owner, followed from the
//! kernel's table at start through the transitions, and per-row figures for
//! the interval. Pure logic, tested without the kernel.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use super::super::life::{ending, Ending};
use crate::{
    aggregate::{group_name, GroupBy, Histogram},
    model::{Owner, TcpState, Transition},
    system::sock_diag::Endpoints,
};

/// The states `top` shows, in column order.
pub const STATES: [TcpState; 8] = [
    TcpState::ESTABLISHED,
    TcpState::SYN_SENT,
    TcpState::SYN_RECV,
    TcpState::CLOSE_WAIT,
    TcpState::FIN_WAIT1,
    TcpState::FIN_WAIT2,
    TcpState::LAST_ACK,
    TcpState::TIME_WAIT,
];

#[derive(Clone, Debug)]
struct Sock {
    state: TcpState,
    owner: Option<Owner>,
    /// When it entered `state`; `None` when it was already in it at start.
    since_ns: Option<u64>,
}

/// One row: an owner (process or container) and its figures.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub name: String,
    /// An owner of the row, for JSON's pid and comm.
    pub owner: Option<Owner>,
    /// Sockets now in each of `STATES`.
    pub states: [u64; STATES.len()],
    /// Connections established this interval: accepted (in), opened (out).
    pub new_in: u64,
    pub new_out: u64,
    pub handshakes: Histogram,
    pub resets: u64,
    /// Age of the oldest CLOSE_WAIT socket, and whether it is a lower bound
    /// (the socket was in CLOSE_WAIT when tracing began).
    pub oldest_close_wait: Option<(u64, bool)>,
}

impl Row {
    pub fn sockets(&self) -> u64 {
        self.states.iter().sum()
    }

    /// Adds `other`'s figures (to fold rows into "other").
    fn merge(&mut self, other: &Row) {
        for (a, b) in self.states.iter_mut().zip(other.states) {
            *a += b;
        }
        self.new_in += other.new_in;
        self.new_out += other.new_out;
        self.handshakes.merge(&other.handshakes);
        self.resets += other.resets;
        if let Some(theirs) = other.oldest_close_wait {
            self.merge_oldest(theirs);
        }
    }

    /// Keeps the older of its oldest CLOSE_WAIT and `age`.
    fn merge_oldest(&mut self, age: (u64, bool)) {
        if self.oldest_close_wait.is_none_or(|ours| age.0 >= ours.0) {
            self.oldest_close_wait = Some(age);
        }
    }
}

/// Keeps the first `max` rows and folds the rest into one named `other`.
pub fn fold(mut rows: Vec<Row>, max: usize) -> Vec<Row> {
    if rows.len() <= max {
        return rows;
    }
    let mut other = Row {
        name: OTHER.to_string(),
        ..Row::default()
    };
    for row in rows.drain(max..) {
        other.merge(&row);
    }
    rows.push(other);
    rows
}

/// What a row's name depends on under `by`, borrowed from the owner: the
/// process (pid and comm), or the container (none outside one); `None`
/// for an unknown owner.
type NameKey<'o> = Option<(u32, &'o [u8], Option<&'o str>)>;

fn name_key(by: GroupBy, owner: Option<&Owner>) -> NameKey<'_> {
    let o = owner?;
    Some(match by {
        GroupBy::Container => {
            let container = o.placement.as_deref().and_then(|p| p.container.as_deref());
            (0, &[][..], container)
        }
        _ => (o.pid, &o.comm[..], None),
    })
}

/// One socket in `state` (with its age in it, and whether that is a lower
/// bound) counted in its owner's partial row.
fn count<'o>(
    partial: &mut HashMap<NameKey<'o>, Row>,
    by: GroupBy,
    owner: Option<&'o Owner>,
    state: TcpState,
    age: (u64, bool),
) {
    let Some(column) = STATES.iter().position(|s| *s == state) else {
        return;
    };
    let row = partial.entry(name_key(by, owner)).or_default();
    if row.owner.is_none() {
        row.owner = owner.cloned();
    }
    row.states[column] += 1;
    if state == TcpState::CLOSE_WAIT {
        row.merge_oldest(age);
    }
}

/// The row of owners past the bounds.
pub const OTHER: &str = "other";

/// Rows with flows kept apart in one interval; later ones count as `other`
/// (a process renaming its threads endlessly must not grow the table).
const FLOWS: usize = 4096;

/// Per-interval figures of a row, cleared at each report.
#[derive(Clone, Debug, Default)]
struct Flow {
    owner: Option<Owner>,
    new_in: u64,
    new_out: u64,
    handshakes: Histogram,
    resets: u64,
}

pub struct Table {
    by: GroupBy,
    /// Sockets seen in events, by kernel address (valid until their CLOSE).
    sockets: HashMap<u64, Sock>,
    /// Sockets listed at start and not seen since, by endpoints.
    before: HashMap<Endpoints, Sock>,
    capacity: usize,
    /// Sockets not followed because `capacity` was reached.
    pub overflow: u64,
    flows: HashMap<String, Flow>,
    started_ns: u64,
}

impl Table {
    pub fn new(by: GroupBy, capacity: usize, started_ns: u64) -> Table {
        Table {
            by,
            sockets: HashMap::new(),
            before: HashMap::new(),
            capacity,
            overflow: 0,
            flows: HashMap::new(),
            started_ns,
        }
    }

    /// A row's name: process or container (endpoints play no part in them).
    fn name(&self, owner: Option<&Owner>) -> String {
        group_name(self.by, owner, 0, 0, Ipv4Addr::UNSPECIFIED.into())
    }

    /// A socket in `state` when tracing began.
    pub fn existing(&mut self, e: Endpoints, state: TcpState, owner: Option<Owner>) {
        let sock = Sock {
            state,
            owner,
            since_ns: None,
        };
        self.before.insert(e, sock);
    }

    pub fn event(&mut self, t: &Transition) {
        let e = Endpoints::of(t);
        if t.accept {
            if let Some(s) = self.sockets.get_mut(&t.sk) {
                s.owner.clone_from(&t.owner);
            }
            return;
        }
        self.count_flow(t);
        let known = self.sockets.contains_key(&t.sk);
        let mut sock = match self.sockets.remove(&t.sk) {
            Some(s) => s,
            None => self.before.remove(&e).unwrap_or(Sock {
                state: t.old_state,
                owner: None,
                since_ns: None,
            }),
        };
        if t.new_state == TcpState::CLOSE || t.new_state == TcpState::LISTEN {
            return;
        }
        if t.owner.is_some() {
            sock.owner.clone_from(&t.owner);
        }
        sock.state = t.new_state;
        sock.since_ns = Some(t.ts_ns);
        if known || self.sockets.len() < self.capacity {
            self.sockets.insert(t.sk, sock);
        } else {
            self.overflow += 1;
        }
    }

    fn count_flow(&mut self, t: &Transition) {
        let (new_in, new_out, handshake) = match (t.old_state, t.new_state) {
            (TcpState::SYN_RECV, TcpState::ESTABLISHED) => (1, 0, t.handshake_ns),
            (TcpState::SYN_SENT, TcpState::ESTABLISHED) => (0, 1, t.duration_ns),
            _ => (0, 0, None),
        };
        let reset =
            t.new_state == TcpState::CLOSE && ending(&[], t.old_state, t.sock) == Ending::Reset;
        if new_in + new_out == 0 && !reset {
            return;
        }
        let mut name = self.name(t.owner.as_ref());
        if self.flows.len() >= FLOWS && !self.flows.contains_key(&name) {
            name = OTHER.to_string();
        }
        let flow = self.flows.entry(name).or_default();
        if flow.owner.is_none() {
            flow.owner.clone_from(&t.owner);
        }
        flow.new_in += new_in;
        flow.new_out += new_out;
        if let Some(ns) = handshake {
            flow.handshakes.record(ns);
        }
        flow.resets += u64::from(reset);
    }

    /// The rows as of `now_ns`, with the interval's flows (then cleared),
    /// and `timewait` (owners and states of timewait sockets now) counted in.
    pub fn rows<'a>(
        &mut self,
        now_ns: u64,
        timewait: impl Iterator<Item = (Option<&'a Owner>, TcpState)>,
    ) -> Vec<Row> {
        // Sockets are counted per owner key first, and each row named once:
        // formatting a name per socket was most of a refresh's cost.
        let (by, started) = (self.by, self.started_ns);
        let mut partial: HashMap<NameKey, Row> = HashMap::new();
        for s in self.sockets.values().chain(self.before.values()) {
            let age = s
                .since_ns
                .map_or(now_ns.saturating_sub(started), |t| now_ns.saturating_sub(t));
            count(
                &mut partial,
                by,
                s.owner.as_ref(),
                s.state,
                (age, s.since_ns.is_none()),
            );
        }
        for (owner, state) in timewait {
            count(&mut partial, by, owner, state, (0, false));
        }
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for row in partial.into_values() {
            let name = self.name(row.owner.as_ref());
            match rows.get_mut(&name) {
                Some(kept) => kept.merge(&row),
                None => {
                    rows.insert(name, row);
                }
            }
        }
        for (name, flow) in self.flows.drain() {
            let row = rows.entry(name).or_default();
            if row.owner.is_none() {
                row.owner = flow.owner;
            }
            row.new_in = flow.new_in;
            row.new_out = flow.new_out;
            row.handshakes = flow.handshakes;
            row.resets = flow.resets;
        }
        rows.into_iter()
            .map(|(name, row)| Row { name, ..row })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event, OwnerSource, SockFields};

    const S: u64 = 1_000_000_000;

    fn t(sk: u64, old: TcpState, new: TcpState, ts: u64) -> Transition {
        let mut t = from_event(&sample_event()).unwrap();
        (t.sk, t.old_state, t.new_state, t.ts_ns) = (sk, old, new, ts);
        t.owner = Some(Owner::process(7, b"app", OwnerSource::Task));
        t.accept = false;
        t
    }

    fn column(state: TcpState) -> usize {
        STATES.iter().position(|s| *s == state).unwrap()
    }

    #[test]
    fn sockets_follow_their_transitions_until_close() {
        let mut table = Table::new(GroupBy::Process, 100, 0);
        table.event(&t(1, TcpState::CLOSE, TcpState::SYN_SENT, S));
        let mut est = t(1, TcpState::SYN_SENT, TcpState::ESTABLISHED, 2 * S);
        est.duration_ns = Some(S);
        table.event(&est);
        table.event(&t(2, TcpState::CLOSE, TcpState::SYN_SENT, S));
        let rows = table.rows(3 * S, std::iter::empty());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "7 app");
        assert_eq!(rows[0].states[column(TcpState::ESTABLISHED)], 1);
        assert_eq!(rows[0].states[column(TcpState::SYN_SENT)], 1);
        assert_eq!((rows[0].new_out, rows[0].handshakes.count()), (1, 1));
        // Flows are per interval; states stay.
        let mut reset = t(1, TcpState::ESTABLISHED, TcpState::CLOSE, 4 * S);
        reset.sock = Some(SockFields {
            bytes_sent: 0,
            bytes_received: 0,
            error: crate::model::errno::ECONNRESET,
        });
        table.event(&reset);
        let rows = table.rows(5 * S, std::iter::empty());
        assert_eq!((rows[0].new_out, rows[0].resets), (0, 1));
        assert_eq!(rows[0].sockets(), 1, "only the SYN_SENT one is left");
    }

    #[test]
    fn sockets_from_before_start_are_taken_over_by_their_events() {
        let mut table = Table::new(GroupBy::Process, 100, S);
        let first = t(9, TcpState::CLOSE_WAIT, TcpState::LAST_ACK, 3 * S);
        let e = Endpoints::of(&first);
        table.existing(e, TcpState::CLOSE_WAIT, None);
        let rows = table.rows(2 * S, std::iter::empty());
        assert_eq!(rows[0].name, "unknown");
        assert_eq!(rows[0].oldest_close_wait, Some((S, true)), ">= the run");
        table.event(&first);
        let rows = table.rows(4 * S, std::iter::empty());
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].states[column(TcpState::LAST_ACK)], 1);
        assert_eq!(rows[0].name, "7 app");
    }

    #[test]
    fn rows_by_container_join_its_processes() {
        let mut table = Table::new(GroupBy::Container, 100, 0);
        let placed = |pid: u32, container: Option<&str>| {
            let mut o = Owner::process(pid, b"app", OwnerSource::Task);
            o.placement = Some(std::sync::Arc::new(crate::model::Placement {
                container: container.map(String::from),
                ..Default::default()
            }));
            o
        };
        let id = "a".repeat(64);
        for (sk, owner) in [
            (1, placed(1, Some(&id))),
            (2, placed(2, Some(&id))),
            (3, placed(3, None)),
        ] {
            let mut e = t(sk, TcpState::CLOSE, TcpState::SYN_SENT, S);
            e.owner = Some(owner);
            table.event(&e);
        }
        let rows = table.rows(2 * S, std::iter::empty());
        let names: Vec<_> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.sockets()))
            .collect();
        assert_eq!(names, vec![(id.as_str(), 2), ("none", 1)]);
    }

    #[test]
    fn timewait_owners_count_in_their_rows_and_capacity_bounds_the_table() {
        let mut table = Table::new(GroupBy::Process, 1, 0);
        table.event(&t(1, TcpState::CLOSE, TcpState::SYN_SENT, S));
        table.event(&t(2, TcpState::CLOSE, TcpState::SYN_SENT, S));
        assert_eq!(table.overflow, 1);
        let owner = Owner::process(7, b"app", OwnerSource::Task);
        let timewait = [
            (Some(&owner), TcpState::TIME_WAIT),
            (None, TcpState::TIME_WAIT),
        ];
        let rows = table.rows(2 * S, timewait.into_iter());
        let names: Vec<_> = rows
            .iter()
            .map(|r| (r.name.as_str(), r.sockets()))
            .collect();
        assert_eq!(names, vec![("7 app", 2), ("unknown", 1)]);
    }
}
