//! `tcp-trace bench-floor` (hidden): an empty program on the tracepoint, the
//! floor `cargo xtask bench` measures every mode against.

use anyhow::Result;

use crate::{kernel, source};

pub fn run() -> Result<()> {
    source::block_on(async {
        let _attached = kernel::attach_floor()?;
        source::announce(&format_args!(
            "{}:{} with an empty program (the benchmark's floor)",
            kernel::tracefs::CATEGORY,
            kernel::tracefs::NAME
        ));
        source::Stop::new(None)?.wait().await;
        Ok(())
    })
}
