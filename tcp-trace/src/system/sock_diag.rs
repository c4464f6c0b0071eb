//! The kernel's own table of timewait sockets, through sock_diag (the netlink
//! interface `ss` uses).

use std::net::IpAddr;

use anyhow::{bail, Context as _, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_TIME_WAIT},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, Timer},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

/// A timewait mini-socket: a closed connection the kernel still remembers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitSocket {
    pub endpoints: Endpoints,
    /// `TIME_WAIT`, or false for the FIN_WAIT2 substate (an orphaned socket
    /// that closed first and still waits for the peer's FIN).
    pub time_wait: bool,
}

/// Every timewait mini-socket, both families.
pub fn timewait_sockets() -> Result<Vec<TimewaitSocket>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto().context("binding the sock_diag socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the sock_diag socket")?;
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump(&mut socket, family, &mut found)
            .with_context(|| format!("dumping timewait sockets (family {family}) via sock_diag"))?;
    }
    Ok(found)
}

fn dump(socket: &mut Socket, family: u8, found: &mut Vec<TimewaitSocket>) -> Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::TIME_WAIT | StateFlags::FIN_WAIT2,
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
                // Full sockets in FIN_WAIT2 carry other timers; timewait
                // mini-sockets carry the timewait timer.
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                    if r.header.timer == Some(Timer::TimeWait) =>
                {
                    let id = &r.header.socket_id;
                    found.push(TimewaitSocket {
                        endpoints: Endpoints {
                            laddr: id.source_address,
                            lport: id.source_port,
                            raddr: id.destination_address,
                            rport: id.destination_port,
                        },
                        time_wait: r.header.state == TCP_TIME_WAIT,
                    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

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
}
