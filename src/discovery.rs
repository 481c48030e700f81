//! Peer discovery: who the other replicas are.
//!
//! A background task resolves the configured source (a headless Service's A/AAAA
//! records, its SRV records, or a static list) once, then again every
//! `--refresh-interval`, and publishes each result as a full [`PeerSnapshot`]
//! on a `watch` channel. Requests never wait on DNS: they read the latest
//! snapshot. A failed lookup keeps the last good set and marks it stale; an
//! empty answer (a headless Service with no ready pods) is an empty set, not an
//! error.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::{NetError, runtime::TokioRuntimeProvider},
    proto::rr::RData,
};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

/// Where the peer set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSource {
    /// A fixed list (`--static-peers`); empty means a cluster of one.
    Static(Vec<SocketAddr>),
    /// A and AAAA records of a headless Service; every address listens on `port`.
    Dns { name: String, port: u16 },
    /// SRV records (`_grpc._tcp.NAME`): each target with its own port.
    Srv { name: String },
}

impl PeerSource {
    /// How ListPeers and logs name the source, e.g. `dns:replicast-headless.default.svc.cluster.local`.
    pub fn describe(&self) -> String {
        match self {
            Self::Static(_) => "static".to_owned(),
            Self::Dns { name, .. } => format!("dns:{name}"),
            Self::Srv { name } => format!("srv:{name}"),
        }
    }
}

/// Discovery settings, from the configuration.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub source: PeerSource,
    /// Query this server instead of the ones in /etc/resolv.conf.
    pub dns_server: Option<SocketAddr>,
    /// Time between lookups.
    pub refresh_interval: Duration,
}

/// One published view of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// Replica addresses, sorted and without duplicates. May or may not include
    /// this replica: the fan-out always delivers to itself in-process.
    pub peers: Vec<SocketAddr>,
    /// At least one lookup has succeeded; before that `peers` means nothing.
    pub ready: bool,
    /// When the last successful lookup finished.
    pub resolved_at: Option<SystemTime>,
    /// The last lookup failed; `peers` is the last good set.
    pub stale: bool,
    /// Why the last lookup failed, when it did.
    pub last_error: Option<String>,
}

/// The running discovery task. Dropping it stops the task; [`Self::shutdown`]
/// also waits for it.
#[derive(Debug)]
pub struct Discovery {
    snapshot_rx: watch::Receiver<Arc<PeerSnapshot>>,
    source_name: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Counters of lookups, for metrics (cheap clones of shared atomics).
#[derive(Debug, Clone, Default)]
pub struct LookupCounters {
    pub lookups: prometheus_client::metrics::counter::Counter,
    pub failures: prometheus_client::metrics::counter::Counter,
}

/// Starts resolving `config.source` in the background.
pub fn spawn_discovery(
    config: DiscoveryConfig,
    counters: LookupCounters,
) -> Result<Discovery, DiscoveryError> {
    let resolver = match &config.source {
        PeerSource::Static(_) => None,
        PeerSource::Dns { .. } | PeerSource::Srv { .. } => Some(build_resolver(config.dns_server)?),
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(PeerSnapshot::default()));
    let stop = CancellationToken::new();
    let source_name = config.source.describe();
    let span = tracing::info_span!("discovery", source = %source_name);
    let task =
        tokio::spawn(refresh_loop(resolver, config, snapshot_tx, counters, stop.clone()).instrument(span));
    Ok(Discovery {
        snapshot_rx,
        source_name,
        stop,
        task: Some(task),
    })
}

impl Discovery {
    /// A receiver of every published snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PeerSnapshot>> {
        self.snapshot_rx.clone()
    }

    /// e.g. `dns:replicast-headless.default.svc.cluster.local`.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Stops the refresh loop and waits for it to end.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // The loop only ends by cancellation; a JoinError would be a panic
            // already reported by the runtime.
            let _ = task.await;
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot build the DNS resolver: {0}")]
    Resolver(#[source] NetError),
}

fn build_resolver(dns_server: Option<SocketAddr>) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = match dns_server {
        Some(server) => {
            let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut name_server.connections {
                connection.port = server.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio().map_err(DiscoveryError::Resolver)?,
    };
    let options = builder.options_mut();
    // A headless Service may publish IPv4 and IPv6 pod addresses: take both.
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Fail fast: the loop retries on its own schedule, and a failed lookup
    // keeps the last good set.
    options.timeout = Duration::from_secs(2);
    options.attempts = 1;
    builder.build().map_err(DiscoveryError::Resolver)
}

async fn refresh_loop(
    resolver: Option<TokioResolver>,
    config: DiscoveryConfig,
    snapshot_tx: watch::Sender<Arc<PeerSnapshot>>,
    counters: LookupCounters,
    stop: CancellationToken,
) {
    let source_name = config.source.describe();
    loop {
        let result = tokio::select! {
            result = resolve(resolver.as_ref(), &config.source) => result,
            () = stop.cancelled() => return,
        };
        counters.lookups.inc();
        if result.is_err() {
            counters.failures.inc();
        }
        let previous = snapshot_tx.borrow().clone();
        let next = next_snapshot(&previous, result, SystemTime::now());
        log_change(&source_name, &previous, &next);
        let ready = next.ready;
        snapshot_tx.send_replace(Arc::new(next));
        // Until the first success, retry sooner: requests are waiting for it.
        let wait = if ready {
            config.refresh_interval
        } else {
            config.refresh_interval.min(Duration::from_millis(500))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Folds one lookup result into the previous snapshot (pure, tested).
fn next_snapshot(
    previous: &PeerSnapshot,
    result: Result<Vec<SocketAddr>, String>,
    now: SystemTime,
) -> PeerSnapshot {
    match result {
        Ok(peers) => {
            let peers: BTreeSet<SocketAddr> = peers.into_iter().collect();
            PeerSnapshot {
                peers: peers.into_iter().collect(),
                ready: true,
                resolved_at: Some(now),
                stale: false,
                last_error: None,
            }
        }
        Err(error) => PeerSnapshot {
            stale: previous.ready,
            last_error: Some(error),
            ..previous.clone()
        },
    }
}

fn log_change(source: &str, previous: &PeerSnapshot, next: &PeerSnapshot) {
    if next.peers != previous.peers || next.ready != previous.ready {
        info!(source, peers = ?next.peers, "peer set changed");
    }
    match (&previous.last_error, &next.last_error) {
        (None, Some(error)) => warn!(source, %error, "peer lookup failed; keeping the last good peer set"),
        (Some(_), None) => info!(source, "peer lookup recovered"),
        (Some(_), Some(error)) => debug!(source, %error, "peer lookup still failing"),
        (None, None) => {}
    }
}

async fn resolve(resolver: Option<&TokioResolver>, source: &PeerSource) -> Result<Vec<SocketAddr>, String> {
    let resolver = match (source, resolver) {
        (PeerSource::Static(peers), _) => return Ok(peers.clone()),
        (_, Some(resolver)) => resolver,
        (_, None) => return Err("no resolver configured".to_owned()),
    };
    // The resolver's cache would hide pods that came or went; discovery has its
    // own schedule, so every refresh asks the server.
    resolver.clear_cache();
    match source {
        PeerSource::Static(_) => unreachable!("handled above"),
        PeerSource::Dns { name, port } => lookup_ips(resolver, name)
            .await
            .map(|ips| ips.into_iter().map(|ip| SocketAddr::new(ip, *port)).collect()),
        PeerSource::Srv { name } => {
            let lookup = match resolver.srv_lookup(name.as_str()).await {
                Ok(lookup) => lookup,
                Err(e) if e.is_no_records_found() => return Ok(Vec::new()),
                Err(e) => return Err(format!("SRV lookup of {name} failed: {e}")),
            };
            let mut peers = Vec::new();
            for record in lookup.answers() {
                if let RData::SRV(srv) = &record.data {
                    let target = srv.target.to_string();
                    for ip in lookup_ips(resolver, &target).await? {
                        peers.push(SocketAddr::new(ip, srv.port));
                    }
                }
            }
            Ok(peers)
        }
    }
}

async fn lookup_ips(resolver: &TokioResolver, name: &str) -> Result<Vec<std::net::IpAddr>, String> {
    match resolver.lookup_ip(name).await {
        Ok(lookup) => Ok(lookup.iter().collect()),
        // No ready pods: the headless Service has no records. Not an error.
        Err(e) if e.is_no_records_found() => Ok(Vec::new()),
        Err(e) => Err(format!("lookup of {name} failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn success_sorts_dedups_and_clears_staleness() {
        let prev = PeerSnapshot {
            stale: true,
            last_error: Some("x".into()),
            ..Default::default()
        };
        let next = next_snapshot(
            &prev,
            Ok(vec![
                addr("127.0.0.2:1"),
                addr("127.0.0.1:1"),
                addr("127.0.0.2:1"),
            ]),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(next.peers, vec![addr("127.0.0.1:1"), addr("127.0.0.2:1")]);
        assert!(next.ready && !next.stale && next.last_error.is_none());
    }

    #[test]
    fn failure_keeps_last_good_set_and_marks_stale() {
        let good = next_snapshot(
            &PeerSnapshot::default(),
            Ok(vec![addr("127.0.0.1:1")]),
            SystemTime::UNIX_EPOCH,
        );
        let failed = next_snapshot(&good, Err("SERVFAIL".into()), SystemTime::now());
        assert_eq!(failed.peers, good.peers);
        assert!(failed.stale && failed.ready);
        assert_eq!(
            failed.resolved_at, good.resolved_at,
            "resolved_at is the last success"
        );
        assert_eq!(failed.last_error.as_deref(), Some("SERVFAIL"));
    }

    #[test]
    fn failure_before_first_success_is_not_ready_and_not_stale() {
        let failed = next_snapshot(&PeerSnapshot::default(), Err("refused".into()), SystemTime::now());
        assert!(!failed.ready && !failed.stale);
    }

    #[test]
    fn empty_answer_is_an_empty_ready_set() {
        let next = next_snapshot(&PeerSnapshot::default(), Ok(vec![]), SystemTime::now());
        assert!(next.ready && next.peers.is_empty());
    }
}
