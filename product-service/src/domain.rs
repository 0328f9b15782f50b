//! Validated product fields: the rules live here, once.

use std::fmt;

use storegate::error::FieldViolation;

pub const NAME_MAX_CHARS: usize = 200;
pub const DESCRIPTION_MAX_CHARS: usize = 5000;
/// DECIMAL(12,2): ten integer digits.
pub const PRICE_MAX_INTEGER_DIGITS: usize = 10;
pub const REQUEST_ID_MAX_LEN: usize = 64;

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
        let cents: i64 = format!("{fraction:0<2}").parse().map_err(|_| "is not a number")?;
        Ok(Price(whole * 100 + cents))
    }

    pub fn cents(self) -> i64 {
        self.0
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
        Some(FieldViolation::new(field, "must be at most 200 characters"))
    } else {
        None
    }
}

pub fn check_description(description: &str, field: &str) -> Option<FieldViolation> {
    (description.chars().count() > DESCRIPTION_MAX_CHARS)
        .then(|| FieldViolation::new(field, "must be at most 5000 characters"))
}

pub fn check_stock(stock: i64, field: &str) -> Option<FieldViolation> {
    (stock < 0).then(|| FieldViolation::new(field, "must not be negative"))
}

/// A client's idempotency key: up to 64 characters of letters, digits, '-' and '_'.
pub fn check_request_id(request_id: &str) -> Option<FieldViolation> {
    let ok = request_id.len() <= REQUEST_ID_MAX_LEN
        && request_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (!ok).then(|| {
        FieldViolation::new("request_id", "must be at most 64 characters of letters, digits, '-' and '_'")
    })
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
    fn etags_round_trip_and_foreign_ones_are_not_ours() {
        assert_eq!(parse_etag(&etag(7)), Some(7));
        assert_eq!(parse_etag("7"), None);
        assert_eq!(parse_etag("v"), None);
    }
}
