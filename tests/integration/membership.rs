//! Membership against a DNS that lags on purpose, as CoreDNS's `ttl 30` and
//! `cache 30` do in a real cluster: a departed replica stays in the answer
//! for 30 s, a new one shows up 30 s late. Replicas announce their join and
//! leave, so a rolling restart under continuous ack=ALL load from every
//! replica has no failed Broadcast, and replicas added by a scale-up get
//! every message sent after they became ready.

use crate::common;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{HEADLESS, Hosts, ZONE, base_args, client, config, eventually, wait_serving};
use replicast::{
    devdns::DevDns,
    proto::v1::{
        AckPolicy, AnnounceRequest, BroadcastRequest, ListPeersRequest, SubscribeRequest,
        announce_request::Kind,
    },
    server::ServerHandle,
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// How late the test DNS follows the truth, both ways.
const DNS_LAG: Duration = Duration::from_secs(30);

/// A DNS server whose answer follows the replicas `DNS_LAG` late.
struct LaggingDns {
    dns: Arc<DevDns>,
    listed: Arc<Mutex<BTreeSet<IpAddr>>>,
    pending: Mutex<Vec<JoinHandle<()>>>,
}

impl LaggingDns {
    async fn start(hosts: &Hosts, listed: &[IpAddr]) -> Self {
        let dns = Arc::new(DevDns::start(hosts.dns_ip(), ZONE).await.expect("dns starts"));
        let this = Self {
            dns,
            listed: Arc::new(Mutex::new(listed.iter().copied().collect())),
            pending: Mutex::new(Vec::new()),
        };
        this.publish().await;
        this
    }

    fn addr(&self) -> SocketAddr {
        self.dns.addr()
    }

    async fn publish(&self) {
        publish(&self.dns, &self.listed).await;
    }

    /// Lists (`add`) or unlists `ip` after the lag.
    fn later(&self, ip: IpAddr, add: bool) {
        let (dns, listed) = (self.dns.clone(), self.listed.clone());
        self.pending.lock().unwrap().push(tokio::spawn(async move {
            tokio::time::sleep(DNS_LAG).await;
            {
                let mut listed = listed.lock().unwrap();
                if add {
                    listed.insert(ip);
                } else {
                    listed.remove(&ip);
                }
            }
            publish(&dns, &listed).await;
        }));
    }

    /// Waits until every scheduled change is in the answer.
    async fn settle(&self) {
        let pending: Vec<_> = self.pending.lock().unwrap().drain(..).collect();
        for change in pending {
            change.await.unwrap();
        }
    }
}

async fn publish(dns: &DevDns, listed: &Mutex<BTreeSet<IpAddr>>) {
    let ips: Vec<IpAddr> = listed.lock().unwrap().iter().copied().collect();
    dns.set_addresses(HEADLESS, &ips).await.expect("dns update");
}

/// One Broadcast the load sent, and what became of it.
struct Sent {
    id: String,
    started: Instant,
    ended: Instant,
    /// The replicas that acknowledged it, or the failure.
    result: Result<Vec<SocketAddr>, tonic::Status>,
}

/// Every Broadcast of the test, from every loader.
#[derive(Default, Clone)]
struct Ledger(Arc<Mutex<Vec<Sent>>>);

/// Sends ack=ALL Broadcasts through `addr`, one after another, until `stop`.
fn spawn_load(addr: SocketAddr, name: String, ledger: Ledger, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = client(addr).await;
        for n in 0.. {
            if stop.is_cancelled() {
                return;
            }
            let id = format!("{name}-{n}");
            let mut request = tonic::Request::new(BroadcastRequest {
                id: id.clone(),
                topic: "load".into(),
                payload: vec![7; 64].into(),
                ack: AckPolicy::All as i32,
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(5));
            let started = Instant::now();
            let result = client.broadcast(request).await.map(|response| {
                response
                    .into_inner()
                    .outcomes
                    .iter()
                    .filter(|o| o.code == 0 && !o.pending)
                    .map(|o| o.peer.parse().expect("receipts name host:port"))
                    .collect()
            });
            ledger.0.lock().unwrap().push(Sent {
                id,
                started,
                ended: Instant::now(),
                result,
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Collects the ids a replica delivers, from its first message until its
/// Subscribe stream ends (the replica closed).
fn spawn_collector(addr: SocketAddr) -> JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut stream = client(addr)
            .await
            .subscribe(SubscribeRequest {
                from_oldest: true,
                ..Default::default()
            })
            .await
            .expect("subscribe")
            .into_inner();
        let mut ids = Vec::new();
        while let Ok(Some(delivery)) = stream.message().await {
            ids.push(delivery.message.unwrap().id);
        }
        ids
    })
}

/// One replica of the test and its timeline.
struct Replica {
    addr: SocketAddr,
    handle: Option<ServerHandle>,
    collector: Option<JoinHandle<Vec<String>>>,
    load: Option<(CancellationToken, JoinHandle<()>)>,
    /// Health said SERVING from here on.
    serving_since: Instant,
    /// Its shutdown began here (its load stopped just before).
    stopping_at: Option<Instant>,
}

struct Cluster {
    hosts: Hosts,
    dns: LaggingDns,
    replicas: HashMap<usize, Replica>,
    ledger: Ledger,
}

impl Cluster {
    /// `hosts` addresses, the first `initial` running and listed in DNS
    /// from the start.
    async fn start(hosts: usize, initial: usize) -> Self {
        let hosts = Hosts::reserve(hosts).await;
        let dns = LaggingDns::start(&hosts, &hosts.ips[..initial]).await;
        let mut cluster = Self {
            hosts,
            dns,
            replicas: HashMap::new(),
            ledger: Ledger::default(),
        };
        for i in 0..initial {
            cluster.launch(i);
        }
        for i in 0..initial {
            cluster.became_ready(i).await;
        }
        cluster
    }

    /// Starts replica `i` (DNS lists it `DNS_LAG` later unless it already does).
    fn launch(&mut self, i: usize) {
        let addr = self.hosts.addr(i);
        let mut args = base_args(addr, self.dns.addr());
        args.extend(["--drain-timeout", "1s"].map(String::from));
        let listener = self.hosts.listeners[i].take().expect("not started before");
        if !self.dns.listed.lock().unwrap().contains(&addr.ip()) {
            self.dns.later(addr.ip(), true);
        }
        self.replicas.insert(
            i,
            Replica {
                addr,
                handle: Some(ServerHandle::start_on(config(args), listener)),
                collector: None,
                load: None,
                serving_since: Instant::now(),
                stopping_at: None,
            },
        );
    }

    /// Waits for replica `i` to say SERVING, then subscribes and loads it.
    async fn became_ready(&mut self, i: usize) {
        let replica = self.replicas.get_mut(&i).unwrap();
        wait_serving(replica.addr).await;
        replica.serving_since = Instant::now();
        replica.collector = Some(spawn_collector(replica.addr));
        let stop = CancellationToken::new();
        let load = spawn_load(replica.addr, format!("r{i}"), self.ledger.clone(), stop.clone());
        replica.load = Some((stop, load));
    }

    /// Stops replica `i`'s load, then begins its shutdown (as SIGTERM);
    /// DNS unlists it `DNS_LAG` later.
    async fn terminate(&mut self, i: usize) {
        let replica = self.replicas.get_mut(&i).unwrap();
        let (stop, load) = replica.load.take().unwrap();
        stop.cancel();
        load.await.unwrap();
        replica.stopping_at = Some(Instant::now());
        replica.handle.as_ref().unwrap().begin_shutdown();
        self.dns.later(replica.addr.ip(), false);
    }

    /// Stops all load and every replica, and checks the ledger against what
    /// every replica delivered.
    async fn finish_and_check(mut self) {
        for replica in self.replicas.values_mut() {
            if let Some((stop, load)) = replica.load.take() {
                stop.cancel();
                load.await.unwrap();
            }
        }
        let end = Instant::now();
        let handles = self
            .replicas
            .values_mut()
            .map(|r| r.handle.take().unwrap().shutdown());
        for result in futures::future::join_all(handles).await {
            result.expect("clean shutdown");
        }
        let mut delivered: HashMap<SocketAddr, Vec<String>> = HashMap::new();
        let mut windows = Vec::new();
        for replica in self.replicas.values_mut() {
            let ids = replica.collector.take().unwrap().await.unwrap();
            delivered.insert(replica.addr, ids);
            windows.push((
                replica.addr,
                replica.serving_since,
                replica.stopping_at.unwrap_or(end),
            ));
        }
        self.dns.settle().await;
        let sent = self.ledger.0.lock().unwrap();
        assert!(sent.len() > 500, "the load ran: {} Broadcasts", sent.len());
        let failed: Vec<String> = sent
            .iter()
            .filter_map(|s| s.result.as_ref().err().map(|e| format!("{}: {e:?}", s.id)))
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} ack=ALL Broadcasts failed, e.g. {:?}",
            failed.len(),
            sent.len(),
            &failed[..failed.len().min(3)]
        );
        for (addr, ids) in &delivered {
            let mut seen = HashSet::new();
            let twice: Vec<&String> = ids.iter().filter(|id| !seen.insert(*id)).collect();
            assert!(
                twice.is_empty(),
                "{addr} delivered {} ids twice, e.g. {:?}",
                twice.len(),
                twice.first()
            );
        }
        for (addr, serving_since, stopping_at) in windows {
            let ids: HashSet<&String> = delivered[&addr].iter().collect();
            for s in sent.iter() {
                let acked_by = s.result.as_ref().unwrap();
                if s.started >= serving_since && s.ended <= stopping_at {
                    assert!(
                        acked_by.contains(&addr),
                        "{} was sent while {addr} was serving, but not to it (receipts from {acked_by:?})",
                        s.id
                    );
                }
                if acked_by.contains(&addr) {
                    assert!(
                        ids.contains(&s.id),
                        "{addr} acknowledged {} but its subscriber never got it",
                        s.id
                    );
                }
            }
        }
    }
}

async fn peer_sources(addr: SocketAddr) -> HashMap<String, String> {
    client(addr)
        .await
        .list_peers(ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .peers
        .into_iter()
        .filter(|p| !p.local)
        .map(|p| (p.address, p.source))
        .collect()
}

#[tokio::test]
async fn a_rolling_restart_behind_lagging_dns_fails_no_broadcast() {
    // Five replicas, replaced one by one (maxSurge 1, maxUnavailable 0):
    // each new one starts, becomes ready, then an old one is terminated.
    let mut cluster = Cluster::start(10, 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for step in 0..5 {
        let (old, new) = (step, 5 + step);
        cluster.launch(new);
        cluster.became_ready(new).await;
        let (new_addr, old_addr) = (cluster.hosts.addr(new), cluster.hosts.addr(old));
        let witness = cluster.hosts.addr(if step == 4 { 8 } else { 4 });
        // DNS does not list it for another 30 s, yet the others target it.
        let sources = peer_sources(witness).await;
        assert_eq!(
            sources.get(&new_addr.to_string()).map(String::as_str),
            Some("announced"),
            "{witness} targets the new replica on its announcement: {sources:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.terminate(old).await;
        // Its leave takes it out at once, although DNS lists it for 30 s.
        eventually(
            "the old replica's leave to be heard",
            Duration::from_secs(3),
            || async move { !peer_sources(witness).await.contains_key(&old_addr.to_string()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // DNS catches up meanwhile: the new replicas become DNS members, the
    // old ones drop out of the answer.
    eventually(
        "DNS to list the new replicas",
        DNS_LAG + Duration::from_secs(10),
        || {
            let witness = cluster.hosts.addr(9);
            async move {
                let sources = peer_sources(witness).await;
                sources.len() == 4 && sources.values().all(|s| s == "dns")
            }
        },
    )
    .await;
    cluster.finish_and_check().await;
}

#[tokio::test]
async fn replicas_added_together_get_every_message_sent_after_they_are_ready() {
    let mut cluster = Cluster::start(5, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Two replicas start at once: each finds the other through the
    // announcements the old ones pass on, long before DNS lists either.
    cluster.launch(3);
    cluster.launch(4);
    cluster.became_ready(3).await;
    cluster.became_ready(4).await;
    for (i, other) in [(3, 4), (4, 3)] {
        let sources = peer_sources(cluster.hosts.addr(i)).await;
        assert_eq!(
            sources
                .get(&cluster.hosts.addr(other).to_string())
                .map(String::as_str),
            Some("announced"),
            "replica {i} targets replica {other}: {sources:?}"
        );
    }
    // Load for a while, across the moment DNS catches up.
    tokio::time::sleep(DNS_LAG + Duration::from_secs(2)).await;
    cluster.finish_and_check().await;
}

#[tokio::test]
async fn announcements_are_checked_before_they_count() {
    let cluster = Cluster::start(3, 2).await;
    let addr = cluster.hosts.addr(0);
    let mut client = client(addr).await;
    let announce = |kind: Kind, address: String, incarnation: u64| AnnounceRequest {
        kind: kind as i32,
        address,
        incarnation,
    };
    // Nobody answers at the third address: a join of it is not believed.
    let status = client
        .announce(announce(Kind::Join, cluster.hosts.addr(2).to_string(), 42))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("did not answer"),
        "{}",
        status.message()
    );
    // A forged leave of a serving replica does not take it out.
    let real = client
        .announce(announce(Kind::Identify, String::new(), 0))
        .await
        .unwrap()
        .into_inner();
    assert!(real.serving);
    let mut other = common::client(cluster.hosts.addr(1)).await;
    let identity = other
        .announce(announce(Kind::Identify, String::new(), 0))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .announce(announce(
            Kind::Leave,
            identity.address.clone(),
            identity.incarnation,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("serving, not draining"),
        "{}",
        status.message()
    );
    assert!(peer_sources(addr).await.contains_key(&identity.address));
    // Malformed announcements name what is wrong.
    for (request, words) in [
        (announce(Kind::Join, "pod-3".into(), 1), "host:port"),
        (announce(Kind::Join, identity.address.clone(), 0), "incarnation 0"),
        (
            announce(Kind::Unspecified, identity.address.clone(), 1),
            "JOIN, LEAVE or IDENTIFY",
        ),
        (announce(Kind::Join, addr.to_string(), 1), "replica answering it"),
    ] {
        let status = client.announce(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(words),
            "{words:?} in {}",
            status.message()
        );
    }
    let mut cluster = cluster;
    for replica in cluster.replicas.values_mut() {
        replica.load.take().unwrap().0.cancel();
        replica.handle.take().unwrap().shutdown().await.unwrap();
    }
}
