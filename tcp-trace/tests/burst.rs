//! Exact accounting under a burst: every transition is either printed or
//! counted as dropped, with one agent, with two at once, and with a ring
//! buffer too small to keep up.
//!
//! This binary holds a single test so that nothing else of ours makes
//! transitions while it runs: the kernel's count of skipped runs covers every
//! socket on the host, not only the ones the agent's filter keeps.

mod common;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use common::*;

/// Connections per burst.
const CONNECTIONS: u64 = 10_000;
/// Client: CLOSE -> SYN_SENT -> ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 -> CLOSE;
/// accepted socket: LISTEN -> SYN_RECV -> ESTABLISHED -> CLOSE_WAIT -> LAST_ACK -> CLOSE.
const PER_CONNECTION: u64 = 10;
/// The listener's CLOSE -> LISTEN and LISTEN -> CLOSE.
const LISTENER: u64 = 2;

/// As fast as one thread can: connect, accept, the client closes first, the
/// server reads the end of stream and closes.
fn burst(port: u16) {
    let listener = TcpListener::bind(SocketAddr::new(loopback(false), port)).unwrap();
    for _ in 0..CONNECTIONS {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        drop(client);
        let mut buf = [0u8; 1];
        assert_eq!(server.read(&mut buf).unwrap(), 0);
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
    let number_before = |word: &str| -> u64 {
        let at = summary.find(word).unwrap();
        summary[..at]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    let received = number_before(" events received");
    let dropped = number_before(" dropped (");
    (lines.len() as u64, received, dropped, summary)
}

/// The ring-buffer-full count of a summary.
fn ring_full(summary: &str) -> u64 {
    let at = summary.find(" ring buffer full").unwrap();
    summary[..at]
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_transition_of_a_burst_is_printed_or_counted_dropped() {
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
        burst(port);
        thread::sleep(Duration::from_millis(300));
        for (agent, extra) in running.into_iter().zip(agents) {
            let (printed, received, dropped, summary) = accounting(agent);
            assert_eq!(printed, received, "{summary}");
            assert_eq!(received + dropped, truth, "{agents:?}: {summary}");
            if !extra.is_empty() {
                assert!(
                    ring_full(&summary) > 0,
                    "a one-page ring kept up: {summary}"
                );
            }
        }
    }
}
