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
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    thread,
    time::Duration,
};

use common::{
    free_port, loopback, unique, unique_hex64, unique_pod_uid, Agent, AgentOutput, Ev, Py,
    TestCgroup,
};

/// The agent's events once the connections' last packets are in.
fn stop(agent: Agent) -> AgentOutput {
    agent.stop_after(Duration::from_millis(200))
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
    let trace = stop(agent);
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
    let trace = stop(agent);
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
    // Names the test knows, in the shapes of fixtures.rs's TestCgroup::
    // service, docker and kubepods_burstable.
    let (docker, containerd) = (unique_hex64(), unique_hex64());
    let uid = unique_pod_uid();
    let service = format!("{}.service", unique("tt-nginx"));
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
    // Made before the start: the agent's resolver then finds them all in its
    // first walk of the hierarchy. (It walks at most once a second: a cgroup
    // made within a second after a walk resolves to null until the next.)
    let cgroups: Vec<TestCgroup> = shapes.iter().map(|s| TestCgroup::create(&s.path)).collect();

    let port = free_port();
    // Connections complete in the backlog: the test never accepts.
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    let agent = Agent::start(&["--port", &port.to_string()]);
    let mut clients = Vec::new();
    for cgroup in &cgroups {
        let mut client = Py::in_cgroup(cgroup, CLIENT, &[port.to_string(), "1".into()]);
        client.port();
        client.finish();
        clients.push(client);
    }
    let trace = stop(agent);
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
    let (a, b) = (
        format!("{}.slice", unique("tt-filter-a")),
        format!("{}.slice", unique("tt-filter-b")),
    );
    let a_cgroup = TestCgroup::create(&a);
    // A cgroup below A: in A's subtree, so let through too. (Dropped before
    // A, which can only be removed once empty.)
    let a_inner = TestCgroup::create(&format!("{a}/inner.scope"));
    let b_cgroup = TestCgroup::create(&b);

    let port = free_port();
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    let agent = Agent::start(&["--port", &port.to_string(), "--cgroup", &format!("/{a}")]);
    let count = 5;
    let args = [port.to_string(), count.to_string()];
    let mut clients = [
        Py::in_cgroup(&a_cgroup, CLIENT, &args),
        Py::in_cgroup(&a_inner, CLIENT, &args),
        Py::in_cgroup(&b_cgroup, CLIENT, &args),
    ];
    for client in &mut clients {
        for _ in 0..count {
            client.port();
        }
        client.finish();
    }
    let trace = stop(agent);
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
    drop((b_cgroup, a_inner, a_cgroup));
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
    let trace = stop(agent);
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
