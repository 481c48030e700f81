//! The spans of a broadcast, in the fan-out shape of the OpenTelemetry
//! messaging conventions, with RPC attributes where a span is a call.
//!
//! One Broadcast is one trace:
//! `grpc.server Broadcast` (or `Publish`) → one PRODUCER `send {topic}` span
//! at the origin, which carries the receipts and the policy outcome as
//! attributes and every failed replica as an event → one CONSUMER
//! `process {topic}` span per replica that delivers it, the origin's own
//! included, parented to the send span through the trace context each
//! DeliverStream frame carries. Four spans for three replicas, whatever
//! happens to the hops. The send span ends with the last hop, so a replica
//! that fails after the Broadcast returned (its policy met without it) still
//! shows as a "replica failed" event.
//!
//! An unsampled Broadcast builds none of this: [`SendSpan::start`] looks at
//! the sampling decision first, and the frames of an unsampled message carry
//! no context, so its receivers build no span either.
//!
//! Integer attributes are recorded as `i64`: tracing-opentelemetry exports
//! unsigned integers as strings.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use opentelemetry::{Context, KeyValue, trace::TraceContextExt};
use tonic::Code;
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{
    error::{HopError, code_name},
    proto::v1::{AckPolicy, BroadcastResponse},
    wire::EncodedMessage,
};

/// Whether the current span is recorded and sampled.
pub fn current_is_sampled() -> bool {
    is_sampled(&Span::current())
}

/// Whether `span` is recorded and sampled.
pub fn is_sampled(span: &Span) -> bool {
    super::tracing_enabled() && !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// The PRODUCER span of one Broadcast at its origin; nothing at all when the
/// Broadcast is not sampled.
#[derive(Debug)]
pub struct SendSpan {
    span: Span,
    /// The span's W3C context, for every frame of the message (shared, not
    /// copied per peer). Empty when unsampled.
    context: Arc<HashMap<String, String>>,
}

impl SendSpan {
    /// No span: tracing is off, or the Broadcast is not sampled.
    pub fn none() -> Self {
        Self {
            span: Span::none(),
            context: Arc::default(),
        }
    }

    /// The send span of `message`, a child of `parent` (the Broadcast's or
    /// Publish's server span), if that one is sampled.
    pub fn start(parent: &Span, message: &EncodedMessage, policy: AckPolicy) -> Self {
        if !is_sampled(parent) {
            return Self::none();
        }
        let span = tracing::info_span!(
            target: "replicast::trace::fanout",
            parent: parent,
            "send",
            otel.name = format!("send {}", message.topic()),
            otel.kind = "producer",
            messaging.system = "replicast",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = message.topic(),
            messaging.message.id = message.id(),
            messaging.message.body.size = message.encoded_len() as i64,
            replicast.ack_policy = policy.as_str_name(),
            replicast.replicas = Empty,
            replicast.acked = Empty,
            replicast.required = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        let mut context = HashMap::new();
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut context));
        Self {
            span,
            context: Arc::new(context),
        }
    }

    /// Whether the Broadcast is sampled and this span is real.
    pub fn is_recording(&self) -> bool {
        !self.span.is_disabled()
    }

    /// The context each frame carries.
    pub fn context_map(&self) -> Arc<HashMap<String, String>> {
        self.context.clone()
    }

    /// The span itself (to instrument with).
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The origin's own delivery: a process span under this one.
    pub fn child_process(&self, message: &EncodedMessage) -> Span {
        if self.span.is_disabled() {
            return Span::none();
        }
        process(message, self.span.context())
    }

    /// Records the receipts: counts as attributes, each failed or pending
    /// replica as an event, and an error status when the policy was not met.
    pub fn record_receipts(&self, response: &BroadcastResponse) {
        if self.span.is_disabled() {
            return;
        }
        let span = &self.span;
        span.record("replicast.replicas", i64::from(response.replicas));
        span.record("replicast.acked", i64::from(response.acked));
        span.record("replicast.required", i64::from(response.required));
        for outcome in &response.outcomes {
            if outcome.code == 0 && !outcome.pending {
                continue;
            }
            let name = if outcome.pending {
                "replica pending"
            } else {
                "replica failed"
            };
            span.add_event(
                name,
                vec![
                    KeyValue::new("replicast.peer", outcome.peer.clone()),
                    KeyValue::new("rpc.grpc.status_code", i64::from(outcome.code)),
                    KeyValue::new("error.message", outcome.message.clone()),
                ],
            );
        }
        if response.acked < response.required {
            span.record("otel.status_code", "error");
            span.record(
                "otel.status_description",
                format!(
                    "ack policy not met: {} of {} replicas acknowledged ({} required)",
                    response.acked, response.replicas, response.required
                ),
            );
        }
    }
}

/// A hop that failed after its Broadcast returned (the policy was met
/// without it): an event on the send span, which stays open until then.
pub fn record_late_failure(send: &Span, peer: SocketAddr, error: &HopError) {
    if send.is_disabled() {
        return;
    }
    // In the send span: the line carries its trace id.
    send.in_scope(|| tracing::debug!(target: "replicast::fanout", %peer, %error, "hop failed"));
    send.add_event(
        "replica failed",
        vec![
            KeyValue::new("replicast.peer", peer.to_string()),
            KeyValue::new("rpc.grpc.status_code", error.code() as i64),
            KeyValue::new("error.message", error.to_string()),
        ],
    );
}

/// The CONSUMER span of one replica's delivery, parented to the send span
/// whose context `parent` is (from a frame, or the origin's own).
pub fn process(message: &EncodedMessage, parent: Context) -> Span {
    if !super::tracing_enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: "replicast::trace::delivery",
        "process",
        otel.name = format!("process {}", message.topic()),
        otel.kind = "consumer",
        messaging.system = "replicast",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = message.topic(),
        messaging.message.id = message.id(),
        messaging.replicast.sequence = Empty,
        replicast.duplicate = Empty,
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    // Fails only if the span is disabled, which then needs no parent.
    let _ = span.set_parent(parent);
    span
}

/// Records what local delivery did with a message on its process span.
pub fn record_delivered(span: &Span, sequence: u64, duplicate: bool) {
    if span.is_disabled() {
        return;
    }
    span.record(
        "messaging.replicast.sequence",
        i64::try_from(sequence).unwrap_or(i64::MAX),
    );
    span.record("replicast.duplicate", duplicate);
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
