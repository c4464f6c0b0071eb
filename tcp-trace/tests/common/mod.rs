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

// Flat re-exports keep the tests' `use common::...` lines short; a binary that
// uses nothing from one module would otherwise warn about its glob.
#[allow(unused_imports)]
pub use {
    agent::*, cgroup::*, container::*, http::*, net::*, nft::*, nginx::*, peer::*, prometheus::*,
    py::*, scratch::*,
};
