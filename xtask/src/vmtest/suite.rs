//! Which integration tests run in the guests. Every test in
//! tcp-trace/tests runs there unless `HOST_ONLY` keeps it out, with the
//! reason. `KNOWN` lists the failures these guests found that are not fixed
//! yet: they still run (apart), their failure is reported but does not fail
//! the run, and a deterministic one that passes fails it (take it off the
//! list). Both lists are checked against the binaries' own `--list`, so
//! they cannot name a test that no longer exists. README.md ("Tests on
//! Debian's kernels") says the same.

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
        guests_apply(self.guests, release)
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
    all(
        "doctor",
        "close_wait_pile_names_the_server_that_never_closes",
        "timing: its server holds each connection 8 s, and under TCG the agent's start and \
         eight closers outlast that (the server had closed them all: no CLOSE_WAIT left to \
         find, on 6.1 and 6.12, with one test thread or two); the rule is userspace logic",
    ),
    all(
        "doctor",
        "short_connections_and_timewait_pressure_name_the_client",
        "timing: its 300 connections must fit in a 4 s doctor run; under TCG 291 did",
    ),
    all(
        "top",
        "batch_counts_agree_with_ss_for_the_tests_port",
        "timing: its server holds each connection 8 s, and under TCG top's start and the \
         closers outlast that, so the scenario itself (checked with ss) is gone",
    ),
    HostOnly {
        binary: "timewait",
        test: "active_closers_are_charged_agree_with_ss_and_are_reaped",
        guests: Guests::Before(6, 7),
        reason: "allows unattributed closes only up to the dropped count, which needs the \
                 kernel's count of skipped tracepoint runs (Linux 6.7): the 6.1 guest lost \
                 4 of 70 closes uncounted",
    },
    HostOnly {
        binary: "burst",
        test: "transitions_the_kernel_skips_are_counted_so_the_totals_still_balance",
        guests: Guests::Before(6, 7),
        reason: "asserts exact balance (received + dropped = made) with concurrent bursts, \
                 which needs the kernel's count of skipped tracepoint runs (Linux 6.7): on 6.1 \
                 skips go uncounted (the agent says so at start-up); the 6.1 guest's 8-thread \
                 burst lost 106 of 110,002 events uncounted",
    },
];

/// A test that fails in some guests for a reason found and not fixed yet.
pub struct Known {
    pub binary: &'static str,
    pub test: &'static str,
    pub guests: Guests,
    /// Fails every time there: a pass means it was fixed.
    pub deterministic: bool,
    pub reason: &'static str,
}

pub const KNOWN: &[Known] = &[];

impl Known {
    pub fn applies(&self, release: &str) -> bool {
        guests_apply(self.guests, release)
    }
}

/// The known failures of `binary` in a guest running `release`.
pub fn known(binary: &str, release: &str) -> Vec<&'static Known> {
    KNOWN
        .iter()
        .filter(|k| k.binary == binary && k.applies(release))
        .collect()
}

fn guests_apply(guests: Guests, release: &str) -> bool {
    match guests {
        Guests::All => true,
        Guests::Before(major, minor) => version(release).is_none_or(|k| k < (major, minor)),
    }
}

/// Test binaries run a second time in each guest with
/// `TCP_TRACE_SOCKET_STORAGE=1` (as `--socket-storage` for every agent: the
/// BTF tracepoint program with socket storage), as `NAME@storage`: the tests
/// of what the kernel reports (sequences, owners, bytes, handshakes).
/// `capacity` runs both paths by itself.
pub const STORAGE: &[&str] = &["watch", "handshake"];

/// Test binaries run with one test thread in the guests (the others with
/// `--test-threads`), and why.
pub const ONE_THREAD: &[(&str, &str)] = &[(
    "stats_life",
    "compares two agents' quantiles within 3.2 % and durations within 150 ms: a test \
     running beside it under TCG pushed a 600 ms lifetime to 810 ms",
)];

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

/// Fails when HOST_ONLY or KNOWN names a binary or test that does not exist.
pub fn check(binaries: &[(String, BTreeSet<String>)]) -> Result<()> {
    let named = HOST_ONLY
        .iter()
        .map(|e| (e.binary, e.test))
        .chain(KNOWN.iter().map(|k| (k.binary, k.test)))
        .chain(STORAGE.iter().map(|b| (*b, "*")))
        .chain(ONE_THREAD.iter().map(|(b, _)| (*b, "*")));
    for (bin, test) in named {
        let Some((_, tests)) = binaries.iter().find(|(name, _)| name == bin) else {
            bail!("vmtest's lists name test binary {bin}, which does not exist");
        };
        if test != "*" && !tests.contains(test) {
            bail!("vmtest's lists name {bin}::{test}, which does not exist");
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
        let concurrent = "transitions_the_kernel_skips_are_counted_so_the_totals_still_balance";
        assert_eq!(
            skipped("burst", "6.1.0-56-amd64"),
            Some(vec![concurrent.to_string()])
        );
        assert_eq!(skipped("burst", "6.12.117+deb12-amd64"), Some(vec![]));
        assert_eq!(
            skipped("burst", "garbage"),
            Some(vec![concurrent.to_string()])
        );
        assert!(known("watch", "6.12.117+deb12-amd64").is_empty());
    }

    /// README.md's table names every host-only and known entry.
    #[test]
    fn the_readme_names_every_entry() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let names = HOST_ONLY
            .iter()
            .map(|e| (e.binary, e.test))
            .chain(KNOWN.iter().map(|k| (k.binary, k.test)));
        for (bin, test) in names {
            let name = if test == "*" {
                format!("`{bin}`")
            } else {
                format!("{bin}::{test}")
            };
            assert!(readme.contains(&name), "README.md does not name {name}");
        }
    }

    #[test]
    fn a_stale_entry_is_an_error() {
        let mut good: Vec<(String, BTreeSet<String>)> = Vec::new();
        for (bin, test) in HOST_ONLY
            .iter()
            .map(|e| (e.binary, e.test))
            .chain(KNOWN.iter().map(|k| (k.binary, k.test)))
            .chain(
                STORAGE
                    .iter()
                    .chain(ONE_THREAD.iter().map(|(b, _)| b))
                    .map(|b| (*b, "x")),
            )
        {
            match good.iter_mut().find(|(b, _)| b == bin) {
                Some((_, tests)) => {
                    tests.insert(test.to_string());
                }
                None => good.push((bin.to_string(), BTreeSet::from([test.to_string()]))),
            }
        }
        check(&good).unwrap();
        // Host-only tests renamed, a binary gone.
        for (bin, test) in [
            (
                "timewait",
                "sockets_of_another_network_namespace_are_confirmed_there",
            ),
            ("serve", "prometheus_sees_the_traffic_the_test_made"),
        ] {
            let mut stale = good.clone();
            for (b, tests) in &mut stale {
                if b == bin {
                    tests.remove(test);
                    tests.insert("renamed".into());
                }
            }
            let err = check(&stale).unwrap_err().to_string();
            assert!(err.contains(&format!("{bin}::{test}")), "{err}");
        }
        let mut stale = good.clone();
        stale.retain(|(b, _)| b != "deploy");
        assert!(check(&stale).unwrap_err().to_string().contains("deploy"));
    }
}
