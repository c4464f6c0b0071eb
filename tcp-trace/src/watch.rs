//! `tcp-trace watch`: stream every transition from the ring buffer to stdout.

use std::{
    io::{self, BufWriter, Write},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    time::{interval, sleep, MissedTickBehavior},
};

use crate::{
    cli::WatchConfig,
    event,
    load::{Settings, Tracer},
    render::{Clock, Format},
    tracepoint,
};

/// How often the reader drains the ring buffer without being woken. The kernel
/// wakes it only once an eighth of the ring is queued, so busy periods cost no
/// wake-up per event and quiet ones still show within this latency.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// What the reader saw, for the summary at exit.
#[derive(Debug, Default)]
struct Tally {
    received: u64,
    decode_failed: u64,
}

pub fn run(config: WatchConfig) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(watch(config))
}

async fn watch(config: WatchConfig) -> Result<()> {
    let (tracer, events) = Tracer::attach(&Settings {
        filter: config.filter,
        max_sockets: config.max_sockets,
    })?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged
    // for as long as the AsyncFd holds it.
    let mut events = unsafe { AsyncFd::register(events) }.context("polling the ring buffer")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let deadline = async {
        match config.duration {
            Some(d) => sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut format = Format::new(config.json, Clock::now());
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut tally = Tally::default();
    eprintln!(
        "tcp-trace: tracing {}:{}; Ctrl-C to stop",
        tracepoint::CATEGORY,
        tracepoint::NAME
    );

    let streamed: io::Result<()> = async {
        format.header(&mut out)?;
        out.flush()?;
        loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard?;
                    guard.clear_ready();
                    drain(guard.get_inner_mut(), &mut format, &mut out, &mut tally)?;
                }
                _ = tick.tick() => drain(events.get_mut(), &mut format, &mut out, &mut tally)?,
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut deadline => break,
            }
        }
        // Whatever was queued before the stop still belongs to the output.
        drain(events.get_mut(), &mut format, &mut out, &mut tally)
    }
    .await;

    let counters = tracer.counters();
    drop(tracer); // detach before reporting
    let counters = counters?;
    eprintln!(
        "tcp-trace: {} events received, {} dropped ({} ring buffer full, {} undecodable); \
         {} transitions of sockets first seen mid-life (owner/duration unknown), \
         {} socket-map insert failures",
        tally.received,
        counters.ringbuf_full + tally.decode_failed,
        counters.ringbuf_full,
        tally.decode_failed,
        counters.untracked,
        counters.map_update_failed,
    );
    match streamed {
        // A closed pipe (`| head`) is a normal way to stop.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing events"),
    }
}

/// Writes out every record queued in the ring buffer, then flushes.
fn drain(
    ring: &mut RingBuf<MapData>,
    format: &mut Format,
    out: &mut impl Write,
    tally: &mut Tally,
) -> io::Result<()> {
    let mut any = false;
    while let Some(record) = ring.next() {
        any = true;
        match event::decode(&record) {
            Ok(t) => {
                tally.received += 1;
                format.write(out, &t)?;
            }
            Err(_) => tally.decode_failed += 1,
        }
    }
    if any {
        out.flush()?;
    }
    Ok(())
}
