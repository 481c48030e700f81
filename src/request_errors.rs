//! A tower layer that gives the requests tonic cannot decode the status
//! gRPC clients expect, with a message a person can act on.
//!
//! tonic rejects such a request before our handler runs, in a trailers-only
//! response:
//! - larger than `max_decoding_message_size`: OUT_OF_RANGE. gRPC's own
//!   implementations (C-core, Go, Java) use RESOURCE_EXHAUSTED for "message
//!   larger than max", and clients retry-classify on that code, so it becomes
//!   RESOURCE_EXHAUSTED naming the flag to change. Requests that fit the
//!   frame but exceed `--max-message-bytes` get RESOURCE_EXHAUSTED from
//!   validation directly.
//! - not a valid protobuf message (truncated, wrong wire types, invalid
//!   UTF-8): INTERNAL, which says "the server broke". It is the client's
//!   request that is wrong: INVALID_ARGUMENT (see [`malformed`], which the
//!   streaming handlers use for the messages they read themselves).
//!
//! tonic's status is recognised by its code and text: tonic has no typed
//! error for these at this layer.

use std::task::{Context, Poll};

use futures::TryFutureExt;
use http::{HeaderValue, Response};
use percent_encoding::percent_decode;
use tower::{Layer, Service};

/// tonic's message for a decoded message over the limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";
const OUT_OF_RANGE: &[u8] = b"11";

/// Adds [`RequestErrors`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestErrorsLayer;

impl<S> Layer<S> for RequestErrorsLayer {
    type Service = RequestErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestErrors { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RequestErrors<S> {
    inner: S,
}

impl<S, Req, ResBody> Service<Req> for RequestErrors<S>
where
    S: Service<Req, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(Response<ResBody>) -> Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.inner.call(request).map_ok(rewrite as fn(_) -> _)
    }
}

/// prost's text for a message that is not valid protobuf.
const DECODE_FAILED: &str = "failed to decode Protobuf message: ";
const INTERNAL: &[u8] = b"13";

fn rewrite<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    let status = headers.get("grpc-status").map(HeaderValue::as_bytes);
    if status != Some(OUT_OF_RANGE) && status != Some(INTERNAL) {
        return response;
    }
    // grpc-message is percent-encoded on the wire.
    let original = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let (code, message) = if let Some(detail) = original.strip_prefix(TONIC_TOO_LARGE) {
        // tonic's text goes on ": found N bytes, the limit is: M bytes".
        let detail = detail.trim_start_matches(": found ");
        (
            "8",
            format!(
                "request too large: {detail} (--max-message-bytes plus 512 KiB for topic, id and headers); send a smaller payload"
            ),
        )
    } else if let Some(detail) = original.strip_prefix(DECODE_FAILED) {
        ("3", malformed_message(detail))
    } else {
        return response;
    };
    headers.insert("grpc-status", HeaderValue::from_static(code));
    // Printable ASCII throughout; '%' is the only byte that needs encoding.
    if let Ok(value) = HeaderValue::from_str(&message.replace('%', "%25")) {
        headers.insert("grpc-message", value);
    }
    response
}

fn malformed_message(detail: &str) -> String {
    format!(
        "malformed request: cannot decode the protobuf message ({detail}); check the client's generated code and the proto it was built from"
    )
}

/// The status for a message a streaming handler read: a decode failure is
/// the client's INVALID_ARGUMENT, not the server's INTERNAL; anything else
/// is passed on.
pub fn malformed(status: tonic::Status) -> tonic::Status {
    match status.message().strip_prefix(DECODE_FAILED) {
        Some(detail) if status.code() == tonic::Code::Internal => {
            tonic::Status::invalid_argument(malformed_message(detail))
        }
        _ => status,
    }
}
