//! Transitions read back from a recording (`watch --json` output).

use std::{fs::File, io::BufReader, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use tcp_trace_common::Filter;

use super::{Consumer, Totals};
use crate::model::recording;

/// Feeds a recording into `consumer`, applying the kernel's filters (and
/// `--cgroup` to the owners' recorded cgroup paths); interval reports follow
/// the events' own clock, starting at the first event.
pub fn replay(
    path: &Path,
    filter: &Filter,
    cgroup: Option<&str>,
    interval: Option<Duration>,
    consumer: &mut impl Consumer,
) -> Result<()> {
    let name = path.display().to_string();
    let file = File::open(path).with_context(|| format!("opening {name}"))?;
    let period = interval.map(|d| d.as_nanos() as u64);
    let mut next_report: Option<u64> = None;
    let mut totals = Totals::default();
    consumer.start()?;
    recording::read(BufReader::new(file), &name, |t| {
        if !t.passes(filter) || !cgroup.is_none_or(|c| t.owner_in_cgroup(c)) {
            return Ok(());
        }
        if let Some(period) = period {
            let due = *next_report.get_or_insert(t.ts_ns.saturating_add(period));
            if t.ts_ns >= due {
                consumer.interval(due, &totals)?;
                let periods = (t.ts_ns - due) / period + 1;
                next_report = Some(due.saturating_add(period.saturating_mul(periods)));
            }
        }
        totals.received += 1;
        consumer.event(&t)
    })?;
    consumer.flush()?;
    consumer.finish(&totals)
}
