//! `tcp-trace watch`: every transition, one line each.

use anyhow::Result;

use crate::{
    cli::WatchConfig,
    model::Transition,
    output::{transitions::Format, Sink},
    source::{self, Consumer, Timing},
};

struct Watch {
    format: Format,
    sink: Sink,
}

impl Consumer for Watch {
    fn start(&mut self) -> Result<()> {
        let format = &mut self.format;
        self.sink.write_with(|out| format.header(out))
    }

    fn event(&mut self, t: &Transition) -> Result<()> {
        let format = &mut self.format;
        self.sink.write_with(|out| format.write(out, t))
    }

    fn flush(&mut self) -> Result<()> {
        self.sink.flush()
    }
}

pub fn run(config: WatchConfig) -> Result<()> {
    let sink = Sink::stdout(config.json);
    let mut watch = Watch {
        format: Format::new(config.json, sink.clock),
        sink,
    };
    let settings = config.tracing.streaming();
    let timing = Timing::until(config.tracing.duration);
    source::block_on(source::live(&settings, timing, &mut watch))
}
