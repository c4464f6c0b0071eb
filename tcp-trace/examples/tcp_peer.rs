//! A TCP peer whose timing the integration tests control.
//!
//! `tcp_peer server ADDR HOLD_MS LINGER_MS`: after `go` on stdin, listens on
//! ADDR (printing `listening`), accepts one connection, holds it HOLD_MS, closes
//! it, waits LINGER_MS + 200 ms, closes the listener.
//! `tcp_peer client ADDR LINGER_MS`: after `go`, connects to ADDR, reads until
//! EOF, lingers LINGER_MS, closes.
//! Each names itself (`tt-server`, `tt-client`) so tests can check the comm.

use std::{
    env,
    ffi::CString,
    io::{self, BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread::sleep,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["server", addr, hold, linger] => server(parse(addr), millis(hold), millis(linger)),
        ["client", addr, linger] => client(parse(addr), millis(linger)),
        _ => {
            eprintln!("usage: tcp_peer server ADDR HOLD_MS LINGER_MS | client ADDR LINGER_MS");
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

fn millis(ms: &str) -> Duration {
    Duration::from_millis(ms.parse().expect("milliseconds"))
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

fn server(addr: SocketAddr, hold: Duration, linger: Duration) -> io::Result<()> {
    name_self("tt-server");
    wait_for_go()?;
    let listener = TcpListener::bind(addr)?;
    println!("listening");
    io::stdout().flush()?;
    let (conn, _) = listener.accept()?;
    sleep(hold);
    drop(conn);
    sleep(linger + Duration::from_millis(200));
    drop(listener);
    Ok(())
}

fn client(addr: SocketAddr, linger: Duration) -> io::Result<()> {
    name_self("tt-client");
    wait_for_go()?;
    let mut conn = TcpStream::connect(addr)?;
    let mut sink = Vec::new();
    conn.read_to_end(&mut sink)?;
    sleep(linger);
    drop(conn);
    Ok(())
}
