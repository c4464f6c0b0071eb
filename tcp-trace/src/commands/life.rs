//! `tcp-trace life`: one line per connection when it closes.

use std::{collections::HashMap, fmt::Write as _};

use anyhow::Result;
use serde_json::json;

use crate::{
    cli::LifeConfig,
    model::{
        errno::{self, ECONNREFUSED, ECONNRESET, EPIPE, ETIMEDOUT},
        Owner, SockFields, TcpState, Transition,
    },
    output::{
        add_owner_origin, owner_json,
        text::{endpoint, human_duration, owner_cells, ContainerColumn},
        Clock, Sink,
    },
    source::{self, Consumer, Timing, Totals},
};

/// A connection being followed from its first seen transition.
#[derive(Debug, Clone)]
struct Conn {
    owner: Option<Owner>,
    /// Time in the accept queue, when the program saw `accept()` return it.
    accept_wait_ns: Option<u64>,
    /// Whether we saw it born (`CLOSE -> SYN_SENT`, or `LISTEN -> SYN_RECV`).
    born: bool,
    /// States it left, with the time spent in each (None: unknown).
    states: Vec<(TcpState, Option<u64>)>,
    /// The latest transition seen.
    last: Transition,
    /// Transitions missed (an event's old state was not the state the
    /// previous one entered): the kernel skipped them or the ring was full.
    gaps: u32,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// We sent the first FIN.
    Active,
    /// The peer sent the first FIN.
    Passive,
    /// A reset from the peer (sk_err ECONNRESET or EPIPE).
    Reset,
    /// Closed by us without a FIN exchange: abort, SO_LINGER 0, close during connect.
    Aborted,
    Refused,
    TimedOut,
    Unknown,
    /// Its close was never seen: the socket's address came back as a new
    /// connection (the kernel skipped the `CLOSE`, or the ring was full).
    Unseen,
}

impl Ending {
    pub fn name(self) -> &'static str {
        match self {
            Ending::Active => "active",
            Ending::Passive => "passive",
            Ending::Reset => "reset",
            Ending::Aborted => "aborted",
            Ending::Refused => "refused",
            Ending::TimedOut => "timeout",
            Ending::Unknown => "unknown",
            Ending::Unseen => "unseen",
        }
    }
}

/// Classifies an ending from the states passed through and the socket error.
pub fn ending(passed: &[TcpState], last_old: TcpState, sock: Option<SockFields>) -> Ending {
    let err = sock.map(|s| s.error);
    match err {
        Some(ECONNREFUSED) => return Ending::Refused,
        Some(ETIMEDOUT) => return Ending::TimedOut,
        Some(ECONNRESET | EPIPE) => return Ending::Reset,
        _ => {}
    }
    if passed.contains(&TcpState::FIN_WAIT1) {
        Ending::Active
    } else if passed.contains(&TcpState::CLOSE_WAIT) {
        Ending::Passive
    } else if matches!(
        last_old,
        TcpState::ESTABLISHED | TcpState::SYN_SENT | TcpState::SYN_RECV
    ) && err.is_some()
    {
        // No FIN either way and no error from the peer: we tore it down.
        Ending::Aborted
    } else {
        Ending::Unknown
    }
}

/// A finished connection, ready to print.
#[derive(Debug, Clone)]
pub struct Life {
    pub ts_ns: u64,
    pub owner: Option<Owner>,
    /// Time the connection waited in the accept queue (accepted sockets).
    pub accept_wait_ns: Option<u64>,
    pub t: Transition,
    /// Sum of the state durations; a lower bound when `complete` is false.
    pub lifetime_ns: u64,
    pub complete: bool,
    pub states: Vec<(TcpState, Option<u64>)>,
    pub ending: Ending,
    /// Transitions known to be missing from `states`.
    pub gaps: u32,
}

/// Follows connections; yields a `Life` at each CLOSE.
#[derive(Default)]
pub struct Connections {
    conns: HashMap<u64, Conn>,
    capacity: usize,
    /// Connections not followed because `capacity` was reached.
    pub overflow: u64,
}

impl Connections {
    pub fn new(capacity: usize) -> Connections {
        Connections {
            conns: HashMap::new(),
            capacity,
            overflow: 0,
        }
    }

    /// Follows `t`; returns the lives it ends: its own connection's at a
    /// `CLOSE`, and, when `t` begins a socket at the address of a followed
    /// connection, that one, whose `CLOSE` was never seen.
    pub fn event(&mut self, t: &Transition) -> Vec<Life> {
        let mut ended = Vec::new();
        let begins = t.old_state == TcpState::CLOSE || t.is(TcpState::LISTEN, TcpState::SYN_RECV);
        // Followed sockets leave the table at their CLOSE: one still here
        // when its address begins anew lost its CLOSE.
        if let Some(conn) = begins.then(|| self.conns.remove(&t.sk)).flatten() {
            let last = conn.last.clone();
            ended.push(conn.into_life(last, Ending::Unseen));
        }
        if t.accept {
            // Not a state change: the connection's owner from now on, and
            // its wait in the accept queue.
            if let Some(conn) = self.conns.get_mut(&t.sk) {
                conn.owner.clone_from(&t.owner);
                conn.accept_wait_ns = t.duration_ns;
            }
            return ended;
        }
        // Listeners are not connections.
        let listener = t.new_state == TcpState::LISTEN || t.is(TcpState::LISTEN, TcpState::CLOSE);
        if !listener {
            ended.extend(self.follow(t, begins));
        }
        ended
    }

    fn follow(&mut self, t: &Transition, begins: bool) -> Option<Life> {
        let is_close = t.new_state == TcpState::CLOSE;
        let conn = match self.conns.get_mut(&t.sk) {
            Some(c) => {
                if c.last.new_state != t.old_state {
                    c.gaps += 1;
                }
                c.last.clone_from(t);
                c
            }
            None => {
                if !is_close && self.conns.len() >= self.capacity {
                    // Counted once per connection: at its birth.
                    self.overflow += u64::from(begins);
                    return None;
                }
                let conn = Conn {
                    owner: t.owner.clone(),
                    accept_wait_ns: None,
                    born: begins,
                    states: Vec::new(),
                    last: t.clone(),
                    gaps: 0,
                };
                self.conns.entry(t.sk).or_insert(conn)
            }
        };
        if t.owner.is_some() {
            conn.owner.clone_from(&t.owner);
        }
        // The first event's old state is CLOSE (or the listener's LISTEN) for
        // a socket we saw born: not part of its life.
        let before_birth = conn.states.is_empty()
            && conn.born
            && matches!(t.old_state, TcpState::CLOSE | TcpState::LISTEN);
        if !before_birth {
            // A repeated state (FIN_WAIT1 -> FIN_WAIT1 after shutdown then
            // close) is one stay, not two.
            match conn.states.last_mut() {
                Some((last, d)) if *last == t.old_state => {
                    *d = d.zip(t.duration_ns).map(|(a, b)| a.saturating_add(b))
                }
                _ => conn.states.push((t.old_state, t.duration_ns)),
            }
        }
        if !is_close {
            return None;
        }
        let conn = self.conns.remove(&t.sk)?;
        let passed: Vec<TcpState> = conn.states.iter().map(|(s, _)| *s).collect();
        let how = ending(&passed, t.old_state, t.sock);
        Some(conn.into_life(t.clone(), how))
    }
}

impl Conn {
    /// The life of this connection, ended by `last` in the way `ending` says.
    fn into_life(self, last: Transition, ending: Ending) -> Life {
        let known = self.states.iter().all(|(_, d)| d.is_some());
        Life {
            ts_ns: last.ts_ns,
            owner: self.owner,
            accept_wait_ns: self.accept_wait_ns,
            lifetime_ns: self
                .states
                .iter()
                .filter_map(|(_, d)| *d)
                .fold(0, u64::saturating_add),
            complete: self.born && known && self.gaps == 0 && ending != Ending::Unseen,
            t: last,
            states: self.states,
            ending,
            gaps: self.gaps,
        }
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n}B"),
        n if n < 1024 * 1024 => format!("{:.1}KiB", n as f64 / 1024.0),
        n if n < 1024 * 1024 * 1024 => format!("{:.1}MiB", n as f64 / 1048576.0),
        n => format!("{:.1}GiB", n as f64 / 1073741824.0),
    }
}

pub fn text_line(life: &Life, clock: &Clock, container: &ContainerColumn) -> String {
    let (pid, comm) = owner_cells(life.owner.as_ref());
    let comm = container.comm_cells(comm, life.owner.as_ref());
    let lifetime = format!(
        "{}{}",
        if life.complete { "" } else { ">=" },
        human_duration(life.lifetime_ns)
    );
    let (sent, recv) = match life.t.sock {
        Some(s) => (bytes(s.bytes_sent), bytes(s.bytes_received)),
        None => ("-".into(), "-".into()),
    };
    let mut states = String::new();
    for (i, (state, d)) in life.states.iter().enumerate() {
        let sep = if i == 0 { "" } else { " > " };
        let d = d.map_or("?".into(), human_duration);
        let _ = write!(states, "{sep}{} {d}", state.name());
    }
    format!(
        "{:<12} {pid:>7} {comm:<16} {:<21} {:<21} {lifetime:>9} {:<8} {sent:>8} {recv:>8}  {states}",
        clock.local_time(life.ts_ns),
        endpoint(life.t.laddr, life.t.lport),
        endpoint(life.t.raddr, life.t.rport),
        life.ending.name(),
    )
}

pub const HEADER: &str = "TIME             PID COMM             LOCAL                 REMOTE                 LIFETIME CLOSE        SENT     RECV  STATES";

pub fn json_line(life: &Life) -> serde_json::Value {
    let states: Vec<_> = life
        .states
        .iter()
        .map(|(s, d)| json!({"state": s.name(), "duration_ns": d}))
        .collect();
    let (pid, comm) = owner_json(life.owner.as_ref());
    let mut line = json!({
        "ts_ns": life.ts_ns,
        "sk": format!("{:#x}", life.t.sk),
        "pid": pid,
        "comm": comm,
        "family": if life.t.is_ipv4() { "ipv4" } else { "ipv6" },
        "laddr": life.t.laddr,
        "lport": life.t.lport,
        "raddr": life.t.raddr,
        "rport": life.t.rport,
        "lifetime_ns": life.lifetime_ns,
        "lifetime_complete": life.complete,
        "states": states,
        "close": life.ending.name(),
        "missed_transitions": life.gaps,
        "error": life.t.sock.filter(|s| s.error != 0).map(|s| errno::name(s.error)),
        "bytes_sent": life.t.sock.map(|s| s.bytes_sent),
        "bytes_received": life.t.sock.map(|s| s.bytes_received),
        "accept_wait_ns": life.accept_wait_ns,
    });
    add_owner_origin(&mut line, life.owner.as_ref());
    line
}

struct LifeCommand {
    connections: Connections,
    sink: Sink,
    container: ContainerColumn,
}

impl Consumer for LifeCommand {
    fn start(&mut self) -> Result<()> {
        if self.sink.is_json() {
            return Ok(());
        }
        self.sink.text(&format!("{HEADER}\n"))
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        for life in self.connections.event(t) {
            if self.sink.is_json() {
                self.sink.json_line(&json_line(&life))?;
            } else {
                if self.container.joins(life.owner.as_ref()) {
                    self.sink
                        .text(&format!("{}\n", self.container.header(HEADER)))?;
                }
                let line = text_line(&life, &self.sink.clock, &self.container);
                self.sink.text(&format!("{line}\n"))?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.sink.flush()
    }

    fn finish(&mut self, _totals: &Totals) -> Result<()> {
        if self.connections.overflow > 0 {
            eprintln!(
                "tcp-trace: {} connections not followed (more than {} open at once)",
                self.connections.overflow, self.connections.capacity
            );
        }
        self.sink.flush()
    }
}

pub fn run(config: LifeConfig) -> Result<()> {
    let mut command = LifeCommand {
        connections: Connections::new(config.tracing.max_sockets as usize),
        sink: Sink::stdout(config.json),
        container: ContainerColumn::default(),
    };
    if let Some(path) = &config.from {
        return source::replay(
            path,
            &config.tracing.filter,
            config.tracing.cgroup.as_deref(),
            None,
            &mut command,
        );
    }
    let settings = config.tracing.streaming();
    let timing = Timing::until(config.tracing.duration);
    source::block_on(source::live(&settings, timing, &mut command))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one life a transition ended.
    trait One {
        fn one(self) -> Life;
    }

    impl One for Vec<Life> {
        fn one(self) -> Life {
            assert_eq!(self.len(), 1, "{self:?}");
            self.into_iter().next().unwrap()
        }
    }
    use crate::model::{from_event, sample_event, OwnerSource};

    fn ev(sk: u64, ts: u64, old: &str, new: &str, d: Option<u64>) -> Transition {
        let mut t = from_event(&sample_event()).unwrap();
        t.sk = sk;
        t.ts_ns = ts;
        t.old_state = TcpState::from_name(old).unwrap();
        t.new_state = TcpState::from_name(new).unwrap();
        t.duration_ns = d;
        t
    }

    #[test]
    fn an_accepted_life_belongs_to_its_acceptor_and_counts_its_stay_once() {
        let mut tr = Connections::new(100);
        let mut listener_owned = ev(2, 100, "LISTEN", "SYN_RECV", None);
        listener_owned.owner = Some(Owner::process(10, b"nginx", OwnerSource::Listener));
        let mut established = ev(2, 110, "SYN_RECV", "ESTABLISHED", Some(10));
        established.owner.clone_from(&listener_owned.owner);
        let mut accept = ev(2, 4_110, "ESTABLISHED", "ESTABLISHED", Some(4_000));
        accept.accept = true;
        accept.owner = Some(Owner::process(11, b"worker", OwnerSource::Accept));
        for t in [&listener_owned, &established, &accept] {
            assert!(tr.event(t).is_empty());
        }
        let mut close = ev(2, 10_110, "ESTABLISHED", "CLOSE", Some(10_000));
        close.owner = None;
        let life = tr.event(&close).one();
        assert_eq!(life.lifetime_ns, 10_010, "the accept is not a second stay");
        assert_eq!(life.accept_wait_ns, Some(4_000));
        assert_eq!(life.owner.as_ref().map(|o| o.pid), Some(11));
        let line = json_line(&life);
        assert_eq!(line["owner_source"], "accept");
        assert_eq!(line["accept_wait_ns"], 4_000);
    }

    #[test]
    fn a_client_life_sums_its_states() {
        let mut tr = Connections::new(100);
        let seq = [
            ev(1, 100, "CLOSE", "SYN_SENT", None),
            ev(1, 300, "SYN_SENT", "ESTABLISHED", Some(200)),
            ev(1, 5_300, "ESTABLISHED", "CLOSE_WAIT", Some(5_000)),
            ev(1, 5_400, "CLOSE_WAIT", "LAST_ACK", Some(100)),
        ];
        for t in &seq {
            assert!(tr.event(t).is_empty());
        }
        let mut close = ev(1, 5_450, "LAST_ACK", "CLOSE", Some(50));
        close.sock = Some(SockFields {
            bytes_sent: 10,
            bytes_received: 2048,
            error: 0,
        });
        let life = tr.event(&close).one();
        assert_eq!(life.lifetime_ns, 5_350);
        assert_eq!(life.lifetime_ns, close.ts_ns - seq[0].ts_ns);
        assert!(life.complete);
        assert_eq!(life.ending, Ending::Passive);
        let line = text_line(&life, &Clock::with_offset(0), &ContainerColumn::default());
        assert!(
            line.contains("SYN_SENT 200ns > ESTABLISHED 5.0us > CLOSE_WAIT 100ns > LAST_ACK 50ns"),
            "{line}"
        );
        assert!(
            line.contains(" passive ") && line.contains(" 10B ") && line.contains("2.0KiB"),
            "{line}"
        );
        assert_eq!(tr.conns.len(), 0);
    }

    #[test]
    fn repeated_states_merge() {
        let mut tr = Connections::new(100);
        tr.event(&ev(4, 0, "LISTEN", "SYN_RECV", None));
        tr.event(&ev(4, 5, "SYN_RECV", "ESTABLISHED", Some(5)));
        tr.event(&ev(4, 105, "ESTABLISHED", "FIN_WAIT1", Some(100)));
        tr.event(&ev(4, 115, "FIN_WAIT1", "FIN_WAIT1", Some(10)));
        tr.event(&ev(4, 135, "FIN_WAIT1", "FIN_WAIT2", Some(20)));
        let life = tr.event(&ev(4, 136, "FIN_WAIT2", "CLOSE", Some(1))).one();
        let names: Vec<_> = life
            .states
            .iter()
            .map(|(s, d)| (s.name(), d.unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                ("SYN_RECV", 5),
                ("ESTABLISHED", 100),
                ("FIN_WAIT1", 30),
                ("FIN_WAIT2", 1)
            ]
        );
        assert!(life.complete);
        assert_eq!(life.lifetime_ns, 136);
    }

    #[test]
    fn a_socket_seen_mid_life_is_a_lower_bound() {
        let mut tr = Connections::new(100);
        tr.event(&ev(2, 10, "ESTABLISHED", "FIN_WAIT1", None));
        tr.event(&ev(2, 20, "FIN_WAIT1", "FIN_WAIT2", Some(10)));
        let life = tr.event(&ev(2, 25, "FIN_WAIT2", "CLOSE", Some(5))).one();
        assert!(!life.complete);
        assert_eq!(life.ending, Ending::Active);
        assert!(
            text_line(&life, &Clock::with_offset(0), &ContainerColumn::default())
                .contains(">=15ns")
        );
        assert_eq!(
            json_line(&life)["states"][0]["duration_ns"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn listeners_are_not_connections() {
        let mut tr = Connections::new(100);
        assert!(tr.event(&ev(3, 1, "CLOSE", "LISTEN", None)).is_empty());
        assert!(tr.event(&ev(3, 2, "LISTEN", "CLOSE", Some(1))).is_empty());
        assert!(tr.conns.is_empty());
    }

    #[test]
    fn endings() {
        let s = |names: &[&str]| {
            names
                .iter()
                .map(|n| TcpState::from_name(n).unwrap())
                .collect::<Vec<_>>()
        };
        let err = |e| {
            Some(SockFields {
                bytes_sent: 0,
                bytes_received: 0,
                error: e,
            })
        };
        let est = TcpState::from_name("ESTABLISHED").unwrap();
        let syn = TcpState::from_name("SYN_SENT").unwrap();
        assert_eq!(ending(&s(&["SYN_SENT"]), syn, err(111)), Ending::Refused);
        assert_eq!(ending(&s(&["SYN_SENT"]), syn, err(110)), Ending::TimedOut);
        assert_eq!(ending(&s(&["SYN_SENT"]), syn, err(0)), Ending::Aborted);
        assert_eq!(ending(&s(&["ESTABLISHED"]), est, err(104)), Ending::Reset);
        assert_eq!(ending(&s(&["ESTABLISHED"]), est, err(0)), Ending::Aborted);
        assert_eq!(ending(&s(&["ESTABLISHED"]), est, None), Ending::Unknown);
        let fw2 = TcpState::from_name("FIN_WAIT2").unwrap();
        assert_eq!(
            ending(&s(&["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]), fw2, err(0)),
            Ending::Active
        );
        assert_eq!(
            ending(&s(&["ESTABLISHED", "FIN_WAIT1"]), fw2, err(104)),
            Ending::Reset
        );
    }

    #[test]
    fn a_skipped_close_ends_the_life_when_the_address_comes_back() {
        let mut tr = Connections::new(100);
        tr.event(&ev(5, 0, "CLOSE", "SYN_SENT", None));
        tr.event(&ev(5, 10, "SYN_SENT", "ESTABLISHED", Some(10)));
        // ... its FIN_WAIT1 -> ... -> CLOSE were skipped; the address is reused.
        let old = tr.event(&ev(5, 500, "CLOSE", "SYN_SENT", None)).one();
        assert_eq!(old.ending, Ending::Unseen);
        assert!(!old.complete);
        assert_eq!(old.ts_ns, 10, "ends at the last transition seen");
        assert_eq!(json_line(&old)["close"], "unseen");
        // The new connection is followed from its own start.
        tr.event(&ev(5, 520, "SYN_SENT", "ESTABLISHED", Some(20)));
        let new = tr
            .event(&ev(5, 600, "ESTABLISHED", "CLOSE", Some(80)))
            .one();
        assert_eq!((new.lifetime_ns, new.gaps), (100, 0));
    }

    #[test]
    fn a_skipped_transition_is_a_gap_not_a_wrong_life() {
        let mut tr = Connections::new(100);
        tr.event(&ev(6, 0, "CLOSE", "SYN_SENT", None));
        tr.event(&ev(6, 10, "SYN_SENT", "ESTABLISHED", Some(10)));
        // ESTABLISHED -> FIN_WAIT1 was skipped.
        tr.event(&ev(6, 90, "FIN_WAIT1", "FIN_WAIT2", None));
        let life = tr.event(&ev(6, 95, "FIN_WAIT2", "CLOSE", Some(5))).one();
        assert_eq!(life.gaps, 1);
        assert!(!life.complete);
        assert_eq!(json_line(&life)["missed_transitions"], 1);
    }

    #[test]
    fn a_reused_address_ends_the_old_life_even_when_it_becomes_a_listener() {
        let mut tr = Connections::new(100);
        tr.event(&ev(8, 0, "CLOSE", "SYN_SENT", None));
        let ended = tr.event(&ev(8, 50, "CLOSE", "LISTEN", None));
        assert_eq!(ended.one().ending, Ending::Unseen);
        assert!(tr.conns.is_empty());
    }

    #[test]
    fn bounded_memory() {
        let mut tr = Connections::new(2);
        for sk in 0..5 {
            tr.event(&ev(sk, 1, "CLOSE", "SYN_SENT", None));
        }
        assert_eq!((tr.conns.len(), tr.overflow), (2, 3));
    }
}
