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

/// Times the socket's stay in its old state and keeps its owner: updates the
/// socket map, or starts tracking the socket, and forgets it at CLOSE.
/// `seeded` names the owner of a socket first seen mid-life, if userspace's
/// start-up scan found it.
#[inline(always)]
pub(crate) fn track_socket(
    rec: &Record,
    now: u64,
    in_irq: bool,
    seeded: impl FnOnce() -> Option<Owner>,
) -> Tracked {
    let tracked = match SOCKETS.get_ptr_mut(rec.skaddr) {
        // SAFETY: the value's memory stays valid for this run (the map is
        // preallocated) and holds plain data, valid for any bytes.
        // Transitions of one socket are serialized by the kernel (socket
        // lock). An LRU map may recycle an evicted element at once, though:
        // under eviction pressure another CPU can reuse this entry for
        // another socket meanwhile, which can mistime this transition (the
        // state check narrows it); it cannot make the access unsound.
        Some(sock) => follow_socket(unsafe { &mut *sock }, rec, now, in_irq),
        None => start_tracking(rec, now, in_irq, seeded),
    };
    if rec.new_state == state::CLOSE {
        let _ = SOCKETS.remove(rec.skaddr);
    }
    tracked
}

/// A socket the map knows: its time in the old state; it enters the new one now.
#[inline(always)]
fn follow_socket(sock: &mut SockState, rec: &Record, now: u64, in_irq: bool) -> Tracked {
    let begins = rec.old_state == state::CLOSE
        || (rec.old_state == state::LISTEN && rec.new_state == state::SYN_RECV);
    if begins {
        // Entries go at CLOSE: one for a socket only now coming to life
        // belonged to a socket freed at this address whose CLOSE was skipped.
        count(counter::GAPS);
        return start_tracking(rec, now, in_irq, || None);
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
            _pad: 0,
        };
        if SOCKETS.insert(rec.skaddr, sock, 0).is_err() {
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
