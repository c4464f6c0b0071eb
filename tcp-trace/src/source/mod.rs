//! Where transitions come from: the kernel's ring buffer (`live`) or a
//! recording (`replay`). Either way they flow one way into a `Consumer`.

mod live;
mod peers;
mod replay;
mod stop;

use anyhow::{Context as _, Result};

pub use live::{live, live_visited, Visit};
pub use replay::replay;
pub use stop::{next_tick, ticker, Stop};

use crate::{
    kernel,
    model::{TimewaitEvent, Transition},
};

/// A command's handling of transitions.
pub trait Consumer {
    /// Once tracing (or replay) begins: headers.
    fn start(&mut self) -> Result<()> {
        Ok(())
    }
    fn event(&mut self, t: &Transition) -> Result<()>;
    /// After each batch of events: flush output.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Every `--interval`; `now_ns` on the events' clock (monotonic), with
    /// what reached us and what did not so far.
    fn interval(&mut self, _now_ns: u64, _totals: &Totals) -> Result<()> {
        Ok(())
    }
    /// Once, at the end.
    fn finish(&mut self, _totals: &Totals) -> Result<()> {
        Ok(())
    }
    /// Before `start`, when the kernel's timewait functions are probed:
    /// timewait sockets then arrive through `timewait`.
    fn timewait_probes(&mut self) {}
    /// A timewait socket's entry, move to TIME_WAIT, or death.
    fn timewait(&mut self, _e: &TimewaitEvent) -> Result<()> {
        Ok(())
    }
}

/// What reached userspace and what did not.
#[derive(Clone, Copy, Debug, Default)]
pub struct Totals {
    pub received: u64,
    pub undecodable: u64,
    pub kernel: kernel::Counters,
}

impl Totals {
    /// Transitions lost anywhere: skipped by the kernel, lost to a full ring
    /// buffer, or not decodable.
    pub fn dropped(&self) -> u64 {
        self.kernel.skipped + self.kernel.ringbuf_full + self.kernel.read_failed + self.undecodable
    }

    pub fn summary(&self) -> String {
        format!(
            "tcp-trace: {} events received, {} dropped ({} skipped by the kernel while another \
             BPF program ran, {} ring buffer full, {} failed kernel reads, {} undecodable); \
             {} transitions of sockets first seen mid-life (duration unknown), \
             {} transitions after a missed one (duration unknown), \
             {} socket-map insert failures",
            self.received,
            self.dropped(),
            self.kernel.skipped,
            self.kernel.ringbuf_full,
            self.kernel.read_failed,
            self.undecodable,
            self.kernel.untracked,
            self.kernel.gaps,
            self.kernel.map_update_failed,
        )
    }
}

/// When a live run ends and how often it reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    pub duration: Option<std::time::Duration>,
    pub interval: Option<std::time::Duration>,
}

impl Timing {
    /// No interval reports; stop at `duration` if given.
    pub fn until(duration: Option<std::time::Duration>) -> Timing {
        Timing {
            duration,
            interval: None,
        }
    }
}

/// Runs a command's async part on a single-threaded runtime.
pub fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// The line that says tracing has begun, and how (tests and scripts wait
/// for its `tcp-trace: tracing ` prefix).
pub fn announce(how: &dyn std::fmt::Display) {
    eprintln!("tcp-trace: tracing {how}; Ctrl-C to stop");
}
