//! The event model: what one TCP state transition is, once decoded from the
//! kernel's record or read back from a recording.

pub mod errno;
mod owner;
pub mod recording;
mod timewait;
mod transition;

pub use owner::{cgroup_within, Owner, OwnerSource, Placement};
pub use timewait::{decode_timewait, is_timewait, TimewaitChange, TimewaitEvent};
pub use transition::{decode, family, SockFields, TcpState, Transition};

#[cfg(test)]
pub use transition::{from_event, tests::sample_event};
