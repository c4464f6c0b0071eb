//! Who owns a socket, how that was learnt, and where the owner runs.

use std::sync::Arc;

use tcp_trace_common::owner_source;

/// The process that owns a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// Raw `comm` bytes up to the first NUL; may hold anything a process chose.
    pub comm: Vec<u8>,
    pub source: OwnerSource,
    /// The owner's cgroup v2 id; 0 when unknown.
    pub cgroup_id: u64,
    /// Where the owner runs, resolved from `cgroup_id` (or read back from a
    /// recording); `None` when unknown.
    pub placement: Option<Arc<Placement>>,
}

impl Owner {
    /// An owner known only by pid and name (tests, and old recordings).
    pub fn process(pid: u32, comm: &[u8], source: OwnerSource) -> Owner {
        Owner {
            pid,
            comm: comm.to_vec(),
            source,
            cgroup_id: 0,
            placement: None,
        }
    }
}

/// How the owner was found: JSON `owner_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnerSource {
    /// Seen in the kernel making a transition of the socket.
    Task,
    /// The process that accepted the connection.
    Accept,
    /// Inherited from the listening socket the connection arrived on.
    Listener,
    /// Found by the start-up scan (sock_diag and /proc).
    Scan,
}

impl OwnerSource {
    pub const ALL: [OwnerSource; 4] = [Self::Task, Self::Accept, Self::Listener, Self::Scan];

    pub fn name(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Accept => "accept",
            Self::Listener => "listener",
            Self::Scan => "scan",
        }
    }

    pub fn from_name(name: &str) -> Option<OwnerSource> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The kernel's `owner_source` number; `None` for unknown.
    pub fn from_kernel(source: u8) -> Option<OwnerSource> {
        match source {
            owner_source::TASK => Some(Self::Task),
            owner_source::ACCEPT => Some(Self::Accept),
            owner_source::LISTENER => Some(Self::Listener),
            owner_source::SCAN => Some(Self::Scan),
            _ => None,
        }
    }

    pub fn to_kernel(self) -> u8 {
        match self {
            Self::Task => owner_source::TASK,
            Self::Accept => owner_source::ACCEPT,
            Self::Listener => owner_source::LISTENER,
            Self::Scan => owner_source::SCAN,
        }
    }
}

/// Where an owner runs: its cgroup, and the service, container and pod that
/// cgroup's path names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Path below the cgroup v2 root, starting with `/`.
    pub cgroup: String,
    /// The innermost systemd service or scope, e.g. `nginx.service`.
    pub unit: Option<String>,
    /// A container id (64 hex digits) for docker, containerd, CRI-O and podman.
    pub container: Option<String>,
    /// A Kubernetes pod's uid, for `kubepods` cgroups.
    pub pod_uid: Option<String>,
}

/// Whether cgroup `path` is `subtree` or below it, by whole path components.
pub fn cgroup_within(path: &str, subtree: &str) -> bool {
    let subtree = subtree.trim_end_matches('/');
    subtree.is_empty()
        || path == subtree
        || path
            .strip_prefix(subtree)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_round_trip_through_names_and_kernel_numbers() {
        for source in OwnerSource::ALL {
            assert_eq!(OwnerSource::from_name(source.name()), Some(source));
            assert_eq!(OwnerSource::from_kernel(source.to_kernel()), Some(source));
        }
        assert_eq!(OwnerSource::from_kernel(owner_source::UNKNOWN), None);
        assert_eq!(OwnerSource::from_kernel(200), None);
        assert_eq!(OwnerSource::from_name("Task"), None);
    }
}
