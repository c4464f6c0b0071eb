//! When a run stops (signals, `--duration`) and when it reports (`--interval`).

use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    time::{Instant, Interval, MissedTickBehavior},
};

/// Resolves on SIGINT, SIGTERM or the end of `--duration`.
pub struct Stop {
    sigint: Signal,
    sigterm: Signal,
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

/// A tick every `period` from one period from now, or `None` for never.
pub fn ticker(period: Option<Duration>) -> Option<Interval> {
    period.map(|p| {
        let mut t = tokio::time::interval_at(Instant::now() + p, p);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    })
}

/// The next tick of a `ticker`; never resolves for `None`.
pub async fn next_tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}
