//! What runs in the guest and what it says: the `/init` script that mounts,
//! loads modules, runs each test binary from the 9p share and powers off;
//! and the reading of its serial console on the host.

use std::{collections::BTreeMap, fmt::Write as _};

/// The 9p tag of the host's target/ dir.
pub const SHARE_TAG: &str = "target";

/// One test binary as the guest runs it.
#[derive(Clone)]
pub struct GuestBinary {
    /// Its test file's name (`watch` for tests/watch.rs).
    pub name: String,
    /// Its path on the host, which is its path in the guest too (the
    /// target/ dir is mounted at the same place).
    pub path: String,
    /// Tests in it that stay on the host.
    pub skip: Vec<String>,
    /// Tests in it that fail here for a known reason: run apart, after the
    /// rest, as `NAME+known`.
    pub known: Vec<String>,
    /// `--test-threads` for it, when not the plan's.
    pub threads: Option<u32>,
    /// Environment for this run of it (`TCP_TRACE_SOCKET_STORAGE=1`).
    pub env: Vec<(String, String)>,
}

/// The console name of a binary's run of its known failures.
pub fn known_run(name: &str) -> String {
    format!("{name}+known")
}

/// What the guest is told to do.
#[derive(Clone)]
pub struct Plan {
    pub target_dir: String,
    pub modules: Vec<String>,
    pub binaries: Vec<GuestBinary>,
    pub test_threads: u32,
    /// Per binary, after which the guest kills it.
    pub binary_timeout_s: u64,
    /// Only this test (its exact name) in each binary.
    pub test: Option<String>,
    /// Extra environment for the tests (`AGENT_DUMP=1`).
    pub env: Vec<(String, String)>,
    /// The agent's binary, run before the tests to show what it says at
    /// start-up on this kernel: once per `(label, environment)` here.
    pub agent: Option<String>,
    pub agent_runs: Vec<(String, Vec<(String, String)>)>,
}

/// Quotes `s` for the shell, as one word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The guest's `/init` (busybox sh). Markers start with `VMTEST `; every
/// other line on the console is the tests' own output.
pub fn init_script(plan: &Plan) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 USER=root
# Tests widen their clock-jitter allowance under emulation.
export TCP_TRACE_EMULATED=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup /run /tmp /root
mount -t devpts -o ptmxmode=0666,newinstance devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
ln -s /run /var/run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug
# Where systemd mounts it on a host (debugfs also shows it, under debug/).
mount -t tracefs tracefs /sys/kernel/tracing
chmod 1777 /tmp
# A host's login allows thousands of descriptors (capacity holds 3,072
# sockets per test, two tests at once); the kernel gives init 1,024 (4,096 hard).
ulimit -n 65536
# Kernel messages would cut into the tests' lines on the one console.
echo 1 > /proc/sys/kernel/printk
hostname vmtest
ip link set lo up
fail() { echo "VMTEST FATAL $*"; poweroff -f; }
"#,
    );
    for (key, value) in &plan.env {
        writeln!(s, "export {key}={}", sh_quote(value)).unwrap();
    }
    for module in &plan.modules {
        writeln!(
            s,
            "insmod {} || fail insmod {}",
            sh_quote(module),
            sh_quote(module)
        )
        .unwrap();
    }
    let target = sh_quote(&plan.target_dir);
    writeln!(
        s,
        "mkdir -p {target}\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro {SHARE_TAG} {target} \
         || fail mount 9p {target}"
    )
    .unwrap();
    s.push_str(
        r#"echo "VMTEST BOOTED $(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$(grep -c ^processor /proc/cpuinfo)"
for f in /sys/kernel/btf/vmlinux /sys/bus/event_source/devices/kprobe; do
  [ -e $f ] && echo "VMTEST HAS $f" || echo "VMTEST LACKS $f"
done
echo "VMTEST FACT kernel.perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid)"
cd /tmp
"#,
    );
    if let Some(agent) = &plan.agent {
        for (label, env) in &plan.agent_runs {
            // Its start-up lines (the notes and the path it traces with),
            // each marked; its events go nowhere.
            let env: String = env
                .iter()
                .map(|(k, v)| format!("{k}={} ", sh_quote(v)))
                .collect();
            writeln!(
                s,
                "{env}{} watch --duration 1 2>&1 >/dev/null | while read -r l; do echo \"VMTEST AGENT {label} $l\"; done",
                sh_quote(agent)
            )
            .unwrap();
        }
        // How `timewait` follows TIME_WAIT there (kprobes, or sock_diag).
        writeln!(
            s,
            "{} timewait --duration 1 2>&1 >/dev/null | while read -r l; do echo \"VMTEST AGENT timewait $l\"; done",
            sh_quote(agent)
        )
        .unwrap();
    }
    for binary in &plan.binaries {
        let threads = binary.threads.unwrap_or(plan.test_threads);
        let mut args = format!("--test-threads={threads}");
        if let Some(test) = &plan.test {
            write!(args, " --exact {}", sh_quote(test)).unwrap();
        } else if !binary.skip.is_empty() || !binary.known.is_empty() {
            args.push_str(" --exact");
            for test in binary.skip.iter().chain(&binary.known) {
                write!(args, " --skip {}", sh_quote(test)).unwrap();
            }
        }
        run(&mut s, plan, binary, &binary.name, &args);
        if plan.test.is_none() && !binary.known.is_empty() {
            let mut args = format!("--test-threads={threads} --exact");
            for test in &binary.known {
                write!(args, " {}", sh_quote(test)).unwrap();
            }
            run(&mut s, plan, binary, &known_run(&binary.name), &args);
        }
    }
    s.push_str("echo \"VMTEST DONE uptime=$(cut -d' ' -f1 /proc/uptime)\"\npoweroff -f\n");
    s
}

/// Runs the binary with `args` between markers naming the run `name`.
fn run(s: &mut String, plan: &Plan, binary: &GuestBinary, name: &str, args: &str) {
    let env: String = binary
        .env
        .iter()
        .map(|(k, v)| format!("{k}={} ", sh_quote(v)))
        .collect();
    writeln!(
        s,
        "echo VMTEST BEGIN {name}\n\
         t0=$(cut -d' ' -f1 /proc/uptime)\n\
         {env}timeout -s KILL {timeout} {path} {args} 2>&1\n\
         rc=$?\n\
         echo \"VMTEST END {name} rc=$rc start=$t0 end=$(cut -d' ' -f1 /proc/uptime)\"",
        timeout = plan.binary_timeout_s,
        path = sh_quote(&binary.path),
    )
    .unwrap();
}

/// One binary's run as the console told it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BinaryResult {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub filtered: u64,
    /// Its exit status; `None` when it never ended (the guest died).
    pub rc: Option<i32>,
    pub seconds: f64,
    pub failures: Vec<String>,
    pub passes: Vec<String>,
    /// Whether libtest printed its result line.
    pub reported: bool,
}

/// Everything read from one guest's console.
#[derive(Debug, Default)]
pub struct Console {
    pub booted: Option<String>,
    /// Guest uptime when /init reached the tests.
    pub boot_uptime: Option<f64>,
    pub facts: Vec<String>,
    pub fatal: Option<String>,
    /// The first line of a crash of the guest's own kernel (an oops, which
    /// `oops=panic` turns into a panic and so the guest's end).
    pub crash: Option<String>,
    pub done: bool,
    pub binaries: BTreeMap<String, BinaryResult>,
    current: Option<String>,
}

impl Console {
    /// Takes one console line.
    pub fn line(&mut self, line: &str) {
        // The serial console may end lines with \r.
        let line = line.trim_end_matches('\r');
        if self.crash.is_none() && is_kernel_crash(line) {
            self.crash = Some(line.trim().to_string());
        }
        if let Some(rest) = line.strip_prefix("VMTEST ") {
            let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            match word {
                "BOOTED" => {
                    self.booted = Some(rest.split_whitespace().next().unwrap_or("").into());
                    self.boot_uptime = field(rest, "uptime").and_then(|v| v.parse().ok());
                }
                "HAS" | "LACKS" | "FACT" | "AGENT" => self.facts.push(format!("{word} {rest}")),
                "FATAL" => self.fatal = Some(rest.to_string()),
                "BEGIN" => {
                    self.binaries
                        .insert(rest.to_string(), BinaryResult::default());
                    self.current = Some(rest.to_string());
                }
                "END" => {
                    let name = rest.split_whitespace().next().unwrap_or("").to_string();
                    if let Some(result) = self.binaries.get_mut(&name) {
                        result.rc = field(rest, "rc").and_then(|v| v.parse().ok());
                        let at = |k| field(rest, k).and_then(|v| v.parse::<f64>().ok());
                        if let (Some(start), Some(end)) = (at("start"), at("end")) {
                            result.seconds = end - start;
                        }
                    }
                    self.current = None;
                }
                "DONE" => self.done = true,
                _ => {}
            }
            return;
        }
        let Some(result) = self.current.as_ref().and_then(|n| self.binaries.get_mut(n)) else {
            return;
        };
        if let Some(rest) = line.strip_prefix("test result: ") {
            result.reported = true;
            for part in rest.split(';') {
                let part = part.replace("filtered out", "filtered");
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(count) = count.parse::<u64>() else {
                    continue;
                };
                match label {
                    "passed" => result.passed += count,
                    "failed" => result.failed += count,
                    "ignored" => result.ignored += count,
                    "filtered" => result.filtered += count,
                    _ => {}
                }
            }
        } else if let Some(test) = line.strip_prefix("test ") {
            if let Some(test) = test.strip_suffix(" ... FAILED") {
                result.failures.push(test.to_string());
            } else if let Some(test) = test.strip_suffix(" ... ok") {
                result.passes.push(test.to_string());
            }
        }
    }

    /// Why this guest's run failed, if it did: `expected` names every
    /// binary the guest was to run.
    pub fn problems(&self, expected: &[String]) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(fatal) = &self.fatal {
            problems.push(format!("the guest failed to set up: {fatal}"));
        }
        if self.booted.is_none() {
            problems.push("the guest never reached its tests".into());
        }
        for name in expected {
            match self.binaries.get(name) {
                None => problems.push(format!("{name}: never started")),
                Some(r) if r.rc.is_none() => problems.push(format!("{name}: never ended")),
                Some(r) if r.rc != Some(0) || r.failed > 0 || !r.reported => {
                    let why = if r.rc == Some(137) {
                        " (killed at its time limit)".to_string()
                    } else {
                        String::new()
                    };
                    problems.push(format!(
                        "{name}: exit status {}{why}, {} failed{}",
                        r.rc.unwrap_or(-1),
                        r.failed,
                        if r.failures.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.failures.join(", "))
                        }
                    ))
                }
                Some(_) => {}
            }
        }
        if !self.done && problems.is_empty() {
            problems.push("the guest did not report the end of its run".into());
        }
        problems
    }

    /// The binaries of `expected` that never started or never ended.
    pub fn unfinished(&self, expected: &[String]) -> Vec<String> {
        expected
            .iter()
            .filter(|name| self.binaries.get(*name).is_none_or(|r| r.rc.is_none()))
            .cloned()
            .collect()
    }

    /// Takes a second guest's reading of the binaries it ran again: their
    /// results replace these, and its end is the run's end.
    pub fn merge_rerun(&mut self, rerun: Console) {
        self.binaries.extend(rerun.binaries);
        for fact in rerun.facts {
            if !self.facts.contains(&fact) {
                self.facts.push(fact);
            }
        }
        self.fatal = rerun.fatal;
        self.done = rerun.done;
        if rerun.crash.is_some() {
            self.crash = rerun.crash;
        }
    }
}

/// Whether a console line is the kernel reporting its own crash.
fn is_kernel_crash(line: &str) -> bool {
    // Kernel lines may start with a `[  12.345678]` timestamp.
    let text = match line.trim_start().strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(_, text)| text),
        None => line,
    }
    .trim_start();
    [
        "Oops: ",
        "BUG: ",
        "kernel BUG at ",
        "general protection fault",
        "int3: ",
        "Kernel panic - not syncing",
    ]
    .iter()
    .any(|start| text.starts_with(start))
}

/// `KEY=VALUE` among whitespace-separated words.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            target_dir: "/work/x/target".into(),
            modules: vec!["/lib/modules/6.1.0-1-amd64/9p.ko".into()],
            binaries: vec![
                GuestBinary {
                    name: "watch".into(),
                    path: "/work/x/target/debug/deps/watch-1".into(),
                    skip: vec!["needs_python".into()],
                    known: vec!["rport".into()],
                    threads: None,
                    env: vec![],
                },
                GuestBinary {
                    name: "watch@storage".into(),
                    path: "/work/x/target/debug/deps/watch-1".into(),
                    skip: vec![],
                    known: vec![],
                    threads: None,
                    env: vec![("TCP_TRACE_SOCKET_STORAGE".into(), "1".into())],
                },
                GuestBinary {
                    name: "burst".into(),
                    path: "/work/x/target/debug/deps/burst-2".into(),
                    skip: vec![],
                    known: vec![],
                    threads: Some(1),
                    env: vec![],
                },
            ],
            test_threads: 2,
            binary_timeout_s: 900,
            test: None,
            env: vec![("AGENT_DUMP".into(), "1".into())],
            agent: Some("/work/x/target/debug/tcp-trace".into()),
            agent_runs: vec![
                ("default".into(), vec![]),
                (
                    "storage".into(),
                    vec![("TCP_TRACE_SOCKET_STORAGE".into(), "1".into())],
                ),
            ],
        }
    }

    #[test]
    fn init_runs_each_binary_with_its_skips_exact() {
        let s = init_script(&plan());
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("export AGENT_DUMP='1'\n"));
        assert!(s.contains(
            "'/work/x/target/debug/tcp-trace' watch --duration 1 2>&1 >/dev/null | while read -r l; do echo \"VMTEST AGENT default $l\"; done"
        ));
        assert!(s.contains(
            "TCP_TRACE_SOCKET_STORAGE='1' '/work/x/target/debug/tcp-trace' watch --duration 1"
        ));
        assert!(s.contains("'/work/x/target/debug/tcp-trace' timewait --duration 1 2>&1"));
        assert!(s.contains("insmod '/lib/modules/6.1.0-1-amd64/9p.ko' || fail"));
        assert!(s.contains("target '/work/x/target' || fail mount 9p"));
        assert!(s.contains(
            "timeout -s KILL 900 '/work/x/target/debug/deps/watch-1' --test-threads=2 --exact --skip 'needs_python' --skip 'rport' 2>&1"
        ));
        assert!(s.contains(
            "echo VMTEST BEGIN watch+known\nt0=$(cut -d' ' -f1 /proc/uptime)\n\
             timeout -s KILL 900 '/work/x/target/debug/deps/watch-1' --test-threads=2 --exact 'rport' 2>&1"
        ));
        assert!(!s.contains("burst+known"));
        assert!(s.contains(
            "echo VMTEST BEGIN watch@storage\nt0=$(cut -d' ' -f1 /proc/uptime)\n\
             TCP_TRACE_SOCKET_STORAGE='1' timeout -s KILL 900 '/work/x/target/debug/deps/watch-1' --test-threads=2 2>&1"
        ));
        assert!(s.contains("'/work/x/target/debug/deps/burst-2' --test-threads=1 2>&1"));
        assert!(s.trim_end().ends_with("poweroff -f"));
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    fn console(lines: &str) -> Console {
        let mut c = Console::default();
        for line in lines.lines() {
            c.line(line);
        }
        c
    }

    const GOOD: &str = "[    0.1] kernel noise\r
VMTEST BOOTED 6.1.0-56-amd64 uptime=1.93 cpus=2\r
VMTEST HAS /sys/kernel/btf/vmlinux
VMTEST BEGIN watch
running 10 tests
test a ... ok
test result: ok. 9 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out; finished in 20.01s
VMTEST END watch rc=0 start=2.00 end=24.50
VMTEST BEGIN burst
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.00s
VMTEST END burst rc=0 start=24.50 end=28.00
VMTEST DONE uptime=28.1
";

    #[test]
    fn a_clean_run_has_no_problems_and_its_counts() {
        let c = console(GOOD);
        let expected = ["watch".to_string(), "burst".to_string()];
        assert_eq!(c.problems(&expected), Vec::<String>::new());
        assert_eq!(c.booted.as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(c.boot_uptime, Some(1.93));
        let w = &c.binaries["watch"];
        assert_eq!((w.passed, w.failed, w.filtered, w.rc), (9, 0, 1, Some(0)));
        assert!((w.seconds - 22.5).abs() < 1e-9);
        assert_eq!(w.passes, ["a"]);
        assert_eq!(c.facts, ["HAS /sys/kernel/btf/vmlinux"]);
    }

    #[test]
    fn failures_missing_binaries_and_a_silent_guest_are_problems() {
        let failed = GOOD
            .replace(
                "test a ... ok",
                "test ipv4_exchange ... FAILED\ntest b ... FAILED",
            )
            .replace("ok. 9 passed; 0 failed", "FAILED. 7 passed; 2 failed")
            .replace("watch rc=0", "watch rc=101");
        let c = console(&failed);
        let problems = c.problems(&["watch".into(), "burst".into()]);
        assert_eq!(
            problems,
            ["watch: exit status 101, 2 failed: ipv4_exchange, b"]
        );
        // A binary the guest never got to, and one cut off mid-run.
        let c = console(&GOOD.replace(
            "VMTEST END burst rc=0 start=24.50 end=28.00\nVMTEST DONE uptime=28.1\n",
            "",
        ));
        let problems = c.problems(&["watch".into(), "burst".into(), "top".into()]);
        assert_eq!(problems, ["burst: never ended", "top: never started"]);
        // Killed at its limit, without a result line.
        let c = console("VMTEST BOOTED 6.12.1 uptime=2\nVMTEST BEGIN top\nVMTEST END top rc=137 start=1 end=2\nVMTEST DONE uptime=3");
        assert_eq!(
            c.problems(&["top".into()]),
            ["top: exit status 137 (killed at its time limit), 0 failed"]
        );
        // Nothing at all.
        let c = console("");
        assert_eq!(c.problems(&[]), ["the guest never reached its tests"]);
        let c = console("VMTEST FATAL mount 9p /t\n");
        assert_eq!(
            c.problems(&[]),
            [
                "the guest failed to set up: mount 9p /t",
                "the guest never reached its tests"
            ]
        );
    }

    #[test]
    fn a_kernel_crash_is_noted_and_a_rerun_completes_the_run() {
        // The 6.12 guest's oops under TCG, cut short.
        let crashed = GOOD.replace(
            "VMTEST END burst rc=0 start=24.50 end=28.00\nVMTEST DONE uptime=28.1\n",
            "[   40.123456] int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [   40.123999] Kernel panic - not syncing: Fatal exception in interrupt\n",
        );
        let mut c = console(&crashed);
        assert_eq!(
            c.crash.as_deref(),
            Some("[   40.123456] int3: 0000 [#1] PREEMPT SMP NOPTI")
        );
        let expected = ["watch".to_string(), "burst".to_string(), "top".to_string()];
        assert_eq!(c.unfinished(&expected), ["burst", "top"]);
        // Test output that merely mentions such words is not a crash.
        assert!(console("VMTEST BEGIN x\nBUG? no: a test's own line\n")
            .crash
            .is_none());

        let rerun = console(
            "VMTEST BOOTED 6.12.1 uptime=2\nVMTEST BEGIN burst\n\
             test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             VMTEST END burst rc=0 start=3 end=9\nVMTEST BEGIN top\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             VMTEST END top rc=0 start=9 end=12\nVMTEST DONE uptime=13\n",
        );
        c.merge_rerun(rerun);
        assert_eq!(c.problems(&expected), Vec::<String>::new());
        assert_eq!(c.binaries["burst"].passed, 2);
        assert_eq!(c.binaries["watch"].passed, 9);
    }
}
