//! Rolling-deploy shutdown: a draining replica turns NOT_SERVING, refuses
//! new Broadcasts, keeps accepting deliveries from peers and serving its
//! subscribers for the drain period, then hands each subscriber everything it
//! acknowledged, tells it to reconnect, and exits cleanly.

use crate::common;

use std::time::Duration;

use common::{
    Cluster, client, eventually, health_status, next_delivery, subscribe, wait_peer_count, wait_serving,
};
use replicast::proto::v1::{AckPolicy, BroadcastRequest, DeliverRequest, Message, SubscribeRequest};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn broadcast(topic: &str) -> BroadcastRequest {
    BroadcastRequest {
        topic: topic.into(),
        ack: AckPolicy::All as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_draining_replica_refuses_broadcasts_but_delivers_until_it_closes() {
    let mut cluster = Cluster::start_with(2, 0, &[]).await;
    cluster.publish(&[0, 1]).await;
    cluster.start_replica(0, &["--drain-timeout", "2s"]);
    cluster.start_replica(1, &[]);
    let (draining, peer) = (cluster.addr(0), cluster.addr(1));
    wait_serving(draining).await;
    wait_serving(peer).await;
    wait_peer_count(peer, 2).await;
    let mut peer_client = client(peer).await;
    peer_client
        .broadcast(broadcast("warm-up"))
        .await
        .expect("both replicas up");
    let mut subscription = subscribe(draining, &[], 0).await;
    let channel = Channel::from_shared(format!("http://{draining}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health_watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    assert_eq!(
        health_watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    cluster.replicas[0].as_ref().unwrap().begin_shutdown();

    eventually(
        "health to say NOT_SERVING",
        Duration::from_secs(5),
        || async move { health_status(draining, "").await == ServingStatus::NotServing },
    )
    .await;
    let mut draining_client = client(draining).await;
    let status = draining_client.broadcast(broadcast("t")).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "a client retries elsewhere: {status:?}"
    );
    // A subscriber whose stream broke can still resume while it drains.
    let mut resumed = draining_client
        .subscribe(SubscribeRequest {
            after_sequence: 1,
            ..Default::default()
        })
        .await
        .expect("Subscribe still served while draining")
        .into_inner();

    // Its peer heard the leave (DNS still lists the replica): new
    // Broadcasts there no longer target it...
    let response = peer_client
        .broadcast(broadcast("during-drain"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.replicas, response.acked), (1, 1), "{response:?}");
    assert_eq!(response.outcomes[0].peer, peer.to_string());
    // ...while a peer that has not heard it (an older version, a lost
    // announcement) still gets its deliveries accepted.
    let message = Message {
        id: "late".into(),
        topic: "t".into(),
        origin: peer.to_string(),
        ..Default::default()
    };
    draining_client
        .deliver(DeliverRequest {
            message: Some(message),
        })
        .await
        .expect("Deliver accepted while draining");

    // Every subscriber gets what the replica acknowledged, then is told to
    // reconnect elsewhere when the drain is over.
    for stream in [&mut subscription, &mut resumed] {
        assert_eq!(next_delivery(stream).await.message.unwrap().id, "late");
        let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the stream ends after the drain");
        let status = ended.expect_err("the subscription ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("reconnect"), "{}", status.message());
    }
    // A health Watch sees NOT_SERVING, then ends with the drain instead of
    // holding the server open.
    assert_eq!(
        health_watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let end = tokio::time::timeout(Duration::from_secs(10), health_watch.message())
        .await
        .expect("the Watch ends after the drain");
    assert!(matches!(end, Ok(None)), "{end:?}");

    cluster.replicas[0]
        .take()
        .unwrap()
        .shutdown()
        .await
        .expect("exits cleanly after the drain");
    cluster.shutdown().await;
}
