//! TLS for both sides of a call. Servers: a rustls configuration whose
//! certificate and key are re-read when their files change (no restart to
//! renew), optionally requiring client certificates from a CA (mTLS).
//! Clients: an [`Endpoint`] for a URL that speaks TLS to `https://` (against
//! the system roots or a configured CA) and never falls back to plaintext.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// ring: the one provider compiled in (no aws-lc, no C toolchain beyond
/// ring's own), used explicitly so that no process-wide default is needed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where a server's certificate, key and (for mTLS) client CA are.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The files' modification times and sizes: a change to either means a
/// renewed certificate to load.
type Stamp = Option<(SystemTime, u64, SystemTime, u64)>;

fn stamp(files: &ServerTlsFiles) -> Stamp {
    let meta = |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    let (cert, key) = (meta(&files.cert)?, meta(&files.key)?);
    Some((cert.0, cert.1, key.0, key.1))
}

/// The certificate chain and key from PEM files, checked to belong together.
fn load_certified_key(files: &ServerTlsFiles) -> anyhow::Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from TLS_CERT_FILE {}", files.cert.display()))?;
    if chain.is_empty() {
        bail!("TLS_CERT_FILE {} holds no certificate", files.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("cannot read a private key from TLS_KEY_FILE {}", files.key.display()))?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("TLS_KEY_FILE {} is not a usable private key", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().context("TLS_KEY_FILE does not belong to the certificate in TLS_CERT_FILE")?;
    Ok(certified)
}

/// The server's certificate for every handshake: the one loaded last.
#[derive(Debug)]
struct ReloadingResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A server's TLS: the rustls configuration handshakes use, and what keeps
/// its certificate current.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    resolver: Arc<ReloadingResolver>,
    files: ServerTlsFiles,
}

impl ServerTls {
    /// Loads the certificate, key and client CA; any problem is a start-up
    /// error naming the file.
    pub fn load(files: ServerTlsFiles) -> anyhow::Result<ServerTls> {
        let resolver =
            Arc::new(ReloadingResolver { current: RwLock::new(Arc::new(load_certified_key(&files)?)) });
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("the TLS provider supports no protocol version")?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .with_context(|| format!("cannot read TLS_CLIENT_CA_FILE {}", ca.display()))?
                {
                    let cert =
                        cert.with_context(|| format!("TLS_CLIENT_CA_FILE {} is not PEM", ca.display()))?;
                    roots
                        .add(cert)
                        .with_context(|| format!("TLS_CLIENT_CA_FILE {}: a bad certificate", ca.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .with_context(|| format!("TLS_CLIENT_CA_FILE {} holds no usable CA", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        // gRPC needs HTTP/2; gRPC-Web from browsers and proxies comes as HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(ServerTls { config: Arc::new(config), resolver, files })
    }

    /// Re-reads the certificate and key whenever their files change, every
    /// `interval`, until aborted. A file that does not load (half written,
    /// a key that does not match) keeps the current certificate and logs a
    /// warning; the next change is tried again.
    pub async fn keep_current(self, interval: Duration) {
        let mut seen = stamp(&self.files);
        loop {
            tokio::time::sleep(interval).await;
            let now = stamp(&self.files);
            if now == seen {
                continue;
            }
            seen = now;
            let files = self.files.clone();
            match tokio::task::spawn_blocking(move || load_certified_key(&files)).await {
                Ok(Ok(key)) => {
                    *self.resolver.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Ok(Err(e)) => tracing::warn!(
                    error = format!("{e:#}"),
                    "the changed TLS certificate or key does not load; keeping the current one"
                ),
                Err(e) => tracing::warn!(error = %e, "reloading the TLS certificate failed"),
            }
        }
    }
}

/// How a client reaches a server: the CA that signs the server's certificate
/// (None: the system roots) and, for mTLS, its own certificate and key.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A rustls client configuration for `files`: the server verified against
/// `files.ca` or, without one, the system roots; the client's certificate
/// for mTLS when both its files are given. For clients that speak TLS
/// themselves rather than through tonic (product-service's JWKS_URL).
pub fn rustls_client_config(files: &ClientTlsFiles) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read the CA file {}", ca.display()))?
            {
                let cert = cert.with_context(|| format!("the CA file {} is not PEM", ca.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("the CA file {}: a bad certificate", ca.display()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        bail!("no CA certificate to verify servers with");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no protocol version")?
        .with_root_certificates(roots);
    Ok(match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read the client certificate {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("cannot read the client key {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("the client certificate and key do not go together")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("a client certificate needs both its certificate and its key file"),
    })
}

/// Whether `host` is this machine, where plaintext never crosses a network.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An endpoint for `url` (named `what` in errors, e.g. "AUTH_SERVICE_URL"):
/// TLS for `https://`, verified against `files.ca` or the system roots;
/// plaintext only for `http://`, with a warning when the host is not this
/// machine. TLS settings with an `http://` URL are refused rather than
/// ignored: whoever set them expects the connection to be protected.
pub fn client_endpoint(url: &str, what: &str, files: &ClientTlsFiles) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{what} ({url}) is not a valid URL"))?;
    let uri = endpoint.uri();
    let host = uri.host().unwrap_or_default().to_owned();
    match uri.scheme_str() {
        Some("https") => {
            let mut tls = ClientTlsConfig::new();
            tls = match &files.ca {
                Some(ca) => {
                    let pem = std::fs::read(ca)
                        .with_context(|| format!("cannot read the CA file {}", ca.display()))?;
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            match (&files.cert, &files.key) {
                (Some(cert), Some(key)) => {
                    let cert = std::fs::read(cert)
                        .with_context(|| format!("cannot read the client certificate {}", cert.display()))?;
                    let key = std::fs::read(key)
                        .with_context(|| format!("cannot read the client key {}", key.display()))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => bail!("a client certificate needs both its certificate and its key file"),
            }
            endpoint.tls_config(tls).with_context(|| format!("cannot set up TLS for {what} ({url})"))
        }
        Some("http") => {
            if files.ca.is_some() || files.cert.is_some() || files.key.is_some() {
                bail!("{what} is {url}: TLS files are configured, so it must be an https:// URL");
            }
            if !is_loopback(&host) {
                tracing::warn!(url, "{what} is plaintext http:// to another machine: use https://");
            }
            Ok(endpoint)
        }
        _ => bail!("{what} ({url}) must start with http:// or https://"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "127.3.4.5", "[::1]", "::1", "LOCALHOST"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "localhost.example.com", ""] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn tls_files_with_a_plaintext_url_are_refused() {
        let files = ClientTlsFiles { ca: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        let err = client_endpoint("http://10.1.2.3:50051", "AUTH_SERVICE_URL", &files).unwrap_err();
        assert!(format!("{err:#}").contains("https://"), "{err:#}");
    }

    /// What `client_endpoint` logs for `url` (it only builds the endpoint:
    /// nothing is sent anywhere).
    fn warnings_for(url: &str) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            client_endpoint(url, "AUTH_SERVICE_URL", &ClientTlsFiles::default()).unwrap();
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn plaintext_to_another_machine_is_warned_of() {
        let warned = warnings_for("http://auth.example.invalid:50051");
        assert!(
            warned.contains("WARN") && warned.contains("plaintext http:// to another machine"),
            "{warned}"
        );
        for local in ["http://127.0.0.1:50051", "http://localhost:50051", "http://[::1]:50051"] {
            assert_eq!(warnings_for(local), "", "{local}");
        }
        assert_eq!(warnings_for("https://auth.example.invalid:50051"), "");
    }

    #[test]
    fn other_schemes_are_refused() {
        let err = client_endpoint("ftp://x", "AUTH_SERVICE_URL", &ClientTlsFiles::default()).unwrap_err();
        assert!(format!("{err:#}").contains("http:// or https://"), "{err:#}");
    }
}
