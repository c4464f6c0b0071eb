//! What `--by` groups sockets by, and the name each group gets.

use std::net::IpAddr;

use clap::ValueEnum;

use crate::model::Owner;

/// How `stats` and `handshake` group their figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GroupBy {
    /// The owning process (pid and comm).
    Process,
    /// The local port.
    Lport,
    /// The remote port.
    Rport,
    /// The remote address.
    Raddr,
    /// The owner's container id (docker, containerd, CRI-O, podman).
    Container,
    /// The owner's systemd service or scope.
    Unit,
    /// The owner's cgroup v2 path.
    Cgroup,
}

impl GroupBy {
    /// The flag value, as reports name the grouping.
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Process => "process",
            GroupBy::Lport => "lport",
            GroupBy::Rport => "rport",
            GroupBy::Raddr => "raddr",
            GroupBy::Container => "container",
            GroupBy::Unit => "unit",
            GroupBy::Cgroup => "cgroup",
        }
    }
}

/// The name of the group a socket belongs to under `--by`. A process is
/// named by its own bytes (invalid UTF-8 replaced), as JSON carries it; text
/// output escapes it for the terminal. Sockets of unknown owners group as
/// `unknown`; known owners outside any container or unit as `none`.
pub fn group_name(
    by: GroupBy,
    owner: Option<&Owner>,
    lport: u16,
    rport: u16,
    raddr: IpAddr,
) -> String {
    match by {
        GroupBy::Process => match owner {
            Some(o) => format!("{} {}", o.pid, String::from_utf8_lossy(&o.comm)),
            None => "unknown".to_string(),
        },
        GroupBy::Lport => lport.to_string(),
        GroupBy::Rport => rport.to_string(),
        GroupBy::Raddr => raddr.to_string(),
        GroupBy::Container | GroupBy::Unit | GroupBy::Cgroup => {
            let Some(owner) = owner else {
                return "unknown".to_string();
            };
            let Some(placement) = owner.placement.as_deref() else {
                return "unknown".to_string();
            };
            let name = match by {
                GroupBy::Container => placement.container.as_deref(),
                GroupBy::Unit => placement.unit.as_deref(),
                _ => Some(placement.cgroup.as_str()),
            };
            name.unwrap_or("none").to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{from_event, sample_event};

    #[test]
    fn group_names() {
        let t = from_event(&sample_event()).unwrap();
        let name = |by, owner| group_name(by, owner, t.lport, t.rport, t.raddr);
        assert_eq!(name(GroupBy::Process, t.owner.as_ref()), "4242 curl");
        assert_eq!(name(GroupBy::Process, None), "unknown");
        assert_eq!(name(GroupBy::Raddr, None), "10.1.2.3");
        assert_eq!(name(GroupBy::Lport, None), "45678");
        assert_eq!(GroupBy::Rport.name(), "rport");
        let hostile = Owner::process(7, b"\x1b[2Jx", crate::model::OwnerSource::Task);
        assert_eq!(name(GroupBy::Process, Some(&hostile)), "7 \u{1b}[2Jx");
    }

    #[test]
    fn placement_groups() {
        let t = from_event(&sample_event()).unwrap();
        let name = |by, owner: Option<&Owner>| group_name(by, owner, t.lport, t.rport, t.raddr);
        let mut owner = t.owner.clone().unwrap();
        for by in [GroupBy::Container, GroupBy::Unit, GroupBy::Cgroup] {
            assert_eq!(name(by, None), "unknown");
            assert_eq!(name(by, Some(&owner)), "unknown", "no placement resolved");
        }
        owner.placement = Some(std::sync::Arc::new(crate::model::Placement {
            cgroup: "/system.slice/docker-ab.scope".into(),
            unit: Some("docker-ab.scope".into()),
            container: Some("ab".into()),
            pod_uid: None,
        }));
        assert_eq!(name(GroupBy::Container, Some(&owner)), "ab");
        assert_eq!(name(GroupBy::Unit, Some(&owner)), "docker-ab.scope");
        assert_eq!(
            name(GroupBy::Cgroup, Some(&owner)),
            "/system.slice/docker-ab.scope"
        );
        owner.placement = Some(std::sync::Arc::new(crate::model::Placement {
            cgroup: "/".into(),
            ..Default::default()
        }));
        assert_eq!(name(GroupBy::Container, Some(&owner)), "none");
        assert_eq!(name(GroupBy::Unit, Some(&owner)), "none");
    }
}
