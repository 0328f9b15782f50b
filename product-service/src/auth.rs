//! Authentication of every ProductService call: the interceptor that admits
//! only callers with a valid access token, and the layer in front of it that
//! lets a token signed by a just-published key wait for that key.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use sha2::{Digest as _, Sha256};
use storegate::token::{Claims, KeySet, TokenVerifier, bearer_token};
use tonic::{
    Request, Status,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
    service::Interceptor,
};

use crate::keys::JwksCache;

const INVALID_TOKEN: &str = "access token is missing, invalid or expired";
/// Verified tokens remembered, so that a busy client does not pay a
/// signature check per call.
const VERIFIED_CACHE_ENTRIES: usize = 10_000;
/// How long a call with an unknown kid may wait for a key refresh.
const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(2);

/// Tokens that verified, by SHA-256 of the token, until they expire: at
/// most [`VERIFIED_CACHE_ENTRIES`], the least used evicted first. Emptied
/// whenever the key set changes, so a key that is withdrawn takes its
/// tokens with it.
struct VerifiedTokens {
    /// The key set the remembered verifications were made with.
    keys: Mutex<Option<Arc<KeySet>>>,
    claims: quick_cache::sync::Cache<[u8; 32], Claims>,
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens {
            keys: Mutex::default(),
            claims: quick_cache::sync::Cache::new(VERIFIED_CACHE_ENTRIES),
        }
    }
}

impl VerifiedTokens {
    /// The key set remembered, locked. A poisoned lock only means another
    /// call panicked while holding it: the key set itself is whole.
    fn known_keys(&self) -> std::sync::MutexGuard<'_, Option<Arc<KeySet>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, keys: &Arc<KeySet>, token_hash: &[u8; 32], now: i64) -> Option<Claims> {
        // Held across the read: a call with another key set must not switch
        // the cache (and fill it with that set's verifications) in between.
        let mut known = self.known_keys();
        if !known.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            *known = Some(keys.clone());
            self.claims.clear();
            return None;
        }
        self.claims.get(token_hash).filter(|c| c.exp > now)
    }

    /// Remembers a verification made with `keys`, unless the set has
    /// changed since: a verification that raced a key withdrawal must not
    /// outlive the key (checked and inserted under the key set's lock, so
    /// that no change of set falls in between).
    fn insert(&self, keys: &Arc<KeySet>, token_hash: [u8; 32], claims: Claims) {
        let known = self.known_keys();
        if known.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            self.claims.insert(token_hash, claims);
        }
    }
}

/// Verifies `authorization: Bearer <jwt>` and puts the token's [`Claims`]
/// into the request extensions for the handlers.
#[derive(Clone)]
pub struct JwtAuth {
    keys: JwksCache,
    verifier: Arc<TokenVerifier>,
    verified: Arc<VerifiedTokens>,
}

impl JwtAuth {
    pub fn new(keys: JwksCache, verifier: TokenVerifier) -> Self {
        JwtAuth { keys, verifier: Arc::new(verifier), verified: Arc::default() }
    }

    fn authenticate(&self, token: &str) -> Result<Claims, Status> {
        let keys = self.keys.current();
        if keys.is_empty() {
            return Err(Status::unavailable("token keys are not loaded yet; try again shortly"));
        }
        let now = chrono::Utc::now().timestamp();
        let token_hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.verified.get(&keys, &token_hash, now) {
            return Ok(claims);
        }
        match self.verifier.verify(&keys, token) {
            Ok(claims) => {
                self.verified.insert(&keys, token_hash, claims.clone());
                Ok(claims)
            }
            Err(why) => {
                tracing::debug!(reason = %why, "access token refused");
                Err(Status::unauthenticated(INVALID_TOKEN))
            }
        }
    }
}

impl Interceptor for JwtAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let token = bearer_token(header).ok_or_else(|| Status::unauthenticated(INVALID_TOKEN))?;
        let claims = self.authenticate(token)?;
        request.extensions_mut().insert(claims);
        Ok(request)
    }
}

/// Sits in front of the interceptor. A token naming a kid the cache does not
/// know (a key published since the last refresh) waits, briefly, for one
/// rate-limited refresh, so that the first call after a rotation does not
/// fail. The interceptor then verifies as usual: nothing is trusted here.
#[derive(Clone)]
pub struct AwaitNewKeys<S> {
    inner: S,
    keys: JwksCache,
}

impl<S> AwaitNewKeys<S> {
    pub fn new(inner: S, keys: JwksCache) -> Self {
        AwaitNewKeys { inner, keys }
    }

    fn names_unknown_kid<B>(&self, request: &http::Request<B>) -> bool {
        let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
        bearer_token(header)
            .and_then(|token| TokenVerifier::key_id(token).ok())
            .is_some_and(|kid| !self.keys.current().contains(&kid))
    }
}

impl<S: NamedService> NamedService for AwaitNewKeys<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for AwaitNewKeys<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let wait = self.names_unknown_kid(&request);
        // Call the instance that poll_ready readied; leave a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keys = self.keys.clone();
        Box::pin(async move {
            if wait {
                keys.refresh_for_unknown_kid(UNKNOWN_KID_WAIT).await;
            }
            inner.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_empty_bearer_token_is_taken() {
        assert_eq!(bearer_token(Some("Bearer abc.def.ghi")), Some("abc.def.ghi"));
        assert_eq!(bearer_token(Some("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("Bearer ")), None);
        assert_eq!(bearer_token(Some("abc.def.ghi")), None);
        assert_eq!(bearer_token(Some("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer_token(None), None);
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "i".into(),
            sub: "1".into(),
            aud: "a".into(),
            exp,
            iat: 0,
            nbf: None,
            jti: "j".into(),
            roles: vec![],
            preferred_username: None,
            client_id: None,
            azp: None,
        }
    }

    #[test]
    fn verified_tokens_expire_and_go_with_their_key_set() {
        let (keys, other_keys) = (Arc::new(KeySet::default()), Arc::new(KeySet::default()));
        let cache = VerifiedTokens::default();
        assert_eq!(cache.get(&keys, &[1; 32], 100), None);
        cache.insert(&keys, [1; 32], claims(200));
        assert_eq!(cache.get(&keys, &[1; 32], 150), Some(claims(200)));
        assert_eq!(cache.get(&keys, &[1; 32], 200), None, "expired");
        assert_eq!(cache.get(&other_keys, &[1; 32], 150), None, "new key set");
        assert_eq!(cache.get(&other_keys, &[1; 32], 150), None);
    }

    #[test]
    fn a_verification_made_with_a_replaced_key_set_is_not_remembered() {
        let (old_keys, new_keys) = (Arc::new(KeySet::default()), Arc::new(KeySet::default()));
        let cache = VerifiedTokens::default();
        cache.get(&old_keys, &[1; 32], 100);
        // A call verified with the old set while another call switched the
        // cache to the new one (a key was withdrawn in between).
        cache.get(&new_keys, &[2; 32], 100);
        cache.insert(&old_keys, [1; 32], claims(200));
        assert_eq!(cache.get(&new_keys, &[1; 32], 150), None);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let keys = Arc::new(KeySet::default());
        let cache = VerifiedTokens::default();
        cache.get(&keys, &[0; 32], 0);
        for i in 0..(VERIFIED_CACHE_ENTRIES as u32 + 10) {
            let mut hash = [0u8; 32];
            hash[..4].copy_from_slice(&i.to_be_bytes());
            cache.insert(&keys, hash, claims(1_000));
        }
        assert!(cache.claims.len() <= VERIFIED_CACHE_ENTRIES);
        assert!(cache.claims.len() > VERIFIED_CACHE_ENTRIES / 2, "evicted one by one, not emptied");
    }
}
