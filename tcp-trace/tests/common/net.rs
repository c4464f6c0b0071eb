//! Loopback addresses, free ports and raw socket/sockaddr helpers.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{SystemTime, UNIX_EPOCH},
};

pub fn loopback(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

/// A port below the ephemeral range (so no client socket takes it by chance)
/// that is free on both loopback addresses right now.
pub fn free_port() -> u16 {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ (std::process::id() << 12);
    let mut x = seed | 1;
    loop {
        // xorshift: different tests in one process get different sequences via the clock.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = 20_000 + (x % 10_000) as u16;
        let free = [false, true].iter().all(|&v6| unused(loopback(v6), port));
        if free {
            return port;
        }
    }
}

/// Whether nothing, not even a timewait socket left by an earlier test, holds
/// `port` on `ip`: a bind without SO_REUSEADDR (which std's listeners set)
/// fails on those.
fn unused(ip: IpAddr, port: u16) -> bool {
    let addr = SocketAddr::new(ip, port);
    let fd = socket(addr);
    let (storage, len) = sockaddr(addr);
    // SAFETY: a valid socket and address; the OwnedFd closes the socket.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    rc == 0
}

/// A raw TCP socket for `addr`'s family, so options can be set before connect.
pub fn socket(addr: SocketAddr) -> std::os::fd::OwnedFd {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: creating a socket; the OwnedFd takes ownership.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data large enough for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
