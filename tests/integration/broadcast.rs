//! Broadcast across real replicas: reach, membership, slow peers, ack
//! policies and idempotent retries.

use crate::common;

use std::{collections::HashMap, time::Duration};

use common::{Cluster, HungPeer, next_delivery, subscribe};
use replicast::{
    error::broadcast_response_from_status,
    proto::v1::{AckPolicy, BroadcastRequest, BroadcastResponse},
};
use tonic::{Code, Request};

fn request(topic: &str, payload: &str, ack: AckPolicy, id: &str) -> Request<BroadcastRequest> {
    let mut request = Request::new(BroadcastRequest {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec().into(),
        headers: HashMap::from([("k".to_owned(), "v".to_owned())]),
        id: id.into(),
        ack: ack as i32,
    });
    request.set_timeout(Duration::from_secs(5));
    request
}

fn code(outcome_code: i32) -> Code {
    Code::from_i32(outcome_code)
}

#[tokio::test]
async fn broadcast_reaches_every_replica_exactly_once_self_included() {
    let cluster = Cluster::start(3, &[]).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(subscribe(cluster.addr(i), &[], 0).await);
    }

    let response = cluster
        .client(1)
        .await
        .broadcast(request("orders", "first", AckPolicy::All, ""))
        .await
        .expect("ALL met on a healthy cluster")
        .into_inner();
    assert_eq!(response.replicas, 3);
    assert_eq!(response.acked, 3);
    assert!(!response.id.is_empty(), "an id is generated when none is given");
    assert_eq!(
        response.outcomes.len(),
        3,
        "one receipt per replica: {response:?}"
    );
    let locals: Vec<_> = response.outcomes.iter().filter(|o| o.local).collect();
    assert_eq!(
        locals.len(),
        1,
        "exactly one receipt is the serving replica itself"
    );
    assert_eq!(locals[0].peer, cluster.addr(1).to_string());
    for o in &response.outcomes {
        assert_eq!(code(o.code), Code::Ok, "{o:?}");
        assert!(!o.duplicate && !o.pending, "{o:?}");
        assert_eq!(
            o.sequence, 1,
            "first message on every replica is sequence 1: {o:?}"
        );
    }

    // A second message is the very next delivery everywhere: the first was
    // delivered once, not twice.
    cluster
        .client(2)
        .await
        .broadcast(request("orders", "second", AckPolicy::All, ""))
        .await
        .unwrap();
    for (i, stream) in streams.iter_mut().enumerate() {
        let first = next_delivery(stream).await;
        let message = first.message.unwrap();
        assert_eq!(
            (first.sequence, &message.payload[..]),
            (1, &b"first"[..]),
            "replica {i}"
        );
        assert_eq!(message.id, response.id);
        assert_eq!(message.origin, cluster.addr(1).to_string());
        assert_eq!(message.headers.get("k").map(String::as_str), Some("v"));
        assert!(message.sent_at.is_some());
        let second = next_delivery(stream).await;
        assert_eq!(
            (second.sequence, &second.message.unwrap().payload[..]),
            (2, &b"second"[..]),
            "replica {i}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn replicas_join_and_leave_the_fan_out_with_dns() {
    let mut cluster = Cluster::start_with(3, 2, &[]).await;
    let peers_of = |resp: &BroadcastResponse| {
        let mut p: Vec<String> = resp.outcomes.iter().map(|o| o.peer.clone()).collect();
        p.sort();
        p
    };
    let r = cluster
        .client(0)
        .await
        .broadcast(request("t", "a", AckPolicy::All, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.replicas, 2);

    cluster.start_replica(2, &[]);
    cluster.publish(&[0, 1, 2]).await;
    let mut client = cluster.client(0).await;
    common::wait_peer_count(cluster.addr(0), 3).await;
    let r = client
        .broadcast(request("t", "b", AckPolicy::All, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.replicas, 3, "the new replica joined: {:?}", peers_of(&r));
    assert!(peers_of(&r).contains(&cluster.addr(2).to_string()));

    cluster.publish(&[0, 2]).await;
    common::wait_peer_count(cluster.addr(0), 2).await;
    let r = client
        .broadcast(request("t", "c", AckPolicy::All, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        peers_of(&r),
        vec![cluster.addr(0).to_string(), cluster.addr(2).to_string()]
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn hung_peer_gets_deadline_exceeded_and_delays_nobody() {
    // Four addresses: three replicas and one that accepts TCP and never answers.
    let mut cluster = Cluster::start_with(4, 0, &[]).await;
    let hung = HungPeer::start(cluster.hosts.listeners[3].take().unwrap());
    cluster.publish(&[0, 1, 2, 3]).await;
    for i in 0..3 {
        cluster.start_replica(i, &["--peer-timeout", "300ms"]);
    }
    for i in 0..3 {
        common::wait_serving(cluster.addr(i)).await;
    }

    let status = cluster
        .client(0)
        .await
        .broadcast(request("t", "x", AckPolicy::All, ""))
        .await
        .expect_err("ALL cannot be met with a hung peer");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(&hung.addr.to_string()),
        "the message names the hung peer: {}",
        status.message()
    );
    assert!(
        status.message().contains("DEADLINE_EXCEEDED"),
        "{}",
        status.message()
    );
    let response = broadcast_response_from_status(&status).expect("receipts in the status details");
    assert_eq!(response.replicas, 4);
    assert_eq!(response.acked, 3);
    let hung_receipt = response
        .outcomes
        .iter()
        .find(|o| o.peer == hung.addr.to_string())
        .unwrap();
    assert_eq!(
        code(hung_receipt.code),
        Code::DeadlineExceeded,
        "{hung_receipt:?}"
    );
    let hung_latency = Duration::try_from(hung_receipt.latency.unwrap()).unwrap();
    for o in response
        .outcomes
        .iter()
        .filter(|o| o.peer != hung.addr.to_string())
    {
        assert_eq!(code(o.code), Code::Ok, "{o:?}");
        let latency = Duration::try_from(o.latency.unwrap()).unwrap();
        assert!(
            latency < hung_latency,
            "healthy peers answer before the hung one times out: {o:?}"
        );
    }

    // QUORUM (3 of 4) is met without waiting for the hung peer to fail.
    let response = cluster
        .client(1)
        .await
        .broadcast(request("t", "y", AckPolicy::Quorum, ""))
        .await
        .expect("QUORUM met by the three healthy replicas")
        .into_inner();
    assert!(response.acked >= 3);
    drop(hung);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_policy_that_cannot_be_met_still_waits_for_every_receipt() {
    // Replica 2 hangs (accepts, never answers); replica 3 refuses at once.
    let mut cluster = Cluster::start_with(4, 2, &["--peer-timeout", "300ms"]).await;
    let _hung = HungPeer::start(cluster.hosts.listeners[2].take().unwrap());
    drop(cluster.hosts.listeners[3].take());
    cluster.publish(&[0, 1, 2, 3]).await;
    common::wait_peer_count(cluster.addr(0), 4).await;

    let status = cluster
        .client(0)
        .await
        .broadcast(request("t", "x", AckPolicy::All, ""))
        .await
        .unwrap_err();
    let receipts = broadcast_response_from_status(&status).unwrap();
    // The refusal alone decides that ALL fails; the call still waits out the
    // hung peer's hop, so no receipt is left `pending`.
    let by_peer = |i: usize| {
        let peer = cluster.addr(i).to_string();
        receipts.outcomes.iter().find(|o| o.peer == peer).unwrap().clone()
    };
    assert!(receipts.outcomes.iter().all(|o| !o.pending), "{receipts:?}");
    assert_eq!(code(by_peer(2).code), Code::DeadlineExceeded, "{receipts:?}");
    assert_eq!(code(by_peer(3).code), Code::Unavailable, "{receipts:?}");
    assert_eq!(
        (code(by_peer(0).code), code(by_peer(1).code)),
        (Code::Ok, Code::Ok)
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn ack_policies_against_a_dead_peer() {
    // Replica 3 is in DNS but nothing listens there: connections are refused.
    let mut cluster = Cluster::start_with(4, 3, &[]).await;
    drop(cluster.hosts.listeners[3].take());
    cluster.publish(&[0, 1, 2, 3]).await;
    let mut client = cluster.client(0).await;
    common::wait_peer_count(cluster.addr(0), 4).await;
    let dead = cluster.addr(3).to_string();

    let status = client
        .broadcast(request("t", "all", AckPolicy::All, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&dead), "{}", status.message());
    let receipts = broadcast_response_from_status(&status).unwrap();
    let dead_receipt = receipts.outcomes.iter().find(|o| o.peer == dead).unwrap();
    assert_eq!(code(dead_receipt.code), Code::Unavailable, "{dead_receipt:?}");
    // Failing does not cut the wait short: every receipt is final, so the
    // caller knows the three live replicas have the message.
    assert!(receipts.outcomes.iter().all(|o| !o.pending), "{receipts:?}");
    assert_eq!((receipts.replicas, receipts.acked), (4, 3), "{receipts:?}");

    let quorum = client
        .broadcast(request("t", "quorum", AckPolicy::Quorum, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((quorum.required, quorum.ack), (3, AckPolicy::Quorum as i32));
    assert!(quorum.acked >= 3);

    let one = client
        .broadcast(request("t", "one", AckPolicy::One, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.required, 1);
    assert!(one.acked >= 1);

    // NONE returns at once; the deliveries still happen.
    let mut on_2 = subscribe(cluster.addr(2), &["none"], 0).await;
    let none = client
        .broadcast(request("none", "none", AckPolicy::None, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.required, 0);
    assert_eq!(none.ack, AckPolicy::None as i32);
    let delivered = next_delivery(&mut on_2).await;
    assert_eq!(
        delivered.message.unwrap().id,
        none.id,
        "NONE still delivers in the background"
    );

    // UNSPECIFIED means ALL.
    let status = client
        .broadcast(request("t", "default", AckPolicy::Unspecified, ""))
        .await
        .unwrap_err();
    let receipts = broadcast_response_from_status(&status).unwrap();
    assert_eq!((receipts.ack, receipts.required), (AckPolicy::All as i32, 4));
    cluster.shutdown().await;
}

#[tokio::test]
async fn retry_with_same_id_is_reported_duplicate_and_not_delivered_twice() {
    let cluster = Cluster::start(3, &[]).await;
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(subscribe(cluster.addr(i), &[], 0).await);
    }
    let first = cluster
        .client(0)
        .await
        .broadcast(request("t", "once", AckPolicy::All, "order-42"))
        .await
        .unwrap();
    assert_eq!(first.get_ref().id, "order-42");
    assert!(first.get_ref().outcomes.iter().all(|o| !o.duplicate));

    // The retry goes to another replica, as a client retrying elsewhere would.
    let retry = cluster
        .client(2)
        .await
        .broadcast(request("t", "once", AckPolicy::All, "order-42"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.acked, 3, "duplicates count as acknowledged");
    for o in &retry.outcomes {
        assert!(o.duplicate, "every replica already had order-42: {o:?}");
        assert_eq!(o.sequence, 1, "a duplicate reports the original sequence: {o:?}");
    }

    cluster
        .client(1)
        .await
        .broadcast(request("t", "next", AckPolicy::All, ""))
        .await
        .unwrap();
    for stream in &mut streams {
        assert_eq!(next_delivery(stream).await.message.unwrap().id, "order-42");
        let next = next_delivery(stream).await;
        assert_eq!(next.sequence, 2);
        assert_eq!(
            &next.message.unwrap().payload[..],
            b"next",
            "no second delivery of order-42"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn caller_deadline_bounds_the_broadcast() {
    let mut cluster = Cluster::start_with(3, 0, &[]).await;
    let _hung = HungPeer::start(cluster.hosts.listeners[2].take().unwrap());
    cluster.publish(&[0, 1, 2]).await;
    for i in 0..2 {
        cluster.start_replica(i, &["--peer-timeout", "10s"]);
    }
    common::wait_serving(cluster.addr(0)).await;
    let mut req = request("t", "x", AckPolicy::All, "");
    req.set_timeout(Duration::from_millis(400));
    let status = cluster.client(0).await.broadcast(req).await.unwrap_err();
    // The replica answers just before the caller's deadline, with receipts.
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let receipts =
        broadcast_response_from_status(&status).expect("the replica answered in time, with receipts");
    assert_eq!(receipts.acked, 2);
    cluster.shutdown().await;
}

#[tokio::test]
async fn broadcasts_beyond_the_concurrency_limit_are_refused_not_queued() {
    let mut cluster = Cluster::start_with(2, 0, &[]).await;
    let _hung = HungPeer::start(cluster.hosts.listeners[1].take().unwrap());
    cluster.publish(&[0, 1]).await;
    cluster.start_replica(0, &["--max-concurrent-broadcasts", "1", "--peer-timeout", "2s"]);
    common::wait_serving(cluster.addr(0)).await;
    let mut client = cluster.client(0).await;
    // NONE returns at once, but its hop to the hung peer holds the only slot.
    client
        .broadcast(request("t", "a", AckPolicy::None, ""))
        .await
        .expect("first is accepted");
    let status = client
        .broadcast(request("t", "b", AckPolicy::None, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-concurrent-broadcasts"),
        "{}",
        status.message()
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_failing_peer_is_skipped_at_once_then_rejoins_when_it_comes_back() {
    let mut cluster = Cluster::start_with(3, 2, &[]).await;
    let dead = cluster.addr(2);
    drop(cluster.hosts.listeners[2].take()); // in DNS, nothing listening
    cluster.publish(&[0, 1, 2]).await;
    common::wait_peer_count(cluster.addr(0), 3).await;
    let mut client = cluster.client(0).await;
    let dead_receipt = |status: tonic::Status| {
        let receipts = broadcast_response_from_status(&status).expect("receipts in the details");
        receipts
            .outcomes
            .into_iter()
            .find(|o| o.peer == dead.to_string())
            .unwrap()
    };
    for attempt in 1..=3 {
        let status = client
            .broadcast(request("t", "x", AckPolicy::All, ""))
            .await
            .unwrap_err();
        let receipt = dead_receipt(status);
        assert_eq!(
            code(receipt.code),
            Code::Unavailable,
            "attempt {attempt}: {receipt:?}"
        );
        assert!(
            !receipt.message.contains("skipped"),
            "attempt {attempt} still tries: {receipt:?}"
        );
    }
    let status = client
        .broadcast(request("t", "x", AckPolicy::All, ""))
        .await
        .unwrap_err();
    let receipt = dead_receipt(status);
    assert_eq!(code(receipt.code), Code::Unavailable);
    assert!(
        receipt.message.contains("skipped") && receipt.message.contains("3 times in a row"),
        "a peer that keeps failing is skipped, with the reason: {receipt:?}"
    );
    // ListPeers says why, without the logs.
    let view = client
        .list_peers(replicast::proto::v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner();
    let peer = |addr: std::net::SocketAddr| {
        view.peers
            .iter()
            .find(|p| p.address == addr.to_string())
            .unwrap()
            .clone()
    };
    let failing = peer(dead);
    assert!(!failing.connected, "{failing:?}");
    assert!(
        failing.failing_since.is_some() && failing.skipped_until.is_some(),
        "{failing:?}"
    );
    assert!(
        failing.last_error.contains("cannot open the delivery stream"),
        "{failing:?}"
    );
    assert!(failing.backlog >= 4, "its missed messages are held: {failing:?}");
    let healthy = peer(cluster.addr(1));
    assert!(
        healthy.connected && healthy.failing_since.is_none(),
        "{healthy:?}"
    );

    // It comes back on the same address: a probe finds it, no restart needed.
    cluster.hosts.listeners[2] = Some(tokio::net::TcpListener::bind(dead).await.unwrap());
    cluster.start_replica(2, &[]);
    common::wait_serving(dead).await;
    common::eventually("the peer to rejoin the fan-out", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            client
                .broadcast(request("t", "y", AckPolicy::All, ""))
                .await
                .is_ok()
        }
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn messages_a_peer_missed_are_redelivered_once_when_it_comes_back() {
    let mut cluster = Cluster::start_with(3, 2, &[]).await;
    let down = cluster.addr(2);
    drop(cluster.hosts.listeners[2].take());
    cluster.publish(&[0, 1, 2]).await;
    common::wait_peer_count(cluster.addr(0), 3).await;
    let mut client = cluster.client(0).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let response = client
            .broadcast(request("t", &format!("m{i}"), AckPolicy::Quorum, ""))
            .await
            .expect("QUORUM is met without the replica that is down")
            .into_inner();
        ids.push(response.id);
    }

    cluster.hosts.listeners[2] = Some(tokio::net::TcpListener::bind(down).await.unwrap());
    cluster.start_replica(2, &[]);
    common::wait_serving(down).await;
    let mut returned = common::client(down).await;
    common::eventually(
        "the missed messages to be redelivered",
        Duration::from_secs(15),
        || {
            let mut returned = returned.clone();
            async move {
                let view = returned
                    .list_peers(replicast::proto::v1::ListPeersRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                view.last_sequence >= 3
            }
        },
    )
    .await;
    // Each arrived exactly once: delivering it again is a duplicate, and the
    // three have three distinct sequence numbers.
    let mut sequences = Vec::new();
    for id in ids {
        let message = replicast::proto::v1::Message {
            id,
            topic: "t".into(),
            origin: cluster.addr(0).to_string(),
            ..Default::default()
        };
        let response = returned
            .deliver(replicast::proto::v1::DeliverRequest {
                message: Some(message),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(response.duplicate, "redelivered before: {response:?}");
        sequences.push(response.sequence);
    }
    sequences.sort();
    assert_eq!(sequences, vec![1, 2, 3]);
    cluster.shutdown().await;
}
