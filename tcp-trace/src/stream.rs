//! Where transitions come from: the kernel's ring buffer (live) or a
//! recording (replay). Either way they flow one way into a `Consumer`.

use std::{
    fs::File,
    io::{self, BufReader},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::{interval, Instant, MissedTickBehavior},
};

use tcp_trace_common::{Filter, AF_INET, AF_INET6};

use crate::{
    event::{self, Transition},
    load::{KernelCounters, Settings, Tracer},
    record,
    render::monotonic_ns,
    tracepoint,
};

/// How often the reader drains the ring buffer without being woken. The kernel
/// wakes it only once an eighth of the ring is queued, so busy periods cost no
/// wake-up per event and quiet ones still show within this latency.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// A command's handling of transitions.
pub trait Consumer {
    /// Once tracing (or replay) begins: headers.
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn event(&mut self, t: &Transition) -> io::Result<()>;
    /// After each batch of events: flush output.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Every `--interval`; `now_ns` on the events' clock (monotonic).
    fn interval(&mut self, _now_ns: u64) -> io::Result<()> {
        Ok(())
    }
    /// Once, at the end.
    fn finish(&mut self, _totals: &Totals) -> io::Result<()> {
        Ok(())
    }
}

/// What reached userspace and what did not.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub received: u64,
    pub undecodable: u64,
    pub kernel: KernelCounters,
}

impl Totals {
    pub fn dropped(&self) -> u64 {
        self.kernel.ringbuf_full + self.undecodable
    }

    pub fn summary(&self) -> String {
        format!(
            "tcp-trace: {} events received, {} dropped ({} ring buffer full, {} undecodable); \
             {} transitions of sockets first seen mid-life (owner/duration unknown), \
             {} socket-map insert failures",
            self.received,
            self.dropped(),
            self.kernel.ringbuf_full,
            self.undecodable,
            self.kernel.untracked,
            self.kernel.map_update_failed,
        )
    }
}

/// When a live run ends and how often it reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
}

impl Timing {
    /// No interval reports; stop at `duration` if given.
    pub fn until(duration: Option<Duration>) -> Timing {
        Timing {
            duration,
            interval: None,
        }
    }
}

pub fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// Resolves on SIGINT, SIGTERM or the end of `--duration`.
pub struct Stop {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    deadline: Option<Instant>,
}

impl Stop {
    pub fn new(duration: Option<Duration>) -> Result<Stop> {
        Ok(Stop {
            sigint: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            sigterm: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            deadline: duration.map(|d| Instant::now() + d),
        })
    }

    pub async fn wait(&mut self) {
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.sigint.recv() => {}
            _ = self.sigterm.recv() => {}
            _ = deadline => {}
        }
    }
}

/// A tick every `period`, or never.
pub async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub fn ticker(period: Option<Duration>) -> Option<tokio::time::Interval> {
    period.map(|p| {
        let mut t = tokio::time::interval_at(Instant::now() + p, p);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    })
}

pub fn announce() {
    eprintln!(
        "tcp-trace: tracing {}:{}; Ctrl-C to stop",
        tracepoint::CATEGORY,
        tracepoint::NAME
    );
}

/// Streams live transitions into `consumer` until stopped, then prints the
/// summary on stderr.
pub async fn live(settings: &Settings, timing: Timing, consumer: &mut impl Consumer) -> Result<()> {
    let (tracer, events) = Tracer::attach(settings)?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd holds it.
    let mut events = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
    let mut stop = Stop::new(timing.duration)?;
    let mut drain_tick = interval(DRAIN_INTERVAL);
    drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut report_tick = ticker(timing.interval);
    let mut totals = Totals::default();
    announce();

    let streamed: io::Result<()> = async {
        consumer.start()?;
        consumer.flush()?;
        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard?;
                    guard.clear_ready();
                    drain(guard.get_inner_mut(), consumer, &mut totals)?;
                }
                _ = drain_tick.tick() => drain(events.get_mut(), consumer, &mut totals)?,
                _ = next_tick(&mut report_tick) => {
                    drain(events.get_mut(), consumer, &mut totals)?;
                    consumer.interval(monotonic_ns())?;
                }
                _ = stop.wait() => break,
            }
        }
        // Whatever was queued before the stop still belongs to the output.
        drain(events.get_mut(), consumer, &mut totals)
    }
    .await;

    let counters = tracer.counters();
    drop(tracer); // detach before reporting
    totals.kernel = counters?;
    let finished = streamed.and_then(|()| consumer.finish(&totals));
    eprintln!("{}", totals.summary());
    match finished {
        // A closed pipe (`| head`) is a normal way to stop.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing output"),
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    consumer: &mut impl Consumer,
    totals: &mut Totals,
) -> io::Result<()> {
    let mut any = false;
    while let Some(record) = ring.next() {
        any = true;
        match event::decode(&record) {
            Ok(t) => {
                totals.received += 1;
                consumer.event(&t)?;
            }
            Err(_) => totals.undecodable += 1,
        }
    }
    if any {
        consumer.flush()?;
    }
    Ok(())
}

/// Feeds a recording into `consumer`; interval reports follow the events'
/// own clock, starting at the first event.
/// The kernel's filters, applied to replayed transitions.
pub fn matches(filter: &Filter, t: &Transition) -> bool {
    let family_ok = match filter.family {
        AF_INET => t.is_ipv4(),
        AF_INET6 => !t.is_ipv4(),
        _ => true,
    };
    family_ok
        && (filter.port == 0 || t.lport == filter.port || t.rport == filter.port)
        && (filter.lport == 0 || t.lport == filter.lport)
        && (filter.rport == 0 || t.rport == filter.rport)
        && (filter.pid == 0 || t.owner.as_ref().is_some_and(|o| o.pid == filter.pid))
}

pub fn replay(
    path: &Path,
    filter: &Filter,
    interval: Option<Duration>,
    consumer: &mut impl Consumer,
) -> Result<()> {
    let name = path.display().to_string();
    let file = File::open(path).with_context(|| format!("opening {name}"))?;
    let period = interval.map(|d| d.as_nanos() as u64);
    let mut next_report: Option<u64> = None;
    let mut totals = Totals::default();
    consumer.start().context("writing output")?;
    let result = record::read(BufReader::new(file), &name, |t| {
        if !matches(filter, &t) {
            return Ok(());
        }
        if let Some(period) = period {
            let due = *next_report.get_or_insert(t.ts_ns + period);
            if t.ts_ns >= due {
                consumer.interval(due)?;
                next_report = Some(due + period * ((t.ts_ns - due) / period + 1));
            }
        }
        totals.received += 1;
        consumer.event(&t)?;
        Ok(())
    });
    result?;
    consumer.flush().context("writing output")?;
    consumer.finish(&totals).context("writing output")
}
