//! Owners learnt outside state transitions: `accept()` handing a connection
//! to the process that serves it, listener owners exiting, and the owners
//! userspace's start-up scan found.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel_buf,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tcp_trace_common::{
    counter, owner_source, state, AcceptOffsets, Event, Owner, SockState, AF_INET, FLAG_ACCEPT,
    FLAG_DURATION_KNOWN, FLAG_OWNER_KNOWN,
};

use crate::{
    btf, count,
    emit::{netns, read_at, submit},
    field, global,
    record::{Addresses, Record},
    sockets::{current_owner_from, remember_listener_owner},
    ACCEPT_OFFSETS, AGGREGATE, EXITED_OWNERS, FILTER, LISTENERS, LISTENER_OWNERS, SEEDS, SEED_KEY,
    SOCKETS, SOCKET_STORAGE, TASK_OFFSETS,
};

/// The owner userspace's start-up scan found for a connection the program
/// meets mid-life; the seed is used once. The key is built in per-CPU map
/// memory: the main program's stack has no room for it.
#[inline(always)]
pub(crate) fn seeded_owner(addresses: &impl Addresses, rec: &Record) -> Option<Owner> {
    let key = SEED_KEY.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array value, valid for this run and only this CPU's
    // (the kernel does not nest a program run on one CPU); plain data.
    let key = unsafe { &mut *key };
    key.family = rec.family;
    key.lport = rec.sport;
    key.rport = rec.dport;
    key.laddr = [0; 16];
    key.raddr = [0; 16];
    let ipv4 = rec.family == AF_INET;
    addresses
        .addresses_into(ipv4, &mut key.laddr, &mut key.raddr)
        .ok()?;
    // By reference: a copy of the key would take the stack it was moved off.
    #[allow(clippy::needless_borrows_for_generic_args)]
    // SAFETY: the owner is copied out at once; an element of a hash map is
    // freed only after an RCU grace period, so it stays valid for this run,
    // and it is plain data, valid for any bytes.
    let owner = unsafe { SEEDS.get(&*key) }.copied()?;
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = SEEDS.remove(&*key);
    Some(owner)
}

/// `accept()` or `accept4()` returned: the calling process now owns the
/// connection, and the connection's wait in the accept queue ends.
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn accept_exit(ctx: TracePointContext) -> u32 {
    if try_accept(&ctx).is_err() {
        count(counter::READ_FAILED);
    }
    0
}

/// A listener owner exited. Its first child (a daemon's forked self, which
/// inherited the listener) takes over the listener at once; the exit and the
/// heir are noted for userspace, which re-resolves any other listeners the
/// process owned.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn owner_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let (tgid, pid) = ((id >> 32) as u32, id as u32);
    // Only the thread-group leader's exit: other threads leave the process.
    if tgid != pid {
        return 0;
    }
    // SAFETY: the port is copied out at once; as in `listener_owner`.
    let Some(port) = (unsafe { LISTENER_OWNERS.get(tgid) }).copied() else {
        return 0;
    };
    let _ = LISTENER_OWNERS.remove(tgid);
    let heir = first_child().unwrap_or_default();
    if heir.is_known() {
        if let Some(listener) = LISTENERS.get_ptr_mut(port) {
            // SAFETY: preallocated map memory holding plain data, valid for
            // this run; as in `adopt_listener`.
            let listener = unsafe { &mut *listener };
            if listener.owner.pid == tgid {
                listener.owner = Owner {
                    in_cgroup: listener.owner.in_cgroup,
                    ..heir
                };
                remember_listener_owner(heir.pid, port);
            }
        }
    }
    let _ = EXITED_OWNERS.insert(tgid, heir, 0);
    0
}

/// The exiting task's first child, as an owner; `None` without children or
/// where the kernel's BTF gave no offsets.
#[inline(always)]
fn first_child() -> Option<Owner> {
    let off = global(&TASK_OFFSETS);
    if off.children == 0 {
        return None;
    }
    // SAFETY: checked reads at BTF offsets along the current task's
    // `children` list (its first entry is a child's `sibling` member) and
    // that child's fields; the comm read writes only within its buffer.
    unsafe {
        let task = bpf_get_current_task();
        let head = task + u64::from(off.children);
        let first: u64 = read_at(head, 0).ok()?;
        if first == head || first == 0 {
            return None;
        }
        let child = first - u64::from(off.sibling);
        let mut owner = Owner {
            pid: read_at(child, off.tgid as usize).ok()?,
            source: owner_source::TASK,
            ..Owner::default()
        };
        let comm = (child as *const u8).wrapping_add(off.comm as usize);
        bpf_probe_read_kernel_buf(comm, &mut owner.comm).ok()?;
        let css_set: u64 = read_at(child, off.cgroups as usize).ok()?;
        let cgroup: u64 = read_at(css_set, off.css_set_dfl_cgrp as usize).ok()?;
        let kn: u64 = read_at(cgroup, off.cgroup_kn as usize).ok()?;
        owner.cgroup_id = read_at(kn, off.kernfs_node_id as usize).ok()?;
        Some(owner)
    }
}

fn try_accept(ctx: &TracePointContext) -> Result<(), i32> {
    let offsets = global(&ACCEPT_OFFSETS);
    if offsets.task_files == 0 {
        return Ok(());
    }
    let fd: i64 = field(ctx, offsets.ret)?;
    if fd < 0 {
        return Ok(());
    }
    let sk = socket_of(fd as u64, &offsets)?;
    if sk == 0 {
        return Ok(());
    }
    // SAFETY: a helper without arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let owner = current_owner_from(owner_source::ACCEPT);
    let (wait_ns, sock_state) = if global(&SOCKET_STORAGE) != 0 {
        btf::accept(sk, owner, now)?
    } else {
        accept_in_map(sk, owner, now)
    };
    let filter = global(&FILTER);
    let streams = global(&AGGREGATE) == 0 && filter.close_from == 0;
    if !streams {
        // Nothing to stream: of the endpoints only the listener's port.
        // SAFETY: a checked read of a plain integer at a BTF offset.
        adopt_listener(unsafe { read_at(sk, offsets.skc_num as usize)? }, owner);
        return Ok(());
    }
    let ends = endpoints(sk, &offsets)?;
    adopt_listener(ends.lport, owner);
    if !filter.matches(ends.family, ends.lport, ends.rport, Some(owner.pid))
        || !filter.matches_cgroup(owner.in_cgroup != 0)
    {
        return Ok(());
    }
    let state = if sock_state == 0 {
        state::ESTABLISHED
    } else {
        sock_state
    };
    let duration_flag = if wait_ns.is_some() {
        FLAG_DURATION_KNOWN
    } else {
        0
    };
    submit(|ev: &mut Event| {
        ev.ts_ns = now;
        ev.skaddr = sk;
        ev.duration_ns = wait_ns.unwrap_or(0);
        ev.pid = owner.pid;
        ev.sport = ends.lport;
        ev.dport = ends.rport;
        ev.family = ends.family;
        ev.old_state = state;
        ev.new_state = state;
        ev.flags = FLAG_ACCEPT | FLAG_OWNER_KNOWN | duration_flag;
        ev.netns = netns(sk)?;
        ev.comm = owner.comm;
        ev.saddr = ends.saddr;
        ev.daddr = ends.daddr;
        ev.cgroup_id = owner.cgroup_id;
        ev.owner_source = owner.source;
        Ok(())
    })
}

/// `accept()` returned socket `sk` to `owner` (classic path, state in
/// `SOCKETS`): how long it waited in the accept queue, if known, and its
/// state (0: unknown).
#[inline(always)]
fn accept_in_map(sk: u64, owner: Owner, now: u64) -> (Option<u64>, u8) {
    match SOCKETS.get_ptr_mut(sk) {
        Some(sock) => {
            // SAFETY: as in `track_socket`: preallocated map memory holding
            // plain data, valid for this run.
            let sock = unsafe { &mut *sock };
            sock.owner = owner;
            let wait = (sock.established_ns != 0).then(|| now.saturating_sub(sock.established_ns));
            (wait, sock.state)
        }
        None => {
            // Accepted, but its handshake was not seen (before attach, or
            // evicted): keep its owner; state 0 says the state is unknown.
            let sock = SockState {
                owner,
                ..SockState::default()
            };
            if SOCKETS.insert(sk, sock, 0).is_err() {
                count(counter::MAP_UPDATE_FAILED);
            }
            (None, 0)
        }
    }
}

/// The process that accepts on a listener holds it: later connections
/// arriving on it are charged to that process until another one accepts.
#[inline(always)]
fn adopt_listener(lport: u16, owner: Owner) {
    if let Some(listener) = LISTENERS.get_ptr_mut(lport) {
        // SAFETY: preallocated map memory holding plain data, valid for this
        // run; a concurrent update can at worst interleave two owners' bytes
        // of the same kind, which the next accept corrects.
        unsafe { (*listener).owner = owner };
        remember_listener_owner(owner.pid, lport);
    }
}

/// The `struct sock` behind file descriptor `fd` of the current task, or 0
/// when `fd` is not a socket (closed and reused by another thread already).
#[inline(always)]
fn socket_of(fd: u64, offsets: &AcceptOffsets) -> Result<u64, i32> {
    // SAFETY: checked reads of pointers and integers along
    // `current->files->fdt->fd[fd]->private_data->sk`, at offsets from the
    // kernel's BTF; `fd` is bounded by the table's `max_fds` first.
    unsafe {
        let task = bpf_get_current_task();
        let files: u64 = read_at(task, offsets.task_files as usize)?;
        let fdt: u64 = read_at(files, offsets.files_fdt as usize)?;
        let max_fds: u32 = read_at(fdt, offsets.fdt_max_fds as usize)?;
        if fd >= u64::from(max_fds) {
            return Ok(0);
        }
        let fds: u64 = read_at(fdt, offsets.fdt_fd as usize)?;
        let file: u64 = read_at(fds, fd as usize * 8)?;
        let socket: u64 = read_at(file, offsets.file_private_data as usize)?;
        // A socket's file points back at the socket: anything else is not one.
        let back: u64 = read_at(socket, offsets.socket_file as usize)?;
        if back != file {
            return Ok(0);
        }
        read_at(socket, offsets.socket_sk as usize)
    }
}

/// A connection's endpoints, read from its socket.
struct Endpoints {
    family: u16,
    lport: u16,
    rport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[inline(always)]
fn endpoints(sk: u64, offsets: &AcceptOffsets) -> Result<Endpoints, i32> {
    let at = |offset: u32| (sk as *const u8).wrapping_add(offset as usize);
    let mut ends = Endpoints {
        family: 0,
        lport: 0,
        rport: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    // SAFETY: checked reads of `sock_common` fields at BTF offsets; the
    // buffer reads write only within the slices they are given.
    unsafe {
        ends.family = read_at(sk, offsets.skc_family as usize)?;
        ends.lport = read_at(sk, offsets.skc_num as usize)?;
        ends.rport = u16::from_be(read_at(sk, offsets.skc_dport as usize)?);
        if ends.family == AF_INET {
            bpf_probe_read_kernel_buf(at(offsets.skc_rcv_saddr), &mut ends.saddr[..4])?;
            bpf_probe_read_kernel_buf(at(offsets.skc_daddr), &mut ends.daddr[..4])?;
        } else {
            bpf_probe_read_kernel_buf(at(offsets.skc_v6_rcv_saddr), &mut ends.saddr)?;
            bpf_probe_read_kernel_buf(at(offsets.skc_v6_daddr), &mut ends.daddr)?;
        }
    }
    Ok(ends)
}
