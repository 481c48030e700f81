//! Malformed input at every RPC, as raw bytes on the wire: empty, truncated,
//! wrong wire types, invalid UTF-8, unknown enums, huge maps, absurd
//! deadlines, a flood of streams and HTTP/2 rapid reset. Each gets a status
//! a person can act on, and the replica keeps serving everybody else.

use crate::common;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::{Cluster, client};
use futures::StreamExt;
use replicast::proto::v1::{AckPolicy, BroadcastRequest, SubscribeRequest};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Passes bytes through unchanged, so a test can put anything on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Kinds of call, by how many messages go each way.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Unary,
    ServerStreaming,
    Bidi,
}

/// Sends `body` as the one request message of `method` and returns the
/// status the call ended with (OK when it answered).
async fn call_raw(channel: Channel, method: &str, shape: Shape, body: Bytes) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let path = http::uri::PathAndQuery::try_from(format!("/replicast.v1.Replicast/{method}")).unwrap();
    let mut request = Request::new(body.clone());
    request.set_timeout(Duration::from_secs(5));
    let outcome = match shape {
        Shape::Unary => grpc.unary(request, path, RawCodec).await.map(|_| ()),
        Shape::ServerStreaming => match grpc.server_streaming(request, path, RawCodec).await {
            Ok(response) => first_error(response.into_inner()).await,
            Err(status) => Err(status),
        },
        Shape::Bidi => {
            let mut request = Request::new(futures::stream::iter([body]));
            request.set_timeout(Duration::from_secs(5));
            match grpc.streaming(request, path, RawCodec).await {
                Ok(response) => first_error(response.into_inner()).await,
                Err(status) => Err(status),
            }
        }
    };
    outcome.err().unwrap_or_else(|| Status::ok(""))
}

/// Reads a response stream for a short while: its error, or OK.
async fn first_error(mut stream: tonic::Streaming<Bytes>) -> Result<(), Status> {
    let read = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(1500), read)
        .await
        .unwrap_or(Ok(()))
}

fn field(number: u32, wire_type: u8) -> u8 {
    (number << 3) as u8 | wire_type
}

/// `BroadcastRequest { topic: "t" }` plus `rest`.
fn topic_t(rest: &[u8]) -> Bytes {
    let mut body = vec![field(1, 2), 1, b't'];
    body.extend_from_slice(rest);
    body.into()
}

/// `PublishRequest { tag: 1, broadcast: <inner> }`.
fn publish(inner: &[u8]) -> Bytes {
    let mut body = vec![field(1, 0), 1, field(2, 2), inner.len() as u8];
    body.extend_from_slice(inner);
    body.into()
}

/// `DeliverFrame { tag: 1, message: <inner> }`.
fn frame(inner: &[u8]) -> Bytes {
    publish(inner)
}

/// Another client's ack=ALL Broadcast through `addr` succeeds.
async fn assert_still_serving(addr: std::net::SocketAddr) {
    client(addr)
        .await
        .broadcast(BroadcastRequest {
            topic: "still.serving".into(),
            ack: AckPolicy::All as i32,
            ..Default::default()
        })
        .await
        .expect("the replica still serves other clients");
}

#[tokio::test]
async fn every_rpc_answers_malformed_bytes_with_a_clear_status() {
    let cluster = Cluster::start(2, &[]).await;
    let addr = cluster.addr(0);
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let truncated = [field(1, 2), 10, b'a', b'b'];
    let wrong_wire_type = [field(1, 0), 1];
    let bad_utf8 = [field(1, 2), 2, 0xff, 0xfe];
    let unknown_enum = topic_t(&[field(5, 0), 99]);
    use Shape::*;
    let cases: Vec<(&str, Shape, Bytes, Code, &str)> = vec![
        ("Broadcast", Unary, Bytes::new(), Code::InvalidArgument, "topic"),
        (
            "Broadcast",
            Unary,
            Bytes::copy_from_slice(&truncated),
            Code::InvalidArgument,
            "decode",
        ),
        (
            "Broadcast",
            Unary,
            Bytes::copy_from_slice(&wrong_wire_type),
            Code::InvalidArgument,
            "decode",
        ),
        (
            "Broadcast",
            Unary,
            Bytes::copy_from_slice(&bad_utf8),
            Code::InvalidArgument,
            "UTF-8",
        ),
        (
            "Broadcast",
            Unary,
            unknown_enum.clone(),
            Code::InvalidArgument,
            "ack",
        ),
        ("Deliver", Unary, Bytes::new(), Code::InvalidArgument, "message"),
        (
            "Deliver",
            Unary,
            Bytes::copy_from_slice(&truncated),
            Code::InvalidArgument,
            "decode",
        ),
        ("Announce", Unary, Bytes::new(), Code::InvalidArgument, "address"),
        (
            "Announce",
            Unary,
            // field 2, the address
            Bytes::copy_from_slice(&[field(2, 2), 2, 0xff, 0xfe]),
            Code::InvalidArgument,
            "UTF-8",
        ),
        (
            "ListPeers",
            Unary,
            Bytes::copy_from_slice(&truncated),
            Code::InvalidArgument,
            "decode",
        ),
        (
            "Subscribe",
            ServerStreaming,
            Bytes::copy_from_slice(&bad_utf8),
            Code::InvalidArgument,
            "UTF-8",
        ),
        (
            "Subscribe",
            ServerStreaming,
            Bytes::copy_from_slice(&[field(1, 2), 3, b'a', b'*', b'b']),
            Code::InvalidArgument,
            "'*'",
        ),
        (
            "Publish",
            Bidi,
            Bytes::copy_from_slice(&truncated),
            Code::InvalidArgument,
            "decode",
        ),
        (
            "DeliverStream",
            Bidi,
            Bytes::copy_from_slice(&truncated),
            Code::InvalidArgument,
            "decode",
        ),
    ];
    for (method, shape, body, code, words) in cases {
        let status = call_raw(channel.clone(), method, shape, body.clone()).await;
        assert_eq!(status.code(), code, "{method} with {body:?}: {status:?}");
        assert!(
            status.message().contains(words),
            "{method} with {body:?}: {words:?} in {:?}",
            status.message()
        );
    }
    // A frame whose message does not decode fails its own ack, not the
    // stream (the peer protocol's contract).
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/replicast.v1.Replicast/DeliverStream");
    let mut acks = grpc
        .streaming(
            Request::new(futures::stream::iter([frame(&bad_utf8)])),
            path,
            RawCodec,
        )
        .await
        .expect("DeliverStream")
        .into_inner();
    let ack = acks.message().await.expect("an ack").expect("one ack");
    let ack = <replicast::proto::v1::DeliverAck as prost::Message>::decode(ack).expect("a DeliverAck");
    assert_eq!(ack.code, Code::InvalidArgument as i32, "{ack:?}");
    assert!(ack.error.contains("UTF-8"), "{ack:?}");

    // A bad message on a Publish stream fails alone: its answer says why.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/replicast.v1.Replicast/Publish");
    let requests = futures::stream::iter([publish(&unknown_enum), publish(&topic_t(&[]))]);
    let mut answers = grpc
        .streaming(Request::new(requests), path, RawCodec)
        .await
        .expect("Publish stream")
        .into_inner();
    let mut count = 0;
    while let Ok(Some(_)) = answers.message().await {
        count += 1;
    }
    assert_eq!(count, 2, "both messages answered, the bad one by its own code");

    // A huge map: a status, not a hang or a crash.
    let headers = (0..50_000).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let status = client(addr)
        .await
        .broadcast(BroadcastRequest {
            topic: "t".into(),
            headers,
            ack: AckPolicy::All as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted),
        "{status:?}"
    );
    // Absurd deadlines, as the grpc-timeout header carries them (no client
    // timer of its own): 1 ns answers DEADLINE_EXCEEDED, a year is refused
    // by --max-deadline, garbage is ignored (the default deadline applies).
    for (timeout, code) in [
        ("1n", Some(Code::DeadlineExceeded)),
        ("8760H", Some(Code::InvalidArgument)),
        ("soon", None),
    ] {
        let mut request = Request::new(BroadcastRequest {
            topic: "t".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("grpc-timeout", timeout.parse().unwrap());
        let result = client(addr).await.broadcast(request).await;
        match code {
            // tonic's client keeps its own timer on the header too: with
            // 1 ns it may give up (CANCELLED) before the answer arrives.
            Some(Code::DeadlineExceeded) => assert!(
                matches!(
                    result.unwrap_err().code(),
                    Code::DeadlineExceeded | Code::Cancelled
                ),
                "{timeout}"
            ),
            Some(code) => assert_eq!(result.unwrap_err().code(), code, "{timeout}"),
            None => {
                result.unwrap_or_else(|s| panic!("{timeout}: {s:?}"));
            }
        }
    }
    assert_still_serving(addr).await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_streams_and_rapid_resets_leave_others_served() {
    let cluster = Cluster::start(1, &[]).await;
    let addr = cluster.addr(0);
    // A flood: 3,000 Subscribe streams on one connection (more than the
    // per-connection limit, which queues them).
    let flood = client(addr).await;
    let mut opened = futures::stream::iter(0..3_000)
        .map(|_| {
            let mut c = flood.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(2), c.subscribe(SubscribeRequest::default())).await
            }
        })
        .buffer_unordered(3_000);
    let mut streams = Vec::new();
    while let Some(result) = opened.next().await {
        if let Ok(Ok(stream)) = result {
            streams.push(stream);
        }
    }
    assert!(!streams.is_empty());
    assert!(
        streams.len() <= 1_024,
        "at most --max-streams-per-connection at once: {}",
        streams.len()
    );
    // Rapid reset: calls opened and cancelled at once, over and over.
    let reset = client(addr).await;
    for _ in 0..2_000 {
        let mut c = reset.clone();
        let call = tokio::spawn(async move { c.subscribe(SubscribeRequest::default()).await });
        call.abort();
    }
    // Meanwhile another client is served (within the Broadcast's deadline).
    assert_still_serving(addr).await;
    drop(streams);
    cluster.shutdown().await;
}
