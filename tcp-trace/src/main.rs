//! The `tcp-trace` binary: everything lives in the library (src/lib.rs).

fn main() -> std::process::ExitCode {
    tcp_trace::run()
}
