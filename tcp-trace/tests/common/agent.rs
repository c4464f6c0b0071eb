//! Running the tcp-trace binary under test and reading what it prints.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    net::IpAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize;

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_tcp-trace");

/// One line of `tcp-trace watch --json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Ev {
    pub ts_ns: u64,
    pub sk: String,
    /// `"transition"`, or `"accept"` (not a state change).
    pub event: String,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub family: String,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub old_state: String,
    pub new_state: String,
    pub duration_ns: Option<u64>,
    #[serde(default)]
    pub retransmits: Option<u32>,
    #[serde(default)]
    pub bytes_sent: Option<u64>,
    #[serde(default)]
    pub bytes_received: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    /// Where the owner (`pid`, `comm`) comes from: `"task"` (the process
    /// the transition ran in), `"accept"` (the process that accepted the
    /// connection), `"listener"` (the listening socket's owner, before
    /// accept), `"scan"` (the start-up scan); `None` without an owner.
    #[serde(default)]
    pub owner_source: Option<String>,
    /// The owner's cgroup v2 path, such as "/system.slice/nginx.service".
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The systemd unit of that cgroup.
    #[serde(default)]
    pub unit: Option<String>,
    /// The container id (64 hex digits) in that cgroup's path.
    #[serde(default)]
    pub container: Option<String>,
    /// The kubernetes pod uid in that cgroup's path.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// The inode of the socket's network namespace.
    #[serde(default)]
    pub netns: Option<u64>,
}

impl Ev {
    /// Whether this is the transition `old` -> `new` (not an accept event).
    pub fn is(&self, old: &str, new: &str) -> bool {
        self.event == "transition" && self.old_state == old && self.new_state == new
    }
}

/// A running `tcp-trace watch --json`.
///
/// The attached programs inside it are `kernel::Program`.
pub struct Agent {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// The line that said tracing began, and how.
    tracing: String,
}

/// What a stopped agent printed.
pub struct AgentOutput {
    pub events: Vec<Ev>,
    /// The stdout lines the events were parsed from, for failure messages.
    pub lines: Vec<String>,
    pub stderr: Vec<String>,
}

impl Agent {
    /// Starts the agent and waits until it says it is tracing. Fails loudly
    /// (never skips) when the program cannot be loaded.
    pub fn start(args: &[&str]) -> Agent {
        let mut full = vec!["watch", "--json"];
        full.extend_from_slice(args);
        Self::command(&full)
    }

    /// Starts any tracing command (`stats ...`, `life ...`).
    pub fn command(args: &[&str]) -> Agent {
        Self::command_env(args, &[])
    }

    pub fn command_env(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut command = Command::new(AGENT_BIN);
        command.args(args).envs(env.iter().copied());
        Self::spawn(command)
    }

    /// Starts the agent as `command` says (another binary, a wrapper such as
    /// setpriv), and waits until it says it is tracing.
    pub fn spawn(mut command: Command) -> Agent {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tcp-trace");
        let stdout = forward_lines(child.stdout.take().unwrap());
        let stderr = forward_lines(child.stderr.take().unwrap());
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let tracing = loop {
            match stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("tcp-trace: tracing ") => break line,
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "tcp-trace did not start tracing: loading BPF into the running kernel \
                         needs root (or CAP_BPF + CAP_PERFMON). It said:\n{}",
                        seen.join("\n")
                    );
                }
            }
        };
        Agent {
            child,
            stdout,
            stderr,
            tracing,
        }
    }

    /// The line that said tracing began: it names the mechanism.
    pub fn tracing(&self) -> &str {
        &self.tracing
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL: no chance to clean up.
    pub fn kill(mut self) -> ExitStatus {
        self.child.kill().expect("killing tcp-trace");
        wait_timeout(&mut self.child, Duration::from_secs(60))
    }

    /// The next line the agent prints on stdout, waiting up to `limit`.
    pub fn next_line(&self, limit: Duration) -> Option<String> {
        self.stdout.recv_timeout(limit).ok()
    }

    /// Stops the agent with SIGTERM, as an operator or systemd would, and
    /// returns its stdout and stderr lines.
    pub fn stop_raw(mut self) -> (Vec<String>, Vec<String>) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        // Both readers end at EOF, which follows the exit: wait for every line
        // of both (the summary is often stderr's last).
        let lines: Vec<String> = self.stdout.iter().collect();
        let stderr: Vec<String> = self.stderr.iter().collect();
        assert!(
            status.success(),
            "tcp-trace exited with {status}: {stderr:?}"
        );
        (lines, stderr)
    }

    /// Stops `watch --json` and parses its events. With AGENT_DUMP=1 in the
    /// environment it shows what the agent printed, passing or not.
    pub fn stop(self) -> AgentOutput {
        let (lines, stderr) = self.stop_raw();
        if std::env::var_os("AGENT_DUMP").is_some() {
            eprintln!("{}\n{}", lines.join("\n"), stderr.join("\n"));
        }
        let events = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        AgentOutput {
            events,
            lines,
            stderr,
        }
    }

    /// `stop`, after `settle`: time for the softirq tail of the test's last
    /// connections (a peer's FIN, the final ACK) to reach the ring buffer.
    pub fn stop_after(self, settle: Duration) -> AgentOutput {
        thread::sleep(settle);
        self.stop()
    }
}

/// A test that fails between `start` and `stop` must not leave the agent
/// running (its programs attached, costing every later test on the host).
impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl AgentOutput {
    /// Events of sockets with `port` at either end, grouped per socket, in order.
    pub fn sockets_on_port(&self, port: u16) -> BTreeMap<String, Vec<Ev>> {
        let mut by_sk: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
        for ev in self
            .events
            .iter()
            .filter(|e| e.lport == port || e.rport == port)
        {
            by_sk.entry(ev.sk.clone()).or_default().push(ev.clone());
        }
        by_sk
    }

    pub fn select(&self, pred: impl Fn(&Ev) -> bool) -> Vec<&Ev> {
        self.events.iter().filter(|e| pred(e)).collect()
    }

    /// The one event matching `pred`; fails (with everything the agent
    /// printed) on none or several.
    #[track_caller]
    pub fn one(&self, what: &str, pred: impl Fn(&Ev) -> bool) -> &Ev {
        let found = self.select(pred);
        if found.len() != 1 {
            self.fail(format!(
                "expected one {what}, found {}: {found:#?}",
                found.len()
            ))
        }
        found[0]
    }

    /// Fails with `msg` and everything the agent printed (for traces of a
    /// few connections: a test of hundreds says what matters itself).
    #[track_caller]
    pub fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!(
            "{msg}\n--- the agent's {} lines:\n{}\n--- its stderr:\n{}",
            self.lines.len(),
            self.lines.join("\n"),
            self.stderr.join("\n")
        )
    }

    /// `fail`s with `msg()` unless `ok`.
    #[track_caller]
    pub fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(msg())
        }
    }

    pub fn summary(&self) -> &str {
        self.stderr
            .iter()
            .find(|l| l.contains("events received"))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no summary on stderr: {:?}", self.stderr))
    }
}

/// The number the exit summary gives just before `label` (for example
/// `" events received"` or `" skipped by the kernel"`).
pub fn summary_count(summary: &str, label: &str) -> u64 {
    let at = summary
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in {summary:?}"));
    let word = summary[..at].split_whitespace().last().unwrap_or_default();
    word.trim_start_matches('(')
        .parse()
        .unwrap_or_else(|_| panic!("no count before {label:?} in {summary:?}"))
}

/// Sends each line read from `from` down a channel, from a thread of its own,
/// so the test can wait on a pipe with a timeout; ends at EOF or when the
/// receiver is dropped.
fn forward_lines(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting on a child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child {} did not exit within {limit:?}", child.id());
        }
        thread::sleep(Duration::from_millis(10));
    }
}
