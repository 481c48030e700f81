//! The local HTTP/JSON API (`--http-listen`), for apps that would rather
//! not run gRPC in their workers: `POST /v1/broadcast` takes the proto3
//! JSON of `BroadcastRequest` and answers the proto3 JSON of
//! `BroadcastResponse`, as grpcurl and grpc-gateway write them; `GET
//! /v1/peers` answers `ListPeersResponse`; `POST /v1/drain` starts this
//! replica's drain (its leave announcement first), for an app's preStop.
//!
//! Each call goes through the gRPC service's own handler, so validation,
//! limits and tokens are the same; the drain, which has no gRPC twin,
//! needs a valid token when tokens are on. The JSON mapping is `prost-reflect`'s,
//! driven by the descriptors the proto compiles to, not hand-written. A
//! failure answers the HTTP status grpc-gateway uses for its gRPC code,
//! with the JSON of `google.rpc.Status` whose `details` carry the
//! `BroadcastResponse` (every receipt).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::server::TcpConnectInfo;
use tracing::{Instrument as _, info, warn};

use crate::{
    error::broadcast_response_from_status,
    proto::{
        self,
        replica::replicast_server::Replicast as _,
        v1::{BroadcastRequest, ListPeersRequest},
    },
    service::ReplicastService,
    telemetry::http_server_span,
};

/// Room in a request body beyond the base64 of its payload: topic, id,
/// headers, JSON punctuation.
const BODY_HEADROOM: usize = 512 * 1024;

/// What the handlers share.
#[derive(Clone)]
struct Api {
    service: ReplicastService,
    broadcast_request: MessageDescriptor,
    broadcast_response: MessageDescriptor,
    list_peers_response: MessageDescriptor,
    /// Set by `POST /v1/drain`.
    drain: Arc<watch::Sender<bool>>,
}

/// The descriptors could not be read (a build problem, not a user's).
#[derive(Debug, thiserror::Error)]
#[error("the embedded descriptors lack {0}")]
pub struct MissingDescriptor(String);

/// Serves the API on `listener` until `stopped`. `drain` is set when an app
/// asks for the drain.
pub fn spawn_http_api(
    listener: TcpListener,
    max_message_bytes: usize,
    service: ReplicastService,
    drain: watch::Sender<bool>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<()>, MissingDescriptor> {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| MissingDescriptor(format!("a valid descriptor set ({e})")))?;
    let message = |name: &str| {
        pool.get_message_by_name(name)
            .ok_or_else(|| MissingDescriptor(name.to_owned()))
    };
    let api = Api {
        service,
        broadcast_request: message("replicast.v1.BroadcastRequest")?,
        broadcast_response: message("replicast.v1.BroadcastResponse")?,
        list_peers_response: message("replicast.v1.ListPeersResponse")?,
        drain: Arc::new(drain),
    };
    let router = Router::new()
        .route("/v1/broadcast", post(broadcast))
        .route("/v1/peers", get(peers))
        .route("/v1/drain", post(drain_now))
        // The payload limit is checked by the service, as for gRPC; this
        // bounds what is buffered and parsed first (base64 is 4/3 larger).
        .layer(axum::extract::DefaultBodyLimit::max(
            max_message_bytes / 3 * 4 + 4 + BODY_HEADROOM,
        ))
        .with_state(api);
    let addr = listener.local_addr().ok();
    info!(?addr, "serving the HTTP/JSON API (--http-listen)");
    if addr.is_some_and(|a| !a.ip().is_loopback()) {
        warn!(
            ?addr,
            "the HTTP API listens beyond loopback, in plaintext: anyone who reaches it may Broadcast (and drain \
             this replica) unless --tokens-file is set; it is meant for the app next to the replica (127.0.0.1)"
        );
    }
    Ok(tokio::spawn(
        async move {
            let served = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stopped)
            .await;
            if let Err(error) = served {
                warn!(%error, "the HTTP API stopped");
            }
        }
        .instrument(tracing::info_span!("http_api")),
    ))
}

/// `?timeout=2s` (humantime), as an alternative to a `Grpc-Timeout` header.
#[derive(Debug, serde::Deserialize)]
struct CallQuery {
    timeout: Option<String>,
}

/// The JSON of a gRPC failure, at grpc-gateway's HTTP status for the code.
fn failure(code: tonic::Code, message: &str, details: Vec<serde_json::Value>) -> Response {
    let body = serde_json::json!({
        "code": code as i32,
        "message": message,
        "details": details,
    });
    (
        http_status(code),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// grpc-gateway's mapping of gRPC codes to HTTP statuses.
pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A prost message as proto3 JSON, through its descriptor.
fn to_json(message: &impl prost::Message, descriptor: &MessageDescriptor) -> serde_json::Value {
    let dynamic = DynamicMessage::decode(descriptor.clone(), message.encode_to_vec().as_slice())
        .expect("a message decodes with its own descriptor");
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
        .expect("proto3 JSON of a valid message")
}

/// The call's deadline from `Grpc-Timeout` or `?timeout=`.
fn deadline(headers: &HeaderMap, query: &CallQuery) -> Result<Option<Duration>, Box<Response>> {
    if let Some(value) = headers.get("grpc-timeout") {
        let parsed = value
            .to_str()
            .ok()
            .and_then(crate::fanout::budget::parse_grpc_timeout);
        return parsed.map(Some).ok_or_else(|| {
            Box::new(failure(
                tonic::Code::InvalidArgument,
                "Grpc-Timeout must be digits and a unit (H, M, S, m, u, n), e.g. 2S",
                Vec::new(),
            ))
        });
    }
    match &query.timeout {
        None => Ok(None),
        Some(text) => humantime::parse_duration(text).map(Some).map_err(|e| {
            Box::new(failure(
                tonic::Code::InvalidArgument,
                &format!("timeout={text}: {e} (write it like 2s or 500ms)"),
                Vec::new(),
            ))
        }),
    }
}

/// A tonic request as the gRPC server would have built it: the caller's
/// credentials, its deadline and its address (for per-client limits).
fn grpc_request<T>(
    message: T,
    headers: &HeaderMap,
    remote: SocketAddr,
    timeout: Option<Duration>,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| tonic::metadata::MetadataValue::try_from(v.as_bytes()).ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request.extensions_mut().insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: Some(remote),
    });
    request
}

async fn broadcast(
    State(api): State<Api>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(query): Query<CallQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let timeout = match deadline(&headers, &query) {
        Ok(timeout) => timeout,
        Err(response) => return *response,
    };
    let mut json = serde_json::Deserializer::from_slice(&body);
    let request = match DynamicMessage::deserialize(api.broadcast_request.clone(), &mut json)
        .and_then(|dynamic| json.end().map(|()| dynamic))
        .map_err(|e| e.to_string())
        .and_then(|dynamic| {
            BroadcastRequest::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| e.to_string())
        }) {
        Ok(request) => request,
        Err(error) => {
            return failure(
                tonic::Code::InvalidArgument,
                &format!(
                    "the body is not the proto3 JSON of a BroadcastRequest: {error} (payload is base64, ack an \
                     enum name such as ACK_POLICY_ALL)"
                ),
                Vec::new(),
            );
        }
    };
    // Sampled, and continuing the caller's trace, as a gRPC call is.
    let span = http_server_span(&headers, "POST", "/v1/broadcast", remote);
    let request = grpc_request(request, &headers, remote, timeout);
    match api.service.broadcast(request).instrument(span.clone()).await {
        Ok(response) => {
            let json = to_json(response.get_ref(), &api.broadcast_response);
            (StatusCode::OK, axum::Json(json)).into_response()
        }
        Err(status) => {
            crate::telemetry::spans::record_status(
                &span,
                crate::telemetry::spans::Side::Server,
                status.code(),
                status.message(),
            );
            let details = broadcast_response_from_status(&status)
                .map(|response| {
                    let mut any = to_json(&response, &api.broadcast_response);
                    if let Some(object) = any.as_object_mut() {
                        object.insert(
                            "@type".into(),
                            "type.googleapis.com/replicast.v1.BroadcastResponse".into(),
                        );
                    }
                    vec![any]
                })
                .unwrap_or_default();
            failure(status.code(), status.message(), details)
        }
    }
}

async fn peers(
    State(api): State<Api>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let request = grpc_request(ListPeersRequest {}, &headers, remote, None);
    match api.service.list_peers(request).await {
        Ok(response) => (
            StatusCode::OK,
            axum::Json(to_json(response.get_ref(), &api.list_peers_response)),
        )
            .into_response(),
        Err(status) => failure(status.code(), status.message(), Vec::new()),
    }
}

/// Starts the drain, as SIGTERM would: for an app that begins its own
/// shutdown (its preStop) while replicast, its native sidecar, would only
/// get SIGTERM after the app exited.
async fn drain_now(
    State(api): State<Api>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    // With tokens on, only a client with a valid token may drain.
    let request = grpc_request((), &headers, remote, None);
    if let Err(error) = api.service.authenticate(&request) {
        let status = tonic::Status::from(error);
        return failure(status.code(), status.message(), Vec::new());
    }
    let first = !api.drain.send_replace(true);
    if first {
        info!(%remote, "drain requested over the HTTP API (POST /v1/drain)");
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({ "draining": true, "already": !first })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_grpc_gateways_statuses() {
        use tonic::Code::*;
        let table = [
            (Ok, 200),
            (Cancelled, 499),
            (Unknown, 500),
            (InvalidArgument, 400),
            (DeadlineExceeded, 504),
            (NotFound, 404),
            (AlreadyExists, 409),
            (PermissionDenied, 403),
            (ResourceExhausted, 429),
            (FailedPrecondition, 400),
            (Aborted, 409),
            (OutOfRange, 400),
            (Unimplemented, 501),
            (Internal, 500),
            (Unavailable, 503),
            (DataLoss, 500),
            (Unauthenticated, 401),
        ];
        for (code, status) in table {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn the_descriptors_hold_every_message_the_api_maps() {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        for name in [
            "replicast.v1.BroadcastRequest",
            "replicast.v1.BroadcastResponse",
            "replicast.v1.ListPeersResponse",
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
    }
}
