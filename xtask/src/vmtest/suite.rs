//! Which integration tests run in the guests. Every test in
//! tcp-trace/tests runs there unless listed here, with the reason; the
//! list is checked against the binaries' own `--list`, so it cannot name a
//! test that no longer exists. README.md ("Tests in VMs") says the same.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

/// `(test binary, test name or "*" for all of it, why it stays on the host)`.
pub const HOST_ONLY: &[(&str, &str, &str)] = &[
    (
        "deploy",
        "*",
        "checks the systemd unit and Kubernetes manifests (systemd-analyze, python3, \
         kubernetes-validate): files, not the kernel",
    ),
    (
        "fixtures",
        "*",
        "tests the test fixtures themselves (nginx, ab, runc, cgroups), not the agent",
    ),
    (
        "nginx",
        "*",
        "needs nginx and ab (owners under a real server; the owner logic is kernel-independent \
         and owners/watch cover the kernel side)",
    ),
    ("containers", "*", "needs runc and a container image"),
    (
        "owners",
        "*",
        "its helper processes are python3 scripts; the guest has no Python",
    ),
    (
        "pid_reuse",
        "*",
        "its helper process is a python3 script; the guest has no Python",
    ),
    (
        "serve",
        "prometheus_sees_the_traffic_the_test_made",
        "scrapes with a real Prometheus (and promtool)",
    ),
    (
        "timewait",
        "sockets_of_another_network_namespace_are_confirmed_there",
        "its client in the namespace is python3",
    ),
];

/// The tests of `binary` that stay on the host, or `None` when all do.
pub fn skipped(binary: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for (bin, test, _) in HOST_ONLY {
        if *bin == binary {
            if *test == "*" {
                return None;
            }
            names.push(test.to_string());
        }
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
    for (bin, test, _) in HOST_ONLY {
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
        assert_eq!(skipped("deploy"), None);
        assert_eq!(
            skipped("serve"),
            Some(vec!["prometheus_sees_the_traffic_the_test_made".to_string()])
        );
        assert_eq!(skipped("burst"), Some(vec![]));
    }

    #[test]
    fn a_stale_entry_is_an_error() {
        let mut binaries: Vec<(String, BTreeSet<String>)> = HOST_ONLY
            .iter()
            .map(|(bin, test, _)| (bin.to_string(), BTreeSet::from([test.to_string()])))
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
