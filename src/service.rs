//! The gRPC layer: decode, validate, call the core, encode. No policy here.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{FutureExt as _, Stream, StreamExt, future::BoxFuture};
use tokio::{sync::watch, time::Instant};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    auth::{Action, Client, Pattern, TokenTable, Tokens},
    error::{Error, code_name},
    fanout::{self, Budget, FanOut, LinkStatus, PeerSet, budget, deliver_locally},
    lifecycle::{Phase, PhaseRx},
    limits::{ClientKey, Limits},
    local::{Delivered, LocalDelivery, Start, TopicFilter},
    membership::{AnnounceError, MembershipHandle, Source},
    metrics::{AuthRefusalLabels, Metrics, OverflowLabels},
    proto::{
        replica::replicast_server::Replicast,
        v1::{
            AckPolicy, AnnounceRequest, AnnounceResponse, AnnouncedReplica, BroadcastRequest,
            BroadcastResponse, DeliverAck, DeliverRequest, DeliverResponse, DeliveredFrame, ListPeersRequest,
            ListPeersResponse, Message, Peer, PublishRequest, PublishResponse, SubscribeRequest,
            announce_request::Kind,
        },
    },
    publish::PublishStream,
    telemetry::{
        self, propagation,
        spans::{self, SendSpan, Side},
    },
    tls::{self, WorkloadIdentity},
    validate::{self, ValidationError},
    wire::{EncodedDelivery, EncodedMessage, InboundFrame},
};

/// The ack of the frame `tag` for its delivery's result.
fn frame_ack(tag: u64, delivered: Result<Delivered, Error>) -> DeliverAck {
    match delivered {
        Ok(delivered) => DeliverAck {
            tag,
            code: 0,
            error: String::new(),
            // No id: the sender knows it by the tag.
            response: Some(DeliverResponse {
                id: String::new(),
                sequence: delivered.sequence,
                duplicate: delivered.duplicate,
            }),
            also: Vec::new(),
        },
        Err(error) => DeliverAck {
            tag,
            code: error.code() as i32,
            error: error.to_string(),
            response: None,
            also: Vec::new(),
        },
    }
}

type RpcStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Request metadata with which a DeliverStream's sender accepts batched acks.
pub const BATCH_ACKS: &str = "replicast-batch-acks";
/// Frames acknowledged in one batch at most.
const ACK_BATCH: usize = 256;
/// Frames of one DeliverStream whose acks wait for the app at once.
const APP_WAITS_PER_STREAM: usize = 1024;

/// The limits and lifecycle signals the RPC handlers work with.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// This replica's advertised address (the origin of its Broadcasts).
    pub self_addr: SocketAddr,
    /// How ListPeers and errors name the discovery source.
    pub source_name: String,
    /// Deadline of a Broadcast whose caller set none.
    pub broadcast_timeout: Duration,
    /// Cap on each hop.
    pub peer_timeout: Duration,
    /// Largest accepted payload.
    pub max_message_bytes: usize,
    /// Messages in flight per Publish stream.
    pub publish_window: usize,
    /// The replica's lifecycle. Draining: Broadcast and Publish are refused
    /// with UNAVAILABLE, so clients retry on another replica, and Announce
    /// probes answer "not serving". Closing: DeliverStreams end, and local
    /// delivery closes (which ends Subscribe streams once flushed).
    pub phase: PhaseRx,
    /// With mTLS on, the identity callers of peer RPCs must hold.
    pub peer_identity: Option<WorkloadIdentity>,
}

/// Everything the RPC handlers need, shared by all connections (cheap to
/// clone: every field is shared).
#[derive(Debug, Clone)]
pub struct ReplicastService {
    config: Arc<ServiceConfig>,
    local: Arc<LocalDelivery>,
    fanout: Arc<FanOut>,
    peer_set_rx: watch::Receiver<Arc<PeerSet>>,
    membership: MembershipHandle,
    tokens: Tokens,
    limits: Arc<Limits>,
    metrics: Metrics,
    /// `self_addr` as every message's origin, formatted once.
    origin: Arc<str>,
}

/// A UUIDv7 for a message the client sent without an id. Its random bits
/// come from the thread's generator, not a system call per message.
fn new_id() -> String {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::random())
        .into_uuid()
        .to_string()
}

impl ReplicastService {
    pub fn new(
        config: ServiceConfig,
        local: Arc<LocalDelivery>,
        fanout: Arc<FanOut>,
        membership: MembershipHandle,
        tokens: Tokens,
        limits: Arc<Limits>,
        metrics: Metrics,
    ) -> Self {
        Self {
            origin: config.self_addr.to_string().into(),
            config: Arc::new(config),
            local,
            peer_set_rx: fanout.peer_set(),
            fanout,
            membership,
            tokens,
            limits,
            metrics,
        }
    }

    /// The calling client (`None` with tokens off), or the refusal.
    pub(crate) fn authenticate<T>(&self, request: &Request<T>) -> Result<Option<Arc<Client>>, Error> {
        self.tokens.authenticate(request.metadata()).map_err(|error| {
            self.count_refusal("unauthenticated");
            Error::from(error)
        })
    }

    /// Refuses a peer RPC (`rpc`) from a caller whose client certificate
    /// does not hold the workload identity (with mTLS on).
    pub(crate) fn check_peer<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<(), Error> {
        let Some(identity) = &self.config.peer_identity else {
            return Ok(());
        };
        let certs = request.peer_certs();
        let end_entity = certs.as_ref().and_then(|certs| certs.first()).map(|c| c.as_ref());
        tls::check_peer(identity, rpc, end_entity).map_err(|refusal| {
            self.count_refusal(match refusal {
                tls::PeerRefusal::NoCertificate { .. } => "unauthenticated",
                tls::PeerRefusal::WrongIdentity { .. } => "permission_denied",
            });
            Error::from(refusal)
        })
    }

    /// Who is calling: the client of its token, and what its limits count
    /// against (the token's name, or the address it calls from).
    pub(crate) fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        let client = self.authenticate(request)?;
        let key = match (&client, request.remote_addr()) {
            (Some(client), _) => ClientKey::Named(client.name.clone()),
            (None, Some(addr)) => ClientKey::Address(addr.ip()),
            (None, None) => ClientKey::Unknown,
        };
        Ok(Caller { client, key })
    }

    /// Whether `client` may publish to `topic` (anyone may with tokens off).
    fn authorize_publish(&self, client: Option<&Client>, topic: &str) -> Result<(), Error> {
        match client {
            Some(client) if !client.allows_topic(Action::Publish, topic) => {
                self.count_refusal("permission_denied");
                Err(Error::PermissionDenied {
                    client: client.name.clone(),
                    action: Action::Publish,
                    what: format!("topic {topic}"),
                    reloaded: false,
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether `client` may subscribe with `topics` (empty: every topic).
    fn authorize_filters(&self, client: &Client, topics: &[String], reloaded: bool) -> Result<(), Error> {
        let all = ["*".to_owned()];
        let filters = if topics.is_empty() { &all[..] } else { topics };
        for filter in filters {
            if !client.allows_filter(&Pattern::parse(filter)) {
                self.count_refusal("permission_denied");
                return Err(Error::PermissionDenied {
                    client: client.name.clone(),
                    action: Action::Subscribe,
                    what: if topics.is_empty() {
                        "every topic (no filter); subscribe to the topics it may receive".to_owned()
                    } else {
                        format!("filter {filter}")
                    },
                    reloaded,
                });
            }
        }
        Ok(())
    }

    fn count_refusal(&self, code: &'static str) {
        self.metrics
            .auth_refusals
            .get_or_create(&AuthRefusalLabels { code })
            .inc();
    }

    /// One Broadcast, from the unary RPC or a Publish stream: validation,
    /// encoding (once), the wait for the first peer lookup, the fan-out.
    /// `parent` is the RPC's server span. Errors stay typed until the RPC
    /// layer.
    pub(crate) async fn broadcast_one(
        &self,
        request: BroadcastRequest,
        caller: &Caller,
        caller_timeout: Option<Duration>,
        parent: &tracing::Span,
    ) -> Result<BroadcastResponse, Error> {
        let arrived = Instant::now();
        if self.config.phase.has_reached(Phase::Draining) {
            return Err(Error::ShuttingDown);
        }
        self.limits.check_deadline(caller_timeout)?;
        let budget = Budget::new(
            arrived,
            caller_timeout,
            self.config.broadcast_timeout,
            self.config.peer_timeout,
        );
        let policy = fanout::policy::effective(validate::ack_policy(request.ack)?);
        validate::topic(&request.topic)?;
        validate::payload(request.payload.len(), self.config.max_message_bytes)?;
        validate::headers(&request.headers)?;
        validate::id(&request.id)?;
        self.authorize_publish(caller.client.as_deref(), &request.topic)?;
        self.limits.admit_broadcast(&caller.key, arrived)?;
        // Encoded into a buffer of its own: the request's payload is a view
        // into tonic's decode buffer, which is not kept.
        let id = if request.id.is_empty() {
            new_id()
        } else {
            request.id
        };
        let message = EncodedMessage::from_parts(
            id,
            request.topic,
            &request.payload,
            &request.headers,
            &self.origin,
            &SystemTime::now().into(),
        );
        let send_span = SendSpan::start(parent, &message, policy);
        let mut peer_set_rx = self.peer_set_rx.clone();
        let peers =
            fanout::ready_peer_set(&mut peer_set_rx, &self.config.source_name, budget.deadline).await?;
        let span = send_span.span().clone();
        self.fanout
            .broadcast(message, &peers, policy, budget, &send_span)
            .instrument(span)
            .await
    }

    /// Counts one Broadcast (unary or published) in metrics.
    pub(crate) fn record_broadcast(&self, ack: i32, result: &Result<BroadcastResponse, Error>) {
        self.metrics
            .record_broadcast(outcome_label(result), ack_label(ack));
    }

    pub(crate) fn phase(&self) -> &PhaseRx {
        &self.config.phase
    }

    /// Hands one message a peer sent to this replica's consumers. `parent`
    /// is the sender's trace context, when its Broadcast is sampled.
    /// Takes a DeliverStream frame's message: decoded once for validation,
    /// its bytes kept as they came.
    fn accept_frame(&self, raw: Option<&[u8]>) -> Result<EncodedMessage, Error> {
        let raw = raw.ok_or(ValidationError::MissingField { field: "message" })?;
        let (message, decoded) =
            EncodedMessage::decode(raw).map_err(|e| ValidationError::MalformedMessage {
                reason: e.to_string(),
            })?;
        self.check_message(message.id(), message.topic(), &decoded)?;
        Ok(message)
    }

    /// Hands a validated message from a peer to this replica's consumers.
    /// `parent` is the sender's trace context, when its Broadcast is sampled.
    fn deliver_checked(
        &self,
        message: EncodedMessage,
        parent: Option<opentelemetry::Context>,
    ) -> Result<Delivered, Error> {
        let span = match parent {
            Some(parent) => spans::process(&message, parent),
            None => tracing::Span::none(),
        };
        let delivered = deliver_locally(&self.local, &self.metrics, message, &span);
        if !span.is_disabled() {
            match &delivered {
                Ok(_) => spans::record_status(&span, Side::Server, tonic::Code::Ok, ""),
                Err(error) => spans::record_status(&span, Side::Server, error.code(), &error.to_string()),
            }
        }
        delivered
    }

    /// Delivers one DeliverStream frame and answers it.
    fn deliver_frame(&self, frame: InboundFrame) -> DeliverAck {
        let tag = frame.tag;
        frame_ack(tag, self.deliver_frame_only(frame))
    }

    /// Delivers one DeliverStream frame; the answer waits for the app
    /// receipt, if the delivery has one, until a little before the sender
    /// gives up on the frame.
    fn deliver_frame_for_app(&self, frame: InboundFrame) -> BoxFuture<'static, DeliverAck> {
        let arrived = Instant::now();
        let tag = frame.tag;
        let sender_timeout =
            (frame.ack_timeout_ms > 0).then(|| Duration::from_millis(frame.ack_timeout_ms.into()));
        let delivered = self.deliver_frame_only(frame);
        let receipt = match &delivered {
            Ok(delivered) => delivered.app_receipt.clone(),
            Err(_) => None,
        };
        let Some(receipt) = receipt else {
            return futures::future::ready(frame_ack(tag, delivered)).boxed();
        };
        let until = budget::app_wait_deadline(arrived, sender_timeout, self.config.peer_timeout);
        async move {
            let answered = receipt.wait(until).await.map_err(Error::from);
            frame_ack(tag, answered.and(delivered))
        }
        .boxed()
    }

    /// Hands one frame's message to local delivery. Each message continues
    /// the trace of the Broadcast that sent it; an empty context means that
    /// Broadcast was not sampled: no span here either.
    fn deliver_frame_only(&self, frame: InboundFrame) -> Result<Delivered, Error> {
        let parent = (telemetry::tracing_enabled() && !frame.trace_context.is_empty())
            .then(|| propagation::extract_map(&frame.trace_context));
        // A bad message fails its own ack; the stream carries on.
        self.accept_frame(frame.message.as_deref())
            .and_then(|message| self.deliver_checked(message, parent))
    }

    fn check_message(&self, id: &str, topic: &str, decoded: &Message) -> Result<(), Error> {
        if id.is_empty() {
            return Err(ValidationError::MissingField { field: "message.id" }.into());
        }
        validate::id(id)?;
        validate::topic(topic)?;
        validate::payload(decoded.payload.len(), self.config.max_message_bytes)?;
        validate::headers(&decoded.headers)?;
        if decoded.origin.is_empty() {
            return Err(ValidationError::MissingField {
                field: "message.origin",
            }
            .into());
        }
        if let Some(sent_at) = &decoded.sent_at
            && crate::timestamp::from_proto(sent_at).is_none()
        {
            return Err(ValidationError::MalformedMessage {
                reason: format!(
                    "sent_at {}s {}ns is not a time between 1970 and 9999",
                    sent_at.seconds, sent_at.nanos
                ),
            }
            .into());
        }
        Ok(())
    }

    fn peer_entry(&self, address: SocketAddr, status: Option<&LinkStatus>, source: Option<Source>) -> Peer {
        let status = status.cloned().unwrap_or_default();
        Peer {
            source: source.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            address: address.to_string(),
            local: address == self.config.self_addr,
            connected: status.connected,
            failing_since: status.failing_since.map(Into::into),
            last_error: status.last_error.unwrap_or_default(),
            skipped_until: status.skipped_until.map(Into::into),
            backlog: status.backlog as u64,
        }
    }
}

#[tonic::async_trait]
impl Replicast for ReplicastService {
    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let caller_timeout = budget::caller_timeout(request.metadata());
        let caller = self.caller(&request)?;
        let request = request.into_inner();
        let ack = request.ack;
        let result = self
            .broadcast_one(request, &caller, caller_timeout, &tracing::Span::current())
            .await;
        self.record_broadcast(ack, &result);
        result.map(Response::new).map_err(Status::from)
    }

    type PublishStream = RpcStream<PublishResponse>;

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let caller = self.caller(&request)?;
        let responses = PublishStream::new(
            self.clone(),
            caller,
            request.into_inner(),
            self.config.publish_window,
            tracing::Span::current(),
        );
        Ok(Response::new(Box::pin(responses)))
    }

    async fn deliver(&self, request: Request<DeliverRequest>) -> Result<Response<DeliverResponse>, Status> {
        self.check_peer("Deliver", &request)?;
        let arrived = Instant::now();
        let sender_timeout = budget::caller_timeout(request.metadata());
        let parent = spans::current_is_sampled().then(|| {
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            tracing::Span::current().context()
        });
        let message = request
            .into_inner()
            .message
            .ok_or(ValidationError::MissingField { field: "message" })
            .map_err(Error::from)?;
        self.check_message(&message.id, &message.topic, &message)?;
        // Encoded once, into a buffer of its own, as a frame's would be.
        let message = EncodedMessage::encode(message);
        let id = message.id().to_owned();
        let delivered = self.deliver_checked(message, parent)?;
        if let Some(receipt) = &delivered.app_receipt {
            let until = budget::app_wait_deadline(arrived, sender_timeout, self.config.peer_timeout);
            receipt.wait(until).await.map_err(Error::from)?;
        }
        Ok(Response::new(DeliverResponse {
            id,
            sequence: delivered.sequence,
            duplicate: delivered.duplicate,
        }))
    }

    type DeliverStreamStream = RpcStream<DeliverAck>;

    async fn deliver_stream(
        &self,
        request: Request<Streaming<InboundFrame>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        self.check_peer("DeliverStream", &request)?;
        let stopped = self.config.phase.reached(Phase::Closing);
        if self.local.waits_for_apps() {
            // Each ack waits for the apps (--webhook-ack), so they answer
            // in the order the apps do: one ack per frame, as many waiting
            // at once as APP_WAITS_PER_STREAM (then the stream stops
            // reading, and HTTP/2 flow control holds the sender).
            let service = self.clone();
            let acks = request
                .into_inner()
                .map(move |frame| match frame {
                    Ok(frame) => service.deliver_frame_for_app(frame).map(Ok).boxed(),
                    Err(status) => {
                        futures::future::ready(Err(crate::request_errors::malformed(status))).boxed()
                    }
                })
                .buffer_unordered(APP_WAITS_PER_STREAM);
            return Ok(Response::new(until_stopped(acks, stopped)));
        }
        let batch_acks = request.metadata().get(BATCH_ACKS).is_some_and(|v| v == "1");
        let service = self.clone();
        // The frames tonic has decoded are taken together (never waiting for
        // more), delivered one by one, and answered together when the sender
        // accepts batched acks.
        let acks = request
            .into_inner()
            .ready_chunks(ACK_BATCH)
            .flat_map(move |frames| {
                let mut acks = Vec::new();
                let mut delivered: Option<DeliverAck> = None;
                for frame in frames {
                    let frame = match frame {
                        Ok(frame) => frame,
                        Err(status) => {
                            acks.push(Err(crate::request_errors::malformed(status)));
                            break;
                        }
                    };
                    let ack = service.deliver_frame(frame);
                    match (&mut delivered, batch_acks && ack.code == 0) {
                        (Some(first), true) => {
                            let response = ack.response.unwrap_or_default();
                            first.also.push(DeliveredFrame {
                                tag: ack.tag,
                                sequence: response.sequence,
                                duplicate: response.duplicate,
                            });
                        }
                        (None, true) => delivered = Some(ack),
                        (_, false) => acks.push(Ok(ack)),
                    }
                }
                if let Some(delivered) = delivered {
                    acks.insert(0, Ok(delivered));
                }
                futures::stream::iter(acks)
            });
        // Peers keep delivering here while this replica drains.
        Ok(Response::new(until_stopped(acks, stopped)))
    }

    type SubscribeStream = RpcStream<EncodedDelivery>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // Still accepted while draining: this replica keeps delivering until
        // it closes, and a subscriber whose stream broke must be able to
        // resume and read what was delivered meanwhile.
        let Caller { client, key } = self.caller(&request)?;
        let req = request.into_inner();
        validate::topic_filters(&req.topics).map_err(Error::from)?;
        if let Some(client) = &client {
            self.authorize_filters(client, &req.topics, false)?;
        }
        // Counted while the stream lives: the slot goes with it.
        let slot = self.limits.admit_subscriber(key)?;
        let start = if req.after_sequence == 0 && req.from_oldest {
            Start::Oldest
        } else {
            Start::After(req.after_sequence)
        };
        let subscription =
            self.local
                .subscribe_from(TopicFilter::new(&req.topics), start, req.incarnation)?;
        let incarnation = self.local.incarnation();
        let overflows = self.metrics.subscriber_overflows.clone();
        let deliveries = futures::stream::unfold(Some((subscription, slot)), move |state| {
            let overflows = overflows.clone();
            async move {
                let (mut subscription, slot) = state?;
                match subscription.next().await {
                    // The ring's bytes, written around: no copy of the message.
                    Ok(delivery) => Some((
                        Ok(EncodedDelivery {
                            sequence: delivery.sequence,
                            message: delivery.message.bytes().clone(),
                            incarnation,
                        }),
                        Some((subscription, slot)),
                    )),
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
        let deliveries: RpcStream<EncodedDelivery> = Box::pin(deliveries);
        match (client, self.tokens.watch()) {
            (Some(client), Some(tokens_rx)) => {
                let service = self.clone();
                let topics = req.topics;
                Ok(Response::new(until_revoked(
                    deliveries,
                    tokens_rx,
                    move |table| match table.still_valid(&client) {
                        Some(current) => service.authorize_filters(&current, &topics, true),
                        None => {
                            service.count_refusal("permission_denied");
                            Err(Error::PermissionDenied {
                                client: client.name.clone(),
                                action: Action::Subscribe,
                                what: "any topic: its token is no longer in the tokens file".to_owned(),
                                reloaded: true,
                            })
                        }
                    },
                )))
            }
            _ => Ok(Response::new(deliveries)),
        }
    }

    async fn list_peers(
        &self,
        request: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        // Any client with a valid token may see the cluster.
        self.authenticate(&request)?;
        let set = self.peer_set_rx.borrow().clone();
        let self_addr = self.config.self_addr;
        let members = self.membership.members();
        let mut peers: Vec<Peer> = set
            .remotes()
            .map(|(address, link)| {
                let source = members.sources.get(&address).copied();
                self.peer_entry(address, Some(&link.status()), source)
            })
            .collect();
        peers.push(self.peer_entry(self_addr, None, None));
        peers.sort_by(|a, b| a.address.cmp(&b.address));
        let departed = self
            .fanout
            .departed()
            .into_iter()
            .map(|(address, status)| self.peer_entry(address, Some(&status), None))
            .collect();
        let snapshot = &set.snapshot;
        Ok(Response::new(ListPeersResponse {
            self_: self_addr.to_string(),
            peers,
            source: self.config.source_name.clone(),
            resolved_at: snapshot.resolved_at.map(Into::into),
            stale: snapshot.stale,
            last_error: snapshot.last_error.clone().unwrap_or_default(),
            incarnation: self.local.incarnation(),
            last_sequence: self.local.last_sequence(),
            departed,
        }))
    }

    async fn announce(
        &self,
        request: Request<AnnounceRequest>,
    ) -> Result<Response<AnnounceResponse>, Status> {
        self.check_peer("Announce", &request)?;
        let request = request.into_inner();
        let kind = Kind::try_from(request.kind).unwrap_or(Kind::Unspecified);
        if kind != Kind::Identify {
            let peer: SocketAddr = request.address.parse().map_err(|_| {
                AnnounceError::Invalid(format!(
                    "address {:?} is not host:port with an IP address (the announcer's advertised address)",
                    request.address
                ))
            })?;
            if request.incarnation == 0 {
                return Err(AnnounceError::Invalid(
                    "incarnation 0 is not a replica's incarnation".to_owned(),
                )
                .into());
            }
            match kind {
                Kind::Join => self.membership.join(peer, request.incarnation).await?,
                Kind::Leave => self.membership.leave(peer, request.incarnation).await?,
                Kind::Unspecified | Kind::Identify => {
                    return Err(AnnounceError::Invalid(format!(
                        "kind {} is not JOIN, LEAVE or IDENTIFY",
                        request.kind
                    ))
                    .into());
                }
            }
        }
        let members = self.membership.members();
        Ok(Response::new(AnnounceResponse {
            address: self.config.self_addr.to_string(),
            incarnation: self.local.incarnation(),
            serving: !self.config.phase.has_reached(Phase::Draining),
            announced: announced_replicas(&members.announced),
            left: announced_replicas(&members.left),
        }))
    }
}

fn announced_replicas(list: &[(SocketAddr, u64)]) -> Vec<AnnouncedReplica> {
    list.iter()
        .map(|(address, incarnation)| AnnouncedReplica {
            address: address.to_string(),
            incarnation: *incarnation,
        })
        .collect()
}

/// Who is calling, as the handlers check it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The client of its token (`None` with tokens off).
    pub client: Option<Arc<Client>>,
    /// What its limits count against.
    pub key: ClientKey,
}

/// Ends `stream` with the error `check` returns when the tokens file
/// changes and the stream's client lost its permission.
fn until_revoked<T: Send + 'static>(
    stream: RpcStream<T>,
    tokens_rx: watch::Receiver<Arc<TokenTable>>,
    check: impl Fn(&TokenTable) -> Result<(), Error> + Send + Sync + 'static,
) -> RpcStream<T> {
    Box::pin(futures::stream::unfold(
        Some((stream, tokens_rx, check)),
        |state| async move {
            let (mut stream, mut tokens_rx, check) = state?;
            loop {
                tokio::select! {
                    biased;
                    changed = tokens_rx.changed() => {
                        if changed.is_err() {
                            // No more reloads (the replica is closing).
                            let item = stream.next().await?;
                            return Some((item, Some((stream, tokens_rx, check))));
                        }
                        let table = tokens_rx.borrow_and_update().clone();
                        if let Err(error) = check(&table) {
                            return Some((Err(Status::from(error)), None));
                        }
                    }
                    item = stream.next() => {
                        let item = item?;
                        return Some((item, Some((stream, tokens_rx, check))));
                    }
                }
            }
        },
    ))
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
/// What the stream has ready at that moment goes out first (at most
/// [`ACK_BATCH`] items): those are acks of frames already delivered, and a
/// dropped one would make the sender redeliver to the next incarnation.
fn until_stopped<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    stop: impl Future<Output = ()> + Send + 'static,
) -> RpcStream<T> {
    let stream = Box::pin(stream);
    let stop: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(stop);
    // The third element counts the items flushed since `stop` fired (None
    // before): a finished future must not be polled again.
    Box::pin(futures::stream::unfold(
        Some((stream, stop, None::<usize>)),
        |state| async move {
            let (mut stream, mut stop, flushed) = state?;
            let flushed = match flushed {
                Some(flushed) => flushed,
                None => tokio::select! {
                    biased;
                    () = &mut stop => 0,
                    item = stream.next() => return match item {
                        Some(Ok(item)) => Some((Ok(item), Some((stream, stop, None)))),
                        Some(Err(status)) => Some((Err(status), None)),
                        None => None,
                    },
                },
            };
            if flushed < ACK_BATCH
                && let Some(Some(Ok(item))) = futures::FutureExt::now_or_never(stream.next())
            {
                return Some((Ok(item), Some((stream, stop, Some(flushed + 1)))));
            }
            let status: Status = Error::ShuttingDown.into();
            tracing::debug!(code = code_name(status.code()), "ending stream: shutting down");
            Some((Err(status), None))
        },
    ))
}
