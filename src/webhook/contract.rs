//! What the app's answer to a POST means: done, retry (and when), or dead
//! letter. The table in the README ("Webhooks: the contract") is this
//! function. Pure: the attempt, the message's age, whether the app has
//! ever answered 2xx and the jitter are inputs.

use std::time::{Duration, SystemTime};

/// How a POST ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The app answered with this status (and `Retry-After`, if any).
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within `--webhook-timeout`.
    Timeout,
    /// The connection was refused (nothing listens: the app is starting or
    /// restarting).
    Refused,
    /// Any other transport failure (reset, broken pipe, bad response).
    Failed(String),
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status { code, .. } => write!(f, "HTTP {code}"),
            Self::Timeout => f.write_str("no answer within --webhook-timeout"),
            Self::Refused => f.write_str("connection refused"),
            Self::Failed(error) => write!(f, "{error}"),
        }
    }
}

/// What to do next with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The app has it.
    Done,
    /// Try again after this long.
    RetryIn(Duration),
    /// Give up on this message (counted, logged once); the next one goes on.
    DeadLetter(String),
}

/// The retry bounds, from the flags.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per message at most (`--webhook-max-attempts`).
    pub max_attempts: u32,
    /// How long after its first attempt a message is still retried
    /// (`--webhook-max-age`).
    pub max_age: Duration,
    /// The longest `Retry-After` honoured (`--webhook-retry-after-cap`).
    pub retry_after_cap: Duration,
    /// The first backoff; it doubles per attempt, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// Decides after attempt number `attempt` (1 for the first) of a
    /// message first tried `age` ago. `app_started`: this webhook has had a
    /// 2xx before (until then a 404 means "still starting"). `jitter` in
    /// [0, 1) spreads retries ("full jitter": the backoff is scaled by it).
    pub fn decide(
        &self,
        answer: &Answer,
        attempt: u32,
        age: Duration,
        app_started: bool,
        jitter: f64,
    ) -> Decision {
        let retry_in = match answer {
            Answer::Status { code: 200..=299, .. } => return Decision::Done,
            Answer::Status {
                code: 429 | 503,
                retry_after: Some(after),
            } => (*after).min(self.retry_after_cap),
            Answer::Status { code: 404, .. } if !app_started => self.backoff(attempt, jitter),
            Answer::Status {
                code: 408 | 429 | 500..=599,
                ..
            } => self.backoff(attempt, jitter),
            Answer::Status { code, .. } => {
                return Decision::DeadLetter(format!(
                    "the app answered HTTP {code}, which is not retried (only 2xx is success; 408, 429 and 5xx are \
                     retried, and 404 until the app first answered 2xx)"
                ));
            }
            Answer::Timeout | Answer::Refused | Answer::Failed(_) => self.backoff(attempt, jitter),
        };
        if attempt >= self.max_attempts || age + retry_in > self.max_age {
            return Decision::DeadLetter(format!(
                "gave up after {attempt} attempts over {}: the last was {answer} (--webhook-max-attempts {}, \
                 --webhook-max-age {})",
                humantime::format_duration(round_ms(age)),
                self.max_attempts,
                humantime::format_duration(self.max_age)
            ));
        }
        Decision::RetryIn(retry_in)
    }

    /// Exponential backoff with full jitter: up to base × 2^(attempt-1),
    /// capped, scaled by `jitter`, and never under a millisecond.
    fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .base_backoff
            .saturating_mul(
                1u32.checked_shl(attempt.saturating_sub(1).min(30))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max_backoff);
        exp.mul_f64(jitter.clamp(0.0, 1.0)).max(Duration::from_millis(1))
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A `Retry-After` value: delay-seconds or an HTTP date (RFC 9110).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        max_age: Duration::from_secs(60),
        retry_after_cap: Duration::from_secs(10),
        base_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(5),
    };

    fn status(code: u16) -> Answer {
        Answer::Status {
            code,
            retry_after: None,
        }
    }

    fn decide(answer: Answer, attempt: u32, started: bool) -> Decision {
        POLICY.decide(&answer, attempt, Duration::ZERO, started, 1.0)
    }

    #[test]
    fn the_contract_table() {
        assert_eq!(decide(status(200), 1, false), Decision::Done);
        assert_eq!(decide(status(204), 1, true), Decision::Done);
        for retried in [408, 429, 500, 502, 503, 504] {
            assert_eq!(
                decide(status(retried), 1, true),
                Decision::RetryIn(Duration::from_millis(100)),
                "{retried}"
            );
        }
        for dead in [301, 400, 401, 403, 409, 410, 413, 422] {
            assert!(
                matches!(decide(status(dead), 1, true), Decision::DeadLetter(_)),
                "{dead}"
            );
        }
        // 404: the app is still starting until it first answered 2xx.
        assert!(matches!(decide(status(404), 1, false), Decision::RetryIn(_)));
        assert!(matches!(decide(status(404), 1, true), Decision::DeadLetter(_)));
        for transport in [Answer::Timeout, Answer::Refused, Answer::Failed("reset".into())] {
            assert!(matches!(decide(transport, 1, true), Decision::RetryIn(_)));
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap_on_429_and_503_only() {
        let after = |code, secs| Answer::Status {
            code,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            decide(after(503, 3), 1, true),
            Decision::RetryIn(Duration::from_secs(3))
        );
        assert_eq!(
            decide(after(429, 3600), 1, true),
            Decision::RetryIn(Duration::from_secs(10))
        );
        assert_eq!(
            decide(after(500, 3), 1, true),
            Decision::RetryIn(Duration::from_millis(100))
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        let d = |attempt, jitter| POLICY.decide(&status(500), attempt, Duration::ZERO, true, jitter);
        assert_eq!(d(2, 1.0), Decision::RetryIn(Duration::from_millis(200)));
        assert_eq!(d(4, 1.0), Decision::RetryIn(Duration::from_millis(800)));
        assert_eq!(d(4, 0.5), Decision::RetryIn(Duration::from_millis(400)));
        assert_eq!(d(4, 0.0), Decision::RetryIn(Duration::from_millis(1)));
        let long = RetryPolicy {
            max_attempts: 100,
            ..POLICY
        };
        assert_eq!(
            long.decide(&status(500), 40, Duration::ZERO, true, 1.0),
            Decision::RetryIn(Duration::from_secs(5))
        );
    }

    #[test]
    fn attempts_and_age_bound_the_retries() {
        let Decision::DeadLetter(why) = decide(status(500), 5, true) else {
            panic!()
        };
        assert!(
            why.contains("gave up after 5 attempts") && why.contains("HTTP 500"),
            "{why}"
        );
        let old = POLICY.decide(&Answer::Refused, 2, Duration::from_secs(60), true, 1.0);
        assert!(matches!(old, Decision::DeadLetter(why) if why.contains("connection refused")));
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
