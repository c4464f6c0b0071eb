//! Loopback addresses, free ports, raw socket/sockaddr helpers, and network
//! namespaces joined to the host by a veth pair.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use super::scratch::serial;

pub fn loopback(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

/// Ports this test process has handed out: a port only dropped packets use
/// (no listener holds it) would otherwise look free to a test running beside.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// A port below the ephemeral range (so no client socket takes it by chance)
/// that is free on both loopback addresses right now, and not handed out to
/// another test of this process before.
pub fn free_port() -> u16 {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ (std::process::id() << 12);
    let mut x = seed | 1;
    loop {
        // xorshift: different tests in one process get different sequences via the clock.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = 20_000 + (x % 10_000) as u16;
        let free = [false, true].iter().all(|&v6| unused(loopback(v6), port));
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if free && !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// Whether nothing, not even a timewait socket left by an earlier test, holds
/// `port` on `ip`: a bind without SO_REUSEADDR (which std's listeners set)
/// fails on those.
fn unused(ip: IpAddr, port: u16) -> bool {
    let addr = SocketAddr::new(ip, port);
    let fd = socket(addr);
    let (storage, len) = sockaddr(addr);
    // SAFETY: a valid socket and address; the OwnedFd closes the socket.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    rc == 0
}

/// A raw TCP socket for `addr`'s family, so options can be set before connect.
pub fn socket(addr: SocketAddr) -> std::os::fd::OwnedFd {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: creating a socket; the OwnedFd takes ownership.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// A listener on `addr` that accepts one connection in the background and
/// closes it 200 ms later.
pub fn accept_one(addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(conn);
    })
}

/// `connect(2)` on a raw socket (options set before it).
pub fn connect(fd: &std::os::fd::OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
    let (storage, len) = sockaddr(addr);
    // SAFETY: a valid socket and address.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An int socket option; fails the test when refused.
pub fn set_int(fd: &std::os::fd::OwnedFd, level: i32, name: i32, value: i32) {
    // SAFETY: a valid socket and an int option.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(fd),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data large enough for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Runs `ip ARGS`, failing with what it said unless it succeeds.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (Debian package iproute2; cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `ip ARGS` and returns whether it succeeded, for clearing leftovers
/// and in Drop.
fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The /16 the test namespaces take their /30s from. Only addresses of
/// namespaces a test made are ever in it: nothing leaves the machine.
const NETNS_NET: [u8; 2] = [10, 213];

/// A named network namespace of the test's own (`ip netns add tt-PID-N`),
/// with its loopback up and a veth pair to the host: `host_addr()/30` on the
/// host side, `addr()/30` on the namespace's `eth0`. Deleted, with the
/// pair, when dropped.
pub struct NetNs {
    name: String,
    host_if: String,
    host_addr: Ipv4Addr,
    addr: Ipv4Addr,
}

impl NetNs {
    pub fn new() -> NetNs {
        let n = serial();
        let pid = std::process::id();
        let name = format!("tt-{pid}-{n}");
        // Interface names hold at most 15 bytes.
        let host_if = format!("tt{pid:x}-{n:x}h");
        let peer_if = format!("tt{pid:x}-{n:x}c");
        // Leftovers of a dead run with our pid.
        ip_quiet(&["netns", "del", &name]);
        ip_quiet(&["link", "del", &host_if]);
        ip(&["netns", "add", &name]);
        let (host_addr, addr) = free_slash30(pid, n);
        let netns = NetNs {
            name,
            host_if,
            host_addr,
            addr,
        };
        let (name, host_if) = (&netns.name, &netns.host_if);
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", &peer_if, "netns", name,
        ]);
        ip(&["-n", name, "link", "set", &peer_if, "name", "eth0"]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", host_if]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["link", "set", host_if, "up"]);
        ip(&["-n", name, "link", "set", "eth0", "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        netns
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that keeps it alive, for setns or an OCI config.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// The host end of the veth pair: what the namespace connects to.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The namespace's own address, on its `eth0`.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host-side interface of the veth pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Makes the namespace's loopback acknowledge every segment at once
    /// (route metric `quickack`), so that no delayed-ACK timer fires later
    /// in whatever task a CPU happens to run: the workload's transitions
    /// then all happen in its own threads' system calls.
    pub fn quickack_loopback(&self) {
        for dst in ["127.0.0.0/8", "127.0.0.1"] {
            ip(&[
                "-n",
                &self.name,
                "route",
                "change",
                "table",
                "local",
                "local",
                dst,
                "dev",
                "lo",
                "proto",
                "kernel",
                "scope",
                "host",
                "src",
                "127.0.0.1",
                "quickack",
                "1",
            ]);
        }
    }

    /// Moves the calling thread into the namespace; threads it spawns
    /// afterwards start there too.
    pub fn enter_on_this_thread(&self) {
        let file = self.open();
        if let Err(err) = join_netns(std::os::fd::AsRawFd::as_raw_fd(&file)) {
            panic!("setns into {}: {err}", self.name);
        }
    }

    /// The namespace's file, for `join_netns`.
    pub fn open(&self) -> std::fs::File {
        std::fs::File::open(self.path()).expect("opening the namespace")
    }

    /// `ip netns exec NAME PROGRAM`: a command to run inside.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace goes once nothing
        // (no process, no mount) holds it.
        ip_quiet(&["link", "del", &self.host_if]);
        ip_quiet(&["netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the network namespace of open file `fd`.
/// Async-signal-safe: a child may call it between fork and exec.
pub fn join_netns(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor the caller holds open, for this thread
    // alone; it changes no memory of ours.
    match unsafe { libc::setns(fd, libc::CLONE_NEWNET) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A /30 in NETNS_NET that no interface on the host has an address in:
/// (host end, namespace end).
fn free_slash30(pid: u32, n: u32) -> (Ipv4Addr, Ipv4Addr) {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("running ip");
    let taken = String::from_utf8_lossy(&out.stdout).into_owned();
    let [a, b] = NETNS_NET;
    // 16384 /30s in the /16; start where this pid and serial point.
    let start = pid
        .wrapping_mul(2_654_435_761)
        .wrapping_add(n.wrapping_mul(40_503));
    for i in 0..16_384u32 {
        let block = (start.wrapping_add(i) % 16_384) * 4;
        let (c, d) = ((block >> 8) as u8, (block & 0xff) as u8);
        let in_use = (0..4).any(|k| taken.contains(&format!(" {a}.{b}.{c}.{}/", d + k)));
        if !in_use {
            return (Ipv4Addr::new(a, b, c, d + 1), Ipv4Addr::new(a, b, c, d + 2));
        }
    }
    panic!("no free /30 left in {a}.{b}.0.0/16:\n{taken}");
}
