//! The link to one peer: one task that owns everything about that peer.
//!
//! A [`PeerLink`] runs one task per peer, and that task alone holds the
//! peer's DeliverStream, the hops in flight and their deadlines (a timer
//! wheel, [`DelayQueue`]), their retries, the peer's [`PeerHealth`] and its
//! [`Backlog`] of missed messages. Broadcasts only [`submit`](Link::submit)
//! hops and read receipts from their own channel: no lock is shared between
//! Broadcasts and the link, and nothing is spawned per hop.
//!
//! Why one long-lived stream and not a unary Deliver per message: on this
//! machine a long-lived tonic bidi stream per receiver carried 7-19x more
//! messages per second than one unary call per message at 16-64 in flight
//! (`shared/bench-peers/results.md`: grpc-bidi vs grpc-unary). Frames queued
//! together are written together: tonic's encoder takes every frame that is
//! ready into one buffer before it flushes.
//!
//! The stream is opened when the link is created (when the peer enters the
//! peer set), so the first Broadcast to a new peer does not pay for the
//! connection, and reopened on demand after it breaks, or when it stalls
//! (frames taken, nothing acknowledged for twice the peer timeout).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, watch},
    task::JoinHandle,
    time::{Instant, Sleep},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::time::{DelayQueue, delay_queue};
use tonic::{Code, Status, codegen::http::uri::PathAndQuery, transport::Channel};
use tracing::{Instrument, debug, info, warn};

use super::{
    backlog::{Backlog, BacklogBudget, Missed, Offered},
    health::{Admission, PeerHealth},
};
use crate::{
    error::{HopError, code_name, error_chain},
    metrics::{HopLabels, Metrics, PeerLabels, RedeliveryLabels},
    proto::v1::DeliverAck,
    telemetry::{propagation::debug_message, spans},
    tls::Dialer,
    wire::{EncodedMessage, OutboundFrame},
};

/// Hops waiting for the link task. Beyond this, further hops to the peer
/// fail at once (the link is saturated: a local overload, not the peer's).
const HOP_QUEUE: usize = 4096;
/// Frames written but not yet taken by the HTTP/2 connection. A peer that
/// stops reading (flow control) fills this, and further hops fail at once
/// instead of piling up.
const FRAME_QUEUE: usize = 4096;
/// HTTP/2 keepalive ping interval, and how long a ping may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// Retries of one hop after a transient failure, deadline permitting.
const MAX_RETRIES: u32 = 3;
/// How often the backlog is looked at while it holds anything.
const REDELIVERY_ROUND: Duration = Duration::from_millis(250);
/// Missed messages resent per round to a peer that answers.
const REDELIVERY_BATCH: usize = 256;
/// The DeliverStream method.
const DELIVER_STREAM: &str = "/replicast.v1.Replicast/DeliverStream";

/// Connection and redelivery settings of every link.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Cap on one hop, also the TCP connect timeout (`--peer-timeout`).
    pub peer_timeout: Duration,
    /// Largest message accepted or sent on the stream.
    pub max_frame_bytes: usize,
    /// How long a missed message is retried (`--redelivery-window`; zero: off).
    pub redelivery_window: Duration,
}

/// A peer acknowledged a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The peer's sequence number for it.
    pub sequence: u64,
    /// The peer had it already.
    pub duplicate: bool,
}

/// What one hop came to.
pub type HopResult = Result<Acked, HopError>;

/// One receipt, as a link reports it to its Broadcast.
#[derive(Debug)]
pub struct HopReport {
    /// The Broadcast's index of the peer.
    pub slot: usize,
    pub result: HopResult,
    /// From the start of the fan-out.
    pub latency: Duration,
}

/// Where a hop's receipt goes. Holds the Broadcast's in-flight permit, so
/// a Broadcast counts as in flight until its last hop is done, in the
/// background too.
#[derive(Debug)]
pub struct ReceiptSender {
    pub(super) tx: mpsc::Sender<HopReport>,
    pub(super) slot: usize,
    pub(super) _permit: Arc<OwnedSemaphorePermit>,
    /// For a sampled Broadcast: its send span, which stays open until the
    /// last hop is done, and the peer, so a hop that fails after the
    /// Broadcast returned still shows on the trace.
    pub(super) late: Option<(tracing::Span, SocketAddr)>,
}

impl ReceiptSender {
    /// Reports the receipt. The channel has room for every receipt of its
    /// Broadcast, so this never waits; it fails only when the Broadcast
    /// has returned already: then only the trace wants to hear of a failure.
    pub fn report(self, result: HopResult, latency: Duration) {
        let sent = self.tx.try_send(HopReport {
            slot: self.slot,
            result,
            latency,
        });
        if let (Err(mpsc::error::TrySendError::Closed(report)), Some((span, peer))) = (sent, &self.late)
            && let Err(error) = &report.result
        {
            spans::record_late_failure(span, *peer, error);
        }
    }
}

/// One Broadcast's delivery to one peer.
#[derive(Debug)]
pub struct Hop {
    pub message: EncodedMessage,
    /// The W3C context of the Broadcast's send span; empty when unsampled.
    pub trace_context: Arc<HashMap<String, String>>,
    /// When the hop gives up.
    pub deadline: Instant,
    /// When the fan-out started (receipt latencies count from here).
    pub started: Instant,
    /// The hop got the whole `--peer-timeout`: a timeout then counts
    /// against the peer. A hop cut short by its caller's deadline says
    /// nothing about the peer.
    pub full_budget: bool,
    pub receipt: ReceiptSender,
}

/// A peer's link, as the fan-out sees it. A trait so that the fan-out's
/// logic can be tested with fake links.
pub trait Link: Send + Sync + std::fmt::Debug {
    /// Hands a hop to the link. Its receipt always comes back on the hop's
    /// channel (at once when the link cannot take it), unless the link has
    /// stopped, in which case the Broadcast sees the channel close.
    fn submit(&self, hop: Hop);
    /// The link's state, for ListPeers.
    fn status(&self) -> LinkStatus;
    /// Whether the peer is in the peer set. A link whose peer left takes no
    /// new hops, finishes those in flight and holds the peer's backlog for
    /// the redelivery window, in case it comes back; once it holds nothing
    /// its status says `idle` and the fan-out drops it.
    fn set_member(&self, member: bool);
    /// Stops the link (shutdown): what it holds is given up and counted.
    /// Resolves when it has stopped.
    fn stop(&self) -> BoxFuture<'static, ()>;
}

/// Whether the peer is in the peer set, as the fan-out tells its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Member,
    Retiring,
    Stopping,
}

/// What ListPeers shows of a link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// A DeliverStream to the peer is open.
    pub connected: bool,
    /// Since when the peer has been failing (set from the first failure of
    /// a run; cleared by an answer).
    pub failing_since: Option<SystemTime>,
    /// The last failure, while failing.
    pub last_error: Option<String>,
    /// Until when hops are skipped, while the peer is skipped.
    pub skipped_until: Option<SystemTime>,
    /// Missed messages waiting for redelivery to this peer.
    pub backlog: usize,
    /// The peer left the peer set; the link stays until its backlog is done.
    pub retiring: bool,
    /// Retiring and holding nothing: the link can go.
    pub idle: bool,
}

/// Opens DeliverStreams to one peer. A trait so that the link task can be
/// tested against an in-memory peer with paused time.
pub trait Transport: Send + 'static {
    /// Opens a stream carrying `frames`; resolves once the peer answered
    /// with response headers (or failed to).
    fn open(
        &mut self,
        frames: ReceiverStream<OutboundFrame>,
    ) -> BoxFuture<'static, Result<AckStream, Status>>;
}

/// The peer's acks on one stream.
pub type AckStream = BoxStream<'static, Result<DeliverAck, Status>>;

/// The real transport: tonic over HTTP/2.
#[derive(Debug, Clone)]
pub struct GrpcTransport {
    grpc: tonic::client::Grpc<Channel>,
}

impl GrpcTransport {
    /// A lazily connecting channel to `addr`.
    pub fn new(addr: SocketAddr, config: &LinkConfig, dialer: &Dialer) -> Self {
        let endpoint = Dialer::endpoint(addr)
            .expect("a socket address is a valid URI authority")
            .connect_timeout(config.peer_timeout)
            // Notice within seconds a peer that vanished without closing the
            // connection (frozen, partitioned): the connection is dropped and
            // the next hop reconnects. Otherwise the old connection lingers in
            // TCP retransmission backoff and a peer that is back stays
            // unreachable for seconds more. One ping per peer per interval.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let grpc = tonic::client::Grpc::new(dialer.connect_lazy(endpoint))
            .max_decoding_message_size(config.max_frame_bytes)
            .max_encoding_message_size(config.max_frame_bytes);
        Self { grpc }
    }
}

impl Transport for GrpcTransport {
    fn open(
        &mut self,
        frames: ReceiverStream<OutboundFrame>,
    ) -> BoxFuture<'static, Result<AckStream, Status>> {
        let mut grpc = self.grpc.clone();
        Box::pin(async move {
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(error_chain(&e)))?;
            let mut request = tonic::Request::new(frames);
            // This end takes batched acks (see the proto); an older peer
            // ignores the header and acks each frame.
            request.metadata_mut().insert(
                crate::service::BATCH_ACKS,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            let response = grpc
                .streaming(
                    request,
                    PathAndQuery::from_static(DELIVER_STREAM),
                    tonic_prost::ProstCodec::<OutboundFrame, DeliverAck>::default(),
                )
                .await?;
            Ok(response.into_inner().boxed())
        })
    }
}

/// The handle of one peer's link task. Dropping it stops the task at once;
/// [`Link::retire`] lets it finish first.
#[derive(Debug)]
pub struct PeerLink {
    hop_tx: mpsc::Sender<Hop>,
    /// Messages of hops refused because `hop_tx` was full: the task keeps
    /// them for redelivery like any other miss.
    refused_tx: mpsc::Sender<EncodedMessage>,
    membership_tx: watch::Sender<Membership>,
    status_rx: watch::Receiver<LinkStatus>,
    task: JoinHandle<()>,
}

impl PeerLink {
    /// Starts the link to `addr` over gRPC, opening its stream at once.
    pub fn spawn(
        addr: SocketAddr,
        config: LinkConfig,
        dialer: &Dialer,
        budget: Arc<BacklogBudget>,
        metrics: &Metrics,
    ) -> Self {
        Self::spawn_with(
            addr,
            GrpcTransport::new(addr, &config, dialer),
            config,
            budget,
            metrics,
        )
    }

    /// Starts the link to `addr` over `transport`.
    pub fn spawn_with(
        addr: SocketAddr,
        transport: impl Transport,
        config: LinkConfig,
        budget: Arc<BacklogBudget>,
        metrics: &Metrics,
    ) -> Self {
        let (hop_tx, hop_rx) = mpsc::channel(HOP_QUEUE);
        let (refused_tx, refused_rx) = mpsc::channel(HOP_QUEUE);
        let (membership_tx, membership_rx) = watch::channel(Membership::Member);
        let (status_tx, status_rx) = watch::channel(LinkStatus::default());
        let task = LinkTask {
            config,
            transport,
            hop_rx,
            refused_rx,
            membership_rx,
            status_tx,
            hops: foldhash::HashMap::default(),
            deadlines: DelayQueue::new(),
            retries: DelayQueue::new(),
            session: None,
            health: PeerHealth::default(),
            backlog: Backlog::new(config.redelivery_window, budget),
            redelivering: 0,
            redelivered: 0,
            next_tag: 0,
            retiring: false,
            housekeeping: Box::pin(tokio::time::sleep(Duration::ZERO)),
            housekeeping_at: None,
            metrics: PeerMetrics::new(addr, metrics),
            published: None,
        };
        // A root span: the link outlives the Broadcast that happened to
        // create it. Its target is one the trace exporter ignores.
        let span = tracing::info_span!(target: "replicast::link", parent: None, "peer_link", peer = %addr);
        Self {
            hop_tx,
            refused_tx,
            membership_tx,
            status_rx,
            task: tokio::spawn(task.run().instrument(span)),
        }
    }
}

impl Link for PeerLink {
    fn submit(&self, hop: Hop) {
        // Never wait for queue space: a link that cannot keep up fails its
        // own hops at once instead of piling up Broadcasts.
        if let Err(error) = self.hop_tx.try_send(hop) {
            let (hop, error) = match error {
                mpsc::error::TrySendError::Full(hop) => {
                    // Missed, so kept for redelivery; if even that queue is
                    // full the task is far behind, and the message is given
                    // up (the receipt says so).
                    let _ = self.refused_tx.try_send(hop.message.clone());
                    (hop, HopError::Saturated(HOP_QUEUE))
                }
                mpsc::error::TrySendError::Closed(hop) => (hop, HopError::LinkStopped),
            };
            let latency = hop.started.elapsed();
            hop.receipt.report(Err(error), latency);
        }
    }

    fn status(&self) -> LinkStatus {
        self.status_rx.borrow().clone()
    }

    fn set_member(&self, member: bool) {
        self.membership_tx.send_if_modified(|state| {
            let want = if member {
                Membership::Member
            } else {
                Membership::Retiring
            };
            let changed = *state != want && *state != Membership::Stopping;
            if changed {
                *state = want;
            }
            changed
        });
    }

    fn stop(&self) -> BoxFuture<'static, ()> {
        self.membership_tx.send_replace(Membership::Stopping);
        let mut status_rx = self.status_rx.clone();
        // The status sender goes with the task.
        Box::pin(async move { while status_rx.changed().await.is_ok() {} })
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        // The task would also end when its hop channel closes, but not
        // while it still holds a backlog; abort makes the end immediate.
        self.task.abort();
    }
}

// === impl LinkTask ===

/// Per-peer metric handles, resolved once (not a label String per hop).
struct PeerMetrics {
    metrics: Metrics,
    peer: String,
    latency: Histogram,
    results: Vec<(&'static str, Counter)>,
}

impl PeerMetrics {
    fn new(addr: SocketAddr, metrics: &Metrics) -> Self {
        let peer = addr.to_string();
        Self {
            latency: metrics
                .hop_latency
                .get_or_create_owned(&PeerLabels { peer: peer.clone() }),
            metrics: metrics.clone(),
            peer,
            results: Vec::new(),
        }
    }

    fn record(&mut self, result: &HopResult, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
        let label = match result {
            Ok(acked) if acked.duplicate => "duplicate",
            Ok(_) => "delivered",
            Err(error) => code_name(error.code()),
        };
        if let Some((_, counter)) = self.results.iter().find(|(l, _)| *l == label) {
            counter.inc();
            return;
        }
        let counter = self.metrics.hops.get_or_create_owned(&HopLabels {
            peer: self.peer.clone(),
            result: label,
        });
        counter.inc();
        self.results.push((label, counter));
    }

    fn redelivery(&self, result: &'static str, n: usize) {
        if n > 0 {
            self.metrics
                .redeliveries
                .get_or_create(&RedeliveryLabels { result })
                .inc_by(n as u64);
        }
    }
}

/// Why a hop is in flight.
enum Purpose {
    /// A Broadcast waits for it.
    Broadcast {
        receipt: ReceiptSender,
        started: Instant,
        full_budget: bool,
        /// Admitted as the one probe of a failing peer.
        probe: bool,
    },
    /// A missed message being resent; nobody waits.
    Redelivery { missed_at: Instant },
}

/// One hop in flight, keyed by its tag. A retry reuses the tag: tags only
/// need to be unique on one stream, and a retry always goes out on a new
/// stream or after its previous frame failed.
struct HopState {
    message: EncodedMessage,
    trace_context: Arc<HashMap<String, String>>,
    purpose: Purpose,
    /// When this attempt began (timeouts report time since then).
    attempt_started: Instant,
    deadline_key: delay_queue::Key,
    retry_key: Option<delay_queue::Key>,
    retries: u32,
    /// Its frame is on the current stream, waiting for an ack.
    sent: bool,
}

/// What a published [`LinkStatus`] was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatusKey {
    connected: bool,
    failing_since: Option<Instant>,
    skip_until: Option<Instant>,
    failures: u32,
    backlog: usize,
    retiring: bool,
    idle: bool,
}

/// One open or opening DeliverStream.
struct Session {
    frame_tx: mpsc::Sender<OutboundFrame>,
    acks: SessionAcks,
    /// When the first frame not yet followed by any ack was sent. A stream
    /// that takes frames but acks none for twice the peer timeout is given
    /// up and reopened: the peer's end of it is stuck even though the
    /// connection (which keepalive watches) is alive.
    unanswered_since: Option<Instant>,
}

enum SessionAcks {
    Opening(BoxFuture<'static, Result<AckStream, Status>>),
    Open(AckStream),
}

/// What happened on the stream.
enum SessionEvent {
    Opened(AckStream),
    Ack(DeliverAck),
    Ended(HopError),
}

struct LinkTask<T> {
    config: LinkConfig,
    transport: T,
    hop_rx: mpsc::Receiver<Hop>,
    refused_rx: mpsc::Receiver<EncodedMessage>,
    membership_rx: watch::Receiver<Membership>,
    status_tx: watch::Sender<LinkStatus>,
    /// By tag. A fast hash: tags are this task's own counter, not input.
    hops: foldhash::HashMap<u64, HopState>,
    deadlines: DelayQueue<u64>,
    retries: DelayQueue<u64>,
    session: Option<Session>,
    health: PeerHealth,
    backlog: Backlog,
    /// Redelivery hops in flight: one batch at a time.
    redelivering: usize,
    /// Redelivered since the last log line (one line per round, not per message).
    redelivered: usize,
    next_tag: u64,
    /// Out of the peer set: no new hops; stop once nothing is held.
    retiring: bool,
    /// Redelivery rounds and the stall check.
    housekeeping: Pin<Box<Sleep>>,
    housekeeping_at: Option<Instant>,
    metrics: PeerMetrics,
    /// What the last published status was built from.
    published: Option<StatusKey>,
}

impl<T: Transport> LinkTask<T> {
    async fn run(mut self) {
        self.open_session();
        loop {
            tokio::select! {
                hop = self.hop_rx.recv() => match hop {
                    Some(hop) => self.on_hop(hop),
                    // Every handle is gone.
                    None => break,
                },
                Some(message) = self.refused_rx.recv() => self.hold(message, Instant::now()),
                changed = self.membership_rx.changed() => {
                    let membership = *self.membership_rx.borrow_and_update();
                    if changed.is_err() || membership == Membership::Stopping {
                        break;
                    }
                    self.retiring = membership == Membership::Retiring;
                }
                Some(expired) = next_expired(&mut self.deadlines) => self.on_deadline(expired.into_inner()),
                Some(retry) = next_expired(&mut self.retries) => self.on_retry(retry.into_inner()),
                event = next_event(&mut self.session) => self.on_session_event(event),
                () = &mut self.housekeeping, if self.housekeeping_at.is_some() => {
                    self.housekeeping_at = None;
                    self.housekeep();
                }
            }
            self.schedule_housekeeping();
            self.publish_status();
        }
        // Broadcasts still waiting see their receipt channel close, and
        // report these hops as pending; redeliveries in flight are given up
        // with the rest of the backlog.
        for (_, hop) in self.hops.drain() {
            if let Purpose::Redelivery { missed_at } = hop.purpose {
                self.backlog.put_back(Missed {
                    message: hop.message,
                    missed_at,
                });
            }
        }
        self.give_up_backlog("shutting down");
    }

    fn on_hop(&mut self, hop: Hop) {
        let now = Instant::now();
        let probe = match self.health.admit(now) {
            Admission::Send { probe } => probe,
            Admission::Skip { failures, retry_in } => {
                let error = self.health.skipped(failures, retry_in);
                self.hold(hop.message.clone(), now);
                self.report(hop.receipt, Err(error), hop.started);
                return;
            }
        };
        let tag = self.next_tag();
        let deadline_key = self.deadlines.insert_at(tag, hop.deadline);
        self.hops.insert(
            tag,
            HopState {
                message: hop.message,
                trace_context: hop.trace_context,
                purpose: Purpose::Broadcast {
                    receipt: hop.receipt,
                    started: hop.started,
                    full_budget: hop.full_budget,
                    probe,
                },
                attempt_started: now,
                deadline_key,
                retry_key: None,
                retries: 0,
                sent: false,
            },
        );
        self.send(tag);
    }

    fn next_tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    /// Writes hop `tag`'s frame to the stream, opening one if needed.
    fn send(&mut self, tag: u64) {
        if self.session.is_none() {
            self.open_session();
        }
        let (Some(session), Some(hop)) = (self.session.as_mut(), self.hops.get_mut(&tag)) else {
            return;
        };
        let frame = OutboundFrame {
            tag,
            message: hop.message.bytes().clone(),
            trace_context: (*hop.trace_context).clone(),
            ack_timeout_ms: ack_timeout_ms(self.deadlines.deadline(&hop.deadline_key)),
        };
        match session.frame_tx.try_send(frame) {
            Ok(()) => {
                hop.sent = true;
                session.unanswered_since.get_or_insert_with(Instant::now);
                debug_message!(
                    Some(&*hop.trace_context),
                    message.id = hop.message.id(),
                    tag,
                    retries = hop.retries,
                    "sent to peer"
                );
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.on_transient(tag, HopError::NotReading(FRAME_QUEUE));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The stream is gone (the peer closed it before its acks
                // said so): every hop on it is retried, this one too, and
                // the next send opens another.
                self.end_session(HopError::StreamClosed);
                self.on_transient(tag, HopError::StreamClosed);
            }
        }
    }

    fn open_session(&mut self) {
        let (frame_tx, frame_rx) = mpsc::channel(FRAME_QUEUE);
        self.session = Some(Session {
            frame_tx,
            acks: SessionAcks::Opening(self.transport.open(ReceiverStream::new(frame_rx))),
            unanswered_since: None,
        });
    }

    fn on_session_event(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Opened(acks) => {
                if let Some(session) = self.session.as_mut() {
                    session.acks = SessionAcks::Open(acks);
                }
            }
            SessionEvent::Ack(ack) => self.on_ack(ack),
            SessionEvent::Ended(error) => self.end_session(error),
        }
    }

    /// The stream failed: every hop on it may be retried, whatever the
    /// cause (it is not about one message).
    fn end_session(&mut self, error: HopError) {
        debug!(%error, "delivery stream ended");
        self.session = None;
        let on_stream: Vec<u64> = self
            .hops
            .iter()
            .filter(|(_, hop)| hop.sent)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in on_stream {
            self.on_transient(tag, error.clone());
        }
    }

    fn on_ack(&mut self, mut ack: DeliverAck) {
        if let Some(session) = self.session.as_mut() {
            session.unanswered_since = None;
        }
        // A batched ack: the other frames it acknowledges were delivered.
        for more in std::mem::take(&mut ack.also) {
            if self.hops.get(&more.tag).is_some_and(|hop| hop.sent) {
                self.finish(
                    more.tag,
                    Ok(Acked {
                        sequence: more.sequence,
                        duplicate: more.duplicate,
                    }),
                );
            }
        }
        if !self.hops.get(&ack.tag).is_some_and(|hop| hop.sent) {
            return; // timed out meanwhile
        }
        match Code::from_i32(ack.code) {
            Code::Ok => {
                let response = ack.response.unwrap_or_default();
                self.finish(
                    ack.tag,
                    Ok(Acked {
                        sequence: response.sequence,
                        duplicate: response.duplicate,
                    }),
                );
            }
            // The peer is closing (a frame that raced the end of its drain):
            // not delivered, and worth retrying.
            Code::Unavailable => self.on_transient(ack.tag, HopError::Refused(ack.error)),
            code => self.finish(
                ack.tag,
                Err(HopError::Rejected {
                    code,
                    message: ack.error,
                }),
            ),
        }
    }

    /// A failure worth retrying: retry after a pause if the deadline
    /// allows, else the hop fails with it.
    fn on_transient(&mut self, tag: u64, error: HopError) {
        let now = Instant::now();
        let Some(hop) = self.hops.get_mut(&tag) else {
            return;
        };
        hop.sent = false;
        let pause = retry_pause(hop.retries);
        let deadline = self.deadlines.deadline(&hop.deadline_key);
        if hop.retries < MAX_RETRIES && now + pause < deadline {
            hop.retries += 1;
            hop.retry_key = Some(self.retries.insert_at(tag, now + pause));
            return;
        }
        self.finish(tag, Err(error));
    }

    fn on_retry(&mut self, tag: u64) {
        if let Some(hop) = self.hops.get_mut(&tag) {
            hop.retry_key = None;
            hop.attempt_started = Instant::now();
            self.send(tag);
        }
    }

    fn on_deadline(&mut self, tag: u64) {
        let Some(hop) = self.hops.get(&tag) else {
            return;
        };
        let waited = Instant::now().saturating_duration_since(hop.attempt_started);
        self.finish_expired(tag, Err(HopError::Timeout(waited)));
        // An open that every hop gave up on: a hung peer. Start over rather
        // than wait on it forever.
        if let Some(session) = &self.session
            && matches!(session.acks, SessionAcks::Opening(_))
            && !self.hops.values().any(|hop| hop.sent)
        {
            debug!("opening the delivery stream timed out");
            self.session = None;
        }
    }

    /// Ends hop `tag` with `result` (its deadline has not expired).
    fn finish(&mut self, tag: u64, result: HopResult) {
        if let Some(hop) = self.hops.get(&tag) {
            self.deadlines.try_remove(&hop.deadline_key);
        }
        self.finish_expired(tag, result);
    }

    /// Ends hop `tag` with `result`: health, metrics, backlog, receipt.
    fn finish_expired(&mut self, tag: u64, result: HopResult) {
        let Some(hop) = self.hops.remove(&tag) else {
            return;
        };
        if let Some(key) = &hop.retry_key {
            self.retries.try_remove(key);
        }
        let now = Instant::now();
        match hop.purpose {
            Purpose::Broadcast {
                receipt,
                started,
                full_budget,
                probe,
            } => {
                match &result {
                    // A rejection is an answer: the peer is alive.
                    Ok(_) | Err(HopError::Rejected { .. }) => self.health.succeeded(),
                    // Local conditions, not the peer's.
                    Err(HopError::ShuttingDown | HopError::Saturated(_) | HopError::Skipped { .. }) => {}
                    Err(HopError::Timeout(_)) if !full_budget => {}
                    Err(error) => self.health.failed(now, error, probe, rand::random()),
                }
                if let Err(error) = &result {
                    debug!(%error, message.id = hop.message.id(), "delivery to the peer failed");
                    if error.is_missed() {
                        self.hold(hop.message, now);
                    }
                }
                self.report(receipt, result, started);
            }
            Purpose::Redelivery { missed_at } => {
                self.redelivering -= 1;
                let missed = Missed {
                    message: hop.message,
                    missed_at,
                };
                match &result {
                    Ok(acked) => {
                        self.health.succeeded();
                        self.backlog.finish(&missed);
                        if acked.duplicate {
                            // Only its ack had been lost (or a client retry got it there).
                            self.metrics.redelivery("already_delivered", 1);
                        } else {
                            self.metrics.redelivery("delivered", 1);
                            self.redelivered += 1;
                        }
                    }
                    // The peer answered "no": retrying will not change that.
                    Err(HopError::Rejected { .. }) => {
                        self.health.succeeded();
                        self.backlog.finish(&missed);
                        self.metrics.redelivery("given_up", 1);
                        warn!(
                            message.id = missed.message.id(),
                            "peer rejected a redelivered message; giving up on it"
                        );
                    }
                    Err(_) => self.backlog.put_back(missed),
                }
            }
        }
    }

    fn report(&mut self, receipt: ReceiptSender, result: HopResult, started: Instant) {
        let latency = started.elapsed();
        self.metrics.record(&result, latency);
        receipt.report(result, latency);
    }

    /// Keeps a message the peer missed for redelivery.
    fn hold(&mut self, message: EncodedMessage, now: Instant) {
        if self.backlog.push(message, now) == Offered::Full {
            // Counted; never a log line per message here.
            self.metrics.redelivery("queue_full", 1);
        }
    }

    /// Redelivery rounds and the stall check.
    fn housekeep(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.session.as_ref().and_then(|s| s.unanswered_since)
            && now.saturating_duration_since(since) > self.stall_after()
        {
            self.end_session(HopError::Stalled(now.saturating_duration_since(since)));
        }
        let expired = self.backlog.expire(now);
        if expired > 0 {
            self.metrics.redelivery("given_up", expired);
            warn!(
                messages = expired,
                "gave up redelivering: past --redelivery-window"
            );
        }
        if self.redelivered > 0 {
            info!(
                messages = self.redelivered,
                "redelivered messages the peer had missed"
            );
            self.redelivered = 0;
        }
        // A peer out of the peer set (a restarting pod leaves DNS while it
        // is not ready) is not sent to: its messages wait for the window,
        // in case it comes back. One batch at a time: a peer that does not
        // answer holds up only its own redelivery.
        if self.retiring || self.redelivering > 0 {
            return;
        }
        // One message is enough to find out whether a failing peer is back.
        // It goes through as a probe even while Broadcasts skip the peer:
        // nobody waits on it, so a peer that comes back rejoins within a
        // round instead of after the Broadcasts' backoff (up to 30 s).
        let limit = if self.health.is_failing() {
            1
        } else {
            REDELIVERY_BATCH
        };
        for missed in self.backlog.take(limit) {
            let tag = self.next_tag();
            let deadline_key = self.deadlines.insert_at(tag, now + self.config.peer_timeout);
            self.hops.insert(
                tag,
                HopState {
                    message: missed.message,
                    trace_context: Arc::default(),
                    purpose: Purpose::Redelivery {
                        missed_at: missed.missed_at,
                    },
                    attempt_started: now,
                    deadline_key,
                    retry_key: None,
                    retries: MAX_RETRIES, // the next round is the retry
                    sent: false,
                },
            );
            self.redelivering += 1;
            self.send(tag);
        }
    }

    fn stall_after(&self) -> Duration {
        // By then every hop on the stream has timed out.
        self.config.peer_timeout * 2
    }

    /// Arms the housekeeping timer for the next thing that needs doing.
    fn schedule_housekeeping(&mut self) {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        if self.backlog.waiting() > 0 || self.redelivered > 0 {
            next = Some(now + REDELIVERY_ROUND);
        }
        if let Some(since) = self.session.as_ref().and_then(|s| s.unanswered_since) {
            let stall = since + self.stall_after() + Duration::from_millis(1);
            next = Some(next.map_or(stall, |n| n.min(stall)));
        }
        match (next, self.housekeeping_at) {
            // Already armed for earlier (or as early): keep it.
            (Some(want), Some(armed)) if armed <= want => {}
            (Some(want), _) => {
                self.housekeeping.as_mut().reset(want);
                self.housekeeping_at = Some(want);
            }
            (None, _) => {}
        }
    }

    /// Publishes the link's state for ListPeers when it changed: a cheap
    /// comparison per event, the status itself rebuilt only on a change.
    fn publish_status(&mut self) {
        let key = StatusKey {
            connected: matches!(self.session.as_ref().map(|s| &s.acks), Some(SessionAcks::Open(_))),
            failing_since: self.health.failing_since(),
            skip_until: self.health.skip_until(),
            failures: self.health.failures(),
            backlog: self.backlog.waiting(),
            retiring: self.retiring,
            idle: self.retiring && self.hops.is_empty() && self.backlog.is_empty(),
        };
        if self.published == Some(key) {
            return;
        }
        self.published = Some(key);
        let now = Instant::now();
        let wall = |at: Instant| {
            let (now_wall, at_std, now_std) = (SystemTime::now(), at.into_std(), now.into_std());
            if at_std >= now_std {
                now_wall + (at_std - now_std)
            } else {
                now_wall - (now_std - at_std)
            }
        };
        self.status_tx.send_replace(LinkStatus {
            connected: key.connected,
            failing_since: key.failing_since.map(wall),
            last_error: self.health.last_error().map(ToString::to_string),
            skipped_until: key.skip_until.map(wall),
            backlog: key.backlog,
            retiring: key.retiring,
            idle: key.idle,
        });
    }

    fn give_up_backlog(&mut self, why: &str) {
        let left = self.backlog.clear();
        if left > 0 {
            self.metrics.redelivery("given_up", left);
            warn!(messages = left, "{why} with missed messages not redelivered");
        }
    }
}

/// The next expired entry; pending (never `None`) while the queue is empty,
/// so `select!` simply waits on the other branches.
async fn next_expired(queue: &mut DelayQueue<u64>) -> Option<delay_queue::Expired<u64>> {
    std::future::poll_fn(|cx: &mut Context<'_>| match queue.poll_expired(cx) {
        Poll::Ready(None) => Poll::Pending,
        other => other,
    })
    .await
}

/// The next event on the stream; pending while there is none.
async fn next_event(session: &mut Option<Session>) -> SessionEvent {
    let Some(session) = session else {
        return std::future::pending().await;
    };
    match &mut session.acks {
        SessionAcks::Opening(opening) => match opening.await {
            Ok(acks) => SessionEvent::Opened(acks),
            Err(status) => SessionEvent::Ended(open_error(&status)),
        },
        SessionAcks::Open(acks) => match acks.next().await {
            Some(Ok(ack)) => SessionEvent::Ack(ack),
            Some(Err(status)) => SessionEvent::Ended(HopError::StreamBroken(status.message().to_owned())),
            None => SessionEvent::Ended(HopError::StreamClosed),
        },
    }
}

/// Why a stream could not be opened. The transport's cause ("Connection
/// refused") hides in the status's source chain.
fn open_error(status: &Status) -> HopError {
    let mut message = status.message().to_owned();
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if !message.ends_with(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => HopError::Connect(message),
        code => HopError::Rejected { code, message },
    }
}

/// `DeliverFrame.ack_timeout_ms`: how long from now this replica waits for
/// the ack (at least 1: 0 means "not said").
fn ack_timeout_ms(deadline: Instant) -> u32 {
    let left = deadline.saturating_duration_since(Instant::now()).as_millis();
    u32::try_from(left).unwrap_or(u32::MAX).max(1)
}

/// 10 ms, 20 ms, 40 ms…, each 0.5x to 1.5x at random.
fn retry_pause(retry: u32) -> Duration {
    Duration::from_millis(10 << retry.min(6)).mul_f64(0.5 + rand::random::<f64>())
}

#[cfg(test)]
mod tests;
