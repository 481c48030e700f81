//! Messages a live peer missed, retried in the background.
//!
//! A hop that timed out or failed (the peer restarting, a reset, a
//! partition) leaves the message here after Broadcast has returned its
//! receipts. The fan-out retries it for `--redelivery-window`; receivers
//! deduplicate by id, so a message that did arrive (only its ack was lost)
//! is not delivered twice. Bounded in time and in bytes: past either bound a
//! message is given up, counted and logged.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use prost::Message as _;

use crate::proto::v1::Message;

/// A message one peer has not acknowledged.
#[derive(Debug, Clone)]
pub struct Missed {
    pub message: Arc<Message>,
    pub missed_at: Instant,
    size: usize,
}

/// The per-peer queues of missed messages.
#[derive(Debug)]
pub struct Redelivery {
    window: Duration,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<SocketAddr, VecDeque<Missed>>,
    bytes: usize,
}

impl Redelivery {
    /// `window` zero disables redelivery.
    pub fn new(window: Duration, max_bytes: usize) -> Self {
        Self {
            window,
            max_bytes,
            state: Mutex::new(State::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// Queues `message` for `peer`. False when the queues are full: the
    /// message is given up at once.
    pub fn push(&self, peer: SocketAddr, message: Arc<Message>, now: Instant) -> bool {
        let size = message.encoded_len();
        let mut state = self.lock();
        if state.bytes + size > self.max_bytes {
            return false;
        }
        state.bytes += size;
        state.queues.entry(peer).or_default().push_back(Missed {
            message,
            missed_at: now,
            size,
        });
        true
    }

    /// Up to `limit` of `peer`'s messages still inside the window, and how
    /// many were dropped for being past it.
    pub fn take(&self, peer: SocketAddr, now: Instant, limit: usize) -> (Vec<Missed>, usize) {
        let mut state = self.lock();
        let Some(queue) = state.queues.get_mut(&peer) else {
            return (Vec::new(), 0);
        };
        let mut expired = 0;
        let mut freed = 0;
        let mut batch = Vec::new();
        while batch.len() < limit {
            let Some(missed) = queue.pop_front() else { break };
            freed += missed.size;
            if now.saturating_duration_since(missed.missed_at) > self.window {
                expired += 1;
            } else {
                batch.push(missed);
            }
        }
        if queue.is_empty() {
            state.queues.remove(&peer);
        }
        state.bytes -= freed;
        (batch, expired)
    }

    /// Returns messages that failed again to the front of `peer`'s queue.
    pub fn put_back(&self, peer: SocketAddr, missed: Vec<Missed>) {
        if missed.is_empty() {
            return;
        }
        let mut state = self.lock();
        state.bytes += missed.iter().map(|m| m.size).sum::<usize>();
        let queue = state.queues.entry(peer).or_default();
        for m in missed.into_iter().rev() {
            queue.push_front(m);
        }
    }

    /// Peers with messages waiting.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.lock().queues.keys().copied().collect()
    }

    /// Messages waiting, all peers together.
    pub fn len(&self) -> usize {
        self.lock().queues.values().map(VecDeque::len).sum()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Held for queue operations only, never across an await.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str) -> Arc<Message> {
        Arc::new(Message {
            id: id.into(),
            payload: vec![0; 100].into(),
            ..Default::default()
        })
    }

    #[test]
    fn takes_in_order_and_expires_past_the_window() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t0 = Instant::now();
        let r = Redelivery::new(Duration::from_secs(30), 1 << 20);
        assert!(r.push(peer, msg("a"), t0));
        assert!(r.push(peer, msg("b"), t0 + Duration::from_secs(20)));
        let (batch, expired) = r.take(peer, t0 + Duration::from_secs(31), 10);
        assert_eq!(expired, 1, "'a' is past the 30 s window");
        assert_eq!(
            batch.iter().map(|m| m.message.id.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        r.put_back(peer, batch);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn bounded_in_bytes() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let r = Redelivery::new(Duration::from_secs(30), 250);
        let now = Instant::now();
        assert!(r.push(peer, msg("a"), now));
        assert!(r.push(peer, msg("b"), now));
        assert!(
            !r.push(peer, msg("c"), now),
            "a third ~105-byte message does not fit in 250 bytes"
        );
        let (batch, _) = r.take(peer, now, 1);
        assert_eq!(batch.len(), 1);
        assert!(r.push(peer, msg("c"), now), "taking frees room");
    }
}
