//! RFC 3339 text for times that come from outside (a peer's `sent_at`, a
//! certificate's validity): humantime's formatter panics before 1970 and
//! after 9999, so those get a plain description instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second humantime can format: 9999-12-31T23:59:59Z.
const LAST_FORMATTABLE: u64 = 253_402_300_799;

fn formattable(t: SystemTime) -> bool {
    t.duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() <= LAST_FORMATTABLE)
}

fn out_of_range(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => format!("{}s after 1970-01-01 (past year 9999)", after.as_secs()),
        Err(before) => format!("{}s before 1970-01-01", before.duration().as_secs()),
    }
}

/// `2026-12-02T01:23:45Z`.
pub fn rfc3339_seconds(t: SystemTime) -> String {
    if formattable(t) {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        out_of_range(t)
    }
}

/// `2026-12-02T01:23:45.123456Z`.
pub fn rfc3339_micros(t: SystemTime) -> String {
    if formattable(t) {
        humantime::format_rfc3339_micros(t).to_string()
    } else {
        out_of_range(t)
    }
}

/// A protobuf timestamp as a `SystemTime`, when it is one that can be
/// written as RFC 3339 (years 1970 to 9999).
pub fn from_proto(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(ts.seconds)
        .ok()
        .filter(|s| *s <= LAST_FORMATTABLE)?;
    let nanos = u32::try_from(ts.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(UNIX_EPOCH + Duration::new(seconds, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_outside_what_rfc_3339_can_write_are_described_not_panicked_on() {
        let epoch = UNIX_EPOCH;
        assert_eq!(rfc3339_seconds(epoch), "1970-01-01T00:00:00Z");
        assert!(rfc3339_seconds(epoch - Duration::from_secs(5)).contains("before 1970"));
        assert!(rfc3339_micros(epoch + Duration::from_secs(LAST_FORMATTABLE + 1)).contains("past year 9999"));
        let far = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        };
        assert_eq!(from_proto(&far), None);
        assert_eq!(
            from_proto(&prost_types::Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        assert!(from_proto(&prost_types::Timestamp { seconds: 1, nanos: 5 }).is_some());
    }
}
