//! The workload identity: the one name every replica of a workload holds in
//! its certificate. Peers are dialled by IP, and pod IPs come and go, so the
//! IP proves nothing; the identity does (Linkerd's and Dapr's model): a URI
//! SAN such as `spiffe://cluster.local/ns/<ns>/sa/<sa>`, or a DNS SAN such
//! as the headless Service's name.

use std::{fmt, str::FromStr, time::SystemTime};

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

/// The name a peer's certificate must hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorkloadIdentity {
    /// A URI SAN, compared exactly (`spiffe://...`).
    Uri(String),
    /// A DNS SAN, compared without regard to case.
    Dns(String),
}

impl FromStr for WorkloadIdentity {
    type Err = String;

    /// `scheme://...` is a URI SAN; anything else must be a DNS name.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((scheme, rest)) = s.split_once("://") {
            let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
            if !scheme_ok || rest.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "{s:?} is not a URI such as spiffe://cluster.local/ns/default/sa/replicast"
                ));
            }
            return Ok(Self::Uri(s.to_owned()));
        }
        rustls_pki_types::DnsName::try_from(s)
            .map(|name| Self::Dns(name.as_ref().to_ascii_lowercase()))
            .map_err(|_| {
                format!(
                    "{s:?} is neither a URI (spiffe://cluster.local/ns/<ns>/sa/<sa>) nor a DNS name \
                     (replicast-peers.<ns>.svc)"
                )
            })
    }
}

impl fmt::Display for WorkloadIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uri(uri) => write!(f, "URI:{uri}"),
            Self::Dns(name) => write!(f, "DNS:{name}"),
        }
    }
}

impl WorkloadIdentity {
    /// Whether a certificate with these names holds this identity.
    pub fn held_by(&self, names: &SubjectNames) -> bool {
        match self {
            Self::Uri(uri) => names.uris.iter().any(|u| u == uri),
            Self::Dns(name) => names.dns.iter().any(|d| d.eq_ignore_ascii_case(name)),
        }
    }
}

/// The URI and DNS subject alternative names of a certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectNames {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

impl fmt::Display for SubjectNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.uris.is_empty() && self.dns.is_empty() {
            return f.write_str("no URI or DNS names");
        }
        let names: Vec<String> = (self.uris.iter().map(|u| format!("URI:{u}")))
            .chain(self.dns.iter().map(|d| format!("DNS:{d}")))
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// What replicast reads from an end-entity certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub names: SubjectNames,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A certificate that x509-parser cannot read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("not a readable X.509 certificate: {0}")]
pub struct BadCertificate(String);

impl CertificateFacts {
    /// Reads the names and validity of a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, BadCertificate> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| BadCertificate(e.to_string()))?;
        let mut names = SubjectNames::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => names.uris.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => names.dns.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        let validity = cert.validity();
        Ok(Self {
            names,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
        })
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    let offset = std::time::Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + offset
    } else {
        SystemTime::UNIX_EPOCH - offset
    }
}

/// Why a caller of a peer RPC was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRefusal {
    #[error(
        "{rpc} is a peer RPC and mTLS is on: it needs a client certificate holding the workload identity \
         {identity}, and this connection presented none"
    )]
    NoCertificate { rpc: &'static str, identity: String },
    #[error(
        "{rpc} is a peer RPC: only replicas holding the workload identity {identity} may call it, and the \
         client certificate holds {found}"
    )]
    WrongIdentity {
        rpc: &'static str,
        identity: String,
        found: String,
    },
}

/// Checks the certificate a caller of peer RPC `rpc` presented (its chain
/// was checked against the CA in the handshake).
pub fn check_peer(
    identity: &WorkloadIdentity,
    rpc: &'static str,
    end_entity: Option<&[u8]>,
) -> Result<(), PeerRefusal> {
    let Some(der) = end_entity else {
        return Err(PeerRefusal::NoCertificate {
            rpc,
            identity: identity.to_string(),
        });
    };
    let found = match CertificateFacts::parse(der) {
        Ok(facts) if identity.held_by(&facts.names) => return Ok(()),
        Ok(facts) => facts.names.to_string(),
        Err(error) => error.to_string(),
    };
    Err(PeerRefusal::WrongIdentity {
        rpc,
        identity: identity.to_string(),
        found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_and_dns_identities_parse() {
        assert_eq!(
            "spiffe://cluster.local/ns/web/sa/replicast".parse(),
            Ok(WorkloadIdentity::Uri(
                "spiffe://cluster.local/ns/web/sa/replicast".into()
            ))
        );
        assert_eq!(
            " Replicast-Peers.web.svc ".parse(),
            Ok(WorkloadIdentity::Dns("replicast-peers.web.svc".into()))
        );
        for bad in ["", "://x", "spiffe://", "not a name", "1x://a b"] {
            assert!(bad.parse::<WorkloadIdentity>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_is_held_by_exact_uri_or_case_insensitive_dns() {
        let names = SubjectNames {
            uris: vec!["spiffe://td/ns/a/sa/b".into()],
            dns: vec!["Peers.A.svc".into()],
        };
        assert!(WorkloadIdentity::Uri("spiffe://td/ns/a/sa/b".into()).held_by(&names));
        assert!(!WorkloadIdentity::Uri("spiffe://td/ns/a/sa/c".into()).held_by(&names));
        assert!(!WorkloadIdentity::Uri("spiffe://td/ns/a/sa/b/".into()).held_by(&names));
        assert!(WorkloadIdentity::Dns("peers.a.svc".into()).held_by(&names));
        assert!(!WorkloadIdentity::Dns("spiffe://td/ns/a/sa/b".into()).held_by(&names));
        assert_eq!(names.to_string(), "URI:spiffe://td/ns/a/sa/b, DNS:Peers.A.svc");
    }

    #[test]
    fn peer_check_names_the_identity_and_what_was_found() {
        let identity = WorkloadIdentity::Uri("spiffe://td/ns/a/sa/b".into());
        let refusal = check_peer(&identity, "Deliver", None).unwrap_err();
        assert!(matches!(refusal, PeerRefusal::NoCertificate { .. }));
        assert!(
            refusal.to_string().contains("URI:spiffe://td/ns/a/sa/b"),
            "{refusal}"
        );
        let refusal = check_peer(&identity, "Deliver", Some(b"garbage")).unwrap_err();
        assert!(refusal.to_string().contains("not a readable X.509"), "{refusal}");
    }
}
