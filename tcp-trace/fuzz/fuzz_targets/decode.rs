//! Any bytes handed over as a ring-buffer record: decoded or refused, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    if let Ok(t) = tcp_trace::model::decode(record) {
        // What decodes must also survive the trip through the recording format.
        let mut line = Vec::new();
        tcp_trace::model::recording::write(&mut line, &t).expect("writing to memory");
        let mut back = Vec::new();
        tcp_trace::model::recording::read(&line[..], "fuzz", |t| {
            back.push(t);
            Ok(())
        })
        .ok();
    }
});
