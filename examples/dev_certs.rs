//! Certificates for trying mTLS locally, or in a cluster without
//! cert-manager: a CA, a replica certificate holding the workload identity,
//! and a client certificate that does not hold it.
//!
//!     cargo run --example dev_certs -- DIR [IDENTITY]
//!
//! writes, in the layout of a cert-manager secret:
//!   DIR/ca.crt                  the CA (pass as --tls-ca)
//!   DIR/tls.crt, DIR/tls.key    a replica certificate: URI SAN IDENTITY
//!                               (default spiffe://cluster.local/ns/default/sa/replicast),
//!                               DNS SAN localhost, server and client auth
//!   DIR/client.crt, client.key  a client certificate for
//!                               spiffe://cluster.local/ns/default/sa/client
//!                               (may Broadcast, is refused the peer RPCs)
//!
//! For development only: the CA key is thrown away, and nothing rotates.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

const DEFAULT_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/replicast";
const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/client";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: dev_certs DIR [IDENTITY]")?);
    let identity = args.next().unwrap_or_else(|| DEFAULT_IDENTITY.to_owned());
    std::fs::create_dir_all(&dir)?;

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "replicast dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    std::fs::write(dir.join("ca.crt"), ca.pem())?;

    for (name, uri, dns) in [
        ("tls", identity.as_str(), true),
        ("client", CLIENT_IDENTITY, false),
    ] {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        if dns {
            // So that grpcurl, which checks a host name, can be pointed at
            // it with -servername localhost.
            params
                .subject_alt_names
                .push(SanType::DnsName("localhost".try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    println!(
        "wrote {dir}/ca.crt, tls.crt, tls.key (identity {identity}), client.crt, client.key\n\
         serve with: --tls-cert {dir}/tls.crt --tls-key {dir}/tls.key --tls-ca {dir}/ca.crt --tls-identity {identity}",
        dir = dir.display()
    );
    Ok(())
}
