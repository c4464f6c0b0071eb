//! The commands, one module each: flags in (a config from `cli`), a report out.

pub mod bench_floor;
pub mod doctor;
pub mod generate_assets;
pub mod handshake;
pub mod life;
pub mod serve;
pub mod stats;
pub mod timewait;
pub mod top;
pub mod watch;
