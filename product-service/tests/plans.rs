//! Every listing costs its page, however the catalogue was loaded: after a
//! bulk import (no statistics gathered) and again after the database's own
//! ANALYZE, EXPLAIN of the very statement each order runs (first page and
//! a later one, ascending and descending) reads the order's index without
//! sorting, and a search reads the full-text index. Bulk imports count
//! their products and are searchable at once. Real servers, SQLite and
//! MySQL.

use product_service::{
    domain::{OrderBy, SortField},
    plan,
    store::{ListQuery, ProductStore},
};
use storegate::on_db;
use storegate_testkit::{Backend, TestDb, backend_tests, catalogue};

backend_tests!(every_listing_reads_its_index_after_a_bulk_import, an_import_is_counted_and_searchable,);

mod common;

/// Big enough that a plan which sorts the catalogue looks worse to the
/// planner than one reading an index in order.
const IMPORTED: u64 = 20_000;

async fn imported_store(backend: &Backend, products: u64) -> (TestDb, ProductStore) {
    let test_db = TestDb::new(backend).await;
    let db = test_db.open().await;
    let store = ProductStore::pool_only(db);
    let batch: Vec<_> = (0..products).map(catalogue::product).collect();
    for part in batch.chunks(5_000) {
        store.import(part, Some(1), storegate::db::now()).await.unwrap();
    }
    (test_db, store)
}

async fn every_listing_reads_its_index_after_a_bulk_import(backend: Backend) {
    let (_db, store) = imported_store(&backend, IMPORTED).await;
    let assert_bounded = |checks: Vec<plan::Check>, when: &str| {
        // 4 columns × 2 directions × first and next page, and 2 searches.
        assert_eq!(checks.len(), 18, "{when}: {checks:#?}");
        for check in checks {
            assert!(check.bounded, "{when}, {}: {:#?}", check.listing, check.plan.steps);
        }
    };
    assert_bounded(plan::check_all(&store).await.unwrap(), "after the import");
    on_db!(store.db(), pool => async {
        let analyze = if matches!(backend, Backend::Sqlite) { "ANALYZE" } else { "ANALYZE TABLE products" };
        sqlx::query(analyze).execute(pool).await.map(drop)
    }
    .await)
    .unwrap();
    assert_bounded(plan::check_all(&store).await.unwrap(), "after ANALYZE");

    // The verdict is the plan's, not a foregone answer: a search ordered
    // by price sorts its matches, and is told apart from a listing.
    let order = OrderBy { field: SortField::Price, descending: true };
    let sorted = store.plan(&ListQuery { order, query: Some("with"), after: None, limit: 50 }).await.unwrap();
    assert!(sorted.searches_the_index(), "{:#?}", sorted.steps);
    assert!(sorted.sorts && !sorted.reads_in_order(order), "{:#?}", sorted.steps);
}

async fn an_import_is_counted_and_searchable(backend: Backend) {
    let (_db, store) = imported_store(&backend, 2_500).await;
    assert_eq!(store.count(None).await.unwrap(), 2_500, "the import keeps the count");
    assert_eq!(store.recount().await.unwrap(), 2_500, "and the count is the table's");
    // A rare word of some imported product finds exactly the products with it.
    let products: Vec<_> = (0..2_500).map(catalogue::product).collect();
    let name_word = |p: &product_service::store::ProductFields| -> Option<String> {
        p.name.split(' ').find(|w| w.len() >= 6).map(str::to_lowercase)
    };
    let word =
        products.iter().filter_map(name_word).find(|w| w.chars().all(|c| c.is_ascii_lowercase())).unwrap();
    let has =
        |text: &str| text.to_lowercase().split(|c: char| !c.is_alphanumeric()).any(|w| w.starts_with(&word));
    let expected = products.iter().filter(|p| has(&p.name) || has(&p.description)).count();
    let page = common::search_when_indexed(&store, &backend, &word, expected).await;
    assert!(expected > 0 && expected < 1000, "{word}: {expected}");
    assert_eq!(page.rows.len(), expected, "{word}");
    assert_eq!(page.total_size, expected as i64, "{word}");
}
