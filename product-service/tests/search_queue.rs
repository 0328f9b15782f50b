//! The full-text index in step with concurrent writes of every kind, on
//! both databases; on SQLite, where a group commit's index changes wait in
//! `products_search_queue` and reach the index once before the group's
//! COMMIT (migrations/sqlite/0009_search_queue.sql), that nothing is left
//! queued and that writers outside a group still change the index at once.

use chrono::Utc;
use product_service::{
    domain::Price,
    store::{FieldChanges, Idempotent, ProductFields, ProductStore},
};
use storegate::{
    db::{BeginWrite as _, Db},
    on_db,
};
use storegate_testkit::{Backend, TestDb, backend_tests};

backend_tests!(concurrent_writes_leave_the_index_exactly_the_catalogue,);

/// Ids of the products whose name or description has `word`, by the
/// full-text index.
async fn indexed(db: &Db, word: &str) -> Vec<i64> {
    let sql = match db {
        Db::Sqlite(_) => "SELECT rowid FROM products_search WHERE products_search MATCH ? ORDER BY rowid",
        Db::MySql(_) => {
            "SELECT id FROM products WHERE MATCH (name, description) AGAINST (? IN BOOLEAN MODE) ORDER BY id"
        }
    };
    on_db!(db, pool => sqlx::query_scalar(sql).bind(word).fetch_all(pool).await).unwrap()
}

/// The same by the table itself.
async fn in_table(db: &Db, word: &str) -> Vec<i64> {
    let pattern = format!("% {word} %");
    on_db!(db, pool => sqlx::query_scalar(
        "SELECT id FROM products WHERE LOWER(CONCAT(' ', name, ' ', description, ' ')) LIKE ? ORDER BY id")
        .bind(&pattern)
        .fetch_all(pool)
        .await)
    .unwrap()
}

/// FTS5's own check of an external-content index against its table (with
/// rank 1 it compares with the content, not only the index with itself).
async fn index_agrees_with_its_table(pool: &sqlx::SqlitePool) {
    sqlx::query("INSERT INTO products_search (products_search, rank) VALUES ('integrity-check', 1)")
        .execute(pool)
        .await
        .unwrap();
}

fn fields(name: &str, description: &str) -> ProductFields {
    ProductFields {
        name: name.into(),
        description: description.into(),
        price: Price::parse("9.50").unwrap(),
        stock: 3,
    }
}

async fn concurrent_writes_leave_the_index_exactly_the_catalogue(backend: Backend) {
    let test_db = TestDb::new(&backend).await;
    let db = test_db.open().await;
    let store = std::sync::Arc::new(ProductStore::new(db.clone()).await);

    // 48 writers at once: creates, renames of what they created, deletes
    // of some, so that groups hold every kind of index change, several of
    // one product.
    let writers: Vec<_> = (0..48)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let table = fields(&format!("Oak table {i}"), "solid oak");
                let created = store.create(&table, None, None, Utc::now()).await;
                let Ok(Idempotent::Fresh(product)) = created else { panic!("create {i} failed") };
                if i % 2 == 0 {
                    let rename = FieldChanges { name: Some(format!("Pine shelf {i}")), ..Default::default() };
                    store.update(product.id, &rename, None, None, Utc::now()).await.unwrap();
                }
                if i % 3 == 0 {
                    store.delete(product.id, None).await.unwrap();
                }
                // A stock change leaves the words alone.
                if i % 3 != 0 {
                    store.adjust_stock(product.id, 1, None, None, Utc::now()).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for word in ["oak", "table", "pine", "shelf", "solid"] {
        let expected = in_table(&db, word).await;
        assert!(!expected.is_empty(), "{word} is in the catalogue");
        assert_eq!(indexed(&db, word).await, expected, "the index of {word:?}");
    }
    assert_eq!(in_table(&db, "pine").await.len(), 16, "renamed and not deleted: even, not a multiple of 3");

    let Db::Sqlite(pool) = &db else { return };
    // Nothing stays queued, the flag was never committed, and FTS5 agrees
    // with its content table.
    let queued: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM products_search_queue").fetch_one(pool).await.unwrap();
    assert_eq!(queued, 0);
    let deferred: i64 =
        sqlx::query_scalar("SELECT deferred FROM products_search_deferral").fetch_one(pool).await.unwrap();
    assert_eq!(deferred, 0);
    index_agrees_with_its_table(pool).await;

    // Inside a group, the change waits in the queue, and is in the index
    // once the group commits.
    let mut write = pool.begin_write().await.unwrap();
    sqlx::query("UPDATE products SET name = 'Walnut bench' WHERE name = 'Oak table 1'")
        .execute(&mut *write)
        .await
        .unwrap();
    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM products_search_queue")
        .fetch_one(&mut *write)
        .await
        .unwrap();
    assert_eq!(queued, 2, "the old words out, the new ones in");
    write.commit().await.unwrap();
    assert_eq!(indexed(&db, "walnut").await, in_table(&db, "walnut").await);
    assert_eq!(indexed(&db, "walnut").await.len(), 1);

    // Several changes of one product in one group, and of an older one
    // (a lower rowid), reach the index in their order.
    let mut write = pool.begin_write().await.unwrap();
    let insert = "INSERT INTO products (name, description, price, stock, version, create_time, update_time) \
                  VALUES (?, 'chest', '0000000001.00', 1, 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')";
    let gone =
        sqlx::query(insert).bind("Cedar chest").execute(&mut *write).await.unwrap().last_insert_rowid();
    sqlx::query("UPDATE products SET name = 'Maple chest' WHERE id = ?")
        .bind(gone)
        .execute(&mut *write)
        .await
        .unwrap();
    sqlx::query(insert).bind("Cedar box").execute(&mut *write).await.unwrap();
    sqlx::query("UPDATE products SET name = 'Cedar crate' WHERE name = 'Oak table 5'")
        .execute(&mut *write)
        .await
        .unwrap();
    sqlx::query("DELETE FROM products WHERE id = ?").bind(gone).execute(&mut *write).await.unwrap();
    write.commit().await.unwrap();
    for word in ["cedar", "maple", "chest", "box", "crate", "oak"] {
        assert_eq!(indexed(&db, word).await, in_table(&db, word).await, "the index of {word:?}");
    }
    assert_eq!(indexed(&db, "cedar").await.len(), 2);
    // A write rolled back takes its queued changes with it.
    let mut write = pool.begin_write().await.unwrap();
    sqlx::query(insert).bind("Birch stool").execute(&mut *write).await.unwrap();
    drop(write);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let queued: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM products_search_queue").fetch_one(pool).await.unwrap();
    assert_eq!((queued, indexed(&db, "birch").await.len()), (0, 0));
    index_agrees_with_its_table(pool).await;

    // A writer outside any group (a tool, the sqlite3 shell) changes the
    // index directly.
    sqlx::query("UPDATE products SET description = 'teak' WHERE name = 'Walnut bench'")
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(indexed(&db, "teak").await.len(), 1);
    assert_eq!(indexed(&db, "oak").await, in_table(&db, "oak").await);
    index_agrees_with_its_table(pool).await;
}
