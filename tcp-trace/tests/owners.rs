//! Owners beyond transitions: sockets that existed before the agent started
//! (start-up scan), connections charged to their listener until accept(),
//! the accept event and its accept-queue wait, the owner's cgroup v2
//! placement (unit, container, pod), `--cgroup`, and the network namespace.
//!
//! The helper processes are python3 scripts, so that the test knows their
//! pids and they run apart from the test process (in cgroups of their own).

mod common;

use std::{
    fs,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, OnceLock,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{free_port, loopback, Agent};
use serde::Deserialize;

/// One line of `tcp-trace watch --json`, with the owner fields (the shared
/// `common::Ev` predates them). `event` is required: a line without it fails
/// to parse.
#[derive(Debug, Clone, Deserialize)]
#[allow(dead_code)] // `sk` and `comm` show in failure messages only
struct Ev {
    ts_ns: u64,
    sk: String,
    event: String,
    pid: Option<u32>,
    comm: Option<String>,
    owner_source: Option<String>,
    cgroup: Option<String>,
    unit: Option<String>,
    container: Option<String>,
    pod_uid: Option<String>,
    netns: Option<u64>,
    lport: u16,
    rport: u16,
    old_state: String,
    new_state: String,
    duration_ns: Option<u64>,
}

impl Ev {
    fn is(&self, old: &str, new: &str) -> bool {
        self.event == "transition" && self.old_state == old && self.new_state == new
    }
}

/// What a stopped agent printed.
struct Trace {
    lines: Vec<String>,
    stderr: Vec<String>,
    events: Vec<Ev>,
}

impl Trace {
    fn stop(agent: Agent) -> Trace {
        // Let the softirq tail of the connections reach the ring buffer.
        thread::sleep(Duration::from_millis(200));
        let (lines, stderr) = agent.stop_raw();
        let events = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        // OWNERS_DUMP=1 shows what the agent printed, passing or not.
        if std::env::var_os("OWNERS_DUMP").is_some() {
            eprintln!("{}\n{}", lines.join("\n"), stderr.join("\n"));
        }
        Trace {
            lines,
            stderr,
            events,
        }
    }

    /// Fails with `msg` and everything the agent printed.
    #[track_caller]
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        panic!(
            "{msg}\n--- the agent's {} lines:\n{}\n--- its stderr:\n{}",
            self.lines.len(),
            self.lines.join("\n"),
            self.stderr.join("\n")
        )
    }

    #[track_caller]
    fn check(&self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.fail(msg())
        }
    }

    fn select(&self, pred: impl Fn(&Ev) -> bool) -> Vec<&Ev> {
        self.events.iter().filter(|e| pred(e)).collect()
    }

    /// The one event matching `pred`.
    #[track_caller]
    fn one(&self, what: &str, pred: impl Fn(&Ev) -> bool) -> &Ev {
        let found = self.select(pred);
        if found.len() != 1 {
            self.fail(format!(
                "expected one {what}, found {}: {found:#?}",
                found.len()
            ))
        }
        found[0]
    }
}

/// The real python3, not pyenv's shim script: starts faster, and its pid is
/// the interpreter's from the start.
fn python() -> &'static str {
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

/// A server on 127.0.0.1:argv[1] that waits argv[2] seconds after a
/// connection is ready to accept before accepting it, says `accepted <peer
/// port>` for each, closes each connection at EOF, and exits when its stdin
/// closes.
const SERVER: &str = r#"
import select, socket, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", port))
l.listen(16)
print("listening", flush=True)
conns = []
while True:
    r, _, _ = select.select([l, sys.stdin] + conns, [], [])
    if sys.stdin in r and not sys.stdin.readline():
        break
    if l in r:
        time.sleep(delay)
        c, peer = l.accept()
        conns.append(c)
        print("accepted", peer[1], flush=True)
    for c in [c for c in conns if c in r]:
        if not c.recv(4096):
            c.close()
            conns.remove(c)
"#;

/// One connection to 127.0.0.1:argv[1]; says its local port, closes it on a
/// line from stdin (then says `closed`), exits when stdin closes.
const HOLDING_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
sys.stdin.read()
"#;

/// argv[2] connections in turn to 127.0.0.1:argv[1], each closed at once;
/// says each local port.
const CLIENT: &str = r#"
import socket, sys
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print(s.getsockname()[1], flush=True)
    s.close()
"#;

/// A python3 child whose stdout lines the test waits for with a timeout.
/// Killed when dropped, so a failing test leaves no process behind.
struct Py {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Py {
    fn spawn(script: &str, args: &[String]) -> Py {
        let mut command = Command::new(python());
        command.arg("-c").arg(script).args(args);
        Self::from(command)
    }

    /// Runs the script with its process moved first into the cgroup at `dir`
    /// (a directory under the cgroup2 mount): the pid is the same after exec.
    fn in_cgroup(dir: &Path, script: &str, args: &[String]) -> Py {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(dir)
            .args([python(), "-c", script])
            .args(args);
        Self::from(command)
    }

    fn from(mut command: Command) -> Py {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning python3");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&mut self) -> String {
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

    fn expect(&mut self, want: &str) {
        let line = self.line();
        assert_eq!(
            line,
            want,
            "python3 child {} said something else",
            self.pid()
        );
    }

    fn port(&mut self) -> u16 {
        let line = self.line();
        line.parse()
            .unwrap_or_else(|_| panic!("python3 child {}: not a port: {line:?}", self.pid()))
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").expect("writing to python3");
    }

    /// Closes its stdin and waits for it to exit successfully.
    fn finish(&mut self) {
        drop(self.stdin.take());
        let status = common::wait_timeout(&mut self.child, Duration::from_secs(10));
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

/// Where the cgroup v2 (unified) hierarchy is mounted: /sys/fs/cgroup on
/// pure v2 hosts, /sys/fs/cgroup/unified on hybrid ones.
fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<(String, PathBuf)> = mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            (fields.get(dash + 1) == Some(&"cgroup2"))
                .then(|| (fields[3].to_string(), PathBuf::from(fields[4])))
        })
        .collect();
    mounts
        .iter()
        .find(|(root, _)| root == "/")
        .or(mounts.first())
        .map(|(_, at)| at.clone())
        .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mountinfo:\n{mountinfo}"))
}

/// Cgroups a test made, removed deepest first when dropped (after the
/// processes in them have exited), so that failures clean up too. Directories
/// that existed already (system.slice) are left alone.
struct Cgroups {
    root: PathBuf,
    /// Directories made, and whether processes ran in them (the end of a
    /// path given to `make`).
    made: Vec<(PathBuf, bool)>,
}

impl Cgroups {
    fn new() -> Cgroups {
        Cgroups {
            root: cgroup2_root(),
            made: Vec::new(),
        }
    }

    /// Makes the cgroup at `path` (relative to the root) and any missing
    /// parents; returns its directory.
    fn make(&mut self, path: &str) -> PathBuf {
        let mut dir = self.root.clone();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for (at, part) in parts.iter().enumerate() {
            dir.push(part);
            match fs::create_dir(&dir) {
                Ok(()) => self.made.push((dir.clone(), at + 1 == parts.len())),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => panic!("making cgroup {}: {e}", dir.display()),
            }
        }
        dir
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for (dir, leaf) in self.made.iter().rev() {
            // A cgroup whose last process just exited can stay busy briefly;
            // a parent still busy once ours below it are gone holds another
            // test's cgroups (system.slice made by us, then used by others).
            let deadline = Instant::now() + Duration::from_secs(if *leaf { 2 } else { 0 });
            while let Err(e) = fs::remove_dir(dir) {
                if e.kind() == ErrorKind::NotFound || Instant::now() >= deadline {
                    eprintln!("leaving cgroup {}: {e}", dir.display());
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `n` pseudo-random lowercase hex digits, different per process and call.
fn unique_hex(n: usize) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    // Calls within one clock tick still differ.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let mut x = nanos ^ (u64::from(std::process::id()) << 40) ^ (call << 20) ^ (n as u64);
    let mut out = String::new();
    while out.len() < n {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.push_str(&format!("{:016x}", z ^ (z >> 31)));
    }
    out.truncate(n);
    out
}

/// A UUID-shaped pod uid: 8-4-4-4-12 hex digits.
fn unique_uid() -> String {
    let hex = unique_hex(32);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn listener_opened_before_start_names_its_process() {
    let port = free_port();
    let mut server = Py::spawn(SERVER, &[port.to_string(), "0".into()]);
    server.expect("listening");
    // A connection made and accepted before the agent starts.
    let mut old_client = Py::spawn(HOLDING_CLIENT, &[port.to_string()]);
    let old_port = old_client.port();
    server.expect(&format!("accepted {old_port}"));
    let (server_pid, old_client_pid) = (server.pid(), old_client.pid());

    let agent = Agent::start(&["--port", &port.to_string()]);
    // A new connection, from the test process.
    let stream = TcpStream::connect(SocketAddr::new(loopback(false), port)).unwrap();
    let new_port = stream.local_addr().unwrap().port();
    server.expect(&format!("accepted {new_port}"));
    // The old connection closes from its client end.
    old_client.send("close");
    old_client.expect("closed");
    drop(stream);
    thread::sleep(Duration::from_millis(100));
    let trace = Trace::stop(agent);
    old_client.finish();
    server.finish();

    // The new connection's server end: charged to the listener's owner (the
    // start-up scan's) until accept(), then to the process that accepted it.
    let new_server = |e: &Ev| e.lport == port && e.rport == new_port;
    for (old, new) in [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")] {
        let ev = trace.one(&format!("{old} -> {new} of the new connection"), |e| {
            new_server(e) && e.is(old, new)
        });
        trace.check(
            ev.pid == Some(server_pid) && ev.owner_source.as_deref() == Some("listener"),
            || {
                format!(
                    "{old} -> {new} of the new connection: expected pid {server_pid} (the \
                     listener's process) with owner_source \"listener\": {ev:#?}"
                )
            },
        );
    }
    let accept = trace.one("accept of the new connection", |e| {
        new_server(e) && e.event == "accept"
    });
    trace.check(
        accept.pid == Some(server_pid) && accept.owner_source.as_deref() == Some("accept"),
        || format!("accept: expected pid {server_pid} with owner_source \"accept\": {accept:#?}"),
    );

    // The connection from before the start: each end names its process.
    let client_end = trace.select(|e| e.lport == old_port && e.rport == port);
    let server_end = trace.select(|e| e.lport == port && e.rport == old_port);
    trace.check(!client_end.is_empty() && !server_end.is_empty(), || {
        format!(
            "the connection from before the start (client port {old_port}) was closed: events \
             of both ends expected; client end {client_end:#?}, server end {server_end:#?}"
        )
    });
    for (end, pid, what) in [
        (&client_end, old_client_pid, "client"),
        (&server_end, server_pid, "server"),
    ] {
        for ev in end.iter() {
            trace.check(ev.pid == Some(pid), || {
                format!(
                    "the old connection's {what} end: expected pid {pid} (server {server_pid}, \
                     client {old_client_pid}): {ev:#?}"
                )
            });
        }
    }
    trace.check(
        client_end
            .iter()
            .chain(&server_end)
            .any(|e| e.owner_source.as_deref() == Some("scan")),
        || {
            format!(
                "no event of the old connection has owner_source \"scan\": client end \
                 {client_end:#?}, server end {server_end:#?}"
            )
        },
    );
    for ev in trace.select(|e| e.lport == port) {
        trace.check(ev.pid.is_some(), || {
            format!("a server-side event of port {port} with an unknown owner: {ev:#?}")
        });
    }
}

/// How late the accept event may come after the server's sleep: the python
/// child's wakeups from select() and sleep() on two shared cores. The wait is
/// never shorter than the sleep (the connection is established before
/// select() reports it).
const ACCEPT_TOLERANCE: Duration = Duration::from_millis(200);

#[test]
fn accept_queue_wait_is_measured() {
    let port = free_port();
    let delay = Duration::from_millis(400);
    let agent = Agent::start(&["--port", &port.to_string()]);
    // Listens after the start: the listen() caller owns the listener.
    let mut server = Py::spawn(SERVER, &[port.to_string(), delay.as_secs_f64().to_string()]);
    server.expect("listening");
    let stream = TcpStream::connect(SocketAddr::new(loopback(false), port)).unwrap();
    let cport = stream.local_addr().unwrap().port();
    server.expect(&format!("accepted {cport}"));
    drop(stream);
    let trace = Trace::stop(agent);
    server.finish();
    let server_pid = server.pid();

    let ours = |e: &Ev| e.lport == port && e.rport == cport;
    let syn_recv = trace.one("LISTEN -> SYN_RECV", |e| {
        ours(e) && e.is("LISTEN", "SYN_RECV")
    });
    trace.check(
        syn_recv.pid == Some(server_pid) && syn_recv.owner_source.as_deref() == Some("listener"),
        || format!("LISTEN -> SYN_RECV: expected the listen() caller {server_pid} with owner_source \"listener\": {syn_recv:#?}"),
    );
    let established = trace.one("server SYN_RECV -> ESTABLISHED", |e| {
        ours(e) && e.is("SYN_RECV", "ESTABLISHED")
    });
    let accept = trace.one("accept", |e| ours(e) && e.event == "accept");
    trace.check(accept.pid == Some(server_pid), || {
        format!("accept: expected pid {server_pid}: {accept:#?}")
    });
    trace.check(
        accept.old_state == "ESTABLISHED" && accept.new_state == "ESTABLISHED",
        || format!("accept: expected ESTABLISHED -> ESTABLISHED: {accept:#?}"),
    );
    trace.check(established.ts_ns < accept.ts_ns, || {
        format!("SYN_RECV -> ESTABLISHED {established:#?} does not precede the accept {accept:#?}")
    });
    let wait = accept
        .duration_ns
        .unwrap_or_else(|| trace.fail(format!("accept without a duration: {accept:#?}")));
    let (lo, hi) = (
        delay.as_nanos() as u64,
        (delay + ACCEPT_TOLERANCE).as_nanos() as u64,
    );
    trace.check((lo..=hi).contains(&wait), || {
        format!(
            "accept-queue wait {:.1} ms, expected {delay:?} .. +{ACCEPT_TOLERANCE:?}: {accept:#?}",
            ms(wait)
        )
    });
    // It is the time from ESTABLISHED to the accept event, as both stamp it.
    let between = accept.ts_ns - established.ts_ns;
    trace.check(between.abs_diff(wait) < 5_000_000, || {
        format!(
            "accept-queue wait {:.3} ms, but the accept event comes {:.3} ms after SYN_RECV -> \
             ESTABLISHED",
            ms(wait),
            ms(between)
        )
    });
}

/// A cgroup path (below the root) and what it says about its processes.
struct Shape {
    path: String,
    unit: Option<String>,
    container: Option<String>,
    pod_uid: Option<String>,
}

#[test]
fn cgroup_shapes_name_unit_container_and_pod() {
    let pid = std::process::id();
    let (docker, containerd) = (unique_hex(64), unique_hex(64));
    let uid = unique_uid();
    let service = format!("tt-{pid}-nginx.service");
    let docker_scope = format!("docker-{docker}.scope");
    let pod_slice = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
    let cri_scope = format!("cri-containerd-{containerd}.scope");
    let shapes = [
        Shape {
            path: format!("system.slice/{service}"),
            unit: Some(service),
            container: None,
            pod_uid: None,
        },
        Shape {
            path: format!("system.slice/{docker_scope}"),
            unit: Some(docker_scope),
            container: Some(docker),
            pod_uid: None,
        },
        Shape {
            path: format!("kubepods.slice/kubepods-burstable.slice/{pod_slice}/{cri_scope}"),
            unit: Some(cri_scope),
            container: Some(containerd),
            pod_uid: Some(uid),
        },
    ];
    let mut cgroups = Cgroups::new();
    // Made before the start: the agent's resolver then finds them all in its
    // first walk of the hierarchy. (It walks at most once a second: a cgroup
    // made within a second after a walk resolves to null until the next.)
    let dirs: Vec<PathBuf> = shapes.iter().map(|s| cgroups.make(&s.path)).collect();

    let port = free_port();
    // Connections complete in the backlog: the test never accepts.
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    let agent = Agent::start(&["--port", &port.to_string()]);
    let mut clients = Vec::new();
    for dir in &dirs {
        let mut client = Py::in_cgroup(dir, CLIENT, &[port.to_string(), "1".into()]);
        client.port();
        client.finish();
        clients.push(client);
    }
    let trace = Trace::stop(agent);
    drop(listener);

    for (shape, client) in shapes.iter().zip(&clients) {
        let (path, pid) = (&shape.path, client.pid());
        let ev = trace.one(&format!("CLOSE -> SYN_SENT of pid {pid} in /{path}"), |e| {
            e.pid == Some(pid) && e.rport == port && e.is("CLOSE", "SYN_SENT")
        });
        let got = (
            ev.cgroup.clone(),
            ev.unit.clone(),
            ev.container.clone(),
            ev.pod_uid.clone(),
        );
        let want = (
            Some(format!("/{path}")),
            shape.unit.clone(),
            shape.container.clone(),
            shape.pod_uid.clone(),
        );
        trace.check(got == want, || {
            format!(
                "client in /{path}: (cgroup, unit, container, pod_uid) {got:#?}, expected \
                 {want:#?}: {ev:#?}"
            )
        });
    }
    drop(clients);
    drop(cgroups);
}

#[test]
fn cgroup_filter_lets_no_other_cgroup_through() {
    let tag = format!("tt-{}-{}", std::process::id(), unique_hex(8));
    let (a, b) = (format!("{tag}-a.slice"), format!("{tag}-b.slice"));
    let mut cgroups = Cgroups::new();
    let a_dir = cgroups.make(&a);
    // A cgroup below A: in A's subtree, so let through too.
    let a_inner_dir = cgroups.make(&format!("{a}/inner.scope"));
    let b_dir = cgroups.make(&b);

    let port = free_port();
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    let agent = Agent::start(&["--port", &port.to_string(), "--cgroup", &format!("/{a}")]);
    let count = 5;
    let args = [port.to_string(), count.to_string()];
    let mut clients = [
        Py::in_cgroup(&a_dir, CLIENT, &args),
        Py::in_cgroup(&a_inner_dir, CLIENT, &args),
        Py::in_cgroup(&b_dir, CLIENT, &args),
    ];
    for client in &mut clients {
        for _ in 0..count {
            client.port();
        }
        client.finish();
    }
    let trace = Trace::stop(agent);
    drop(listener);
    let [a_pid, a_inner_pid, b_pid] = [0, 1, 2].map(|i| clients[i].pid());

    for (pid, cgroup) in [
        (a_pid, a.clone()),
        (a_inner_pid, format!("{a}/inner.scope")),
    ] {
        let connects = trace.select(|e| e.pid == Some(pid) && e.is("CLOSE", "SYN_SENT"));
        trace.check(connects.len() >= count, || {
            format!(
                "{} CLOSE -> SYN_SENT of pid {pid} in /{cgroup}, expected {count}: {connects:#?}",
                connects.len()
            )
        });
    }
    let subtree = format!("/{a}");
    for ev in &trace.events {
        if let Some(cgroup) = &ev.cgroup {
            let inside = *cgroup == subtree || cgroup.starts_with(&format!("{subtree}/"));
            trace.check(inside, || {
                format!("an event from outside {subtree}: {ev:#?}")
            });
        }
        trace.check(ev.pid != Some(b_pid), || {
            format!("an event of the client in /{b} (pid {b_pid}): {ev:#?}")
        });
    }
    drop(clients);
    drop(cgroups);
}

#[test]
fn events_carry_the_network_namespace() {
    let netns = fs::metadata("/proc/self/ns/net").unwrap().ino();
    let port = free_port();
    let addr = SocketAddr::new(loopback(false), port);
    let listener = TcpListener::bind(addr).unwrap();
    let agent = Agent::start(&["--port", &port.to_string()]);
    let client = TcpStream::connect(addr).unwrap();
    let (server, _) = listener.accept().unwrap();
    drop(client);
    drop(server);
    drop(listener);
    let trace = Trace::stop(agent);
    let ours = trace.select(|e| e.lport == port || e.rport == port);
    trace.check(ours.len() >= 4, || {
        format!("expected the connection's events on port {port}, got {ours:#?}")
    });
    for ev in ours {
        trace.check(ev.netns == Some(netns), || {
            format!(
                "netns {:?}, expected {netns} (/proc/self/ns/net): {ev:#?}",
                ev.netns
            )
        });
    }
}
