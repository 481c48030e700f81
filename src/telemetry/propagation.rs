//! W3C trace context across hops: gRPC metadata on calls, and a per-message
//! map on the DeliverStream frames.

use std::collections::HashMap;

use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads `traceparent`, `tracestate` and `baggage` from HTTP/2 headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the context into gRPC request metadata.
struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// The caller's context from request headers (empty when there is none,
/// which starts a new trace).
pub fn extract_headers(headers: &http::HeaderMap) -> Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// The sender's context from a DeliverFrame's `trace_context`.
pub fn extract_map(map: &HashMap<String, String>) -> Context {
    global::get_text_map_propagator(|p| p.extract(map))
}

/// `span`'s context as a map, for a DeliverFrame.
pub fn inject_map(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut map));
    map
}

/// `span`'s context into outgoing request metadata.
pub fn inject_metadata(span: &tracing::Span, metadata: &mut tonic::metadata::MetadataMap) {
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(metadata)));
}

/// The trace and span ids of a W3C context map (its `traceparent`), for
/// log lines written outside the span that carried it (a peer link's task,
/// a webhook's): `None` when the message is not traced.
pub fn trace_ids(map: &HashMap<String, String>) -> Option<(&str, &str)> {
    let mut parts = map.get("traceparent")?.split('-');
    let (_version, trace_id, span_id) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(trace_id, 32) && hex(span_id, 16)).then_some((trace_id, span_id))
}

/// A debug line about one message, carrying the trace and span ids of
/// `$context` (an `Option` of a W3C map) when it has them. Per-message lines are debug
/// only: at info a replica logs nothing per message.
macro_rules! debug_message {
    ($context:expr, $($rest:tt)+) => {
        if tracing::enabled!(tracing::Level::DEBUG) {
            match $context.and_then($crate::telemetry::propagation::trace_ids) {
                Some((trace_id, span_id)) => tracing::debug!(trace_id, span_id, $($rest)+),
                None => tracing::debug!($($rest)+),
            }
        }
    };
}
pub(crate) use debug_message;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_a_valid_traceparent_only() {
        let map = |v: &str| HashMap::from([("traceparent".to_owned(), v.to_owned())]);
        let traced = map("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(
            trace_ids(&traced),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        );
        assert_eq!(trace_ids(&HashMap::new()), None);
        assert_eq!(trace_ids(&map("00-xyz-00f067aa0ba902b7-01")), None);
        assert_eq!(trace_ids(&map("garbage")), None);
    }
}
