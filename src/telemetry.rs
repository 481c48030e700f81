//! Logging setup. (Traces and metrics arrive with OpenTelemetry.)

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber: `RUST_LOG`-style filtering (default
/// `info`, with the HTTP/2 stack quieter), human-readable output on stderr.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,h2=warn,hyper=warn,tower=warn,hickory_proto=warn,hickory_net=warn,hickory_server=warn",
        )
    });
    // A second init (tests) is harmless: the first subscriber stays.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .try_init();
}
