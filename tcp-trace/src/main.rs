//! tcp-trace: every TCP state transition on this host, timed and attributed.

mod calibrate;
mod cli;
mod event;
mod load;
mod render;
mod tracepoint;
mod watch;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Watch(args) => watch::run(args.into_config()),
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
