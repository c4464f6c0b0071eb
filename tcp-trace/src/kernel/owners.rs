//! The kernel side of owners beyond transitions: the `accept()` exit handler
//! and its offsets, the listener-owner exit handler, and the network
//! namespace offsets.

use std::path::Path;

use anyhow::Result;
use aya::Ebpf;
use tcp_trace_common::AcceptOffsets;

use super::{btf::Btf, probe::Probe, program::attach_tracepoint, tracefs};

/// Names of the optional features, as the start-up notes print them.
const ACCEPT_OWNERS: &str = "owners and accept-queue wait from accept()";
const NETNS: &str = "network namespaces of sockets";

/// Where the accept handler finds the accepted socket in this kernel; `None`
/// (and a start-up note) when BTF or the syscall tracepoint is missing.
pub(super) fn accept_offsets(
    btf: Option<&Btf>,
    tracefs: &Path,
    probe: &mut Probe,
) -> Option<AcceptOffsets> {
    let Some(btf) = btf else {
        probe.missing(ACCEPT_OWNERS, "no kernel BTF");
        return None;
    };
    let ret = match tracefs::read_accept_ret(tracefs) {
        Ok(ret) => ret,
        Err(err) => {
            probe.missing(ACCEPT_OWNERS, format!("{err:#}"));
            return None;
        }
    };
    let mut missing = Vec::new();
    let mut member = |ty: &str, name: &str, size: u32| {
        let found = btf.member(ty, name).filter(|&(_, s)| s == size);
        if found.is_none() {
            missing.push(format!("{ty}.{name}"));
        }
        found.map_or(0, |(offset, _)| offset)
    };
    // `sock.__sk_common` is the first member of `struct sock`, so the
    // `sock_common` offsets are the socket's own.
    let offsets = AcceptOffsets {
        ret,
        task_files: member("task_struct", "files", 8),
        files_fdt: member("files_struct", "fdt", 8),
        fdt_max_fds: member("fdtable", "max_fds", 4),
        fdt_fd: member("fdtable", "fd", 8),
        file_private_data: member("file", "private_data", 8),
        socket_file: member("socket", "file", 8),
        socket_sk: member("socket", "sk", 8),
        skc_family: member("sock_common", "skc_family", 2),
        skc_num: member("sock_common", "skc_num", 2),
        skc_dport: member("sock_common", "skc_dport", 2),
        skc_rcv_saddr: member("sock_common", "skc_rcv_saddr", 4),
        skc_daddr: member("sock_common", "skc_daddr", 4),
        skc_v6_rcv_saddr: member("sock_common", "skc_v6_rcv_saddr", 16),
        skc_v6_daddr: member("sock_common", "skc_v6_daddr", 16),
    };
    if btf.member("sock", "__sk_common").map(|(offset, _)| offset) != Some(0) {
        missing.push("sock.__sk_common at offset 0".into());
    }
    if !missing.is_empty() {
        probe.missing(
            ACCEPT_OWNERS,
            format!("not in the kernel's BTF: {}", missing.join(", ")),
        );
        return None;
    }
    probe.found(ACCEPT_OWNERS);
    Some(offsets)
}

/// `(sock.__sk_common.skc_net, net.ns.inum)`: where a socket's namespace and
/// the namespace's inode number live; `None` (and a note) when BTF lacks them.
pub(super) fn netns_offsets(btf: &Btf, probe: &mut Probe) -> Option<(u32, u32)> {
    let found = (|| {
        let (common, _) = btf.member("sock", "__sk_common")?;
        let (net, _) = btf.member("sock_common", "skc_net")?;
        let (ns, _) = btf.member("net", "ns")?;
        let (inum, size) = btf.member("ns_common", "inum")?;
        (size == 4).then_some((common + net, ns + inum))
    })();
    match found {
        Some(_) => probe.found(NETNS),
        None => probe.missing(
            NETNS,
            "no `skc_net` or `ns_common.inum` in the kernel's BTF",
        ),
    }
    found
}

/// Attaches the accept handler (where the kernel gave its offsets) and the
/// listener-owner exit handler.
pub(super) fn attach(ebpf: &mut Ebpf, accept: bool) -> Result<()> {
    if accept {
        attach_tracepoint(
            ebpf,
            "accept_exit",
            &[
                ("syscalls", "sys_exit_accept4"),
                ("syscalls", "sys_exit_accept"),
            ],
        )?;
    }
    attach_tracepoint(ebpf, "owner_exit", &[("sched", "sched_process_exit")])
}
