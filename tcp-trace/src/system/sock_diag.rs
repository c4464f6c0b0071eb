//! The kernel's own socket tables, through sock_diag (the netlink interface
//! `ss` uses): timewait mini-sockets, and every TCP socket with its inode.

use std::net::IpAddr;

use anyhow::{bail, Context as _, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, Timer},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};
use tcp_trace_common::state;

/// A socket's two ends, as sock_diag lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoints {
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
}

impl Endpoints {
    /// The endpoints of the socket a transition is about.
    pub fn of(t: &crate::model::Transition) -> Endpoints {
        Endpoints {
            laddr: t.laddr,
            lport: t.lport,
            raddr: t.raddr,
            rport: t.rport,
        }
    }
}

/// A timewait mini-socket: a closed connection the kernel still remembers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitSocket {
    pub endpoints: Endpoints,
    /// `TIME_WAIT`, or false for the FIN_WAIT2 substate (an orphaned socket
    /// that closed first and still waits for the peer's FIN).
    pub time_wait: bool,
}

/// A full TCP socket: a listener or a connection, with the inode that names
/// it in `/proc/PID/fd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub endpoints: Endpoints,
    /// `AF_INET` or `AF_INET6` (tcp-trace-common's numbering). Dual-stack
    /// sockets, IPv4-mapped peers included, are `AF_INET6`.
    pub family: u16,
    /// The kernel's numbering (tcp-trace-common `state`).
    pub state: u8,
    /// 0 when no file refers to the socket: orphaned after close, or not
    /// yet accepted.
    pub inode: u64,
}

/// What a dump lists: the kernel puts mini-sockets beside full ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Full,
    /// `TIME_WAIT`, reported as its substate (`TIME_WAIT` or `FIN_WAIT2`).
    Timewait,
    /// `NEW_SYN_RECV`: a handshake in progress, reported as `SYN_RECV`.
    Request,
}

/// Every timewait mini-socket, both families.
pub fn timewait_sockets() -> Result<Vec<TimewaitSocket>> {
    let mut found = Vec::new();
    // The FIN_WAIT2 substate lives in a timewait mini-socket too.
    dump(
        StateFlags::TIME_WAIT | StateFlags::FIN_WAIT2,
        |kind, socket| {
            if kind == Kind::Timewait {
                found.push(TimewaitSocket {
                    endpoints: socket.endpoints,
                    time_wait: socket.state == state::TIME_WAIT,
                });
            }
        },
    )
    .context("dumping timewait sockets via sock_diag")?;
    Ok(found)
}

/// The endpoints of every socket in CLOSE_WAIT, both families, in this
/// network namespace.
pub fn close_wait_sockets() -> Result<Vec<Endpoints>> {
    let mut found = Vec::new();
    dump(StateFlags::CLOSE_WAIT, |kind, socket| {
        if kind == Kind::Full {
            found.push(socket.endpoints);
        }
    })
    .context("dumping CLOSE_WAIT sockets via sock_diag")?;
    Ok(found)
}

/// Every full TCP socket, both families, in this network namespace: every
/// state but `TIME_WAIT` and `NEW_SYN_RECV`, which no process holds.
pub fn tcp_sockets() -> Result<Vec<TcpSocket>> {
    // Asking for SYN_RECV makes the kernel add NEW_SYN_RECV; those are
    // dropped by kind, keeping full SYN_RECV sockets (Fast Open).
    let states = StateFlags::all() - StateFlags::TIME_WAIT;
    let mut found = Vec::new();
    dump(states, |kind, socket| {
        if kind == Kind::Full {
            found.push(socket);
        }
    })
    .context("dumping TCP sockets via sock_diag")?;
    Ok(found)
}

/// One dump per family over one netlink socket; `each` sees every entry.
fn dump(states: StateFlags, mut each: impl FnMut(Kind, TcpSocket)) -> Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto().context("binding the sock_diag socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the sock_diag socket")?;
    for family in [AF_INET, AF_INET6] {
        dump_family(&mut socket, family, states.clone(), &mut each)
            .with_context(|| format!("family {family}"))?;
    }
    Ok(())
}

fn dump_family(
    socket: &mut Socket,
    family: u8,
    states: StateFlags,
    each: &mut impl FnMut(Kind, TcpSocket),
) -> Result<()> {
    send_request(socket, family, states)?;
    let mut received = Vec::with_capacity(1 << 16);
    loop {
        received.clear();
        let size = socket.recv(&mut received, 0).context("receiving")?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&received[offset..])
                .context("decoding a sock_diag message")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    each(kind(&r), tcp_socket(&r));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => bail!("the kernel answered {e:?}"),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

fn send_request(socket: &mut Socket, family: u8, states: StateFlags) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("sending the request")?;
    Ok(())
}

/// Only timewait mini-sockets carry the timewait timer, and only full
/// sockets carry `INET_DIAG_SHUTDOWN` (the kernel always adds it for them).
fn kind(r: &InetResponse) -> Kind {
    if r.header.timer == Some(Timer::TimeWait) {
        Kind::Timewait
    } else if r.nlas.iter().any(|nla| matches!(nla, Nla::Shutdown(_))) {
        Kind::Full
    } else {
        Kind::Request
    }
}

fn tcp_socket(r: &InetResponse) -> TcpSocket {
    let id = &r.header.socket_id;
    TcpSocket {
        endpoints: Endpoints {
            laddr: id.source_address,
            lport: id.source_port,
            raddr: id.destination_address,
            rport: id.destination_port,
        },
        family: r.header.family.into(),
        state: r.header.state,
        inode: r.header.inode.into(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::{
        net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
        os::fd::AsRawFd as _,
        time::Duration,
    };

    #[test]
    fn sees_a_timewait_socket_this_test_makes() {
        // Active close on loopback leaves the client's end in TIME_WAIT.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        let remote = listener.local_addr().unwrap();
        drop(client);
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &server, &mut buf);
        drop(server);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // A dump of a table that other sockets churn through may pass over
        // an entry (the kernel resumes by position): look up to three times.
        let mut ours = Vec::new();
        let mut listed = 0;
        for _ in 0..3 {
            let all = timewait_sockets().unwrap();
            listed = all.len();
            ours = all
                .into_iter()
                .filter(|s| {
                    let e = &s.endpoints;
                    (e.laddr, e.lport, e.raddr, e.rport)
                        == (local.ip(), local.port(), remote.ip(), remote.port())
                })
                .collect();
            if !ours.is_empty() {
                break;
            }
        }
        let max =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_max_tw_buckets").unwrap_or_default();
        assert_eq!(
            ours.len(),
            1,
            "{local} not among {listed} timewait sockets (the kernel keeps at most {}: \
             a full table leaves none)",
            max.trim()
        );
        assert!(ours[0].time_wait);
    }

    /// A connection's endpoints as sock_diag lists them.
    pub(in crate::system) fn endpoints(local: SocketAddr, remote: SocketAddr) -> Endpoints {
        Endpoints {
            laddr: local.ip(),
            lport: local.port(),
            raddr: remote.ip(),
            rport: remote.port(),
        }
    }

    /// The inode of the socket behind `fd`, as `/proc/self/fd` names it.
    pub(in crate::system) fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let link = link.to_str().unwrap();
        link["socket:[".len()..link.len() - 1].parse().unwrap()
    }

    /// Dumps with `list` until every one of `wanted` is in it, up to three
    /// times (see above: a dump may pass over an entry).
    fn list_until<T>(list: impl Fn() -> Vec<T>, wanted: &[impl Fn(&T) -> bool]) -> Vec<T> {
        let mut all = list();
        for _ in 0..2 {
            if wanted.iter().all(|w| all.iter().any(w)) {
                break;
            }
            all = list();
        }
        all
    }

    #[test]
    fn lists_full_sockets_with_family_state_and_inode() {
        let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let (server, from) = v4.accept().unwrap();
        let at = v4.local_addr().unwrap();
        let any4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
        let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0);
        let expected = [
            (endpoints(at, any4), AF_INET, state::LISTEN, inode_of(&v4)),
            (
                endpoints(v6.local_addr().unwrap(), any6),
                AF_INET6,
                state::LISTEN,
                inode_of(&v6),
            ),
            (
                endpoints(from, at),
                AF_INET,
                state::ESTABLISHED,
                inode_of(&client),
            ),
            (
                endpoints(at, from),
                AF_INET,
                state::ESTABLISHED,
                inode_of(&server),
            ),
        ]
        .map(|(endpoints, family, state, inode)| TcpSocket {
            endpoints,
            family: family.into(),
            state,
            inode,
        });
        let wanted = expected.map(|e| move |s: &TcpSocket| *s == e);
        let all = list_until(|| tcp_sockets().unwrap(), &wanted);
        for e in &expected {
            assert!(all.contains(e), "{e:?} not among {} sockets", all.len());
        }
    }

    #[test]
    fn a_dual_stack_listener_and_its_ipv4_peers_are_ipv6() {
        if std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "1") {
            return; // [::] would not accept IPv4 here.
        }
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let mapped = SocketAddr::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), port);
        let peer = client.local_addr().unwrap();
        let mapped_peer = SocketAddr::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), peer.port());
        let server_end = endpoints(mapped, mapped_peer);
        let all = list_until(
            || tcp_sockets().unwrap(),
            &[move |s: &TcpSocket| s.endpoints == server_end],
        );
        let found = all.iter().find(|s| s.endpoints == server_end);
        assert_eq!(found.map(|s| s.family), Some(AF_INET6.into()));
        let listed = all.iter().find(|s| s.inode == inode_of(&listener));
        assert_eq!(
            listed.map(|s| (s.family, s.state)),
            Some((AF_INET6.into(), state::LISTEN))
        );
    }

    #[test]
    fn mini_sockets_are_left_out() {
        // A request socket: TCP_DEFER_ACCEPT keeps the handshake a request
        // (NEW_SYN_RECV) until the client sends data.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let seconds: libc::c_int = 30;
        // SAFETY: a valid socket, and an int option of the size given.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&seconds as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let at = listener.local_addr().unwrap();
        let waiting = TcpStream::connect(at).unwrap();
        let request = endpoints(at, waiting.local_addr().unwrap());

        // A timewait socket in the FIN_WAIT2 substate: the client closes,
        // the server does not (it stays in CLOSE_WAIT, a full socket).
        let other = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (server, _) = other.accept().unwrap();
        let closed = endpoints(client.local_addr().unwrap(), server.local_addr().unwrap());
        let close_wait = endpoints(server.local_addr().unwrap(), client.local_addr().unwrap());
        drop(client);
        std::thread::sleep(Duration::from_millis(50));

        let mut requests = Vec::new();
        dump(StateFlags::SYN_RECV, |kind, s| {
            if kind == Kind::Request {
                requests.push(s.endpoints);
            }
        })
        .unwrap();
        assert!(requests.contains(&request), "no request socket {request:?}");
        let timewait = timewait_sockets().unwrap();
        let substate = timewait.iter().find(|s| s.endpoints == closed);

        let all = list_until(
            || tcp_sockets().unwrap(),
            &[move |s: &TcpSocket| s.endpoints == close_wait],
        );
        let state_of = |e: &Endpoints| all.iter().find(|s| s.endpoints == *e).map(|s| s.state);
        assert_eq!(state_of(&close_wait), Some(state::CLOSE_WAIT));
        assert_eq!(state_of(&request), None);
        // With tcp_fin_timeout above 60 s the orphan stays a full socket.
        if substate.is_some_and(|s| !s.time_wait) {
            assert_eq!(state_of(&closed), None);
        }
    }
}
