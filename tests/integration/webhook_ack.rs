//! `--webhook-ack`: a replica's receipt waits for its app's 2xx, so an OK
//! receipt means "processed by the app". Real replicas, each with its own
//! app (axum on loopback), as in the sidecar shape: the receipt implies the
//! POST; a refusal, a slow app, a delivery the ring dropped and a replica
//! that closes first each fail the receipt with a code and a message that
//! names the app's answer, and never say OK.

use crate::common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::{
    Cluster,
    app::{App, AppState, Reply},
    eventually,
};
use replicast::{
    error::broadcast_response_from_status,
    proto::v1::{
        AckPolicy, BroadcastRequest, BroadcastResponse, DeliverRequest, ListPeersRequest, Message,
        PeerOutcome,
    },
};
use tokio::sync::Semaphore;
use tonic::{Code, Request};

fn broadcast(id: &str, timeout: Duration) -> Request<BroadcastRequest> {
    let mut request = Request::new(BroadcastRequest {
        topic: "cache.user".into(),
        payload: b"x".to_vec().into(),
        headers: HashMap::new(),
        id: id.into(),
        ack: AckPolicy::All as i32,
    });
    request.set_timeout(timeout);
    request
}

/// `n` replicas, replica `i` POSTing to `apps[i]` with `--webhook-ack`.
async fn cluster_with_apps(apps: &[App], extra: &[&str]) -> Cluster {
    let mut cluster = Cluster::start_with(apps.len(), 0, &[]).await;
    let members: Vec<usize> = (0..apps.len()).collect();
    cluster.publish(&members).await;
    for (i, app) in apps.iter().enumerate() {
        let url = app.url("");
        let mut flags = vec!["--webhook", &url, "--webhook-ack"];
        flags.extend_from_slice(extra);
        cluster.start_replica(i, &flags);
    }
    for i in 0..apps.len() {
        common::wait_serving(cluster.addr(i)).await;
    }
    common::wait_peer_count(cluster.addr(0), apps.len()).await;
    cluster
}

async fn apps(n: usize) -> Vec<App> {
    let mut apps = Vec::new();
    for _ in 0..n {
        apps.push(App::start(std::net::Ipv4Addr::LOCALHOST.into(), AppState::default()).await);
    }
    apps
}

/// An app that answers nothing until its gate gets permits.
async fn gated_app() -> (App, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let state = AppState {
        gate: Some(gate.clone()),
        ..AppState::default()
    };
    (
        App::start(std::net::Ipv4Addr::LOCALHOST.into(), state).await,
        gate,
    )
}

fn receipt<'a>(response: &'a BroadcastResponse, cluster: &Cluster, i: usize) -> &'a PeerOutcome {
    let peer = cluster.addr(i).to_string();
    response
        .outcomes
        .iter()
        .find(|o| o.peer == peer)
        .unwrap_or_else(|| panic!("a receipt for {peer}: {response:?}"))
}

fn code(outcome: &PeerOutcome) -> Code {
    Code::from_i32(outcome.code)
}

fn ids_posted(app: &App) -> Vec<String> {
    app.posted()
        .iter()
        .map(|p| p.header("ce-id").to_owned())
        .collect()
}

#[tokio::test]
async fn an_ok_receipt_means_the_app_answered_2xx_and_a_refusal_names_the_answer() {
    let apps = apps(3).await;
    // Replica 2's app fails "flaky" once (retried), replica 1's refuses "bad".
    apps[2]
        .state
        .script
        .lock()
        .unwrap()
        .insert("flaky".into(), [Reply::Status(500)].into());
    apps[1]
        .state
        .script
        .lock()
        .unwrap()
        .insert("bad".into(), [Reply::Status(400)].into());
    let cluster = cluster_with_apps(&apps, &[]).await;
    let mut client = cluster.client(0).await;

    let response = client
        .broadcast(broadcast("m-1", Duration::from_secs(5)))
        .await
        .expect("every app answers 2xx")
        .into_inner();
    assert_eq!(response.acked, 3, "{response:?}");
    // No waiting here: the receipts say the apps have it.
    for (i, app) in apps.iter().enumerate() {
        assert_eq!(
            ids_posted(app),
            ["m-1"],
            "replica {i}'s app got m-1 before the receipt"
        );
    }

    let response = client
        .broadcast(broadcast("flaky", Duration::from_secs(5)))
        .await
        .expect("a 500 is retried within the hop's deadline")
        .into_inner();
    assert_eq!(response.acked, 3, "{response:?}");
    assert_eq!(ids_posted(&apps[2]), ["m-1", "flaky", "flaky"]);

    for attempt in ["first", "retry with the same id"] {
        let status = client
            .broadcast(broadcast("bad", Duration::from_secs(5)))
            .await
            .expect_err("ALL cannot be met: replica 1's app refused");
        assert_eq!(status.code(), Code::Unavailable, "{attempt}: {status:?}");
        let response = broadcast_response_from_status(&status).expect("receipts in the details");
        let refused = receipt(&response, &cluster, 1);
        assert_eq!(code(refused), Code::FailedPrecondition, "{attempt}: {refused:?}");
        for needle in [
            "not processed by its app",
            &format!("webhook http://{}/events", apps[1].addr),
            "the app answered HTTP 400",
        ] {
            assert!(
                refused.message.contains(needle),
                "{attempt}: {needle:?} in {refused:?}"
            );
        }
        assert_eq!(code(receipt(&response, &cluster, 0)), Code::Ok, "{attempt}");
        assert_eq!(code(receipt(&response, &cluster, 2)), Code::Ok, "{attempt}");
    }
    let bad_posts = ids_posted(&apps[1]).iter().filter(|id| *id == "bad").count();
    assert_eq!(
        bad_posts, 1,
        "the retry got the recorded answer; the app was not asked again"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_slow_app_fails_its_receipt_in_time_and_its_replica_is_not_marked_failing() {
    let (slow, gate) = gated_app().await;
    let apps = vec![
        App::start(std::net::Ipv4Addr::LOCALHOST.into(), AppState::default()).await,
        slow,
    ];
    // The hop gets the whole --peer-timeout, so a hop that timed out would
    // count against replica 1.
    let cluster = cluster_with_apps(&apps, &["--peer-timeout", "1s"]).await;
    let mut client = cluster.client(0).await;
    let status = client
        .broadcast(broadcast("slow", Duration::from_secs(3)))
        .await
        .expect_err("replica 1's app takes nothing");
    let response = broadcast_response_from_status(&status).expect("receipts in the details");
    let slow = receipt(&response, &cluster, 1);
    assert_eq!(code(slow), Code::DeadlineExceeded, "{slow:?}");
    assert!(
        slow.message.contains("the app has not answered within"),
        "replica 1 answered in time, naming its app: {slow:?}"
    );
    assert_eq!(code(receipt(&response, &cluster, 0)), Code::Ok);

    let peers = client
        .list_peers(ListPeersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let replica_1 = peers
        .peers
        .iter()
        .find(|p| p.address == cluster.addr(1).to_string())
        .expect("replica 1 listed");
    assert!(
        replica_1.failing_since.is_none() && replica_1.skipped_until.is_none(),
        "an answer is not a failure of the replica: {replica_1:?}"
    );

    // The app takes it now; a retry with the same id gets its answer.
    gate.add_permits(100);
    eventually(
        "the retry to be acknowledged by both apps",
        Duration::from_secs(10),
        || {
            let mut client = client.clone();
            async move {
                client
                    .broadcast(broadcast("slow", Duration::from_secs(3)))
                    .await
                    .is_ok_and(|r| r.get_ref().acked == 2)
            }
        },
    )
    .await;
    assert_eq!(
        ids_posted(&apps[1]),
        ["slow"],
        "POSTed once: the retry was a duplicate"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn deliveries_the_ring_drops_before_the_app_reads_them_are_never_acknowledged() {
    let (app, gate) = gated_app().await;
    let apps = vec![app];
    let cluster = cluster_with_apps(&apps, &["--replay-capacity", "2"]).await;
    let client = cluster.client(0).await;
    let mut calls = Vec::new();
    for n in 0..5 {
        let mut client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .broadcast(broadcast(&format!("m-{n}"), Duration::from_secs(3)))
                .await
        }));
        // Only to make the order likely; the checks hold in any order.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut lost = 0;
    for call in calls {
        let status = call
            .await
            .unwrap()
            .expect_err("the app processed nothing: no receipt may say OK");
        let response = broadcast_response_from_status(&status).expect("receipts in the details");
        let local = &response.outcomes[0];
        match code(local) {
            Code::DataLoss => {
                assert!(local.message.contains("fell behind the replay ring"), "{local:?}");
                lost += 1;
            }
            Code::DeadlineExceeded => {}
            other => panic!("{other:?}: {local:?}"),
        }
    }
    assert!(lost >= 1, "with a 2-message ring, some of 5 fell out unread");
    gate.add_permits(100);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_unary_deliver_answers_before_the_senders_deadline_naming_the_app() {
    let (app, gate) = gated_app().await;
    let apps = vec![app];
    let cluster = cluster_with_apps(&apps, &[]).await;
    let mut request = Request::new(DeliverRequest {
        message: Some(Message {
            id: "d-1".into(),
            topic: "t".into(),
            origin: "127.0.0.9:7420".into(),
            payload: b"x".to_vec().into(),
            ..Default::default()
        }),
    });
    request.set_timeout(Duration::from_millis(800));
    let status = cluster
        .client(0)
        .await
        .deliver(request)
        .await
        .expect_err("the app takes nothing");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("the app has not answered within"),
        "the replica's answer, not the client's own timeout: {status:?}"
    );
    gate.add_permits(100);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_replica_that_closes_before_its_app_answers_never_acknowledges() {
    let (app, gate) = gated_app().await;
    let apps = vec![app];
    let cluster = cluster_with_apps(&apps, &[]).await;
    let mut client = cluster.client(0).await;
    let call =
        tokio::spawn(async move { client.broadcast(broadcast("last", Duration::from_secs(10))).await });
    let app = &apps[0];
    eventually(
        "the POST to be held at the app",
        Duration::from_secs(5),
        || async { app.state.arrived.load(std::sync::atomic::Ordering::SeqCst) >= 1 },
    )
    .await;
    cluster.shutdown().await;
    match call.await.unwrap() {
        Ok(response) => panic!("acknowledged what the app never answered: {response:?}"),
        Err(status) => {
            if let Some(response) = broadcast_response_from_status(&status) {
                let local = &response.outcomes[0];
                assert_ne!(code(local), Code::Ok, "{local:?}");
            }
        }
    }
    gate.add_permits(100);
}
