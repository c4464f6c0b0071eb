//! Who holds each TCP socket that exists when tcp-trace starts (services
//! started before it), found the way `ss -tanp` does: the kernel's socket
//! table through sock_diag, with inodes, matched against the
//! `socket:[inode]` links in `/proc/*/fd`.

use std::{
    collections::{HashMap, HashSet},
    ffi::CStr,
    io,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tcp_trace_common::state;

use super::dir::{read_link_at, Dir};
pub use super::sock_diag::{Endpoints, TcpSocket};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// Field 22 (starttime) of `/proc/PID/stat`, in clock ticks after boot:
    /// with the pid, it names one process even after the pid is reused.
    pub start_ticks: u64,
}

/// A socket and the process it is charged to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owned {
    pub socket: TcpSocket,
    pub holder: Holder,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// TCP sockets sock_diag listed.
    pub sockets: usize,
    /// Of those, the ones a process holds; the others (orphans after close,
    /// connections not yet accepted) are not listed.
    pub owned: usize,
    /// Processes whose descriptors were read.
    pub processes: usize,
    /// Processes whose descriptors or stat could not be read (permissions,
    /// or a stat not understood).
    pub unreadable: usize,
    /// Processes that exited during the walk.
    pub vanished: usize,
    pub elapsed: Duration,
}

/// Every owned TCP socket at one moment, listeners apart.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    pub listeners: Vec<Owned>,
    pub connections: Vec<Owned>,
    pub stats: ScanStats,
}

/// One sock_diag dump and one walk of `/proc`.
pub fn scan() -> Result<Scan> {
    let started = Instant::now();
    let sockets = super::sock_diag::tcp_sockets()?;
    // A temporary, dropped once walked: at 100,000 sockets it is a megabyte.
    let holders = socket_holders(&inodes(&sockets))?;
    let mut scan = Scan::default();
    for socket in sockets.iter() {
        let Some(holder) = holders.holder(socket.inode) else {
            continue;
        };
        let owned = Owned {
            socket: *socket,
            holder: holder.clone(),
        };
        if socket.state == state::LISTEN {
            scan.listeners.push(owned);
        } else {
            scan.connections.push(owned);
        }
    }
    let walk = holders.walk;
    scan.stats = ScanStats {
        sockets: sockets.len(),
        owned: scan.listeners.len() + scan.connections.len(),
        processes: walk.processes,
        unreadable: walk.unreadable,
        vanished: walk.vanished,
        elapsed: started.elapsed(),
    };
    Ok(scan)
}

/// The inodes of `sockets` that a file may hold (0 is none).
fn inodes(sockets: &[TcpSocket]) -> HashSet<u64> {
    sockets
        .iter()
        .map(|s| s.inode)
        .filter(|&i| i != 0)
        .collect()
}

/// What a walk of `/proc` met.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStats {
    pub processes: usize,
    pub unreadable: usize,
    pub vanished: usize,
}

/// The holder of each wanted socket inode that some process holds.
#[derive(Debug, Default)]
pub struct Holders {
    /// Each process holding a wanted socket, once.
    processes: Vec<Holder>,
    /// Inode to its holder's index in `processes`.
    by_inode: HashMap<u64, usize>,
    pub walk: WalkStats,
}

impl Holders {
    pub fn holder(&self, inode: u64) -> Option<&Holder> {
        self.by_inode.get(&inode).map(|&i| &self.processes[i])
    }

    /// Adds a process met holding a wanted socket; its index, to `offer`.
    fn add(&mut self, holder: Holder) -> usize {
        self.processes.push(holder);
        self.processes.len() - 1
    }

    /// Charges `inode` to `candidate` (an index from `add`) if it is older
    /// than the holder found so far.
    fn offer(&mut self, inode: u64, candidate: usize) {
        let current = self.by_inode.entry(inode).or_insert(candidate);
        if is_older(&self.processes[candidate], &self.processes[*current]) {
            *current = candidate;
        }
    }
}

/// The rule for a socket several processes hold: charge the oldest (earliest
/// start, then smallest pid). nginx's master and workers share one listener,
/// and a listener inherited across fork stays with the process that had it
/// first, whatever order `/proc` lists them in.
fn is_older(a: &Holder, b: &Holder) -> bool {
    (a.start_ticks, a.pid) < (b.start_ticks, b.pid)
}

/// Walks `/proc/[0-9]*/fd/*` once for the holders of `inodes`. /proc lists
/// thread-group leaders only, so threads sharing a descriptor table are read
/// once; kernel threads have no descriptors and cost one empty listing.
/// Processes that exit or deny access mid-walk are counted, never fatal.
pub fn socket_holders(inodes: &HashSet<u64>) -> Result<Holders> {
    let mut holders = Holders::default();
    let mut proc = Dir::open(c"/proc").context("listing /proc")?;
    let mut path = Vec::with_capacity(32);
    while let Some(name) = proc.next_name().context("listing /proc")? {
        let Some(pid) = parse_pid(name.to_bytes()) else {
            continue;
        };
        let Some(fd_dir) = fd_dir_path(&mut path, name) else {
            continue;
        };
        match read_process(pid, fd_dir, inodes, &mut holders) {
            Ok(()) => holders.walk.processes += 1,
            Err(err) if is_gone(&err) => holders.walk.vanished += 1,
            Err(_) => holders.walk.unreadable += 1,
        }
    }
    Ok(holders)
}

/// `/proc/<pid>/fd`, built in `buf` (reused from one process to the next).
fn fd_dir_path<'b>(buf: &'b mut Vec<u8>, pid: &CStr) -> Option<&'b CStr> {
    buf.clear();
    buf.extend_from_slice(b"/proc/");
    buf.extend_from_slice(pid.to_bytes());
    buf.extend_from_slice(b"/fd\0");
    CStr::from_bytes_with_nul(buf).ok()
}

/// Reads one process's descriptors, offering each wanted socket to it. Its
/// stat is read only once it proves to hold one.
fn read_process(
    pid: u32,
    fd_dir: &CStr,
    inodes: &HashSet<u64>,
    holders: &mut Holders,
) -> io::Result<()> {
    let mut fds = Dir::open(fd_dir)?;
    let dir = fds.raw_fd();
    // `socket:[4294967295]` is 20 bytes; longer targets are not sockets.
    let mut link = [0u8; 32];
    let mut this_process = None;
    while let Some(name) = fds.next_name()? {
        let Some(inode) = read_link_at(dir, name, &mut link).and_then(socket_inode) else {
            continue;
        };
        if !inodes.contains(&inode) {
            continue;
        }
        let index = match this_process {
            Some(index) => index,
            None => *this_process.insert(holders.add(read_holder(pid)?)),
        };
        holders.offer(inode, index);
    }
    Ok(())
}

fn is_gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn parse_pid(name: &[u8]) -> Option<u32> {
    parse_digits(name)?.try_into().ok()
}

/// The inode in a descriptor's link target `socket:[N]`; `None` for any
/// other target (files, `pipe:[N]`, `anon_inode:...`).
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    parse_digits(digits)
}

fn parse_digits(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The start time of process `pid`, or `None` if it is gone: an owner found
/// earlier is still the same process iff this is unchanged.
pub fn process_start(pid: u32) -> Option<u64> {
    read_holder(pid).ok().map(|holder| holder.start_ticks)
}

fn read_holder(pid: u32) -> io::Result<Holder> {
    let stat = std::fs::read(format!("/proc/{pid}/stat"))?;
    let (comm, start_ticks) = parse_stat(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/PID/stat"))?;
    Ok(Holder {
        pid,
        comm: String::from_utf8_lossy(comm).into_owned(),
        start_ticks,
    })
}

/// The comm and start time from the text of `/proc/PID/stat`:
/// `pid (comm) state ppid ... starttime ...`. The comm may hold spaces and
/// parentheses, so it ends at the last `)`.
fn parse_stat(stat: &[u8]) -> Option<(&[u8], u64)> {
    let open = stat.iter().position(|&b| b == b'(')?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let comm = stat.get(open + 1..close)?;
    // The fields after the comm start at field 3 (state).
    let starttime = stat[close + 1..]
        .split(u8::is_ascii_whitespace)
        .filter(|field| !field.is_empty())
        .nth(22 - 3)?;
    Some((comm, parse_digits(starttime)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::sock_diag::tests::{endpoints, inode_of};
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        process::{Child, Command, Stdio},
    };

    fn holder(pid: u32, start_ticks: u64) -> Holder {
        Holder {
            pid,
            comm: format!("p{pid}"),
            start_ticks,
        }
    }

    #[test]
    fn the_oldest_holder_is_charged_whatever_the_order_met() {
        // A worker, its master, and two processes started in one tick.
        let met = [
            holder(901, 250),
            holder(900, 100),
            holder(40, 300),
            holder(30, 300),
        ];
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
            let mut holders = Holders::default();
            for i in order {
                let index = holders.add(met[i].clone());
                holders.offer(7, index);
            }
            assert_eq!(holders.holder(7), Some(&met[1]), "order {order:?}");
        }
        // Same start tick: the smaller pid.
        assert!(is_older(&met[3], &met[2]));
        assert!(!is_older(&met[1], &met[1]));
    }

    #[test]
    fn stat_is_read_past_a_comm_with_spaces_and_parentheses() {
        let fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        let tail = fields.join(" ");
        for (comm, stat) in [
            ("(a b) c)", format!("4242 ((a b) c)) {tail}\n")),
            ("systemd", format!("1 (systemd) {tail}")),
            ("", format!("1 () {tail}")),
        ] {
            assert_eq!(parse_stat(stat.as_bytes()), Some((comm.as_bytes(), 22)));
        }
    }

    #[test]
    fn odd_stat_text_is_refused_not_panicked_on() {
        let short = "7 (x) S 1 2 3";
        let unsigned = format!("7 (x) {}", ["-1"; 30].join(" "));
        for stat in ["", "7", "7 (x", "7 x) S", "7 )x( S", short, &unsigned] {
            assert_eq!(parse_stat(stat.as_bytes()), None, "{stat:?}");
        }
    }

    #[test]
    fn only_socket_links_name_an_inode() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[4294967295]"), Some(4294967295));
        for link in [
            &b"pipe:[1]"[..],
            b"anon_inode:[eventfd]",
            b"anon_inode:bpf-map",
            b"/tmp/socket:[1]",
            b"socket:[]",
            b"socket:[12a]",
            b"socket:[+5]",
            b"socket:[12",
            b"",
        ] {
            assert_eq!(
                socket_inode(link),
                None,
                "{}",
                String::from_utf8_lossy(link)
            );
        }
    }

    #[test]
    fn only_numeric_proc_entries_are_processes() {
        assert_eq!(parse_pid(b"1"), Some(1));
        assert_eq!(parse_pid(b"4194304"), Some(4194304));
        for name in [&b"self"[..], b"thread-self", b"1a", b"", b"99999999999"] {
            assert_eq!(parse_pid(name), None);
        }
    }

    #[test]
    fn process_start_names_a_live_process_only() {
        assert!(process_start(std::process::id()).is_some_and(|t| t > 0));
        // Above any pid_max.
        assert_eq!(process_start(u32::MAX), None);
    }

    fn me() -> Holder {
        read_holder(std::process::id()).unwrap()
    }

    /// A dump of a table that other tests' sockets churn through may pass
    /// over an entry (the kernel resumes by position): look up to 3 times.
    fn scan_until(done: impl Fn(&Scan) -> bool) -> Scan {
        let mut last = scan().unwrap();
        for _ in 0..2 {
            if done(&last) {
                break;
            }
            last = scan().unwrap();
        }
        last
    }

    /// The owned socket with endpoints `e`, among listeners if `listening`.
    fn find<'s>(scan: &'s Scan, e: &Endpoints, listening: bool) -> Option<&'s Owned> {
        let owned = if listening {
            &scan.listeners
        } else {
            &scan.connections
        };
        owned.iter().find(|o| o.socket.endpoints == *e)
    }

    #[test]
    fn scan_charges_this_process_with_its_listeners_and_both_connection_ends() {
        let mut held = Vec::new();
        let mut expected = Vec::new();
        let v4: (IpAddr, IpAddr) = (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::UNSPECIFIED.into());
        let v6 = (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::UNSPECIFIED.into());
        for (local, any) in [v4, v6] {
            let listener = TcpListener::bind((local, 0)).unwrap();
            let at = listener.local_addr().unwrap();
            let client = TcpStream::connect(at).unwrap();
            let (server, from) = listener.accept().unwrap();
            let unbound = SocketAddr::new(any, 0);
            expected.push((endpoints(at, unbound), state::LISTEN, inode_of(&listener)));
            expected.push((endpoints(from, at), state::ESTABLISHED, inode_of(&client)));
            expected.push((endpoints(at, from), state::ESTABLISHED, inode_of(&server)));
            held.push((listener, client, server));
        }
        let listed = |s: &Scan, (e, state, _): &(Endpoints, u8, u64)| {
            find(s, e, *state == state::LISTEN).is_some()
        };
        let scan = scan_until(|s| expected.iter().all(|x| listed(s, x)));
        let me = me();
        for (e, state, inode) in &expected {
            let owned = find(&scan, e, *state == state::LISTEN);
            let owned = owned.unwrap_or_else(|| panic!("{e:?} not found"));
            assert_eq!((owned.socket.state, owned.socket.inode), (*state, *inode));
            assert_eq!(owned.holder, me);
        }
        let stats = scan.stats;
        assert!(stats.owned >= 6 && stats.sockets >= stats.owned && stats.processes >= 1);
    }

    /// `sleep 30`, holding a copy of `listener`; killed on drop.
    struct Sleeper(Child);

    impl Sleeper {
        fn holding(listener: &TcpListener) -> Sleeper {
            // dup() leaves FD_CLOEXEC clear, so the copy survives the exec.
            // SAFETY: dup of an open descriptor; the result is owned here.
            let raw = unsafe { libc::dup(listener.as_raw_fd()) };
            assert!(raw >= 0, "dup: {}", io::Error::last_os_error());
            // SAFETY: `raw` is a fresh descriptor nothing else owns.
            let inherited = unsafe { OwnedFd::from_raw_fd(raw) };
            let child = Command::new("sleep").arg("30").stdin(Stdio::null()).spawn();
            drop(inherited);
            Sleeper(child.unwrap())
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn holds(pid: u32, inode: u64) -> bool {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| socket_inode(link.as_os_str().as_encoded_bytes()) == Some(inode))
    }

    #[test]
    fn a_listener_shared_with_a_younger_process_is_charged_to_the_older() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let inode = inode_of(&listener);
        // Start times count 10 ms ticks: let the child start a tick later.
        std::thread::sleep(Duration::from_millis(20));
        let child = Sleeper::holding(&listener);
        let child_pid = child.0.id();
        assert!(
            holds(child_pid, inode),
            "the child did not inherit the listener"
        );
        let me = me();
        let child_start = process_start(child_pid).unwrap();
        assert!(
            child_start > me.start_ticks,
            "{child_start} vs {}",
            me.start_ticks
        );

        let at = listener.local_addr().unwrap();
        let e = endpoints(at, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
        let scan = scan_until(|s| find(s, &e, true).is_some());
        let owned = find(&scan, &e, true).expect("the shared listener");
        assert_eq!(owned.holder, me);

        let holders = socket_holders(&HashSet::from([inode])).unwrap();
        assert_eq!(holders.holder(inode), Some(&me));
    }
}
