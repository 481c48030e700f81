//! Typed errors, and the one place they become gRPC statuses.

use std::time::Duration;

use prost::Message as _;
use tonic::{Code, Status};

use crate::{proto::v1::BroadcastResponse, validate::ValidationError};

/// Everything a replicast RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] ValidationError),

    #[error(
        "after_sequence={requested} is no longer in the replay ring: the oldest retained sequence is {oldest}; \
         resume with after_sequence >= {} (messages in between are lost to this subscriber) or 0 for live only",
        oldest.saturating_sub(1)
    )]
    ReplayEvicted { requested: u64, oldest: u64 },

    #[error(
        "after_sequence={requested} is ahead of this replica's last sequence {last}; the replica has probably \
         restarted (sequence numbers restart with the process): subscribe with after_sequence=0"
    )]
    ResumeAhead { requested: u64, last: u64 },

    #[error(
        "this replica restarted: it is incarnation {current:x}, not {requested:x}, and sequence numbers restart \
         with the process; subscribe with after_sequence=0 (what was delivered during the restart is not here)"
    )]
    IncarnationChanged { requested: u64, current: u64 },

    #[error(
        "subscriber fell more than {buffer} deliveries behind (--subscriber-buffer) and was disconnected; \
         resubscribe with after_sequence={resume_after} to continue without a gap"
    )]
    SubscriberLagged { resume_after: u64, buffer: usize },

    #[error(
        "subscriber fell behind the replay ring: the deliveries after {cursor} up to {} are no longer retained \
         (--replay-capacity, --replay-max-bytes); resubscribe with after_sequence={} to continue without them, \
         or read faster",
        oldest.saturating_sub(1), oldest.saturating_sub(1)
    )]
    SubscriberOverrun { cursor: u64, oldest: u64 },

    #[error(
        "peer discovery ({source_name}) has not completed its first lookup within {waited:?}: {last_error}; \
         retry, or check the DNS configuration"
    )]
    DiscoveryNotReady {
        source_name: String,
        waited: Duration,
        last_error: String,
    },

    /// The ack policy was not met. Carries every receipt for the details.
    #[error("{summary}")]
    PolicyNotMet {
        summary: String,
        /// The caller's deadline ran out before the policy could be met.
        deadline_exceeded: bool,
        response: Box<BroadcastResponse>,
    },

    #[error("this replica is shutting down; reconnect to another replica")]
    ShuttingDown,

    #[error(
        "{limit} broadcasts are already in flight on this replica (--max-concurrent-broadcasts); \
         retry with backoff, or send to another replica"
    )]
    Overloaded { limit: usize },
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::Invalid(v) if v.is_size_limit() => Status::resource_exhausted(message),
            Error::Invalid(_) => Status::invalid_argument(message),
            Error::ReplayEvicted { .. } | Error::ResumeAhead { .. } => Status::out_of_range(message),
            Error::IncarnationChanged { .. } => Status::failed_precondition(message),
            Error::SubscriberLagged { .. } | Error::SubscriberOverrun { .. } | Error::Overloaded { .. } => {
                Status::resource_exhausted(message)
            }
            Error::DiscoveryNotReady { .. } | Error::ShuttingDown => Status::unavailable(message),
            Error::PolicyNotMet {
                deadline_exceeded,
                response,
                ..
            } => {
                let code = if deadline_exceeded {
                    Code::DeadlineExceeded
                } else {
                    Code::Unavailable
                };
                with_response_details(code, message, &response)
            }
        }
    }
}

/// Builds a status whose `grpc-status-details-bin` is a `google.rpc.Status`
/// carrying the BroadcastResponse (the gRPC richer error model), so a careful
/// client can read every receipt of a failed Broadcast.
fn with_response_details(code: Code, message: String, response: &BroadcastResponse) -> Status {
    let details = tonic_types::pb::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/replicast.v1.BroadcastResponse".to_owned(),
            value: response.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// Decodes the BroadcastResponse carried in a failed Broadcast's status.
pub fn broadcast_response_from_status(status: &Status) -> Option<BroadcastResponse> {
    let details = tonic_types::pb::Status::decode(status.details()).ok()?;
    details
        .details
        .iter()
        .find(|any| any.type_url.ends_with("/replicast.v1.BroadcastResponse"))
        .and_then(|any| BroadcastResponse::decode(any.value.as_slice()).ok())
}

/// Why one hop of a fan-out failed. Reported in that peer's receipt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HopError {
    #[error("no answer within {}", humantime::format_duration(Duration::from_millis(.0.as_millis() as u64)))]
    Timeout(Duration),
    #[error("{0}")]
    Unavailable(String),
    #[error("peer rejected the message: {message}")]
    Rejected { code: Code, message: String },
    #[error("this replica is shutting down")]
    ShuttingDown,
    /// This replica's own queue to the peer is full: a local overload, not
    /// the peer's failure.
    #[error("{0}")]
    Saturated(String),
}

impl HopError {
    /// The gRPC code a receipt reports for this failure.
    pub fn code(&self) -> Code {
        match self {
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) | Self::ShuttingDown | Self::Saturated(_) => Code::Unavailable,
            Self::Rejected { code, .. } => *code,
        }
    }
}

/// An error and its sources, "outer: inner: root", skipping a source whose
/// text repeats its parent's (tonic's transport errors alone say only
/// "transport error", and some layers repeat themselves).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut previous = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !previous.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        previous = cause_text;
        source = cause.source();
    }
    text
}

/// The canonical name of a gRPC code, as grpcurl and the gRPC docs spell it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits_are_resource_exhausted() {
        let s: Status = Error::Invalid(ValidationError::PayloadTooLarge { len: 2, limit: 1 }).into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("limit is 1 bytes"), "{}", s.message());
        let s: Status = Error::Invalid(ValidationError::EmptyTopic).into();
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    #[test]
    fn policy_failure_carries_receipts() {
        let response = BroadcastResponse {
            id: "m1".into(),
            replicas: 3,
            acked: 2,
            ..Default::default()
        };
        let s: Status = Error::PolicyNotMet {
            summary: "not met".into(),
            deadline_exceeded: false,
            response: Box::new(response.clone()),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(broadcast_response_from_status(&s), Some(response));
    }
}
