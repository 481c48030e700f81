//! The window of recently delivered message ids that makes Deliver idempotent.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

/// What the window keeps of a delivered id.
#[derive(Debug, Clone)]
pub struct Remembered {
    /// The sequence number it was delivered under.
    pub sequence: u64,
    /// With `--webhook-ack`: the app's receipt, so a retry of the id gets
    /// the app's answer rather than a bare "duplicate".
    pub app_receipt: Option<Arc<super::AppReceipt>>,
}

/// Remembers which ids were delivered, and under which sequence number, for
/// at most `capacity` ids and at most `ttl` each. Bounded in both so a flood
/// of unique ids cannot grow memory, and a retry arriving within the window
/// (the fan-out's own retries, a client retrying Broadcast with the same id)
/// is recognised.
#[derive(Debug)]
pub struct DedupWindow {
    /// Ids come from clients, so the hash is seeded per process (foldhash's
    /// quality variant); it is several times cheaper than SipHash on ids
    /// this short, and this map is read and written for every message.
    seen: HashMap<Arc<str>, Remembered, foldhash::quality::RandomState>,
    /// Insertion order, oldest first, for eviction by count and age.
    order: VecDeque<(Arc<str>, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl DedupWindow {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            seen: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// How `id` was delivered, if it is in the window.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<&Remembered> {
        self.evict(now);
        self.seen.get(id)
    }

    /// Records a new delivery. The caller checked [`Self::get`] first.
    pub fn insert(&mut self, id: &str, remembered: Remembered, now: Instant) {
        let id: Arc<str> = Arc::from(id);
        self.seen.insert(id.clone(), remembered);
        self.order.push_back((id, now));
        self.evict(now);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn evict(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            let expired = now.saturating_duration_since(*at) > self.ttl;
            if !expired && self.order.len() <= self.capacity {
                break;
            }
            self.seen.remove(id);
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(sequence: u64) -> Remembered {
        Remembered {
            sequence,
            app_receipt: None,
        }
    }

    fn sequence(w: &mut DedupWindow, id: &str, now: Instant) -> Option<u64> {
        w.get(id, now).map(|r| r.sequence)
    }

    #[test]
    fn remembers_within_window() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(10, Duration::from_secs(60));
        assert_eq!(sequence(&mut w, "a", t0), None);
        w.insert("a", at(1), t0);
        assert_eq!(sequence(&mut w, "a", t0 + Duration::from_secs(59)), Some(1));
    }

    #[test]
    fn bounded_by_count() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(3, Duration::from_secs(60));
        for (seq, id) in ["a", "b", "c", "d"].iter().enumerate() {
            w.insert(id, at(seq as u64 + 1), t0);
        }
        assert_eq!(w.len(), 3);
        assert_eq!(sequence(&mut w, "a", t0), None, "oldest id evicted past capacity");
        assert_eq!(sequence(&mut w, "d", t0), Some(4));
    }

    #[test]
    fn bounded_by_age() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(100, Duration::from_secs(10));
        w.insert("a", at(1), t0);
        w.insert("b", at(2), t0 + Duration::from_secs(5));
        let later = t0 + Duration::from_secs(11);
        assert_eq!(sequence(&mut w, "a", later), None, "'a' is older than the ttl");
        assert_eq!(sequence(&mut w, "b", later), Some(2));
    }
}
