//! `tcp-trace bench-floor` (hidden): the floors `cargo xtask bench` measures
//! every mode against: an empty program on the tracepoint, or one that only
//! times each socket's states.

use anyhow::Result;

use crate::{
    cli::DEFAULT_MAX_SOCKETS,
    kernel::{self, Floor},
    source,
};

pub fn run(floor: Floor) -> Result<()> {
    source::block_on(async {
        // Sized as the tracing commands size theirs by default.
        let _attached = kernel::attach_floor(floor, DEFAULT_MAX_SOCKETS)?;
        source::announce(&format_args!(
            "{}:{} with {} (the benchmark's floor)",
            kernel::tracefs::CATEGORY,
            kernel::tracefs::NAME,
            match floor {
                Floor::Classic => "an empty classic tracepoint program",
                Floor::Btf => "an empty BTF tracepoint program",
                Floor::Timing => "a classic program that only times each socket's states",
            }
        ));
        source::Stop::new(None)?.wait().await;
        Ok(())
    })
}
