//! Kernel side of tcp-trace: one program on `sock:inet_sock_set_state`.
//!
//! Per transition it (1) keeps, per socket, when the socket entered its state
//! and who owns it, (2) applies the user's filters, (3) streams one `Event`
//! through the ring buffer. Field offsets and filters are read-only globals
//! that userspace fills in at load time.
#![no_std]
#![no_main]
#![warn(clippy::undocumented_unsafe_blocks)]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use tcp_trace_common::{
    counter, hist, state, Event, Filter, HalfOpenKey, Listener, Owner, SockOffsets, SockState,
    SynackLayout, TracepointLayout, AF_INET, FLAG_ACTIVE_OPEN, FLAG_DURATION_KNOWN, FLAG_HANDSHAKE,
    FLAG_IRQ_CONTEXT, FLAG_OWNER_KNOWN, FLAG_RETRANS, FLAG_SOCK_FIELDS, IPPROTO_TCP, KNOWN_LAYOUT,
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
    pid: 0,
    port: 0,
    lport: 0,
    rport: 0,
    family: 0,
    close_from: 0,
    _pad: 0,
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

/// Nonzero: aggregate durations into `HISTOGRAMS` in place and stream nothing.
#[no_mangle]
static AGGREGATE: u8 = 0;

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

/// Listening sockets by local port: accepted sockets are born in softirq and
/// are charged to their listener's owner until a process touches them.
#[map]
static LISTENERS: LruHashMap<u16, Listener> = LruHashMap::with_max_entries(8192, 0);

/// Per CPU, the `pt_regs` pointer the kernel hands a tracepoint program in
/// task (process) context. The kernel stores `&__perf_regs[context]` in the
/// record's first 8 bytes, one slot per context level (task, softirq, hardirq,
/// NMI), so a different pointer on the same CPU means interrupt context.
/// Learnt from transitions only syscalls make; userspace primes every CPU.
#[map]
static TASK_REGS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per CPU, per old state: a log-linear histogram of time spent in it
/// (index = state * hist::BUCKETS + bucket). Sized to 1 unless aggregating.
#[map]
static HISTOGRAMS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(hist::STATES * hist::BUCKETS, 0);

/// Per CPU, per old state: the longest time spent in it.
#[map]
static MAX_NS: PerCpuArray<u64> = PerCpuArray::with_max_entries(hist::STATES, 0);

/// When each half-open connection whose SYN-ACK was retransmitted sent its
/// first SYN-ACK (ns, monotonic), for the server's handshake time.
#[map]
static FIRST_SYNACK: LruHashMap<HalfOpenKey, u64> = LruHashMap::with_max_entries(16_384, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_trace(&ctx).is_err() {
        count(counter::READ_FAILED);
    }
    0
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
        // SAFETY: a per-CPU array value is valid for this run and only this
        // CPU touches it; the kernel does not nest a program run on one CPU.
        unsafe { *slot += 1 };
    }
}

fn current_owner() -> Owner {
    Owner {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        known: 1,
        comm: bpf_get_current_comm().unwrap_or_default(),
    }
}

/// Transitions that only a syscall makes (listen, connect, close, shutdown),
/// hence always in the owner's process context.
#[inline(always)]
fn syscall_only(old_state: u8, new_state: u8) -> bool {
    matches!(
        (old_state, new_state),
        (state::CLOSE, state::LISTEN)
            | (state::CLOSE, state::SYN_SENT)
            | (state::ESTABLISHED, state::FIN_WAIT1)
            | (state::SYN_RECV, state::FIN_WAIT1)
            | (state::CLOSE_WAIT, state::LAST_ACK)
    )
}

#[inline(always)]
fn in_task_context(ctx: &TracePointContext, old_state: u8, new_state: u8) -> Result<bool, i32> {
    let regs: u64 = field(ctx, 0)?;
    let Some(task_regs) = TASK_REGS.get_ptr_mut(0) else {
        return Ok(syscall_only(old_state, new_state));
    };
    // SAFETY: as in `count`: a per-CPU value, valid for this run, ours alone.
    let task_regs = unsafe { &mut *task_regs };
    if old_state == state::CLOSE && (new_state == state::LISTEN || new_state == state::SYN_SENT) {
        *task_regs = regs;
        return Ok(true);
    }
    if *task_regs == 0 {
        // This CPU is not calibrated yet: trust only syscall-made transitions.
        return Ok(syscall_only(old_state, new_state));
    }
    Ok(regs == *task_regs)
}

/// The fields of one tracepoint record the program uses.
struct Record {
    skaddr: u64,
    old_state: u8,
    new_state: u8,
    sport: u16,
    dport: u16,
    family: u16,
    protocol: u16,
}

/// A direct load from the tracepoint record.
///
/// # Safety
///
/// `offset` must be a constant inside the record, aligned for `T`, and `T` a
/// plain integer: the verifier then accepts the load (it rejects the program
/// otherwise), and any bit pattern is a valid `T`.
// SAFETY: sound under the contract above, which every caller meets by passing
// `KNOWN_LAYOUT` offsets, used only when tracefs reports exactly that layout.
#[inline(always)]
unsafe fn load<T>(base: *const u8, offset: u32) -> T {
    // SAFETY: the caller's contract (see above).
    unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) }
}

#[inline(always)]
fn read_record(
    ctx: &TracePointContext,
    direct: bool,
    layout: &TracepointLayout,
) -> Result<Record, i32> {
    if direct {
        let base = ctx.as_ptr() as *const u8;
        let l = KNOWN_LAYOUT;
        // SAFETY: `KNOWN_LAYOUT`'s constant, aligned offsets inside the
        // record (`DIRECT` is set only when tracefs reports that layout);
        // the verifier checks every direct load of the context.
        return Ok(unsafe {
            Record {
                skaddr: load(base, l.skaddr),
                old_state: load::<i32>(base, l.oldstate) as u8,
                new_state: load::<i32>(base, l.newstate) as u8,
                sport: load(base, l.sport),
                dport: load(base, l.dport),
                family: load(base, l.family),
                protocol: load(base, l.protocol),
            }
        });
    }
    Ok(Record {
        skaddr: field(ctx, layout.skaddr)?,
        old_state: field::<i32>(ctx, layout.oldstate)? as u8,
        new_state: field::<i32>(ctx, layout.newstate)? as u8,
        sport: field(ctx, layout.sport)?,
        dport: field(ctx, layout.dport)?,
        family: field(ctx, layout.family)?,
        protocol: field(ctx, layout.protocol)?,
    })
}

/// Source and destination addresses (IPv4 in the first 4 bytes).
#[inline(always)]
fn read_addresses(
    ctx: &TracePointContext,
    direct: bool,
    layout: &TracepointLayout,
    ipv4: bool,
) -> Result<([u8; 16], [u8; 16]), i32> {
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let base = ctx.as_ptr() as *const u8;
    if direct {
        let l = KNOWN_LAYOUT;
        // SAFETY: as in `read_record`: `KNOWN_LAYOUT`'s constant, aligned
        // offsets inside the record, checked by the verifier.
        unsafe {
            if ipv4 {
                saddr[..4].copy_from_slice(&load::<u32>(base, l.saddr).to_ne_bytes());
                daddr[..4].copy_from_slice(&load::<u32>(base, l.daddr).to_ne_bytes());
            } else {
                saddr[..8].copy_from_slice(&load::<u64>(base, l.saddr_v6).to_ne_bytes());
                saddr[8..].copy_from_slice(&load::<u64>(base, l.saddr_v6 + 8).to_ne_bytes());
                daddr[..8].copy_from_slice(&load::<u64>(base, l.daddr_v6).to_ne_bytes());
                daddr[8..].copy_from_slice(&load::<u64>(base, l.daddr_v6 + 8).to_ne_bytes());
            }
        }
        return Ok((saddr, daddr));
    }
    // SAFETY: bpf_probe_read_kernel_buf checks the source and fails instead
    // of faulting, and writes only within the slice it is given; the offsets
    // come from the tracepoint's format file.
    unsafe {
        if ipv4 {
            bpf_probe_read_kernel_buf(base.add(layout.saddr as usize), &mut saddr[..4])?;
            bpf_probe_read_kernel_buf(base.add(layout.daddr as usize), &mut daddr[..4])?;
        } else {
            bpf_probe_read_kernel_buf(base.add(layout.saddr_v6 as usize), &mut saddr)?;
            bpf_probe_read_kernel_buf(base.add(layout.daddr_v6 as usize), &mut daddr)?;
        }
    }
    Ok((saddr, daddr))
}

fn try_trace(ctx: &TracePointContext) -> Result<(), i32> {
    let layout = global(&LAYOUT);
    let direct = global(&DIRECT) != 0;
    let filter = global(&FILTER);

    let rec = read_record(ctx, direct, &layout)?;
    // TCP only: SCTP and MPTCP's own socket use the same tracepoint.
    if rec.protocol != IPPROTO_TCP || !filter.matches_family(rec.family) {
        return Ok(());
    }

    // SAFETY: a helper without arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let in_irq = !in_task_context(ctx, rec.old_state, rec.new_state)?;
    let tracked = track_socket(&rec, now, in_irq);
    track_listener(&rec, tracked.owner);

    // Emission filters come after tracking so that durations and owners stay
    // right for sockets whose ports are not known yet (port 0 at connect).
    let pid = (tracked.owner.known != 0).then_some(tracked.owner.pid);
    if !filter.matches(rec.family, rec.sport, rec.dport, pid) || !closes_from(&filter, &rec) {
        return Ok(());
    }
    if global(&AGGREGATE) != 0 {
        count(counter::AGGREGATED);
        if tracked.duration_known {
            aggregate(rec.old_state, tracked.duration_ns);
        }
        return Ok(());
    }

    let offsets = global(&SOCK_OFFSETS);
    let close = close_fields(&rec, &offsets)?;
    let total_retrans = handshake_retrans(&rec, &offsets)?;
    let (saddr, daddr) = read_addresses(ctx, direct, &layout, rec.family == AF_INET)?;
    let handshake_ns = server_handshake(&rec, now, total_retrans, &daddr, &offsets)?;
    let details = Details {
        close,
        total_retrans,
        handshake_ns,
        saddr,
        daddr,
    };
    emit(&rec, now, &tracked, in_irq, &details);
    Ok(())
}

/// What the socket map says about the socket at this transition.
struct Tracked {
    owner: Owner,
    /// Time spent in the old state; 0 unless `duration_known`.
    duration_ns: u64,
    duration_known: bool,
    /// The program saw the socket connect (CLOSE -> SYN_SENT).
    active_open: bool,
}

/// Times the socket's stay in its old state and keeps its owner: updates the
/// socket map, or starts tracking the socket, and forgets it at CLOSE.
#[inline(always)]
fn track_socket(rec: &Record, now: u64, in_irq: bool) -> Tracked {
    let tracked = match SOCKETS.get_ptr_mut(rec.skaddr) {
        // SAFETY: the value pointer stays valid for this run (the map is
        // preallocated and the program runs under RCU), and transitions of
        // one socket are serialized by the kernel (socket lock), so no other
        // run writes this entry meanwhile.
        Some(sock) => follow_socket(unsafe { &mut *sock }, rec, now, in_irq),
        None => start_tracking(rec, now, in_irq),
    };
    if rec.new_state == state::CLOSE {
        let _ = SOCKETS.remove(rec.skaddr);
    }
    tracked
}

/// A socket the map knows: its time in the old state; it enters the new one now.
#[inline(always)]
fn follow_socket(sock: &mut SockState, rec: &Record, now: u64, in_irq: bool) -> Tracked {
    if sock.state != rec.old_state {
        // A transition of this socket was skipped (the kernel does not run
        // the program nested, and the ring may have been full): the time in
        // the old state is unknown. A socket that begins anew at this address
        // lost its CLOSE: it is a new socket.
        count(counter::GAPS);
        if rec.old_state == state::CLOSE || rec.old_state == state::LISTEN {
            return start_tracking(rec, now, in_irq);
        }
    }
    let duration_known = sock.state == rec.old_state;
    let duration_ns = if duration_known {
        now.wrapping_sub(sock.entered_ns)
    } else {
        0
    };
    sock.entered_ns = now;
    sock.state = rec.new_state;
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

fn start_tracking(rec: &Record, now: u64, in_irq: bool) -> Tracked {
    let owner = if !in_irq {
        current_owner()
    } else if rec.old_state == state::LISTEN && rec.new_state == state::SYN_RECV {
        // SAFETY: the owner is copied out at once. The map is preallocated, so
        // the value's memory stays valid for this run; a concurrent update can
        // at worst make the copy stale (plain data: any bytes are valid).
        unsafe { LISTENERS.get(rec.sport) }
            .map(|l| l.owner)
            .unwrap_or_default()
    } else {
        Owner::default()
    };
    // First sight of a socket that did not just come to life: it was
    // open before we started, or fell out of the LRU map.
    if rec.old_state != state::CLOSE && rec.old_state != state::LISTEN {
        count(counter::UNTRACKED);
    }
    let active_open = rec.old_state == state::CLOSE && rec.new_state == state::SYN_SENT;
    if rec.new_state != state::CLOSE {
        let sock = SockState {
            entered_ns: now,
            owner,
            active_open: u32::from(active_open),
            state: rec.new_state,
            _pad: [0; 3],
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

/// Listening sockets by port, so that sockets accepted in softirq can be
/// charged to the listener's owner.
#[inline(always)]
fn track_listener(rec: &Record, owner: Owner) {
    if rec.new_state == state::LISTEN {
        let _ = LISTENERS.insert(
            rec.sport,
            Listener {
                skaddr: rec.skaddr,
                owner,
            },
            0,
        );
    } else if rec.old_state == state::LISTEN && rec.new_state == state::CLOSE {
        // SAFETY: only `skaddr` is read, at once; as in `start_tracking`, the
        // memory stays valid and a concurrent update makes it stale at worst.
        if let Some(l) = unsafe { LISTENERS.get(rec.sport) } {
            if l.skaddr == rec.skaddr {
                let _ = LISTENERS.remove(rec.sport);
            }
        }
    }
}

/// The `close_from` filter (kernel only): nonzero streams only transitions to
/// CLOSE from the old states whose bit is set.
#[inline(always)]
fn closes_from(filter: &Filter, rec: &Record) -> bool {
    filter.close_from == 0
        || (rec.new_state == state::CLOSE && filter.close_from & (1 << (rec.old_state & 15)) != 0)
}

/// `tcp_sock`/`sock` fields read at a transition to CLOSE.
struct CloseFields {
    bytes_acked: u64,
    bytes_received: u64,
    sk_err: u16,
    sock_flags: u8,
}

/// What only a streamed event carries; `None` where not read.
struct Details {
    close: Option<CloseFields>,
    total_retrans: Option<u32>,
    handshake_ns: Option<u64>,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// At a transition to CLOSE: the socket's byte counters, error and flags,
/// when the kernel's BTF gave their offsets.
#[inline(always)]
fn close_fields(rec: &Record, offsets: &SockOffsets) -> Result<Option<CloseFields>, i32> {
    if rec.new_state != state::CLOSE || offsets.bytes_acked == 0 {
        return Ok(None);
    }
    let sk = rec.skaddr as *const u8;
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of
    // faulting; `sk` is the kernel's own socket and the offsets come from its
    // BTF, so they stay inside the `tcp_sock`.
    unsafe {
        Ok(Some(CloseFields {
            bytes_acked: bpf_probe_read_kernel(sk.add(offsets.bytes_acked as usize) as *const u64)?,
            bytes_received: bpf_probe_read_kernel(
                sk.add(offsets.bytes_received as usize) as *const u64
            )?,
            sk_err: bpf_probe_read_kernel(sk.add(offsets.sk_err as usize) as *const i32)? as u16,
            // Low byte of the unsigned long, on little-endian targets.
            sock_flags: bpf_probe_read_kernel(sk.add(offsets.sk_flags as usize))?,
        }))
    }
}

/// Leaving SYN_SENT or SYN_RECV: `tcp_sock.total_retrans`, the handshake's
/// SYN (or SYN-ACK) retransmissions.
#[inline(always)]
fn handshake_retrans(rec: &Record, offsets: &SockOffsets) -> Result<Option<u32>, i32> {
    let in_handshake = rec.old_state == state::SYN_SENT || rec.old_state == state::SYN_RECV;
    if !in_handshake || offsets.total_retrans == 0 {
        return Ok(None);
    }
    let sk = rec.skaddr as *const u8;
    // SAFETY: as in `close_fields`: a checked read at a BTF offset.
    let total_retrans =
        unsafe { bpf_probe_read_kernel(sk.add(offsets.total_retrans as usize) as *const u32)? };
    Ok(Some(total_retrans))
}

/// At SYN_RECV -> ESTABLISHED with the retransmissions known: the server's
/// handshake time, from its first SYN-ACK to the final ACK.
#[inline(always)]
fn server_handshake(
    rec: &Record,
    now: u64,
    total_retrans: Option<u32>,
    daddr: &[u8; 16],
    offsets: &SockOffsets,
) -> Result<Option<u64>, i32> {
    let Some(total_retrans) = total_retrans else {
        return Ok(None);
    };
    if rec.old_state != state::SYN_RECV || rec.new_state != state::ESTABLISHED {
        return Ok(None);
    }
    if total_retrans == 0 && offsets.srtt_us != 0 {
        // The kernel's first RTT sample: first SYN-ACK to final ACK.
        let sk = rec.skaddr as *const u8;
        // SAFETY: as in `close_fields`: a checked read at a BTF offset.
        let srtt_us: u32 =
            unsafe { bpf_probe_read_kernel(sk.add(offsets.srtt_us as usize) as *const u32)? };
        return Ok((srtt_us != 0).then(|| u64::from(srtt_us >> 3) * 1000));
    }
    if total_retrans == 0 {
        return Ok(None);
    }
    // SYN-ACKs were retransmitted: `tcp_retransmit_synack` kept the first.
    let key = HalfOpenKey {
        lport: rec.sport,
        rport: rec.dport,
        family: rec.family,
        _pad: 0,
        raddr: *daddr,
    };
    // SAFETY: the value is copied out at once; as in `start_tracking`, the
    // memory stays valid and a concurrent update makes it stale at worst.
    let first = unsafe { FIRST_SYNACK.get(key) }.map(|first| now.saturating_sub(*first));
    let _ = FIRST_SYNACK.remove(key);
    Ok(first)
}

/// Streams one event; wakes the reader only once `WAKEUP_BYTES` are queued.
#[inline(always)]
fn emit(rec: &Record, now: u64, tracked: &Tracked, in_irq: bool, details: &Details) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    entry.write(event(rec, now, tracked, in_irq, details));
    let queued = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let wake = if queued >= global(&WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
}

#[inline(always)]
fn event(rec: &Record, now: u64, tracked: &Tracked, in_irq: bool, details: &Details) -> Event {
    let close = details.close.as_ref();
    let flag = |set: bool, flag: u8| if set { flag } else { 0 };
    let flags = flag(in_irq, FLAG_IRQ_CONTEXT)
        | flag(tracked.duration_known, FLAG_DURATION_KNOWN)
        | flag(tracked.owner.known != 0, FLAG_OWNER_KNOWN)
        | flag(tracked.active_open, FLAG_ACTIVE_OPEN)
        | flag(close.is_some(), FLAG_SOCK_FIELDS)
        | flag(details.total_retrans.is_some(), FLAG_RETRANS)
        | flag(details.handshake_ns.is_some(), FLAG_HANDSHAKE);
    Event {
        ts_ns: now,
        skaddr: rec.skaddr,
        duration_ns: tracked.duration_ns,
        bytes_acked: close.map_or(0, |c| c.bytes_acked),
        bytes_received: close.map_or(0, |c| c.bytes_received),
        pid: tracked.owner.pid,
        sport: rec.sport,
        dport: rec.dport,
        family: rec.family,
        old_state: rec.old_state,
        new_state: rec.new_state,
        flags,
        sock_flags: close.map_or(0, |c| c.sock_flags),
        sk_err: close.map_or(0, |c| c.sk_err),
        total_retrans: details.total_retrans.unwrap_or(0),
        _pad: 0,
        handshake_ns: details.handshake_ns.unwrap_or(0),
        comm: tracked.owner.comm,
        saddr: details.saddr,
        daddr: details.daddr,
    }
}

#[inline(always)]
fn aggregate(old_state: u8, duration_ns: u64) {
    let index = old_state as u32 * hist::BUCKETS + hist::bucket(duration_ns);
    if let Some(slot) = HISTOGRAMS.get_ptr_mut(index) {
        // SAFETY: as in `count`: a per-CPU value, valid for this run, ours alone.
        unsafe { *slot += 1 };
    }
    if let Some(max) = MAX_NS.get_ptr_mut(old_state as u32) {
        // SAFETY: as in `count`: a per-CPU value, valid for this run, ours alone.
        let max = unsafe { &mut *max };
        if duration_ns > *max {
            *max = duration_ns;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
