//! Incoming TLS connections for tonic's `serve_with_incoming`: tonic 0.14's
//! own TLS cannot change certificates while serving, so the handshake runs
//! here, with the server configuration current at each accept. Handshakes
//! run concurrently (a slow client holds only its own), each bounded by a
//! timeout, and at most [`MAX_HANDSHAKES`] at once.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument as _, debug, warn};

use crate::metrics::HandshakeFailureLabels;

/// Handshakes in progress at most; further connections wait in the
/// listener's backlog.
pub const MAX_HANDSHAKES: usize = 512;
/// At most one warning per this interval about failed handshakes (the
/// metric counts every one).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The stream tonic serves.
pub type TlsIncoming = ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// Accepts on `listener` until `stopped`, handing each connection that
/// completes its handshake to the returned stream.
pub fn spawn_acceptor(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    handshake_timeout: Duration,
    failures: Family<HandshakeFailureLabels, Counter>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> (TlsIncoming, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(
        async move {
            let mut handshakes = JoinSet::new();
            let mut warned_at: Option<Instant> = None;
            let mut suppressed = 0u64;
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    () = &mut stopped => return,
                    accepted = listener.accept(), if handshakes.len() < MAX_HANDSHAKES => {
                        let (tcp, remote) = match accepted {
                            Ok(accepted) => accepted,
                            Err(error) => {
                                // Out of file descriptors, most likely:
                                // back off instead of spinning.
                                warn!(%error, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        };
                        configure(&tcp);
                        let acceptor = tokio_rustls::TlsAcceptor::from(configs.borrow().clone());
                        handshakes.spawn(async move {
                            let result = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                            (remote, result)
                        });
                    }
                    Some(done) = handshakes.join_next() => {
                        let Ok((remote, result)) = done else { continue };
                        match result {
                            Ok(Ok(stream)) => {
                                if tx.send(Ok(stream)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(Err(error)) => {
                                let reason = reason(&error);
                                failures.get_or_create(&HandshakeFailureLabels { reason }).inc();
                                report(&mut warned_at, &mut suppressed, remote, reason, &error.to_string());
                            }
                            Err(_) => {
                                failures.get_or_create(&HandshakeFailureLabels { reason: "timeout" }).inc();
                                let error = format!("no handshake within {handshake_timeout:?}");
                                report(&mut warned_at, &mut suppressed, remote, "timeout", &error);
                            }
                        }
                    }
                }
            }
        }
        .instrument(tracing::info_span!("tls_acceptor")),
    );
    (ReceiverStream::new(rx), task)
}

/// TCP_NODELAY (see the connector) and keepalive, as tonic's own listener
/// sets them.
fn configure(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}

/// The metric label of a failed handshake.
fn reason(error: &std::io::Error) -> &'static str {
    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidMessage(_)) => "not_tls",
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            "client_certificate"
        }
        Some(rustls::Error::AlertReceived(_)) => "alert",
        Some(rustls::Error::NoApplicationProtocol) => "no_h2",
        Some(_) => "tls",
        None => "io",
    }
}

fn report(
    warned_at: &mut Option<Instant>,
    suppressed: &mut u64,
    remote: SocketAddr,
    reason: &str,
    error: &str,
) {
    debug!(%remote, reason, error, "TLS handshake failed");
    if warned_at.is_some_and(|at| at.elapsed() < WARN_EVERY) {
        *suppressed += 1;
        return;
    }
    warn!(
        %remote,
        reason,
        error,
        others_since_last_warning = *suppressed,
        "TLS handshake failed (replicast_tls_handshake_failures_total counts them all)"
    );
    *warned_at = Some(Instant::now());
    *suppressed = 0;
}
