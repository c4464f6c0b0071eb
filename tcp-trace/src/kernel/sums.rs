//! What the kernel program sums when it aggregates, read back whole: every
//! per-CPU array in one `bpf()` call (a scrape reads some 40,000 slots, which
//! one lookup each would take tens of milliseconds to read).

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{bail, Context as _, Result};
use aya::maps::{IterableMap as _, MapData, PerCpuArray};
use tcp_trace_common::{close_kind, hist, outcome, side, tally};

use crate::{
    aggregate::{Histogram, StateHistograms},
    model::TcpState,
};

/// The kernel's sums, added over CPUs.
#[derive(Clone, Debug, Default)]
pub struct KernelSums {
    /// Time spent in each state.
    pub states: StateHistograms,
    /// Transitions by (old, new) state, those that happened.
    pub transitions: Vec<((TcpState, TcpState), u64)>,
    /// Handshake times by `side` and `outcome` (`[side][outcome]`).
    pub handshakes: Vec<Vec<Histogram>>,
    /// SYN (client) and SYN-ACK (server) retransmissions, by `side`.
    pub handshake_retrans: [u64; side::COUNT as usize],
    /// Closed connections by `close_kind`.
    pub closes: [u64; close_kind::COUNT as usize],
}

/// The aggregating program's maps.
pub struct SumMaps {
    pub(super) buckets: PerCpuArray<MapData, u64>,
    pub(super) maxima: PerCpuArray<MapData, u64>,
    pub(super) handshakes: PerCpuArray<MapData, u64>,
    pub(super) tallies: PerCpuArray<MapData, u64>,
}

impl SumMaps {
    pub fn read(&self) -> Result<KernelSums> {
        let buckets = per_cpu_sums(&self.buckets).context("reading HISTOGRAMS")?;
        let maxima = per_cpu_maxima(&self.maxima).context("reading MAX_NS")?;
        let handshakes = per_cpu_sums(&self.handshakes).context("reading HANDSHAKES")?;
        let tallies = per_cpu_sums(&self.tallies).context("reading TALLIES")?;
        // Without tallies (`stats`) their arrays hold one slot: read as zeros.
        let tally = |i: u32| tallies.get(i as usize).copied().unwrap_or(0);
        let mut sums = KernelSums::default();
        for state in 1..hist::STATES {
            let h = histogram(&buckets, state as usize);
            if h.count() > 0 {
                let max = maxima.get(state as usize).copied().unwrap_or(0);
                sums.states
                    .state_mut(TcpState(state as u8))
                    .merge(&with_max(h, max));
            }
        }
        for old in 0..16u8 {
            for new in 0..16u8 {
                let n = tally(tally::TRANSITIONS + u32::from(old) * 16 + u32::from(new));
                if n > 0 {
                    sums.transitions.push(((TcpState(old), TcpState(new)), n));
                }
            }
        }
        sums.handshakes = (0..side::COUNT)
            .map(|s| {
                (0..outcome::COUNT)
                    .map(|o| histogram(&handshakes, (s * outcome::COUNT + o) as usize))
                    .collect()
            })
            .collect();
        for (i, slot) in sums.handshake_retrans.iter_mut().enumerate() {
            *slot = tally(tally::HANDSHAKE_RETRANS + i as u32);
        }
        for (i, slot) in sums.closes.iter_mut().enumerate() {
            *slot = tally(tally::CLOSES + i as u32);
        }
        Ok(sums)
    }
}

/// Histogram `index` of an array of `hist::BUCKETS`-slot histograms.
fn histogram(slots: &[u64], index: usize) -> Histogram {
    let mut h = Histogram::default();
    let start = index * hist::BUCKETS as usize;
    let Some(buckets) = slots.get(start..start + hist::BUCKETS as usize) else {
        return h;
    };
    for (b, &n) in buckets.iter().enumerate() {
        if n > 0 {
            h.add_bucket(b as u32, n);
        }
    }
    h
}

fn with_max(mut h: Histogram, max: u64) -> Histogram {
    h.observe_max(max);
    h
}

/// Every slot of a per-CPU array, added over CPUs.
pub fn per_cpu_sums(array: &PerCpuArray<MapData, u64>) -> Result<Vec<u64>> {
    let (cpus, values) = per_cpu_values(array)?;
    Ok(values.chunks(cpus).map(|slot| slot.iter().sum()).collect())
}

/// Every slot of a per-CPU array, its largest value over CPUs.
fn per_cpu_maxima(array: &PerCpuArray<MapData, u64>) -> Result<Vec<u64>> {
    let (cpus, values) = per_cpu_values(array)?;
    Ok(values
        .chunks(cpus)
        .map(|slot| slot.iter().copied().max().unwrap_or(0))
        .collect())
}

/// `bpf_attr` for the `BPF_MAP_*_BATCH` commands (uapi linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The number of CPUs, and every slot's per-CPU values one slot after
/// another, by `BPF_MAP_LOOKUP_BATCH` (Linux 5.6+).
fn per_cpu_values(array: &PerCpuArray<MapData, u64>) -> Result<(usize, Vec<u64>)> {
    let len = array.len() as usize;
    let cpus = aya::util::nr_cpus().map_err(|(what, err)| anyhow::anyhow!("{what}: {err}"))?;
    let mut keys = vec![0u32; len];
    let mut values = vec![0u64; len * cpus];
    let fd = array.map().fd().as_fd().as_raw_fd();
    let mut done = 0usize;
    let mut next_batch = 0u32;
    while done < len {
        let resume = next_batch;
        let mut attr = BatchAttr {
            in_batch: if done == 0 {
                0
            } else {
                &resume as *const u32 as u64
            },
            out_batch: &mut next_batch as *mut u32 as u64,
            keys: keys[done..].as_mut_ptr() as u64,
            values: values[done * cpus..].as_mut_ptr() as u64,
            count: (len - done) as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid bpf_attr for BPF_MAP_LOOKUP_BATCH: the
        // kernel writes at most `count` keys (4 bytes each) and `count`
        // values (`cpus` u64s each, a per-CPU array's layout) into buffers
        // that hold that much from the offsets given, and one key into
        // `next_batch`; all of them outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        // ENOENT: the last slot was reached (with `count` slots read).
        if rc != 0 && err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err).context("BPF_MAP_LOOKUP_BATCH (Linux 5.6+)");
        }
        if attr.count == 0 {
            bail!("BPF_MAP_LOOKUP_BATCH read nothing at slot {done} of {len}");
        }
        done += attr.count as usize;
        if rc != 0 {
            break;
        }
    }
    if done != len {
        bail!("BPF_MAP_LOOKUP_BATCH read {done} of {len} slots");
    }
    // An array's slots come back in order.
    if keys.iter().enumerate().any(|(i, &key)| key as usize != i) {
        bail!("BPF_MAP_LOOKUP_BATCH returned an array's slots out of order");
    }
    Ok((cpus, values))
}
