//! Any bytes as a recording: read or refused with an error, never a panic,
//! within bounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|recording: &[u8]| {
    let _ = tcp_trace::model::recording::read(recording, "fuzz", |_| Ok(()));
});
