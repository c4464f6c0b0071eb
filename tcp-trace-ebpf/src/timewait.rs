//! The precise TIME_WAIT path: kprobes on the kernel's timewait functions
//! stream a `TimewaitRecord` when a timewait socket is hashed in place of a
//! closing socket (`inet_twsk_hashdance`, `inet_twsk_hashdance_schedule` on
//! newer kernels), when its timer is re-armed (`__inet_twsk_schedule`: the
//! peer's FIN moved it from the FIN_WAIT2 substate to TIME_WAIT), and when
//! it dies (`inet_twsk_kill`: its timer fired, a SYN or `connect()` reused
//! it, or its namespace went away). Userspace attaches them only where the
//! kernel has kprobes and the symbols (`kernel/timewait.rs`).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::kprobe,
    programs::ProbeContext,
};
use tcp_trace_common::{counter, state, tw_kind, TimewaitRecord, TwOffsets, AF_INET};

use crate::{
    count,
    emit::{read_at, submit},
    global, FILTER,
};

/// Offsets of the timewait socket's fields from the kernel's BTF; `family`
/// 0 when unknown (the probes are then not attached).
#[no_mangle]
static TW_OFFSETS: TwOffsets = TwOffsets {
    family: 0,
    num: 0,
    dport: 0,
    rcv_saddr: 0,
    daddr: 0,
    v6_rcv_saddr: 0,
    v6_daddr: 0,
    net: 0,
    net_inum: 0,
    substate: 0,
};

/// A timewait socket was hashed: its first argument.
#[kprobe]
pub fn timewait_entry(ctx: ProbeContext) -> u32 {
    stream(&ctx, tw_kind::ENTRY);
    0
}

/// `__inet_twsk_schedule(tw, timeo, rearm)`: only a re-arm in substate
/// TIME_WAIT is news (the first arming follows the entry).
#[kprobe]
pub fn timewait_rearmed(ctx: ProbeContext) -> u32 {
    let rearm = ctx.arg::<u64>(2).is_some_and(|r| r & 0xff != 0);
    if rearm {
        stream(&ctx, tw_kind::REARMED);
    }
    0
}

/// A timewait socket dies: its first argument.
#[kprobe]
pub fn timewait_exit(ctx: ProbeContext) -> u32 {
    stream(&ctx, tw_kind::EXIT);
    0
}

#[inline(always)]
fn stream(ctx: &ProbeContext, kind: u8) {
    let Some(tw) = ctx.arg::<u64>(0) else {
        count(counter::READ_FAILED);
        return;
    };
    if try_stream(tw, kind).is_err() {
        count(counter::READ_FAILED);
    }
}

#[inline(always)]
fn try_stream(tw: u64, kind: u8) -> Result<(), i32> {
    let offsets = global(&TW_OFFSETS);
    // SAFETY: checked reads of `inet_timewait_sock` fields at BTF offsets
    // (`bpf_probe_read_kernel` fails instead of faulting); plain integers.
    let (family, lport, rport, substate) = unsafe {
        (
            read_at::<u16>(tw, offsets.family as usize)?,
            read_at::<u16>(tw, offsets.num as usize)?,
            u16::from_be(read_at::<u16>(tw, offsets.dport as usize)?),
            read_at::<u8>(tw, offsets.substate as usize)?,
        )
    };
    if kind == tw_kind::REARMED && substate != state::TIME_WAIT {
        return Ok(());
    }
    if !global(&FILTER).matches_endpoints(family, lport, rport) {
        return Ok(());
    }
    submit(|rec: &mut TimewaitRecord| {
        rec.ts_ns = now_ns();
        rec.tw = tw;
        rec.family = family;
        rec.lport = lport;
        rec.rport = rport;
        rec.kind = kind;
        rec.substate = substate;
        read_addresses(tw, &offsets, rec)
    })
}

/// The record's addresses and network namespace.
#[inline(always)]
fn read_addresses(tw: u64, offsets: &TwOffsets, rec: &mut TimewaitRecord) -> Result<(), i32> {
    let at = |offset: u32| (tw as *const u8).wrapping_add(offset as usize);
    // SAFETY: checked reads at BTF offsets (they fail instead of faulting):
    // the addresses, written only within the slices given, then the
    // namespace's `struct net` pointer and its inode number.
    unsafe {
        if rec.family == AF_INET {
            bpf_probe_read_kernel_buf(at(offsets.rcv_saddr), &mut rec.saddr[..4])?;
            bpf_probe_read_kernel_buf(at(offsets.daddr), &mut rec.daddr[..4])?;
        } else {
            bpf_probe_read_kernel_buf(at(offsets.v6_rcv_saddr), &mut rec.saddr)?;
            bpf_probe_read_kernel_buf(at(offsets.v6_daddr), &mut rec.daddr)?;
        }
        let net: u64 = read_at(tw, offsets.net as usize)?;
        rec.netns = read_at(net, offsets.net_inum as usize)?;
    }
    Ok(())
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_ktime_get_ns() }
}
