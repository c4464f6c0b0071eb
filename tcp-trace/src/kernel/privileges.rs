//! Privileges: what loading needs, said clearly when missing, and given up
//! once the program is attached.

use anyhow::{bail, Context as _, Result};
use caps::{CapSet, Capability, CapsHashSet};

/// Fails with a message naming the missing capabilities, before the kernel
/// answers with a bare EPERM.
pub fn check_privileges() -> Result<()> {
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

/// Why attaching a tracepoint failed, when the cause is the one a
/// least-privileged agent meets on Debian's and Ubuntu's kernels: their
/// `kernel.perf_event_paranoid=3` (a distribution patch; upstream treats 3
/// as 2) lets only CAP_SYS_ADMIN call perf_event_open(), which classic
/// tracepoints attach through; CAP_PERFMON is not enough. `None` for any
/// other failure.
pub fn perf_event_refusal(err: &anyhow::Error) -> Option<String> {
    let refused = err
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM)));
    let paranoid: i32 = std::fs::read_to_string(PERF_EVENT_PARANOID)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let admin = caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(true);
    (refused && paranoid >= 3 && !admin).then(|| {
        format!(
            "kernel.perf_event_paranoid is {paranoid}: this kernel lets only CAP_SYS_ADMIN \
             open the perf events that tracepoints attach through (a Debian and Ubuntu \
             patch), so CAP_BPF and CAP_PERFMON are not enough here; set \
             `sysctl kernel.perf_event_paranoid=2` (upstream Linux's default), or give \
             tcp-trace CAP_SYS_ADMIN"
        )
    })
}

const PERF_EVENT_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones charge
/// the memory cgroup, where raising the limit is unnecessary (and may be
/// refused without CAP_SYS_RESOURCE), so a failure here is not an error.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct is passed by reference.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Once attached, the agent needs only to read its maps (`bpf()` on fds it
/// holds): it keeps CAP_BPF, or CAP_SYS_ADMIN where that is what it was given
/// (kernels before 5.8, or a process holding only CAP_SYS_ADMIN), and gives up
/// every other capability, for this thread and every thread it starts later.
/// It never executes another program; no_new_privs makes sure nothing it
/// could execute would gain privileges either.
pub fn drop_privileges() -> Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    let permitted = caps::read(None, CapSet::Permitted).context("reading our capabilities")?;
    let effective = caps::read(None, CapSet::Effective).context("reading our capabilities")?;
    let knows_bpf = caps::runtime::thread_all_supported().contains(&Capability::CAP_BPF);
    let needed = if knows_bpf && permitted.contains(&Capability::CAP_BPF) {
        Capability::CAP_BPF
    } else {
        Capability::CAP_SYS_ADMIN
    };
    let keep: CapsHashSet = permitted.iter().copied().filter(|&c| c == needed).collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP in effect,
    // and that is given up next.
    if effective.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding).context("reading our bounding set")? {
            if cap != needed {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing our ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing our inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("dropping effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("dropping permitted capabilities")?;
    Ok(())
}
