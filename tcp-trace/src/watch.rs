//! `tcp-trace watch`: every transition, one line each.

use std::io::{self, BufWriter, StdoutLock, Write as _};

use anyhow::Result;

use crate::{
    cli::WatchConfig,
    event::Transition,
    load::Settings,
    render::{Clock, Format},
    stream::{self, Consumer, Timing},
};

struct Watch {
    format: Format,
    out: BufWriter<StdoutLock<'static>>,
}

impl Consumer for Watch {
    fn start(&mut self) -> io::Result<()> {
        self.format.header(&mut self.out)
    }

    fn event(&mut self, t: &Transition) -> io::Result<()> {
        self.format.write(&mut self.out, t)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

pub fn run(config: WatchConfig) -> Result<()> {
    let mut watch = Watch {
        format: Format::new(config.json, Clock::now()),
        out: BufWriter::with_capacity(1 << 16, io::stdout().lock()),
    };
    let settings = Settings::streaming(config.filter, config.max_sockets);
    let timing = Timing::until(config.duration);
    stream::block_on(stream::live(&settings, timing, &mut watch))
}
