//! Prometheus metrics of one replica, served as text on `--metrics-listen`.
//!
//! Counters and histograms are updated where things happen (per-peer
//! handles are resolved once by each peer's link, not looked up per hop);
//! gauges of current state (peers, subscribers, ring occupancy, fan-outs in
//! flight, dropped spans) are read from their owners at scrape time by
//! [`StateCollector`], so the hot path pays nothing for them. Each replica
//! has its own [`Registry`]: several replicas in one process (dev-cluster,
//! tests) do not mix their numbers.

use std::{net::SocketAddr, sync::Arc};

use axum::response::IntoResponse;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinHandle};

/// Labels of a finished Broadcast.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BroadcastLabels {
    /// ok, policy_not_met, deadline_exceeded, invalid, overloaded, not_ready, shutting_down.
    pub outcome: &'static str,
    /// all, quorum, one, none (or invalid).
    pub ack: &'static str,
}

/// Labels of one hop's result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabels {
    pub peer: String,
    /// delivered, duplicate, or the gRPC code name of the failure.
    pub result: &'static str,
}

/// Every `result` a hop can have.
const HOP_RESULTS: [&str; 19] = [
    "delivered",
    "duplicate",
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Labels naming a peer.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

/// Labels of a subscriber cut off for falling behind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    /// lagged (more than --subscriber-buffer behind) or overrun (fell off the ring).
    pub reason: &'static str,
}

/// Labels of a missed message's fate.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedeliveryLabels {
    /// delivered, already_delivered (only the ack had been lost), given_up
    /// (past the window, rejected, or left at shutdown), queue_full.
    pub result: &'static str,
}

/// Labels of a membership change.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MembershipChangeLabels {
    /// joined or left.
    pub change: &'static str,
    /// For joined, the source (dns, announced); for left, why (announced,
    /// dns, lease_expired, unreachable).
    pub cause: &'static str,
}

/// Labels of an announcement another replica sent.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnouncementLabels {
    /// join or leave.
    pub kind: &'static str,
    /// probed (a probe was started), confirmed or refuted (by the probe),
    /// known (a repeat), already_left, too_many, invalid.
    pub result: &'static str,
}

/// Labels of a reload of the tokens file or the TLS files.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// loaded, rejected (failed its checks; the previous set stays),
    /// unreadable.
    pub result: &'static str,
}

/// Labels of an incoming TLS handshake that failed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeFailureLabels {
    /// not_tls (a plaintext client), client_certificate (refused: another
    /// CA, expired), alert (the client refused ours), no_h2, timeout, tls,
    /// io.
    pub reason: &'static str,
}

/// Labels of a call refused for its credentials.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthRefusalLabels {
    /// unauthenticated or permission_denied.
    pub code: &'static str,
}

/// The membership counters, updated by the membership task.
#[derive(Debug, Clone, Default)]
pub struct MembershipMetrics {
    pub changes: Family<MembershipChangeLabels, Counter>,
    pub announcements: Family<AnnouncementLabels, Counter>,
}

impl MembershipMetrics {
    /// Counts one change of the member set.
    pub fn change(&self, change: &'static str, cause: &'static str) {
        self.changes
            .get_or_create(&MembershipChangeLabels { change, cause })
            .inc();
    }

    /// Counts one announcement heard from another replica.
    pub fn announcement(&self, kind: &'static str, result: &'static str) {
        self.announcements
            .get_or_create(&AnnouncementLabels { kind, result })
            .inc();
    }
}

/// The counters and histograms a replica updates as it works.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub broadcasts: Family<BroadcastLabels, Counter>,
    pub hops: Family<HopLabels, Counter>,
    pub hop_latency: Family<PeerLabels, Histogram>,
    pub dns_lookups: Counter,
    pub dns_failures: Counter,
    pub local_deliveries: Counter,
    pub duplicates: Counter,
    pub subscriber_overflows: Family<OverflowLabels, Counter>,
    pub redeliveries: Family<RedeliveryLabels, Counter>,
    pub membership: MembershipMetrics,
    pub token_reloads: Family<ReloadLabels, Counter>,
    pub auth_refusals: Family<AuthRefusalLabels, Counter>,
    /// Set when TLS is on (its series are registered only then).
    pub tls: Option<crate::tls::TlsMetrics>,
    pub webhooks: crate::webhook::WebhookMetrics,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            broadcasts: Family::default(),
            hops: Family::default(),
            hop_latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            dns_lookups: Counter::default(),
            dns_failures: Counter::default(),
            local_deliveries: Counter::default(),
            duplicates: Counter::default(),
            subscriber_overflows: Family::default(),
            redeliveries: Family::default(),
            membership: MembershipMetrics::default(),
            token_reloads: Family::default(),
            auth_refusals: Family::default(),
            tls: None,
            webhooks: crate::webhook::WebhookMetrics::default(),
        }
    }
}

impl Metrics {
    /// Drops the per-peer series of a peer that left the peer set.
    pub fn forget_peer(&self, peer: SocketAddr) {
        let peer = peer.to_string();
        self.hop_latency.remove(&PeerLabels { peer: peer.clone() });
        for result in HOP_RESULTS {
            self.hops.remove(&HopLabels {
                peer: peer.clone(),
                result,
            });
        }
    }

    /// Counts one Broadcast by outcome and ack policy.
    pub fn record_broadcast(&self, outcome: &'static str, ack: &'static str) {
        self.broadcasts
            .get_or_create(&BroadcastLabels { outcome, ack })
            .inc();
    }

    /// A registry with these metrics and the state of `replica`.
    pub fn registry(&self, replica: StateCollector) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "replicast_broadcasts",
            "Broadcasts answered, by outcome and ack policy",
            self.broadcasts.clone(),
        );
        registry.register(
            "replicast_peer_deliveries",
            "Deliveries to each peer by result (delivered, duplicate, or the gRPC code)",
            self.hops.clone(),
        );
        registry.register(
            "replicast_peer_delivery_latency_seconds",
            "Time from the start of a fan-out until each peer answered",
            self.hop_latency.clone(),
        );
        registry.register(
            "replicast_dns_lookups",
            "Peer discovery lookups",
            self.dns_lookups.clone(),
        );
        registry.register(
            "replicast_dns_lookup_failures",
            "Peer discovery lookups that failed (the last good peer set was kept)",
            self.dns_failures.clone(),
        );
        registry.register(
            "replicast_local_deliveries",
            "Messages delivered to this replica's consumers",
            self.local_deliveries.clone(),
        );
        registry.register(
            "replicast_duplicates",
            "Deliveries of an already delivered message id (not delivered again)",
            self.duplicates.clone(),
        );
        registry.register(
            "replicast_subscriber_overflows",
            "Subscribers disconnected for falling behind",
            self.subscriber_overflows.clone(),
        );
        registry.register(
            "replicast_redeliveries",
            "Messages a live peer missed, by fate: delivered later, already delivered, given up, or not queued (full)",
            self.redeliveries.clone(),
        );
        registry.register(
            "replicast_membership_changes",
            "Replicas that joined (by source) or left (by cause) this replica's member set",
            self.membership.changes.clone(),
        );
        registry.register(
            "replicast_announcements",
            "Join and leave announcements other replicas sent, by what became of them",
            self.membership.announcements.clone(),
        );
        registry.register(
            "replicast_tokens_reloads",
            "Changes of the tokens file seen, by result (loaded, rejected: the previous tokens stay, unreadable)",
            self.token_reloads.clone(),
        );
        registry.register(
            "replicast_auth_refusals",
            "Calls refused for their credentials (unauthenticated) or their topics (permission_denied)",
            self.auth_refusals.clone(),
        );
        registry.register(
            "replicast_webhook_deliveries",
            "Webhook POSTs by result: delivered (2xx), retried (an attempt to be retried), dead_lettered (given up), \
             abandoned (left when the replica closed)",
            self.webhooks.deliveries.clone(),
        );
        registry.register(
            "replicast_webhook_latency_seconds",
            "Time from a delivery's first POST to the app's 2xx, retries included",
            self.webhooks.latency.clone(),
        );
        registry.register(
            "replicast_webhook_backlog",
            "Deliveries (of any topic) a webhook has not passed yet, or not had an answer for",
            self.webhooks.backlog.clone(),
        );
        registry.register(
            "replicast_webhook_lost",
            "Deliveries (of any topic) that fell out of the replay ring before a webhook read them (the next POST says how many)",
            self.webhooks.lost.clone(),
        );
        if let Some(tls) = &self.tls {
            registry.register(
                "replicast_tls_reloads",
                "Changes of the TLS files seen, by result (loaded, rejected: the current certificates stay, unreadable)",
                tls.reloads.clone(),
            );
            registry.register(
                "replicast_tls_certificate_expiry_timestamp_seconds",
                "When the certificate this replica presents expires (Unix time)",
                tls.cert_expiry.clone(),
            );
            registry.register(
                "replicast_tls_ca_expiry_timestamp_seconds",
                "When the CA of the trusted bundle that expires first expires (Unix time)",
                tls.ca_expiry.clone(),
            );
            registry.register(
                "replicast_tls_handshake_failures",
                "Incoming TLS handshakes that failed, by reason",
                tls.handshake_failures.clone(),
            );
        }
        registry.register_collector(Box::new(replica));
        registry
    }
}

/// A replica's current state, as the gauges show it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaState {
    pub redelivery_backlog: usize,
    pub peers: usize,
    /// Members by source: the last DNS answer lists them, or they
    /// announced themselves and DNS does not list them yet.
    pub members_dns: usize,
    pub members_announced: usize,
    pub peers_stale: bool,
    pub subscribers: usize,
    pub ring_messages: usize,
    pub ring_bytes: usize,
    pub fanouts_in_flight: usize,
    pub last_sequence: u64,
}

/// Reads a replica's current state at scrape time, through a closure the
/// server gives it: this module depends on no other part of the replica.
pub struct StateCollector(Box<dyn Fn() -> ReplicaState + Send + Sync>);

impl StateCollector {
    pub fn new(read: impl Fn() -> ReplicaState + Send + Sync + 'static) -> Self {
        Self(Box::new(read))
    }
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StateCollector").finish_non_exhaustive()
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = (self.0)();
        let gauges: [(&str, &str, i64); 8] = [
            (
                "replicast_redelivery_backlog",
                "Missed messages waiting to be redelivered",
                state.redelivery_backlog as i64,
            ),
            (
                "replicast_peers",
                "Replicas in the current peer set",
                state.peers as i64,
            ),
            (
                "replicast_peers_stale",
                "1 when the last peer lookup failed and the last good set is in use",
                i64::from(state.peers_stale),
            ),
            (
                "replicast_subscribers",
                "Subscribe streams attached",
                state.subscribers as i64,
            ),
            (
                "replicast_replay_ring_messages",
                "Deliveries held in the replay ring",
                state.ring_messages as i64,
            ),
            (
                "replicast_replay_ring_bytes",
                "Encoded bytes held in the replay ring",
                state.ring_bytes as i64,
            ),
            (
                "replicast_fanouts_in_flight",
                "Broadcasts whose deliveries are not all finished",
                state.fanouts_in_flight as i64,
            ),
            (
                "replicast_last_sequence",
                "The last sequence number this replica assigned",
                i64::try_from(state.last_sequence).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let mut members = encoder.encode_descriptor(
            "replicast_members",
            "Other replicas this one targets, by source (dns, announced)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (source, count) in [("dns", state.members_dns), ("announced", state.members_announced)] {
            ConstGauge::new(count as i64).encode(members.encode_family(&[("source", source)])?)?;
        }
        let dropped = ConstCounter::new(crate::telemetry::spans_dropped());
        dropped.encode(encoder.encode_descriptor(
            "replicast_spans_dropped",
            "Trace spans dropped because the export queue was full (process-wide)",
            None,
            dropped.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Serves `GET /metrics` on `listener` until `stop` resolves.
pub fn spawn_endpoint(
    listener: TcpListener,
    registry: Registry,
    stop: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match encode(&mut body, &registry) {
                    Ok(()) => ([(http::header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
                    Err(_) => {
                        (http::StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response()
                    }
                }
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop).await;
        if let Err(error) = served {
            tracing::warn!(%error, "metrics endpoint failed");
        }
    })
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
