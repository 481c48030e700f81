//! The ledger: every Broadcast the clients made (with its receipts and its
//! failed attempts) and every delivery each replica's subscriber read, and the
//! accounting over them that decides whether a scenario kept replicast's
//! promises.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    time::{Duration, Instant},
};

use crate::lab::BROADCAST_TIMEOUT;

/// How far past the replicas' --broadcast-timeout an accepted Broadcast may
/// answer (scheduling on a loaded machine) before it counts as having
/// ignored its deadline.
const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// One logical Broadcast: an id, tried on one replica after another until one
/// accepted it.
#[derive(Debug, Clone)]
pub struct BroadcastRecord {
    pub id: String,
    pub started: Instant,
    pub finished: Instant,
    /// Attempts that got no receipts (refused, unreachable, no answer).
    pub failed_attempts: Vec<FailedAttempt>,
    /// The receipts, when a replica accepted the Broadcast.
    pub accepted: Option<Accepted>,
}

#[derive(Debug, Clone)]
pub struct FailedAttempt {
    pub entry: usize,
    pub started: Instant,
    pub ended: Instant,
    pub error: String,
}

#[derive(Debug, Clone)]
pub struct Accepted {
    /// The replica that accepted it and fanned it out.
    pub entry: usize,
    pub started: Instant,
    /// The Broadcast's status (OK, or why the ack policy was not met).
    pub code: tonic::Code,
    /// How long the accepting attempt took.
    pub latency: Duration,
    pub receipts: Vec<Receipt>,
}

/// One replica's receipt for one Broadcast.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub slot: usize,
    pub code: i32,
    /// The sequence number the replica gave the message (when acked).
    pub sequence: u64,
}

impl Receipt {
    pub fn acked(&self) -> bool {
        self.code == 0
    }
}

/// What one subscriber read from one incarnation of one replica.
#[derive(Debug)]
pub struct Stream {
    pub first_read: Instant,
    /// (sequence, message id), in the order read.
    pub deliveries: Vec<(u64, String)>,
    /// Sequence numbers that were not the previous one plus one.
    pub sequence_errors: Vec<String>,
}

impl Stream {
    fn last_sequence(&self) -> u64 {
        self.deliveries.last().map_or(0, |(sequence, _)| *sequence)
    }
}

/// A fault injected into one replica, from when it began until the scenario
/// restored it.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub slot: usize,
    pub kind: FaultKind,
    pub began: Instant,
    pub restored: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `kill -9`; a new process was started at `restarted`. What it
    /// acknowledged but its subscriber had not read yet died with it.
    Killed {
        restarted: Instant,
    },
    /// SIGTERM; the process drained and exited at `exited`, then a new one
    /// was started.
    Terminated {
        exited: Instant,
    },
    /// SIGTERM; the process drained and exited at `exited`, and nothing
    /// replaced it at its address (a rollout onto new pods). From then on no
    /// Broadcast may target it: a receipt of it after `exited` is a
    /// healthy-replica failure.
    Retired {
        exited: Instant,
    },
    Frozen,
    CutOff,
    /// A new replica, from its scheduling until it was ready.
    Joined,
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub broadcasts: Vec<BroadcastRecord>,
    /// slot -> its incarnations' streams, in the order first read.
    pub streams: BTreeMap<usize, Vec<(u64, Stream)>>,
    /// Subscriber errors other than the expected reconnects.
    pub subscriber_errors: Vec<String>,
}

/// For each replica: message id -> (incarnation, sequence) of every copy read.
type Reads<'a> = HashMap<usize, HashMap<&'a str, Vec<(u64, u64)>>>;

impl Ledger {
    pub fn record_delivery(&mut self, slot: usize, incarnation: u64, sequence: u64, id: String) {
        let streams = self.streams.entry(slot).or_default();
        if streams.last().is_none_or(|(current, _)| *current != incarnation) {
            let stream = Stream {
                first_read: Instant::now(),
                deliveries: Vec::new(),
                sequence_errors: Vec::new(),
            };
            streams.push((incarnation, stream));
        }
        let stream = &mut streams.last_mut().expect("just pushed").1;
        if sequence != stream.last_sequence() + 1 {
            stream.sequence_errors.push(format!(
                "replica {slot} incarnation {incarnation:x}: sequence {sequence} after {}",
                stream.last_sequence()
            ));
        }
        stream.deliveries.push((sequence, id));
    }

    fn reads(&self) -> Reads<'_> {
        let mut reads: Reads<'_> = HashMap::new();
        for (slot, streams) in &self.streams {
            let of_slot = reads.entry(*slot).or_default();
            for (incarnation, stream) in streams {
                for (sequence, id) in &stream.deliveries {
                    of_slot
                        .entry(id.as_str())
                        .or_default()
                        .push((*incarnation, *sequence));
                }
            }
        }
        reads
    }

    /// Receipts whose message the replica's subscriber has not read yet,
    /// minus those that died with a killed process: what the settling phase
    /// waits for (redeliveries still under way).
    pub fn missing(&self, faults: &[Fault]) -> usize {
        let reads = self.reads();
        self.receipts()
            .filter(|(b, r)| {
                !reads
                    .get(&r.slot)
                    .is_some_and(|ids| ids.contains_key(b.id.as_str()))
            })
            .filter(|(b, r)| !(r.acked() && self.died_with_kill(b, r, faults)))
            .count()
    }

    fn receipts(&self) -> impl Iterator<Item = (&BroadcastRecord, &Receipt)> {
        self.broadcasts
            .iter()
            .filter_map(|b| b.accepted.as_ref().map(|a| (b, a)))
            .flat_map(|(b, a)| a.receipts.iter().map(move |r| (b, r)))
    }

    /// Acknowledged by a replica that was then killed with -9, with a
    /// sequence number its subscriber had not reached when it died: the
    /// message was in the process's memory only.
    fn died_with_kill(&self, broadcast: &BroadcastRecord, receipt: &Receipt, faults: &[Fault]) -> bool {
        faults.iter().any(|fault| {
            let FaultKind::Killed { restarted } = fault.kind else {
                return false;
            };
            // The killed incarnation acknowledged it: before the kill, and
            // the answer came back before a new process existed.
            let by_killed_incarnation = fault.slot == receipt.slot
                && broadcast.started <= fault.began
                && broadcast.finished < restarted;
            let last_read = self
                .streams
                .get(&fault.slot)
                .and_then(|streams| streams.iter().rev().find(|(_, s)| s.first_read < fault.began))
                .map_or(0, |(_, stream)| stream.last_sequence());
            by_killed_incarnation && receipt.sequence > last_read
        })
    }

    /// When `fault`'s replica was acknowledged by every Broadcast targeting
    /// it again: the start of the first Broadcast after its last failure
    /// (`None` if the last ones still failed).
    fn recovered(&self, fault: &Fault) -> Option<Instant> {
        let mut after_restore: Vec<(Instant, bool)> = self
            .receipts()
            .filter(|(b, r)| r.slot == fault.slot && b.started >= fault.restored)
            .map(|(b, r)| (b.started, r.acked()))
            .collect();
        after_restore.sort_by_key(|(started, _)| *started);
        let first_good = match after_restore.iter().rposition(|(_, acked)| !acked) {
            Some(last_failure) => last_failure + 1,
            None => 0,
        };
        after_restore.get(first_good).map(|(started, _)| *started)
    }

    /// The accounting of a scenario. `window` is when the scenario's trouble
    /// lasted, when that is more than its replica faults (a DNS outage).
    pub fn report(&self, title: &str, faults: &[Fault], window: Option<(Instant, Instant)>) -> Report {
        let mut report = Report {
            title: title.to_owned(),
            sent: self.broadcasts.len(),
            ..Report::default()
        };
        let reads = self.reads();
        let (began, ended) = window.unwrap_or_else(|| {
            let began = faults.iter().map(|f| f.began).min();
            let ended = faults.iter().map(|f| f.restored).max();
            (
                began.unwrap_or_else(Instant::now),
                ended.unwrap_or_else(Instant::now),
            )
        });

        // A faulted replica counts as faulted from the fault until every
        // Broadcast that targets it acknowledges it again: peers that had
        // marked it failing take it back after a probe. Only then are its
        // receipts held to "healthy" again.
        let recovered: Vec<(Fault, Option<Instant>)> = faults
            .iter()
            .map(|fault| (*fault, self.recovered(fault)))
            .collect();
        for (fault, recovered) in &recovered {
            if matches!(fault.kind, FaultKind::Retired { .. }) {
                continue;
            }
            match recovered {
                Some(at) => report
                    .rejoin
                    .push((fault.slot, at.saturating_duration_since(fault.restored))),
                None => report.violations.push(format!(
                    "replica {} still failed Broadcasts at the end of the load, after it was restored",
                    fault.slot
                )),
            }
        }
        let faulted = |slot: usize, from: Instant, to: Instant| {
            recovered.iter().any(|(fault, recovered)| {
                // A retired replica is excused only until it exited.
                let end = match fault.kind {
                    FaultKind::Retired { .. } => Some(fault.restored),
                    _ => *recovered,
                };
                fault.slot == slot && to >= fault.began && end.is_none_or(|end| from < end)
            })
        };

        for broadcast in &self.broadcasts {
            report.retries += broadcast.failed_attempts.len();
            // A healthy replica answers a client, whatever else is failing.
            for attempt in &broadcast.failed_attempts {
                if !faulted(attempt.entry, attempt.started, attempt.ended) {
                    report.healthy_failures += 1;
                    report.violations.push(format!(
                        "{}: healthy replica {} did not take the Broadcast: {}",
                        broadcast.id, attempt.entry, attempt.error
                    ));
                }
            }
            let Some(accepted) = &broadcast.accepted else {
                report.unconfirmed += 1;
                report.violations.push(format!(
                    "{}: no replica accepted it in {} attempts",
                    broadcast.id,
                    broadcast.failed_attempts.len()
                ));
                continue;
            };
            let entry_faulted = faulted(accepted.entry, accepted.started, broadcast.finished);
            if broadcast.started >= began && broadcast.started <= ended {
                report.sent_during_fault += 1;
                report.worst_latency = report.worst_latency.max(accepted.latency);
                report.worst_with_retries = report
                    .worst_with_retries
                    .max(broadcast.finished.duration_since(broadcast.started));
            }
            if !entry_faulted && accepted.latency > BROADCAST_TIMEOUT + DEADLINE_SLACK {
                report.violations.push(format!(
                    "{}: healthy replica {} answered after {:?}, past its {BROADCAST_TIMEOUT:?} deadline",
                    broadcast.id, accepted.entry, accepted.latency
                ));
            }
            if accepted.receipts.iter().all(Receipt::acked) {
                report.fully_acked += 1;
            }
            for receipt in &accepted.receipts {
                let copies = reads
                    .get(&receipt.slot)
                    .and_then(|ids| ids.get(broadcast.id.as_str()))
                    .map_or(&[][..], Vec::as_slice);
                if receipt.acked() {
                    report.acks += 1;
                    if let Some(Fault {
                        kind: FaultKind::Terminated { exited } | FaultKind::Retired { exited },
                        ..
                    }) = fault_at(faults, receipt.slot, broadcast.started)
                        && broadcast.started < *exited
                    {
                        report.acked_while_draining += 1;
                    }
                    if copies.is_empty() {
                        if self.died_with_kill(broadcast, receipt, faults) {
                            report.died_with_kill += 1;
                        } else {
                            report.lost += 1;
                            report.violations.push(format!(
                                "{}: acknowledged by replica {} (sequence {}) but never read from it",
                                broadcast.id, receipt.slot, receipt.sequence
                            ));
                        }
                    } else if !copies.iter().any(|(_, sequence)| *sequence == receipt.sequence) {
                        report.violations.push(format!(
                            "{}: replica {} acknowledged it as sequence {} but its subscriber read it as {:?}",
                            broadcast.id, receipt.slot, receipt.sequence, copies
                        ));
                    }
                } else if !copies.is_empty() {
                    report.redelivered += 1;
                } else {
                    report.lost += 1;
                    report.violations.push(format!(
                        "{}: replica {} missed it (code {}) and it was not redelivered",
                        broadcast.id, receipt.slot, receipt.code
                    ));
                }
                // A faulted entry replica (cut off, frozen) rightly reports
                // the healthy ones it could not reach.
                if !receipt.acked()
                    && !faulted(receipt.slot, broadcast.started, broadcast.finished)
                    && !entry_faulted
                {
                    report.healthy_failures += 1;
                    report.violations.push(format!(
                        "{}: healthy replica {} failed with code {} (Broadcast {:?})",
                        broadcast.id, receipt.slot, receipt.code, accepted.code
                    ));
                }
            }
        }

        let acked: HashMap<(usize, &str), bool> = self
            .receipts()
            .map(|(b, r)| ((r.slot, b.id.as_str()), r.acked()))
            .collect();
        for (slot, streams) in &self.streams {
            let killed = faults
                .iter()
                .any(|f| f.slot == *slot && matches!(f.kind, FaultKind::Killed { .. }));
            for (incarnation, stream) in streams {
                report.delivered += stream.deliveries.len();
                report.incarnations += 1;
                for error in &stream.sequence_errors {
                    report.sequence_errors += 1;
                    report.violations.push(error.clone());
                }
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for (_, id) in &stream.deliveries {
                    *seen.entry(id).or_default() += 1;
                }
                for (id, count) in seen.into_iter().filter(|(_, count)| *count > 1) {
                    report.duplicates += count - 1;
                    report.violations.push(format!(
                        "replica {slot} incarnation {incarnation:x}: {id} delivered {count} times"
                    ));
                }
            }
            // The same id read from two incarnations of one replica: fine
            // when the first one never acknowledged it (it was delivered,
            // then the process died or closed before the ack left, and the
            // sender redelivered to the next incarnation); a duplicate when it
            // was acknowledged, unless the process was killed (at-least-once
            // across a crash).
            let of_slot = reads.get(slot).into_iter().flatten();
            for (id, copies) in of_slot {
                let incarnations = {
                    let mut seen: Vec<u64> = copies.iter().map(|(incarnation, _)| *incarnation).collect();
                    seen.dedup();
                    seen.len()
                };
                if incarnations < 2 {
                    continue;
                }
                if killed {
                    report.again_after_restart += incarnations - 1;
                } else if acked.get(&(*slot, *id)).copied().unwrap_or(false) {
                    report.duplicates += incarnations - 1;
                    report.violations.push(format!(
                        "replica {slot}: {id} was acknowledged, and delivered by {incarnations} incarnations"
                    ));
                } else {
                    report.again_after_restart += incarnations - 1;
                }
            }
        }
        report.violations.extend(self.subscriber_errors.iter().cloned());
        report
    }
}

/// The fault `slot` was under at `at`, if any.
fn fault_at(faults: &[Fault], slot: usize, at: Instant) -> Option<&Fault> {
    faults
        .iter()
        .find(|f| f.slot == slot && at >= f.began && at <= f.restored)
}

/// One scenario's accounting, printed as a table.
#[derive(Debug, Default)]
pub struct Report {
    pub title: String,
    /// Broadcasts the clients made (distinct ids).
    pub sent: usize,
    /// ...started while a fault was in place.
    pub sent_during_fault: usize,
    /// ...that no replica accepted, whatever the clients retried.
    pub unconfirmed: usize,
    /// ...acknowledged by every replica they targeted.
    pub fully_acked: usize,
    /// Receipts with code 0 (replica x message).
    pub acks: usize,
    /// ...from a replica that had been sent SIGTERM and was draining.
    pub acked_while_draining: usize,
    /// Deliveries the subscribers read (replica x message).
    pub delivered: usize,
    /// A receipt said the replica missed it; its subscriber got it later.
    pub redelivered: usize,
    /// The same id twice in one subscriber stream, or an acknowledged one in
    /// two incarnations of a replica that was not killed.
    pub duplicates: usize,
    pub sequence_errors: usize,
    /// Acknowledged or missed, and never read.
    pub lost: usize,
    /// Acknowledged by a replica killed with -9 past what its subscriber had
    /// read: they died with the process.
    pub died_with_kill: usize,
    /// Read from one incarnation and again from the next (see `report`).
    pub again_after_restart: usize,
    /// Failed attempts and receipts of replicas that were not under a fault.
    pub healthy_failures: usize,
    /// Client attempts that got no receipts (the entry replica was down).
    pub retries: usize,
    pub incarnations: usize,
    /// Worst latency of an accepted Broadcast call started during the faults.
    pub worst_latency: Duration,
    /// The same, from the first attempt (client retries included).
    pub worst_with_retries: Duration,
    /// Per faulted replica: from its restoration until every Broadcast
    /// acknowledged it again.
    pub rejoin: Vec<(usize, Duration)>,
    pub violations: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\n### {}\n", self.title)?;
        writeln!(
            f,
            "| sent (during fault) | acknowledged (all / receipts) | delivered | redelivered | duplicates | lost | died with kill -9 | worst latency during fault (call / with client retries) |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|")?;
        writeln!(
            f,
            "| {} ({}) | {} / {} | {} | {} | {} | {} | {} | {} ms / {} ms |",
            self.sent,
            self.sent_during_fault,
            self.fully_acked,
            self.acks,
            self.delivered,
            self.redelivered,
            self.duplicates + self.sequence_errors,
            self.lost,
            self.died_with_kill,
            self.worst_latency.as_millis(),
            self.worst_with_retries.as_millis(),
        )?;
        let rejoin: Vec<String> = self
            .rejoin
            .iter()
            .map(|(slot, after)| format!("replica {slot} {} ms after it was restored", after.as_millis()))
            .collect();
        writeln!(
            f,
            "\nunconfirmed {}, healthy-replica failures {}, client retries {}, incarnations {}, \
             acknowledged while draining {}, read again from a new incarnation {}; \
             every Broadcast acknowledged again: {}",
            self.unconfirmed,
            self.healthy_failures,
            self.retries,
            self.incarnations,
            self.acked_while_draining,
            self.again_after_restart,
            if rejoin.is_empty() {
                "-".to_owned()
            } else {
                rejoin.join(", ")
            },
        )?;
        for violation in self.violations.iter().take(20) {
            writeln!(f, "VIOLATION: {violation}")?;
        }
        if self.violations.len() > 20 {
            writeln!(f, "... and {} more violations", self.violations.len() - 20)?;
        }
        Ok(())
    }
}
