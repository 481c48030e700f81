//! The fan-out's decisions over fake links, with paused time: policy
//! counting, caller- vs peer-bounded deadlines, background completion and
//! the peer set's links.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::future::BoxFuture;

use super::*;
use crate::{local::LocalLimits, proto::v1::Message, telemetry::spans::SendSpan};

/// How a fake peer answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Acknowledges after this long.
    AckAfter(Duration),
    /// Refuses at once (connection refused, retries exhausted).
    Refuse,
    /// Never answers: times out at the hop's deadline, as a real link does.
    Silent,
}

#[derive(Debug)]
struct FakeLink {
    answer: Answer,
    hops: AtomicUsize,
    member: Mutex<bool>,
}

impl Link for FakeLink {
    fn submit(&self, hop: Hop) {
        self.hops.fetch_add(1, Ordering::SeqCst);
        let answer = self.answer;
        // The fake's own timer: a real link answers from its task.
        tokio::spawn(async move {
            let result = match answer {
                Answer::AckAfter(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(Acked {
                        sequence: 1,
                        duplicate: false,
                    })
                }
                Answer::Refuse => Err(HopError::Connect("connection refused".into())),
                Answer::Silent => {
                    let started = Instant::now();
                    tokio::time::sleep_until(hop.deadline).await;
                    Err(HopError::Timeout(Instant::now() - started))
                }
            };
            let latency = hop.started.elapsed();
            hop.receipt.report(result, latency);
        });
    }

    fn status(&self) -> LinkStatus {
        let member = *self.member.lock().unwrap();
        LinkStatus {
            retiring: !member,
            idle: !member,
            ..LinkStatus::default()
        }
    }

    fn set_member(&self, member: bool) {
        *self.member.lock().unwrap() = member;
    }

    fn stop(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

const SELF: &str = "127.0.0.1:7420";
const PEER_TIMEOUT: Duration = Duration::from_secs(1);

fn addr(i: u8) -> SocketAddr {
    format!("127.0.0.{i}:7420").parse().unwrap()
}

/// A fan-out from 127.0.0.1 whose peer 127.0.0.N answers `answers[N-2]`;
/// returns it with how many links it made.
fn fanout(answers: Vec<Answer>, max_in_flight: usize) -> (FanOut, Arc<AtomicUsize>) {
    let local = Arc::new(LocalDelivery::new(LocalLimits {
        replay_capacity: 100,
        replay_max_bytes: 1 << 20,
        dedup_capacity: 100,
        dedup_ttl: Duration::from_secs(60),
        subscriber_buffer: 100,
    }));
    let made = Arc::new(AtomicUsize::new(0));
    let answers: HashMap<SocketAddr, Answer> = answers
        .into_iter()
        .enumerate()
        .map(|(i, answer)| (addr(i as u8 + 2), answer))
        .collect();
    let connect: Connect = {
        let made = made.clone();
        Box::new(move |peer| {
            made.fetch_add(1, Ordering::SeqCst);
            Arc::new(FakeLink {
                answer: answers.get(&peer).copied().unwrap_or(Answer::Silent),
                hops: AtomicUsize::new(0),
                member: Mutex::new(true),
            })
        })
    };
    let fanout = FanOut::new(
        SELF.parse().unwrap(),
        local,
        max_in_flight,
        PEER_TIMEOUT,
        BacklogBudget::new(1 << 20),
        connect,
        Metrics::default(),
    );
    (fanout, made)
}

fn snapshot(peers: &[SocketAddr]) -> Arc<PeerSnapshot> {
    Arc::new(PeerSnapshot {
        peers: peers.to_vec(),
        ready: true,
        ..PeerSnapshot::default()
    })
}

/// Sets the peer set to this replica plus `n` peers.
fn with_peers(fanout: &FanOut, n: u8) -> Arc<PeerSet> {
    let mut peers: Vec<SocketAddr> = (2..n + 2).map(addr).collect();
    peers.push(SELF.parse().unwrap());
    fanout.update_peers(snapshot(&peers));
    fanout.peer_set().borrow().clone()
}

fn message(id: &str) -> EncodedMessage {
    EncodedMessage::encode(Message {
        id: id.into(),
        topic: "t".into(),
        origin: SELF.into(),
        ..Default::default()
    })
}

/// A Broadcast's budget: the caller's timeout, if any.
fn budget(caller: Option<Duration>) -> Budget {
    Budget::new(Instant::now(), caller, Duration::from_secs(5), PEER_TIMEOUT)
}

async fn broadcast(
    fanout: &FanOut,
    peers: &PeerSet,
    id: &str,
    policy: AckPolicy,
    caller: Option<Duration>,
) -> Result<BroadcastResponse, Error> {
    fanout
        .broadcast(message(id), peers, policy, budget(caller), &SendSpan::none())
        .await
}

fn codes(response: &BroadcastResponse) -> Vec<(String, i32, bool)> {
    response
        .outcomes
        .iter()
        .map(|o| (o.peer.clone(), o.code, o.pending))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn all_waits_for_every_replica_and_reports_each_in_address_order() {
    let ms = Duration::from_millis;
    let (fanout, _) = fanout(vec![Answer::AckAfter(ms(30)), Answer::AckAfter(ms(10))], 16);
    let peers = with_peers(&fanout, 2);
    let started = Instant::now();
    let response = broadcast(&fanout, &peers, "m", AckPolicy::All, None)
        .await
        .unwrap();
    assert_eq!(
        Instant::now() - started,
        ms(30),
        "returns with the slowest receipt"
    );
    assert_eq!((response.replicas, response.acked, response.required), (3, 3, 3));
    assert_eq!(
        codes(&response),
        vec![
            (SELF.into(), 0, false),
            (addr(2).to_string(), 0, false),
            (addr(3).to_string(), 0, false)
        ]
    );
    assert!(response.outcomes[0].local);
    assert_eq!(fanout.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn quorum_returns_when_met_and_the_rest_finishes_in_the_background() {
    let (fanout, _) = fanout(
        vec![
            Answer::AckAfter(Duration::from_millis(5)),
            Answer::AckAfter(Duration::from_millis(500)),
        ],
        16,
    );
    let peers = with_peers(&fanout, 2);
    let started = Instant::now();
    let response = broadcast(&fanout, &peers, "m", AckPolicy::Quorum, None)
        .await
        .unwrap();
    assert_eq!(Instant::now() - started, Duration::from_millis(5));
    assert_eq!(response.acked, 2);
    assert!(
        response.outcomes[2].pending,
        "the slow replica is still in flight"
    );
    assert_eq!(fanout.in_flight(), 1, "its hop holds the Broadcast's permit");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fanout.in_flight(), 0, "done in the background");
}

#[tokio::test(start_paused = true)]
async fn a_policy_that_cannot_be_met_still_waits_for_every_final_receipt() {
    let (fanout, _) = fanout(
        vec![Answer::Refuse, Answer::AckAfter(Duration::from_millis(50))],
        16,
    );
    let peers = with_peers(&fanout, 2);
    let started = Instant::now();
    let error = broadcast(&fanout, &peers, "m", AckPolicy::All, None)
        .await
        .unwrap_err();
    assert_eq!(
        Instant::now() - started,
        Duration::from_millis(50),
        "waited for the healthy one"
    );
    let Error::PolicyNotMet {
        response,
        deadline_exceeded,
        summary,
    } = error
    else {
        panic!("expected PolicyNotMet");
    };
    assert!(!deadline_exceeded);
    assert!(
        summary.contains("2 of 3 replicas acknowledged (3 required)"),
        "{summary}"
    );
    assert!(
        response.outcomes.iter().all(|o| !o.pending),
        "every receipt is final: {:?}",
        codes(&response)
    );
    assert_eq!(response.outcomes[1].code, tonic::Code::Unavailable as i32);
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_costs_the_peer_timeout_and_fails_unavailable() {
    let (fanout, _) = fanout(vec![Answer::Silent], 16);
    let peers = with_peers(&fanout, 1);
    let started = Instant::now();
    let error = broadcast(&fanout, &peers, "m", AckPolicy::All, None)
        .await
        .unwrap_err();
    assert_eq!(
        Instant::now() - started,
        PEER_TIMEOUT,
        "bounded by --peer-timeout, not the 5 s default"
    );
    assert_eq!(tonic::Status::from(error).code(), tonic::Code::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn a_caller_deadline_shorter_than_the_peer_timeout_is_deadline_exceeded() {
    let (fanout, _) = fanout(vec![Answer::Silent], 16);
    let peers = with_peers(&fanout, 1);
    let started = Instant::now();
    let error = broadcast(
        &fanout,
        &peers,
        "m",
        AckPolicy::All,
        Some(Duration::from_millis(200)),
    )
    .await
    .unwrap_err();
    let waited = Instant::now() - started;
    assert!(
        waited < Duration::from_millis(200),
        "answered before the caller gives up: {waited:?}"
    );
    let Error::PolicyNotMet {
        response,
        deadline_exceeded,
        ..
    } = &error
    else {
        panic!("expected PolicyNotMet, got {error:?}");
    };
    assert!(*deadline_exceeded, "the caller's deadline, not the peer, ran out");
    assert_eq!(
        response.outcomes[1].code,
        tonic::Code::DeadlineExceeded as i32,
        "the hop timed out (its receipt is final, not pending)"
    );
    assert_eq!(tonic::Status::from(error).code(), tonic::Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn broadcasts_beyond_the_limit_are_refused_while_background_hops_hold_permits() {
    let (fanout, _) = fanout(vec![Answer::AckAfter(Duration::from_secs(1))], 1);
    let peers = with_peers(&fanout, 1);
    let first = broadcast(&fanout, &peers, "a", AckPolicy::None, None)
        .await
        .unwrap();
    assert!(first.outcomes[1].pending);
    let refused = broadcast(&fanout, &peers, "b", AckPolicy::None, None).await;
    assert!(
        matches!(refused, Err(Error::Overloaded { limit: 1 })),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(1001)).await;
    assert!(
        broadcast(&fanout, &peers, "c", AckPolicy::None, None)
            .await
            .is_ok(),
        "the hop is done: its permit is back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_broadcast_nobody_polls_releases_its_permit_when_its_hops_are_done() {
    let (fanout, _) = fanout(vec![Answer::AckAfter(Duration::from_millis(10))], 1);
    let peers = with_peers(&fanout, 1);
    let mut call = Box::pin(broadcast(&fanout, &peers, "m", AckPolicy::All, None));
    assert!(
        futures::poll!(call.as_mut()).is_pending(),
        "waiting for the peer's receipt"
    );
    // Like a Publish stream whose client stopped reading: not polled again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(fanout.in_flight(), 0, "the hops are done; the permit is back");
    assert!(
        call.await.is_ok(),
        "and the receipt is still there when it is polled"
    );
}

#[tokio::test(start_paused = true)]
async fn links_open_when_peers_join_and_retire_when_they_leave() {
    let (fanout, made) = fanout(vec![], 16);
    with_peers(&fanout, 3);
    assert_eq!(
        made.load(Ordering::SeqCst),
        3,
        "one link per peer, before any Broadcast"
    );
    let set = with_peers(&fanout, 3);
    assert_eq!(made.load(Ordering::SeqCst), 3, "the same peers keep their links");
    assert_eq!(set.remotes().count(), 3, "this replica is not a remote");
    let set = with_peers(&fanout, 2);
    assert_eq!(set.remotes().count(), 2);
    // The fake says it holds nothing once retired: dropped at the next update.
    with_peers(&fanout, 2);
    assert!(fanout.departed().is_empty());
    with_peers(&fanout, 3);
    assert_eq!(made.load(Ordering::SeqCst), 4, "a dropped link is made anew");
}
