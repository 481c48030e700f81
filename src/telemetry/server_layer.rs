//! A tower layer that gives every sampled replicast RPC a server span,
//! continuing the caller's trace from its `traceparent` metadata. The
//! sampling decision comes first (see `sampling`): an unsampled call gets no
//! span at all.
//!
//! Health checks and reflection are not traced (a probe every few seconds is
//! noise), nor is the opening of a DeliverStream: it is a long-lived pipe,
//! and each message on it gets a process span parented to the send span of
//! the Broadcast that sent it. For unary calls the span ends with the
//! response and records its gRPC status; for Subscribe and Publish it covers
//! the call's setup (a Publish's messages are send spans under it).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::{Code, transport::server::TcpConnectInfo};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{
    propagation,
    sampling::Parent,
    spans::{Side, record_status},
};
use opentelemetry::trace::TraceContextExt as _;

/// Methods whose status arrives at the end of a stream, after the span.
const STREAMING: [&str; 2] = ["Subscribe", "Publish"];
/// Not traced as a call; see the module documentation.
const UNTRACED: &str = "DeliverStream";
const TRACED_PREFIX: &str = "/replicast.v1.Replicast/";

/// Adds [`GrpcTrace`] around the server's routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GrpcTrace<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, BoxFuture<Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if !super::tracing_enabled() {
            return futures::future::Either::Left(self.inner.call(request));
        }
        let method = match request.uri().path().strip_prefix(TRACED_PREFIX) {
            Some(method) if method != UNTRACED => method.to_owned(),
            _ => return futures::future::Either::Left(self.inner.call(request)),
        };
        // Sampling first: an unsampled call builds no span at all.
        let Some(parent_cx) = sample(request.headers()) else {
            return futures::future::Either::Left(self.inner.call(request));
        };
        let span = server_span(&request, &method, parent_cx);
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let unary = !STREAMING.contains(&method.as_str());
        futures::future::Either::Right(Box::pin(async move {
            let result = response.instrument(span.clone()).await;
            if let Ok(response) = &result {
                record_response(&span, response.headers(), unary);
            }
            result
        }))
    }
}

/// The head-sampling decision for a call with `headers`: `None` when it is
/// not sampled, else the caller's context to continue (if it sent one).
fn sample(headers: &http::HeaderMap) -> Option<Option<opentelemetry::Context>> {
    let parent_cx = headers
        .contains_key("traceparent")
        .then(|| propagation::extract_headers(headers));
    let parent = parent_cx.as_ref().and_then(|cx| {
        let context = cx.span().span_context().clone();
        context.is_valid().then(|| Parent {
            trace_id_low: u128::from_be_bytes(context.trace_id().to_bytes()) as u64,
            sampled: context.is_sampled(),
        })
    });
    super::head_sampler()
        .decide(parent, rand::random())
        .then_some(parent_cx)
}

/// The SERVER span of an HTTP/JSON API call (`POST /v1/broadcast`),
/// sampled and parented as a gRPC call's is; a disabled span when tracing
/// is off or the call is not sampled.
pub fn http_server_span(
    headers: &http::HeaderMap,
    method: &str,
    route: &str,
    remote: std::net::SocketAddr,
) -> Span {
    if !super::tracing_enabled() {
        return Span::none();
    }
    let Some(parent) = sample(headers) else {
        return Span::none();
    };
    let span = tracing::info_span!(
        target: "replicast::trace::rpc",
        "http.server",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        network.peer.address = remote.ip().to_string(),
        network.peer.port = i64::from(remote.port()),
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if let Some(parent) = parent {
        let _ = span.set_parent(parent);
    }
    span
}

fn server_span<B>(request: &Request<B>, method: &str, parent: Option<opentelemetry::Context>) -> Span {
    let connection = request.extensions().get::<TcpConnectInfo>();
    let local = connection.and_then(TcpConnectInfo::local_addr);
    let remote = connection.and_then(TcpConnectInfo::remote_addr);
    let span = tracing::info_span!(
        target: "replicast::trace::rpc",
        "grpc.server",
        otel.name = format!("replicast.v1.Replicast/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "replicast.v1.Replicast",
        rpc.method = method,
        server.address = local.map(|a| a.ip().to_string()),
        server.port = local.map(|a| i64::from(a.port())),
        network.peer.address = remote.map(|a| a.ip().to_string()),
        network.peer.port = remote.map(|a| i64::from(a.port())),
        rpc.grpc.status_code = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    if let Some(parent) = parent {
        let _ = span.set_parent(parent);
    }
    span
}

/// A trailers-only response (an error) carries grpc-status in its headers;
/// a unary success has it in the trailers, and is OK.
fn record_response(span: &Span, headers: &http::HeaderMap, unary: bool) {
    let status = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    match status {
        Some(code) => record_status(span, Side::Server, Code::from_i32(code), &message),
        None if unary => record_status(span, Side::Server, Code::Ok, ""),
        None => {}
    }
}
