//! Checks on what clients send, before anything is accepted.
//!
//! Every check is a plain function returning a [`ValidationError`] that names
//! the field, the limit and the offending value, so a person reading the gRPC
//! status knows what to change. The mapping to status codes lives in
//! [`crate::error`].

use std::collections::HashMap;

use crate::proto::v1::AckPolicy;

/// Longest accepted topic, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;
/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header key, in bytes.
pub const MAX_HEADER_KEY_BYTES: usize = 128;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 4096;
/// Longest message id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most topic filters on one Subscribe.
pub const MAX_TOPIC_FILTERS: usize = 64;

/// What was wrong with a request. `Display` is the text the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("topic is required (1-{MAX_TOPIC_BYTES} bytes of [A-Za-z0-9._:/-])")]
    EmptyTopic,
    #[error("topic is {len} bytes; the limit is {MAX_TOPIC_BYTES}")]
    TopicTooLong { len: usize },
    #[error(
        "topic {topic:?} is malformed: {reason}; use 1-{MAX_TOPIC_BYTES} bytes of [A-Za-z0-9._:/-], not starting with '.'"
    )]
    MalformedTopic { topic: String, reason: &'static str },
    #[error("topic filter {filter:?} is malformed: {reason}")]
    MalformedFilter { filter: String, reason: &'static str },
    #[error("{count} topic filters; the limit is {MAX_TOPIC_FILTERS}")]
    TooManyFilters { count: usize },
    #[error("payload is {len} bytes; the limit is {limit} bytes (--max-message-bytes)")]
    PayloadTooLarge { len: usize, limit: usize },
    #[error("{count} headers; the limit is {MAX_HEADERS}")]
    TooManyHeaders { count: usize },
    #[error("header key {key:?} is malformed: {reason}")]
    MalformedHeaderKey { key: String, reason: &'static str },
    #[error("header {key:?} value is {len} bytes; the limit is {MAX_HEADER_VALUE_BYTES}")]
    HeaderValueTooLarge { key: String, len: usize },
    #[error(
        "id {id:?} is malformed: {reason}; use at most {MAX_ID_BYTES} printable ASCII bytes, or leave it empty to have one generated"
    )]
    MalformedId { id: String, reason: &'static str },
    #[error("ack value {value} is not a known AckPolicy (0-4: UNSPECIFIED, ALL, QUORUM, ONE, NONE)")]
    UnknownAckPolicy { value: i32 },
    #[error("{field} is required")]
    MissingField { field: &'static str },
    #[error("timeout must be a positive duration (or unset for --broadcast-timeout)")]
    MalformedTimeout,
    #[error("message is not a valid replicast.v1.Message: {reason}")]
    MalformedMessage { reason: String },
}

impl ValidationError {
    /// True when the message was well formed but carries too much: the
    /// payload or headers exceed a size limit (RESOURCE_EXHAUSTED, as gRPC
    /// reports oversized messages). A topic or filter list beyond its limit is
    /// malformed instead (INVALID_ARGUMENT): no retry of the same call fits.
    pub fn is_size_limit(&self) -> bool {
        matches!(
            self,
            Self::PayloadTooLarge { .. } | Self::TooManyHeaders { .. } | Self::HeaderValueTooLarge { .. }
        )
    }
}

fn topic_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')
}

/// A topic a message is published on.
pub fn topic(topic: &str) -> Result<(), ValidationError> {
    if topic.is_empty() {
        return Err(ValidationError::EmptyTopic);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(ValidationError::TopicTooLong { len: topic.len() });
    }
    let malformed = |reason| ValidationError::MalformedTopic {
        topic: truncate(topic),
        reason,
    };
    if topic.ends_with('*') {
        return Err(malformed("'*' is only allowed in Subscribe filters"));
    }
    if topic.starts_with('.') {
        return Err(malformed("it starts with '.'"));
    }
    if !topic.chars().all(topic_char_ok) {
        return Err(malformed("it contains a character outside [A-Za-z0-9._:/-]"));
    }
    Ok(())
}

/// A Subscribe topic filter: a topic, or a prefix followed by `*`.
pub fn topic_filter(filter: &str) -> Result<(), ValidationError> {
    let malformed = |reason| ValidationError::MalformedFilter {
        filter: truncate(filter),
        reason,
    };
    match filter.strip_suffix('*') {
        Some("") => Ok(()),
        Some(prefix) => {
            if prefix.len() > MAX_TOPIC_BYTES {
                return Err(malformed("it is longer than the longest topic"));
            }
            if !prefix.chars().all(topic_char_ok) {
                return Err(malformed(
                    "only a trailing '*' may follow [A-Za-z0-9._:/-] characters",
                ));
            }
            Ok(())
        }
        None if filter.contains('*') => Err(malformed(
            "'*' is only allowed at the end, as a prefix match ('cache.*')",
        )),
        None => topic(filter).map_err(|e| match e {
            ValidationError::EmptyTopic => malformed("it is empty"),
            other => other,
        }),
    }
}

/// The list of Subscribe filters.
pub fn topic_filters(filters: &[String]) -> Result<(), ValidationError> {
    if filters.len() > MAX_TOPIC_FILTERS {
        return Err(ValidationError::TooManyFilters { count: filters.len() });
    }
    filters.iter().try_for_each(|f| topic_filter(f))
}

/// The payload against the configured limit.
pub fn payload(len: usize, limit: usize) -> Result<(), ValidationError> {
    if len > limit {
        return Err(ValidationError::PayloadTooLarge { len, limit });
    }
    Ok(())
}

/// Application headers: count, key shape, value size.
pub fn headers(headers: &HashMap<String, String>) -> Result<(), ValidationError> {
    if headers.len() > MAX_HEADERS {
        return Err(ValidationError::TooManyHeaders { count: headers.len() });
    }
    for (key, value) in headers {
        let malformed = |reason| ValidationError::MalformedHeaderKey {
            key: truncate(key),
            reason,
        };
        if key.is_empty() {
            return Err(malformed("it is empty"));
        }
        if key.len() > MAX_HEADER_KEY_BYTES {
            return Err(malformed("it is longer than 128 bytes"));
        }
        if !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err(malformed("it must be printable ASCII without spaces"));
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(ValidationError::HeaderValueTooLarge {
                key: truncate(key),
                len: value.len(),
            });
        }
    }
    Ok(())
}

/// A client-chosen message id (empty means "generate one").
pub fn id(id: &str) -> Result<(), ValidationError> {
    let malformed = |reason| ValidationError::MalformedId {
        id: truncate(id),
        reason,
    };
    if id.len() > MAX_ID_BYTES {
        return Err(malformed("it is too long"));
    }
    if !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(malformed("it contains a space, control or non-ASCII character"));
    }
    Ok(())
}

/// The wire enum value of an ack policy; prost keeps unknown values as i32.
pub fn ack_policy(value: i32) -> Result<AckPolicy, ValidationError> {
    AckPolicy::try_from(value).map_err(|_| ValidationError::UnknownAckPolicy { value })
}

/// Keeps error messages short when a client sends something huge.
fn truncate(s: &str) -> String {
    const SHOWN: usize = 64;
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(topic("cache.invalidate").is_ok());
        assert!(topic("a/b:c-d_e").is_ok());
        assert_eq!(topic(""), Err(ValidationError::EmptyTopic));
        assert!(matches!(
            topic("has space"),
            Err(ValidationError::MalformedTopic { .. })
        ));
        assert!(matches!(
            topic(".hidden"),
            Err(ValidationError::MalformedTopic { .. })
        ));
        assert!(matches!(
            topic("cache.*"),
            Err(ValidationError::MalformedTopic { .. })
        ));
        assert!(matches!(
            topic("ünï"),
            Err(ValidationError::MalformedTopic { .. })
        ));
        let long = "a".repeat(MAX_TOPIC_BYTES + 1);
        assert_eq!(topic(&long), Err(ValidationError::TopicTooLong { len: 256 }));
    }

    #[test]
    fn filters() {
        assert!(topic_filter("*").is_ok());
        assert!(topic_filter("cache.*").is_ok());
        assert!(topic_filter("cache.invalidate").is_ok());
        assert!(
            topic_filter("").is_err(),
            "an empty filter is a mistake, not 'all'"
        );
        assert!(topic_filter("ca*che").is_err());
        assert!(topic_filter("**").is_err());
        let many: Vec<String> = (0..=MAX_TOPIC_FILTERS).map(|i| format!("t{i}")).collect();
        assert!(matches!(
            topic_filters(&many),
            Err(ValidationError::TooManyFilters { .. })
        ));
    }

    #[test]
    fn header_limits() {
        let mut h = HashMap::new();
        h.insert("trace".to_owned(), "x".repeat(MAX_HEADER_VALUE_BYTES));
        assert!(headers(&h).is_ok());
        h.insert("big".to_owned(), "x".repeat(MAX_HEADER_VALUE_BYTES + 1));
        let err = headers(&h).unwrap_err();
        assert!(err.is_size_limit(), "an oversized value is a size limit: {err}");
        let mut h = HashMap::new();
        h.insert("bad key".to_owned(), String::new());
        assert!(matches!(
            headers(&h),
            Err(ValidationError::MalformedHeaderKey { .. })
        ));
        let h: HashMap<String, String> = (0..=MAX_HEADERS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(matches!(
            headers(&h),
            Err(ValidationError::TooManyHeaders { count: 65 })
        ));
    }

    #[test]
    fn ids_payloads_and_policies() {
        assert!(id("").is_ok());
        assert!(id("order-42/retry").is_ok());
        assert!(id("with space").is_err());
        assert!(id(&"x".repeat(MAX_ID_BYTES + 1)).is_err());
        assert!(payload(10, 10).is_ok());
        assert_eq!(
            payload(11, 10),
            Err(ValidationError::PayloadTooLarge { len: 11, limit: 10 })
        );
        assert_eq!(ack_policy(2), Ok(AckPolicy::Quorum));
        assert_eq!(ack_policy(9), Err(ValidationError::UnknownAckPolicy { value: 9 }));
    }

    #[test]
    fn messages_are_truncated() {
        let err = topic(&format!("{} x", "a".repeat(200))).unwrap_err();
        assert!(
            err.to_string().len() < 300,
            "message should not echo 200 bytes: {err}"
        );
    }
}
