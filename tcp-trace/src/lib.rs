//! tcp-trace: every TCP state transition on this host, timed and attributed.
//!
//! The binary's `main` calls `run`, which only wires: flags to a command's
//! config, the command's result to one error line and an exit code. The event
//! model is public for the fuzz targets (`fuzz/`); `owners`, the start-up scan
//! of who holds each TCP socket, for callers outside the commands.

mod aggregate;
mod cli;
mod commands;
mod kernel;
pub mod model;
mod output;
mod source;
mod system;

pub use system::owners;

use std::{io, process::ExitCode};

use clap::Parser as _;

use crate::{
    cli::{Cli, Command},
    commands::{
        bench_floor, doctor, generate_assets, handshake, life, serve, stats, timewait, top, watch,
    },
};

/// The whole program: parse the flags, run the command, report.
pub fn run() -> ExitCode {
    // One malloc arena: the agent's few threads do not need their own, and
    // each would hold on to memory (RSS) the main thread cannot reuse. And a
    // fixed mmap threshold: glibc raises it to the size of each large block
    // freed, after which the agent's big transient tables (a sock_diag
    // reading of a hundred thousand timewait sockets, every second) would
    // come from the heap and stay resident; mapped, they go back when freed.
    // SAFETY: mallopt only tunes glibc's allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let result = match Cli::parse().command {
        Command::Watch(args) => watch::run(args.into_config()),
        Command::Stats(args) => stats::run(args.into_config()),
        Command::Life(args) => life::run(args.into_config()),
        Command::Handshake(args) => handshake::run(args.into_config()),
        Command::Timewait(args) => timewait::run(args.into_config()),
        Command::Doctor(args) => doctor::run(args.into_config()),
        Command::Top(args) => top::run(args.into_config()),
        Command::Serve(args) => serve::run(args.into_config()),
        Command::BenchFloor { btf, timing } => bench_floor::run(match (btf, timing) {
            (true, _) => kernel::Floor::Btf,
            (_, true) => kernel::Floor::Timing,
            _ => kernel::Floor::Classic,
        }),
        Command::GenerateAssets(args) => generate_assets::run(&args.dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is a normal way to stop reading.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line, no backtrace.
            eprintln!("tcp-trace: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::BrokenPipe)
}
