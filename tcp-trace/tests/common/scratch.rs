//! Names no other test uses and directories of a test's own, for fixtures
//! that make things the whole machine sees (cgroups, namespaces, containers).

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number no other call in this process returns.
pub fn serial() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `PREFIX-<pid>-<serial>`: unique among the processes alive now, since the
/// pid is ours. A leftover of a dead run with the same pid can still exist;
/// each fixture that makes a named thing clears such a leftover first.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), serial())
}

/// 64 lowercase hex digits, like a docker or containerd container id, made
/// of this process's pid and a serial so no two tests share one.
pub fn unique_hex64() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        0x7463_7074_7261_6365_u64, // "tcptrace"
        std::process::id(),
        serial(),
        nanos
    )
}

/// A kubernetes pod uid (8-4-4-4-12 hex digits), unique like `unique_hex64`.
pub fn unique_pod_uid() -> String {
    let hex = unique_hex64();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[32..40],
        &hex[40..44],
        &hex[44..48],
        &hex[48..52],
        &hex[52..64]
    )
}

/// A directory of the test's own under the system temp dir (mode 0755, so a
/// server's unprivileged workers can read it), removed with everything in it
/// when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(&format!("tcp-trace-{prefix}")));
        // A leftover of a dead run with our pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Polls `ready` every 10 ms until it returns `Some`, or panics after `limit`
/// with `what` and the last thing `ready` could not find.
pub fn poll<T>(limit: Duration, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = ready() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// State letter and parent pid of a process, from /proc/PID/stat; `None`
/// once it is gone.
pub fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The comm in parentheses may hold spaces and parentheses: fields follow
    // the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether `pid` runs: present and not a zombie (an orphan's zombie stays
/// until PID 1 gets round to reaping it).
pub fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The live processes whose parent is `pid`, in pid order.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut children: Vec<u32> = fs::read_dir("/proc")
        .expect("reading /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&child| proc_stat(child).is_some_and(|(s, ppid)| ppid == pid && s != 'Z'))
        .collect();
    children.sort_unstable();
    children
}

/// Where a link in /proc/PID points, e.g. `ns/net` -> "net:[4026531840]".
pub fn proc_link(pid: u32, name: &str) -> String {
    fs::read_link(format!("/proc/{pid}/{name}"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/{name}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// Whether a TCP socket listens on `port` (any address, v4 or v6) in the
/// network namespace of this process.
pub fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1).unwrap_or_default();
                let state = fields.nth(1).unwrap_or_default();
                state == "0A"
                    && local
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}
