//! Types shared by the kernel program and the userspace agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into the
//! ring buffer and maps, userspace reads the same bytes back.
#![cfg_attr(not(test), no_std)]

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`).
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Length of a task's `comm`, NUL padding included.
pub const COMM_LEN: usize = 16;

/// `Event::flags`: the owner (pid, comm) is known.
pub const FLAG_OWNER_KNOWN: u8 = 1 << 0;
/// `Event::flags`: `duration_ns` is known (we saw the socket enter `old_state`).
pub const FLAG_DURATION_KNOWN: u8 = 1 << 1;
/// `Event::flags`: the transition ran in interrupt context (softirq, hardirq or NMI).
pub const FLAG_IRQ_CONTEXT: u8 = 1 << 2;
/// `Event::flags`: `bytes_acked`, `bytes_received` and `sk_err` were read from
/// the socket (only on transitions to CLOSE, when the kernel's BTF gave offsets).
pub const FLAG_SOCK_FIELDS: u8 = 1 << 3;
/// `Event::flags`: the program saw this socket open actively (connect), so
/// `bytes_acked` counts its SYN.
pub const FLAG_ACTIVE_OPEN: u8 = 1 << 4;
/// `Event::flags`: `total_retrans` was read (transitions out of SYN_SENT or
/// SYN_RECV: the SYN, or SYN-ACK, retransmissions of the handshake).
pub const FLAG_RETRANS: u8 = 1 << 5;
/// `Event::flags`: `handshake_ns` holds the server's handshake time (at
/// SYN_RECV -> ESTABLISHED): from its first SYN-ACK to the final ACK.
pub const FLAG_HANDSHAKE: u8 = 1 << 6;
/// `Event::flags`: not a state change but `accept()` handing the socket to
/// its owner; `duration_ns` is the time it waited in the accept queue (from
/// SYN_RECV -> ESTABLISHED), with `FLAG_DURATION_KNOWN`.
pub const FLAG_ACCEPT: u8 = 1 << 7;

/// Where the kernel program learnt a socket's owner (`Owner::source`).
pub mod owner_source {
    pub const UNKNOWN: u8 = 0;
    /// The owner made a transition of the socket in its own process context.
    pub const TASK: u8 = 1;
    /// The owner accepted the socket.
    pub const ACCEPT: u8 = 2;
    /// Inherited from the listening socket the connection arrived on.
    pub const LISTENER: u8 = 3;
    /// Found by userspace's start-up scan (sock_diag and /proc).
    pub const SCAN: u8 = 4;
}

/// One TCP state transition, as streamed through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` at the transition (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// Time spent in `old_state`; meaningful only with `FLAG_DURATION_KNOWN`.
    pub duration_ns: u64,
    /// `tcp_sock.bytes_acked`: payload bytes sent and acknowledged (`FLAG_SOCK_FIELDS`).
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received` (`FLAG_SOCK_FIELDS`).
    pub bytes_received: u64,
    /// Owner's process id (tgid); meaningful only with `FLAG_OWNER_KNOWN`.
    pub pid: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub old_state: u8,
    pub new_state: u8,
    pub flags: u8,
    /// Low byte of `sock.sk_flags` (`FLAG_SOCK_FIELDS`): bit `SOCK_DONE` is set
    /// once the peer's FIN arrived.
    pub sock_flags: u8,
    /// `sock.sk_err` (an errno, 0 for none) (`FLAG_SOCK_FIELDS`).
    pub sk_err: u16,
    /// `tcp_sock.total_retrans` (`FLAG_RETRANS`).
    pub total_retrans: u32,
    /// Inode number of the socket's network namespace; 0 when unknown.
    pub netns: u32,
    /// Server handshake time (`FLAG_HANDSHAKE`).
    pub handshake_ns: u64,
    /// Owner's command name, NUL padded; meaningful only with `FLAG_OWNER_KNOWN`.
    pub comm: [u8; COMM_LEN],
    /// Source address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Owner's cgroup v2 id (`FLAG_OWNER_KNOWN`); 0 when unknown.
    pub cgroup_id: u64,
    /// Where the owner was learnt: an `owner_source` constant.
    pub owner_source: u8,
    pub _pad: [u8; 7],
}

/// Size of one `Event` record in the ring buffer.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();

/// A timewait socket's entry, move to TIME_WAIT proper, or death, from the
/// kprobes on the kernel's timewait functions (the precise TIME_WAIT path).
/// It shares the ring buffer with `Event`s and is told apart by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimewaitRecord {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Kernel address of the `inet_timewait_sock`: its identity while it lives.
    pub tw: u64,
    /// Inode number of its network namespace.
    pub netns: u32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    /// A `tw_kind` constant.
    pub kind: u8,
    /// `tw_substate`: `state::FIN_WAIT2` until the peer's FIN, then `TIME_WAIT`.
    pub substate: u8,
    pub _pad: [u8; 4],
    /// Local address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Size of one `TimewaitRecord` in the ring buffer.
pub const TIMEWAIT_RECORD_SIZE: usize = core::mem::size_of::<TimewaitRecord>();
const _: () = assert!(TIMEWAIT_RECORD_SIZE != EVENT_SIZE);

/// `TimewaitRecord::kind`.
pub mod tw_kind {
    /// The timewait socket was hashed in place of the closing socket.
    pub const ENTRY: u8 = 1;
    /// Its timer was re-armed: with substate TIME_WAIT, the peer's FIN came.
    pub const REARMED: u8 = 2;
    /// It died: its timer fired, a SYN or connect() reused it, or its
    /// namespace went away.
    pub const EXIT: u8 = 3;
}

/// Offsets of `inet_timewait_sock` fields (its `sock_common` first) from
/// the kernel's BTF, for the timewait kprobes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwOffsets {
    pub family: u32,
    /// `skc_num`: the local port, host order.
    pub num: u32,
    /// `skc_dport`, big-endian.
    pub dport: u32,
    pub rcv_saddr: u32,
    pub daddr: u32,
    pub v6_rcv_saddr: u32,
    pub v6_daddr: u32,
    /// `skc_net` (a `struct net *`), and `net.ns.inum` inside it.
    pub net: u32,
    pub net_inum: u32,
    pub substate: u32,
}

/// Owner of a socket as the kernel program remembers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// cgroup v2 id of the owner (0 when unknown).
    pub cgroup_id: u64,
    pub pid: u32,
    /// Where the owner was learnt (`owner_source`); `UNKNOWN`: no owner.
    pub source: u8,
    /// 1 when the owner runs inside the `--cgroup` filter's subtree.
    pub in_cgroup: u8,
    pub _pad: [u8; 2],
    pub comm: [u8; COMM_LEN],
}

impl Owner {
    #[inline(always)]
    pub fn is_known(&self) -> bool {
        self.source != owner_source::UNKNOWN
    }
}

/// What the kernel program keeps per live socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    /// When the socket entered its current state.
    pub entered_ns: u64,
    /// When the socket became ESTABLISHED (0: not seen), for the accept-queue
    /// wait measured when `accept()` returns it.
    pub established_ns: u64,
    pub owner: Owner,
    /// The state the program saw the socket enter: a later event whose old
    /// state differs followed a transition the program missed. 0: unknown
    /// (an entry made by `accept()` for a socket the program had not seen).
    pub state: u8,
    /// 1 when the program saw the socket connect (CLOSE -> SYN_SENT).
    pub active_open: u8,
    /// Local port, to find the listener an accepted socket came through.
    pub lport: u16,
    /// 1 while a passively opened socket waits for the owner `accept()`
    /// leaves in the `ACCEPTS` map (socket-storage path only).
    pub awaiting_accept: u8,
    pub _pad: [u8; 3],
}

/// A connection by its endpoints: how userspace's start-up scan names the
/// owners of connections that were open before the program was attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
    /// IPv4 in the first 4 bytes.
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}

/// What the kernel program keeps per listening port, to charge accepted
/// sockets (created in softirq) to the listener's owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listener {
    pub skaddr: u64,
    pub owner: Owner,
}

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Events lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// Transitions of sockets the program had no record of (opened before the
    /// agent started, or evicted from the LRU socket map): duration unknown.
    pub const UNTRACKED: u32 = 1;
    /// Failed socket map updates (owner and duration of later transitions lost).
    pub const MAP_UPDATE_FAILED: u32 = 2;
    /// Transitions that passed the filters in aggregating mode (none streamed).
    pub const AGGREGATED: u32 = 3;
    /// Transitions whose old state was not the state the program saw the
    /// socket enter (the transition between was skipped): duration unknown.
    pub const GAPS: u32 = 4;
    /// Runs that ended early because a kernel read failed: transitions lost.
    pub const READ_FAILED: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Linux errno values a connection ends with (`sock.sk_err`), as the kernel
/// program classifies them (the generic ABI's numbers).
pub mod errno {
    pub const EPIPE: u16 = 32;
    pub const ECONNRESET: u16 = 104;
    pub const ETIMEDOUT: u16 = 110;
    pub const ECONNREFUSED: u16 = 111;
}

/// Which end of a handshake: index of the kernel's handshake histograms.
pub mod side {
    pub const CLIENT: u32 = 0;
    pub const SERVER: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// How a handshake ended.
pub mod outcome {
    pub const ESTABLISHED: u32 = 0;
    pub const REFUSED: u32 = 1;
    pub const TIMEOUT: u32 = 2;
    /// Torn down by either end for any other reason.
    pub const ABORTED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// How a connection closed, from its last state and its error alone.
pub mod close_kind {
    /// We sent the first FIN (closed from FIN_WAIT1, FIN_WAIT2 or CLOSING).
    pub const ACTIVE: u32 = 0;
    /// The peer sent the first FIN (closed from LAST_ACK).
    pub const PASSIVE: u32 = 1;
    /// A reset from the peer (ECONNRESET, EPIPE).
    pub const RESET: u32 = 2;
    /// Torn down without a FIN exchange or for another error.
    pub const ABORTED: u32 = 3;
    /// A connect answered by a reset (ECONNREFUSED).
    pub const REFUSED: u32 = 4;
    /// Retransmissions or keep-alive probes gave up (ETIMEDOUT).
    pub const TIMEOUT: u32 = 5;
    pub const COUNT: u32 = 6;
}

/// Slots of the per-CPU `TALLIES` array, summed by the kernel program when it
/// aggregates (`stats`' kernel mode, `serve`).
pub mod tally {
    use super::{close_kind, side};
    /// Transitions by states: `TRANSITIONS + old * 16 + new`.
    pub const TRANSITIONS: u32 = 0;
    /// SYN (client) and SYN-ACK (server) retransmissions: `+ side`.
    pub const HANDSHAKE_RETRANS: u32 = 256;
    /// Closed connections: `+ close_kind`.
    pub const CLOSES: u32 = HANDSHAKE_RETRANS + side::COUNT;
    pub const COUNT: u32 = CLOSES + close_kind::COUNT;
    // The transitions' 16 x 16 slots end where the retransmissions begin.
    const _: () = assert!(TRANSITIONS + 16 * 16 == HANDSHAKE_RETRANS);
}

/// The outcome of a handshake that left SYN_SENT or SYN_RECV for `new_state`,
/// given the socket's error where known.
#[inline(always)]
pub fn handshake_outcome(new_state: u8, error: Option<u16>) -> u32 {
    if new_state == state::ESTABLISHED {
        return outcome::ESTABLISHED;
    }
    match error {
        Some(errno::ECONNREFUSED) => outcome::REFUSED,
        Some(errno::ETIMEDOUT) => outcome::TIMEOUT,
        _ => outcome::ABORTED,
    }
}

/// How a connection that closed from `old_state` ended, given its error
/// where known; `None` for what is not a connection (a listener, or a
/// socket that never connected).
#[inline(always)]
pub fn close_kind(old_state: u8, error: Option<u16>) -> Option<u32> {
    if old_state == state::LISTEN || old_state == state::CLOSE {
        return None;
    }
    Some(match error {
        Some(errno::ECONNREFUSED) => close_kind::REFUSED,
        Some(errno::ETIMEDOUT) => close_kind::TIMEOUT,
        Some(errno::ECONNRESET | errno::EPIPE) => close_kind::RESET,
        Some(e) if e != 0 => close_kind::ABORTED,
        _ => match old_state {
            state::FIN_WAIT1 | state::FIN_WAIT2 | state::CLOSING | state::TIME_WAIT => {
                close_kind::ACTIVE
            }
            state::LAST_ACK => close_kind::PASSIVE,
            _ => close_kind::ABORTED,
        },
    })
}

/// Offsets of the tracepoint's fields, read from its tracefs format file at load
/// time and handed to the program as read-only globals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

/// Offsets of `struct sock`/`tcp_sock` fields in the running kernel, resolved
/// from its BTF by userspace; zero when unknown (no BTF, or no such field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub sk_err: u32,
    pub sk_flags: u32,
    /// `tcp_sock.total_retrans`.
    pub total_retrans: u32,
    /// `tcp_sock.srtt_us`: after a handshake without retransmissions, 8 times
    /// the time from the SYN-ACK to the final ACK.
    pub srtt_us: u32,
    /// `tcp_request_sock.snt_synack`: when the first SYN-ACK left (us).
    pub snt_synack: u32,
    /// `sock.__sk_common.skc_net.net`: the socket's network namespace.
    pub skc_net: u32,
    /// `net.ns.inum`: the namespace's inode number.
    pub net_inum: u32,
}

/// Offsets the listener-owner exit handler follows to the exiting process's
/// first child (`task_struct.children` / `.sibling`), its tgid and comm, and
/// its cgroup id (`task->cgroups->dfl_cgrp->kn->id`); from the kernel's BTF.
/// `children` 0: unknown (heirs are then found by userspace alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    pub children: u32,
    pub sibling: u32,
    pub tgid: u32,
    pub comm: u32,
    pub cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
}

/// Offsets the `accept()` exit handler follows, from the new file descriptor
/// to its socket (`task_struct.files->fdt->fd[fd]->private_data->sk`), then
/// the socket's endpoints; all from the kernel's BTF. `task_files` 0: not
/// attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptOffsets {
    /// Offset of `ret` in the `syscalls:sys_exit_accept*` record.
    pub ret: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_max_fds: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_file: u32,
    pub socket_sk: u32,
    /// `sock.__sk_common` fields.
    pub skc_family: u32,
    pub skc_num: u32,
    pub skc_dport: u32,
    pub skc_rcv_saddr: u32,
    pub skc_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_v6_daddr: u32,
}

/// Where the BTF-typed program finds what the classic tracepoint's record
/// carries: offsets of fields of the TCP socket it is handed (`struct
/// tcp_sock`, which starts with `inet_sock`, `sock` and `sock_common`), from
/// the kernel's BTF; the verifier checks its direct loads against that type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkFields {
    /// `sock_common.skc_family` (u16).
    pub family: u32,
    /// `inet_sock.inet_sport` (big-endian u16), as the tracepoint reads it
    /// (`skc_num` is zeroed before a closing socket's last transition).
    pub sport: u32,
    /// `sock_common.skc_dport` (big-endian u16).
    pub dport: u32,
    /// `inet_sock.inet_saddr`.
    pub saddr: u32,
    /// `sock_common.skc_daddr`.
    pub daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr`.
    pub saddr_v6: u32,
    /// `sock_common.skc_v6_daddr`.
    pub daddr_v6: u32,
    /// `sock_common.skc_state` (u8), for the state at `accept()`.
    pub state: u32,
}

/// Offsets in the `tcp:tcp_retransmit_synack` record (from its format file).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynackLayout {
    pub req: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub daddr: u32,
    pub daddr_v6: u32,
}

/// A half-open connection on the server, by its endpoints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HalfOpenKey {
    pub lport: u16,
    pub rport: u16,
    pub family: u16,
    pub _pad: u16,
    /// Remote address: IPv4 in the first 4 bytes.
    pub raddr: [u8; 16],
}

/// The record layout of `sock:inet_sock_set_state` since it gained `protocol`
/// (Linux 4.16 through at least 6.18). When tracefs reports exactly this, the
/// program reads the record directly instead of through helper calls.
pub const KNOWN_LAYOUT: TracepointLayout = TracepointLayout {
    skaddr: 8,
    oldstate: 16,
    newstate: 20,
    sport: 24,
    dport: 26,
    family: 28,
    protocol: 30,
    saddr: 32,
    daddr: 36,
    saddr_v6: 40,
    daddr_v6: 56,
};

/// Filters applied in the kernel; zero means "no filter".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Nonzero: only sockets whose owner runs in this cgroup v2 or below it,
    /// which sits `cgroup_level` levels below the root.
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    pub pid: u32,
    /// Matches either end.
    pub port: u16,
    pub lport: u16,
    pub rport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Nonzero: stream only transitions to CLOSE whose old state's bit
    /// (`1 << state`) is set here (`timewait` needs no others).
    pub close_from: u16,
    pub _pad: [u16; 3],
}

impl Filter {
    /// The address-family filter alone (the kernel applies it before tracking a socket).
    #[inline(always)]
    pub fn matches_family(&self, family: u16) -> bool {
        self.family == 0 || self.family == family
    }

    /// Family and ports: `port` matches either end, `lport` the local, `rport` the remote.
    #[inline(always)]
    pub fn matches_endpoints(&self, family: u16, lport: u16, rport: u16) -> bool {
        self.matches_family(family)
            && (self.port == 0 || lport == self.port || rport == self.port)
            && (self.lport == 0 || lport == self.lport)
            && (self.rport == 0 || rport == self.rport)
    }

    /// Family, ports and owner; `pid` is `None` when the socket's owner is
    /// unknown (then a pid filter rejects it).
    #[inline(always)]
    pub fn matches(&self, family: u16, lport: u16, rport: u16, pid: Option<u32>) -> bool {
        self.matches_endpoints(family, lport, rport) && (self.pid == 0 || pid == Some(self.pid))
    }

    /// `matches` for a transition whose remote end is not known yet (see
    /// `peer_not_set`): only the local clauses can reject it; userspace
    /// applies the others once the peer is known.
    #[inline(always)]
    pub fn matches_local(&self, family: u16, lport: u16, pid: Option<u32>) -> bool {
        self.matches_family(family)
            && (self.lport == 0 || lport == self.lport)
            && (self.pid == 0 || pid == Some(self.pid))
    }

    /// The cgroup filter, given whether the owner runs inside its subtree.
    #[inline(always)]
    pub fn matches_cgroup(&self, in_cgroup: bool) -> bool {
        self.cgroup_id == 0 || in_cgroup
    }
}

/// Whether a transition is a passively opened socket's first,
/// `LISTEN -> SYN_RECV`, fired before the kernel copied the peer's address
/// and port into the new socket: its remote port reads 0. Kernels up to at
/// least 6.12 fire it that early (`inet_csk_clone_lock` sets the state
/// first); 6.18 sets the addresses first. The socket's next transition
/// carries them.
#[inline(always)]
pub fn peer_not_set(old_state: u8, new_state: u8, rport: u16) -> bool {
    old_state == state::LISTEN && new_state == state::SYN_RECV && rport == 0
}

/// Log-linear histogram of durations in ns, shared by the kernel's in-place
/// aggregation and userspace so that both report identical figures.
///
/// Values below 32 ns have a bucket each; above, every power of two is split
/// into 32 buckets, so a bucket's midpoint is within 1.6 % of any value in it.
pub mod hist {
    pub const SUB_BITS: u32 = 5;
    pub const SUB: u64 = 1 << SUB_BITS;
    /// Number of buckets covering all of u64.
    pub const BUCKETS: u32 = (SUB + (64 - SUB_BITS as u64) * SUB) as u32;
    /// States are numbered 1..=12; index 0 is unused.
    pub const STATES: u32 = 13;

    /// floor(log2(v)) for v > 0, without loops or ctlz (BPF has neither).
    #[inline(always)]
    pub const fn log2(mut v: u64) -> u32 {
        let mut r = 0;
        if v >= 1 << 32 {
            v >>= 32;
            r += 32;
        }
        if v >= 1 << 16 {
            v >>= 16;
            r += 16;
        }
        if v >= 1 << 8 {
            v >>= 8;
            r += 8;
        }
        if v >= 1 << 4 {
            v >>= 4;
            r += 4;
        }
        if v >= 1 << 2 {
            v >>= 2;
            r += 2;
        }
        if v >= 1 << 1 {
            r += 1;
        }
        r
    }

    /// The bucket holding `ns`.
    #[inline(always)]
    pub const fn bucket(ns: u64) -> u32 {
        if ns < SUB {
            return ns as u32;
        }
        let exp = log2(ns);
        let sub = (ns >> (exp - SUB_BITS)) & (SUB - 1);
        (SUB + (exp - SUB_BITS) as u64 * SUB + sub) as u32
    }

    /// The smallest value in bucket `b`, and the bucket's width.
    pub const fn bounds(b: u32) -> (u64, u64) {
        let b = b as u64;
        if b < SUB {
            return (b, 1);
        }
        let exp = (b - SUB) / SUB + SUB_BITS as u64;
        let sub = (b - SUB) % SUB;
        let width = 1u64 << (exp - SUB_BITS as u64);
        ((SUB + sub) * width, width)
    }

    /// The value reported for bucket `b`: its midpoint.
    pub const fn midpoint(b: u32) -> u64 {
        let (low, width) = bounds(b);
        low + (width - 1) / 2
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn every_value_is_within_the_bound_of_its_bucket_midpoint() {
            let mut v = 1u64;
            while v < u64::MAX / 3 {
                for probe in [v, v + v / 3, v * 2 - 1] {
                    let mid = super::midpoint(super::bucket(probe));
                    let err = (mid as f64 - probe as f64).abs() / probe as f64;
                    assert!(err < 0.0157, "{probe}: midpoint {mid}");
                    let (low, width) = super::bounds(super::bucket(probe));
                    assert!(
                        low <= probe && probe - low < width,
                        "{probe} not in [{low}, +{width})"
                    );
                }
                v = v * 3 / 2 + 1;
            }
            assert_eq!(super::bucket(u64::MAX), super::BUCKETS - 1);
            assert_eq!(super::bucket(0), 0);
            assert_eq!(super::bucket(31), 31);
            assert_eq!(super::bucket(32), 32);
        }

        #[test]
        fn log2_matches_leading_zeros() {
            for shift in 0..64 {
                for v in [1u64 << shift, (1u64 << shift) | 1, u64::MAX >> (63 - shift)] {
                    assert_eq!(super::log2(v), 63 - v.leading_zeros(), "{v}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        close_kind, errno, handshake_outcome, outcome, peer_not_set, state, Filter, AF_INET,
        AF_INET6,
    };

    #[test]
    fn handshakes_end_by_state_then_error() {
        assert_eq!(
            handshake_outcome(state::ESTABLISHED, None),
            outcome::ESTABLISHED
        );
        let closed = |e| handshake_outcome(state::CLOSE, e);
        assert_eq!(closed(Some(errno::ECONNREFUSED)), outcome::REFUSED);
        assert_eq!(closed(Some(errno::ETIMEDOUT)), outcome::TIMEOUT);
        assert_eq!(closed(Some(0)), outcome::ABORTED);
        assert_eq!(closed(None), outcome::ABORTED);
    }

    #[test]
    fn closes_are_classified_by_error_then_by_who_sent_the_first_fin() {
        let kind = |old, e| close_kind(old, e);
        assert_eq!(kind(state::FIN_WAIT2, Some(0)), Some(close_kind::ACTIVE));
        assert_eq!(kind(state::CLOSING, None), Some(close_kind::ACTIVE));
        assert_eq!(kind(state::LAST_ACK, Some(0)), Some(close_kind::PASSIVE));
        let reset = Some(errno::ECONNRESET);
        assert_eq!(kind(state::ESTABLISHED, reset), Some(close_kind::RESET));
        assert_eq!(
            kind(state::FIN_WAIT1, Some(errno::EPIPE)),
            Some(close_kind::RESET)
        );
        let refused = Some(errno::ECONNREFUSED);
        assert_eq!(kind(state::SYN_SENT, refused), Some(close_kind::REFUSED));
        let timeout = Some(errno::ETIMEDOUT);
        assert_eq!(kind(state::ESTABLISHED, timeout), Some(close_kind::TIMEOUT));
        assert_eq!(kind(state::ESTABLISHED, Some(0)), Some(close_kind::ABORTED));
        assert_eq!(kind(state::SYN_SENT, Some(113)), Some(close_kind::ABORTED));
        assert_eq!(kind(state::LISTEN, Some(0)), None);
        assert_eq!(kind(state::CLOSE, None), None);
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        let f = Filter::default();
        assert!(f.matches_family(AF_INET) && f.matches_family(AF_INET6));
        assert!(f.matches_endpoints(AF_INET6, 0, 0));
        assert!(f.matches(AF_INET, 80, 40000, None));
        assert!(f.matches(AF_INET, 80, 40000, Some(1)));
    }

    #[test]
    fn family_must_be_equal() {
        let f = Filter {
            family: AF_INET6,
            ..Filter::default()
        };
        assert!(f.matches_family(AF_INET6));
        assert!(!f.matches_family(AF_INET));
        assert!(!f.matches_endpoints(AF_INET, 1, 2));
        assert!(!f.matches(AF_INET, 1, 2, Some(3)));
        assert!(f.matches(AF_INET6, 1, 2, Some(3)));
    }

    #[test]
    fn a_transition_without_its_peer_is_filtered_on_its_local_end_only() {
        assert!(peer_not_set(state::LISTEN, state::SYN_RECV, 0));
        assert!(!peer_not_set(state::LISTEN, state::SYN_RECV, 5000));
        assert!(!peer_not_set(state::SYN_SENT, state::ESTABLISHED, 0));
        let remote = Filter {
            rport: 5000,
            port: 5000,
            ..Filter::default()
        };
        assert!(remote.matches_local(AF_INET, 80, None));
        let local = Filter {
            lport: 80,
            pid: 7,
            ..Filter::default()
        };
        assert!(local.matches_local(AF_INET, 80, Some(7)));
        assert!(!local.matches_local(AF_INET, 81, Some(7)));
        assert!(!local.matches_local(AF_INET, 80, Some(8)));
        assert!(!Filter {
            family: AF_INET6,
            ..Filter::default()
        }
        .matches_local(AF_INET, 80, None));
    }

    #[test]
    fn port_matches_either_end_lport_and_rport_one_each() {
        let port = Filter {
            port: 80,
            ..Filter::default()
        };
        assert!(port.matches_endpoints(AF_INET, 80, 5000));
        assert!(port.matches_endpoints(AF_INET, 5000, 80));
        assert!(!port.matches_endpoints(AF_INET, 5000, 5001));

        let lport = Filter {
            lport: 80,
            ..Filter::default()
        };
        assert!(lport.matches_endpoints(AF_INET, 80, 5000));
        assert!(!lport.matches_endpoints(AF_INET, 5000, 80));

        let rport = Filter {
            rport: 80,
            ..Filter::default()
        };
        assert!(rport.matches_endpoints(AF_INET, 5000, 80));
        assert!(!rport.matches_endpoints(AF_INET, 80, 5000));

        let both = Filter {
            lport: 80,
            rport: 5000,
            family: AF_INET,
            ..Filter::default()
        };
        assert!(both.matches_endpoints(AF_INET, 80, 5000));
        assert!(!both.matches_endpoints(AF_INET, 80, 5001));
        assert!(!both.matches_endpoints(AF_INET6, 80, 5000));
    }

    #[test]
    fn a_pid_filter_rejects_other_and_unknown_owners() {
        let f = Filter {
            pid: 42,
            ..Filter::default()
        };
        assert!(f.matches(AF_INET, 1, 2, Some(42)));
        assert!(!f.matches(AF_INET, 1, 2, Some(43)));
        assert!(!f.matches(AF_INET, 1, 2, None));
        // The pid filter is not part of the endpoint check.
        assert!(f.matches_endpoints(AF_INET, 1, 2));
        let f = Filter { port: 9, ..f };
        assert!(!f.matches(AF_INET, 1, 2, Some(42)));
        assert!(f.matches(AF_INET, 9, 2, Some(42)));
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain `#[repr(C)]` data with explicit padding.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::SynackLayout {}
    unsafe impl aya::Pod for super::AcceptOffsets {}
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::SkFields {}
    unsafe impl aya::Pod for super::TwOffsets {}
    unsafe impl aya::Pod for super::Owner {}
    unsafe impl aya::Pod for super::Listener {}
    unsafe impl aya::Pod for super::ConnKey {}
}
