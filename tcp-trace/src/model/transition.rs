//! One TCP state transition, decoded from the kernel's ring-buffer record.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};
use tcp_trace_common::{
    state, Event, Filter, AF_INET, AF_INET6, COMM_LEN, EVENT_SIZE, FLAG_ACCEPT, FLAG_ACTIVE_OPEN,
    FLAG_DURATION_KNOWN, FLAG_HANDSHAKE, FLAG_OWNER_KNOWN, FLAG_RETRANS, FLAG_SOCK_FIELDS,
};

use super::{Owner, OwnerSource};

/// A TCP state, named as the kernel names it without the `TCP_` prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpState(pub u8);

impl TcpState {
    pub const ESTABLISHED: TcpState = TcpState(state::ESTABLISHED);
    pub const SYN_SENT: TcpState = TcpState(state::SYN_SENT);
    pub const SYN_RECV: TcpState = TcpState(state::SYN_RECV);
    pub const FIN_WAIT1: TcpState = TcpState(state::FIN_WAIT1);
    pub const FIN_WAIT2: TcpState = TcpState(state::FIN_WAIT2);
    pub const TIME_WAIT: TcpState = TcpState(state::TIME_WAIT);
    pub const CLOSE: TcpState = TcpState(state::CLOSE);
    pub const CLOSE_WAIT: TcpState = TcpState(state::CLOSE_WAIT);
    pub const LAST_ACK: TcpState = TcpState(state::LAST_ACK);
    pub const LISTEN: TcpState = TcpState(state::LISTEN);
    pub const CLOSING: TcpState = TcpState(state::CLOSING);
    pub const NEW_SYN_RECV: TcpState = TcpState(state::NEW_SYN_RECV);

    pub fn name(self) -> &'static str {
        match self {
            Self::ESTABLISHED => "ESTABLISHED",
            Self::SYN_SENT => "SYN_SENT",
            Self::SYN_RECV => "SYN_RECV",
            Self::FIN_WAIT1 => "FIN_WAIT1",
            Self::FIN_WAIT2 => "FIN_WAIT2",
            Self::TIME_WAIT => "TIME_WAIT",
            Self::CLOSE => "CLOSE",
            Self::CLOSE_WAIT => "CLOSE_WAIT",
            Self::LAST_ACK => "LAST_ACK",
            Self::LISTEN => "LISTEN",
            Self::CLOSING => "CLOSING",
            Self::NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }

    pub fn is_valid(self) -> bool {
        (1..=12).contains(&self.0)
    }

    pub fn from_name(name: &str) -> Option<TcpState> {
        (1..=12).map(TcpState).find(|s| s.name() == name)
    }
}

/// Fields read from the socket itself at its transition to CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFields {
    /// Payload bytes sent and acknowledged by the peer.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// `sock.sk_err`: the errno the connection ended with, 0 for none.
    pub error: u16,
}

/// `AF_INET` or `AF_INET6`, as the kernel's filters name an address's family.
pub fn family(addr: IpAddr) -> u16 {
    if addr.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// One decoded transition, or an accept (see `accept`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub sk: u64,
    pub owner: Option<Owner>,
    /// Not a state change: `accept()` handed the connection to `owner`, in
    /// state `old_state` (= `new_state`); `duration_ns` is the time it waited
    /// in the accept queue since it became ESTABLISHED.
    pub accept: bool,
    /// Inode number of the socket's network namespace, when known.
    pub netns: Option<u32>,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub old_state: TcpState,
    pub new_state: TcpState,
    /// Time spent in `old_state`; `None` when we never saw the socket enter it.
    pub duration_ns: Option<u64>,
    /// At transitions to CLOSE, when the kernel's BTF gave the offsets.
    pub sock: Option<SockFields>,
    /// At transitions out of SYN_SENT or SYN_RECV: retransmissions so far
    /// (the handshake's SYN or SYN-ACK retransmissions).
    pub retransmits: Option<u32>,
    /// At a server's SYN_RECV -> ESTABLISHED: from its first SYN-ACK to the
    /// final ACK; `None` where the kernel gave no way to tell.
    pub handshake_ns: Option<u64>,
}

impl Transition {
    pub fn is_ipv4(&self) -> bool {
        self.laddr.is_ipv4()
    }

    pub fn family(&self) -> u16 {
        family(self.laddr)
    }

    /// Whether the kernel's filters let this transition through (for
    /// transitions read back from a recording).
    pub fn passes(&self, filter: &Filter) -> bool {
        let pid = self.owner.as_ref().map(|o| o.pid);
        filter.matches(self.family(), self.lport, self.rport, pid)
    }

    /// Whether the owner runs in cgroup `path` or below it, by its recorded
    /// cgroup path (for transitions read back from a recording).
    pub fn owner_in_cgroup(&self, path: &str) -> bool {
        let Some(placement) = self.owner.as_ref().and_then(|o| o.placement.as_ref()) else {
            return false;
        };
        super::cgroup_within(&placement.cgroup, path)
    }

    /// The transition `old -> new`.
    pub fn is(&self, old: TcpState, new: TcpState) -> bool {
        self.old_state == old && self.new_state == new
    }
}

/// Decodes one ring-buffer record. Errors mean a record we cannot trust; the
/// caller counts them as dropped.
pub fn decode(bytes: &[u8]) -> Result<Transition> {
    if bytes.len() != EVENT_SIZE {
        bail!("record of {} bytes, expected {EVENT_SIZE}", bytes.len());
    }
    // SAFETY: the length matches and `Event` is plain old data valid for any
    // bit pattern; read_unaligned copes with any alignment.
    let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_event(&ev)
}

pub fn from_event(ev: &Event) -> Result<Transition> {
    let (laddr, raddr) = addresses(ev.family, &ev.saddr, &ev.daddr)?;
    let (old_state, new_state) = (TcpState(ev.old_state), TcpState(ev.new_state));
    if !old_state.is_valid() || !new_state.is_valid() {
        bail!("unknown TCP state {} -> {}", ev.old_state, ev.new_state);
    }
    let owner = if ev.flags & FLAG_OWNER_KNOWN != 0 {
        let Some(source) = OwnerSource::from_kernel(ev.owner_source) else {
            bail!("unknown owner source {}", ev.owner_source);
        };
        Some(Owner {
            cgroup_id: ev.cgroup_id,
            ..Owner::process(ev.pid, comm_bytes(&ev.comm), source)
        })
    } else {
        None
    };
    let accept = ev.flags & FLAG_ACCEPT != 0;
    if accept && old_state != new_state {
        bail!(
            "an accept changing state {} -> {}",
            ev.old_state,
            ev.new_state
        );
    }
    Ok(Transition {
        ts_ns: ev.ts_ns,
        sk: ev.skaddr,
        owner,
        accept,
        netns: (ev.netns != 0).then_some(ev.netns),
        laddr,
        lport: ev.sport,
        raddr,
        rport: ev.dport,
        old_state,
        new_state,
        duration_ns: (ev.flags & FLAG_DURATION_KNOWN != 0).then_some(ev.duration_ns),
        sock: (ev.flags & FLAG_SOCK_FIELDS != 0).then(|| payload(ev)),
        retransmits: (ev.flags & FLAG_RETRANS != 0).then_some(ev.total_retrans),
        handshake_ns: (ev.flags & FLAG_HANDSHAKE != 0).then_some(ev.handshake_ns),
    })
}

/// `SOCK_DONE` in `enum sock_flags` (stable since Linux 2.6): set by
/// `tcp_fin()` when the peer's FIN arrives.
const SOCK_DONE: u8 = 1 << 1;

/// Payload byte counts from the kernel's sequence-space counters:
/// `bytes_acked` counts an active opener's SYN and an acknowledged FIN as one
/// byte each, `bytes_received` a received FIN.
fn payload(ev: &Event) -> SockFields {
    let syn_acked = ev.flags & FLAG_ACTIVE_OPEN != 0 && ev.old_state != state::SYN_SENT;
    let our_fin_acked = ev.sk_err == 0
        && matches!(
            ev.old_state,
            state::FIN_WAIT2 | state::CLOSING | state::LAST_ACK
        );
    let peer_fin = ev.sock_flags & SOCK_DONE != 0;
    SockFields {
        bytes_sent: ev
            .bytes_acked
            .saturating_sub(u64::from(syn_acked) + u64::from(our_fin_acked)),
        bytes_received: ev.bytes_received.saturating_sub(u64::from(peer_fin)),
        error: ev.sk_err,
    }
}

/// A record's local and remote addresses: IPv4 in the first 4 bytes, or IPv6.
pub(super) fn addresses(
    family: u16,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> Result<(IpAddr, IpAddr)> {
    Ok(match family {
        AF_INET => (ipv4(saddr), ipv4(daddr)),
        AF_INET6 => (
            IpAddr::V6(Ipv6Addr::from(*saddr)),
            IpAddr::V6(Ipv6Addr::from(*daddr)),
        ),
        other => bail!("unknown address family {other}"),
    })
}

fn ipv4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

fn comm_bytes(comm: &[u8; COMM_LEN]) -> &[u8] {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    &comm[..end]
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use tcp_trace_common::FLAG_IRQ_CONTEXT;

    pub fn sample_event() -> Event {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        Event {
            ts_ns: 1_000_000_000,
            skaddr: 0xffff_8880_1234_5678,
            duration_ns: 317_000,
            bytes_acked: 0,
            bytes_received: 0,
            pid: 4242,
            sport: 45_678,
            dport: 80,
            family: AF_INET,
            old_state: 2,
            new_state: 1,
            flags: FLAG_OWNER_KNOWN | FLAG_DURATION_KNOWN | FLAG_IRQ_CONTEXT,
            sock_flags: 0,
            sk_err: 0,
            total_retrans: 0,
            netns: 4026531840,
            handshake_ns: 0,
            comm,
            saddr,
            daddr,
            cgroup_id: 77,
            owner_source: tcp_trace_common::owner_source::TASK,
            _pad: [0; 7],
        }
    }

    fn bytes_of(ev: &Event) -> Vec<u8> {
        // SAFETY: `Event` is repr(C) plain data without implicit padding.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), EVENT_SIZE) }
            .to_vec()
    }

    #[test]
    fn decodes_an_ipv4_record() {
        let t = decode(&bytes_of(&sample_event())).unwrap();
        assert_eq!(t.laddr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(t.raddr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!((t.lport, t.rport), (45_678, 80));
        assert_eq!(
            (t.old_state.name(), t.new_state.name()),
            ("SYN_SENT", "ESTABLISHED")
        );
        assert_eq!(t.duration_ns, Some(317_000));
        let owner = t.owner.unwrap();
        assert_eq!((owner.pid, &owner.comm[..]), (4242, &b"curl"[..]));
        assert_eq!((owner.source, owner.cgroup_id), (OwnerSource::Task, 77));
        assert_eq!(t.netns, Some(4026531840));
        assert!(!t.accept);
    }

    #[test]
    fn cgroup_subtrees_match_whole_components() {
        let mut t = decode(&bytes_of(&sample_event())).unwrap();
        assert!(!t.owner_in_cgroup("/"), "no placement: not in any subtree");
        t.owner.as_mut().unwrap().placement = Some(std::sync::Arc::new(crate::model::Placement {
            cgroup: "/system.slice/nginx.service".into(),
            ..Default::default()
        }));
        for inside in [
            "/",
            "/system.slice",
            "/system.slice/",
            "/system.slice/nginx.service",
        ] {
            assert!(t.owner_in_cgroup(inside), "{inside}");
        }
        for outside in ["/system", "/system.slice/nginx", "/user.slice"] {
            assert!(!t.owner_in_cgroup(outside), "{outside}");
        }
    }

    #[test]
    fn decodes_an_accept() {
        let mut ev = sample_event();
        ev.flags |= FLAG_ACCEPT;
        ev.old_state = state::ESTABLISHED;
        ev.new_state = state::ESTABLISHED;
        ev.owner_source = tcp_trace_common::owner_source::ACCEPT;
        let t = decode(&bytes_of(&ev)).unwrap();
        assert!(t.accept);
        assert_eq!(t.owner.unwrap().source, OwnerSource::Accept);
        ev.new_state = state::CLOSE_WAIT;
        assert!(
            decode(&bytes_of(&ev)).is_err(),
            "an accept never changes state"
        );
    }

    #[test]
    fn a_known_owner_needs_a_known_source() {
        let mut ev = sample_event();
        ev.owner_source = 0;
        assert!(decode(&bytes_of(&ev)).is_err());
        ev.flags &= !FLAG_OWNER_KNOWN;
        assert_eq!(decode(&bytes_of(&ev)).unwrap().owner, None);
    }

    #[test]
    fn decodes_an_ipv6_record() {
        let mut ev = sample_event();
        ev.family = AF_INET6;
        ev.saddr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        ev.daddr = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        let t = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(t.laddr.to_string(), "::1");
        assert_eq!(t.raddr.to_string(), "2001:db8::7");
        assert!(!t.is_ipv4());
    }

    #[test]
    fn unknown_owner_and_duration_stay_unknown() {
        let mut ev = sample_event();
        ev.flags = 0;
        ev.duration_ns = 0;
        let t = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(t.owner, None);
        assert_eq!(t.duration_ns, None);
    }

    #[test]
    fn zero_duration_known_is_not_unknown() {
        let mut ev = sample_event();
        ev.duration_ns = 0;
        assert_eq!(decode(&bytes_of(&ev)).unwrap().duration_ns, Some(0));
    }

    #[test]
    fn socket_fields_come_with_their_flag() {
        let mut ev = sample_event();
        ev.new_state = 7;
        ev.bytes_acked = 10;
        ev.bytes_received = 20;
        ev.sk_err = 104;
        assert_eq!(decode(&bytes_of(&ev)).unwrap().sock, None);
        ev.flags |= FLAG_SOCK_FIELDS;
        let sock = decode(&bytes_of(&ev)).unwrap().sock.unwrap();
        assert_eq!(
            (sock.bytes_sent, sock.bytes_received, sock.error),
            (10, 20, 104)
        );
    }

    #[test]
    fn syn_and_fins_are_not_payload() {
        let mut ev = sample_event();
        ev.flags |= FLAG_SOCK_FIELDS | FLAG_ACTIVE_OPEN;
        ev.new_state = state::CLOSE;
        ev.bytes_acked = 102;
        ev.bytes_received = 51;
        // A client's passive close: SYN and FIN acked, the peer's FIN received.
        ev.old_state = state::LAST_ACK;
        ev.sock_flags = SOCK_DONE;
        let s = decode(&bytes_of(&ev)).unwrap().sock.unwrap();
        assert_eq!((s.bytes_sent, s.bytes_received), (100, 50));
        // An accepted socket handed to timewait before the peer's FIN.
        ev.flags &= !FLAG_ACTIVE_OPEN;
        ev.old_state = state::FIN_WAIT2;
        ev.sock_flags = 0;
        let s = decode(&bytes_of(&ev)).unwrap().sock.unwrap();
        assert_eq!((s.bytes_sent, s.bytes_received), (101, 51));
        // Reset while established: no FIN of ours was acknowledged.
        ev.old_state = state::ESTABLISHED;
        ev.sk_err = 104;
        let s = decode(&bytes_of(&ev)).unwrap().sock.unwrap();
        assert_eq!((s.bytes_sent, s.bytes_received), (102, 51));
        // A connect that never completed acknowledged nothing.
        ev.flags |= FLAG_ACTIVE_OPEN;
        ev.old_state = state::SYN_SENT;
        ev.bytes_acked = 0;
        ev.bytes_received = 0;
        let s = decode(&bytes_of(&ev)).unwrap().sock.unwrap();
        assert_eq!((s.bytes_sent, s.bytes_received), (0, 0));
    }

    #[test]
    fn full_length_comm_has_no_nul() {
        let mut ev = sample_event();
        ev.comm = *b"0123456789abcdef";
        let t = decode(&bytes_of(&ev)).unwrap();
        assert_eq!(t.owner.unwrap().comm, b"0123456789abcdef");
    }

    #[test]
    fn rejects_bad_records() {
        let good = bytes_of(&sample_event());
        assert!(decode(&good[..EVENT_SIZE - 1]).is_err());
        assert!(decode(&[]).is_err());
        let mut ev = sample_event();
        ev.family = 99;
        assert!(decode(&bytes_of(&ev)).is_err());
        let mut ev = sample_event();
        ev.new_state = 13;
        assert!(decode(&bytes_of(&ev)).is_err());
    }

    #[test]
    fn state_names_match_the_kernel() {
        let names: Vec<_> = (1..=12).map(|s| TcpState(s).name()).collect();
        assert_eq!(
            names,
            [
                "ESTABLISHED",
                "SYN_SENT",
                "SYN_RECV",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE",
                "CLOSE_WAIT",
                "LAST_ACK",
                "LISTEN",
                "CLOSING",
                "NEW_SYN_RECV"
            ]
        );
        assert_eq!(TcpState(0).name(), "UNKNOWN");
        assert_eq!(TcpState::from_name("CLOSE_WAIT"), Some(TcpState(8)));
        assert_eq!(TcpState::from_name("close_wait"), None);
    }
}
