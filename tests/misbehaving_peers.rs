//! Peers that misbehave on the DeliverStream, played by a fake replica:
//! - one whose stream takes frames and never acknowledges them, on a
//!   connection that is otherwise alive (HTTP/2 pings answered): the link
//!   gives that stream up and opens a new one, instead of timing out on it
//!   forever;
//! - one that answers a frame with UNAVAILABLE (as a replica does for a frame
//!   that races the end of its drain): a transient refusal, retried, not a
//!   final rejection.

mod common;

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Cluster, eventually, wait_peer_count};
use futures::{Stream, StreamExt};
use replicast::{
    error::broadcast_response_from_status,
    proto::v1::{
        AckPolicy, AnnounceRequest, AnnounceResponse, BroadcastRequest, BroadcastResponse, DeliverAck,
        DeliverFrame, DeliverRequest, DeliverResponse, Delivery, ListPeersRequest, ListPeersResponse,
        PublishRequest, PublishResponse, SubscribeRequest,
        replicast_server::{Replicast, ReplicastServer},
    },
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone, Copy, Default)]
enum Misbehaviour {
    /// The first DeliverStream takes frames and acknowledges none.
    #[default]
    StuckFirstStream,
    /// The first frame of every message id is answered UNAVAILABLE.
    RefuseFirstTry,
}

/// A fake replica: acknowledges deliveries, after its misbehaviour.
#[derive(Clone, Default)]
struct FakePeer {
    misbehaviour: Misbehaviour,
    streams: Arc<AtomicUsize>,
    /// Frames seen per message id.
    frames: Arc<Mutex<HashMap<String, usize>>>,
}

impl FakePeer {
    fn frames_of(&self, id: &str) -> usize {
        self.frames.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

#[tonic::async_trait]
impl Replicast for FakePeer {
    async fn broadcast(&self, _: Request<BroadcastRequest>) -> Result<Response<BroadcastResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn deliver(&self, _: Request<DeliverRequest>) -> Result<Response<DeliverResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    // As a replica from before announcements: the other replica must still
    // become ready and deliver to it.
    async fn announce(&self, _: Request<AnnounceRequest>) -> Result<Response<AnnounceResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    type DeliverStreamStream = RpcStream<DeliverAck>;

    async fn deliver_stream(
        &self,
        request: Request<Streaming<DeliverFrame>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        let frames = request.into_inner();
        let first_stream = self.streams.fetch_add(1, Ordering::SeqCst) == 0;
        if first_stream && matches!(self.misbehaviour, Misbehaviour::StuckFirstStream) {
            // Reads every frame, answers none, until the sender goes away.
            let stuck = futures::stream::unfold(frames, |mut frames| async move {
                while let Some(Ok(_)) = frames.next().await {}
                None
            });
            return Ok(Response::new(Box::pin(stuck)));
        }
        let (misbehaviour, seen) = (self.misbehaviour, self.frames.clone());
        let acks = frames.map(move |frame| {
            let frame = frame?;
            let id = frame.message.map(|m| m.id).unwrap_or_default();
            let tries = {
                let mut seen = seen.lock().unwrap();
                let tries = seen.entry(id.clone()).or_default();
                *tries += 1;
                *tries
            };
            if tries == 1 && matches!(misbehaviour, Misbehaviour::RefuseFirstTry) {
                return Ok(DeliverAck {
                    tag: frame.tag,
                    code: tonic::Code::Unavailable as i32,
                    error: "this replica is shutting down; reconnect to another replica".into(),
                    response: None,
                    also: Vec::new(),
                });
            }
            Ok(DeliverAck {
                tag: frame.tag,
                code: 0,
                error: String::new(),
                response: Some(DeliverResponse {
                    id,
                    sequence: 1,
                    duplicate: false,
                }),
                also: Vec::new(),
            })
        });
        Ok(Response::new(Box::pin(acks)))
    }

    type SubscribeStream = RpcStream<Delivery>;

    async fn subscribe(
        &self,
        _: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn list_peers(&self, _: Request<ListPeersRequest>) -> Result<Response<ListPeersResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    type PublishStream = RpcStream<PublishResponse>;

    async fn publish(
        &self,
        _: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        Err(Status::unimplemented("test peer"))
    }
}

/// One real replica (0) and `peer` (1), both in DNS.
async fn cluster_with(peer: &FakePeer) -> (Cluster, tokio::task::JoinHandle<()>) {
    let mut cluster = Cluster::start_with(2, 1, &["--peer-timeout", "200ms"]).await;
    let listener = cluster.hosts.listeners[1].take().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(ReplicastServer::new(peer.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(async move { server.await.expect("fake peer serves") });
    cluster.publish(&[0, 1]).await;
    wait_peer_count(cluster.addr(0), 2).await;
    (cluster, server)
}

fn broadcast_all(id: &str) -> BroadcastRequest {
    BroadcastRequest {
        topic: "t".into(),
        id: id.into(),
        ack: AckPolicy::All as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_stream_that_never_acknowledges_is_reopened() {
    let peer = FakePeer::default();
    let (cluster, server) = cluster_with(&peer).await;
    let stuck_peer = cluster.addr(1).to_string();

    let client = cluster.client(0).await;
    eventually(
        "the stuck peer's receipt to turn OK",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            let stuck_peer = stuck_peer.clone();
            async move {
                let response = match client.broadcast(broadcast_all("")).await {
                    Ok(response) => response.into_inner(),
                    Err(status) => broadcast_response_from_status(&status).expect("receipts"),
                };
                response
                    .outcomes
                    .iter()
                    .any(|o| o.peer == stuck_peer && o.code == 0)
            }
        },
    )
    .await;
    assert!(
        peer.streams.load(Ordering::SeqCst) >= 2,
        "the link opened a new stream"
    );
    server.abort();
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_unavailable_ack_is_retried_not_final() {
    let peer = FakePeer {
        misbehaviour: Misbehaviour::RefuseFirstTry,
        ..FakePeer::default()
    };
    let (cluster, server) = cluster_with(&peer).await;
    let response = cluster
        .client(0)
        .await
        .broadcast(broadcast_all("refused-once"))
        .await
        .expect("the refusal was retried within the hop deadline")
        .into_inner();
    assert_eq!((response.replicas, response.acked), (2, 2), "{response:?}");
    assert_eq!(peer.frames_of("refused-once"), 2, "refused once, then delivered");
    server.abort();
    cluster.shutdown().await;
}
