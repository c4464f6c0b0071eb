//! `cargo xtask vmtest`: the kernel integration tests inside QEMU guests
//! booting Debian's 6.1 and 6.12 kernels, the kernels production hosts run.
//!
//! The tests are built on the host (`cargo test --no-run`, the same build as
//! `cargo xtask test`'s) and run in the guest from the host's target/ dir,
//! shared read-only by 9p at the same path, so the paths compiled into them
//! (the agent's binary, the peer example) hold there too. The guest's root
//! is an initramfs: busybox, the modules the tests need, the tools they call
//! with their libraries, and an `/init` that runs each test binary and
//! reports on the serial console. KVM cannot run a stock kernel on this
//! machine kind (docs: vm-notes), so the guests run under TCG.

mod bzimage;
mod cpio;
mod guest;
mod kernel;
mod suite;
mod sysroot;

use std::{
    collections::BTreeSet,
    env,
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

pub use kernel::SERIES;

/// How the guests run.
pub struct Options {
    /// Kernel series to boot, in order.
    pub kernels: Vec<String>,
    /// Virtual CPUs per guest.
    pub cpus: u32,
    /// libtest's `--test-threads` in the guest.
    pub test_threads: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Limit for one guest, boot to power-off.
    pub guest_timeout: Duration,
    /// Limit for one test binary inside the guest.
    pub binary_timeout: Duration,
    /// Only these test binaries (all when empty).
    pub only: Vec<String>,
    /// Only this test (its exact name) in each binary.
    pub test: Option<String>,
    /// Extra environment for the tests in the guest.
    pub env: Vec<(String, String)>,
}

/// The packages the VM tests need on the host, by command.
pub const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("dpkg-deb", "dpkg"),
    ("ldd", "libc-bin"),
];

/// A test binary built on the host.
struct TestBinary {
    name: String,
    path: PathBuf,
}

/// What one guest did.
struct GuestRun {
    series: String,
    release: String,
    wall: Duration,
    boot: Option<Duration>,
    console: guest::Console,
    expected: Vec<String>,
    problems: Vec<String>,
    /// Known failures seen, and what else is worth a line.
    notes: Vec<String>,
}

pub fn vmtest(root: &Path, path: &OsString, options: &Options) -> Result<()> {
    let cache = vm_cache()?;
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let (target_dir, binaries, executables) = build_tests(root, path)?;

    // Which tests go in; the host-only list checked against what exists.
    let mut listed = Vec::new();
    for b in &binaries {
        listed.push((b.name.clone(), suite::list(&b.path)?));
    }
    suite::check(&listed)?;
    let mut runs = Vec::new();
    for series in &options.kernels {
        let kernel = kernel::prepare(series, &cache)?;
        let work = target_dir.join("vmtest").join(series);
        fs::create_dir_all(&work)?;
        let plan = guest::Plan {
            target_dir: target_dir.to_string_lossy().into_owned(),
            modules: kernel
                .modules
                .iter()
                .map(|m| guest_module_path(&kernel.release, m))
                .collect(),
            binaries: guest_binaries(&binaries, &listed, &kernel.release)
                .into_iter()
                .filter(|b| {
                    let base = b.name.split('@').next().unwrap_or(&b.name).to_string();
                    options.only.is_empty() || options.only.contains(&base)
                })
                .collect(),
            test_threads: options.test_threads,
            binary_timeout_s: options.binary_timeout.as_secs(),
            test: options.test.clone(),
            env: options.env.clone(),
            agent: executables
                .iter()
                .find(|p| p.file_name().is_some_and(|n| n == "tcp-trace"))
                .map(|p| p.to_string_lossy().into_owned()),
            agent_runs: vec![
                ("default".into(), Vec::new()),
                (
                    "storage".into(),
                    STORAGE_ENV
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .to_vec(),
                ),
            ],
        };
        let initrd = work.join("initrd.cpio");
        build_initramfs(&initrd, &kernel, &plan, &executables)?;
        let log = work.join("console.log");
        let mut guest = boot(&kernel, &initrd, &log, &target_dir, options)?;
        let unfinished = unfinished(&plan, &guest.console);
        let mut notes = Vec::new();
        // The guest's own kernel crashed mid-run (under TCG: an int3 left by
        // live text patching, seen once in ten 6.12 runs): say so, and run
        // what never ended once more in a fresh guest.
        if let (Some(crash), false) = (guest.console.crash.clone(), unfinished.is_empty()) {
            notes.push(format!(
                "the guest's kernel crashed ({crash}; console: {}); ran again in a fresh guest: {}",
                log.display(),
                unfinished.join(", ")
            ));
            let again = guest::Plan {
                binaries: plan
                    .binaries
                    .iter()
                    .filter(|b| unfinished.contains(&b.name))
                    .cloned()
                    .collect(),
                ..plan.clone()
            };
            let initrd = work.join("initrd-again.cpio");
            build_initramfs(&initrd, &kernel, &again, &executables)?;
            let rerun = boot(
                &kernel,
                &initrd,
                &work.join("console-again.log"),
                &target_dir,
                options,
            )?;
            if let Some(crash) = &rerun.console.crash {
                notes.push(format!("the second guest's kernel crashed too ({crash})"));
            }
            guest.merge_rerun(rerun);
        }
        runs.push(assess(&kernel, &plan, guest, &log, notes));
    }

    println!("\nxtask: vmtest summary");
    let mut failed = false;
    for run in &runs {
        let (mut passed, mut failures, mut known, mut tests_s) = (0, 0, 0, 0.0);
        for (name, r) in &run.console.binaries {
            passed += r.passed;
            if name.ends_with("+known") {
                known += r.failed;
            } else {
                failures += r.failed;
            }
            tests_s += r.seconds;
        }
        println!(
            "  {} ({}): {passed} passed, {failures} failed, {known} known failures; boot {}, tests {tests_s:.0} s, wall {:.0} s",
            run.series,
            run.release,
            run.boot
                .map(|b| format!("{:.1} s", b.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            run.wall.as_secs_f64()
        );
        for name in &run.expected {
            if let Some(r) = run.console.binaries.get(name) {
                println!(
                    "      {name:<18} {:>3} passed {:>2} failed {:>6.1} s",
                    r.passed, r.failed, r.seconds
                );
            }
        }
        for fact in &run.console.facts {
            println!("    {fact}");
        }
        for note in &run.notes {
            println!("    note: {note}");
        }
        for problem in &run.problems {
            failed = true;
            println!("    FAIL {problem}");
        }
    }
    if failed {
        bail!("the VM tests failed");
    }
    Ok(())
}

/// The environment of the second pass: every agent with `--socket-storage`.
const STORAGE_ENV: [(&str, &str); 1] = [("TCP_TRACE_SOCKET_STORAGE", "1")];

/// The binaries and tests a guest running `release` runs; says how many.
fn guest_binaries(
    binaries: &[TestBinary],
    listed: &[(String, BTreeSet<String>)],
    release: &str,
) -> Vec<guest::GuestBinary> {
    for entry in suite::HOST_ONLY.iter().filter(|e| e.applies(release)) {
        println!(
            "xtask: vmtest: {release}: host-only {}::{}: {}",
            entry.binary, entry.test, entry.reason
        );
    }
    let (mut in_guest, mut host_only) = (0, 0);
    let mut out = Vec::new();
    for (b, (_, tests)) in binaries.iter().zip(listed) {
        match suite::skipped(&b.name, release) {
            None => host_only += tests.len(),
            Some(skip) => {
                host_only += skip.len();
                in_guest += tests.len() - skip.len();
                let known: Vec<String> = suite::known(&b.name, release)
                    .iter()
                    .map(|k| k.test.to_string())
                    .collect();
                out.push(guest::GuestBinary {
                    name: b.name.clone(),
                    path: b.path.to_string_lossy().into_owned(),
                    skip,
                    known,
                    threads: suite::ONE_THREAD
                        .iter()
                        .any(|(name, _)| *name == b.name)
                        .then_some(1),
                    env: Vec::new(),
                });
            }
        }
    }
    println!(
        "xtask: vmtest: {release}: {in_guest} tests in {} binaries run in the guest, {host_only} \
         stay on the host (xtask/src/vmtest/suite.rs); {} run again with socket storage",
        out.len(),
        suite::STORAGE.join(", ")
    );
    let storage: Vec<guest::GuestBinary> = out
        .iter()
        .filter(|b| suite::STORAGE.contains(&b.name.as_str()))
        .map(|b| guest::GuestBinary {
            name: format!("{}@storage", b.name),
            path: b.path.clone(),
            skip: b.skip.clone(),
            known: b.known.clone(),
            threads: b.threads,
            env: STORAGE_ENV
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .to_vec(),
        })
        .collect();
    out.extend(storage);
    out
}

/// ~/.cache/tcp-trace/vm (XDG_CACHE_HOME respected): kernels, outside target/.
fn vm_cache() -> Result<PathBuf> {
    let base = match env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("tcp-trace/vm"))
}

fn guest_module_path(release: &str, module: &Path) -> String {
    format!(
        "/lib/modules/{release}/{}",
        module.file_name().unwrap().to_string_lossy()
    )
}

/// Builds the tests as `cargo xtask test` does and returns the target dir,
/// the integration test binaries of tcp-trace/tests, and every executable
/// the build made (whose libraries the guest needs).
fn build_tests(root: &Path, path: &OsString) -> Result<(PathBuf, Vec<TestBinary>, Vec<PathBuf>)> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(crate::TEST_ARGS)
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .current_dir(root)
        .env("PATH", path)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let tests_dir = root.join("tcp-trace/tests");
    let (mut binaries, mut executables) = (Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        executables.push(PathBuf::from(exe));
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        let src = Path::new(msg["target"]["src_path"].as_str().unwrap_or(""));
        if is_test && src.parent() == Some(&tests_dir) {
            binaries.push(TestBinary {
                name: msg["target"]["name"].as_str().unwrap_or("").to_string(),
                path: PathBuf::from(exe),
            });
        }
    }
    if binaries.is_empty() {
        bail!(
            "cargo built no integration tests in {}",
            tests_dir.display()
        );
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    let meta = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    let meta: Value = serde_json::from_slice(&meta.stdout).context("cargo metadata's output")?;
    let target_dir = PathBuf::from(
        meta["target_directory"]
            .as_str()
            .context("cargo metadata names no target_directory")?,
    );
    Ok((target_dir, binaries, executables))
}

fn build_initramfs(
    out: &Path,
    kernel: &kernel::Kernel,
    plan: &guest::Plan,
    executables: &[PathBuf],
) -> Result<()> {
    let mut archive = cpio::Archive::create(out)?;
    for dir in [
        "/bin",
        "/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/var",
        "/etc",
        "/root",
        "/usr/local/sbin",
    ] {
        archive.dir(dir)?;
    }
    let busybox = sysroot::which("busybox")
        .context("busybox is not installed (Debian package busybox-static)")?;
    let data = fs::read(&busybox)?;
    archive.file("/bin/busybox", 0o755, &data)?;
    archive.file("/init", 0o755, guest::init_script(plan).as_bytes())?;
    archive.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    archive.file("/etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    archive.file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n::1 localhost\n")?;
    for module in &kernel.modules {
        let data = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        archive.file(&guest_module_path(&kernel.release, module), 0o644, &data)?;
    }
    sysroot::add(&mut archive, executables)?;
    archive.finish()
}

/// Boots one guest and reads its console to the end (written to `log_path`).
fn boot(
    kernel: &kernel::Kernel,
    initrd: &Path,
    log_path: &Path,
    target_dir: &Path,
    options: &Options,
) -> Result<Guest> {
    let series = &kernel.series;
    println!(
        "xtask: vmtest: booting {} ({} vCPU, TCG)",
        kernel.package, options.cpus
    );
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &options.cpus.to_string()])
        .args(["-m", &options.memory_mib.to_string()])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .args(["-no-reboot", "-nodefaults", "-net", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinux)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=1 oops=panic",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag={},security_model=none,readonly=on,id=share",
            target_dir.display(),
            guest::SHARE_TAG
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The guest goes with xtask (Ctrl-C, a CI timeout), never outlives it.
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        qemu.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = qemu.spawn().context("running qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let mut log = String::new();
    let mut console = guest::Console::default();
    let mut boot = None;
    let mut timed_out = false;
    let deadline = start + options.guest_timeout;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                println!("[{series}] {}", line.trim_end_matches('\r'));
                log.push_str(&line);
                log.push('\n');
                console.line(&line);
                if boot.is_none() && console.booted.is_some() {
                    boot = Some(start.elapsed());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait()?;
    fs::write(log_path, &log).with_context(|| format!("writing {}", log_path.display()))?;
    Ok(Guest {
        console,
        wall: start.elapsed(),
        boot,
        timeout: timed_out.then_some(options.guest_timeout),
        exit: status,
    })
}

/// The plan's binaries with a run (their own, or their known failures')
/// that never started or never ended.
fn unfinished(plan: &guest::Plan, console: &guest::Console) -> Vec<String> {
    let runs: Vec<String> = plan
        .binaries
        .iter()
        .flat_map(|b| {
            let known = (!b.known.is_empty()).then(|| guest::known_run(&b.name));
            std::iter::once(b.name.clone()).chain(known)
        })
        .collect();
    let cut_short = console.unfinished(&runs);
    plan.binaries
        .iter()
        .filter(|b| cut_short.contains(&b.name) || cut_short.contains(&guest::known_run(&b.name)))
        .map(|b| b.name.clone())
        .collect()
}

/// One guest's boot, as read from its console.
struct Guest {
    console: guest::Console,
    wall: Duration,
    /// Time to the tests.
    boot: Option<Duration>,
    /// The limit it was killed at, if it was.
    timeout: Option<Duration>,
    exit: std::process::ExitStatus,
}

impl Guest {
    /// Takes a second guest's run of the binaries this one never ended.
    fn merge_rerun(&mut self, rerun: Guest) {
        self.console.merge_rerun(rerun.console);
        self.wall += rerun.wall;
        self.timeout = rerun.timeout;
        self.exit = rerun.exit;
    }
}

/// What a guest's run says against its plan: problems and notes.
fn assess(
    kernel: &kernel::Kernel,
    plan: &guest::Plan,
    guest: Guest,
    log_path: &Path,
    mut notes: Vec<String>,
) -> GuestRun {
    let series = &kernel.series;
    let console = guest.console;
    let expected: Vec<String> = plan.binaries.iter().map(|b| b.name.clone()).collect();
    let mut problems = console.problems(&expected);
    if let Some(limit) = guest.timeout {
        problems.push(format!(
            "the guest did not finish within {} s (killed)",
            limit.as_secs()
        ));
    } else if !guest.exit.success() && console.done {
        problems.push(format!("qemu exited with {}", guest.exit));
    }
    // The second pass must run where it says: an agent that fell back to
    // the map there would test the first pass's path twice.
    let storage_line = console
        .facts
        .iter()
        .find(|f| f.starts_with("AGENT storage ") && f.contains(" tracing "));
    if plan.agent.is_some() && !storage_line.is_some_and(|l| l.contains("socket storage")) {
        problems.push(format!(
            "the agent with {} does not trace with socket storage: {storage_line:?}",
            STORAGE_ENV[0].0
        ));
    }
    // Where the guest has kprobes, `timewait` must take TIME_WAIT from them.
    let kprobes = console
        .facts
        .iter()
        .any(|f| f == "HAS /sys/bus/event_source/devices/kprobe");
    let timewait_line = console
        .facts
        .iter()
        .find(|f| f.starts_with("AGENT timewait ") && f.contains(" tracing "));
    if plan.agent.is_some()
        && kprobes
        && !timewait_line.is_some_and(|l| l.contains("TIME_WAIT from kprobes"))
    {
        problems.push(format!(
            "the guest has kprobes but timewait does not use them: {timewait_line:?}"
        ));
    }
    if plan.test.is_none() {
        known_outcomes(&console, plan, &kernel.release, &mut problems, &mut notes);
    }
    for p in &mut problems {
        *p = format!("{series}: {p} (console: {})", log_path.display());
    }
    GuestRun {
        series: series.clone(),
        release: kernel.release.clone(),
        wall: guest.wall,
        boot: guest.boot,
        console,
        expected,
        problems,
        notes,
    }
}

/// The known failures' run: each one that failed is a note; one that
/// passed is a problem when it always failed before (it is fixed: take it
/// off the list), a note otherwise; a run that did not finish is a problem.
fn known_outcomes(
    console: &guest::Console,
    plan: &guest::Plan,
    release: &str,
    problems: &mut Vec<String>,
    notes: &mut Vec<String>,
) {
    for binary in plan.binaries.iter().filter(|b| !b.known.is_empty()) {
        let name = guest::known_run(&binary.name);
        let Some(result) = console.binaries.get(&name) else {
            if console.binaries.contains_key(&binary.name) {
                problems.push(format!("{name}: never started"));
            }
            continue;
        };
        if result.rc.is_none() || !result.reported {
            problems.push(format!(
                "{name}: did not finish (exit status {:?})",
                result.rc
            ));
            continue;
        }
        let base = binary.name.split('@').next().unwrap_or(&binary.name);
        for known in suite::known(base, release) {
            let test = format!("{}::{}", binary.name, known.test);
            if result.failures.iter().any(|t| t == known.test) {
                notes.push(format!("known failure {test}: {}", known.reason));
            } else if result.passes.iter().any(|t| t == known.test) {
                if known.deterministic {
                    problems.push(format!(
                        "{test} passes now: take it off KNOWN in xtask/src/vmtest/suite.rs"
                    ));
                } else {
                    notes.push(format!("{test} (a known, intermittent failure) passed"));
                }
            } else {
                problems.push(format!("{test}: no result"));
            }
        }
    }
}
