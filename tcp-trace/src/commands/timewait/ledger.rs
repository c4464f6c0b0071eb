//! The timewait ledger: candidates from the tracepoint, confirmed, timed and
//! charged to their owners against readings of the kernel's timewait table.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use tcp_trace_common::Filter;

use crate::{
    aggregate::{BoundedGroups, Histogram, Merge},
    model::{family, Owner, TcpState, Transition},
    system::sock_diag::{Endpoints, TimewaitSocket},
};

/// How often the kernel's timewait table is read: the precision of exits.
pub const POLL: Duration = Duration::from_secs(1);
/// Candidates the kernel has not listed after this many polls closed without
/// TIME_WAIT (a reset, an abort, or a full timewait table).
pub const CANDIDATE_POLLS: u32 = 3;
/// Processes kept apart; later new ones are counted together.
const PROCESS_ROWS: usize = 4096;
/// Remote ends counted apart per process (for its top remotes); entries to
/// later new ones still count in `entered`.
const REMOTES_PER_ROW: usize = 256;

/// Owner as a table key: pid and last known name.
pub type ProcessKey = (u32, Vec<u8>);

/// A remote end as rows count it: the address, and the port when it is the
/// service's (our local port is ephemeral); a server's clients count per address.
pub type RemoteKey = (IpAddr, Option<u16>);

#[derive(Debug)]
struct Candidate {
    owner: Option<Owner>,
    closed_ns: u64,
    polls: u32,
}

#[derive(Debug)]
struct Lingering {
    owner: Option<Owner>,
    closed_ns: u64,
    /// Confirmed in TIME_WAIT (not only the FIN_WAIT2 substate).
    entered: bool,
}

#[derive(Clone, Default, Debug)]
pub struct ProcessRow {
    pub entered: u64,
    pub lingering: u64,
    /// Closed like a timewait but never listed by the kernel.
    pub without_timewait: u64,
    pub stay: Histogram,
    pub remotes: HashMap<RemoteKey, u64>,
}

impl Merge for ProcessRow {
    fn merge(&mut self, other: &ProcessRow) {
        self.entered += other.entered;
        self.lingering += other.lingering;
        self.without_timewait += other.without_timewait;
        self.stay.merge(&other.stay);
        for (remote, n) in &other.remotes {
            self.count_remote(*remote, *n);
        }
    }
}

impl ProcessRow {
    /// `n` more entries to `remote`, within the bound on remotes kept.
    fn count_remote(&mut self, remote: RemoteKey, n: u64) {
        let len = self.remotes.len();
        match self.remotes.get_mut(&remote) {
            Some(count) => *count += n,
            None if len < REMOTES_PER_ROW => {
                self.remotes.insert(remote, n);
            }
            None => {}
        }
    }

    /// The busiest remote ends, most entries first.
    pub fn top_remotes(&self, n: usize) -> Vec<(RemoteKey, u64)> {
        let mut remotes: Vec<(RemoteKey, u64)> =
            self.remotes.iter().map(|(k, v)| (*k, *v)).collect();
        remotes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        remotes.truncate(n);
        remotes
    }
}

pub struct Ledger {
    filter: Filter,
    candidates: HashMap<Endpoints, Candidate>,
    lingering: HashMap<Endpoints, Lingering>,
    /// Listed by the kernel at start: owner unknown.
    pub before_start: HashSet<Endpoints>,
    /// Listed by the kernel later without any candidate (missed or unowned).
    pub unattributed: HashSet<Endpoints>,
    pub rows: BoundedGroups<ProcessKey, ProcessRow>,
    /// The owner behind each row's key, for `--by` groupings of rows.
    pub owners: HashMap<ProcessKey, Owner>,
    pub unknown_owner: ProcessRow,
    pub started_ns: u64,
    polled: bool,
    /// The ephemeral port range, to tell a client's end from a server's.
    ephemeral: (u16, u16),
}

fn remote_key(e: &Endpoints, ephemeral: (u16, u16)) -> RemoteKey {
    let client_end = (ephemeral.0..=ephemeral.1).contains(&e.lport);
    (e.raddr, client_end.then_some(e.rport))
}

impl Ledger {
    pub fn new(filter: Filter, started_ns: u64, ephemeral: (u16, u16)) -> Ledger {
        Ledger {
            filter,
            candidates: HashMap::new(),
            lingering: HashMap::new(),
            before_start: HashSet::new(),
            unattributed: HashSet::new(),
            rows: BoundedGroups::with_capacity(PROCESS_ROWS),
            owners: HashMap::new(),
            unknown_owner: ProcessRow::default(),
            started_ns,
            polled: false,
            ephemeral,
        }
    }

    fn row(&mut self, owner: &Option<Owner>) -> &mut ProcessRow {
        match owner {
            Some(o) => {
                let key = (o.pid, o.comm.clone());
                // Bounded as the rows are: owners past them share "other".
                if self.owners.len() < PROCESS_ROWS || self.owners.contains_key(&key) {
                    self.owners.insert(key.clone(), o.clone());
                }
                self.rows.entry(key)
            }
            None => &mut self.unknown_owner,
        }
    }

    /// A transition from the tracepoint.
    pub fn event(&mut self, t: &Transition) {
        let closes_like_timewait =
            t.is(TcpState::FIN_WAIT2, TcpState::CLOSE) || t.is(TcpState::CLOSING, TcpState::CLOSE);
        // An error means a reset: those never leave a timewait socket.
        if !closes_like_timewait || t.sock.is_some_and(|s| s.error != 0) {
            return;
        }
        let key = Endpoints {
            laddr: t.laddr,
            lport: t.lport,
            raddr: t.raddr,
            rport: t.rport,
        };
        let candidate = Candidate {
            owner: t.owner.clone(),
            closed_ns: t.ts_ns,
            polls: 0,
        };
        self.candidates.insert(key, candidate);
    }

    /// The kernel's timewait table at `now_ns`.
    pub fn poll(&mut self, listed: &[TimewaitSocket], now_ns: u64) {
        let listed: Vec<&TimewaitSocket> = listed
            .iter()
            .filter(|s| {
                let e = &s.endpoints;
                self.filter
                    .matches_endpoints(family(e.laddr), e.lport, e.rport)
            })
            .collect();
        // Listed sockets have no owner: under --pid only candidates count.
        let by_pid = self.filter.pid != 0;
        if !self.polled {
            self.polled = true;
            for s in listed.iter().filter(|_| !by_pid) {
                if !self.candidates.contains_key(&s.endpoints) {
                    self.before_start.insert(s.endpoints);
                }
            }
        }
        for s in &listed {
            self.confirm(s, by_pid);
        }
        let present: HashSet<Endpoints> = listed.iter().map(|s| s.endpoints).collect();
        self.end_stays(&present, now_ns);
        self.expire_candidates();
        self.count_lingering();
    }

    /// A listed socket: a candidate confirmed, or one we cannot attribute;
    /// charged as an entry once it is in TIME_WAIT proper.
    fn confirm(&mut self, s: &TimewaitSocket, by_pid: bool) {
        let e = s.endpoints;
        if let Some(c) = self.candidates.remove(&e) {
            let lingering = Lingering {
                owner: c.owner,
                closed_ns: c.closed_ns,
                entered: false,
            };
            self.lingering.insert(e, lingering);
        } else if !by_pid && !self.lingering.contains_key(&e) && !self.before_start.contains(&e) {
            self.unattributed.insert(e);
        }
        if !s.time_wait {
            return;
        }
        let remote = remote_key(&e, self.ephemeral);
        let Some(l) = self.lingering.get_mut(&e).filter(|l| !l.entered) else {
            return;
        };
        l.entered = true;
        let owner = l.owner.clone();
        let row = self.row(&owner);
        row.entered += 1;
        row.count_remote(remote, 1);
    }

    /// Sockets gone from the table: their stay is over (an exit between two
    /// polls, counted at the midpoint).
    fn end_stays(&mut self, present: &HashSet<Endpoints>, now_ns: u64) {
        let gone: Vec<Endpoints> = self
            .lingering
            .keys()
            .filter(|e| !present.contains(e))
            .copied()
            .collect();
        for e in gone {
            let l = self.lingering.remove(&e).expect("listed key");
            if l.entered {
                let exit_ns = now_ns.saturating_sub(POLL.as_nanos() as u64 / 2);
                self.row(&l.owner)
                    .stay
                    .record(exit_ns.saturating_sub(l.closed_ns));
            }
        }
        self.before_start.retain(|e| present.contains(e));
        self.unattributed.retain(|e| present.contains(e));
    }

    /// Candidates never listed: closed without TIME_WAIT.
    fn expire_candidates(&mut self) {
        let mut expired = Vec::new();
        for (e, c) in self.candidates.iter_mut() {
            c.polls += 1;
            if c.polls >= CANDIDATE_POLLS {
                expired.push(*e);
            }
        }
        for e in expired {
            let c = self.candidates.remove(&e).expect("listed key");
            self.row(&c.owner).without_timewait += 1;
        }
    }

    /// Lingering now, per owner.
    fn count_lingering(&mut self) {
        for row in self.rows.values_mut() {
            row.lingering = 0;
        }
        self.unknown_owner.lingering = 0;
        let owners: Vec<Option<Owner>> = self
            .lingering
            .values()
            .filter(|l| l.entered)
            .map(|l| l.owner.clone())
            .collect();
        for owner in owners {
            self.row(&owner).lingering += 1;
        }
    }

    /// Sockets in TIME_WAIT we hold responsible for, per remote endpoint of
    /// the ephemeral `range`: (address, port, count, fraction of the range).
    pub fn pressure(&self, range: (u16, u16)) -> Vec<(IpAddr, u16, u64, f64)> {
        let size = (range.1 - range.0 + 1) as f64;
        let mut per_remote: HashMap<(IpAddr, u16), u64> = HashMap::new();
        for (e, l) in &self.lingering {
            if l.entered && (range.0..=range.1).contains(&e.lport) {
                *per_remote.entry((e.raddr, e.rport)).or_default() += 1;
            }
        }
        let mut out: Vec<_> = per_remote
            .into_iter()
            .map(|((a, p), n)| (a, p, n, n as f64 / size))
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.2));
        out
    }

    /// Sockets lingering now, ours and those we cannot attribute.
    pub fn lingering_total(&self) -> usize {
        self.lingering.values().filter(|l| l.entered).count()
            + self.before_start.len()
            + self.unattributed.len()
    }

    #[cfg(test)]
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }
}
