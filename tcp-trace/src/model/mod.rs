//! The event model: what one TCP state transition is, once decoded from the
//! kernel's record or read back from a recording.

pub mod errno;
pub mod recording;
mod transition;

pub use transition::{decode, family, Owner, SockFields, TcpState, Transition};

#[cfg(test)]
pub use transition::{from_event, tests::sample_event};
