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
}

impl GroupBy {
    /// The flag value, as reports name the grouping.
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Process => "process",
            GroupBy::Lport => "lport",
            GroupBy::Rport => "rport",
            GroupBy::Raddr => "raddr",
        }
    }
}

/// The name of the group a socket belongs to under `--by`. A process is
/// named by its own bytes (invalid UTF-8 replaced), as JSON carries it; text
/// output escapes it for the terminal.
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
}
