//! Cgroup v2 ids, as the kernel program records them, to where their
//! processes run: the cgroup's path, systemd unit, container and pod.

mod mount;
mod path;
mod resolver;

use std::fs;

use anyhow::{Context, Result};

pub use self::{mount::CgroupFs, path::placement_of, resolver::Cgroups};

/// The cgroup v2 path of process `pid`; `None` when it has none (a host
/// with cgroup v1 only).
pub fn proc_cgroup(pid: u32) -> Result<Option<String>> {
    let file = format!("/proc/{pid}/cgroup");
    let contents = fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    Ok(v2_path(&contents))
}

/// The path on the `0::PATH` line: the v2 hierarchy is numbered 0 and
/// lists no controllers. A removed cgroup's path ends ` (deleted)`.
fn v2_path(proc_cgroup: &str) -> Option<String> {
    let path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?;
    Some(path.strip_suffix(" (deleted)").unwrap_or(path).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_line_of_a_hybrid_host() {
        let hybrid = "\
9:name=systemd:/user.slice/user-1000.slice/session-2.scope
4:memory:/user.slice/user-1000.slice
1:cpu:/
0::/user.slice/user-1000.slice/session-2.scope
";
        let path = v2_path(hybrid);
        assert_eq!(
            path.as_deref(),
            Some("/user.slice/user-1000.slice/session-2.scope")
        );
    }

    #[test]
    fn the_one_line_of_a_pure_v2_host() {
        assert_eq!(
            v2_path("0::/system.slice/nginx.service\n").as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(v2_path("0::/").as_deref(), Some("/"));
    }

    #[test]
    fn none_on_a_pure_v1_host() {
        assert_eq!(v2_path("4:memory:/docker/abc\n1:cpu:/docker/abc\n"), None);
        assert_eq!(v2_path(""), None);
    }

    #[test]
    fn a_removed_cgroup_keeps_its_path() {
        let path = v2_path("0::/system.slice/gone.service (deleted)\n");
        assert_eq!(path.as_deref(), Some("/system.slice/gone.service"));
    }

    #[test]
    fn this_process_and_no_process() {
        let own = proc_cgroup(std::process::id()).unwrap().unwrap();
        assert!(own.starts_with('/'), "{own}");
        let err = proc_cgroup(u32::MAX).unwrap_err();
        assert!(format!("{err:#}").contains(&format!("/proc/{}/cgroup", u32::MAX)));
    }
}
