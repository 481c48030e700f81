//! Peers that misbehave on the DeliverStream, played by a fake replica:
//! - one whose stream takes frames and never acknowledges them, on a
//!   connection that is otherwise alive (HTTP/2 pings answered): the link
//!   gives that stream up and opens a new one, instead of timing out on it
//!   forever;
//! - one that answers a frame with UNAVAILABLE (as a replica does for a frame
//!   that races the end of its drain): a transient refusal, retried, not a
//!   final rejection.

use crate::common;

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
    /// The metadata keys of every call it got.
    metadata: Arc<Mutex<Vec<String>>>,
}

impl FakePeer {
    fn frames_of(&self, id: &str) -> usize {
        self.frames.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    fn record<T>(&self, request: &Request<T>) {
        let keys = request.metadata().keys().map(|key| format!("{key:?}"));
        self.metadata.lock().unwrap().extend(keys);
    }
}

#[tonic::async_trait]
impl Replicast for FakePeer {
    async fn broadcast(&self, _: Request<BroadcastRequest>) -> Result<Response<BroadcastResponse>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverResponse>, Status> {
        self.record(&request);
        Err(Status::unimplemented("test peer"))
    }

    // As a replica from before announcements: the other replica must still
    // become ready and deliver to it.
    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        self.record(&request);
        Err(Status::unimplemented("test peer"))
    }

    type DeliverStreamStream = RpcStream<DeliverAck>;

    async fn deliver_stream(
        &self,
        request: Request<Streaming<DeliverFrame>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        self.record(&request);
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
    cluster_with_flags(peer, &[]).await
}

/// The same, the real replica started with `extra` flags too.
async fn cluster_with_flags(peer: &FakePeer, extra: &[&str]) -> (Cluster, tokio::task::JoinHandle<()>) {
    let mut flags = vec!["--peer-timeout", "200ms"];
    flags.extend_from_slice(extra);
    let mut cluster = Cluster::start_with(2, 1, &flags).await;
    let listener = cluster.hosts.listeners[1].take().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(ReplicastServer::new(peer.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(async move { server.await.expect("fake peer serves") });
    cluster.publish(&[0, 1]).await;
    if extra.contains(&"--tokens-file") {
        // ListPeers needs a token then: wait on the fake peer's link instead.
        let frames = peer.metadata.clone();
        eventually(
            "the replica's link to the fake peer",
            Duration::from_secs(10),
            || {
                let frames = frames.clone();
                async move { !frames.lock().unwrap().is_empty() }
            },
        )
        .await;
    } else {
        wait_peer_count(cluster.addr(0), 2).await;
    }
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

#[tokio::test]
async fn a_clients_credentials_are_never_forwarded_to_peers() {
    let tokens = std::env::temp_dir().join(format!("replicast-forward-{}.txt", std::process::id()));
    let line = replicast::auth::digest_line("app", "app-secret");
    let line = format!(
        "{} publish=* subscribe=*\n",
        line.split(" publish=").next().unwrap()
    );
    std::fs::write(&tokens, line).unwrap();
    let path = tokens.display().to_string();
    let peer = FakePeer {
        misbehaviour: Misbehaviour::RefuseFirstTry,
        ..FakePeer::default()
    };
    let (cluster, server) = cluster_with_flags(&peer, &["--tokens-file", &path]).await;
    let mut request = Request::new(broadcast_all("with-credentials"));
    request
        .metadata_mut()
        .insert("authorization", "Bearer app-secret".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-app-header", "private".parse().unwrap());
    let response = cluster
        .client(0)
        .await
        .broadcast(request)
        .await
        .expect("the client may publish")
        .into_inner();
    assert_eq!((response.replicas, response.acked), (2, 2), "{response:?}");
    let seen = peer.metadata.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the peer saw the replica's calls");
    assert!(
        !seen
            .iter()
            .any(|key| key.contains("authorization") || key.contains("x-app-header")),
        "a client's metadata reached the peer: {seen:?}"
    );
    server.abort();
    cluster.shutdown().await;
    let _ = std::fs::remove_file(tokens);
}
