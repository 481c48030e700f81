//! Certificates, key and CA bundle turned into rustls configurations, after
//! the checks that make a bad set fail here rather than in every handshake:
//! the key matches the certificate, the certificate is valid now, holds the
//! workload identity, and chains to the CA bundle for both server and
//! client use. Pure and synchronous: the reload task reads the files, this
//! decides.

use std::{sync::Arc, time::SystemTime};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use super::{
    identity::{CertificateFacts, WorkloadIdentity},
    verify::WorkloadServerVerifier,
};

/// ALPN: gRPC is HTTP/2 only.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// The contents of the three files, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

/// Whether clients (not peers) must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClientCerts {
    /// Clients may connect without one (tokens authenticate them); peer
    /// RPCs still need the workload identity. A certificate that is
    /// presented must chain to the CA.
    #[default]
    Optional,
    /// Every connection must present a certificate from the CA.
    Required,
}

/// A validated set, ready for new connections.
#[derive(Clone)]
pub struct TlsMaterial {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// When this replica's certificate expires.
    pub cert_not_after: SystemTime,
    /// When the CA of the bundle that expires first expires.
    pub ca_not_after: SystemTime,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert_not_after", &self.cert_not_after)
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

/// Why a set was refused. Each names the file at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaterialError {
    #[error("--tls-cert holds no PEM certificate: {0}")]
    NoCertificate(String),
    #[error("--tls-key holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {0}")]
    NoKey(String),
    #[error("--tls-ca holds no PEM certificate: {0}")]
    NoCa(String),
    #[error("--tls-ca has a certificate rustls cannot use as a trust anchor: {0}")]
    BadCa(String),
    #[error("--tls-cert: {0}")]
    Unreadable(String),
    #[error("--tls-key does not match the certificate in --tls-cert ({0})")]
    KeyMismatch(String),
    #[error("--tls-cert is not valid yet: it starts at {starts} (is the clock right?)")]
    NotYetValid { starts: String },
    #[error("--tls-cert expired at {expired}")]
    Expired { expired: String },
    #[error("--tls-cert does not hold the workload identity {identity} (--tls-identity): it holds {found}")]
    MissingIdentity { identity: String, found: String },
    #[error(
        "--tls-cert does not chain to --tls-ca for {usage}: {reason} (a replica certificate needs the server auth \
         and client auth usages, from a CA in the bundle)"
    )]
    NotFromCa { usage: &'static str, reason: String },
}

/// The crypto provider of every configuration: ring, chosen explicitly so
/// no other crate's feature can make the process-wide default ambiguous.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a CA bundle into trust anchors, and the earliest expiry among them.
pub fn trust_anchors(ca_pem: &[u8]) -> Result<(Arc<RootCertStore>, SystemTime), MaterialError> {
    let cas = certificates(ca_pem).map_err(MaterialError::NoCa)?;
    let mut roots = RootCertStore::empty();
    let mut earliest = None::<SystemTime>;
    for ca in cas {
        let facts = CertificateFacts::parse(&ca).map_err(|e| MaterialError::BadCa(e.to_string()))?;
        earliest = Some(earliest.map_or(facts.not_after, |e| e.min(facts.not_after)));
        roots.add(ca).map_err(|e| MaterialError::BadCa(e.to_string()))?;
    }
    let earliest = earliest.ok_or_else(|| MaterialError::NoCa("no CERTIFICATE section".into()))?;
    Ok((Arc::new(roots), earliest))
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE section".into());
    }
    Ok(certs)
}

impl TlsMaterial {
    /// Checks `files` for a replica holding `identity` at time `now`, and
    /// builds its server and client configurations.
    pub fn build(
        files: &PemFiles,
        identity: &WorkloadIdentity,
        client_certs: ClientCerts,
        now: SystemTime,
    ) -> Result<Self, MaterialError> {
        let provider = provider();
        let chain = certificates(&files.cert).map_err(MaterialError::NoCertificate)?;
        let key =
            PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| MaterialError::NoKey(e.to_string()))?;
        let (roots, ca_not_after) = trust_anchors(&files.ca)?;

        let facts =
            CertificateFacts::parse(&chain[0]).map_err(|e| MaterialError::Unreadable(e.to_string()))?;
        if now < facts.not_before {
            return Err(MaterialError::NotYetValid {
                starts: crate::timestamp::rfc3339_seconds(facts.not_before),
            });
        }
        if now >= facts.not_after {
            return Err(MaterialError::Expired {
                expired: crate::timestamp::rfc3339_seconds(facts.not_after),
            });
        }
        if !identity.held_by(&facts.names) {
            return Err(MaterialError::MissingIdentity {
                identity: identity.to_string(),
                found: facts.names.to_string(),
            });
        }
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(|e| MaterialError::KeyMismatch(e.to_string()))?;

        let client_verifier = {
            let builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            match client_certs {
                ClientCerts::Optional => builder.allow_unauthenticated(),
                ClientCerts::Required => builder,
            }
            .build()
            .map_err(|e| MaterialError::BadCa(e.to_string()))?
        };
        // What peers will check of this certificate, checked first here.
        let unix_now =
            UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        client_verifier
            .verify_client_cert(&chain[0], &chain[1..], unix_now)
            .map_err(|e| MaterialError::NotFromCa {
                usage: "client auth",
                reason: e.to_string(),
            })?;
        let server_verifier = WorkloadServerVerifier::new(roots.clone(), identity.clone(), &provider);
        server_verifier
            .verify_chain(&chain[0], &chain[1..], unix_now)
            .map_err(|e| MaterialError::NotFromCa {
                usage: "server auth",
                reason: e.to_string(),
            })?;

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| MaterialError::BadCa(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| MaterialError::KeyMismatch(e.to_string()))?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let client = client_config(server_verifier, &provider, Some((chain, key)))
            .map_err(|e| MaterialError::KeyMismatch(e.to_string()))?;
        Ok(Self {
            server: Arc::new(server),
            client,
            cert_not_after: facts.not_after,
            ca_not_after,
        })
    }
}

/// A client configuration that checks the server against `verifier` (the
/// CA and the workload identity, not the dialled name) and presents
/// `identity` when given.
pub fn client_config(
    verifier: WorkloadServerVerifier,
    provider: &Arc<CryptoProvider>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut client = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(client))
}

/// A client configuration for the command-line client: trusts `ca_pem`,
/// expects the server to hold `identity`, presents `cert`/`key` if given.
pub fn cli_client_config(
    ca_pem: &[u8],
    identity: &WorkloadIdentity,
    cert_and_key: Option<(&[u8], &[u8])>,
) -> Result<Arc<ClientConfig>, MaterialError> {
    let provider = provider();
    let (roots, _) = trust_anchors(ca_pem)?;
    let own = match cert_and_key {
        Some((cert, key)) => Some((
            certificates(cert).map_err(MaterialError::NoCertificate)?,
            PrivateKeyDer::from_pem_slice(key).map_err(|e| MaterialError::NoKey(e.to_string()))?,
        )),
        None => None,
    };
    client_config(
        WorkloadServerVerifier::new(roots, identity.clone(), &provider),
        &provider,
        own,
    )
    .map_err(|e| MaterialError::KeyMismatch(e.to_string()))
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
    };

    use super::*;

    fn ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn files(ca: &CertifiedIssuer<'static, KeyPair>, bundle: String, san: SanType) -> PemFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![san];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        PemFiles {
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
            ca: bundle.into_bytes(),
        }
    }

    #[test]
    fn a_dns_identity_and_a_two_ca_bundle_build_with_the_earliest_ca_expiry() {
        let (old, new) = (ca(), ca());
        let bundle = format!("{}{}", old.pem(), new.pem());
        let files = files(
            &new,
            bundle,
            SanType::DnsName("Peers.Web.svc".try_into().unwrap()),
        );
        let identity: WorkloadIdentity = "peers.web.svc".parse().unwrap();
        let material =
            TlsMaterial::build(&files, &identity, ClientCerts::Optional, SystemTime::now()).unwrap();
        assert_eq!(material.server.alpn_protocols, vec![ALPN_H2.to_vec()]);
        assert_eq!(material.client.alpn_protocols, vec![ALPN_H2.to_vec()]);
        assert!(material.cert_not_after > SystemTime::now());
    }

    #[test]
    fn each_file_is_named_when_it_is_not_pem() {
        let ca = ca();
        let identity: WorkloadIdentity = "peers.web.svc".parse().unwrap();
        let good = files(
            &ca,
            ca.pem(),
            SanType::DnsName("peers.web.svc".try_into().unwrap()),
        );
        let build =
            |files: &PemFiles| TlsMaterial::build(files, &identity, ClientCerts::Optional, SystemTime::now());
        let broken = |f: fn(&mut PemFiles)| {
            let mut files = good.clone();
            f(&mut files);
            build(&files).unwrap_err().to_string()
        };
        assert!(broken(|f| f.cert = b"nope".to_vec()).starts_with("--tls-cert holds no PEM"));
        assert!(broken(|f| f.key = b"nope".to_vec()).starts_with("--tls-key holds no PEM"));
        assert!(broken(|f| f.ca = Vec::new()).starts_with("--tls-ca holds no PEM"));
        // Checked at a time after the certificate's end.
        let later = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(420_000_000_000);
        let error = TlsMaterial::build(&good, &identity, ClientCerts::Optional, later).unwrap_err();
        assert!(matches!(error, MaterialError::Expired { .. }), "{error}");
    }
}
