//! python3 helper processes: scripts whose pids the test knows, that run
//! apart from the test process (in a cgroup of their own if need be), and
//! that say what they did on stdout, a line at a time.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{mpsc, OnceLock},
    thread,
    time::Duration,
};

use super::{agent::wait_timeout, cgroup::TestCgroup};

/// The real python3, not pyenv's shim script: starts faster, and its pid is
/// the interpreter's from the start.
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("running python3");
        assert!(out.status.success(), "python3: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
}

/// A python3 child whose stdout lines the test waits for with a timeout.
/// Killed when dropped, so a failing test leaves no process behind (only
/// the process itself: what it forked is the test's to kill).
pub struct Py {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Py {
    /// `python3 -c SCRIPT ARGS...`, stdin and stdout piped.
    pub fn command(script: &str, args: &[String]) -> Command {
        let mut command = Command::new(python());
        command
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        command
    }

    pub fn spawn(script: &str, args: &[String]) -> Py {
        Self::from_child(
            Self::command(script, args)
                .spawn()
                .expect("spawning python3"),
        )
    }

    /// Runs the script inside `cgroup` from its first instruction.
    pub fn in_cgroup(cgroup: &TestCgroup, script: &str, args: &[String]) -> Py {
        Self::from_child(cgroup.spawn(&mut Self::command(script, args)))
    }

    /// Takes over a child spawned from `command` (or with stdin and stdout
    /// piped likewise).
    pub fn from_child(mut child: Child) -> Py {
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .expect("a python3 child with stdout piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Py {
            child,
            stdin,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its next line, waiting up to 5 s.
    pub fn line(&mut self) -> String {
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => line,
            Err(_) => {
                let status = self.child.try_wait();
                panic!(
                    "python3 child {} said nothing within 5 s (status {status:?})",
                    self.pid()
                )
            }
        }
    }

    pub fn expect(&mut self, want: &str) {
        let line = self.line();
        assert_eq!(
            line,
            want,
            "python3 child {} said something else",
            self.pid()
        );
    }

    /// Its next line, a number such as a port or a pid.
    pub fn number<T: std::str::FromStr>(&mut self) -> T {
        let line = self.line();
        line.parse()
            .unwrap_or_else(|_| panic!("python3 child {}: not a number: {line:?}", self.pid()))
    }

    pub fn port(&mut self) -> u16 {
        self.number()
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").expect("writing to python3");
    }

    /// Waits (up to 10 s) for it to exit, and reaps it, its stdin left
    /// open (for a process it forked that reads the same pipe).
    pub fn wait(&mut self) -> ExitStatus {
        wait_timeout(&mut self.child, Duration::from_secs(10))
    }

    /// Closes its stdin and waits for it to exit successfully.
    pub fn finish(&mut self) {
        drop(self.stdin.take());
        let status = wait_timeout(&mut self.child, Duration::from_secs(10));
        assert!(
            status.success(),
            "python3 child {} exited with {status}",
            self.pid()
        );
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
