//! Page tokens: where the next page of a listing starts, bound to that
//! listing. Opaque to clients (base64url of a small JSON document).
//!
//! A token carries the last row's sort value and id (keyset pagination) and
//! a fingerprint of order_by and query: presented with other parameters it
//! is refused, so it can only ever continue the listing it came from, which
//! the caller may read anyway. It is decoded once, here, into a [`Cursor`]
//! of its order's kind; the store never parses a token's text.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use storegate::{ApiError, pb::product::v1::Product};

use crate::domain::{OrderBy, Price, SortField};

/// Where a page starts: after this row of its listing's order.
#[derive(Debug, Clone, PartialEq)]
pub enum Cursor {
    /// After the product with this id, in id order.
    Id(i64),
    Name {
        name: String,
        id: i64,
    },
    Price {
        price: Price,
        id: i64,
    },
    CreateTime {
        time: DateTime<Utc>,
        id: i64,
    },
    /// After a match of a search's ranking, best first.
    Ranked(Ranked),
}

/// Where a relevance listing stands; each way of answering a search ranks
/// its own, and its next page must be ranked the same way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ranked {
    /// After the match of this relevance and id, as the full-text engine
    /// scored it.
    Engine { score: f64, id: i64 },
    /// After this match of an anchored search's BM25 ranking
    /// (`store::anchored`), anchored on word `term` of the query.
    Anchored { term: usize, score: f64, id: i64 },
    /// In this window of a broad search (`store::broad`), after this match
    /// of its ranking, or at its start.
    Broad { window: Window, after: Option<(f64, i64)> },
}

/// Products of a broad search's relevance listing ranked together: those
/// with ids below `below` down to `down_to` (`store::broad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Its products' ids are below this; `None`: the newest.
    pub below: Option<i64>,
    /// And at least this; `None`: not read yet (it ends where its bounds
    /// say). 0 for a window that reached the first product.
    pub down_to: Option<i64>,
}

/// How a token's sort value begins when an anchored search ranked it.
const ANCHORED: &str = "anchored ";
/// How a token's sort value begins when a broad search ranked it.
const BROAD: &str = "broad ";

impl Cursor {
    /// The cursor that continues after `row` in `order`, a column's order.
    pub fn after(row: &Product, order: OrderBy) -> Result<Cursor, ApiError> {
        let id = row.id;
        Ok(match order.field {
            SortField::Id => Cursor::Id(id),
            SortField::Name => Cursor::Name { name: row.name.clone(), id },
            SortField::Price => Cursor::Price {
                price: Price::parse(&row.price)
                    .map_err(|_| anyhow::anyhow!("a stored price that does not parse"))?,
                id,
            },
            SortField::CreateTime => {
                let time = row
                    .create_time
                    .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
                    .ok_or_else(|| anyhow::anyhow!("a product without a valid create_time"))?;
                Cursor::CreateTime { time, id }
            }
            SortField::Relevance => return Err(ApiError::invalid("order_by", "relevance needs a query")),
        })
    }

    /// The cursor that continues a relevance listing of the full-text
    /// engine after `row`, whose relevance was `score`.
    pub fn after_match(row: &Product, score: f64) -> Cursor {
        Cursor::Ranked(Ranked::Engine { score, id: row.id })
    }

    /// As a token carries it: a sort value and an id. A score travels as
    /// Rust's shortest text that parses back to the same f64, so the next
    /// page's comparison with the engine's own value is exact.
    fn to_parts(&self) -> (String, i64) {
        match self {
            Cursor::Id(id) => (String::new(), *id),
            Cursor::Name { name, id } => (name.clone(), *id),
            Cursor::Price { price, id } => (price.to_string(), *id),
            Cursor::CreateTime { time, id } => {
                (format!("{}.{:09}", time.timestamp(), time.timestamp_subsec_nanos()), *id)
            }
            Cursor::Ranked(Ranked::Engine { score, id }) => (score.to_string(), *id),
            Cursor::Ranked(Ranked::Anchored { term, score, id }) => {
                (format!("{ANCHORED}{term} {score}"), *id)
            }
            // `broad w{below}-{down_to} {score}` after a match,
            // `broad w{below}` at a window not read yet.
            Cursor::Ranked(Ranked::Broad { window, after }) => {
                let below = window.below.map(|id| id.to_string()).unwrap_or_default();
                match (window.down_to, after) {
                    (Some(down_to), Some((score, id))) => (format!("{BROAD}w{below}-{down_to} {score}"), *id),
                    _ => (format!("{BROAD}w{below}"), 0),
                }
            }
        }
    }

    /// The cursor of `order` a token's sort value and id say, if they are
    /// one.
    fn parse(order: OrderBy, value: &str, id: i64) -> Option<Cursor> {
        if id < 0 {
            return None;
        }
        Some(match order.field {
            SortField::Id => Cursor::Id(id),
            SortField::Name => Cursor::Name { name: value.to_owned(), id },
            SortField::Price => Cursor::Price { price: Price::parse(value).ok()?, id },
            SortField::CreateTime => Cursor::CreateTime { time: parse_time(value)?, id },
            SortField::Relevance => Cursor::Ranked(Ranked::parse(value, id)?),
        })
    }
}

impl Ranked {
    fn parse(value: &str, id: i64) -> Option<Ranked> {
        let score = |text: &str| text.parse::<f64>().ok().filter(|score| score.is_finite());
        if let Some(rest) = value.strip_prefix(ANCHORED) {
            let (term, score_text) = rest.split_once(' ')?;
            return Some(Ranked::Anchored { term: term.parse().ok()?, score: score(score_text)?, id });
        }
        let Some(rest) = value.strip_prefix(BROAD) else {
            return Some(Ranked::Engine { score: score(value)?, id });
        };
        // Tokens of the build before windows, `broad {score}`, go on in the
        // newest window.
        let Some(window) = rest.strip_prefix('w') else {
            let after = Some((score(rest)?, id));
            return Some(Ranked::Broad { window: Window { below: None, down_to: None }, after });
        };
        let window_id = |text: &str| text.parse::<i64>().ok().filter(|id| *id >= 0);
        Some(match window.split_once(' ') {
            None => Ranked::Broad {
                window: Window { below: Some(window_id(window)?), down_to: None },
                after: None,
            },
            Some((bounds, score_text)) => {
                let (below, down_to) = bounds.split_once('-')?;
                let window = Window { below: Some(window_id(below)?), down_to: Some(window_id(down_to)?) };
                Ranked::Broad { window, after: Some((score(score_text)?, id)) }
            }
        })
    }
}

/// A create_time as a token carries it: `seconds.nanoseconds`, within what
/// both backends store (years 1970 to 9999).
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let (seconds, nanos) = text.split_once('.')?;
    let (seconds, nanos): (i64, u32) = (seconds.parse().ok()?, nanos.parse().ok()?);
    if !(0..=253_402_300_799).contains(&seconds) || nanos >= 1_000_000_000 {
        return None;
    }
    DateTime::from_timestamp(seconds, nanos)
}

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
    let (v, i) = cursor.to_parts();
    let token = Token { f: fingerprint(order, query), v, i };
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
    Cursor::parse(order, &token.v, token.i).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(text: &str) -> OrderBy {
        OrderBy::parse(text).unwrap()
    }

    #[test]
    fn tokens_round_trip_within_their_listing_only() {
        let price_desc = order("price desc");
        let cursor = Cursor::Price { price: Price::parse("9.99").unwrap(), id: 42 };
        let token = encode(&cursor, price_desc, "tea");
        assert_eq!(decode(&token, price_desc, "tea").unwrap(), cursor);
        assert!(decode(&token, price_desc, "coffee").is_err());
        assert!(decode(&token, order("price"), "tea").is_err());
        for garbage in ["", "x", "!!!", &URL_SAFE_NO_PAD.encode("{\"f\":1}")] {
            assert!(decode(garbage, price_desc, "tea").is_err(), "{garbage}");
        }
    }

    #[test]
    fn every_kind_of_cursor_round_trips() {
        let time = DateTime::from_timestamp(1_780_000_000, 123_456_789).unwrap();
        let window = Window { below: Some(1_000_001), down_to: Some(998_760) };
        for (order_by, cursor) in [
            ("id desc", Cursor::Id(7)),
            ("name", Cursor::Name { name: "Crème – teapot".into(), id: 8 }),
            ("price", Cursor::Price { price: Price::parse("0.5").unwrap(), id: 9 }),
            ("create_time desc", Cursor::CreateTime { time, id: 10 }),
            ("relevance", Cursor::Ranked(Ranked::Engine { score: 0.1 + 0.2, id: 11 })),
            ("relevance", Cursor::Ranked(Ranked::Anchored { term: 2, score: 3.25, id: 12 })),
            ("relevance", Cursor::Ranked(Ranked::Broad { window, after: Some((1.5, 999_003)) })),
            (
                "relevance",
                Cursor::Ranked(Ranked::Broad {
                    window: Window { below: Some(998_760), down_to: None },
                    after: None,
                }),
            ),
        ] {
            let token = encode(&cursor, order(order_by), "q");
            assert_eq!(decode(&token, order(order_by), "q").unwrap(), cursor, "{order_by}");
        }
    }

    #[test]
    fn sort_values_that_are_no_cursor_of_their_order_are_refused() {
        let parse = |order_by: &str, value: &str| Cursor::parse(order(order_by), value, 1);
        for (order_by, value) in [
            ("price", "9.999"),
            ("price", "-1"),
            ("create_time", "12"),
            ("create_time", "99999999999999.0"),
            ("relevance", "NaN"),
            ("relevance", "anchored x"),
            ("relevance", "anchored 1.5"),
            ("relevance", "anchored -1 1.5"),
            ("relevance", "broad w"),
            ("relevance", "broad wx"),
            ("relevance", "broad w5-"),
            ("relevance", "broad w5-3 NaN"),
            ("relevance", "broad w-5"),
            ("relevance", "broad w5-3"),
        ] {
            assert_eq!(parse(order_by, value), None, "{order_by}: {value}");
        }
        assert_eq!(Cursor::parse(order("id"), "", -1), None);
        // A token of the build before windows goes on in the newest window.
        assert_eq!(
            parse("relevance", "broad 1.5"),
            Some(Cursor::Ranked(Ranked::Broad {
                window: Window { below: None, down_to: None },
                after: Some((1.5, 1))
            }))
        );
    }
}
