//! `tcp-trace doctor` against pathologies made on purpose with real
//! processes on loopback: each rule fires and names the right process and
//! endpoint, and healthy traffic makes no finding. Each scenario watches a
//! port of its own (`--port`); the kernel may skip runs (counted as
//! dropped), so counts are checked to within the dropped count.

mod common;

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Mutex,
    thread,
    time::Duration,
};

use common::{
    accept_one, connect, exchanges, free_port, loopback, set_int, socket, Agent, NftTable, Peer,
    Script,
};
use serde_json::Value;

/// One scenario at a time: concurrent connections are what make the kernel
/// skip runs, and each scenario counts its own.
static SERIAL: Mutex<()> = Mutex::new(());

fn at(port: u16) -> SocketAddr {
    SocketAddr::new(loopback(false), port)
}

/// The doctor's report for `port`, watching `seconds` while `traffic` runs.
fn doctor(port: u16, seconds: u32, extra: &[&str], traffic: impl FnOnce()) -> (Value, Vec<String>) {
    let port_arg = port.to_string();
    let duration = seconds.to_string();
    let mut args = vec![
        "doctor",
        "--json",
        "--port",
        &port_arg,
        "--duration",
        &duration,
    ];
    args.extend_from_slice(extra);
    let agent = Agent::command(&args);
    traffic();
    let line = agent
        .next_line(Duration::from_secs(u64::from(seconds) + 30))
        .expect("the doctor's report");
    let (_, stderr) = agent.stop_raw();
    let report: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
    if std::env::var_os("AGENT_DUMP").is_some() {
        eprintln!("{report:#}\n{}", stderr.join("\n"));
    }
    (report, stderr)
}

fn findings<'a>(report: &'a Value, rule: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["rule"] == rule)
        .collect()
}

/// The one finding of `rule` for process `pid`.
fn finding<'a>(report: &'a Value, rule: &str, pid: u32) -> &'a Value {
    let found: Vec<_> = findings(report, rule)
        .into_iter()
        .filter(|f| f["pid"] == pid)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {rule} finding for pid {pid}: {report:#}"
    );
    found[0]
}

fn dropped(report: &Value) -> u64 {
    report["events_dropped"].as_u64().expect("events_dropped")
}

fn count(f: &Value, name: &str) -> u64 {
    f["evidence"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name}: {f:#}"))
}

#[test]
fn close_wait_pile_names_the_server_that_never_closes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    // Accepts 8, writes a byte on each and keeps it open 8 s whatever the
    // client does: each closed by the client sits in CLOSE_WAIT.
    let mut server = Peer::spawn(&[
        "server".into(),
        at(port).to_string(),
        "8000".into(),
        "0".into(),
        "8".into(),
        "0".into(),
        "1".into(),
    ]);
    server.go();
    server.expect_line("listening");
    let closers = |name: &str| {
        let mut closer = Peer::closer(at(port), 4, name, false);
        closer.go();
        closer.finish();
    };
    // Four before the doctor starts (found by its start-up scan), four during.
    closers("tt-closer-a");
    let (report, _) = doctor(port, 3, &[], || closers("tt-closer-b"));
    let f = finding(&report, "close-wait", server.pid());
    assert_eq!(f["comm"], "tt-server", "{f:#}");
    let sockets = count(f, "sockets_in_close_wait");
    assert!(sockets <= 8 && sockets + dropped(&report) >= 8, "{f:#}");
    assert_eq!(
        f["evidence"]["local_ports"][0],
        format!("{port} ({sockets})")
    );
    assert_eq!(f["evidence"]["peers"][0], format!("127.0.0.1 ({sockets})"));
    // The first four were in CLOSE_WAIT before the run: a lower bound.
    assert_eq!(f["evidence"]["oldest_is_lower_bound"], true, "{f:#}");
    assert!(f["evidence"]["oldest"].as_str().unwrap().starts_with(">="));
    server.finish();
}

#[test]
fn short_connections_and_timewait_pressure_name_the_client() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let server = Peer::waiting_server(at(port));
    let mut client = Peer::closer(at(port), 300, "tt-short", false);
    let pid = client.pid();
    // 300 TIME_WAIT sockets are about 1% of the default ephemeral range.
    let (report, _) = doctor(port, 4, &["--timewait-percent", "0.5"], || {
        client.go();
        client.finish();
    });
    let remote = format!("127.0.0.1:{port}");
    let f = finding(&report, "short-connections", pid);
    assert_eq!(
        (f["comm"].as_str(), f["remote"].as_str()),
        (Some("tt-short"), Some(remote.as_str()))
    );
    assert!(count(f, "short") + dropped(&report) >= 300, "{f:#}");
    assert_eq!(count(f, "mean_bytes"), 1, "one byte each: {f:#}");
    let f = finding(&report, "time-wait", pid);
    assert_eq!(f["remote"], remote, "{f:#}");
    assert!(
        count(f, "sockets_in_time_wait") + dropped(&report) >= 300,
        "{f:#}"
    );
    assert!(f["fix"].as_str().unwrap().contains("tcp_tw_reuse"));
    // The server closed nothing first and opened nothing.
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["pid"] == pid),
        "{report:#}"
    );
    server.finish();
}

/// A connect with one SYN retry at most (about 3 s when all are dropped).
fn connect_once(addr: SocketAddr) -> io::Result<()> {
    let fd = socket(addr);
    set_int(&fd, libc::IPPROTO_TCP, libc::TCP_SYNCNT, 1);
    connect(&fd, addr)
}

#[test]
fn refused_and_dropped_connects_are_told_apart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    let closed = free_port();
    let (report, _) = doctor(closed, 2, &[], || {
        for _ in 0..3 {
            let err = TcpStream::connect(at(closed)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        }
    });
    let f = finding(&report, "connect-failures", me);
    assert_eq!(f["remote"], format!("127.0.0.1:{closed}"));
    assert!(count(f, "refused") + dropped(&report) >= 3, "{f:#}");
    assert_eq!(count(f, "timed_out"), 0);
    assert!(
        f["why"].as_str().unwrap().contains("nothing listens"),
        "{f:#}"
    );

    let filtered = free_port();
    let _nft = NftTable::new(
        &format!("tcp_trace_doctor_{filtered}"),
        &[format!(
            "tcp dport {filtered} tcp flags & (syn | ack) == syn drop"
        )],
    );
    // One more, with the default SYN retries (about 127 s), still retrying
    // when the run ends. The others give up about 3 s in (SYN, then one
    // retransmission); the run leaves room for a loaded machine's timers.
    let pending = socket(at(filtered));
    let (report, _) = doctor(filtered, 8, &[], || {
        // SAFETY: setting O_NONBLOCK on our socket.
        unsafe { libc::fcntl(pending.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let err = connect(&pending, at(filtered)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINPROGRESS));
        let tries: Vec<_> = (0..3)
            .map(|_| thread::spawn(move || connect_once(at(filtered)).unwrap_err()))
            .collect();
        for t in tries {
            assert_eq!(t.join().unwrap().raw_os_error(), Some(libc::ETIMEDOUT));
        }
    });
    let f = finding(&report, "connect-failures", me);
    assert_eq!(f["remote"], format!("127.0.0.1:{filtered}"));
    assert!(count(f, "timed_out") + dropped(&report) >= 3, "{f:#}");
    let still = count(f, "still_connecting");
    assert!(still <= 1 && still + dropped(&report) >= 1, "{f:#}");
    assert_eq!(count(f, "refused"), 0);
    drop(pending);
    assert!(f["why"].as_str().unwrap().contains("dropped"), "{f:#}");
}

#[test]
fn a_dropped_syn_and_a_dropped_ack_make_slow_handshakes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    for lost in ["syn", "ack"] {
        let port = free_port();
        let rule = match lost {
            "syn" => format!("tcp dport {port} tcp flags & (syn | ack) == syn quota until 100 bytes drop"),
            // An IPv4 ACK is 52 bytes: 80 covers the first only.
            _ => format!("tcp dport {port} tcp flags & (syn | ack | fin | rst | psh) == ack quota until 80 bytes drop"),
        };
        let _nft = NftTable::new(&format!("tcp_trace_doctor_{port}"), &[rule]);
        let (report, _) = doctor(port, 3, &[], || {
            let server = accept_one(at(port));
            let client = TcpStream::connect(at(port)).unwrap();
            server.join().unwrap();
            drop(client);
        });
        let slow = findings(&report, "slow-handshakes");
        assert_eq!(slow.len(), 1, "{lost}: {report:#}");
        let f = slow[0];
        assert_eq!(f["pid"], me);
        if lost == "syn" {
            assert_eq!(f["remote"], format!("127.0.0.1:{port}"));
            assert_eq!(count(f, "with_syn_retransmissions"), 1, "{f:#}");
            assert_eq!(f["evidence"]["handshake_time_steps"]["~1s"], 1, "{f:#}");
        } else {
            // The server's side: its SYN-ACK was sent again; clients by address.
            assert_eq!(f["remote"], "127.0.0.1");
            assert_eq!(count(f, "with_synack_retransmissions"), 1, "{f:#}");
        }
    }
}

#[test]
fn resets_name_the_process_that_received_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let server = Peer::waiting_server(at(port));
    let mut resetter = Peer::closer(at(port), 10, "tt-resetter", true);
    let (report, _) = doctor(port, 2, &[], || {
        resetter.go();
        resetter.finish();
    });
    let f = finding(&report, "resets", server.pid());
    assert_eq!(
        (f["comm"].as_str(), f["remote"].as_str()),
        (Some("tt-server"), Some("127.0.0.1"))
    );
    assert!(count(f, "resets") + dropped(&report) >= 10, "{f:#}");
    assert_eq!(
        findings(&report, "resets").len(),
        1,
        "the resetter was not reset: {report:#}"
    );
    server.finish();
}

/// Requests and replies over one kept-alive connection.
fn kept_alive(addr: SocketAddr, requests: usize) {
    let listener = TcpListener::bind(addr).unwrap();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = conn.read(&mut buf) {
            conn.write_all(&buf[..n]).unwrap();
        }
    });
    let mut client = TcpStream::connect(addr).unwrap();
    let mut reply = [0u8; 5];
    for _ in 0..requests {
        client.write_all(b"hello").unwrap();
        client.read_exact(&mut reply).unwrap();
    }
    drop(client);
    server.join().unwrap();
}

#[test]
fn healthy_traffic_makes_no_finding() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let (report, _) = doctor(port, 3, &[], || {
        kept_alive(at(port), 500);
        // Normal closes, the server's first, with payloads.
        exchanges(None, at(port), Script::QUICK, 10, 100, 100);
    });
    assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
    assert!(
        report["events_received"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    assert_eq!(report["checked"].as_array().unwrap().len(), 8);
}

#[test]
fn a_peer_that_never_sends_its_fin_leaves_us_half_closed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    let port = free_port();
    let (report, _) = doctor(port, 4, &["--half-closed-age", "1s"], || {
        let listener = TcpListener::bind(at(port)).unwrap();
        // The server reads to the client's FIN, then waits 2 s before closing.
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.read_to_end(&mut Vec::new()).unwrap();
            thread::sleep(Duration::from_secs(2));
        });
        let mut client = TcpStream::connect(at(port)).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        // FIN_WAIT2 until the server's FIN: read returns end of stream.
        client.read_to_end(&mut Vec::new()).unwrap();
        server.join().unwrap();
    });
    let f = finding(&report, "half-closed", me);
    assert_eq!(f["remote"], format!("127.0.0.1:{port}"), "{f:#}");
    assert_eq!(count(f, "long_fin_wait2"), 1, "{f:#}");
    assert!(f["evidence"]["longest_fin_wait2"]
        .as_str()
        .unwrap()
        .ends_with('s'));
    assert!(f["evidence"]["tcp_fin_timeout"].is_string());
}

#[test]
fn keepalive_probes_unanswered_end_in_a_timeout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let me = std::process::id();
    let port = free_port();
    let listener = TcpListener::bind(at(port)).unwrap();
    let (report, _) = doctor(port, 6, &[], || {
        let fd = socket(at(port));
        set_int(&fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set_int(&fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
        set_int(&fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
        set_int(&fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 2);
        connect(&fd, at(port)).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        // The server falls silent: the probes (to its port) never reach it.
        let _nft = NftTable::new(
            &format!("tcp_trace_doctor_{port}"),
            &[format!("tcp dport {port} drop")],
        );
        let mut byte = [0u8; 1];
        let client = TcpStream::from(fd);
        let err = (&client).read(&mut byte).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT));
    });
    let f = finding(&report, "keepalive-timeouts", me);
    assert_eq!(f["remote"], format!("127.0.0.1:{port}"), "{f:#}");
    assert_eq!(count(f, "established_connections_timed_out"), 1, "{f:#}");
    assert!(f["evidence"]["tcp_keepalive_time"].is_string());
}
