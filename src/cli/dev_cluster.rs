//! `replicast dev-cluster`: N replicas on 127.0.0.1, 127.0.0.2, ... in this
//! process, discovering each other through a DNS server on loopback that
//! serves the headless name, exactly as they would through CoreDNS in a
//! cluster. Prints how to talk to it, then every delivery as it arrives.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use tokio::task::JoinSet;

use super::{CliError, client::delivery_json, connect, first_signal_of_two};
use crate::{
    config::{Config, ServeArgs},
    devdns::DevDns,
    loopback::bind_same_port,
    proto::v1::SubscribeRequest,
    server::ServerHandle,
};

/// The zone the dev DNS server is authoritative for.
const ZONE: &str = "replicast.local.";
/// The headless name, as a Service `replicast-headless` would have.
const HEADLESS: &str = "replicast-headless.replicast.local.";

/// `replicast dev-cluster` flags.
#[derive(Debug, clap::Args)]
pub struct DevClusterArgs {
    /// Number of replicas (on 127.0.0.1 .. 127.0.0.N).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub replicas: u8,
    /// Port every replica listens on (as in a Deployment: one port, many
    /// IPs). 0 picks a port that is free on every address.
    #[arg(long, default_value_t = 7420)]
    pub port: u16,
    /// Time between peer lookups.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub refresh_interval: Duration,
    /// Do not print deliveries (for benchmarks).
    #[arg(long)]
    pub quiet: bool,
    /// Serve each replica's Prometheus metrics on this port of its own
    /// address (127.0.0.N:PORT/metrics), as each pod would.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub metrics_port: Option<u16>,
    /// Serve each replica's HTTP/JSON API on this port of its own address
    /// (127.0.0.N:PORT), as each pod's sidecar would on its loopback.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub http_port: Option<u16>,
    /// Give each replica a webhook (repeatable): `{ip}` in the URL becomes
    /// the replica's own address, so each replica POSTs to its own app, as
    /// in a pod: --webhook 'http://{ip}:8000/events#topics=cache.*'.
    #[arg(long = "webhook")]
    pub webhooks: Vec<String>,
    /// Each replica's receipt waits for its app's 2xx (`serve --webhook-ack`).
    #[arg(long, requires = "webhooks")]
    pub webhook_ack: bool,
}

/// Runs the cluster until Ctrl-C or SIGTERM.
pub async fn run(args: DevClusterArgs) -> Result<ExitCode, CliError> {
    let dns = DevDns::start(IpAddr::V4(Ipv4Addr::LOCALHOST), ZONE).await?;
    let ips: Vec<IpAddr> = (1..=args.replicas)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
        .collect();
    dns.set_addresses(HEADLESS, &ips).await?;

    let listeners = bind_same_port(&ips, args.port).await.map_err(|e| {
        format!(
            "cannot listen on port {} of 127.0.0.1-{}: {e} (is another dev-cluster running? --port 0 picks a free port)",
            args.port, args.replicas
        )
    })?;
    let port = listeners[0].local_addr()?.port();
    let refresh_interval = humantime::format_duration(args.refresh_interval).to_string();
    let mut replicas = Vec::new();
    for listener in listeners {
        let listen = listener.local_addr()?;
        let mut per_replica: Vec<String> = Vec::new();
        if let Some(port) = args.metrics_port {
            per_replica.extend([
                "--metrics-listen".to_owned(),
                SocketAddr::new(listen.ip(), port).to_string(),
            ]);
        }
        if let Some(port) = args.http_port {
            per_replica.extend([
                "--http-listen".to_owned(),
                SocketAddr::new(listen.ip(), port).to_string(),
            ]);
        }
        for webhook in &args.webhooks {
            per_replica.extend([
                "--webhook".to_owned(),
                webhook.replace("{ip}", &listen.ip().to_string()),
            ]);
        }
        if args.webhook_ack {
            per_replica.push("--webhook-ack".to_owned());
        }
        let listen = listen.to_string();
        let dns_server = dns.addr().to_string();
        let flags = [
            "serve",
            "--listen",
            &listen,
            "--peers-dns",
            HEADLESS,
            "--dns-server",
            &dns_server,
            "--refresh-interval",
            &refresh_interval,
            // A developer's Ctrl-C should not wait out a production drain.
            "--drain-timeout",
            "1s",
        ];
        let serve = ServeArgs::try_parse_from(flags.into_iter().map(str::to_owned).chain(per_replica))?;
        let config = Config::try_from(serve)?;
        replicas.push(ServerHandle::start_on(config, listener));
    }

    print_banner(&ips, port, dns.addr(), &args);

    let mut printers = JoinSet::new();
    if !args.quiet {
        for ip in &ips {
            let addr = SocketAddr::new(*ip, port);
            printers.spawn(print_deliveries(addr));
        }
    }

    first_signal_of_two().await;
    eprintln!("\nstopping the cluster (Ctrl-C again to exit at once)…");
    printers.abort_all();
    // Together, as the pods of a deleted Deployment would: the whole
    // cluster takes one replica's shutdown bound, not N of them.
    for result in futures::future::join_all(replicas.into_iter().map(ServerHandle::shutdown)).await {
        result?;
    }
    dns.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn print_banner(ips: &[IpAddr], port: u16, dns: SocketAddr, args: &DevClusterArgs) {
    let quiet = args.quiet;
    let first = SocketAddr::new(ips[0], port);
    let last = SocketAddr::new(ips[ips.len() - 1], port);
    println!("replicast dev-cluster: {} replicas", ips.len());
    for ip in ips {
        let mut line = format!("  replica  {}", SocketAddr::new(*ip, port));
        if let Some(metrics) = args.metrics_port {
            line += &format!("  metrics http://{}/metrics", SocketAddr::new(*ip, metrics));
        }
        if let Some(http) = args.http_port {
            line += &format!("  http api http://{}", SocketAddr::new(*ip, http));
        }
        for webhook in &args.webhooks {
            line += &format!("  webhook {}", webhook.replace("{ip}", &ip.to_string()));
        }
        println!("{line}");
    }
    println!("  dns      {dns}  serving {HEADLESS} (A records, one per replica)");
    println!();
    println!("Try, in another terminal:");
    println!("  grpcurl -plaintext {first} list");
    println!(
        "  grpcurl -plaintext -d '{{\"topic\":\"demo\",\"payload\":\"aGVsbG8=\"}}' {first} replicast.v1.Replicast/Broadcast"
    );
    println!("  grpcurl -plaintext {first} grpc.health.v1.Health/Check");
    let me = std::env::args().next().unwrap_or_else(|| "replicast".to_owned());
    println!("  {me} send --to {last} --topic demo --data 'hello from the last replica'");
    println!("  {me} subscribe --to {first} --topic 'demo*'");
    println!("  {me} peers --to {first}");
    if quiet {
        println!("  {me} bench --to {first}");
        println!();
        println!("Deliveries are not printed (--quiet). Ctrl-C to stop.");
    } else {
        // Printing every delivery of a benchmark would measure the terminal.
        println!("  {me} bench --to {first}    (after restarting this cluster with --quiet)");
        println!();
        println!("Deliveries (Ctrl-C to stop):");
    }
}

/// Prints one replica's deliveries, reconnecting if its stream ends.
async fn print_deliveries(addr: SocketAddr) {
    let Ok(mut client) = connect(&addr.to_string()).await else {
        eprintln!("[{addr}] cannot connect to print deliveries");
        return;
    };
    let (mut after, mut incarnation) = (0, 0);
    loop {
        let request = SubscribeRequest {
            topics: vec![],
            after_sequence: after,
            incarnation,
            from_oldest: false,
        };
        let mut stream = match client.subscribe(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                eprintln!("[{addr}] subscribe failed: {}", status.message());
                return;
            }
        };
        while let Ok(Some(delivery)) = stream.message().await {
            (after, incarnation) = (delivery.sequence, delivery.incarnation);
            println!("[{addr}] {}", delivery_json(&delivery));
        }
    }
}
