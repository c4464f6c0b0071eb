//! Developer tasks: `cargo xtask setup|build|run|test|lint|bench|soak|fuzz|deb|vmtest`.

mod agent;
mod bench;
mod deb;
mod setup;
mod soak;
mod vmtest;

use std::{
    env,
    ffi::OsString,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): rust-src for the nightly, bpf-linker,
    /// cargo-fuzz, cargo-deb, the test tools (Debian packages, kubernetes-validate).
    Setup,
    /// Set up, then build everything in release mode (target/release/tcp-trace).
    Build,
    /// Build, then run `tcp-trace ARGS`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then run every test: lints, unit tests, the kernel integration
    /// tests and, without ARGS, a short fuzz pass, the package's test and the
    /// integration tests again in VMs on Debian's 6.1 and 6.12 kernels.
    Test {
        /// Leave out the VM tests (`cargo xtask vmtest`), which otherwise
        /// run at the end (about 15 minutes under emulation).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// rustfmt and clippy, userspace and kernel crates (the latter on its own).
    Lint,
    /// Build, then measure each tracing mode's overhead; writes docs/BENCHMARKS.md.
    Bench {
        /// Flat-out load only, 3 pairs, no memory run; prints, writes nothing.
        #[arg(long)]
        quick: bool,
        /// Only the configurations named so (as in the table's second
        /// column, e.g. "serve"); with --quick, a quick A/B of one change.
        #[arg(long, value_name = "CONFIGURATION")]
        only: Vec<String>,
    },
    /// Fuzz the ring-buffer decoder and the replay parser (cargo fuzz, nightly),
    /// starting from the corpus in tcp-trace/fuzz/corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
    },
    /// Build, then churn connections for a long while under the streaming
    /// agents; writes docs/SOAK.md and fails if their memory grew.
    Soak {
        /// How long to churn.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=1440))]
        minutes: u64,
    },
    /// Build, then make the Debian package (target/debian/tcp-trace_*.deb).
    Deb {
        /// Then install it with dpkg, check it, and remove it (needs root;
        /// refuses where tcp-trace is installed already).
        #[arg(long)]
        test: bool,
    },
    /// Build the tests, then run them in QEMU guests (TCG) booting Debian's
    /// 6.1 and 6.12 kernels, fetched once into ~/.cache/tcp-trace/vm.
    Vmtest {
        /// Which kernel: 6.1, 6.12 or all.
        #[arg(long, default_value = "all", value_parser = ["6.1", "6.12", "all"])]
        kernel: String,
        #[command(flatten)]
        guest: GuestArgs,
        /// Only these test binaries (tests/NAME.rs), for a quicker look.
        #[arg(long = "only", value_name = "BINARY")]
        only: Vec<String>,
        /// Only this test (its exact name) in each binary run.
        #[arg(long)]
        test: Option<String>,
        /// KEY=VALUE for the tests in the guest (e.g. AGENT_DUMP=1).
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("bad variable name {key:?}"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// How the VM tests' guests run (`vmtest`, and `test`'s VM part with the
/// defaults).
#[derive(clap::Parser, Clone)]
struct GuestArgs {
    /// Virtual CPUs per guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: u32,
    /// Tests run at once in each test binary in the guest.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    test_threads: u32,
}

impl GuestArgs {
    fn options(&self, kernel: &str) -> vmtest::Options {
        let kernels = match kernel {
            "all" => vmtest::SERIES.iter().map(|s| s.to_string()).collect(),
            one => vec![one.to_string()],
        };
        vmtest::Options {
            kernels,
            cpus: self.cpus,
            test_threads: self.test_threads,
            memory_mib: 2048,
            guest_timeout: std::time::Duration::from_secs(40 * 60),
            binary_timeout: std::time::Duration::from_secs(15 * 60),
            only: Vec::new(),
            test: None,
            env: Vec::new(),
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<ExitCode> {
    let root = workspace_root();
    match task {
        Task::Setup => {
            setup::setup()?;
        }
        Task::Build => build(&root)?,
        Task::Run { args } => {
            build(&root)?;
            let status = Command::new(root.join("target/release/tcp-trace"))
                .args(args)
                .status()
                .context("running target/release/tcp-trace")?;
            return Ok(ExitCode::from(status.code().unwrap_or(1) as u8));
        }
        Task::Test { no_vm, args } => {
            build(&root)?;
            lint(&root)?;
            let tools = setup::setup()?;
            run_tests(&root, &tools, &args, &[])?;
            // The kernel integration tests again with per-socket state in
            // socket storage (`--socket-storage`) for every agent.
            let mut again: Vec<OsString> = vec!["-p".into(), "tcp-trace".into(), "--tests".into()];
            again.extend(args.iter().cloned());
            run_tests(&root, &tools, &again, &[("TCP_TRACE_SOCKET_STORAGE", "1")])?;
            // Without a filter, also a short fuzz pass (`cargo xtask fuzz`
            // goes longer), the package (built, installed, run, removed),
            // and the same integration tests on Debian's kernels.
            if args.is_empty() {
                fuzz(&root, &tools, FUZZ_SECONDS_IN_TEST)?;
                let deb = deb::build_deb(&root, &tools)?;
                deb::test_deb(&root, &deb)?;
                if !no_vm {
                    let guest = GuestArgs::parse_from(["vm"]);
                    vmtest::vmtest(&root, &tools.path, &guest.options("all"))?;
                }
            }
        }
        Task::Bench { quick, only } => {
            build(&root)?;
            bench::bench(
                quick,
                &only,
                &root,
                &root.join("target/release/tcp-trace"),
                &root.join("target/release/churn"),
            )?;
        }
        Task::Fuzz { seconds } => {
            let tools = setup::setup()?;
            fuzz(&root, &tools, seconds)?;
        }
        Task::Soak { minutes } => {
            build(&root)?;
            soak::soak(
                minutes,
                &root,
                &root.join("target/release/tcp-trace"),
                &root.join("target/release/churn"),
            )?;
        }
        Task::Deb { test } => {
            build(&root)?;
            let tools = setup::setup()?;
            let deb = deb::build_deb(&root, &tools)?;
            if test {
                deb::test_deb(&root, &deb)?;
            }
        }
        Task::Lint => {
            setup::setup()?;
            lint(&root)?;
        }
        Task::Vmtest {
            kernel,
            guest,
            only,
            test,
            env,
        } => {
            let tools = setup::setup()?;
            let options = vmtest::Options {
                only,
                test,
                env,
                ..guest.options(&kernel)
            };
            vmtest::vmtest(&root, &tools.path, &options)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn build(root: &Path) -> Result<()> {
    let tools = setup::setup()?;
    cargo(
        root,
        &tools,
        &[
            "build",
            "--release",
            "--workspace",
            "--exclude",
            "tcp-trace-ebpf",
        ],
        &[],
    )
}

fn lint(root: &Path) -> Result<()> {
    let tools = setup::setup()?;
    cargo(root, &tools, &["fmt", "--all", "--check"], &[])?;
    cargo(
        root,
        &tools,
        &[
            "clippy",
            "--workspace",
            "--exclude",
            "tcp-trace-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &[],
    )?;
    // The BPF crate alone, for its own target: linting it with the workspace
    // would unify features and build its panic handler for the host.
    let status = Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "-Z",
            "build-std=core",
        ])
        .args(["--target", "bpfel-unknown-none", "--", "-D", "warnings"])
        .current_dir(root.join("tcp-trace-ebpf"))
        .env("PATH", &tools.path)
        .env("CARGO_TARGET_DIR", root.join("target/ebpf-lint"))
        .status()
        .context("running clippy on tcp-trace-ebpf")?;
    if !status.success() {
        bail!("clippy on tcp-trace-ebpf failed");
    }
    Ok(())
}

/// `cargo` arguments that build every test as `run_tests` does for the
/// whole workspace; `vmtest` builds the same (with `--no-run`), so after
/// `test` it rebuilds nothing.
const TEST_ARGS: &[&str] = &["test", "--workspace", "--exclude", "tcp-trace-ebpf"];

/// Runs every test, echoing cargo's output, and closes with one line that
/// totals all test binaries (cargo prints one result line per binary).
/// Runs `cargo test` (the whole workspace, unless `extra` names packages)
/// with `env` added.
fn run_tests(
    root: &Path,
    tools: &setup::Tools,
    extra: &[OsString],
    env: &[(&str, &str)],
) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.arg("test");
    if !extra.iter().any(|arg| arg == "-p") {
        command.args(["--workspace", "--exclude", "tcp-trace-ebpf"]);
    }
    let mut child = command
        .args(extra)
        .envs(env.iter().copied())
        .current_dir(root)
        .env("PATH", &tools.path)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = BufReader::new(child.stdout.take().expect("piped"));
    for line in stdout.lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    let on = if env.is_empty() {
        String::new()
    } else {
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" with {}", vars.join(" "))
    };
    println!("all tests{on}: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("cargo test failed");
    }
    Ok(())
}

/// Seconds per fuzz target in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 15;
const FUZZ_TARGETS: [&str; 2] = ["decode", "replay"];

/// Runs each fuzz target for `seconds`. New inputs go to a scratch corpus:
/// the committed seeds (tcp-trace/fuzz/corpus) are only read.
fn fuzz(root: &Path, tools: &setup::Tools, seconds: u64) -> Result<()> {
    let crate_dir = root.join("tcp-trace");
    for target in FUZZ_TARGETS {
        let scratch = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let seeds = crate_dir.join("fuzz/corpus").join(target);
        println!("xtask: fuzzing {target} for {seconds} s");
        let status = Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&scratch)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(&crate_dir)
            .env("PATH", &tools.path)
            // The fuzz targets need the event model, not the BPF object.
            .env("AYA_BUILD_SKIP", "1")
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzzing {target} found a failure (see tcp-trace/fuzz/artifacts/{target})");
        }
    }
    Ok(())
}

fn cargo(root: &Path, tools: &setup::Tools, args: &[&str], extra: &[OsString]) -> Result<()> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .args(extra)
        .current_dir(root)
        .env("PATH", &tools.path)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}
