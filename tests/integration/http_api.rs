//! The local HTTP/JSON API over real HTTP: proto3 JSON in and out, the
//! grpc-gateway statuses with the receipts in `google.rpc.Status` details,
//! deadlines, tokens, and the drain an app can start.

use crate::common;

use std::{net::SocketAddr, time::Duration};

use common::{Cluster, HungPeer, eventually, free_port_on, health_status};
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

/// A cluster of `n` whose replica 0 serves the HTTP API.
async fn cluster(n: usize, extra: &[&str]) -> (Cluster, String) {
    let api = free_port_on(std::net::Ipv4Addr::LOCALHOST.into()).await;
    let mut cluster = Cluster::start_with(n, 0, &[]).await;
    cluster.publish(&(0..n).collect::<Vec<_>>()).await;
    let api_flag = api.to_string();
    for i in 0..n {
        let mut flags = extra.to_vec();
        if i == 0 {
            flags.extend(["--http-listen", &api_flag]);
        }
        cluster.start_replica(i, &flags);
    }
    for i in 0..n {
        common::wait_serving(cluster.addr(i)).await;
    }
    (cluster, format!("http://{api}"))
}

async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = client.post(url).body(body.to_owned());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body: {text}")),
    )
}

#[tokio::test]
async fn broadcast_takes_and_answers_proto3_json() {
    let (cluster, api) = cluster(3, &[]).await;
    let body = json!({"topic": "cache.invalidate", "payload": "dXNlcjo0Mg==", "ack": "ACK_POLICY_ALL", "headers": {"k": "v"}});
    let (status, response) = post(&format!("{api}/v1/broadcast"), &[], &body.to_string()).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["replicas"], 3, "{response}");
    assert_eq!(response["acked"], 3);
    assert_eq!(response["ack"], "ACK_POLICY_ALL", "enums by name");
    assert_eq!(response["outcomes"].as_array().unwrap().len(), 3);
    // 64-bit integers are strings in proto3 JSON.
    assert!(response["outcomes"][0]["sequence"].is_string(), "{response}");

    // Field names as written in the proto are accepted too, and a deadline
    // from ?timeout=.
    let body = json!({"topic": "t", "payload": "", "ack": 3});
    let (status, response) = post(&format!("{api}/v1/broadcast?timeout=2s"), &[], &body.to_string()).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["ack"], "ACK_POLICY_ONE");

    let peers: Value = serde_json::from_str(
        &reqwest::get(format!("{api}/v1/peers"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(peers["peers"].as_array().unwrap().len(), 3, "{peers}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn failures_answer_grpc_gateways_status_with_the_receipts() {
    // Replica 1's address accepts and never answers: the hop fails.
    let mut cluster = Cluster::start_with(2, 0, &[]).await;
    let hung = HungPeer::start(cluster.hosts.listeners[1].take().unwrap());
    let api = free_port_on(std::net::Ipv4Addr::LOCALHOST.into()).await;
    cluster.publish(&[0, 1]).await;
    let api_flag = api.to_string();
    cluster.start_replica(0, &["--http-listen", &api_flag, "--peer-timeout", "200ms"]);
    common::wait_serving(cluster.addr(0)).await;
    let url = format!("http://{api}/v1/broadcast");

    // (body, headers, HTTP status, gRPC code, what the message names)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], u16, i64, &'a str);
    let cases: [Case; 5] = [
        (r#"{"topic": ""}"#, &[], 400, 3, "topic"),
        (
            r#"{"topic": "t", "ack": "ACK_POLICY_SOMETIMES"}"#,
            &[],
            400,
            3,
            "BroadcastRequest",
        ),
        ("not json", &[], 400, 3, "BroadcastRequest"),
        (
            r#"{"topic": "t"}"#,
            &[("grpc-timeout", "soon")],
            400,
            3,
            "Grpc-Timeout",
        ),
        (
            r#"{"topic": "t"}"#,
            &[("grpc-timeout", "10H")],
            400,
            3,
            "--max-deadline",
        ),
    ];
    for (body, headers, status, code, says) in cases {
        let (got, response) = post(&url, headers, body).await;
        assert_eq!(
            (got, response["code"].as_i64().unwrap()),
            (status, code),
            "{body}: {response}"
        );
        assert!(
            response["message"].as_str().unwrap().contains(says),
            "{body}: {response}"
        );
    }

    // ack=ALL cannot be met: 503 (UNAVAILABLE) or 504 (DEADLINE_EXCEEDED),
    // with every receipt in the details.
    let (status, response) = post(
        &url,
        &[("grpc-timeout", "1S")],
        r#"{"topic": "t", "payload": "aGk="}"#,
    )
    .await;
    assert!(status == 503 || status == 504, "{status}: {response}");
    let details = &response["details"][0];
    assert_eq!(
        details["@type"], "type.googleapis.com/replicast.v1.BroadcastResponse",
        "{response}"
    );
    assert_eq!(details["replicas"], 2, "{response}");
    let failed = details["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["peer"] == hung.addr.to_string())
        .expect("the hung peer's receipt");
    assert!(failed["code"].as_i64().unwrap() != 0, "{failed}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn tokens_apply_as_on_grpc() {
    let file = std::env::temp_dir().join(format!("replicast-http-tokens-{}", rand::random::<u32>()));
    let token = "http-api-test-token-0123456789abcdef";
    std::fs::write(
        &file,
        format!(
            "{}\n",
            replicast::auth::digest_line("app", token)
                .replace("publish= subscribe=", "publish=cache.* subscribe=")
        ),
    )
    .unwrap();
    let path = file.display().to_string();
    let (cluster, api) = cluster(1, &["--tokens-file", &path]).await;
    let url = format!("{api}/v1/broadcast");
    let body = r#"{"topic": "cache.x"}"#;
    let bearer = format!("Bearer {token}");
    let (status, response) = post(&url, &[], body).await;
    assert_eq!((status, response["code"].as_i64()), (401, Some(16)), "{response}");
    let (status, response) = post(&url, &[("authorization", &bearer)], body).await;
    assert_eq!(status, 200, "{response}");
    let (status, response) = post(&url, &[("authorization", &bearer)], r#"{"topic": "orders"}"#).await;
    assert_eq!((status, response["code"].as_i64()), (403, Some(7)), "{response}");
    assert!(
        response["message"].as_str().unwrap().contains("orders"),
        "{response}"
    );
    // The drain too needs a token.
    let (status, response) = post(&format!("{api}/v1/drain"), &[], "").await;
    assert_eq!((status, response["code"].as_i64()), (401, Some(16)), "{response}");
    assert_eq!(health_status(cluster.addr(0), "").await, ServingStatus::Serving);
    let _ = std::fs::remove_file(file);
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_app_can_start_the_drain() {
    let (mut cluster, api) = cluster(2, &["--drain-timeout", "2s"]).await;
    let (status, response) = post(&format!("{api}/v1/drain"), &[], "").await;
    assert_eq!((status, &response["draining"]), (202, &json!(true)), "{response}");
    let draining: SocketAddr = cluster.addr(0);
    eventually(
        "the replica to report NOT_SERVING",
        Duration::from_secs(5),
        || async { health_status(draining, "").await == ServingStatus::NotServing },
    )
    .await;
    // It announced its leave: its peer stops listing it at once.
    common::wait_peer_count(cluster.addr(1), 1).await;
    // And it stops by itself once the drain is over.
    let replica = cluster.replicas[0].take().unwrap();
    tokio::time::timeout(Duration::from_secs(20), replica.shutdown())
        .await
        .expect("the replica stops after its drain")
        .expect("cleanly");
    cluster.shutdown().await;
}
