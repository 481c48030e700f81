//! The ledger: every Broadcast the clients made (with its receipts) and every
//! delivery each replica's subscriber read, and the accounting over them that
//! decides whether a scenario kept replicast's promises.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    time::{Duration, Instant},
};

/// One logical Broadcast: an id, tried on one replica after another until one
/// accepted it.
#[derive(Debug, Clone)]
pub struct BroadcastRecord {
    pub id: String,
    pub started: Instant,
    pub finished: Instant,
    pub attempts: u32,
    /// The receipts, when a replica accepted the Broadcast.
    pub accepted: Option<Accepted>,
    /// Why the last attempt failed, when none accepted it.
    pub last_error: String,
}

#[derive(Debug, Clone)]
pub struct Accepted {
    /// The replica that accepted it and fanned it out.
    pub entry: usize,
    /// The Broadcast's status (OK, or why the ack policy was not met).
    pub code: tonic::Code,
    /// How long the accepting attempt took.
    pub latency: Duration,
    /// Per targeted replica: its slot and its receipt.
    pub receipts: Vec<Receipt>,
}

#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub slot: usize,
    pub code: i32,
}

impl Receipt {
    pub fn acked(&self) -> bool {
        self.code == 0
    }
}

/// What one subscriber read from one incarnation of one replica.
#[derive(Debug, Default)]
pub struct Stream {
    pub ids: Vec<String>,
    last_sequence: u64,
    /// Sequence numbers that were not the previous one plus one.
    pub sequence_errors: Vec<String>,
}

/// A fault injected into one replica, from when it began until the scenario
/// restored it.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub slot: usize,
    pub began: Instant,
    pub restored: Instant,
    /// `kill -9`: what it acknowledged but its subscriber had not read yet
    /// died with it.
    pub killed: bool,
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub broadcasts: Vec<BroadcastRecord>,
    /// slot -> incarnation -> stream, incarnations in the order first seen.
    pub streams: BTreeMap<usize, Vec<(u64, Stream)>>,
    /// Subscriber errors other than the expected reconnects.
    pub subscriber_errors: Vec<String>,
}

impl Ledger {
    pub fn record_delivery(&mut self, slot: usize, incarnation: u64, sequence: u64, id: String) {
        let streams = self.streams.entry(slot).or_default();
        if streams.last().is_none_or(|(current, _)| *current != incarnation) {
            streams.push((incarnation, Stream::default()));
        }
        let stream = &mut streams.last_mut().expect("just pushed").1;
        if sequence != stream.last_sequence + 1 {
            stream.sequence_errors.push(format!(
                "replica {slot} incarnation {incarnation:x}: sequence {sequence} after {}",
                stream.last_sequence
            ));
        }
        stream.last_sequence = sequence;
        stream.ids.push(id);
    }

    /// Ids each live replica should have by now and has not: what was
    /// acknowledged or targeted at it (a missed one must be redelivered),
    /// minus what died with a killed process.
    pub fn missing(&self, faults: &[Fault]) -> usize {
        let delivered = self.delivered_sets();
        self.broadcasts
            .iter()
            .filter_map(|b| b.accepted.as_ref().map(|a| (b, a)))
            .flat_map(|(b, a)| a.receipts.iter().map(move |r| (b, r)))
            .filter(|(b, r)| {
                !delivered
                    .get(&r.slot)
                    .is_some_and(|ids| ids.contains_key(b.id.as_str()))
            })
            .filter(|(b, r)| !(r.acked() && died_with_kill(b, r.slot, faults)))
            .count()
    }

    fn delivered_sets(&self) -> HashMap<usize, HashMap<&str, usize>> {
        let mut sets: HashMap<usize, HashMap<&str, usize>> = HashMap::new();
        for (slot, streams) in &self.streams {
            let set = sets.entry(*slot).or_default();
            for (_, stream) in streams {
                for id in &stream.ids {
                    *set.entry(id.as_str()).or_default() += 1;
                }
            }
        }
        sets
    }

    /// When `fault`'s replica was acknowledged by every Broadcast targeting
    /// it again: the start of the first Broadcast after its last failure
    /// (`None` if the last ones still failed).
    fn recovered(&self, fault: &Fault) -> Option<Instant> {
        let mut after_restore: Vec<(Instant, bool)> = self
            .broadcasts
            .iter()
            .filter(|b| b.started >= fault.restored)
            .filter_map(|b| {
                let receipt = b
                    .accepted
                    .as_ref()?
                    .receipts
                    .iter()
                    .find(|r| r.slot == fault.slot)?;
                Some((b.started, receipt.acked()))
            })
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
        let delivered = self.delivered_sets();
        let span = match window {
            Some((began, ended)) => (Some(began), Some(ended)),
            None => (
                faults.iter().map(|f| f.began).min(),
                faults.iter().map(|f| f.restored).max(),
            ),
        };

        // A faulted replica counts as faulted from the fault until every
        // Broadcast that targets it acknowledges it again: peers that had
        // marked it failing send it traffic only once their probe backoff
        // expires. Only then are its receipts held to "healthy" again.
        let recovered: Vec<(Fault, Option<Instant>)> = faults
            .iter()
            .map(|fault| (*fault, self.recovered(fault)))
            .collect();
        for (fault, recovered) in &recovered {
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
        let faulted = |slot: usize, broadcast: &BroadcastRecord| {
            recovered.iter().any(|(fault, recovered)| {
                fault.slot == slot
                    && broadcast.finished >= fault.began
                    && recovered.is_none_or(|end| broadcast.started < end)
            })
        };

        for broadcast in &self.broadcasts {
            let during_fault = span.0.is_some_and(|began| broadcast.started >= began)
                && span.1.is_some_and(|restored| broadcast.started <= restored);
            report.retries += broadcast.attempts.saturating_sub(1) as usize;
            let Some(accepted) = &broadcast.accepted else {
                report.unconfirmed += 1;
                report.violations.push(format!(
                    "{}: no replica accepted it in {} attempts ({})",
                    broadcast.id, broadcast.attempts, broadcast.last_error
                ));
                continue;
            };
            if during_fault {
                report.sent_during_fault += 1;
                report.worst_latency = report.worst_latency.max(accepted.latency);
                report.worst_with_retries = report
                    .worst_with_retries
                    .max(broadcast.finished.duration_since(broadcast.started));
            }
            if accepted.receipts.iter().all(Receipt::acked) {
                report.fully_acked += 1;
            }
            for receipt in &accepted.receipts {
                let copies = delivered
                    .get(&receipt.slot)
                    .and_then(|ids| ids.get(broadcast.id.as_str()))
                    .copied()
                    .unwrap_or(0);
                if receipt.acked() {
                    report.acks += 1;
                    if copies == 0 {
                        if died_with_kill(broadcast, receipt.slot, faults) {
                            report.died_with_kill += 1;
                        } else {
                            report.lost += 1;
                            report.violations.push(format!(
                                "{}: acknowledged by replica {} but never delivered to its subscriber",
                                broadcast.id, receipt.slot
                            ));
                        }
                    }
                } else if copies > 0 {
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
                    && !faulted(receipt.slot, broadcast)
                    && !faulted(accepted.entry, broadcast)
                {
                    report.healthy_failures += 1;
                    report.violations.push(format!(
                        "{}: healthy replica {} failed with code {} (Broadcast {:?})",
                        broadcast.id, receipt.slot, receipt.code, accepted.code
                    ));
                }
            }
        }

        for (slot, streams) in &self.streams {
            let killed = faults.iter().any(|f| f.slot == *slot && f.killed);
            let mut incarnations_of: HashMap<&str, usize> = HashMap::new();
            for (incarnation, stream) in streams {
                report.delivered += stream.ids.len();
                report.incarnations += 1;
                for error in &stream.sequence_errors {
                    report.sequence_errors += 1;
                    report.violations.push(error.clone());
                }
                let mut seen: HashMap<&str, usize> = HashMap::new();
                for id in &stream.ids {
                    *seen.entry(id).or_default() += 1;
                }
                for (id, count) in seen {
                    if count > 1 {
                        report.duplicates += count - 1;
                        report.violations.push(format!(
                            "replica {slot} incarnation {incarnation:x}: {id} delivered {count} times"
                        ));
                    }
                    *incarnations_of.entry(id).or_default() += 1;
                }
            }
            // The same id in two incarnations: at-least-once across a crash
            // (delivered, then killed before its ack left). Never otherwise.
            for (id, count) in incarnations_of {
                if count > 1 {
                    if killed {
                        report.again_after_crash += count - 1;
                    } else {
                        report.duplicates += count - 1;
                        report
                            .violations
                            .push(format!("replica {slot}: {id} delivered by {count} incarnations"));
                    }
                }
            }
        }
        report.violations.extend(self.subscriber_errors.iter().cloned());
        report
    }
}

/// The message was acknowledged by `slot` before `slot` was killed with -9.
fn died_with_kill(broadcast: &BroadcastRecord, slot: usize, faults: &[Fault]) -> bool {
    faults
        .iter()
        .any(|f| f.killed && f.slot == slot && broadcast.started <= f.began)
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
    /// Deliveries the subscribers read (replica x message).
    pub delivered: usize,
    /// A receipt said the replica missed it; its subscriber got it later.
    pub redelivered: usize,
    /// The same id twice in one subscriber stream, or in two incarnations of
    /// a replica that was not killed.
    pub duplicates: usize,
    pub sequence_errors: usize,
    /// Acknowledged or missed and never delivered.
    pub lost: usize,
    /// Acknowledged by a replica killed with -9 and not yet read by its
    /// subscriber: they died with the process.
    pub died_with_kill: usize,
    /// Delivered by a killed replica and again by its next incarnation.
    pub again_after_crash: usize,
    /// Non-zero receipts of replicas that were not under a fault.
    pub healthy_failures: usize,
    /// Client attempts beyond the first (the entry replica was unreachable).
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
             delivered again after a crash {}; every Broadcast acknowledged again: {}",
            self.unconfirmed,
            self.healthy_failures,
            self.retries,
            self.incarnations,
            self.again_after_crash,
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
