//! Owners inside a real container: runc, a busybox rootfs, a network
//! namespace of its own joined to the host by a veth pair, and a cgroup at
//! docker's cgroupfs-driver path `/docker/<64 hex>`. The agent runs on the
//! host and sees the container's connections to a host listener.

mod common;

use std::{
    fs,
    net::{IpAddr, TcpListener},
    os::unix::fs::MetadataExt as _,
    time::Duration,
};

use common::{free_port, poll, unique_hex64, Agent, Container, Ev, NetNs};

/// Connections the container makes.
const CONNECTIONS: usize = 3;

/// The inode of a network namespace file (/proc/PID/ns/net, /var/run/netns/NAME).
fn ns_inode(path: &str) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino()
}

#[test]
fn container_connections_carry_its_id_cgroup_and_netns() {
    let netns = NetNs::new();
    let (host, addr) = (netns.host_addr(), netns.addr());
    let ns_file = netns.path();
    let port = free_port();
    let listener = TcpListener::bind((host, port)).unwrap();
    let id = unique_hex64();
    let cgroup = format!("/docker/{id}");
    // The shell waits for /go, which the test puts in the rootfs once the
    // agent traces, and after its connections for /stop, which the test puts
    // there once the agent has stopped. The container's cgroup exists the
    // whole time the agent may resolve it: the agent resolves a cgroup id
    // when it reads the event (every 50 ms), by walking the hierarchy, and a
    // cgroup removed before that walk (runc removes it as the container
    // exits) stays unknown.
    let script = format!(
        "until [ -e /go ]; do usleep 10000; done; \
         for i in $(seq {CONNECTIONS}); do nc {host} {port} </dev/null || exit 1; done; \
         until [ -e /stop ]; do usleep 10000; done"
    );
    let container = Container::options("nc")
        .netns(netns)
        .cgroups_path(&cgroup)
        .run(&["sh", "-c", &script]);
    let pid = container.pid();
    let theirs = ns_inode(&format!("/proc/{pid}/ns/net"));
    assert_eq!(
        theirs,
        ns_inode(ns_file.to_str().unwrap()),
        "container init {pid} is not in {}",
        ns_file.display()
    );
    let ours = ns_inode("/proc/self/ns/net");
    assert_ne!(theirs, ours, "container init {pid} shares the test's netns");

    let agent = Agent::start(&["--port", &port.to_string()]);
    fs::write(container.bundle().join("rootfs/go"), "").unwrap();
    // Each connection closed at once from the host end: nc exits at EOF.
    listener.set_nonblocking(true).unwrap();
    for n in 0..CONNECTIONS {
        let (stream, peer) = poll(
            Duration::from_secs(10),
            &format!("connection {} of {CONNECTIONS} from the container", n + 1),
            || listener.accept().ok(),
        );
        assert_eq!(peer.ip(), IpAddr::V4(addr), "not from the container's eth0");
        drop(stream);
    }
    let trace = agent.stop_after(Duration::from_millis(200));
    fs::write(container.bundle().join("rootfs/stop"), "").unwrap();
    container.wait();
    let me = std::process::id();

    // The container's ends: its id, its cgroup, its namespace, its nc.
    let client = |e: &Ev| e.rport == port && e.laddr == IpAddr::V4(addr);
    let connects = trace.select(|e| client(e) && e.is("CLOSE", "SYN_SENT"));
    trace.check(connects.len() == CONNECTIONS, || {
        format!(
            "{} connects from the container ({addr}), expected {CONNECTIONS}: {connects:#?}",
            connects.len()
        )
    });
    for ev in trace.select(client) {
        let got = (
            ev.container.as_deref(),
            ev.cgroup.as_deref(),
            ev.netns,
            ev.comm.as_deref(),
        );
        let want = (
            Some(id.as_str()),
            Some(cgroup.as_str()),
            Some(theirs),
            Some("nc"),
        );
        trace.check(got == want, || {
            format!(
                "container end: (container, cgroup, netns, comm) {got:?}, expected {want:?} \
                 (host netns {ours}): {ev:#?}"
            )
        });
    }

    // The host's ends: the test process, no container, the host namespace.
    let server = |e: &Ev| e.lport == port && e.laddr == IpAddr::V4(host);
    let accepts = trace.select(|e| server(e) && e.event == "accept");
    trace.check(accepts.len() == CONNECTIONS, || {
        format!(
            "{} accepts on the host, expected {CONNECTIONS}: {accepts:#?}",
            accepts.len()
        )
    });
    for ev in trace.select(server) {
        let got = (ev.pid, ev.container.as_deref(), ev.netns);
        trace.check(got == (Some(me), None, Some(ours)), || {
            format!(
                "host end: (pid, container, netns) {got:?}, expected {:?}: {ev:#?}",
                (Some(me), None::<&str>, Some(ours))
            )
        });
    }
}
