//! Keeps the TLS material current without a restart. Kubernetes updates a
//! mounted secret by swapping a `..data` symlink in its directory, so a
//! watch on the file itself goes dead after the first update: the
//! directories are watched, any event there re-reads all three files,
//! a poll catches what a watch misses (network filesystems, no inotify),
//! and SIGHUP reloads at once. A set is switched to only after it passed
//! every check of [`TlsMaterial::build`]; otherwise the last good set
//! stays and the reason is logged and counted. Connections already open
//! keep the material they were made with (`--max-connection-age` bounds
//! how long).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use notify::Watcher as _;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use rustls::{ClientConfig, ServerConfig};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{Instrument as _, info, warn};

use super::{
    identity::WorkloadIdentity,
    material::{ClientCerts, MaterialError, PemFiles, TlsMaterial},
};
use crate::{
    lifecycle::{Phase, PhaseRx},
    metrics::ReloadLabels,
};

/// Where the material is and how it is checked.
#[derive(Debug, Clone)]
pub struct TlsSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub identity: WorkloadIdentity,
    pub client_certs: ClientCerts,
    /// The fallback poll.
    pub poll_interval: Duration,
    pub handshake_timeout: Duration,
}

/// The TLS metrics, updated by the reload task and the acceptor.
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    pub reloads: Family<ReloadLabels, Counter>,
    /// Unix time this replica's certificate expires.
    pub cert_expiry: Gauge,
    /// Unix time the CA of the bundle that expires first expires.
    pub ca_expiry: Gauge,
    pub handshake_failures: Family<crate::metrics::HandshakeFailureLabels, Counter>,
}

/// Why the material could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsLoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] MaterialError),
}

/// The current configurations, for the acceptor and the dialer.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    pub server: watch::Receiver<Arc<ServerConfig>>,
    pub client: watch::Receiver<Arc<ClientConfig>>,
    /// When the certificate loaded at start-up expires.
    pub cert_not_after: SystemTime,
}

/// Loads the material (a bad set stops the start), then keeps it current
/// until the replica closes.
pub async fn spawn_tls_reload(
    source: TlsSource,
    metrics: TlsMetrics,
    phase: PhaseRx,
) -> Result<(TlsConfigs, JoinHandle<()>), TlsLoadError> {
    let files = read(&source).await?;
    let material = TlsMaterial::build(&files, &source.identity, source.client_certs, SystemTime::now())?;
    record_expiry(&metrics, &material);
    let (server_tx, server) = watch::channel(material.server.clone());
    let (client_tx, client) = watch::channel(material.client.clone());
    let configs = TlsConfigs {
        server,
        client,
        cert_not_after: material.cert_not_after,
    };
    let span = tracing::info_span!("tls_reload", cert = %source.cert.display());
    let task = tokio::spawn(
        async move {
            let (event_tx, mut events) = mpsc::channel::<()>(1);
            // Dropped (and its thread stopped) when the task ends.
            let _watcher = watch_directories(&source, event_tx);
            let mut hangups = hangups();
            let stopped = phase.reached(Phase::Closing);
            tokio::pin!(stopped);
            let mut last = files;
            loop {
                let trigger = tokio::select! {
                    () = &mut stopped => return,
                    Some(()) = events.recv() => {
                        // A secret update is several events: let it settle.
                        tokio::time::sleep(SETTLE).await;
                        while events.try_recv().is_ok() {}
                        "change"
                    }
                    Some(()) = recv_hangup(&mut hangups) => "SIGHUP",
                    () = tokio::time::sleep(source.poll_interval) => "poll",
                };
                let files = match read(&source).await {
                    Ok(files) => files,
                    Err(error) => {
                        // Mid-update, a file can be briefly missing.
                        warn!(%error, trigger, "cannot read the TLS files; keeping the current certificates");
                        metrics
                            .reloads
                            .get_or_create(&ReloadLabels { result: "unreadable" })
                            .inc();
                        continue;
                    }
                };
                if files == last {
                    if trigger == "SIGHUP" {
                        info!("SIGHUP: the TLS files are unchanged");
                    }
                    continue;
                }
                match TlsMaterial::build(&files, &source.identity, source.client_certs, SystemTime::now()) {
                    Ok(material) => {
                        record_expiry(&metrics, &material);
                        server_tx.send_replace(material.server.clone());
                        client_tx.send_replace(material.client.clone());
                        metrics
                            .reloads
                            .get_or_create(&ReloadLabels { result: "loaded" })
                            .inc();
                        info!(
                            trigger,
                            expires = %crate::timestamp::rfc3339_seconds(material.cert_not_after),
                            "TLS certificates reloaded: new connections use them"
                        );
                        last = files;
                    }
                    Err(error) => {
                        metrics
                            .reloads
                            .get_or_create(&ReloadLabels { result: "rejected" })
                            .inc();
                        warn!(%error, trigger, "new TLS files refused; keeping the current certificates");
                        // Not retried until a file changes again.
                        last = files;
                    }
                }
            }
        }
        .instrument(span),
    );
    Ok((configs, task))
}

/// How long after a change event the files are read.
const SETTLE: Duration = Duration::from_millis(100);

async fn read(source: &TlsSource) -> Result<PemFiles, TlsLoadError> {
    async fn one(path: &Path) -> Result<Vec<u8>, TlsLoadError> {
        tokio::fs::read(path).await.map_err(|source| TlsLoadError::Read {
            path: path.to_owned(),
            source,
        })
    }
    Ok(PemFiles {
        cert: one(&source.cert).await?,
        key: one(&source.key).await?,
        ca: one(&source.ca).await?,
    })
}

fn record_expiry(metrics: &TlsMetrics, material: &TlsMaterial) {
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    };
    metrics.cert_expiry.set(unix(material.cert_not_after));
    metrics.ca_expiry.set(unix(material.ca_not_after));
}

/// Watches the directories holding the files; `None` (and a warning) where
/// the platform cannot, in which case the poll alone finds changes.
fn watch_directories(source: &TlsSource, events: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let dirs: BTreeSet<PathBuf> = [&source.cert, &source.key, &source.ca]
        .into_iter()
        .map(|path| match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    // Runs on notify's thread: never blocks, a full channel already holds
    // a pending reload.
    // Reads (this task's own included) are not changes: without the
    // filter, every reload would trigger the next.
    let handler = move |event: notify::Result<notify::Event>| {
        let is_change = match &event {
            Ok(event) => !matches!(event.kind, notify::EventKind::Access(_)),
            Err(_) => true,
        };
        if is_change {
            let _ = events.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(watcher) => watcher,
        Err(error) => {
            warn!(%error, poll = ?source.poll_interval, "cannot watch the TLS directories; polling only");
            return None;
        }
    };
    for dir in &dirs {
        if let Err(error) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            warn!(%error, dir = %dir.display(), poll = ?source.poll_interval, "cannot watch a TLS directory; polling it");
        }
    }
    Some(watcher)
}

#[cfg(unix)]
fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP; the TLS files reload on change and by polling only");
            None
        }
    }
}

#[cfg(unix)]
async fn recv_hangup(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn hangups() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn recv_hangup(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}
