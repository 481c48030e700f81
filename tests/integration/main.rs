//! The integration tests: real replicas on loopback (127.A.B.x blocks picked
//! at random per cluster, in-process DNS), driven over real gRPC and HTTP.
//!
//! One test binary, one module per area: each binary links the whole
//! service (about 250 MB with debug info), so one instead of eighteen cuts
//! the build's disk and link time by that much. The fault suite, which
//! needs root and network namespaces, is its own binary (`tests/faults`).

mod common;

mod bad_input;
mod broadcast;
mod deliver_stream;
mod discovery;
mod health_reflection;
mod http_api;
mod limits;
mod membership;
mod metrics;
mod misbehaving_peers;
mod mtls;
mod publish;
mod shutdown;
mod subscribe;
mod telemetry;
mod tokens;
mod validation;
mod webhook;
mod webhook_ack;
