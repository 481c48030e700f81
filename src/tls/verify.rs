//! The check a replica makes of the server it dials: the chain ends at a CA
//! of the bundle, and the leaf holds the workload identity. The dialled
//! name is not checked: peers are dialled by pod IP, which no certificate
//! names (and which would prove nothing if one did).

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, Error, OtherError, RootCertStore, SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::ParsedCertificate,
};

use super::identity::{CertificateFacts, WorkloadIdentity};

/// Checks a server certificate against the CA bundle and the identity.
#[derive(Debug)]
pub struct WorkloadServerVerifier {
    roots: Arc<RootCertStore>,
    identity: WorkloadIdentity,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The leaf chains to the CA but does not name the workload.
#[derive(Debug, thiserror::Error)]
#[error("the certificate holds {found}, not the workload identity {identity} (--tls-identity)")]
struct IdentityMismatch {
    identity: String,
    found: String,
}

impl WorkloadServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, identity: WorkloadIdentity, provider: &CryptoProvider) -> Self {
        Self {
            roots,
            identity,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// The chain part of the check (also run on this replica's own
    /// certificate before it is used).
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
    }
}

impl ServerCertVerifier for WorkloadServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify_chain(end_entity, intermediates, now)?;
        let facts = CertificateFacts::parse(end_entity)
            .map_err(|e| Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if !self.identity.held_by(&facts.names) {
            return Err(Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(IdentityMismatch {
                    identity: self.identity.to_string(),
                    found: facts.names.to_string(),
                }),
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
