//! The replica's configuration: flags (each also an environment variable),
//! validated into a [`Config`] before anything binds.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    auth::TokensSource,
    discovery::{DiscoveryConfig, PeerSource},
    lifecycle::ShutdownPlan,
    limits::LimitsConfig,
    local::LocalLimits,
    tls::{ClientCerts, TlsSource, WorkloadIdentity},
    webhook::{WebhookConfig, WebhookSettings, contract::RetryPolicy},
};

/// Largest `--max-message-bytes` accepted.
const MAX_MESSAGE_BYTES_CEILING: usize = 64 * 1024 * 1024;
/// Longest accepted timeout: far beyond any sensible value, and far from
/// overflowing `Instant` arithmetic.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Room on top of the payload limit for the rest of a message (topic, id,
/// headers, origin): gRPC frames are checked against payload + this.
const ENVELOPE_HEADROOM: usize = 512 * 1024;

/// `replicast serve` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "serve", args_override_self = true)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "REPLICAST_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,

    /// This replica's address as peers see it (how DNS lists it). Defaults to
    /// POD_IP and the listen port, then to the listen address.
    #[arg(long, env = "REPLICAST_ADVERTISE")]
    pub advertise: Option<SocketAddr>,

    /// The pod's IP (Kubernetes downward API: status.podIP).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,

    /// Headless Service name whose A/AAAA records are the replicas.
    #[arg(long, env = "REPLICAST_PEERS_DNS", conflicts_with_all = ["peers_srv", "static_peers"])]
    pub peers_dns: Option<String>,

    /// SRV name (e.g. _grpc._tcp.replicast-headless.default.svc.cluster.local)
    /// whose targets and ports are the replicas.
    #[arg(long, env = "REPLICAST_PEERS_SRV", conflicts_with = "static_peers")]
    pub peers_srv: Option<String>,

    /// Fixed peer list (ip:port,ip:port), instead of DNS.
    #[arg(long, env = "REPLICAST_STATIC_PEERS", value_delimiter = ',')]
    pub static_peers: Vec<SocketAddr>,

    /// Port of the replicas found with --peers-dns. Defaults to the listen port.
    #[arg(long, env = "REPLICAST_PEER_PORT")]
    pub peer_port: Option<u16>,

    /// DNS server (ip:port) to query instead of /etc/resolv.conf.
    #[arg(long, env = "REPLICAST_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// Time between peer lookups.
    #[arg(long, env = "REPLICAST_REFRESH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub refresh_interval: Duration,

    /// Deadline of a Broadcast whose caller set none.
    #[arg(long, env = "REPLICAST_BROADCAST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub broadcast_timeout: Duration,

    /// Cap on each peer hop of a Broadcast.
    #[arg(long, env = "REPLICAST_PEER_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub peer_timeout: Duration,

    /// Largest accepted payload, in bytes.
    #[arg(long, env = "REPLICAST_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Recent deliveries kept for subscribers that resume with after_sequence.
    #[arg(long, env = "REPLICAST_REPLAY_CAPACITY", default_value_t = 10_000)]
    pub replay_capacity: usize,

    /// Bytes of messages the replay ring may hold (whichever of this and
    /// --replay-capacity binds first).
    #[arg(long, env = "REPLICAST_REPLAY_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub replay_max_bytes: usize,

    /// Message ids remembered for deduplication.
    #[arg(long, env = "REPLICAST_DEDUP_CAPACITY", default_value_t = 100_000)]
    pub dedup_capacity: usize,

    /// How long a message id is remembered for deduplication.
    #[arg(long, env = "REPLICAST_DEDUP_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub dedup_ttl: Duration,

    /// How many deliveries one subscriber may fall behind the newest before
    /// it is disconnected (and told where to resume). Subscribers read from
    /// the replay ring, so this costs no memory per subscriber.
    #[arg(long, env = "REPLICAST_SUBSCRIBER_BUFFER", default_value_t = 4096)]
    pub subscriber_buffer: usize,

    /// Broadcasts (with their background hops) in flight at once; more are
    /// refused with RESOURCE_EXHAUSTED rather than queued.
    #[arg(long, env = "REPLICAST_MAX_CONCURRENT_BROADCASTS", default_value_t = 4096)]
    pub max_concurrent_broadcasts: usize,

    /// Messages in flight on one Publish stream; beyond this the replica
    /// stops reading the stream until one completes (backpressure, never
    /// loss).
    #[arg(long, env = "REPLICAST_PUBLISH_WINDOW", default_value_t = 1024)]
    pub publish_window: usize,

    /// How long a message a live peer missed (timeout, reset, restart) is
    /// retried in the background, counted from the miss. 0 turns it off.
    #[arg(long, env = "REPLICAST_REDELIVERY_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub redelivery_window: Duration,

    /// Bytes of missed messages held for redelivery at most, waiting or
    /// being retried; beyond, new misses are given up (and counted).
    #[arg(long, env = "REPLICAST_REDELIVERY_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub redelivery_max_bytes: usize,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. :9464 for all
    /// interfaces). Unset: no metrics endpoint.
    #[arg(long, env = "REPLICAST_METRICS_LISTEN", value_parser = parse_listen)]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve the local HTTP/JSON API on ADDR (e.g. 127.0.0.1:7480): POST
    /// /v1/broadcast, GET /v1/peers, POST /v1/drain. Off unless set; it is
    /// plaintext, for the app next to the replica.
    #[arg(long, env = "REPLICAST_HTTP_LISTEN", value_parser = parse_listen)]
    pub http_listen: Option<SocketAddr>,

    /// Also serve grpc.health.v1 alone, in plaintext, on ADDR (e.g. :7421).
    /// For kubelet gRPC probes when TLS is on: they cannot speak TLS. The
    /// same status as on the main port; nothing else is served there.
    #[arg(long, env = "REPLICAST_HEALTH_LISTEN", value_parser = parse_listen)]
    pub health_listen: Option<SocketAddr>,

    /// On shutdown, how long the replica drains before it closes: health
    /// NOT_SERVING and Broadcast refused, while it still accepts deliveries
    /// from peers (whose DNS may still list it) and serves Subscribe.
    #[arg(long, env = "REPLICAST_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// The bound on a whole shutdown, from SIGTERM to exit: the drain, the
    /// close and the background hops share it (the start-up log prints how).
    /// Keep it under the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "REPLICAST_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// How long a replica that announced its join counts as a member while
    /// DNS does not list it, and how long one that announced its leave stays
    /// out while stale DNS answers still list it. A few DNS TTLs: CoreDNS's
    /// usual `ttl 30` plus `cache 30` lag by up to a minute.
    #[arg(long, env = "REPLICAST_ANNOUNCE_LEASE", default_value = "90s", value_parser = humantime::parse_duration)]
    pub announce_lease: Duration,

    /// Replicas that may count as members by their announcement alone (not
    /// yet listed by DNS). Bounds what anyone who can reach the port can do
    /// to the peer set; a rollout adds at most its surge at a time.
    #[arg(long, env = "REPLICAST_MAX_ANNOUNCED_PEERS", default_value_t = 64)]
    pub max_announced_peers: usize,

    /// Client tokens with topic permissions (see `replicast token hash` and
    /// examples/tokens.txt). Set: Broadcast, Publish, Subscribe and
    /// ListPeers need `authorization: Bearer <token>`; health stays open.
    /// Re-read when it changes, all or nothing.
    #[arg(long, env = "REPLICAST_TOKENS_FILE")]
    pub tokens_file: Option<std::path::PathBuf>,

    /// How often the tokens file is looked at for changes.
    #[arg(long, env = "REPLICAST_TOKENS_RELOAD_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub tokens_reload_interval: Duration,

    /// Subscribe streams open on this replica at most (0: no limit).
    #[arg(long, env = "REPLICAST_MAX_SUBSCRIBERS", default_value_t = 20_000)]
    pub max_subscribers: usize,

    /// Subscribe streams one client (its token's name, or its IP address
    /// without tokens) may have open on this replica (0: no limit).
    #[arg(long, env = "REPLICAST_MAX_SUBSCRIBERS_PER_CLIENT", default_value_t = 1_000)]
    pub max_subscribers_per_client: usize,

    /// Broadcasts a second one client may send through this replica, each
    /// Publish message counted; up to a second's worth at once (0: no
    /// limit). The default is a safety net above what one replica serves;
    /// set a fair share where clients share replicas.
    #[arg(long, env = "REPLICAST_BROADCAST_RATE_PER_CLIENT", default_value_t = 100_000)]
    pub broadcast_rate_per_client: u32,

    /// The longest deadline a Broadcast or a Publish message may ask for.
    #[arg(long, env = "REPLICAST_MAX_DEADLINE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_deadline: Duration,

    /// HTTP/2 streams (calls) one connection may have open at once.
    #[arg(long, env = "REPLICAST_MAX_STREAMS_PER_CONNECTION", default_value_t = 1_024)]
    pub max_streams_per_connection: u32,

    /// Largest HTTP/2 header list (metadata) a call may send, in bytes.
    #[arg(long, env = "REPLICAST_MAX_HEADER_LIST_BYTES", default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,

    /// HTTP/2 ping interval on idle connections; a connection whose ping
    /// goes unanswered for --http2-keepalive-timeout is closed.
    #[arg(long, env = "REPLICAST_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// See --http2-keepalive-interval.
    #[arg(long, env = "REPLICAST_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// Connections older than this are asked to go away (GOAWAY) and given
    /// the close step to finish; clients reconnect. 0: no limit.
    #[arg(long, env = "REPLICAST_MAX_CONNECTION_AGE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,

    /// Serve gRPC server reflection (v1 and v1alpha, for grpcurl).
    #[arg(long, env = "REPLICAST_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    #[command(flatten)]
    pub tls: TlsFlags,

    /// POST every message delivered to this replica to URL, as a CloudEvent
    /// (repeatable; space-separated in the environment). Topic filters in
    /// the fragment, which is never sent: http://127.0.0.1:8080/events#topics=cache.*,user.logout
    #[arg(long = "webhook", env = "REPLICAST_WEBHOOKS", value_delimiter = ' ')]
    pub webhooks: Vec<String>,

    /// CloudEvents HTTP mode of the webhooks: binary (the payload is the
    /// body, attributes are ce-* headers) or structured (one JSON event).
    #[arg(long, env = "REPLICAST_WEBHOOK_MODE", value_enum, default_value = "binary")]
    pub webhook_mode: crate::webhook::event::Mode,

    /// POSTs in flight at once per webhook, started in sequence order (1:
    /// one after another, each after the previous one's answer).
    #[arg(long, env = "REPLICAST_WEBHOOK_CONCURRENCY", default_value_t = 1)]
    pub webhook_concurrency: usize,

    /// Bound on one POST: connect, send, the app's answer.
    #[arg(long, env = "REPLICAST_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,

    /// Attempts per message at most before it is dead-lettered.
    #[arg(long, env = "REPLICAST_WEBHOOK_MAX_ATTEMPTS", default_value_t = 20)]
    pub webhook_max_attempts: u32,

    /// How long after its first attempt a message is still retried.
    #[arg(long, env = "REPLICAST_WEBHOOK_MAX_AGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub webhook_max_age: Duration,

    /// The longest Retry-After (on 429 and 503) that is honoured.
    #[arg(long, env = "REPLICAST_WEBHOOK_RETRY_AFTER_CAP", default_value = "60s", value_parser = humantime::parse_duration)]
    pub webhook_retry_after_cap: Duration,

    /// A replica acknowledges a delivery (its Deliver answer, its receipt in
    /// the Broadcast) only once every webhook taking the topic answered 2xx,
    /// within the hop's deadline: an OK receipt then means "processed by
    /// the app", and a failed POST fails the receipt, naming the app's answer.
    #[arg(long, env = "REPLICAST_WEBHOOK_ACK")]
    pub webhook_ack: bool,

    /// Sign the POSTs with Standard Webhooks headers (webhook-id,
    /// webhook-timestamp, webhook-signature): one whsec_<base64> secret per
    /// line; several sign with each (rotation).
    #[arg(long, env = "REPLICAST_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// With TLS on: whether clients (not peers) must present a certificate
    /// from the CA. Peer RPCs always need one holding --tls-identity.
    #[arg(
        long,
        env = "REPLICAST_TLS_CLIENT_CERTS",
        value_enum,
        default_value = "optional"
    )]
    pub tls_client_certs: ClientCerts,

    /// With TLS on: how often the TLS files are re-read in case a change
    /// went unnoticed (they are also watched, and reloaded on SIGHUP).
    #[arg(long, env = "REPLICAST_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,

    /// With TLS on: the longest an incoming TLS handshake may take.
    #[arg(long, env = "REPLICAST_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_handshake_timeout: Duration,
}

/// The TLS files and the workload identity, for `serve` and the client
/// commands alike (the same flags and environment variables).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsFlags {
    /// Certificate chain (PEM, leaf first) this process presents. For a
    /// replica it must hold --tls-identity and the server and client auth
    /// usages; for a client command it is optional. Setting the TLS flags
    /// turns TLS on: every connection to the port is then TLS.
    #[arg(long, env = "REPLICAST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "REPLICAST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// CA bundle (PEM) that peer (and client) certificates must chain to.
    /// During a CA rotation it holds the old and the new CA.
    #[arg(long, env = "REPLICAST_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// The workload identity every replica's certificate holds: a URI SAN
    /// (spiffe://cluster.local/ns/<ns>/sa/<sa>) or a DNS SAN (the headless
    /// Service's name). Peers are checked against it, not against their IP.
    #[arg(long, env = "REPLICAST_TLS_IDENTITY")]
    pub tls_identity: Option<WorkloadIdentity>,
}

impl TlsFlags {
    /// Whether any TLS flag is set.
    pub fn any(&self) -> bool {
        self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_ca.is_some()
            || self.tls_identity.is_some()
    }
}

/// `host:port`, or `:port` for every interface.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_owned()
    };
    full.parse()
        .map_err(|e| format!("{s:?} is not ip:port or :port ({e})"))
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// This replica's identity in the peer set.
    pub advertise: SocketAddr,
    pub discovery: DiscoveryConfig,
    pub broadcast_timeout: Duration,
    pub peer_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_concurrent_broadcasts: usize,
    /// Messages in flight per Publish stream.
    pub publish_window: usize,
    pub local: LocalLimits,
    pub metrics_listen: Option<SocketAddr>,
    /// See `--health-listen`.
    pub health_listen: Option<SocketAddr>,
    /// See `--http-listen`.
    pub http_listen: Option<SocketAddr>,
    /// How long a missed message is retried (zero: off).
    pub redelivery_window: Duration,
    /// Bytes of missed messages held at most, all peers together.
    pub redelivery_max_bytes: usize,
    pub drain_timeout: Duration,
    /// How the shutdown deadline is shared out (from --shutdown-timeout and
    /// --drain-timeout).
    pub shutdown: ShutdownPlan,
    /// See `--announce-lease`.
    pub announce_lease: Duration,
    /// See `--max-announced-peers`.
    pub max_announced_peers: usize,
    /// See `--tokens-file` (None: no authentication).
    pub tokens: Option<TokensSource>,
    /// See `--reflection`.
    pub reflection: bool,
    /// Per-client and per-replica limits.
    pub limits: LimitsConfig,
    /// The HTTP/2 server's limits.
    pub http2: Http2Limits,
    /// mTLS (None: plaintext).
    pub tls: Option<TlsSource>,
    /// The `--webhook` sinks.
    pub webhooks: Vec<WebhookConfig>,
}

/// The HTTP/2 settings that bound what one connection can do.
#[derive(Debug, Clone, Copy)]
pub struct Http2Limits {
    pub max_streams_per_connection: u32,
    pub max_header_list_bytes: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Zero: no limit.
    pub max_connection_age: Duration,
}

/// A flag with a value that cannot work. The message names both.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} {value}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: std::borrow::Cow<'static, str>,
}

/// The `--webhook` sinks and their shared settings.
fn webhooks(args: &ServeArgs) -> Result<Vec<WebhookConfig>, ConfigError> {
    let err = |flag, value: String, reason: &'static str| ConfigError {
        flag,
        value,
        reason: reason.into(),
    };
    if args.webhook_concurrency == 0 || args.webhook_concurrency > 1024 {
        return Err(err(
            "webhook-concurrency",
            args.webhook_concurrency.to_string(),
            "must be between 1 and 1024",
        ));
    }
    if args.webhook_max_attempts == 0 {
        return Err(err("webhook-max-attempts", "0".into(), "must be at least 1"));
    }
    for (flag, d) in [
        ("webhook-timeout", args.webhook_timeout),
        ("webhook-max-age", args.webhook_max_age),
        ("webhook-retry-after-cap", args.webhook_retry_after_cap),
    ] {
        if d.is_zero() || d > Duration::from_secs(24 * 3600) {
            return Err(err(
                flag,
                humantime::format_duration(d).to_string(),
                "must be more than 0 and at most 24h",
            ));
        }
    }
    let settings = WebhookSettings {
        mode: args.webhook_mode,
        concurrency: args.webhook_concurrency,
        timeout: args.webhook_timeout,
        retry: RetryPolicy {
            max_attempts: args.webhook_max_attempts,
            max_age: args.webhook_max_age,
            retry_after_cap: args.webhook_retry_after_cap,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        },
        secret_file: args.webhook_secret_file.clone(),
        ack: args.webhook_ack,
    };
    let given = args.webhooks.iter().filter(|w| !w.trim().is_empty()).count();
    if args.webhook_ack && given == 0 {
        return Err(err(
            "webhook-ack",
            "true".into(),
            "needs at least one --webhook, whose answers the receipts wait for",
        ));
    }
    if args.webhook_ack && given > crate::local::MAX_ACKED_WEBHOOKS {
        return Err(err(
            "webhook-ack",
            format!("with {given} webhooks"),
            "acknowledges through at most 64 webhooks",
        ));
    }
    args.webhooks
        .iter()
        .filter(|w| !w.trim().is_empty())
        .map(|w| {
            WebhookConfig::parse(w.trim(), settings.clone()).map_err(|e| ConfigError {
                flag: "webhook",
                value: e.value,
                reason: e.reason.into(),
            })
        })
        .collect()
}

/// The replica's TLS source from its flags: all four or none.
fn tls_source(args: &ServeArgs) -> Result<Option<TlsSource>, ConfigError> {
    let flags = &args.tls;
    if !flags.any() {
        return Ok(None);
    }
    let missing = |flag| ConfigError {
        flag,
        value: "(unset)".to_owned(),
        reason: "TLS needs all four of --tls-cert, --tls-key, --tls-ca and --tls-identity".into(),
    };
    let within = |flag, d: Duration| {
        if d < Duration::from_millis(100) || d > MAX_TIMEOUT {
            Err(ConfigError {
                flag,
                value: humantime::format_duration(d).to_string(),
                reason: "must be between 100ms and 1h".into(),
            })
        } else {
            Ok(d)
        }
    };
    Ok(Some(TlsSource {
        cert: flags.tls_cert.clone().ok_or_else(|| missing("tls-cert"))?,
        key: flags.tls_key.clone().ok_or_else(|| missing("tls-key"))?,
        ca: flags.tls_ca.clone().ok_or_else(|| missing("tls-ca"))?,
        identity: flags
            .tls_identity
            .clone()
            .ok_or_else(|| missing("tls-identity"))?,
        client_certs: args.tls_client_certs,
        poll_interval: within("tls-reload-interval", args.tls_reload_interval)?,
        handshake_timeout: within("tls-handshake-timeout", args.tls_handshake_timeout)?,
    }))
}

impl Config {
    /// The largest gRPC message a replica sends or accepts.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_message_bytes + ENVELOPE_HEADROOM
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        let err = |flag, value: &dyn std::fmt::Display, reason: &'static str| ConfigError {
            flag,
            value: value.to_string(),
            reason: reason.into(),
        };
        let positive = |flag, d: Duration| {
            if d.is_zero() || d > MAX_TIMEOUT {
                Err(err(
                    flag,
                    &humantime::format_duration(d),
                    "must be more than 0 and at most 1h",
                ))
            } else {
                Ok(d)
            }
        };
        positive("broadcast-timeout", args.broadcast_timeout)?;
        positive("peer-timeout", args.peer_timeout)?;
        if args.dedup_ttl.is_zero() || args.dedup_ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(err(
                "dedup-ttl",
                &humantime::format_duration(args.dedup_ttl),
                "must be between 1ns and 7 days",
            ));
        }
        positive("drain-timeout", args.drain_timeout)?;
        positive("shutdown-timeout", args.shutdown_timeout)?;
        positive("announce-lease", args.announce_lease)?;
        positive("max-deadline", args.max_deadline)?;
        positive("http2-keepalive-interval", args.http2_keepalive_interval)?;
        positive("http2-keepalive-timeout", args.http2_keepalive_timeout)?;
        if args.max_streams_per_connection == 0 {
            return Err(err("max-streams-per-connection", &0, "must be at least 1"));
        }
        if args.max_header_list_bytes < 1024 {
            return Err(err(
                "max-header-list-bytes",
                &args.max_header_list_bytes,
                "must be at least 1024 (gRPC's own headers need room)",
            ));
        }
        if args.tokens_reload_interval < Duration::from_millis(100) {
            return Err(err(
                "tokens-reload-interval",
                &humantime::format_duration(args.tokens_reload_interval),
                "must be at least 100ms",
            ));
        }
        if args.publish_window == 0 {
            return Err(err("publish-window", &0, "must be at least 1"));
        }
        if args.max_concurrent_broadcasts == 0 {
            return Err(err("max-concurrent-broadcasts", &0, "must be at least 1"));
        }
        if args.refresh_interval < Duration::from_millis(100) {
            return Err(err(
                "refresh-interval",
                &humantime::format_duration(args.refresh_interval),
                "must be at least 100ms",
            ));
        }
        if args.max_message_bytes == 0 || args.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            return Err(err(
                "max-message-bytes",
                &args.max_message_bytes,
                "must be between 1 and 67108864",
            ));
        }
        if args.subscriber_buffer == 0 {
            return Err(err("subscriber-buffer", &0, "must be at least 1"));
        }
        if args.replay_capacity == 0 {
            return Err(err(
                "replay-capacity",
                &0,
                "must be at least 1 (live subscribers read from the ring)",
            ));
        }
        if args.dedup_capacity == 0 {
            return Err(err("dedup-capacity", &0, "must be at least 1"));
        }

        let tls = tls_source(&args)?;
        let webhooks = webhooks(&args)?;
        let advertise = args
            .advertise
            .or_else(|| args.pod_ip.map(|ip| SocketAddr::new(ip, args.listen.port())))
            .unwrap_or(args.listen);
        if advertise.port() == 0 {
            return Err(err(
                "advertise",
                &advertise,
                "needs a real port (the listen port is 0)",
            ));
        }

        let source = match (args.peers_dns, args.peers_srv) {
            (Some(name), _) if name.trim().is_empty() => {
                return Err(err("peers-dns", &"\"\"", "must be a DNS name"));
            }
            (_, Some(name)) if name.trim().is_empty() => {
                return Err(err("peers-srv", &"\"\"", "must be a DNS name"));
            }
            (Some(name), None) => PeerSource::Dns {
                name,
                port: args.peer_port.unwrap_or(advertise.port()),
            },
            (None, Some(name)) => PeerSource::Srv { name },
            (Some(_), Some(_)) => unreachable!("clap rejects --peers-dns with --peers-srv"),
            (None, None) => PeerSource::Static(args.static_peers),
        };

        Ok(Self {
            listen: args.listen,
            advertise,
            discovery: DiscoveryConfig {
                source,
                dns_server: args.dns_server,
                refresh_interval: args.refresh_interval,
            },
            broadcast_timeout: args.broadcast_timeout,
            peer_timeout: args.peer_timeout,
            max_message_bytes: args.max_message_bytes,
            max_concurrent_broadcasts: args.max_concurrent_broadcasts,
            publish_window: args.publish_window,
            local: LocalLimits {
                replay_capacity: args.replay_capacity,
                replay_max_bytes: args.replay_max_bytes,
                dedup_capacity: args.dedup_capacity,
                dedup_ttl: args.dedup_ttl,
                subscriber_buffer: args.subscriber_buffer,
            },
            drain_timeout: args.drain_timeout,
            shutdown: ShutdownPlan::new(args.shutdown_timeout, args.drain_timeout),
            announce_lease: args.announce_lease,
            max_announced_peers: args.max_announced_peers,
            tokens: args.tokens_file.map(|path| TokensSource {
                path,
                interval: args.tokens_reload_interval,
            }),
            reflection: args.reflection,
            limits: LimitsConfig {
                max_subscribers: args.max_subscribers,
                max_subscribers_per_client: args.max_subscribers_per_client,
                broadcast_rate_per_client: args.broadcast_rate_per_client,
                max_deadline: args.max_deadline,
            },
            http2: Http2Limits {
                max_streams_per_connection: args.max_streams_per_connection,
                max_header_list_bytes: args.max_header_list_bytes,
                keepalive_interval: args.http2_keepalive_interval,
                keepalive_timeout: args.http2_keepalive_timeout,
                max_connection_age: args.max_connection_age,
            },
            tls,
            webhooks,
            metrics_listen: args.metrics_listen,
            health_listen: args.health_listen,
            http_listen: args.http_listen,
            redelivery_window: args.redelivery_window,
            redelivery_max_bytes: args.redelivery_max_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["serve"];
        argv.extend_from_slice(args);
        Config::try_from(ServeArgs::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn defaults_are_a_cluster_of_one_on_loopback() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7420".parse().unwrap());
        assert_eq!(c.advertise, c.listen);
        assert_eq!(c.discovery.source, PeerSource::Static(vec![]));
        assert_eq!(c.peer_timeout, Duration::from_secs(1));
    }

    #[test]
    fn advertise_falls_back_to_pod_ip_then_listen() {
        let c = parse(&["--listen", "0.0.0.0:9000", "--pod-ip", "10.1.2.3"]).unwrap();
        assert_eq!(c.advertise, "10.1.2.3:9000".parse().unwrap());
        let c = parse(&["--advertise", "10.9.9.9:1", "--pod-ip", "10.1.2.3"]).unwrap();
        assert_eq!(c.advertise, "10.9.9.9:1".parse().unwrap());
    }

    #[test]
    fn dns_peer_port_defaults_to_listen_port() {
        let c = parse(&[
            "--listen",
            "127.0.0.1:7777",
            "--peers-dns",
            "svc.ns.svc.cluster.local",
        ])
        .unwrap();
        assert_eq!(
            c.discovery.source,
            PeerSource::Dns {
                name: "svc.ns.svc.cluster.local".into(),
                port: 7777
            }
        );
    }

    #[test]
    fn metrics_listen_accepts_a_bare_port() {
        let c = parse(&["--metrics-listen", ":9464"]).unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(parse(&[]).unwrap().metrics_listen, None);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--peer-timeout", "0s"]).unwrap_err();
        assert_eq!(e.flag, "peer-timeout");
        let e = parse(&["--max-message-bytes", "0"]).unwrap_err();
        assert!(e.to_string().starts_with("--max-message-bytes 0:"), "{e}");
        assert!(
            ServeArgs::try_parse_from(["serve", "--peers-dns", "a", "--static-peers", "127.0.0.1:1"])
                .is_err()
        );
    }

    #[test]
    fn tls_needs_all_four_flags_and_a_valid_identity() {
        assert!(parse(&[]).unwrap().tls.is_none());
        let e = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"]).unwrap_err();
        assert_eq!(e.flag, "tls-identity");
        let c = parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-ca",
            "ca.pem",
            "--tls-identity",
            "spiffe://cluster.local/ns/a/sa/b",
        ])
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            tls.identity,
            WorkloadIdentity::Uri("spiffe://cluster.local/ns/a/sa/b".into())
        );
        assert_eq!(tls.client_certs, ClientCerts::Optional);
        assert!(ServeArgs::try_parse_from(["serve", "--tls-identity", "not a name"]).is_err());
    }
}
