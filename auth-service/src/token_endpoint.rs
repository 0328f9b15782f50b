//! The OAuth 2.0 token endpoint: `POST /oauth2/token` on auth-service's own
//! port, the client credentials grant (RFC 6749 §4.4) for service
//! accounts. The client authenticates with its secret, in an HTTP Basic
//! `Authorization` header (`client_secret_basic`, RFC 6749 §2.3.1) or in the
//! form (`client_secret_post`); the answer is RFC 6749 §5.1 JSON, or a §5.2
//! error (400, or 401 for a client that failed to authenticate).
//!
//! Throttling: a wrong secret counts against the caller's address, in the
//! budget failed logins use (`LOGIN_FAILURES_PER_CLIENT_PER_HOUR`); beyond
//! it the address is answered 429 with `Retry-After`. Nothing is counted
//! per client id: a secret is 256 random bits that no guessing reaches, so
//! a stranger's failures never lock a service out.

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use storegate::{
    server::HttpPost,
    token::{ACCESS_TOKEN_TTL_SECS, Claims},
};
use tonic::body::Body;

use crate::{
    client::{Client, TrustedProxies},
    crypto::{random_token, token_hash},
    keys::SigningKeys,
    service_accounts::subject_of,
    store::AuthStore,
    throttle,
};

pub const TOKEN_PATH: &str = "/oauth2/token";
pub const GRANT_TYPE: &str = "client_credentials";
/// The client authentication methods the endpoint takes, as the discovery
/// document lists them.
pub const AUTH_METHODS: [&str; 2] = ["client_secret_basic", "client_secret_post"];

/// The longest client id or secret worth looking up.
const MAX_CREDENTIAL_LEN: usize = 256;

/// What the endpoint needs once start-up has opened the store and keys.
struct Issuer {
    store: AuthStore,
    keys: SigningKeys,
    issuer: String,
    audience: String,
    trusted_proxies: TrustedProxies,
    failures_per_hour: i64,
}

/// The token endpoint of one auth-service; 503 until [`Self::open`].
#[derive(Clone, Default)]
pub struct TokenEndpoint {
    issuer: Arc<OnceLock<Issuer>>,
}

/// An RFC 6749 §5.2 error: its status, code and description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OAuthError {
    pub status: StatusCode,
    pub error: &'static str,
    pub description: &'static str,
}

const fn bad_request(error: &'static str, description: &'static str) -> OAuthError {
    OAuthError { status: StatusCode::BAD_REQUEST, error, description }
}

const INVALID_CLIENT: OAuthError = OAuthError {
    status: StatusCode::UNAUTHORIZED,
    error: "invalid_client",
    description: "client authentication failed (unknown client, wrong or expired secret, or disabled account)",
};

/// A token request, decoded and checked before any lookup.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub client_id: String,
    pub client_secret: String,
    /// The roles asked for (`scope`), None for all of the account's.
    pub scope: Option<Vec<String>>,
    /// The client authenticated with a Basic header (its failure is then
    /// answered with `WWW-Authenticate`).
    pub basic: bool,
}

/// Decodes a form body (`application/x-www-form-urlencoded`): each
/// parameter at most once (RFC 6749 §3.2), names and values as sent.
fn form(body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    let mut seen = HashSet::new();
    let mut pairs = Vec::new();
    for (name, value) in form_urlencoded::parse(body) {
        if !seen.insert(name.clone()) {
            return Err(bad_request("invalid_request", "a parameter is repeated"));
        }
        pairs.push((name.into_owned(), value.into_owned()));
    }
    Ok(pairs)
}

/// The client id and secret of an HTTP Basic `Authorization` header: each
/// form-urlencoded before it was joined by `:` (RFC 6749 §2.3.1).
fn basic_credentials(value: &HeaderValue) -> Result<(String, String), OAuthError> {
    let malformed = bad_request("invalid_request", "the Authorization header is not HTTP Basic credentials");
    let text = value.to_str().map_err(|_| malformed)?;
    let (scheme, encoded) = text.split_once(' ').ok_or(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed);
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| malformed)?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed)?;
    let (id, secret) = decoded.split_once(':').ok_or(malformed)?;
    let unescape = |part: &str| -> String {
        form_urlencoded::parse(format!("x={part}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok((unescape(id), unescape(secret)))
}

/// Checks a token request's head and form, as RFC 6749 §4.4.2 and §2.3
/// ask, before anything is looked up.
pub fn decode(headers: &http::HeaderMap, body: &[u8]) -> Result<TokenRequest, OAuthError> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
    if !form_type {
        return Err(bad_request("invalid_request", "the body must be application/x-www-form-urlencoded"));
    }
    let pairs = form(body)?;
    let get = |name: &str| pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    match get("grant_type") {
        None => return Err(bad_request("invalid_request", "grant_type is missing")),
        Some(GRANT_TYPE) => {}
        Some(_) => {
            return Err(bad_request(
                "unsupported_grant_type",
                "only grant_type=client_credentials is supported",
            ));
        }
    }
    if get("client_assertion").is_some() || get("client_assertion_type").is_some() {
        return Err(bad_request(
            "invalid_request",
            "client assertions are not accepted; use a client secret",
        ));
    }
    let mut basic = headers.get_all(header::AUTHORIZATION).iter();
    let (first, second) = (basic.next(), basic.next());
    if second.is_some() {
        return Err(bad_request("invalid_request", "more than one Authorization header"));
    }
    let in_form = (get("client_id"), get("client_secret"));
    let (client_id, client_secret, basic) = match (first, in_form) {
        (Some(header), (None, None)) => {
            let (id, secret) = basic_credentials(header)?;
            (id, secret, true)
        }
        // RFC 6749 §2.3: a client uses one authentication method.
        (Some(_), _) => {
            return Err(bad_request(
                "invalid_request",
                "credentials both in the Authorization header and the form",
            ));
        }
        (None, (Some(id), Some(secret))) => (id.to_owned(), secret.to_owned(), false),
        (None, _) => return Err(INVALID_CLIENT),
    };
    if client_id.is_empty() || client_secret.is_empty() {
        return Err(INVALID_CLIENT);
    }
    let scope = match get("scope") {
        None | Some("") => None,
        Some(scope) => {
            let roles: Vec<String> = scope.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect();
            if roles.iter().any(|r| crate::admin::parse_role(r).is_err()) {
                return Err(bad_request("invalid_scope", "a scope is a space-separated list of role names"));
            }
            Some(roles)
        }
    };
    Ok(TokenRequest { client_id, client_secret, scope, basic })
}

impl TokenEndpoint {
    pub fn open(
        &self,
        store: AuthStore,
        keys: SigningKeys,
        issuer: String,
        audience: String,
        trusted_proxies: TrustedProxies,
        failures_per_hour: u32,
    ) {
        let opened = Issuer {
            store,
            keys,
            issuer,
            audience,
            trusted_proxies,
            failures_per_hour: i64::from(failures_per_hour),
        };
        if self.issuer.set(opened).is_err() {
            tracing::warn!("the token endpoint was opened twice; the first stays");
        }
    }

    /// The server's handler for `POST /oauth2/token`.
    pub fn http_post(&self) -> HttpPost {
        let this = self.clone();
        Arc::new(move |request: http::request::Parts, body: Bytes| {
            let this = this.clone();
            Box::pin(async move { Ok(this.answer(&request, &body).await) })
        })
    }

    async fn answer(&self, request: &http::request::Parts, body: &[u8]) -> http::Response<Body> {
        let Some(issuer) = self.issuer.get() else {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({
                    "error": "temporarily_unavailable",
                    "error_description": "the server is starting; try again",
                }),
            );
        };
        let client = Client::of_parts(request, &issuer.trusted_proxies);
        let outcome = match decode(&request.headers, body) {
            Ok(token_request) => {
                issuer.issue(&token_request, client).await.map_err(|e| (e, token_request.basic))
            }
            Err(e) => Err((e, false)),
        };
        match outcome {
            Ok(answer) => answer,
            Err((error, basic)) => error.into_response(basic),
        }
    }
}

impl OAuthError {
    fn into_response(self, basic: bool) -> http::Response<Body> {
        let mut response = json(
            self.status,
            &serde_json::json!({
                "error": self.error,
                "error_description": self.description,
            }),
        );
        if self.status == StatusCode::UNAUTHORIZED && basic {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"storegate\""));
        }
        response
    }
}

impl Issuer {
    /// Authenticates the client and signs its token.
    async fn issue(
        &self,
        request: &TokenRequest,
        client: Client,
    ) -> Result<http::Response<Body>, OAuthError> {
        let unavailable = OAuthError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "temporarily_unavailable",
            description: "the database cannot be reached; try again",
        };
        let now = storegate::db::now();
        let budget = throttle::login_failures_subject(client);
        if self.failures_per_hour > 0 {
            match self.store.quota_spent_until(&budget, self.failures_per_hour, now.timestamp()).await {
                Ok(None) => {}
                Ok(Some(until)) => return Ok(throttled(until - now.timestamp())),
                Err(_) => return Err(unavailable),
            }
        }
        let found = if request.client_id.len() > MAX_CREDENTIAL_LEN
            || request.client_secret.len() > MAX_CREDENTIAL_LEN
        {
            None
        } else {
            let hash = token_hash(&request.client_secret);
            self.store
                .service_account_by_secret(&request.client_id, &hash, now)
                .await
                .map_err(|_| unavailable)?
        };
        let Some(account) = found else {
            if self.failures_per_hour > 0
                && let Err(e) = self.store.admit_quota(&budget, self.failures_per_hour, now.timestamp()).await
            {
                tracing::warn!(error = %e, "cannot count a failed client authentication against its address");
            }
            tracing::info!("token request refused: client authentication failed");
            return Err(INVALID_CLIENT);
        };
        let roles = match &request.scope {
            None => account.roles.clone(),
            Some(asked) if asked.iter().all(|r| account.roles.contains(r)) => asked.clone(),
            Some(_) => {
                return Err(bad_request(
                    "invalid_scope",
                    "the scope asks for a role the account does not hold",
                ));
            }
        };
        let issued_at = now.timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: subject_of(&account.client_id),
            aud: self.audience.clone(),
            exp: issued_at + ACCESS_TOKEN_TTL_SECS,
            iat: issued_at,
            nbf: Some(issued_at),
            jti: random_token(),
            roles: roles.clone(),
            preferred_username: None,
            client_id: Some(account.client_id.clone()),
            azp: Some(account.client_id.clone()),
        };
        let access_token = self.keys.sign(&claims).await.map_err(|_| unavailable)?;
        tracing::info!(client_id = %account.client_id, "access token issued to a service account");
        let mut answer = serde_json::json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_TTL_SECS,
        });
        if request.scope.is_some() {
            answer["scope"] = serde_json::Value::String(roles.join(" "));
        }
        Ok(json(StatusCode::OK, &answer))
    }
}

/// 429 with `Retry-After`: the address spent its budget of failures.
fn throttled(retry_after_secs: i64) -> http::Response<Body> {
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        &serde_json::json!({
            "error": "slow_down",
            "error_description": "too many failed client authentications from this address; try again later",
        }),
    );
    if let Ok(value) = HeaderValue::from_str(&retry_after_secs.max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// A JSON answer that no cache keeps (RFC 6749 §5.1).
fn json(status: StatusCode, body: &serde_json::Value) -> http::Response<Body> {
    let mut response =
        http::Response::new(Body::new(http_body_util::Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = HeaderValue::from_bytes(value) {
                map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
            }
        }
        map
    }

    const FORM_TYPE: &[u8] = b"application/x-www-form-urlencoded";

    #[test]
    fn both_secret_methods_decode_to_the_same_request() {
        let basic = format!("Basic {}", STANDARD.encode("svc_a%3Ab:s%25ecret"));
        let from_header = decode(
            &headers(&[("content-type", FORM_TYPE), ("authorization", basic.as_bytes())]),
            b"grant_type=client_credentials&scope=stock-keeper",
        )
        .unwrap();
        let from_form = decode(
            &headers(&[("content-type", FORM_TYPE)]),
            b"grant_type=client_credentials&client_id=svc_a%3Ab&client_secret=s%25ecret&scope=stock-keeper",
        )
        .unwrap();
        assert_eq!(
            (from_header.client_id.as_str(), from_header.client_secret.as_str()),
            ("svc_a:b", "s%ecret")
        );
        assert_eq!(
            (from_form.client_id, from_form.client_secret, from_form.scope),
            (from_header.client_id, from_header.client_secret, from_header.scope)
        );
        assert!(from_header.basic && !from_form.basic);
    }

    fn any_pair() -> impl Strategy<Value = (String, String)> {
        let name = prop_oneof![
            Just("grant_type".to_owned()),
            Just("client_id".to_owned()),
            Just("client_secret".to_owned()),
            Just("scope".to_owned()),
            Just("client_assertion".to_owned()),
            "[a-z_%]{0,12}",
        ];
        let value = prop_oneof![Just("client_credentials".to_owned()), "[ -~]{0,24}", ".{0,8}"];
        (name, value)
    }

    proptest! {
        /// Whatever a client sends, the decoder answers: a request with
        /// credentials, or one of RFC 6749's errors with 400 or 401; a
        /// repeated parameter is never accepted.
        #[test]
        fn any_form_and_header_is_decoded_or_refused_as_the_rfc_says(
            pairs in proptest::collection::vec(any_pair(), 0..6),
            raw_tail in proptest::collection::vec(any::<u8>(), 0..16),
            content_type in prop_oneof![Just(FORM_TYPE.to_vec()), proptest::collection::vec(any::<u8>(), 0..24)],
            authorization in proptest::option::of(prop_oneof![
                "[ -~]{0,40}".prop_map(|s| s.into_bytes()),
                "[ -~]{0,30}".prop_map(|s| format!("Basic {}", STANDARD.encode(s)).into_bytes()),
            ]),
        ) {
            let mut body = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())))
                .finish()
                .into_bytes();
            body.extend_from_slice(&raw_tail);
            let mut head: Vec<(&str, &[u8])> = vec![("content-type", &content_type)];
            if let Some(value) = &authorization {
                head.push(("authorization", value));
            }
            let names: Vec<_> = form_urlencoded::parse(&body).map(|(n, _)| n.into_owned()).collect();
            let repeated = names.iter().enumerate().any(|(i, n)| names[..i].contains(n));
            match decode(&headers(&head), &body) {
                Ok(request) => {
                    prop_assert!(!repeated);
                    prop_assert!(!request.client_id.is_empty() && !request.client_secret.is_empty());
                }
                Err(error) => {
                    prop_assert!(matches!(error.status, StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED));
                    prop_assert!([
                        "invalid_request",
                        "invalid_client",
                        "unsupported_grant_type",
                        "invalid_scope",
                    ]
                    .contains(&error.error));
                    prop_assert!(!error.description.is_empty());
                }
            }
        }
    }
}
