//! `tcp-trace bench-floor` (hidden): an empty program on the tracepoint, the
//! floor `cargo xtask bench` measures every mode against.

use anyhow::Result;

use crate::{kernel, source};

pub fn run(btf: bool) -> Result<()> {
    source::block_on(async {
        let _attached = kernel::attach_floor(btf)?;
        source::announce(&format_args!(
            "{}:{} with an empty {} program (the benchmark's floor)",
            kernel::tracefs::CATEGORY,
            kernel::tracefs::NAME,
            if btf {
                "BTF tracepoint"
            } else {
                "classic tracepoint"
            }
        ));
        source::Stop::new(None)?.wait().await;
        Ok(())
    })
}
