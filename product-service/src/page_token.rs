//! Page tokens: where the next page of a listing starts, bound to that
//! listing. Opaque to clients (base64url of a small JSON document).
//!
//! A token carries the last row's sort value and id (keyset pagination) and
//! a fingerprint of order_by and query: presented with other parameters it
//! is refused, so it can only ever continue the listing it came from, which
//! the caller may read anyway.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use storegate::ApiError;

use crate::{domain::OrderBy, store::Cursor};

#[derive(Serialize, Deserialize)]
struct Token {
    /// Fingerprint of the listing's parameters.
    f: String,
    /// Sort value of the last row returned.
    v: String,
    /// Id of the last row returned.
    i: i64,
}

fn fingerprint(order: OrderBy, query: &str) -> String {
    let digest = Sha256::new_with_prefix(order.canonical()).chain_update([0]).chain_update(query).finalize();
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

pub fn encode(cursor: &Cursor, order: OrderBy, query: &str) -> String {
    let token = Token { f: fingerprint(order, query), v: cursor.sort_value.clone(), i: cursor.id };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap_or_default())
}

pub fn decode(token: &str, order: OrderBy, query: &str) -> Result<Cursor, ApiError> {
    let invalid = || ApiError::invalid("page_token", "is not a token from a previous ListProducts response");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let token: Token = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if token.f != fingerprint(order, query) {
        return Err(ApiError::invalid(
            "page_token",
            "belongs to a listing with another order_by or query; start again without it",
        ));
    }
    if token.i < 0 {
        return Err(invalid());
    }
    Ok(Cursor { sort_value: token.v, id: token.i })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_within_their_listing_only() {
        let order = OrderBy::parse("price desc").unwrap();
        let cursor = Cursor { sort_value: "9.99".into(), id: 42 };
        let token = encode(&cursor, order, "tea");
        assert_eq!(decode(&token, order, "tea").unwrap(), cursor);
        assert!(decode(&token, order, "coffee").is_err());
        assert!(decode(&token, OrderBy::parse("price").unwrap(), "tea").is_err());
        for garbage in ["", "x", "!!!", &URL_SAFE_NO_PAD.encode("{\"f\":1}")] {
            assert!(decode(garbage, order, "tea").is_err(), "{garbage}");
        }
    }
}
