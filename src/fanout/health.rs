//! Per-peer health: stop paying a full deadline for a peer that keeps failing.
//!
//! After [`FAILURES_TO_SKIP`] failures in a row, hops to a peer are skipped
//! at once (their receipts say UNAVAILABLE and why) until a backoff expires;
//! then one hop goes through as a probe. A probe that succeeds makes the peer
//! healthy again, with no restart; one that fails doubles the backoff (with
//! jitter, up to [`MAX_BACKOFF`]). The link's redelivery also probes a
//! failing peer it holds messages for, every round and off the Broadcast
//! path, so a peer that comes back usually rejoins long before that backoff
//! expires. Pure state, owned by the peer's link task.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::HopError;

/// Failures in a row before hops are skipped.
pub const FAILURES_TO_SKIP: u32 = 3;
/// The first backoff after a peer is marked failing.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest backoff between probes.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Whether a hop may go to the peer now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send it. `probe`: the peer is failing and this hop is the one probe.
    Send { probe: bool },
    /// Do not: the peer is failing.
    Skip {
        /// Failures in a row so far.
        failures: u32,
        /// Until the next probe.
        retry_in: Duration,
    },
}

/// What the link has seen of one peer lately.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    failures_in_a_row: u32,
    last_error: Option<HopError>,
    backoff: Duration,
    /// Set while the peer is failing: no hops before this instant.
    skip_until: Option<Instant>,
    /// When the current run of failures began.
    failing_since: Option<Instant>,
}

impl PeerHealth {
    /// Decides for one hop starting at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        let Some(until) = self.skip_until else {
            return Admission::Send { probe: false };
        };
        if now >= until {
            // This hop is the probe; the next one waits another backoff (so a
            // probe that never reports back cannot block the peer forever).
            self.skip_until = Some(now + self.backoff);
            return Admission::Send { probe: true };
        }
        Admission::Skip {
            failures: self.failures_in_a_row,
            retry_in: until.saturating_duration_since(now),
        }
    }

    /// The hop error a skipped hop's receipt reports.
    pub fn skipped(&self, failures: u32, retry_in: Duration) -> HopError {
        HopError::Skipped {
            failures,
            last: Box::new(self.last_error.clone().unwrap_or(HopError::LinkStopped)),
            retry_in,
        }
    }

    /// The peer answered (even with a rejection: it is alive).
    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// The peer did not answer, or the connection failed. `probe`: the
    /// hop was admitted as the probe. `jitter` in [0, 1) spreads the probes
    /// of many replicas.
    pub fn failed(&mut self, now: Instant, error: &HopError, probe: bool, jitter: f64) {
        self.failures_in_a_row += 1;
        self.last_error = Some(error.clone());
        self.failing_since.get_or_insert(now);
        if self.skip_until.is_some() && !probe {
            // A hop admitted before the peer was marked failing: it says
            // nothing new, and must not push the next probe further out.
            return;
        }
        if self.failures_in_a_row < FAILURES_TO_SKIP {
            return;
        }
        self.backoff = if self.skip_until.is_some() {
            (self.backoff * 2).min(MAX_BACKOFF)
        } else {
            FIRST_BACKOFF
        };
        // 0.75x to 1.25x of the backoff.
        self.skip_until = Some(now + self.backoff.mul_f64(0.75 + jitter.clamp(0.0, 1.0) / 2.0));
    }

    /// Whether hops are being skipped.
    pub fn is_failing(&self) -> bool {
        self.skip_until.is_some()
    }

    /// Until when hops are skipped, while failing.
    pub fn skip_until(&self) -> Option<Instant> {
        self.skip_until
    }

    /// When the current run of failures began (also before it is long
    /// enough to skip the peer).
    pub fn failing_since(&self) -> Option<Instant> {
        self.failing_since
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures_in_a_row
    }

    /// The last failure, if the peer has failed since it last answered.
    pub fn last_error(&self) -> Option<&HopError> {
        self.last_error.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND: Admission = Admission::Send { probe: false };
    const PROBE: Admission = Admission::Send { probe: true };

    fn refused() -> HopError {
        HopError::Connect("connection refused".into())
    }

    #[test]
    fn skips_after_repeated_failures_then_probes_and_recovers() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for _ in 0..FAILURES_TO_SKIP - 1 {
            h.failed(t0, &refused(), false, 0.5);
            assert_eq!(h.admit(t0), SEND, "a few failures are not a pattern yet");
        }
        assert_eq!(h.failing_since(), Some(t0));
        h.failed(t0, &refused(), false, 0.5);
        match h.admit(t0) {
            Admission::Skip { failures, retry_in } => {
                assert_eq!(failures, FAILURES_TO_SKIP);
                assert_eq!(retry_in, FIRST_BACKOFF, "jitter 0.5 is the backoff itself");
                let reason = h.skipped(failures, retry_in).to_string();
                assert!(
                    reason.contains(
                        "3 times in a row (last: cannot open the delivery stream: connection refused)"
                    ),
                    "{reason}"
                );
            }
            other => panic!("expected a skip, got {other:?}"),
        }
        // Hops already in flight when it was marked failing do not extend the skip.
        h.failed(t0, &refused(), false, 0.5);
        h.failed(t0, &refused(), false, 0.5);
        let later = t0 + FIRST_BACKOFF;
        assert_eq!(h.admit(later), PROBE, "one probe after the first backoff");
        assert!(
            matches!(h.admit(later), Admission::Skip { .. }),
            "only one probe at a time"
        );
        h.succeeded();
        assert_eq!(h.admit(later), SEND);
        assert!(!h.is_failing());
        assert_eq!(h.failing_since(), None);
        assert!(h.last_error().is_none());
    }

    #[test]
    fn failed_probes_back_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for _ in 0..FAILURES_TO_SKIP {
            h.failed(t0, &HopError::Timeout(Duration::from_secs(1)), false, 0.5);
        }
        let mut last_backoff = Duration::ZERO;
        for _ in 0..10 {
            let now = h.skip_until().unwrap();
            assert_eq!(h.admit(now), PROBE);
            h.failed(now, &HopError::Timeout(Duration::from_secs(1)), true, 0.5);
            assert!(h.backoff >= last_backoff && h.backoff <= MAX_BACKOFF);
            last_backoff = h.backoff;
        }
        assert_eq!(last_backoff, MAX_BACKOFF);
    }
}
