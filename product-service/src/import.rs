//! `product-service import FILE`: a catalogue loaded in bulk from JSON
//! lines, one product per line:
//!
//! ```json
//! {"name": "Cast iron teapot", "description": "1.2 l, enamelled", "price": "39.90", "stock": 12}
//! ```
//!
//! The file is checked whole first, with the rules of CreateProduct, and
//! nothing is written if any line is wrong (every wrong line is reported,
//! up to [`MAX_REPORTED`]). Then it is imported [`BATCH`] products per
//! transaction ([`ProductStore::import`]): under 90 s for a million on
//! SQLite or MariaDB here (BENCHMARKS.md), where CreateProduct takes 6 to
//! 14 minutes. If
//! the database fails midway, the batches before stay imported and the log
//! says how many lines they held.

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use anyhow::Context as _;
use serde::Deserialize;
use storegate::{ApiError, pb::product::v1::Product};

use crate::store::{ProductFields, ProductStore};

/// Products per import transaction.
pub const BATCH: usize = 10_000;
/// Wrong lines reported before the check gives up.
const MAX_REPORTED: usize = 20;

/// A line of the file. Unknown fields are refused: a misspelt field would
/// otherwise import its products without it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    name: String,
    #[serde(default)]
    description: String,
    price: String,
    #[serde(default)]
    stock: i64,
}

impl Line {
    fn fields(self) -> Result<ProductFields, ApiError> {
        let product = Product {
            name: self.name,
            description: self.description,
            price: self.price,
            stock: self.stock,
            ..Default::default()
        };
        crate::service::validated_fields(&product, "")
    }
}

/// The products of line `number` (from 1) of an import file, or why not.
fn parse(number: usize, text: &str) -> Result<ProductFields, String> {
    let line: Line = serde_json::from_str(text).map_err(|e| {
        // serde's own position counts lines of this one line: keep the column.
        let message = e.to_string();
        let message = message.split(" at line ").next().unwrap_or(&message);
        format!("line {number}, column {}: {message}", e.column())
    })?;
    line.fields().map_err(|e| match e {
        ApiError::InvalidArgument(violations) => format!(
            "line {number}: {}",
            violations
                .iter()
                .map(|v| format!("{} {}", v.field, v.description))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        other => format!("line {number}: {other}"),
    })
}

/// The non-blank lines of `path` with their numbers, each parsed.
fn products(path: &Path) -> anyhow::Result<impl Iterator<Item = Result<ProductFields, String>>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(BufReader::new(file).lines().enumerate().filter_map(|(i, line)| match line {
        Ok(text) if text.trim().is_empty() => None,
        Ok(text) => Some(parse(i + 1, &text)),
        Err(e) => Some(Err(format!("line {}: {e}", i + 1))),
    }))
}

/// Checks the whole file, then imports it; how many products it imported.
pub async fn run(store: &ProductStore, path: &Path) -> anyhow::Result<u64> {
    let mut wrong = Vec::new();
    for product in products(path)? {
        if let Err(why) = product {
            wrong.push(why);
            if wrong.len() == MAX_REPORTED {
                wrong.push(format!("(stopped checking after {MAX_REPORTED} wrong lines)"));
                break;
            }
        }
    }
    anyhow::ensure!(wrong.is_empty(), "nothing imported, the file has wrong lines:\n{}", wrong.join("\n"));
    let mut imported = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    let mut lines = products(path)?.peekable();
    while lines.peek().is_some() {
        batch.clear();
        batch.extend(lines.by_ref().take(BATCH).map(|p| p.expect("checked above")));
        store
            .import(&batch, None, storegate::db::now())
            .await
            .with_context(|| format!("importing after {imported} products; those are in"))?;
        imported += batch.len() as u64;
        tracing::info!(imported, "imported");
    }
    store.optimize_search_index().await.context("merging the full-text index (the products are in)")?;
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_create_products_rules() {
        let ok = parse(1, r#"{"name": "Teapot", "price": "9.5", "stock": 3}"#).unwrap();
        assert_eq!(
            (ok.name.as_str(), ok.price.to_string(), ok.stock, ok.description.as_str()),
            ("Teapot", "9.50".into(), 3, "")
        );
        let wrong = |text: &str| parse(7, text).unwrap_err();
        assert!(
            wrong(r#"{"name": "", "price": "-1"}"#).starts_with("line 7: name must not be empty; price "),
            "{}",
            wrong(r#"{"name": "", "price": "-1"}"#)
        );
        assert!(
            wrong(r#"{"name": "Pot", "price": "1", "colour": "red"}"#).contains("unknown field `colour`")
        );
        assert!(wrong("not json").starts_with("line 7, column 2: expected"), "{}", wrong("not json"));
        assert!(
            wrong(r#"{"name": "Pot", "price": "1", "stock": -1}"#).contains("stock must not be negative")
        );
    }
}
