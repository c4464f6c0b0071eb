//! A TCP peer whose timing the integration tests control.
//!
//! `tcp_peer server ADDR HOLD_MS LINGER_MS [COUNT [IN_BYTES OUT_BYTES]]`:
//! after `go` on stdin, listens on ADDR (printing `listening`), accepts COUNT
//! connections (default 1); on each it reads IN_BYTES, writes OUT_BYTES, holds
//! the connection HOLD_MS and closes it. Once all are closed it waits
//! LINGER_MS + 200 ms and closes the listener.
//!
//! `tcp_peer client ADDR LINGER_MS [COUNT [OUT_BYTES IN_BYTES]]`: after `go`,
//! opens COUNT connections at once; each writes OUT_BYTES, reads until EOF
//! (checking it got IN_BYTES), lingers LINGER_MS and closes.
//!
//! Each names itself (`tt-server`, `tt-client`) so tests can check the comm.

use std::{
    env,
    ffi::CString,
    io::{self, BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread::{self, sleep},
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let num = |i: usize, default: u64| {
        args.get(i)
            .map_or(default, |s| s.parse().expect("a number"))
    };
    let ms = |i: usize| Duration::from_millis(num(i, 0));
    let result = match args.first() {
        Some(&"server") if args.len() >= 4 => server(
            parse(args[1]),
            ms(2),
            ms(3),
            num(4, 1),
            (num(5, 0) as usize, num(6, 0) as usize),
        ),
        Some(&"waiting-server") if args.len() == 2 => waiting_server(parse(args[1])),
        Some(&"closer") if args.len() >= 4 => closer(
            parse(args[1]),
            num(2, 1),
            args[3],
            args.get(4) == Some(&"reset"),
        ),
        Some(&"client") if args.len() >= 3 => client(
            parse(args[1]),
            ms(2),
            num(3, 1),
            (num(4, 0) as usize, num(5, 0) as usize),
        ),
        _ => {
            eprintln!(
                "usage: tcp_peer server ADDR HOLD_MS LINGER_MS [COUNT [IN OUT]] | \
                 client ADDR LINGER_MS [COUNT [OUT IN]] | waiting-server ADDR | \
                 closer ADDR COUNT NAME [reset]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcp_peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse().expect("a socket address")
}

fn name_self(name: &str) {
    let name = CString::new(name).expect("no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

fn wait_for_go() -> io::Result<()> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "go" {
        return Err(io::Error::other(format!("expected `go`, got {line:?}")));
    }
    Ok(())
}

fn join_all(handles: Vec<thread::JoinHandle<io::Result<()>>>) -> io::Result<()> {
    for h in handles {
        h.join()
            .map_err(|_| io::Error::other("a connection thread panicked"))??;
    }
    Ok(())
}

fn server(
    addr: SocketAddr,
    hold: Duration,
    linger: Duration,
    count: u64,
    (incoming, outgoing): (usize, usize),
) -> io::Result<()> {
    name_self("tt-server");
    wait_for_go()?;
    let listener = TcpListener::bind(addr)?;
    println!("listening");
    io::stdout().flush()?;
    let mut handles = Vec::new();
    for _ in 0..count {
        let (mut conn, _) = listener.accept()?;
        handles.push(thread::spawn(move || {
            let mut buf = vec![0; incoming];
            conn.read_exact(&mut buf)?;
            conn.write_all(&vec![b's'; outgoing])?;
            sleep(hold);
            drop(conn);
            Ok(())
        }));
    }
    join_all(handles)?;
    sleep(linger + Duration::from_millis(200));
    drop(listener);
    Ok(())
}

/// Writes one byte on each connection and closes it after the client does;
/// stops when stdin closes.
fn waiting_server(addr: SocketAddr) -> io::Result<()> {
    name_self("tt-server");
    wait_for_go()?;
    let listener = TcpListener::bind(addr)?;
    println!("listening");
    io::stdout().flush()?;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                let _ = conn.write_all(b"x");
                let mut sink = Vec::new();
                let _ = conn.read_to_end(&mut sink);
            });
        }
    });
    // Until the test closes our stdin.
    let mut rest = String::new();
    let _ = io::stdin().read_line(&mut rest);
    Ok(())
}

/// COUNT connections in turn, each closed by us first once the server's byte
/// arrived (with SO_LINGER {on, 0}, a reset, when `reset`).
fn closer(addr: SocketAddr, count: u64, name: &str, reset: bool) -> io::Result<()> {
    name_self(name);
    wait_for_go()?;
    for _ in 0..count {
        let mut conn = TcpStream::connect(addr)?;
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte)?;
        if reset {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid linger struct on a socket we own.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&conn),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        drop(conn);
    }
    Ok(())
}

fn client(
    addr: SocketAddr,
    linger: Duration,
    count: u64,
    (outgoing, incoming): (usize, usize),
) -> io::Result<()> {
    name_self("tt-client");
    wait_for_go()?;
    let handles = (0..count)
        .map(|_| {
            thread::spawn(move || {
                let mut conn = TcpStream::connect(addr)?;
                conn.write_all(&vec![b'c'; outgoing])?;
                let mut got = Vec::new();
                conn.read_to_end(&mut got)?;
                if got.len() != incoming {
                    return Err(io::Error::other(format!(
                        "got {} bytes, expected {incoming}",
                        got.len()
                    )));
                }
                sleep(linger);
                drop(conn);
                Ok(())
            })
        })
        .collect();
    join_all(handles)
}
