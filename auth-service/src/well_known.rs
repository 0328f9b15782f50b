//! OpenID discovery and the JWK Set over plain HTTP GET, on auth-service's
//! own port, for what checks storegate tokens without speaking gRPC: a
//! gateway (Envoy `jwt_authn`, Kong, Traefik, nginx), a JWT library's
//! remote key set. `/.well-known/openid-configuration` names the issuer and
//! `jwks_uri`; `/.well-known/jwks.json` is the set GetJwks returns, with an
//! `ETag` (a conditional GET is answered 304) and a `Cache-Control` shorter
//! than the time a new key is published before it signs.

use std::sync::{Arc, OnceLock};

use http::{HeaderValue, StatusCode, header};
use sha2::Digest as _;
use storegate::server::HttpGets;
use tonic::body::Body;

use crate::keys::SigningKeys;

pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// How long a client may keep the key set without asking again. A new key
/// is published `--activate-after-secs` (600 by default) before it signs,
/// so a verifier that refreshes this often has it first.
const JWKS_MAX_AGE_SECS: u32 = 300;

/// What the answers are made of, once start-up has opened the keys.
struct Published {
    keys: SigningKeys,
    issuer: String,
    /// Where clients reach this service (AUTH_PUBLIC_URL), for `jwks_uri`;
    /// without it, the scheme and `Host` of each request.
    public_url: Option<String>,
    tls: bool,
}

/// The well-known documents of one auth-service; 503 until [`Self::open`].
#[derive(Clone, Default)]
pub struct WellKnown {
    published: Arc<OnceLock<Published>>,
}

impl WellKnown {
    pub fn open(&self, keys: SigningKeys, issuer: String, public_url: Option<String>, tls: bool) {
        let public_url = public_url.map(|url| url.trim_end_matches('/').to_owned());
        if self.published.set(Published { keys, issuer, public_url, tls }).is_err() {
            tracing::warn!("the well-known documents were opened twice; the first stay");
        }
    }

    /// The server's handler for GETs under `/.well-known/`.
    pub fn http_gets(&self) -> HttpGets {
        let this = self.clone();
        Arc::new(move |request: http::request::Parts| {
            let this = this.clone();
            Box::pin(async move { Ok(this.answer(&request).await) })
        })
    }

    async fn answer(&self, request: &http::request::Parts) -> http::Response<Body> {
        let Some(published) = self.published.get() else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the server is starting; try again\n");
        };
        match request.uri.path() {
            DISCOVERY_PATH => json(StatusCode::OK, published.discovery(request).to_string(), 300),
            JWKS_PATH => match published.keys.jwks_json().await {
                Ok(jwks) => conditional(request, &jwks),
                Err(_) => plain(StatusCode::SERVICE_UNAVAILABLE, "the key set cannot be read; try again\n"),
            },
            _ => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl Published {
    /// The discovery document: what a JWT-validating client reads. storegate
    /// issues access tokens through its gRPC login, not through OAuth
    /// endpoints, so none are named.
    fn discovery(&self, request: &http::request::Parts) -> serde_json::Value {
        let base = self.public_url.clone().unwrap_or_else(|| {
            let host = request
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| request.uri.authority().map(|a| a.as_str()))
                .unwrap_or("localhost");
            format!("{}://{host}", if self.tls { "https" } else { "http" })
        });
        serde_json::json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{base}{JWKS_PATH}"),
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "token_endpoint_auth_signing_alg_values_supported": ["EdDSA"],
            "subject_types_supported": ["public"],
            "response_types_supported": [],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti", "roles"],
        })
    }
}

/// The key set, or 304 when the client's `If-None-Match` names it.
fn conditional(request: &http::request::Parts, jwks: &str) -> http::Response<Body> {
    let digest = sha2::Sha256::digest(jwks.as_bytes());
    let etag = format!("\"{}\"", digest[..12].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let matches = request
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        });
    let mut response = if matches {
        let mut response = http::Response::new(Body::empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        json(StatusCode::OK, jwks.to_owned(), JWKS_MAX_AGE_SECS)
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex in quotes is a header value"));
    headers.insert(header::CACHE_CONTROL, cache_control(JWKS_MAX_AGE_SECS));
    response
}

fn cache_control(max_age: u32) -> HeaderValue {
    HeaderValue::from_str(&format!("public, max-age={max_age}")).expect("a valid header value")
}

fn json(status: StatusCode, body: String, max_age: u32) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(bytes::Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, cache_control(max_age));
    response
}

fn plain(status: StatusCode, body: &'static str) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(http_body_util::Full::new(bytes::Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
