//! Fan-out: deliver one message to every replica and collect receipts.
//!
//! The receiving replica delivers to itself in-process (never over the
//! network, so a cluster that includes itself cannot deadlock on itself) and
//! hands a [`Hop`] to every other peer's [`Link`]: one task per peer that
//! owns that peer's stream, deadlines, retries, health and backlog. A
//! Broadcast only submits and then counts receipts on its own channel, so
//! one slow, hung or dead peer delays nobody else. Broadcast returns as soon
//! as the ack policy is met, or, once it cannot be, when every hop has
//! answered or timed out (so every receipt is final); hops still in flight
//! after a met policy finish in the background, in their links.
//!
//! The peer set and its links are one [`PeerSet`], rebuilt from each
//! discovery snapshot by [`FanOut::update_peers`] and published on a
//! `watch`: a peer's link opens when the peer enters the set (not on the
//! first Broadcast), and a peer that leaves keeps its link until the
//! messages it missed are delivered or expire.

mod backlog;
pub mod budget;
mod health;
mod link;
pub mod policy;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use tokio::{
    sync::{Semaphore, mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use self::policy::{Tally, Verdict};
pub use self::{
    backlog::BacklogBudget,
    budget::Budget,
    link::{
        Acked, GrpcTransport, Hop, HopReport, HopResult, Link, LinkConfig, LinkStatus, PeerLink,
        ReceiptSender,
    },
};
use crate::{
    discovery::PeerSnapshot,
    error::{Error, HopError, code_name},
    local::{AppReceipt, Delivered, LocalDelivery},
    metrics::Metrics,
    proto::v1::{AckPolicy, BroadcastResponse, PeerOutcome},
    telemetry::spans::{self, SendSpan},
    wire::EncodedMessage,
};

/// Makes the link to a peer that entered the peer set.
pub type Connect = Box<dyn Fn(SocketAddr) -> Arc<dyn Link> + Send + Sync>;

/// The replicas a Broadcast targets: the discovery snapshot it was built
/// from, and every other replica in it with its link.
#[derive(Debug, Default)]
pub struct PeerSet {
    pub snapshot: Arc<PeerSnapshot>,
    /// Sorted by address; this replica is not among them.
    remotes: Vec<(SocketAddr, Arc<dyn Link>)>,
}

impl PeerSet {
    /// The other replicas, sorted by address, with their links.
    pub fn remotes(&self) -> impl Iterator<Item = (SocketAddr, &dyn Link)> {
        self.remotes.iter().map(|(addr, link)| (*addr, link.as_ref()))
    }
}

/// Waits until the first peer lookup has succeeded, at most until
/// `deadline`. A Broadcast that arrives right after start-up waits for the
/// peer set instead of failing or broadcasting to nobody.
pub async fn ready_peer_set(
    rx: &mut watch::Receiver<Arc<PeerSet>>,
    source_name: &str,
    deadline: Instant,
) -> Result<Arc<PeerSet>, Error> {
    let current = rx.borrow().clone();
    if current.snapshot.ready {
        return Ok(current);
    }
    let started = Instant::now();
    let waited = tokio::time::timeout_at(deadline, async {
        rx.wait_for(|set| set.snapshot.ready).await.map(|set| set.clone())
    })
    .await;
    match waited {
        Ok(Ok(set)) => Ok(set),
        Ok(Err(_)) => Err(Error::ShuttingDown),
        Err(_) => Err(Error::DiscoveryNotReady {
            source_name: source_name.to_owned(),
            waited: started.elapsed(),
            last_error: rx
                .borrow()
                .snapshot
                .last_error
                .clone()
                .unwrap_or_else(|| "no answer yet".to_owned()),
        }),
    }
}

/// Delivers messages to the whole peer set.
pub struct FanOut {
    self_addr: SocketAddr,
    local: Arc<LocalDelivery>,
    metrics: Metrics,
    /// One permit per Broadcast whose hops are not all finished.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    peer_timeout: Duration,
    peer_set_tx: watch::Sender<Arc<PeerSet>>,
    /// Links of peers that left the peer set, finishing their backlog.
    /// Only [`FanOut::update_peers`] (the membership task) touches it.
    retiring: Mutex<HashMap<SocketAddr, Arc<dyn Link>>>,
    connect: Connect,
    budget: Arc<BacklogBudget>,
}

impl std::fmt::Debug for FanOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanOut")
            .field("self_addr", &self.self_addr)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// What became of one replica's delivery.
#[derive(Debug)]
struct Receipt {
    peer: SocketAddr,
    local: bool,
    /// `None` while still in flight.
    result: Option<HopResult>,
    latency: Duration,
}

impl FanOut {
    /// A fan-out from `self_addr` whose links to peers `connect` makes.
    pub fn new(
        self_addr: SocketAddr,
        local: Arc<LocalDelivery>,
        max_in_flight: usize,
        peer_timeout: Duration,
        budget: Arc<BacklogBudget>,
        connect: Connect,
        metrics: Metrics,
    ) -> Self {
        let (peer_set_tx, _) = watch::channel(Arc::new(PeerSet::default()));
        Self {
            self_addr,
            local,
            metrics,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            peer_timeout,
            peer_set_tx,
            retiring: Mutex::new(HashMap::new()),
            connect,
            budget,
        }
    }

    /// The current peer set, and every later one.
    pub fn peer_set(&self) -> watch::Receiver<Arc<PeerSet>> {
        self.peer_set_tx.subscribe()
    }

    /// Rebuilds the peer set from a discovery snapshot: links for peers
    /// that joined (connecting at once), retirement for those that left,
    /// and the end of retired links that hold nothing any more.
    pub fn update_peers(&self, snapshot: Arc<PeerSnapshot>) {
        let current = self.peer_set_tx.borrow().clone();
        let mut links: HashMap<SocketAddr, Arc<dyn Link>> = current.remotes.iter().cloned().collect();
        let mut retiring = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        let mut remotes = Vec::with_capacity(snapshot.peers.len());
        for &addr in &snapshot.peers {
            if addr == self.self_addr || remotes.iter().any(|(a, _)| *a == addr) {
                continue;
            }
            let link = match links.remove(&addr) {
                Some(link) => link,
                None => match retiring.remove(&addr) {
                    Some(link) => {
                        link.set_member(true);
                        link
                    }
                    None => (self.connect)(addr),
                },
            };
            remotes.push((addr, link));
        }
        remotes.sort_by_key(|(addr, _)| *addr);
        for (addr, link) in links {
            debug!(peer = %addr, "peer left the peer set; its link stays until its backlog is done");
            link.set_member(false);
            retiring.insert(addr, link);
        }
        retiring.retain(|addr, link| {
            let keep = !link.status().idle;
            if !keep {
                // Per-peer series of departed pods would otherwise pile up
                // with every rollout.
                self.metrics.forget_peer(*addr);
            }
            keep
        });
        drop(retiring);
        self.peer_set_tx
            .send_replace(Arc::new(PeerSet { snapshot, remotes }));
    }

    /// Delivers `message` to this replica and every peer of `peers`, and
    /// waits for `policy` within `budget`.
    pub async fn broadcast(
        &self,
        message: EncodedMessage,
        peers: &PeerSet,
        policy: AckPolicy,
        budget: Budget,
        send_span: &SendSpan,
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
        debug!(
            message.id = message.id(),
            topic = message.topic(),
            ack = policy.as_str_name(),
            replicas = peers.remotes.len() + 1,
            "accepted"
        );
        let hop_deadline = budget.hop_deadline(started);
        // A hop cut short by the caller's deadline says nothing about the
        // peer, and its timeout means the caller's deadline ran out.
        let full_budget = hop_deadline + Duration::from_millis(1) >= started + self.peer_timeout;
        let trace_context = send_span.context_map();
        let remotes = peers.remotes.len();
        let mut tally = Tally::new(policy, remotes + 1);
        let mut receipts: Vec<Receipt> = Vec::with_capacity(remotes + 1);

        // The network hops first, so they overlap with local delivery. The
        // channel has room for every receipt: a link never waits on it.
        let (receipt_tx, receipt_rx) = mpsc::channel(remotes.max(1));
        for (slot, (addr, link)) in peers.remotes.iter().enumerate() {
            receipts.push(Receipt {
                peer: *addr,
                local: false,
                result: None,
                latency: Duration::ZERO,
            });
            link.submit(Hop {
                message: message.clone(),
                trace_context: trace_context.clone(),
                deadline: hop_deadline,
                started,
                full_budget,
                receipt: ReceiptSender {
                    tx: receipt_tx.clone(),
                    slot,
                    _permit: permit.clone(),
                    late: send_span
                        .is_recording()
                        .then(|| (send_span.span().clone(), *addr)),
                },
            });
        }
        drop(receipt_tx);

        let id = message.id().to_owned();
        let (local, app_receipt) = self.deliver_to_self(message, send_span);
        // From here the hops' receipt senders hold the permit: a Broadcast
        // whose caller stops polling it (a Publish stream nobody reads)
        // releases it when its hops are done, not when it is polled again.
        drop(permit);
        let self_slot = receipts.len();
        receipts.push(Receipt {
            peer: self.self_addr,
            local: true,
            result: None,
            latency: Duration::ZERO,
        });
        // With --webhook-ack the local receipt waits for the app, as a
        // peer's does, within the hop deadline; it then comes in with the
        // peers' receipts.
        let local_report = match (local, app_receipt) {
            (Ok(acked), Some(receipt)) => futures::stream::once(async move {
                let result = match receipt.wait(hop_deadline).await {
                    Ok(()) => Ok(acked),
                    Err(failure) => Err(HopError::app(failure)),
                };
                HopReport {
                    slot: self_slot,
                    result,
                    latency: started.elapsed(),
                }
            })
            .boxed(),
            (result, _) => {
                match &result {
                    Ok(_) => tally.ack(),
                    Err(_) => tally.fail(),
                }
                let receipt = &mut receipts[self_slot];
                receipt.result = Some(result);
                receipt.latency = started.elapsed();
                futures::stream::empty().boxed()
            }
        };
        let mut reports = futures::stream::select(ReceiverStream::new(receipt_rx), local_report);

        let mut deadline_exceeded = false;
        // Ends early only when the policy is met. Once it cannot be, the
        // wait goes on for the other hops (each bounded by the hop deadline):
        // the caller gets a final receipt from every replica, which is what
        // it needs to know who has the message, rather than `pending` ones.
        while tally.verdict() != Some(Verdict::Met) && tally.outstanding() > 0 {
            match tokio::time::timeout_at(budget.deadline, reports.next()).await {
                Ok(Some(report)) => {
                    if let Err(error) = &report.result {
                        // In the send span: the line carries its trace id.
                        debug!(peer = %receipts[report.slot].peer, %error, "hop failed");
                    }
                    match &report.result {
                        Ok(_) => tally.ack(),
                        Err(HopError::Timeout(_)) if !full_budget => {
                            tally.fail();
                            deadline_exceeded = true;
                        }
                        Err(_) => tally.fail(),
                    }
                    let receipt = &mut receipts[report.slot];
                    receipt.result = Some(report.result);
                    receipt.latency = report.latency;
                }
                // Every link has reported or stopped.
                Ok(None) => break,
                Err(_) => {
                    deadline_exceeded = true;
                    break;
                }
            }
        }
        receipts.sort_by_key(|r| r.peer);
        let response = BroadcastResponse {
            id,
            replicas: receipts.len() as u32,
            acked: tally.acked() as u32,
            outcomes: receipts.iter().map(outcome).collect(),
            ack: policy as i32,
            required: tally.required() as u32,
            omitted_outcomes: 0,
        };
        send_span.record_receipts(&response);
        if tally.verdict() == Some(Verdict::Met) {
            return Ok(response);
        }
        Err(Error::PolicyNotMet {
            summary: failure_summary(&response, policy),
            deadline_exceeded,
            response: Box::new(response),
        })
    }

    /// The in-process hop, traced as a delivery like any other replica's;
    /// with the app receipt to wait on (`--webhook-ack`).
    fn deliver_to_self(
        &self,
        message: EncodedMessage,
        send_span: &SendSpan,
    ) -> (HopResult, Option<Arc<AppReceipt>>) {
        let process_span = send_span.child_process(&message);
        let delivered = deliver_locally(&self.local, &self.metrics, message, &process_span);
        match delivered {
            Ok(delivered) => (
                Ok(Acked {
                    sequence: delivered.sequence,
                    duplicate: delivered.duplicate,
                }),
                delivered.app_receipt,
            ),
            Err(Error::ShuttingDown) => (Err(HopError::ShuttingDown), None),
            Err(other) => (
                Err(HopError::Rejected {
                    code: tonic::Status::from(other).code(),
                    message: "local delivery failed".into(),
                }),
                None,
            ),
        }
    }

    /// Peers that left the peer set whose links still hold messages they
    /// missed, sorted by address.
    pub fn departed(&self) -> Vec<(SocketAddr, LinkStatus)> {
        let retiring = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
        let mut departed: Vec<_> = retiring
            .iter()
            .map(|(addr, link)| (*addr, link.status()))
            .collect();
        departed.sort_by_key(|(addr, _)| *addr);
        departed
    }

    /// Missed messages held for redelivery, all peers together.
    pub fn redelivery_backlog(&self) -> usize {
        self.budget.messages()
    }

    /// Broadcasts whose hops are not all finished.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Waits for the hops of every Broadcast to finish, then stops every
    /// link; what their backlogs still hold is given up and counted. All of
    /// it ends by `deadline` (the links get the last part of the time).
    pub async fn shutdown(&self, deadline: Instant) {
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let stop_share = LINK_STOP_GRACE.min(deadline.saturating_duration_since(Instant::now()) / 2);
        if tokio::time::timeout_at(deadline - stop_share, self.in_flight.acquire_many(all))
            .await
            .is_err()
        {
            debug!(
                remaining = self.in_flight(),
                "broadcasts still in flight at the end of the shutdown's share for them"
            );
        }
        let links: Vec<Arc<dyn Link>> = {
            let mut retiring = self.retiring.lock().unwrap_or_else(|p| p.into_inner());
            let mut links: Vec<_> = retiring.drain().map(|(_, link)| link).collect();
            let set = self.peer_set_tx.send_replace(Arc::new(PeerSet::default()));
            links.extend(set.remotes.iter().map(|(_, link)| link.clone()));
            links
        };
        let stopped = futures::future::join_all(links.iter().map(|link| link.stop()));
        if tokio::time::timeout_at(deadline, stopped).await.is_err() {
            debug!("links still stopping; leaving them");
        }
    }
}

/// Hands `message` to this replica's consumers inside `span` (a process
/// span, or a disabled one).
pub fn deliver_locally(
    local: &LocalDelivery,
    metrics: &Metrics,
    message: EncodedMessage,
    span: &tracing::Span,
) -> Result<Delivered, Error> {
    let _entered = span.enter();
    // Kept with the delivery for the webhooks, only when traced.
    let trace_context = if span.is_disabled() {
        None
    } else {
        Some(crate::telemetry::propagation::inject_map(span))
            .filter(|c| !c.is_empty())
            .map(Arc::new)
    };
    // A refcount, and only when the line is wanted.
    let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| message.clone());
    // A closed replica's refusal is recorded by the span's owner.
    let delivered = local.deliver_traced(message, trace_context)?;
    if let Some(message) = logged {
        debug!(
            message.id = message.id(),
            topic = message.topic(),
            sequence = delivered.sequence,
            duplicate = delivered.duplicate,
            app_receipt = delivered.app_receipt.is_some(),
            "delivered"
        );
    }
    if delivered.duplicate {
        metrics.duplicates.inc();
    } else {
        metrics.local_deliveries.inc();
    }
    spans::record_delivered(span, delivered.sequence, delivered.duplicate);
    Ok(delivered)
}

fn outcome(receipt: &Receipt) -> PeerOutcome {
    let mut outcome = PeerOutcome {
        peer: receipt.peer.to_string(),
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
        Some(Ok(acked)) => {
            outcome.duplicate = acked.duplicate;
            outcome.sequence = acked.sequence;
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
/// which clients cap (8 KiB in grpc C-core and grpc-java); the details carry
/// the receipts (see `error.rs` for how they are bounded).
fn failure_summary(response: &BroadcastResponse, policy: AckPolicy) -> String {
    let failed: Vec<&PeerOutcome> = response
        .outcomes
        .iter()
        .filter(|o| o.pending || o.code != 0)
        .collect();
    let mut named = failed
        .iter()
        .take(NAMED_FAILURES)
        .map(|o| {
            if o.pending {
                format!("{} no answer yet", o.peer)
            } else {
                format!(
                    "{} {} ({})",
                    o.peer,
                    code_name(tonic::Code::from_i32(o.code)),
                    o.message
                )
            }
        })
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

/// How long the links get to count what they give up at shutdown.
const LINK_STOP_GRACE: Duration = Duration::from_secs(1);

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
mod tests;
