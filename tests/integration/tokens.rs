//! Client tokens: every authentication and permission case over real gRPC,
//! the tokens file reloaded all or nothing, and a Subscribe stream that
//! loses its permission ended with PERMISSION_DENIED.

use crate::common;

use std::{path::PathBuf, time::Duration};

use common::{Cluster, client, eventually, free_port_on, health_status, samples, scrape};
use replicast::{
    auth::digest_line,
    proto::v1::{
        AckPolicy, BroadcastRequest, ListPeersRequest, PublishRequest, SubscribeRequest,
        replicast_client::ReplicastClient,
    },
};
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

const WEB: &str = "web-token";
const OPS: &str = "ops-token";

/// A line of the tokens file for `client` with `token` and `permissions`.
fn line(client: &str, token: &str, permissions: &str) -> String {
    let base = digest_line(client, token);
    let head = base.split(" publish=").next().unwrap();
    format!("{head} {permissions}\n")
}

fn tokens_text(web_subscribe: &str) -> String {
    format!(
        "# test tokens\n{}{}",
        line(
            "web",
            WEB,
            &format!("publish=cache.*,user.logout subscribe={web_subscribe}")
        ),
        line("ops", OPS, "subscribe=*"),
    )
}

struct TokensFile(PathBuf);

impl TokensFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "replicast-tokens-{}-{}.txt",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    /// Replaces the file the way a secret update does: a new file moved
    /// over the old one.
    fn replace(&self, text: &str) {
        let staged = self.0.with_extension("new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &self.0).unwrap();
    }
}

impl Drop for TokensFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn cluster(file: &TokensFile) -> Cluster {
    let path = file.0.display().to_string();
    Cluster::start(2, &["--tokens-file", &path, "--tokens-reload-interval", "100ms"]).await
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn broadcast(topic: &str) -> BroadcastRequest {
    BroadcastRequest {
        topic: topic.into(),
        payload: b"x".to_vec().into(),
        ack: AckPolicy::All as i32,
        ..Default::default()
    }
}

async fn status_of<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    result.expect_err("the call is refused")
}

#[tokio::test]
async fn calls_need_a_known_token_and_a_permitted_topic() {
    let file = TokensFile::new(&tokens_text("cache.*"));
    let cluster = cluster(&file).await;
    let mut c: ReplicastClient<Channel> = cluster.client(0).await;

    // Health stays open: kubelet probes carry no credentials.
    assert_eq!(health_status(cluster.addr(0), "").await, ServingStatus::Serving);

    for (token, words) in [
        (None, "authorization: Bearer <token>"),
        (Some("not-a-token"), "unknown token"),
    ] {
        let status = status_of(c.broadcast(with_token(broadcast("cache.x"), token)).await).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains(words),
            "{words:?} in {}",
            status.message()
        );
        assert!(
            !status.message().contains("not-a-token"),
            "a token is never echoed"
        );
    }
    let mut malformed = Request::new(broadcast("cache.x"));
    malformed
        .metadata_mut()
        .insert("authorization", "Basic d2ViOng=".parse().unwrap());
    let status = status_of(c.broadcast(malformed).await).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("malformed"), "{}", status.message());

    // Allowed: delivered to both replicas (the peer hop needs no token).
    let response = c
        .broadcast(with_token(broadcast("cache.flush"), Some(WEB)))
        .await
        .expect("web may publish to cache.*")
        .into_inner();
    assert_eq!((response.replicas, response.acked), (2, 2), "{response:?}");

    // Not allowed: named topic and client.
    for (token, topic, client) in [(WEB, "orders.new", "web"), (OPS, "cache.flush", "ops")] {
        let status = status_of(c.broadcast(with_token(broadcast(topic), Some(token))).await).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status
                .message()
                .contains(&format!("client {client} may not publish to topic {topic}")),
            "{}",
            status.message()
        );
    }

    // ListPeers: any listed client.
    let status = status_of(c.list_peers(ListPeersRequest {}).await).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    c.list_peers(with_token(ListPeersRequest {}, Some(OPS)))
        .await
        .expect("a listed client may list peers");

    // Subscribe: every topic of the filter must be allowed.
    let subscribe = |topics: &[&str]| SubscribeRequest {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    c.subscribe(with_token(subscribe(&["cache.*"]), Some(WEB)))
        .await
        .expect("web may subscribe to cache.*");
    c.subscribe(with_token(subscribe(&[]), Some(OPS)))
        .await
        .expect("ops may subscribe to everything");
    for (topics, words) in [
        (&["cache.*", "user.*"][..], "filter user.*"),
        (&[][..], "every topic (no filter)"),
    ] {
        let status = status_of(c.subscribe(with_token(subscribe(topics), Some(WEB))).await).await;
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains(words),
            "{words:?} in {}",
            status.message()
        );
    }
    let status = status_of(c.subscribe(subscribe(&["cache.*"])).await).await;
    assert_eq!(status.code(), Code::Unauthenticated);

    cluster.shutdown().await;
}

#[tokio::test]
async fn a_publish_stream_checks_each_message_and_goes_on() {
    let file = TokensFile::new(&tokens_text("cache.*"));
    let cluster = cluster(&file).await;
    let mut c = cluster.client(0).await;
    let requests = ["cache.a", "orders.b", "user.logout"]
        .into_iter()
        .enumerate()
        .map(|(tag, topic)| PublishRequest {
            tag: tag as u64,
            broadcast: Some(broadcast(topic)),
            timeout: None,
        })
        .collect::<Vec<_>>();
    let status = status_of(c.publish(futures::stream::iter(requests.clone())).await).await;
    assert_eq!(status.code(), Code::Unauthenticated, "the stream needs a token");
    let mut responses = c
        .publish(with_token(futures::stream::iter(requests), Some(WEB)))
        .await
        .expect("web may publish")
        .into_inner();
    let mut codes = std::collections::BTreeMap::new();
    while let Some(response) = responses.message().await.expect("the stream goes on") {
        codes.insert(response.tag, (response.code, response.error));
    }
    assert_eq!(codes[&0].0, 0, "{codes:?}");
    assert_eq!(codes[&1].0, Code::PermissionDenied as i32, "{codes:?}");
    assert!(codes[&1].1.contains("topic orders.b"), "{codes:?}");
    assert_eq!(codes[&2].0, 0, "{codes:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_tokens_file_reloads_all_or_nothing_and_revokes_open_streams() {
    let file = TokensFile::new(&tokens_text("cache.*"));
    let path = file.0.display().to_string();
    let metrics = free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
        .await
        .to_string();
    let cluster = Cluster::start(
        1,
        &[
            "--tokens-file",
            &path,
            "--tokens-reload-interval",
            "100ms",
            "--metrics-listen",
            &metrics,
        ],
    )
    .await;
    let addr = cluster.addr(0);
    let mut c = client(addr).await;
    let subscribe = SubscribeRequest {
        topics: vec!["cache.*".into()],
        ..Default::default()
    };
    let mut stream = c
        .subscribe(with_token(subscribe.clone(), Some(WEB)))
        .await
        .expect("web may subscribe to cache.*")
        .into_inner();

    // A broken file is not taken: the old tokens stay in force.
    file.replace("web sha256:not-hex publish=*\n");
    let metrics: std::net::SocketAddr = metrics.parse().unwrap();
    eventually(
        "the broken file to be seen and rejected",
        Duration::from_secs(5),
        || async move {
            samples(&scrape(metrics).await)
                .get("replicast_tokens_reloads_total{result=\"rejected\"}")
                .is_some_and(|n| *n >= 1.0)
        },
    )
    .await;
    c.broadcast(with_token(broadcast("cache.still"), Some(WEB)))
        .await
        .expect("the previous tokens are still in force");
    let delivery = stream.message().await.unwrap().expect("the stream is still open");
    assert_eq!(delivery.message.unwrap().topic, "cache.still");

    // Web loses cache.*: its open stream ends with PERMISSION_DENIED.
    file.replace(&tokens_text("user.logout"));
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends after the reload");
    let status = ended.expect_err("ends with a status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("filter cache.*") && status.message().contains("changed since"),
        "{}",
        status.message()
    );
    // New calls see the new permissions.
    eventually("the new file to be in force", Duration::from_secs(5), || {
        let mut c = c.clone();
        let subscribe = subscribe.clone();
        async move {
            matches!(c.subscribe(with_token(subscribe, Some(WEB))).await, Err(s) if s.code() == Code::PermissionDenied)
        }
    })
    .await;

    // A removed client is refused, and its streams end.
    let mut ops_stream = c
        .subscribe(with_token(SubscribeRequest::default(), Some(OPS)))
        .await
        .expect("ops may subscribe")
        .into_inner();
    file.replace(&line("web", WEB, "publish=* subscribe=*"));
    let status = tokio::time::timeout(Duration::from_secs(5), ops_stream.message())
        .await
        .expect("ops' stream ends")
        .expect_err("with a status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("no longer in the tokens file"),
        "{}",
        status.message()
    );
    let status = status_of(c.list_peers(with_token(ListPeersRequest {}, Some(OPS))).await).await;
    assert_eq!(status.code(), Code::Unauthenticated);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_replica_does_not_start_with_a_bad_tokens_file() {
    let file = TokensFile::new("web sha256:1234\n");
    let hosts = common::Hosts::reserve(1).await;
    let mut args = common::base_args(hosts.addr(0), "127.0.0.1:1".parse().unwrap());
    args.extend(["--tokens-file".to_owned(), file.0.display().to_string()]);
    let listener = tokio::net::TcpListener::bind(std::net::SocketAddr::new(hosts.ips[0], 0))
        .await
        .unwrap();
    let replica = replicast::server::ServerHandle::start_on(common::config(args), listener);
    let error = replica.shutdown().await.expect_err("start-up fails");
    let text = error.to_string();
    assert!(
        text.contains("--tokens-file") && text.contains("line 1"),
        "{text}"
    );
}
