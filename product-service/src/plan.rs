//! What the database says it will do for a listing
//! ([`crate::store::ProductStore::plan`]), and whether that costs the page
//! or the catalogue: a page read from its order's index stops after its
//! rows; a plan that sorts reads every row it could return first.

use sqlx::{Row as _, mysql::MySqlRow};
use storegate::ApiError;

use crate::{
    domain::{OrderBy, SortField},
    page_token::Cursor,
    store::{ListQuery, ProductStore},
};

/// The page size the checks ask plans for: the API's default.
const CHECKED_PAGE_SIZE: i64 = 50;

/// One listing's plan and its verdict.
#[derive(Debug, Clone)]
pub struct Check {
    /// Which listing, e.g. `price desc, next page`.
    pub listing: String,
    pub plan: Plan,
    /// Whether it costs its page (a column order read in order from its
    /// index) or its matches (a search read from the full-text index).
    pub bounded: bool,
}

/// The plans of every listing a caller can ask for: each column order,
/// ascending and descending, its first page and a page after the first
/// row; and, on a catalogue with products, a search for a word of the
/// first product's name, by relevance and by price.
/// `product-service check-plans` prints them, after a bulk load say.
pub async fn check_all(store: &ProductStore) -> Result<Vec<Check>, ApiError> {
    let mut checks = Vec::new();
    for field in [SortField::Id, SortField::Name, SortField::Price, SortField::CreateTime] {
        for descending in [false, true] {
            let order = OrderBy { field, descending };
            let first = ListQuery { order, query: None, after: None, limit: CHECKED_PAGE_SIZE };
            let first_row = store.list(&ListQuery { limit: 1, ..first }).await?.rows.into_iter().next();
            let cursor = match first_row {
                Some(row) => Some(Cursor::after(&row.into_product()?, order)?),
                None => None,
            };
            let name = order.canonical();
            let plan = store.plan(&first).await?;
            checks.push(Check {
                listing: format!("{name}, first page"),
                bounded: plan.reads_in_order(order),
                plan,
            });
            if let Some(cursor) = &cursor {
                let plan = store.plan(&ListQuery { after: Some(cursor), ..first }).await?;
                checks.push(Check {
                    listing: format!("{name}, next page"),
                    bounded: plan.reads_in_order(order),
                    plan,
                });
            }
        }
    }
    let first_name = store
        .list(&ListQuery {
            order: OrderBy { field: SortField::Id, descending: false },
            query: None,
            after: None,
            limit: 1,
        })
        .await?
        .rows
        .into_iter()
        .next()
        .map(|row| row.name);
    let word =
        first_name.as_deref().and_then(|name| name.split_whitespace().find(|w| w.chars().count() >= 3));
    if let Some(word) = word {
        for field in [SortField::Relevance, SortField::Price] {
            let order = OrderBy { field, descending: false };
            let plan = store
                .plan(&ListQuery { order, query: Some(word), after: None, limit: CHECKED_PAGE_SIZE })
                .await?;
            let listing = format!("search by {}", order.canonical());
            checks.push(Check { listing, bounded: plan.searches_the_index(), plan });
        }
    }
    Ok(checks)
}

/// A listing's plan, in the database's words and as a verdict.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The database's account, one line per step.
    pub steps: Vec<String>,
    /// The index of `products` the rows come from: `PRIMARY` for the
    /// table's own order (by id), `products_search` for the full-text
    /// index; `None` when no step names one.
    pub index: Option<String>,
    /// Whether the rows are sorted after they are read (MySQL's filesort or
    /// temporary table, SQLite's temporary B-tree).
    pub sorts: bool,
}

/// The index a listing in `field`'s order reads: the column's own (each
/// ends in `id`, the tie-break), or the full-text index for relevance.
pub fn index_for(field: SortField) -> &'static str {
    match field {
        SortField::Id => "PRIMARY",
        SortField::Name => "products_name",
        SortField::Price => "products_price",
        SortField::CreateTime => "products_create_time",
        SortField::Relevance => "products_search",
    }
}

impl Plan {
    /// Whether a listing (no query) in `order` reads its page from the
    /// order's index, without sorting: its cost is the page's rows,
    /// whatever the size of the catalogue.
    pub fn reads_in_order(&self, order: OrderBy) -> bool {
        self.index.as_deref() == Some(index_for(order.field)) && !self.sorts
    }

    /// Whether a search reads its matches from the full-text index (its
    /// cost grows with the matches, not with the catalogue).
    pub fn searches_the_index(&self) -> bool {
        self.index.as_deref() == Some(index_for(SortField::Relevance))
    }

    /// From MySQL/MariaDB `EXPLAIN` rows: the `products` row names the
    /// index (`key`), and `Extra` says whether it sorts.
    pub(crate) fn of_mysql(rows: &[MySqlRow]) -> Plan {
        let mut plan = Plan::default();
        for row in rows {
            let column = |name: &str| text(row, name).unwrap_or_default();
            let (table, key, extra) = (column("table"), column("key"), column("Extra"));
            plan.steps.push(format!(
                "{table}: type {}, key {}, rows {}{}",
                column("type"),
                if key.is_empty() { "none" } else { &key },
                column("rows"),
                if extra.is_empty() { String::new() } else { format!(", {extra}") },
            ));
            if table == "products" {
                plan.index = Some(key).filter(|key| !key.is_empty());
                plan.sorts |= extra.contains("filesort") || extra.contains("temporary");
            }
        }
        plan
    }

    /// From SQLite `EXPLAIN QUERY PLAN` details: `SCAN`/`SEARCH products
    /// USING [COVERING] INDEX name`, `USING INTEGER PRIMARY KEY` or a bare
    /// scan (the rowid's order), the FTS5 table's scan, and `USE TEMP
    /// B-TREE FOR ORDER BY` when it sorts.
    pub(crate) fn of_sqlite(steps: Vec<String>) -> Plan {
        let mut plan = Plan::default();
        for step in &steps {
            plan.sorts |= step.contains("TEMP B-TREE");
            let Some(rest) = step.strip_prefix("SCAN ").or_else(|| step.strip_prefix("SEARCH ")) else {
                continue;
            };
            if rest.starts_with("products_search ") {
                plan.index = Some(index_for(SortField::Relevance).to_owned());
            } else if plan.index.is_none() && (rest == "products" || rest.starts_with("products ")) {
                let named =
                    rest.split_once(" INDEX ").map(|(_, name)| name.split(' ').next().unwrap_or(name));
                plan.index = Some(named.unwrap_or("PRIMARY").to_owned());
            }
        }
        plan.steps = steps;
        plan
    }
}

/// An `EXPLAIN` column as text, whatever type the server gave it.
fn text(row: &MySqlRow, name: &str) -> Option<String> {
    if let Ok(value) = row.try_get::<Option<String>, _>(name) {
        return value;
    }
    if let Ok(value) = row.try_get::<Option<i64>, _>(name) {
        return value.map(|n| n.to_string());
    }
    row.try_get::<Option<u64>, _>(name).ok().flatten().map(|n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(field: SortField, descending: bool) -> OrderBy {
        OrderBy { field, descending }
    }

    #[test]
    fn sqlite_index_reads_and_sorts() {
        let plan = |steps: &[&str]| Plan::of_sqlite(steps.iter().map(|s| s.to_string()).collect());
        let price = order(SortField::Price, true);
        assert!(
            plan(&["SCAN products USING INDEX products_price", "SCALAR SUBQUERY 1", "SCAN product_counts"])
                .reads_in_order(price)
        );
        assert!(plan(&["SEARCH products USING INDEX products_price (price<?)"]).reads_in_order(price));
        assert!(!plan(&["SCAN products", "USE TEMP B-TREE FOR ORDER BY"]).reads_in_order(price));
        assert!(plan(&["SCAN products"]).reads_in_order(order(SortField::Id, false)));
        assert!(
            plan(&["SEARCH products USING INTEGER PRIMARY KEY (rowid>?)"])
                .reads_in_order(order(SortField::Id, true))
        );
        let search = plan(&[
            "SCAN products_search VIRTUAL TABLE INDEX 0:M4",
            "SEARCH products USING INTEGER PRIMARY KEY (rowid=?)",
            "USE TEMP B-TREE FOR ORDER BY",
        ]);
        assert!(search.searches_the_index());
        assert!(search.sorts);
    }
}
