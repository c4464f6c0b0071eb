//! Following timewait sockets: candidates from the tracepoint, confirmed
//! against readings of each network namespace's timewait table, taken every
//! `POLL` (or a period of the caller's) on a thread of their own; or, where
//! the kernel's timewait functions are probed, claimed by the entries and
//! exits those probes stream (one reading at start marks what existed).

use std::{
    collections::HashMap,
    sync::{mpsc, Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tcp_trace_common::Filter;

use super::ledger::{Ledger, Reading, POLL};
use crate::{
    model::{TimewaitEvent, Transition},
    output::monotonic_ns,
    system::{
        owners::process_start,
        proc_net::{own_netns, timewait_sockets_of},
        sock_diag,
        sysctl::read_timewait_sysctls,
    },
};

/// Readings of the namespaces' timewait tables, and when they were taken.
type Dump = (u64, Result<Vec<Reading>>);

/// Network namespaces other than the agent's, each with a process last seen
/// owning a socket in it (pid and start time): the way to read its table.
type Reach = Arc<Mutex<HashMap<u32, (u32, u64)>>>;

/// Namespaces followed at once; sockets of more stay unconfirmed.
const NAMESPACES: usize = 1024;

/// The ledger, and the readings that feed it.
pub struct Tracker {
    pub ledger: Ledger,
    host_netns: u32,
    reach: Reach,
    /// Readings from the dumping thread: a dump of a busy host's table takes
    /// long enough that the event loop must not wait for it.
    dumps: Option<mpsc::Receiver<Dump>>,
    /// Time between two readings.
    period: Duration,
    /// Entries and exits from the kernel's timewait functions: no readings
    /// after the first.
    probes: bool,
}

/// The agent's own namespace through sock_diag, the others through a
/// process in each. A process that is gone (its pid free, or another
/// process's: the start time tells) is forgotten. Whether it is still in the
/// namespace cannot be checked without the privileges the agent gave up
/// (`/proc/PID/ns` needs ptrace rights); processes rarely change namespace.
fn dump_now(host_netns: u32, reach: &Reach) -> Dump {
    let taken = monotonic_ns();
    let host = sock_diag::timewait_sockets().context("reading the kernel's timewait sockets");
    let readings = host.map(|sockets| {
        let mut readings = vec![Reading {
            netns: host_netns,
            sockets,
        }];
        let known: Vec<(u32, (u32, u64))> = lock(reach).iter().map(|(n, p)| (*n, *p)).collect();
        for (netns, (pid, start)) in known {
            let sockets = (process_start(pid) == Some(start))
                .then(|| timewait_sockets_of(pid).ok())
                .flatten();
            match sockets {
                Some(sockets) => readings.push(Reading { netns, sockets }),
                None => {
                    lock(reach).remove(&netns);
                }
            }
        }
        readings
    });
    (taken, readings)
}

fn lock(reach: &Reach) -> std::sync::MutexGuard<'_, HashMap<u32, (u32, u64)>> {
    // A panic elsewhere cannot leave the map half-written: take it as is.
    reach
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tracker {
    /// A tracker for the sockets `filter` matches; fails early and clearly
    /// when sock_diag does not answer.
    pub fn new(filter: Filter) -> Result<Tracker> {
        Self::every(filter, POLL)
    }

    /// A tracker reading the tables every `period`: a busy host's table is a
    /// hundred thousand sockets, whose reading costs CPU every time.
    pub fn every(filter: Filter, period: Duration) -> Result<Tracker> {
        let ephemeral = read_timewait_sysctls().port_range.unwrap_or((32768, 60999));
        let host_netns = own_netns().context("reading /proc/self/ns/net")?;
        sock_diag::timewait_sockets().context("reading the kernel's timewait sockets")?;
        Ok(Tracker {
            ledger: Ledger::new(filter, monotonic_ns(), ephemeral, host_netns).polled_every(period),
            host_netns,
            reach: Reach::default(),
            dumps: None,
            period,
            probes: false,
        })
    }

    /// The kernel's timewait functions are probed: entries and exits come
    /// through `timewait` from now on.
    pub fn use_probes(&mut self) {
        self.probes = true;
        self.ledger.use_probes();
    }

    /// A record from the timewait probes.
    pub fn timewait(&mut self, e: &TimewaitEvent) {
        self.ledger.timewait(e);
    }

    /// Takes the first reading (it marks what existed before us) and starts
    /// the dumping thread.
    pub fn start(&mut self) -> Result<()> {
        self.apply(dump_now(self.host_netns, &self.reach))?;
        if self.probes {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        let (host_netns, reach, period) = (self.host_netns, self.reach.clone(), self.period);
        thread::spawn(move || loop {
            thread::sleep(period);
            if tx.send(dump_now(host_netns, &reach)).is_err() {
                break;
            }
        });
        self.dumps = Some(rx);
        Ok(())
    }

    /// The agent's own network namespace.
    pub fn host_netns(&self) -> u32 {
        self.host_netns
    }

    pub fn event(&mut self, t: &Transition) {
        // An accept changes no state; the close carries the acceptor.
        if t.accept {
            return;
        }
        if let (Some(netns), Some(owner), false) = (t.netns, &t.owner, self.probes) {
            if netns != self.host_netns {
                self.remember_reach(netns, owner.pid);
            }
        }
        self.ledger.event(t);
    }

    /// Applies the readings that arrived; events up to now are already in.
    pub fn apply_pending(&mut self) -> Result<()> {
        if self.probes {
            return Ok(());
        }
        while let Some(dump) = self.dumps.as_ref().and_then(|d| d.try_recv().ok()) {
            self.apply(dump)?;
        }
        Ok(())
    }

    /// Stops the thread and takes one last reading now; returns its time.
    pub fn finish(&mut self) -> Result<u64> {
        if self.probes {
            return Ok(monotonic_ns());
        }
        self.apply_pending()?;
        self.dumps = None;
        let dump = dump_now(self.host_netns, &self.reach);
        let taken = dump.0;
        self.apply(dump)?;
        Ok(taken)
    }

    fn apply(&mut self, (taken, readings): Dump) -> Result<()> {
        self.ledger.poll(&readings?, taken);
        // A reading is a hundred thousand small allocations on a busy host,
        // freed at once: hand the pages back instead of keeping the peak.
        // SAFETY: malloc_trim only releases free memory of glibc's heap.
        unsafe { libc::malloc_trim(0) };
        // Namespaces with nothing left to confirm need no more reading.
        let wanted = self.ledger.foreign_namespaces();
        lock(&self.reach).retain(|netns, _| wanted.contains(netns));
        Ok(())
    }

    /// Keeps `pid` as the way into namespace `netns`.
    fn remember_reach(&mut self, netns: u32, pid: u32) {
        let mut reach = lock(&self.reach);
        let known = reach.get(&netns).is_some_and(|(p, _)| *p == pid);
        if known || (reach.len() >= NAMESPACES && !reach.contains_key(&netns)) {
            return;
        }
        if let Some(start) = process_start(pid) {
            reach.insert(netns, (pid, start));
        }
    }
}
