//! The `replicast` binary: parse the command line and run the command.

use std::process::ExitCode;

use clap::Parser;
use replicast::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
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
