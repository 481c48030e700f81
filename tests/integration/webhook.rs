//! Webhook sinks against a real HTTP app on loopback (axum): CloudEvents
//! in order, the retry contract, an app that is not up yet, a slow app that
//! does not slow Broadcast, a webhook that falls behind the ring, and
//! Standard Webhooks signatures.

use crate::common;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use common::{
    Cluster,
    app::{App, AppState, Reply},
    eventually, free_port_on, samples, scrape,
};
use replicast::proto::v1::{AckPolicy, BroadcastRequest};
use tokio::{net::TcpListener, sync::Semaphore};
use tonic::Request;

fn broadcast(topic: &str, id: &str, payload: &str) -> Request<BroadcastRequest> {
    let mut request = Request::new(BroadcastRequest {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec().into(),
        headers: HashMap::from([("content-type".to_owned(), "text/plain".to_owned())]),
        id: id.into(),
        ack: AckPolicy::All as i32,
    });
    request.set_timeout(Duration::from_secs(5));
    request
}

/// A one-replica cluster whose webhook is `url`, with `extra` flags and
/// metrics on the returned address.
async fn replica(url: &str, extra: &[&str]) -> (Cluster, SocketAddr) {
    let metrics = free_port_on(std::net::Ipv4Addr::LOCALHOST.into()).await;
    let metrics_flag = metrics.to_string();
    let mut flags = vec!["--webhook", url, "--metrics-listen", &metrics_flag];
    flags.extend_from_slice(extra);
    (Cluster::start(1, &flags).await, metrics)
}

#[tokio::test]
async fn every_delivery_is_posted_in_order_to_each_replicas_app_as_a_cloudevent() {
    let apps = [
        App::start(std::net::Ipv4Addr::LOCALHOST.into(), AppState::default()).await,
        App::start(std::net::Ipv4Addr::LOCALHOST.into(), AppState::default()).await,
    ];
    // One webhook per replica, each to its own app, as in the sidecar.
    let mut cluster = Cluster::start_with(2, 0, &[]).await;
    cluster.publish(&[0, 1]).await;
    for (i, app) in apps.iter().enumerate() {
        let url = app.url("#topics=cache.*");
        cluster.start_replica(i, &["--webhook", &url]);
    }
    for i in 0..2 {
        common::wait_serving(cluster.addr(i)).await;
    }
    let mut client = cluster.client(0).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let id = format!("m-{n:02}");
        client
            .broadcast(broadcast("cache.user", &id, &format!("payload {n}")))
            .await
            .unwrap();
        if n == 10 {
            // Not matched by #topics=cache.*: never POSTed.
            client.broadcast(broadcast("orders", "o-1", "x")).await.unwrap();
        }
        ids.push(id);
    }
    for app in &apps {
        let posted = app.wait_for(20).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let posted_ids: Vec<&str> = posted.iter().map(|p| p.header("ce-id")).collect();
        assert_eq!(posted_ids, ids, "every matching message, in order, once");
        let sequences: Vec<u64> = posted
            .iter()
            .map(|p| p.header("ce-sequence").parse().unwrap())
            .collect();
        assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
        let first = &posted[0];
        assert_eq!(first.header("ce-specversion"), "1.0");
        assert_eq!(first.header("ce-type"), "io.replicast.message");
        assert_eq!(first.header("ce-subject"), "cache.user");
        assert_eq!(
            first.header("ce-source"),
            format!("replicast://{}", cluster.addr(0))
        );
        assert_eq!(first.header("content-type"), "text/plain");
        assert!(!first.header("ce-time").is_empty());
        assert!(first.header("ce-replicastincarnation").parse::<u64>().unwrap() > 0);
        assert_eq!(first.body, Bytes::from_static(b"payload 0"));
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_contract_retries_honours_retry_after_and_dead_letters_the_rest() {
    let state = AppState::default();
    state.script.lock().unwrap().extend([
        ("busy".to_owned(), VecDeque::from([Reply::RetryAfter(503, 1)])),
        (
            "flaky".to_owned(),
            VecDeque::from([Reply::Status(500), Reply::Status(502)]),
        ),
        ("bad".to_owned(), VecDeque::from([Reply::Status(400)])),
    ]);
    let app = App::start(std::net::Ipv4Addr::LOCALHOST.into(), state).await;
    let (cluster, metrics) = replica(&app.url(""), &[]).await;
    let mut client = cluster.client(0).await;
    for id in ["busy", "flaky", "bad", "fine"] {
        client.broadcast(broadcast("t", id, id)).await.unwrap();
    }
    // busy twice, flaky three times, bad once (dead-lettered), fine once.
    let posted = app.wait_for(7).await;
    let order: Vec<&str> = posted.iter().map(|p| p.header("ce-id")).collect();
    assert_eq!(order, ["busy", "busy", "flaky", "flaky", "flaky", "bad", "fine"]);
    assert!(
        posted[1].at - posted[0].at >= Duration::from_millis(900),
        "Retry-After: 1 is honoured: {:?}",
        posted[1].at - posted[0].at
    );
    eventually("the outcomes to be counted", Duration::from_secs(5), || async {
        let m = samples(&scrape(metrics).await);
        let get = |result: &str| {
            m.get(&format!(
                "replicast_webhook_deliveries_total{{webhook=\"http://{}/events\",result=\"{result}\"}}",
                app.addr
            ))
            .copied()
            .unwrap_or(0.0)
        };
        get("delivered") == 3.0 && get("retried") == 3.0 && get("dead_lettered") == 1.0
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_app_that_is_not_up_yet_gets_every_message_once_it_is() {
    // Nothing listens on the webhook's port yet.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (cluster, _) = replica(&format!("http://{addr}/events"), &[]).await;
    let mut client = cluster.client(0).await;
    for n in 0..5 {
        client
            .broadcast(broadcast("t", &format!("early-{n}"), "x"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Up now, but its routes answer 404 twice while it starts.
    let state = AppState::default();
    state
        .first
        .lock()
        .unwrap()
        .extend([Reply::Status(404), Reply::Status(404)]);
    let app = App::start_on(TcpListener::bind(addr).await.unwrap(), state).await;
    let posted = app.wait_for(7).await;
    let delivered: Vec<&str> = posted[2..].iter().map(|p| p.header("ce-id")).collect();
    assert_eq!(delivered, ["early-0", "early-1", "early-2", "early-3", "early-4"]);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_stuck_app_does_not_hold_up_broadcasts_and_is_told_what_it_lost() {
    // The app takes no POST until the gate opens.
    let gate = Arc::new(Semaphore::new(0));
    let state = AppState {
        gate: Some(gate.clone()),
        ..AppState::default()
    };
    let app = App::start(std::net::Ipv4Addr::LOCALHOST.into(), state).await;
    let (cluster, metrics) = replica(
        &app.url(""),
        &["--replay-capacity", "5", "--webhook-timeout", "30s"],
    )
    .await;
    let mut client = cluster.client(0).await;
    for n in 0..20 {
        let response = client
            .broadcast(broadcast("t", &format!("m-{n}"), "x"))
            .await
            .expect("Broadcast does not wait for the webhook")
            .into_inner();
        assert_eq!(response.acked, 1);
    }
    let backlog = format!(
        "replicast_webhook_backlog{{webhook=\"http://{}/events\"}}",
        app.addr
    );
    eventually(
        "the backlog gauge to show every message waiting",
        Duration::from_secs(5),
        || async { samples(&scrape(metrics).await).get(&backlog) == Some(&20.0) },
    )
    .await;
    gate.add_permits(100);
    // m-0 was in flight; m-1..m-14 fell out of the 5-message ring.
    app.wait_for(6).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let posted = app.posted();
    let ids: Vec<&str> = posted.iter().map(|p| p.header("ce-id")).collect();
    assert_eq!(ids, ["m-0", "m-15", "m-16", "m-17", "m-18", "m-19"]);
    assert_eq!(posted[1].header("ce-replicastlost"), "14");
    let m = samples(&scrape(metrics).await);
    assert_eq!(
        m[&format!(
            "replicast_webhook_lost_total{{webhook=\"http://{}/events\"}}",
            app.addr
        )],
        14.0
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn signed_posts_carry_a_signature_per_secret() {
    use base64::Engine as _;
    use hmac::Mac as _;
    let secrets = [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24tMTIz",
    ];
    let path = std::env::temp_dir().join(format!("replicast-webhook-secrets-{}", rand::random::<u32>()));
    std::fs::write(
        &path,
        format!("# old, then new\n{}\n{}\n", secrets[0], secrets[1]),
    )
    .unwrap();
    let app = App::start(std::net::Ipv4Addr::LOCALHOST.into(), AppState::default()).await;
    let (cluster, _) = replica(&app.url(""), &["--webhook-secret-file", path.to_str().unwrap()]).await;
    cluster
        .client(0)
        .await
        .broadcast(broadcast("t", "signed-1", "hello"))
        .await
        .unwrap();
    let posted = app.wait_for(1).await.remove(0);
    assert_eq!(posted.header("webhook-id"), "signed-1");
    let timestamp = posted.header("webhook-timestamp");
    let signatures: Vec<&str> = posted.header("webhook-signature").split(' ').collect();
    assert_eq!(signatures.len(), 2);
    for (secret, signature) in secrets.iter().zip(signatures) {
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap())
            .unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("signed-1.{timestamp}.").as_bytes());
        mac.update(&posted.body);
        let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(signature, format!("v1,{expected}"));
    }
    let _ = std::fs::remove_file(path);
    cluster.shutdown().await;
}
