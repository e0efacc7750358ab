//! `amity`: the one binary every Amity user runs.
//!
//! Each subcommand is a thin shell over a library crate (`amity-coordinator`, `amity-worker`,
//! `amity-planner`, ...): argument parsing and error reporting live here, the work lives there.

mod bench;
mod ca_cmd;
mod cli;
mod corpus_cmd;
mod demo;
mod doctor_cmd;
mod federated_cmd;
mod heap;
mod logging;
mod members_cmd;
mod plan_cmd;
mod plot;
mod release_cmd;
mod status_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::Parser;

/// burn's CPU backend allocates and frees many same-sized buffers every step; mimalloc reuses
/// them instead of faulting fresh pages in (measured in `amity bench train-step`). It counts
/// heap bytes only when a bench asks ([`heap`]).
#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// `mi_option_purge_delay` in the mimalloc sources that `libmimalloc-sys` bundles (`mimalloc.h`,
/// enum `mi_option_e`: 15 in v3, which it builds by default, as in v2); the crate has no named
/// constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Never hand freed pages back to the OS: a training step frees and reallocates the same
    // few-MiB buffers, and purging them made the kernel zero fresh pages every step (about 7%
    // of a tiny-preset step; `amity bench train-step` ran about 12% faster without purging).
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args = cli::Cli::parse();
    // The demo and the benches print their own progress lines; the libraries' INFO lines would
    // bury them (`-v` or `RUST_LOG` bring them back).
    let own_progress = matches!(args.command, cli::Command::Demo(_) | cli::Command::Bench(_));
    let format = args.log_format;
    logging::init(args.verbose, own_progress, format);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if format == logging::LogFormat::Json => {
            tracing::error!("{err:#}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
