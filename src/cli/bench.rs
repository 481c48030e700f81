//! `replicast bench`.
use std::process::ExitCode;

use super::CliError;

/// `replicast bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub to: String,
}

pub async fn run(_args: BenchArgs) -> Result<ExitCode, CliError> {
    Err("not yet".into())
}
