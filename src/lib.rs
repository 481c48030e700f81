//! replicast: deliver a message to every replica of a Kubernetes workload.
//!
//! Module map (one concern each):
//! - [`config`]: flags and their validation.
//! - [`discovery`]: the peer set from DNS (A/AAAA or SRV) or a static list.
//! - [`fanout`]: Broadcast's delivery to every replica: one link task per
//!   peer (its stream, deadlines, retries, health, and the redelivery of what
//!   it missed), ack policy and receipts.
//! - [`local`]: sequence numbers, dedup, replay and subscribers on one replica.
//! - [`service`]: the thin gRPC layer, [`publish`] its streaming Broadcast;
//!   [`error`] maps failures to statuses.
//! - [`wire`]: messages encoded once, and the wire-identical types that
//!   carry them to peers and subscribers.
//! - [`server`]: assembly, serving and ordered shutdown.
//! - [`telemetry`], [`metrics`]: logs and traces; Prometheus metrics.
//! - [`devdns`], [`loopback`]: the DNS server and address blocks that let
//!   `dev-cluster` and the tests run many replicas on one machine.
//! - [`cli`]: the client commands (send, subscribe, peers, bench, dev-cluster).
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod config;
pub mod devdns;
pub mod discovery;
pub mod error;
pub mod fanout;
pub mod http_api;
pub mod lifecycle;
pub mod limits;
pub mod local;
pub mod loopback;
pub mod membership;
pub mod metrics;
pub mod proto;
pub mod publish;
pub mod request_errors;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod timestamp;
pub mod tls;
pub mod validate;
pub mod webhook;
pub mod wire;
