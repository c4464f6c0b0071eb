//! Kernel plumbing: finding the tracepoint, resolving kernel struct offsets,
//! loading and attaching the program, and reading its maps back.

mod btf;
mod calibrate;
mod owners;
mod privileges;
mod probe;
mod program;
mod requirements;
mod storage;
mod sums;
mod timewait;
pub mod tracefs;

pub use program::{attach_floor, Counters, Floor, Program, Settings, RING_BYTES};
pub use sums::KernelSums;
