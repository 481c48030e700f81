//! Local delivery: hands messages to this replica's own consumers.
//!
//! One [`LocalDelivery`] per replica assigns consecutive sequence numbers,
//! drops duplicates by id ([`DedupWindow`]) and appends each delivery to the
//! [`ReplayRing`]. Subscribers, live or resuming, read from that ring with
//! their own cursor and are woken through a `watch` of the newest sequence.
//!
//! Why a cursor over the ring rather than a channel per subscriber: the ring
//! is the only copy of recent messages however many subscribers there are, so
//! memory is bounded by `--replay-max-bytes` even when a subscriber stops
//! reading (a stalled HTTP/2 stream is simply not polled); a subscriber that
//! falls more than `--subscriber-buffer` deliveries behind the newest is told
//! where to resume and disconnected. Deliver never waits for a subscriber.
//!
//! Everything here is synchronous and takes one short `std::sync::Mutex`
//! critical section per message (never held across an `.await`).

mod app_receipt;
mod dedup;
mod ring;
mod topic;

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::watch;

pub use self::{
    app_receipt::{AppFailure, AppOutcome, AppReceipt, MAX_ACKED_WEBHOOKS},
    dedup::{DedupWindow, Remembered},
    ring::{ReplayRing, StoredDelivery},
    topic::TopicFilter,
};
use crate::{error::Error, wire::EncodedMessage};

/// How many deliveries a subscriber takes from the ring per lock.
const READ_BATCH: usize = 64;
/// Bytes a ring entry costs beyond the message's encoding: its sequence,
/// the shared message's header and the ring slot.
const RING_ENTRY_OVERHEAD: usize = 64;

/// Limits of local delivery, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct LocalLimits {
    /// Deliveries kept for subscribers that resume (`--replay-capacity`).
    pub replay_capacity: usize,
    /// Bytes of encoded deliveries the replay ring may hold (`--replay-max-bytes`).
    pub replay_max_bytes: usize,
    /// Ids remembered for deduplication (`--dedup-capacity`).
    pub dedup_capacity: usize,
    /// How long an id is remembered (`--dedup-ttl`).
    pub dedup_ttl: Duration,
    /// How far one subscriber may fall behind the newest delivery
    /// (`--subscriber-buffer`).
    pub subscriber_buffer: usize,
}

/// The replay ring's size, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingOccupancy {
    pub messages: usize,
    pub bytes: usize,
}

/// The result of handing one message to local consumers.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// This replica's sequence number for the message.
    pub sequence: u64,
    /// The id was already in the dedup window; nothing was delivered again.
    pub duplicate: bool,
    /// With `--webhook-ack`, when a webhook takes its topic: the receipt
    /// to wait on before acknowledging (a duplicate gets the original's).
    pub app_receipt: Option<Arc<AppReceipt>>,
}

/// A webhook whose 2xx a delivery's receipt waits for (`--webhook-ack`);
/// its bit in [`AppReceipt`] is its index in the list.
#[derive(Debug, Clone)]
pub struct AckedWebhook {
    /// How receipts name it.
    pub name: Arc<str>,
    pub filter: TopicFilter,
}

/// This replica's local consumers: sequence numbers, dedup, and the ring
/// that live and resuming subscribers read.
#[derive(Debug)]
pub struct LocalDelivery {
    /// Random per process: sequence numbers restart with it.
    incarnation: u64,
    state: Mutex<State>,
    /// The newest sequence; subscribers wait on it when caught up.
    head_tx: watch::Sender<u64>,
    /// Followers (webhooks) among `head_tx`'s receivers, which are not
    /// subscribers.
    followers: Arc<std::sync::atomic::AtomicUsize>,
    limits: LocalLimits,
    /// `--webhook-ack`: the webhooks deliveries wait for (empty: none).
    acked_webhooks: Vec<AckedWebhook>,
}

#[derive(Debug)]
struct State {
    last_sequence: u64,
    /// Set by [`LocalDelivery::close`]: nothing more is delivered.
    closed: bool,
    dedup: DedupWindow,
    ring: ReplayRing,
}

impl LocalDelivery {
    pub fn new(limits: LocalLimits) -> Self {
        Self::with_acked_webhooks(limits, Vec::new())
    }

    /// Local delivery whose deliveries wait for `acked` webhooks' 2xx
    /// (at most [`MAX_ACKED_WEBHOOKS`]; the configuration checks).
    pub fn with_acked_webhooks(limits: LocalLimits, acked: Vec<AckedWebhook>) -> Self {
        assert!(acked.len() <= MAX_ACKED_WEBHOOKS, "one bit per acked webhook");
        let (head_tx, _) = watch::channel(0);
        Self {
            // Never 0, which means "unchecked" in SubscribeRequest.
            incarnation: rand::random::<u64>().max(1),
            state: Mutex::new(State {
                last_sequence: 0,
                closed: false,
                dedup: DedupWindow::new(limits.dedup_capacity, limits.dedup_ttl),
                ring: ReplayRing::new(limits.replay_capacity.max(1), limits.replay_max_bytes),
            }),
            head_tx,
            followers: Arc::default(),
            limits,
            acked_webhooks: acked,
        }
    }

    /// Whether deliveries may wait for a webhook's answer.
    pub fn waits_for_apps(&self) -> bool {
        !self.acked_webhooks.is_empty()
    }

    /// The receipt a new delivery on `topic` waits on, if a webhook
    /// acknowledging that topic exists.
    fn app_receipt_for(&self, topic: &str) -> Option<Arc<AppReceipt>> {
        let bits = self
            .acked_webhooks
            .iter()
            .enumerate()
            .filter(|(_, hook)| hook.filter.matches(topic))
            .fold(0u64, |bits, (bit, _)| bits | 1 << bit);
        (bits != 0).then(|| AppReceipt::new(bits))
    }

    /// Delivers `message` unless its id was delivered before. Fails with
    /// [`Error::ShuttingDown`] once [`close`](Self::close)d: the sender is
    /// not acknowledged, so it keeps the message for redelivery instead of
    /// believing a replica that is about to exit delivered it.
    pub fn deliver(&self, message: EncodedMessage) -> Result<Delivered, Error> {
        self.deliver_traced(message, None)
    }

    /// [`deliver`](Self::deliver), keeping the delivering span's trace
    /// context with the delivery (for the webhooks).
    pub fn deliver_traced(
        &self,
        message: EncodedMessage,
        trace_context: Option<Arc<HashMap<String, String>>>,
    ) -> Result<Delivered, Error> {
        let now = Instant::now();
        // What the ring holds for it: the shared encoding, plus the
        // delivery's own fields and bookkeeping.
        let trace_bytes = trace_context
            .as_ref()
            .map_or(0, |c| c.iter().map(|(k, v)| k.len() + v.len() + 48).sum());
        let size = message.encoded_len() + RING_ENTRY_OVERHEAD + trace_bytes;
        let delivered = {
            let mut state = self.lock();
            if state.closed {
                return Err(Error::ShuttingDown);
            }
            if let Some(remembered) = state.dedup.get(message.id(), now) {
                return Ok(Delivered {
                    sequence: remembered.sequence,
                    duplicate: true,
                    app_receipt: remembered.app_receipt.clone(),
                });
            }
            state.last_sequence += 1;
            let sequence = state.last_sequence;
            let app_receipt = self.app_receipt_for(message.topic());
            state.dedup.insert(
                message.id(),
                Remembered {
                    sequence,
                    app_receipt: app_receipt.clone(),
                },
                now,
            );
            let acked = &self.acked_webhooks;
            state.ring.push(
                StoredDelivery {
                    sequence,
                    message,
                    trace_context,
                    app_receipt: app_receipt.clone(),
                },
                size,
                |gone| {
                    if let Some(receipt) = &gone.app_receipt {
                        receipt.evicted(|bit| acked[bit as usize].name.clone());
                    }
                },
            );
            Delivered {
                sequence,
                duplicate: false,
                app_receipt,
            }
        };
        // Outside the lock: subscribers read the ring, the watch only wakes them.
        self.head_tx.send_replace(delivered.sequence);
        Ok(delivered)
    }

    /// Stops delivering, at the end of a replica's drain. Subscribers first
    /// get everything delivered before, then end with
    /// [`Error::ShuttingDown`]: every acknowledged delivery reaches the
    /// subscribers attached when it was made, and the rest are refused
    /// (never acknowledged) rather than dropped.
    pub fn close(&self) {
        let last = {
            let mut state = self.lock();
            state.closed = true;
            state.last_sequence
        };
        // Wakes subscribers that are caught up, so they see the close.
        self.head_tx.send_replace(last);
    }

    /// This replica's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Attaches a subscriber. With `after_sequence` > 0 it first gets what
    /// the ring holds after that sequence, then live deliveries, with no gap
    /// and no duplicate (it is one cursor over one ring). A resume that names
    /// another `incarnation` (non-zero) is refused: its sequence numbers mean
    /// nothing here.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: TopicFilter,
        after_sequence: u64,
        incarnation: u64,
    ) -> Result<Subscription, Error> {
        self.subscribe_from(filter, Start::After(after_sequence), incarnation)
    }

    /// Attaches a subscriber at `start` (see [`Start`]).
    pub fn subscribe_from(
        self: &Arc<Self>,
        filter: TopicFilter,
        start: Start,
        incarnation: u64,
    ) -> Result<Subscription, Error> {
        let state = self.lock();
        let last = state.last_sequence;
        let cursor = match start {
            Start::After(0) => last,
            Start::After(after) => {
                if incarnation != 0 && incarnation != self.incarnation {
                    return Err(Error::IncarnationChanged {
                        requested: incarnation,
                        current: self.incarnation,
                    });
                }
                if after > last {
                    return Err(Error::ResumeAhead {
                        requested: after,
                        last,
                    });
                }
                state
                    .ring
                    .after(after, last, 1)
                    .map_err(|evicted| Error::ReplayEvicted {
                        requested: after,
                        oldest: evicted.oldest,
                    })?;
                after
            }
            Start::Oldest => state.ring.oldest().map_or(last, |oldest| oldest - 1),
        };
        Ok(Subscription {
            local: self.clone(),
            head_rx: self.head_tx.subscribe(),
            batch: VecDeque::new(),
            filter,
            cursor,
            attached_at: last,
        })
    }

    /// The last sequence number assigned (0 before the first delivery).
    pub fn last_sequence(&self) -> u64 {
        self.lock().last_sequence
    }

    /// What the replay ring holds now.
    pub fn ring_occupancy(&self) -> RingOccupancy {
        let state = self.lock();
        RingOccupancy {
            messages: state.ring.len(),
            bytes: state.ring.bytes(),
        }
    }

    /// How many Subscribe streams are attached.
    pub fn subscriber_count(&self) -> usize {
        let followers = self.followers.load(std::sync::atomic::Ordering::Relaxed);
        self.head_tx.receiver_count().saturating_sub(followers)
    }

    /// The next deliveries after `cursor`, or why the subscriber cannot have
    /// them. Lag counts from `attached_at` at the earliest: a subscriber that
    /// resumed far back may replay the ring at its own pace, and is cut off
    /// only when more than `subscriber_buffer` new deliveries pile up.
    fn read_after(&self, cursor: u64, attached_at: u64) -> Result<Vec<StoredDelivery>, Error> {
        let state = self.lock();
        let last = state.last_sequence;
        if last.saturating_sub(cursor.max(attached_at)) > self.limits.subscriber_buffer as u64 {
            return Err(Error::SubscriberLagged {
                resume_after: cursor,
                buffer: self.limits.subscriber_buffer,
            });
        }
        let batch =
            state
                .ring
                .after(cursor, last, READ_BATCH)
                .map_err(|evicted| Error::SubscriberOverrun {
                    cursor,
                    oldest: evicted.oldest,
                })?;
        if batch.is_empty() && state.closed {
            return Err(Error::ShuttingDown);
        }
        Ok(batch)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than stopping delivery would.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A reader of every delivery that matches its filter, in order, that is
/// never disconnected for being slow: when it falls behind the ring, it
/// skips to the oldest delivery still held and says how many it lost. For
/// the webhook sinks, whose app may be slow or down for a while; like a
/// subscriber, its backlog costs nothing but its cursor.
#[derive(Debug)]
pub struct Follower {
    local: Arc<LocalDelivery>,
    head_rx: watch::Receiver<u64>,
    batch: VecDeque<StoredDelivery>,
    filter: TopicFilter,
    cursor: u64,
    /// Lost since the last delivery returned.
    lost: u64,
    /// With `--webhook-ack`, this follower's bit in the app receipts.
    ack_bit: Option<u32>,
}

/// One delivery to a follower.
#[derive(Debug, Clone)]
pub struct Followed {
    pub delivery: StoredDelivery,
    /// Deliveries (of any topic) that fell out of the ring before the
    /// follower read them, since the previous one it got.
    pub lost_before: u64,
}

impl LocalDelivery {
    /// A follower of the deliveries made from now on; with `ack_bit`, the
    /// webhook that answers for that bit of the app receipts.
    pub fn follow(self: &Arc<Self>, filter: TopicFilter, ack_bit: Option<u32>) -> Follower {
        let cursor = self.lock().last_sequence;
        self.followers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Follower {
            local: self.clone(),
            head_rx: self.head_tx.subscribe(),
            batch: VecDeque::new(),
            filter,
            cursor,
            lost: 0,
            ack_bit,
        }
    }

    /// Up to [`READ_BATCH`] deliveries after `cursor`, and how many were
    /// evicted before it could read them (the cursor then moves past them).
    /// With `ack_bit`, what it reads is marked taken under the lock, so an
    /// eviction from now on does not count it lost to that webhook.
    fn read_following(&self, cursor: u64, ack_bit: Option<u32>) -> Result<(Vec<StoredDelivery>, u64), Error> {
        let state = self.lock();
        let last = state.last_sequence;
        let (batch, lost) = match state.ring.after(cursor, last, READ_BATCH) {
            Ok(batch) => (batch, 0),
            Err(evicted) => {
                let skipped = evicted.oldest.saturating_sub(1);
                let batch = state.ring.after(skipped, last, READ_BATCH).unwrap_or_default();
                (batch, skipped - cursor)
            }
        };
        if batch.is_empty() && lost == 0 && state.closed {
            return Err(Error::ShuttingDown);
        }
        if let Some(bit) = ack_bit {
            for delivery in &batch {
                if let Some(receipt) = &delivery.app_receipt {
                    receipt.taken(bit);
                }
            }
        }
        Ok((batch, lost))
    }
}

impl Follower {
    /// The next matching delivery. Ends with [`Error::ShuttingDown`] once
    /// the replica is closed and everything delivered before was read.
    pub async fn next(&mut self) -> Result<Followed, Error> {
        loop {
            if let Some(delivery) = self.batch.pop_front() {
                self.cursor = delivery.sequence;
                if self.filter.matches(delivery.message.topic()) {
                    return Ok(Followed {
                        delivery,
                        lost_before: std::mem::take(&mut self.lost),
                    });
                }
                continue;
            }
            self.head_rx.borrow_and_update();
            let (batch, lost) = self.local.read_following(self.cursor, self.ack_bit)?;
            self.cursor += lost;
            self.lost += lost;
            if batch.is_empty() && lost == 0 {
                self.head_rx.changed().await.map_err(|_| Error::ShuttingDown)?;
            } else {
                self.batch = batch.into();
            }
        }
    }

    /// Deliveries made that this follower has not passed yet, of any
    /// topic (cheap: no look at the ring).
    pub fn backlog(&self) -> u64 {
        self.local.last_sequence().saturating_sub(self.passed())
    }

    /// Gives up on what matches and was not handed out yet (the batch
    /// read ahead, and the ring after it), at shutdown: returns how many,
    /// and with `ack_bit` fails their app receipts as abandoned by
    /// `webhook`.
    pub fn abandon_rest(&mut self, webhook: &Arc<str>) -> u64 {
        let state = self.local.lock();
        let read = self.batch.back().map_or(self.cursor, |d| d.sequence);
        let unread = match state.ring.after(read, state.last_sequence, usize::MAX) {
            Ok(unread) => unread,
            // Evicted unread: lost (and reported so) already.
            Err(evicted) => state
                .ring
                .after(evicted.oldest.saturating_sub(1), state.last_sequence, usize::MAX)
                .unwrap_or_default(),
        };
        drop(state);
        let mut left = 0;
        for delivery in self.batch.drain(..).chain(unread) {
            if !self.filter.matches(delivery.message.topic()) {
                continue;
            }
            left += 1;
            if let (Some(bit), Some(receipt)) = (self.ack_bit, &delivery.app_receipt) {
                receipt.answered(
                    bit,
                    Err(AppFailure::Abandoned {
                        webhook: webhook.clone(),
                    }),
                );
            }
        }
        left
    }

    fn passed(&self) -> u64 {
        self.batch.front().map_or(self.cursor, |d| d.sequence - 1)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.local
            .followers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this sequence number; 0 means live only.
    After(u64),
    /// At the oldest delivery still in the ring.
    Oldest,
}

/// One subscriber: a cursor into the ring, and a topic filter.
#[derive(Debug)]
pub struct Subscription {
    local: Arc<LocalDelivery>,
    head_rx: watch::Receiver<u64>,
    /// Taken from the ring, not yet passed to the subscriber.
    batch: VecDeque<StoredDelivery>,
    filter: TopicFilter,
    /// The last sequence this subscriber has passed (sent or filtered out).
    cursor: u64,
    /// The newest sequence when it subscribed.
    attached_at: u64,
}

impl Subscription {
    /// The next delivery that matches the filter. Ends with
    /// [`Error::SubscriberLagged`] when the subscriber fell too far behind,
    /// or [`Error::ShuttingDown`] once the replica is closed and this
    /// subscriber has had everything delivered before that.
    pub async fn next(&mut self) -> Result<StoredDelivery, Error> {
        loop {
            if let Some(delivery) = self.batch.pop_front() {
                self.cursor = delivery.sequence;
                if self.filter.matches(delivery.message.topic()) {
                    return Ok(delivery);
                }
                continue;
            }
            // Mark the head seen before reading the ring, so a delivery that
            // lands after the read wakes `changed` below (no lost wake-up).
            self.head_rx.borrow_and_update();
            let batch = self.local.read_after(self.cursor, self.attached_at)?;
            if batch.is_empty() {
                self.head_rx.changed().await.map_err(|_| Error::ShuttingDown)?;
            } else {
                self.batch = batch.into();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(replay: usize, buffer: usize) -> Arc<LocalDelivery> {
        Arc::new(LocalDelivery::new(LocalLimits {
            replay_capacity: replay,
            replay_max_bytes: usize::MAX,
            dedup_capacity: 1000,
            dedup_ttl: Duration::from_secs(60),
            subscriber_buffer: buffer,
        }))
    }

    fn msg(id: &str, topic: &str) -> EncodedMessage {
        EncodedMessage::encode(crate::proto::v1::Message {
            id: id.into(),
            topic: topic.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_follower_is_never_cut_off_and_counts_what_it_lost() {
        let l = local(3, 1);
        let mut follower = l.follow(TopicFilter::new(&["cache".to_owned()]), None);
        for i in 0..6 {
            l.deliver(msg(&format!("m{i}"), if i % 2 == 0 { "cache" } else { "other" }))
                .unwrap();
        }
        // The ring holds 4..=6; 1..=3 were lost, and 4 ("other") is skipped.
        assert_eq!(follower.backlog(), 6);
        let next = follower.next().await.unwrap();
        assert_eq!((next.delivery.sequence, next.lost_before), (5, 3));
        l.deliver(msg("m6", "cache")).unwrap();
        let next = follower.next().await.unwrap();
        assert_eq!((next.delivery.sequence, next.lost_before), (7, 0));
        assert_eq!(follower.backlog(), 0);
        l.close();
        assert!(matches!(follower.next().await, Err(Error::ShuttingDown)));
    }

    #[test]
    fn sequences_are_consecutive_and_duplicates_keep_theirs() {
        let l = local(10, 10);
        let deliver = |id: &str| {
            let delivered = l.deliver(msg(id, "t")).unwrap();
            assert!(delivered.app_receipt.is_none(), "no --webhook-ack");
            (delivered.sequence, delivered.duplicate)
        };
        assert_eq!(deliver("a"), (1, false));
        assert_eq!(deliver("b"), (2, false));
        assert_eq!(deliver("a"), (1, true));
        assert_eq!(l.last_sequence(), 2);
    }

    #[tokio::test]
    async fn resume_replays_then_goes_live_without_gap_or_duplicate() {
        let l = local(10, 10);
        for i in 1..=3 {
            l.deliver(msg(&format!("m{i}"), "t")).unwrap();
        }
        let mut sub = l.subscribe(TopicFilter::default(), 1, 0).unwrap();
        l.deliver(msg("m4", "t")).unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(sub.next().await.unwrap().sequence);
        }
        assert_eq!(got, vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn filter_skips_other_topics() {
        let l = local(10, 10);
        let mut sub = l.subscribe(TopicFilter::new(&["cache.*".into()]), 0, 0).unwrap();
        l.deliver(msg("1", "orders")).unwrap();
        l.deliver(msg("2", "cache.flush")).unwrap();
        let d = sub.next().await.unwrap();
        assert_eq!(d.sequence, 2);
    }

    #[test]
    fn resume_against_another_incarnation_is_refused() {
        let l = local(10, 10);
        l.deliver(msg("a", "t")).unwrap();
        let other = l.incarnation().wrapping_add(1).max(1);
        assert!(matches!(
            l.subscribe(TopicFilter::default(), 1, other),
            Err(Error::IncarnationChanged { .. })
        ));
        assert!(l.subscribe(TopicFilter::default(), 1, l.incarnation()).is_ok());
        assert!(
            l.subscribe(TopicFilter::default(), 1, 0).is_ok(),
            "0 is unchecked"
        );
        assert!(
            l.subscribe(TopicFilter::default(), 0, other).is_ok(),
            "live-only needs no incarnation"
        );
    }

    #[tokio::test]
    async fn from_oldest_starts_at_the_ring() {
        let l = local(3, 10);
        for i in 1..=5 {
            l.deliver(msg(&format!("m{i}"), "t")).unwrap();
        }
        let mut sub = l
            .subscribe_from(TopicFilter::default(), Start::Oldest, 0)
            .unwrap();
        for seq in 3..=5 {
            assert_eq!(sub.next().await.unwrap().sequence, seq);
        }
        let empty = local(3, 10);
        let mut sub = empty
            .subscribe_from(TopicFilter::default(), Start::Oldest, 0)
            .unwrap();
        empty.deliver(msg("first", "t")).unwrap();
        assert_eq!(sub.next().await.unwrap().sequence, 1, "an empty ring starts live");
    }

    #[test]
    fn resume_errors() {
        let l = local(2, 10);
        for i in 1..=5 {
            l.deliver(msg(&format!("m{i}"), "t")).unwrap();
        }
        assert!(matches!(
            l.subscribe(TopicFilter::default(), 1, 0),
            Err(Error::ReplayEvicted {
                requested: 1,
                oldest: 4
            })
        ));
        assert!(matches!(
            l.subscribe(TopicFilter::default(), 9, 0),
            Err(Error::ResumeAhead {
                requested: 9,
                last: 5
            })
        ));
    }

    #[tokio::test]
    async fn slow_subscriber_lags_without_blocking_delivery() {
        let l = local(100, 4);
        let mut sub = l.subscribe(TopicFilter::default(), 0, 0).unwrap();
        for i in 1..=10 {
            l.deliver(msg(&format!("m{i}"), "t")).unwrap();
        }
        match sub.next().await {
            Err(Error::SubscriberLagged {
                resume_after: 0,
                buffer: 4,
            }) => {}
            other => panic!("expected SubscriberLagged resume_after=0, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn resuming_far_back_replays_at_its_own_pace() {
        let l = local(100, 4);
        for i in 1..=20 {
            l.deliver(msg(&format!("m{i}"), "t")).unwrap();
        }
        let mut sub = l.subscribe(TopicFilter::default(), 2, 0).unwrap();
        for seq in 3..=20 {
            assert_eq!(
                sub.next().await.unwrap().sequence,
                seq,
                "18 behind, but all from before it attached"
            );
        }
    }

    #[tokio::test]
    async fn subscriber_behind_the_ring_is_told_what_is_gone() {
        let l = local(3, 100);
        let mut sub = l.subscribe(TopicFilter::default(), 0, 0).unwrap();
        assert_eq!(l.subscriber_count(), 1);
        for i in 1..=5 {
            l.deliver(msg(&format!("m{i}"), "t")).unwrap();
        }
        match sub.next().await {
            Err(Error::SubscriberOverrun { cursor: 0, oldest: 3 }) => {}
            other => panic!("expected SubscriberOverrun oldest=3, got {other:?}"),
        }
        drop(sub);
        assert_eq!(l.subscriber_count(), 0);
    }

    #[tokio::test]
    async fn caught_up_subscriber_wakes_on_the_next_delivery() {
        let l = local(10, 10);
        let mut sub = l.subscribe(TopicFilter::default(), 0, 0).unwrap();
        let waiter = tokio::spawn(async move { sub.next().await.map(|d| d.sequence) });
        tokio::task::yield_now().await;
        l.deliver(msg("late", "t")).unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn close_flushes_subscribers_then_ends_them_and_refuses_deliveries() {
        let l = local(10, 10);
        let mut behind = l.subscribe(TopicFilter::default(), 0, 0).unwrap();
        let mut caught_up = l.subscribe(TopicFilter::default(), 0, 0).unwrap();
        l.deliver(msg("a", "t")).unwrap();
        l.deliver(msg("b", "t")).unwrap();
        assert_eq!(caught_up.next().await.unwrap().sequence, 1);
        assert_eq!(caught_up.next().await.unwrap().sequence, 2);
        let waiting = tokio::spawn(async move { caught_up.next().await.map(|d| d.sequence) });
        tokio::task::yield_now().await;

        l.close();
        assert!(
            matches!(l.deliver(msg("c", "t")), Err(Error::ShuttingDown)),
            "a closed replica must not acknowledge what no subscriber will read"
        );
        assert!(matches!(waiting.await.unwrap(), Err(Error::ShuttingDown)));
        // A subscriber still behind gets everything delivered before the close.
        assert_eq!(behind.next().await.unwrap().sequence, 1);
        assert_eq!(behind.next().await.unwrap().sequence, 2);
        assert!(matches!(behind.next().await, Err(Error::ShuttingDown)));
        assert_eq!(l.last_sequence(), 2);
    }
}
