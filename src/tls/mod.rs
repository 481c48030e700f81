//! Mutual TLS. With it on, the one port serves clients and peers over TLS
//! only; every replica presents a certificate holding the workload identity
//! and checks the other side's against the CA bundle and that identity.
//! Peer RPCs (Deliver, DeliverStream, Announce) are served only to callers
//! whose client certificate holds it. Material rotates without a restart.
//!
//! The pieces: [`identity`] (the name and the peer check), [`material`]
//! (files to validated rustls configurations, pure), [`verify`] (the
//! server check a dialling replica makes), [`reload`] (the task keeping
//! the material current), [`acceptor`] and [`connector`] (the async shell
//! around the handshakes).

mod acceptor;
mod connector;
mod identity;
mod material;
mod reload;
mod verify;

pub use acceptor::{MAX_HANDSHAKES, TlsIncoming, spawn_acceptor};
pub use connector::{ConnectError, Dialer};
pub use identity::{CertificateFacts, PeerRefusal, SubjectNames, WorkloadIdentity, check_peer};
pub use material::{ClientCerts, MaterialError, PemFiles, TlsMaterial, cli_client_config};
pub use reload::{TlsConfigs, TlsLoadError, TlsMetrics, TlsSource, spawn_tls_reload};
pub use verify::WorkloadServerVerifier;
