//! `tcp-trace serve` scraped by a real Prometheus while known traffic runs:
//! transition, close and TIME_WAIT counts, the handshake histogram with one
//! SYN dropped by nftables, CLOSE_WAIT sockets a process never closes, the
//! bound on groups, both exposition formats, and the agent's privileges.
//!
//! The kernel may skip runs while other tests' agents run; the page counts
//! them (`tcp_trace_events_dropped_total`), and counts may fall short by as
//! many, never exceed the truth.

mod common;

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// Starts `serve` on `metrics` for sockets on `port`, with `extra` flags
/// and environment `env`.
fn serve_env(metrics: SocketAddr, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Agent {
    let (listen, port) = (metrics.to_string(), port.to_string());
    let mut args = vec!["serve", "--listen", &listen, "--port", &port];
    args.extend_from_slice(extra);
    Agent::command_env(&args, env)
}

fn serve(metrics: SocketAddr, port: u16, extra: &[&str]) -> Agent {
    serve_env(metrics, port, extra, &[])
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new(loopback(false), port)
}

/// The classic text page.
fn page(metrics: SocketAddr) -> String {
    let page = get(metrics, "/metrics", "text/plain").expect("GET /metrics");
    assert_eq!(page.status, 200, "{}", page.body);
    page.body
}

/// Samples of family `name` on a classic text page: labels, value.
fn samples(page: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| {
                let labels = labels
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once("=\"")?;
                        Some((k.to_string(), v.trim_end_matches('"').to_string()))
                    })
                    .collect();
                (labels, value.parse().unwrap())
            })
        })
        .collect()
}

/// Transitions the kernel skipped or lost so far, host-wide.
fn dropped(page: &str) -> f64 {
    samples(page, "tcp_trace_events_dropped_total")
        .iter()
        .map(|(_, v)| v)
        .sum()
}

/// `actual` is `expected`, less at most `dropped`.
fn assert_up_to_dropped(what: &str, actual: f64, expected: f64, dropped: f64) {
    assert!(
        actual <= expected && actual + dropped >= expected,
        "{what}: {actual}, expected {expected} ({dropped} dropped)"
    );
}

#[test]
fn prometheus_sees_the_traffic_the_test_made() {
    let (port, metrics, prom) = (free_port(), local(free_port()), local(free_port()));
    // The first SYN to the port is lost: that handshake takes the kernel's
    // 1 s initial retransmission timeout.
    let _nft = NftTable::new(
        &format!("tcp_trace_serve_{port}"),
        &[format!(
            "tcp dport {port} tcp flags & (syn | ack) == syn quota until 100 bytes drop"
        )],
    );
    let agent = serve(metrics, port, &[]);
    let prometheus = Prometheus::scraping(metrics, prom);
    let server = Peer::waiting_server(local(port));
    // 20 connections, each closed first by a process of a name of our own.
    let mut closer = Peer::closer(local(port), 20, "tt-serve-close", false);
    closer.go();
    closer.finish();

    let group = "tt-serve-close";
    let entered = prometheus.wait_for(
        &format!("tcp_trace_timewait_entered_total{{group=\"{group}\"}}"),
        Duration::from_secs(30),
        |v| v >= 20.0,
    );
    // Counters settle within a scrape or two of the last close.
    std::thread::sleep(Duration::from_secs(3));
    let dropped = prometheus
        .value("sum(tcp_trace_events_dropped_total)")
        .unwrap();
    assert_up_to_dropped("TIME_WAIT entries", entered, 20.0, dropped);
    let lingering = prometheus
        .value(&format!("tcp_trace_timewait_sockets{{group=\"{group}\"}}"))
        .unwrap();
    assert_up_to_dropped("lingering", lingering, 20.0, dropped);
    for (query, expected) in [
        (
            "tcp_trace_transitions_total{from=\"SYN_SENT\",to=\"ESTABLISHED\"}",
            20.0,
        ),
        (
            "tcp_trace_transitions_total{from=\"CLOSE\",to=\"LISTEN\"}",
            1.0,
        ),
        ("tcp_trace_connections_closed_total{close=\"active\"}", 20.0),
        (
            "tcp_trace_connections_closed_total{close=\"passive\"}",
            20.0,
        ),
        ("tcp_trace_connections_closed_total{close=\"reset\"}", 0.0),
        (
            "tcp_trace_state_duration_seconds_count{state=\"SYN_SENT\"}",
            20.0,
        ),
        (
            "tcp_trace_handshake_duration_seconds_count{side=\"client\",outcome=\"established\"}",
            20.0,
        ),
        (
            "tcp_trace_handshake_retransmits_total{side=\"client\"}",
            1.0,
        ),
    ] {
        let value = prometheus.value(query).unwrap_or(0.0);
        assert_up_to_dropped(query, value, expected, dropped);
    }
    // The retransmitted handshake lies between 0.5 s and 2 s; the others,
    // on loopback, under 0.5 s.
    let client =
        "tcp_trace_handshake_duration_seconds_bucket{side=\"client\",outcome=\"established\"";
    let below = |le_max: f64| {
        let page = page(metrics);
        samples(&page, "tcp_trace_handshake_duration_seconds_bucket")
            .into_iter()
            .filter(|(l, _)| l["side"] == "client" && l["outcome"] == "established")
            .filter(|(l, _)| l["le"] != "+Inf" && l["le"].parse::<f64>().unwrap() <= le_max)
            .map(|(l, v)| (l["le"].clone(), v))
            .next_back()
            .unwrap_or_else(|| panic!("no {client} bucket below {le_max}"))
    };
    let (fast_le, fast) = below(0.6);
    let (slow_le, slow) = below(2.1);
    assert!(fast_le.parse::<f64>().unwrap() >= 0.49, "{fast_le}");
    assert!(slow_le.parse::<f64>().unwrap() >= 1.9, "{slow_le}");
    assert_up_to_dropped("handshakes under 0.5 s", fast, 19.0, dropped);
    assert_up_to_dropped("handshakes under 2 s", slow, 20.0, dropped);
    assert_eq!(
        slow - fast,
        1.0,
        "the retransmitted one, between {fast_le} and {slow_le}"
    );

    // The page is valid exposition text, as promtool reads it.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (Debian package prometheus; cargo xtask setup installs it)");
    let text = page(metrics);
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    server.finish();
    agent.stop_raw();
}

#[test]
fn groups_are_bounded_privileges_dropped_and_sigterm_stops_it() {
    let (port, metrics) = (free_port(), local(free_port()));
    // systemd's notification socket, as a `Type=notify` unit gets it.
    let dir = TempDir::new("notify");
    let notify = UnixDatagram::bind(dir.join("notify")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let socket = dir.join("notify").to_string_lossy().into_owned();
    let agent = serve_env(
        metrics,
        port,
        &["--max-groups", "3"],
        &[("NOTIFY_SOCKET", &socket)],
    );
    let mut message = [0u8; 64];
    let n = notify.recv(&mut message).expect("READY=1 from the agent");
    assert_eq!(&message[..n], b"READY=1\n");
    // After attaching, the agent keeps CAP_BPF (bit 39) alone.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        let line = status.lines().find(|l| l.starts_with(set)).unwrap();
        let expected = if matches!(set, "CapEff" | "CapPrm") {
            "0000008000000000"
        } else {
            "0000000000000000"
        };
        assert_eq!(line.split_whitespace().nth(1), Some(expected), "{line}");
    }

    let server = Peer::waiting_server(local(port));
    let names: Vec<String> = (0..6).map(|i| format!("tt-serve-grp{i}")).collect();
    for name in &names {
        let mut closer = Peer::closer(local(port), 2, name, false);
        closer.go();
        closer.finish();
    }
    // 12 entries in all, into at most 3 groups of their own and "other".
    // Confirmed every 5 s; the deadline leaves room for emulated guests.
    let deadline = Instant::now() + Duration::from_secs(40);
    let (groups, total, dropped) = loop {
        let page = page(metrics);
        let entered = samples(&page, "tcp_trace_timewait_entered_total");
        let total: f64 = entered.iter().map(|(_, v)| v).sum();
        let groups: Vec<String> = entered
            .into_iter()
            .map(|(l, _)| l["group"].clone())
            .collect();
        let dropped = dropped(&page);
        if total >= 12.0 || Instant::now() > deadline {
            break (groups, total, dropped);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_up_to_dropped("entries", total, 12.0, dropped);
    assert!(groups.len() <= 4, "{groups:?}");
    // Six closers, three places, one of them the server's: "other" counts
    // the rest (unless the kernel skipped their closes).
    assert!(
        groups.iter().any(|g| g == "other") || dropped > 0.0,
        "{groups:?}"
    );
    assert!(
        groups
            .iter()
            .all(|g| g == "other" || g == "tt-server" || names.contains(g)),
        "{groups:?}"
    );

    // OpenMetrics when asked for it, as Prometheus does.
    let open = get(
        metrics,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    )
    .unwrap();
    assert!(
        open.content_type
            .starts_with("application/openmetrics-text"),
        "{}",
        open.content_type
    );
    assert!(open.body.ends_with("# EOF\n"));
    let classic = get(metrics, "/metrics", "*/*").unwrap();
    assert!(classic
        .content_type
        .starts_with("text/plain; version=0.0.4"));
    let health = get(metrics, "/healthz", "*/*").unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(get(metrics, "/nope", "*/*").unwrap().status, 404);

    server.finish();
    // SIGTERM: a clean exit (stop_raw asserts success), said to systemd,
    // after which nothing answers any more.
    agent.stop_raw();
    let n = notify
        .recv(&mut message)
        .expect("STOPPING=1 from the agent");
    assert_eq!(&message[..n], b"STOPPING=1\n");
    assert!(get(metrics, "/healthz", "*/*").is_none());
}

#[test]
fn close_wait_sockets_a_process_never_closes_are_counted_and_aged() {
    let (port, metrics) = (free_port(), local(free_port()));
    let agent = serve(metrics, port, &[]);
    // Nothing listens yet: a refused connect, a handshake that failed.
    assert!(TcpStream::connect(local(port)).is_err());
    let listener = TcpListener::bind(local(port)).unwrap();
    // The peer closes each connection first; we never close ours.
    let mut closer = Peer::closer(local(port), 5, "tt-serve-peer", false);
    closer.go();
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..5 {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"x").unwrap();
        held.push(conn);
    }
    closer.finish();
    let since = Instant::now();
    let us = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
    let us = us.trim();
    std::thread::sleep(Duration::from_secs(2));
    let page = page(metrics);
    let dropped = dropped(&page);
    let ours = |name: &str| {
        samples(&page, name)
            .into_iter()
            .find(|(l, _)| l["group"] == us)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {name} for group {us}:\n{page}"))
    };
    assert_up_to_dropped(
        "CLOSE_WAIT",
        ours("tcp_trace_close_wait_sockets"),
        5.0,
        dropped,
    );
    let oldest = ours("tcp_trace_close_wait_oldest_seconds");
    let waited = since.elapsed().as_secs_f64();
    assert!(
        oldest >= 1.9 && oldest <= waited + 1.0,
        "oldest CLOSE_WAIT {oldest:.2} s, held {waited:.2} s"
    );

    // Closing them ends their CLOSE_WAIT.
    drop(held);
    let gone = poll(Duration::from_secs(10), "CLOSE_WAIT emptied", || {
        let page = self::page(metrics);
        let left = samples(&page, "tcp_trace_close_wait_sockets")
            .into_iter()
            .find(|(l, _)| l["group"] == us)
            .map(|(_, v)| v)?;
        (left == 0.0).then_some(left)
    });
    assert_eq!(gone, 0.0);
    agent.stop_raw();
}
