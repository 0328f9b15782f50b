//! Validated product fields: the rules live here, once.

use std::fmt;

use storegate::error::FieldViolation;

pub const NAME_MAX_CHARS: usize = 200;
pub const DESCRIPTION_MAX_CHARS: usize = 5000;
/// DECIMAL(12,2): ten integer digits.
pub const PRICE_MAX_INTEGER_DIGITS: usize = 10;
/// Far beyond any real stock, far below where BIGINT arithmetic overflows.
pub const MAX_STOCK: i64 = 1_000_000_000_000_000;
// Said as "10^15" in check_stock's message.
const _: () = assert!(MAX_STOCK == 10i64.pow(15));
pub const QUERY_MAX_CHARS: usize = 200;

/// An exact, non-negative amount of money in hundredths ("cents"). Never a
/// float: parsed from and printed as decimal text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Price(i64);

impl Price {
    /// Parses "999.99", "5", "0.5": digits, optionally a point and one or
    /// two digits. No sign, exponent, spaces or thousands separators.
    pub fn parse(text: &str) -> Result<Price, &'static str> {
        let (whole, fraction) = match text.split_once('.') {
            Some((w, f)) => (w, Some(f)),
            None => (text, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if text.starts_with('-') {
            return Err("must not be negative");
        }
        if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
            return Err("must be a decimal number such as 12.50");
        }
        let fraction = fraction.unwrap_or("");
        if fraction.len() > 2 {
            return Err("must have at most 2 digits after the decimal point");
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > PRICE_MAX_INTEGER_DIGITS {
            return Err("must be below 10000000000");
        }
        let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| "is not a number")? };
        // At most two digits, checked above: "5" is 50 cents, "05" five.
        let cents = fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(2)
            .fold(0, |n, b| n * 10 + i64::from(b - b'0'));
        Ok(Price(whole * 100 + cents))
    }

    pub fn cents(self) -> i64 {
        self.0
    }

    /// Fixed-width text ("0000000999.99") whose text order is numeric order:
    /// how SQLite stores prices.
    pub fn fixed_width(self) -> String {
        format!("{:010}.{:02}", self.0 / 100, self.0 % 100)
    }
}

impl fmt::Display for Price {
    /// Always two fraction digits: "999.99", "5.00".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

pub fn check_name(name: &str, field: &str) -> Option<FieldViolation> {
    let len = name.chars().count();
    if len == 0 || name.trim().is_empty() {
        Some(FieldViolation::new(field, "must not be empty"))
    } else if len > NAME_MAX_CHARS {
        Some(FieldViolation::new(field, format!("must be at most {NAME_MAX_CHARS} characters")))
    } else {
        None
    }
}

pub fn check_description(description: &str, field: &str) -> Option<FieldViolation> {
    (description.chars().count() > DESCRIPTION_MAX_CHARS)
        .then(|| FieldViolation::new(field, format!("must be at most {DESCRIPTION_MAX_CHARS} characters")))
}

pub fn check_stock(stock: i64, field: &str) -> Option<FieldViolation> {
    if stock < 0 {
        Some(FieldViolation::new(field, "must not be negative"))
    } else if stock > MAX_STOCK {
        Some(FieldViolation::new(field, "must be at most 10^15"))
    } else {
        None
    }
}

/// A client's idempotency key: a UUID (any version), compared lower-cased.
pub fn parse_request_id(request_id: &str) -> Result<Option<String>, FieldViolation> {
    if request_id.is_empty() {
        return Ok(None);
    }
    let groups: Vec<&str> = request_id.split('-').collect();
    let shape_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    if !shape_ok {
        return Err(FieldViolation::new(
            "request_id",
            "must be a UUID such as 6f1c2d4e-8a8b-4c1e-9d3f-2b7a5e0c9f11",
        ));
    }
    Ok(Some(request_id.to_ascii_lowercase()))
}

/// What a listing may be ordered by. Ties are always broken by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    Id,
    Name,
    Price,
    CreateTime,
    /// Best match of a `query` first (only with a query).
    Relevance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderBy {
    pub field: SortField,
    pub descending: bool,
}

impl OrderBy {
    /// Parses AIP-132 `order_by`: one of id, name, price, create_time,
    /// optionally followed by "desc" (or "asc"), or "relevance" (best match
    /// first, no direction; the service checks there is a query).
    pub fn parse(text: &str) -> Result<OrderBy, FieldViolation> {
        let invalid = || {
            FieldViolation::new(
                "order_by",
                "must be id, name, price or create_time, optionally followed by desc, or relevance",
            )
        };
        let mut words = text.split_whitespace();
        let field = match words.next() {
            None | Some("id") => SortField::Id,
            Some("name") => SortField::Name,
            Some("price") => SortField::Price,
            Some("create_time") => SortField::CreateTime,
            Some("relevance") => {
                if words.next().is_some() {
                    return Err(invalid());
                }
                return Ok(OrderBy { field: SortField::Relevance, descending: false });
            }
            Some(_) => return Err(invalid()),
        };
        let descending = match words.next() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => return Err(invalid()),
        };
        if words.next().is_some() {
            return Err(invalid());
        }
        Ok(OrderBy { field, descending })
    }

    /// The canonical spelling, for binding page tokens to their listing.
    pub fn canonical(self) -> String {
        let field = match self.field {
            SortField::Id => "id",
            SortField::Name => "name",
            SortField::Price => "price",
            SortField::CreateTime => "create_time",
            SortField::Relevance => return "relevance".into(),
        };
        format!("{field} {}", if self.descending { "desc" } else { "asc" })
    }
}

pub fn check_query(query: &str) -> Option<FieldViolation> {
    if query.chars().count() > QUERY_MAX_CHARS {
        return Some(FieldViolation::new("query", format!("must be at most {QUERY_MAX_CHARS} characters")));
    }
    // SQLite's LIKE ends a pattern at a NUL: "%\0…" became "%" and matched
    // every row. Refused on both backends, so that they answer alike.
    query.contains('\0').then(|| FieldViolation::new("query", "must not contain NUL characters"))
}

/// The product's etag for a row version. Opaque to clients.
pub fn etag(version: i64) -> String {
    format!("v{version}")
}

/// The row version an etag names, if it is one of ours.
pub fn parse_etag(etag: &str) -> Option<i64> {
    etag.strip_prefix('v')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_exactly_and_print_with_two_decimals() {
        for (text, cents, printed) in [
            ("999.99", 99_999, "999.99"),
            ("5", 500, "5.00"),
            ("0.5", 50, "0.50"),
            ("0", 0, "0.00"),
            ("007.10", 710, "7.10"),
            ("9999999999.99", 999_999_999_999, "9999999999.99"),
            // 0.1 + 0.2 style values stay exact.
            ("0.30", 30, "0.30"),
        ] {
            let price = Price::parse(text).unwrap();
            assert_eq!(price.cents(), cents, "{text}");
            assert_eq!(price.to_string(), printed);
        }
    }

    #[test]
    fn malformed_negative_or_oversized_prices_are_refused() {
        for text in [
            "",
            "-1",
            "-0.01",
            "1.234",
            "1e3",
            " 1",
            "1 ",
            "1,50",
            "abc",
            ".5",
            "5.",
            "+5",
            "NaN",
            "10000000000",
            "99999999999.99",
        ] {
            assert!(Price::parse(text).is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn names_descriptions_and_stock_are_bounded() {
        assert!(check_name("Widget", "name").is_none());
        assert!(check_name("", "name").is_some());
        assert!(check_name("   ", "name").is_some());
        assert!(check_name(&"é".repeat(200), "name").is_none());
        assert!(check_name(&"é".repeat(201), "name").is_some());
        assert!(check_description(&"x".repeat(5000), "d").is_none());
        assert!(check_description(&"x".repeat(5001), "d").is_some());
        assert!(check_stock(0, "stock").is_none());
        assert!(check_stock(-1, "stock").is_some());
    }

    #[test]
    fn fixed_width_prices_sort_as_numbers() {
        let mut prices: Vec<_> =
            ["10", "9.99", "0.5", "100", "9999999999.99"].map(|p| Price::parse(p).unwrap()).into();
        let mut texts: Vec<_> = prices.iter().map(|p| p.fixed_width()).collect();
        prices.sort();
        texts.sort();
        assert_eq!(texts, prices.iter().map(|p| p.fixed_width()).collect::<Vec<_>>());
        assert_eq!(Price::parse("9.99").unwrap().fixed_width(), "0000000009.99");
        assert_eq!(Price::parse(&Price::parse("9.99").unwrap().fixed_width()).unwrap().to_string(), "9.99");
    }

    #[test]
    fn request_ids_are_uuids() {
        assert_eq!(
            parse_request_id("6F1C2D4E-8A8B-4C1E-9D3F-2B7A5E0C9F11").unwrap().as_deref(),
            Some("6f1c2d4e-8a8b-4c1e-9d3f-2b7a5e0c9f11")
        );
        assert_eq!(parse_request_id("").unwrap(), None);
        for bad in
            ["abc", "6f1c2d4e8a8b4c1e9d3f2b7a5e0c9f11", "6f1c2d4e-8a8b-4c1e-9d3f-2b7a5e0c9f1g", "' OR 1=1 --"]
        {
            assert!(parse_request_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn order_by_takes_one_known_field_and_a_direction() {
        assert_eq!(OrderBy::parse("").unwrap(), OrderBy { field: SortField::Id, descending: false });
        assert_eq!(
            OrderBy::parse("price desc").unwrap(),
            OrderBy { field: SortField::Price, descending: true }
        );
        assert_eq!(OrderBy::parse(" name  asc ").unwrap().canonical(), "name asc");
        for bad in ["stock", "name sideways", "name desc extra", "price; DROP TABLE products"] {
            assert!(OrderBy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn etags_round_trip_and_foreign_ones_are_not_ours() {
        assert_eq!(parse_etag(&etag(7)), Some(7));
        assert_eq!(parse_etag("7"), None);
        assert_eq!(parse_etag("v"), None);
    }
}
