//! Helpers for tests that load the real program and drive real connections.
//!
//! Every test shares the kernel with the others running in parallel: each
//! picks ports of its own and asserts only on sockets using them.

#![allow(dead_code)] // each test binary uses its own subset

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

pub const TRACER: &str = env!("CARGO_BIN_EXE_tcp-trace");

/// One line of `tcp-trace watch --json`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Ev {
    pub ts_ns: u64,
    pub sk: String,
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
}

/// A running `tcp-trace watch --json`.
pub struct Tracer {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

/// What a stopped tracer printed.
pub struct Trace {
    pub events: Vec<Ev>,
    pub stderr: Vec<String>,
}

impl Tracer {
    /// Starts the tracer and waits until it says it is tracing. Fails loudly
    /// (never skips) when the program cannot be loaded.
    pub fn start(args: &[&str]) -> Tracer {
        let mut full = vec!["watch", "--json"];
        full.extend_from_slice(args);
        Self::command(&full)
    }

    /// Starts any tracing command (`stats ...`, `life ...`).
    pub fn command(args: &[&str]) -> Tracer {
        Self::command_env(args, &[])
    }

    pub fn command_env(args: &[&str], env: &[(&str, &str)]) -> Tracer {
        let mut child = Command::new(TRACER)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tcp-trace");
        let (tx, stdout) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (tx, stderr) = mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("tcp-trace: tracing ") => break,
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
        }
        Tracer {
            child,
            stdout,
            stderr,
        }
    }

    /// The next line the tracer prints on stdout, waiting up to `limit`.
    pub fn next_line(&self, limit: Duration) -> Option<String> {
        self.stdout.recv_timeout(limit).ok()
    }

    /// Stops the tracer with SIGTERM, as an operator or systemd would, and
    /// returns its stdout and stderr lines.
    pub fn stop_raw(mut self) -> (Vec<String>, Vec<String>) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        // The reader ends at EOF, which follows the exit.
        let lines: Vec<String> = self.stdout.iter().collect();
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        assert!(
            status.success(),
            "tcp-trace exited with {status}: {stderr:?}"
        );
        (lines, stderr)
    }

    /// Stops `watch --json` and parses its events.
    pub fn stop(self) -> Trace {
        let (lines, stderr) = self.stop_raw();
        let events = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        Trace { events, stderr }
    }
}

impl Trace {
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

    pub fn summary(&self) -> &str {
        self.stderr
            .iter()
            .find(|l| l.contains("events received"))
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no summary on stderr: {:?}", self.stderr))
    }
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

pub fn loopback(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

/// A port below the ephemeral range (so no client socket takes it by chance)
/// that is free on both loopback addresses right now.
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
        if free {
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

/// The `tcp_peer` example, built by `cargo test` next to the test binaries.
fn peer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>/deps -> target/<profile>
    let bin = dir.join("examples").join("tcp_peer");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with cargo test",
        bin.display()
    );
    bin
}

/// A peer process that waits for `go` before acting.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    pub fn spawn(args: &[String]) -> Peer {
        let mut child = Command::new(peer_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning tcp_peer");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Peer {
            child,
            stdin,
            stdout,
        }
    }

    /// A server, already listening, that writes one byte on each connection,
    /// then waits for the client to close first; runs until `finish`.
    pub fn waiting_server(addr: SocketAddr) -> Peer {
        let mut server = Self::spawn(&["waiting-server".into(), addr.to_string()]);
        server.go();
        server.expect_line("listening");
        server
    }

    /// `count` connections in turn, each closed by the client first (with a
    /// reset when `reset`), by a process named `name`.
    pub fn closer(addr: SocketAddr, count: usize, name: &str, reset: bool) -> Peer {
        let mut args = vec![
            "closer".into(),
            addr.to_string(),
            count.to_string(),
            name.into(),
        ];
        if reset {
            args.push("reset".into());
        }
        Self::spawn(&args)
    }

    pub fn server(addr: SocketAddr, hold: Duration, linger: Duration) -> Peer {
        Self::spawn(&[
            "server".into(),
            addr.to_string(),
            hold.as_millis().to_string(),
            linger.as_millis().to_string(),
        ])
    }

    pub fn client(addr: SocketAddr, linger: Duration) -> Peer {
        Self::spawn(&[
            "client".into(),
            addr.to_string(),
            linger.as_millis().to_string(),
        ])
    }

    /// A server for `count` connections, each reading `incoming` bytes and
    /// writing `outgoing` before its hold.
    pub fn server_n(
        addr: SocketAddr,
        script: Script,
        count: usize,
        incoming: usize,
        outgoing: usize,
    ) -> Peer {
        Self::spawn(&[
            "server".into(),
            addr.to_string(),
            script.hold.as_millis().to_string(),
            script.linger.as_millis().to_string(),
            count.to_string(),
            incoming.to_string(),
            outgoing.to_string(),
        ])
    }

    /// `count` concurrent client connections, each writing `outgoing` bytes
    /// and expecting `incoming`.
    pub fn client_n(
        addr: SocketAddr,
        script: Script,
        count: usize,
        outgoing: usize,
        incoming: usize,
    ) -> Peer {
        Self::spawn(&[
            "client".into(),
            addr.to_string(),
            script.linger.as_millis().to_string(),
            count.to_string(),
            outgoing.to_string(),
            incoming.to_string(),
        ])
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn go(&mut self) {
        writeln!(self.stdin.as_mut().unwrap(), "go").expect("writing go");
    }

    pub fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reading the peer");
        assert_eq!(line.trim(), want, "peer {} said something else", self.pid());
    }

    /// Closes its stdin (a waiting server then stops) and waits for success.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let status = wait_timeout(&mut self.child, Duration::from_secs(30));
        assert!(
            status.success(),
            "peer {} exited with {status}",
            self.child.id()
        );
    }
}

/// Timing of a scripted exchange.
#[derive(Clone, Copy)]
pub struct Script {
    /// How long the server holds the accepted connection before closing it.
    pub hold: Duration,
    /// How long the client lingers after EOF before closing.
    pub linger: Duration,
}

/// Runs one exchange: server and client in two processes. Returns their pids.
pub fn exchange(addr: SocketAddr, script: Script) -> (u32, u32) {
    let mut server = Peer::server(addr, script.hold, script.linger);
    server.go();
    server.expect_line("listening");
    let mut client = Peer::client(addr, script.linger);
    client.go();
    let pids = (server.pid(), client.pid());
    client.finish();
    server.finish();
    pids
}

/// Runs `count` concurrent exchanges with payloads; returns (server, client) pids.
pub fn exchanges(
    addr: SocketAddr,
    script: Script,
    count: usize,
    up: usize,
    down: usize,
) -> (u32, u32) {
    let mut server = Peer::server_n(addr, script, count, up, down);
    server.go();
    server.expect_line("listening");
    let mut client = Peer::client_n(addr, script, count, up, down);
    client.go();
    let pids = (server.pid(), client.pid());
    client.finish();
    server.finish();
    pids
}

/// The sequence of `OLD->NEW` of one socket's events.
pub fn sequence(events: &[Ev]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{}->{}", e.old_state, e.new_state))
        .collect()
}

/// An nftables table of the test's own, deleted when dropped (even when the
/// test fails), holding `output` rules.
pub struct NftTable {
    name: String,
}

impl NftTable {
    pub fn new(name: &str, rules: &[String]) -> NftTable {
        let table = NftTable {
            name: name.to_string(),
        };
        let mut script = format!(
            "table inet {name} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
        );
        for rule in rules {
            script.push_str(&format!("  {rule}\n"));
        }
        script.push_str(" }\n}\n");
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running nft (Debian package nftables; cargo xtask setup installs it)");
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft rejected:\n{script}");
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.name])
            .status();
    }
}
