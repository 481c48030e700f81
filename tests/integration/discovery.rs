//! Discovery: SRV and static sources, waiting for the first lookup, stale
//! peer sets when DNS is down or answers SERVFAIL, and empty answers.

use crate::common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    Cluster, HEADLESS, Hosts, ZONE, base_args, client, config, eventually, health_status, wait_serving,
};
use replicast::{
    devdns::DevDns,
    proto::v1::{AckPolicy, BroadcastRequest, ListPeersRequest, ListPeersResponse},
    server::ServerHandle,
};
use tokio::net::TcpListener;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

fn broadcast(timeout: Duration) -> Request<BroadcastRequest> {
    let mut request = Request::new(BroadcastRequest {
        topic: "t".into(),
        ack: AckPolicy::All as i32,
        ..Default::default()
    });
    request.set_timeout(timeout);
    request
}

async fn peers(addr: SocketAddr) -> ListPeersResponse {
    client(addr)
        .await
        .list_peers(ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// A Broadcast through `addr` reaches and is acknowledged by `replicas` replicas.
async fn assert_broadcast_acked(addr: SocketAddr, replicas: u32) {
    let response = client(addr)
        .await
        .broadcast(broadcast(Duration::from_secs(5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.replicas, response.acked),
        (replicas, replicas),
        "{response:?}"
    );
}

/// A free address for a DNS server that is not running yet.
async fn unused_dns_addr(hosts: &Hosts) -> SocketAddr {
    let probe = DevDns::start(hosts.dns_ip(), ZONE).await.unwrap();
    let addr = probe.addr();
    probe.shutdown().await;
    addr
}

#[tokio::test]
async fn srv_records_give_each_replica_its_own_port() {
    let hosts = Hosts::reserve(2).await;
    let dns = DevDns::start(hosts.dns_ip(), ZONE).await.unwrap();
    // Distinct ports on distinct IPs: SRV carries the port, A records do not.
    let mut listeners = Vec::new();
    let mut targets = Vec::new();
    for (i, ip) in hosts.ips.iter().enumerate() {
        let listener = TcpListener::bind(SocketAddr::new(*ip, 0)).await.unwrap();
        let target = format!("replica-{i}.{ZONE}");
        dns.set_addresses(&target, &[*ip]).await.unwrap();
        targets.push((target, listener.local_addr().unwrap().port()));
        listeners.push(listener);
    }
    let srv = format!("_grpc._tcp.{HEADLESS}");
    dns.set_srv(&srv, &targets).await.unwrap();
    let mut replicas = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr().unwrap();
        let args = [
            "serve",
            "--listen",
            &addr.to_string(),
            "--peers-srv",
            &srv,
            "--dns-server",
            &dns.addr().to_string(),
        ];
        replicas.push(ServerHandle::start_on(
            config(args.iter().map(|s| s.to_string()).collect()),
            listener,
        ));
        wait_serving(addr).await;
    }
    let first = replicas[0].local_addr;
    let view = peers(first).await;
    assert_eq!(view.source, format!("srv:{srv}"));
    let mut expected: Vec<String> = replicas.iter().map(|r| r.local_addr.to_string()).collect();
    expected.sort();
    assert_eq!(
        view.peers.iter().map(|p| p.address.clone()).collect::<Vec<_>>(),
        expected
    );
    assert_broadcast_acked(first, 2).await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
    dns.shutdown().await;
}

#[tokio::test]
async fn static_peers_need_no_dns() {
    let hosts = Hosts::reserve(2).await;
    let list = format!("{},{}", hosts.addr(0), hosts.addr(1));
    let mut hosts = hosts;
    let mut replicas = Vec::new();
    for i in 0..2 {
        let listen = hosts.addr(i).to_string();
        let args = ["serve", "--listen", &listen, "--static-peers", &list];
        let listener = hosts.listeners[i].take().unwrap();
        replicas.push(ServerHandle::start_on(
            config(args.iter().map(|s| s.to_string()).collect()),
            listener,
        ));
    }
    wait_serving(hosts.addr(0)).await;
    let view = peers(hosts.addr(0)).await;
    assert_eq!(view.source, "static");
    assert!(view.resolved_at.is_some() && !view.stale);
    assert_broadcast_acked(hosts.addr(0), 2).await;
    for replica in replicas {
        replica.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn broadcast_before_the_first_lookup_waits_for_it_within_its_deadline() {
    let mut hosts = Hosts::reserve(1).await;
    let dns_addr = unused_dns_addr(&hosts).await;
    let listen = hosts.addr(0);
    let replica = ServerHandle::start_on(
        config(base_args(listen, dns_addr)),
        hosts.listeners[0].take().unwrap(),
    );

    // No DNS server yet: not serving, and a short Broadcast says why.
    eventually(
        "the first lookup to fail",
        Duration::from_secs(10),
        || async move { !peers(listen).await.last_error.is_empty() },
    )
    .await;
    assert_eq!(
        health_status(listen, "").await,
        ServingStatus::NotServing,
        "before the first lookup"
    );
    let status = client(listen)
        .await
        .broadcast(broadcast(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("has not completed its first lookup"),
        "{}",
        status.message()
    );

    // A Broadcast that arrives now waits, and completes once DNS answers.
    let waiting = tokio::spawn(async move {
        client(listen)
            .await
            .broadcast(broadcast(Duration::from_secs(10)))
            .await
    });
    let dns = DevDns::start_at(dns_addr, ZONE).await.unwrap();
    dns.set_addresses(HEADLESS, &[listen.ip()]).await.unwrap();
    let response = waiting
        .await
        .unwrap()
        .expect("the waiting broadcast completes")
        .into_inner();
    assert_eq!((response.replicas, response.acked), (1, 1));
    assert_eq!(
        health_status(listen, "replicast.v1.Replicast").await,
        ServingStatus::Serving,
        "after the first lookup"
    );
    replica.shutdown().await.unwrap();
    dns.shutdown().await;
}

#[tokio::test]
async fn dns_down_or_servfail_keeps_the_last_good_set_marked_stale_and_recovers() {
    let cluster = Cluster::start(2, &[]).await;
    let dns_addr = cluster.dns.addr();
    let Cluster { dns, hosts, replicas } = cluster;
    dns.shutdown().await;
    let first = hosts.addr(0);
    eventually(
        "ListPeers to report stale",
        Duration::from_secs(10),
        || async move { peers(first).await.stale },
    )
    .await;
    let view = peers(first).await;
    assert_eq!(view.peers.len(), 2, "the last good set is kept");
    assert!(!view.last_error.is_empty());
    let response = client(first)
        .await
        .broadcast(broadcast(Duration::from_secs(5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.acked, 2, "broadcasts keep working on the stale set");

    // A server that answers, but with SERVFAIL (a broken upstream, an
    // overloaded CoreDNS): the same, and the error says so.
    let servfail = ServfailDns::start(dns_addr).await;
    eventually(
        "the lookup error to be SERVFAIL",
        Duration::from_secs(10),
        || async move {
            let view = peers(first).await;
            view.stale && view.peers.len() == 2 && view.last_error.contains("Server Failure")
        },
    )
    .await;
    assert!(servfail.answered() > 0, "the replica asked the SERVFAIL server");
    drop(servfail);

    let dns = DevDns::start_at(dns_addr, ZONE).await.unwrap();
    dns.set_addresses(HEADLESS, &hosts.ips).await.unwrap();
    eventually("ListPeers to recover", Duration::from_secs(10), || async move {
        !peers(first).await.stale
    })
    .await;
    for replica in replicas.into_iter().flatten() {
        replica.shutdown().await.unwrap();
    }
    dns.shutdown().await;
}

/// A DNS server that answers every query with SERVFAIL.
struct ServfailDns {
    answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ServfailDns {
    async fn start(addr: SocketAddr) -> Self {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .expect("bind the SERVFAIL server");
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let Ok(query) = hickory_proto::op::Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let mut response = hickory_proto::op::Message::error_msg(
                    query.metadata.id,
                    query.metadata.op_code,
                    hickory_proto::op::ResponseCode::ServFail,
                );
                response.add_queries(query.queries.clone());
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self { answered, task }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for ServfailDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn an_empty_answer_is_an_empty_set_not_an_error() {
    let cluster = Cluster::start(2, &[]).await;
    cluster.publish(&[]).await;
    let first = cluster.addr(0);
    eventually("the peer set to empty", Duration::from_secs(10), || async move {
        peers(first).await.peers.len() == 1
    })
    .await;
    let view = peers(first).await;
    assert!(
        !view.stale && view.last_error.is_empty(),
        "no ready pods is not a failure: {view:?}"
    );
    assert!(view.peers[0].local, "a replica always lists itself");
    // Delivered to itself only.
    assert_broadcast_acked(first, 1).await;
    assert_eq!(
        health_status(first, "").await,
        ServingStatus::Serving,
        "still SERVING"
    );
    cluster.shutdown().await;
}
