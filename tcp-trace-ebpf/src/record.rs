//! Reading the tracepoint's record, and telling task context from interrupts.

use aya_ebpf::{helpers::bpf_probe_read_kernel_buf, programs::TracePointContext, EbpfContext as _};
use tcp_trace_common::{state, TracepointLayout, KNOWN_LAYOUT};

use crate::{field, TASK_REGS};

/// Transitions that only a syscall makes (listen, connect, close, shutdown),
/// hence always in the owner's process context.
#[inline(always)]
pub(crate) fn syscall_only(old_state: u8, new_state: u8) -> bool {
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
pub(crate) fn in_task_context(
    ctx: &TracePointContext,
    old_state: u8,
    new_state: u8,
) -> Result<bool, i32> {
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
pub(crate) struct Record {
    pub(crate) skaddr: u64,
    pub(crate) old_state: u8,
    pub(crate) new_state: u8,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) family: u16,
    pub(crate) protocol: u16,
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
pub(crate) unsafe fn load<T>(base: *const u8, offset: u32) -> T {
    // SAFETY: the caller's contract (see above).
    unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) }
}

#[inline(always)]
pub(crate) fn read_record(
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

/// Where a transition's addresses are read from: the classic tracepoint's
/// record, or (BTF-typed program) the socket itself. IPv4 fills only the
/// first 4 bytes of each buffer.
pub(crate) trait Addresses {
    /// The destination (peer's) address when `destination`, else the
    /// source, into a buffer the caller has (the ring buffer's record, or
    /// map memory: the stack has no room).
    fn address_into(&self, ipv4: bool, destination: bool, out: &mut [u8; 16]) -> Result<(), i32>;

    #[inline(always)]
    fn addresses_into(
        &self,
        ipv4: bool,
        saddr: &mut [u8; 16],
        daddr: &mut [u8; 16],
    ) -> Result<(), i32> {
        self.address_into(ipv4, false, saddr)?;
        self.address_into(ipv4, true, daddr)
    }
}

/// The classic tracepoint's record.
pub(crate) struct RecordAddresses<'a> {
    pub(crate) ctx: &'a TracePointContext,
    /// Read at `KNOWN_LAYOUT`'s offsets with direct loads.
    pub(crate) direct: bool,
    pub(crate) layout: &'a TracepointLayout,
}

impl Addresses for RecordAddresses<'_> {
    #[inline(always)]
    fn address_into(&self, ipv4: bool, destination: bool, out: &mut [u8; 16]) -> Result<(), i32> {
        let base = self.ctx.as_ptr() as *const u8;
        if self.direct {
            let l = KNOWN_LAYOUT;
            let (v4, v6) = if destination {
                (l.daddr, l.daddr_v6)
            } else {
                (l.saddr, l.saddr_v6)
            };
            // SAFETY: as in `read_record`: `KNOWN_LAYOUT`'s constant, aligned
            // offsets inside the record, checked by the verifier.
            unsafe {
                if ipv4 {
                    out[..4].copy_from_slice(&load::<u32>(base, v4).to_ne_bytes());
                } else {
                    out[..8].copy_from_slice(&load::<u64>(base, v6).to_ne_bytes());
                    out[8..].copy_from_slice(&load::<u64>(base, v6 + 8).to_ne_bytes());
                }
            }
            return Ok(());
        }
        let (v4, v6) = if destination {
            (self.layout.daddr, self.layout.daddr_v6)
        } else {
            (self.layout.saddr, self.layout.saddr_v6)
        };
        // SAFETY: bpf_probe_read_kernel_buf checks the source and fails
        // instead of faulting, and writes only within the slice it is given;
        // the offsets come from the tracepoint's format file.
        unsafe {
            if ipv4 {
                bpf_probe_read_kernel_buf(base.add(v4 as usize), &mut out[..4])?;
            } else {
                bpf_probe_read_kernel_buf(base.add(v6 as usize), out)?;
            }
        }
        Ok(())
    }
}
