//! What the agent cannot run without, checked before anything is loaded, so
//! that an old kernel gets one line naming what it lacks instead of a
//! verifier log or a bare EINVAL: the tracepoint `sock:inet_sock_set_state`
//! (Linux 4.16) and the BPF ring buffer (Linux 5.8). Features are probed,
//! not inferred from the version, since distributions backport them (RHEL 8's
//! 4.18 has the ring buffer); the version only explains.

use std::path::Path;

use anyhow::{bail, Result};
use aya::{maps::MapType, sys::is_map_supported};

use super::tracefs;

/// Fails, naming what is missing, when this kernel cannot run the agent.
/// Needs the privileges loading needs (the ring buffer is probed by making
/// one).
pub fn check(tracefs_root: &Path) -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let tracepoint = tracefs_root
        .join("events")
        .join(tracefs::CATEGORY)
        .join(tracefs::NAME)
        .is_dir();
    // An unexpected error (not "unsupported") is left for loading to report.
    let ring_buffer = is_map_supported(MapType::RingBuf).unwrap_or(true);
    verdict(&release, tracepoint, ring_buffer)
}

fn verdict(release: &str, tracepoint: bool, ring_buffer: bool) -> Result<()> {
    let mut missing = Vec::new();
    if !tracepoint {
        missing.push(format!(
            "the tracepoint {}:{} (Linux 4.16 and later)",
            tracefs::CATEGORY,
            tracefs::NAME
        ));
    }
    if !ring_buffer {
        missing.push("the BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8 and later)".into());
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "this kernel ({}) lacks {}, which tcp-trace needs; it runs on Linux 5.8 or later",
        if release.is_empty() {
            "unknown release"
        } else {
            release
        },
        missing.join(" and ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_missing_requirement_and_the_release() {
        assert!(verdict("6.1.0-56-amd64", true, true).is_ok());
        let err = verdict("4.14.0", false, false).unwrap_err().to_string();
        assert_eq!(
            err,
            "this kernel (4.14.0) lacks the tracepoint sock:inet_sock_set_state (Linux 4.16 \
             and later) and the BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux 5.8 and later), \
             which tcp-trace needs; it runs on Linux 5.8 or later"
        );
        let err = verdict("5.4.0", true, false).unwrap_err().to_string();
        assert!(
            err.starts_with("this kernel (5.4.0) lacks the BPF ring buffer"),
            "{err}"
        );
        assert!(!err.contains("tracepoint"), "{err}");
    }

    /// The probes on the running kernel, which has both (as root, like
    /// every test that touches the kernel).
    #[test]
    fn this_kernel_has_what_the_agent_needs() {
        let root = tracefs::tracefs_root().expect("tracefs");
        check(&root).unwrap();
        // A tracefs without the tracepoint: refused, naming it and only it.
        let err = check(Path::new("/nonexistent")).unwrap_err().to_string();
        assert!(
            err.contains("lacks the tracepoint sock:inet_sock_set_state") && !err.contains("ring"),
            "{err}"
        );
    }
}
