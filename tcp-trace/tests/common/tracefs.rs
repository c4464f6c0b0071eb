//! The kernel's own record of a test's transitions: a tracefs instance of
//! the test's own with `sock:inet_sock_set_state` enabled for one port. It
//! runs beside the BPF programs, not through them, so it shows what the
//! kernel did even where no BPF program ran.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use super::scratch::serial;

/// One instance (`/sys/kernel/tracing/instances/tt-PID-N`), removed on drop.
pub struct TransitionLog {
    dir: PathBuf,
}

/// What the instance recorded.
pub struct Recorded {
    /// Transitions of the port.
    pub total: u64,
    /// Of those, the ones made while a task other than the given ones ran
    /// (a softirq in someone else's time slice).
    pub foreign: Vec<Firing>,
}

/// One transition as tracefs printed it.
pub struct Firing {
    pub line: String,
    /// Local port, remote port, old and new state (`FIN_WAIT1`): the same
    /// fields `watch --json` prints as `lport`, `rport`, `old_state` and
    /// `new_state`.
    pub key: (u16, u16, String, String),
}

impl TransitionLog {
    /// Starts recording every transition of a socket with `port` at either
    /// end, in a buffer of `kib_per_cpu` KiB per CPU.
    pub fn start(port: u16, kib_per_cpu: u32) -> TransitionLog {
        let root = tracefs_root();
        let dir = root.join(format!("instances/tt-{}-{}", std::process::id(), serial()));
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let log = TransitionLog { dir };
        log.write("buffer_size_kb", &kib_per_cpu.to_string());
        let event = "events/sock/inet_sock_set_state";
        log.write(
            &format!("{event}/filter"),
            &format!("protocol == 6 && (sport == {port} || dport == {port})"),
        );
        log.write(&format!("{event}/enable"), "1");
        log
    }

    /// Stops recording and reads the record; `ours` are the thread ids of
    /// the tasks that made the traffic.
    pub fn finish(self, ours: &HashSet<u32>) -> Recorded {
        self.write("events/sock/inet_sock_set_state/enable", "0");
        let text = fs::read_to_string(self.dir.join("trace")).expect("reading the trace");
        let mut recorded = Recorded {
            total: 0,
            foreign: Vec::new(),
        };
        for line in text.lines().filter(|l| l.contains("inet_sock_set_state:")) {
            recorded.total += 1;
            if !task_of(line).is_some_and(|tid| ours.contains(&tid)) {
                let key = key_of(line).unwrap_or_else(|| panic!("unreadable trace line {line}"));
                recorded.foreign.push(Firing {
                    line: line.trim().to_string(),
                    key,
                });
            }
        }
        assert!(
            !text.contains("LOST"),
            "the trace buffer overflowed: make it larger"
        );
        recorded
    }

    fn write(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

impl Drop for TransitionLog {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/sock/inet_sock_set_state/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The thread id in a trace line: `<comm>-<tid> [<cpu>] ...`, where the
/// comm may itself hold dashes and spaces.
fn task_of(line: &str) -> Option<u32> {
    let (task, _) = line.split_once(" [")?;
    task.trim().rsplit_once('-')?.1.parse().ok()
}

/// `sport=A dport=B ... oldstate=TCP_X newstate=TCP_Y` in a trace line.
fn key_of(line: &str) -> Option<(u16, u16, String, String)> {
    let field = |name: &str| {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split_whitespace().next()
    };
    let state = |name: &str| Some(field(name)?.strip_prefix("TCP_")?.to_string());
    Some((
        field("sport")?.parse().ok()?,
        field("dport")?.parse().ok()?,
        state("oldstate")?,
        state("newstate")?,
    ))
}

/// Where tracefs is mounted (the shortest path, where it is mounted twice,
/// as under debugfs).
pub fn tracefs_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("reading mounts");
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let dir = fields.nth(1)?;
            (fields.next()? == "tracefs").then_some(dir)
        })
        .min_by_key(|dir| dir.len())
        .map(|dir| Path::new(dir).to_path_buf())
        .expect("tracefs is mounted (at /sys/kernel/tracing)")
}

/// The calling thread's id.
pub fn thread_id() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() as u32 }
}
