//! Messages a live peer missed, retried in the background.
//!
//! A hop that timed out or failed (the peer restarting, a reset, a
//! partition) leaves the message here after Broadcast has returned its
//! receipts. The fan-out retries it for `--redelivery-window`; receivers
//! deduplicate by id, so a message that did arrive (only its ack was lost)
//! is not delivered twice. Bounded in time and in bytes, counting the
//! messages being retried right now: past either bound a message is given
//! up, counted and logged. A message is queued at most once per peer, however
//! often clients retry its id while that peer is down.

use std::{
    collections::{HashMap, HashSet, VecDeque},
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
    peers: HashMap<SocketAddr, PeerQueue>,
    /// Bytes of every message held, waiting or being retried.
    bytes: usize,
}

#[derive(Debug, Default)]
struct PeerQueue {
    waiting: VecDeque<Missed>,
    /// Ids held for this peer, waiting or being retried.
    ids: HashSet<String>,
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

    /// Queues `message` for `peer` (once: an id already held for the peer is
    /// not queued again). False when the queues are full: the message is
    /// given up at once.
    pub fn push(&self, peer: SocketAddr, message: Arc<Message>, now: Instant) -> bool {
        let size = message.encoded_len();
        let mut state = self.lock();
        if state
            .peers
            .get(&peer)
            .is_some_and(|queue| queue.ids.contains(&message.id))
        {
            return true;
        }
        if state.bytes + size > self.max_bytes {
            return false;
        }
        state.bytes += size;
        let queue = state.peers.entry(peer).or_default();
        queue.ids.insert(message.id.clone());
        queue.waiting.push_back(Missed {
            message,
            missed_at: now,
            size,
        });
        true
    }

    /// Up to `limit` of `peer`'s waiting messages still inside the window,
    /// and how many were dropped for being past it. The batch stays counted
    /// against the bounds until it is [`put_back`](Self::put_back) or
    /// [`finish`](Self::finish)ed.
    pub fn take(&self, peer: SocketAddr, now: Instant, limit: usize) -> (Vec<Missed>, usize) {
        let mut state = self.lock();
        let Some(queue) = state.peers.get_mut(&peer) else {
            return (Vec::new(), 0);
        };
        let mut expired = 0;
        let mut freed = 0;
        let mut batch = Vec::new();
        while batch.len() < limit {
            let Some(missed) = queue.waiting.pop_front() else {
                break;
            };
            if now.saturating_duration_since(missed.missed_at) > self.window {
                expired += 1;
                freed += missed.size;
                queue.ids.remove(&missed.message.id);
            } else {
                batch.push(missed);
            }
        }
        if queue.ids.is_empty() {
            state.peers.remove(&peer);
        }
        state.bytes -= freed;
        (batch, expired)
    }

    /// Returns taken messages that failed again to the front of `peer`'s queue.
    pub fn put_back(&self, peer: SocketAddr, missed: Vec<Missed>) {
        if missed.is_empty() {
            return;
        }
        let mut state = self.lock();
        let queue = state.peers.entry(peer).or_default();
        for m in missed.into_iter().rev() {
            queue.ids.insert(m.message.id.clone());
            queue.waiting.push_front(m);
        }
    }

    /// Releases taken messages that are done with (delivered, or given up).
    pub fn finish(&self, peer: SocketAddr, done: &[Missed]) {
        if done.is_empty() {
            return;
        }
        let mut state = self.lock();
        state.bytes -= done.iter().map(|m| m.size).sum::<usize>();
        if let Some(queue) = state.peers.get_mut(&peer) {
            for m in done {
                queue.ids.remove(&m.message.id);
            }
            if queue.ids.is_empty() {
                state.peers.remove(&peer);
            }
        }
    }

    /// Peers with messages waiting.
    pub fn peers(&self) -> Vec<SocketAddr> {
        let state = self.lock();
        state
            .peers
            .iter()
            .filter(|(_, queue)| !queue.waiting.is_empty())
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Messages waiting, all peers together.
    pub fn len(&self) -> usize {
        self.lock().peers.values().map(|queue| queue.waiting.len()).sum()
    }

    /// Bytes held, waiting or being retried.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
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
    fn bounded_in_bytes_until_delivered() {
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
        assert!(
            !r.push(peer, msg("c"), now),
            "a message being retried still counts"
        );
        r.finish(peer, &batch);
        assert!(r.push(peer, msg("c"), now), "a delivered one frees room");
    }

    #[test]
    fn a_message_is_held_once_per_peer() {
        let (p1, p2): (SocketAddr, SocketAddr) =
            ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let r = Redelivery::new(Duration::from_secs(30), 1 << 20);
        let now = Instant::now();
        assert!(r.push(p1, msg("a"), now));
        assert!(r.push(p1, msg("a"), now), "a client retry of the same id");
        assert!(r.push(p2, msg("a"), now), "another peer has its own queue");
        assert_eq!(r.len(), 2);
        let (batch, _) = r.take(p1, now, 10);
        assert!(r.push(p1, msg("a"), now), "nor while it is being retried");
        assert_eq!(r.len(), 1, "only p2's copy waits");
        r.put_back(p1, batch.clone());
        assert_eq!(r.len(), 2);
        let (batch, _) = r.take(p1, now, 10);
        r.finish(p1, &batch);
        assert_eq!(r.peers(), vec![p2]);
        let one = msg("a").encoded_len();
        assert_eq!(r.bytes(), one, "p1's copy is released");
    }
}
