//! A tower layer that reports an oversized request as RESOURCE_EXHAUSTED.
//!
//! tonic rejects a request larger than `max_decoding_message_size` before our
//! handler runs, with OUT_OF_RANGE. gRPC's own implementations (C-core, Go,
//! Java) use RESOURCE_EXHAUSTED for "message larger than max", and clients
//! retry-classify on that code, so this layer rewrites the trailers-only
//! response tonic produces for unary calls and names the flag to change.
//! Requests that fit the frame but exceed `--max-message-bytes` get
//! RESOURCE_EXHAUSTED from validation directly.

use std::task::{Context, Poll};

use futures::TryFutureExt;
use http::{HeaderValue, Response};
use percent_encoding::percent_decode;
use tower::{Layer, Service};

/// tonic's message for a decoded message over the limit.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";
const OUT_OF_RANGE: &[u8] = b"11";

/// Adds [`Oversize`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Oversize<S> {
    inner: S,
}

impl<S, Req, ResBody> Service<Req> for Oversize<S>
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

fn rewrite<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_none_or(|s| s.as_bytes() != OUT_OF_RANGE)
    {
        return response;
    }
    // grpc-message is percent-encoded on the wire.
    let original = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let Some(detail) = original.strip_prefix(TONIC_TOO_LARGE) else {
        return response;
    };
    // tonic's text goes on ": found N bytes, the limit is: M bytes".
    let detail = detail.trim_start_matches(": found ");
    let message = format!(
        "request too large: {detail} (--max-message-bytes plus 512 KiB for topic, id and headers); send a smaller payload"
    );
    headers.insert("grpc-status", HeaderValue::from_static("8"));
    // Printable ASCII throughout; '%' is the only byte that needs encoding.
    if let Ok(value) = HeaderValue::from_str(&message.replace('%', "%25")) {
        headers.insert("grpc-message", value);
    }
    response
}
