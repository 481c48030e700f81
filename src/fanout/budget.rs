//! Deadline budgeting: how long a Broadcast and each of its hops may take.
//!
//! The caller's deadline arrives as the `grpc-timeout` header. The Broadcast
//! keeps a small margin of it for sending the receipts back (a response that
//! arrives after the caller gave up is useless), and each hop gets the rest,
//! capped by `--peer-timeout` so one hung peer costs at most that.

use std::time::Duration;

use tokio::time::Instant;

use tonic::metadata::MetadataMap;

/// The caller's timeout from the `grpc-timeout` header, if any.
pub fn caller_timeout(metadata: &MetadataMap) -> Option<Duration> {
    metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses the gRPC wire format: at most 8 ASCII digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Time reserved for the response to reach the caller: 10 % of its timeout,
/// at most 50 ms.
fn reply_margin(timeout: Duration) -> Duration {
    (timeout / 10).min(Duration::from_millis(50))
}

/// Until when a replica may wait for its apps (`--webhook-ack`) before it
/// answers a hop that arrived at `now`: the sender's timeout for the hop
/// (`DeliverFrame.ack_timeout_ms`, or a unary Deliver's `grpc-timeout`)
/// less the time the answer needs to get back, so the sender gets "the app
/// has not answered" rather than a timeout that marks this replica as
/// failing. A sender that said nothing gets `fallback` (this replica's
/// own `--peer-timeout`).
pub fn app_wait_deadline(now: Instant, sender_timeout: Option<Duration>, fallback: Duration) -> Instant {
    let timeout = sender_timeout.filter(|t| !t.is_zero()).unwrap_or(fallback);
    now + timeout.saturating_sub(reply_margin(timeout))
}

/// The deadlines of one Broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// When the Broadcast must answer, met or not.
    pub deadline: Instant,
    /// The cap on any single hop (`--peer-timeout`).
    pub peer_timeout: Duration,
}

impl Budget {
    /// Derives the budget of a Broadcast that arrived at `now`.
    pub fn new(now: Instant, caller: Option<Duration>, default: Duration, peer_timeout: Duration) -> Self {
        let total = match caller {
            Some(timeout) => timeout.saturating_sub(reply_margin(timeout)),
            None => default,
        };
        Self {
            deadline: now + total,
            peer_timeout,
        }
    }

    /// The deadline of a hop that starts at `now`: `peer_timeout` from now,
    /// or just before the Broadcast's own deadline (so a hop that times out
    /// is reported as such, not as still pending), whichever comes first.
    pub fn hop_deadline(&self, now: Instant) -> Instant {
        let left = self.deadline.saturating_duration_since(now);
        let receipt_margin = (left / 100).clamp(Duration::from_micros(100), Duration::from_millis(10));
        (self.deadline - receipt_margin.min(left)).min(now + self.peer_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_waits_end_before_the_sender_gives_up() {
        let now = Instant::now();
        let fallback = Duration::from_secs(2);
        assert_eq!(
            app_wait_deadline(now, Some(Duration::from_millis(400)), fallback),
            now + Duration::from_millis(360),
            "10 % for the answer"
        );
        assert_eq!(
            app_wait_deadline(now, Some(Duration::from_secs(10)), fallback),
            now + Duration::from_millis(9950),
            "at most 50 ms"
        );
        assert_eq!(
            app_wait_deadline(now, None, fallback),
            now + Duration::from_millis(1950),
            "the sender did not say: this replica's --peer-timeout"
        );
        assert_eq!(
            app_wait_deadline(now, Some(Duration::ZERO), fallback),
            now + Duration::from_millis(1950),
            "0 means not said"
        );
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S", "m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn caller_deadline_keeps_a_reply_margin_and_caps_hops() {
        let now = Instant::now();
        let b = Budget::new(
            now,
            Some(Duration::from_millis(200)),
            Duration::from_secs(5),
            Duration::from_secs(1),
        );
        assert_eq!(b.deadline, now + Duration::from_millis(180));
        assert_eq!(
            b.hop_deadline(now),
            now + Duration::from_millis(180) - Duration::from_micros(1800),
            "hops end 1% before the Broadcast so their receipts make it"
        );

        let b = Budget::new(
            now,
            Some(Duration::from_secs(10)),
            Duration::from_secs(5),
            Duration::from_secs(1),
        );
        assert_eq!(b.deadline, now + Duration::from_millis(9950));
        assert_eq!(
            b.hop_deadline(now),
            now + Duration::from_secs(1),
            "peer timeout caps the hop"
        );
    }

    #[test]
    fn no_caller_deadline_uses_the_default() {
        let now = Instant::now();
        let b = Budget::new(now, None, Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(b.deadline, now + Duration::from_secs(5));
        let late = now + Duration::from_millis(4500);
        assert_eq!(
            b.hop_deadline(late),
            b.deadline - Duration::from_millis(5),
            "a late hop gets what is left"
        );
    }
}
