//! Owners under a real server: Debian's nginx, daemonized (the process that
//! calls listen() forks the master and exits; the master forks two workers
//! that accept), loaded by `ab` with 200 connections, 10 at a time.
//!
//! Each connection's server end must be charged to a live nginx process from
//! its first event on: before accept() to the listener's current owner (the
//! master or a worker), from the accept event on to the worker that accepted
//! it. Never to the launcher that called listen() and exited, and never to
//! nobody. `tcp-trace handshake` must name the accepting worker too.

mod common;

use std::{collections::BTreeMap, fmt::Write as _, thread, time::Duration};

use common::{ab, alive, free_port, summary_count, Agent, AgentOutput, Ev, Nginx};
use serde_json::Value;

const REQUESTS: usize = 200;
const CONCURRENCY: usize = 10;

/// How long the agent may take to give a listener whose owner exited to a
/// process still holding it: its exit hook hands it to the owner's child at
/// once; userspace's fallback (a /proc scan) runs on its 50 ms drain tick.
const REOWN: Duration = Duration::from_millis(300);

/// What the two agents printed while ab ran, and who nginx was.
struct Run {
    port: u16,
    launcher: u32,
    master: u32,
    workers: Vec<u32>,
    watch: AgentOutput,
    handshakes: Vec<Value>,
    handshake_stderr: Vec<String>,
}

impl Run {
    /// `watch --json` and `handshake --json` on the port while ab loads a
    /// daemonized nginx, started before the agents (`nginx_first`) or after.
    fn new(nginx_first: bool) -> Run {
        let port = free_port();
        let p = port.to_string();
        let start_agents = || {
            (
                Agent::start(&["--port", &p]),
                Agent::command(&["handshake", "--json", "--port", &p]),
            )
        };
        let (nginx, (watch, handshake)) = if nginx_first {
            let nginx = Nginx::start(port, true);
            (nginx, start_agents())
        } else {
            let agents = start_agents();
            let nginx = Nginx::start(port, true);
            // Nginx::start reaped the launcher: its exit is in the past;
            // what the agent may take to re-own the listener after that.
            thread::sleep(REOWN);
            (nginx, agents)
        };
        let (launcher, master, workers) = (nginx.launcher(), nginx.master(), nginx.workers());
        assert!(!alive(launcher), "nginx's launcher {launcher} still runs");
        ab(port, REQUESTS, CONCURRENCY);
        assert_eq!(
            nginx.workers(),
            workers,
            "nginx's workers changed while ab ran"
        );
        // The last connections' final packets.
        thread::sleep(Duration::from_millis(200));
        let watch = watch.stop();
        let (lines, handshake_stderr) = handshake.stop_raw();
        nginx.stop();
        let handshakes = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        Run {
            port,
            launcher,
            master,
            workers,
            watch,
            handshakes,
            handshake_stderr,
        }
    }

    fn nginx(&self, pid: Option<u32>) -> bool {
        pid.is_some_and(|p| p == self.master || self.workers.contains(&p))
    }

    /// Who is who, and what the agent counted, for failure messages.
    fn context(&self) -> String {
        format!(
            "nginx on port {}: launcher {} (exited), master {}, workers {:?}\nwatch: {}",
            self.port,
            self.launcher,
            self.master,
            self.workers,
            self.watch.summary()
        )
    }

    /// Events the kernel skipped or the ring buffer dropped: the few
    /// connections they belong to may miss an event.
    fn dropped(&self) -> u64 {
        summary_count(self.watch.summary(), " dropped (")
    }
}

/// What a run got wrong, gathered over all the checks, so that one failure
/// shows every kind of mistake (and whether it is the only one).
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// Notes `problems` (the first 20 of them) under `what`.
    fn add(&mut self, what: &str, problems: &[String]) {
        if problems.is_empty() {
            return;
        }
        let mut msg = format!("{} {what}:\n", problems.len());
        for p in problems.iter().take(20) {
            let _ = writeln!(msg, "{p}");
        }
        self.0.push(msg);
    }

    fn require(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg() + "\n");
        }
    }

    /// Fails with everything found, and who was who.
    #[track_caller]
    fn finish(self, run: &Run) {
        assert!(
            self.0.is_empty(),
            "{}--- {}",
            self.0.join("\n"),
            run.context()
        );
    }
}

/// Whether `accepted` connections fit ab's requests: one per request, less
/// those whose accept event was `dropped`, plus at most one per concurrent
/// slot that ab opens once the last requests are under way and closes
/// unused (nginx accepts those too, and reads EOF).
fn plausible(accepted: usize, dropped: u64) -> bool {
    accepted <= REQUESTS + CONCURRENCY && accepted as u64 + dropped >= REQUESTS as u64
}

/// The connections accepted on `port`, each its events in time order. A
/// socket's address is reused once a connection is gone: a LISTEN ->
/// SYN_RECV begins a new connection.
fn connections(trace: &AgentOutput, port: u16) -> Vec<Vec<&Ev>> {
    let mut by_sk: BTreeMap<&str, Vec<&Ev>> = BTreeMap::new();
    for ev in trace.select(|e| e.lport == port && !e.is("CLOSE", "LISTEN")) {
        by_sk.entry(&ev.sk).or_default().push(ev);
    }
    let mut connections = Vec::new();
    for mut events in by_sk.into_values() {
        events.sort_by_key(|e| e.ts_ns);
        for (i, ev) in events.into_iter().enumerate() {
            if i == 0 || ev.is("LISTEN", "SYN_RECV") {
                connections.push(Vec::new());
            }
            connections.last_mut().unwrap().push(ev);
        }
    }
    connections
}

fn line(ev: &Ev) -> String {
    format!(
        "  {} {} {:<8} {:>11} -> {:<11} pid {:?} {:?} owner_source {:?} rport {}",
        ev.ts_ns,
        ev.sk,
        ev.event,
        ev.old_state,
        ev.new_state,
        ev.pid,
        ev.comm,
        ev.owner_source,
        ev.rport
    )
}

fn lines(events: &[&Ev]) -> String {
    events
        .iter()
        .map(|e| line(e))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The assertions both runs share. `before_accept` is the owner_source of
/// each connection's events before its accept.
#[track_caller]
fn check(run: &Run, before_accept: &str) {
    let mut found = Findings::default();
    let port = run.port;
    let trace = &run.watch;
    let listener_since = trace
        .select(|e| e.lport == port && e.is("CLOSE", "LISTEN"))
        .first()
        .map(|e| e.ts_ns);

    // Every server-side event, the listener's listen() aside (the
    // launcher's own call): a live nginx process.
    let problems: Vec<String> = trace
        .select(|e| e.lport == port && !e.is("CLOSE", "LISTEN"))
        .into_iter()
        .filter(|e| !run.nginx(e.pid))
        .map(|e| {
            let after = listener_since.map_or(String::new(), |t| {
                format!(" ({:.1} ms after listen())", (e.ts_ns - t) as f64 / 1e6)
            });
            format!("{}{after}", line(e))
        })
        .collect();
    found.add(
        "server-side events charged to no nginx process (the launcher, nobody, another)",
        &problems,
    );

    let connections = connections(trace, port);
    let mut accepted = 0;
    let mut problems = Vec::new();
    for events in &connections {
        let accepts: Vec<&&Ev> = events.iter().filter(|e| e.event == "accept").collect();
        let [accept] = accepts[..] else {
            problems.push(format!(
                "{} accept events in one connection:\n{}",
                accepts.len(),
                lines(events)
            ));
            continue;
        };
        accepted += 1;
        let worker = accept.pid.filter(|p| run.workers.contains(p));
        if worker.is_none() || accept.owner_source.as_deref() != Some("accept") {
            problems.push(format!(
                "an accept by no worker, or without owner_source \"accept\":\n{}",
                lines(events)
            ));
            continue;
        }
        for ev in events {
            let ok = if ev.ts_ns < accept.ts_ns {
                ev.owner_source.as_deref() == Some(before_accept)
            } else {
                ev.pid == worker && ev.comm.as_deref() == Some("nginx")
            };
            if !ok {
                problems.push(format!(
                    "before its accept not {before_accept:?}, or after it not the accepting \
                     worker {}:\n{}",
                    worker.unwrap(),
                    lines(events)
                ));
                break;
            }
        }
    }
    found.add("connections charged wrongly", &problems);
    let dropped = run.dropped();
    found.require(plausible(accepted, dropped), || {
        format!(
            "{accepted} connections with an accept event for {REQUESTS} requests ({dropped} \
             events dropped)"
        )
    });

    // The client ends are ab's, even though nginx's processes run the
    // softirqs that move some of them on loopback.
    let problems: Vec<String> = trace
        .select(|e| e.rport == port && e.lport != port)
        .into_iter()
        .filter(|e| e.comm.as_deref() != Some("ab"))
        .map(line)
        .collect();
    found.add("client-side events not charged to ab", &problems);

    check_handshakes(run, accepted, &mut found);
    found.finish(run);
}

/// `handshake --json`: a server line per accepted connection, naming the
/// worker that accepted it, with its accept-queue wait.
fn check_handshakes(run: &Run, accepted: usize, found: &mut Findings) {
    let servers: Vec<&Value> = run
        .handshakes
        .iter()
        .filter(|v| v["type"] == "handshake" && v["side"] == "server" && v["lport"] == run.port)
        .collect();
    let problems: Vec<String> = servers
        .iter()
        .filter(|v| {
            let pid = v["pid"].as_u64().map(|p| p as u32);
            !(pid.is_some_and(|p| run.workers.contains(&p))
                && v["comm"] == "nginx"
                && v["owner_source"] == "accept"
                && v["accept_wait_ns"].is_u64())
        })
        .map(|v| format!("  {v}"))
        .collect();
    found.add(
        "server handshakes not naming a worker with its accept_wait_ns",
        &problems,
    );
    let summary = run
        .handshake_stderr
        .iter()
        .find(|l| l.contains("events received"))
        .unwrap_or_else(|| panic!("no summary from handshake: {:?}", run.handshake_stderr));
    let dropped = summary_count(summary, " dropped (");
    found.require(plausible(servers.len(), dropped), || {
        format!(
            "{} server handshakes for {REQUESTS} requests ({accepted} accept events in watch), \
             handshake said: {summary}",
            servers.len()
        )
    });
}

#[test]
fn nginx_started_after_the_agent_is_charged_to_its_live_processes() {
    let run = Run::new(false);
    // The launcher called listen(): that transition is its own.
    let listen = run.watch.one("listen() of nginx's launcher", |e| {
        e.lport == run.port && e.is("CLOSE", "LISTEN")
    });
    assert_eq!(
        (listen.pid, listen.owner_source.as_deref()),
        (Some(run.launcher), Some("task")),
        "{listen:#?}\n{}",
        run.context()
    );
    check(&run, "listener");
}

#[test]
fn nginx_started_before_the_agent_is_charged_to_its_live_processes() {
    let run = Run::new(true);
    // Until a worker accepts, the listener is the start-up scan's oldest
    // holder's: the master (an nginx process all the same).
    check(&run, "listener");
}
