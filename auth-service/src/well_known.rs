//! OpenID discovery and the JWK Set over plain HTTP GET, on auth-service's
//! own port, for what checks storegate tokens without speaking gRPC: a
//! gateway (Envoy `jwt_authn`, Kong, Traefik, nginx), a JWT library's
//! remote key set. `/.well-known/openid-configuration` names the issuer and
//! `jwks_uri`; `/.well-known/jwks.json` is the set GetJwks returns, with an
//! `ETag` (a conditional GET is answered 304) and a `Cache-Control` shorter
//! than the time a new key is published before it signs. A request whose
//! `Host` is not a host and port is answered 400 (RFC 9112 §3.2): without
//! AUTH_PUBLIC_URL the discovery document names the `Host` it was asked for.

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
        let Ok(host) = request_host(request) else {
            return plain(StatusCode::BAD_REQUEST, "the Host header is not a host and port\n");
        };
        let Some(published) = self.published.get() else {
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the server is starting; try again\n");
        };
        match request.uri.path() {
            DISCOVERY_PATH => json(StatusCode::OK, published.discovery(host).to_string(), 300),
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
    /// `host`: the request's, checked by [`request_host`].
    fn discovery(&self, host: Option<&str>) -> serde_json::Value {
        let base = self.public_url.clone().unwrap_or_else(|| {
            let host = host.unwrap_or("localhost");
            format!("{}://{host}", if self.tls { "https" } else { "http" })
        });
        serde_json::json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{base}{JWKS_PATH}"),
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "subject_types_supported": ["public"],
            "response_types_supported": [],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "jti", "roles", "client_id", "azp"],
            "token_endpoint": format!("{base}{}", crate::token_endpoint::TOKEN_PATH),
            "grant_types_supported": [crate::token_endpoint::GRANT_TYPE],
            "token_endpoint_auth_methods_supported": crate::token_endpoint::AUTH_METHODS,
        })
    }
}

/// The host a request was sent to: its one `Host` header, else the URI's
/// authority (HTTP/2's `:authority`); `None` if it names neither. Err when
/// that is not `host[:port]` or there are several `Host` headers: it would
/// otherwise go into the discovery document's URLs as the client wrote it.
fn request_host(request: &http::request::Parts) -> Result<Option<&str>, ()> {
    let mut hosts = request.headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(host), None) => Some(host.to_str().map_err(drop)?),
        (Some(_), Some(_)) => return Err(()),
        (None, _) => request.uri.authority().map(|a| a.as_str()),
    };
    match host {
        Some(host) if !is_host_and_port(host) => Err(()),
        host => Ok(host),
    }
}

/// Whether `text` is `uri-host [":" port]` (RFC 3986 §3.2.2–3.2.3, RFC
/// 9110 §7.2): an IPv6 address in brackets, or a name of letters, digits,
/// `-._~`, sub-delims and %-escapes (IPv4 addresses and DNS names among
/// them); then, optionally, a colon and at most 5 digits. No userinfo.
fn is_host_and_port(text: &str) -> bool {
    let (host_ok, port) = match text.strip_prefix('[') {
        Some(literal) => match literal.split_once(']') {
            Some((ip, port)) => (ip.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let (name, port) = text.split_at(text.find(':').unwrap_or(text.len()));
            (is_reg_name(name.as_bytes()), port)
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// RFC 3986 `reg-name`, not empty (RFC 9110 §4.2.1).
fn is_reg_name(mut name: &[u8]) -> bool {
    if name.is_empty() {
        return false;
    }
    while let Some((&b, rest)) = name.split_first() {
        name = match rest {
            [high, low, rest @ ..] if b == b'%' && high.is_ascii_hexdigit() && low.is_ascii_hexdigit() => {
                rest
            }
            _ if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => rest,
            _ => return false,
        };
    }
    true
}

/// The key set, or 304 when the client's `If-None-Match` names it.
fn conditional(request: &http::request::Parts, jwks: &str) -> http::Response<Body> {
    let digest = sha2::Sha256::digest(jwks.as_bytes());
    let etag = format!("\"{}\"", digest[..12].iter().map(|b| format!("{b:02x}")).collect::<String>());
    let matches = request
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        // Bytes, not text: another tag may hold any byte above 0x7f
        // (RFC 9110 §8.8.3 obs-text), which must not hide ours.
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|tag| {
            // A weak comparison (RFC 9110 §13.1.2): `W/` does not matter.
            let tag = tag.trim_ascii();
            tag == b"*" || tag.strip_prefix(b"W/").unwrap_or(tag) == etag.as_bytes()
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

/// Any request head a client can send to the well-known documents, through
/// the handler the server calls: no panic, an answer of the documented
/// statuses, a `Host` in the discovery document only as a host and port,
/// and `If-None-Match` compared as RFC 9110 says.
#[cfg(test)]
mod proptests {
    use std::sync::LazyLock;

    use http_body_util::BodyExt as _;
    use proptest::prelude::*;
    use sha2::Digest as _;

    use super::*;
    use crate::{crypto::MasterKey, store::AuthStore};

    /// A runtime, and the documents of a fresh in-memory database's keys.
    struct Served {
        runtime: tokio::runtime::Runtime,
        gets: HttpGets,
        /// The key set's ETag, as a 200 gives it.
        etag: String,
    }

    static SERVED: LazyLock<Served> = LazyLock::new(|| {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (gets, etag) = runtime.block_on(async {
            let db = storegate::Db::open("sqlite::memory:").await.unwrap();
            let master_key = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
            let keys = SigningKeys::load(AuthStore::new(db), master_key).await.unwrap();
            let well_known = WellKnown::default();
            well_known.open(keys, "storegate".into(), None, false);
            let gets = well_known.http_gets();
            let (status, headers, _) = call(&gets, request("GET", JWKS_PATH, &[])).await;
            assert_eq!(status, StatusCode::OK);
            (gets, headers[header::ETAG].to_str().unwrap().to_owned())
        });
        Served { runtime, gets, etag }
    });

    fn request(method: &str, uri: &str, headers: &[(http::HeaderName, HeaderValue)]) -> http::request::Parts {
        let mut request = http::Request::builder().method(method).uri(uri).body(()).unwrap();
        for (name, value) in headers {
            request.headers_mut().append(name.clone(), value.clone());
        }
        request.into_parts().0
    }

    async fn call(gets: &HttpGets, request: http::request::Parts) -> (StatusCode, http::HeaderMap, Vec<u8>) {
        let response = gets(request).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
    }

    fn answer(request: http::request::Parts) -> (StatusCode, http::HeaderMap, Vec<u8>) {
        SERVED.runtime.block_on(call(&SERVED.gets, request))
    }

    /// Header values as a client can put them on the wire: any byte but
    /// CR, LF and NUL, most of them text.
    fn any_value() -> impl Strategy<Value = HeaderValue> {
        let text = prop_oneof![
            "[ -~]{0,40}",
            "[a-z0-9.-]{1,20}(:[0-9]{1,6})?",
            "\\[[0-9a-fA-F:.%]{0,30}\\](:[0-9]{0,6})?",
            "[a-z]{1,8}[@/?#\\\\ \"<>{}|^`%][a-z0-9./?#%]{0,10}",
        ]
        .prop_map(String::into_bytes);
        // Control bytes cannot be sent in a header: those become `x`.
        let bytes = proptest::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| {
            bytes
                .into_iter()
                .map(|b| if (b < 0x20 && b != b'\t') || b == 0x7f { b'x' } else { b })
                .collect::<Vec<u8>>()
        });
        prop_oneof![3 => text, 1 => bytes].prop_map(|bytes: Vec<u8>| HeaderValue::from_bytes(&bytes).unwrap())
    }

    fn any_path() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(DISCOVERY_PATH.to_owned()),
            Just(JWKS_PATH.to_owned()),
            Just(format!("{JWKS_PATH}?x=1")),
            "/\\.well-known/[a-zA-Z0-9._~%-]{0,30}",
            // As HTTP/2 gives it, the authority in the URI.
            concat!(
                "https?://([a-z]{1,5}@)?[a-z0-9.-]{1,12}(:[0-9]{1,6})?",
                "/\\.well-known/(openid-configuration|jwks\\.json)",
            ),
            "/[!-~]{0,40}",
        ]
        .prop_filter("not a URI", |path| http::Uri::try_from(path.as_str()).is_ok())
    }

    /// What the test takes for a host and port, written apart from the
    /// code under test: parsed back out of a URL it is the same authority,
    /// with our path and nothing after it.
    fn names_host_only(jwks_uri: &str, host: &str) -> bool {
        let Ok(uri) = http::Uri::try_from(jwks_uri) else { return false };
        uri.scheme_str() == Some("http")
            && uri.authority().is_some_and(|a| a.as_str() == host && !host.contains('@'))
            && uri.path() == JWKS_PATH
            && uri.query().is_none()
            && jwks_uri == format!("http://{host}{JWKS_PATH}")
    }

    /// One `If-None-Match` list element, and whether it names our ETag.
    fn any_entity_tag() -> impl Strategy<Value = (Vec<u8>, bool)> {
        let opaque = proptest::collection::vec(
            prop_oneof![Just(0x21u8), 0x23u8..=0x7e, 0x80u8..=0xff, Just(b',')],
            0..16,
        )
        .prop_map(|bytes| [&b"\""[..], &bytes, b"\""].concat());
        let ours = Just(SERVED.etag.as_bytes().to_vec());
        (prop_oneof![ours, opaque], any::<bool>()).prop_map(|(opaque, weak)| {
            let matches = opaque == SERVED.etag.as_bytes();
            (if weak { [&b"W/"[..], &opaque].concat() } else { opaque }, matches)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_request_head_is_answered_as_documented(
            method in prop_oneof![
                proptest::sample::select(vec!["GET", "HEAD", "POST", "OPTIONS", "DELETE"])
                    .prop_map(str::to_owned),
                "[A-Z!#$%&'*+.^_`|~-]{1,10}",
            ],
            path in any_path(),
            hosts in proptest::collection::vec(any_value(), 0..3),
            if_none_match in proptest::collection::vec(any_value(), 0..3),
            forwarded in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["x-forwarded-host", "x-forwarded-proto", "forwarded"]),
                    any_value(),
                ),
                0..3,
            ),
        ) {
            let mut headers: Vec<(http::HeaderName, HeaderValue)> =
                hosts.iter().map(|v| (header::HOST, v.clone())).collect();
            headers.extend(if_none_match.iter().map(|v| (header::IF_NONE_MATCH, v.clone())));
            let plain_request = request(&method, &path, &headers);
            headers.extend(forwarded.into_iter().map(|(name, v)| (http::HeaderName::from_static(name), v)));
            let (status, response_headers, body) = answer(request(&method, &path, &headers));

            prop_assert!(
                [StatusCode::OK, StatusCode::NOT_MODIFIED, StatusCode::NOT_FOUND, StatusCode::BAD_REQUEST]
                    .contains(&status),
                "{status}"
            );
            prop_assert!(response_headers.contains_key(header::CACHE_CONTROL));
            // X-Forwarded-* and Forwarded are not read: the same answer without them.
            let (plain_status, _, plain_body) = answer(plain_request);
            prop_assert_eq!((plain_status, &plain_body), (status, &body));

            let uri = http::Uri::try_from(path.as_str()).unwrap();
            match (status, uri.path()) {
                // Only a Host (or an absolute URI's authority) is refused.
                (StatusCode::BAD_REQUEST, _) => prop_assert!(!hosts.is_empty() || uri.authority().is_some()),
                (StatusCode::OK, DISCOVERY_PATH) => {
                    let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    let jwks_uri = document["jwks_uri"].as_str().unwrap();
                    let host = match hosts.first() {
                        Some(host) => host.to_str().unwrap(),
                        None => uri.authority().map_or("localhost", |a| a.as_str()),
                    };
                    prop_assert!(names_host_only(jwks_uri, host), "{jwks_uri} for the Host {host:?}");
                }
                (StatusCode::OK | StatusCode::NOT_MODIFIED, JWKS_PATH) => {
                    prop_assert_eq!(&response_headers[header::ETAG], SERVED.etag.as_str());
                    if status == StatusCode::NOT_MODIFIED {
                        prop_assert!(body.is_empty());
                    } else {
                        let digest = sha2::Sha256::digest(&body);
                        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                        prop_assert_eq!(format!("\"{hex}\""), SERVED.etag.as_str());
                    }
                }
                (StatusCode::NOT_FOUND, path) => prop_assert!(path != DISCOVERY_PATH && path != JWKS_PATH),
                (status, path) => prop_assert!(false, "{status} for {path}"),
            }
        }

        #[test]
        fn a_valid_host_is_named_as_it_was_sent(
            host in prop_oneof![
                "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9_-]{1,10}){0,3}",
                "(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}",
                any::<std::net::Ipv6Addr>().prop_map(|ip| format!("[{ip}]")),
            ],
            port in proptest::option::of(any::<u16>()),
        ) {
            let host = match port { Some(port) => format!("{host}:{port}"), None => host };
            let host_header = (header::HOST, HeaderValue::from_str(&host).unwrap());
            let head = request("GET", DISCOVERY_PATH, &[host_header]);
            let (status, _, body) = answer(head);
            prop_assert_eq!(status, StatusCode::OK);
            let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(document["jwks_uri"].as_str().unwrap(), format!("http://{host}{JWKS_PATH}"));
        }

        #[test]
        fn if_none_match_compares_entity_tags_weakly(
            lines in proptest::collection::vec(
                proptest::collection::vec((any_entity_tag(), "[ \t]{0,2}", "[ \t,]{0,3}"), 0..5),
                1..4,
            ),
        ) {
            let mut expected = false;
            let headers: Vec<(http::HeaderName, HeaderValue)> = lines
                .iter()
                .map(|line| {
                    let mut value = Vec::new();
                    for (i, ((tag, ours), space, separator)) in line.iter().enumerate() {
                        expected |= ours;
                        if i > 0 {
                            value.extend_from_slice(b",");
                        }
                        value.extend_from_slice(space.as_bytes());
                        value.extend_from_slice(tag);
                        value.extend_from_slice(separator.as_bytes());
                    }
                    (header::IF_NONE_MATCH, HeaderValue::from_bytes(value.trim_ascii()).unwrap())
                })
                .collect();
            let (status, response_headers, body) = answer(request("GET", JWKS_PATH, &headers));
            let expected_status = if expected { StatusCode::NOT_MODIFIED } else { StatusCode::OK };
            prop_assert_eq!(status, expected_status, "{:?}", headers);
            prop_assert_eq!(body.is_empty(), expected);
            prop_assert_eq!(&response_headers[header::ETAG], SERVED.etag.as_str());
        }
    }

    #[test]
    fn a_star_matches_any_key_set() {
        let star = [(header::IF_NONE_MATCH, HeaderValue::from_static("*"))];
        assert_eq!(answer(request("GET", JWKS_PATH, &star)).0, StatusCode::NOT_MODIFIED);
        assert_eq!(answer(request("GET", DISCOVERY_PATH, &star)).0, StatusCode::OK);
    }

    #[test]
    fn hosts_that_are_no_host_and_port_are_refused() {
        for host in
            ["a b", "evil.test/x?", "user@host", "host:80:80", "host:8o", "[::1", "[::1]x", "%zz", "", "h\"q"]
        {
            let head =
                request("GET", DISCOVERY_PATH, &[(header::HOST, HeaderValue::from_str(host).unwrap())]);
            assert_eq!(answer(head).0, StatusCode::BAD_REQUEST, "{host:?}");
        }
        let two =
            [(header::HOST, HeaderValue::from_static("a")), (header::HOST, HeaderValue::from_static("b"))];
        assert_eq!(answer(request("GET", JWKS_PATH, &two)).0, StatusCode::BAD_REQUEST);
    }
}
