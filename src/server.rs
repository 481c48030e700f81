//! Server assembly: wires discovery, local delivery and fan-out to the gRPC
//! services, serves on a bound listener until told to stop, then drains.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{Instrument, error, info, warn};

use crate::{
    config::Config,
    discovery::{DiscoveryError, LookupCounters, spawn_discovery},
    fanout::{BacklogBudget, Connect, FanOut, Link, LinkConfig, PeerLink},
    local::LocalDelivery,
    metrics::{Metrics, ReplicaState, StateCollector},
    oversize::OversizeLayer,
    proto::{self, replica::replicast_server::ReplicastServer},
    service::{ReplicastService, ServiceConfig},
    telemetry::GrpcTraceLayer,
};

/// Why a replica could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot listen for metrics on {addr} (--metrics-listen): {source}")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs one replica on `listener` until `shutdown` resolves, then shuts down
/// in order: a drain of `drain_timeout` (health NOT_SERVING, Broadcast
/// refused, deliveries and Subscribe still served), then the close (local
/// delivery closed, streams ended after their last deliveries, what is left
/// given the close grace), background hops drained, discovery stopped.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Bound first: a bad --metrics-listen fails before anything starts.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let metrics = Metrics::default();
    let discovery = spawn_discovery(
        config.discovery.clone(),
        LookupCounters {
            lookups: metrics.dns_lookups.clone(),
            failures: metrics.dns_failures.clone(),
        },
    )?;
    let local = Arc::new(LocalDelivery::new(config.local));
    let link_config = LinkConfig {
        peer_timeout: config.peer_timeout,
        max_frame_bytes: config.max_frame_bytes(),
        redelivery_window: config.redelivery_window,
    };
    let budget = BacklogBudget::new(config.redelivery_max_bytes);
    let connect: Connect = {
        let (budget, metrics) = (budget.clone(), metrics.clone());
        Box::new(move |peer| {
            Arc::new(PeerLink::spawn(peer, link_config, budget.clone(), &metrics)) as Arc<dyn Link>
        })
    };
    let fanout = Arc::new(FanOut::new(
        config.advertise,
        local.clone(),
        config.max_concurrent_broadcasts,
        config.peer_timeout,
        budget,
        connect,
        metrics.clone(),
    ));
    let stopping = CancellationToken::new();
    // Cancelled when the drain period ends (see the shutdown phases below).
    let closing_token = CancellationToken::new();

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let membership = spawn_membership(
        discovery.subscribe(),
        fanout.clone(),
        health.clone(),
        stopping.clone(),
    );

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let service = ReplicastService::new(
        ServiceConfig {
            self_addr: config.advertise,
            source_name: discovery.source_name().to_owned(),
            broadcast_timeout: config.broadcast_timeout,
            peer_timeout: config.peer_timeout,
            max_message_bytes: config.max_message_bytes,
            publish_window: config.publish_window,
            stopping: stopping.clone(),
            closing: closing_token.clone(),
        },
        local.clone(),
        fanout.clone(),
        metrics.clone(),
    );
    let metrics_endpoint = metrics_listener.map(|listener| {
        info!(addr = ?listener.local_addr().ok(), "serving metrics at /metrics");
        let (local, fanout, peers_rx) = (local.clone(), fanout.clone(), discovery.subscribe());
        let registry = metrics.registry(StateCollector::new(move || {
            let snapshot = peers_rx.borrow().clone();
            let ring = local.ring_occupancy();
            ReplicaState {
                redelivery_backlog: fanout.redelivery_backlog(),
                peers: snapshot.peers.len(),
                peers_stale: snapshot.stale,
                subscribers: local.subscriber_count(),
                ring_messages: ring.messages,
                ring_bytes: ring.bytes,
                fanouts_in_flight: fanout.in_flight(),
                last_sequence: local.last_sequence(),
            }
        }));
        // Up until the very end: a drain is worth watching.
        crate::metrics::spawn_endpoint(listener, registry, closing_token.clone())
    });
    let replicast = ReplicastServer::new(service)
        .max_decoding_message_size(config.max_frame_bytes())
        .max_encoding_message_size(config.max_frame_bytes());

    let local_addr = listener.local_addr().ok();
    info!(listen = ?local_addr, advertise = %config.advertise, source = discovery.source_name(), "replica serving");
    if config.advertise.ip().is_unspecified() {
        warn!(
            advertise = %config.advertise,
            "advertised address is unspecified: set --advertise or POD_IP so this replica recognises itself in DNS"
        );
    }

    // Shutdown has two phases, so peers that still list this replica (their
    // DNS has not caught up) lose nothing:
    // 1. draining (`stopping`): health NOT_SERVING, Broadcast refused;
    //    Deliver, DeliverStream and Subscribe still served, fan-outs in
    //    flight finish;
    // 2. after --drain-timeout (`closing`): DeliverStreams end, local
    //    delivery closes (later deliveries are refused, never acknowledged),
    //    Subscribe streams get everything delivered until then and end with
    //    "reconnect to another replica"; the server stops accepting and
    //    waits (bounded) for what is left, then exits.
    let closing = closing_token;
    let drain_timeout = config.drain_timeout;
    let signal = {
        let stopping = stopping.clone();
        let closing = closing.clone();
        let local = local.clone();
        let mut health = health.clone();
        async move {
            shutdown.await;
            info!(
                ?drain_timeout,
                "draining: health NOT_SERVING, refusing Broadcast, still delivering"
            );
            stopping.cancel();
            tokio::time::sleep(drain_timeout).await;
            info!("drain period over: closing");
            closing.cancel();
            local.close();
            end_health_watches(&mut health).await;
        }
    };
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Outermost first: the trace layer sees the final status.
        .layer(GrpcTraceLayer)
        .layer(OversizeLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(replicast)
        .serve_with_incoming_shutdown(
            // Server::tcp_nodelay only applies to listeners tonic binds itself.
            // Without TCP_NODELAY, small acks meet Nagle and delayed ACK: a
            // 40 ms stall per message.
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            signal,
        );

    // After `closing`, what is still open gets a bounded grace.
    let close_grace = drain_timeout.min(CLOSE_GRACE);
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result.map_err(ServeError::from),
        () = closing.cancelled() => {
            tokio::select! {
                result = &mut server => result.map_err(ServeError::from),
                () = tokio::time::sleep(close_grace) => {
                    warn!(?close_grace, "connections still open after the drain; closing them");
                    Ok(())
                }
            }
        }
    };
    stopping.cancel();
    closing.cancel();
    local.close();
    // Hops still in flight finish (bounded), then the links stop; what
    // their backlogs hold is given up and counted.
    fanout.shutdown(close_grace).await;
    if let Err(e) = membership.await {
        error!(error = %e, "membership task failed");
    }
    if let Some(endpoint) = metrics_endpoint {
        // Ends with `closing`, but a scraper that stops reading could hold it.
        if tokio::time::timeout(close_grace, endpoint).await.is_err() {
            warn!("metrics endpoint still busy after the drain; leaving it");
        }
    }
    discovery.shutdown().await;
    info!("replica stopped");
    result
}

/// Longest wait for connections after the drain period.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A replica running in a background task (dev-cluster, tests).
#[derive(Debug)]
pub struct ServerHandle {
    /// The bound address.
    pub local_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
}

impl ServerHandle {
    /// Binds `config.listen` and serves in a new task.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        Ok(Self::start_on(config, listener))
    }

    /// Serves on an already bound listener in a new task.
    pub fn start_on(config: Config, listener: TcpListener) -> Self {
        let local_addr = listener.local_addr().unwrap_or(config.listen);
        let stop = CancellationToken::new();
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(serve(config, listener, shutdown));
        Self {
            local_addr,
            stop,
            task,
        }
    }

    /// Starts the shutdown (as SIGTERM does) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Stops the replica gracefully and waits for it.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.stop.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(join) => panic!("replica task panicked: {join}"),
        }
    }
}

/// Follows discovery and owns health: SERVING after the first successful
/// lookup, NOT_SERVING as soon as `stopping` fires (one task writes health,
/// so the two cannot race). Every snapshot rebuilds the fan-out's peer set:
/// links open for peers that joined and retire for peers that left.
fn spawn_membership(
    mut peers_rx: tokio::sync::watch::Receiver<Arc<crate::discovery::PeerSnapshot>>,
    fanout: Arc<FanOut>,
    health: HealthReporter,
    stopping: CancellationToken,
) -> JoinHandle<()> {
    let task = async move {
        let mut serving = false;
        loop {
            let snapshot = peers_rx.borrow_and_update().clone();
            // The peer set first: a Broadcast that sees SERVING finds it.
            fanout.update_peers(snapshot.clone());
            if snapshot.ready && !serving {
                set_health(&health, ServingStatus::Serving).await;
                serving = true;
            }
            tokio::select! {
                biased;
                () = stopping.cancelled() => break,
                changed = peers_rx.changed() => if changed.is_err() { break },
            }
        }
        set_health(&health, ServingStatus::NotServing).await;
    };
    tokio::spawn(task.instrument(tracing::info_span!("membership")))
}

/// Ends open `grpc.health.v1` Watch streams (they end when their service's
/// status is removed), which would otherwise hold the server open until the
/// close grace runs out. Checks after this get NOT_FOUND; by now the server
/// is closing anyway.
async fn end_health_watches(health: &mut HealthReporter) {
    health.clear_service_status("").await;
    health.clear_service_status(proto::SERVICE_NAME).await;
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(proto::SERVICE_NAME, status).await;
}
