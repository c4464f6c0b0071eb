//! What a streamed event carries beyond the record, and streaming it (or
//! aggregating it in place).

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::bpf_probe_read_kernel,
};
use tcp_trace_common::{
    counter, hist, state, Event, HalfOpenKey, SockOffsets, FLAG_ACTIVE_OPEN, FLAG_DURATION_KNOWN,
    FLAG_HANDSHAKE, FLAG_IRQ_CONTEXT, FLAG_OWNER_KNOWN, FLAG_RETRANS, FLAG_SOCK_FIELDS,
};

use crate::{
    count, global, record::Record, sockets::Tracked, EVENTS, FIRST_SYNACK, HISTOGRAMS, MAX_NS,
    WAKEUP_BYTES,
};

/// `tcp_sock`/`sock` fields read at a transition to CLOSE.
pub(crate) struct CloseFields {
    pub(crate) bytes_acked: u64,
    pub(crate) bytes_received: u64,
    pub(crate) sk_err: u16,
    pub(crate) sock_flags: u8,
}

/// What only a streamed event carries; `None` where not read.
pub(crate) struct Details {
    pub(crate) close: Option<CloseFields>,
    pub(crate) total_retrans: Option<u32>,
    pub(crate) handshake_ns: Option<u64>,
    pub(crate) saddr: [u8; 16],
    pub(crate) daddr: [u8; 16],
}

/// At a transition to CLOSE: the socket's byte counters, error and flags,
/// when the kernel's BTF gave their offsets.
#[inline(always)]
pub(crate) fn close_fields(
    rec: &Record,
    offsets: &SockOffsets,
) -> Result<Option<CloseFields>, i32> {
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
pub(crate) fn handshake_retrans(rec: &Record, offsets: &SockOffsets) -> Result<Option<u32>, i32> {
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
pub(crate) fn server_handshake(
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
pub(crate) fn emit(rec: &Record, now: u64, tracked: &Tracked, in_irq: bool, details: &Details) {
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
pub(crate) fn event(
    rec: &Record,
    now: u64,
    tracked: &Tracked,
    in_irq: bool,
    details: &Details,
) -> Event {
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
pub(crate) fn aggregate(old_state: u8, duration_ns: u64) {
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
