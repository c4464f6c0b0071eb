//! Kernel side of tcp-trace: one program on `sock:inet_sock_set_state`.
//!
//! Per transition it (1) keeps, per socket, when the socket entered its state
//! and who owns it, (2) applies the user's filters, (3) streams one `Event`
//! through the ring buffer. Field offsets and filters are read-only globals
//! that userspace fills in at load time.
//!
//! Two programs do this, and userspace attaches one: the classic tracepoint
//! program here, which keeps per-socket state in an LRU map by the socket's
//! address, and the BTF-typed one in `btf`, which keeps it in socket-local
//! storage. Both share everything after reading the transition.
//!
//! This file holds the globals, the maps and the handlers; `record` reads the
//! tracepoint's record, `sockets` keeps per-socket state, `emit` builds and
//! streams the event, `sums` sums it instead when aggregating, `owners`
//! follows `accept()` and exits. The steps are `#[inline(always)]`: one
//! program, no BPF-to-BPF calls.
#![no_std]
#![no_main]
// BPF's atomic add, in `count`.
#![feature(asm_experimental_arch)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod btf;
mod emit;
mod owners;
mod record;
mod sockets;
mod sums;
mod timewait;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use tcp_trace_common::{
    counter, hist, outcome, peer_not_set, side, state, tally, AcceptOffsets, ConnKey, Filter,
    HalfOpenKey, Listener, Owner, SkFields, SockOffsets, SockState, SynackLayout, TaskOffsets,
    TracepointLayout, AF_INET, IPPROTO_TCP, KNOWN_LAYOUT,
};

use crate::{
    btf::{Accepted, Context},
    emit::{fill_transition, submit},
    owners::seeded_owner,
    record::{in_task_context, read_record, Addresses, Record, RecordAddresses},
    sockets::{track_listener, track_socket, SocketMap, Store},
    sums::aggregate,
};

/// The program's license, which the kernel checks at load time. It must be
/// GPL-compatible: `bpf_probe_read_kernel` is a GPL-only helper. (Without
/// this section aya declares "GPL".)
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Field offsets of the tracepoint record (from its tracefs format file).
#[no_mangle]
static LAYOUT: TracepointLayout = KNOWN_LAYOUT;

/// Nonzero when `LAYOUT` is `KNOWN_LAYOUT`: read the record with direct loads
/// at constant offsets (the verifier allows those) instead of helper calls.
#[no_mangle]
static DIRECT: u8 = 0;

/// The user's filters; zero fields match everything.
#[no_mangle]
static FILTER: Filter = Filter {
    cgroup_id: 0,
    cgroup_level: 0,
    pid: 0,
    port: 0,
    lport: 0,
    rport: 0,
    family: 0,
    close_from: 0,
    _pad: [0; 3],
};

/// Offsets of `tcp_sock`/`sock` fields from the running kernel's BTF; zero
/// when unknown. Read only at transitions to CLOSE.
#[no_mangle]
static SOCK_OFFSETS: SockOffsets = SockOffsets {
    bytes_acked: 0,
    bytes_received: 0,
    sk_err: 0,
    sk_flags: 0,
    total_retrans: 0,
    srtt_us: 0,
    snt_synack: 0,
    skc_net: 0,
    net_inum: 0,
};

/// Offsets the `accept()` exit handler follows; `task_files` 0 when the
/// kernel's BTF did not give them (the handler is then not attached).
#[no_mangle]
static ACCEPT_OFFSETS: AcceptOffsets = AcceptOffsets {
    ret: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_private_data: 0,
    socket_file: 0,
    socket_sk: 0,
    skc_family: 0,
    skc_num: 0,
    skc_dport: 0,
    skc_rcv_saddr: 0,
    skc_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_v6_daddr: 0,
};

/// Field offsets of `tcp:tcp_retransmit_synack`; `req` 0 when not attached.
#[no_mangle]
static SYNACK_LAYOUT: SynackLayout = SynackLayout {
    req: 0,
    sport: 0,
    dport: 0,
    family: 0,
    daddr: 0,
    daddr_v6: 0,
};

/// Offsets of the socket fields the BTF-typed program loads.
#[no_mangle]
static SK_FIELDS: SkFields = SkFields {
    family: 0,
    sport: 0,
    dport: 0,
    saddr: 0,
    daddr: 0,
    saddr_v6: 0,
    daddr_v6: 0,
    state: 0,
};

/// Nonzero when the BTF-typed program is the one attached: socket state is
/// in socket storage, which the `accept()` handler reaches through `ACCEPTS`.
#[no_mangle]
static SOCKET_STORAGE: u8 = 0;

/// Nonzero: sum durations into `HISTOGRAMS` in place, and stream only what
/// `STREAM_MASK` asks for.
#[no_mangle]
static AGGREGATE: u8 = 0;

/// Nonzero, when aggregating: also sum transitions, handshakes and closes
/// into `TALLIES` and `HANDSHAKES` (`serve`; `stats` does not pay for them).
#[no_mangle]
static TALLY: u8 = 0;

/// When aggregating, transitions that are streamed as well: bit `old` (0-15)
/// for transitions from state `old`, bit `16 + new` for those into `new`.
#[no_mangle]
static STREAM_MASK: u32 = 0;

/// Wake the reader only once this many bytes are queued; it also drains the
/// ring buffer on a short timer, so quiet periods still flow.
#[no_mangle]
static WAKEUP_BYTES: u64 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Live sockets by kernel address. LRU, so sockets we never see close cannot
/// exhaust it; userspace may resize it at load time.
#[map]
static SOCKETS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(131_072, 0);

/// Socket-storage path: passively opened sockets between ESTABLISHED and
/// the first transition after `accept()`, by address, with the owner
/// `accept()` named (see `btf::Accepted`).
#[map]
static ACCEPTS: LruHashMap<u64, Accepted> = LruHashMap::with_max_entries(16_384, 0);

/// Listening sockets by local port: accepted sockets are born in softirq and
/// are charged to their listener's owner until a process touches them.
#[map]
static LISTENERS: LruHashMap<u16, Listener> = LruHashMap::with_max_entries(8192, 0);

/// Processes that own a listener, with the port of the last one: when one
/// exits (a daemon's original process, once it has forked), `owner_exit`
/// hands that listener to its first child at once, and notes the exit in
/// `EXITED_OWNERS` for userspace to re-resolve any others it owned.
#[map]
static LISTENER_OWNERS: LruHashMap<u32, u16> = LruHashMap::with_max_entries(8192, 0);

/// Listener owners that exited, with their heir (their first child; unknown
/// when they had none); userspace drains it.
#[map]
static EXITED_OWNERS: LruHashMap<u32, Owner> = LruHashMap::with_max_entries(1024, 0);

/// Offsets to an exiting process's first child; `children` 0 when unknown.
#[no_mangle]
static TASK_OFFSETS: TaskOffsets = TaskOffsets {
    children: 0,
    sibling: 0,
    tgid: 0,
    comm: 0,
    cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
};

/// Owners of connections open before the program was attached, by endpoints,
/// from userspace's start-up scan; taken out at the socket's first event.
/// Not preallocated: it costs only what the scan puts in; userspace sizes it
/// like `SOCKETS`.
#[map]
static SEEDS: HashMap<ConnKey, Owner> = HashMap::with_max_entries(131_072, BPF_F_NO_PREALLOC);

/// Per CPU, where a seed's key is built.
#[map]
static SEED_KEY: PerCpuArray<ConnKey> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, the `pt_regs` pointer the kernel hands a tracepoint program in
/// task (process) context. The kernel stores `&__perf_regs[context]` in the
/// record's first 8 bytes, one slot per context level (task, softirq, hardirq,
/// NMI), so a different pointer on the same CPU means interrupt context.
/// Learnt from transitions only syscalls make; userspace primes every CPU.
#[map]
static TASK_REGS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, what `task_context` (the classic program run just before the
/// BTF one on the same transition) found: the socket, its states, and
/// whether the transition runs in task context.
#[map]
static CONTEXT: PerCpuArray<Context> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, per old state: a log-linear histogram of time spent in it
/// (index = state * hist::BUCKETS + bucket). Sized to 1 unless aggregating.
#[map]
static HISTOGRAMS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(hist::STATES * hist::BUCKETS, 0);

/// Per CPU, per old state: the longest time spent in it.
#[map]
static MAX_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(hist::STATES, 0);

/// Per CPU, per side and outcome: a log-linear histogram of handshake times
/// (index = (side * outcome::COUNT + outcome) * hist::BUCKETS + bucket).
/// Sized to 1 unless aggregating.
#[map]
static HANDSHAKES: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(side::COUNT * outcome::COUNT * hist::BUCKETS, 0);

/// Per CPU: transitions by states, handshake retransmissions and closes by
/// kind (see `tally`), when aggregating.
#[map]
static TALLIES: PerCpuArray<u64> = PerCpuArray::with_max_entries(tally::COUNT, 0);

/// When each half-open connection whose SYN-ACK was retransmitted sent its
/// first SYN-ACK (ns, monotonic), for the server's handshake time.
#[map]
static FIRST_SYNACK: LruHashMap<HalfOpenKey, u64> = LruHashMap::with_max_entries(16_384, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// `BPF_F_NO_PREALLOC` (uapi bpf.h): hash map elements allocated on update.
const BPF_F_NO_PREALLOC: u32 = 1;

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_trace(&ctx).is_err() {
        count(counter::READ_FAILED);
    }
    0
}

/// Beside the BTF program, which cannot tell a softirq from a process by
/// itself (its tracepoint hands it no `pt_regs` pointer, and softirqs run
/// on a task's stack when an interrupt hits user mode): the classic
/// program's test, for the BTF program to read. Attached first, it runs
/// first on each transition.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn task_context(ctx: TracePointContext) -> u32 {
    if try_task_context(&ctx).is_err() {
        count(counter::READ_FAILED);
    }
    0
}

fn try_task_context(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = global(&LAYOUT);
    let rec = read_record(ctx, global(&DIRECT) != 0, &layout)?;
    if rec.protocol != IPPROTO_TCP {
        return Ok(());
    }
    let in_task = in_task_context(ctx, rec.old_state, rec.new_state)?;
    if let Some(slot) = CONTEXT.get_ptr_mut(0) {
        // SAFETY: as in `count`: a per-CPU value, valid for this run; the
        // BTF program reads it only after this run on the same transition.
        unsafe {
            *slot = Context {
                skaddr: rec.skaddr,
                old_state: rec.old_state,
                new_state: rec.new_state,
                in_task: u8::from(in_task),
                _pad: [0; 5],
            }
        };
    }
    Ok(())
}

/// A SYN-ACK retransmission: remember when the first SYN-ACK left, which the
/// request socket knows and the child socket will not.
#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let _ = try_synack(&ctx);
    0
}

fn try_synack(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = global(&SYNACK_LAYOUT);
    let offsets = global(&SOCK_OFFSETS);
    if layout.req == 0 || offsets.snt_synack == 0 {
        return Ok(());
    }
    let req: u64 = field(ctx, layout.req)?;
    let family: u16 = field(ctx, layout.family)?;
    let mut key = HalfOpenKey {
        lport: field(ctx, layout.sport)?,
        rport: field(ctx, layout.dport)?,
        family,
        _pad: 0,
        raddr: [0; 16],
    };
    let base = ctx.as_ptr() as *const u8;
    // SAFETY: bpf_probe_read_kernel_buf checks the source and fails instead
    // of faulting, and writes only within the slice it is given; the offsets
    // come from the tracepoint's format file.
    unsafe {
        if family == AF_INET {
            bpf_probe_read_kernel_buf(base.add(layout.daddr as usize), &mut key.raddr[..4])?;
        } else {
            bpf_probe_read_kernel_buf(base.add(layout.daddr_v6 as usize), &mut key.raddr)?;
        }
    }
    // SAFETY: only whether the entry exists is used, not its value.
    if unsafe { FIRST_SYNACK.get(key) }.is_some() {
        return Ok(());
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of
    // faulting; `req` is the kernel's request socket and the offset of
    // `snt_synack` comes from its BTF.
    let sent_us: u64 = unsafe {
        bpf_probe_read_kernel((req as *const u8).add(offsets.snt_synack as usize) as *const u64)?
    };
    let _ = FIRST_SYNACK.insert(key, sent_us * 1000, 0);
    Ok(())
}

/// The benchmark's floor: an empty program on the same tracepoint, so
/// `cargo xtask bench` can measure the cost of being attached at all.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn bench_floor(_ctx: TracePointContext) -> u32 {
    0
}

/// The benchmark's second floor: what any tool that times each state per
/// socket must do on every transition, and nothing else. It reads the record,
/// keeps the socket's entry time in `SOCKETS` (lookup, insert, delete at
/// CLOSE) and counts the stay in `HISTOGRAMS`: no owners, filters, tallies
/// or streaming. `cargo xtask bench` measures the modes' extra cost over it.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn bench_floor_timing(ctx: TracePointContext) -> u32 {
    let _ = try_floor_timing(&ctx);
    0
}

fn try_floor_timing(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = global(&LAYOUT);
    let rec = read_record(ctx, global(&DIRECT) != 0, &layout)?;
    if rec.protocol != IPPROTO_TCP {
        return Ok(());
    }
    // SAFETY: a helper without arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    match SOCKETS.get_ptr_mut(rec.skaddr) {
        Some(sock) => {
            // SAFETY: as in `track_socket`: a preallocated LRU value, plain
            // data, valid for this run.
            let sock = unsafe { &mut *sock };
            if sock.state == rec.old_state {
                let stay = now.wrapping_sub(sock.entered_ns);
                let index = u32::from(rec.old_state) * hist::BUCKETS + hist::bucket(stay);
                if let Some(slot) = HISTOGRAMS.get_ptr_mut(index) {
                    // SAFETY: as in `count`: a per-CPU value, valid for this run.
                    unsafe { *slot += 1 };
                }
            }
            sock.entered_ns = now;
            sock.state = rec.new_state;
        }
        None => {
            let sock = SockState {
                entered_ns: now,
                state: rec.new_state,
                ..SockState::default()
            };
            let _ = SOCKETS.insert(rec.skaddr, sock, 0);
        }
    }
    if rec.new_state == state::CLOSE {
        let _ = SOCKETS.remove(rec.skaddr);
    }
    Ok(())
}

#[inline(always)]
fn global<T: Copy>(value: &'static T) -> T {
    // Volatile: these are patched at load time, the compiler must not fold them.
    // SAFETY: `value` is a reference, hence valid and aligned, and the globals
    // are read-only (userspace writes them before loading).
    unsafe { core::ptr::read_volatile(value) }
}

#[inline(always)]
fn field<T>(ctx: &TracePointContext, offset: u32) -> Result<T, i32> {
    // SAFETY: read_at goes through bpf_probe_read_kernel, which checks the
    // address and fails instead of faulting; any bit pattern is a valid `T`
    // for the plain integers read here.
    unsafe { ctx.read_at::<T>(offset as usize) }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Atomic: the kernel does not nest one program's runs on a CPU, but
        // a softirq running the BTF-typed program can interrupt the
        // `accept()` handler (a classic tracepoint program, guarded apart)
        // on its CPU, and both count here.
        // The BPF target offers no atomic read-modify-write in `core`:
        // BPF's own atomic add.
        // SAFETY: a per-CPU array value, valid and 8-byte aligned for this
        // run; the instruction adds to it and touches nothing else.
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({slot} + 0) += {one}",
                slot = in(reg) slot,
                one = in(reg) 1u64,
            )
        };
    }
}

fn try_trace(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = global(&LAYOUT);
    let direct = global(&DIRECT) != 0;

    let rec = read_record(ctx, direct, &layout)?;
    // TCP only: SCTP and MPTCP's own socket use the same tracepoint.
    if rec.protocol != IPPROTO_TCP || !global(&FILTER).matches_family(rec.family) {
        return Ok(());
    }

    // SAFETY: a helper without arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let in_irq = !in_task_context(ctx, rec.old_state, rec.new_state)?;
    let addresses = RecordAddresses {
        ctx,
        direct,
        layout: &layout,
    };
    follow(
        &rec,
        now,
        in_irq,
        &addresses,
        &SocketMap(rec.skaddr),
        || seeded_owner(&addresses, &rec),
    )
}

/// One transition, read: times it and keeps the socket's owner in `store`,
/// applies the filters, then sums or streams it. `seeded` names the owner of
/// a socket first met mid-life.
#[inline(always)]
fn follow(
    rec: &Record,
    now: u64,
    in_irq: bool,
    addresses: &impl Addresses,
    store: &impl Store,
    seeded: impl FnOnce() -> Option<Owner>,
) -> Result<(), i32> {
    let tracked = track_socket(store, rec, now, in_irq, seeded);
    track_listener(rec, tracked.owner);

    // Emission filters come after tracking so that durations and owners stay
    // right for sockets whose ports are not known yet (port 0 at connect).
    let filter = global(&FILTER);
    let owner = tracked.owner;
    let pid = owner.is_known().then_some(owner.pid);
    let endpoints_match = if peer_not_set(rec.old_state, rec.new_state, rec.dport) {
        filter.matches_local(rec.family, rec.sport, pid)
    } else {
        filter.matches(rec.family, rec.sport, rec.dport, pid)
    };
    if !endpoints_match
        || !filter.matches_cgroup(owner.in_cgroup != 0)
        || !closes_from(&filter, rec)
    {
        return Ok(());
    }
    if global(&AGGREGATE) != 0 {
        aggregate(addresses, rec, now, &tracked)?;
        if !streamed_too(rec) {
            return Ok(());
        }
    }

    submit(|ev| fill_transition(ev, addresses, rec, now, &tracked, in_irq))
}

/// Whether an aggregated transition is streamed as well (`STREAM_MASK`).
#[inline(always)]
fn streamed_too(rec: &Record) -> bool {
    let mask = global(&STREAM_MASK);
    mask & (1 << (rec.old_state & 15)) != 0 || mask & (1 << (16 + (rec.new_state & 15))) != 0
}

/// The `close_from` filter (kernel only): nonzero streams only transitions to
/// CLOSE from the old states whose bit is set.
#[inline(always)]
fn closes_from(filter: &Filter, rec: &Record) -> bool {
    filter.close_from == 0
        || (rec.new_state == state::CLOSE && filter.close_from & (1 << (rec.old_state & 15)) != 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
