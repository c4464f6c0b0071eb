//! Which integration tests run in the guests. Every test in
//! tcp-trace/tests runs there unless listed here, with the reason; the
//! list is checked against the binaries' own `--list`, so it cannot name a
//! test that no longer exists. README.md ("Tests in VMs") says the same.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

/// Which guests a host-only entry keeps a test out of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guests {
    /// Every guest.
    All,
    /// Guests whose kernel is older than this `(major, minor)`.
    Before(u32, u32),
}

/// A test (or with test `"*"`, a whole test binary) kept out of guests.
pub struct HostOnly {
    pub binary: &'static str,
    pub test: &'static str,
    pub guests: Guests,
    pub reason: &'static str,
}

impl HostOnly {
    /// Whether it keeps its tests out of a guest running `release`.
    pub fn applies(&self, release: &str) -> bool {
        match self.guests {
            Guests::All => true,
            Guests::Before(major, minor) => version(release).is_none_or(|k| k < (major, minor)),
        }
    }
}

const fn all(binary: &'static str, test: &'static str, reason: &'static str) -> HostOnly {
    HostOnly {
        binary,
        test,
        guests: Guests::All,
        reason,
    }
}

pub const HOST_ONLY: &[HostOnly] = &[
    all(
        "deploy",
        "*",
        "checks the systemd unit and Kubernetes manifests (systemd-analyze, python3, \
         kubernetes-validate): files, not the kernel",
    ),
    all(
        "fixtures",
        "*",
        "tests the test fixtures themselves (nginx, ab, runc, cgroups), not the agent",
    ),
    all(
        "nginx",
        "*",
        "needs nginx and ab; the kernel side of owners is covered by watch and doctor",
    ),
    all("containers", "*", "needs runc and a container image"),
    all(
        "owners",
        "*",
        "its helper processes are python3 scripts; the guest has no Python",
    ),
    all(
        "pid_reuse",
        "*",
        "its helper process is a python3 script; the guest has no Python",
    ),
    all(
        "serve",
        "prometheus_sees_the_traffic_the_test_made",
        "scrapes with a real Prometheus (and promtool)",
    ),
    all(
        "timewait",
        "sockets_of_another_network_namespace_are_confirmed_there",
        "its client in the namespace is python3",
    ),
    HostOnly {
        binary: "burst",
        test: "*",
        guests: Guests::Before(6, 7),
        reason: "asserts exact balance (received + dropped = made), which needs the kernel's \
                 count of skipped tracepoint runs (recursion_misses, Linux 6.7): on 6.1 \
                 skips go uncounted (the agent says so at start-up) and the 6.1 guest lost \
                 1 of 110,002 events uncounted in the one-thread burst, 46 in the 8-thread one",
    },
];

/// `(major, minor)` of a kernel release such as `6.1.0-56-amd64`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The tests of `binary` that stay out of a guest running `release`, or
/// `None` when all of them do.
pub fn skipped(binary: &str, release: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for entry in HOST_ONLY
        .iter()
        .filter(|e| e.binary == binary && e.applies(release))
    {
        if entry.test == "*" {
            return None;
        }
        names.push(entry.test.to_string());
    }
    Some(names)
}

/// The tests in a libtest binary, from `--list`.
pub fn list(binary: &Path) -> Result<BTreeSet<String>> {
    let out = Command::new(binary)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("running {} --list", binary.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", binary.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

/// Fails when HOST_ONLY names a binary or test that does not exist.
pub fn check(binaries: &[(String, BTreeSet<String>)]) -> Result<()> {
    for HostOnly {
        binary: bin, test, ..
    } in HOST_ONLY
    {
        let Some((_, tests)) = binaries.iter().find(|(name, _)| name == bin) else {
            bail!("vmtest's host-only list names test binary {bin}, which does not exist");
        };
        if *test != "*" && !tests.contains(*test) {
            bail!("vmtest's host-only list names {bin}::{test}, which does not exist");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_binaries_and_single_tests_stay_on_the_host() {
        assert_eq!(skipped("deploy", "6.12.117+deb12-amd64"), None);
        assert_eq!(
            skipped("serve", "6.1.0-56-amd64"),
            Some(vec!["prometheus_sees_the_traffic_the_test_made".to_string()])
        );
        assert_eq!(skipped("watch", "6.1.0-56-amd64"), Some(vec![]));
    }

    #[test]
    fn entries_for_older_kernels_apply_only_to_them() {
        assert_eq!(version("6.12.117+deb12-amd64"), Some((6, 12)));
        assert_eq!(skipped("burst", "6.1.0-56-amd64"), None);
        assert_eq!(skipped("burst", "6.12.117+deb12-amd64"), Some(vec![]));
        assert_eq!(skipped("burst", "garbage"), None);
    }

    #[test]
    fn a_stale_entry_is_an_error() {
        let mut binaries: Vec<(String, BTreeSet<String>)> = HOST_ONLY
            .iter()
            .map(|e| (e.binary.to_string(), BTreeSet::from([e.test.to_string()])))
            .collect();
        check(&binaries).unwrap();
        binaries.retain(|(b, _)| b != "timewait");
        binaries.push(("timewait".into(), BTreeSet::from(["renamed".to_string()])));
        let err = check(&binaries).unwrap_err().to_string();
        assert!(err.contains("timewait::sockets_of_another"), "{err}");
        binaries.retain(|(b, _)| b != "deploy");
        assert!(check(&binaries).is_err());
    }
}
