//! Access tokens for a backend service's generated stubs: a
//! [`TokenSource`] fetches a token from auth-service's token endpoint by
//! OAuth 2.0 client credentials, keeps it, and fetches the next one before
//! it expires, one fetch at a time however many calls wait. Its
//! [`TokenSource::layer`] puts the token on every call of any tonic client:
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use storegate::{pb::product::v1::product_service_client::ProductServiceClient, token_source::*};
//! let source = TokenSource::new(ClientCredentials {
//!     token_url: "http://127.0.0.1:50051/oauth2/token".into(),
//!     client_id: std::env::var("CLIENT_ID")?,
//!     client_secret: std::env::var("CLIENT_SECRET")?.into(),
//!     scope: None,
//! }, &Default::default())?;
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50052").connect().await?;
//! let mut products = ProductServiceClient::new(tower_layer::Layer::layer(&source.layer(), channel));
//! # Ok(()) }
//! ```
//!
//! (A tonic interceptor is synchronous and cannot wait for a fetch: hence
//! a tower layer.)

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use http::{HeaderValue, Method, header};
use http_body_util::{BodyExt as _, Full, Limited};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::time::Instant;
use tonic::{body::Body, codegen::Service};

use crate::{http_client::HttpUrl, tls::ClientTlsFiles};

/// A token answer larger than this is not one.
const MOST_BYTES: usize = 64 * 1024;

/// Where and as whom a [`TokenSource`] asks for tokens.
pub struct ClientCredentials {
    /// The token endpoint: auth-service's `/oauth2/token` (the discovery
    /// document's `token_endpoint`).
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretString,
    /// Roles to narrow the token to (space-separated); None for all.
    pub scope: Option<String>,
}

/// Fetches, keeps and renews one service account's access token. Cheap to
/// clone: clones share the token.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    url: HttpUrl,
    basic: HeaderValue,
    scope: Option<String>,
    /// The token and when to fetch the next. An async mutex: while one call
    /// fetches, the others wait for its token instead of fetching too.
    current: tokio::sync::Mutex<Option<Current>>,
    /// How long before a token's end the next is fetched, at least.
    margin: Duration,
    fetches: AtomicU64,
}

struct Current {
    bearer: HeaderValue,
    renew_at: Instant,
}

impl TokenSource {
    /// A source for `credentials`; nothing is fetched until a call needs it.
    pub fn new(credentials: ClientCredentials, tls: &ClientTlsFiles) -> anyhow::Result<TokenSource> {
        Self::with_margin(credentials, tls, Duration::from_secs(60))
    }

    /// As [`TokenSource::new`], fetching the next token `margin` before the
    /// current one ends (or a quarter of its life before, if that is
    /// more).
    pub fn with_margin(
        credentials: ClientCredentials,
        tls: &ClientTlsFiles,
        margin: Duration,
    ) -> anyhow::Result<TokenSource> {
        let url = HttpUrl::new(&credentials.token_url, "the token endpoint", tls)?;
        // RFC 6749 §2.3.1: each part form-urlencoded, then joined by ':'.
        let encode = |part: &str| form_urlencoded::byte_serialize(part.as_bytes()).collect::<String>();
        let pair = format!(
            "{}:{}",
            encode(&credentials.client_id),
            encode(credentials.client_secret.expose_secret())
        );
        let mut basic = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
            .context("the client id and secret make no header")?;
        basic.set_sensitive(true);
        Ok(TokenSource {
            inner: Arc::new(Inner {
                url,
                basic,
                scope: credentials.scope,
                current: tokio::sync::Mutex::new(None),
                margin,
                fetches: AtomicU64::new(0),
            }),
        })
    }

    /// The `authorization` value to send: the kept token, or a new one
    /// when it is due for renewal.
    pub async fn bearer(&self) -> anyhow::Result<HeaderValue> {
        let mut current = self.inner.current.lock().await;
        if let Some(kept) = current.as_ref()
            && Instant::now() < kept.renew_at
        {
            return Ok(kept.bearer.clone());
        }
        let fresh = self.inner.fetch().await?;
        let bearer = fresh.bearer.clone();
        *current = Some(fresh);
        Ok(bearer)
    }

    /// How many tokens were fetched so far.
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// A tower layer that sends every call with the token.
    pub fn layer(&self) -> WithTokenLayer {
        WithTokenLayer { source: self.clone() }
    }
}

impl Inner {
    async fn fetch(&self) -> anyhow::Result<Current> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if let Some(scope) = &self.scope {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let request = self
            .url
            .request(Method::POST)
            .header(header::AUTHORIZATION, self.basic.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(bytes::Bytes::from(form)))?;
        let asked = Instant::now();
        let response = self.url.send(request).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MOST_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the token answer: {e}"))?
            .to_bytes();
        let answer: serde_json::Value =
            serde_json::from_slice(&body).context("the token answer is not JSON")?;
        if !status.is_success() {
            // RFC 6749 §5.2: the error code and its description; never the
            // request's credentials.
            let error = answer["error"].as_str().unwrap_or("unknown");
            let description = answer["error_description"].as_str().unwrap_or("");
            bail!("the token endpoint refused the client credentials ({status}, {error}: {description})");
        }
        let (Some(token), Some(expires_in)) =
            (answer["access_token"].as_str(), answer["expires_in"].as_u64())
        else {
            bail!("the token answer has no access_token or expires_in");
        };
        let lifetime = Duration::from_secs(expires_in);
        let margin = self.margin.max(lifetime / 4).min(lifetime);
        let mut bearer =
            HeaderValue::from_str(&format!("Bearer {token}")).context("the token makes no header")?;
        bearer.set_sensitive(true);
        Ok(Current { bearer, renew_at: asked + (lifetime - margin) })
    }
}

/// See [`TokenSource::layer`].
#[derive(Clone)]
pub struct WithTokenLayer {
    source: TokenSource,
}

impl<S> tower_layer::Layer<S> for WithTokenLayer {
    type Service = WithToken<S>;

    fn layer(&self, inner: S) -> WithToken<S> {
        WithToken { inner, source: self.source.clone() }
    }
}

/// A tonic client's transport that sends every call with the token; a call
/// for which no token can be had is answered UNAVAILABLE without being
/// sent.
#[derive(Clone)]
pub struct WithToken<S> {
    inner: S,
    source: TokenSource,
}

impl<S> Service<http::Request<Body>> for WithToken<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone is ready only once polled; the one polled goes with
        // this call (tower's rule for services called from a future).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let source = self.source.clone();
        Box::pin(async move {
            match source.bearer().await {
                Ok(bearer) => {
                    request.headers_mut().insert(header::AUTHORIZATION, bearer);
                    inner.call(request).await
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no access token for a call");
                    Ok(tonic::Status::unavailable(format!("cannot get an access token: {e:#}")).into_http())
                }
            }
        })
    }
}
