//! The Prometheus endpoint: scraped over real HTTP, its counters move.

mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::{Cluster, subscribe};
use replicast::proto::v1::{AckPolicy, BroadcastRequest};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// GET /metrics with a plain HTTP/1.0 request; returns the body.
async fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("metrics endpoint accepts");
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("a response within 5 s")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body.to_owned()
}

/// Sample values by their full name with labels, e.g.
/// `replicast_broadcasts_total{outcome="ok",ack="all"}`.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn free_port_on(ip: std::net::IpAddr) -> SocketAddr {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn counters_move_with_traffic() {
    let mut cluster = Cluster::start_with(2, 0, &[]).await;
    cluster.publish(&[0, 1]).await;
    let mut metrics_addrs = Vec::new();
    for i in 0..2 {
        let metrics = free_port_on(cluster.hosts.ips[i]).await;
        cluster.start_replica(i, &["--metrics-listen", &metrics.to_string()]);
        metrics_addrs.push(metrics);
    }
    for i in 0..2 {
        common::wait_serving(cluster.addr(i)).await;
    }
    let before = samples(&scrape(metrics_addrs[0]).await);
    assert_eq!(before.get("replicast_peers"), Some(&2.0), "{before:?}");
    assert_eq!(before.get("replicast_peers_stale"), Some(&0.0));
    // Membership: the other replica, from DNS; its join was announced and
    // probed (both started together, so either may have come first).
    assert_eq!(
        before.get(r#"replicast_members{source="dns"}"#),
        Some(&1.0),
        "{before:?}"
    );
    assert_eq!(before.get(r#"replicast_members{source="announced"}"#), Some(&0.0));
    assert_eq!(
        before.get(r#"replicast_membership_changes_total{change="joined",cause="dns"}"#),
        Some(&1.0),
        "{before:?}"
    );
    assert!(
        before
            .get(r#"replicast_announcements_total{kind="join",result="confirmed"}"#)
            .is_some_and(|v| *v >= 1.0),
        "{before:?}"
    );
    assert!(
        before
            .get("replicast_dns_lookups_total")
            .is_some_and(|v| *v >= 1.0)
    );

    let _subscriber = subscribe(cluster.addr(0), &[], 0).await;
    let mut client = cluster.client(0).await;
    let request = |id: &str| BroadcastRequest {
        topic: "t".into(),
        id: id.into(),
        ack: AckPolicy::All as i32,
        ..Default::default()
    };
    client.broadcast(request("m1")).await.unwrap();
    client.broadcast(request("m1")).await.unwrap(); // a retry: duplicates
    client.broadcast(request("m2")).await.unwrap();
    let _ = client
        .broadcast(BroadcastRequest {
            ack: 9,
            ..request("bad")
        })
        .await
        .unwrap_err();

    let after = samples(&scrape(metrics_addrs[0]).await);
    let get = |name: &str| {
        after
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("{name} missing from {after:#?}"))
    };
    assert_eq!(get(r#"replicast_broadcasts_total{outcome="ok",ack="all"}"#), 3.0);
    assert_eq!(
        get(r#"replicast_broadcasts_total{outcome="invalid",ack="invalid"}"#),
        1.0
    );
    let peer = cluster.addr(1);
    assert_eq!(
        get(&format!(
            r#"replicast_peer_deliveries_total{{peer="{peer}",result="delivered"}}"#
        )),
        2.0
    );
    assert_eq!(
        get(&format!(
            r#"replicast_peer_deliveries_total{{peer="{peer}",result="duplicate"}}"#
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            r#"replicast_peer_delivery_latency_seconds_count{{peer="{peer}"}}"#
        )),
        3.0
    );
    assert_eq!(get("replicast_local_deliveries_total"), 2.0);
    assert_eq!(get("replicast_duplicates_total"), 1.0);
    assert_eq!(get("replicast_subscribers"), 1.0);
    assert_eq!(get("replicast_replay_ring_messages"), 2.0);
    assert!(get("replicast_replay_ring_bytes") > 0.0);
    assert_eq!(get("replicast_last_sequence"), 2.0);
    assert_eq!(get("replicast_fanouts_in_flight"), 0.0);
    assert_eq!(get("replicast_spans_dropped_total"), 0.0);

    // The peer counted its own side.
    let peer_side = samples(&scrape(metrics_addrs[1]).await);
    assert_eq!(peer_side.get("replicast_local_deliveries_total"), Some(&2.0));
    assert_eq!(peer_side.get("replicast_duplicates_total"), Some(&1.0));
    cluster.shutdown().await;
}
