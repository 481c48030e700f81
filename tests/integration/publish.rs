//! Publish: many Broadcasts on one stream, over real gRPC to real replicas.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{Cluster, HungPeer, eventually, next_delivery, subscribe};
use replicast::proto::v1::{AckPolicy, BroadcastRequest, ListPeersRequest, PublishRequest, PublishResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

fn publish_request(tag: u64, topic: &str, id: &str) -> PublishRequest {
    PublishRequest {
        tag,
        broadcast: Some(BroadcastRequest {
            topic: topic.into(),
            payload: tag.to_be_bytes().to_vec().into(),
            id: id.into(),
            ack: AckPolicy::All as i32,
            ..Default::default()
        }),
        timeout: None,
    }
}

/// Opens a Publish stream on `cluster`'s replica `i`.
async fn open(cluster: &Cluster, i: usize) -> (mpsc::Sender<PublishRequest>, Streaming<PublishResponse>) {
    let (requests, rx) = mpsc::channel(1024);
    let responses = cluster
        .client(i)
        .await
        .publish(ReceiverStream::new(rx))
        .await
        .expect("Publish opens")
        .into_inner();
    (requests, responses)
}

/// Replica 0 (started with `extra` and a 1 s peer timeout) and, in DNS as
/// replica 1, a peer that accepts connections and never answers.
async fn with_a_hung_peer(extra: &[&str]) -> (Cluster, HungPeer) {
    let mut cluster = Cluster::start_with(2, 0, &[]).await;
    let hung = HungPeer::start(cluster.hosts.listeners[1].take().unwrap());
    cluster.publish(&[0, 1]).await;
    let mut args = vec!["--peer-timeout", "1s"];
    args.extend_from_slice(extra);
    cluster.start_replica(0, &args);
    common::wait_serving(cluster.addr(0)).await;
    common::wait_peer_count(cluster.addr(0), 2).await;
    (cluster, hung)
}

async fn last_sequence(cluster: &Cluster, i: usize) -> u64 {
    cluster
        .client(i)
        .await
        .list_peers(ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .last_sequence
}

#[tokio::test]
async fn every_message_on_a_stream_is_answered_by_tag_and_reaches_every_replica_once() {
    let cluster = Cluster::start(3, &[]).await;
    common::wait_peer_count(cluster.addr(0), 3).await;
    let mut subscribers = Vec::new();
    for i in 0..3 {
        subscribers.push(subscribe(cluster.addr(i), &["pub"], 0).await);
    }
    let (requests, mut responses) = open(&cluster, 0).await;
    const N: u64 = 300;
    for tag in 0..N {
        requests.send(publish_request(tag, "pub", "")).await.unwrap();
    }
    // A bad message fails alone; the stream goes on.
    requests.send(publish_request(1000, "", "")).await.unwrap();
    requests
        .send(publish_request(N, "pub", "fixed-id"))
        .await
        .unwrap();
    requests
        .send(publish_request(N + 1, "pub", "fixed-id"))
        .await
        .unwrap();
    drop(requests);

    let mut answers: HashMap<u64, PublishResponse> = HashMap::new();
    while let Some(response) = responses.message().await.expect("the stream ends cleanly") {
        assert!(
            answers.insert(response.tag, response).is_none(),
            "one response per request"
        );
    }
    assert_eq!(
        answers.len() as u64,
        N + 3,
        "every request answered, then the stream ended"
    );
    for tag in 0..=N {
        let answer = &answers[&tag];
        assert_eq!(answer.code, 0, "tag {tag}: {}", answer.error);
        let receipts = answer.response.as_ref().expect("receipts");
        assert_eq!((receipts.replicas, receipts.acked), (3, 3), "tag {tag}");
        assert!(receipts.outcomes.iter().all(|o| o.code == 0 && !o.pending));
    }
    let bad = &answers[&1000];
    assert_eq!(bad.code, Code::InvalidArgument as i32);
    assert!(bad.error.contains("topic is required"), "{}", bad.error);
    assert!(bad.response.is_none(), "nothing was accepted");
    let retried = answers[&(N + 1)].response.as_ref().unwrap();
    assert!(
        retried.outcomes.iter().all(|o| o.duplicate),
        "the same id again is a duplicate everywhere: {retried:?}"
    );

    // Every replica's subscriber has each accepted message exactly once.
    for (i, subscriber) in subscribers.iter_mut().enumerate() {
        let mut seen = HashMap::new();
        for _ in 0..=N {
            let delivery = next_delivery(subscriber).await;
            let message = delivery.message.unwrap();
            *seen.entry(message.payload.to_vec()).or_insert(0) += 1;
        }
        assert_eq!(seen.len() as u64, N + 1, "replica {i}: every message");
        assert!(seen.values().all(|n| *n == 1), "replica {i}: exactly once");
        assert_eq!(
            last_sequence(&cluster, i).await,
            N + 1,
            "replica {i}: nothing more"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn past_the_window_the_replica_stops_reading_and_loses_nothing() {
    // Each message waits out the hung peer's timeout.
    let (cluster, _hung) = with_a_hung_peer(&["--publish-window", "4"]).await;
    let (requests, mut responses) = open(&cluster, 0).await;
    for tag in 0..12 {
        requests.send(publish_request(tag, "t", "")).await.unwrap();
    }
    // Each accepted message is delivered locally at once: the sequence
    // counts what the replica read.
    eventually(
        "the replica reads a window of messages",
        Duration::from_secs(5),
        || async { last_sequence(&cluster, 0).await == 4 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        last_sequence(&cluster, 0).await,
        4,
        "with 4 in flight it reads no further: the client is held back by flow control"
    );
    drop(requests);
    let mut answered = Vec::new();
    while let Some(response) = responses.message().await.expect("the stream ends cleanly") {
        // ALL cannot be met without the hung peer; its receipt is final.
        assert_eq!(response.code, Code::Unavailable as i32, "{}", response.error);
        let receipts = response.response.expect("receipts of a failed policy");
        assert_eq!((receipts.replicas, receipts.acked), (2, 1));
        answered.push(response.tag);
    }
    answered.sort_unstable();
    assert_eq!(
        answered,
        (0..12).collect::<Vec<_>>(),
        "every message answered, none lost"
    );
    assert_eq!(last_sequence(&cluster, 0).await, 12);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_draining_replica_answers_unavailable_then_ends_the_stream() {
    // A message stays in flight for the hung peer's timeout while the
    // drain begins.
    let (cluster, _hung) = with_a_hung_peer(&["--drain-timeout", "2s"]).await;
    let (requests, mut responses) = open(&cluster, 0).await;
    let mut in_flight = publish_request(1, "t", "");
    in_flight.broadcast.as_mut().unwrap().ack = AckPolicy::All as i32;
    requests.send(in_flight).await.unwrap();
    eventually(
        "the first message is accepted",
        Duration::from_secs(5),
        || async { last_sequence(&cluster, 0).await == 1 },
    )
    .await;

    cluster.replicas[0].as_ref().unwrap().begin_shutdown();
    eventually("the replica is draining", Duration::from_secs(5), || async {
        common::health_status(cluster.addr(0), "").await
            == tonic_health::pb::health_check_response::ServingStatus::NotServing
    })
    .await;
    requests.send(publish_request(2, "t", "")).await.unwrap();
    let refused = responses.message().await.unwrap().expect("an answer");
    assert_eq!(refused.tag, 2, "answered at once, before the message in flight");
    assert_eq!(refused.code, Code::Unavailable as i32);
    assert!(
        refused.error.contains("reconnect to another replica"),
        "{}",
        refused.error
    );
    assert!(refused.response.is_none(), "not accepted");
    let finished = responses
        .message()
        .await
        .unwrap()
        .expect("the message in flight is answered");
    assert_eq!(finished.tag, 1);
    assert!(finished.response.is_some(), "with its receipts");
    let end = responses.message().await.expect_err("then the stream ends");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert_eq!(
        last_sequence(&cluster, 0).await,
        1,
        "nothing after the drain began was accepted"
    );
    drop(requests);
    cluster.shutdown().await;
}
