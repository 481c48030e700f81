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
