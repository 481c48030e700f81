//! The messages one peer missed, waiting for redelivery.
//!
//! A hop that timed out or failed (the peer restarting, a reset, a
//! partition) leaves its message in the peer's [`Backlog`] after Broadcast
//! has returned its receipts; the peer's link retries it for
//! `--redelivery-window`. Receivers deduplicate by id, so a message that did
//! arrive (only its ack was lost) is not delivered twice. Each backlog
//! belongs to its link; what they hold together is bounded by one
//! [`BacklogBudget`] in bytes, counting the messages being retried right now:
//! past either bound a message is given up, counted and logged. A message is
//! held at most once per peer, however often clients retry its id while that
//! peer is down. Pure state: the link gives it the time.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::wire::EncodedMessage;

/// Bytes and messages held by every backlog of a replica together.
#[derive(Debug)]
pub struct BacklogBudget {
    max_bytes: usize,
    bytes: AtomicUsize,
    messages: AtomicUsize,
}

impl BacklogBudget {
    /// At most `max_bytes` of messages, waiting or being retried.
    pub fn new(max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            bytes: AtomicUsize::new(0),
            messages: AtomicUsize::new(0),
        })
    }

    /// Messages held, all peers together.
    pub fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    /// Bytes held, all peers together.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn reserve(&self, size: usize) -> bool {
        let mut current = self.bytes.load(Ordering::Relaxed);
        loop {
            if current + size > self.max_bytes {
                return false;
            }
            match self.bytes.compare_exchange_weak(
                current,
                current + size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.messages.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn release(&self, size: usize) {
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        self.messages.fetch_sub(1, Ordering::Relaxed);
    }

    fn release_many(&self, messages: usize, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.messages.fetch_sub(messages, Ordering::Relaxed);
    }
}

/// A message the peer has not acknowledged.
#[derive(Debug)]
pub struct Missed {
    pub message: EncodedMessage,
    /// When it was first missed: the window counts from here.
    pub missed_at: Instant,
}

/// What became of a message offered to the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Queued for redelivery.
    Queued,
    /// Already held for this peer (a client retried the id): nothing to do.
    AlreadyThere,
    /// The budget is spent: given up at once.
    Full,
    /// Redelivery is off (`--redelivery-window 0`).
    Off,
}

/// One peer's missed messages, oldest first.
#[derive(Debug)]
pub struct Backlog {
    window: Duration,
    budget: Arc<BacklogBudget>,
    waiting: VecDeque<Missed>,
    /// Ids held, waiting or being retried.
    ids: HashSet<String>,
    /// Messages taken and not yet put back or finished, and their bytes:
    /// released from the budget with the backlog even if their retry never
    /// reports back (the link stopped or was aborted).
    taken: usize,
    taken_bytes: usize,
}

impl Backlog {
    /// `window` zero turns redelivery off.
    pub fn new(window: Duration, budget: Arc<BacklogBudget>) -> Self {
        Self {
            window,
            budget,
            waiting: VecDeque::new(),
            ids: HashSet::new(),
            taken: 0,
            taken_bytes: 0,
        }
    }

    /// Holds `message`, missed at `now`.
    pub fn push(&mut self, message: EncodedMessage, now: Instant) -> Offered {
        if self.window.is_zero() {
            return Offered::Off;
        }
        if self.ids.contains(message.id()) {
            return Offered::AlreadyThere;
        }
        if !self.budget.reserve(message.encoded_len()) {
            return Offered::Full;
        }
        self.ids.insert(message.id().to_owned());
        self.waiting.push_back(Missed {
            message,
            missed_at: now,
        });
        Offered::Queued
    }

    /// Drops what is past the window at `now`; returns how many. Looks at
    /// every waiting message: retries put back out of order, so the oldest
    /// is not always at the front.
    pub fn expire(&mut self, now: Instant) -> usize {
        let window = self.window;
        let mut gone = Vec::new();
        self.waiting.retain(|missed| {
            let keep = now.saturating_duration_since(missed.missed_at) <= window;
            if !keep {
                gone.push((missed.message.id().to_owned(), missed.message.encoded_len()));
            }
            keep
        });
        for (id, size) in &gone {
            if self.ids.remove(id) {
                self.budget.release(*size);
            }
        }
        gone.len()
    }

    /// Up to `limit` waiting messages, to retry. They stay counted against
    /// the budget (and their ids stay held) until [`put_back`](Self::put_back)
    /// or [`finish`](Self::finish).
    pub fn take(&mut self, limit: usize) -> Vec<Missed> {
        let n = limit.min(self.waiting.len());
        let batch: Vec<Missed> = self.waiting.drain(..n).collect();
        self.taken += batch.len();
        self.taken_bytes += batch.iter().map(|m| m.message.encoded_len()).sum::<usize>();
        batch
    }

    /// Returns a taken message whose retry failed, at the front.
    pub fn put_back(&mut self, missed: Missed) {
        self.untake(&missed);
        self.waiting.push_front(missed);
    }

    /// Releases a taken message that is done with (delivered, or given up).
    pub fn finish(&mut self, missed: &Missed) {
        self.untake(missed);
        self.release(missed);
    }

    /// Gives up everything waiting (shutdown); returns how many.
    pub fn clear(&mut self) -> usize {
        let all: Vec<Missed> = self.waiting.drain(..).collect();
        for missed in &all {
            self.release(missed);
        }
        all.len()
    }

    fn untake(&mut self, missed: &Missed) {
        self.taken = self.taken.saturating_sub(1);
        self.taken_bytes = self.taken_bytes.saturating_sub(missed.message.encoded_len());
    }

    /// Messages waiting (not being retried).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing is held, waiting or being retried.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn release(&mut self, missed: &Missed) {
        if self.ids.remove(missed.message.id()) {
            self.budget.release(missed.message.encoded_len());
        }
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        // Whatever a finished link still held no longer counts, including
        // messages taken for a retry that never reported back.
        self.clear();
        self.budget.release_many(self.taken, self.taken_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::Message;

    fn msg(id: &str) -> EncodedMessage {
        EncodedMessage::encode(Message {
            id: id.into(),
            payload: vec![0; 100].into(),
            ..Default::default()
        })
    }

    fn ids(batch: &[Missed]) -> Vec<&str> {
        batch.iter().map(|m| m.message.id()).collect()
    }

    #[test]
    fn takes_in_order_and_expires_past_the_window() {
        let t0 = Instant::now();
        let mut b = Backlog::new(Duration::from_secs(30), BacklogBudget::new(1 << 20));
        assert_eq!(b.push(msg("a"), t0), Offered::Queued);
        assert_eq!(b.push(msg("b"), t0 + Duration::from_secs(20)), Offered::Queued);
        assert_eq!(
            b.expire(t0 + Duration::from_secs(31)),
            1,
            "'a' is past the 30 s window"
        );
        let batch = b.take(10);
        assert_eq!(ids(&batch), vec!["b"]);
        for missed in batch {
            b.put_back(missed);
        }
        assert_eq!(b.waiting(), 1);
    }

    #[test]
    fn bounded_in_bytes_across_peers_until_delivered() {
        let budget = BacklogBudget::new(250);
        let mut p1 = Backlog::new(Duration::from_secs(30), budget.clone());
        let mut p2 = Backlog::new(Duration::from_secs(30), budget.clone());
        let now = Instant::now();
        assert_eq!(p1.push(msg("a"), now), Offered::Queued);
        assert_eq!(p2.push(msg("b"), now), Offered::Queued);
        assert_eq!(
            p1.push(msg("c"), now),
            Offered::Full,
            "a third ~105-byte message does not fit in 250 bytes, whichever peer holds it"
        );
        let batch = p1.take(1);
        assert_eq!(
            p2.push(msg("c"), now),
            Offered::Full,
            "a message being retried still counts"
        );
        p1.finish(&batch[0]);
        assert_eq!(
            p2.push(msg("c"), now),
            Offered::Queued,
            "a delivered one frees room"
        );
        assert_eq!(budget.messages(), 2);
        drop(p2);
        assert_eq!(budget.messages(), 0, "a backlog that is gone holds nothing");
        assert_eq!(budget.bytes(), 0);
    }

    #[test]
    fn a_message_is_held_once_per_peer() {
        let budget = BacklogBudget::new(1 << 20);
        let mut b = Backlog::new(Duration::from_secs(30), budget.clone());
        let now = Instant::now();
        assert_eq!(b.push(msg("a"), now), Offered::Queued);
        assert_eq!(
            b.push(msg("a"), now),
            Offered::AlreadyThere,
            "a client retry of the same id"
        );
        let batch = b.take(10);
        assert_eq!(
            b.push(msg("a"), now),
            Offered::AlreadyThere,
            "nor while it is being retried"
        );
        b.finish(&batch[0]);
        assert!(b.is_empty());
        assert_eq!(budget.bytes(), 0);
        assert_eq!(
            b.push(msg("a"), now),
            Offered::Queued,
            "missed again later: held again"
        );
    }

    #[test]
    fn expiry_finds_old_messages_behind_newer_ones() {
        let t0 = Instant::now();
        let mut b = Backlog::new(Duration::from_secs(30), BacklogBudget::new(1 << 20));
        b.push(msg("old"), t0);
        b.push(msg("new"), t0 + Duration::from_secs(20));
        let batch = b.take(2);
        // Retries report back in any order: "new" ends up in front of "old".
        let mut batch = batch.into_iter();
        let (old, new) = (batch.next().unwrap(), batch.next().unwrap());
        b.put_back(old);
        b.put_back(new);
        assert_eq!(b.expire(t0 + Duration::from_secs(31)), 1);
        assert_eq!(ids(&b.take(10)), vec!["new"]);
    }

    #[test]
    fn a_dropped_backlog_releases_what_was_taken_too() {
        let budget = BacklogBudget::new(1 << 20);
        let mut b = Backlog::new(Duration::from_secs(30), budget.clone());
        let now = Instant::now();
        b.push(msg("a"), now);
        b.push(msg("b"), now);
        let _in_flight = b.take(1);
        drop(b);
        assert_eq!(
            (budget.messages(), budget.bytes()),
            (0, 0),
            "nothing stays reserved"
        );
    }

    #[test]
    fn a_zero_window_holds_nothing() {
        let mut b = Backlog::new(Duration::ZERO, BacklogBudget::new(1 << 20));
        assert_eq!(b.push(msg("a"), Instant::now()), Offered::Off);
        assert!(b.is_empty());
    }
}
