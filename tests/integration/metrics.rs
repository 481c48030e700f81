//! The Prometheus endpoint: scraped over real HTTP, its counters move.

use crate::common;

use common::{Cluster, free_port_on, samples, scrape, subscribe};
use replicast::proto::v1::{AckPolicy, BroadcastRequest};

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
