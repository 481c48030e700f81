//! Server assembly: wires discovery, local delivery and fan-out to the gRPC
//! services, serves on a bound listener until told to stop, then drains.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;

use tokio::{net::TcpListener, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::{
    auth::{Tokens, TokensLoadError, spawn_tokens_reload},
    config::Config,
    discovery::{DiscoveryError, LookupCounters, spawn_discovery},
    fanout::{BacklogBudget, Connect, FanOut, Link, LinkConfig, PeerLink},
    http_api::spawn_http_api,
    lifecycle::{Phase, ShutdownClock, lifecycle},
    limits::Limits,
    local::LocalDelivery,
    membership::{MembershipConfig, spawn_membership},
    metrics::{Metrics, ReplicaState, StateCollector},
    proto::{self, replica::replicast_server::ReplicastServer},
    request_errors::RequestErrorsLayer,
    service::{ReplicastService, ServiceConfig},
    telemetry::GrpcTraceLayer,
    tls::{Dialer, TlsLoadError, TlsMetrics, spawn_acceptor, spawn_tls_reload},
    webhook::{WebhookConfig, spawn_webhooks},
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
    #[error(transparent)]
    Tokens(#[from] TokensLoadError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsLoadError),
    #[error("webhook: {0}")]
    Webhook(#[from] crate::webhook::WebhookStartError),
    /// A side port (metrics, HTTP API, health) could not be bound.
    #[error("cannot listen for {what} on {addr} (--{flag}): {source}")]
    SideListen {
        what: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP API: {0}")]
    HttpApi(#[from] crate::http_api::MissingDescriptor),
}

/// Runs one replica on `listener` until `shutdown` resolves, then shuts down
/// in the phases of [`Phase`], all within `config.shutdown` (one deadline):
/// draining (the leave announced first, health NOT_SERVING, Broadcast
/// refused, deliveries and Subscribe still served), closing (local delivery
/// closed, streams ended after their last deliveries, connections given the
/// close step), then background hops and links, discovery stopped.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Bound first: a bad side address fails before anything starts.
    let metrics_listener = bind_side(config.metrics_listen, "metrics", "metrics-listen").await?;
    let http_listener = bind_side(config.http_listen, "the HTTP API", "http-listen").await?;
    let health_listener = bind_side(config.health_listen, "health checks", "health-listen").await?;
    let mut metrics = Metrics::default();
    if config.tls.is_some() {
        metrics.tls = Some(TlsMetrics::default());
    }
    let (phase_tx, phase) = lifecycle();
    // Loaded before anything starts: bad material fails start-up. The
    // reload task ends at Closing.
    let tls = match (config.tls.clone(), metrics.tls.clone()) {
        (Some(source), Some(tls_metrics)) => {
            let (configs, reload) = spawn_tls_reload(source.clone(), tls_metrics, phase.clone()).await?;
            Some((source, configs, reload))
        }
        _ => None,
    };
    let dialer = match &tls {
        Some((_, configs, _)) => Dialer::Tls(configs.client.clone()),
        None => Dialer::Plain,
    };
    // Loaded before anything starts: a bad file fails start-up. The reload
    // task ends at Closing.
    let tokens = match config.tokens.clone() {
        Some(source) => {
            let (tokens_rx, _reload) =
                spawn_tokens_reload(source, metrics.token_reloads.clone(), phase.clone()).await?;
            Tokens::from_watch(tokens_rx)
        }
        None => {
            warn!("no --tokens-file: any client that reaches the port may Broadcast, Publish and Subscribe");
            Tokens::off()
        }
    };
    let local = Arc::new(LocalDelivery::with_acked_webhooks(
        config.local,
        WebhookConfig::acked(&config.webhooks),
    ));
    // Started before anything is delivered: each follows every delivery.
    // A secret file that cannot be read fails start-up.
    let webhooks = spawn_webhooks(
        config.webhooks.clone(),
        local.clone(),
        metrics.webhooks.clone(),
        phase.clone(),
    )
    .await?;
    let discovery = spawn_discovery(
        config.discovery.clone(),
        LookupCounters {
            lookups: metrics.dns_lookups.clone(),
            failures: metrics.dns_failures.clone(),
        },
    )?;
    let link_config = LinkConfig {
        peer_timeout: config.peer_timeout,
        max_frame_bytes: config.max_frame_bytes(),
        redelivery_window: config.redelivery_window,
    };
    let budget = BacklogBudget::new(config.redelivery_max_bytes);
    let connect: Connect = {
        let (budget, metrics, dialer) = (budget.clone(), metrics.clone(), dialer.clone());
        Box::new(move |peer| {
            Arc::new(PeerLink::spawn(
                peer,
                link_config,
                &dialer,
                budget.clone(),
                &metrics,
            )) as Arc<dyn Link>
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

    let (mut health, health_service) = tonic_health::server::health_reporter();
    let membership = spawn_membership(
        MembershipConfig {
            self_addr: config.advertise,
            incarnation: local.incarnation(),
            lease: config.announce_lease,
            max_announced: config.max_announced_peers,
            // A peer that does not answer holds readiness up by this much.
            call_timeout: config.peer_timeout.min(ANNOUNCE_TIMEOUT),
            dialer,
        },
        discovery.subscribe(),
        fanout.clone(),
        health.clone(),
        phase.clone(),
        metrics.membership.clone(),
    );

    let (reflection_v1, reflection_v1alpha) = if config.reflection {
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        (Some(v1), Some(v1alpha))
    } else {
        (None, None)
    };

    let service = ReplicastService::new(
        ServiceConfig {
            self_addr: config.advertise,
            source_name: discovery.source_name().to_owned(),
            broadcast_timeout: config.broadcast_timeout,
            peer_timeout: config.peer_timeout,
            max_message_bytes: config.max_message_bytes,
            publish_window: config.publish_window,
            phase: phase.clone(),
            peer_identity: tls.as_ref().map(|(source, ..)| source.identity.clone()),
        },
        local.clone(),
        fanout.clone(),
        membership.handle(),
        tokens,
        Limits::new(config.limits),
        metrics.clone(),
    );
    let metrics_endpoint = metrics_listener.map(|listener| {
        info!(addr = ?listener.local_addr().ok(), "serving metrics at /metrics");
        let (local, fanout, peers_rx, members) = (
            local.clone(),
            fanout.clone(),
            discovery.subscribe(),
            membership.handle(),
        );
        let registry = metrics.registry(StateCollector::new(move || {
            let snapshot = peers_rx.borrow().clone();
            let ring = local.ring_occupancy();
            let members = members.members();
            let announced = members.announced.len();
            ReplicaState {
                redelivery_backlog: fanout.redelivery_backlog(),
                peers: snapshot.peers.len(),
                members_dns: members.sources.len() - announced,
                members_announced: announced,
                peers_stale: snapshot.stale,
                subscribers: local.subscriber_count(),
                ring_messages: ring.messages,
                ring_bytes: ring.bytes,
                fanouts_in_flight: fanout.in_flight(),
                last_sequence: local.last_sequence(),
            }
        }));
        // Up until the very end: a drain is worth watching.
        crate::metrics::spawn_endpoint(listener, registry, phase.reached(Phase::Closing))
    });
    // The probe port: health alone, plaintext, until the replica closes.
    let health_endpoint = health_listener.map(|listener| {
        info!(addr = ?listener.local_addr().ok(), "serving grpc.health.v1 alone, in plaintext (--health-listen)");
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(incoming, phase.reached(Phase::Closing)),
        )
    });
    // An app may start the drain itself (POST /v1/drain), as SIGTERM would.
    let (drain_tx, mut drain_rx) = tokio::sync::watch::channel(false);
    let http_api = match http_listener {
        Some(listener) => Some(spawn_http_api(
            listener,
            config.max_message_bytes,
            service.clone(),
            drain_tx,
            phase.reached(Phase::Closing),
        )?),
        None => None,
    };
    let replicast = ReplicastServer::new(service)
        .max_decoding_message_size(config.max_frame_bytes())
        .max_encoding_message_size(config.max_frame_bytes());

    let local_addr = listener.local_addr().ok();
    let plan = config.shutdown;
    info!(
        listen = ?local_addr,
        advertise = %config.advertise,
        source = discovery.source_name(),
        shutdown = %plan,
        "replica serving"
    );
    match &tls {
        Some((source, configs, _)) => info!(
            identity = %source.identity,
            expires = %crate::timestamp::rfc3339_seconds(configs.cert_not_after),
            client_certs = ?source.client_certs,
            "mTLS ON: every connection to the port is TLS; peer RPCs need the workload identity; \
             certificates reload on change and SIGHUP"
        ),
        None => warn!(
            listen = ?local_addr,
            "TLS OFF: plaintext; anyone who reaches the port can call the peer RPCs (Deliver, Announce). \
             Set --tls-cert, --tls-key, --tls-ca and --tls-identity outside a trusted network"
        ),
    }
    if config.advertise.ip().is_unspecified() {
        warn!(
            advertise = %config.advertise,
            "advertised address is unspecified: set --advertise or POD_IP so this replica recognises itself in DNS"
        );
    }

    let http2 = config.http2;
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(http2.keepalive_interval))
        .http2_keepalive_timeout(Some(http2.keepalive_timeout))
        .max_concurrent_streams(http2.max_streams_per_connection)
        .http2_max_header_list_size(http2.max_header_list_bytes)
        // HTTP/2 rapid reset (CVE-2023-44487): a client that opens and
        // cancels streams faster than they are served is cut off.
        .http2_max_pending_accept_reset_streams(Some(64));
    if !http2.max_connection_age.is_zero() {
        server = server
            .max_connection_age(http2.max_connection_age)
            .max_connection_age_grace(plan.close);
    }
    let router = server
        // Outermost first: the trace layer sees the final status.
        .layer(GrpcTraceLayer)
        .layer(RequestErrorsLayer)
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(replicast);
    let (server, acceptor): (BoxFuture<'static, Result<(), tonic::transport::Error>>, _) = match &tls {
        Some((source, configs, _)) => {
            let failures = metrics
                .tls
                .as_ref()
                .map(|t| t.handshake_failures.clone())
                .unwrap_or_default();
            // Stops accepting at Closing, as tonic's own listener would.
            let (incoming, acceptor) = spawn_acceptor(
                listener,
                configs.server.clone(),
                source.handshake_timeout,
                failures,
                phase.reached(Phase::Closing),
            );
            let serve = router.serve_with_incoming_shutdown(incoming, phase.reached(Phase::Closing));
            (Box::pin(serve), Some(acceptor))
        }
        None => {
            // Server::tcp_nodelay only applies to listeners tonic binds
            // itself. Without TCP_NODELAY, small acks meet Nagle and
            // delayed ACK: a 40 ms stall per message.
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60)));
            let serve = router.serve_with_incoming_shutdown(incoming, phase.reached(Phase::Closing));
            (Box::pin(serve), None)
        }
    };

    // The server is polled throughout: peers still connect while this
    // replica drains (deliveries, and the probes that check its leave).
    let (result, deadline) = {
        let drain = async {
            tokio::select! {
                () = shutdown => {}
                // Only ever set to true; an error means no API to ask.
                Ok(_) = drain_rx.wait_for(|asked| *asked) => {}
            }
            let clock = ShutdownClock::start(plan);
            info!(%plan, "draining: announcing the leave, health NOT_SERVING, refusing Broadcast, still delivering");
            phase_tx.advance(Phase::Draining);
            if tokio::time::timeout_at(clock.leave_ends(), membership.leave_announced())
                .await
                .is_err()
            {
                warn!(waited = ?plan.leave, "not every peer answered the leave in time; the rest learn it from DNS");
            }
            tokio::time::sleep_until(clock.drain_ends()).await;
            info!("drain period over: closing");
            local.close();
            phase_tx.advance(Phase::Closing);
            end_health_watches(&mut health).await;
            clock
        };
        tokio::pin!(server, drain);
        tokio::select! {
            // Only an error ends the server before the drain.
            result = &mut server => (result.map_err(ServeError::from), Instant::now() + plan.links),
            clock = &mut drain => {
                let result = match tokio::time::timeout_at(clock.close_ends(), &mut server).await {
                    Ok(result) => result.map_err(ServeError::from),
                    Err(_) => {
                        warn!(close = ?plan.close, "connections still open at the end of the close step; dropping them");
                        Ok(())
                    }
                };
                (result, clock.deadline())
            }
        }
    };
    local.close();
    phase_tx.advance(Phase::Closing);
    // Hops still in flight finish, then the links stop; what their
    // backlogs hold is given up and counted.
    fanout.shutdown(deadline).await;
    membership.stopped().await;
    // Both end at Closing; awaited so nothing outlives the replica.
    if let Some((_, _, reload)) = tls {
        let _ = tokio::time::timeout_at(deadline, reload).await;
    }
    if let Some(acceptor) = acceptor {
        let _ = tokio::time::timeout_at(deadline, acceptor).await;
    }
    if let Some(api) = http_api {
        let _ = tokio::time::timeout_at(deadline, api).await;
    }
    for webhook in webhooks {
        let _ = tokio::time::timeout_at(deadline, webhook).await;
    }
    if let Some(health) = health_endpoint {
        let _ = tokio::time::timeout_at(deadline, health).await;
    }
    if let Some(endpoint) = metrics_endpoint {
        // Ends with Closing, but a scraper that stops reading could hold it.
        if tokio::time::timeout_at(deadline, endpoint).await.is_err() {
            warn!("metrics endpoint still busy at the shutdown deadline; leaving it");
        }
    }
    discovery.shutdown().await;
    phase_tx.advance(Phase::Stopped);
    info!("replica stopped");
    result
}

/// Binds an optional side port, naming its flag when that fails.
async fn bind_side(
    addr: Option<SocketAddr>,
    what: &'static str,
    flag: &'static str,
) -> Result<Option<TcpListener>, ServeError> {
    let Some(addr) = addr else { return Ok(None) };
    TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|source| ServeError::SideListen {
            what,
            flag,
            addr,
            source,
        })
}

/// Longest wait for one Announce call (a join, a leave, a probe).
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Ends open `grpc.health.v1` Watch streams (they end when their service's
/// status is removed), which would otherwise hold the server open until the
/// close grace runs out. Checks after this get NOT_FOUND; by now the server
/// is closing anyway.
async fn end_health_watches(health: &mut HealthReporter) {
    health.clear_service_status("").await;
    health.clear_service_status(proto::SERVICE_NAME).await;
}
