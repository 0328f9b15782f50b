//! The JWK Set from a URL (`JWKS_URL`), by plain HTTP GET: auth-service's
//! `/.well-known/jwks.json`, or a copy a deployment serves itself. As for
//! the gRPC fetch, an `https://` URL is spoken to over verified TLS only
//! (the key set is the service's only trust anchor), never in plaintext;
//! `http://` to another machine logs a warning. The last answer's `ETag`
//! goes out as `If-None-Match`, so an unchanged set costs a 304.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use http::{StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use storegate::tls::ClientTlsFiles;
use tokio::net::TcpStream;

/// A key set larger than this is not one (a few keys are under 1 KiB).
const MOST_BYTES: usize = 256 * 1024;

/// Where the key set is fetched, and the last one with its ETag.
#[derive(Clone)]
pub struct JwksUrl {
    uri: Uri,
    /// For `https://`: the verified TLS to speak.
    tls: Option<tokio_rustls::TlsConnector>,
    last: Arc<Mutex<Option<(String, String)>>>,
}

impl JwksUrl {
    pub fn new(url: &str, files: &ClientTlsFiles) -> anyhow::Result<JwksUrl> {
        let uri: Uri = url.parse().with_context(|| format!("JWKS_URL ({url}) is not a valid URL"))?;
        let host = uri.host().unwrap_or_default();
        let tls = match uri.scheme_str() {
            Some("https") => {
                let config = storegate::tls::rustls_client_config(files).context("TLS for JWKS_URL")?;
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            Some("http") => {
                if files.ca.is_some() || files.cert.is_some() || files.key.is_some() {
                    bail!("JWKS_URL is {url}: TLS files are configured, so it must be an https:// URL");
                }
                if !storegate::tls::is_loopback(host) {
                    tracing::warn!(url, "JWKS_URL is plaintext http:// to another machine: use https://");
                }
                None
            }
            _ => bail!("JWKS_URL ({url}) must start with http:// or https://"),
        };
        if host.is_empty() {
            bail!("JWKS_URL ({url}) names no host");
        }
        Ok(JwksUrl { uri, tls, last: Arc::default() })
    }

    /// The key set's JSON: fetched, or the last one when the server says
    /// it has not changed.
    pub async fn fetch(&self) -> anyhow::Result<String> {
        let host = self.uri.host().unwrap_or_default();
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot connect to {}", self.uri))?;
        tcp.set_nodelay(true)?;
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut request = http::Request::get(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, self.uri.authority().map_or(host, |a| a.as_str()))
            .header(header::ACCEPT, "application/json");
        if let Some((etag, _)) = &last {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        let mut request = request.body(Empty::<bytes::Bytes>::new())?;
        storegate::telemetry::inject_current(request.headers_mut());
        let response = match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .with_context(|| format!("JWKS_URL host {host} is not a server name"))?;
                let stream =
                    tls.connect(name, tcp).await.with_context(|| format!("TLS to {} failed", self.uri))?;
                send(TokioIo::new(stream), request).await?
            }
            None => send(TokioIo::new(tcp), request).await?,
        };
        match response.status() {
            StatusCode::NOT_MODIFIED => match last {
                Some((_, json)) => Ok(json),
                None => bail!("{} answered 304 to a request that had no ETag", self.uri),
            },
            StatusCode::OK => {
                let etag =
                    response.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let body = Limited::new(response.into_body(), MOST_BYTES)
                    .collect()
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the key set from {}: {e}", self.uri))?
                    .to_bytes();
                let json = String::from_utf8(body.to_vec()).context("the key set is not UTF-8")?;
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = etag.map(|etag| (etag, json.clone()));
                Ok(json)
            }
            status => bail!("{} answered {status}", self.uri),
        }
    }
}

/// One HTTP/1.1 request on a connection of its own.
async fn send<IO>(
    io: IO,
    request: http::Request<Empty<bytes::Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "the JWKS_URL connection ended");
        }
    });
    Ok(sender.send_request(request).await?)
}
