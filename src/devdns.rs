//! A small authoritative DNS server on loopback, for `dev-cluster` and tests.
//!
//! It serves one zone from memory with the records a Kubernetes headless
//! Service would have: one A/AAAA record per ready replica under one name,
//! and SRV records. Replicas discover each other through it with the same
//! resolver code path they use in a cluster.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_proto::rr::{
    LowerName, Name, RData, Record, RecordSet, RecordType, RrKey,
    rdata::{A, AAAA, SOA, SRV},
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_server::{
    Server,
    store::in_memory::InMemoryZoneHandler,
    zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType},
};
use tokio::net::{TcpListener, UdpSocket};

/// TTL of served records. Replicas clear their cache before each refresh
/// anyway; this matches the 5 s Kubernetes uses for headless Services' pods.
const TTL: u32 = 5;

/// A running in-memory DNS server. Stops when dropped.
pub struct DevDns {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    server: Server<Catalog>,
}

impl std::fmt::Debug for DevDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevDns").field("addr", &self.addr).finish()
    }
}

impl DevDns {
    /// Serves `zone` (e.g. `replicast.test.`) on UDP and TCP at `ip` and a
    /// free port shared by both.
    pub async fn start(ip: IpAddr, zone: &str) -> io::Result<Self> {
        let (udp, tcp) = bind_pair(ip).await?;
        Self::serve(udp, tcp, zone).await
    }

    /// Serves `zone` at exactly `addr` (a DNS server coming back on its old
    /// address, in tests). Retries for a second: the port may still be held
    /// briefly by a closing socket.
    pub async fn start_at(addr: SocketAddr, zone: &str) -> io::Result<Self> {
        let mut attempts = 0;
        loop {
            let bound =
                async { Ok::<_, io::Error>((UdpSocket::bind(addr).await?, TcpListener::bind(addr).await?)) };
            match bound.await {
                Ok((udp, tcp)) => return Self::serve(udp, tcp, zone).await,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn serve(udp: UdpSocket, tcp: TcpListener, zone: &str) -> io::Result<Self> {
        let origin = Name::from_ascii(zone).map_err(io::Error::other)?;
        let addr = udp.local_addr()?;

        let handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let soa = SOA::new(
            Name::from_ascii("ns")
                .map_err(io::Error::other)?
                .append_domain(&origin)
                .map_err(io::Error::other)?,
            Name::from_ascii("admin")
                .map_err(io::Error::other)?
                .append_domain(&origin)
                .map_err(io::Error::other)?,
            1,
            60,
            60,
            600,
            TTL,
        );
        handler
            .upsert(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1)
            .await;
        let zone = Arc::new(handler);

        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![zone.clone() as Arc<dyn ZoneHandler>],
        );
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        Ok(Self { addr, zone, server })
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the A and AAAA records of `name` (fully qualified). An empty
    /// list removes the name, like a headless Service with no ready pods.
    pub async fn set_addresses(&self, name: &str, ips: &[IpAddr]) -> io::Result<()> {
        let name = Name::from_ascii(name).map_err(io::Error::other)?;
        let v4: Vec<RData> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(RData::A(A(*v4))),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<RData> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(RData::AAAA(AAAA(*v6))),
                IpAddr::V4(_) => None,
            })
            .collect();
        self.replace(&name, RecordType::A, v4).await;
        self.replace(&name, RecordType::AAAA, v6).await;
        Ok(())
    }

    /// Replaces the SRV records of `name` with one per `(target, port)`.
    pub async fn set_srv(&self, name: &str, targets: &[(String, u16)]) -> io::Result<()> {
        let name = Name::from_ascii(name).map_err(io::Error::other)?;
        let mut rdatas = Vec::new();
        for (target, port) in targets {
            let target = Name::from_ascii(target).map_err(io::Error::other)?;
            rdatas.push(RData::SRV(SRV::new(0, 100, *port, target)));
        }
        self.replace(&name, RecordType::SRV, rdatas).await;
        Ok(())
    }

    /// Stops serving and waits for the server tasks to end.
    pub async fn shutdown(mut self) {
        // Errors here are from connections being torn down; nothing to do.
        let _ = self.server.shutdown_gracefully().await;
    }

    async fn replace(&self, name: &Name, record_type: RecordType, rdatas: Vec<RData>) {
        let key = RrKey::new(LowerName::new(name), record_type);
        let mut records: std::collections::BTreeMap<RrKey, Arc<RecordSet>> = BTreeMap::new();
        if !rdatas.is_empty() {
            let mut set = RecordSet::with_ttl(name.clone(), record_type, TTL);
            for rdata in rdatas {
                set.add_rdata(rdata);
            }
            records.insert(key.clone(), Arc::new(set));
        }
        let mut zone = self.zone.records_mut().await;
        zone.remove(&key);
        zone.extend(records);
    }
}

/// Binds UDP and TCP on the same free port (retrying when another process
/// holds the TCP side).
async fn bind_pair(ip: IpAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let mut last_error = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no free port")))
}
