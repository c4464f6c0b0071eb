//! `cargo xtask deb`: the Debian package, made by cargo-deb from the release
//! build (configured in tcp-trace/Cargo.toml), and its test: install it with
//! dpkg, check what it put where, run it, remove it, purge it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::setup::Tools;

const PACKAGE: &str = "tcp-trace";
const INSTALLED_BINARY: &str = "/usr/bin/tcp-trace";
/// The agent's unit, which the package installs; cargo-deb would only warn
/// if it were missing.
const UNIT: &str = "deploy/systemd/tcp-trace.service";
/// Where `tcp-trace generate-assets` writes the man pages and completions
/// that the package's assets name.
const GENERATED_ASSETS: &str = "target/deb-assets";
const MAN_DIR: &str = "/usr/share/man/man1";
const COMPLETIONS: [&str; 3] = [
    "/usr/share/bash-completion/completions/tcp-trace",
    "/usr/share/zsh/vendor-completions/_tcp-trace",
    "/usr/share/fish/vendor_completions.d/tcp-trace.fish",
];
const UNIT_INSTALLED: &str = "/usr/lib/systemd/system/tcp-trace.service";
const POSTINST: &str = "/var/lib/dpkg/info/tcp-trace.postinst";
const README_INSTALLED: &str = "/usr/share/doc/tcp-trace/README.md";
/// Enabling the unit links it into a `*.wants` directory here; removing the
/// package masks it here (a link to /dev/null) until the package is purged.
const SYSTEMD_ADMIN_DIR: &str = "/etc/systemd/system";

/// Packages the release build (target/release/tcp-trace, which the caller
/// has made) and returns the path of the .deb.
pub fn build_deb(root: &Path, tools: &Tools) -> Result<PathBuf> {
    let started = Instant::now();
    let unit = root.join(UNIT);
    if !unit.is_file() {
        bail!(
            "{} is missing: the package installs the agent's systemd unit from there",
            unit.display()
        );
    }
    let assets = root.join(GENERATED_ASSETS);
    run(Command::new(root.join("target/release/tcp-trace"))
        .arg("generate-assets")
        .arg(&assets))?;
    // --no-build: the binary is the release build that the tests run.
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let printed = run(Command::new(cargo)
        .args(["deb", "--package", PACKAGE, "--no-build"])
        .current_dir(root)
        .env("PATH", &tools.path))?;
    // cargo-deb prints the path of the package it wrote, alone on a line.
    let deb = printed
        .lines()
        .rev()
        .map(|line| root.join(line.trim()))
        .find(|path| path.extension().is_some_and(|e| e == "deb") && path.is_file())
        .with_context(|| format!("cargo deb named no .deb it wrote: {printed:?}"))?;
    println!(
        "xtask: built {} in {:.1} s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(deb)
}

/// Installs `deb` with `dpkg -i`, checks the installed files and the binary,
/// removes it with `dpkg -r` and checks that its files are gone, then purges
/// it and checks that dpkg has forgotten it. Refuses to run where dpkg knows
/// a tcp-trace package already, or a tcp-trace binary was installed by hand.
pub fn test_deb(root: &Path, deb: &Path) -> Result<()> {
    let started = Instant::now();
    if let Some(status) = package_status()? {
        bail!(
            "dpkg has a {PACKAGE} package already (status: {status}); this test installs and \
             purges its own, so remove that one first (`dpkg --purge {PACKAGE}`)"
        );
    }
    if Path::new(INSTALLED_BINARY).exists() {
        bail!("{INSTALLED_BINARY} exists but no package owns it; installing would overwrite it");
    }
    let installed = Installed::new(deb)?;
    let files = installed.files()?;
    check_installed(root)?;
    installed.remove(&files)?;
    println!(
        "xtask: the package installed, ran, and removed and purged cleanly ({} files) in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The package installed by `dpkg -i`; purged when dropped unless `remove`
/// did it, so that a failed install or check leaves no package behind.
struct Installed {
    removed: bool,
}

impl Installed {
    fn new(deb: &Path) -> Result<Installed> {
        println!("xtask: dpkg -i {}", deb.display());
        // Made first, so that a half-done install is purged too.
        let installed = Installed { removed: false };
        run(Command::new("dpkg").arg("-i").arg(deb)).context("installing the package")?;
        Ok(installed)
    }

    /// The regular files the package installed, as `dpkg -L` lists them.
    fn files(&self) -> Result<Vec<PathBuf>> {
        let listed = run(Command::new("dpkg").args(["-L", PACKAGE]))?;
        Ok(listed
            .lines()
            .map(PathBuf::from)
            .filter(|path| path.is_file())
            .collect())
    }

    /// `dpkg -r`, which must take every file in `files` away, then `dpkg
    /// --purge`, which must leave dpkg no record and systemd no mask.
    fn remove(mut self, files: &[PathBuf]) -> Result<()> {
        println!("xtask: dpkg -r {PACKAGE}");
        run(Command::new("dpkg").args(["-r", PACKAGE])).context("removing the package")?;
        let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
        if !left.is_empty() {
            bail!("`dpkg -r {PACKAGE}` left the package's files behind: {left:?}");
        }
        // Its maintainer scripts keep it known, for the purge to unmask the unit.
        let status = package_status()?;
        if status.as_deref().is_some_and(|s| s != "config-files") {
            bail!("after `dpkg -r {PACKAGE}` dpkg has it as {status:?}, not removed");
        }
        println!("xtask: dpkg --purge {PACKAGE}");
        run(Command::new("dpkg").args(["--purge", PACKAGE])).context("purging the package")?;
        self.removed = true;
        if let Some(status) = package_status()? {
            bail!("after `dpkg --purge {PACKAGE}` dpkg still has it as {status}");
        }
        let mask = Path::new(SYSTEMD_ADMIN_DIR).join("tcp-trace.service");
        if mask.symlink_metadata().is_ok() {
            bail!("purging left {} behind", mask.display());
        }
        Ok(())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.removed {
            eprintln!("xtask: purging the package after the failure");
            let _ = Command::new("dpkg")
                .args(["--purge", PACKAGE])
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// What the installed package must hold: the binary of this version, a man
/// page for each generated one, the completions, README, and the unit, with
/// a postinst that reloads systemd and neither enables nor starts it.
fn check_installed(root: &Path) -> Result<()> {
    let version = run(Command::new(INSTALLED_BINARY).arg("--version"))?;
    let expected = format!("{PACKAGE} {}", env!("CARGO_PKG_VERSION"));
    if version.trim() != expected {
        bail!("`{INSTALLED_BINARY} --version` says {version:?}, not {expected:?}");
    }

    let man_page = run(Command::new("man").args(["-w", PACKAGE]))?;
    let expected_page = format!("{MAN_DIR}/{PACKAGE}.1.gz");
    if man_page.trim() != expected_page {
        bail!("`man -w {PACKAGE}` found {man_page:?}, not {expected_page}");
    }
    let generated = root.join(GENERATED_ASSETS).join("man");
    for page in
        fs::read_dir(&generated).with_context(|| format!("reading {}", generated.display()))?
    {
        let name = page?.file_name();
        let installed = Path::new(MAN_DIR).join(format!("{}.gz", name.to_string_lossy()));
        if !installed.is_file() {
            bail!("the package did not install {}", installed.display());
        }
    }

    for file in COMPLETIONS
        .iter()
        .chain([&UNIT_INSTALLED, &README_INSTALLED])
    {
        if !Path::new(file).is_file() {
            bail!("the package did not install {file}");
        }
    }
    run(Command::new("bash").arg("-n").arg(COMPLETIONS[0]))
        .context("the bash completion is not valid bash")?;

    let postinst = fs::read_to_string(POSTINST).with_context(|| format!("reading {POSTINST}"))?;
    if !postinst.contains("daemon-reload") || postinst.contains("deb-systemd-invoke start") {
        bail!("{POSTINST} should reload systemd and start nothing:\n{postinst}");
    }
    for entry in fs::read_dir(SYSTEMD_ADMIN_DIR).into_iter().flatten() {
        let link = entry?.path().join("tcp-trace.service");
        if link.symlink_metadata().is_ok() {
            bail!("installing enabled the unit: {} exists", link.display());
        }
    }
    Ok(())
}

/// dpkg's status of the package (`installed`, `config-files`, …), or None
/// where dpkg has no record of it.
fn package_status() -> Result<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", PACKAGE])
        .output()
        .context("running dpkg-query")?;
    // dpkg-query fails for a package it has never heard of.
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || status == "not-installed" {
        return Ok(None);
    }
    Ok(Some(status))
}

/// Runs `cmd`, echoing its error output, and returns its standard output;
/// fails on a non-zero exit.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
