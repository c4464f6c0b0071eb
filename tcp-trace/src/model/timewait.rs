//! A timewait socket's entry, move to TIME_WAIT proper, or death, as the
//! precise path's kprobes stream it (`TimewaitRecord`).

use std::net::IpAddr;

use anyhow::{bail, Result};
use tcp_trace_common::{state, tw_kind, TimewaitRecord, TIMEWAIT_RECORD_SIZE};

use super::transition::addresses;

/// What happened to the timewait socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimewaitChange {
    /// Hashed in place of the closing socket.
    Entry,
    /// Its timer re-armed in TIME_WAIT proper: the peer's FIN came.
    Rearmed,
    /// Gone: timer, reuse by a SYN or `connect()`, or its namespace's end.
    Exit,
}

/// One record from the timewait kprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitEvent {
    pub ts_ns: u64,
    /// Kernel address of the timewait socket.
    pub tw: u64,
    pub netns: u32,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub change: TimewaitChange,
    /// In TIME_WAIT proper (not the FIN_WAIT2 substate) at that moment.
    pub time_wait: bool,
}

/// Whether a ring-buffer record is a `TimewaitRecord` (told by its size).
pub fn is_timewait(bytes: &[u8]) -> bool {
    bytes.len() == TIMEWAIT_RECORD_SIZE
}

pub fn decode_timewait(bytes: &[u8]) -> Result<TimewaitEvent> {
    if bytes.len() != TIMEWAIT_RECORD_SIZE {
        bail!(
            "record of {} bytes, expected {TIMEWAIT_RECORD_SIZE}",
            bytes.len()
        );
    }
    // SAFETY: the length matches and `TimewaitRecord` is plain old data
    // valid for any bit pattern; read_unaligned copes with any alignment.
    let r: TimewaitRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let (laddr, raddr) = addresses(r.family, &r.saddr, &r.daddr)?;
    let change = match r.kind {
        tw_kind::ENTRY => TimewaitChange::Entry,
        tw_kind::REARMED => TimewaitChange::Rearmed,
        tw_kind::EXIT => TimewaitChange::Exit,
        other => bail!("unknown timewait record kind {other}"),
    };
    Ok(TimewaitEvent {
        ts_ns: r.ts_ns,
        tw: r.tw,
        netns: r.netns,
        laddr,
        lport: r.lport,
        raddr,
        rport: r.rport,
        change,
        time_wait: r.substate == state::TIME_WAIT,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tcp_trace_common::AF_INET;

    use super::*;

    #[test]
    fn a_record_decodes() {
        let mut r = TimewaitRecord {
            ts_ns: 5,
            tw: 0xffff_8880_0000_1000,
            netns: 4026531840,
            family: AF_INET,
            lport: 8000,
            rport: 40000,
            kind: tw_kind::EXIT,
            substate: state::TIME_WAIT,
            ..Default::default()
        };
        r.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        r.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        // SAFETY: plain old data, read as the bytes it is.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const TimewaitRecord).cast::<u8>(),
                TIMEWAIT_RECORD_SIZE,
            )
        };
        assert!(is_timewait(bytes));
        let e = decode_timewait(bytes).unwrap();
        assert_eq!(e.change, TimewaitChange::Exit);
        assert!(e.time_wait);
        assert_eq!(e.raddr, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        r.kind = 9;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const TimewaitRecord).cast::<u8>(),
                TIMEWAIT_RECORD_SIZE,
            )
        };
        assert!(decode_timewait(bytes).is_err());
    }
}
