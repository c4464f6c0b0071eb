//! `tcp-trace timewait`: which processes leave sockets in TIME_WAIT, and for how long.
//!
//! The tracepoint never shows TIME_WAIT: a closing socket goes `FIN_WAIT2` (or
//! `CLOSING`) `-> CLOSE` and a timewait mini-socket lives on. A reset or an
//! abort looks the same, so such a transition only makes a *candidate*
//! (carrying the socket's owner), and a socket with an error (`ECONNRESET`,
//! `EPIPE`) none at all. sock_diag then confirms it: a candidate counts as an
//! entry once the kernel lists its 4-tuple as a timewait socket in TIME_WAIT,
//! and its stay ends when the kernel no longer lists it. Sockets of other
//! network namespaces (containers, pods) are looked for in their own
//! namespace's table, read through a process known to be in it.

mod ledger;
mod report;
mod tracker;

use anyhow::Result;
use tcp_trace_common::state;

use crate::{
    aggregate::GroupBy,
    cli::TimewaitConfig,
    kernel::Settings,
    model::{TimewaitEvent, Transition},
    output::Sink,
    source::{self, Consumer, Timing, Totals},
    system::sysctl::read_timewait_sysctls,
};
use ledger::POLL;
pub use ledger::{remote_key, RemoteKey};
pub use tracker::Tracker;

struct TimewaitCommand {
    tracker: Tracker,
    /// `--by`: rows per container, unit or cgroup instead of per process.
    by: Option<GroupBy>,
    sink: Sink,
    /// Report every this many ticks of `POLL`.
    report_every: u32,
    ticks: u32,
}

impl TimewaitCommand {
    fn report(&mut self, now_ns: u64, last: bool, totals: &Totals) -> Result<()> {
        // The readings recount lingering sockets per owner; the probes'
        // records do not (a recount per record would cost a busy host).
        self.tracker.ledger.refresh();
        let sysctls = read_timewait_sysctls();
        let (ledger, by, dropped) = (&self.tracker.ledger, self.by, totals.dropped());
        self.sink.report(
            || report::json(ledger, by, now_ns, last, &sysctls, dropped),
            |clock| report::text(ledger, by, now_ns, last, &sysctls, dropped, clock),
        )
    }
}

impl Consumer for TimewaitCommand {
    fn start(&mut self) -> Result<()> {
        self.tracker.start()
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        self.tracker.event(t);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.tracker.apply_pending()
    }

    fn interval(&mut self, now_ns: u64, totals: &Totals) -> Result<()> {
        self.tracker.apply_pending()?;
        self.ticks += 1;
        if self.ticks.is_multiple_of(self.report_every) {
            self.report(now_ns, false, totals)?;
        }
        Ok(())
    }

    fn finish(&mut self, totals: &Totals) -> Result<()> {
        let taken = self.tracker.finish()?;
        self.report(taken, true, totals)
    }

    fn timewait_probes(&mut self) {
        self.tracker.use_probes();
    }

    fn timewait(&mut self, e: &TimewaitEvent) -> Result<()> {
        self.tracker.timewait(e);
        Ok(())
    }
}

pub fn run(config: TimewaitConfig) -> Result<()> {
    let report_every = (config.interval.as_secs_f64() / POLL.as_secs_f64())
        .round()
        .max(1.0) as u32;
    let mut command = TimewaitCommand {
        tracker: Tracker::new(config.tracing.filter)?,
        by: config.by,
        sink: Sink::stdout(config.json),
        report_every,
        ticks: 0,
    };
    // Only the transitions that can leave a timewait socket reach userspace.
    let close_from = (1 << state::FIN_WAIT2) | (1 << state::CLOSING);
    let filter = tcp_trace_common::Filter {
        close_from,
        ..config.tracing.filter
    };
    let settings = Settings {
        filter,
        timewait: Some(POLL),
        ..config.tracing.streaming()
    };
    let timing = Timing {
        duration: config.tracing.duration,
        interval: Some(POLL),
    };
    source::block_on(source::live(&settings, timing, &mut command))
}

#[cfg(test)]
mod tests {
    use super::ledger::{Ledger, Reading, CANDIDATE_POLLS};
    use super::*;
    use crate::{
        model::{from_event, sample_event, SockFields, TcpState, TimewaitChange},
        output::Clock,
        system::{
            sock_diag::{Endpoints, TimewaitSocket},
            sysctl::Sysctls,
        },
    };

    fn close(lport: u16, old: &str, pid: u32, error: u16) -> Transition {
        let mut t = from_event(&sample_event()).unwrap();
        t.lport = lport;
        t.old_state = TcpState::from_name(old).unwrap();
        t.new_state = TcpState::from_name("CLOSE").unwrap();
        t.owner.as_mut().unwrap().pid = pid;
        t.sock = Some(SockFields {
            bytes_sent: 0,
            bytes_received: 0,
            error,
        });
        t
    }

    fn listed(t: &Transition, time_wait: bool) -> TimewaitSocket {
        TimewaitSocket {
            endpoints: Endpoints {
                laddr: t.laddr,
                lport: t.lport,
                raddr: t.raddr,
                rport: t.rport,
            },
            time_wait,
        }
    }

    const S: u64 = 1_000_000_000;
    /// The network namespace of `sample_event`'s sockets, the agent's here.
    const HOST: u32 = 4026531840;

    impl Ledger {
        /// A reading of the agent's own namespace alone.
        fn poll_host(&mut self, listed: &[TimewaitSocket], now_ns: u64) {
            let reading = Reading {
                netns: HOST,
                sockets: listed.to_vec(),
            };
            self.poll(&[reading], now_ns);
        }
    }

    #[test]
    fn each_namespace_confirms_its_own_sockets() {
        const POD: u32 = 4026532999;
        const GONE: u32 = 4026533000;
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        // The same endpoints closing in the host and in a pod.
        let on_host = close(40_021, "FIN_WAIT2", 5, 0);
        let mut in_pod = close(40_021, "FIN_WAIT2", 6, 0);
        in_pod.netns = Some(POD);
        let mut unread = close(40_022, "FIN_WAIT2", 7, 0);
        unread.netns = Some(GONE);
        for t in [&on_host, &in_pod, &unread] {
            tr.event(t);
        }
        assert_eq!(tr.foreign_namespaces(), [POD, GONE].into_iter().collect());
        // The host lists nothing; the pod's own table lists its socket.
        for tick in 1..=CANDIDATE_POLLS as u64 {
            let pod = Reading {
                netns: POD,
                sockets: vec![listed(&in_pod, true)],
            };
            let host = Reading {
                netns: HOST,
                sockets: vec![],
            };
            tr.poll(&[host, pod], tick * S);
        }
        let row = |pid: u32| {
            tr.rows
                .get(&(pid, b"curl".to_vec()))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!((row(5).entered, row(5).without_timewait), (0, 1));
        assert_eq!((row(6).entered, row(6).lingering), (1, 1));
        assert_eq!(row(7).without_timewait, 0, "its namespace was never read");
        assert_eq!(tr.out_of_reach, 1);
        assert_eq!(tr.lingering_by_netns(), [(POD, 1)].into_iter().collect());
    }

    #[test]
    fn confirmed_entries_and_exits_are_charged_to_the_owner() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        let a = close(40_001, "FIN_WAIT2", 7, 0);
        let b = close(40_002, "CLOSING", 7, 0);
        tr.event(&a);
        tr.event(&b);
        tr.poll_host(&[listed(&a, true), listed(&b, true)], S);
        let row = tr.rows.get(&(7, b"curl".to_vec())).unwrap();
        assert_eq!((row.entered, row.lingering), (2, 2));
        // 60 s later the kernel reaps them.
        tr.poll_host(&[], 61 * S);
        let row = tr.rows.get(&(7, b"curl".to_vec())).unwrap();
        assert_eq!((row.entered, row.lingering, row.stay.count()), (2, 0, 2));
        let p50 = row.stay.quantile(0.5).unwrap();
        assert!((59 * S..=61 * S).contains(&p50), "{p50}");
    }

    #[test]
    fn resets_and_unlisted_closes_are_not_entries() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        tr.event(&close(40_003, "FIN_WAIT2", 8, 104)); // reset: not even a candidate
        tr.event(&close(40_004, "FIN_WAIT2", 8, 0)); // never listed
        assert_eq!(tr.candidates(), 1);
        for i in 1..=CANDIDATE_POLLS as u64 {
            tr.poll_host(&[], i * S);
        }
        let row = tr.rows.get(&(8, b"curl".to_vec())).unwrap();
        assert_eq!((row.entered, row.without_timewait), (0, 1));
        // Not a timewait-looking transition at all.
        tr.event(&close(40_005, "ESTABLISHED", 8, 0));
        assert!(tr.candidates() == 0);
    }

    #[test]
    fn readings_taken_before_a_close_do_not_refute_it() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        let mut late = close(40_008, "FIN_WAIT2", 8, 0);
        late.ts_ns = 10 * S;
        tr.event(&late);
        // Readings queued before the close, applied after its event.
        for i in 1..=CANDIDATE_POLLS as u64 {
            tr.poll_host(&[], i * S);
        }
        assert_eq!(tr.candidates(), 1, "still a candidate");
        tr.poll_host(&[listed(&late, true)], 11 * S);
        assert_eq!(tr.rows.get(&(8, b"curl".to_vec())).unwrap().entered, 1);
    }

    #[test]
    fn fin_wait2_substate_counts_once_it_reaches_time_wait() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        let a = close(40_006, "FIN_WAIT2", 9, 0);
        tr.event(&a);
        tr.poll_host(&[listed(&a, false)], S);
        assert_eq!(
            tr.rows.get(&(9, b"curl".to_vec())).map_or(0, |r| r.entered),
            0
        );
        tr.poll_host(&[listed(&a, true)], 2 * S);
        assert_eq!(tr.rows.get(&(9, b"curl".to_vec())).unwrap().entered, 1);
    }

    #[test]
    fn a_close_read_after_its_socket_was_listed_is_still_ours() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        let late = close(40_031, "FIN_WAIT2", 5, 0);
        // Listed before its CLOSE event arrives: unattributed for now.
        tr.poll_host(&[listed(&late, true)], S);
        assert_eq!(tr.unattributed.len(), 1);
        tr.event(&late);
        tr.poll_host(&[listed(&late, true)], 2 * S);
        assert!(tr.unattributed.is_empty());
        assert_eq!(tr.rows.get(&(5, b"curl".to_vec())).unwrap().entered, 1);
        assert_eq!(tr.lingering_total(), 1, "counted once");
    }

    #[test]
    fn by_container_folds_the_processes_of_one_container() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        let in_container = std::sync::Arc::new(crate::model::Placement {
            cgroup: "/docker/ab".into(),
            container: Some("ab".into()),
            ..Default::default()
        });
        let mut closes = Vec::new();
        for (port, pid) in [(40_011, 5), (40_012, 6), (40_013, 7)] {
            let mut t = close(port, "FIN_WAIT2", pid, 0);
            if pid != 7 {
                t.owner.as_mut().unwrap().placement = Some(in_container.clone());
            }
            tr.event(&t);
            closes.push(listed(&t, true));
        }
        tr.poll_host(&closes, S);
        let v = report::json(
            &tr,
            Some(GroupBy::Container),
            S,
            false,
            &read_timewait_sysctls(),
            0,
        );
        let groups = v["groups"].as_array().unwrap();
        let entered = |key: &str| {
            groups
                .iter()
                .find(|g| g["key"] == key)
                .unwrap_or_else(|| panic!("no group {key}: {v}"))["entered"]
                .as_u64()
        };
        assert_eq!(groups.len(), 2, "{v}");
        assert_eq!(entered("ab"), Some(2));
        assert_eq!(
            entered("unknown"),
            Some(1),
            "no placement resolved for pid 7"
        );
        let text = report::text(
            &tr,
            Some(GroupBy::Container),
            S,
            false,
            &read_timewait_sysctls(),
            0,
            &Clock::with_offset(0),
        );
        assert!(text.contains("CONTAINER"), "{text}");
    }

    /// A record of the timewait kprobes about `t`'s socket.
    fn probed(
        t: &Transition,
        change: TimewaitChange,
        time_wait: bool,
        ts_ns: u64,
    ) -> TimewaitEvent {
        TimewaitEvent {
            ts_ns,
            tw: 0xffff_0000 + u64::from(t.lport),
            netns: HOST,
            laddr: t.laddr,
            lport: t.lport,
            raddr: t.raddr,
            rport: t.rport,
            change,
            time_wait,
        }
    }

    #[test]
    fn probes_claim_sockets_by_their_close_and_time_stays_exactly() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.use_probes();
        tr.poll_host(&[], 0);
        let row = |tr: &Ledger, pid: u32| {
            tr.rows
                .get(&(pid, b"curl".to_vec()))
                .cloned()
                .unwrap_or_default()
        };
        // The timewait socket is hashed just before its socket's CLOSE.
        let a = close(40_041, "FIN_WAIT2", 5, 0);
        tr.timewait(&probed(&a, TimewaitChange::Entry, false, S));
        assert_eq!(tr.unattributed.len(), 1, "no owner until its close");
        tr.event(&a);
        assert!(tr.unattributed.is_empty());
        assert_eq!(row(&tr, 5).entered, 0, "still in the FIN_WAIT2 substate");
        // The peer's FIN re-arms it in TIME_WAIT.
        tr.timewait(&probed(&a, TimewaitChange::Rearmed, true, S + 40));
        tr.refresh();
        assert_eq!((row(&tr, 5).entered, row(&tr, 5).lingering), (1, 1));
        // A SYN reuses it 2 s and 7 ns after it was hashed.
        tr.timewait(&probed(&a, TimewaitChange::Exit, true, 3 * S + 7));
        tr.refresh();
        let r = row(&tr, 5);
        assert_eq!(
            (r.lingering, r.stay.count(), r.stay.max()),
            (0, 1, 2 * S + 7)
        );
        // A close without a timewait socket hashed before it.
        tr.event(&close(40_042, "FIN_WAIT2", 5, 0));
        assert_eq!(row(&tr, 5).without_timewait, 1);
        // Created in TIME_WAIT; an exit of another socket on the same
        // endpoints (an older one) does not end it.
        let b = close(40_043, "CLOSING", 6, 0);
        tr.timewait(&probed(&b, TimewaitChange::Entry, true, 4 * S));
        tr.event(&b);
        let mut stale = probed(&b, TimewaitChange::Exit, true, 5 * S);
        stale.tw += 1;
        tr.timewait(&stale);
        tr.refresh();
        assert_eq!((row(&tr, 6).entered, row(&tr, 6).lingering), (1, 1));
        // Unclaimed sockets (another namespace's, unowned) come and go.
        let mut c = probed(&b, TimewaitChange::Entry, true, 6 * S);
        c.netns = 4026532999;
        tr.timewait(&c);
        assert_eq!(tr.lingering_by_netns()[&4026532999], 1);
        c.change = TimewaitChange::Exit;
        tr.timewait(&c);
        assert_eq!(tr.lingering_total(), 1);
    }

    #[test]
    fn sockets_from_before_start_are_not_guessed() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        let old = close(40_007, "FIN_WAIT2", 1, 0);
        tr.poll_host(&[listed(&old, true)], 0);
        let v = report::json(&tr, None, S, false, &read_timewait_sysctls(), 0);
        assert_eq!(v["before_start"]["lingering"], 1);
        assert_eq!(v["processes"].as_array().unwrap().len(), 0);
        assert_eq!(v["lingering_total"], 1);
    }

    #[test]
    fn port_pressure_warns() {
        let mut tr = Ledger::new(Default::default(), 0, (32768, 60999), HOST);
        tr.poll_host(&[], 0);
        let mut listed_now = Vec::new();
        for port in 40_000..40_060 {
            let t = close(port, "FIN_WAIT2", 3, 0);
            tr.event(&t);
            listed_now.push(listed(&t, true));
        }
        tr.poll_host(&listed_now, S);
        let sysctls = Sysctls {
            values: vec![("ip_local_port_range", "40000-40099".into())],
            port_range: Some((40_000, 40_099)),
        };
        let text = report::text(&tr, None, S, false, &sysctls, 7, &Clock::with_offset(0));
        assert!(
            text.contains("warning: 60 lingering sockets to 10.1.2.3:80 hold 60 %"),
            "{text}"
        );
        assert!(
            text.contains("7 transitions dropped"),
            "what was missed is said: {text}"
        );
    }
}
