//! The link task against an in-memory peer, with paused time: deadlines,
//! retries, health, stalls and redelivery without sockets or sleeps.

use std::sync::Mutex;

use tokio::sync::Semaphore;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;
use crate::proto::v1::{DeliverResponse, Message};

/// What the fake peer does with the next open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reachable {
    Yes,
    /// Connection refused.
    No,
}

/// One stream the link opened: the test plays the peer's end.
struct PeerEnd {
    frames: ReceiverStream<OutboundFrame>,
    acks: mpsc::UnboundedSender<Result<DeliverAck, Status>>,
}

impl PeerEnd {
    async fn frame(&mut self) -> OutboundFrame {
        self.frames.next().await.expect("the link sends a frame")
    }

    fn ack(&self, frame: &OutboundFrame, sequence: u64) {
        let _ = self.acks.send(Ok(DeliverAck {
            tag: frame.tag,
            code: 0,
            error: String::new(),
            response: Some(DeliverResponse {
                id: String::new(),
                sequence,
                duplicate: false,
            }),
            also: Vec::new(),
        }));
    }

    /// One ack for several frames, as a replica batches them.
    fn ack_all(&self, frames: &[OutboundFrame]) {
        let (first, rest) = frames.split_first().expect("at least one frame");
        let _ = self.acks.send(Ok(DeliverAck {
            tag: first.tag,
            code: 0,
            error: String::new(),
            response: Some(DeliverResponse {
                id: String::new(),
                sequence: 1,
                duplicate: false,
            }),
            also: rest
                .iter()
                .enumerate()
                .map(|(i, frame)| crate::proto::v1::DeliveredFrame {
                    tag: frame.tag,
                    sequence: i as u64 + 2,
                    duplicate: false,
                })
                .collect(),
        }));
    }

    fn refuse(&self, frame: &OutboundFrame) {
        let _ = self.acks.send(Ok(DeliverAck {
            tag: frame.tag,
            code: Code::Unavailable as i32,
            error: "draining".into(),
            response: None,
            also: Vec::new(),
        }));
    }
}

#[derive(Clone)]
struct FakeTransport {
    reachable: Arc<Mutex<Reachable>>,
    opens_tx: mpsc::UnboundedSender<PeerEnd>,
    attempts: Arc<std::sync::atomic::AtomicUsize>,
}

impl Transport for FakeTransport {
    fn open(
        &mut self,
        frames: ReceiverStream<OutboundFrame>,
    ) -> BoxFuture<'static, Result<AckStream, Status>> {
        self.attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if *self.reachable.lock().unwrap() == Reachable::No {
            // As tonic does: the frames wait in the call until it fails.
            return Box::pin(async move {
                tokio::task::yield_now().await;
                drop(frames);
                Err(Status::unavailable("connection refused"))
            });
        }
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let _ = self.opens_tx.send(PeerEnd { frames, acks });
        Box::pin(async move { Ok(UnboundedReceiverStream::new(acks_rx).boxed()) })
    }
}

struct Harness {
    link: PeerLink,
    opens_rx: mpsc::UnboundedReceiver<PeerEnd>,
    reachable: Arc<Mutex<Reachable>>,
    attempts: Arc<std::sync::atomic::AtomicUsize>,
    budget: Arc<BacklogBudget>,
    metrics: Metrics,
}

const PEER_TIMEOUT: Duration = Duration::from_secs(1);

fn harness() -> Harness {
    let (opens_tx, opens_rx) = mpsc::unbounded_channel();
    let reachable = Arc::new(Mutex::new(Reachable::Yes));
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let transport = FakeTransport {
        reachable: reachable.clone(),
        opens_tx,
        attempts: attempts.clone(),
    };
    let budget = BacklogBudget::new(1 << 20);
    let metrics = Metrics::default();
    let config = LinkConfig {
        peer_timeout: PEER_TIMEOUT,
        max_frame_bytes: 1 << 20,
        redelivery_window: Duration::from_secs(30),
    };
    let link = PeerLink::spawn_with(
        "127.0.0.1:7420".parse().unwrap(),
        transport,
        config,
        budget.clone(),
        &metrics,
    );
    Harness {
        link,
        opens_rx,
        reachable,
        attempts,
        budget,
        metrics,
    }
}

impl Harness {
    async fn peer_end(&mut self) -> PeerEnd {
        self.opens_rx.recv().await.expect("the link opens a stream")
    }

    /// Submits a hop for message `id` with the whole peer timeout; returns
    /// where its receipt arrives.
    fn submit(&self, id: &str) -> mpsc::Receiver<HopReport> {
        self.submit_until(id, Instant::now() + PEER_TIMEOUT, true)
    }

    fn submit_until(&self, id: &str, deadline: Instant, full_budget: bool) -> mpsc::Receiver<HopReport> {
        let (tx, rx) = mpsc::channel(1);
        let permit = Arc::new(Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap());
        self.link.submit(Hop {
            message: message(id),
            trace_context: Arc::default(),
            deadline,
            started: Instant::now(),
            full_budget,
            receipt: ReceiptSender {
                tx,
                slot: 0,
                _permit: permit,
                late: None,
            },
        });
        rx
    }

    fn set_reachable(&self, reachable: Reachable) {
        *self.reachable.lock().unwrap() = reachable;
    }

    fn redeliveries(&self, result: &'static str) -> u64 {
        self.metrics
            .redeliveries
            .get_or_create(&RedeliveryLabels { result })
            .get()
    }
}

fn message(id: &str) -> EncodedMessage {
    EncodedMessage::encode(Message {
        id: id.into(),
        topic: "t".into(),
        origin: "127.0.0.2:7420".into(),
        ..Default::default()
    })
}

fn id_of(frame: &OutboundFrame) -> String {
    use prost::Message as _;
    Message::decode(frame.message.clone()).unwrap().id
}

async fn receipt(rx: &mut mpsc::Receiver<HopReport>) -> HopResult {
    rx.recv().await.expect("every hop reports").result
}

#[tokio::test(start_paused = true)]
async fn the_stream_opens_before_the_first_hop_and_acks_are_matched_by_tag() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    assert_eq!(
        h.attempts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "opened eagerly"
    );
    let mut first = h.submit("a");
    let mut second = h.submit("b");
    let (fa, fb) = (peer.frame().await, peer.frame().await);
    assert_eq!((id_of(&fa), id_of(&fb)), ("a".to_owned(), "b".to_owned()));
    // Out of order: each receipt still goes to its own hop.
    peer.ack(&fb, 8);
    peer.ack(&fa, 7);
    assert_eq!(receipt(&mut first).await.unwrap().sequence, 7);
    assert_eq!(receipt(&mut second).await.unwrap().sequence, 8);
    assert!(h.link.status().connected);
}

#[tokio::test(start_paused = true)]
async fn one_batched_ack_answers_every_frame_it_names() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    let mut receipts: Vec<_> = (0..5).map(|i| h.submit(&format!("m{i}"))).collect();
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(peer.frame().await);
    }
    peer.ack_all(&frames);
    let mut sequences = Vec::new();
    for rx in &mut receipts {
        sequences.push(receipt(rx).await.unwrap().sequence);
    }
    assert_eq!(sequences, vec![1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_hop_nobody_answers_times_out_at_its_deadline_and_is_redelivered_later() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    let started = Instant::now();
    let mut rx = h.submit("lost");
    let _unanswered = peer.frame().await;
    match receipt(&mut rx).await {
        Err(HopError::Timeout(waited)) => assert_eq!(waited, PEER_TIMEOUT),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        Instant::now() - started,
        PEER_TIMEOUT,
        "exactly at the deadline, from the timer wheel"
    );
    assert_eq!(h.budget.messages(), 1, "the missed message is held");
    // The next redelivery round resends it; this time the peer answers.
    let again = peer.frame().await;
    assert_eq!(id_of(&again), "lost");
    peer.ack(&again, 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.budget.messages(), 0, "delivered: no longer held");
    assert_eq!(h.redeliveries("delivered"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_broken_stream_is_reopened_and_its_hops_retried_within_their_deadline() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    let mut rx = h.submit("m");
    let _first_try = peer.frame().await;
    let _ = peer.acks.send(Err(Status::unavailable("connection reset")));
    let mut peer = h.peer_end().await;
    let retry = peer.frame().await;
    assert_eq!(id_of(&retry), "m", "the same message on a new stream");
    peer.ack(&retry, 3);
    assert_eq!(receipt(&mut rx).await.unwrap().sequence, 3);
    assert_eq!(h.budget.messages(), 0, "nothing missed");
}

#[tokio::test(start_paused = true)]
async fn a_stream_found_closed_on_send_retries_every_hop_that_was_on_it() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    let mut first = h.submit("a");
    let _taken = peer.frame().await;
    // The peer's end closes the frames before any ack or end of stream.
    let PeerEnd {
        frames,
        acks: _still_open,
    } = peer;
    drop(frames);
    let mut second = h.submit("b");
    let mut fresh = h.peer_end().await;
    let mut resent = Vec::new();
    for _ in 0..2 {
        let frame = fresh.frame().await;
        resent.push(id_of(&frame));
        fresh.ack(&frame, resent.len() as u64);
    }
    resent.sort();
    assert_eq!(
        resent,
        vec!["a", "b"],
        "the hop already on the closed stream is retried too"
    );
    assert!(receipt(&mut first).await.is_ok());
    assert!(receipt(&mut second).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_ack_is_retried_not_final() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    let mut rx = h.submit("m");
    let first = peer.frame().await;
    peer.refuse(&first);
    let retry = peer.frame().await;
    assert_eq!(id_of(&retry), "m");
    peer.ack(&retry, 1);
    assert!(receipt(&mut rx).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_hop_cut_short_by_its_caller_does_not_count_against_the_peer() {
    let mut h = harness();
    let mut peer = h.peer_end().await;
    for i in 0..5 {
        let mut rx = h.submit_until(
            &format!("short{i}"),
            Instant::now() + Duration::from_millis(10),
            false,
        );
        let _ = peer.frame().await;
        assert!(matches!(receipt(&mut rx).await, Err(HopError::Timeout(_))));
    }
    let mut rx = h.submit("next");
    let frame = peer.frame().await;
    assert_eq!(
        id_of(&frame),
        "next",
        "still sent: the peer is not marked failing"
    );
    peer.ack(&frame, 1);
    assert!(receipt(&mut rx).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_keeps_failing_is_skipped_at_once_then_probed_back() {
    let mut h = harness();
    h.set_reachable(Reachable::No);
    for i in 0..crate::fanout::health::FAILURES_TO_SKIP {
        let mut rx = h.submit(&format!("m{i}"));
        match receipt(&mut rx).await {
            Err(HopError::Connect(reason)) => assert!(reason.contains("connection refused"), "{reason}"),
            other => panic!("expected a connect failure, got {other:?}"),
        }
    }
    let before = Instant::now();
    let mut rx = h.submit("skipped");
    match receipt(&mut rx).await {
        Err(error @ HopError::Skipped { .. }) => {
            assert!(error.to_string().contains("3 times in a row"), "{error}");
        }
        other => panic!("expected a skip, got {other:?}"),
    }
    assert_eq!(Instant::now(), before, "a skipped hop costs no time");
    let status = h.link.status();
    assert!(
        status.failing_since.is_some() && status.skipped_until.is_some(),
        "{status:?}"
    );
    assert_eq!(
        status.backlog,
        crate::fanout::health::FAILURES_TO_SKIP as usize + 1,
        "every miss is held"
    );
    // The peer comes back: redelivery probes it within a round and
    // delivers what it missed, long before the Broadcasts' backoff.
    h.set_reachable(Reachable::Yes);
    let mut peer = h.peer_end().await;
    let mut delivered = Vec::new();
    while delivered.len() < 4 {
        let frame = peer.frame().await;
        delivered.push(id_of(&frame));
        peer.ack(&frame, delivered.len() as u64);
    }
    delivered.sort();
    assert_eq!(delivered, vec!["m0", "m1", "m2", "skipped"]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.link.status().failing_since, None, "healthy again");
    let mut rx = h.submit("after");
    let frame = peer.frame().await;
    peer.ack(&frame, 9);
    assert!(receipt(&mut rx).await.is_ok(), "Broadcasts reach it again");
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_takes_frames_but_acks_none_is_reopened() {
    let mut h = harness();
    let mut stuck = h.peer_end().await;
    let mut rx = h.submit("m");
    let _ignored = stuck.frame().await;
    assert!(matches!(receipt(&mut rx).await, Err(HopError::Timeout(_))));
    // Twice the peer timeout without an ack: a new stream, on which the
    // backlog is redelivered.
    let mut fresh = h.peer_end().await;
    let frame = fresh.frame().await;
    assert_eq!(id_of(&frame), "m");
    fresh.ack(&frame, 1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.budget.messages(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_retiring_link_holds_its_backlog_then_goes_idle_when_it_is_delivered() {
    let mut h = harness();
    h.set_reachable(Reachable::No);
    let mut rx = h.submit("m");
    assert!(receipt(&mut rx).await.is_err());
    h.link.set_member(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = h.link.status();
    assert!(
        status.retiring && !status.idle,
        "it still holds a message: {status:?}"
    );
    assert_eq!(
        h.budget.messages(),
        1,
        "held for the window while the peer is out of the set"
    );
    h.set_reachable(Reachable::Yes);
    h.link.set_member(true);
    let mut peer = h.peer_end().await;
    let frame = peer.frame().await;
    assert_eq!(id_of(&frame), "m", "back in the set: redelivered");
    peer.ack(&frame, 1);
    h.link.set_member(false);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(h.link.status().idle, "nothing held: the fan-out may drop it");
}

#[tokio::test(start_paused = true)]
async fn a_stopped_link_gives_up_its_backlog_and_counts_it() {
    let h = harness();
    h.set_reachable(Reachable::No);
    let mut rx = h.submit("m");
    assert!(receipt(&mut rx).await.is_err());
    assert_eq!(h.budget.messages(), 1);
    h.link.stop().await;
    assert_eq!(h.budget.messages(), 0);
    assert_eq!(h.redeliveries("given_up"), 1);
}
