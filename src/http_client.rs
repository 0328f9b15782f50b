//! A small HTTP/1.1 client for the few plain HTTP calls the services and
//! their clients make themselves (product-service's `JWKS_URL`, the token
//! source's token endpoint): one request per connection, `https://` over
//! verified TLS only, `http://` to another machine with a warning. hyper's
//! own client connection does the HTTP; this adds the URL rules and TLS.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use http::{Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::tls::ClientTlsFiles;

/// A URL the client may call, with the TLS to speak to it.
#[derive(Clone)]
pub struct HttpUrl {
    uri: Uri,
    /// For `https://`: the verified TLS to speak.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl HttpUrl {
    /// `url` checked (named `what` in errors and warnings): TLS settings
    /// with an `http://` URL are refused rather than ignored.
    pub fn new(url: &str, what: &str, files: &ClientTlsFiles) -> anyhow::Result<HttpUrl> {
        let uri: Uri = url.parse().with_context(|| format!("{what} ({url}) is not a valid URL"))?;
        let host = uri.host().unwrap_or_default();
        let tls = match uri.scheme_str() {
            Some("https") => {
                let config =
                    crate::tls::rustls_client_config(files).with_context(|| format!("TLS for {what}"))?;
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            Some("http") => {
                if files.ca.is_some() || files.cert.is_some() || files.key.is_some() {
                    bail!("{what} is {url}: TLS files are configured, so it must be an https:// URL");
                }
                if !crate::tls::is_loopback(host) {
                    tracing::warn!(url, "{what} is plaintext http:// to another machine: use https://");
                }
                None
            }
            _ => bail!("{what} ({url}) must start with http:// or https://"),
        };
        if host.is_empty() {
            bail!("{what} ({url}) names no host");
        }
        Ok(HttpUrl { uri, tls })
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// A request builder for this URL's path, with its `Host`.
    pub fn request(&self, method: http::Method) -> http::request::Builder {
        let host = self.uri.host().unwrap_or_default();
        http::Request::builder()
            .method(method)
            .uri(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, self.uri.authority().map_or(host, |a| a.as_str()))
    }

    /// Sends `request` on a connection of its own.
    pub async fn send<B>(
        &self,
        request: http::Request<B>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let host = self.uri.host().unwrap_or_default();
        let port = self.uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("cannot connect to {}", self.uri))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .with_context(|| format!("{host} is not a server name"))?;
                let stream =
                    tls.connect(name, tcp).await.with_context(|| format!("TLS to {} failed", self.uri))?;
                send(TokioIo::new(stream), request).await
            }
            None => send(TokioIo::new(tcp), request).await,
        }
    }
}

async fn send<IO, B>(
    io: IO,
    request: http::Request<B>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "an HTTP client connection ended");
        }
    });
    Ok(sender.send_request(request).await?)
}
