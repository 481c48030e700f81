//! Local delivery: hands messages to this replica's own consumers.
//!
//! One [`LocalDelivery`] per replica assigns consecutive sequence numbers,
//! drops duplicates by id ([`DedupWindow`]), keeps recent deliveries for
//! resuming subscribers ([`ReplayRing`]) and pushes each delivery to live
//! subscribers over a bounded broadcast channel.
//!
//! Everything here is synchronous and takes one short `std::sync::Mutex`
//! critical section per message (no `.await` while it is held): Deliver stays
//! cheap, and sequence assignment, ring append and the live push happen in the
//! same order for everyone. A slow subscriber cannot slow Deliver, because the
//! live channel never blocks the sender: a receiver that falls more than
//! `subscriber_buffer` messages behind is told it lagged and its stream ends
//! with the sequence to resume after.

mod dedup;
mod ring;
mod topic;

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

pub use self::{dedup::DedupWindow, ring::ReplayRing, topic::TopicFilter};
use crate::{
    error::Error,
    proto::v1::{Delivery, Message},
};

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
    /// How far one subscriber may fall behind (`--subscriber-buffer`).
    pub subscriber_buffer: usize,
}

/// The result of handing one message to local consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// This replica's sequence number for the message.
    pub sequence: u64,
    /// The id was already in the dedup window; nothing was delivered again.
    pub duplicate: bool,
}

/// This replica's local consumers: sequence numbers, dedup, replay and the
/// live fan-out to Subscribe streams.
#[derive(Debug)]
pub struct LocalDelivery {
    state: Mutex<State>,
    live_tx: broadcast::Sender<Arc<Delivery>>,
    limits: LocalLimits,
}

#[derive(Debug)]
struct State {
    last_sequence: u64,
    dedup: DedupWindow,
    ring: ReplayRing,
}

impl LocalDelivery {
    pub fn new(limits: LocalLimits) -> Self {
        let (live_tx, _) = broadcast::channel(limits.subscriber_buffer.max(1));
        Self {
            state: Mutex::new(State {
                last_sequence: 0,
                dedup: DedupWindow::new(limits.dedup_capacity, limits.dedup_ttl),
                ring: ReplayRing::new(limits.replay_capacity, limits.replay_max_bytes),
            }),
            live_tx,
            limits,
        }
    }

    /// Delivers `message` unless its id was delivered before.
    pub fn deliver(&self, message: Message) -> Delivered {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(sequence) = state.dedup.get(&message.id, now) {
            return Delivered {
                sequence,
                duplicate: true,
            };
        }
        state.last_sequence += 1;
        let sequence = state.last_sequence;
        state.dedup.insert(&message.id, sequence, now);
        let delivery = Arc::new(Delivery {
            sequence,
            message: Some(message),
        });
        state.ring.push(delivery.clone());
        // Sent under the lock so live subscribers see sequence order. It only
        // fails when nobody is subscribed, which is fine: the ring has it.
        let _ = self.live_tx.send(delivery);
        Delivered {
            sequence,
            duplicate: false,
        }
    }

    /// Attaches a subscriber. With `after_sequence` > 0 it first replays what
    /// the ring holds after that sequence, then continues live, with no gap
    /// and no duplicate (the live receiver is registered under the same lock
    /// that the ring snapshot is taken under).
    pub fn subscribe(&self, filter: TopicFilter, after_sequence: u64) -> Result<Subscription, Error> {
        let state = self.lock();
        let live_rx = self.live_tx.subscribe();
        let last = state.last_sequence;
        let backlog = if after_sequence == 0 {
            Vec::new()
        } else if after_sequence > last {
            return Err(Error::ResumeAhead {
                requested: after_sequence,
                last,
            });
        } else {
            state
                .ring
                .after(after_sequence, last)
                .map_err(|evicted| Error::ReplayEvicted {
                    requested: after_sequence,
                    oldest: evicted.oldest,
                })?
        };
        Ok(Subscription {
            backlog: backlog.into(),
            live_rx,
            filter,
            last_seen: if after_sequence == 0 { last } else { after_sequence },
            buffer: self.limits.subscriber_buffer,
        })
    }

    /// The last sequence number assigned (0 before the first delivery).
    pub fn last_sequence(&self) -> u64 {
        self.lock().last_sequence
    }

    /// How many Subscribe streams are attached.
    pub fn subscriber_count(&self) -> usize {
        self.live_tx.receiver_count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated
        // in a way that matters more than stopping delivery would.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One subscriber's view: the replay backlog, then the live channel.
#[derive(Debug)]
pub struct Subscription {
    backlog: VecDeque<Arc<Delivery>>,
    live_rx: broadcast::Receiver<Arc<Delivery>>,
    filter: TopicFilter,
    /// The last sequence this subscriber has passed (sent or filtered out).
    last_seen: u64,
    buffer: usize,
}

impl Subscription {
    /// The next delivery that matches the filter. Ends with
    /// [`Error::SubscriberLagged`] when the subscriber fell too far behind,
    /// or [`Error::ShuttingDown`] when the replica stops.
    pub async fn next(&mut self) -> Result<Arc<Delivery>, Error> {
        loop {
            let delivery = match self.backlog.pop_front() {
                Some(delivery) => delivery,
                None => match self.live_rx.recv().await {
                    Ok(delivery) => delivery,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Err(Error::SubscriberLagged {
                            resume_after: self.last_seen,
                            buffer: self.buffer,
                        });
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(Error::ShuttingDown),
                },
            };
            if delivery.sequence <= self.last_seen {
                continue;
            }
            self.last_seen = delivery.sequence;
            let topic = delivery.message.as_ref().map_or("", |m| m.topic.as_str());
            if self.filter.matches(topic) {
                return Ok(delivery);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(replay: usize, buffer: usize) -> LocalDelivery {
        LocalDelivery::new(LocalLimits {
            replay_capacity: replay,
            replay_max_bytes: usize::MAX,
            dedup_capacity: 1000,
            dedup_ttl: Duration::from_secs(60),
            subscriber_buffer: buffer,
        })
    }

    fn msg(id: &str, topic: &str) -> Message {
        Message {
            id: id.into(),
            topic: topic.into(),
            ..Message::default()
        }
    }

    #[test]
    fn sequences_are_consecutive_and_duplicates_keep_theirs() {
        let l = local(10, 10);
        assert_eq!(
            l.deliver(msg("a", "t")),
            Delivered {
                sequence: 1,
                duplicate: false
            }
        );
        assert_eq!(
            l.deliver(msg("b", "t")),
            Delivered {
                sequence: 2,
                duplicate: false
            }
        );
        assert_eq!(
            l.deliver(msg("a", "t")),
            Delivered {
                sequence: 1,
                duplicate: true
            }
        );
        assert_eq!(l.last_sequence(), 2);
    }

    #[tokio::test]
    async fn resume_replays_then_goes_live_without_gap_or_duplicate() {
        let l = local(10, 10);
        for i in 1..=3 {
            l.deliver(msg(&format!("m{i}"), "t"));
        }
        let mut sub = l.subscribe(TopicFilter::default(), 1).unwrap();
        l.deliver(msg("m4", "t"));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(sub.next().await.unwrap().sequence);
        }
        assert_eq!(got, vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn filter_skips_other_topics() {
        let l = local(10, 10);
        let mut sub = l.subscribe(TopicFilter::new(&["cache.*".into()]), 0).unwrap();
        l.deliver(msg("1", "orders"));
        l.deliver(msg("2", "cache.flush"));
        let d = sub.next().await.unwrap();
        assert_eq!(d.sequence, 2);
    }

    #[test]
    fn resume_errors() {
        let l = local(2, 10);
        for i in 1..=5 {
            l.deliver(msg(&format!("m{i}"), "t"));
        }
        assert!(matches!(
            l.subscribe(TopicFilter::default(), 1),
            Err(Error::ReplayEvicted {
                requested: 1,
                oldest: 4
            })
        ));
        assert!(matches!(
            l.subscribe(TopicFilter::default(), 9),
            Err(Error::ResumeAhead {
                requested: 9,
                last: 5
            })
        ));
    }

    #[tokio::test]
    async fn slow_subscriber_lags_without_blocking_delivery() {
        let l = local(100, 4);
        let mut sub = l.subscribe(TopicFilter::default(), 0).unwrap();
        for i in 1..=10 {
            l.deliver(msg(&format!("m{i}"), "t"));
        }
        match sub.next().await {
            Err(Error::SubscriberLagged {
                resume_after: 0,
                buffer: 4,
            }) => {}
            other => panic!("expected SubscriberLagged resume_after=0, got {other:?}"),
        }
    }
}
