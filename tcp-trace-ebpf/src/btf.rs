//! The BTF-typed program (`tp_btf`) on `inet_sock_set_state`, attached with
//! `--socket-storage`: the kernel hands it the `struct sock` itself, so
//! per-socket state lives in socket-local storage, allocated at the socket's
//! first transition and freed with the socket: nothing preallocated, nothing
//! evicted, no hashing.
//!
//! It loads what the classic record carries from the socket, at offsets from
//! the kernel's BTF (`SK_FIELDS`), and learns task context from the classic
//! `task_context` program run just before it. Everything after that is the
//! classic program's code.

use core::ptr;

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    cty::c_void,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tcp_trace_common::{counter, Owner, SockState, IPPROTO_TCP};

use crate::{
    count,
    emit::read_at,
    follow, global,
    record::{syscall_only, Addresses, Record},
    sockets::Store,
    ACCEPTS, ACCEPT_OFFSETS, CONTEXT, FILTER, SK_FIELDS,
};

/// A `SK_FIELDS` offset (one at a time: the stack is tight).
macro_rules! field {
    ($name:ident) => {
        global(&SK_FIELDS.$name) as usize
    };
}

/// `BPF_SK_STORAGE_GET_F_CREATE` (uapi bpf.h).
const F_CREATE: u64 = 1;

/// A BTF-defined socket-storage map, in the shape loaders parse from `.maps`
/// (aya-ebpf's own takes only a `sock_addr` context).
#[repr(C)]
pub(crate) struct SockStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    // Socket storage has no size: it follows the sockets.
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are null placeholders that only describe the map to the
// loader (through BTF); nothing reads or writes through them.
unsafe impl<T> Sync for SockStorage<T> {}

impl<T> SockStorage<T> {
    pub(crate) const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    /// The socket's value; with `init`, created from it when missing.
    #[inline(always)]
    fn get(&self, sk: u64, init: Option<&T>) -> Option<*mut T> {
        let (init, flags) = match init {
            Some(value) => (ptr::from_ref(value).cast_mut().cast(), F_CREATE),
            None => (ptr::null_mut(), 0),
        };
        let map = ptr::from_ref(self).cast_mut().cast::<c_void>();
        // SAFETY: `map` is this map (the loader patches the reference), `sk`
        // is the `struct sock` the tracepoint handed over, and `init` is null
        // or a valid `T`, which the helper copies.
        let value = unsafe { bpf_sk_storage_get(map, sk as *mut c_void, init, flags) };
        (!value.is_null()).then_some(value.cast())
    }
}

/// Per socket: the state the program keeps.
#[link_section = ".maps"]
#[no_mangle]
static SOCK_STATES: SockStorage<SockState> = SockStorage::new();

/// The socket-storage path's store.
struct SocketStorage(u64);

impl Store for SocketStorage {
    #[inline(always)]
    fn find(&self) -> Option<*mut SockState> {
        SOCK_STATES.get(self.0, None)
    }

    #[inline(always)]
    fn insert(&self, sock: &SockState) -> bool {
        match SOCK_STATES.get(self.0, Some(sock)) {
            Some(stored) => {
                // SAFETY: as in `track_socket`: storage of the live socket,
                // plain data. Overwritten: an existing value (a closed
                // socket's, kept until it is freed) is not replaced by
                // the helper.
                unsafe { *stored = *sock };
                true
            }
            None => false,
        }
    }

    /// The state stays with the socket until the kernel frees it.
    #[inline(always)]
    fn closed(&self) {}

    #[inline(always)]
    fn await_accept(&self, sock: &mut SockState, now: u64) {
        if global(&ACCEPT_OFFSETS.task_files) == 0 {
            return;
        }
        let accepted = Accepted {
            established_ns: now,
            owner: Owner::default(),
        };
        // NOEXIST: `accept()` may have returned it already (another CPU).
        let _ = ACCEPTS.insert(self.0, accepted, u64::from(BPF_NOEXIST));
        sock.awaiting_accept = 1;
    }

    #[inline(always)]
    fn take_accepted(&self, sock: &mut SockState, in_irq: bool, closing: bool) {
        let mut done = !in_irq || closing;
        if in_irq {
            // SAFETY: the owner is copied out at once; as in
            // `listener_owner`, the memory stays valid for this run.
            if let Some(accepted) = unsafe { ACCEPTS.get(self.0) } {
                if accepted.owner.is_known() {
                    sock.owner = accepted.owner;
                    done = true;
                }
            }
        }
        if done {
            let _ = ACCEPTS.remove(self.0);
            sock.awaiting_accept = 0;
        }
    }
}

/// What `accept()` leaves for a socket whose state the program keeps in
/// socket storage, which the `accept()` handler (a classic tracepoint
/// program) cannot reach; and when the socket became ESTABLISHED, for the
/// accept-queue wait.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Accepted {
    pub(crate) established_ns: u64,
    pub(crate) owner: Owner,
}

/// `accept()` returned socket `sk` to `owner` (socket-storage path): how
/// long it waited in the accept queue, if known, and its state now.
#[inline(always)]
pub(crate) fn accept(sk: u64, owner: Owner, now: u64) -> Result<(Option<u64>, u8), i32> {
    let wait = match ACCEPTS.get_ptr_mut(sk) {
        Some(accepted) => {
            // SAFETY: as in `track_socket`: preallocated map memory holding
            // plain data, valid for this run.
            let accepted = unsafe { &mut *accepted };
            accepted.owner = owner;
            (accepted.established_ns != 0).then(|| now.saturating_sub(accepted.established_ns))
        }
        None => {
            // Its handshake was not seen: its first transition takes the owner.
            let accepted = Accepted {
                established_ns: 0,
                owner,
            };
            let _ = ACCEPTS.insert(sk, accepted, 0);
            None
        }
    };
    // SAFETY: a checked read of a plain integer at a BTF offset (this runs
    // in the classic `accept()` handler, where `sk` is a plain number).
    let state: u8 = unsafe { read_at(sk, field!(state))? };
    Ok((wait, state))
}

/// The owner `accept()` named for a socket the program first meets now.
#[inline(always)]
fn accepted_owner(sk: u64) -> Option<Owner> {
    // SAFETY: the owner is copied out at once (see `take_accepted`).
    let owner = unsafe { ACCEPTS.get(sk) }.map(|accepted| accepted.owner)?;
    let _ = ACCEPTS.remove(sk);
    owner.is_known().then_some(owner)
}

/// A direct load of a `T` at `offset` bytes into the TCP socket `tp`, a
/// BTF-typed pointer from `bpf_skc_to_tcp_sock`: the verifier checks the
/// load against the kernel's `struct tcp_sock` and the JIT guards it like a
/// probe read, for the cost of a plain load instead of a helper call.
///
/// # Safety
///
/// `T` must be a plain integer and `offset` a `struct tcp_sock` field (or
/// one of the structs it starts with) of its size: userspace takes them
/// from the kernel's BTF, and the verifier refuses the program otherwise.
#[inline(always)]
unsafe fn load<T>(sk: u64, offset: usize) -> T {
    // SAFETY: the caller's contract (see above).
    unsafe { ptr::read_volatile((sk as *const u8).wrapping_add(offset).cast::<T>()) }
}

/// Addresses read from the TCP socket, as the tracepoint reads them.
struct SockAddresses(u64);

impl Addresses for SockAddresses {
    #[inline(always)]
    fn address_into(&self, ipv4: bool, destination: bool, out: &mut [u8; 16]) -> Result<(), i32> {
        // SAFETY: loads of the socket's address fields at their BTF
        // offsets: a `__be32`, or an `in6_addr` read as its four `__be32`
        // words.
        unsafe {
            if ipv4 {
                let offset = if destination {
                    field!(daddr)
                } else {
                    field!(saddr)
                };
                out[..4].copy_from_slice(&load::<u32>(self.0, offset).to_ne_bytes());
            } else {
                let offset = if destination {
                    field!(daddr_v6)
                } else {
                    field!(saddr_v6)
                };
                for (i, word) in out.chunks_exact_mut(4).enumerate() {
                    word.copy_from_slice(&load::<u32>(self.0, offset + 4 * i).to_ne_bytes());
                }
            }
        }
        Ok(())
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    if try_trace_btf(&ctx).is_err() {
        count(counter::READ_FAILED);
    }
    0
}

/// The benchmark's floor for this path: an empty BTF program on the same
/// tracepoint.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bench_floor_btf(_ctx: BtfTracePointContext) -> u32 {
    0
}

fn try_trace_btf(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let sk: u64 = ctx.arg(0);
    // TCP only: SCTP and MPTCP's own socket use the same tracepoint. The
    // helper returns the socket typed as a `tcp_sock` (null for others),
    // which the loads below need.
    // SAFETY: `sk` is the socket the tracepoint handed over; the helper
    // only checks its protocol and kind.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as u64;
    if tp == 0 {
        return Ok(());
    }
    // SAFETY: loads of `u16` fields of the socket at their BTF offsets.
    let family = unsafe { load::<u16>(tp, field!(family)) };
    if !global(&FILTER).matches_family(family) {
        return Ok(());
    }
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    // SAFETY: as above.
    let (sport, dport) = unsafe {
        (
            load::<u16>(tp, field!(sport)),
            load::<u16>(tp, field!(dport)),
        )
    };
    let rec = Record {
        skaddr: sk,
        old_state: old_state as u8,
        new_state: new_state as u8,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        family,
        protocol: IPPROTO_TCP,
    };
    // SAFETY: a helper without arguments that only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let in_irq = !in_task_context(&rec);
    let addresses = SockAddresses(tp);
    follow(&rec, now, in_irq, &addresses, &SocketStorage(sk), || {
        accepted_owner(sk).or_else(|| crate::owners::seeded_owner(&addresses, &rec))
    })
}

/// What `task_context` found for the transition it ran on last, per CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Context {
    pub(crate) skaddr: u64,
    pub(crate) old_state: u8,
    pub(crate) new_state: u8,
    pub(crate) in_task: u8,
    pub(crate) _pad: [u8; 5],
}

/// Whether the transition runs for a process (a syscall, or a socket's
/// backlog processed at `release_sock`) rather than in softirq, as the
/// classic `task_context` program, run just before on this CPU, found it.
/// When it did not run for this transition (the kernel skipped it: its
/// guard is shared with every classic tracing program), only transitions
/// that syscalls alone make count as a process's.
#[inline(always)]
fn in_task_context(rec: &Record) -> bool {
    let found = CONTEXT.get_ptr(0).and_then(|context| {
        // SAFETY: a per-CPU value, valid for this run, written only by
        // `task_context` runs on this CPU, which do not run during ours.
        let context = unsafe { *context };
        (context.skaddr == rec.skaddr
            && context.old_state == rec.old_state
            && context.new_state == rec.new_state)
            .then_some(context.in_task != 0)
    });
    found.unwrap_or_else(|| syscall_only(rec.old_state, rec.new_state))
}
