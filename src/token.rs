//! Access-token format and verification, shared by the service that signs
//! tokens (auth) and the ones that check them (product).
//!
//! Access tokens are JWTs signed with Ed25519 (`alg: EdDSA`), header
//! `typ: at+jwt` (RFC 9068) and a `kid` naming the signing key. Public keys
//! travel as an RFC 7517 JWK Set of OKP keys.

use std::collections::HashMap;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The `typ` header of an access token (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYPE: &str = "at+jwt";
pub const DEFAULT_ISSUER: &str = "storegate-auth";
pub const DEFAULT_AUDIENCE: &str = "storegate";
/// How long an access token lives.
pub const ACCESS_TOKEN_TTL_SECS: i64 = 15 * 60;
/// Clock skew tolerated on exp/nbf between the services' machines.
pub const CLOCK_LEEWAY_SECS: u64 = 60;
/// The role that may do everything: change the catalogue in every way, and
/// administer accounts.
pub const ADMIN_ROLE: &str = "admin";
/// May create products and update them, but not delete them or adjust
/// their stock (a catalogue import, a content editor).
pub const CATALOGUE_EDITOR_ROLE: &str = "catalogue-editor";
/// May only adjust stock (an order or warehouse service).
pub const STOCK_KEEPER_ROLE: &str = "stock-keeper";

/// The claims of an access token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The user id, as a decimal string; `svc:<client_id>` for a service
    /// account.
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub jti: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// The username at issue time, for display only (sub is the identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
    /// The OAuth 2.0 client the token was issued to (RFC 9068): only in a
    /// service account's tokens, whose `sub` is then `svc:<client_id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The authorized party (OpenID Connect): the same client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
}

impl Claims {
    pub fn user_id(&self) -> Option<i64> {
        self.sub.parse().ok()
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// One public key in a JWK Set: an Ed25519 key as an OKP JWK (RFC 8037).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PublicJwk {
    pub kty: String,
    pub crv: String,
    /// base64url (no padding) of the 32-byte public key.
    pub x: String,
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

impl PublicJwk {
    pub fn ed25519(kid: &str, public_key: &[u8; 32]) -> Self {
        PublicJwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(public_key),
            kid: kid.into(),
            alg: Some("EdDSA".into()),
            key_use: Some("sig".into()),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<PublicJwk>,
}

/// Public keys by kid, ready to verify signatures.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, DecodingKey>,
}

impl KeySet {
    /// Takes the usable keys of a JWK Set: Ed25519 keys of exactly 32 bytes
    /// meant for signatures. Anything else is skipped, never trusted.
    pub fn from_jwks(jwks: &Jwks) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter(|k| k.kty == "OKP" && k.crv == "Ed25519")
            .filter(|k| k.alg.as_deref().is_none_or(|a| a == "EdDSA"))
            .filter(|k| k.key_use.as_deref().is_none_or(|u| u == "sig"))
            // jsonwebtoken slices the first 32 bytes without checking the
            // length, so a short key must never reach it.
            .filter(|k| URL_SAFE_NO_PAD.decode(&k.x).is_ok_and(|x| x.len() == 32))
            .filter_map(|k| Some((k.kid.clone(), DecodingKey::from_ed_components(&k.x).ok()?)))
            .collect();
        KeySet { keys }
    }

    pub fn parse_jwks_json(json: &str) -> Result<Self, serde_json::Error> {
        Ok(Self::from_jwks(&serde_json::from_str(json)?))
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Why a token was refused. Callers answer UNAUTHENTICATED for all of them;
/// the variants only tell the log and the key-refresh logic apart.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("token is not a well-formed access token")]
    Malformed,
    #[error("token is signed with an unknown key")]
    UnknownKey,
    #[error("token signature or claims are invalid")]
    Invalid,
    #[error("token claims a longer lifetime (exp - iat) than access tokens have")]
    LifetimeTooLong,
    #[error("token claims to be issued in the future (iat beyond the clock leeway)")]
    IssuedInFuture,
}

/// Checks access tokens: EdDSA only, `typ: at+jwt`, a known `kid`, the
/// signature, and iss, aud, exp and nbf with at most a minute of leeway.
/// Header fields that point at other keys (`jku`, `jwk`, `x5u`) are ignored.
#[derive(Clone)]
pub struct TokenVerifier {
    validation: Validation,
    /// The longest `exp - iat` accepted: a token minted to live for days (a
    /// misused or stolen key) is refused even while its signature holds.
    max_lifetime_secs: i64,
}

impl TokenVerifier {
    pub fn new(issuer: &str, audience: &str) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = CLOCK_LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        TokenVerifier { validation, max_lifetime_secs: ACCESS_TOKEN_TTL_SECS }
    }

    /// Accepts tokens living up to `secs` (default: the access-token
    /// lifetime auth-service uses, 15 minutes).
    pub fn with_max_lifetime(mut self, secs: i64) -> Self {
        self.max_lifetime_secs = secs;
        self
    }

    /// The kid the token names, if it is shaped like an access token at all.
    pub fn key_id(token: &str) -> Result<String, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::Malformed);
        }
        // RFC 9068 allows the media type spelled out in full.
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(ACCESS_TOKEN_TYPE) || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok {
            return Err(VerifyError::Malformed);
        }
        header.kid.ok_or(VerifyError::Malformed)
    }

    pub fn verify(&self, keys: &KeySet, token: &str) -> Result<Claims, VerifyError> {
        let kid = Self::key_id(token)?;
        let key = keys.keys.get(&kid).ok_or(VerifyError::UnknownKey)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|_| VerifyError::Invalid)?;
        if data.claims.exp.saturating_sub(data.claims.iat) > self.max_lifetime_secs {
            return Err(VerifyError::LifetimeTooLong);
        }
        // jsonwebtoken checks nbf, not iat: a token dated ahead (a stolen
        // key used to mint tokens that are good later) would otherwise pass
        // the lifetime check with an exp far away.
        let latest_iat = jsonwebtoken::get_current_timestamp().saturating_add(CLOCK_LEEWAY_SECS);
        if u64::try_from(data.claims.iat).is_ok_and(|iat| iat > latest_iat) {
            return Err(VerifyError::IssuedInFuture);
        }
        Ok(data.claims)
    }
}

/// The token of an `authorization: Bearer <token>` header value (scheme
/// matched case-insensitively, as RFC 6750 allows).
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    // RFC 8032 §7.1 test 1 key pair, as PKCS#8 DER (private) and raw bytes (public).
    const PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g";
    const PUBLIC: [u8; 32] = [
        0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a, 0x0e,
        0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a,
    ];

    fn encoding_key() -> EncodingKey {
        use base64::engine::general_purpose::STANDARD;
        EncodingKey::from_ed_der(&STANDARD.decode(PKCS8).unwrap())
    }

    fn claims(now: i64) -> Claims {
        Claims {
            iss: DEFAULT_ISSUER.into(),
            sub: "42".into(),
            aud: DEFAULT_AUDIENCE.into(),
            exp: now + ACCESS_TOKEN_TTL_SECS,
            iat: now,
            nbf: Some(now),
            jti: "abc".into(),
            roles: vec![ADMIN_ROLE.into()],
            preferred_username: Some("alice".into()),
            client_id: None,
            azp: None,
        }
    }

    fn sign(claims: &Claims, kid: &str, typ: &str) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        header.typ = Some(typ.into());
        jsonwebtoken::encode(&header, claims, &encoding_key()).unwrap()
    }

    fn keys() -> KeySet {
        KeySet::from_jwks(&Jwks { keys: vec![PublicJwk::ed25519("k1", &PUBLIC)] })
    }

    fn now() -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn a_well_formed_token_verifies_and_yields_its_claims() {
        let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
        let c = claims(now());
        let got = verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)).unwrap();
        assert_eq!(got, c);
        assert_eq!(got.user_id(), Some(42));
        assert!(got.has_role(ADMIN_ROLE));
    }

    #[test]
    fn wrong_typ_unknown_kid_issuer_audience_and_expiry_are_refused() {
        let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
        let n = now();
        assert_eq!(verifier.verify(&keys(), &sign(&claims(n), "k1", "JWT")), Err(VerifyError::Malformed));
        assert_eq!(
            verifier.verify(&keys(), &sign(&claims(n), "k2", ACCESS_TOKEN_TYPE)),
            Err(VerifyError::UnknownKey)
        );
        let mut c = claims(n);
        c.iss = "someone-else".into();
        assert_eq!(verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)), Err(VerifyError::Invalid));
        let mut c = claims(n);
        c.aud = "other-api".into();
        assert_eq!(verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)), Err(VerifyError::Invalid));
        let mut c = claims(n - 3600);
        c.exp = n - 61;
        assert_eq!(verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)), Err(VerifyError::Invalid));
        assert_eq!(verifier.verify(&keys(), "not-a-jwt"), Err(VerifyError::Malformed));
    }

    #[test]
    fn tokens_living_longer_than_access_tokens_do_are_refused() {
        let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
        let n = now();
        let mut c = claims(n);
        c.exp = n + 30 * 24 * 3600;
        assert_eq!(
            verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)),
            Err(VerifyError::LifetimeTooLong)
        );
        // An iat far in the past stretches the lifetime too.
        let mut c = claims(n);
        c.iat = n - 3600;
        assert_eq!(
            verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)),
            Err(VerifyError::LifetimeTooLong)
        );
        // Exactly the configured lifetime passes; a shorter maximum refuses it.
        assert!(verifier.verify(&keys(), &sign(&claims(n), "k1", ACCESS_TOKEN_TYPE)).is_ok());
        let strict = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE).with_max_lifetime(600);
        assert_eq!(
            strict.verify(&keys(), &sign(&claims(n), "k1", ACCESS_TOKEN_TYPE)),
            Err(VerifyError::LifetimeTooLong)
        );
    }

    #[test]
    fn tokens_issued_or_valid_only_in_the_future_are_refused() {
        let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
        let n = now();
        // A day ahead, with an exp - iat within the lifetime.
        let mut c = claims(n + 24 * 3600);
        c.nbf = None;
        assert_eq!(
            verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)),
            Err(VerifyError::IssuedInFuture)
        );
        // nbf ahead of the leeway: refused by the claims check.
        let mut c = claims(n);
        c.nbf = Some(n + 2 * CLOCK_LEEWAY_SECS as i64);
        assert_eq!(verifier.verify(&keys(), &sign(&c, "k1", ACCESS_TOKEN_TYPE)), Err(VerifyError::Invalid));
        // Within the leeway, both pass (clocks differ a little).
        let ahead = n + CLOCK_LEEWAY_SECS as i64 / 2;
        assert!(verifier.verify(&keys(), &sign(&claims(ahead), "k1", ACCESS_TOKEN_TYPE)).is_ok());
    }

    #[test]
    fn a_tampered_payload_fails_the_signature_check() {
        let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
        let token = sign(&claims(now()), "k1", ACCESS_TOKEN_TYPE);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        payload["roles"] = serde_json::json!(["admin", "superuser"]);
        parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
        assert_eq!(verifier.verify(&keys(), &parts.join(".")), Err(VerifyError::Invalid));
    }

    #[test]
    fn jwks_with_short_or_foreign_keys_are_skipped() {
        let mut short = PublicJwk::ed25519("short", &PUBLIC);
        short.x = URL_SAFE_NO_PAD.encode([1u8; 16]);
        let mut rsa = PublicJwk::ed25519("rsa", &PUBLIC);
        rsa.kty = "RSA".into();
        let set = KeySet::from_jwks(&Jwks { keys: vec![short, rsa, PublicJwk::ed25519("ok", &PUBLIC)] });
        assert_eq!(set.len(), 1);
        assert!(set.contains("ok"));
    }
}
