//! `tcp-trace top --batch` against `ss -tan`: while connections on the
//! test's own port sit in ESTABLISHED, CLOSE_WAIT and FIN_WAIT2 (some since
//! before top started), top's counts per state agree with the kernel's
//! table, and the rows name the processes holding them.

mod common;

use std::{
    collections::BTreeMap,
    io::Read,
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{free_port, loopback, Agent, Peer};

/// top's state columns, as `ss` names the states.
const STATES: [(&str, &str); 8] = [
    ("ESTAB", "ESTAB"),
    ("SYN_SENT", "SYN-SENT"),
    ("SYN_RECV", "SYN-RECV"),
    ("CLOSE_WAIT", "CLOSE-WAIT"),
    ("FIN_WAIT1", "FIN-WAIT-1"),
    ("FIN_WAIT2", "FIN-WAIT-2"),
    ("LAST_ACK", "LAST-ACK"),
    ("TIME_WAIT", "TIME-WAIT"),
];

/// Sockets on `port` per state, as `ss -tan` lists them (LISTEN aside).
fn ss_counts(port: u16) -> BTreeMap<String, u64> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new("ss")
        .args(["-tanH", &filter])
        .output()
        .expect("running ss");
    assert!(out.status.success());
    let mut counts = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let state = line.split_whitespace().next().unwrap_or_default();
        if let Some((ours, _)) = STATES.iter().find(|(_, ss)| *ss == state) {
            *counts.entry(ours.to_string()).or_default() += 1;
        }
    }
    counts
}

/// One table of `top --batch`: its dropped count, and its rows (name, cells).
struct Table {
    dropped: u64,
    rows: Vec<(String, Vec<String>)>,
}

impl Table {
    /// Sockets per state over all rows (zero counts left out, as ss does).
    fn counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (_, cells) in &self.rows {
            for (i, (state, _)) in STATES.iter().enumerate() {
                let n: u64 = cells[i].parse().unwrap();
                if n > 0 {
                    *counts.entry(state.to_string()).or_default() += n;
                }
            }
        }
        counts
    }

    fn row(&self, name: &str) -> &[String] {
        self.rows
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, cells)| cells.as_slice())
            .unwrap_or_else(|| panic!("no row {name}: {:?}", self.rows))
    }
}

/// The next whole table top prints.
fn next_table(agent: &Agent) -> Table {
    let line = |agent: &Agent| {
        agent
            .next_line(Duration::from_secs(10))
            .expect("a line from top")
    };
    let mut title = line(agent);
    while !title.contains(" rows, ") {
        title = line(agent);
    }
    let dropped: u64 = title
        .split(", ")
        .find_map(|part| part.strip_suffix(" transitions dropped"))
        .expect("a dropped count")
        .parse()
        .unwrap();
    assert!(line(agent).starts_with("PID COMM"));
    let mut rows = Vec::new();
    loop {
        let row = line(agent);
        if row.is_empty() {
            break;
        }
        // The last 13 cells are figures; the name (pid and comm) comes first.
        let words: Vec<&str> = row.split_whitespace().collect();
        let (name, cells) = words.split_at(words.len() - 13);
        rows.push((
            name.join(" "),
            cells.iter().map(|c| c.to_string()).collect(),
        ));
    }
    Table { dropped, rows }
}

#[test]
fn batch_counts_agree_with_ss_for_the_tests_port() {
    let port = free_port();
    let addr = SocketAddr::new(loopback(false), port);
    // Accepts 6, writes a byte on each and keeps it open 8 s whatever the
    // client does.
    let mut server = Peer::spawn(&[
        "server".into(),
        addr.to_string(),
        "8000".into(),
        "0".into(),
        "6".into(),
        "0".into(),
        "1".into(),
    ]);
    server.go();
    server.expect_line("listening");
    // Three kept open by this test, from before top starts: ESTABLISHED on
    // both sides, found in the kernel's table at start.
    let held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.read_exact(&mut [0u8; 1]).unwrap();
            c
        })
        .collect();
    let agent = Agent::command(&[
        "top",
        "--batch",
        "--port",
        &port.to_string(),
        "--interval",
        "1",
    ]);
    // Three closed by their client while top runs: CLOSE_WAIT at the
    // server, FIN_WAIT2 (orphaned, in the timewait table) at the client.
    let mut closer = Peer::closer(addr, 3, "tt-closer", false);
    closer.go();
    closer.finish();
    // Long enough for the timewait table to be read twice.
    thread::sleep(Duration::from_millis(2500));
    let kernel = ss_counts(port);
    let taken = Instant::now();
    let mut table = next_table(&agent);
    while taken.elapsed() < Duration::from_millis(100) {
        // A table printed before ss ran: take the next one.
        table = next_table(&agent);
    }
    let ours = table.counts();
    let expected: BTreeMap<String, u64> = [("ESTAB", 6), ("CLOSE_WAIT", 3), ("FIN_WAIT2", 3)]
        .map(|(s, n)| (s.to_string(), n))
        .into();
    assert_eq!(kernel, expected, "the scenario itself (ss)");
    if table.dropped == 0 {
        assert_eq!(ours, kernel, "top {:?}", table.rows);
    } else {
        let missing: u64 = kernel
            .iter()
            .map(|(s, n)| n.saturating_sub(ours.get(s).copied().unwrap_or(0)))
            .sum();
        assert!(
            missing <= table.dropped,
            "top {ours:?}, ss {kernel:?}, {} dropped",
            table.dropped
        );
    }
    // The rows name the holders: the server (3 established, 3 in
    // CLOSE_WAIT) and this test (its 3 established).
    let server_row = table.row(&format!("{} tt-server", server.pid()));
    assert_eq!(
        (server_row[0].as_str(), server_row[3].as_str()),
        ("3", "3"),
        "{server_row:?}"
    );
    assert_ne!(server_row[12], "-", "an oldest CLOSE_WAIT age");
    let me = std::process::id();
    let mine = table
        .rows
        .iter()
        .find(|(name, _)| name.starts_with(&format!("{me} ")))
        .unwrap_or_else(|| panic!("no row for this test: {:?}", table.rows));
    assert_eq!(mine.1[0], "3", "{mine:?}");
    let _ = agent.stop_raw();
    drop(held);
    server.finish();
}

/// A pseudo-terminal pair: the master for the test, the slave for top.
fn pty() -> (std::fs::File, std::fs::File) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 30,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into our ints; the name and
    // termios pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

#[test]
fn the_screen_shows_the_keys_and_q_restores_the_terminal() {
    use std::{io::Write, process::Stdio, sync::mpsc};
    let (mut master, slave) = pty();
    let port = free_port().to_string();
    let mut top = Command::new(common::AGENT_BIN)
        .args(["top", "--port", &port])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning tcp-trace top");
    // Everything the screen writes, read from a thread of its own.
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&screen).contains("q quit") {
        let left = deadline.saturating_duration_since(Instant::now());
        screen.extend(rx.recv_timeout(left).expect("the screen with its keys"));
    }
    master.write_all(b"q").unwrap();
    let status = common::wait_timeout(&mut top, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    while let Ok(more) = rx.recv_timeout(Duration::from_millis(200)) {
        screen.extend(more);
    }
    let screen = String::from_utf8_lossy(&screen);
    assert!(
        screen.contains("PID COMM") && screen.contains("OLDEST_CW"),
        "{screen}"
    );
    // The alternate screen was entered, and left again on `q`.
    let (entered, left) = (screen.find("\x1b[?1049h"), screen.rfind("\x1b[?1049l"));
    assert!(entered.is_some() && left > entered, "{screen:?}");
}

#[test]
fn the_screen_without_a_terminal_is_a_clear_error() {
    let out = Command::new(common::AGENT_BIN)
        .arg("top")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running tcp-trace top");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs a terminal: use --batch or --json"),
        "{stderr}"
    );
    assert!(!stderr.contains("tracing"), "nothing loaded: {stderr}");
}
