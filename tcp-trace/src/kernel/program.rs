//! Loading the kernel program with the user's settings, attaching it, and
//! reading its counters and histograms back.

use std::{
    fmt,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{self, KProbe, ProgramError, TracePoint},
    Ebpf, EbpfLoader,
};
use tcp_trace_common::{
    counter, hist, outcome, side, tally, Filter, SockOffsets, TracepointLayout, KNOWN_LAYOUT,
};

use super::{
    btf::Btf,
    calibrate,
    owners::{self, ExitedOwners},
    privileges::{check_privileges, drop_privileges, perf_event_refusal, raise_memlock_limit},
    probe::Probe,
    storage::{self, Mechanism},
    sums::{per_cpu_sums, KernelSums, SumMaps},
    timewait::{self, TimewaitMethod},
    tracefs,
};
use crate::system::{cgroup::CgroupFs, owners::scan};

/// Default size of the event ring buffer in bytes (a power of two, as the
/// kernel requires).
pub const RING_BYTES: u32 = 4 << 20;

/// The kernel program, built by build.rs through aya-build.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp-trace"));

/// What a tracing command asks of the kernel program.
pub struct Settings {
    pub filter: Filter,
    /// `--cgroup`: only owners in this cgroup v2 subtree.
    pub cgroup: Option<String>,
    pub max_sockets: u32,
    /// `--socket-storage`: per-socket state in socket-local storage, where
    /// the kernel allows it.
    pub socket_storage: bool,
    /// Size of the event ring buffer (a power of two, at least a page).
    pub ring_bytes: u32,
    /// Sum durations, transitions, handshakes and closes in the kernel, and
    /// stream only `stream_mask`'s transitions.
    pub aggregate: bool,
    /// With `aggregate`: transitions streamed as well, bit `old` for those
    /// from state `old`, bit `16 + new` for those into `new` (0: none).
    pub stream_mask: u32,
    /// With `aggregate`: also sum transitions, handshakes and closes.
    pub tally: bool,
    /// Commands that follow TIME_WAIT: the period of their sock_diag
    /// readings, used where the kernel does not offer the precise path.
    pub timewait: Option<Duration>,
}

/// The attached program; dropping it detaches the program.
pub struct Program {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    sums: Option<SumMaps>,
    /// Runs of the main program the kernel had skipped when tracing began.
    skipped_before_start: u64,
    exited_owners: ExitedOwners,
    mechanism: Mechanism,
    /// How TIME_WAIT is followed, for commands that follow it.
    timewait: Option<TimewaitMethod>,
}

/// How the program traces, for the line that says tracing has begun.
pub struct Tracing {
    mechanism: Mechanism,
    timewait: Option<TimewaitMethod>,
}

impl fmt::Display for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mechanism)?;
        match self.timewait {
            Some(method) => write!(f, "; {method}"),
            None => Ok(()),
        }
    }
}

/// The program that sees every transition: each run the kernel skips is a
/// transition lost.
const MAIN_PROGRAM: &str = "inet_sock_set_state";
/// The programs that stream events (one of the first two is loaded): a
/// skipped run of any is an event lost.
const STREAMING_PROGRAMS: [&str; 6] = [
    MAIN_PROGRAM,
    storage::BTF_PROGRAM,
    "accept_exit",
    timewait::PROGRAMS[0],
    timewait::PROGRAMS[1],
    timewait::PROGRAMS[2],
];

/// Counters kept by the kernel program, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub ringbuf_full: u64,
    pub untracked: u64,
    pub map_update_failed: u64,
    pub aggregated: u64,
    /// Transitions whose old state was not the one the program saw the socket
    /// enter: one between was missed, so their duration is unknown.
    pub gaps: u64,
    /// Transitions lost because a read of kernel memory failed mid-run.
    pub read_failed: u64,
    /// Transitions the kernel did not run the program for, because a tracing
    /// program was already running on that CPU (`recursion_misses`, counted
    /// for tracepoint programs since Linux 6.7; 0 before, as start-up says).
    pub skipped: u64,
}

impl Program {
    /// Loads and attaches the program; returns it with its event ring buffer.
    pub fn attach(settings: &Settings) -> Result<(Self, RingBuf<MapData>)> {
        if PROGRAM.is_empty() {
            bail!("this binary was built with AYA_BUILD_SKIP=1 and holds no BPF program");
        }
        check_privileges()?;
        raise_memlock_limit();
        let tracefs = tracefs::tracefs_root()?;
        super::requirements::check(&tracefs)?;
        let mut probe = Probe::default();
        let storage = storage::wanted(settings.socket_storage);
        let (mut ebpf, mut optional) = load(settings, &tracefs, &mut probe, storage)?;
        if let Err(err) = attach_programs(&mut ebpf, &mut optional, &mut probe) {
            if !optional.storage {
                return Err(err);
            }
            // A kernel whose verifier refuses the BTF-typed program still
            // runs the classic one.
            drop(ebpf);
            probe = Probe::default();
            storage::fell_back(&mut probe, &err);
            (ebpf, optional) = load(settings, &tracefs, &mut probe, false)?;
            attach_programs(&mut ebpf, &mut optional, &mut probe)?;
        }
        let timewait = settings.timewait.map(|every| match &optional.timewait {
            Some(plan) => timewait::probes(plan),
            None => TimewaitMethod::Table(every),
        });
        let mechanism = if optional.storage {
            Mechanism::SocketStorage
        } else {
            Mechanism::Classic {
                max_sockets: settings.max_sockets,
            }
        };

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
        let skipped_before_start = skipped_runs(&ebpf)?;
        probe.check(
            SKIP_COUNT,
            skip_count_missing(skipped_before_start.is_some()),
        );
        let mut counters = per_cpu_array(&mut ebpf, "COUNTERS")?;
        reset(&mut counters, counter::COUNT)?;
        let sums = if settings.aggregate {
            let mut maps = SumMaps {
                buckets: per_cpu_array(&mut ebpf, "HISTOGRAMS")?,
                maxima: per_cpu_array(&mut ebpf, "MAX_NS")?,
                handshakes: per_cpu_array(&mut ebpf, "HANDSHAKES")?,
                tallies: per_cpu_array(&mut ebpf, "TALLIES")?,
            };
            for array in [
                &mut maps.buckets,
                &mut maps.maxima,
                &mut maps.handshakes,
                &mut maps.tallies,
            ] {
                let len = array.len();
                reset(array, len)?;
            }
            Some(maps)
        } else {
            None
        };
        for note in probe.notes() {
            eprintln!("{note}");
        }
        seed_from_scan(&mut ebpf, settings.cgroup.as_deref());
        let exited_owners = ExitedOwners::take(&mut ebpf, settings.cgroup.clone())?;
        drop_privileges()?;
        // Loading parsed the kernel's BTF and the scan read every process's
        // descriptors: give the freed memory back rather than hold it for
        // the agent's whole life.
        // SAFETY: malloc_trim only releases free memory of glibc's heap.
        unsafe { libc::malloc_trim(0) };
        Ok((
            Self {
                ebpf,
                counters,
                sums,
                skipped_before_start: skipped_before_start.unwrap_or(0),
                exited_owners,
                mechanism,
                timewait,
            },
            events,
        ))
    }

    /// How the program traces, for the line that says tracing has begun.
    pub fn mechanism(&self) -> Tracing {
        Tracing {
            mechanism: self.mechanism,
            timewait: self.timewait,
        }
    }

    /// Whether timewait sockets come from the kprobes (`TimewaitRecord`s in
    /// the ring buffer) rather than from readings of the kernel's table.
    pub fn timewait_probes(&self) -> bool {
        matches!(self.timewait, Some(TimewaitMethod::Probes { .. }))
    }

    /// Charges the listeners of owners that exited to the processes still
    /// holding them. A failure is reported once per call, not fatal: those
    /// listeners keep their old owner.
    pub fn poll_owners(&mut self) {
        if let Err(err) = self.exited_owners.poll() {
            eprintln!("tcp-trace: warning: re-resolving listener owners: {err:#}");
        }
    }

    /// The counters so far, the program still attached.
    pub fn counters(&self) -> Result<Counters> {
        Ok(Counters {
            skipped: self.skipped()?,
            ..read_counters(&self.counters)?
        })
    }

    /// Detaches the program, then reads the final counters (the count of
    /// skipped runs comes from the program, so it is read just before).
    pub fn stop(self) -> Result<Counters> {
        let skipped = self.skipped()?;
        let Program { ebpf, counters, .. } = self;
        drop(ebpf);
        Ok(Counters {
            skipped,
            ..read_counters(&counters)?
        })
    }

    fn skipped(&self) -> Result<u64> {
        let now = skipped_runs(&self.ebpf)?.unwrap_or(0);
        Ok(now.saturating_sub(self.skipped_before_start))
    }

    /// What the kernel summed so far (aggregating mode), over all CPUs.
    pub fn sums(&self) -> Result<KernelSums> {
        self.sums
            .as_ref()
            .context("the program was not loaded to aggregate")?
            .read()
    }
}

/// Loads the BPF object with the settings, layouts and offsets this kernel
/// needs as globals; returns it, and which programs to attach: the
/// socket-storage one when `storage` is asked for and possible here.
fn load(
    settings: &Settings,
    tracefs: &Path,
    probe: &mut Probe,
    storage: bool,
) -> Result<(Ebpf, Attachments)> {
    let layout = tracefs::read_layout(tracefs)?;
    let direct = direct_reads(&layout, probe);
    let btf = Btf::from_sys_fs()
        .map_err(|err| probe.missing("kernel BTF", format!("{err:#}")))
        .ok();
    let offsets = btf
        .as_ref()
        .map_or_else(SockOffsets::default, |btf| sock_offsets(btf, probe));
    let accept = owners::accept_offsets(btf.as_ref(), tracefs, probe);
    let task = owners::task_offsets(btf.as_ref(), probe);
    let sk_fields = if storage {
        storage::sk_fields(btf.as_ref(), probe)
    } else {
        None
    };
    let storage = sk_fields.is_some();
    let tw_plan = settings
        .timewait
        .and_then(|_| timewait::plan(btf.as_ref(), probe));
    drop(btf);
    let synack = match tracefs::read_synack_layout(tracefs) {
        Ok(layout) => {
            probe.found(SYNACK_TIMING);
            Some(layout)
        }
        Err(err) => {
            probe.missing(SYNACK_TIMING, format!("{err:#}"));
            None
        }
    };
    // Aggregating, the ring carries only `stream_mask`'s transitions; the
    // sums' arrays hold one slot where they are not used.
    let ring_bytes = if settings.aggregate && settings.stream_mask == 0 {
        4096
    } else {
        settings.ring_bytes
    };
    let histogram_slots = if settings.aggregate {
        hist::STATES * hist::BUCKETS
    } else {
        1
    };
    let (handshake_slots, tally_slots) = if settings.aggregate && settings.tally {
        (HANDSHAKE_SLOTS, tally::COUNT)
    } else {
        (1, 1)
    };
    // No kernel BTF for aya: Rust BPF objects carry no CO-RE relocations,
    // and parsing vmlinux BTF would cost the agent ~10 MiB of memory.
    let ebpf = EbpfLoader::new()
        .btf(None)
        .override_global("LAYOUT", &layout, true)
        .override_global("DIRECT", &u8::from(direct), true)
        .override_global("FILTER", &with_cgroup(settings)?, true)
        .override_global("SOCK_OFFSETS", &offsets, true)
        .override_global("SYNACK_LAYOUT", &synack.unwrap_or_default(), true)
        .override_global("ACCEPT_OFFSETS", &accept.unwrap_or_default(), true)
        .override_global("TASK_OFFSETS", &task.unwrap_or_default(), true)
        .override_global("SK_FIELDS", &sk_fields.unwrap_or_default(), true)
        .override_global(
            "TW_OFFSETS",
            &tw_plan.map(|p| p.offsets).unwrap_or_default(),
            true,
        )
        .override_global("SOCKET_STORAGE", &u8::from(storage), true)
        .override_global("AGGREGATE", &u8::from(settings.aggregate), true)
        .override_global("STREAM_MASK", &settings.stream_mask, true)
        .override_global("TALLY", &u8::from(settings.tally), true)
        // Wake the reader when an eighth of the ring is queued; it drains on
        // a timer otherwise (see source/live.rs).
        .override_global("WAKEUP_BYTES", &u64::from(ring_bytes / 8), true)
        // Each path sizes the other's map to one entry: the LRU map is
        // preallocated.
        .map_max_entries("SOCKETS", if storage { 1 } else { settings.max_sockets })
        .map_max_entries("ACCEPTS", if storage { ACCEPTS_SLOTS } else { 1 })
        // Not preallocated: sized like the socket map, it costs what the
        // start-up scan puts in.
        .map_max_entries("SEEDS", settings.max_sockets)
        .map_max_entries("EVENTS", ring_bytes)
        .map_max_entries("HISTOGRAMS", histogram_slots)
        .map_max_entries("HANDSHAKES", handshake_slots)
        .map_max_entries("TALLIES", tally_slots)
        .load(PROGRAM)
        .context("loading the BPF program into the kernel")?;
    let attachments = Attachments {
        storage,
        synack: synack.is_some(),
        accept: accept.is_some(),
        timewait: tw_plan,
    };
    Ok((ebpf, attachments))
}

/// Slots of the handshake histograms: one per bucket, side and outcome.
const HANDSHAKE_SLOTS: u32 = side::COUNT * outcome::COUNT * hist::BUCKETS;

/// Seeds the kernel's maps with the owners of sockets that existed before the
/// program was attached (after attaching, so no socket falls between). A
/// failed scan is a warning: those sockets' owners stay unknown.
fn seed_from_scan(ebpf: &mut Ebpf, cgroup_filter: Option<&str>) {
    let seeded = scan().and_then(|scan| {
        let seeded = owners::seed(ebpf, &scan, cgroup_filter)?;
        Ok((scan.stats, seeded))
    });
    match seeded {
        Ok((stats, seeded)) => eprintln!(
            "tcp-trace: start-up scan: owners of {} listeners and {} connections found \
             among {} processes in {:.1} ms ({} processes unreadable{})",
            seeded.listeners,
            seeded.connections,
            stats.processes,
            stats.elapsed.as_secs_f64() * 1000.0,
            stats.unreadable,
            if seeded.not_seeded > 0 {
                format!(", {} connections not seeded: map full", seeded.not_seeded)
            } else {
                String::new()
            },
        ),
        Err(err) => eprintln!(
            "tcp-trace: warning: start-up scan failed, owners of sockets opened \
             before start stay unknown: {err:#}"
        ),
    }
}

/// The filter with `--cgroup` resolved to the cgroup's id and level.
fn with_cgroup(settings: &Settings) -> Result<Filter> {
    let Some(path) = &settings.cgroup else {
        return Ok(settings.filter);
    };
    let cgroup = CgroupFs::find()
        .and_then(|fs| fs.lookup(path))
        .with_context(|| format!("--cgroup {path}"))?;
    Ok(Filter {
        cgroup_id: cgroup.id,
        cgroup_level: cgroup.level,
        ..settings.filter
    })
}

/// Passively opened sockets the socket-storage path can hold between the
/// handshake and `accept()` (an LRU map: the oldest go first).
const ACCEPTS_SLOTS: u32 = 16_384;

/// The programs to attach: the socket-storage or the classic main program,
/// and the optional ones this kernel can run.
struct Attachments {
    storage: bool,
    synack: bool,
    accept: bool,
    /// The precise TIME_WAIT path's kprobes; `None` once they failed.
    timewait: Option<timewait::Plan>,
}

/// Verifies and attaches the main program, and the optional ones where the
/// kernel has their tracepoints.
fn attach_programs(ebpf: &mut Ebpf, optional: &mut Attachments, probe: &mut Probe) -> Result<()> {
    if optional.storage {
        storage::attach(ebpf)?;
    } else {
        attach_tracepoint(ebpf, MAIN_PROGRAM, &[(tracefs::CATEGORY, tracefs::NAME)])?;
    }
    // SYN-ACK retransmissions are rare and time the server's handshake
    // when they happen; kernels without the tracepoint go without.
    if optional.synack {
        attach_tracepoint(
            ebpf,
            "tcp_retransmit_synack",
            &[("tcp", "tcp_retransmit_synack")],
        )?;
    }
    owners::attach(ebpf, optional.accept)?;
    // The precise TIME_WAIT path is optional: a failure leaves the
    // sock_diag readings, and a note saying why.
    if let Some(plan) = optional.timewait {
        if let Err(err) = timewait::attach(ebpf, &plan) {
            timewait::fell_back(probe, &err);
            for name in timewait::PROGRAMS {
                let program: Option<&mut KProbe> =
                    ebpf.program_mut(name).and_then(|p| p.try_into().ok());
                if let Some(program) = program {
                    // Detaches what was attached; one never loaded stays so.
                    let _ = program.unload();
                }
            }
            optional.timewait = None;
        }
    }
    Ok(())
}

/// Program `name` of the object as its type `T` (`kind` names the type for
/// the error).
pub(super) fn program_as<'a, T>(ebpf: &'a mut Ebpf, name: &str, kind: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("the BPF object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not a {kind} program"))
}

/// Loads program `name` and attaches it to each `(category, event)`.
pub(super) fn attach_tracepoint(ebpf: &mut Ebpf, name: &str, to: &[(&str, &str)]) -> Result<()> {
    let program: &mut TracePoint = program_as(ebpf, name, "tracepoint")?;
    program
        .load()
        .with_context(|| format!("the kernel's verifier rejected {name}"))?;
    for (category, event) in to {
        program.attach(category, event).map_err(|err| {
            let err = anyhow::Error::new(err);
            let context = format!("attaching {name} to {category}:{event}");
            match perf_event_refusal(&err) {
                Some(why) => err.context(why).context(context),
                None => err.context(context),
            }
        })?;
    }
    Ok(())
}

/// The per-CPU counters, summed (`skipped` comes from the program's fdinfo).
fn read_counters(counters: &PerCpuArray<MapData, u64>) -> Result<Counters> {
    let all = per_cpu_sums(counters).context("reading the kernel's counters")?;
    let sum = |index: u32| -> Result<u64> {
        all.get(index as usize)
            .copied()
            .context("the kernel's counters are short")
    };
    Ok(Counters {
        ringbuf_full: sum(counter::RINGBUF_FULL)?,
        untracked: sum(counter::UNTRACKED)?,
        map_update_failed: sum(counter::MAP_UPDATE_FAILED)?,
        aggregated: sum(counter::AGGREGATED)?,
        gaps: sum(counter::GAPS)?,
        read_failed: sum(counter::READ_FAILED)?,
        skipped: 0,
    })
}

/// Zeroes slots `0..len` on every CPU: what calibration (or anything before
/// tracing began) counted is not part of the run.
fn reset(array: &mut PerCpuArray<MapData, u64>, len: u32) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, err)| anyhow::anyhow!("{what}: {err}"))?;
    for index in 0..len {
        let zeros = PerCpuValues::try_from(vec![0u64; cpus]).context("per-CPU zeros")?;
        array
            .set(index, zeros, 0)
            .context("resetting the kernel's counters")?;
    }
    Ok(())
}

/// Why skipped runs cannot be counted here, if they cannot: the fdinfo field
/// exists since Linux 5.12, but runs of tracepoint programs are counted in it
/// only since 6.7 (before, the kernel skips them without a trace).
fn skip_count_missing(reported: bool) -> Option<String> {
    if !reported {
        return Some("the kernel reports no `recursion_misses` (Linux 6.7+)".into());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(version) if version >= (6, 7) => None,
        _ => Some(format!(
            "Linux {} does not count skipped tracepoint runs (6.7+ does): \
             transitions the kernel skips go uncounted",
            release.trim()
        )),
    }
}

/// `(major, minor)` of a kernel release such as `6.18.44-fc-v669`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn per_cpu_array(ebpf: &mut Ebpf, name: &str) -> Result<PerCpuArray<MapData, u64>> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the BPF object has no map {name}"))?;
    PerCpuArray::try_from(map).with_context(|| format!("{name} is not a per-CPU array"))
}

/// Names of the optional features, as the start-up notes print them.
const SYNACK_TIMING: &str = "server handshake time after SYN-ACK retransmissions";
const DIRECT_READS: &str = "direct tracepoint record reads";
const SOCK_FIELDS: &str = "byte counts and errors at close";
const SKIP_COUNT: &str = "a count of transitions the kernel skipped";

/// How many runs of the streaming programs the kernel skipped since they
/// were loaded, from their fdinfo; `None` when the kernel does not say.
fn skipped_runs(ebpf: &Ebpf) -> Result<Option<u64>> {
    let mut total = None;
    for name in STREAMING_PROGRAMS {
        // The accept handler is not loaded where the kernel lacks its offsets.
        let Some(fd) = ebpf.program(name).and_then(|p| p.fd().ok()) else {
            continue;
        };
        let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
        let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        if let Some(skipped) = fdinfo_field(&info, "recursion_misses") {
            *total.get_or_insert(0) += skipped;
        }
    }
    Ok(total)
}

/// A numeric `name:\tvalue` line of an fdinfo file.
fn fdinfo_field(info: &str, name: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == name).then(|| value.trim().parse().ok())?
    })
}

/// Where the socket fields the program reads live in this kernel; zeros (and
/// the fields reported as unknown) where its BTF does not say.
fn sock_offsets(btf: &Btf, probe: &mut Probe) -> SockOffsets {
    let mut field = |ty: &str, name: &str, size: u32, feature: &'static str| {
        let found = btf
            .member(ty, name)
            .filter(|&(_, s)| s == size)
            .map(|(offset, _)| offset);
        if found.is_none() {
            probe.missing(
                feature,
                format!("no {size}-byte `{ty}.{name}` in the kernel's BTF"),
            );
        }
        found
    };
    let total_retrans = field("tcp_sock", "total_retrans", 4, "handshake retransmissions");
    let srtt_us = field("tcp_sock", "srtt_us", 4, "server handshake time");
    let snt_synack = field("tcp_request_sock", "snt_synack", 8, SYNACK_TIMING);
    let bytes_acked = field("tcp_sock", "bytes_acked", 8, SOCK_FIELDS);
    let bytes_received = field("tcp_sock", "bytes_received", 8, SOCK_FIELDS);
    let sk_err = field("sock", "sk_err", 4, SOCK_FIELDS);
    // `sk_flags` is a macro for `__sk_common.skc_flags`.
    let sk_flags = btf
        .member("sock", "__sk_common")
        .zip(field("sock_common", "skc_flags", 8, SOCK_FIELDS))
        .map(|((common, _), flags)| common + flags);
    let (skc_net, net_inum) = owners::netns_offsets(btf, probe).unwrap_or_default();
    let partial = SockOffsets {
        total_retrans: total_retrans.unwrap_or(0),
        srtt_us: srtt_us.unwrap_or(0),
        snt_synack: snt_synack.unwrap_or(0),
        skc_net,
        net_inum,
        ..SockOffsets::default()
    };
    match (bytes_acked, bytes_received, sk_err, sk_flags) {
        (Some(bytes_acked), Some(bytes_received), Some(sk_err), Some(sk_flags)) => SockOffsets {
            bytes_acked,
            bytes_received,
            sk_err,
            sk_flags,
            ..partial
        },
        _ => partial,
    }
}

/// Whether the program may read the record at the compiled-in offsets.
/// `TCP_TRACE_PROBE_READ=1` forces the helper-call path other kernels take,
/// so that it is tested here too.
fn direct_reads(layout: &TracepointLayout, probe: &mut Probe) -> bool {
    let reason = if *layout != KNOWN_LAYOUT {
        Some("the tracepoint's record layout differs from the compiled-in one")
    } else if std::env::var_os("TCP_TRACE_PROBE_READ").is_some_and(|v| v == "1") {
        Some("TCP_TRACE_PROBE_READ=1")
    } else {
        None
    };
    probe.check(DIRECT_READS, reason);
    reason.is_none()
}

/// The programs `cargo xtask bench` measures every mode against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// `bench_floor`: an empty classic tracepoint program.
    Classic,
    /// `bench_floor_btf`: an empty BTF tracepoint program.
    Btf,
    /// `bench_floor_timing`: per-socket timing into histograms, nothing else.
    Timing,
}

/// Loads and attaches a floor program (for `cargo xtask bench`); it stays
/// attached until the returned handle is dropped.
pub fn attach_floor(floor: Floor, max_sockets: u32) -> Result<Ebpf> {
    check_privileges()?;
    raise_memlock_limit();
    let tracefs = tracefs::tracefs_root()?;
    let timing = floor == Floor::Timing;
    let layout = tracefs::read_layout(&tracefs)?;
    let direct = direct_reads(&layout, &mut Probe::default());
    // The maps are created with the object; all but the timing floor's stay
    // unused: keep them small.
    let mut ebpf = EbpfLoader::new()
        .btf(None)
        .override_global("LAYOUT", &layout, true)
        .override_global("DIRECT", &u8::from(direct), true)
        .map_max_entries(
            "HISTOGRAMS",
            if timing {
                hist::STATES * hist::BUCKETS
            } else {
                1
            },
        )
        .map_max_entries("SOCKETS", if timing { max_sockets } else { 1 })
        .map_max_entries("HANDSHAKES", 1)
        .map_max_entries("TALLIES", 1)
        .map_max_entries("ACCEPTS", 1)
        .map_max_entries("EVENTS", 4096)
        .load(PROGRAM)
        .context("loading the BPF object")?;
    let classic = match floor {
        Floor::Btf => {
            storage::attach_btf(&mut ebpf, "bench_floor_btf")?;
            return Ok(ebpf);
        }
        Floor::Classic => "bench_floor",
        Floor::Timing => "bench_floor_timing",
    };
    attach_tracepoint(&mut ebpf, classic, &[(tracefs::CATEGORY, tracefs::NAME)])?;
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_recursion_misses_from_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nrun_cnt:\t7\n\
                    recursion_misses:\t24\nverified_insns:\t310\n";
        assert_eq!(super::fdinfo_field(info, "recursion_misses"), Some(24));
        assert_eq!(super::fdinfo_field(info, "run_cnt"), Some(7));
        assert_eq!(
            super::fdinfo_field("prog_type:\t5\n", "recursion_misses"),
            None
        );
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(super::kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(super::kernel_version("6.1.0-28-amd64"), Some((6, 1)));
        assert_eq!(super::kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(super::kernel_version("garbage"), None);
        assert!(super::kernel_version("6.6.9").unwrap() < (6, 7));
    }
}
