//! Transitions as they happen: the kernel program's ring buffer, drained on
//! wake-ups and on a short timer until the run stops.

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tcp_trace_common::Filter;
use tokio::{
    io::unix::AsyncFd,
    sync::mpsc,
    time::{interval, MissedTickBehavior},
};

use super::{announce, next_tick, peers::Peers, ticker, Consumer, Stop, Timing, Totals};
use crate::{
    kernel::{Program, Settings},
    model,
    output::monotonic_ns,
    system::cgroup::Cgroups,
};

/// How often the reader drains the ring buffer without being woken. The kernel
/// wakes it only once an eighth of the ring is queued, so busy periods cost no
/// wake-up per event and quiet ones still show within this latency.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// A look into a live run from outside its loop (a scrape): run by the loop
/// between two drains, with the program and the totals as of now.
pub type Visit<C> = Box<dyn FnOnce(&Program, &Totals, &mut C) + Send>;

/// Streams live transitions into `consumer` until stopped, then prints the
/// summary on stderr.
pub async fn live(settings: &Settings, timing: Timing, consumer: &mut impl Consumer) -> Result<()> {
    live_visited(settings, timing, consumer, None).await
}

/// `live`, also running each `Visit` that arrives on `visits`.
pub async fn live_visited<C: Consumer>(
    settings: &Settings,
    timing: Timing,
    consumer: &mut C,
    mut visits: Option<mpsc::UnboundedReceiver<Visit<C>>>,
) -> Result<()> {
    let (mut program, events) = Program::attach(settings)?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd holds it.
    let mut events = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
    let mut stop = Stop::new(timing.duration)?;
    let mut drain_tick = interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report_tick = ticker(timing.interval);
    let mut totals = Totals::default();
    let mut reader = Reader {
        cgroups: Cgroups::new(),
        peers: Peers::default(),
        filter: settings.filter,
    };
    announce(&program.mechanism());
    if program.timewait_probes() {
        consumer.timewait_probes();
    }

    let streamed: Result<()> = async {
        consumer.start()?;
        consumer.flush()?;
        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard?;
                    guard.clear_ready();
                    reader.drain(guard.get_inner_mut(), consumer, &mut totals)?;
                }
                _ = drain_tick.tick() => {
                    reader.drain(events.get_mut(), consumer, &mut totals)?;
                    reader.release(Some(monotonic_ns()), consumer)?;
                    program.poll_owners();
                }
                _ = next_tick(&mut report_tick) => {
                    reader.drain(events.get_mut(), consumer, &mut totals)?;
                    totals.kernel = program.counters()?;
                    consumer.interval(monotonic_ns(), &totals)?;
                }
                Some(visit) = next_visit(&mut visits) => {
                    reader.drain(events.get_mut(), consumer, &mut totals)?;
                    totals.kernel = program.counters()?;
                    visit(&program, &totals, consumer);
                }
                _ = stop.wait() => break,
            }
        }
        Ok(())
    }
    .await;

    // Detach first: then the counters are final, and the last drain holds
    // everything the program streamed.
    let counters = program.stop();
    let streamed = streamed
        .and_then(|()| reader.drain(events.get_mut(), consumer, &mut totals))
        .and_then(|()| reader.release(None, consumer));
    totals.kernel = counters?;
    let finished = streamed.and_then(|()| consumer.finish(&totals));
    eprintln!("{}", totals.summary());
    finished
}

/// The next visit; never resolves without a channel, or once it closed.
async fn next_visit<C>(visits: &mut Option<mpsc::UnboundedReceiver<Visit<C>>>) -> Option<Visit<C>> {
    match visits {
        Some(rx) => match rx.recv().await {
            Some(visit) => Some(visit),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Turns ring-buffer records into transitions with their owners resolved
/// and their peers known.
struct Reader {
    /// Owners' cgroup ids to where they run.
    cgroups: Cgroups,
    peers: Peers,
    /// The user's filters, for transitions the kernel could not filter whole.
    filter: Filter,
}

impl Reader {
    fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        consumer: &mut impl Consumer,
        totals: &mut Totals,
    ) -> Result<()> {
        let mut any = false;
        while let Some(record) = ring.next() {
            any = true;
            if model::is_timewait(&record) {
                match model::decode_timewait(&record) {
                    Ok(e) => consumer.timewait(&e)?,
                    Err(_) => totals.undecodable += 1,
                }
                continue;
            }
            match model::decode(&record) {
                Ok(mut t) => {
                    totals.received += 1;
                    if let Some(owner) = t.owner.as_mut() {
                        owner.placement = self.cgroups.resolve(owner.cgroup_id);
                    }
                    self.peers
                        .pass(t, &self.filter, &mut |t| consumer.event(t))?;
                }
                Err(_) => totals.undecodable += 1,
            }
        }
        if any {
            consumer.flush()?;
        }
        Ok(())
    }

    /// Passes on the transitions that waited too long for their peer (see
    /// `Peers::release`).
    fn release(&mut self, now_ns: Option<u64>, consumer: &mut impl Consumer) -> Result<()> {
        let mut any = false;
        self.peers.release(now_ns, &self.filter, &mut |t| {
            any = true;
            consumer.event(t)
        })?;
        if any {
            consumer.flush()?;
        }
        Ok(())
    }
}
