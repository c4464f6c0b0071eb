//! Loopback connection churn for `cargo xtask bench`.
//!
//! `churn SECONDS RATE [PORT]`: client threads connect to a local server,
//! exchange 8 bytes each way and close, as fast as they can (RATE 0) or at
//! RATE connections per second, for SECONDS. Clients close first, so their
//! sockets linger in TIME_WAIT: each connection binds a different 127.x.y.z
//! source address (IP_BIND_ADDRESS_NO_PORT) so that no one address pair runs
//! out of ephemeral ports. Prints one JSON object with the result.
//!
//! With `CHURN_NAMES=N` in the environment, each client thread renames
//! itself before each connection, cycling through N names (`churn-0` ...):
//! N distinct process names, as a host running many short-lived programs
//! shows an agent that groups by name.
//!
//! Each connection makes ten transitions: the client's CLOSE -> SYN_SENT ->
//! ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2 -> CLOSE and the server's LISTEN ->
//! SYN_RECV -> ESTABLISHED -> CLOSE_WAIT -> LAST_ACK -> CLOSE.

use std::{
    env,
    io::{Read, Write},
    mem,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::FromRawFd,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

const CLIENTS: usize = 4;
const SERVERS: usize = 4;
pub const TRANSITIONS_PER_CONNECTION: u64 = 10;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("burst") {
        let number = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
        let (Some(connections), Some(threads)) = (number(1), number(2)) else {
            eprintln!("usage: churn burst CONNECTIONS THREADS");
            return ExitCode::from(2);
        };
        return match burst(connections, threads.max(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("churn burst: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("hold") {
        let count = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        return match hold(count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("churn hold: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(seconds), Some(rate)) = (
        args.first().and_then(|s| s.parse::<f64>().ok()),
        args.get(1).and_then(|s| s.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: churn SECONDS RATE(0 = flat out) [PORT]");
        return ExitCode::from(2);
    };
    let port: u16 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    match run(Duration::from_secs_f64(seconds), rate, port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("churn: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(duration: Duration, rate: u64, port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    let server = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));

    for _ in 0..SERVERS {
        let listener = listener.try_clone()?;
        thread::spawn(move || {
            let mut buf = [0u8; 8];
            while let Ok((mut conn, _)) = listener.accept() {
                // Reply, then wait for the client's FIN and close after it.
                if conn.read_exact(&mut buf).is_ok() && conn.write_all(&buf).is_ok() {
                    let _ = conn.read(&mut buf);
                }
            }
        });
    }

    let names: Option<u32> = env::var("CHURN_NAMES").ok().and_then(|n| n.parse().ok());
    let start = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            let std::net::SocketAddr::V4(server) = server else {
                unreachable!()
            };
            thread::spawn(move || {
                let interval =
                    (rate > 0).then(|| Duration::from_secs_f64(CLIENTS as f64 / rate as f64));
                let mut next = Instant::now();
                let mut n: u32 = i as u32;
                let mut buf = [0u8; 8];
                while !stop.load(Ordering::Relaxed) {
                    if let Some(interval) = interval {
                        next += interval;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    // 127.1.0.1 .. 127.1.255.254, one per connection in turn.
                    n = n.wrapping_add(CLIENTS as u32);
                    if let Some(names) = names.filter(|&k| k > 0) {
                        name_thread(&format!("churn-{}", n % names));
                    }
                    let source = Ipv4Addr::new(127, 1, (n >> 8) as u8, (n as u8).max(1));
                    match exchange(source, server, &mut buf) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let connections = done.load(Ordering::Relaxed);
    println!(
        "{{\"connections\":{connections},\"failed\":{},\"seconds\":{elapsed:.3},\"per_second\":{:.1},\"transitions\":{}}}",
        failed.load(Ordering::Relaxed),
        connections as f64 / elapsed,
        connections * TRANSITIONS_PER_CONNECTION
    );
    Ok(())
}

/// Sets this thread's name (its comm, as the kernel reports owners).
fn name_thread(name: &str) {
    let mut comm = [0u8; 16];
    let len = name.len().min(15);
    comm[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // from a buffer that outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// `churn burst N THREADS`: N connections from THREADS threads at once on one
/// listener, each thread connecting, accepting whichever connection comes,
/// closing its client and then the accepted end once its peer has (ten
/// transitions each). Concurrency like this is what makes the kernel skip
/// tracing programs' runs. Prints one JSON object.
fn burst(connections: u64, threads: u64) -> std::io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let server = listener.local_addr()?;
    let start = Instant::now();
    thread::scope(|scope| -> std::io::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    for _ in 0..connections / threads {
                        let client = TcpStream::connect(server)?;
                        let (mut accepted, _) = listener.accept()?;
                        drop(client);
                        let mut buf = [0u8; 1];
                        while accepted.read(&mut buf)? > 0 {}
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("a burst thread panicked")?;
        }
        Ok(())
    })?;
    let made = connections / threads * threads;
    println!(
        "{{\"connections\":{made},\"seconds\":{:.3},\"transitions\":{}}}",
        start.elapsed().as_secs_f64(),
        made * TRANSITIONS_PER_CONNECTION + 2
    );
    Ok(())
}

/// `churn hold N`: opens N connections and keeps them (and their accepted
/// ends) open until stdin closes; prints `held N` once they are all up.
fn hold(count: usize) -> std::io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit structs; lowering or matching the hard limit is allowed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let needed = (2 * count + 64) as libc::rlim_t;
    if needed > limit.rlim_cur {
        return Err(std::io::Error::other(format!(
            "holding {count} connections needs {needed} descriptors; the limit is {}",
            limit.rlim_cur
        )));
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let std::net::SocketAddr::V4(server) = listener.local_addr()? else {
        unreachable!()
    };
    let acceptor = thread::spawn(move || {
        (0..count)
            .map_while(|_| listener.accept().ok().map(|(c, _)| c))
            .collect::<Vec<_>>()
    });
    let mut clients = Vec::with_capacity(count);
    for n in 0..count as u32 {
        let source = Ipv4Addr::new(127, 2, (n >> 8) as u8, (n as u8).max(1));
        clients.push(connect(source, server)?);
    }
    let accepted = acceptor
        .join()
        .map_err(|_| std::io::Error::other("acceptor panicked"))?;
    println!("held {}", clients.len().min(accepted.len()));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

/// One connection from `source` (any port) to `server`.
fn exchange(source: Ipv4Addr, server: SocketAddrV4, buf: &mut [u8; 8]) -> std::io::Result<()> {
    let mut stream = connect(source, server)?;
    stream.write_all(buf)?;
    stream.read_exact(buf)?;
    Ok(())
}

fn connect(source: Ipv4Addr, server: SocketAddrV4) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket syscalls on a descriptor we own; the stream takes
    // ownership of it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as u32,
        );
        let addr = sockaddr(SocketAddrV4::new(source, 0));
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            mem::size_of_val(&addr) as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let addr = sockaddr(server);
        if libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            mem::size_of_val(&addr) as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}
