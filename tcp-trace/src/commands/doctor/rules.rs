//! The diagnoses: figures gathered during the run in, findings out. Pure
//! logic, tested without the kernel.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::evidence::{Evidence, PeerFigures, Thresholds, STEPS};
use crate::{
    commands::timewait::RemoteKey,
    model::Owner,
    output::text::{endpoint, human_duration},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// The rules in the order findings are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    CloseWait,
    TimeWait,
    ConnectFailures,
    SlowHandshakes,
    Resets,
    ShortConnections,
    HalfClosed,
    KeepaliveTimeouts,
}

impl Rule {
    pub const ALL: [Rule; 8] = [
        Rule::CloseWait,
        Rule::TimeWait,
        Rule::ConnectFailures,
        Rule::SlowHandshakes,
        Rule::Resets,
        Rule::ShortConnections,
        Rule::HalfClosed,
        Rule::KeepaliveTimeouts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::CloseWait => "close-wait",
            Rule::TimeWait => "time-wait",
            Rule::ConnectFailures => "connect-failures",
            Rule::SlowHandshakes => "slow-handshakes",
            Rule::Resets => "resets",
            Rule::ShortConnections => "short-connections",
            Rule::HalfClosed => "half-closed",
            Rule::KeepaliveTimeouts => "keepalive-timeouts",
        }
    }

    /// What the rule checks, for the healthy report.
    pub fn checks(self, th: &Thresholds) -> String {
        match self {
            Rule::CloseWait => format!(
                "no process holds {} or more sockets in CLOSE_WAIT, nor one for {} or more",
                th.close_wait_sockets,
                human_duration(th.close_wait_age_ns)
            ),
            Rule::TimeWait => format!(
                "no remote endpoint holds {:.0}% or more of the ephemeral port range in TIME_WAIT",
                th.timewait_share * 100.0
            ),
            Rule::ConnectFailures => format!(
                "fewer than {} refused, timed-out or still retrying connects toward each endpoint",
                th.connect_failures
            ),
            Rule::SlowHandshakes => format!(
                "{} handshakes with SYN or SYN-ACK retransmissions toward any endpoint",
                fewer_than(th.retransmitted_handshakes)
            ),
            Rule::Resets => format!("fewer than {} resets from each remote endpoint", th.resets),
            Rule::ShortConnections => format!(
                "fewer than {} connections to one endpoint living under {} with under {} bytes",
                th.short_connections,
                human_duration(th.short_lifetime_ns),
                th.short_bytes
            ),
            Rule::HalfClosed => format!(
                "no connection stayed {} or more in FIN_WAIT2 or LAST_ACK",
                human_duration(th.half_closed_age_ns)
            ),
            Rule::KeepaliveTimeouts => format!(
                "{} established connections toward any endpoint ended timed out",
                fewer_than(th.keepalive_timeouts)
            ),
        }
    }
}

/// `no` for a threshold of 1, `fewer than N` otherwise.
fn fewer_than(n: u64) -> String {
    match n {
        1 => "no".to_string(),
        n => format!("fewer than {n}"),
    }
}

/// One diagnosis, with its evidence.
#[derive(Clone, Debug)]
pub struct Finding {
    pub rule: Rule,
    pub severity: Severity,
    pub owner: Option<Owner>,
    /// The remote end (`addr:port`, or an address for a server's clients).
    pub remote: Option<String>,
    /// Named figures, in the order shown.
    pub evidence: Vec<(&'static str, Value)>,
    pub why: &'static str,
    pub fix: &'static str,
}

fn remote_name((addr, port): RemoteKey) -> String {
    match port {
        Some(p) => endpoint(addr, p),
        None => addr.to_string(),
    }
}

fn seconds(ns: u64) -> Value {
    json!((ns as f64 / 1e7).round() / 100.0)
}

/// The busiest entries of a count map, as `key (n)` strings.
fn busiest<K: ToString>(counts: &BTreeMap<K, u64>, n: usize) -> Value {
    let mut v: Vec<(&K, &u64)> = counts.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    json!(v
        .into_iter()
        .take(n)
        .map(|(k, c)| format!("{} ({c})", k.to_string()))
        .collect::<Vec<_>>())
}

/// Every rule over the evidence, findings in rule order, worst first.
pub fn diagnose(ev: &Evidence, th: &Thresholds) -> Vec<Finding> {
    let mut out = Vec::new();
    close_wait(ev, th, &mut out);
    time_wait(ev, th, &mut out);
    for (remote, p) in &ev.peers {
        per_peer(*remote, p, ev, th, &mut out);
    }
    out.sort_by(|a, b| a.rule.cmp(&b.rule).then(b.severity.cmp(&a.severity)));
    out
}

fn close_wait(ev: &Evidence, th: &Thresholds, out: &mut Vec<Finding>) {
    for pile in &ev.close_waits {
        let many = pile.sockets >= th.close_wait_sockets;
        let old = pile.oldest_ns >= th.close_wait_age_ns;
        if !many && !old {
            continue;
        }
        let bound = if pile.oldest_is_lower_bound { ">=" } else { "" };
        out.push(Finding {
            rule: Rule::CloseWait,
            severity: if many && old {
                Severity::Critical
            } else {
                Severity::Warning
            },
            owner: pile.owner.clone(),
            remote: None,
            evidence: vec![
                ("sockets_in_close_wait", json!(pile.sockets)),
                (
                    "oldest",
                    json!(format!("{bound}{}", human_duration(pile.oldest_ns))),
                ),
                ("oldest_s", seconds(pile.oldest_ns)),
                ("oldest_is_lower_bound", json!(pile.oldest_is_lower_bound)),
                ("local_ports", busiest(&pile.local_ports, 3)),
                ("peers", busiest(&pile.peers, 3)),
            ],
            why: "The peer closed its side (its FIN arrived) and the kernel acknowledged it, \
                  but this process never called close() on the socket: CLOSE_WAIT lasts until \
                  it does, holding a descriptor and memory.",
            fix: "Close the connection when a read returns 0 (end of stream), on every path, \
                  errors included; check connection pools return and close dead connections.",
        });
    }
}

fn time_wait(ev: &Evidence, th: &Thresholds, out: &mut Vec<Finding>) {
    for p in &ev.timewait {
        if p.share < th.timewait_share {
            continue;
        }
        out.push(Finding {
            rule: Rule::TimeWait,
            severity: if p.share >= 0.5 {
                Severity::Critical
            } else {
                Severity::Warning
            },
            owner: p.owner.clone(),
            remote: Some(endpoint(p.raddr, p.rport)),
            evidence: vec![
                ("sockets_in_time_wait", json!(p.sockets)),
                (
                    "share_of_ephemeral_ports",
                    json!((p.share * 1000.0).round() / 1000.0),
                ),
                (
                    "ip_local_port_range",
                    ev.settings.get("ip_local_port_range"),
                ),
                ("tcp_tw_reuse", ev.settings.get("tcp_tw_reuse")),
                ("tcp_timestamps", ev.settings.get("tcp_timestamps")),
            ],
            why: "TIME_WAIT forms only on the side that closes first and lasts 60 s on Linux; \
                  each socket in it keeps its local port from being reused toward the same \
                  remote endpoint, so this process closing first at this rate exhausts the \
                  ephemeral ports it can use there.",
            fix: "Reuse connections (keep-alive, a pool) or let the peer close first. \
                  tcp_tw_reuse=1 lets new outgoing connects reuse a TIME_WAIT port when TCP \
                  timestamps are on (2, the default, does so for loopback only); it never \
                  helps incoming connections. tcp_tw_recycle no longer exists (removed in 4.12).",
        });
    }
}

fn per_peer(
    remote: RemoteKey,
    p: &PeerFigures,
    ev: &Evidence,
    th: &Thresholds,
    out: &mut Vec<Finding>,
) {
    let finding = |rule, severity, evidence, why, fix| Finding {
        rule,
        severity,
        owner: p.owner.clone(),
        remote: Some(remote_name(remote)),
        evidence,
        why,
        fix,
    };
    let unanswered = p.timed_out + p.still_connecting;
    if p.refused + unanswered >= th.connect_failures {
        let (why, fix) = if p.refused >= unanswered {
            (
                "The remote host answered the SYN with a reset: nothing listens on that port \
                 (or a firewall rejects with a reset).",
                "Check the service is running and listening on that address and port, and the \
                 client's configured endpoint; retries only add load.",
            )
        } else {
            (
                "No answer to the SYN and its retransmissions: the packets are dropped on the \
                 way (a firewall, a security group, a host down) rather than refused.",
                "Check filters and routes toward the endpoint; lower the client's connect \
                 timeout (tcp_syn_retries, or TCP_SYNCNT per socket) so failures surface fast.",
            )
        };
        out.push(finding(
            Rule::ConnectFailures,
            Severity::Critical,
            vec![
                ("refused", json!(p.refused)),
                ("timed_out", json!(p.timed_out)),
                ("still_connecting", json!(p.still_connecting)),
                ("tcp_syn_retries", ev.settings.get("tcp_syn_retries")),
            ],
            why,
            fix,
        ));
    }
    if p.syn_retransmitted >= th.retransmitted_handshakes {
        let steps: serde_json::Map<String, Value> = STEPS
            .iter()
            .zip(p.syn_steps)
            .filter(|(_, n)| *n > 0)
            .map(|((name, _), n)| (name.to_string(), json!(n)))
            .collect();
        out.push(finding(
            Rule::SlowHandshakes,
            Severity::Warning,
            vec![
                ("client_handshakes", json!(p.client_handshakes)),
                ("with_syn_retransmissions", json!(p.syn_retransmitted)),
                ("syn_retransmissions", json!(p.syn_retransmits)),
                ("handshake_time_steps", Value::Object(steps)),
            ],
            "A SYN went unanswered and was sent again when the retransmission timer fired: \
             1 s after the first, then 3 s, 7 s: connects then take about 1 s or 3 s. Either \
             packets are lost, or the peer's SYN backlog or accept queue is full and it drops SYNs.",
            "Check loss on the path, and the peer's ListenOverflows/ListenDrops counters and \
             its listen() backlog (somaxconn, tcp_max_syn_backlog); make the server accept faster.",
        ));
    }
    if p.synack_retransmitted >= th.retransmitted_handshakes {
        out.push(finding(
            Rule::SlowHandshakes,
            Severity::Warning,
            vec![
                ("server_handshakes", json!(p.server_handshakes)),
                ("with_synack_retransmissions", json!(p.synack_retransmitted)),
                ("synack_retransmissions", json!(p.synack_retransmits)),
                ("tcp_synack_retries", ev.settings.get("tcp_synack_retries")),
            ],
            "This server's SYN-ACK was sent again because the client's final ACK did not \
             arrive within the retransmission timeout (1 s, then doubling): the connection \
             waits as a half-open request meanwhile.",
            "Look for loss on the path back from the clients, or a filter dropping their ACKs.",
        ));
    }
    if p.resets >= th.resets {
        out.push(finding(
            Rule::Resets,
            Severity::Warning,
            vec![("resets", json!(p.resets))],
            "The peer answered with a reset: it aborted the connection (closed with unread \
             data, SO_LINGER 0, or crashed), or no longer knew it (restarted, a middlebox \
             timed it out).",
            "Find why the peer aborts (its logs, its idle timeouts); a client should not \
             write on connections the server already closed: check idle timeouts agree.",
        ));
    }
    if p.short >= th.short_connections {
        let share = p.short_setup_ns as f64 / p.short_life_ns.max(1) as f64;
        out.push(finding(
            Rule::ShortConnections,
            Severity::Warning,
            vec![
                ("connections_opened", json!(p.opened_closed)),
                ("short", json!(p.short)),
                (
                    "mean_lifetime",
                    json!(human_duration(p.short_life_ns / p.short)),
                ),
                ("mean_bytes", json!(p.short_bytes / p.short)),
                (
                    "share_in_handshake_and_close",
                    json!((share * 1000.0).round() / 1000.0),
                ),
            ],
            "Each connection lives a few round trips and carries little: the handshake and \
             the close cost as much as the exchange, and every one closed first here leaves a \
             TIME_WAIT socket for 60 s.",
            "Keep connections open and reuse them: HTTP/1.1 keep-alive, a client connection \
             pool, and a server keep-alive timeout longer than the client's idle time.",
        ));
    }
    if p.fin_wait2_long + p.last_ack_long > 0 {
        out.push(finding(
            Rule::HalfClosed,
            Severity::Warning,
            vec![
                ("long_fin_wait2", json!(p.fin_wait2_long)),
                (
                    "longest_fin_wait2",
                    json!(human_duration(p.fin_wait2_max_ns)),
                ),
                ("long_last_ack", json!(p.last_ack_long)),
                ("longest_last_ack", json!(human_duration(p.last_ack_max_ns))),
                ("tcp_fin_timeout", ev.settings.get("tcp_fin_timeout")),
            ],
            "FIN_WAIT2: this side sent its FIN and the peer acknowledged it but has not sent \
             its own: the peer application has not closed. LAST_ACK: this side answered the \
             peer's FIN with its own and no acknowledgement came back: the peer is gone or \
             the path drops. A socket closed by its process stays in FIN_WAIT2 at most \
             tcp_fin_timeout; one still open (after shutdown()) stays until the peer closes.",
            "Make the peer close its side when it reads end of stream; after shutdown(), \
             bound the wait for the peer's close with a timeout of the application's own.",
        ));
    }
    if p.established_timeouts >= th.keepalive_timeouts {
        out.push(finding(
            Rule::KeepaliveTimeouts,
            Severity::Warning,
            vec![
                (
                    "established_connections_timed_out",
                    json!(p.established_timeouts),
                ),
                ("tcp_keepalive_time", ev.settings.get("tcp_keepalive_time")),
                (
                    "tcp_keepalive_intvl",
                    ev.settings.get("tcp_keepalive_intvl"),
                ),
                (
                    "tcp_keepalive_probes",
                    ev.settings.get("tcp_keepalive_probes"),
                ),
            ],
            "Established connections ended with ETIMEDOUT: keep-alive probes (or \
             retransmissions of data) went unanswered, so the peer vanished or something on \
             the path forgot the connection, typically a NAT or firewall whose idle timeout is \
             shorter than the keep-alive time (7200 s by default).",
            "Set the keep-alive time below the middlebox's idle timeout (per socket: \
             TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT; host-wide: the sysctls shown), or \
             have the application send its own heartbeats.",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::evidence::{step, CloseWaitPile, TimewaitPressure};
    use super::*;
    use crate::model::OwnerSource;

    const S: u64 = 1_000_000_000;

    fn thresholds() -> Thresholds {
        Thresholds {
            close_wait_sockets: 5,
            close_wait_age_ns: 60 * S,
            timewait_share: 0.1,
            connect_failures: 3,
            retransmitted_handshakes: 1,
            resets: 5,
            short_connections: 100,
            short_lifetime_ns: S / 10,
            short_bytes: 16 * 1024,
            half_closed_age_ns: 10 * S,
            keepalive_timeouts: 1,
        }
    }

    fn owner() -> Option<Owner> {
        Some(Owner::process(42, b"app", OwnerSource::Task))
    }

    fn remote() -> RemoteKey {
        ("10.0.0.1".parse().unwrap(), Some(443))
    }

    fn rules(ev: &Evidence) -> Vec<(Rule, Severity)> {
        diagnose(ev, &thresholds())
            .iter()
            .map(|f| (f.rule, f.severity))
            .collect()
    }

    #[test]
    fn healthy_figures_make_no_finding() {
        let peer = PeerFigures {
            owner: owner(),
            client_handshakes: 1000,
            opened_closed: 1000,
            short: 99,
            refused: 1,
            timed_out: 1,
            resets: 4,
            ..Default::default()
        };
        let ev = Evidence {
            close_waits: vec![CloseWaitPile {
                sockets: 4,
                oldest_ns: 59 * S,
                ..Default::default()
            }],
            timewait: vec![TimewaitPressure {
                owner: owner(),
                raddr: remote().0,
                rport: 443,
                sockets: 2000,
                share: 0.099,
            }],
            peers: vec![(remote(), peer)],
            ..Default::default()
        };
        assert_eq!(rules(&ev), vec![]);
    }

    #[test]
    fn each_rule_fires_at_its_threshold() {
        let mut peer = PeerFigures {
            owner: owner(),
            refused: 3,
            syn_retransmitted: 1,
            synack_retransmitted: 1,
            resets: 5,
            short: 100,
            short_life_ns: 100 * S / 1000,
            last_ack_long: 1,
            established_timeouts: 1,
            ..Default::default()
        };
        peer.syn_steps[step(S + S / 10)] = 1;
        let ev = Evidence {
            close_waits: vec![CloseWaitPile {
                sockets: 5,
                oldest_ns: 60 * S,
                ..Default::default()
            }],
            timewait: vec![TimewaitPressure {
                owner: owner(),
                raddr: remote().0,
                rport: 443,
                sockets: 20000,
                share: 0.7,
            }],
            peers: vec![(remote(), peer)],
            ..Default::default()
        };
        assert_eq!(
            rules(&ev),
            vec![
                (Rule::CloseWait, Severity::Critical),
                (Rule::TimeWait, Severity::Critical),
                (Rule::ConnectFailures, Severity::Critical),
                (Rule::SlowHandshakes, Severity::Warning),
                (Rule::SlowHandshakes, Severity::Warning),
                (Rule::Resets, Severity::Warning),
                (Rule::ShortConnections, Severity::Warning),
                (Rule::HalfClosed, Severity::Warning),
                (Rule::KeepaliveTimeouts, Severity::Warning),
            ]
        );
        let found = diagnose(&ev, &thresholds());
        let slow = &found[3].evidence;
        assert_eq!(slow[3], ("handshake_time_steps", json!({"~1s": 1})));
        assert_eq!(found[2].remote.as_deref(), Some("10.0.0.1:443"));
    }

    #[test]
    fn connect_failures_tell_refused_from_dropped() {
        let refused = PeerFigures {
            refused: 3,
            ..Default::default()
        };
        let dropped = PeerFigures {
            timed_out: 3,
            ..Default::default()
        };
        let ev = |p: PeerFigures| Evidence {
            peers: vec![(remote(), p)],
            ..Default::default()
        };
        let retrying = PeerFigures {
            timed_out: 1,
            still_connecting: 2,
            refused: 2,
            ..Default::default()
        };
        let why = |p| diagnose(&ev(p), &thresholds())[0].why;
        assert!(why(refused).contains("reset"));
        assert!(why(dropped).contains("dropped"));
        assert!(
            why(retrying).contains("dropped"),
            "3 unanswered against 2 refused"
        );
    }

    #[test]
    fn time_wait_advice_never_suggests_recycle() {
        let ev = Evidence {
            timewait: vec![TimewaitPressure {
                owner: owner(),
                raddr: remote().0,
                rport: 443,
                sockets: 5000,
                share: 0.2,
            }],
            ..Default::default()
        };
        let f = &diagnose(&ev, &thresholds())[0];
        assert!(f.fix.contains("outgoing") && f.fix.contains("loopback"));
        assert!(f.fix.contains("no longer exists"));
        assert_eq!(f.severity, Severity::Warning);
    }
}
