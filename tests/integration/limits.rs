//! Limits that keep one client from hurting the others, over real gRPC:
//! each refusal names its flag, and the replica keeps serving everyone else.

use crate::common;

use std::time::Duration;

use common::{Cluster, client, eventually};
use replicast::{
    auth::digest_line,
    proto::v1::{AckPolicy, BroadcastRequest, ListPeersRequest, SubscribeRequest},
};
use tonic::{Code, Request};

fn broadcast(topic: &str) -> BroadcastRequest {
    BroadcastRequest {
        topic: topic.into(),
        ack: AckPolicy::All as i32,
        ..Default::default()
    }
}

fn as_client<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Two clients, `a` and `b`, who may do everything.
fn tokens_file() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "replicast-limits-{}-{}.txt",
        std::process::id(),
        rand::random::<u32>()
    ));
    let text: String = ["a", "b"]
        .iter()
        .map(|name| {
            let line = digest_line(name, name);
            format!(
                "{} publish=* subscribe=*\n",
                line.split(" publish=").next().unwrap()
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_deadline_beyond_the_cap_is_refused_by_name() {
    let cluster = Cluster::start(1, &["--max-deadline", "1m"]).await;
    let mut c = cluster.client(0).await;
    let mut request = Request::new(broadcast("t"));
    request.set_timeout(Duration::from_secs(600));
    let status = c.broadcast(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("--max-deadline 60s"),
        "{}",
        status.message()
    );
    let mut request = Request::new(broadcast("t"));
    request.set_timeout(Duration::from_secs(30));
    c.broadcast(request).await.expect("within the cap");
    cluster.shutdown().await;
}

#[tokio::test]
async fn each_client_gets_its_own_broadcast_rate() {
    let tokens = tokens_file();
    let path = tokens.display().to_string();
    let cluster = Cluster::start(1, &["--tokens-file", &path, "--broadcast-rate-per-client", "5"]).await;
    let mut c = cluster.client(0).await;
    let mut refused = None;
    for _ in 0..20 {
        if let Err(status) = c.broadcast(as_client(broadcast("t"), "a")).await {
            refused = Some(status);
            break;
        }
    }
    let status = refused.expect("client a is held to 5 a second");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--broadcast-rate-per-client") && status.message().contains("client a"),
        "{}",
        status.message()
    );
    c.broadcast(as_client(broadcast("t"), "b"))
        .await
        .expect("client b has its own bucket");
    eventually("client a's bucket to refill", Duration::from_secs(3), || {
        let mut c = c.clone();
        async move { c.broadcast(as_client(broadcast("t"), "a")).await.is_ok() }
    })
    .await;
    cluster.shutdown().await;
    let _ = std::fs::remove_file(tokens);
}

#[tokio::test]
async fn subscribe_streams_are_bounded_per_client_and_per_replica() {
    let tokens = tokens_file();
    let path = tokens.display().to_string();
    let cluster = Cluster::start(
        1,
        &[
            "--tokens-file",
            &path,
            "--max-subscribers-per-client",
            "2",
            "--max-subscribers",
            "3",
        ],
    )
    .await;
    let c = cluster.client(0).await;
    let open = |token: &'static str| {
        let mut c = c.clone();
        async move {
            c.subscribe(as_client(SubscribeRequest::default(), token))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let a1 = open("a").await.expect("a's first");
    let _a2 = open("a").await.expect("a's second");
    let status = open("a").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-subscribers-per-client") && status.message().contains("client a"),
        "{}",
        status.message()
    );
    let _b1 = open("b").await.expect("b has room of its own");
    let status = open("b").await.unwrap_err();
    assert!(
        status.message().contains("limit --max-subscribers:"),
        "{}",
        status.message()
    );
    // Other calls are served meanwhile.
    client(cluster.addr(0))
        .await
        .list_peers(as_client(ListPeersRequest {}, "b"))
        .await
        .expect("still serving");
    // A stream that ends frees its slot.
    drop(a1);
    eventually(
        "a's closed stream to free its slot",
        Duration::from_secs(5),
        || {
            let open = open("a");
            async move { open.await.is_ok() }
        },
    )
    .await;
    cluster.shutdown().await;
    let _ = std::fs::remove_file(tokens);
}

#[tokio::test]
async fn streams_per_connection_and_header_size_are_http2_limits() {
    let cluster = Cluster::start(
        1,
        &[
            "--max-streams-per-connection",
            "2",
            "--max-header-list-bytes",
            "4096",
        ],
    )
    .await;
    let addr = cluster.addr(0);
    let c = client(addr).await;
    let open = || {
        let mut c = c.clone();
        async move { c.subscribe(SubscribeRequest::default()).await }
    };
    let first = open().await.expect("first stream");
    let _second = open().await.expect("second stream");
    // A third waits for a free stream: HTTP/2 flow control, not an error.
    let third = tokio::spawn(open());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "the third stream waits while two are open");
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third stream starts once one ended")
        .unwrap()
        .expect("and is served");
    // Metadata over the header list limit is refused; others go on.
    let mut big = Request::new(broadcast("t"));
    big.metadata_mut()
        .insert("x-padding", "p".repeat(8 * 1024).parse().unwrap());
    let mut fresh = client(addr).await;
    let status = fresh.broadcast(big).await.unwrap_err();
    assert_ne!(status.code(), Code::Ok, "{status:?}");
    client(addr)
        .await
        .broadcast(broadcast("t"))
        .await
        .expect("the replica still serves other calls");
    cluster.shutdown().await;
}
