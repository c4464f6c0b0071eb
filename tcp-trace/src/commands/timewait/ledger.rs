//! The timewait ledger: candidates from the tracepoint, confirmed, timed and
//! charged to their owners against readings of the kernel's timewait table.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use tcp_trace_common::Filter;

use crate::{
    aggregate::{BoundedGroups, Histogram, Merge},
    commands::doctor::TimewaitPressure,
    model::{family, Owner, TcpState, TimewaitChange, TimewaitEvent, Transition},
    system::sock_diag::{Endpoints, TimewaitSocket},
};

/// How often the kernel's timewait table is read: the precision of exits.
pub const POLL: Duration = Duration::from_secs(1);
/// Candidates the kernel has not listed after this many polls closed without
/// TIME_WAIT (a reset, an abort, or a full timewait table).
pub const CANDIDATE_POLLS: u32 = 3;
/// Processes kept apart; later new ones are counted together.
const PROCESS_ROWS: usize = 4096;
/// Owners shared by their sockets at most; past it, sharing starts over.
const INTERNED_OWNERS: usize = 16_384;

/// A socket by its network namespace (inode number) and endpoints: the same
/// endpoints can linger in two namespaces at once.
pub type SocketKey = (u32, Endpoints);

/// One reading of one network namespace's timewait table.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub netns: u32,
    pub sockets: Vec<TimewaitSocket>,
}
/// Remote ends counted apart per process (for its top remotes); entries to
/// later new ones still count in `entered`.
const REMOTES_PER_ROW: usize = 256;

/// Owner as a table key: pid and last known name.
pub type ProcessKey = (u32, Vec<u8>);

/// A remote end as rows count it: the address, and the port when it is the
/// service's (our local port is ephemeral); a server's clients count per address.
pub type RemoteKey = (IpAddr, Option<u16>);

/// An owner shared by the sockets it holds: one copy per process, not one
/// per socket (a busy host lingers in TIME_WAIT by the hundred thousand).
type Shared = Arc<Owner>;

#[derive(Debug)]
struct Candidate {
    owner: Option<Shared>,
    closed_ns: u64,
    polls: u32,
}

#[derive(Debug)]
struct Lingering {
    owner: Option<Shared>,
    closed_ns: u64,
    /// The reading that last listed it (see `Ledger::generation`).
    seen: u32,
    /// Confirmed in TIME_WAIT (not only the FIN_WAIT2 substate).
    entered: bool,
    /// Precise path: the timewait socket's kernel address (0 otherwise).
    tw: u64,
}

/// Precise path: a timewait socket the kprobes saw hashed, not (yet)
/// claimed by the close that made it (that event follows its entry).
#[derive(Debug)]
struct Seen {
    tw: u64,
    entered_ns: u64,
    time_wait: bool,
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
    /// The agent's own network namespace: transitions without one are in it.
    host_netns: u32,
    // Ordered maps, not hash tables: sockets come and go by the thousand a
    // second, and a hash table churned near half full doubles and never
    // shrinks (a busy host's 120,000 timewait sockets took 38 MB).
    candidates: BTreeMap<SocketKey, Candidate>,
    lingering: BTreeMap<SocketKey, Lingering>,
    /// Listed by the kernel when its namespace was first read: owner
    /// unknown. With the reading that last listed each.
    pub before_start: BTreeMap<SocketKey, u32>,
    /// Listed by the kernel later without any candidate (missed or unowned).
    pub unattributed: BTreeMap<SocketKey, u32>,
    /// Readings so far: each marks the sockets it lists, and those of a
    /// namespace read but left unmarked are gone (no set of the listed
    /// sockets is built: it would double a busy host's peak memory).
    generation: u32,
    /// Namespaces read at least once.
    polled: HashSet<u32>,
    /// Candidates in namespaces that could not be read (no process of
    /// theirs left to read them through): neither confirmed nor refuted.
    pub out_of_reach: u64,
    pub rows: BoundedGroups<ProcessKey, ProcessRow>,
    /// The owner behind each row's key, for `--by` groupings of rows.
    pub owners: HashMap<ProcessKey, Owner>,
    pub unknown_owner: ProcessRow,
    pub started_ns: u64,
    /// The ephemeral port range, to tell a client's end from a server's.
    ephemeral: (u16, u16),
    /// Owners of the entries confirmed since `take_entries`, when recorded.
    entries: Option<Vec<Option<Shared>>>,
    /// Time between two readings: exits are placed midway.
    poll_ns: u64,
    /// Owners seen, by pid and name, shared by their sockets.
    interned: HashMap<(u32, [u8; 16]), Shared>,
    /// Entries and exits come from the kernel's timewait functions
    /// (`timewait`), not from readings of its table.
    precise: bool,
    /// Precise path: timewait sockets not claimed by a close (yet).
    seen: BTreeMap<SocketKey, Seen>,
}

pub fn remote_key(e: &Endpoints, ephemeral: (u16, u16)) -> RemoteKey {
    let client_end = (ephemeral.0..=ephemeral.1).contains(&e.lport);
    (e.raddr, client_end.then_some(e.rport))
}

impl Ledger {
    pub fn new(filter: Filter, started_ns: u64, ephemeral: (u16, u16), host_netns: u32) -> Ledger {
        Ledger {
            filter,
            host_netns,
            candidates: BTreeMap::new(),
            lingering: BTreeMap::new(),
            before_start: BTreeMap::new(),
            unattributed: BTreeMap::new(),
            generation: 0,
            polled: HashSet::new(),
            out_of_reach: 0,
            rows: BoundedGroups::with_capacity(PROCESS_ROWS),
            owners: HashMap::new(),
            unknown_owner: ProcessRow::default(),
            started_ns,
            ephemeral,
            entries: None,
            interned: HashMap::new(),
            poll_ns: POLL.as_nanos() as u64,
            precise: false,
            seen: BTreeMap::new(),
        }
    }

    /// Entries and exits from now on come from the kernel's timewait
    /// functions (`timewait`); readings only mark what existed before.
    pub fn use_probes(&mut self) {
        self.precise = true;
    }

    /// Readings every `poll` instead of every `POLL`.
    pub fn polled_every(mut self, poll: Duration) -> Ledger {
        self.poll_ns = poll.as_nanos() as u64;
        self
    }

    /// `owner`, shared with the sockets before it of the same process
    /// (threads renamed apart count as owners of their own).
    fn intern(&mut self, owner: &Owner) -> Shared {
        let mut comm = [0u8; 16];
        let len = owner.comm.len().min(comm.len());
        comm[..len].copy_from_slice(&owner.comm[..len]);
        let key = (owner.pid, comm);
        if let Some(known) = self.interned.get(&key) {
            if known.cgroup_id == owner.cgroup_id && known.source == owner.source {
                return known.clone();
            }
        }
        // Bounded: past it, start over (the sockets keep their copies).
        if self.interned.len() >= INTERNED_OWNERS {
            self.interned.clear();
        }
        let shared = Arc::new(owner.clone());
        self.interned.insert(key, shared.clone());
        shared
    }

    /// Keeps the owner of each entry confirmed from now on, for
    /// `take_entries`, instead of per-process rows (a row holds a histogram:
    /// thousands of short-lived processes would cost megabytes).
    pub fn record_entries(&mut self) {
        self.entries = Some(Vec::new());
    }

    /// The owners of the entries confirmed since the last call.
    pub fn take_entries(&mut self) -> Vec<Option<Shared>> {
        self.entries
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The owner of each socket lingering in TIME_WAIT now (ours, confirmed).
    pub fn lingering_owners(&self) -> impl Iterator<Item = Option<&Owner>> {
        self.lingering
            .values()
            .filter(|l| l.entered)
            .map(|l| l.owner.as_deref())
    }

    /// Each timewait socket now, as `ss` shows its state: ours, in TIME_WAIT
    /// or still in the FIN_WAIT2 substate (waiting for the peer's FIN), and
    /// those without an owner (listed before start, or unattributed), whose
    /// substate is not kept: counted as TIME_WAIT, by far the commoner.
    pub fn timewait_states(&self) -> impl Iterator<Item = (Option<&Owner>, TcpState)> {
        let ours = self.lingering.values().map(|l| {
            let state = if l.entered {
                TcpState::TIME_WAIT
            } else {
                TcpState::FIN_WAIT2
            };
            (l.owner.as_deref(), state)
        });
        let unowned = self.before_start.len() + self.unattributed.len();
        ours.chain(std::iter::repeat_n((None, TcpState::TIME_WAIT), unowned))
    }

    /// The row `owner`'s figures go to; none when entries are recorded
    /// instead (`record_entries`).
    fn row(&mut self, owner: Option<&Owner>) -> Option<&mut ProcessRow> {
        if self.entries.is_some() {
            return None;
        }
        Some(match owner {
            Some(o) => {
                let key = (o.pid, o.comm.clone());
                // Bounded as the rows are: owners past them share "other".
                if self.owners.len() < PROCESS_ROWS || self.owners.contains_key(&key) {
                    self.owners.insert(key.clone(), o.clone());
                }
                self.rows.entry(key)
            }
            None => &mut self.unknown_owner,
        })
    }

    /// A transition from the tracepoint.
    pub fn event(&mut self, t: &Transition) {
        let closes_like_timewait =
            t.is(TcpState::FIN_WAIT2, TcpState::CLOSE) || t.is(TcpState::CLOSING, TcpState::CLOSE);
        // An error means a reset: those never leave a timewait socket.
        if !closes_like_timewait || t.sock.is_some_and(|s| s.error != 0) {
            return;
        }
        let key = (t.netns.unwrap_or(self.host_netns), Endpoints::of(t));
        let owner = t.owner.as_ref().map(|o| self.intern(o));
        if self.precise {
            self.claim(key, owner);
            return;
        }
        let candidate = Candidate {
            owner,
            closed_ns: t.ts_ns,
            polls: 0,
        };
        self.candidates.insert(key, candidate);
    }

    /// Precise path: a close claims the timewait socket hashed just before
    /// it on its endpoints; none means it closed without TIME_WAIT (or
    /// the entry's record was lost, and counted as dropped).
    fn claim(&mut self, key: SocketKey, owner: Option<Shared>) {
        let Some(seen) = self.seen.remove(&key) else {
            if let Some(row) = self.row(owner.as_deref()) {
                row.without_timewait += 1;
            }
            return;
        };
        self.unattributed.remove(&key);
        let lingering = Lingering {
            owner,
            closed_ns: seen.entered_ns,
            seen: 0,
            entered: false,
            tw: seen.tw,
        };
        self.lingering.insert(key, lingering);
        if seen.time_wait {
            self.enter(key);
        }
    }

    /// Precise path: a record from the kernel's timewait functions.
    pub fn timewait(&mut self, e: &TimewaitEvent) {
        if !self
            .filter
            .matches_endpoints(family(e.laddr), e.lport, e.rport)
        {
            return;
        }
        let endpoints = Endpoints {
            laddr: e.laddr,
            lport: e.lport,
            raddr: e.raddr,
            rport: e.rport,
        };
        let key = (e.netns, endpoints);
        match e.change {
            TimewaitChange::Entry => {
                // Anything still kept on these endpoints is gone (one
                // timewait socket per endpoints and namespace): its exit's
                // record was lost.
                self.before_start.remove(&key);
                self.lingering.remove(&key);
                let seen = Seen {
                    tw: e.tw,
                    entered_ns: e.ts_ns,
                    time_wait: e.time_wait,
                };
                self.seen.insert(key, seen);
                // Listed sockets have no owner: under --pid only claimed ones count.
                if self.filter.pid == 0 {
                    self.unattributed.insert(key, 0);
                }
            }
            TimewaitChange::Rearmed if e.time_wait => {
                if let Some(seen) = self.seen.get_mut(&key).filter(|s| s.tw == e.tw) {
                    seen.time_wait = true;
                } else if self.lingering.get(&key).is_some_and(|l| l.tw == e.tw) {
                    self.enter(key);
                }
            }
            TimewaitChange::Rearmed => {}
            TimewaitChange::Exit => {
                if self.seen.get(&key).is_some_and(|s| s.tw == e.tw) {
                    self.seen.remove(&key);
                    self.unattributed.remove(&key);
                } else if self.lingering.get(&key).is_some_and(|l| l.tw == e.tw) {
                    if e.time_wait {
                        self.enter(key);
                    }
                    let l = self.lingering.remove(&key).expect("checked above");
                    if l.entered {
                        if let Some(row) = self.row(l.owner.as_deref()) {
                            row.stay.record(e.ts_ns.saturating_sub(l.closed_ns));
                        }
                    }
                } else {
                    self.before_start.remove(&key);
                }
            }
        }
    }

    /// Recounts the sockets lingering per owner (each reading does it on
    /// the sock_diag path; on the precise path, each report).
    pub fn refresh(&mut self) {
        self.count_lingering();
    }

    /// Readings of the namespaces' timewait tables at `now_ns`; sockets of
    /// namespaces not read this time are left as they were.
    pub fn poll(&mut self, readings: &[Reading], now_ns: u64) {
        // Listed sockets have no owner: under --pid only candidates count.
        let by_pid = self.filter.pid != 0;
        self.generation = self.generation.wrapping_add(1);
        let now = self.generation;
        for reading in readings {
            let listed: Vec<&TimewaitSocket> = reading
                .sockets
                .iter()
                .filter(|s| {
                    let e = &s.endpoints;
                    self.filter
                        .matches_endpoints(family(e.laddr), e.lport, e.rport)
                })
                .collect();
            if self.polled.insert(reading.netns) && !by_pid {
                for s in &listed {
                    let key = (reading.netns, s.endpoints);
                    if !self.candidates.contains_key(&key) {
                        self.before_start.insert(key, now);
                    }
                }
            }
            for s in &listed {
                self.confirm(reading.netns, s, by_pid);
            }
        }
        let read: HashSet<u32> = readings.iter().map(|r| r.netns).collect();
        self.end_stays(&read, now_ns);
        self.expire_candidates(&read, now_ns);
        self.count_lingering();
    }

    /// A listed socket: a candidate confirmed, or one we cannot attribute;
    /// charged as an entry once it is in TIME_WAIT proper.
    fn confirm(&mut self, netns: u32, s: &TimewaitSocket, by_pid: bool) {
        let key = (netns, s.endpoints);
        let now = self.generation;
        if let Some(c) = self.candidates.remove(&key) {
            // Its close may have been read after the kernel listed it (the
            // timewait socket exists just before the CLOSE event): it is
            // ours after all, not one from before start or unattributed.
            self.before_start.remove(&key);
            self.unattributed.remove(&key);
            let lingering = Lingering {
                owner: c.owner,
                closed_ns: c.closed_ns,
                seen: now,
                entered: false,
                tw: 0,
            };
            self.lingering.insert(key, lingering);
        } else if let Some(l) = self.lingering.get_mut(&key) {
            l.seen = now;
        } else if let Some(seen) = self.before_start.get_mut(&key) {
            *seen = now;
        } else if !by_pid {
            self.unattributed.insert(key, now);
        }
        if s.time_wait {
            self.enter(key);
        }
    }

    /// A socket of ours reached TIME_WAIT proper: an entry for its owner.
    fn enter(&mut self, key: SocketKey) {
        let remote = remote_key(&key.1, self.ephemeral);
        let Some(l) = self.lingering.get_mut(&key).filter(|l| !l.entered) else {
            return;
        };
        l.entered = true;
        let owner = l.owner.clone();
        if let Some(entries) = &mut self.entries {
            entries.push(owner);
            return;
        }
        if let Some(row) = self.row(owner.as_deref()) {
            row.entered += 1;
            row.count_remote(remote, 1);
        }
    }

    /// Sockets of the namespaces `read` gone from their table: their stay is
    /// over (an exit between two polls, counted at the midpoint).
    fn end_stays(&mut self, read: &HashSet<u32>, now_ns: u64) {
        let now = self.generation;
        let gone: Vec<SocketKey> = self
            .lingering
            .iter()
            .filter(|(k, l)| read.contains(&k.0) && l.seen != now)
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            let l = self.lingering.remove(&key).expect("listed key");
            if l.entered {
                let exit_ns = now_ns.saturating_sub(self.poll_ns / 2);
                if let Some(row) = self.row(l.owner.as_deref()) {
                    row.stay.record(exit_ns.saturating_sub(l.closed_ns));
                }
            }
        }
        let kept = |k: &SocketKey, seen: &mut u32| !read.contains(&k.0) || *seen == now;
        self.before_start.retain(kept);
        self.unattributed.retain(kept);
    }

    /// Candidates never listed: closed without TIME_WAIT, where their
    /// namespace was read; out of reach where it could not be. Only readings
    /// taken after the close count against a candidate: one taken before it
    /// but applied after its event (they come from another thread) cannot
    /// have listed it.
    fn expire_candidates(&mut self, read: &HashSet<u32>, taken_ns: u64) {
        let mut expired = Vec::new();
        for (key, c) in self.candidates.iter_mut() {
            if taken_ns < c.closed_ns {
                continue;
            }
            c.polls += 1;
            if c.polls >= CANDIDATE_POLLS {
                expired.push(*key);
            }
        }
        for key in expired {
            let c = self.candidates.remove(&key).expect("listed key");
            if read.contains(&key.0) {
                if let Some(row) = self.row(c.owner.as_deref()) {
                    row.without_timewait += 1;
                }
            } else {
                self.out_of_reach += 1;
            }
        }
    }

    /// Sockets lingering now per network namespace: ours (in TIME_WAIT
    /// proper), and those listed without an owner (before start, or
    /// unattributed), as `ss -tan state time-wait` in that namespace counts.
    pub fn lingering_by_netns(&self) -> BTreeMap<u32, usize> {
        let mut per = BTreeMap::new();
        let ours = self
            .lingering
            .iter()
            .filter(|(_, l)| l.entered)
            .map(|(k, _)| k);
        for key in ours
            .chain(self.before_start.keys())
            .chain(self.unattributed.keys())
        {
            *per.entry(key.0).or_default() += 1;
        }
        per
    }

    /// Network namespaces other than the agent's that hold candidates or
    /// lingering sockets: the ones to read next.
    pub fn foreign_namespaces(&self) -> HashSet<u32> {
        self.candidates
            .keys()
            .chain(self.lingering.keys())
            .map(|k| k.0)
            .filter(|&ns| ns != self.host_netns)
            .collect()
    }

    /// Lingering now, per owner.
    fn count_lingering(&mut self) {
        if self.entries.is_some() {
            return;
        }
        for row in self.rows.values_mut() {
            row.lingering = 0;
        }
        self.unknown_owner.lingering = 0;
        let owners: Vec<Option<Shared>> = self
            .lingering
            .values()
            .filter(|l| l.entered)
            .map(|l| l.owner.clone())
            .collect();
        for owner in owners {
            if let Some(row) = self.row(owner.as_deref()) {
                row.lingering += 1;
            }
        }
    }

    /// Sockets in TIME_WAIT we hold responsible for, per remote endpoint of
    /// the ephemeral `range`: (address, port, count, fraction of the range).
    pub fn pressure(&self, range: (u16, u16)) -> Vec<(IpAddr, u16, u64, f64)> {
        let size = (range.1 - range.0 + 1) as f64;
        let mut per_remote: HashMap<(IpAddr, u16), u64> = HashMap::new();
        for p in self.pressure_by_owner(range) {
            *per_remote.entry((p.raddr, p.rport)).or_default() += p.sockets;
        }
        let mut out: Vec<_> = per_remote
            .into_iter()
            .map(|((a, p), n)| (a, p, n, n as f64 / size))
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.2));
        out
    }

    /// `pressure`, apart per owner (process), busiest first.
    pub fn pressure_by_owner(&self, range: (u16, u16)) -> Vec<TimewaitPressure> {
        let size = (range.1 - range.0 + 1) as f64;
        type Key = (Option<(u32, Vec<u8>)>, IpAddr, u16);
        let mut per_remote: HashMap<Key, (Option<Shared>, u64)> = HashMap::new();
        // Ports are per namespace: the agent's own range is the host's.
        for ((netns, e), l) in &self.lingering {
            if *netns == self.host_netns && l.entered && (range.0..=range.1).contains(&e.lport) {
                let process = l.owner.as_ref().map(|o| (o.pid, o.comm.clone()));
                let entry = per_remote
                    .entry((process, e.raddr, e.rport))
                    .or_insert_with(|| (l.owner.clone(), 0));
                entry.1 += 1;
            }
        }
        let mut out: Vec<TimewaitPressure> = per_remote
            .into_iter()
            .map(|((_, raddr, rport), (owner, sockets))| TimewaitPressure {
                owner: owner.as_deref().cloned(),
                raddr,
                rport,
                sockets,
                share: sockets as f64 / size,
            })
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.sockets));
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
