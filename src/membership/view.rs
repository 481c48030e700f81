//! The membership rules: which replicas a Broadcast targets, from the DNS
//! view and the replicas' own announcements. Pure and synchronous: time,
//! DNS answers, announcements and probe results are inputs, so every rule
//! has a unit test (below) and the async shell (`super`) only does I/O.
//!
//! The rules, in order (the first that applies decides for an address):
//! 1. **Left.** A replica that announced it is leaving, and answered a
//!    probe saying it is draining with that incarnation, is not a member for
//!    `lease` after the leave, even while a stale DNS answer still lists it.
//!    So is one that another replica reports as left, when a probe finds it
//!    draining or finds nothing answering there any more (a joiner learns
//!    this way about replicas that left before it started).
//!    Only a verified join of a *different* incarnation (the same address
//!    restarted) ends that early; a late join of the left incarnation is
//!    ignored.
//! 2. **DNS.** An address in the last DNS answer is a member.
//! 3. **Announced.** An address not in DNS is a member if it announced a
//!    join, answered a probe with the same address and incarnation while
//!    serving, DNS has not yet listed and then dropped it, its join is
//!    younger than `lease`, and it has not stopped answering. Once DNS lists
//!    an announced replica, DNS decides for it: when a later answer drops it
//!    (the pod turned unready), it is gone.
//! 4. Anything else is not a member.
//!
//! At most `max_announced` addresses may wait or count as members by
//! announcement alone; further joins are refused, so whoever can reach the
//! port cannot grow the peer set without bound.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::time::Instant;

/// Where a member comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The discovery source lists it: the last DNS answer (or
    /// `--static-peers`).
    Dns,
    /// It announced a join and proved its identity; DNS has not listed it yet.
    Announced,
}

impl Source {
    /// The metric label and ListPeers text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dns => "dns",
            Self::Announced => "announced",
        }
    }
}

/// Settings of the rules.
#[derive(Debug, Clone, Copy)]
pub struct ViewConfig {
    /// This replica (never a member of its own view: it delivers to itself
    /// in-process).
    pub self_addr: SocketAddr,
    /// How long an announcement counts without DNS listing the replica, and
    /// how long a leave keeps a stale DNS answer from re-adding it.
    pub lease: Duration,
    /// Addresses that may count by announcement alone (waiting for their
    /// probe or members until DNS lists them).
    pub max_announced: usize,
}

/// What [`MembershipView::join_heard`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinHeard {
    /// New to this view: probe the address, then report with
    /// [`MembershipView::join_probed`].
    Probe,
    /// This incarnation is already known (a repeated announcement).
    Known,
    /// This incarnation left; a late or replayed join is ignored.
    AlreadyLeft,
    /// [`ViewConfig::max_announced`] addresses already count by announcement.
    TooMany,
    /// The announcement names this replica's own address.
    IsSelf,
}

/// What [`MembershipView::leave_heard`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveHeard {
    /// Probe the address (it must say it is draining with this incarnation),
    /// then report with [`MembershipView::leave_probed`].
    Probe,
    /// This leave is already recorded.
    Known,
    /// The announcement names this replica's own address.
    IsSelf,
}

/// What a probe of an announced address found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// It answered with the announced address and incarnation, serving.
    Serving,
    /// It answered with the announced address and incarnation, draining.
    Draining,
    /// Nothing answers there any more (connection refused, no answer).
    Gone,
    /// Something answered, but not as announced: another identity, or not
    /// the replica protocol.
    Refuted,
}

/// One change of the member set, for the log line and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub peer: SocketAddr,
    pub kind: ChangeKind,
}

/// How a member set changed for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Became a member (or changed source, e.g. announced → dns).
    Joined(Source),
    /// Stopped being a member.
    Left(LeftBecause),
}

/// Why an address stopped being a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeftBecause {
    /// It announced its leave (and the probe confirmed it).
    Announced,
    /// DNS stopped listing it.
    Dns,
    /// It was a member by announcement only and DNS did not list it within
    /// the lease.
    LeaseExpired,
    /// It was a member by announcement only and stopped answering.
    Unreachable,
}

impl ChangeKind {
    /// The `change` and `cause` labels of the membership metrics.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Self::Joined(source) => ("joined", source.as_str()),
            Self::Left(because) => (
                "left",
                match because {
                    LeftBecause::Announced => "announced",
                    LeftBecause::Dns => "dns",
                    LeftBecause::LeaseExpired => "lease_expired",
                    LeftBecause::Unreachable => "unreachable",
                },
            ),
        }
    }
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Joined(source) => write!(f, "joined ({})", source.as_str()),
            Self::Left(LeftBecause::Announced) => f.write_str("left (announced its leave)"),
            Self::Left(LeftBecause::Dns) => f.write_str("left (DNS no longer lists it)"),
            Self::Left(LeftBecause::LeaseExpired) => {
                f.write_str("left (announced, but DNS did not list it within the lease)")
            }
            Self::Left(LeftBecause::Unreachable) => {
                f.write_str("left (announced only, and stopped answering)")
            }
        }
    }
}

/// A join heard for one address.
#[derive(Debug, Clone, Copy)]
struct Join {
    incarnation: u64,
    heard_at: Instant,
    /// The probe confirmed it.
    verified: bool,
    /// DNS has listed the address since this join; from then on DNS decides.
    seen_in_dns: bool,
}

/// A verified leave for one address.
#[derive(Debug, Clone, Copy)]
struct Leave {
    incarnation: u64,
    at: Instant,
}

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    join: Option<Join>,
    leave: Option<Leave>,
}

/// The membership state of one replica (see the module docs for the rules).
#[derive(Debug)]
pub struct MembershipView {
    config: ViewConfig,
    dns: BTreeSet<SocketAddr>,
    entries: BTreeMap<SocketAddr, Entry>,
    /// The member set as of the last event, to report changes.
    members: BTreeMap<SocketAddr, Source>,
}

impl MembershipView {
    pub fn new(config: ViewConfig) -> Self {
        Self {
            config,
            dns: BTreeSet::new(),
            entries: BTreeMap::new(),
            members: BTreeMap::new(),
        }
    }

    /// The members with their source, sorted by address.
    pub fn members(&self) -> &BTreeMap<SocketAddr, Source> {
        &self.members
    }

    /// The incarnation this view knows for `peer` (from its join).
    pub fn incarnation(&self, peer: SocketAddr) -> Option<u64> {
        self.entries
            .get(&peer)
            .and_then(|e| e.join)
            .map(|j| j.incarnation)
    }

    /// Members by announcement alone, with their incarnation: what this
    /// replica tells others that may not have heard of them.
    pub fn announced_members(&self) -> impl Iterator<Item = (SocketAddr, u64)> + '_ {
        self.members
            .iter()
            .filter(|(_, source)| **source == Source::Announced)
            .filter_map(|(addr, _)| Some((*addr, self.incarnation(*addr)?)))
    }

    /// The replicas whose leave this view holds, with their incarnation:
    /// what this replica tells a joiner whose DNS may still list them.
    pub fn left_members(&self) -> impl Iterator<Item = (SocketAddr, u64)> + '_ {
        self.entries
            .iter()
            .filter_map(|(addr, e)| e.leave.map(|l| (*addr, l.incarnation)))
    }

    /// Whether `peer` is a member now.
    pub fn is_member(&self, peer: SocketAddr) -> bool {
        self.members.contains_key(&peer)
    }

    /// A new DNS answer replaces the DNS view.
    pub fn dns_answer(&mut self, peers: impl IntoIterator<Item = SocketAddr>, now: Instant) -> Vec<Change> {
        self.dns = peers
            .into_iter()
            .filter(|p| *p != self.config.self_addr)
            .collect();
        for (addr, entry) in &mut self.entries {
            if let Some(join) = &mut entry.join {
                if self.dns.contains(addr) {
                    join.seen_in_dns = true;
                } else if join.seen_in_dns {
                    // DNS listed it and dropped it again: DNS decides.
                    entry.join = None;
                }
            }
        }
        self.settle(now, None)
    }

    /// `peer` announced a join as `incarnation`.
    pub fn join_heard(&mut self, peer: SocketAddr, incarnation: u64, now: Instant) -> JoinHeard {
        if peer == self.config.self_addr {
            return JoinHeard::IsSelf;
        }
        let in_dns = self.dns.contains(&peer);
        let announced_only = self.announced_only_count();
        let entry = self.entries.entry(peer).or_default();
        if entry.leave.is_some_and(|l| l.incarnation == incarnation) {
            return JoinHeard::AlreadyLeft;
        }
        if entry.join.is_some_and(|j| j.incarnation == incarnation) {
            return JoinHeard::Known;
        }
        let replaces_announced = entry.join.is_some_and(|j| !j.seen_in_dns);
        if !in_dns && !replaces_announced && announced_only >= self.config.max_announced {
            return JoinHeard::TooMany;
        }
        entry.join = Some(Join {
            incarnation,
            heard_at: now,
            verified: false,
            seen_in_dns: in_dns,
        });
        JoinHeard::Probe
    }

    /// The probe of a join heard from `peer` as `incarnation` finished.
    pub fn join_probed(
        &mut self,
        peer: SocketAddr,
        incarnation: u64,
        result: ProbeResult,
        now: Instant,
    ) -> Vec<Change> {
        let Some(entry) = self.entries.get_mut(&peer) else {
            return Vec::new();
        };
        match entry.join {
            Some(mut join) if join.incarnation == incarnation => {
                if result == ProbeResult::Serving {
                    join.verified = true;
                    entry.join = Some(join);
                    // A new incarnation of a replica that left: it is back.
                    if entry.leave.is_some_and(|l| l.incarnation != incarnation) {
                        entry.leave = None;
                    }
                } else {
                    entry.join = None;
                }
            }
            // Superseded by a newer join meanwhile.
            _ => {}
        }
        self.settle(now, None)
    }

    /// `peer` announced that `incarnation` is leaving.
    pub fn leave_heard(&mut self, peer: SocketAddr, incarnation: u64) -> LeaveHeard {
        if peer == self.config.self_addr {
            return LeaveHeard::IsSelf;
        }
        match self.entries.get(&peer).and_then(|e| e.leave) {
            Some(leave) if leave.incarnation == incarnation => LeaveHeard::Known,
            _ => LeaveHeard::Probe,
        }
    }

    /// The probe of a leave of `peer` as `incarnation` finished. A leave
    /// `peer` announced itself is believed when it says it is draining; one
    /// another replica `reported` (it no longer targets `peer`) also when
    /// nothing answers at `peer` any more (it has gone since). Either way a
    /// forged leave cannot remove a replica that is serving.
    pub fn leave_probed(
        &mut self,
        peer: SocketAddr,
        incarnation: u64,
        result: ProbeResult,
        reported: bool,
        now: Instant,
    ) -> Vec<Change> {
        let believed = result == ProbeResult::Draining || (reported && result == ProbeResult::Gone);
        if !believed {
            return Vec::new();
        }
        let entry = self.entries.entry(peer).or_default();
        // A newer incarnation's verified join outranks an older one's leave.
        if entry
            .join
            .is_some_and(|j| j.verified && j.incarnation != incarnation)
        {
            return Vec::new();
        }
        entry.join = None;
        entry.leave = Some(Leave { incarnation, at: now });
        self.settle(now, Some((peer, LeftBecause::Announced)))
    }

    /// A member by announcement alone stopped answering (its link is
    /// failing): drop it. DNS members are left to the failure path (skips
    /// and redelivery), as a crashed replica may come back.
    pub fn unreachable(&mut self, peer: SocketAddr, now: Instant) -> Vec<Change> {
        if self.members.get(&peer) != Some(&Source::Announced) {
            return Vec::new();
        }
        if let Some(entry) = self.entries.get_mut(&peer) {
            entry.join = None;
        }
        self.settle(now, Some((peer, LeftBecause::Unreachable)))
    }

    /// Expires leases and leaves. Call it at least every second or so.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        self.settle(now, None)
    }

    /// How many addresses count by announcement alone.
    fn announced_only_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|(addr, e)| e.join.is_some_and(|j| !j.seen_in_dns) && !self.dns.contains(addr))
            .count()
    }

    /// Applies expiry, recomputes the members and reports what changed.
    /// `cause` names why an address dropped out when the caller knows.
    fn settle(&mut self, now: Instant, cause: Option<(SocketAddr, LeftBecause)>) -> Vec<Change> {
        let lease = self.config.lease;
        let mut expired = BTreeSet::new();
        self.entries.retain(|addr, entry| {
            if entry.leave.is_some_and(|l| now.duration_since(l.at) >= lease) {
                entry.leave = None;
            }
            if let Some(join) = entry.join
                && !join.seen_in_dns
                && now.duration_since(join.heard_at) >= lease
            {
                entry.join = None;
                expired.insert(*addr);
            }
            entry.join.is_some() || entry.leave.is_some()
        });
        let mut members = BTreeMap::new();
        for addr in &self.dns {
            if self.entries.get(addr).is_none_or(|e| e.leave.is_none()) {
                members.insert(*addr, Source::Dns);
            }
        }
        for (addr, entry) in &self.entries {
            if let Some(join) = entry.join
                && join.verified
                && entry.leave.is_none()
                && !self.dns.contains(addr)
            {
                members.insert(*addr, Source::Announced);
            }
        }
        let mut changes = Vec::new();
        for (addr, source) in &self.members {
            if !members.contains_key(addr) {
                let because = match cause {
                    Some((peer, because)) if peer == *addr => because,
                    _ if expired.contains(addr) => LeftBecause::LeaseExpired,
                    _ if *source == Source::Dns && !self.dns.contains(addr) => LeftBecause::Dns,
                    _ if self.entries.get(addr).is_some_and(|e| e.leave.is_some()) => LeftBecause::Announced,
                    _ => LeftBecause::Dns,
                };
                changes.push(Change {
                    peer: *addr,
                    kind: ChangeKind::Left(because),
                });
            }
        }
        for (addr, source) in &members {
            if self.members.get(addr) != Some(source) {
                changes.push(Change {
                    peer: *addr,
                    kind: ChangeKind::Joined(*source),
                });
            }
        }
        self.members = members;
        changes
    }
}

#[cfg(test)]
mod tests;
