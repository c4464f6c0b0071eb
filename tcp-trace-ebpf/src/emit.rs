//! What a streamed event carries beyond the record, and streaming it.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_probe_read_kernel,
};
use tcp_trace_common::{
    counter, state, Event, HalfOpenKey, AF_INET, FLAG_ACTIVE_OPEN, FLAG_DURATION_KNOWN,
    FLAG_HANDSHAKE, FLAG_IRQ_CONTEXT, FLAG_OWNER_KNOWN, FLAG_RETRANS, FLAG_SOCK_FIELDS,
};

use crate::{
    count, global,
    record::{Addresses, Record},
    sockets::Tracked,
    EVENTS, FIRST_SYNACK, SOCK_OFFSETS, WAKEUP_BYTES,
};

/// A `SOCK_OFFSETS` field (one at a time: a copy of the whole struct costs
/// stack the main program does not have).
macro_rules! offset {
    ($field:ident) => {
        global(&SOCK_OFFSETS.$field) as usize
    };
}

/// A checked read of a `T` at `offset` bytes into the kernel object at `base`.
///
/// # Safety
///
/// `T` must be a plain integer (any bit pattern valid); the read itself is
/// checked by `bpf_probe_read_kernel`, which fails instead of faulting.
#[inline(always)]
pub(crate) unsafe fn read_at<T>(base: u64, offset: usize) -> Result<T, i32> {
    // SAFETY: the caller's contract (see above).
    unsafe { bpf_probe_read_kernel((base as *const u8).wrapping_add(offset) as *const T) }
}

/// Reserves one record (an `Event`, or a `TimewaitRecord`), lets `fill`
/// write it in place (an `Event` built on the stack would not fit beside the
/// rest in BPF's 512 bytes), and submits it, waking the reader only once
/// `WAKEUP_BYTES` are queued; discards it if `fill` fails (a failed read).
/// `T` must be plain integers, valid for any bytes.
#[inline(always)]
pub(crate) fn submit<T: 'static>(fill: impl FnOnce(&mut T) -> Result<(), i32>) -> Result<(), i32> {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count(counter::RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at the reserved record, valid and ours until
    // submitted or discarded; zeroing it first makes it a valid `T` (plain
    // integers, as the callers' records are) before a reference to it is made.
    let ev = unsafe {
        ev.write_bytes(0, 1);
        &mut *ev
    };
    if let Err(err) = fill(ev) {
        entry.discard(0);
        return Err(err);
    }
    let queued = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let wake = if queued >= global(&WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(wake as u64);
    Ok(())
}

/// One transition's event.
#[inline(always)]
pub(crate) fn fill_transition(
    ev: &mut Event,
    addresses: &impl Addresses,
    rec: &Record,
    now: u64,
    tracked: &Tracked,
    in_irq: bool,
) -> Result<(), i32> {
    let flag = |set: bool, flag: u8| if set { flag } else { 0 };
    ev.flags = flag(in_irq, FLAG_IRQ_CONTEXT)
        | flag(tracked.duration_known, FLAG_DURATION_KNOWN)
        | flag(tracked.owner.is_known(), FLAG_OWNER_KNOWN)
        | flag(tracked.active_open, FLAG_ACTIVE_OPEN);
    ev.ts_ns = now;
    ev.skaddr = rec.skaddr;
    ev.duration_ns = tracked.duration_ns;
    ev.pid = tracked.owner.pid;
    ev.sport = rec.sport;
    ev.dport = rec.dport;
    ev.family = rec.family;
    ev.old_state = rec.old_state;
    ev.new_state = rec.new_state;
    ev.comm = tracked.owner.comm;
    ev.cgroup_id = tracked.owner.cgroup_id;
    ev.owner_source = tracked.owner.source;
    addresses.addresses_into(rec.family == AF_INET, &mut ev.saddr, &mut ev.daddr)?;
    ev.netns = netns(rec.skaddr)?;
    close_fields(ev, rec)?;
    handshake_fields(ev, rec, now)
}

/// At a transition to CLOSE: the socket's byte counters, error and flags,
/// when the kernel's BTF gave their offsets.
#[inline(always)]
fn close_fields(ev: &mut Event, rec: &Record) -> Result<(), i32> {
    if rec.new_state != state::CLOSE || offset!(bytes_acked) == 0 {
        return Ok(());
    }
    let sk = rec.skaddr;
    // SAFETY: checked reads of plain integers; `sk` is the kernel's own
    // socket and the offsets come from its BTF, so they stay inside the
    // `tcp_sock`.
    unsafe {
        ev.bytes_acked = read_at(sk, offset!(bytes_acked))?;
        ev.bytes_received = read_at(sk, offset!(bytes_received))?;
        ev.sk_err = read_at::<i32>(sk, offset!(sk_err))? as u16;
        // Low byte of the unsigned long, on little-endian targets.
        ev.sock_flags = read_at(sk, offset!(sk_flags))?;
    }
    ev.flags |= FLAG_SOCK_FIELDS;
    Ok(())
}

/// Leaving SYN_SENT or SYN_RECV: the handshake's SYN (or SYN-ACK)
/// retransmissions and, at the server's SYN_RECV -> ESTABLISHED, its time.
#[inline(always)]
fn handshake_fields(ev: &mut Event, rec: &Record, now: u64) -> Result<(), i32> {
    let daddr = &ev.daddr;
    let facts = handshake_facts(rec, now, |raddr| {
        *raddr = *daddr;
        Ok(())
    })?;
    if let Some(retrans) = facts.retrans {
        ev.total_retrans = retrans;
        ev.flags |= FLAG_RETRANS;
    }
    if let Some(ns) = facts.server_ns {
        ev.handshake_ns = ns;
        ev.flags |= FLAG_HANDSHAKE;
    }
    Ok(())
}

/// What the kernel knows of a handshake as the socket leaves it.
pub(crate) struct HandshakeFacts {
    /// `tcp_sock.total_retrans`: SYN (or SYN-ACK) retransmissions.
    pub(crate) retrans: Option<u32>,
    /// The server's handshake time, from its first SYN-ACK to the final ACK.
    pub(crate) server_ns: Option<u64>,
}

/// Leaving SYN_SENT or SYN_RECV: the retransmissions; at the server's
/// SYN_RECV -> ESTABLISHED, its handshake time. `raddr` writes the peer's
/// address, needed only after SYN-ACK retransmissions (rare).
#[inline(always)]
pub(crate) fn handshake_facts(
    rec: &Record,
    now: u64,
    raddr: impl FnOnce(&mut [u8; 16]) -> Result<(), i32>,
) -> Result<HandshakeFacts, i32> {
    let mut facts = HandshakeFacts {
        retrans: None,
        server_ns: None,
    };
    let in_handshake = rec.old_state == state::SYN_SENT || rec.old_state == state::SYN_RECV;
    if !in_handshake || offset!(total_retrans) == 0 {
        return Ok(facts);
    }
    // SAFETY: as in `close_fields`: a checked read at a BTF offset.
    let retrans: u32 = unsafe { read_at(rec.skaddr, offset!(total_retrans))? };
    facts.retrans = Some(retrans);
    if rec.old_state != state::SYN_RECV || rec.new_state != state::ESTABLISHED {
        return Ok(facts);
    }
    if retrans == 0 {
        if offset!(srtt_us) == 0 {
            return Ok(facts);
        }
        // The kernel's first RTT sample: first SYN-ACK to final ACK.
        // SAFETY: as in `close_fields`: a checked read at a BTF offset.
        let srtt_us: u32 = unsafe { read_at(rec.skaddr, offset!(srtt_us))? };
        if srtt_us != 0 {
            facts.server_ns = Some(u64::from(srtt_us >> 3) * 1000);
        }
        return Ok(facts);
    }
    // SYN-ACKs were retransmitted: `tcp_retransmit_synack` kept the first.
    let mut key = HalfOpenKey {
        lport: rec.sport,
        rport: rec.dport,
        family: rec.family,
        _pad: 0,
        raddr: [0; 16],
    };
    raddr(&mut key.raddr)?;
    // SAFETY: the value is copied out at once; as in `start_tracking`, the
    // memory stays valid and a concurrent update makes it stale at worst.
    if let Some(first) = unsafe { FIRST_SYNACK.get(key) } {
        facts.server_ns = Some(now.saturating_sub(*first));
    }
    let _ = FIRST_SYNACK.remove(key);
    Ok(facts)
}

/// The socket's error (`sk_err`) at a transition to CLOSE, where the kernel's
/// BTF gave its offset.
#[inline(always)]
pub(crate) fn sock_error(sk: u64) -> Result<Option<u16>, i32> {
    if offset!(sk_err) == 0 {
        return Ok(None);
    }
    // SAFETY: as in `close_fields`: a checked read at a BTF offset.
    Ok(Some(unsafe { read_at::<i32>(sk, offset!(sk_err))? } as u16))
}

/// The inode number of socket `sk`'s network namespace; 0 where the kernel's
/// BTF did not say where to find it.
#[inline(always)]
pub(crate) fn netns(sk: u64) -> Result<u32, i32> {
    if offset!(net_inum) == 0 {
        return Ok(0);
    }
    // SAFETY: checked reads at BTF offsets: the socket's `struct net`
    // pointer, then the namespace's inode number inside it.
    unsafe {
        let net: u64 = read_at(sk, offset!(skc_net))?;
        read_at(net, offset!(net_inum))
    }
}
