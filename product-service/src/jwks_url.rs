//! The JWK Set from a URL (`JWKS_URL`), by plain HTTP GET: auth-service's
//! `/.well-known/jwks.json`, or a copy a deployment serves itself. As for
//! the gRPC fetch, an `https://` URL is spoken to over verified TLS only
//! (the key set is the service's only trust anchor), never in plaintext;
//! `http://` to another machine logs a warning. The last answer's `ETag`
//! goes out as `If-None-Match`, so an unchanged set costs a 304.

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use http::{Method, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use storegate::{http_client::HttpUrl, tls::ClientTlsFiles};

/// A key set larger than this is not one (a few keys are under 1 KiB).
const MOST_BYTES: usize = 256 * 1024;

/// Where the key set is fetched, and the last one with its ETag.
#[derive(Clone)]
pub struct JwksUrl {
    url: HttpUrl,
    last: Arc<Mutex<Option<(String, String)>>>,
}

impl JwksUrl {
    pub fn new(url: &str, files: &ClientTlsFiles) -> anyhow::Result<JwksUrl> {
        Ok(JwksUrl { url: HttpUrl::new(url, "JWKS_URL", files)?, last: Arc::default() })
    }

    /// The key set's JSON: fetched, or the last one when the server says
    /// it has not changed.
    pub async fn fetch(&self) -> anyhow::Result<String> {
        let uri = self.url.uri();
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut request = self.url.request(Method::GET).header(header::ACCEPT, "application/json");
        if let Some((etag, _)) = &last {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        let mut request = request.body(Empty::<bytes::Bytes>::new())?;
        storegate::telemetry::inject_current(request.headers_mut());
        let response = self.url.send(request).await?;
        match response.status() {
            StatusCode::NOT_MODIFIED => match last {
                Some((_, json)) => Ok(json),
                None => bail!("{uri} answered 304 to a request that had no ETag"),
            },
            StatusCode::OK => {
                let etag =
                    response.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
                let body = Limited::new(response.into_body(), MOST_BYTES)
                    .collect()
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the key set from {uri}: {e}"))?
                    .to_bytes();
                let json = String::from_utf8(body.to_vec()).context("the key set is not UTF-8")?;
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = etag.map(|etag| (etag, json.clone()));
                Ok(json)
            }
            status => bail!("{uri} answered {status}"),
        }
    }
}
