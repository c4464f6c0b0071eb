//! `tcp-trace serve`: an always-on agent that Prometheus scrapes.
//!
//! What the kernel can sum, it sums (time per state, transitions,
//! handshakes, closes), read at scrape time from its per-CPU arrays. Only
//! what needs userspace is streamed: closes that may leave a timewait socket
//! (confirmed against the kernel's table, as `timewait` does) and
//! transitions into and out of CLOSE_WAIT, charged to groups of owners.

mod groups;
mod http;
mod metrics;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::{Context as _, Result};
use sd_notify::NotifyState;
use tcp_trace_common::state;
use tokio::{net::TcpListener, sync::mpsc};

use super::timewait::Tracker;
use crate::{
    cli::ServeConfig,
    kernel::{Program, Settings},
    model::{Owner, TcpState, TimewaitEvent, Transition},
    output::monotonic_ns,
    source::{self, Consumer, Timing, Totals},
    system::{sock_diag, usage::own_usage},
};
use groups::GroupTable;
pub use groups::{CloseWaits, GroupLabel};
use metrics::{GroupRow, Snapshot};

/// How often the kernel's timewait table is read: a scrape every 15 s or so
/// needs no fresher gauge, and on a busy host each reading is a hundred
/// thousand sockets (`timewait` reads it every second, to time stays).
const TIMEWAIT_READINGS: Duration = Duration::from_secs(5);

/// How often sockets believed in CLOSE_WAIT are checked against the
/// kernel's table (an exit the kernel skipped would keep one forever).
const RECONCILE_EVERY: u32 = 10;
/// How often (in seconds) idle groups are dropped and busier ones promoted.
const REBALANCE_EVERY: u32 = 10;

/// The per-group state the agent follows between scrapes.
pub struct ServeState {
    tracker: Tracker,
    close_waits: CloseWaits,
    groups: GroupTable,
    label: GroupLabel,
    ticks: u32,
    kernel_release: String,
}

impl ServeState {
    /// The `/metrics` page as of now.
    fn page(&mut self, program: &Program, totals: &Totals, openmetrics: bool) -> Result<String> {
        let sums = program.sums()?;
        let mut snapshot = Snapshot::new(&sums, totals, self.close_waits.refused);
        snapshot.groups = self.group_rows(monotonic_ns());
        snapshot.usage = own_usage()?;
        snapshot.kernel_release = self.kernel_release.clone();
        Ok(metrics::encode(snapshot, openmetrics)?)
    }

    /// One row per group: its counters, and its sockets now.
    fn group_rows(&mut self, now_ns: u64) -> Vec<GroupRow> {
        let mut rows: BTreeMap<String, GroupRow> = BTreeMap::new();
        let (groups, label) = (&mut self.groups, self.label);
        // Owners are shared (one per process and name): count the lingering
        // sockets per owner first, so that a label is built once per owner,
        // not once per socket (a hundred thousand of them under churn).
        let mut per_owner: HashMap<Option<*const Owner>, (Option<&Owner>, u64)> = HashMap::new();
        for owner in self.tracker.ledger.lingering_owners() {
            per_owner
                .entry(owner.map(std::ptr::from_ref))
                .or_insert((owner, 0))
                .1 += 1;
        }
        for (owner, sockets) in per_owner.into_values() {
            let name = groups.name(label.of(owner), now_ns, false);
            rows.entry(name).or_default().timewait_sockets += sockets;
        }
        for (_, owner, entered_ns) in self.close_waits.iter() {
            let name = groups.name(label.of(owner), now_ns, false);
            let row = rows.entry(name).or_default();
            row.close_wait_sockets += 1;
            let age = now_ns.saturating_sub(entered_ns) as f64 / 1e9;
            row.close_wait_oldest_seconds = row.close_wait_oldest_seconds.max(age);
        }
        for (name, entered) in groups.all() {
            rows.entry(name).or_default().timewait_entered = entered;
        }
        rows.into_iter()
            .map(|(group, row)| GroupRow { group, ..row })
            .collect()
    }

    /// Charges the TIME_WAIT entries confirmed since the last call.
    fn count_entries(&mut self) {
        let now = monotonic_ns();
        for owner in self.tracker.ledger.take_entries() {
            let label = self.label.of(owner.as_deref());
            self.groups.count_timewait_entry(label, now);
        }
    }

    /// Forgets CLOSE_WAIT sockets the kernel no longer lists (agent's
    /// namespace only: other namespaces' exits are trusted to the events).
    fn reconcile_close_waits(&mut self) -> Result<()> {
        let taken = monotonic_ns();
        let listed = sock_diag::close_wait_sockets()?;
        let host = self.tracker.host_netns();
        self.close_waits
            .reconcile(host, &listed.into_iter().collect(), taken);
        Ok(())
    }
}

impl Consumer for ServeState {
    fn start(&mut self) -> Result<()> {
        self.tracker.start()?;
        // Attached and reading: a `Type=notify` unit counts as started now.
        sd_notify::notify(&[NotifyState::Ready]).context("notifying systemd")?;
        Ok(())
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        self.tracker.event(t);
        self.close_waits.event(t, self.tracker.host_netns());
        if t.new_state == TcpState::CLOSE_WAIT {
            self.groups
                .name(self.label.of(t.owner.as_ref()), t.ts_ns, true);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.tracker.apply_pending()?;
        self.count_entries();
        Ok(())
    }

    fn timewait_probes(&mut self) {
        self.tracker.use_probes();
    }

    fn timewait(&mut self, e: &TimewaitEvent) -> Result<()> {
        self.tracker.timewait(e);
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, _totals: &Totals) -> Result<()> {
        self.flush()?;
        self.ticks += 1;
        if self.ticks.is_multiple_of(REBALANCE_EVERY) {
            self.groups.rebalance(now_ns);
        }
        if self.ticks.is_multiple_of(RECONCILE_EVERY) {
            // A failed reading keeps the sockets: said, not fatal.
            if let Err(err) = self.reconcile_close_waits() {
                eprintln!("tcp-trace: warning: {err:#}");
            }
        }
        Ok(())
    }

    fn finish(&mut self, _totals: &Totals) -> Result<()> {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
        Ok(())
    }
}

/// Transitions streamed beside the sums: out of FIN_WAIT2 and CLOSING
/// (closes that may leave a timewait socket), and into and out of
/// CLOSE_WAIT.
const STREAM_MASK: u32 = (1 << state::FIN_WAIT2)
    | (1 << state::CLOSING)
    | (1 << state::CLOSE_WAIT)
    | (1 << (16 + state::CLOSE_WAIT));

pub fn run(config: ServeConfig) -> Result<()> {
    source::block_on(async move {
        // Bind before loading anything: a taken port fails at once.
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let mut tracker = Tracker::every(config.tracing.filter, TIMEWAIT_READINGS)?;
        tracker.ledger.record_entries();
        let mut state = ServeState {
            tracker,
            close_waits: CloseWaits::new(config.tracing.max_sockets as usize),
            groups: GroupTable::new(config.max_groups, config.group_ttl.as_nanos() as u64),
            label: config.group_by,
            ticks: 0,
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let settings = Settings {
            aggregate: true,
            stream_mask: STREAM_MASK,
            tally: true,
            timewait: Some(TIMEWAIT_READINGS),
            ..config.tracing.streaming()
        };
        let timing = Timing {
            duration: config.tracing.duration,
            interval: Some(Duration::from_secs(1)),
        };
        let (visits, requests) = mpsc::unbounded_channel();
        eprintln!(
            "tcp-trace: serving http://{}/metrics and /healthz",
            config.listen
        );
        tokio::spawn(http::serve(listener, visits));
        source::live_visited(&settings, timing, &mut state, Some(requests)).await
    })
}
