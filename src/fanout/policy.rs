//! Ack-policy arithmetic: when a Broadcast may return, and whether it succeeded.

use crate::proto::v1::AckPolicy;

/// How many acknowledgements `policy` needs out of `targets` replicas.
pub fn required_acks(policy: AckPolicy, targets: usize) -> usize {
    match policy {
        AckPolicy::Unspecified | AckPolicy::All => targets,
        AckPolicy::Quorum => targets / 2 + 1,
        AckPolicy::One => targets.min(1),
        AckPolicy::None => 0,
    }
}

/// `Unspecified` means ALL; receipts always name the applied policy.
pub fn effective(policy: AckPolicy) -> AckPolicy {
    match policy {
        AckPolicy::Unspecified => AckPolicy::All,
        other => other,
    }
}

/// Whether the policy is decided yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Enough replicas acknowledged.
    Met,
    /// Too many replicas failed for the policy ever to be met.
    Unreachable,
}

/// Counts receipts as they arrive.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    targets: usize,
    required: usize,
    acked: usize,
    failed: usize,
}

impl Tally {
    pub fn new(policy: AckPolicy, targets: usize) -> Self {
        Self {
            targets,
            required: required_acks(policy, targets),
            acked: 0,
            failed: 0,
        }
    }

    pub fn ack(&mut self) {
        self.acked += 1;
    }

    pub fn fail(&mut self) {
        self.failed += 1;
    }

    pub fn acked(&self) -> usize {
        self.acked
    }

    pub fn required(&self) -> usize {
        self.required
    }

    /// Hops that have not answered yet.
    pub fn outstanding(&self) -> usize {
        self.targets - self.acked - self.failed
    }

    /// `Some` as soon as the outcome can no longer change.
    pub fn verdict(&self) -> Option<Verdict> {
        let outstanding = self.outstanding();
        if self.acked >= self.required {
            Some(Verdict::Met)
        } else if self.acked + outstanding < self.required {
            Some(Verdict::Unreachable)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_counts() {
        for (policy, n, want) in [
            (AckPolicy::All, 3, 3),
            (AckPolicy::Unspecified, 3, 3),
            (AckPolicy::Quorum, 1, 1),
            (AckPolicy::Quorum, 2, 2),
            (AckPolicy::Quorum, 3, 2),
            (AckPolicy::Quorum, 4, 3),
            (AckPolicy::Quorum, 5, 3),
            (AckPolicy::One, 5, 1),
            (AckPolicy::None, 5, 0),
        ] {
            assert_eq!(required_acks(policy, n), want, "{policy:?} of {n}");
        }
    }

    #[test]
    fn all_fails_on_first_failure() {
        let mut t = Tally::new(AckPolicy::All, 3);
        t.ack();
        assert_eq!(t.verdict(), None);
        t.fail();
        assert_eq!(t.verdict(), Some(Verdict::Unreachable));
    }

    #[test]
    fn quorum_tolerates_a_minority() {
        let mut t = Tally::new(AckPolicy::Quorum, 3);
        t.fail();
        assert_eq!(t.verdict(), None);
        t.ack();
        assert_eq!(t.verdict(), None);
        t.ack();
        assert_eq!(t.verdict(), Some(Verdict::Met));
        let mut t = Tally::new(AckPolicy::Quorum, 3);
        t.fail();
        t.fail();
        assert_eq!(t.verdict(), Some(Verdict::Unreachable));
    }

    #[test]
    fn one_and_none() {
        let mut t = Tally::new(AckPolicy::One, 3);
        t.fail();
        t.fail();
        assert_eq!(t.verdict(), None);
        t.ack();
        assert_eq!(t.verdict(), Some(Verdict::Met));
        assert_eq!(Tally::new(AckPolicy::None, 3).verdict(), Some(Verdict::Met));
    }
}
