//! Outgoing connections: plain TCP, or TLS with this replica's current
//! client configuration (re-read at every connect, so new connections use
//! rotated material). Both set TCP_NODELAY: without it small acks meet
//! Nagle and delayed ACK, a 40 ms stall per message.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{net::TcpStream, sync::watch};
use tonic::transport::{Channel, Endpoint};

/// How this process dials replicas.
#[derive(Debug, Clone, Default)]
pub enum Dialer {
    /// Plaintext h2c.
    #[default]
    Plain,
    /// TLS with the configuration current at each connect.
    Tls(watch::Receiver<Arc<ClientConfig>>),
}

impl Dialer {
    /// A dialer with one fixed TLS configuration (the CLI's).
    pub fn fixed(config: Arc<ClientConfig>) -> Self {
        let (_, rx) = watch::channel(config);
        Self::Tls(rx)
    }

    /// A channel to `endpoint` that connects on first use (and again after
    /// a connection is lost).
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        match self {
            Self::Plain => endpoint.tcp_nodelay(true).connect_lazy(),
            Self::Tls(config) => endpoint.connect_with_connector_lazy(TlsConnector(config.clone())),
        }
    }

    /// A channel to `endpoint`, connected now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match self {
            Self::Plain => endpoint.tcp_nodelay(true).connect().await,
            Self::Tls(config) => {
                endpoint
                    .connect_with_connector(TlsConnector(config.clone()))
                    .await
            }
        }
    }

    /// An endpoint for `authority` (`host:port`) to pass to
    /// [`Dialer::connect`] or [`Dialer::connect_lazy`]. Always `http://`:
    /// tonic refuses `https://` unless its own TLS is configured, and with
    /// a custom connector the TLS is ours.
    pub fn endpoint(authority: impl std::fmt::Display) -> Result<Endpoint, tonic::transport::Error> {
        Endpoint::from_shared(format!("http://{authority}"))
    }
}

/// A tower connector for tonic's channel.
#[derive(Debug, Clone)]
struct TlsConnector(watch::Receiver<Arc<ClientConfig>>);

/// Why a TLS connection could not be made; the message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("bad address {0}: it needs a host and a port")]
    Address(String),
    #[error("TCP connect to {0} failed: {1}")]
    Tcp(SocketAddr, #[source] std::io::Error),
    #[error("TLS handshake with {addr} failed: {}{}", describe(.error), hint(.error))]
    Handshake {
        addr: SocketAddr,
        // Not a source: the message already says it, in words.
        error: std::io::Error,
    },
}

/// The handshake error, with this crate's own verdicts (the identity
/// check) unwrapped from rustls's debug formatting.
fn describe(error: &std::io::Error) -> String {
    match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => error.to_string(),
    }
}

/// What a handshake error usually means, for the receipt a person reads.
fn hint(error: &std::io::Error) -> &'static str {
    let tls = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidMessage(_)) => {
            " (the peer does not speak TLS: is it a replica without --tls-cert?)"
        }
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
            " (its certificate is not from a CA in --tls-ca)"
        }
        Some(rustls::Error::AlertReceived(_)) => {
            " (the peer refused this replica's certificate: another CA, or expired?)"
        }
        Some(_) => "",
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            " (the peer closed the connection: does it speak TLS, and trust this replica's CA?)"
        }
        None => "",
    }
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = BoxFuture<'static, Result<Self::Response, ConnectError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.0.borrow().clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| ConnectError::Address(uri.to_string()))?;
            let port = uri
                .port_u16()
                .ok_or_else(|| ConnectError::Address(uri.to_string()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let addr = match host.parse() {
                Ok(ip) => SocketAddr::new(ip, port),
                Err(_) => tokio::net::lookup_host((host, port))
                    .await
                    .map_err(|e| ConnectError::Resolve(host.to_owned(), e))?
                    .next()
                    .ok_or_else(|| {
                        ConnectError::Resolve(host.to_owned(), std::io::ErrorKind::NotFound.into())
                    })?,
            };
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| ConnectError::Tcp(addr, e))?;
            let _ = tcp.set_nodelay(true);
            // The name goes out as SNI only; the verifier checks the
            // workload identity, not this name.
            let name = ServerName::try_from(host.to_owned())
                .unwrap_or_else(|_| ServerName::IpAddress(addr.ip().into()));
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|error| ConnectError::Handshake { addr, error })?;
            Ok(TokioIo::new(tls))
        })
    }
}
