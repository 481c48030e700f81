//! Typed errors, and the one place they become gRPC statuses.

use std::time::Duration;

use prost::Message as _;
use tonic::{Code, Status};

use crate::{
    proto::v1::{BroadcastResponse, PublishResponse},
    validate::ValidationError,
};

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
        "this replica restarted: it is incarnation {current}, not {requested}, and sequence numbers restart \
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

    /// `--webhook-ack`: delivered to this replica, but its app has not
    /// processed it (yet).
    #[error("delivered to this replica, not processed by its app: {0}")]
    App(#[from] crate::local::AppFailure),

    #[error(
        "{limit} broadcasts are already in flight on this replica (--max-concurrent-broadcasts); \
         retry with backoff, or send to another replica"
    )]
    Overloaded { limit: usize },

    #[error(transparent)]
    Announce(#[from] crate::membership::AnnounceError),

    #[error("{0}")]
    Unauthenticated(#[from] crate::auth::AuthError),

    /// A peer RPC from a caller without the workload identity.
    #[error("{0}")]
    NotAPeer(#[from] crate::tls::PeerRefusal),

    #[error("limit {flag}: {detail}")]
    LimitReached { flag: &'static str, detail: String },

    #[error(
        "the call asks for a deadline of {asked:?}, more than this replica allows (--max-deadline {max:?}); ask for less"
    )]
    DeadlineTooLong { asked: Duration, max: Duration },

    #[error(
        "client {client} may not {action} {what} (the tokens file does not allow it{})",
        if *.reloaded { "; it changed since this stream began" } else { "" }
    )]
    PermissionDenied {
        client: std::sync::Arc<str>,
        action: crate::auth::Action,
        /// "topic X" or "filter Y".
        what: String,
        /// The permission was lost when the tokens file was reloaded.
        reloaded: bool,
    },
}

impl Error {
    /// The gRPC code of this failure.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(v) if v.is_size_limit() => Code::ResourceExhausted,
            Error::Invalid(_) => Code::InvalidArgument,
            Error::ReplayEvicted { .. } | Error::ResumeAhead { .. } => Code::OutOfRange,
            Error::IncarnationChanged { .. } => Code::FailedPrecondition,
            Error::SubscriberLagged { .. } | Error::SubscriberOverrun { .. } | Error::Overloaded { .. } => {
                Code::ResourceExhausted
            }
            Error::DiscoveryNotReady { .. } | Error::ShuttingDown => Code::Unavailable,
            Error::App(failure) => {
                use crate::local::AppFailure;
                match failure {
                    // Not retried by the sender: the webhook retries, and
                    // a redelivery would only meet the same answer.
                    AppFailure::Refused { .. } => Code::FailedPrecondition,
                    AppFailure::Lost { .. } => Code::DataLoss,
                    AppFailure::NotYet { .. } => Code::DeadlineExceeded,
                    // The replica is going away: the sender may redeliver
                    // to its next incarnation.
                    AppFailure::Abandoned { .. } => Code::Unavailable,
                }
            }
            Error::PolicyNotMet {
                deadline_exceeded: true,
                ..
            } => Code::DeadlineExceeded,
            Error::PolicyNotMet { .. } => Code::Unavailable,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::LimitReached { .. } => Code::ResourceExhausted,
            Error::DeadlineTooLong { .. } => Code::InvalidArgument,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::NotAPeer(crate::tls::PeerRefusal::NoCertificate { .. }) => Code::Unauthenticated,
            Error::NotAPeer(crate::tls::PeerRefusal::WrongIdentity { .. }) => Code::PermissionDenied,
            Error::Announce(e) => {
                use crate::membership::AnnounceError;
                match e {
                    AnnounceError::Invalid(_) | AnnounceError::IsSelf(_) => Code::InvalidArgument,
                    AnnounceError::TooMany { .. } => Code::ResourceExhausted,
                    AnnounceError::AlreadyLeft { .. } | AnnounceError::NotConfirmed(_) => {
                        Code::FailedPrecondition
                    }
                    AnnounceError::ShuttingDown => Code::Unavailable,
                }
            }
        }
    }
}

impl From<crate::membership::AnnounceError> for Status {
    fn from(err: crate::membership::AnnounceError) -> Self {
        Error::from(err).into()
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        match err {
            Error::PolicyNotMet {
                summary, response, ..
            } => with_response_details(code, summary, &response),
            other => Status::new(code, other.to_string()),
        }
    }
}

/// The answer to one PublishRequest: what the unary Broadcast's status
/// would have been, with the receipts whenever there are any (in full: a
/// stream message is not bounded like a trailer).
pub fn publish_response(tag: u64, result: Result<BroadcastResponse, Error>) -> PublishResponse {
    match result {
        Ok(response) => PublishResponse {
            tag,
            code: 0,
            error: String::new(),
            response: Some(response),
        },
        Err(err) => {
            let code = err.code();
            match err {
                Error::PolicyNotMet {
                    summary, response, ..
                } => PublishResponse {
                    tag,
                    code: code as i32,
                    error: summary,
                    response: Some(*response),
                },
                other => PublishResponse {
                    tag,
                    code: code as i32,
                    error: other.to_string(),
                    response: None,
                },
            }
        }
    }
}

/// The most a failed Broadcast's status message may take, in bytes (it is
/// sent percent-encoded in `grpc-message`).
const MAX_STATUS_MESSAGE: usize = 1024;
/// The most its encoded details may take (sent base64-encoded, 4/3 larger,
/// in `grpc-status-details-bin`). With the message and the other trailers
/// this keeps the trailers well under the 8 KiB that grpc C-core and
/// grpc-java accept by default.
const MAX_STATUS_DETAILS: usize = 4 * 1024;

/// Builds a status whose `grpc-status-details-bin` is a `google.rpc.Status`
/// carrying the BroadcastResponse (the gRPC richer error model), so a careful
/// client can read the receipts of a failed Broadcast. Bounded (see
/// [`bounded_receipts`]).
fn with_response_details(code: Code, message: String, response: &BroadcastResponse) -> Status {
    let message = clip_to(message, MAX_STATUS_MESSAGE);
    let details = tonic_types::pb::Status {
        code: code as i32,
        // The same text: grpcio-status checks that the two agree.
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/replicast.v1.BroadcastResponse".to_owned(),
            value: bounded_receipts(response, MAX_STATUS_DETAILS - message.len() - 128).encode_to_vec(),
        }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

/// `response` with at most `limit` bytes encoded: the failed and pending
/// receipts first, then acknowledged ones, as many as fit (in address order
/// within each group); what is left out is counted in `omitted_outcomes`.
pub fn bounded_receipts(response: &BroadcastResponse, limit: usize) -> BroadcastResponse {
    if response.encoded_len() <= limit {
        return response.clone();
    }
    let mut bounded = BroadcastResponse {
        outcomes: Vec::new(),
        ..response.clone()
    };
    let failed_first = response
        .outcomes
        .iter()
        .filter(|o| o.code != 0 || o.pending)
        .chain(response.outcomes.iter().filter(|o| o.code == 0 && !o.pending));
    // Room for the count itself, whatever it becomes.
    let mut used = bounded.encoded_len() + 6;
    for outcome in failed_first {
        let size = prost::encoding::message::encoded_len(4, outcome);
        if used + size > limit {
            // A prefix of that order: no acknowledged receipt is kept while
            // a failed one is left out.
            break;
        }
        used += size;
        bounded.outcomes.push(outcome.clone());
    }
    bounded.omitted_outcomes = (response.outcomes.len() - bounded.outcomes.len()) as u32;
    bounded
}

fn clip_to(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut cut = limit - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
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

/// Why one hop of a fan-out failed. Reported in that peer's receipt, and
/// formatted only then.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HopError {
    #[error("no answer within {}", millis(*.0))]
    Timeout(Duration),
    /// The peer keeps failing; this hop was not sent (see `PeerHealth`).
    #[error("skipped: the peer failed {failures} times in a row (last: {last}); probing it again in {}", millis(*.retry_in))]
    Skipped {
        failures: u32,
        last: Box<HopError>,
        retry_in: Duration,
    },
    #[error("cannot open the delivery stream: {0}")]
    Connect(String),
    #[error("the delivery stream broke: {0}")]
    StreamBroken(String),
    #[error("the peer closed the delivery stream")]
    StreamClosed,
    #[error("the peer acknowledged nothing on the delivery stream for {}; reopening it", seconds(*.0))]
    Stalled(Duration),
    #[error("the peer is not reading: {0} frames are waiting to be sent")]
    NotReading(usize),
    /// The peer answered UNAVAILABLE (a frame that raced the end of its
    /// drain): not delivered, worth retrying.
    #[error("the peer refused it: {0}")]
    Refused(String),
    #[error("the link task to this peer has stopped")]
    LinkStopped,
    /// The peer answered with a final error: retrying will not help.
    #[error("peer rejected the message: {message}")]
    Rejected { code: Code, message: String },
    #[error("this replica is shutting down")]
    ShuttingDown,
    /// This replica's own queue to the peer is full: a local overload, not
    /// the peer's failure.
    #[error("the link to this peer is saturated: {0} hops are queued")]
    Saturated(usize),
}

impl HopError {
    /// The gRPC code a receipt reports for this failure.
    /// This replica's app did not process the message (`--webhook-ack`):
    /// final for this hop, as a peer's answer would be.
    pub fn app(failure: crate::local::AppFailure) -> Self {
        let error = Error::App(failure);
        Self::Rejected {
            code: error.code(),
            message: error.to_string(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Rejected { code, .. } => *code,
            _ => Code::Unavailable,
        }
    }

    /// A failure of the stream or the peer's moment, not of the message:
    /// the hop is retried while its deadline allows.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect(_)
                | Self::StreamBroken(_)
                | Self::StreamClosed
                | Self::Stalled(_)
                | Self::NotReading(_)
                | Self::Refused(_)
        )
    }

    /// The peer may not have the message: it is kept for redelivery.
    pub fn is_missed(&self) -> bool {
        self.is_transient() || matches!(self, Self::Timeout(_) | Self::Skipped { .. } | Self::Saturated(_))
    }
}

fn millis(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

fn seconds(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
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
    fn a_hundred_failed_receipts_fit_in_8_kib_failed_first() {
        use crate::proto::v1::PeerOutcome;
        let outcomes: Vec<PeerOutcome> = (0..100u32)
            .map(|i| PeerOutcome {
                peer: format!("10.0.{}.{}:7420", i / 250, i % 250),
                code: if i < 10 { 0 } else { 14 },
                message: if i < 10 {
                    String::new()
                } else {
                    format!(
                        "cannot open the delivery stream: tcp connect error: Connection refused {}",
                        "x".repeat(120)
                    )
                },
                latency: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 1_000_000,
                }),
                ..PeerOutcome::default()
            })
            .collect();
        let response = BroadcastResponse {
            id: "m".into(),
            replicas: 100,
            acked: 10,
            required: 100,
            outcomes,
            ..Default::default()
        };
        assert!(
            response.encoded_len() > 16 * 1024,
            "the case that broke grpc C-core clients"
        );
        let s: Status = Error::PolicyNotMet {
            summary: "not met ".repeat(500),
            deadline_exceeded: false,
            response: Box::new(response.clone()),
        }
        .into();
        // As they travel: the message percent-encoded (ASCII here), the details base64.
        let trailers = s.message().len() + s.details().len() * 4 / 3 + 64;
        assert!(trailers < 8 * 1024, "status trailers are {trailers} bytes");
        let carried = broadcast_response_from_status(&s).expect("receipts in the details");
        assert_eq!(
            (carried.replicas, carried.acked, carried.required),
            (100, 10, 100),
            "counts are complete"
        );
        assert!(!carried.outcomes.is_empty());
        assert!(
            carried.outcomes.iter().all(|o| o.code == 14),
            "failed receipts come first"
        );
        assert_eq!(
            carried.omitted_outcomes as usize + carried.outcomes.len(),
            100,
            "what is left out is counted"
        );
        assert_eq!(
            bounded_receipts(&response, usize::MAX),
            response,
            "small enough: untouched"
        );
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
