//! The spans of a broadcast, named and attributed after the OpenTelemetry
//! semantic conventions for RPC and messaging. Every constructor returns a
//! disabled span when tracing is off, so callers need no `if`.
//!
//! One Broadcast is one trace:
//! `grpc.server Broadcast` → per replica `hop` (client; internal for the
//! replica itself) → `Deliver` (server, on the receiving replica) →
//! `local delivery` (internal).
//!
//! Integer attributes are recorded as `i64`: tracing-opentelemetry exports
//! unsigned integers as strings.

use std::net::SocketAddr;

use opentelemetry::{Context, trace::TraceContextExt};
use tonic::Code;
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{error::code_name, proto::v1::Message};

/// Whether the current span is recorded and sampled: a Broadcast the
/// sampler dropped gets no hop, Deliver or local-delivery spans at all, and
/// sends no trace context, so sampling saves the work and not just the export.
pub fn current_is_sampled() -> bool {
    if !super::tracing_enabled() {
        return false;
    }
    let span = Span::current();
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// The span of one hop from the origin to `peer` (`local`: to itself,
/// in-process).
pub fn hop(peer: SocketAddr, message: &Message, local: bool) -> Span {
    if !super::tracing_enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: "replicast::fanout",
        "hop",
        otel.name = "replicast.v1.Replicast/DeliverStream",
        otel.kind = if local { "internal" } else { "client" },
        rpc.system = "grpc",
        rpc.service = "replicast.v1.Replicast",
        rpc.method = "DeliverStream",
        server.address = %peer.ip(),
        server.port = i64::from(peer.port()),
        network.peer.address = %peer.ip(),
        network.peer.port = i64::from(peer.port()),
        messaging.system = "replicast",
        messaging.operation.type = "send",
        messaging.operation.name = "deliver",
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        replicast.local = local,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
        replicast.duplicate = Empty,
    )
}

/// The server side of one delivery, parented to the hop that sent it
/// (`parent`), or to the current span when `None` (the in-process hop).
pub fn deliver(message: &Message, parent: Option<Context>) -> Span {
    if !super::tracing_enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: "replicast::delivery",
        "deliver",
        otel.name = "replicast.v1.Replicast/Deliver",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "replicast.v1.Replicast",
        rpc.method = "Deliver",
        messaging.system = "replicast",
        messaging.operation.type = "receive",
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        messaging.client.id = %message.origin,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if let Some(parent) = parent {
        // Fails only if the span is disabled, which then needs no parent.
        let _ = span.set_parent(parent);
    }
    span
}

/// Handing a message to this replica's consumers (sequence, dedup, ring).
pub fn local_delivery(message: &Message) -> Span {
    if !super::tracing_enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: "replicast::delivery",
        "local delivery",
        otel.name = "local delivery",
        otel.kind = "internal",
        messaging.system = "replicast",
        messaging.operation.type = "process",
        messaging.destination.name = %message.topic,
        messaging.message.id = %message.id,
        messaging.replicast.sequence = Empty,
        replicast.duplicate = Empty,
    )
}

/// Which side of a call a span is on; the conventions differ on errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// Records a gRPC outcome. Client spans are errors for any non-OK code;
/// server spans only for codes that mean the server failed (per the RPC
/// semantic conventions), not for a client's bad request.
pub fn record_status(span: &Span, side: Side, code: Code, message: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    let error = match side {
        Side::Client => code != Code::Ok,
        Side::Server => matches!(
            code,
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unimplemented
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        ),
    };
    if error {
        span.record("otel.status_code", "error");
        span.record(
            "otel.status_description",
            format!("{}: {message}", code_name(code)),
        );
    }
}
