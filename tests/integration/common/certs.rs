//! Certificates made by the tests (rcgen): CAs, replica certificates with
//! a workload identity, and a directory laid out as Kubernetes mounts a
//! secret (files that are symlinks through a `..data` symlink, swapped
//! atomically on update).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

pub const IDENTITY: &str = "spiffe://cluster.local/ns/test/sa/replicast";

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate (chain) and its key.
#[derive(Clone)]
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A replica certificate holding `identity` (a URI SAN), for server and
    /// client use, valid from 1975 to 4096.
    pub fn replica(&self, identity: &str) -> Leaf {
        self.leaf(|params| {
            params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
        })
    }

    /// A replica certificate holding [`IDENTITY`] that expired in 2021.
    pub fn expired(&self) -> Leaf {
        self.leaf(|params| {
            params.subject_alt_names = vec![SanType::URI(IDENTITY.try_into().unwrap())];
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    /// A certificate with the replica usages, changed by `adjust`.
    pub fn leaf(&self, adjust: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "replica");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        adjust(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A directory holding `tls.crt`, `tls.key` and `ca.crt` the way the
/// kubelet mounts a secret: each name is a symlink into `..data`, itself a
/// symlink to a timestamped directory that an update replaces atomically.
pub struct SecretDir {
    pub path: PathBuf,
    version: u32,
}

impl SecretDir {
    pub fn new(leaf: &Leaf, ca: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "replicast-tls-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        let mut dir = Self { path, version: 0 };
        dir.update(leaf, ca);
        for name in ["tls.crt", "tls.key", "ca.crt"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.path.join(name)).unwrap();
        }
        dir
    }

    /// Writes a new version and swaps `..data` to it, as the kubelet does.
    pub fn update(&mut self, leaf: &Leaf, ca: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        let dir = self.path.join(&version);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), &leaf.cert).unwrap();
        std::fs::write(dir.join("tls.key"), &leaf.key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca).unwrap();
        let staged = self.path.join("..data_tmp");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, self.path.join("..data")).unwrap();
    }

    /// The replica's TLS flags for this directory.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path.join("tls.crt").display().to_string(),
            "--tls-key".into(),
            self.path.join("tls.key").display().to_string(),
            "--tls-ca".into(),
            self.path.join("ca.crt").display().to_string(),
            "--tls-identity".into(),
            IDENTITY.into(),
        ]
    }
}

impl Drop for SecretDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
