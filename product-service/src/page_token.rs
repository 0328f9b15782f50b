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

/// What a client can do with a `page_token`: send anything at all, or edit
/// a token it was given. Tokens are not signed (a client may only continue
/// a listing it could read anyway): what holds is that nothing panics, the
/// service's own tokens come back as they went out, and whatever an edited
/// token decodes to is a cursor the service could have issued.
#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    const ORDERS: [&str; 10] = [
        "id",
        "id desc",
        "name",
        "name desc",
        "price",
        "price desc",
        "create_time",
        "create_time desc",
        "relevance",
        "",
    ];

    fn any_order() -> impl Strategy<Value = OrderBy> {
        proptest::sample::select(ORDERS.to_vec()).prop_map(|text| OrderBy::parse(text).unwrap())
    }

    /// Product ids as the tables hand them out.
    fn any_id() -> impl Strategy<Value = i64> {
        prop_oneof![1..1_000i64, 0..=i64::MAX]
    }

    /// A relevance as the engines and the Rust ranking produce it: finite.
    fn any_score() -> impl Strategy<Value = f64> {
        prop_oneof![-1e3..1e3f64, {
            use proptest::num::f64::*;
            POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
        },]
    }

    /// The cursors the service issues for a listing in `order`.
    fn issued_cursor(order: OrderBy) -> BoxedStrategy<Cursor> {
        match order.field {
            SortField::Id => any_id().prop_map(Cursor::Id).boxed(),
            SortField::Name => {
                (".{0,200}", any_id()).prop_map(|(name, id)| Cursor::Name { name, id }).boxed()
            }
            SortField::Price => (0..1_000_000_000_000i64, any_id())
                .prop_map(|(cents, id)| {
                    let price = Price::parse(&format!("{}.{:02}", cents / 100, cents % 100)).unwrap();
                    Cursor::Price { price, id }
                })
                .boxed(),
            SortField::CreateTime => (0..=253_402_300_799i64, 0..1_000_000_000u32, any_id())
                .prop_map(|(seconds, nanos, id)| Cursor::CreateTime {
                    time: DateTime::from_timestamp(seconds, nanos).unwrap(),
                    id,
                })
                .boxed(),
            SortField::Relevance => {
                let window_id = 0..=i64::MAX;
                prop_oneof![
                    (any_score(), any_id()).prop_map(|(score, id)| Ranked::Engine { score, id }),
                    (any::<usize>(), any_score(), any_id()).prop_map(|(term, score, id)| Ranked::Anchored {
                        term,
                        score,
                        id
                    }),
                    // A match inside a window that has been read…
                    (window_id.clone(), window_id.clone(), any_score(), any_id()).prop_map(
                        |(below, down_to, score, id)| Ranked::Broad {
                            window: Window { below: Some(below), down_to: Some(down_to) },
                            after: Some((score, id)),
                        }
                    ),
                    // …or the start of one not read yet.
                    window_id.prop_map(|below| Ranked::Broad {
                        window: Window { below: Some(below), down_to: None },
                        after: None,
                    }),
                ]
                .prop_map(Cursor::Ranked)
                .boxed()
            }
        }
    }

    /// A listing and a cursor the service could issue in it.
    fn issued() -> impl Strategy<Value = (OrderBy, String, Cursor)> {
        (any_order(), ".{0,40}").prop_flat_map(|(order, query)| {
            issued_cursor(order).prop_map(move |cursor| (order, query.clone(), cursor))
        })
    }

    /// Whether `cursor` is one the service could have issued in `order`:
    /// it goes out as a token and comes back the same; or it is a relevance
    /// position of the build before windows, which the service still takes.
    fn could_have_issued(cursor: &Cursor, order: OrderBy) -> bool {
        let legacy = matches!(
            cursor,
            Cursor::Ranked(Ranked::Broad { window: Window { below: None, down_to: None }, after: Some(_) })
        );
        let fixed_point = decode(&encode(cursor, order, "q"), order, "q").ok().as_ref() == Some(cursor);
        (legacy || fixed_point)
            && match cursor {
                Cursor::Id(id)
                | Cursor::Name { id, .. }
                | Cursor::Price { id, .. }
                | Cursor::CreateTime { id, .. }
                | Cursor::Ranked(Ranked::Engine { id, .. } | Ranked::Anchored { id, .. }) => *id >= 0,
                Cursor::Ranked(Ranked::Broad { after, .. }) => {
                    after.is_none_or(|(score, id)| score.is_finite() && id >= 0)
                }
            }
    }

    /// What a token looks like inside: a JSON document with any sort value
    /// and id, under the right fingerprint or another.
    fn crafted(order: OrderBy, query: String) -> impl Strategy<Value = String> {
        let value = prop_oneof![
            ".{0,30}",
            "-?[0-9]{0,22}(\\.[0-9]{0,12})?",
            "(anchored |broad |broad w)?-?[0-9]{0,20}(-[0-9]{0,20})?( -?[0-9.eE+-]{0,20})?",
            "(anchored|broad) (inf|NaN|-inf|1e999|\\+1|1_0)",
        ];
        let fingerprint = prop_oneof![Just(fingerprint(order, &query)), "[A-Za-z0-9_-]{0,20}"];
        (fingerprint, value, any::<i64>())
            .prop_map(|(f, v, i)| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Token { f, v, i }).unwrap()))
    }

    const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_text_decodes_or_is_refused_cleanly(
            order in any_order(),
            query in ".{0,20}",
            token in prop_oneof![
                any::<String>(),
                "[A-Za-z0-9_-]{0,400}",
                "[A-Za-z0-9+/=_-]{0,64}",
                proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
                "\\PC{2000,8000}",
            ],
        ) {
            if let Ok(cursor) = decode(&token, order, &query) {
                prop_assert!(could_have_issued(&cursor, order), "{token:?} gave {cursor:?}");
            }
        }

        #[test]
        fn crafted_documents_decode_only_to_cursors_the_service_issues(
            (order, query, token) in (any_order(), ".{0,20}")
                .prop_flat_map(|(order, query)| (Just(order), Just(query.clone()), crafted(order, query))),
        ) {
            if let Ok(cursor) = decode(&token, order, &query) {
                prop_assert!(could_have_issued(&cursor, order), "{token:?} gave {cursor:?}");
            }
        }

        #[test]
        fn every_token_the_service_issues_comes_back_as_it_went_out((order, query, cursor) in issued()) {
            let token = encode(&cursor, order, &query);
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            prop_assert_eq!(decode(&token, order, &query).unwrap(), cursor);
        }

        #[test]
        fn a_token_continues_only_its_own_listing(
            (order, query, cursor) in issued(),
            other_order in any_order(),
            other_query in ".{0,40}",
        ) {
            let token = encode(&cursor, order, &query);
            if other_order != order || other_query != query {
                prop_assert!(decode(&token, other_order, &other_query).is_err());
            }
        }

        #[test]
        fn an_edited_token_is_refused_or_one_the_service_could_issue(
            (order, query, cursor) in issued(),
            edit in (any::<prop::sample::Index>(), any::<u8>(), 0..4u8),
        ) {
            let mut token = encode(&cursor, order, &query).into_bytes();
            let (at, byte, kind) = (edit.0.index(token.len()), edit.1, edit.2);
            match kind {
                0 => token[at] = byte,
                1 => token[at] = BASE64URL[usize::from(byte) % 64],
                2 => { token.remove(at); }
                _ => token.truncate(at),
            }
            let token = String::from_utf8_lossy(&token);
            if let Ok(decoded) = decode(&token, order, &query) {
                prop_assert!(could_have_issued(&decoded, order), "{token:?} gave {decoded:?}");
            }
        }
    }
}
