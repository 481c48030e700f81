//! Subscribe: topic filters, resume without gap, OUT_OF_RANGE, slow subscribers.

use crate::common;

use std::time::Duration;

use common::{Cluster, next_delivery, subscribe};
use replicast::proto::v1::{AckPolicy, BroadcastRequest, ListPeersRequest, SubscribeRequest};
use tonic::Code;

async fn publish(cluster: &Cluster, topic: &str, payload: Vec<u8>) -> String {
    cluster
        .client(0)
        .await
        .broadcast(BroadcastRequest {
            topic: topic.into(),
            payload: payload.into(),
            ack: AckPolicy::All as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("broadcast on {topic}: {s:?}"))
        .into_inner()
        .id
}

#[tokio::test]
async fn topic_filters_select_exact_topics_and_prefixes() {
    let cluster = Cluster::start(2, &[]).await;
    let mut filtered = subscribe(cluster.addr(1), &["cache.*", "users"], 0).await;
    let mut everything = subscribe(cluster.addr(1), &[], 0).await;
    for topic in [
        "orders",
        "cache.invalidate",
        "users.login",
        "users",
        "cache.flush",
    ] {
        publish(&cluster, topic, topic.as_bytes().to_vec()).await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next_delivery(&mut filtered).await;
        got.push((d.sequence, d.message.unwrap().topic));
    }
    assert_eq!(
        got,
        vec![
            (2, "cache.invalidate".into()),
            (4, "users".into()),
            (5, "cache.flush".into())
        ],
        "only matching topics, in sequence order"
    );
    for seq in 1..=5 {
        assert_eq!(
            next_delivery(&mut everything).await.sequence,
            seq,
            "no filter gets everything"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn resume_after_a_sequence_replays_then_continues_live_without_gap() {
    let cluster = Cluster::start(2, &[]).await;
    for i in 1..=5 {
        publish(&cluster, "t", format!("m{i}").into_bytes()).await;
    }
    let mut resumed = subscribe(cluster.addr(1), &[], 2).await;
    for seq in 3..=5 {
        let d = next_delivery(&mut resumed).await;
        assert_eq!(d.sequence, seq, "replayed from the ring");
        assert_eq!(d.message.unwrap().payload, format!("m{seq}").into_bytes());
    }
    publish(&cluster, "t", b"m6".to_vec()).await;
    let live = next_delivery(&mut resumed).await;
    assert_eq!(live.sequence, 6, "then live, with no gap and no duplicate");

    // Resuming at the head replays nothing and continues live.
    let mut at_head = subscribe(cluster.addr(1), &[], 6).await;
    publish(&cluster, "t", b"m7".to_vec()).await;
    assert_eq!(next_delivery(&mut at_head).await.sequence, 7);
    cluster.shutdown().await;
}

#[tokio::test]
async fn resuming_before_the_ring_is_out_of_range_naming_the_oldest() {
    let cluster = Cluster::start(1, &["--replay-capacity", "3"]).await;
    for i in 1..=6 {
        publish(&cluster, "t", format!("m{i}").into_bytes()).await;
    }
    let mut client = cluster.client(0).await;
    let mut stream = client
        .subscribe(replicast::proto::v1::SubscribeRequest {
            topics: vec![],
            after_sequence: 1,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner());
    // tonic may report the status on the call or as the stream's first item.
    let status = match &mut stream {
        Err(status) => status.clone(),
        Ok(s) => s.message().await.expect_err("resume before the ring must fail"),
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("oldest retained sequence is 4"),
        "names the oldest available: {}",
        status.message()
    );

    let status = client
        .subscribe(replicast::proto::v1::SubscribeRequest {
            topics: vec![],
            after_sequence: 99,
            ..Default::default()
        })
        .await
        .expect_err("resume ahead of the replica");
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(status.message().contains("restarted"), "{}", status.message());
    cluster.shutdown().await;
}

#[tokio::test]
async fn slow_subscriber_is_cut_off_with_a_resume_point_and_blocks_nobody() {
    let cluster = Cluster::start(2, &["--subscriber-buffer", "8", "--replay-capacity", "1000"]).await;
    let mut slow = subscribe(cluster.addr(1), &[], 0).await;
    let mut fast = subscribe(cluster.addr(1), &[], 0).await;
    // 200 x 64 KiB overflows the HTTP/2 windows and then the 8-slot buffer of
    // the subscriber that reads nothing. Every broadcast must still succeed.
    let payload = vec![7u8; 64 * 1024];
    let mut fast_seen = 0;
    for _ in 0..200 {
        publish(&cluster, "bulk", payload.clone()).await;
        fast_seen = next_delivery(&mut fast).await.sequence;
    }
    assert_eq!(fast_seen, 200, "the reading subscriber got everything");

    // The slow one gets what was buffered, then a clear end.
    let mut last = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.message())
            .await
            .expect("not stuck")
        {
            Ok(Some(d)) => {
                assert_eq!(d.sequence, last + 1, "no gap before the cut");
                last = d.sequence;
            }
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let hint = format!("after_sequence={last}");
    assert!(
        status.message().contains(&hint),
        "tells where to resume ({hint}): {}",
        status.message()
    );

    // Resuming where it says continues with no gap.
    let mut resumed = subscribe(cluster.addr(1), &[], last).await;
    assert_eq!(next_delivery(&mut resumed).await.sequence, last + 1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_restarted_replica_refuses_a_resume_from_its_previous_life() {
    let mut cluster = Cluster::start(1, &[]).await;
    let addr = cluster.addr(0);
    let mut stream = subscribe(addr, &[], 0).await;
    publish(&cluster, "t", b"before".to_vec()).await;
    let first = next_delivery(&mut stream).await;
    let old = first.incarnation;
    assert_ne!(old, 0, "every delivery names its incarnation");
    let view = cluster
        .client(0)
        .await
        .list_peers(ListPeersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((view.incarnation, view.last_sequence), (old, 1));

    // Restart on the same address: a new process lifetime, sequences from 1.
    cluster.replicas[0].take().unwrap().shutdown().await.unwrap();
    cluster.hosts.listeners[0] = Some(tokio::net::TcpListener::bind(addr).await.unwrap());
    cluster.start_replica(0, &[]);
    common::wait_serving(addr).await;
    for i in 0..3 {
        publish(&cluster, "t", format!("after{i}").into_bytes()).await;
    }
    let mut client = cluster.client(0).await;
    let resume = |incarnation| SubscribeRequest {
        topics: vec![],
        after_sequence: 1,
        incarnation,
        ..Default::default()
    };
    let status = client.subscribe(resume(old)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("restarted"), "{}", status.message());

    let current = client
        .list_peers(ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .incarnation;
    assert_ne!(current, old);
    let mut resumed = client.subscribe(resume(current)).await.unwrap().into_inner();
    let next = resumed.message().await.unwrap().unwrap();
    assert_eq!((next.sequence, next.incarnation), (2, current));

    // A new subscriber can read everything the new incarnation still holds.
    let from_oldest = SubscribeRequest {
        from_oldest: true,
        ..Default::default()
    };
    let mut everything = client.subscribe(from_oldest).await.unwrap().into_inner();
    let first = everything.message().await.unwrap().unwrap();
    assert_eq!(
        (first.sequence, &first.message.unwrap().payload[..]),
        (1, &b"after0"[..])
    );
    cluster.shutdown().await;
}
