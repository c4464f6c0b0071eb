//! Completing passively opened sockets' first transitions. On kernels up to
//! at least 6.12 a new child socket's `LISTEN -> SYN_RECV` fires before the
//! kernel copies the peer's address and port into it (and, under a wildcard
//! listener, its own address): the event shows `0.0.0.0:0`. The socket's
//! next transition, `SYN_RECV -> ESTABLISHED` in the same softirq (or
//! `-> CLOSE` when the child is dropped), carries both. So such a first
//! transition waits for that one, takes its addresses, and is passed on
//! just before it.

use std::collections::HashMap;

use anyhow::Result;
use tcp_trace_common::{peer_not_set, Filter};

use crate::model::{TcpState, Transition};

/// How long a first transition waits for its socket's next one before it is
/// passed on as it came (its next one was lost, or never came).
pub const WAIT_NS: u64 = 1_000_000_000;

/// Transitions waiting at once; past it, new ones are passed on as they came.
const WAITING: usize = 65_536;

/// First transitions waiting for their peer, by socket.
#[derive(Debug, Default)]
pub struct Peers {
    waiting: HashMap<u64, Transition>,
}

impl Peers {
    /// Passes `t` to `out`, first completing and passing on the transition
    /// of the same socket that waited for it. A first transition without its
    /// peer waits instead. `filter` is the user's, which the kernel applied
    /// to waiting ones on their local end only.
    pub fn pass(
        &mut self,
        t: Transition,
        filter: &Filter,
        out: &mut impl FnMut(&Transition) -> Result<()>,
    ) -> Result<()> {
        if let Some(mut first) = self.waiting.remove(&t.sk) {
            // The child's next transition is out of SYN_RECV. Any other
            // means its next was lost and this is a later socket at the
            // same address: the first is passed on as it came.
            if t.old_state == TcpState::SYN_RECV && !t.accept {
                first.laddr = t.laddr;
                first.raddr = t.raddr;
                first.rport = t.rport;
            }
            if first.passes(filter) {
                out(&first)?;
            }
        }
        if !t.accept
            && peer_not_set(t.old_state.0, t.new_state.0, t.rport)
            && self.waiting.len() < WAITING
        {
            self.waiting.insert(t.sk, t);
            return Ok(());
        }
        out(&t)
    }

    /// Passes on, as they came, the transitions that waited since before
    /// `now_ns - WAIT_NS`; all of them with `None` (the end of a run). Those
    /// a remote clause of `filter` rejects without their peer are dropped:
    /// under such a filter the kernel streams no next transition for the
    /// sockets it rejects, so theirs never complete.
    pub fn release(
        &mut self,
        now_ns: Option<u64>,
        filter: &Filter,
        out: &mut impl FnMut(&Transition) -> Result<()>,
    ) -> Result<()> {
        let due = |t: &Transition| now_ns.is_none_or(|now| t.ts_ns.saturating_add(WAIT_NS) <= now);
        let mut released: Vec<Transition> = Vec::new();
        self.waiting.retain(|_, t| {
            if due(t) {
                released.push(t.clone());
                false
            } else {
                true
            }
        });
        released.sort_by_key(|t| t.ts_ns);
        released
            .iter()
            .filter(|t| t.passes(filter))
            .try_for_each(out)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn transition(sk: u64, ts_ns: u64, old: TcpState, new: TcpState, rport: u16) -> Transition {
        let addr = |last| {
            if rport == 0 {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
            }
        };
        Transition {
            ts_ns,
            sk,
            owner: None,
            accept: false,
            netns: None,
            laddr: addr(1),
            lport: 80,
            raddr: addr(2),
            rport,
            old_state: old,
            new_state: new,
            duration_ns: None,
            sock: None,
            retransmits: None,
            handshake_ns: None,
        }
    }

    /// Transitions as `(socket, time, old, new, remote port)`.
    type Steps<'a> = &'a [(u64, u64, TcpState, TcpState, u16)];

    fn collect(peers: &mut Peers, filter: &Filter, steps: Steps) -> Vec<Transition> {
        let mut seen = Vec::new();
        for &(sk, ts_ns, old, new, rport) in steps {
            peers
                .pass(transition(sk, ts_ns, old, new, rport), filter, &mut |t| {
                    seen.push(t.clone());
                    Ok(())
                })
                .unwrap();
        }
        seen
    }

    fn released(peers: &mut Peers, now_ns: Option<u64>, filter: &Filter) -> Vec<Transition> {
        let mut seen = Vec::new();
        peers
            .release(now_ns, filter, &mut |t| {
                seen.push(t.clone());
                Ok(())
            })
            .unwrap();
        seen
    }

    #[test]
    fn a_first_transition_without_its_peer_takes_the_next_ones_addresses() {
        let mut peers = Peers::default();
        let seen = collect(
            &mut peers,
            &Filter::default(),
            &[
                (1, 10, TcpState::LISTEN, TcpState::SYN_RECV, 0),
                (2, 11, TcpState::CLOSE, TcpState::SYN_SENT, 443),
                (1, 12, TcpState::SYN_RECV, TcpState::ESTABLISHED, 5000),
            ],
        );
        let order: Vec<(u64, u64)> = seen.iter().map(|t| (t.sk, t.ts_ns)).collect();
        assert_eq!(order, [(2, 11), (1, 10), (1, 12)]);
        let first = &seen[1];
        assert!(first.is(TcpState::LISTEN, TcpState::SYN_RECV));
        assert_eq!(first.rport, 5000);
        assert_eq!(first.raddr, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(first.laddr, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(peers.waiting.is_empty());
    }

    #[test]
    fn the_remote_filter_applies_once_the_peer_is_known() {
        let mut peers = Peers::default();
        let filter = Filter {
            rport: 6000,
            ..Filter::default()
        };
        // The kernel lets both first transitions through on their local
        // end, and of the next ones only the second socket's (remote port
        // 6000), so the first socket's never completes.
        let mut seen = collect(
            &mut peers,
            &filter,
            &[
                (1, 10, TcpState::LISTEN, TcpState::SYN_RECV, 0),
                (2, 11, TcpState::LISTEN, TcpState::SYN_RECV, 0),
                (2, 13, TcpState::SYN_RECV, TcpState::ESTABLISHED, 6000),
            ],
        );
        seen.extend(released(&mut peers, None, &filter));
        let order: Vec<(u64, u64)> = seen.iter().map(|t| (t.sk, t.ts_ns)).collect();
        assert_eq!(order, [(2, 11), (2, 13)]);
        assert!(peers.waiting.is_empty());
    }

    #[test]
    fn a_first_transition_whose_next_never_comes_is_released_as_it_came() {
        let mut peers = Peers::default();
        let seen = collect(
            &mut peers,
            &Filter::default(),
            &[
                (1, 10, TcpState::LISTEN, TcpState::SYN_RECV, 0),
                (2, 500_000_000, TcpState::LISTEN, TcpState::SYN_RECV, 0),
            ],
        );
        assert!(seen.is_empty());
        let all = Filter::default();
        let mut release = |now_ns| -> Vec<u64> {
            let times = released(&mut peers, now_ns, &all);
            times.iter().map(|t| t.ts_ns).collect()
        };
        assert!(release(Some(10 + WAIT_NS - 1)).is_empty());
        assert_eq!(release(Some(10 + WAIT_NS)), [10]);
        assert_eq!(release(None), [500_000_000]);
        assert!(peers.waiting.is_empty());
    }

    #[test]
    fn a_later_socket_at_the_same_address_does_not_complete_the_first() {
        let mut peers = Peers::default();
        // The first child's next transitions were lost; its address was
        // reused by a second child, and then by a client.
        let seen = collect(
            &mut peers,
            &Filter::default(),
            &[
                (1, 10, TcpState::LISTEN, TcpState::SYN_RECV, 0),
                (1, 20, TcpState::LISTEN, TcpState::SYN_RECV, 0),
                (1, 30, TcpState::CLOSE, TcpState::SYN_SENT, 443),
            ],
        );
        let order: Vec<(u64, u16)> = seen.iter().map(|t| (t.ts_ns, t.rport)).collect();
        assert_eq!(order, [(10, 0), (20, 0), (30, 443)]);
        assert!(peers.waiting.is_empty());
    }

    #[test]
    fn transitions_with_their_peer_pass_straight_through() {
        let mut peers = Peers::default();
        let seen = collect(
            &mut peers,
            &Filter::default(),
            &[
                (1, 10, TcpState::LISTEN, TcpState::SYN_RECV, 5000),
                (1, 12, TcpState::SYN_RECV, TcpState::ESTABLISHED, 5000),
            ],
        );
        assert_eq!(seen.len(), 2);
        assert!(peers.waiting.is_empty());
    }
}
