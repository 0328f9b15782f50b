//! Certificates made at test time: a CA, server certificates for
//! localhost/127.0.0.1 and client certificates it signs, as PEM files.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate and its key, written as PEM files.
#[derive(Clone, Debug)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway certificate authority.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    /// The CA certificate as a PEM file, for clients (or servers, for mTLS)
    /// to trust.
    pub ca_file: PathBuf,
    dir: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).expect("certificate folder");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, format!("storegate test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("self-signed CA");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write CA");
        TestCa { cert, key, ca_file, dir: dir.to_owned() }
    }

    fn issue(&self, file_name: &str, names: &[&str], usage: ExtendedKeyUsagePurpose) -> PemFiles {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("storegate"));
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("a DNS name")),
            })
            .collect();
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let files = PemFiles {
            cert: self.dir.join(format!("{file_name}.crt")),
            key: self.dir.join(format!("{file_name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A server certificate for localhost and 127.0.0.1.
    pub fn server(&self, file_name: &str) -> PemFiles {
        self.issue(
            file_name,
            &["localhost", &Ipv4Addr::LOCALHOST.to_string()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A server certificate for the given host names only (e.g. another
    /// machine's, to show that a client checks the name it connects to).
    pub fn server_for(&self, file_name: &str, names: &[&str]) -> PemFiles {
        self.issue(file_name, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (for mTLS) named `name`.
    pub fn client(&self, name: &str) -> PemFiles {
        self.issue(name, &[name], ExtendedKeyUsagePurpose::ClientAuth)
    }
}
