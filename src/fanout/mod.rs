//! Fan-out: deliver one message to every replica and collect receipts.
//!
//! The receiving replica delivers to itself in-process (never over the
//! network, so a cluster that includes itself cannot deadlock on itself) and
//! to every other peer over that peer's [`PeerLink`]. Each remote hop runs as
//! its own task with its own deadline, so one slow, hung or dead peer delays
//! nobody else. Broadcast returns as soon as the ack policy is met, or, once
//! it cannot be, when every hop has answered or timed out (so every receipt
//! is final); hops still in flight after a met policy finish in the
//! background, owned by the fan-out's task tracker, which shutdown drains.

pub mod budget;
mod health;
mod link;
pub mod policy;
mod redelivery;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, warn};

use self::policy::{Tally, Verdict};
use self::redelivery::Redelivery;
pub use self::{
    budget::Budget,
    link::{LinkConfig, PeerLink},
};
use crate::{
    error::{Error, HopError, code_name},
    local::LocalDelivery,
    metrics::{Metrics, RedeliveryLabels},
    proto::v1::{AckPolicy, BroadcastResponse, DeliverResponse, Message, PeerOutcome},
    telemetry::{
        propagation,
        spans::{self, Side},
    },
};

/// Delivers messages to the whole peer set.
#[derive(Debug)]
pub struct FanOut {
    self_addr: SocketAddr,
    local: Arc<LocalDelivery>,
    links: Mutex<HashMap<SocketAddr, Arc<PeerLink>>>,
    link_config: LinkConfig,
    /// Owns every hop task; shutdown waits on it.
    hops: TaskTracker,
    /// One permit per Broadcast whose hops are not all finished.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    metrics: Metrics,
    /// Messages live peers missed, retried in the background.
    redelivery: Arc<Redelivery>,
    /// Cap on each hop, also for redeliveries.
    peer_timeout: Duration,
}

/// Redelivery settings, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RedeliveryConfig {
    /// How long a missed message is retried (`--redelivery-window`; zero: off).
    pub window: Duration,
    /// Bytes of missed messages kept at most (`--redelivery-max-bytes`).
    pub max_bytes: usize,
}

/// How often the background redelivery looks at its queues.
const REDELIVERY_TICK: Duration = Duration::from_millis(250);
/// Missed messages retried per peer per tick.
const REDELIVERY_BATCH: usize = 256;

/// What became of one replica's delivery.
#[derive(Debug)]
struct Receipt {
    local: bool,
    /// `None` while still in flight.
    result: Option<Result<DeliverResponse, HopError>>,
    latency: Duration,
}

impl FanOut {
    pub fn new(
        self_addr: SocketAddr,
        local: Arc<LocalDelivery>,
        link_config: LinkConfig,
        max_in_flight: usize,
        redelivery: RedeliveryConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            metrics,
            redelivery: Arc::new(Redelivery::new(redelivery.window, redelivery.max_bytes)),
            peer_timeout: link_config.connect_timeout,
            self_addr,
            local,
            links: Mutex::new(HashMap::new()),
            link_config,
            hops: TaskTracker::new(),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    /// Delivers `message` to this replica and every address in `peers`, and
    /// waits for `policy` within `budget`.
    pub async fn broadcast(
        &self,
        message: Message,
        peers: &[SocketAddr],
        policy: AckPolicy,
        budget: Budget,
    ) -> Result<BroadcastResponse, Error> {
        // Held until the last hop of this Broadcast ends, background ones
        // included: the bound on fan-out work (and the messages it holds).
        let permit = Arc::new(
            self.in_flight
                .clone()
                .try_acquire_owned()
                .map_err(|_| Error::Overloaded {
                    limit: self.max_in_flight,
                })?,
        );
        let started = Instant::now();
        let hop_deadline = budget.hop_deadline(started);
        let traced = spans::current_is_sampled();
        let remotes: Vec<SocketAddr> = peers.iter().copied().filter(|p| *p != self.self_addr).collect();
        let mut tally = Tally::new(policy, remotes.len() + 1);
        let mut receipts: BTreeMap<SocketAddr, Receipt> = BTreeMap::new();

        // Start the network hops first so they overlap with local delivery.
        // The channel has room for every receipt: a hop finishing after
        // Broadcast returned never waits on it.
        let (done_tx, mut done_rx) = mpsc::channel(remotes.len().max(1));
        // One copy shared by every hop (each attempt sends its own).
        let shared = Arc::new(message.clone());
        for &peer in &remotes {
            receipts.insert(
                peer,
                Receipt {
                    local: false,
                    result: None,
                    latency: Duration::ZERO,
                },
            );
            let link = self.link(peer);
            let hop_span = if traced {
                spans::hop(peer, &message, false)
            } else {
                tracing::Span::none()
            };
            let trace_context = if hop_span.is_disabled() {
                HashMap::new()
            } else {
                propagation::inject_map(&hop_span)
            };
            let message = shared.clone();
            let done_tx = done_tx.clone();
            let permit = permit.clone();
            let metrics = self.metrics.clone();
            let redelivery = self.redelivery.clone();
            let hop = async move {
                let result = link.deliver(&message, trace_context, hop_deadline).await;
                record_hop(&result);
                metrics.record_hop(peer, hop_result_label(&result), started.elapsed());
                if let Err(HopError::Timeout(_) | HopError::Unavailable(_) | HopError::Saturated(_)) = &result
                    && redelivery.enabled()
                    && !redelivery.push(peer, message, Instant::now())
                {
                    // Counted; never a log line per message here.
                    metrics
                        .redeliveries
                        .get_or_create(&RedeliveryLabels { result: "queue_full" })
                        .inc();
                }
                // Fails only when Broadcast already returned; the receipt is
                // then reported as pending, which is what happened.
                let _ = done_tx.send((peer, result, started.elapsed())).await;
                drop(permit);
            };
            self.hops.spawn(hop.instrument(hop_span));
        }
        drop(done_tx);

        let id = message.id.clone();
        let result = self.deliver_to_self(message, traced);
        self.metrics
            .record_hop(self.self_addr, hop_result_label(&result), started.elapsed());
        if result.is_ok() {
            tally.ack();
        } else {
            tally.fail();
        }
        receipts.insert(
            self.self_addr,
            Receipt {
                local: true,
                result: Some(result),
                latency: started.elapsed(),
            },
        );

        // A hop that timed out because the caller's own deadline bounded it
        // means the caller's deadline ran out, not that the peer was slow
        // against --peer-timeout.
        let hops_bounded_by_caller = hop_deadline < started + budget.peer_timeout;
        let mut deadline_exceeded = false;
        // Ends early only when the policy is met. Once it cannot be, the
        // wait goes on for the other hops (each bounded by the hop deadline):
        // the caller gets a final receipt from every replica, which is what
        // it needs to know who has the message, rather than `pending` ones.
        while tally.verdict() != Some(Verdict::Met) && tally.outstanding() > 0 {
            match tokio::time::timeout_at(budget.deadline.into(), done_rx.recv()).await {
                Ok(Some((peer, result, latency))) => {
                    match &result {
                        Ok(_) => tally.ack(),
                        Err(HopError::Timeout(_)) if hops_bounded_by_caller => {
                            tally.fail();
                            deadline_exceeded = true;
                        }
                        Err(_) => tally.fail(),
                    }
                    if let Some(receipt) = receipts.get_mut(&peer) {
                        receipt.result = Some(result);
                        receipt.latency = latency;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    deadline_exceeded = true;
                    break;
                }
            }
        }

        let response = BroadcastResponse {
            id,
            replicas: receipts.len() as u32,
            acked: tally.acked() as u32,
            outcomes: receipts.iter().map(|(peer, r)| outcome(*peer, r)).collect(),
            ack: policy as i32,
            required: tally.required() as u32,
        };
        if tally.verdict() == Some(Verdict::Met) {
            return Ok(response);
        }
        Err(Error::PolicyNotMet {
            summary: failure_summary(&response, policy, &receipts),
            deadline_exceeded,
            response: Box::new(response),
        })
    }

    /// The in-process hop, traced like a remote one (hop, then Deliver, then
    /// local delivery) so a trace shows every replica the same way.
    fn deliver_to_self(&self, message: Message, traced: bool) -> Result<DeliverResponse, HopError> {
        let id = message.id.clone();
        let to_receipt = |delivered: Result<crate::local::Delivered, Error>| match delivered {
            Ok(delivered) => Ok(DeliverResponse {
                id,
                sequence: delivered.sequence,
                duplicate: delivered.duplicate,
            }),
            Err(Error::ShuttingDown) => Err(HopError::ShuttingDown),
            Err(other) => Err(HopError::Rejected {
                code: tonic::Status::from(other).code(),
                message: "local delivery failed".into(),
            }),
        };
        if !traced {
            return to_receipt(deliver_locally(&self.local, &self.metrics, message, false));
        }
        let hop_span = spans::hop(self.self_addr, &message, true);
        let _hop = hop_span.enter();
        let deliver_span = spans::deliver(&message, None);
        let _deliver = deliver_span.enter();
        let result = to_receipt(deliver_locally(&self.local, &self.metrics, message, true));
        let (code, detail) = match &result {
            Ok(_) => (tonic::Code::Ok, String::new()),
            Err(error) => (error.code(), error.to_string()),
        };
        spans::record_status(&deliver_span, Side::Server, code, &detail);
        spans::record_status(&hop_span, Side::Client, code, &detail);
        if let Ok(response) = &result {
            hop_span.record("replicast.duplicate", response.duplicate);
        }
        result
    }

    /// Retries what live peers missed, every [`REDELIVERY_TICK`], until
    /// `closing`. Owned by the caller (the server), which awaits it.
    ///
    /// Each peer's redelivery runs as its own task on its own schedule: a
    /// peer that does not answer (its probe waits out the peer timeout) is
    /// skipped by later ticks until that attempt ends, and never holds up the
    /// redeliveries to the others.
    pub fn spawn_redelivery(self: &Arc<Self>, closing: CancellationToken) -> tokio::task::JoinHandle<()> {
        let fanout = self.clone();
        let task = async move {
            let mut tick = tokio::time::interval(REDELIVERY_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut attempts = JoinSet::new();
            let mut busy: HashMap<tokio::task::Id, SocketAddr> = HashMap::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    Some(done) = attempts.join_next_with_id() => {
                        let id = match done {
                            Ok((id, ())) => id,
                            Err(error) => {
                                error!(%error, "a redelivery attempt failed");
                                error.id()
                            }
                        };
                        busy.remove(&id);
                        continue;
                    }
                    () = closing.cancelled() => break,
                }
                for peer in fanout.redelivery.peers() {
                    if busy.values().any(|p| *p == peer) {
                        continue;
                    }
                    let fanout = fanout.clone();
                    let handle = attempts.spawn(async move { fanout.redeliver_to(peer).await });
                    busy.insert(handle.id(), peer);
                }
            }
            // Attempts in flight hold messages taken from the queue: let them
            // finish (each is bounded by the peer timeout) so what they could
            // not deliver is counted below.
            if tokio::time::timeout(fanout.peer_timeout * 2, async {
                while attempts.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                attempts.abort_all();
            }
            let left = fanout.redelivery.len();
            if left > 0 {
                fanout
                    .metrics
                    .redeliveries
                    .get_or_create(&RedeliveryLabels { result: "given_up" })
                    .inc_by(left as u64);
                warn!(
                    messages = left,
                    "shutting down with missed messages not redelivered"
                );
            }
        };
        // A root span with a target the trace exporter ignores: a task, not an operation.
        let span = tracing::info_span!(target: "replicast::task", parent: None, "redelivery");
        tokio::spawn(task.instrument(span))
    }

    async fn redeliver_to(&self, peer: SocketAddr) {
        let count = |result: &'static str, n: usize| {
            self.metrics
                .redeliveries
                .get_or_create(&RedeliveryLabels { result })
                .inc_by(n as u64);
        };
        let now = Instant::now();
        let link = self.lock_links().get(&peer).cloned();
        let limit = match &link {
            // Not in the peer set now (a restarting pod leaves DNS while it is
            // not ready): keep its messages for the window, in case it comes back.
            None => usize::MAX,
            // One message is enough to find out whether it is back.
            Some(link) if link.is_failing() => 1,
            Some(_) => REDELIVERY_BATCH,
        };
        let (batch, expired) = self.redelivery.take(peer, now, limit);
        if expired > 0 {
            count("given_up", expired);
            warn!(%peer, messages = expired, "gave up redelivering: past --redelivery-window");
        }
        let Some(link) = link else {
            self.redelivery.put_back(peer, batch);
            return;
        };
        if batch.is_empty() {
            return;
        }
        let deadline = now + self.peer_timeout;
        let results =
            futures::future::join_all(batch.iter().map(|m| link.redeliver(&m.message, deadline))).await;
        let (mut failed, mut finished) = (Vec::new(), Vec::new());
        let (mut delivered, mut already, mut rejected) = (0, 0, 0);
        for (missed, result) in batch.into_iter().zip(results) {
            match result {
                // Only its ack had been lost (or a client retry got it there).
                Ok(response) if response.duplicate => already += 1,
                Ok(_) => delivered += 1,
                // The peer answered "no": retrying will not change that.
                Err(HopError::Rejected { .. }) => rejected += 1,
                Err(_) => {
                    failed.push(missed);
                    continue;
                }
            }
            finished.push(missed);
        }
        self.redelivery.put_back(peer, failed);
        self.redelivery.finish(peer, &finished);
        if delivered > 0 {
            count("delivered", delivered);
            info!(%peer, messages = delivered, "redelivered messages the peer had missed");
        }
        if already > 0 {
            count("already_delivered", already);
        }
        if rejected > 0 {
            count("given_up", rejected);
            warn!(%peer, messages = rejected, "peer rejected redelivered messages; giving up on them");
        }
    }

    /// Missed messages waiting for redelivery.
    pub fn redelivery_backlog(&self) -> usize {
        self.redelivery.len()
    }

    /// Broadcasts whose hops are not all finished.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Drops the links to peers that left the peer set.
    pub fn retain_links(&self, peers: &[SocketAddr]) {
        let mut gone = Vec::new();
        self.lock_links().retain(|addr, _| {
            let keep = peers.contains(addr);
            if !keep {
                gone.push(*addr);
            }
            keep
        });
        // Per-peer series of departed pods would otherwise pile up with
        // every rollout.
        for peer in gone {
            self.metrics.forget_peer(peer);
        }
    }

    /// Waits (at most `grace`) for hops still in flight, then drops the links.
    pub async fn drain(&self, grace: Duration) {
        self.hops.close();
        if tokio::time::timeout(grace, self.hops.wait()).await.is_err() {
            debug!(
                remaining = self.hops.len(),
                "hops still in flight after the drain period"
            );
        }
        self.lock_links().clear();
    }

    fn link(&self, peer: SocketAddr) -> Arc<PeerLink> {
        self.lock_links()
            .entry(peer)
            .or_insert_with(|| Arc::new(PeerLink::new(peer, self.link_config)))
            .clone()
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<PeerLink>>> {
        // Held only for map operations, never across an await.
        self.links.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Hands `message` to this replica's consumers inside a local-delivery span.
pub fn deliver_locally(
    local: &LocalDelivery,
    metrics: &Metrics,
    message: Message,
    traced: bool,
) -> Result<crate::local::Delivered, Error> {
    let span = if traced {
        spans::local_delivery(&message)
    } else {
        tracing::Span::none()
    };
    let _entered = span.enter();
    // A closed replica's refusal is recorded by the Deliver span around this.
    let delivered = local.deliver(message)?;
    if delivered.duplicate {
        metrics.duplicates.inc();
    } else {
        metrics.local_deliveries.inc();
    }
    if !span.is_disabled() {
        span.record(
            "messaging.replicast.sequence",
            i64::try_from(delivered.sequence).unwrap_or(i64::MAX),
        );
        span.record("replicast.duplicate", delivered.duplicate);
    }
    Ok(delivered)
}

/// The `result` label of a hop in metrics.
fn hop_result_label(result: &Result<DeliverResponse, HopError>) -> &'static str {
    match result {
        Ok(response) if response.duplicate => "duplicate",
        Ok(_) => "delivered",
        Err(error) => code_name(error.code()),
    }
}

/// Records a hop's outcome on the current (hop) span.
fn record_hop(result: &Result<DeliverResponse, HopError>) {
    let span = tracing::Span::current();
    match result {
        Ok(response) => {
            spans::record_status(&span, Side::Client, tonic::Code::Ok, "");
            if !span.is_disabled() {
                span.record("replicast.duplicate", response.duplicate);
            }
        }
        Err(error) => {
            debug!(%error, "hop failed");
            spans::record_status(&span, Side::Client, error.code(), &error.to_string());
        }
    }
}

fn outcome(peer: SocketAddr, receipt: &Receipt) -> PeerOutcome {
    let mut outcome = PeerOutcome {
        peer: peer.to_string(),
        local: receipt.local,
        latency: Some(prost_types::Duration::try_from(receipt.latency).unwrap_or_default()),
        ..PeerOutcome::default()
    };
    match &receipt.result {
        None => {
            outcome.pending = true;
            outcome.code = tonic::Code::Unknown as i32;
            outcome.message = "still in flight when the response was sent".to_owned();
            outcome.latency = None;
        }
        Some(Ok(delivered)) => {
            outcome.duplicate = delivered.duplicate;
            outcome.sequence = delivered.sequence;
        }
        Some(Err(error)) => {
            outcome.code = error.code() as i32;
            outcome.message = clip(&error.to_string());
        }
    }
    outcome
}

/// "ack policy ALL not met for message X: 2 of 3 replicas acknowledged (3
/// required); failed: 10.0.0.3:7420 DEADLINE_EXCEEDED (no answer within 1s)".
/// Names at most [`NAMED_FAILURES`]: the status travels in HTTP/2 trailers,
/// which clients cap (16 KiB in hyper, 8 KiB in grpc-java); the details carry
/// every receipt.
fn failure_summary(
    response: &BroadcastResponse,
    policy: AckPolicy,
    receipts: &BTreeMap<SocketAddr, Receipt>,
) -> String {
    let failed: Vec<String> = receipts
        .iter()
        .filter_map(|(peer, r)| match &r.result {
            Some(Err(e)) => Some(format!(
                "{peer} {} ({})",
                code_name(e.code()),
                clip(&e.to_string())
            )),
            None => Some(format!("{peer} no answer yet")),
            Some(Ok(_)) => None,
        })
        .collect();
    let mut named = failed
        .iter()
        .take(NAMED_FAILURES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if failed.len() > NAMED_FAILURES {
        named.push_str(&format!(
            " and {} more (see the status details)",
            failed.len() - NAMED_FAILURES
        ));
    }
    format!(
        "ack policy {} not met for message {}: {} of {} replicas acknowledged ({} required); failed: {named}",
        policy.as_str_name().trim_start_matches("ACK_POLICY_"),
        response.id,
        response.acked,
        response.replicas,
        response.required,
    )
}

/// Failed replicas named in a status message.
const NAMED_FAILURES: usize = 5;
/// Longest error text kept per receipt.
const MAX_RECEIPT_MESSAGE: usize = 200;

fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_RECEIPT_MESSAGE) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_a_few_failures_and_counts_the_rest() {
        let mut receipts = BTreeMap::new();
        for i in 1..=12u16 {
            let peer: SocketAddr = format!("127.0.0.1:{i}").parse().unwrap();
            let result = if i == 1 {
                Some(Ok(DeliverResponse::default()))
            } else {
                Some(Err(HopError::Unavailable("x".repeat(1000))))
            };
            receipts.insert(
                peer,
                Receipt {
                    local: i == 1,
                    result,
                    latency: Duration::ZERO,
                },
            );
        }
        let response = BroadcastResponse {
            id: "m".into(),
            replicas: 12,
            acked: 1,
            required: 12,
            ..Default::default()
        };
        let summary = failure_summary(&response, AckPolicy::All, &receipts);
        assert!(
            summary.contains("1 of 12 replicas acknowledged (12 required)"),
            "{summary}"
        );
        assert!(summary.contains("and 6 more"), "{summary}");
        assert!(
            summary.len() < 2000,
            "the status message stays small: {} bytes",
            summary.len()
        );
    }
}
