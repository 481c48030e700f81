//! replicast: deliver a message to every replica of a Kubernetes workload.
//!
//! Module map (one concern each):
//! - [`config`]: flags and their validation.
//! - [`discovery`]: the peer set from DNS (A/AAAA or SRV) or a static list.
//! - [`fanout`]: Broadcast's delivery to every replica, deadlines, ack policy,
//!   failing peers (skipped, probed) and the redelivery of what they missed.
//! - [`local`]: sequence numbers, dedup, replay and subscribers on one replica.
//! - [`service`]: the thin gRPC layer; [`error`] maps failures to statuses.
//! - [`server`]: assembly, serving and ordered shutdown.
//! - [`telemetry`], [`metrics`]: logs and traces; Prometheus metrics.
//! - [`devdns`], [`loopback`]: the DNS server and address blocks that let
//!   `dev-cluster` and the tests run many replicas on one machine.
//! - [`cli`]: the client commands (send, subscribe, peers, bench, dev-cluster).
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod devdns;
pub mod discovery;
pub mod error;
pub mod fanout;
pub mod local;
pub mod loopback;
pub mod metrics;
pub mod oversize;
pub mod proto;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod validate;
