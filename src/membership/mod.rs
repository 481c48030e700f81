//! Membership: the replicas a Broadcast targets, from DNS and from the
//! replicas' own announcements (the rules are in [`view`]).
//!
//! One task owns the [`MembershipView`] and everything that feeds it: the
//! DNS snapshots, the Announce requests other replicas send (through
//! [`MembershipHandle`]), the identity probes it makes to check them, this
//! replica's own JOIN (when it becomes ready, before health says SERVING)
//! and LEAVE (the first step of the drain), and the lease clock. It also
//! owns health, so SERVING and NOT_SERVING cannot race, and it hands every
//! new member set to the fan-out.

mod calls;
mod view;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{Instrument, debug, info, warn};

pub use self::view::{Change, ChangeKind, LeftBecause, Source, ViewConfig};
use self::{
    calls::{Answer, CallError, announce, probe_result, refutation},
    view::{JoinHeard, LeaveHeard, MembershipView, ProbeResult},
};
use crate::{
    discovery::PeerSnapshot,
    fanout::FanOut,
    lifecycle::{Phase, PhaseRx},
    metrics::MembershipMetrics,
    proto::{self, v1::announce_request::Kind},
    tls::Dialer,
};

/// Membership settings, from the configuration.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub self_addr: SocketAddr,
    pub incarnation: u64,
    /// See [`ViewConfig::lease`] (`--announce-lease`).
    pub lease: Duration,
    /// See [`ViewConfig::max_announced`] (`--max-announced-peers`).
    pub max_announced: usize,
    /// Bound on each Announce call this replica makes.
    pub call_timeout: Duration,
    /// How Announce calls connect (TLS or not).
    pub dialer: Dialer,
}

/// Why an announcement was not taken; [`crate::error`] maps it to a status.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("invalid announcement: {0}")]
    Invalid(String),
    #[error("the announcement names {0}, which is the replica answering it")]
    IsSelf(SocketAddr),
    #[error(
        "{limit} replicas already count here by their announcement alone (--max-announced-peers); \
         retry once DNS lists some of them"
    )]
    TooMany { limit: usize },
    #[error(
        "{peer} incarnation {incarnation} already left; a restarted replica announces its new incarnation"
    )]
    AlreadyLeft { peer: SocketAddr, incarnation: u64 },
    #[error("announcement not confirmed: {0}")]
    NotConfirmed(String),
    #[error("this replica is shutting down; its membership no longer changes")]
    ShuttingDown,
}

/// Who is a member, as published after every change.
#[derive(Debug, Default)]
pub struct Members {
    /// The members (this replica not among them) by source.
    pub sources: BTreeMap<SocketAddr, Source>,
    /// The members by announcement alone, with their incarnation.
    pub announced: Vec<(SocketAddr, u64)>,
    /// The replicas taken out after their leave, with their incarnation.
    pub left: Vec<(SocketAddr, u64)>,
}

/// How the Announce handler and ListPeers talk to the membership task.
#[derive(Debug, Clone)]
pub struct MembershipHandle {
    request_tx: mpsc::Sender<Request>,
    members_rx: watch::Receiver<Arc<Members>>,
}

#[derive(Debug)]
enum Request {
    Join {
        peer: SocketAddr,
        incarnation: u64,
        reply: oneshot::Sender<Result<(), AnnounceError>>,
    },
    Leave {
        peer: SocketAddr,
        incarnation: u64,
        reply: oneshot::Sender<Result<(), AnnounceError>>,
    },
}

impl MembershipHandle {
    /// `peer` announced its join; resolves once it is a member (its
    /// identity probe answered) or refused.
    pub async fn join(&self, peer: SocketAddr, incarnation: u64) -> Result<(), AnnounceError> {
        self.ask(|reply| Request::Join {
            peer,
            incarnation,
            reply,
        })
        .await
    }

    /// `peer` announced its leave; resolves once it is no longer targeted
    /// (its probe said draining) or refused.
    pub async fn leave(&self, peer: SocketAddr, incarnation: u64) -> Result<(), AnnounceError> {
        self.ask(|reply| Request::Leave {
            peer,
            incarnation,
            reply,
        })
        .await
    }

    /// The current members.
    pub fn members(&self) -> Arc<Members> {
        self.members_rx.borrow().clone()
    }

    async fn ask(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<(), AnnounceError>>) -> Request,
    ) -> Result<(), AnnounceError> {
        let (reply, answer) = oneshot::channel();
        // Bounded: a flood of announcements waits here, not in memory.
        self.request_tx
            .send(request(reply))
            .await
            .map_err(|_| AnnounceError::ShuttingDown)?;
        answer.await.unwrap_or(Err(AnnounceError::ShuttingDown))
    }
}

/// The running membership task.
#[derive(Debug)]
pub struct Membership {
    handle: MembershipHandle,
    left_rx: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Membership {
    pub fn handle(&self) -> MembershipHandle {
        self.handle.clone()
    }

    /// Resolves once this replica's leave was announced to every member
    /// (each answered, or its call failed). The drain waits for it, bounded.
    pub async fn leave_announced(&self) {
        let mut left_rx = self.left_rx.clone();
        let _ = left_rx.wait_for(|left| *left).await;
    }

    /// Waits for the task, which ends when the replica closes.
    pub async fn stopped(self) {
        if let Err(error) = self.task.await {
            warn!(%error, "membership task failed");
        }
    }
}

/// Starts the membership task. Health stays NOT_SERVING until the first
/// DNS answer arrived and this replica announced its join to the replicas
/// in it.
pub fn spawn_membership(
    config: MembershipConfig,
    dns_rx: watch::Receiver<Arc<PeerSnapshot>>,
    fanout: Arc<FanOut>,
    health: HealthReporter,
    phase: PhaseRx,
    metrics: MembershipMetrics,
) -> Membership {
    let (request_tx, request_rx) = mpsc::channel(64);
    let (members_tx, members_rx) = watch::channel(Arc::new(Members::default()));
    let (left_tx, left_rx) = watch::channel(false);
    let task = MembershipTask {
        view: MembershipView::new(ViewConfig {
            self_addr: config.self_addr,
            lease: config.lease,
            max_announced: config.max_announced,
        }),
        config,
        dns_rx,
        dns: Arc::new(PeerSnapshot::default()),
        fanout,
        health,
        phase,
        request_rx,
        members_tx,
        left_tx,
        metrics,
        probes: JoinSet::new(),
        probing: HashSet::new(),
        waiting: HashMap::new(),
        calls: JoinSet::new(),
        gating: 0,
        answered_first: Vec::new(),
        join: JoinRounds::NotReady,
    };
    let task = tokio::spawn(task.run().instrument(tracing::info_span!("membership")));
    Membership {
        handle: MembershipHandle {
            request_tx,
            members_rx,
        },
        left_rx,
        task,
    }
}

/// When this replica announces its join again after it became ready: a
/// replica that started at the same time may be known by then to the
/// others, who name it in their answers.
const JOIN_ROUNDS_AFTER_READY: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(15),
];

/// How often leases are checked and announced members' links looked at.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ProbeKind {
    /// A join, announced to this replica or named by another.
    Join,
    /// A leave the replica announced to this one.
    Leave,
    /// A leave another replica reported (see [`view`], rule 1).
    LeaveReported,
}

/// One announcement heard: who, as which incarnation, join or leave.
type Announcement = (SocketAddr, u64, ProbeKind);

/// The answer an Announce request waits for.
type Reply = oneshot::Sender<Result<(), AnnounceError>>;

/// A finished identity probe.
struct Probed {
    peer: SocketAddr,
    incarnation: u64,
    kind: ProbeKind,
    /// Health waits for it (see [`JoinRounds::Joining`]).
    gates: bool,
    answer: Result<Answer, CallError>,
}

/// A finished call of this replica's own JOIN or LEAVE.
struct Called {
    peer: SocketAddr,
    kind: Kind,
    /// Health (a JOIN of the first rounds) or the drain (a LEAVE) waits
    /// for it.
    gates: bool,
    answer: Result<Answer, CallError>,
}

/// Where this replica is with announcing itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JoinRounds {
    /// No DNS answer yet.
    NotReady,
    /// Announcing the join before health says SERVING, in two rounds: to
    /// the replicas DNS lists, then to every member known after the first
    /// round's answers (they name replicas that joined meanwhile, which
    /// this one probes and tells about itself). Two replicas that start
    /// together thus find each other before either says SERVING, unless
    /// their first rounds do not overlap at any peer; the later rounds
    /// then close the gap within a second.
    Joining { ready_at: Instant, round: u8 },
    /// Serving; `next` more rounds are due after `ready_at`.
    Serving { ready_at: Instant, next: usize },
    /// Draining: announcing the leave (or done with it).
    Leaving,
}

struct MembershipTask {
    config: MembershipConfig,
    view: MembershipView,
    dns_rx: watch::Receiver<Arc<PeerSnapshot>>,
    /// The last DNS snapshot (its staleness and errors go to ListPeers).
    dns: Arc<PeerSnapshot>,
    fanout: Arc<FanOut>,
    health: HealthReporter,
    phase: PhaseRx,
    request_rx: mpsc::Receiver<Request>,
    members_tx: watch::Sender<Arc<Members>>,
    left_tx: watch::Sender<bool>,
    metrics: MembershipMetrics,
    /// Identity probes in flight (aborted when the task ends).
    probes: JoinSet<Probed>,
    /// The announcements being probed, so each is probed once.
    probing: HashSet<Announcement>,
    /// Announce requests waiting for their probe.
    waiting: HashMap<Announcement, Vec<Reply>>,
    /// This replica's own JOIN and LEAVE calls in flight.
    calls: JoinSet<Called>,
    /// Calls and probes in flight that health (joining) or the drain
    /// (leaving) waits for.
    gating: usize,
    /// The replicas that answered the first JOIN round: the second goes to
    /// them only (one that did not answer would only hold health up again).
    answered_first: Vec<SocketAddr>,
    join: JoinRounds,
}

impl MembershipTask {
    async fn run(mut self) {
        set_health(&self.health, ServingStatus::NotServing).await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let draining = self.phase.reached(Phase::Draining);
        let closing = self.phase.reached(Phase::Closing);
        tokio::pin!(draining, closing);
        self.on_dns().await;
        loop {
            tokio::select! {
                biased;
                () = &mut closing => break,
                () = &mut draining, if self.join != JoinRounds::Leaving => self.start_leave().await,
                changed = self.dns_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_dns().await;
                }
                Some(request) = self.request_rx.recv() => self.on_request(request),
                Some(probed) = self.probes.join_next() => {
                    if let Ok(probed) = probed {
                        // Gating work of the join rounds counts only while joining.
                        let gates = probed.gates && matches!(self.join, JoinRounds::Joining { .. });
                        self.on_probed(&probed);
                        self.ungate(gates).await;
                    }
                }
                Some(called) = self.calls.join_next() => {
                    // A call aborted with the join rounds is no answer; one
                    // that finished just before counts for its own step only.
                    if let Ok(called) = called {
                        let gates = called.gates
                            && match called.kind {
                                Kind::Leave => self.join == JoinRounds::Leaving,
                                _ => matches!(self.join, JoinRounds::Joining { .. }),
                            };
                        self.on_called(called);
                        self.ungate(gates).await;
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        // What still waits is answered by the dropped reply senders.
        let _ = self.left_tx.send(true);
    }

    async fn on_dns(&mut self) {
        self.dns = self.dns_rx.borrow_and_update().clone();
        if !self.dns.ready {
            return;
        }
        let changes = self
            .view
            .dns_answer(self.dns.peers.iter().copied(), Instant::now());
        self.apply(changes);
        if self.join == JoinRounds::NotReady && !self.phase.has_reached(Phase::Draining) {
            self.join = JoinRounds::Joining {
                ready_at: Instant::now(),
                round: 1,
            };
            info!(
                peers = self.view.members().len(),
                "first peer lookup done; announcing this replica's join"
            );
            self.join_round(true);
            self.ungate(false).await;
        }
    }

    /// A JOIN to every member.
    fn join_round(&mut self, gates: bool) {
        let peers: Vec<SocketAddr> = self.view.members().keys().copied().collect();
        for peer in peers {
            self.call(peer, Kind::Join, gates);
        }
    }

    /// One gating call or probe finished (`finished`), or none (to check
    /// for an empty round): moves the join rounds or the leave on once
    /// nothing gating is left.
    async fn ungate(&mut self, finished: bool) {
        if finished {
            self.gating = self.gating.saturating_sub(1);
        }
        while self.gating == 0 {
            match self.join {
                JoinRounds::Joining { ready_at, round: 1 } => {
                    self.join = JoinRounds::Joining { ready_at, round: 2 };
                    for peer in std::mem::take(&mut self.answered_first) {
                        if self.view.is_member(peer) {
                            self.call(peer, Kind::Join, true);
                        }
                    }
                }
                JoinRounds::Joining { ready_at, .. } => {
                    self.join = JoinRounds::Serving { ready_at, next: 0 };
                    info!(members = self.view.members().len(), "join announced; serving");
                    set_health(&self.health, ServingStatus::Serving).await;
                    break;
                }
                JoinRounds::Leaving if finished => {
                    info!("leave announced");
                    let _ = self.left_tx.send(true);
                    break;
                }
                _ => break,
            }
        }
    }

    async fn start_leave(&mut self) {
        self.join = JoinRounds::Leaving;
        set_health(&self.health, ServingStatus::NotServing).await;
        // What the join rounds still wait for no longer matters.
        self.calls.abort_all();
        self.gating = 0;
        let peers: Vec<SocketAddr> = self.view.members().keys().copied().collect();
        info!(peers = peers.len(), "announcing this replica's leave");
        for peer in peers {
            self.call(peer, Kind::Leave, true);
        }
        if self.gating == 0 {
            let _ = self.left_tx.send(true);
        }
    }

    fn call(&mut self, peer: SocketAddr, kind: Kind, gates: bool) {
        if gates {
            self.gating += 1;
        }
        let (self_addr, incarnation, timeout, dialer) = (
            self.config.self_addr,
            self.config.incarnation,
            self.config.call_timeout,
            self.config.dialer.clone(),
        );
        self.calls.spawn(async move {
            let answer = announce(&dialer, peer, kind, self_addr, incarnation, timeout).await;
            Called {
                peer,
                kind,
                gates,
                answer,
            }
        });
    }

    fn on_called(&mut self, called: Called) {
        match &called.answer {
            Ok(answer) => {
                debug!(peer = %called.peer, kind = ?called.kind, "announced");
                if called.gates && matches!(self.join, JoinRounds::Joining { round: 1, .. }) {
                    self.answered_first.push(called.peer);
                }
                if called.kind == Kind::Join {
                    for (peer, incarnation) in answer.announced.clone() {
                        self.heard_of(peer, incarnation, called.gates);
                    }
                    for (peer, incarnation) in answer.left.clone() {
                        self.heard_left(peer, incarnation, called.gates);
                    }
                }
            }
            // An older replica answers UNIMPLEMENTED: it learns from DNS.
            Err(error) => debug!(peer = %called.peer, kind = ?called.kind, %error, "announcement not taken"),
        }
    }

    /// Another replica named `peer` as announced: probe it like a join
    /// heard from it directly.
    fn heard_of(&mut self, peer: SocketAddr, incarnation: u64, gates: bool) {
        if self.view.incarnation(peer) == Some(incarnation) {
            return;
        }
        if self.view.join_heard(peer, incarnation, Instant::now()) == JoinHeard::Probe {
            self.probe(peer, incarnation, ProbeKind::Join, gates);
        }
    }

    /// Another replica reports that `peer` left: if this replica still
    /// targets it (its DNS lags), probe it.
    fn heard_left(&mut self, peer: SocketAddr, incarnation: u64, gates: bool) {
        if self.view.is_member(peer) && self.view.leave_heard(peer, incarnation) == LeaveHeard::Probe {
            self.probe(peer, incarnation, ProbeKind::LeaveReported, gates);
        }
    }

    fn on_request(&mut self, request: Request) {
        let now = Instant::now();
        match request {
            Request::Join {
                peer,
                incarnation,
                reply,
            } => {
                let heard = self.view.join_heard(peer, incarnation, now);
                self.metrics.announcement("join", heard_label(heard));
                let refused = match heard {
                    JoinHeard::Probe => {
                        self.wait(peer, incarnation, ProbeKind::Join, reply);
                        self.probe(peer, incarnation, ProbeKind::Join, false);
                        return;
                    }
                    JoinHeard::Known if self.probing.contains(&(peer, incarnation, ProbeKind::Join)) => {
                        self.wait(peer, incarnation, ProbeKind::Join, reply);
                        return;
                    }
                    JoinHeard::Known => Ok(()),
                    JoinHeard::AlreadyLeft => Err(AnnounceError::AlreadyLeft { peer, incarnation }),
                    JoinHeard::TooMany => Err(AnnounceError::TooMany {
                        limit: self.config.max_announced,
                    }),
                    JoinHeard::IsSelf => Err(AnnounceError::IsSelf(peer)),
                };
                let _ = reply.send(refused);
            }
            Request::Leave {
                peer,
                incarnation,
                reply,
            } => {
                let heard = self.view.leave_heard(peer, incarnation);
                let label = match heard {
                    LeaveHeard::Probe => "probed",
                    LeaveHeard::Known => "known",
                    LeaveHeard::IsSelf => "invalid",
                };
                self.metrics.announcement("leave", label);
                match heard {
                    LeaveHeard::Probe => {
                        self.wait(peer, incarnation, ProbeKind::Leave, reply);
                        self.probe(peer, incarnation, ProbeKind::Leave, false);
                    }
                    LeaveHeard::Known => {
                        let _ = reply.send(Ok(()));
                    }
                    LeaveHeard::IsSelf => {
                        let _ = reply.send(Err(AnnounceError::IsSelf(peer)));
                    }
                }
            }
        }
    }

    fn wait(&mut self, peer: SocketAddr, incarnation: u64, kind: ProbeKind, reply: Reply) {
        self.waiting
            .entry((peer, incarnation, kind))
            .or_default()
            .push(reply);
    }

    fn probe(&mut self, peer: SocketAddr, incarnation: u64, kind: ProbeKind, gates: bool) {
        if !self.probing.insert((peer, incarnation, kind)) {
            return;
        }
        if gates {
            self.gating += 1;
        }
        let (self_addr, own, timeout, dialer) = (
            self.config.self_addr,
            self.config.incarnation,
            self.config.call_timeout,
            self.config.dialer.clone(),
        );
        self.probes.spawn(async move {
            let answer = announce(&dialer, peer, Kind::Identify, self_addr, own, timeout).await;
            Probed {
                peer,
                incarnation,
                kind,
                gates,
                answer,
            }
        });
    }

    fn on_probed(&mut self, probed: &Probed) {
        let Probed {
            peer,
            incarnation,
            kind,
            gates,
            ref answer,
        } = *probed;
        self.probing.remove(&(peer, incarnation, kind));
        let gates = gates && matches!(self.join, JoinRounds::Joining { .. });
        let result = probe_result(peer, incarnation, answer);
        let now = Instant::now();
        let (changes, confirmed) = match kind {
            ProbeKind::Join => (
                self.view.join_probed(peer, incarnation, result, now),
                result == ProbeResult::Serving,
            ),
            ProbeKind::Leave | ProbeKind::LeaveReported => {
                let reported = kind == ProbeKind::LeaveReported;
                let changes = self.view.leave_probed(peer, incarnation, result, reported, now);
                let believed = result == ProbeResult::Draining || (reported && result == ProbeResult::Gone);
                (changes, believed)
            }
        };
        let label = match kind {
            ProbeKind::Join => "join",
            ProbeKind::Leave => "leave",
            ProbeKind::LeaveReported => "leave_reported",
        };
        self.metrics
            .announcement(label, if confirmed { "confirmed" } else { "refuted" });
        if !confirmed && kind == ProbeKind::LeaveReported {
            // Often a restarted replica at the same address: not news.
            debug!(%peer, reason = %refutation(peer, incarnation, answer), "reported leave not confirmed");
        } else if !confirmed {
            warn!(%peer, kind = label, reason = %refutation(peer, incarnation, answer), "announcement not confirmed");
        }
        // Learned from another replica's answer (nobody waits for it): tell
        // the new member about this one too, so both target each other.
        let learned = kind == ProbeKind::Join
            && confirmed
            && !self.waiting.contains_key(&(peer, incarnation, kind))
            && !matches!(self.join, JoinRounds::NotReady | JoinRounds::Leaving);
        self.apply(changes);
        if learned {
            self.call(peer, Kind::Join, gates);
        }
        if let Ok(answer) = answer
            && confirmed
            && kind == ProbeKind::Join
        {
            for (other, other_incarnation) in answer.announced.clone() {
                self.heard_of(other, other_incarnation, gates);
            }
        }
        for reply in self
            .waiting
            .remove(&(peer, incarnation, kind))
            .unwrap_or_default()
        {
            let result = if confirmed {
                Ok(())
            } else {
                Err(AnnounceError::NotConfirmed(refutation(peer, incarnation, answer)))
            };
            let _ = reply.send(result);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let mut changes = self.view.tick(now);
        // A member by announcement alone that stopped answering is dropped;
        // DNS members go through the failure path (skipped, redelivered).
        let set = self.fanout.peer_set().borrow().clone();
        for (peer, link) in set.remotes() {
            if self.view.members().get(&peer) == Some(&Source::Announced)
                && link.status().skipped_until.is_some()
            {
                changes.extend(self.view.unreachable(peer, now));
            }
        }
        self.apply(changes);
        if let JoinRounds::Serving { ready_at, next } = self.join
            && let Some(after) = JOIN_ROUNDS_AFTER_READY.get(next)
            && now >= ready_at + *after
        {
            self.join = JoinRounds::Serving {
                ready_at,
                next: next + 1,
            };
            self.join_round(false);
        }
    }

    /// Logs and counts `changes` and hands the member set to the fan-out.
    fn apply(&mut self, changes: Vec<Change>) {
        for change in &changes {
            info!(peer = %change.peer, change = %change.kind, members = self.view.members().len(), "membership changed");
            let (kind, cause) = change.kind.labels();
            self.metrics.change(kind, cause);
        }
        let snapshot = PeerSnapshot {
            peers: self.view.members().keys().copied().collect(),
            ..(*self.dns).clone()
        };
        if !changes.is_empty() || self.fanout.peer_set().borrow().snapshot.as_ref() != &snapshot {
            self.fanout.update_peers(Arc::new(snapshot));
        }
        // The lists in Announce answers may change without a member changing.
        self.members_tx.send_replace(Arc::new(Members {
            sources: self.view.members().clone(),
            announced: self.view.announced_members().collect(),
            left: self.view.left_members().collect(),
        }));
    }
}

fn heard_label(heard: JoinHeard) -> &'static str {
    match heard {
        JoinHeard::Probe => "probed",
        JoinHeard::Known => "known",
        JoinHeard::AlreadyLeft => "already_left",
        JoinHeard::TooMany => "too_many",
        JoinHeard::IsSelf => "invalid",
    }
}

/// Sets the status of the server ("") and of the Replicast service.
pub async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(proto::SERVICE_NAME, status).await;
}
