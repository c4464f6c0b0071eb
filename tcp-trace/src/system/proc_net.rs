//! The timewait sockets of another network namespace, from
//! `/proc/PID/net/tcp` and `tcp6` of a process in it. sock_diag answers only
//! for the agent's own namespace, and entering another one (`setns`) needs
//! CAP_SYS_ADMIN, which the agent gives up once its program is attached;
//! these files need no capability.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
};

use anyhow::{Context as _, Result};
use tcp_trace_common::state;

use super::sock_diag::{Endpoints, TimewaitSocket};

/// The `tr` (timer) a timewait mini-socket shows in these tables.
const TIMEWAIT_TIMER: u8 = 3;

/// The timewait sockets of the network namespace process `pid` is in.
pub fn timewait_sockets_of(pid: u32) -> Result<Vec<TimewaitSocket>> {
    let mut found = Vec::new();
    for (file, v6) in [("tcp", false), ("tcp6", true)] {
        let path = format!("/proc/{pid}/net/{file}");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        found.extend(parse_table(&text, v6));
    }
    Ok(found)
}

/// The agent's own network namespace.
pub fn own_netns() -> Option<u32> {
    let ino = fs::metadata("/proc/self/ns/net").ok()?.ino();
    u32::try_from(ino).ok()
}

/// The timewait rows of one table; other rows, the header and anything
/// malformed are passed over.
fn parse_table(text: &str, v6: bool) -> Vec<TimewaitSocket> {
    text.lines()
        .skip(1)
        .filter_map(|l| parse_row(l, v6))
        .collect()
}

/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when ...`
fn parse_row(line: &str, v6: bool) -> Option<TimewaitSocket> {
    let mut fields = line.split_whitespace().skip(1);
    let (laddr, lport) = parse_endpoint(fields.next()?, v6)?;
    let (raddr, rport) = parse_endpoint(fields.next()?, v6)?;
    let st = u8::from_str_radix(fields.next()?, 16).ok()?;
    let _queues = fields.next()?;
    let timer = u8::from_str_radix(fields.next()?.split(':').next()?, 16).ok()?;
    if timer != TIMEWAIT_TIMER {
        return None;
    }
    Some(TimewaitSocket {
        endpoints: Endpoints {
            laddr,
            lport,
            raddr,
            rport,
        },
        // A mini-socket shows its substate: TIME_WAIT, or FIN_WAIT2.
        time_wait: st == state::TIME_WAIT,
    })
}

/// `0100007F:1F90`: the address as the kernel's 32-bit words in host order,
/// then the port.
fn parse_endpoint(field: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let addr = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for i in 0..4 {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        if addr.len() != 8 {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((addr, port))
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, net::TcpStream, thread, time::Duration};

    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:1F90 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0000000000000000
   2: 0100007F:C351 0100007F:1F90 05 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0000000000000000
   3: 0100007F:C352 0100007F:1F90 05 00000000:00000000 02:00000F9E 00000000     0        0 99 3 0000000000000000
   4: garbage
";

    #[test]
    fn timewait_rows_and_their_substates() {
        let found = parse_table(TCP, false);
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].endpoints.laddr, local);
        assert_eq!(
            (found[0].endpoints.lport, found[0].endpoints.rport),
            (50000, 8080)
        );
        assert!(found[0].time_wait);
        assert!(!found[1].time_wait, "FIN_WAIT2 substate");
        // A full FIN_WAIT2 socket (timer 2) is no mini-socket.
        assert!(found.iter().all(|s| s.endpoints.lport != 50002));
    }

    #[test]
    fn ipv6_words_are_in_host_order() {
        let line = "   0: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0000000000000000";
        let s = parse_row(line, true).unwrap();
        assert_eq!(s.endpoints.laddr, "::1".parse::<IpAddr>().unwrap());
        assert!(parse_row(line, false).is_none(), "not an IPv4 row");
        assert!(parse_endpoint("0100007F", false).is_none());
        assert!(parse_endpoint("zz00007F:1F90", false).is_none());
    }

    #[test]
    fn sees_a_timewait_socket_of_this_process_namespace() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let port = client.local_addr().unwrap().port();
        // The client closes first: its end lingers in TIME_WAIT.
        drop(client);
        thread::sleep(Duration::from_millis(50));
        drop(server);
        thread::sleep(Duration::from_millis(50));
        let found = timewait_sockets_of(std::process::id()).unwrap();
        assert!(
            found
                .iter()
                .any(|s| s.endpoints.lport == port && s.time_wait),
            "no TIME_WAIT socket on port {port}"
        );
        assert!(own_netns().is_some());
    }
}
