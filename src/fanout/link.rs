//! One long-lived DeliverStream to one peer, shared by every Broadcast.
//!
//! Why a stream and not a unary Deliver per message: on this machine one
//! long-lived tonic bidi stream per receiver carried about 7-19x more messages
//! per second than one unary call per message at 16-64 in flight
//! (`shared/bench-peers/results.md`: grpc-bidi vs grpc-unary). The per-call
//! cost of unary (new HTTP/2 stream, headers, trailers) dominates small
//! messages.
//!
//! A [`PeerLink`] owns a task that opens the stream on first use, writes one
//! tagged frame per hop, matches acks to hops by tag, and reopens the stream
//! after it breaks, or when it stalls (frames taken, nothing acked). Each hop carries its own deadline, enforced by the caller
//! of [`PeerLink::deliver`], so a hung or slow peer delays only the hops to
//! that peer.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status, Streaming,
    transport::{Channel, Endpoint},
};
use tracing::{Instrument, debug};

use super::health::{Admission, PeerHealth};
use crate::{
    error::{HopError, error_chain},
    proto::v1::{DeliverAck, DeliverFrame, DeliverResponse, Message, replicast_client::ReplicastClient},
};

/// Hops waiting for the link task. Beyond this, further hops to the peer
/// fail at once with UNAVAILABLE.
const HOP_QUEUE: usize = 1024;
/// Frames written but not yet taken by the HTTP/2 connection. A peer that
/// stops reading (flow control) fills this, and further hops fail at once
/// instead of piling up.
const FRAME_QUEUE: usize = 4096;
/// HTTP/2 keepalive ping interval, and how long a ping may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// How often hops abandoned by their callers are dropped from the pending map.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Connection settings for peer links.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Largest message accepted or sent on the stream.
    pub max_frame_bytes: usize,
}

type HopResult = Result<DeliverResponse, HopError>;

struct Hop {
    message: Message,
    /// The hop span's W3C context, carried in the frame.
    trace_context: HashMap<String, String>,
    reply_tx: oneshot::Sender<HopResult>,
}

/// The link to one peer. Dropping the last handle stops its task.
#[derive(Debug)]
pub struct PeerLink {
    hop_tx: mpsc::Sender<Hop>,
    /// A hop given this long and still unanswered counts against the peer.
    peer_timeout: Duration,
    health: std::sync::Mutex<PeerHealth>,
    task: JoinHandle<()>,
}

impl PeerLink {
    /// Creates the link; nothing connects until the first hop.
    pub fn new(addr: SocketAddr, config: LinkConfig) -> Self {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI authority")
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            // Notice within seconds a peer that vanished without closing the
            // connection (frozen, partitioned): the connection is dropped and
            // the next hop reconnects. Otherwise the old connection lingers in
            // TCP retransmission backoff and a peer that is back stays
            // unreachable for seconds more. One ping per peer per interval.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true);
        let client = ReplicastClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(config.max_frame_bytes)
            .max_encoding_message_size(config.max_frame_bytes);
        let (hop_tx, hop_rx) = mpsc::channel(HOP_QUEUE);
        // A root span: the link outlives the Broadcast that happened to create
        // it, and must not keep that Broadcast's span open.
        let span = tracing::info_span!(target: "replicast::link", parent: None, "peer_link", peer = %addr);
        // Twice the hop deadline: by then every hop on the stream has timed out.
        let stall_after = config.connect_timeout * 2;
        let task = tokio::spawn(run(addr, client, hop_rx, stall_after).instrument(span));
        Self {
            hop_tx,
            peer_timeout: config.connect_timeout,
            health: std::sync::Mutex::new(PeerHealth::default()),
            task,
        }
    }

    /// Delivers `message` to the peer, giving up at `deadline`. A peer that
    /// keeps failing is skipped at once (see [`PeerHealth`]); a transient
    /// failure (UNAVAILABLE: refused, reset, stream broken) is retried with
    /// backoff and jitter while the deadline allows. Retrying is safe: the
    /// receiver deduplicates by id.
    pub async fn deliver(
        &self,
        message: &Message,
        trace_context: HashMap<String, String>,
        deadline: Instant,
    ) -> HopResult {
        let started = Instant::now();
        let probe = match self.lock_health().admit(started) {
            Admission::Skip(reason) => return Err(HopError::Unavailable(reason)),
            Admission::Send { probe } => probe,
        };
        // A hop cut short by its caller's deadline says nothing about the peer.
        let full_budget =
            deadline.saturating_duration_since(started) + Duration::from_millis(1) >= self.peer_timeout;
        let result = self
            .send_with_retries(message, trace_context, deadline, started)
            .await;
        let mut health = self.lock_health();
        match &result {
            // A rejection is an answer: the peer is alive.
            Ok(_) | Err(HopError::Rejected { .. }) => health.succeeded(),
            // Local conditions, not the peer's.
            Err(HopError::ShuttingDown | HopError::Saturated(_)) => {}
            Err(HopError::Timeout(_)) if !full_budget => {}
            Err(error) => health.failed(Instant::now(), &error.to_string(), probe, rand::random()),
        }
        result
    }

    /// Redelivers a missed `message` from the background task. While the
    /// peer is failing this goes through anyway, as a probe: nobody waits on
    /// it, so it can afford to try every redelivery round, and a peer that
    /// comes back rejoins within a round instead of after the Broadcasts'
    /// probe backoff (which grows to 30 s). Its failures leave that backoff
    /// alone; its success makes the peer healthy for Broadcasts too.
    pub async fn redeliver(&self, message: &Message, deadline: Instant) -> HopResult {
        if !self.is_failing() {
            return self.deliver(message, HashMap::new(), deadline).await;
        }
        let result = self
            .send_with_retries(message, HashMap::new(), deadline, Instant::now())
            .await;
        if matches!(result, Ok(_) | Err(HopError::Rejected { .. })) {
            self.lock_health().succeeded();
        }
        result
    }

    /// Sends until acked, retrying transient failures (UNAVAILABLE) with
    /// backoff and jitter while `deadline` allows.
    async fn send_with_retries(
        &self,
        message: &Message,
        trace_context: HashMap<String, String>,
        deadline: Instant,
        started: Instant,
    ) -> HopResult {
        let mut retries = 0;
        loop {
            let result = self
                .send_once(message.clone(), trace_context.clone(), deadline, started)
                .await;
            let pause = retry_pause(retries);
            match result {
                Err(HopError::Unavailable(_))
                    if retries < MAX_RETRIES && Instant::now() + pause < deadline =>
                {
                    retries += 1;
                    tokio::time::sleep(pause).await;
                }
                result => return result,
            }
        }
    }

    /// One attempt: queue the hop for the link task and wait for its ack.
    async fn send_once(
        &self,
        message: Message,
        trace_context: HashMap<String, String>,
        deadline: Instant,
        started: Instant,
    ) -> HopResult {
        let (reply_tx, reply_rx) = oneshot::channel();
        // Never wait for queue space: a peer that cannot keep up fails its own
        // hops at once instead of piling up waiting tasks and their messages.
        self.hop_tx
            .try_send(Hop {
                message,
                trace_context,
                reply_tx,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => HopError::Saturated(format!(
                    "the link to this peer is saturated: {HOP_QUEUE} hops are queued"
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    HopError::Unavailable("the link task to this peer has stopped".into())
                }
            })?;
        match tokio::time::timeout_at(deadline.into(), reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(HopError::Unavailable(
                "the link to the peer closed before it answered".into(),
            )),
            Err(_) => Err(HopError::Timeout(deadline.saturating_duration_since(started))),
        }
    }

    /// Whether hops to this peer are being skipped.
    pub fn is_failing(&self) -> bool {
        self.lock_health().is_failing()
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, PeerHealth> {
        // Held for a few field updates, never across an await.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Retries of one hop after a transient failure, deadline permitting.
const MAX_RETRIES: u32 = 3;

/// 10 ms, 20 ms, 40 ms…, each 0.5x to 1.5x at random.
fn retry_pause(retry: u32) -> Duration {
    Duration::from_millis(10 << retry.min(6)).mul_f64(0.5 + rand::random::<f64>())
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        // The task would also end when `hop_tx` closes, but not while it is
        // waiting on a hung peer; abort makes the end immediate.
        self.task.abort();
    }
}

impl std::fmt::Debug for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hop").field("id", &self.message.id).finish()
    }
}

/// The link task: (re)open the stream when there is work, then pump frames
/// and acks until the stream breaks.
async fn run(
    addr: SocketAddr,
    client: ReplicastClient<Channel>,
    mut hop_rx: mpsc::Receiver<Hop>,
    stall_after: Duration,
) {
    let mut next_tag: u64 = 0;
    loop {
        let Some(first) = next_live_hop(&mut hop_rx).await else {
            return;
        };
        let (frame_tx, frame_rx) = mpsc::channel(FRAME_QUEUE);
        let mut session = Session {
            frame_tx,
            pending: HashMap::new(),
            unanswered_since: None,
            stall_after,
        };
        session.send(first, &mut next_tag);
        // The call resolves once the peer answers with response headers. The
        // first frame is already queued; if opening fails, it fails with it.
        let mut stream_client = client.clone();
        let opened = tokio::select! {
            opened = stream_client.deliver_stream(ReceiverStream::new(frame_rx)) => opened,
            // Every hop waiting on the open was abandoned (deadline passed):
            // give up on this attempt rather than wait on a hung peer forever.
            () = session.all_abandoned() => {
                debug!(%addr, "opening the delivery stream timed out");
                continue;
            }
        };
        let acks = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                debug!(%addr, %status, "cannot open the delivery stream");
                session.fail_all(&hop_error(&status, "cannot open the delivery stream"));
                continue;
            }
        };
        let reason = session.pump(&mut hop_rx, acks, &mut next_tag).await;
        match reason {
            None => return,
            Some(error) => {
                debug!(%addr, %error, "delivery stream ended");
                session.fail_all(&error);
            }
        }
    }
}

/// The next hop whose caller is still waiting; `None` when the link is closed.
async fn next_live_hop(hop_rx: &mut mpsc::Receiver<Hop>) -> Option<Hop> {
    loop {
        let hop = hop_rx.recv().await?;
        if !hop.reply_tx.is_closed() {
            return Some(hop);
        }
    }
}

/// One open (or opening) DeliverStream.
struct Session {
    frame_tx: mpsc::Sender<DeliverFrame>,
    pending: HashMap<u64, oneshot::Sender<HopResult>>,
    /// When the first frame not yet followed by any ack was sent.
    unanswered_since: Option<Instant>,
    /// A stream that takes frames but acks none of them for this long is
    /// given up and reopened: the peer's end of it is stuck even though the
    /// connection (which keepalive watches) is alive.
    stall_after: Duration,
}

impl Session {
    fn send(&mut self, hop: Hop, next_tag: &mut u64) {
        *next_tag += 1;
        let tag = *next_tag;
        let frame = DeliverFrame {
            tag,
            message: Some(hop.message),
            trace_context: hop.trace_context,
        };
        match self.frame_tx.try_send(frame) {
            Ok(()) => {
                self.pending.insert(tag, hop.reply_tx);
                self.unanswered_since.get_or_insert_with(Instant::now);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                let _ = hop.reply_tx.send(Err(HopError::Unavailable(format!(
                    "the peer is not reading: {FRAME_QUEUE} frames are waiting to be sent"
                ))));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                let _ = hop
                    .reply_tx
                    .send(Err(HopError::Unavailable("the delivery stream closed".into())));
            }
        }
    }

    /// Resolves when no caller is waiting on this session any more.
    async fn all_abandoned(&mut self) {
        let mut sweep = tokio::time::interval(Duration::from_millis(50));
        loop {
            sweep.tick().await;
            self.pending.retain(|_, reply_tx| !reply_tx.is_closed());
            if self.pending.is_empty() {
                return;
            }
        }
    }

    /// Moves hops to the stream and acks to their callers. Returns `None` when
    /// the link was closed, or why the stream ended.
    async fn pump(
        &mut self,
        hop_rx: &mut mpsc::Receiver<Hop>,
        mut acks: Streaming<DeliverAck>,
        next_tag: &mut u64,
    ) -> Option<HopError> {
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                hop = hop_rx.recv() => match hop {
                    Some(hop) if !hop.reply_tx.is_closed() => self.send(hop, next_tag),
                    Some(_abandoned) => {}
                    None => return None,
                },
                ack = acks.message() => match ack {
                    Ok(Some(ack)) => {
                        self.unanswered_since = None;
                        self.complete(ack);
                    }
                    Ok(None) => return Some(HopError::Unavailable("the peer closed the delivery stream".into())),
                    // The stream as a whole failed: every pending hop may be
                    // retried, whatever the code (it is not about one message).
                    Err(status) => return Some(HopError::Unavailable(format!(
                        "the delivery stream broke: {}",
                        status.message()
                    ))),
                },
                _ = sweep.tick() => {
                    self.pending.retain(|_, reply_tx| !reply_tx.is_closed());
                    if let Some(since) = self.unanswered_since
                        && since.elapsed() > self.stall_after
                    {
                        return Some(HopError::Unavailable(format!(
                            "the peer acknowledged nothing on the delivery stream for {}; reopening it",
                            humantime::format_duration(Duration::from_secs(since.elapsed().as_secs()))
                        )));
                    }
                }
            }
        }
    }

    fn complete(&mut self, ack: DeliverAck) {
        let Some(reply_tx) = self.pending.remove(&ack.tag) else {
            return; // its caller gave up and the sweep dropped it
        };
        let result = match Code::from_i32(ack.code) {
            Code::Ok => Ok(ack.response.unwrap_or_default()),
            // The peer is closing (a frame that raced the end of its drain):
            // not delivered, and worth retrying later, so it is queued for
            // redelivery like any other miss.
            Code::Unavailable => Err(HopError::Unavailable(format!(
                "the peer refused it: {}",
                ack.error
            ))),
            code => Err(HopError::Rejected {
                code,
                message: ack.error,
            }),
        };
        // The caller may have timed out meanwhile; then nobody needs this.
        let _ = reply_tx.send(result);
    }

    fn fail_all(&mut self, error: &HopError) {
        for (_, reply_tx) in self.pending.drain() {
            let _ = reply_tx.send(Err(error.clone()));
        }
    }
}

fn hop_error(status: &Status, context: &str) -> HopError {
    // The transport's cause ("Connection refused") hides in the source chain.
    let mut message = format!("{context}: {}", status.message());
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if !message.ends_with(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal => {
            HopError::Unavailable(message)
        }
        code => HopError::Rejected { code, message },
    }
}
