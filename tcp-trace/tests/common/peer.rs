//! The `tcp_peer` child process (examples/tcp_peer.rs) and the scripted
//! exchanges the tests drive through it.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use super::{
    agent::{wait_timeout, Ev},
    net::{join_netns, NetNs},
};

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
        Self::spawn_in(None, args)
    }

    /// A peer in network namespace `netns` (the host's when `None`).
    pub fn spawn_in(netns: Option<&NetNs>, args: &[String]) -> Peer {
        let mut command = Command::new(peer_bin());
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // Kept open until the child has been spawned.
        let netns = netns.map(NetNs::open);
        if let Some(file) = &netns {
            let fd = std::os::fd::AsRawFd::as_raw_fd(file);
            // SAFETY: the child calls only `join_netns`, async-signal-safe,
            // on a descriptor the parent holds open across the spawn.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, move || join_netns(fd));
            }
        }
        Self::from_child(command.spawn().expect("spawning tcp_peer"))
    }

    fn from_child(mut child: Child) -> Peer {
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
        netns: Option<&NetNs>,
        addr: SocketAddr,
        script: Script,
        count: usize,
        incoming: usize,
        outgoing: usize,
    ) -> Peer {
        Self::spawn_in(
            netns,
            &[
                "server".into(),
                addr.to_string(),
                script.hold.as_millis().to_string(),
                script.linger.as_millis().to_string(),
                count.to_string(),
                incoming.to_string(),
                outgoing.to_string(),
            ],
        )
    }

    /// `count` concurrent client connections, each writing `outgoing` bytes
    /// and expecting `incoming`.
    pub fn client_n(
        netns: Option<&NetNs>,
        addr: SocketAddr,
        script: Script,
        count: usize,
        outgoing: usize,
        incoming: usize,
    ) -> Peer {
        Self::spawn_in(
            netns,
            &[
                "client".into(),
                addr.to_string(),
                script.linger.as_millis().to_string(),
                count.to_string(),
                outgoing.to_string(),
                incoming.to_string(),
            ],
        )
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

impl Script {
    /// A short exchange, for tests that need the connections but not their timing.
    pub const QUICK: Script = Script {
        hold: Duration::from_millis(20),
        linger: Duration::from_millis(20),
    };
}

/// Runs one exchange: server and client in two processes. Returns their pids.
pub fn exchange(addr: SocketAddr, script: Script) -> (u32, u32) {
    run_pair(Peer::server(addr, script.hold, script.linger), || {
        Peer::client(addr, script.linger)
    })
}

/// Starts `server`, then, once it listens, the client `client` makes; waits
/// for both to succeed. Returns their pids.
fn run_pair(mut server: Peer, client: impl FnOnce() -> Peer) -> (u32, u32) {
    server.go();
    server.expect_line("listening");
    let mut client = client();
    client.go();
    let pids = (server.pid(), client.pid());
    client.finish();
    server.finish();
    pids
}

/// Runs `count` concurrent exchanges with payloads, with both peers in
/// network namespace `netns` (the host's when `None`); returns (server,
/// client) pids.
pub fn exchanges(
    netns: Option<&NetNs>,
    addr: SocketAddr,
    script: Script,
    count: usize,
    up: usize,
    down: usize,
) -> (u32, u32) {
    run_pair(Peer::server_n(netns, addr, script, count, up, down), || {
        Peer::client_n(netns, addr, script, count, up, down)
    })
}

/// The sequence of `OLD->NEW` of one socket's transitions (accepts change no state).
pub fn sequence(events: &[Ev]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event != "accept")
        .map(|e| format!("{}->{}", e.old_state, e.new_state))
        .collect()
}
