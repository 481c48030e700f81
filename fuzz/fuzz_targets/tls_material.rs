//! The TLS material checks on arbitrary files, and the peer check on an
//! arbitrary certificate: whatever lands in the mounted secret, or whatever
//! a peer's chain carries, is an error that names the problem, never a panic.
#![no_main]

use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use replicast::tls::{CertificateFacts, ClientCerts, PemFiles, TlsMaterial, WorkloadIdentity, check_peer};

fuzz_target!(|data: &[u8]| {
    // Three "files" cut from the input, as PEM text would be.
    let mut parts = data.splitn(3, |b| *b == 0xff);
    let files = PemFiles {
        cert: parts.next().unwrap_or_default().to_vec(),
        key: parts.next().unwrap_or_default().to_vec(),
        ca: parts.next().unwrap_or_default().to_vec(),
    };
    let identity: WorkloadIdentity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
    if let Err(error) = TlsMaterial::build(&files, &identity, ClientCerts::Optional, SystemTime::now()) {
        assert!(error.to_string().starts_with("--tls-"), "{error}");
    }
    let _ = CertificateFacts::parse(data);
    let _ = check_peer(&identity, "Deliver", Some(data));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<WorkloadIdentity>();
    }
});
