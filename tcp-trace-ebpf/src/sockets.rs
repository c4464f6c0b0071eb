//! Per-socket and per-listener state: how long a socket stayed in a state,
//! and who owns it.

use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
    bpf_get_current_pid_tgid,
};
use tcp_trace_common::{counter, owner_source, state, Listener, Owner, SockState};

use crate::{count, global, record::Record, FILTER, LISTENERS, LISTENER_OWNERS, SOCKETS};

/// What the socket map says about the socket at this transition.
pub(crate) struct Tracked {
    pub(crate) owner: Owner,
    /// Time spent in the old state; 0 unless `duration_known`.
    pub(crate) duration_ns: u64,
    pub(crate) duration_known: bool,
    /// The program saw the socket connect (CLOSE -> SYN_SENT).
    pub(crate) active_open: bool,
}

/// Where a socket's state lives: the LRU map keyed by the socket's address
/// (classic tracepoint), or socket-local storage (BTF-typed program).
pub(crate) trait Store {
    /// The socket's state, if it is tracked.
    fn find(&self) -> Option<*mut SockState>;
    /// Tracks the socket from now with `sock`; false when there is no room.
    fn insert(&self, sock: &SockState) -> bool;
    /// The socket closed.
    fn closed(&self);
    /// A passively opened socket became ESTABLISHED: the owner `accept()`
    /// will name may have to be fetched later (socket storage only).
    #[inline(always)]
    fn await_accept(&self, _sock: &mut SockState, _now: u64) {}
    /// A socket awaiting `accept()`'s owner moves: take that owner if it
    /// is there (socket storage only).
    #[inline(always)]
    fn take_accepted(&self, _sock: &mut SockState, _in_irq: bool, _closing: bool) {}
}

/// The classic path's store: `SOCKETS`, by the socket's address.
pub(crate) struct SocketMap(pub(crate) u64);

impl Store for SocketMap {
    #[inline(always)]
    fn find(&self) -> Option<*mut SockState> {
        SOCKETS.get_ptr_mut(self.0)
    }

    #[inline(always)]
    fn insert(&self, sock: &SockState) -> bool {
        SOCKETS.insert(self.0, sock, 0).is_ok()
    }

    #[inline(always)]
    fn closed(&self) {
        let _ = SOCKETS.remove(self.0);
    }
}

/// Times the socket's stay in its old state and keeps its owner: updates the
/// socket's stored state, or starts tracking the socket, and forgets it at
/// CLOSE. `seeded` names the owner of a socket first seen mid-life, if
/// userspace's start-up scan (or `accept()`) found it.
#[inline(always)]
pub(crate) fn track_socket(
    store: &impl Store,
    rec: &Record,
    now: u64,
    in_irq: bool,
    seeded: impl FnOnce() -> Option<Owner>,
) -> Tracked {
    let tracked = match store.find() {
        // SAFETY: the value's memory stays valid for this run (the LRU map
        // is preallocated; socket storage lives as long as the socket,
        // which the kernel holds across the tracepoint) and holds plain
        // data, valid for any bytes. Transitions of one socket are
        // serialized by the kernel (socket lock). An LRU map may recycle an
        // evicted element at once, though: under eviction pressure another
        // CPU can reuse this entry for another socket meanwhile, which can
        // mistime this transition (the state check narrows it); it cannot
        // make the access unsound.
        Some(sock) => follow_socket(store, unsafe { &mut *sock }, rec, now, in_irq),
        None => start_tracking(store, rec, now, in_irq, seeded),
    };
    if rec.new_state == state::CLOSE {
        store.closed();
    }
    tracked
}

/// A socket the store knows: its time in the old state; it enters the new one now.
#[inline(always)]
fn follow_socket(
    store: &impl Store,
    sock: &mut SockState,
    rec: &Record,
    now: u64,
    in_irq: bool,
) -> Tracked {
    let begins = rec.old_state == state::CLOSE
        || (rec.old_state == state::LISTEN && rec.new_state == state::SYN_RECV);
    if begins {
        // The map forgets sockets at CLOSE: an entry for a socket only now
        // coming to life belonged to a socket freed at this address whose
        // CLOSE was skipped. Socket storage keeps a closed socket's state
        // until the socket is freed: that one is no gap.
        if sock.state != state::CLOSE {
            count(counter::GAPS);
        }
        return start_tracking(store, rec, now, in_irq, || None);
    }
    // Otherwise a state it did not enter means a transition was skipped
    // (the kernel does not run the program nested): the time is unknown.
    // State 0: `accept()` made the entry, the state was never seen.
    let duration_known = sock.state == rec.old_state;
    if !duration_known && sock.state != 0 {
        count(counter::GAPS);
    }
    let duration_ns = if duration_known {
        now.wrapping_sub(sock.entered_ns)
    } else {
        0
    };
    sock.entered_ns = now;
    sock.state = rec.new_state;
    sock.lport = rec.sport;
    if rec.new_state == state::ESTABLISHED {
        sock.established_ns = now;
        if rec.old_state == state::SYN_RECV && sock.active_open == 0 {
            store.await_accept(sock, now);
        }
    } else if sock.awaiting_accept != 0 {
        store.take_accepted(sock, in_irq, rec.new_state == state::CLOSE);
    }
    // A transition in process context names the socket's real owner.
    if !in_irq {
        sock.owner = current_owner();
    }
    Tracked {
        owner: sock.owner,
        duration_ns,
        duration_known,
        active_open: sock.active_open != 0,
    }
}

#[inline(always)]
fn start_tracking(
    store: &impl Store,
    rec: &Record,
    now: u64,
    in_irq: bool,
    seeded: impl FnOnce() -> Option<Owner>,
) -> Tracked {
    let born = rec.old_state == state::CLOSE || rec.old_state == state::LISTEN;
    let owner = if !in_irq {
        current_owner()
    } else if rec.old_state == state::LISTEN && rec.new_state == state::SYN_RECV {
        listener_owner(rec.sport)
    } else if !born {
        seeded().unwrap_or_default()
    } else {
        Owner::default()
    };
    // First sight of a socket that did not just come to life: it was
    // open before we started, or fell out of the LRU map.
    if !born {
        count(counter::UNTRACKED);
    }
    let active_open = rec.old_state == state::CLOSE && rec.new_state == state::SYN_SENT;
    if rec.new_state != state::CLOSE {
        let sock = SockState {
            entered_ns: now,
            established_ns: if rec.new_state == state::ESTABLISHED {
                now
            } else {
                0
            },
            owner,
            state: rec.new_state,
            active_open: u8::from(active_open),
            lport: rec.sport,
            awaiting_accept: 0,
            _pad: [0; 3],
        };
        if !store.insert(&sock) {
            count(counter::MAP_UPDATE_FAILED);
        }
    }
    Tracked {
        owner,
        duration_ns: 0,
        duration_known: false,
        active_open,
    }
}

/// The owner a connection arriving on listening port `port` inherits.
#[inline(always)]
fn listener_owner(port: u16) -> Owner {
    // SAFETY: the owner is copied out at once. The map is preallocated, so
    // the value's memory stays valid for this run; a concurrent update can
    // at worst make the copy stale (plain data: any bytes are valid).
    match unsafe { LISTENERS.get(port) } {
        Some(listener) if listener.owner.is_known() => Owner {
            source: owner_source::LISTENER,
            ..listener.owner
        },
        _ => Owner::default(),
    }
}

/// Listening sockets by port, so that sockets accepted in softirq can be
/// charged to the listener's owner.
#[inline(always)]
pub(crate) fn track_listener(rec: &Record, owner: Owner) {
    if rec.new_state == state::LISTEN {
        let _ = LISTENERS.insert(
            rec.sport,
            Listener {
                skaddr: rec.skaddr,
                owner,
            },
            0,
        );
        remember_listener_owner(owner.pid, rec.sport);
    } else if rec.old_state == state::LISTEN && rec.new_state == state::CLOSE {
        // SAFETY: only `skaddr` is read, at once; as in `start_tracking`, the
        // memory stays valid and a concurrent update makes it stale at worst.
        if let Some(l) = unsafe { LISTENERS.get(rec.sport) } {
            // Address 0: a listener the start-up scan found (sock_diag gives no address).
            if l.skaddr == rec.skaddr || l.skaddr == 0 {
                let _ = LISTENERS.remove(rec.sport);
            }
        }
    }
}

/// Marks `pid` as owning the listener on `port`, so that its exit hands the
/// listener on (see `owner_exit`).
#[inline(always)]
pub(crate) fn remember_listener_owner(pid: u32, port: u16) {
    let _ = LISTENER_OWNERS.insert(pid, port, 0);
}

/// The task running now, as a socket's owner learnt from `source`.
#[inline(always)]
pub(crate) fn current_owner_from(source: u8) -> Owner {
    // Two fields, not the whole filter: the stack is tight.
    let (cgroup_id, cgroup_level) = (global(&FILTER.cgroup_id), global(&FILTER.cgroup_level));
    // SAFETY: helpers without pointer arguments that only read the current
    // task's cgroup.
    let in_cgroup = cgroup_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(cgroup_level as i32) } == cgroup_id;
    Owner {
        // SAFETY: as above.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        source,
        in_cgroup: u8::from(in_cgroup),
        _pad: [0; 2],
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

#[inline(always)]
fn current_owner() -> Owner {
    current_owner_from(owner_source::TASK)
}
