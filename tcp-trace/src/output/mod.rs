//! The one output layer every command writes through: a buffered stdout that
//! takes JSON values or text, and the cells and scales they are built from.

pub mod bars;
pub mod clock;
pub mod text;
pub mod transitions;

use std::io::{self, BufWriter, StdoutLock, Write};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

pub use clock::{monotonic_ns, Clock};

use crate::aggregate::Histogram;

const WRITING: &str = "writing output";

/// Buffered stdout in one of two forms: JSON lines for programs, or text for
/// people (with the wall clock to print times in).
pub struct Sink {
    out: BufWriter<StdoutLock<'static>>,
    json: bool,
    pub clock: Clock,
}

impl Sink {
    pub fn stdout(json: bool) -> Sink {
        Sink {
            out: BufWriter::with_capacity(1 << 16, io::stdout().lock()),
            json,
            clock: Clock::now(),
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// One JSON value on a line of its own.
    pub fn json_line(&mut self, value: &Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, value)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"))
            .context(WRITING)
    }

    pub fn text(&mut self, text: &str) -> Result<()> {
        self.out.write_all(text.as_bytes()).context(WRITING)
    }

    /// Per-event output formatted in place into the buffer.
    pub fn write_with(
        &mut self,
        write: impl FnOnce(&mut BufWriter<StdoutLock<'static>>) -> io::Result<()>,
    ) -> Result<()> {
        write(&mut self.out).context(WRITING)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().context(WRITING)
    }

    /// A whole report: the JSON value or the text, whichever this sink
    /// writes (only that one is built), then flushed.
    pub fn report(
        &mut self,
        json: impl FnOnce() -> Value,
        text: impl FnOnce(&Clock) -> String,
    ) -> Result<()> {
        if self.json {
            self.json_line(&json())?;
        } else {
            let text = text(&self.clock);
            self.text(&text)?;
        }
        self.flush()
    }
}

/// Count, p50, p90, p99 and max of a histogram, in ns (`null` when empty).
pub fn quantiles_json(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50_ns": h.quantile(0.50),
        "p90_ns": h.quantile(0.90),
        "p99_ns": h.quantile(0.99),
        "max_ns": (h.count() > 0).then(|| h.max()),
    })
}

/// An owner's `pid` and `comm` as JSON (`null` when unknown). The name is
/// the process's own bytes, made valid UTF-8, never terminal-escaped.
pub fn owner_json(owner: Option<&crate::model::Owner>) -> (Value, Value) {
    match owner {
        Some(o) => (json!(o.pid), json!(String::from_utf8_lossy(&o.comm))),
        None => (Value::Null, Value::Null),
    }
}

/// Adds where an owner came from and where it runs to a JSON object:
/// `owner_source`, `cgroup`, `unit`, `container`, `pod_uid` (`null` when
/// unknown), the fields `watch --json` carries too.
pub fn add_owner_origin(line: &mut Value, owner: Option<&crate::model::Owner>) {
    let placement = owner.and_then(|o| o.placement.as_deref());
    line["owner_source"] = json!(owner.map(|o| o.source.name()));
    line["cgroup"] = json!(placement.map(|p| &p.cgroup));
    line["unit"] = json!(placement.and_then(|p| p.unit.as_ref()));
    line["container"] = json!(placement.and_then(|p| p.container.as_ref()));
    line["pod_uid"] = json!(placement.and_then(|p| p.pod_uid.as_ref()));
}
