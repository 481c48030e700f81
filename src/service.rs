//! The gRPC layer: decode, validate, call the core, encode. No policy here.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Instant, SystemTime},
};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    discovery::{self, PeerSnapshot},
    error::{Error, code_name},
    fanout::{Budget, FanOut, budget, deliver_locally},
    local::{LocalDelivery, Start, TopicFilter},
    metrics::{Metrics, OverflowLabels},
    proto::v1::{
        AckPolicy, BroadcastRequest, BroadcastResponse, DeliverAck, DeliverFrame, DeliverRequest,
        DeliverResponse, Delivery, ListPeersRequest, ListPeersResponse, Message, Peer, SubscribeRequest,
        replicast_server::Replicast,
    },
    telemetry::{
        self, propagation,
        spans::{self, Side},
    },
    validate,
};

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Everything the RPC handlers need, shared by all connections.
#[derive(Debug, Clone)]
pub struct ReplicastService {
    pub(crate) self_addr: SocketAddr,
    pub(crate) local: Arc<LocalDelivery>,
    pub(crate) fanout: Arc<FanOut>,
    pub(crate) peers_rx: watch::Receiver<Arc<PeerSnapshot>>,
    pub(crate) source_name: String,
    pub(crate) broadcast_timeout: std::time::Duration,
    pub(crate) peer_timeout: std::time::Duration,
    pub(crate) max_message_bytes: usize,
    pub(crate) metrics: Metrics,
    /// Cancelled when the replica starts draining: Broadcast is refused with
    /// UNAVAILABLE, so clients retry on another replica.
    pub(crate) stopping: CancellationToken,
    /// Cancelled when the drain period is over: DeliverStreams end, and local
    /// delivery closes (which ends Subscribe streams once they are flushed).
    pub(crate) closing: CancellationToken,
}

impl ReplicastService {
    fn check_message(&self, message: &Message) -> Result<(), Error> {
        if message.id.is_empty() {
            return Err(validate::ValidationError::MissingField { field: "message.id" }.into());
        }
        validate::id(&message.id)?;
        validate::topic(&message.topic)?;
        validate::payload(message.payload.len(), self.max_message_bytes)?;
        validate::headers(&message.headers)?;
        if message.origin.is_empty() {
            return Err(validate::ValidationError::MissingField {
                field: "message.origin",
            }
            .into());
        }
        Ok(())
    }

    /// Broadcast, with errors still typed (for metrics) until the RPC layer.
    async fn broadcast_inner(&self, request: Request<BroadcastRequest>) -> Result<BroadcastResponse, Error> {
        let arrived = Instant::now();
        if self.stopping.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let budget = Budget::new(
            arrived,
            budget::caller_timeout(request.metadata()),
            self.broadcast_timeout,
            self.peer_timeout,
        );
        let req = request.into_inner();
        let policy = validate::ack_policy(req.ack)?;
        validate::topic(&req.topic)?;
        validate::payload(req.payload.len(), self.max_message_bytes)?;
        validate::headers(&req.headers)?;
        validate::id(&req.id)?;

        let message = Message {
            id: if req.id.is_empty() {
                uuid::Uuid::now_v7().to_string()
            } else {
                req.id
            },
            topic: req.topic,
            payload: req.payload,
            headers: req.headers,
            origin: self.self_addr.to_string(),
            sent_at: Some(SystemTime::now().into()),
        };
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("messaging.system", "replicast");
            span.record("messaging.operation.type", "send");
            span.record("messaging.destination.name", message.topic.as_str());
            span.record("messaging.message.id", message.id.as_str());
        }
        let mut peers_rx = self.peers_rx.clone();
        let snapshot = discovery::ready_snapshot(&mut peers_rx, &self.source_name, budget.deadline).await?;
        let policy = crate::fanout::policy::effective(policy);
        self.fanout
            .broadcast(message, &snapshot.peers, policy, budget)
            .await
    }

    fn deliver_one(&self, message: Option<Message>, traced: bool) -> Result<DeliverResponse, Error> {
        let message = message.ok_or(validate::ValidationError::MissingField { field: "message" })?;
        self.check_message(&message)?;
        let id = message.id.clone();
        let delivered = deliver_locally(&self.local, &self.metrics, message, traced)?;
        Ok(DeliverResponse {
            id,
            sequence: delivered.sequence,
            duplicate: delivered.duplicate,
        })
    }
}

#[tonic::async_trait]
impl Replicast for ReplicastService {
    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let ack = ack_label(request.get_ref().ack);
        let result = self.broadcast_inner(request).await;
        self.metrics.record_broadcast(outcome_label(&result), ack);
        result.map(Response::new).map_err(Status::from)
    }

    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverResponse>, Status> {
        let traced = spans::current_is_sampled();
        Ok(Response::new(
            self.deliver_one(request.into_inner().message, traced)?,
        ))
    }

    type DeliverStreamStream = RpcStream<DeliverAck>;

    async fn deliver_stream(
        &self,
        request: Request<Streaming<DeliverFrame>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        let service = self.clone();
        let acks = request.into_inner().map(move |frame| {
            let frame = frame?;
            // Each message continues the trace of the hop that sent it. An
            // empty context means that hop was not sampled: no spans here either.
            let traced = telemetry::tracing_enabled() && !frame.trace_context.is_empty();
            let span = match (&frame.message, traced) {
                (Some(message), true) => {
                    spans::deliver(message, Some(propagation::extract_map(&frame.trace_context)))
                }
                _ => tracing::Span::none(),
            };
            let result = span.in_scope(|| service.deliver_one(frame.message, traced));
            // A bad message fails its own ack; the stream carries on.
            Ok(match result {
                Ok(response) => {
                    spans::record_status(&span, Side::Server, tonic::Code::Ok, "");
                    DeliverAck {
                        tag: frame.tag,
                        code: 0,
                        error: String::new(),
                        response: Some(response),
                    }
                }
                Err(error) => {
                    let status = Status::from(error);
                    spans::record_status(&span, Side::Server, status.code(), status.message());
                    DeliverAck {
                        tag: frame.tag,
                        code: status.code() as i32,
                        error: status.message().to_owned(),
                        response: None,
                    }
                }
            })
        });
        // Peers keep delivering here while this replica drains.
        Ok(Response::new(until_stopped(acks, self.closing.clone())))
    }

    type SubscribeStream = RpcStream<Delivery>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // Still accepted while draining: this replica keeps delivering until
        // it closes, and a subscriber whose stream broke must be able to
        // resume and read what was delivered meanwhile.
        let req = request.into_inner();
        validate::topic_filters(&req.topics).map_err(Error::from)?;
        let start = if req.after_sequence == 0 && req.from_oldest {
            Start::Oldest
        } else {
            Start::After(req.after_sequence)
        };
        let subscription =
            self.local
                .subscribe_from(TopicFilter::new(&req.topics), start, req.incarnation)?;
        let overflows = self.metrics.subscriber_overflows.clone();
        let deliveries = futures::stream::unfold(Some(subscription), move |subscription| {
            let overflows = overflows.clone();
            async move {
                let mut subscription = subscription?;
                match subscription.next().await {
                    Ok(delivery) => Some((Ok(Delivery::clone(&delivery)), Some(subscription))),
                    Err(error) => {
                        let reason = match error {
                            Error::SubscriberLagged { .. } => Some("lagged"),
                            Error::SubscriberOverrun { .. } => Some("overrun"),
                            _ => None,
                        };
                        if let Some(reason) = reason {
                            overflows.get_or_create(&OverflowLabels { reason }).inc();
                        }
                        Some((Err(Status::from(error)), None))
                    }
                }
            }
        });
        // The subscription itself ends when local delivery closes, after the
        // drain and after this subscriber got every delivery made before it.
        Ok(Response::new(Box::pin(deliveries)))
    }

    async fn list_peers(
        &self,
        _request: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let snapshot = self.peers_rx.borrow().clone();
        let mut addresses = snapshot.peers.clone();
        if !addresses.contains(&self.self_addr) {
            addresses.push(self.self_addr);
            addresses.sort();
        }
        Ok(Response::new(ListPeersResponse {
            self_: self.self_addr.to_string(),
            peers: addresses
                .into_iter()
                .map(|address| Peer {
                    address: address.to_string(),
                    local: address == self.self_addr,
                })
                .collect(),
            source: self.source_name.clone(),
            resolved_at: snapshot.resolved_at.map(Into::into),
            stale: snapshot.stale,
            last_error: snapshot.last_error.clone().unwrap_or_default(),
            incarnation: self.local.incarnation(),
            last_sequence: self.local.last_sequence(),
        }))
    }
}

/// The `ack` label of a Broadcast in metrics.
fn ack_label(ack: i32) -> &'static str {
    match AckPolicy::try_from(ack) {
        Ok(AckPolicy::Unspecified | AckPolicy::All) => "all",
        Ok(AckPolicy::Quorum) => "quorum",
        Ok(AckPolicy::One) => "one",
        Ok(AckPolicy::None) => "none",
        Err(_) => "invalid",
    }
}

/// The `outcome` label of a Broadcast in metrics.
fn outcome_label(result: &Result<BroadcastResponse, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::PolicyNotMet {
            deadline_exceeded: true,
            ..
        }) => "deadline_exceeded",
        Err(Error::PolicyNotMet { .. }) => "policy_not_met",
        Err(Error::Invalid(_)) => "invalid",
        Err(Error::Overloaded { .. }) => "overloaded",
        Err(Error::DiscoveryNotReady { .. }) => "not_ready",
        Err(Error::ShuttingDown) => "shutting_down",
        Err(_) => "error",
    }
}

/// Ends a long-lived response stream with UNAVAILABLE once `stop` fires, so
/// the client reconnects elsewhere and graceful shutdown is not held up.
fn until_stopped<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    stop: CancellationToken,
) -> RpcStream<T> {
    let stream = Box::pin(stream);
    Box::pin(futures::stream::unfold(
        Some((stream, stop)),
        |state| async move {
            let (mut stream, stop) = state?;
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    let status: Status = Error::ShuttingDown.into();
                    tracing::debug!(code = code_name(status.code()), "ending stream: shutting down");
                    Some((Err(status), None))
                }
                item = stream.next() => match item {
                    Some(Ok(item)) => Some((Ok(item), Some((stream, stop)))),
                    Some(Err(status)) => Some((Err(status), None)),
                    None => None,
                },
            }
        },
    ))
}
