//! Test harness: real replicas on distinct 127.x.y.z addresses, one shared
//! port (as pods of a Deployment), discovering each other through an
//! in-process DNS server that serves the headless name.

pub mod app;
pub mod certs;

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use clap::Parser;
use rand::Rng;
use replicast::{
    config::{Config, ServeArgs},
    devdns::DevDns,
    loopback::bind_same_port,
    proto::v1::{Delivery, ListPeersRequest, SubscribeRequest, replicast_client::ReplicastClient},
    server::ServerHandle,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::{Streaming, transport::Channel};

pub const ZONE: &str = "replicast.test.";
pub const HEADLESS: &str = "replicast-headless.replicast.test.";

/// A block of loopback addresses with one port free on all of them.
pub struct Hosts {
    pub ips: Vec<IpAddr>,
    pub port: u16,
    /// Listeners already bound on every address, handed to replicas.
    pub listeners: Vec<Option<TcpListener>>,
}

impl Hosts {
    /// Reserves `n` addresses 127.A.B.1..n (random A, B so tests running in
    /// parallel do not collide) sharing one free port.
    pub async fn reserve(n: usize) -> Self {
        for _ in 0..50 {
            let (a, b) = {
                let mut rng = rand::rng();
                (rng.random_range(1..=254u8), rng.random_range(0..=254u8))
            };
            let ips: Vec<IpAddr> = (1..=n as u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, a, b, i)))
                .collect();
            if let Ok(listeners) = bind_same_port(&ips, 0).await {
                let port = listeners[0].local_addr().unwrap().port();
                return Self {
                    ips,
                    port,
                    listeners: listeners.into_iter().map(Some).collect(),
                };
            }
        }
        panic!("could not reserve loopback addresses with a common free port");
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ips[i], self.port)
    }

    /// An address of this block for its DNS server (127.A.B.250): not
    /// 127.0.0.1, whose ports are taken and freed all the time by the source
    /// side of loopback connections, so a DNS server can come back on its old
    /// port.
    pub fn dns_ip(&self) -> IpAddr {
        match self.ips[0] {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                IpAddr::V4(Ipv4Addr::new(a, b, c, 250))
            }
            other => other,
        }
    }
}

/// A running cluster.
pub struct Cluster {
    pub dns: DevDns,
    pub hosts: Hosts,
    pub replicas: Vec<Option<ServerHandle>>,
}

/// Flags every test replica gets; fast refresh so membership tests are quick.
pub fn base_args(listen: SocketAddr, dns: SocketAddr) -> Vec<String> {
    [
        "serve",
        "--listen",
        &listen.to_string(),
        "--peers-dns",
        HEADLESS,
        "--dns-server",
        &dns.to_string(),
        "--refresh-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A validated config from a `serve` command line. Test replicas drain for
/// 100 ms (a flag later in `args` overrides it), so shutting a cluster down
/// does not wait out the production default.
pub fn config(args: Vec<String>) -> Config {
    let mut argv = vec![
        "serve".to_owned(),
        "--drain-timeout".to_owned(),
        "100ms".to_owned(),
    ];
    argv.extend(args.into_iter().skip_while(|a| a == "serve"));
    Config::try_from(ServeArgs::try_parse_from(argv).expect("test flags parse"))
        .expect("test config is valid")
}

impl Cluster {
    /// `n` replicas, all in DNS, each started with `extra` flags.
    pub async fn start(n: usize, extra: &[&str]) -> Self {
        Self::start_with(n, n, extra).await
    }

    /// `hosts` addresses reserved, the first `running` started and in DNS.
    pub async fn start_with(hosts: usize, running: usize, extra: &[&str]) -> Self {
        let hosts = Hosts::reserve(hosts).await;
        let dns = DevDns::start(hosts.dns_ip(), ZONE).await.expect("dns starts");
        let mut cluster = Self {
            dns,
            replicas: (0..hosts.ips.len()).map(|_| None).collect(),
            hosts,
        };
        cluster.publish(&(0..running).collect::<Vec<_>>()).await;
        for i in 0..running {
            cluster.start_replica(i, extra);
        }
        for i in 0..running {
            wait_serving(cluster.addr(i)).await;
        }
        cluster
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.hosts.addr(i)
    }

    /// Starts replica `i` on its reserved listener.
    pub fn start_replica(&mut self, i: usize, extra: &[&str]) {
        let mut args = base_args(self.addr(i), self.dns.addr());
        args.extend(extra.iter().map(|s| s.to_string()));
        let listener = self.hosts.listeners[i].take().expect("replica already started");
        self.replicas[i] = Some(ServerHandle::start_on(config(args), listener));
    }

    /// Makes DNS list exactly the replicas in `members`.
    pub async fn publish(&self, members: &[usize]) {
        let ips: Vec<IpAddr> = members.iter().map(|i| self.hosts.ips[*i]).collect();
        self.dns.set_addresses(HEADLESS, &ips).await.expect("dns update");
    }

    pub async fn client(&self, i: usize) -> ReplicastClient<Channel> {
        client(self.addr(i)).await
    }

    /// Shuts every replica down at once (as the pods of a deleted
    /// Deployment), each cleanly.
    pub async fn shutdown(mut self) {
        let replicas = self.replicas.iter_mut().filter_map(Option::take);
        for result in futures::future::join_all(replicas.map(ServerHandle::shutdown)).await {
            result.expect("replica shuts down cleanly");
        }
        self.dns.shutdown().await;
    }
}

pub async fn client(addr: SocketAddr) -> ReplicastClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    ReplicastClient::new(channel)
}

/// Polls `condition` every 20 ms until it holds, failing after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the replica at `addr` lists `count` peers (itself included).
pub async fn wait_peer_count(addr: SocketAddr, count: usize) {
    eventually(
        &format!("{addr} to list {count} peers"),
        Duration::from_secs(10),
        || async move {
            let peers = client(addr).await.list_peers(ListPeersRequest {}).await;
            peers.is_ok_and(|p| p.into_inner().peers.len() == count)
        },
    )
    .await;
}

/// The grpc.health.v1 status of `service` ("" = the server) at `addr`.
pub async fn health_status(
    addr: SocketAddr,
    service: &str,
) -> tonic_health::pb::health_check_response::ServingStatus {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    tonic_health::pb::health_check_response::ServingStatus::try_from(status).unwrap()
}

/// Waits until the replica's health check says SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    eventually(&format!("{addr} to be SERVING"), Duration::from_secs(10), || async move {
        let Ok(channel) = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await else {
            return false;
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        matches!(
            health.check(request).await,
            Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    })
    .await;
}

/// Opens a Subscribe stream; it is registered once this returns.
pub async fn subscribe(addr: SocketAddr, topics: &[&str], after: u64) -> Streaming<Delivery> {
    client(addr)
        .await
        .subscribe(SubscribeRequest {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            after_sequence: after,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("subscribe to {addr}: {s:?}"))
        .into_inner()
}

/// The next delivery, failing the test if none comes within 5 s.
pub async fn next_delivery(stream: &mut Streaming<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a delivery within 5 s")
        .expect("stream healthy")
        .expect("stream not ended")
}

/// A TCP listener that accepts connections and never answers: a hung pod.
pub struct HungPeer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HungPeer {
    pub fn start(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket); // keep it open, read nothing, write nothing
            }
        });
        Self { addr, task }
    }
}

impl Drop for HungPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// GET /metrics with a plain HTTP/1.0 request; returns the body.
pub async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint accepts");
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
pub fn samples(body: &str) -> std::collections::HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

pub async fn free_port_on(ip: IpAddr) -> SocketAddr {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}
