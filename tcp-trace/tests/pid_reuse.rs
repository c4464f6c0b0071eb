//! A listener whose owner exits, and a new process that gets the dead
//! owner's pid.
//!
//! Process A calls listen() on port P and forks B, which inherits the
//! listener; A exits. Then a new process C (`sleep`) is given A's old pid
//! (by writing A's pid - 1 to /proc/sys/kernel/ns_last_pid before spawning
//! it). Connections to P before B's first accept must be charged to B.
//!
//! What this proves: the kernel records an owner as it is at the time (pid
//! and comm of the task, or of the listener's owner), and when a listener's
//! owner exits the agent gives the listener to a process that has it then
//! (the exit hook names A's child B; userspace can fall back to the oldest
//! process holding it), never by asking later whether "pid A is alive" (it
//! is again, as C, which holds no socket) nor by reading a pid's name later
//! (that would name C's `sleep`). An agent that did either would charge P's
//! connections to A's pid, now C's. C takes the pid at once, before the
//! agent may even have handled A's exit.

mod common;

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use common::{free_port, loopback, poll, Agent, Py};

/// Connections made before B accepts any.
const CONNECTIONS: usize = 3;

/// How long the agent may take to re-resolve a listener whose owner exited.
const REOWN: Duration = Duration::from_millis(300);

/// Tries at giving C A's pid: other processes on the host fork too, and take
/// the pid first now and then.
const PID_TRIES: usize = 200;

/// A: listens on 127.0.0.1:argv[1], forks B and exits. B says its pid,
/// waits for a line, then accepts argv[2] connections (saying `accepted
/// <peer port>` for each) and holds them until its stdin closes. B gives up
/// after 10 s without a connection, so it never outlives a failed test long.
const LISTEN_FORK_EXIT: &str = r#"
import os, socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", int(sys.argv[1])))
l.listen(16)
if os.fork():
    os._exit(0)
print(os.getpid(), flush=True)
if not sys.stdin.readline():
    sys.exit()
l.settimeout(10)
conns = []
for _ in range(int(sys.argv[2])):
    c, peer = l.accept()
    conns.append(c)
    print("accepted", peer[1], flush=True)
sys.stdin.read()
"#;

/// Spawns `sleep 30` until one gets `pid` (the pid after the one written to
/// ns_last_pid), or gives up after PID_TRIES: then `None`.
fn spawn_with_pid(pid: u32) -> Option<Child> {
    for _ in 0..PID_TRIES {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("writing /proc/sys/kernel/ns_last_pid (needs root)");
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning sleep");
        if child.id() == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

#[test]
fn a_dead_listener_owners_pid_taken_by_another_process_is_not_charged() {
    let port = free_port();
    let agent = Agent::start(&["--port", &port.to_string()]);
    let mut a = Py::spawn(
        LISTEN_FORK_EXIT,
        &[port.to_string(), CONNECTIONS.to_string()],
    );
    let a_pid = a.pid();
    let b_pid: u32 = a.number();
    let status = a.wait();
    assert!(status.success(), "A ({a_pid}) exited with {status}");
    assert_ne!(a_pid, b_pid);

    // A is reaped: its pid is free. C takes it at once, before the agent
    // may even have handled A's exit.
    let c = spawn_with_pid(a_pid);
    let c_pid = c.as_ref().map(Child::id);
    match c_pid {
        Some(pid) => {
            // The exec renames the task a moment after spawn returns.
            poll(Duration::from_secs(2), "C's comm becoming sleep", || {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
                (comm.trim() == "sleep").then_some(())
            });
        }
        None => eprintln!(
            "warning: no process got A's pid {a_pid} in {PID_TRIES} tries (the host forks \
             busily); checking only that B is charged"
        ),
    }
    thread::sleep(REOWN);

    // The connections wait in the accept queue until B accepts.
    let addr = SocketAddr::new(loopback(false), port);
    let streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    a.send("accept");
    for stream in &streams {
        let cport = stream.local_addr().unwrap().port();
        a.expect(&format!("accepted {cport}"));
    }
    drop(streams);
    let trace = agent.stop_after(Duration::from_millis(200));
    drop(a);
    if let Some(mut c) = c {
        let _ = c.kill();
        let _ = c.wait();
    }

    let who = format!("A {a_pid} (exited), B {b_pid}, C {c_pid:?} (A's pid again)");
    eprintln!("{who}");
    // listen() is A's own doing.
    let listen = trace.one("listen()", |e| e.lport == port && e.is("CLOSE", "LISTEN"));
    trace.check(
        listen.pid == Some(a_pid) && listen.owner_source.as_deref() == Some("task"),
        || format!("listen() not charged to A: {who}: {listen:#?}"),
    );
    let server = trace.select(|e| e.lport == port && !e.is("CLOSE", "LISTEN"));
    let accepts = server.iter().filter(|e| e.event == "accept").count();
    trace.check(accepts == CONNECTIONS, || {
        format!("{accepts} accept events, expected {CONNECTIONS}: {who}")
    });
    let before_accept = server
        .iter()
        .filter(|e| e.is("LISTEN", "SYN_RECV") || e.is("SYN_RECV", "ESTABLISHED"))
        .count();
    trace.check(before_accept == 2 * CONNECTIONS, || {
        format!(
            "{before_accept} handshake transitions, expected {}: {who}",
            2 * CONNECTIONS
        )
    });
    for ev in &server {
        let source = ev.owner_source.as_deref();
        let before = ev.is("LISTEN", "SYN_RECV") || ev.is("SYN_RECV", "ESTABLISHED");
        let ok = ev.pid == Some(b_pid)
            && if before {
                source == Some("listener")
            } else {
                matches!(source, Some("accept" | "task"))
            };
        trace.check(ok, || {
            format!(
                "a server-side event not charged to B (\"listener\" before accept): {who}: {ev:#?}"
            )
        });
    }
    // Nothing on the port names C, by pid and name together or by name.
    for ev in trace.select(|e| e.lport == port || e.rport == port) {
        trace.check(ev.comm.as_deref() != Some("sleep"), || {
            format!("an event charged to C's `sleep`: {who}: {ev:#?}")
        });
    }
}
