//! Types shared by the kernel program and the userspace agent.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes it into the
//! ring buffer and maps, userspace reads the same bytes back.
#![no_std]

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
    /// Owner's process id (tgid); meaningful only with `FLAG_OWNER_KNOWN`.
    pub pid: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub old_state: u8,
    pub new_state: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
    /// Owner's command name, NUL padded; meaningful only with `FLAG_OWNER_KNOWN`.
    pub comm: [u8; COMM_LEN],
    /// Source address: IPv4 in the first 4 bytes, or IPv6.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Size of one `Event` record in the ring buffer.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();

/// Owner of a socket as the kernel program remembers it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Owner {
    pub pid: u32,
    /// 1 when `pid`/`comm` are known.
    pub known: u32,
    pub comm: [u8; COMM_LEN],
}

/// What the kernel program keeps per live socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    /// When the socket entered its current state.
    pub entered_ns: u64,
    pub owner: Owner,
}

/// What the kernel program keeps per listening port, to charge accepted
/// sockets (created in softirq) to the listener's owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
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
    pub const COUNT: u32 = 3;
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

/// Filters applied in the kernel; zero means "no filter".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub pid: u32,
    /// Matches either end.
    pub port: u16,
    pub lport: u16,
    pub rport: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are plain `#[repr(C)]` data with explicit padding.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::Filter {}
}
