//! The kernel side of owners beyond transitions: the `accept()` exit handler
//! and its offsets, the listener-owner exit handler, the network namespace
//! offsets, and seeding the program's maps with the start-up scan's owners.

use std::{net::IpAddr, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, MapData, MapError},
    Ebpf,
};
use tcp_trace_common::{
    owner_source, state, AcceptOffsets, ConnKey, Listener, Owner, TaskOffsets, COMM_LEN,
};

use super::{btf::Btf, probe::Probe, program::attach_tracepoint, tracefs};
use crate::{
    model::cgroup_within,
    system::{
        cgroup::{proc_cgroup, CgroupFs},
        owners::{socket_holders, Holder, Scan},
        sock_diag::{tcp_sockets, TcpSocket},
    },
};

/// Names of the optional features, as the start-up notes print them.
const ACCEPT_OWNERS: &str = "owners and accept-queue wait from accept()";
const NETNS: &str = "network namespaces of sockets";
const LISTENER_HEIRS: &str = "listeners handed to a daemon's child when its parent exits";

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
    let mut members = Members::new(btf);
    let mut member = |ty: &str, name: &str, size: u32| members.offset(ty, name, size);
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
        members.missing.push("sock.__sk_common at offset 0".into());
    }
    members.all_found(probe, ACCEPT_OWNERS).then_some(offsets)
}

/// Member offsets looked up for one feature, and the ones BTF lacks.
pub(super) struct Members<'a> {
    btf: &'a Btf,
    pub(super) missing: Vec<String>,
}

impl<'a> Members<'a> {
    pub(super) fn new(btf: &'a Btf) -> Self {
        Members {
            btf,
            missing: Vec::new(),
        }
    }

    /// Offset of `ty.name` if it is `size` bytes; 0, noted as missing, if not.
    pub(super) fn offset(&mut self, ty: &str, name: &str, size: u32) -> u32 {
        let found = self.btf.member(ty, name).filter(|&(_, s)| s == size);
        if found.is_none() {
            self.missing.push(format!("{ty}.{name}"));
        }
        found.map_or(0, |(offset, _)| offset)
    }

    /// Whether every member was found; tells `probe` either way.
    pub(super) fn all_found(self, probe: &mut Probe, feature: &'static str) -> bool {
        if self.missing.is_empty() {
            probe.found(feature);
            return true;
        }
        let reason = format!("not in the kernel's BTF: {}", self.missing.join(", "));
        probe.missing(feature, reason);
        false
    }
}

/// Where the listener-owner exit handler finds the exiting process's first
/// child; `None` (and a note: heirs then come from userspace alone, which
/// needs the /proc access the agent gives up) when BTF lacks them.
pub(super) fn task_offsets(btf: Option<&Btf>, probe: &mut Probe) -> Option<TaskOffsets> {
    let Some(btf) = btf else {
        probe.missing(LISTENER_HEIRS, "no kernel BTF");
        return None;
    };
    let mut members = Members::new(btf);
    let mut member = |ty: &str, name: &str, size: u32| members.offset(ty, name, size);
    let offsets = TaskOffsets {
        children: member("task_struct", "children", 16),
        sibling: member("task_struct", "sibling", 16),
        tgid: member("task_struct", "tgid", 4),
        comm: member("task_struct", "comm", 16),
        cgroups: member("task_struct", "cgroups", 8),
        css_set_dfl_cgrp: member("css_set", "dfl_cgrp", 8),
        cgroup_kn: member("cgroup", "kn", 8),
        kernfs_node_id: member("kernfs_node", "id", 8),
    };
    members.all_found(probe, LISTENER_HEIRS).then_some(offsets)
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

/// Puts the start-up scan's owners in the kernel's maps, so that sockets
/// that existed before the program was attached are charged to them:
/// listeners by port (connections arriving later inherit their owner),
/// connections by endpoints (taken at their first event). Listeners the
/// program has already seen listen keep what it saw.
pub(super) fn seed(ebpf: &mut Ebpf, scan: &Scan, cgroup_filter: Option<&str>) -> Result<Seeded> {
    let mut owners = ScanOwners::new(cgroup_filter);
    let mut listeners: HashMap<&mut MapData, u16, Listener> = HashMap::try_from(
        ebpf.map_mut("LISTENERS")
            .context("the BPF object has no map LISTENERS")?,
    )?;
    let mut seeded = Seeded::default();
    for owned in &scan.listeners {
        let listener = Listener {
            // sock_diag gives no kernel address; the program accepts 0.
            skaddr: 0,
            owner: owners.owner(&owned.holder),
        };
        match listeners.insert(owned.socket.endpoints.lport, listener, BPF_NOEXIST) {
            Ok(()) => seeded.listeners += 1,
            Err(MapError::SyscallError(err)) if err.io_error.raw_os_error() == Some(EEXIST) => {}
            Err(err) => return Err(err).context("seeding the kernel's listener map"),
        }
    }
    let mut seeds: HashMap<&mut MapData, ConnKey, Owner> = HashMap::try_from(
        ebpf.map_mut("SEEDS")
            .context("the BPF object has no map SEEDS")?,
    )?;
    for owned in &scan.connections {
        let ends = &owned.socket.endpoints;
        let key = ConnKey {
            family: owned.socket.family,
            lport: ends.lport,
            rport: ends.rport,
            _pad: 0,
            laddr: address_bytes(ends.laddr),
            raddr: address_bytes(ends.raddr),
        };
        match seeds.insert(key, owners.owner(&owned.holder), 0) {
            Ok(()) => seeded.connections += 1,
            Err(_) => seeded.not_seeded += 1,
        }
    }
    Ok(seeded)
}

/// What `seed` put in the kernel's maps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seeded {
    pub listeners: usize,
    pub connections: usize,
    /// Connections the seed map had no room for: their owners stay unknown.
    pub not_seeded: usize,
}

/// `BPF_NOEXIST` (uapi bpf.h): insert only where no entry is.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// An address as the kernel program keys it: IPv4 in the first 4 bytes.
fn address_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Scanned holders as the kernel program's owners, with each process's
/// cgroup looked up once.
struct ScanOwners<'a> {
    cgroup_filter: Option<&'a str>,
    cgroups: Option<CgroupFs>,
    by_pid: std::collections::HashMap<u32, Owner>,
}

impl<'a> ScanOwners<'a> {
    fn new(cgroup_filter: Option<&'a str>) -> Self {
        ScanOwners {
            cgroup_filter,
            cgroups: CgroupFs::find().ok(),
            by_pid: std::collections::HashMap::new(),
        }
    }

    fn owner(&mut self, holder: &Holder) -> Owner {
        if let Some(owner) = self.by_pid.get(&holder.pid) {
            return *owner;
        }
        let path = proc_cgroup(holder.pid).ok().flatten();
        let cgroup_id = match (&self.cgroups, &path) {
            (Some(fs), Some(path)) => fs.lookup(path).map_or(0, |c| c.id),
            _ => 0,
        };
        let in_cgroup = match (self.cgroup_filter, &path) {
            (Some(filter), Some(path)) => cgroup_within(path, filter),
            _ => false,
        };
        let mut comm = [0u8; COMM_LEN];
        let name = holder.comm.as_bytes();
        let len = name.len().min(COMM_LEN - 1);
        comm[..len].copy_from_slice(&name[..len]);
        let owner = Owner {
            cgroup_id,
            pid: holder.pid,
            source: owner_source::SCAN,
            in_cgroup: u8::from(in_cgroup),
            _pad: [0; 2],
            comm,
        };
        self.by_pid.insert(holder.pid, owner);
        owner
    }
}

/// Listener owners that exited, drained from the kernel. The kernel handed
/// the last listener each owned to its first child (its heir); any other
/// listener still charged to it goes to that heir too, or, without one, to
/// the oldest process still holding it (which needs /proc access the agent
/// may have given up).
pub struct ExitedOwners {
    exited: HashMap<MapData, u32, Owner>,
    listeners: HashMap<MapData, u16, Listener>,
    cgroup_filter: Option<String>,
}

impl ExitedOwners {
    pub(super) fn take(ebpf: &mut Ebpf, cgroup_filter: Option<String>) -> Result<Self> {
        let mut map = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the BPF object has no map {name}"))
        };
        Ok(ExitedOwners {
            exited: HashMap::try_from(map("EXITED_OWNERS")?)?,
            listeners: HashMap::try_from(map("LISTENERS")?)?,
            cgroup_filter,
        })
    }

    /// Re-resolves the listeners of owners that exited since the last call;
    /// returns how many listeners got a new owner.
    pub fn poll(&mut self) -> Result<usize> {
        let exited: Vec<(u32, Owner)> = self.exited.iter().filter_map(Result::ok).collect();
        if exited.is_empty() {
            return Ok(0);
        }
        for (pid, _) in &exited {
            let _ = self.exited.remove(pid);
        }
        let mut reassigned = 0;
        let mut orphaned = Vec::new();
        let owned: Vec<(u16, Listener)> = self.listeners.iter().filter_map(Result::ok).collect();
        for (port, mut listener) in owned {
            let Some((_, heir)) = exited.iter().find(|(pid, _)| *pid == listener.owner.pid) else {
                continue;
            };
            if !heir.is_known() {
                orphaned.push(port);
                continue;
            }
            listener.owner = Owner {
                in_cgroup: listener.owner.in_cgroup,
                ..*heir
            };
            self.listeners
                .insert(port, listener, 0)
                .context("updating the kernel's listener map")?;
            reassigned += 1;
        }
        if orphaned.is_empty() {
            return Ok(reassigned);
        }
        let listening: Vec<TcpSocket> = tcp_sockets()
            .context("listing listeners via sock_diag")?
            .into_iter()
            .filter(|s| s.state == state::LISTEN && orphaned.contains(&s.endpoints.lport))
            .collect();
        let inodes = listening
            .iter()
            .map(|s| s.inode)
            .filter(|&i| i != 0)
            .collect();
        let holders = socket_holders(&inodes)?;
        let mut owners = ScanOwners::new(self.cgroup_filter.as_deref());
        let mut unresolved = Vec::new();
        for socket in &listening {
            let port = socket.endpoints.lport;
            let Some(holder) = holders.holder(socket.inode) else {
                unresolved.push(port);
                continue;
            };
            let Ok(mut listener) = self.listeners.get(&port, 0) else {
                continue;
            };
            listener.owner = owners.owner(holder);
            self.listeners
                .insert(port, listener, 0)
                .context("updating the kernel's listener map")?;
            reassigned += 1;
        }
        // Said, not silent: these listeners stay charged to the exited owner.
        if !unresolved.is_empty() && holders.walk.unreadable > 0 {
            anyhow::bail!(
                "the owner of the listener(s) on port(s) {unresolved:?} exited and the \
                 processes still holding them could not be read ({} processes' file \
                 descriptors are out of reach without CAP_SYS_PTRACE): they stay charged \
                 to the exited owner",
                holders.walk.unreadable
            );
        }
        Ok(reassigned)
    }
}
