//! Faults and hostile input: a killed agent leaves nothing attached, an
//! attached agent keeps no privilege it does not need and runs with the least
//! set documented, and replayed input cannot make it misbehave.

mod common;

use std::{
    fs,
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::PathBuf,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use common::*;

/// CAP_BPF's bit in /proc/PID/status capability masks.
const CAP_BPF_MASK: u64 = 1 << 39;

fn status_field(pid: u32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn capability_mask(pid: u32, set: &str) -> u64 {
    u64::from_str_radix(&status_field(pid, set), 16).unwrap()
}

/// Ids of the BPF programs a process holds, from its fds' fdinfo.
fn program_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse::<u32>().ok()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the kernel still has program `id` (`BPF_PROG_GET_FD_BY_ID`).
fn program_exists(id: u32) -> bool {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    // bpf_attr for this command: prog_id, next_id, open_flags.
    let attr: [u32; 3] = [id, 0, 0];
    // SAFETY: the attr buffer is valid for its size for the whole call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_GET_FD_BY_ID,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd >= 0 {
        // SAFETY: closing the fd the kernel just gave us.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let err = std::io::Error::last_os_error();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOENT),
        "looking up program {id}: {err}"
    );
    false
}

#[test]
fn a_killed_agent_leaves_no_program_attached() {
    let port = free_port().to_string();
    let agent = Agent::start(&["--port", &port]);
    let ids = program_ids(agent.pid());
    assert!(!ids.is_empty(), "the agent holds no BPF program");
    assert!(ids.iter().all(|&id| program_exists(id)));
    let status = agent.kill();
    assert!(!status.success());
    // The kernel frees a program once its last reference (the attachment
    // included) is gone, after an RCU grace period.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids.iter().any(|&id| program_exists(id)) {
        assert!(
            Instant::now() < deadline,
            "programs {ids:?} outlived the agent killed with SIGKILL"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn once_attached_the_agent_keeps_only_cap_bpf() {
    for command in [
        &["watch", "--port", "1"][..],
        &["stats", "--port", "1"],
        &["timewait", "--port", "1"],
    ] {
        let agent = Agent::command(command);
        let pid = agent.pid();
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                capability_mask(pid, set),
                CAP_BPF_MASK,
                "{command:?}: {set} holds more than CAP_BPF"
            );
        }
        for set in ["CapInh", "CapAmb"] {
            assert_eq!(capability_mask(pid, set), 0, "{command:?}: {set}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{command:?}");
        // Still able to read its maps and report.
        let (_, stderr) = agent.stop_raw();
        assert!(
            stderr.iter().any(|l| l.contains("events received")),
            "{command:?}: {stderr:?}"
        );
    }
}

/// The agent's binary where an unprivileged user can run it.
fn world_executable_copy() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcp-trace-setpriv-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("tcp-trace");
    fs::copy(AGENT_BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

/// `bin ARGS` as user nobody, holding only `caps` (setpriv's names).
fn as_nobody_with(bin: &PathBuf, caps: &str, args: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg("--bounding-set=-all,".to_string() + caps)
        .arg(bin)
        .args(args);
    command
}

#[test]
fn runs_as_nobody_with_the_documented_capabilities() {
    let bin = world_executable_copy();
    let port = free_port();
    let p = port.to_string();
    let least = "+bpf,+perfmon,+dac_read_search";
    // Debian's and Ubuntu's kernels patch kernel.perf_event_paranoid=3 (their
    // default) to refuse perf events to all but CAP_SYS_ADMIN: the agent
    // must say so and name the fix; then the test applies that fix.
    let _paranoid = Paranoid::at_most_2(|| {
        let out = as_nobody_with(&bin, least, &["watch", "--duration", "1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains("kernel.perf_event_paranoid is 3")
                    && stderr.contains("sysctl kernel.perf_event_paranoid=2"),
                "{stderr}"
            );
        }
    });
    let agent = Agent::spawn(as_nobody_with(
        &bin,
        least,
        &["watch", "--json", "--port", &p],
    ));
    exchange(
        std::net::SocketAddr::new(loopback(false), port),
        Script::QUICK,
    );
    thread::sleep(Duration::from_millis(300));
    let trace = agent.stop();
    assert_eq!(trace.sockets_on_port(port).len(), 3, "{:?}", trace.events);

    // Without CAP_DAC_READ_SEARCH, a tracefs of mode 0700 (the kernel's
    // default) is closed to it, and it says so.
    let tracefs = tracefs_root();
    let tracefs_mode = fs::metadata(&tracefs).unwrap().permissions().mode();
    let out = as_nobody_with(&bin, "+bpf,+perfmon", &["watch", "--duration", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if tracefs_mode & 0o005 == 0o005 {
        assert!(out.status.success(), "{stderr}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("needs root or CAP_DAC_READ_SEARCH"),
            "{stderr}"
        );
    }
    // Without CAP_BPF it refuses before the kernel does, naming what is missing.
    let out = as_nobody_with(&bin, "+perfmon,+dac_read_search", &["watch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing: CAP_BPF"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = fs::remove_dir_all(bin.parent().unwrap());
}

/// `kernel.perf_event_paranoid` lowered to 2 while this lives, and set back
/// after, where it was higher.
struct Paranoid(Option<String>);

const PERF_EVENT_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

impl Paranoid {
    /// Runs `above_2` first when the setting is above 2.
    fn at_most_2(above_2: impl FnOnce()) -> Paranoid {
        let was = fs::read_to_string(PERF_EVENT_PARANOID).unwrap();
        if was.trim().parse::<i32>().unwrap() <= 2 {
            return Paranoid(None);
        }
        above_2();
        fs::write(PERF_EVENT_PARANOID, "2").unwrap();
        Paranoid(Some(was))
    }
}

impl Drop for Paranoid {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = fs::write(PERF_EVENT_PARANOID, was.trim());
        }
    }
}

/// `tcp-trace ARGS` with its address space capped, so that unbounded memory
/// growth fails fast instead of taking the machine.
fn run_capped(args: &[&str]) -> Output {
    let mut command = Command::new(AGENT_BIN);
    command.args(args);
    // SAFETY: only setrlimit, async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 512 << 20,
                rlim_max: 512 << 20,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().unwrap()
}

fn recording(name: &str, content: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tcp-trace-{name}-{}.json", std::process::id()));
    fs::File::create(&path).unwrap().write_all(content).unwrap();
    path
}

#[test]
fn endless_input_is_a_clear_error_in_bounded_memory() {
    for command in ["stats", "life"] {
        let out = run_capped(&[command, "--from", "/dev/zero"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        assert_eq!(
            stderr.trim(),
            "tcp-trace: error: /dev/zero:1: line longer than 65536 bytes: not a tcp-trace record",
            "{command}"
        );
    }
}

const GOOD: &str = r#"{"ts_ns":5000000000,"sk":"0xffff888012345678","pid":7,"comm":"curl","family":"ipv4","laddr":"127.0.0.1","lport":40000,"raddr":"127.0.0.1","rport":80,"old_state":"SYN_SENT","new_state":"ESTABLISHED","duration_ns":317000,"bytes_sent":null,"bytes_received":null,"error":null,"retransmits":0,"handshake_ns":null}"#;

#[test]
fn replay_refuses_lines_that_break_the_schema() {
    let cases = [
        ("missing field", GOOD.replace(r#","retransmits":0"#, "")),
        (
            "unknown error",
            GOOD.replace(r#""error":null"#, r#""error":"EWHATEVER""#),
        ),
        (
            "error without socket fields",
            GOOD.replace(r#""error":null"#, r#""error":"ECONNRESET""#),
        ),
        (
            "time zero",
            GOOD.replace(r#""ts_ns":5000000000"#, r#""ts_ns":0"#),
        ),
        (
            "duration before boot",
            GOOD.replace(r#""duration_ns":317000"#, r#""duration_ns":6000000000"#),
        ),
    ];
    for (what, bad) in cases {
        let path = recording("bad", format!("{GOOD}\n{bad}\n").as_bytes());
        let out = run_capped(&["stats", "--from", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "tcp-trace: error: {}:2: not a tcp-trace record",
                path.display()
            )),
            "{what}: {stderr}"
        );
        let _ = fs::remove_file(path);
    }
}

#[test]
fn an_empty_recording_gives_an_empty_report_without_a_time() {
    let path = recording("empty", b"");
    let out = run_capped(&["stats", "--json", "--from", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ts_ns"], serde_json::Value::Null, "{report}");
    assert_eq!(report["events_seen"], 0);
    let text = run_capped(&["stats", "--from", path.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&text.stdout).starts_with("- final report: 0 transitions seen"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    let _ = fs::remove_file(path);
}

#[test]
fn hostile_process_names_stay_raw_in_json_and_escaped_in_text() {
    let hostile = GOOD.replace(r#""comm":"curl""#, r#""comm":"\u001b[2Jevil""#);
    let path = recording("hostile", format!("{hostile}\n").as_bytes());
    let file = path.to_str().unwrap();
    let json = run_capped(&["stats", "--json", "--by", "process", "--from", file]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["groups"][0]["key"], "7 \u{1b}[2Jevil", "{report}");
    let text = run_capped(&["stats", "--by", "process", "--from", file]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(text.contains("== 7 \\x1b[2Jevil"), "{text}");
    let life = run_capped(&["life", "--from", file]);
    assert!(life.status.success());
    let _ = fs::remove_file(path);
}

#[test]
fn a_closed_stdout_ends_a_replay_quietly() {
    let lines: String = (0..20_000).map(|_| format!("{GOOD}\n")).collect();
    let path = recording("pipe", lines.as_bytes());
    // The report goes into a pipe already closed.
    let mut child = Command::new(AGENT_BIN)
        .args(["stats", "--from", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let _ = fs::remove_file(path);
}
