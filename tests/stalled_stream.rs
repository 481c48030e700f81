//! A peer whose DeliverStream takes frames and never acknowledges them, on a
//! connection that is otherwise alive (HTTP/2 pings answered): the link gives
//! that stream up and opens a new one, instead of timing out on it forever.

mod common;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{Cluster, eventually, wait_peer_count};
use futures::{Stream, StreamExt};
use replicast::{
    error::broadcast_response_from_status,
    proto::v1::{
        AckPolicy, BroadcastRequest, BroadcastResponse, DeliverAck, DeliverFrame, DeliverRequest,
        DeliverResponse, Delivery, ListPeersRequest, ListPeersResponse, SubscribeRequest,
        replicast_server::{Replicast, ReplicastServer},
    },
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A peer whose first DeliverStream is stuck; later ones acknowledge.
#[derive(Clone, Default)]
struct StuckFirstStream {
    streams: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Replicast for StuckFirstStream {
    async fn broadcast(&self, _: Request<BroadcastRequest>) -> Result<Response<BroadcastResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn deliver(&self, _: Request<DeliverRequest>) -> Result<Response<DeliverResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    type DeliverStreamStream = RpcStream<DeliverAck>;

    async fn deliver_stream(
        &self,
        request: Request<Streaming<DeliverFrame>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        let frames = request.into_inner();
        if self.streams.fetch_add(1, Ordering::SeqCst) == 0 {
            // Reads every frame, answers none, until the sender goes away.
            let stuck = futures::stream::unfold(frames, |mut frames| async move {
                while let Some(Ok(_)) = frames.next().await {}
                None
            });
            return Ok(Response::new(Box::pin(stuck)));
        }
        let acks = frames.map(|frame| {
            let frame = frame?;
            Ok(DeliverAck {
                tag: frame.tag,
                code: 0,
                error: String::new(),
                response: Some(DeliverResponse {
                    id: frame.message.map(|m| m.id).unwrap_or_default(),
                    sequence: 1,
                    duplicate: false,
                }),
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
}

#[tokio::test]
async fn a_stream_that_never_acknowledges_is_reopened() {
    let mut cluster = Cluster::start_with(2, 1, &["--peer-timeout", "200ms"]).await;
    let peer = StuckFirstStream::default();
    let listener = cluster.hosts.listeners[1].take().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReplicastServer::new(peer.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    cluster.publish(&[0, 1]).await;
    wait_peer_count(cluster.addr(0), 2).await;
    let stuck_peer = cluster.addr(1).to_string();

    let client = cluster.client(0).await;
    eventually(
        "the stuck peer's receipt to turn OK",
        Duration::from_secs(15),
        || {
            let mut client = client.clone();
            let stuck_peer = stuck_peer.clone();
            async move {
                let request = BroadcastRequest {
                    topic: "t".into(),
                    ack: AckPolicy::All as i32,
                    ..Default::default()
                };
                let response = match client.broadcast(request).await {
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
