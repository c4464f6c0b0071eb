//! `cargo xtask setup`: the nightly's rust-src, a bpf-linker built against
//! the nightly toolchain's own libLLVM, cargo-fuzz and cargo-deb, cached
//! outside target/; the Debian packages and the Python package the tests call.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Validates the Kubernetes manifests offline (tests/deploy.rs); each release
/// bundles the schemas of the Kubernetes versions up to its own.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// What later steps need from the set-up.
pub struct Tools {
    /// PATH with the directories of bpf-linker, cargo-fuzz and cargo-deb first.
    pub path: OsString,
}

pub fn setup() -> Result<Tools> {
    ensure_rust_src()?;
    ensure_packages()?;
    ensure_vm_packages()?;
    ensure_kubernetes_validate()?;
    let bin = ensure_bpf_linker()?;
    let fuzz = ensure_cargo_tool("cargo-fuzz", CARGO_FUZZ_VERSION)?;
    let deb = ensure_cargo_tool("cargo-deb", CARGO_DEB_VERSION)?;
    let mut paths = vec![bin, fuzz, deb];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    Ok(Tools {
        path: env::join_paths(paths).context("building PATH")?,
    })
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("is the nightly toolchain installed? (`rustup toolchain list`)")?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    output(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok(())
}

/// Debian packages the tests need, by the command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    // The owner tests' real-world servers, load, and container: nginx-light
    // is Debian's small flavour (it pulls in the `nginx` package, which holds
    // /usr/sbin/nginx); busybox-static is the only binary a container rootfs
    // needs (the dynamic `busybox` package would need its libc copied too).
    ("nginx", "nginx-light"),
    ("ab", "apache2-utils"),
    ("runc", "runc"),
    ("busybox", "busybox-static"),
    // The deployment test: systemd-analyze checks the unit, kubernetes-validate
    // (installed by pip, below) the manifests.
    ("systemd-analyze", "systemd"),
    ("python3", "python3"),
    ("pip3", "python3-pip"),
    // The serve test scrapes the agent with a real Prometheus, and checks the
    // page with its promtool.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // The package: cargo-deb finds its libc dependency with dpkg-shlibdeps,
    // and its test looks the installed man page up with `man -w`.
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("man", "man-db"),
];

/// Where Debian's invoke-rc.d asks whether a package's maintainer script may
/// start or restart a service; exit code 101 means "no".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

fn on_path(command: &str) -> bool {
    let extra = ["/usr/sbin", "/sbin"].map(PathBuf::from);
    env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .chain(extra)
        .any(|dir| dir.join(command).is_file())
}

/// The packages of `(command, package)` pairs whose command is missing.
fn missing(packages: &[(&str, &'static str)]) -> Vec<&'static str> {
    packages
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect()
}

fn ensure_packages() -> Result<()> {
    let missing = missing(PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    output(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update (the tests need root)")?;
    // nginx's postinst starts the system nginx (listening on port 80 with
    // Debian's default site) through invoke-rc.d whenever it can: on a host
    // booted with systemd or sysvinit it would be left running, in the way of
    // nothing but serving a port nobody asked for; where no init tells the
    // runlevel (a container, this kind of machine) invoke-rc.d gives up with
    // "could not determine current runlevel" and starts nothing. The tests
    // run nginx of their own with their own configs, so for the install no
    // service may start: a policy-rc.d that says no (101), written only when
    // the host has none, and removed afterwards.
    let policy = ServicesHeld::new()?;
    let installed = output(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")));
    drop(policy);
    installed?;
    if missing.contains(&"nginx-light") {
        stop_system_nginx();
    }
    Ok(())
}

/// What `cargo xtask vmtest` needs on the host (QEMU, busybox, the
/// decompressors for Debian's kernels), without Recommends: QEMU's pull in
/// a desktop's worth of packages the headless TCG guests never use.
fn ensure_vm_packages() -> Result<()> {
    let missing = missing(crate::vmtest::HOST_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {} (for vmtest)", missing.join(" "));
    output(Command::new("apt-get").args(["update", "-qq"]))
        .context("apt-get update (the tests need root)")?;
    output(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {}", missing.join(" ")))?;
    Ok(())
}

/// A policy-rc.d that forbids starting services, present while it lives; a
/// host's own policy-rc.d is left as it is.
struct ServicesHeld {
    written: bool,
}

impl ServicesHeld {
    fn new() -> Result<ServicesHeld> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(ServicesHeld { written: false });
        }
        fs::write(
            path,
            "#!/bin/sh\n# Written by `cargo xtask setup` while it installs packages.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(ServicesHeld { written: true })
    }
}

impl Drop for ServicesHeld {
    fn drop(&mut self) {
        if self.written {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}

/// Stops the system nginx that a package install started anyway (a host
/// policy-rc.d that allowed it, or a service manager that ignores it), so
/// no nginx of Debian's default site is left on port 80.
fn stop_system_nginx() {
    let Ok(pid) = fs::read_to_string("/run/nginx.pid") else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    eprintln!("xtask: stopping the system nginx (pid {pid}) that installing nginx-light started");
    // SIGQUIT: nginx's graceful stop.
    // SAFETY: sending a signal to a pid read from nginx's own pid file.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
}

/// kubernetes-validate, pinned, in the `python3` the tests call; asking its
/// version costs one interpreter start when it is already there.
fn ensure_kubernetes_validate() -> Result<()> {
    let installed = Command::new("python3")
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('kubernetes-validate'))",
        ])
        .output()
        .context("running python3 (the deployment test needs it)")?;
    if String::from_utf8_lossy(&installed.stdout).trim() == KUBERNETES_VALIDATE_VERSION {
        return Ok(());
    }
    eprintln!("xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION}");
    output(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!(
                "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
            ))
            // Debian's own python3 marks itself externally managed (PEP 668)
            // and refuses root installs without this; others ignore it.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )
    .context("is pip installed for python3? (Debian: apt-get install python3-pip)")?;
    Ok(())
}

fn cache_dir() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("tcp-trace"))
}

/// The nightly's libLLVM: its path and LLVM major version.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` names no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let file = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib.display()))?;
    Ok((file, major))
}

/// Returns the directory holding a working bpf-linker, building it if needed.
fn ensure_bpf_linker() -> Result<PathBuf> {
    let cache = cache_dir()?;
    let (libllvm, major) = nightly_llvm()?;
    let llvm_name = libllvm.file_name().expect("a file").to_owned();
    // One build per (bpf-linker version, libLLVM file): a new nightly rebuilds it.
    let stamp = format!("{BPF_LINKER_VERSION} {}", llvm_name.to_string_lossy());
    let root = cache.join("bpf-linker");
    let bin = root.join("bin");
    let stamp_file = root.join("stamp");
    let works = || {
        Command::new(bin.join("bpf-linker"))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) && works() {
        return Ok(bin);
    }

    // bpf-linker links libLLVM from LLVM_PREFIX/lib, and keeps that path as
    // its rpath, so the prefix lives in the cache next to it.
    let prefix = cache.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in [OsString::from("libLLVM.so"), llvm_name] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)");
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() || !works() {
        bail!("building bpf-linker failed");
    }
    fs::write(&stamp_file, stamp).with_context(|| format!("writing {}", stamp_file.display()))?;
    Ok(bin)
}

/// Returns the directory holding `cargo-NAME` at the pinned `version`
/// (cargo-fuzz for the fuzz pass, cargo-deb for the package), installing it
/// into the cache if needed.
fn ensure_cargo_tool(name: &str, version: &str) -> Result<PathBuf> {
    let root = cache_dir()?.join(name);
    let bin = root.join("bin");
    let installed = Command::new(bin.join(name))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == format!("{name} {version}"));
    if installed {
        return Ok(bin);
    }
    eprintln!("xtask: installing {name} {version} (a minute or two)");
    let status = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["install", name, "--locked", "--force", "--version", version])
        .arg("--root")
        .arg(&root)
        .status()
        .with_context(|| format!("running cargo install {name}"))?;
    if !status.success() {
        bail!("installing {name} {version} failed");
    }
    Ok(bin)
}
