//! DeliverStream across versions, played with the public generated client:
//! a sender that does not ask for batched acks (an older replica) gets one
//! ack per frame, as before; one that asks gets every frame acknowledged
//! exactly once, delivered ones possibly together.

use crate::common;

use std::collections::HashMap;

use common::Cluster;
use replicast::proto::v1::{DeliverAck, DeliverFrame, Message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

fn frame(tag: u64, id: &str) -> DeliverFrame {
    DeliverFrame {
        tag,
        message: Some(Message {
            id: id.into(),
            topic: "t".into(),
            origin: "127.0.0.9:7420".into(),
            payload: b"x".to_vec().into(),
            ..Default::default()
        }),
        trace_context: HashMap::new(),
        ack_timeout_ms: 0,
    }
}

/// Sends `frames` (all at once) on one DeliverStream to replica 0 and reads
/// acks until every tag is answered; returns the acks.
async fn exchange(cluster: &Cluster, frames: Vec<DeliverFrame>, batch: bool) -> Vec<DeliverAck> {
    let expected = frames.len();
    let (tx, rx) = mpsc::channel(frames.len());
    for frame in frames {
        tx.send(frame).await.unwrap();
    }
    let mut request = Request::new(ReceiverStream::new(rx));
    if batch {
        request
            .metadata_mut()
            .insert("replicast-batch-acks", "1".parse().unwrap());
    }
    let mut acks = cluster
        .client(0)
        .await
        .deliver_stream(request)
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    let mut answered = 0;
    while answered < expected {
        let ack = acks.message().await.unwrap().expect("an ack");
        answered += 1 + ack.also.len();
        received.push(ack);
    }
    drop(tx);
    received
}

#[tokio::test]
async fn a_sender_that_did_not_ask_gets_one_ack_per_frame() {
    let cluster = Cluster::start(1, &[]).await;
    let mut frames: Vec<DeliverFrame> = (1..=50).map(|t| frame(t, &format!("old-{t}"))).collect();
    frames.push(DeliverFrame {
        tag: 99,
        message: None,
        trace_context: HashMap::new(),
        ack_timeout_ms: 0,
    });
    let acks = exchange(&cluster, frames, false).await;
    assert_eq!(acks.len(), 51, "one ack per frame");
    assert!(acks.iter().all(|a| a.also.is_empty()), "never batched");
    let bad = acks.iter().find(|a| a.tag == 99).unwrap();
    assert_eq!(bad.code, Code::InvalidArgument as i32, "{bad:?}");
    assert!(bad.error.contains("message is required"), "{}", bad.error);
    let mut tags: Vec<u64> = acks.iter().filter(|a| a.code == 0).map(|a| a.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (1..=50).collect::<Vec<_>>());
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_sender_that_asked_gets_every_frame_acknowledged_exactly_once() {
    let cluster = Cluster::start(1, &[]).await;
    let mut frames: Vec<DeliverFrame> = (1..=200).map(|t| frame(t, &format!("new-{t}"))).collect();
    frames.insert(
        100,
        DeliverFrame {
            tag: 999,
            message: None,
            trace_context: HashMap::new(),
            ack_timeout_ms: 0,
        },
    );
    let acks = exchange(&cluster, frames, true).await;
    let mut delivered: Vec<(u64, u64)> = Vec::new();
    for ack in &acks {
        if ack.code == 0 {
            delivered.push((ack.tag, ack.response.as_ref().unwrap().sequence));
            delivered.extend(ack.also.iter().map(|d| (d.tag, d.sequence)));
        } else {
            assert_eq!(ack.tag, 999, "only the bad frame fails: {ack:?}");
            assert!(ack.also.is_empty());
        }
    }
    delivered.sort_unstable();
    assert_eq!(
        delivered.iter().map(|(tag, _)| *tag).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>(),
        "each delivered frame once"
    );
    let mut sequences: Vec<u64> = delivered.iter().map(|(_, seq)| *seq).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences,
        (1..=200).collect::<Vec<_>>(),
        "with its own sequence number"
    );
    assert!(
        acks.len() < 201,
        "frames read together were acknowledged together ({} acks for 201 frames)",
        acks.len()
    );
    cluster.shutdown().await;
}
