//! Many replicas on one machine: loopback addresses sharing one port.
//!
//! A Deployment's pods all listen on the same port at different IPs, and DNS
//! A records carry no port. To reproduce that locally (dev-cluster, tests),
//! replicas bind 127.0.0.1, 127.0.0.2, … (Linux routes all of 127.0.0.0/8 to
//! the loopback interface) on one common port.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::TcpListener;

/// Binds `port` on every address in `ips`. With port 0, finds a port that is
/// free on all of them (retrying when another process holds it somewhere).
pub async fn bind_same_port(ips: &[IpAddr], port: u16) -> io::Result<Vec<TcpListener>> {
    let Some((first_ip, rest)) = ips.split_first() else {
        return Ok(Vec::new());
    };
    let attempts = if port == 0 { 50 } else { 1 };
    let mut last_error = None;
    'attempt: for _ in 0..attempts {
        let first = TcpListener::bind(SocketAddr::new(*first_ip, port)).await?;
        let chosen = first.local_addr()?.port();
        let mut listeners = vec![first];
        for ip in rest {
            match TcpListener::bind(SocketAddr::new(*ip, chosen)).await {
                Ok(listener) => listeners.push(listener),
                Err(e) => {
                    last_error = Some(io::Error::new(e.kind(), format!("{ip}:{chosen}: {e}")));
                    continue 'attempt;
                }
            }
        }
        return Ok(listeners);
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no common free port")))
}
