//! Choosing how the program keeps per-socket state: in an LRU map by the
//! socket's address, from the classic tracepoint program (the default: the
//! cheaper under churn, docs/BENCHMARKS.md); or, with `--socket-storage`,
//! in socket-local storage, from a BTF-typed program (`tp_btf`) that the
//! tracepoint hands the socket itself.

use std::fmt;

use anyhow::{Context as _, Result};
use aya::{programs::BtfTracePoint, Ebpf};
use tcp_trace_common::SkFields;

use super::{
    btf::Btf,
    owners::Members,
    probe::Probe,
    program::{attach_tracepoint, program_as},
    tracefs,
};

/// The BTF-typed program's name in the object.
pub(super) const BTF_PROGRAM: &str = "sock_set_state_btf";
/// The classic program that tells it task context.
pub(super) const CONTEXT_PROGRAM: &str = "task_context";

/// The start-up notes' name for the socket-storage path.
const SOCKET_STORAGE: &str = "per-socket state in socket storage (BTF tracepoint)";

/// Where per-socket state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// A BTF tracepoint; state in socket storage.
    SocketStorage,
    /// The classic tracepoint; state in an LRU map of this many sockets.
    Classic { max_sockets: u32 },
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let event = format!("{}:{}", tracefs::CATEGORY, tracefs::NAME);
        match self {
            Mechanism::SocketStorage => write!(
                f,
                "{event} by a BTF tracepoint (tp_btf), per-socket state in socket storage"
            ),
            Mechanism::Classic { max_sockets } => write!(
                f,
                "{event} by a classic tracepoint, per-socket state in an LRU map of \
                 {max_sockets} sockets"
            ),
        }
    }
}

/// Whether to try socket storage: `--socket-storage`, unless the
/// environment says otherwise (`TCP_TRACE_SOCKET_STORAGE=1` or `0`, for the
/// test suite to run every test on either path).
pub(super) fn wanted(flag: bool) -> bool {
    match std::env::var("TCP_TRACE_SOCKET_STORAGE").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => flag,
    }
}

/// The offsets the BTF-typed program needs, or `None` (and a note saying
/// why) when the classic path must be used.
pub(super) fn sk_fields(btf: Option<&Btf>, probe: &mut Probe) -> Option<SkFields> {
    let Some(btf) = btf else {
        probe.missing(SOCKET_STORAGE, "no kernel BTF");
        return None;
    };
    let mut members = Members::new(btf);
    let mut member = |ty: &str, name: &str, size: u32| members.offset(ty, name, size);
    // A `tcp_sock` starts with an `inet_connection_sock`, which starts
    // with an `inet_sock`, then `sock`, then `sock_common`: each one's
    // offsets are the socket's own (checked below).
    let fields = SkFields {
        family: member("sock_common", "skc_family", 2),
        sport: member("inet_sock", "inet_sport", 2),
        dport: member("sock_common", "skc_dport", 2),
        saddr: member("inet_sock", "inet_saddr", 4),
        daddr: member("sock_common", "skc_daddr", 4),
        saddr_v6: member("sock_common", "skc_v6_rcv_saddr", 16),
        daddr_v6: member("sock_common", "skc_v6_daddr", 16),
        state: member("sock_common", "skc_state", 1),
    };
    for (outer, first) in [
        ("tcp_sock", "inet_conn"),
        ("inet_connection_sock", "icsk_inet"),
        ("inet_sock", "sk"),
        ("sock", "__sk_common"),
    ] {
        if btf.member(outer, first).map(|(offset, _)| offset) != Some(0) {
            members.missing.push(format!("{outer}.{first} at offset 0"));
        }
    }
    members.all_found(probe, SOCKET_STORAGE).then_some(fields)
}

/// Records that the socket-storage path could not be attached, and why.
pub(super) fn fell_back(probe: &mut Probe, err: &anyhow::Error) {
    probe.missing(SOCKET_STORAGE, format!("{err:#}"));
}

/// Verifies and attaches the BTF-typed program, after the classic
/// `task_context` program that tells it task context from softirq (attached
/// first, it runs first on each transition). The BTF program needs the
/// kernel's BTF through aya to find the tracepoint's type, parsed here and
/// freed after.
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<()> {
    attach_tracepoint(ebpf, CONTEXT_PROGRAM, &[(tracefs::CATEGORY, tracefs::NAME)])?;
    attach_btf(ebpf, BTF_PROGRAM)
}

/// Verifies and attaches BTF tracepoint program `name`.
pub(super) fn attach_btf(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let program: &mut BtfTracePoint = program_as(ebpf, name, "BTF tracepoint")?;
    program
        .load(tracefs::NAME, &btf)
        .context("the kernel's verifier rejected the BTF tracepoint program")?;
    program
        .attach()
        .with_context(|| format!("attaching to the BTF tracepoint {}", tracefs::NAME))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mechanism_line_names_the_path_and_its_store() {
        assert_eq!(
            Mechanism::SocketStorage.to_string(),
            "sock:inet_sock_set_state by a BTF tracepoint (tp_btf), per-socket state in \
             socket storage"
        );
        assert!(Mechanism::Classic {
            max_sockets: 131072
        }
        .to_string()
        .ends_with("an LRU map of 131072 sockets"));
    }

    #[test]
    fn this_kernel_offers_every_field() {
        let btf = Btf::from_sys_fs().unwrap();
        let mut probe = Probe::default();
        let fields = sk_fields(Some(&btf), &mut probe)
            .unwrap_or_else(|| panic!("{:?}", probe.notes().collect::<Vec<_>>()));
        assert_eq!(
            fields.family, 16,
            "skc_family follows the addresses and ports"
        );
        assert!(
            fields.sport > fields.dport,
            "inet_sock's fields follow sock_common's"
        );
    }
}
