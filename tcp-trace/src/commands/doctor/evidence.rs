//! The figures a run gathers for the rules, and their thresholds.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::{json, Value};

use crate::{aggregate::Merge, commands::timewait::RemoteKey, model::Owner};

/// Thresholds, each a flag with its default (see `cli::DoctorArgs`).
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// CLOSE_WAIT sockets one process holds before it is a pile-up.
    pub close_wait_sockets: u64,
    /// Or: the age of its oldest CLOSE_WAIT socket.
    pub close_wait_age_ns: u64,
    /// Share of the ephemeral port range held in TIME_WAIT toward one endpoint.
    pub timewait_share: f64,
    /// Failed connects (refused or timed out) toward one endpoint.
    pub connect_failures: u64,
    /// Handshakes with a retransmitted SYN or SYN-ACK toward one endpoint.
    pub retransmitted_handshakes: u64,
    /// Connections reset by one remote endpoint.
    pub resets: u64,
    /// Short connections to one endpoint before suggesting reuse.
    pub short_connections: u64,
    /// A connection living less than this is short...
    pub short_lifetime_ns: u64,
    /// ...when it also carries fewer bytes than this (both ways).
    pub short_bytes: u64,
    /// A stay in FIN_WAIT2 or LAST_ACK this long is a half-closed connection.
    pub half_closed_age_ns: u64,
    /// Established connections ended by ETIMEDOUT toward one endpoint.
    pub keepalive_timeouts: u64,
}

/// What the run saw toward one remote end, for one owner.
#[derive(Clone, Debug, Default)]
pub struct PeerFigures {
    pub owner: Option<Owner>,
    /// Connects refused (RST to the SYN: nothing listening).
    pub refused: u64,
    /// Connects that timed out (SYNs unanswered: dropped or filtered).
    pub timed_out: u64,
    /// Connects still retrying their SYN at the end, for a second or more:
    /// a dropped SYN's connect outlasts a short run (about 127 s by default).
    pub still_connecting: u64,
    /// Client handshakes completed, and those with SYN retransmissions.
    pub client_handshakes: u64,
    pub syn_retransmitted: u64,
    pub syn_retransmits: u64,
    /// Retransmitted client handshakes by the time they took: the SYN timer
    /// starts at 1 s and doubles, so they complete near 1 s, 3 s, 7 s...
    pub syn_steps: [u64; STEPS.len()],
    /// Server handshakes completed, and those with SYN-ACK retransmissions.
    pub server_handshakes: u64,
    pub synack_retransmitted: u64,
    pub synack_retransmits: u64,
    /// Connections that ended in a reset from the peer.
    pub resets: u64,
    /// Connections we opened and saw whole, and the short ones among them.
    pub opened_closed: u64,
    pub short: u64,
    /// Of the short ones: total life, and the time spent in the handshake
    /// and the close.
    pub short_life_ns: u64,
    pub short_setup_ns: u64,
    pub short_bytes: u64,
    /// Stays in FIN_WAIT2 (our FIN acknowledged, the peer's not sent) and in
    /// LAST_ACK (our FIN after the peer's, unacknowledged) past the threshold.
    pub fin_wait2_long: u64,
    pub fin_wait2_max_ns: u64,
    pub last_ack_long: u64,
    pub last_ack_max_ns: u64,
    /// Established connections that ended with ETIMEDOUT.
    pub established_timeouts: u64,
}

/// Upper bounds (seconds) of the handshake time steps shown.
pub const STEPS: [(&str, f64); 4] = [("<1s", 1.0), ("~1s", 3.0), ("~3s", 7.0), (">=7s", f64::MAX)];

/// The step a retransmitted handshake's time falls in.
pub fn step(duration_ns: u64) -> usize {
    let s = duration_ns as f64 / 1e9;
    STEPS
        .iter()
        .position(|(_, below)| s < *below)
        .unwrap_or(STEPS.len() - 1)
}

impl Merge for PeerFigures {
    fn merge(&mut self, o: &PeerFigures) {
        if self.owner.is_none() {
            self.owner.clone_from(&o.owner);
        }
        self.refused += o.refused;
        self.timed_out += o.timed_out;
        self.still_connecting += o.still_connecting;
        self.client_handshakes += o.client_handshakes;
        self.syn_retransmitted += o.syn_retransmitted;
        self.syn_retransmits += o.syn_retransmits;
        for (a, b) in self.syn_steps.iter_mut().zip(o.syn_steps) {
            *a += b;
        }
        self.server_handshakes += o.server_handshakes;
        self.synack_retransmitted += o.synack_retransmitted;
        self.synack_retransmits += o.synack_retransmits;
        self.resets += o.resets;
        self.opened_closed += o.opened_closed;
        self.short += o.short;
        self.short_life_ns += o.short_life_ns;
        self.short_setup_ns += o.short_setup_ns;
        self.short_bytes += o.short_bytes;
        self.fin_wait2_long += o.fin_wait2_long;
        self.fin_wait2_max_ns = self.fin_wait2_max_ns.max(o.fin_wait2_max_ns);
        self.last_ack_long += o.last_ack_long;
        self.last_ack_max_ns = self.last_ack_max_ns.max(o.last_ack_max_ns);
        self.established_timeouts += o.established_timeouts;
    }
}

/// One process's sockets in CLOSE_WAIT at the end of the run.
#[derive(Clone, Debug, Default)]
pub struct CloseWaitPile {
    pub owner: Option<Owner>,
    pub sockets: u64,
    pub oldest_ns: u64,
    /// The oldest age is a lower bound: the socket was in CLOSE_WAIT at start.
    pub oldest_is_lower_bound: bool,
    /// Local ports and peer addresses, with their socket counts.
    pub local_ports: BTreeMap<u16, u64>,
    pub peers: BTreeMap<IpAddr, u64>,
}

/// Sockets in TIME_WAIT toward one remote endpoint, charged to one owner.
#[derive(Clone, Debug)]
pub struct TimewaitPressure {
    pub owner: Option<Owner>,
    pub raddr: IpAddr,
    pub rport: u16,
    pub sockets: u64,
    /// Of the ephemeral port range.
    pub share: f64,
}

/// Sysctl values the explanations quote (`?` when unreadable).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub values: BTreeMap<&'static str, String>,
}

impl Settings {
    pub fn get(&self, name: &str) -> Value {
        json!(self.values.get(name).map_or("?", String::as_str))
    }
}

/// Everything the rules look at.
#[derive(Debug, Default)]
pub struct Evidence {
    pub close_waits: Vec<CloseWaitPile>,
    pub timewait: Vec<TimewaitPressure>,
    pub peers: Vec<(RemoteKey, PeerFigures)>,
    pub settings: Settings,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn handshake_steps_follow_the_doubling_timer() {
        assert_eq!(step(S / 2), 0);
        assert_eq!(step(S + 5_000_000), 1);
        assert_eq!(step(3 * S + 5_000_000), 2);
        assert_eq!(step(15 * S), 3);
    }
}
