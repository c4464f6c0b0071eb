//! `tcp-trace doctor`: watches for a while, then names the classic TCP
//! pathologies it saw, each with its owner, its evidence, why it happens and
//! what to change.
//!
//! The figures come from the other commands' own logic: connections followed
//! to their close (`life`), handshakes (`handshake`), TIME_WAIT confirmed
//! against the kernel's table (`timewait`'s tracker), CLOSE_WAIT followed as
//! `serve` does and checked against the kernel's table at the end. Sockets
//! already in CLOSE_WAIT when the run starts come from the start-up scan.

mod evidence;
mod report;
mod rules;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::Result;
use tcp_trace_common::Filter;

use super::{
    handshake::{handshake, Side},
    life::{Connections, Ending, Life},
    serve::CloseWaits,
    timewait::{remote_key, RemoteKey, Tracker},
};
use crate::{
    aggregate::{BoundedGroups, Group},
    cli::DoctorConfig,
    model::{family, Owner, OwnerSource, TcpState, Transition},
    output::{monotonic_ns, Sink},
    source::{self, Consumer, Timing, Totals},
    system::{
        cgroup::{placement_of, proc_cgroup},
        netstat, owners,
        sock_diag::{self, Endpoints},
        sysctl::{read_ipv4, read_timewait_sysctls},
    },
};
use evidence::{step, CloseWaitPile, Evidence, PeerFigures, Settings};
pub use evidence::{Thresholds, TimewaitPressure};

/// Owner and remote end pairs followed apart; later ones are not diagnosed.
const PEERS: usize = 4096;

/// Sysctls the explanations quote.
const SYSCTLS: [&str; 9] = [
    "ip_local_port_range",
    "tcp_tw_reuse",
    "tcp_timestamps",
    "tcp_syn_retries",
    "tcp_synack_retries",
    "tcp_fin_timeout",
    "tcp_keepalive_time",
    "tcp_keepalive_intvl",
    "tcp_keepalive_probes",
];

/// A process by pid and name, the key of its rows.
type ProcessKey = Option<(u32, Vec<u8>)>;

fn process_key(owner: Option<&Owner>) -> ProcessKey {
    owner.map(|o| (o.pid, o.comm.clone()))
}

struct Doctor {
    thresholds: Thresholds,
    sink: Sink,
    tracker: Tracker,
    connections: Connections,
    close_waits: CloseWaits,
    /// Sockets in CLOSE_WAIT when the run started, with their owners where
    /// the scan found them; they leave when seen leaving, or at the end when
    /// the kernel no longer lists them.
    close_waits_before: HashMap<Endpoints, Option<Owner>>,
    peers: BoundedGroups<(ProcessKey, RemoteKey), PeerFigures>,
    /// Connects in progress: since when, and toward where.
    connecting: HashMap<u64, (u64, Transition)>,
    ephemeral: (u16, u16),
    /// Sockets followed at most (`--max-sockets`).
    capacity: usize,
    started_ns: u64,
    counters_at_start: Option<netstat::Counters>,
}

impl Doctor {
    fn peer(&mut self, owner: Option<&Owner>, remote: RemoteKey) -> &mut PeerFigures {
        let figures = self.peers.entry((process_key(owner), remote));
        if figures.owner.is_none() {
            figures.owner = owner.cloned();
        }
        figures
    }

    fn handshake(&mut self, t: &Transition) {
        let Some(h) = handshake(t) else { return };
        let retransmits = u64::from(h.retransmits.unwrap_or(0));
        match h.side {
            Side::Client => {
                let p = self.peer(h.owner.as_ref(), (h.raddr, Some(h.rport)));
                match h.outcome.as_str() {
                    "refused" => p.refused += 1,
                    "timeout" => p.timed_out += 1,
                    "established" => {
                        p.client_handshakes += 1;
                        if retransmits > 0 {
                            p.syn_retransmitted += 1;
                            p.syn_retransmits += retransmits;
                            if let Some(d) = h.duration_ns {
                                p.syn_steps[step(d)] += 1;
                            }
                        }
                    }
                    _ => {}
                }
            }
            Side::Server => {
                let p = self.peer(h.owner.as_ref(), (h.raddr, None));
                p.server_handshakes += 1;
                if retransmits > 0 {
                    p.synack_retransmitted += 1;
                    p.synack_retransmits += retransmits;
                }
            }
        }
    }

    /// Connects enter SYN_SENT knowing their remote end (the local port
    /// comes later); bounded as the connections followed are.
    fn follow_connect(&mut self, t: &Transition) {
        if t.old_state == TcpState::SYN_SENT {
            self.connecting.remove(&t.sk);
        }
        if t.is(TcpState::CLOSE, TcpState::SYN_SENT) && self.connecting.len() < self.capacity {
            self.connecting.insert(t.sk, (t.ts_ns, t.clone()));
        }
    }

    /// Connects still in SYN_SENT at `now_ns` for a second or more.
    fn count_still_connecting(&mut self, now_ns: u64) {
        let stalled: Vec<Transition> = self
            .connecting
            .values()
            .filter(|(since, _)| now_ns.saturating_sub(*since) >= 1_000_000_000)
            .map(|(_, t)| t.clone())
            .collect();
        for t in stalled {
            self.peer(t.owner.as_ref(), (t.raddr, Some(t.rport)))
                .still_connecting += 1;
        }
    }

    fn life(&mut self, life: &Life) {
        let opened = life.states.first().map(|s| s.0);
        let remote = match opened {
            Some(TcpState::SYN_SENT) => (life.t.raddr, Some(life.t.rport)),
            Some(TcpState::SYN_RECV) => (life.t.raddr, None),
            _ => remote_key(&Endpoints::of(&life.t), self.ephemeral),
        };
        let th = self.thresholds;
        let p = self.peer(life.owner.as_ref(), remote);
        if life.ending == Ending::Reset {
            p.resets += 1;
        }
        if life.ending == Ending::TimedOut && life.t.old_state == TcpState::ESTABLISHED {
            p.established_timeouts += 1;
        }
        for (state, d) in &life.states {
            let Some(d) = d.filter(|d| *d >= th.half_closed_age_ns) else {
                continue;
            };
            match *state {
                TcpState::FIN_WAIT2 => {
                    p.fin_wait2_long += 1;
                    p.fin_wait2_max_ns = p.fin_wait2_max_ns.max(d);
                }
                TcpState::LAST_ACK => {
                    p.last_ack_long += 1;
                    p.last_ack_max_ns = p.last_ack_max_ns.max(d);
                }
                _ => {}
            }
        }
        // Only whole connections this process opened: the fix is the client's.
        if opened != Some(TcpState::SYN_SENT) || !life.complete {
            return;
        }
        p.opened_closed += 1;
        let bytes = life.t.sock.map(|s| s.bytes_sent + s.bytes_received);
        if life.lifetime_ns < th.short_lifetime_ns && bytes.is_some_and(|b| b < th.short_bytes) {
            p.short += 1;
            p.short_life_ns += life.lifetime_ns;
            p.short_bytes += bytes.unwrap_or(0);
            p.short_setup_ns += life
                .states
                .iter()
                .filter(|(s, _)| *s != TcpState::ESTABLISHED)
                .filter_map(|(_, d)| *d)
                .sum::<u64>();
        }
    }

    /// Each process's CLOSE_WAIT sockets at `now_ns`, checked against the
    /// kernel's table (`listed`, the agent's namespace).
    fn close_wait_piles(
        &mut self,
        listed: &HashSet<Endpoints>,
        taken_ns: u64,
    ) -> Vec<CloseWaitPile> {
        let host = self.tracker.host_netns();
        self.close_waits.reconcile(host, listed, taken_ns);
        self.close_waits_before.retain(|e, _| listed.contains(e));
        let mut piles: HashMap<ProcessKey, CloseWaitPile> = HashMap::new();
        let mut add = |e: &Endpoints, owner: Option<&Owner>, age: u64, before: bool| {
            let pile = piles.entry(process_key(owner)).or_default();
            if pile.owner.is_none() {
                pile.owner = owner.cloned();
            }
            pile.sockets += 1;
            if age >= pile.oldest_ns {
                pile.oldest_ns = age;
                pile.oldest_is_lower_bound = before;
            }
            *pile.local_ports.entry(e.lport).or_default() += 1;
            *pile.peers.entry(e.raddr).or_default() += 1;
        };
        for (e, owner, entered) in self.close_waits.iter() {
            add(e, owner, taken_ns.saturating_sub(entered), false);
        }
        for (e, owner) in &self.close_waits_before {
            add(
                e,
                owner.as_ref(),
                taken_ns.saturating_sub(self.started_ns),
                true,
            );
        }
        let mut piles: Vec<CloseWaitPile> = piles.into_values().collect();
        piles.sort_by_key(|p| std::cmp::Reverse(p.sockets));
        piles
    }
}

impl Consumer for Doctor {
    fn start(&mut self) -> Result<()> {
        self.started_ns = monotonic_ns();
        self.tracker.start()
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        self.tracker.event(t);
        self.close_waits.event(t, self.tracker.host_netns());
        if t.old_state == TcpState::CLOSE_WAIT {
            self.close_waits_before.remove(&Endpoints::of(t));
        }
        self.follow_connect(t);
        self.handshake(t);
        for life in self.connections.event(t) {
            self.life(&life);
        }
        Ok(())
    }

    fn interval(&mut self, _now_ns: u64, _totals: &Totals) -> Result<()> {
        self.tracker.apply_pending()
    }

    fn finish(&mut self, totals: &Totals) -> Result<()> {
        let taken = self.tracker.finish()?;
        self.count_still_connecting(taken);
        let listed: HashSet<Endpoints> = sock_diag::close_wait_sockets()?.into_iter().collect();
        let ephemeral = read_timewait_sysctls().port_range.unwrap_or(self.ephemeral);
        let peers = self
            .peers
            .ranked(usize::MAX, |_| 0)
            .into_iter()
            .filter_map(|(group, figures)| match group {
                Group::Key((_, remote)) => Some((remote, figures)),
                Group::Other => None,
            })
            .collect();
        let evidence = Evidence {
            close_waits: self.close_wait_piles(&listed, taken),
            timewait: self.tracker.ledger.pressure_by_owner(ephemeral),
            peers,
            settings: Settings {
                values: SYSCTLS.iter().map(|&n| (n, read_ipv4(n))).collect(),
            },
        };
        let findings = rules::diagnose(&evidence, &self.thresholds);
        let counters = match (&self.counters_at_start, netstat::read()) {
            (Some(start), Ok(end)) => Some(end.growth(start, netstat::CONTEXT.map(|c| c.0))),
            _ => None,
        };
        let run = report::Run {
            watched_ns: taken.saturating_sub(self.started_ns),
            received: totals.received,
            dropped: totals.dropped(),
            counters,
        };
        let th = &self.thresholds;
        self.sink.report(
            || report::json(&findings, &run, th),
            |_| report::text(&findings, &run, th),
        )
    }
}

/// Sockets in CLOSE_WAIT before the run, with the processes holding them,
/// as far as `filter` lets them through. A failed scan is a warning.
fn close_waits_at_start(filter: &Filter) -> HashMap<Endpoints, Option<Owner>> {
    let scan = match owners::scan() {
        Ok(scan) => scan,
        Err(err) => {
            eprintln!("tcp-trace: warning: sockets already in CLOSE_WAIT stay unknown: {err:#}");
            return HashMap::new();
        }
    };
    scan.connections
        .into_iter()
        .filter(|o| o.socket.state == tcp_trace_common::state::CLOSE_WAIT)
        .filter(|o| {
            let e = &o.socket.endpoints;
            filter.matches(family(e.laddr), e.lport, e.rport, Some(o.holder.pid))
        })
        .map(|o| {
            let mut owner =
                Owner::process(o.holder.pid, o.holder.comm.as_bytes(), OwnerSource::Scan);
            owner.placement = proc_cgroup(o.holder.pid)
                .ok()
                .flatten()
                .map(|path| placement_of(&path).into());
            (o.socket.endpoints, Some(owner))
        })
        .collect()
}

pub fn run(config: DoctorConfig) -> Result<()> {
    let filter = config.tracing.filter;
    let tracker = Tracker::new(filter)?;
    let ephemeral = read_timewait_sysctls().port_range.unwrap_or((32768, 60999));
    // Taken with full privileges, before attaching drops them. Under
    // --cgroup the scan's owners cannot be placed against it: left out.
    let close_waits_before = if config.tracing.cgroup.is_none() {
        close_waits_at_start(&filter)
    } else {
        HashMap::new()
    };
    let counters_at_start = netstat::read()
        .inspect_err(|err| eprintln!("tcp-trace: warning: no kernel counters for context: {err:#}"))
        .ok();
    let max_sockets = config.tracing.max_sockets as usize;
    let mut doctor = Doctor {
        thresholds: config.thresholds,
        sink: Sink::stdout(config.json),
        tracker,
        connections: Connections::new(max_sockets),
        close_waits: CloseWaits::new(max_sockets),
        close_waits_before,
        peers: BoundedGroups::with_capacity(PEERS),
        connecting: HashMap::new(),
        capacity: max_sockets,
        ephemeral,
        started_ns: monotonic_ns(),
        counters_at_start,
    };
    let timing = Timing {
        duration: config.tracing.duration,
        // The tracker's readings of the timewait table arrive every second.
        interval: Some(Duration::from_secs(1)),
    };
    source::block_on(source::live(
        &config.tracing.streaming(),
        timing,
        &mut doctor,
    ))
}
