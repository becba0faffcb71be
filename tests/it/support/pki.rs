//! A test CA made at run time, and the certificates it signs, in a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SerialNumber,
};

/// A CA and the files it signed, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    pub fn new() -> Self {
        cipherbus::tls::install_default_provider();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "cipherbus test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// Issues a certificate for `localhost` and `127.0.0.1`; returns (cert file, key file).
    pub fn issue(
        &self,
        name: &str,
        serial: u64,
        client: bool,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        self.issue_for(&["localhost", "127.0.0.1"], name, serial, client, expired)
    }

    /// Issues a certificate valid for `hosts` only.
    pub fn issue_for(
        &self,
        hosts: &[&str],
        name: &str,
        serial: u64,
        client: bool,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let hosts = hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(hosts).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (c, k) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}
