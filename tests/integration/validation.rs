//! Bad input gets a clear status naming the limit, and never hurts the server.

use crate::common;

use std::collections::HashMap;

use common::Cluster;
use replicast::proto::v1::{BroadcastRequest, DeliverRequest, Message, SubscribeRequest};
use tonic::Code;

fn valid() -> BroadcastRequest {
    BroadcastRequest {
        topic: "t".into(),
        payload: b"ok".to_vec().into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_invalid_broadcast_gets_a_status_that_names_the_problem() {
    let cluster = Cluster::start(1, &["--max-message-bytes", "1024"]).await;
    let mut client = cluster.client(0).await;
    let many_headers: HashMap<String, String> = (0..65).map(|i| (format!("h{i}"), String::new())).collect();
    let cases: Vec<(&str, BroadcastRequest, Code, &str)> = vec![
        (
            "empty topic",
            BroadcastRequest {
                topic: "".into(),
                ..valid()
            },
            Code::InvalidArgument,
            "topic is required",
        ),
        (
            "topic with space",
            BroadcastRequest {
                topic: "a b".into(),
                ..valid()
            },
            Code::InvalidArgument,
            "malformed",
        ),
        (
            "wildcard topic",
            BroadcastRequest {
                topic: "a.*".into(),
                ..valid()
            },
            Code::InvalidArgument,
            "'*'",
        ),
        (
            "long topic",
            BroadcastRequest {
                topic: "a".repeat(300),
                ..valid()
            },
            Code::InvalidArgument,
            "limit is 255",
        ),
        (
            "oversized payload",
            BroadcastRequest {
                payload: vec![0; 1025].into(),
                ..valid()
            },
            Code::ResourceExhausted,
            "limit is 1024 bytes (--max-message-bytes)",
        ),
        (
            "too many headers",
            BroadcastRequest {
                headers: many_headers,
                ..valid()
            },
            Code::ResourceExhausted,
            "limit is 64",
        ),
        (
            "large header value",
            BroadcastRequest {
                headers: HashMap::from([("k".into(), "v".repeat(5000))]),
                ..valid()
            },
            Code::ResourceExhausted,
            "limit is 4096",
        ),
        (
            "bad header key",
            BroadcastRequest {
                headers: HashMap::from([("bad key".into(), "v".into())]),
                ..valid()
            },
            Code::InvalidArgument,
            "header key",
        ),
        (
            "unknown ack policy",
            BroadcastRequest { ack: 9, ..valid() },
            Code::InvalidArgument,
            "not a known AckPolicy",
        ),
        (
            "bad id",
            BroadcastRequest {
                id: "has space".into(),
                ..valid()
            },
            Code::InvalidArgument,
            "id \"has space\"",
        ),
    ];
    for (name, request, code, needle) in cases {
        let status = client.broadcast(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{name}: message {:?} should contain {needle:?}",
            status.message()
        );
    }
    // The server is fine afterwards.
    client
        .broadcast(valid())
        .await
        .expect("a valid broadcast still works");
    cluster.shutdown().await;
}

#[tokio::test]
async fn invalid_deliver_and_subscribe_requests() {
    let cluster = Cluster::start(1, &[]).await;
    let mut client = cluster.client(0).await;
    let status = client
        .deliver(DeliverRequest { message: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("message is required"),
        "{}",
        status.message()
    );

    let no_id = Message {
        topic: "t".into(),
        origin: "x:1".into(),
        ..Default::default()
    };
    let status = client
        .deliver(DeliverRequest { message: Some(no_id) })
        .await
        .unwrap_err();
    assert!(
        status.message().contains("message.id is required"),
        "{}",
        status.message()
    );

    let ok = Message {
        id: "d1".into(),
        topic: "t".into(),
        origin: "x:1".into(),
        ..Default::default()
    };
    let first = client
        .deliver(DeliverRequest {
            message: Some(ok.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let again = client
        .deliver(DeliverRequest { message: Some(ok) })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate && again.duplicate, "Deliver is idempotent by id");
    assert_eq!(first.sequence, again.sequence);

    for (filters, needle) in [
        (vec!["ca*che"], "only allowed at the end"),
        (vec!["cache.x*y*"], "only a trailing '*'"),
        (vec![""], "it is empty"),
    ] {
        let status = client
            .subscribe(SubscribeRequest {
                topics: filters.iter().map(|s| s.to_string()).collect(),
                after_sequence: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(needle), "{}", status.message());
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn grossly_oversized_request_is_rejected_without_harm() {
    let cluster = Cluster::start(1, &["--max-message-bytes", "1024"]).await;
    let mut client = cluster
        .client(0)
        .await
        .max_encoding_message_size(64 * 1024 * 1024);
    let status = client
        .broadcast(BroadcastRequest {
            payload: vec![0; 8 * 1024 * 1024].into(),
            ..valid()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit"), "{}", status.message());
    client.broadcast(valid()).await.expect("server unharmed");
    cluster.shutdown().await;
}
