//! `tcp-trace handshake` against handshakes whose loss the test controls with
//! nftables: one dropped packet costs exactly the kernel's 1 s initial
//! retransmission timeout.

mod common;

use std::{
    io,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
    thread,
    time::Duration,
};

/// The scenarios run one at a time: each expects every one of its few
/// transitions, and concurrent connections on the CPUs are what make the
/// kernel skip a tracing program's run (counted, but then missing here).
static SERIAL: Mutex<()> = Mutex::new(());

use common::{accept_one, connect, free_port, loopback, set_int, socket, Agent, NftTable};
use serde_json::Value;

const SECOND: u64 = 1_000_000_000;

/// The handshake lines on `port` for `side`.
fn lines<'a>(all: &'a [Value], port: u16, side: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|v| v["type"] == "handshake" && v["side"] == side)
        .filter(|v| {
            if side == "client" {
                v["rport"] == port
            } else {
                v["lport"] == port
            }
        })
        .collect()
}

/// The one handshake on `port` for `side`; `stderr` (the agent's summary,
/// with what it dropped) explains a missing one.
fn one<'a>(all: &'a [Value], stderr: &[String], port: u16, side: &str) -> &'a Value {
    let found = lines(all, port, side);
    assert_eq!(
        found.len(),
        1,
        "one {side} handshake on {port}: {all:#?}\nthe agent said: {stderr:?}"
    );
    found[0]
}

fn duration(v: &Value) -> u64 {
    v["duration_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no duration: {v}"))
}

fn scenarios(v6: bool) {
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let (syn_drop, ack_drop, refused, timeout, aborted) =
        (ports[0], ports[1], ports[2], ports[3], ports[4]);
    let _nft = NftTable::new(
        &format!("tcp_trace_test_{syn_drop}"),
        &[
            format!("tcp dport {syn_drop} tcp flags & (syn | ack) == syn quota until 100 bytes drop"),
            // An IPv4 ACK is 52 bytes, an IPv6 one 72: 80 covers the first only.
            format!("tcp dport {ack_drop} tcp flags & (syn | ack | fin | rst | psh) == ack quota until 80 bytes drop"),
            format!("tcp dport {{ {timeout}, {aborted} }} tcp flags & (syn | ack) == syn drop"),
        ],
    );
    let agent = Agent::command(&["handshake", "--json", if v6 { "-6" } else { "-4" }]);
    let at = |port| SocketAddr::new(loopback(v6), port);

    // The client's first SYN is lost: it retransmits after 1 s.
    let server = accept_one(at(syn_drop));
    TcpStream::connect(at(syn_drop)).unwrap();
    server.join().unwrap();
    // The client's handshake-completing ACK is lost: the server retransmits
    // its SYN-ACK after 1 s; the client was established at once.
    let server = accept_one(at(ack_drop));
    let client = TcpStream::connect(at(ack_drop)).unwrap();
    server.join().unwrap();
    drop(client);
    // Nobody listens: the reset refuses it.
    let err = TcpStream::connect(at(refused)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    // All SYNs lost with TCP_SYNCNT 1: the kernel gives up after one retry.
    let fd = socket(at(timeout));
    set_int(&fd, libc::IPPROTO_TCP, libc::TCP_SYNCNT, 1);
    let err = connect(&fd, at(timeout)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT));
    drop(fd);
    // All SYNs lost, and the application gives up after 300 ms.
    let fd = socket(at(aborted));
    // SAFETY: setting O_NONBLOCK on our socket.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let err = connect(&fd, at(aborted)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINPROGRESS));
    thread::sleep(Duration::from_millis(300));
    drop(fd);

    thread::sleep(Duration::from_millis(300));
    let (out, stderr) = agent.stop_raw();
    let all: Vec<Value> = out
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let c = one(&all, &stderr, syn_drop, "client");
    assert_eq!(
        (c["outcome"].as_str(), c["retransmits"].as_u64()),
        (Some("established"), Some(1)),
        "{c}"
    );
    assert!(
        (SECOND - 1_000_000..SECOND * 3 / 2).contains(&duration(c)),
        "{c}"
    );
    let s = one(&all, &stderr, syn_drop, "server");
    assert_eq!(s["retransmits"], 0, "{s}");
    assert!(
        duration(s) < SECOND / 20,
        "only the second SYN reached it: {s}"
    );

    let c = one(&all, &stderr, ack_drop, "client");
    assert_eq!(c["retransmits"], 0);
    assert!(duration(c) < SECOND / 10, "{c}");
    let s = one(&all, &stderr, ack_drop, "server");
    assert_eq!(
        (s["outcome"].as_str(), s["retransmits"].as_u64()),
        (Some("established"), Some(1)),
        "{s}"
    );
    assert!(
        (SECOND - 10_000_000..SECOND * 3 / 2).contains(&duration(s)),
        "{s}"
    );

    let c = one(&all, &stderr, refused, "client");
    assert_eq!(
        (c["outcome"].as_str(), c["retransmits"].as_u64()),
        (Some("refused"), Some(0)),
        "{c}"
    );

    let c = one(&all, &stderr, timeout, "client");
    assert_eq!(c["outcome"], "timeout", "{c}");
    // TCP_SYNCNT 1 bounds the connect by the time one retry would take at
    // exponential backoff (1 s + 2 s); with linear SYN timeouts (6.x's
    // tcp_syn_linear_timeouts) the kernel fits a second retry into it.
    let retries = c["retransmits"].as_u64().unwrap();
    assert!((1..=2).contains(&retries), "{c}");
    assert!(
        (2 * SECOND - 10_000_000..3 * SECOND + SECOND / 2).contains(&duration(c)),
        "{c}"
    );

    let c = one(&all, &stderr, aborted, "client");
    assert_eq!(c["outcome"], "aborted", "{c}");
    assert!((300_000_000..600_000_000).contains(&duration(c)), "{c}");

    let summary = all
        .iter()
        .rfind(|v| v["type"] == "summary")
        .expect("a final summary");
    assert_eq!(summary["final"], true);
    assert!(summary["sides"]["client"]["count"].as_u64().unwrap() >= 5);
}

#[test]
fn ipv4_handshakes_against_known_losses() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    scenarios(false);
}

#[test]
fn ipv6_handshakes_against_known_losses() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    scenarios(true);
}
