//! The interceptor that admits only callers with a valid access token.

use std::sync::Arc;

use storegate::token::{TokenVerifier, VerifyError};
use tonic::{Request, Status, metadata::MetadataMap, service::Interceptor};

use crate::keys::JwksCache;

const INVALID_TOKEN: &str = "access token is missing, invalid or expired";

/// Verifies `authorization: Bearer <jwt>` and puts the token's
/// [`storegate::token::Claims`] into the request extensions for the handlers.
#[derive(Clone)]
pub struct JwtAuth {
    keys: JwksCache,
    verifier: Arc<TokenVerifier>,
}

impl JwtAuth {
    pub fn new(keys: JwksCache, verifier: TokenVerifier) -> Self {
        JwtAuth { keys, verifier: Arc::new(verifier) }
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme matched
/// case-insensitively, as RFC 6750 allows).
fn bearer_token(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Interceptor for JwtAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = bearer_token(request.metadata()).ok_or_else(|| Status::unauthenticated(INVALID_TOKEN))?;
        let keys = self.keys.current();
        if keys.is_empty() {
            return Err(Status::unavailable("token keys are not loaded yet; try again shortly"));
        }
        match self.verifier.verify(&keys, token) {
            Ok(claims) => {
                request.extensions_mut().insert(claims);
                Ok(request)
            }
            Err(why) => {
                if why == VerifyError::UnknownKey {
                    // Perhaps a key published since the last refresh.
                    self.keys.request_refresh();
                }
                tracing::debug!(reason = %why, "access token refused");
                Err(Status::unauthenticated(INVALID_TOKEN))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn only_a_non_empty_bearer_token_is_taken() {
        assert_eq!(bearer_token(&metadata("Bearer abc.def.ghi")), Some("abc.def.ghi"));
        assert_eq!(bearer_token(&metadata("bearer abc")), Some("abc"));
        assert_eq!(bearer_token(&metadata("Bearer ")), None);
        assert_eq!(bearer_token(&metadata("abc.def.ghi")), None);
        assert_eq!(bearer_token(&metadata("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer_token(&MetadataMap::new()), None);
    }
}
