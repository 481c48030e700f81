//! The replay ring: the most recent deliveries, for subscribers that resume.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::AppReceipt;
use crate::wire::EncodedMessage;

/// One delivery as the ring holds it: the sequence this replica gave the
/// message, and the message's shared encoding (no copy per subscriber).
#[derive(Debug, Clone)]
pub struct StoredDelivery {
    pub sequence: u64,
    pub message: EncodedMessage,
    /// W3C trace context (`traceparent`, `tracestate`) of the span that
    /// delivered it, when its Broadcast is traced: a webhook POST carries
    /// it, so the app's own handler span joins the trace.
    pub trace_context: Option<Arc<HashMap<String, String>>>,
    /// With `--webhook-ack`, when a webhook must acknowledge it: what the
    /// app answered (the ring reports its eviction here).
    pub app_receipt: Option<Arc<AppReceipt>>,
}

/// Keeps the most recent deliveries in sequence order: at most `capacity`
/// of them and at most `max_bytes` of encoded messages, whichever binds
/// first (10,000 one-MiB messages would otherwise be 10 GiB), but always the
/// newest one. Live subscribers read from here too, so this is the only copy
/// of recent messages a replica holds, however many subscribers it has.
#[derive(Debug)]
pub struct ReplayRing {
    entries: VecDeque<(StoredDelivery, usize)>,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
}

/// A resume point older than anything the ring still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// The oldest sequence still available.
    pub oldest: u64,
}

impl ReplayRing {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            max_bytes,
            bytes: 0,
        }
    }

    /// Appends the next delivery, `size` bytes encoded; its sequence must
    /// follow the previous one. `evicted` sees each delivery pushed out.
    pub fn push(&mut self, delivery: StoredDelivery, size: usize, mut evicted: impl FnMut(&StoredDelivery)) {
        debug_assert!(
            self.entries
                .back()
                .is_none_or(|(last, _)| last.sequence + 1 == delivery.sequence),
            "sequences must be consecutive"
        );
        self.entries.push_back((delivery, size));
        self.bytes += size;
        while self.entries.len() > 1 && (self.entries.len() > self.capacity || self.bytes > self.max_bytes) {
            let Some((gone, gone_size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= gone_size;
            evicted(&gone);
        }
    }

    /// Up to `limit` retained deliveries with a sequence greater than
    /// `after`, given that the last assigned sequence is `last`. Fails when
    /// the one the caller needs next (`after + 1`) was already evicted.
    pub fn after(&self, after: u64, last: u64, limit: usize) -> Result<Vec<StoredDelivery>, Evicted> {
        if after >= last {
            return Ok(Vec::new());
        }
        let oldest = match self.entries.front() {
            Some((front, _)) => front.sequence,
            None => return Err(Evicted { oldest: last + 1 }),
        };
        if after + 1 < oldest {
            return Err(Evicted { oldest });
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Ok(self
            .entries
            .iter()
            .skip(skip)
            .take(limit)
            .map(|(d, _)| d.clone())
            .collect())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The oldest retained sequence, if any.
    pub fn oldest(&self) -> Option<u64> {
        self.entries.front().map(|(d, _)| d.sequence)
    }

    /// Encoded size of the retained deliveries.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(capacity: usize, count: u64) -> ReplayRing {
        let mut ring = ReplayRing::new(capacity, usize::MAX);
        for sequence in 1..=count {
            ring.push(delivery(sequence), 10, |_| {});
        }
        ring
    }

    fn delivery(sequence: u64) -> StoredDelivery {
        StoredDelivery {
            trace_context: None,
            app_receipt: None,
            sequence,
            message: EncodedMessage::encode(crate::proto::v1::Message::default()),
        }
    }

    fn seqs(d: Vec<StoredDelivery>) -> Vec<u64> {
        d.iter().map(|d| d.sequence).collect()
    }

    #[test]
    fn replays_what_was_missed() {
        let ring = ring_with(10, 5);
        assert_eq!(seqs(ring.after(2, 5, 100).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(ring.after(2, 5, 2).unwrap()), vec![3, 4], "at most `limit`");
        assert_eq!(seqs(ring.after(5, 5, 100).unwrap()), Vec::<u64>::new());
        assert_eq!(seqs(ring.after(9, 5, 100).unwrap()), Vec::<u64>::new());
    }

    #[test]
    fn evicted_range_names_oldest() {
        let ring = ring_with(3, 10);
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.after(6, 10, 100).err(), Some(Evicted { oldest: 8 }));
        assert_eq!(seqs(ring.after(7, 10, 100).unwrap()), vec![8, 9, 10]);
    }

    #[test]
    fn bounded_by_bytes_but_keeps_the_newest() {
        let mut ring = ReplayRing::new(100, 250);
        for sequence in 1..=5 {
            ring.push(delivery(sequence), 100, |_| {});
        }
        assert_eq!(ring.len(), 2, "two 100-byte deliveries fit in 250 bytes");
        assert_eq!(ring.bytes(), 200);
        assert_eq!(ring.after(2, 5, 100).err(), Some(Evicted { oldest: 4 }));
        let mut gone = Vec::new();
        ring.push(delivery(6), 1000, |d| gone.push(d.sequence));
        assert_eq!(gone, vec![4, 5], "each eviction is reported");
        assert_eq!(
            seqs(ring.after(5, 6, 100).unwrap()),
            vec![6],
            "the newest stays even when oversized"
        );
    }
}
