//! Helpers for tests that load the real program and drive real connections.
//!
//! Every test shares the kernel with the others running in parallel: each
//! picks ports of its own and asserts only on sockets using them.

// Each test binary uses its own subset; as an inner attribute of this module
// the allow covers every submodule below too.
#![allow(dead_code)]

mod agent;
mod cgroup;
mod container;
mod http;
mod net;
mod nft;
mod nginx;
mod peer;
mod prometheus;
mod py;
mod scratch;
mod tracefs;

// Flat re-exports keep the tests' `use common::...` lines short; a binary that
// uses nothing from one module would otherwise warn about its glob.
#[allow(unused_imports)]
pub use {
    agent::*, cgroup::*, container::*, http::*, net::*, nft::*, nginx::*, peer::*, prometheus::*,
    py::*, scratch::*, tracefs::*,
};

/// How far apart two agents' programs may stamp the same transition: each
/// reads the clock itself, microseconds apart on a host; in an emulated
/// guest (the VM tests set `TCP_TRACE_EMULATED=1`) a vCPU can stall for
/// milliseconds between them (2.4 ms seen on 6.12 under TCG).
pub fn stamp_jitter_ns() -> u64 {
    if std::env::var_os("TCP_TRACE_EMULATED").is_some() {
        5_000_000
    } else {
        10_000
    }
}
