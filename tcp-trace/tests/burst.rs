//! Exact accounting under a burst: every transition is either printed or
//! counted as dropped, with one agent, with two at once, and with a ring
//! buffer too small to keep up.
//!
//! The tests here run one at a time (`SERIAL`), and this binary holds nothing
//! else, so that nothing else of ours makes transitions meanwhile: the
//! kernel's count of skipped runs covers every socket on the host, not only
//! the ones the agent's filter keeps.

mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use common::*;

/// Held by each test for its whole run.
static SERIAL: Mutex<()> = Mutex::new(());

/// Connections per burst.
const CONNECTIONS: u64 = 10_000;
/// Client: CLOSE -> SYN_SENT -> ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 -> CLOSE;
/// accepted socket: LISTEN -> SYN_RECV -> ESTABLISHED -> CLOSE_WAIT -> LAST_ACK -> CLOSE;
/// and its accept event.
const PER_CONNECTION: u64 = 11;
/// The listener's CLOSE -> LISTEN and LISTEN -> CLOSE.
const LISTENER: u64 = 2;

/// The burst's connections, as fast as `threads` threads can, on one
/// listener: each thread connects, accepts whichever connection comes, closes
/// its client first, and closes the accepted end once its peer has. Transitions that
/// softirqs make on one CPU while a program runs there in a syscall are what
/// the kernel skips.
fn burst(port: u16, threads: u64) {
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                for _ in 0..CONNECTIONS / threads {
                    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                    let (mut server, _) = listener.accept().unwrap();
                    drop(client);
                    let mut buf = [0u8; 1];
                    while server.read(&mut buf).unwrap() > 0 {}
                }
            });
        }
    });
}

/// Waits until no socket on `port` is still closing (all in TIME_WAIT or
/// gone): on a loaded machine softirqs, and so the bursts' last
/// transitions, can run well after the last `close()` returns.
fn settle(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ss")
            .args(["-Htan", &format!("( sport = :{port} or dport = :{port} )")])
            .output()
            .expect("running ss");
        let text = String::from_utf8_lossy(&out.stdout);
        let closing = text.lines().filter(|l| !l.starts_with("TIME-WAIT")).count();
        if closing == 0 {
            // The kernel lists a closing socket's timewait socket just
            // before the socket's own last transition fires.
            thread::sleep(Duration::from_millis(200));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sockets still closing after 30 s: {text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Events printed, and the summary's received and dropped counts.
fn accounting(agent: Agent) -> (u64, u64, u64, String) {
    let (lines, stderr) = agent.stop_raw();
    let summary = stderr
        .iter()
        .find(|l| l.contains("events received"))
        .unwrap_or_else(|| panic!("no summary: {stderr:?}"))
        .clone();
    let received = summary_count(&summary, " events received");
    let dropped = summary_count(&summary, " dropped (");
    (lines.len() as u64, received, dropped, summary)
}

#[test]
fn every_transition_of_a_burst_is_printed_or_counted_dropped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let truth = PER_CONNECTION * CONNECTIONS + LISTENER;
    // One agent, two at once, and one whose ring (a single page) is far too
    // small for the burst: then the drop counter must account for the rest.
    let runs: [&[&[&str]]; 3] = [&[&[]], &[&[], &[]], &[&["--ring-bytes", "4096"]]];
    for agents in runs {
        let port = free_port();
        let p = port.to_string();
        let running: Vec<Agent> = agents
            .iter()
            .map(|extra| {
                let mut args = vec!["--port", p.as_str()];
                args.extend_from_slice(extra);
                Agent::start(&args)
            })
            .collect();
        burst(port, 1);
        settle(port);
        for (agent, extra) in running.into_iter().zip(agents) {
            let (printed, received, dropped, summary) = accounting(agent);
            assert_eq!(printed, received, "{summary}");
            assert_eq!(received + dropped, truth, "{agents:?}: {summary}");
            if !extra.is_empty() {
                assert!(
                    summary_count(&summary, " ring buffer full") > 0,
                    "a one-page ring kept up: {summary}"
                );
            }
        }
    }
}

#[test]
fn transitions_the_kernel_skips_are_counted_so_the_totals_still_balance() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let truth = PER_CONNECTION * CONNECTIONS + LISTENER;
    // Concurrent connections make the kernel skip some runs; a few attempts
    // make sure the equation is checked with skips in it, not only without.
    let mut skips_seen = Vec::new();
    for _ in 0..5 {
        let port = free_port();
        let p = port.to_string();
        // The classic program (even when the suite runs with socket
        // storage): its guard is shared by every tracepoint program on the
        // CPU, so concurrent bursts make skips reliably. The BTF program's
        // guard is its own, so it skips far more rarely (the test above
        // runs on either path, with whatever it skips counted).
        let args = ["watch", "--json", "--port", &p];
        let classic = [("TCP_TRACE_SOCKET_STORAGE", "0")];
        let agents = [
            Agent::command_env(&args, &classic),
            Agent::command_env(&args, &classic),
        ];
        burst(port, 8);
        settle(port);
        let mut skipped_here = Vec::new();
        for agent in agents {
            let (printed, received, dropped, summary) = accounting(agent);
            assert_eq!(printed, received, "{summary}");
            assert_eq!(received + dropped, truth, "{summary}");
            skipped_here.push(summary_count(&summary, " skipped by the kernel"));
        }
        // One guard per CPU for every tracepoint program: both agents' programs
        // are skipped together.
        assert_eq!(skipped_here[0], skipped_here[1], "{skipped_here:?}");
        skips_seen.push(skipped_here[0]);
        if skipped_here[0] > 0 {
            return;
        }
    }
    panic!("five concurrent bursts made the kernel skip nothing: {skips_seen:?}");
}
