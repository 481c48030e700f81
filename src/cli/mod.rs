//! The command line: `serve`, `dev-cluster` and the client commands.

mod bench;
mod client;
mod dev_cluster;

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::{
    config::{Config, ServeArgs, TlsFlags},
    error::error_chain,
    proto::v1::replicast_client::ReplicastClient,
    server,
    telemetry::{self, LogFormat, TelemetryArgs},
    tls::{Dialer, cli_client_config},
};

pub use self::{
    bench::BenchArgs,
    client::{PeersArgs, SendArgs, SubscribeArgs},
    dev_cluster::DevClusterArgs,
};

/// Deliver a message to every replica of a workload, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "replicast", version, about)]
pub struct Cli {
    /// Log output: text on a terminal and JSON otherwise (auto), or forced.
    /// Filter with RUST_LOG (e.g. RUST_LOG=replicast=debug).
    #[arg(
        long,
        global = true,
        env = "REPLICAST_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    log_format: LogFormat,

    /// Threads that run this process's tasks (a replica's, or a client
    /// command's). Defaults to the CPUs the process may use (a container's
    /// CPU limit counts). Set it when replicas share a machine's cores
    /// (several on one node, a benchmark): more threads than cores only add
    /// context switches.
    #[arg(long, global = true, env = "REPLICAST_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,

    /// Token the client commands send (`authorization: Bearer <token>`), for
    /// replicas started with --tokens-file. Prefer the environment variable:
    /// a flag shows in the process list.
    #[arg(long, global = true, env = "REPLICAST_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run one replica.
    Serve {
        #[command(flatten)]
        replica: ServeArgs,
        #[command(flatten)]
        telemetry: TelemetryArgs,
    },
    /// Run a local cluster of N replicas on 127.0.0.1, 127.0.0.2, ... that
    /// find each other through a DNS server on loopback.
    DevCluster {
        #[command(flatten)]
        cluster: DevClusterArgs,
        #[command(flatten)]
        telemetry: TelemetryArgs,
    },
    /// Broadcast one message and print a receipt per replica.
    Send(SendArgs),
    /// Print the deliveries of one replica as JSON lines.
    Subscribe(SubscribeArgs),
    /// Print a replica's view of the cluster.
    Peers(PeersArgs),
    /// Measure Broadcast latency and throughput against a running cluster.
    Bench(BenchArgs),
    /// Client tokens for --tokens-file.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `replicast token ...`
#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Reads a token from standard input and prints its line for the tokens
    /// file (fill in publish= and subscribe=).
    Hash {
        /// The client's name in the tokens file.
        #[arg(long)]
        client: String,
    },
    /// Makes a random token: prints it on the first line, and its line for
    /// the tokens file on the second.
    New {
        /// The client's name in the tokens file.
        #[arg(long)]
        client: String,
    },
}

/// A failed command, printed by `main`.
pub type CliError = Box<dyn std::error::Error + Send + Sync>;

impl Cli {
    /// The `--worker-threads` the runtime is built with (`None`: as many as
    /// the process may use).
    pub fn worker_threads(&self) -> Option<usize> {
        self.worker_threads.map(std::num::NonZeroUsize::get)
    }

    /// Runs the command; the exit code says whether it succeeded.
    pub async fn run(self) -> Result<ExitCode, CliError> {
        match self.command {
            Command::Serve { replica, telemetry } => {
                let config = Config::try_from(replica)?;
                let telemetry = telemetry::init(self.log_format, &telemetry, &config.advertise.to_string())?;
                let listener = TcpListener::bind(config.listen)
                    .await
                    .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
                let served = server::serve(config, listener, first_signal_of_two()).await;
                telemetry.shutdown().await;
                served?;
                Ok(ExitCode::SUCCESS)
            }
            Command::DevCluster { cluster, telemetry } => {
                let telemetry = telemetry::init(self.log_format, &telemetry, "dev-cluster")?;
                let result = dev_cluster::run(cluster).await;
                telemetry.shutdown().await;
                result
            }
            command => {
                telemetry::init_logging(self.log_format);
                let credentials = Credentials::new(self.token.as_deref())?;
                CREDENTIALS
                    .set(credentials)
                    .map_err(|_| "credentials are set once per process")?;
                if let Some(flags) = command.tls_flags() {
                    DIALER
                        .set(client_dialer(flags)?)
                        .map_err(|_| "the TLS settings are set once per process")?;
                }
                command.run_client().await
            }
        }
    }
}

impl Command {
    /// The TLS flags of a client command.
    fn tls_flags(&self) -> Option<&TlsFlags> {
        match self {
            Command::Send(args) => Some(&args.tls),
            Command::Subscribe(args) => Some(&args.tls),
            Command::Peers(args) => Some(&args.tls),
            Command::Bench(args) => Some(&args.tls),
            _ => None,
        }
    }

    async fn run_client(self) -> Result<ExitCode, CliError> {
        match self {
            Command::Serve { .. } | Command::DevCluster { .. } => unreachable!("servers are run by Cli::run"),
            Command::Send(args) => client::send(args).await,
            Command::Subscribe(args) => client::subscribe(args).await,
            Command::Peers(args) => client::peers(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Token(TokenCommand::Hash { client }) => {
                let mut token = String::new();
                std::io::stdin()
                    .read_line(&mut token)
                    .map_err(|e| format!("cannot read the token from standard input: {e}"))?;
                let token = token.trim();
                if token.is_empty() {
                    return Err("no token on standard input".into());
                }
                println!("{}", crate::auth::digest_line(&client, token));
                Ok(ExitCode::SUCCESS)
            }
            Command::Token(TokenCommand::New { client }) => {
                use base64::Engine as _;
                let token =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
                println!("{token}");
                println!("{}", crate::auth::digest_line(&client, &token));
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Resolves on the first SIGTERM or Ctrl-C, which starts a graceful
/// shutdown; a second one exits the process at once (exit code 130).
///
/// The handlers are installed before this returns, not when a task first
/// runs: a SIGTERM that arrives right after start-up must not kill the
/// process with the default action.
pub fn first_signal_of_two() -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut signals = StopSignals::install();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    // Lives until the process exits: it is what makes the second signal work.
    tokio::spawn(async move {
        signals.next().await;
        let _ = first_tx.send(());
        signals.next().await;
        eprintln!("replicast: second signal, exiting now");
        std::process::exit(130);
    });
    async move {
        // Err only if the task is gone, i.e. the runtime is shutting down.
        let _ = first_rx.await;
    }
}

/// SIGTERM (Kubernetes stopping the pod) and SIGINT (Ctrl-C), installed
/// when created.
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next stop signal.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
                match signal {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.term) => {}
                () = recv(&mut self.interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The token the client commands send, set once from `--token`.
static CREDENTIALS: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();
/// How the client commands connect, from their TLS flags.
static DIALER: std::sync::OnceLock<Dialer> = std::sync::OnceLock::new();

/// The client side of the TLS flags: --tls-ca and --tls-identity turn TLS
/// on (the server must hold the identity); --tls-cert and --tls-key add a
/// client certificate.
fn client_dialer(flags: &TlsFlags) -> Result<Dialer, CliError> {
    if !flags.any() {
        return Ok(Dialer::Plain);
    }
    let (Some(ca), Some(identity)) = (&flags.tls_ca, &flags.tls_identity) else {
        return Err(
            "TLS needs --tls-ca and --tls-identity (the identity the replica's certificate holds)".into(),
        );
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|e| CliError::from(format!("cannot read {}: {e}", path.display())))
    };
    let own = match (&flags.tls_cert, &flags.tls_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    let config = cli_client_config(
        &read(ca)?,
        identity,
        own.as_ref().map(|(cert, key)| (cert.as_slice(), key.as_slice())),
    )?;
    Ok(Dialer::fixed(config))
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Credentials {
    fn new(token: Option<&str>) -> Result<Self, CliError> {
        token
            .map(|token| {
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| CliError::from("--token must be printable ASCII"))
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the client commands.
pub type Client = ReplicastClient<InterceptedService<Channel, Credentials>>;

/// Connects a client to `addr` (`host:port` or a URL).
pub async fn connect(addr: &str) -> Result<Client, CliError> {
    let dialer = DIALER.get().cloned().unwrap_or_default();
    // A URL's scheme says nothing the TLS flags do not.
    let authority = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let endpoint = Dialer::endpoint(authority)
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(3));
    let channel = dialer
        .connect(endpoint)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {}", error_chain(&e)))?;
    let credentials = CREDENTIALS.get().cloned().unwrap_or_default();
    Ok(ReplicastClient::with_interceptor(channel, credentials)
        .max_decoding_message_size(256 * 1024 * 1024)
        .max_encoding_message_size(256 * 1024 * 1024))
}
