//! Debian's kernels for the guests: found with apt-cache, fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` (never installed on
//! the host), reduced to what a guest boots: the ELF vmlinux and the modules
//! the tests load. Cached in `~/.cache/tcp-trace/vm/PACKAGE`, outside
//! target/, so `cargo clean` does not fetch them again.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::bzimage;
use crate::setup::output;

/// The kernel series the guests boot, as `--kernel` names them.
pub const SERIES: [&str; 2] = ["6.1", "6.12"];

/// Modules the guest loads, with what needs them; each one's dependencies
/// (the `depends=` of its `.modinfo`) load first. A module the kernel has
/// built in (modules.builtin) is skipped.
pub const MODULES: &[(&str, &str)] = &[
    ("virtio_pci", "the 9p share's PCI transport"),
    ("9pnet_virtio", "the 9p share"),
    (
        "9p",
        "the 9p share: the host's target/ dir, holding the tests",
    ),
    (
        "inet_diag",
        "sock_diag: the agent's start-up scan and timewait, ss",
    ),
    ("tcp_diag", "sock_diag for TCP"),
    ("veth", "the network namespace tests' veth pairs"),
    (
        "crc32c_generic",
        "the crc32c that libcrc32c (for nf_tables) asks the crypto API for (a softdep)",
    ),
    ("nf_tables", "nft: the tests that drop chosen packets"),
    (
        "nft_quota",
        "nft: `quota until N bytes`, to drop only a first packet",
    ),
];

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: String,
    pub package: String,
    /// What `uname -r` says in the guest.
    pub release: String,
    pub vmlinux: PathBuf,
    /// The modules to load, dependencies first, as uncompressed `.ko` files.
    pub modules: Vec<PathBuf>,
}

/// The package of `series`: for 6.1 the one bookworm's `linux-image-amd64`
/// depends on, for 6.12 the newest `linux-image-6.12.N+deb12-amd64`. A
/// machine whose package lists are empty (a fresh container) gets them once.
pub fn package_for(series: &str) -> Result<String> {
    match find_package(series) {
        Ok(found) => Ok(found),
        Err(_) => {
            output(Command::new("apt-get").args(["update", "-qq"]))?;
            find_package(series)
        }
    }
}

fn find_package(series: &str) -> Result<String> {
    let found = match series {
        "6.1" => {
            let depends = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
            metapackage_target(&depends).filter(|p| p.starts_with("linux-image-6.1."))
        }
        "6.12" => {
            let names = output(Command::new("apt-cache").args([
                "search",
                "--names-only",
                r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
            ]))?;
            newest_612(&names)
        }
        other => bail!("no kernel series {other} (known: {})", SERIES.join(", ")),
    };
    found.with_context(|| {
        format!("apt-cache knows no Debian {series} kernel package (run apt-get update?)")
    })
}

/// The `linux-image-*` package that `apt-cache depends linux-image-amd64` names.
fn metapackage_target(depends: &str) -> Option<String> {
    depends.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends: ")?;
        (name.starts_with("linux-image-") && name.ends_with("-amd64")).then(|| name.to_string())
    })
}

/// The highest `linux-image-6.12.N+deb12-amd64` in `apt-cache search` output.
fn newest_612(search: &str) -> Option<String> {
    search
        .lines()
        .filter_map(|line| {
            let name = line.split(" - ").next()?.trim();
            let n: u32 = name
                .strip_prefix("linux-image-6.12.")?
                .strip_suffix("+deb12-amd64")?
                .parse()
                .ok()?;
            Some((n, name.to_string()))
        })
        .max()
        .map(|(_, name)| name)
}

/// Fetches, unpacks and caches `series` unless the cache has it.
pub fn prepare(series: &str, cache: &Path) -> Result<Kernel> {
    let package = package_for(series)?;
    let dir = cache.join(&package);
    let stamp = dir.join("complete");
    if !stamp.exists() {
        fetch(&package, &dir).with_context(|| format!("preparing {package}"))?;
        fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
    }
    let release = fs::read_to_string(dir.join("release"))?.trim().to_string();
    let order = fs::read_to_string(dir.join("modules/order"))?;
    let modules = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|name| dir.join("modules").join(format!("{name}.ko")))
        .collect();
    Ok(Kernel {
        series: series.to_string(),
        package,
        release,
        vmlinux: dir.join("vmlinux"),
        modules,
    })
}

fn fetch(package: &str, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    let download = dir.join("download");
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    eprintln!("xtask: vmtest: apt-get download {package}");
    let fetched = output(
        Command::new("apt-get")
            .args(["download", "-q", package])
            .current_dir(&download),
    );
    if fetched.is_err() {
        // The index may name a file the mirror has since replaced.
        output(Command::new("apt-get").args(["update", "-qq"]))?;
        output(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&download),
        )?;
    }
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = dir.join("root");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;

    let release = package
        .strip_prefix("linux-image-")
        .context("not a linux-image package")?;
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let compression = bzimage::extract_vmlinux(&vmlinuz, &dir.join("vmlinux"))?;
    eprintln!("xtask: vmtest: {package}: vmlinux unpacked from its {compression:?} bzImage");
    fs::write(dir.join("release"), release)?;

    let moddir = root.join("lib/modules").join(release);
    // The package ships no modules.dep (depmod writes it at install): each
    // module's own `depends=` says what it needs.
    let builtin = fs::read_to_string(moddir.join("modules.builtin"))?;
    let mut files = BTreeMap::new();
    index_modules(&moddir.join("kernel"), &mut files)?;
    let wanted: Vec<&str> = MODULES.iter().map(|(m, _)| *m).collect();
    let mut loaded = BTreeMap::new();
    let order = load_order(&wanted, &builtin, |name| {
        let path = files.get(name)?;
        let ko = read_module(path).ok()?;
        let deps = modinfo_depends(&ko);
        loaded.insert(name.to_string(), ko);
        Some(deps)
    })?;
    let out = dir.join("modules");
    fs::create_dir_all(&out)?;
    let mut names = String::new();
    for name in &order {
        fs::write(out.join(format!("{name}.ko")), &loaded[name])?;
        names.push_str(name);
        names.push('\n');
    }
    fs::write(out.join("order"), names)?;
    // The unpacked package is 400 MB; the guest needs only what was taken.
    fs::remove_dir_all(&root)?;
    fs::remove_dir_all(&download)?;
    Ok(())
}

/// A module's name from its file name or path (`kernel/fs/9p/9p.ko.xz` -> `9p`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Every module file below `dir`, by module name.
fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if name.contains(".ko") {
                files.insert(module_name(name), path);
            }
        }
    }
    Ok(())
}

/// A module file, uncompressed (6.1 ships `.ko`, 6.12 `.ko.xz`).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        bzimage::decompress(bzimage::Compression::Xz, &bytes)
    } else if name.ends_with(".zst") {
        bzimage::decompress(bzimage::Compression::Zstd, &bytes)
    } else {
        Ok(bytes)
    }
}

/// The `depends=` of a module: the names in its ELF `.modinfo` section.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let Some(modinfo) = elf_section(ko, ".modinfo") else {
        return Vec::new();
    };
    modinfo
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(b"depends="))
        .map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

/// The contents of section `name` of a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let u16_at =
        |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?) as usize);
    let u32_at =
        |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?) as usize);
    let u64_at =
        |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?) as usize);
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let section = |i: usize| -> Option<(usize, &'a [u8])> {
        let at = shoff + i * shentsize;
        let (off, size) = (u64_at(at + 0x18)?, u64_at(at + 0x20)?);
        Some((u32_at(at)?, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_at, data) = section(i)?;
        let rest = names.get(name_at..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        (&rest[..end] == name.as_bytes()).then_some(data)
    })
}

/// The modules to load for `wanted`, each after its dependencies, each
/// once; `depends` gives a module's dependencies, `None` when the kernel has
/// no such module file.
fn load_order(
    wanted: &[&str],
    builtin: &str,
    mut depends: impl FnMut(&str) -> Option<Vec<String>>,
) -> Result<Vec<String>> {
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    fn visit(
        name: &str,
        builtin: &BTreeSet<String>,
        depends: &mut dyn FnMut(&str) -> Option<Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let needs = depends(name).with_context(|| {
            format!("the kernel has module {name} neither built in nor as a module file")
        })?;
        for need in &needs {
            visit(need, builtin, depends, seen, order)?;
        }
        order.push(name.to_string());
        Ok(())
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for name in wanted {
        visit(name, &builtin, &mut depends, &mut seen, &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_6_1_package_is_what_the_metapackage_depends_on() {
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            metapackage_target(depends).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(metapackage_target("linux-image-amd64\n"), None);
    }

    #[test]
    fn the_6_12_package_is_the_newest_by_number_not_by_text() {
        let search = "linux-image-6.12.9+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)\n\
             linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)\n\
             linux-image-6.12.41+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)\n\
             linux-image-6.12.200+deb12-rt-amd64 - Linux 6.12 PREEMPT_RT\n";
        assert_eq!(
            newest_612(search).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(newest_612(""), None);
    }

    #[test]
    fn modules_load_after_their_dependencies_and_built_ins_are_skipped() {
        let deps: BTreeMap<&str, &[&str]> = BTreeMap::from([
            ("9p", &["9pnet", "netfs"][..]),
            ("9pnet", &[][..]),
            ("netfs", &["fscache"][..]),
            ("fscache", &[][..]),
            ("9pnet_virtio", &["9pnet", "virtio_ring"][..]),
            ("nft_quota", &["nf_tables"][..]),
            ("nf_tables", &["nfnetlink"][..]),
            ("nfnetlink", &[][..]),
        ]);
        let lookup = |name: &str| {
            deps.get(name)
                .map(|d| d.iter().map(|s| s.to_string()).collect())
        };
        let builtin = "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio_ring.ko\n";
        let order = load_order(
            &["virtio_pci", "9pnet_virtio", "9p", "nft_quota", "nf_tables"],
            builtin,
            lookup,
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "9pnet",
                "9pnet_virtio",
                "fscache",
                "netfs",
                "9p",
                "nfnetlink",
                "nf_tables",
                "nft_quota"
            ]
        );
        let err = load_order(&["nope"], builtin, lookup).unwrap_err();
        assert!(err.to_string().contains("module nope"), "{err}");
    }

    /// The section reader on an ELF file made here (`vmtest` itself reads
    /// the real modules: a wrong reading fails the guest's insmod).
    #[test]
    fn depends_come_from_the_modinfo_section() {
        // A minimal ELF64 with a section-name table and a .modinfo section.
        let names = b"\0.shstrtab\0.modinfo\0";
        let modinfo = b"license=GPL\0depends=9pnet,netfs\0intree=Y\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_at = elf.len();
        elf.extend_from_slice(names);
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, names_at, names.len()),
            (11, modinfo_at, modinfo.len()),
        ] {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        }
        assert_eq!(modinfo_depends(&elf), ["9pnet", "netfs"]);
        assert_eq!(modinfo_depends(b"not elf"), Vec::<String>::new());
    }
}
