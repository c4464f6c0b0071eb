//! Aggregating mode: what the kernel sums instead of streaming each event.

use aya_ebpf::maps::PerCpuArray;
use tcp_trace_common::{
    close_kind, counter, handshake_outcome, hist, outcome, side, state, tally, AF_INET,
};

use crate::{
    count,
    emit::{handshake_facts, sock_error},
    global,
    record::{Addresses, Record},
    sockets::Tracked,
    HANDSHAKES, HISTOGRAMS, MAX_NS, TALLIES, TALLY,
};

/// Sums one transition: the time spent in the old one and, with `TALLY`, the
/// pair of states and, at a handshake's end or a close, how it ended.
#[inline(always)]
pub(crate) fn aggregate(
    addresses: &impl Addresses,
    rec: &Record,
    now: u64,
    tracked: &Tracked,
) -> Result<(), i32> {
    count(counter::AGGREGATED);
    if tracked.duration_known {
        time_in_state(rec.old_state, tracked.duration_ns);
    }
    if global(&TALLY) == 0 {
        return Ok(());
    }
    let pair = u32::from(rec.old_state & 15) * 16 + u32::from(rec.new_state & 15);
    add(&TALLIES, tally::TRANSITIONS + pair, 1);
    let error = if rec.new_state == state::CLOSE {
        let error = sock_error(rec.skaddr)?;
        if let Some(kind) = close_kind(rec.old_state, error) {
            add(&TALLIES, tally::CLOSES + kind, 1);
        }
        error
    } else {
        None
    };
    handshake(addresses, rec, now, tracked, error)
}

/// Leaving SYN_SENT (client) or SYN_RECV (server): the handshake's time by
/// side and outcome, and its retransmissions.
#[inline(always)]
fn handshake(
    addresses: &impl Addresses,
    rec: &Record,
    now: u64,
    tracked: &Tracked,
    error: Option<u16>,
) -> Result<(), i32> {
    let side = match rec.old_state {
        state::SYN_SENT => side::CLIENT,
        state::SYN_RECV => side::SERVER,
        _ => return Ok(()),
    };
    let facts = handshake_facts(rec, now, |raddr| {
        addresses.address_into(rec.family == AF_INET, true, raddr)
    })?;
    if let Some(retrans) = facts.retrans {
        add(
            &TALLIES,
            tally::HANDSHAKE_RETRANS + side,
            u64::from(retrans),
        );
    }
    // The client's time is its stay in SYN_SENT; the server's comes from
    // its first SYN-ACK (its SYN_RECV child lives only from the final ACK).
    let duration = if side == side::CLIENT {
        tracked.duration_known.then_some(tracked.duration_ns)
    } else {
        facts.server_ns
    };
    if let Some(ns) = duration {
        let histogram = side * outcome::COUNT + handshake_outcome(rec.new_state, error);
        add(&HANDSHAKES, histogram * hist::BUCKETS + hist::bucket(ns), 1);
    }
    Ok(())
}

/// The time spent in `old_state`, into its histogram and maximum.
#[inline(always)]
fn time_in_state(old_state: u8, duration_ns: u64) {
    let index = u32::from(old_state) * hist::BUCKETS + hist::bucket(duration_ns);
    add(&HISTOGRAMS, index, 1);
    if let Some(max) = MAX_NS.get_ptr_mut(u32::from(old_state)) {
        // SAFETY: as in `count`: a per-CPU value, valid for this run, ours alone.
        let max = unsafe { &mut *max };
        if duration_ns > *max {
            *max = duration_ns;
        }
    }
}

/// Adds `n` to slot `index` of a per-CPU array (nothing when out of range:
/// userspace sizes the arrays to 1 when it does not aggregate).
#[inline(always)]
fn add(array: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(slot) = array.get_ptr_mut(index) {
        // SAFETY: as in `count`: a per-CPU value, valid for this run, ours alone.
        unsafe { *slot += n };
    }
}
