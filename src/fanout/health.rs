//! Per-peer health: stop paying a full deadline for a peer that keeps failing.
//!
//! After [`FAILURES_TO_SKIP`] failures in a row, hops to a peer are skipped
//! at once (their receipts say UNAVAILABLE and why) until a backoff expires;
//! then one hop goes through as a probe. A probe that succeeds makes the peer
//! healthy again, with no restart; one that fails doubles the backoff (with
//! jitter, up to [`MAX_BACKOFF`]). The redelivery task also probes a failing
//! peer it holds messages for, every round and off the Broadcast path, so a
//! peer that comes back usually rejoins long before that backoff expires.
//! Pure state, driven by the link.

use std::time::{Duration, Instant};

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
    /// Do not: the peer is failing. The reason is for its receipt.
    Skip(String),
}

/// What the link has seen of one peer lately.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    failures_in_a_row: u32,
    last_error: String,
    backoff: Duration,
    /// Set while the peer is failing: no hops before this instant.
    skip_until: Option<Instant>,
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
        let wait = until.saturating_duration_since(now);
        Admission::Skip(format!(
            "skipped: the peer failed {} times in a row (last: {}); probing it again in {}",
            self.failures_in_a_row,
            self.last_error,
            humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
        ))
    }

    /// The peer answered (even with a rejection: it is alive).
    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// The peer did not answer, or the connection failed. `probe`: the
    /// hop was admitted as the probe. `jitter` in [0, 1) spreads the probes
    /// of many replicas.
    pub fn failed(&mut self, now: Instant, error: &str, probe: bool, jitter: f64) {
        self.failures_in_a_row += 1;
        self.last_error = error.to_owned();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND: Admission = Admission::Send { probe: false };
    const PROBE: Admission = Admission::Send { probe: true };

    #[test]
    fn skips_after_repeated_failures_then_probes_and_recovers() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for _ in 0..FAILURES_TO_SKIP - 1 {
            h.failed(t0, "refused", false, 0.5);
            assert_eq!(h.admit(t0), SEND, "a few failures are not a pattern yet");
        }
        h.failed(t0, "refused", false, 0.5);
        match h.admit(t0) {
            Admission::Skip(reason) => {
                assert!(reason.contains("3 times in a row (last: refused)"), "{reason}")
            }
            other => panic!("expected a skip, got {other:?}"),
        }
        // Hops already in flight when it was marked failing do not extend the skip.
        h.failed(t0, "refused", false, 0.5);
        h.failed(t0, "refused", false, 0.5);
        let later = t0 + FIRST_BACKOFF;
        assert_eq!(h.admit(later), PROBE, "one probe after the first backoff");
        assert!(
            matches!(h.admit(later), Admission::Skip(_)),
            "only one probe at a time"
        );
        h.succeeded();
        assert_eq!(h.admit(later), SEND);
        assert!(!h.is_failing());
    }

    #[test]
    fn failed_probes_back_off_exponentially_up_to_the_cap() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for _ in 0..FAILURES_TO_SKIP {
            h.failed(t0, "timeout", false, 0.5);
        }
        let mut last_backoff = Duration::ZERO;
        for _ in 0..10 {
            let now = h.skip_until.unwrap();
            assert_eq!(h.admit(now), PROBE);
            h.failed(now, "timeout", true, 0.5);
            assert!(h.backoff >= last_backoff && h.backoff <= MAX_BACKOFF);
            last_backoff = h.backoff;
        }
        assert_eq!(last_backoff, MAX_BACKOFF);
    }
}
