//! The `replicast` binary: parse the command line and run the command.

use std::process::ExitCode;

use clap::Parser;
use replicast::cli::Cli;

/// mimalloc rather than glibc's malloc: a replica allocates and frees small
/// buffers on every core for every message (HTTP/2 frames, receipts), and
/// glibc's arenas spent about 12 % of the origin's CPU on that under a
/// Publish load (perf, 3 replicas on 2 cores).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads() {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("replicast: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("replicast: {e:#}");
            ExitCode::FAILURE
        }
    }
}
