//! tcp-trace: every TCP state transition on this host, timed and attributed.

mod btf;
mod calibrate;
mod cli;
mod diag;
mod event;
mod handshake;
mod hist;
mod life;
mod load;
mod record;
mod render;
mod stats;
mod stream;
mod timewait;
mod tracepoint;
mod watch;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // One malloc arena: the agent's few threads do not need their own, and
    // each would hold on to memory (RSS) the main thread cannot reuse.
    // SAFETY: mallopt only tunes glibc's allocator.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Watch(args) => watch::run(args.into_config()),
        cli::Command::Stats(args) => stats::run(args.into_config()),
        cli::Command::Life(args) => life::run(args.into_config()),
        cli::Command::Handshake(args) => handshake::run(args.into_config()),
        cli::Command::Timewait(args) => timewait::run(args.into_config()),
        cli::Command::BenchFloor => stream::block_on(load::floor(None)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line, no backtrace.
            eprintln!("tcp-trace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
