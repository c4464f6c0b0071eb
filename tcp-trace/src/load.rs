//! Loading the kernel program with the user's settings and attaching it.

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use caps::{CapSet, Capability};
use tcp_trace_common::{counter, Filter};

use crate::{calibrate, tracepoint};

/// Size of the event ring buffer in bytes (a power of two, as the kernel requires).
pub const RING_BYTES: u32 = 8 << 20;

/// The kernel program, built by build.rs through aya-build.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp-trace"));

/// What a tracing command asks of the kernel program.
pub struct Settings {
    pub filter: Filter,
    pub max_sockets: u32,
}

/// The attached program; dropping it detaches the program.
pub struct Tracer {
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
}

/// Counters kept by the kernel program, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub ringbuf_full: u64,
    pub untracked: u64,
    pub map_update_failed: u64,
}

impl Tracer {
    /// Loads and attaches the program; returns it with its event ring buffer.
    pub fn attach(settings: &Settings) -> Result<(Self, RingBuf<MapData>)> {
        if PROGRAM.is_empty() {
            bail!("this binary was built with AYA_BUILD_SKIP=1 and holds no BPF program");
        }
        check_privileges()?;
        raise_memlock_limit();
        let tracefs = tracepoint::tracefs_root()?;
        let layout = tracepoint::read_layout(&tracefs)?;

        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &layout, true)
            .override_global("FILTER", &settings.filter, true)
            // Wake the reader when an eighth of the ring is queued; it drains on
            // a timer otherwise (see watch.rs).
            .override_global("WAKEUP_BYTES", &u64::from(RING_BYTES / 8), true)
            .map_max_entries("SOCKETS", settings.max_sockets)
            .map_max_entries("EVENTS", RING_BYTES)
            .load(PROGRAM)
            .context("loading the BPF program into the kernel")?;

        let program: &mut TracePoint = ebpf
            .program_mut("inet_sock_set_state")
            .context("the BPF object has no program inet_sock_set_state")?
            .try_into()
            .context("inet_sock_set_state is not a tracepoint program")?;
        program
            .load()
            .context("the kernel's verifier rejected the program")?;
        program
            .attach(tracepoint::CATEGORY, tracepoint::NAME)
            .with_context(|| {
                format!(
                    "attaching to the tracepoint {}:{}",
                    tracepoint::CATEGORY,
                    tracepoint::NAME
                )
            })?;

        let mut events = RingBuf::try_from(ebpf.take_map("EVENTS").context("no EVENTS map")?)
            .context("EVENTS is not a ring buffer")?;
        let primed = calibrate::prime_all_cpus()?;
        if primed == 0 {
            eprintln!(
                "tcp-trace: warning: could not run on any CPU to calibrate; owners are \
                 updated only by listen, connect, close and shutdown"
            );
        }
        // The calibration's own sockets (and anything else before this point)
        // precede the start of tracing: discard them.
        while events.next().is_some() {}
        let counters = PerCpuArray::try_from(ebpf.take_map("COUNTERS").context("no COUNTERS map")?)
            .context("COUNTERS is not a per-CPU array")?;
        Ok((
            Self {
                _ebpf: ebpf,
                counters,
            },
            events,
        ))
    }

    pub fn counters(&self) -> Result<KernelCounters> {
        let sum = |index: u32| -> Result<u64> {
            let values = self
                .counters
                .get(&index, 0)
                .context("reading the kernel's counters")?;
            Ok(values.iter().sum())
        };
        Ok(KernelCounters {
            ringbuf_full: sum(counter::RINGBUF_FULL)?,
            untracked: sum(counter::UNTRACKED)?,
            map_update_failed: sum(counter::MAP_UPDATE_FAILED)?,
        })
    }
}

/// Fails with a message naming the missing capabilities, before the kernel
/// answers with a bare EPERM.
fn check_privileges() -> Result<()> {
    let effective = caps::read(None, CapSet::Effective).context("reading our capabilities")?;
    if effective.contains(&Capability::CAP_SYS_ADMIN) {
        return Ok(());
    }
    let missing: Vec<String> = [Capability::CAP_BPF, Capability::CAP_PERFMON]
        .into_iter()
        .filter(|c| !effective.contains(c))
        .map(|c| c.to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "tcp-trace needs root, or the capabilities CAP_BPF and CAP_PERFMON \
             (CAP_SYS_ADMIN before Linux 5.8); missing: {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones charge
/// the memory cgroup, where raising the limit is unnecessary (and may be
/// refused without CAP_SYS_RESOURCE), so a failure here is not an error.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct is passed by reference.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
