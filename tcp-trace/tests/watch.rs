//! `tcp-trace watch` against the running kernel and real loopback connections.

mod common;

use std::{net::SocketAddr, process::Command, thread, time::Duration};

use common::{exchange, free_port, loopback, sequence, Agent, Ev, Script, AGENT_BIN};

const SCRIPT: Script = Script {
    hold: Duration::from_millis(300),
    linger: Duration::from_millis(200),
};

/// Scheduling slack for a duration the test controls: a measured state may
/// last up to this much longer than the sleep that bounds it (tests share two
/// cores), and never shorter than the sleep less 1 ms of clock granularity.
const SLACK: Duration = Duration::from_millis(250);

fn assert_about(what: &str, got: Option<u64>, want: Duration) {
    let got = got.unwrap_or_else(|| panic!("{what}: duration unknown, expected ~{want:?}"));
    let (lo, hi) = (
        want.as_nanos() as u64 - 1_000_000,
        (want + SLACK).as_nanos() as u64,
    );
    assert!(
        (lo..=hi).contains(&got),
        "{what}: {:.1} ms, expected {:?} (tolerance -1 ms / +{SLACK:?})",
        got as f64 / 1e6,
        want
    );
}

fn find<'a>(sockets: &'a [Vec<Ev>], first: &str, what: &str) -> &'a [Ev] {
    let found: Vec<_> = sockets
        .iter()
        .filter(|evs| sequence(evs).first().map(String::as_str) == Some(first))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {what} socket starting with {first}: {sockets:#?}"
    );
    found[0]
}

fn scripted_exchange(v6: bool, env: &[(&str, &str)]) {
    let port = free_port();
    let agent = Agent::command_env(&["watch", "--json", "--port", &port.to_string()], env);
    let (server_pid, client_pid) = exchange(SocketAddr::new(loopback(v6), port), SCRIPT);
    // Let the softirq tail of the exchange reach the ring buffer.
    thread::sleep(Duration::from_millis(200));
    let trace = agent.stop();
    let all: Vec<Vec<Ev>> = trace.sockets_on_port(port).into_values().collect();
    assert_eq!(
        all.len(),
        3,
        "listener, accepted and client sockets: {all:#?}"
    );
    // The accept is no state change: checked on its own, then set aside.
    let accepts: Vec<&Ev> = all
        .iter()
        .flatten()
        .filter(|e| e.event == "accept")
        .collect();
    assert_eq!(accepts.len(), 1, "one accept: {all:#?}");
    let accept = accepts[0];
    assert_eq!(
        (
            accept.pid,
            accept.comm.as_deref(),
            accept.owner_source.as_deref()
        ),
        (Some(server_pid), Some("tt-server"), Some("accept"))
    );
    assert_eq!(
        (accept.old_state.as_str(), accept.new_state.as_str()),
        ("ESTABLISHED", "ESTABLISHED")
    );
    assert!(
        accept.duration_ns.is_some(),
        "the accept-queue wait: {accept:?}"
    );
    let sockets: Vec<Vec<Ev>> = all
        .into_iter()
        .map(|evs| evs.into_iter().filter(|e| e.event != "accept").collect())
        .collect();

    let family = if v6 { "ipv6" } else { "ipv4" };
    for ev in sockets.iter().flatten() {
        assert_eq!(ev.family, family);
        assert_eq!(ev.laddr, loopback(v6));
    }

    let listener = find(&sockets, "CLOSE->LISTEN", "listener");
    assert_eq!(sequence(listener), ["CLOSE->LISTEN", "LISTEN->CLOSE"]);
    let accepted = find(&sockets, "LISTEN->SYN_RECV", "accepted");
    assert_eq!(
        sequence(accepted),
        [
            "LISTEN->SYN_RECV",
            "SYN_RECV->ESTABLISHED",
            "ESTABLISHED->FIN_WAIT1",
            "FIN_WAIT1->FIN_WAIT2",
            "FIN_WAIT2->CLOSE"
        ]
    );
    let client = find(&sockets, "CLOSE->SYN_SENT", "client");
    assert_eq!(
        sequence(client),
        [
            "CLOSE->SYN_SENT",
            "SYN_SENT->ESTABLISHED",
            "ESTABLISHED->CLOSE_WAIT",
            "CLOSE_WAIT->LAST_ACK",
            "LAST_ACK->CLOSE"
        ]
    );

    // Owners: every event, softirq ones included, goes to the socket's process.
    for (evs, pid, comm) in [
        (listener, server_pid, "tt-server"),
        (accepted, server_pid, "tt-server"),
        (client, client_pid, "tt-client"),
    ] {
        for ev in evs {
            assert_eq!(
                (ev.pid, ev.comm.as_deref()),
                (Some(pid), Some(comm)),
                "owner of {}->{}",
                ev.old_state,
                ev.new_state
            );
        }
    }

    // Ports: the accepted and listening sockets sit on the port; the client's
    // local port is 0 only before the SYN goes out.
    assert!(accepted.iter().all(|e| e.lport == port));
    assert!(client.iter().all(|e| e.rport == port));
    assert_eq!(client[0].lport, 0);
    assert!(client[1..].iter().all(|e| e.lport == accepted[0].rport));

    // Unknown means unknown: no socket existed before its first event.
    for evs in [listener, accepted, client] {
        assert_eq!(evs[0].duration_ns, None, "first event of {}", evs[0].sk);
        assert!(evs[1..].iter().all(|e| e.duration_ns.is_some()), "{evs:#?}");
        assert!(evs.windows(2).all(|w| w[0].ts_ns <= w[1].ts_ns));
        for w in evs.windows(2) {
            assert_eq!(w[1].duration_ns, Some(w[1].ts_ns - w[0].ts_ns));
        }
    }

    // Durations the script controls.
    assert_about("server ESTABLISHED", accepted[2].duration_ns, SCRIPT.hold);
    assert_about("client ESTABLISHED", client[2].duration_ns, SCRIPT.hold);
    assert_about("client CLOSE_WAIT", client[3].duration_ns, SCRIPT.linger);
    // The orphaned server socket does not wait out FIN_WAIT2 itself: the kernel
    // hands it to a timewait mini-socket (invisible to the tracepoint) at once,
    // so its FIN_WAIT2 -> CLOSE comes before the client closes, not after.
    assert!(
        accepted[4].ts_ns < client[3].ts_ns,
        "{accepted:#?} {client:#?}"
    );
    let fin_wait = accepted[3].duration_ns.unwrap() + accepted[4].duration_ns.unwrap();
    assert!(
        fin_wait < SCRIPT.linger.as_nanos() as u64 / 2,
        "{fin_wait} ns"
    );
    assert!(
        listener[1].duration_ns.unwrap() >= (SCRIPT.hold + SCRIPT.linger).as_nanos() as u64,
        "the listener outlives the connection"
    );
    // Loopback handshakes complete in well under a second.
    assert!(client[1].duration_ns.unwrap() < 1_000_000_000);

    // Skips by the kernel (another tracer running on the CPU) are counted,
    // not ours to prevent; losses in our own path must be none.
    assert!(
        trace
            .summary()
            .contains(" 0 ring buffer full, 0 failed kernel reads, 0 undecodable)"),
        "{}",
        trace.summary()
    );
}

#[test]
fn ipv4_exchange_sequences_owners_and_durations() {
    scripted_exchange(false, &[]);
}

#[test]
fn ipv6_exchange_sequences_owners_and_durations() {
    scripted_exchange(true, &[]);
}

/// Kernels whose tracepoint layout differs read the record through helper
/// calls at offsets from tracefs: the same exchange through that path.
#[test]
fn exchange_through_the_probe_read_path() {
    scripted_exchange(false, &[("TCP_TRACE_PROBE_READ", "1")]);
    scripted_exchange(true, &[("TCP_TRACE_PROBE_READ", "1")]);
}

#[test]
fn port_filter_lets_no_other_port_through() {
    let (watched, other) = (free_port(), free_port());
    assert_ne!(watched, other);
    let agent = Agent::start(&["--port", &watched.to_string()]);
    let busy = thread::spawn(move || {
        for _ in 0..5 {
            exchange(SocketAddr::new(loopback(false), other), Script::QUICK);
        }
    });
    exchange(SocketAddr::new(loopback(false), watched), Script::QUICK);
    busy.join().unwrap();
    thread::sleep(Duration::from_millis(200));
    let trace = agent.stop();
    assert!(!trace.events.is_empty());
    for ev in &trace.events {
        assert!(ev.lport == watched || ev.rport == watched, "leaked: {ev:?}");
    }
    assert_eq!(trace.sockets_on_port(watched).len(), 3);
}

#[test]
fn family_filter_keeps_one_family() {
    let port = free_port();
    let agent = Agent::start(&["--port", &port.to_string(), "-6"]);
    exchange(SocketAddr::new(loopback(false), port), Script::QUICK);
    exchange(SocketAddr::new(loopback(true), port), Script::QUICK);
    thread::sleep(Duration::from_millis(200));
    let trace = agent.stop();
    assert!(
        trace.events.iter().all(|e| e.family == "ipv6"),
        "{:#?}",
        trace.events
    );
    assert_eq!(trace.sockets_on_port(port).len(), 3);
}

#[test]
fn pid_filter_keeps_one_process() {
    let port = free_port();
    let addr = SocketAddr::new(loopback(false), port);
    // The server waits for `go`, so its pid is known before tracing starts.
    let mut server =
        common::Peer::server(addr, Duration::from_millis(50), Duration::from_millis(20));
    let agent = Agent::start(&["--pid", &server.pid().to_string()]);
    server.go();
    server.expect_line("listening");
    let mut client = common::Peer::client(addr, Duration::from_millis(20));
    client.go();
    let server_pid = server.pid();
    client.finish();
    server.finish();
    thread::sleep(Duration::from_millis(200));
    let trace = agent.stop();
    assert!(
        trace.events.iter().all(|e| e.pid == Some(server_pid)),
        "{:#?}",
        trace.events
    );
    // The listener and the accepted socket, not the client's.
    let sockets = trace.sockets_on_port(port);
    assert_eq!(sockets.len(), 2, "{sockets:#?}");
    assert!(sockets
        .values()
        .all(|evs| evs.iter().all(|e| e.lport == port)));
}

#[test]
fn text_output_names_the_owner() {
    let port = free_port();
    let agent = Agent::command(&["watch", "--port", &port.to_string()]);
    exchange(SocketAddr::new(loopback(false), port), Script::QUICK);
    thread::sleep(Duration::from_millis(200));
    let text = agent.stop_raw().0.join("\n");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("OLDSTATE"),
        "{text}"
    );
    let syn_sent = lines
        .iter()
        .find(|l| l.contains("CLOSE       -> SYN_SENT"))
        .expect(&text);
    assert!(syn_sent.contains(" tt-client ") && syn_sent.contains(&format!("127.0.0.1:{port}")));
    let fin_wait2 = lines
        .iter()
        .find(|l| l.contains("FIN_WAIT2   -> CLOSE"))
        .expect(&text);
    assert!(fin_wait2.contains(" tt-server "), "{fin_wait2}");
}

#[test]
fn missing_privileges_are_named() {
    // As `nobody`, with no capabilities at all.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .args(["--bounding-set=-all", AGENT_BIN, "watch"])
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_PERFMON"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no backtrace: {stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for args in [
        &["watch", "--port", "0"][..],
        &["watch", "--lport", "x"],
        &["nonsense"],
    ] {
        let out = Command::new(AGENT_BIN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error:"), "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
}

/// A dropped SYN and a dropped handshake ACK: the kernel retransmits after
/// its 1 s initial timeout, and tcp-trace reports the retransmission on the
/// side that made it.
#[test]
fn handshake_retransmissions_are_counted() {
    let (syn_port, ack_port) = (free_port(), free_port());
    // A rule with a byte quota just above one packet matches only the first.
    let _nft = common::NftTable::new(
        &format!("tcp_trace_test_{syn_port}"),
        &[
            format!("tcp dport {syn_port} tcp flags & (syn | ack) == syn quota until 100 bytes drop"),
            format!(
                "tcp dport {ack_port} tcp flags & (syn | ack | fin | rst | psh) == ack quota until 80 bytes drop"
            ),
        ],
    );
    let agent = Agent::start(&["-4"]);
    exchange(SocketAddr::new(loopback(false), syn_port), Script::QUICK);
    exchange(SocketAddr::new(loopback(false), ack_port), Script::QUICK);
    thread::sleep(Duration::from_millis(200));
    let trace = agent.stop();
    let find = |port: u16, old: &str, local: bool| -> Ev {
        trace
            .events
            .iter()
            .find(|e| {
                (if local { e.lport } else { e.rport }) == port
                    && e.old_state == old
                    && e.new_state == "ESTABLISHED"
            })
            .unwrap_or_else(|| {
                panic!(
                    "no {old} -> ESTABLISHED on {port}: {:#?}",
                    trace.sockets_on_port(port)
                )
            })
            .clone()
    };
    let second = 1_000_000_000u64;
    // The client's SYN was dropped: one SYN retransmission after ~1 s.
    let client = find(syn_port, "SYN_SENT", false);
    assert_eq!(client.retransmits, Some(1), "{client:?}");
    let d = client.duration_ns.unwrap();
    assert!(
        (second - 1_000_000..second + second / 2).contains(&d),
        "client handshake {d} ns"
    );
    assert_eq!(find(syn_port, "SYN_RECV", true).retransmits, Some(0));
    // The client's ACK was dropped: it is established at once, the server
    // retransmits its SYN-ACK once.
    let client = find(ack_port, "SYN_SENT", false);
    assert_eq!(client.retransmits, Some(0));
    assert!(client.duration_ns.unwrap() < second / 10, "{client:?}");
    assert_eq!(find(ack_port, "SYN_RECV", true).retransmits, Some(1));
}
