//! More live sockets than the classic path's socket map holds: the least
//! recently active are evicted, their next transitions are counted as "first
//! seen mid-life" with an unknown duration, and no duration is ever wrong.
//! The socket-storage path has no map to outgrow: it tracks them all.

mod common;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::*;

/// The smallest socket map the agent accepts.
const MAP: &str = "1024";
/// Connections held open at once: both ends are tracked, so three times the map.
const HELD: usize = 1536;

/// Lets this process hold a few thousand sockets.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write to and read from our own struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(65_536);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_cur >= 2 * HELD as u64 + 64, "{}", limit.rlim_cur);
}

/// Holds `HELD` connections open at once under an agent started with `env`
/// (which path: `TCP_TRACE_SOCKET_STORAGE`, as `--socket-storage` would
/// say), then closes them all; returns the agent's trace and the port.
fn hold_and_release(env: &[(&str, &str)], mechanism: &str) -> (AgentOutput, u16) {
    raise_fd_limit();
    let port = free_port();
    let p = port.to_string();
    let agent = Agent::command_env(
        &["watch", "--json", "--port", &p, "--max-sockets", MAP],
        env,
    );
    assert!(agent.tracing().contains(mechanism), "{}", agent.tracing());
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        held.push((client, server));
    }
    thread::sleep(Duration::from_millis(100));
    drop(held);
    drop(listener);
    thread::sleep(Duration::from_millis(500));
    (agent.stop(), port)
}

/// Per socket, transitions after the first whose duration is unknown;
/// asserts every known one is exactly the time since the previous event.
fn untimed_transitions(trace: &AgentOutput, port: u16) -> usize {
    let mut untimed = 0;
    for events in trace.sockets_on_port(port).values() {
        // An accept's duration is its wait since ESTABLISHED, not a stay.
        let events: Vec<&Ev> = events.iter().filter(|e| e.event != "accept").collect();
        for pair in events.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            match after.duration_ns {
                // Known: exactly the time since the socket entered the state.
                Some(d) => assert_eq!(d, after.ts_ns - before.ts_ns, "{events:#?}"),
                None => untimed += 1,
            }
        }
    }
    untimed
}

#[test]
fn evicted_sockets_come_back_with_unknown_durations_never_wrong_ones() {
    let (trace, port) = hold_and_release(&[("TCP_TRACE_SOCKET_STORAGE", "0")], "LRU map of 1024");
    let mid_life = summary_count(
        trace.summary(),
        " transitions of sockets first seen mid-life",
    );
    assert!(mid_life > 0, "no socket was evicted: {}", trace.summary());
    assert!(
        untimed_transitions(&trace, port) > 0,
        "evicted sockets' later transitions should be untimed: {}",
        trace.summary()
    );
}

#[test]
fn socket_storage_tracks_more_sockets_than_any_map_would_hold() {
    let (trace, port) = hold_and_release(&[("TCP_TRACE_SOCKET_STORAGE", "1")], "socket storage");
    // (The summary's "first seen mid-life" counts the whole host's sockets,
    // those open before start included: the events on our port say more.)
    let skipped = summary_count(trace.summary(), " skipped by the kernel");
    // Every stay timed, but after a transition the kernel skipped (counted).
    assert!(
        untimed_transitions(&trace, port) as u64 <= skipped,
        "{}",
        trace.summary()
    );
}
