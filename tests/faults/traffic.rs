//! The clients: broadcasters that send continuously (as an app behind a
//! Service would: any ready replica, the next one on failure, the same id on
//! every retry) and one subscriber per replica that records what it reads,
//! resuming after every disconnect the way a careful consumer does.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use replicast::{
    error::broadcast_response_from_status,
    proto::v1::{
        AckPolicy, BroadcastRequest, BroadcastResponse, SubscribeRequest, replicast_client::ReplicastClient,
    },
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

use crate::ledger::{Accepted, BroadcastRecord, FailedAttempt, Ledger, Receipt};

/// A client gives one replica this long before trying the next: more than
/// the replicas' --broadcast-timeout (2 s), so only a replica that cannot
/// answer at all (frozen, cut off) runs into it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);
const MAX_ATTEMPTS: u32 = 5;
pub const TOPIC: &str = "faults";

/// Maps a receipt's `host:port` to the replica's slot.
pub type SlotOf = Arc<dyn Fn(&str) -> Option<usize> + Send + Sync>;

/// The replicas a client may call (like a Service's ready endpoints) and
/// one lazily connected channel per replica.
#[derive(Clone, Default)]
pub struct Endpoints {
    channels: Arc<Mutex<Vec<Channel>>>,
    routable: Arc<Mutex<Vec<usize>>>,
    next: Arc<AtomicUsize>,
}

impl Endpoints {
    /// Adds the replica at `addr` (not routable yet); returns its slot.
    pub fn add(&self, addr: SocketAddr) -> usize {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("valid uri")
            .connect_timeout(Duration::from_secs(1))
            // A peer that vanished (frozen, cut off) is noticed within
            // seconds rather than at the next write.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect_lazy();
        let mut channels = lock(&self.channels);
        channels.push(channel);
        channels.len() - 1
    }

    pub fn client(&self, slot: usize) -> ReplicastClient<Channel> {
        ReplicastClient::new(lock(&self.channels)[slot].clone())
    }

    pub fn set_routable(&self, slots: impl IntoIterator<Item = usize>) {
        *lock(&self.routable) = slots.into_iter().collect();
    }

    fn pick(&self) -> usize {
        let routable = lock(&self.routable);
        assert!(!routable.is_empty(), "no replica is routable");
        routable[self.next.fetch_add(1, Ordering::Relaxed) % routable.len()]
    }
}

/// The running clients.
pub struct Traffic {
    pub ledger: Arc<Mutex<Ledger>>,
    stop_sending: CancellationToken,
    stop_reading: CancellationToken,
    senders: JoinSet<()>,
    /// How many `send` calls were made (ids stay unique across them).
    batches: usize,
    readers: JoinSet<()>,
}

impl Traffic {
    pub fn new() -> Self {
        Self {
            ledger: Arc::new(Mutex::new(Ledger::default())),
            stop_sending: CancellationToken::new(),
            stop_reading: CancellationToken::new(),
            senders: JoinSet::new(),
            batches: 0,
            readers: JoinSet::new(),
        }
    }

    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// A subscriber on `slot` that records everything it reads.
    pub fn subscribe(&mut self, endpoints: &Endpoints, slot: usize) {
        let client = endpoints.client(slot);
        let ledger = self.ledger.clone();
        let stop = self.stop_reading.clone();
        self.readers.spawn(async move {
            tokio::select! {
                () = read_forever(client, slot, ledger) => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Sends `per_second` Broadcasts (ack ALL), open loop: each one on its
    /// own task, so a Broadcast stuck on a frozen replica never holds up the
    /// next (many independent clients, as behind a Service).
    pub fn send(&mut self, endpoints: &Endpoints, slot_of: SlotOf, per_second: u32) {
        let endpoints = endpoints.clone();
        let ledger = self.ledger.clone();
        let stop = self.stop_sending.clone();
        let batch = self.batches;
        self.batches += 1;
        self.senders.spawn(async move {
            let mut in_flight = JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0.. {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let (endpoints, ledger, slot_of) = (endpoints.clone(), ledger.clone(), slot_of.clone());
                in_flight.spawn(async move {
                    let record = broadcast_with_retries(&endpoints, &slot_of, format!("b{batch}-{n}")).await;
                    lock(&ledger).broadcasts.push(record);
                });
                // Reap what finished, so the set stays small.
                while let Some(done) = in_flight.try_join_next() {
                    propagate_panic(done);
                }
            }
            while let Some(done) = in_flight.join_next().await {
                propagate_panic(done);
            }
        });
    }

    /// Stops sending; waits for the Broadcasts in flight.
    pub async fn stop_sending(&mut self) {
        self.stop_sending.cancel();
        while let Some(result) = self.senders.join_next().await {
            result.expect("a sender panicked");
        }
    }

    pub async fn stop_reading(&mut self) {
        self.stop_reading.cancel();
        while let Some(result) = self.readers.join_next().await {
            result.expect("a subscriber panicked");
        }
    }
}

/// A Broadcast task that panicked would leave its message unaccounted for.
fn propagate_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done
        && error.is_panic()
    {
        std::panic::resume_unwind(error.into_panic());
    }
}

async fn broadcast_with_retries(endpoints: &Endpoints, slot_of: &SlotOf, id: String) -> BroadcastRecord {
    let started = Instant::now();
    let mut failed_attempts = Vec::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let slot = endpoints.pick();
        let request = BroadcastRequest {
            topic: TOPIC.into(),
            payload: id.clone().into_bytes().into(),
            id: id.clone(),
            ack: AckPolicy::All as i32,
            ..Default::default()
        };
        let call_started = Instant::now();
        let mut client = endpoints.client(slot);
        let (code, response) = match tokio::time::timeout(ATTEMPT_TIMEOUT, client.broadcast(request)).await {
            Ok(Ok(response)) => (Code::Ok, response.into_inner()),
            // The ack policy was not met: accepted, and the receipts say why.
            Ok(Err(status)) => match broadcast_response_from_status(&status) {
                Some(response) => (status.code(), response),
                None => {
                    failed_attempts.push(FailedAttempt {
                        entry: slot,
                        started: call_started,
                        ended: Instant::now(),
                        error: format!("{:?}: {}", status.code(), status.message()),
                    });
                    retry_pause(attempt).await;
                    continue;
                }
            },
            Err(_) => {
                failed_attempts.push(FailedAttempt {
                    entry: slot,
                    started: call_started,
                    ended: Instant::now(),
                    error: format!("no answer within {ATTEMPT_TIMEOUT:?}"),
                });
                continue;
            }
        };
        return BroadcastRecord {
            id,
            started,
            finished: Instant::now(),
            failed_attempts,
            accepted: Some(Accepted {
                entry: slot,
                started: call_started,
                code,
                latency: call_started.elapsed(),
                receipts: receipts(&response, slot_of),
            }),
        };
    }
    BroadcastRecord {
        id,
        started,
        finished: Instant::now(),
        failed_attempts,
        accepted: None,
    }
}

/// A short, growing pause before the next replica, so a burst of refusals
/// (a replica draining) does not spin.
async fn retry_pause(attempt: u32) {
    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
}

fn receipts(response: &BroadcastResponse, slot_of: &SlotOf) -> Vec<Receipt> {
    response
        .outcomes
        .iter()
        .map(|outcome| Receipt {
            slot: slot_of(&outcome.peer)
                .unwrap_or_else(|| panic!("receipt for unknown peer {}", outcome.peer)),
            code: outcome.code,
            sequence: outcome.sequence,
        })
        .collect()
}

/// Reads `slot`'s deliveries forever: resumes after the last one it read
/// on every disconnect, and starts from the oldest retained delivery when
/// the replica turns out to be a new incarnation (it restarted).
async fn read_forever(mut client: ReplicastClient<Channel>, slot: usize, ledger: Arc<Mutex<Ledger>>) {
    // (incarnation, last sequence read)
    let mut position: Option<(u64, u64)> = None;
    loop {
        let request = match position {
            Some((incarnation, after_sequence)) => SubscribeRequest {
                after_sequence,
                incarnation,
                ..Default::default()
            },
            None => SubscribeRequest {
                from_oldest: true,
                ..Default::default()
            },
        };
        let mut stream = match client.subscribe(request).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::FailedPrecondition => {
                // Restarted: its sequence numbers start over.
                position = None;
                continue;
            }
            Err(status) => {
                if !reconnectable(status.code()) {
                    lock(&ledger)
                        .subscriber_errors
                        .push(format!("replica {slot}: Subscribe failed: {status:?}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(delivery)) => {
                    let id = delivery.message.map(|m| m.id).unwrap_or_default();
                    lock(&ledger).record_delivery(slot, delivery.incarnation, delivery.sequence, id);
                    position = Some((delivery.incarnation, delivery.sequence));
                }
                Ok(None) => break,
                Err(status) => {
                    if !reconnectable(status.code()) {
                        lock(&ledger)
                            .subscriber_errors
                            .push(format!("replica {slot}: stream ended: {status:?}"));
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Statuses a subscriber reconnects after without losing anything:
/// the replica went away or is shutting down.
fn reconnectable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
