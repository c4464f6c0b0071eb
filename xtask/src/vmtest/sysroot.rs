//! The host's programs the guest runs, with their shared libraries: the
//! tools the tests call (iproute2, nftables, setpriv), and the libraries of
//! the host-built test binaries and agent, which run from the 9p share.
//! Each library goes to the path the host's loader resolved it to (as `ldd`
//! prints it), so the guest's loader finds it in its default directories.

use std::{
    collections::BTreeSet,
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::cpio::Archive;

/// The host programs carried into the guest, by command, with the Debian
/// package that provides them and the tests that call them. They go to
/// /usr/local/sbin, first on the guest's PATH, ahead of busybox's applets of
/// the same names.
pub const TOOLS: &[(&str, &str, &str)] = &[
    (
        "ip",
        "iproute2",
        "network namespaces and veth pairs (timewait, top)",
    ),
    (
        "ss",
        "iproute2",
        "agreement with the kernel's socket table (timewait, top)",
    ),
    (
        "nft",
        "nftables",
        "dropping chosen packets (handshake, watch, doctor, serve)",
    ),
    (
        "setpriv",
        "util-linux",
        "running the agent as nobody with chosen capabilities (faults, watch)",
    ),
];

/// Where `command` is on the host's PATH (or /usr/sbin, /sbin).
pub fn which(command: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

/// The shared objects `ldd` names for `binary`, loader included; none for a
/// static binary.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", binary.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once(" => ") {
            Some((name, rest)) => {
                let path = rest.split(" (").next().unwrap_or("").trim();
                if path == "not found" {
                    bail!("{name} not found");
                }
                path
            }
            // The loader, or the vDSO (no path).
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Adds the tools at /usr/local/sbin and the libraries of the tools and of
/// `binaries` (which stay on the share) at their host paths.
pub fn add(archive: &mut Archive, binaries: &[PathBuf]) -> Result<Vec<String>> {
    let mut libs = BTreeSet::new();
    let mut carried = Vec::new();
    for (command, package, _) in TOOLS {
        let path = which(command).with_context(|| {
            format!("{command} is not installed (Debian package {package}; cargo xtask setup installs it)")
        })?;
        let data = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        archive.file(&format!("/usr/local/sbin/{command}"), 0o755, &data)?;
        libs.extend(libraries(&path)?);
        carried.push(format!("{command} ({})", path.display()));
    }
    for binary in binaries {
        libs.extend(libraries(binary)?);
    }
    for lib in &libs {
        let data = fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        let mode = fs::metadata(lib)?.permissions().mode();
        archive.file(&lib.to_string_lossy(), mode, &data)?;
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_paths_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2b)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2b)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f2b)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn a_real_binary_needs_libc_and_the_loader() {
        let libs = libraries(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
