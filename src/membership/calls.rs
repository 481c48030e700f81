//! The Announce calls one replica makes to another: its own JOIN and LEAVE,
//! and the IDENTIFY probe that checks someone else's announcement. Each
//! call opens its own connection and is bounded by one timeout: they are
//! rare (a few per replica start and stop), and the peer's link must not
//! be held up by them.

use std::{net::SocketAddr, time::Duration};

use crate::tls::Dialer;

use crate::proto::v1::{
    AnnounceRequest, AnnounceResponse, AnnouncedReplica, announce_request::Kind,
    replicast_client::ReplicastClient,
};

use super::view::ProbeResult;

/// Who answered an Announce call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub address: String,
    pub incarnation: u64,
    pub serving: bool,
    /// Replicas the answering replica knows by their announcement.
    pub announced: Vec<(SocketAddr, u64)>,
    /// Replicas the answering replica took out after their leave.
    pub left: Vec<(SocketAddr, u64)>,
}

/// Why an Announce call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
}

/// Sends one Announce request to `peer` and waits at most `timeout`.
pub async fn announce(
    dialer: &Dialer,
    peer: SocketAddr,
    kind: Kind,
    self_addr: SocketAddr,
    incarnation: u64,
    timeout: Duration,
) -> Result<Answer, CallError> {
    let call = async {
        let endpoint = Dialer::endpoint(peer)
            .map_err(CallError::Connect)?
            .connect_timeout(timeout);
        let channel = dialer.connect(endpoint).await.map_err(CallError::Connect)?;
        let mut request = tonic::Request::new(AnnounceRequest {
            kind: kind as i32,
            address: self_addr.to_string(),
            incarnation,
        });
        request.set_timeout(timeout);
        let response = ReplicastClient::new(channel).announce(request).await?;
        Ok(answer(response.into_inner()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| CallError::Timeout(timeout))?
}

fn answer(response: AnnounceResponse) -> Answer {
    Answer {
        address: response.address,
        incarnation: response.incarnation,
        serving: response.serving,
        announced: replicas(response.announced),
        left: replicas(response.left),
    }
}

fn replicas(list: Vec<AnnouncedReplica>) -> Vec<(SocketAddr, u64)> {
    // An entry that does not parse is someone else's bug; skip it.
    list.into_iter()
        .filter_map(|r| Some((r.address.parse().ok()?, r.incarnation)))
        .collect()
}

/// What an IDENTIFY answer (or its failure) says about the announcement of
/// `peer` as `incarnation`.
pub fn probe_result(peer: SocketAddr, incarnation: u64, answer: &Result<Answer, CallError>) -> ProbeResult {
    match answer {
        Ok(answer)
            if answer.incarnation == incarnation
                && answer.address.parse::<SocketAddr>().ok() == Some(peer) =>
        {
            if answer.serving {
                ProbeResult::Serving
            } else {
                ProbeResult::Draining
            }
        }
        Err(CallError::Connect(_) | CallError::Timeout(_)) => ProbeResult::Gone,
        _ => ProbeResult::Refuted,
    }
}

/// Why a probe refuted an announcement, for the log line and the caller's
/// status.
pub fn refutation(peer: SocketAddr, incarnation: u64, answer: &Result<Answer, CallError>) -> String {
    match answer {
        Err(error) => format!("{peer} did not answer the identity probe: {error}"),
        Ok(answer) if answer.incarnation != incarnation || answer.address != peer.to_string() => format!(
            "{peer} answered as {} incarnation {}, not incarnation {incarnation}",
            answer.address, answer.incarnation
        ),
        Ok(answer) if answer.serving => format!("{peer} says it is serving, not draining"),
        Ok(_) => format!("{peer} says it is draining, not serving"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "10.0.0.5:7420".parse().unwrap()
    }

    fn answer(address: &str, incarnation: u64, serving: bool) -> Result<Answer, CallError> {
        Ok(Answer {
            address: address.to_owned(),
            incarnation,
            serving,
            announced: Vec::new(),
            left: Vec::new(),
        })
    }

    #[test]
    fn a_probe_needs_the_same_address_and_incarnation() {
        assert_eq!(
            probe_result(addr(), 7, &answer("10.0.0.5:7420", 7, true)),
            ProbeResult::Serving
        );
        assert_eq!(
            probe_result(addr(), 7, &answer("10.0.0.5:7420", 7, false)),
            ProbeResult::Draining
        );
        assert_eq!(
            probe_result(addr(), 7, &answer("10.0.0.5:7420", 8, true)),
            ProbeResult::Refuted
        );
        assert_eq!(
            probe_result(addr(), 7, &answer("10.0.0.6:7420", 7, true)),
            ProbeResult::Refuted
        );
        let failed = Err(CallError::Timeout(Duration::from_secs(1)));
        assert_eq!(probe_result(addr(), 7, &failed), ProbeResult::Gone);
        let other = Err(CallError::Status(tonic::Status::unimplemented("not a replica")));
        assert_eq!(probe_result(addr(), 7, &other), ProbeResult::Refuted);
        assert!(refutation(addr(), 7, &failed).contains("did not answer"));
        assert!(
            refutation(addr(), 7, &answer("10.0.0.6:7420", 7, true)).contains("answered as 10.0.0.6:7420")
        );
    }
}
