//! A catalogue from before a migration: counted and indexed by the
//! migrations that came after it. SQLite and MySQL.

use storegate::{Db, on_db};
use storegate_testkit::{Backend, backend_tests};

backend_tests!(a_catalogue_from_before_the_count_is_counted_by_its_migration);

/// A database at migration 0002 with products in it: migration 0003 must
/// count what is there, so total_size is right from the first listing.
async fn a_catalogue_from_before_the_count_is_counted_by_its_migration(backend: Backend) {
    let test_db = storegate_testkit::TestDb::new(&backend).await;
    let dialect = match backend {
        Backend::Sqlite => "sqlite",
        Backend::MySql(_) => "mysql",
    };
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations").join(dialect);
    let before = tempfile_dir(&format!("migrations-before-0003-{dialect}"));
    for entry in std::fs::read_dir(&all).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("0001") || name.starts_with("0002") {
            std::fs::copy(&path, before.join(name)).unwrap();
        }
    }
    let db = Db::connect(&test_db.url).await.unwrap();
    let migrator = sqlx::migrate::Migrator::new(before.clone()).await.unwrap();
    on_db!(&db, pool => migrator.run(pool).await).unwrap();
    for i in 0..37 {
        on_db!(&db, pool => {
            sqlx::query(
                "INSERT INTO products (name, description, price, stock, version, create_time, update_time) \
                 VALUES (?, '', ?, 1, 1, ?, ?)",
            )
            .bind(format!("Old {i}"))
            // As each backend stores prices (fixed-width text on SQLite).
            .bind(if dialect == "sqlite" { "0000000001.00" } else { "1.00" })
            .bind(chrono::Utc::now())
            .bind(chrono::Utc::now())
            .execute(pool)
            .await
            .map(drop)
        })
        .unwrap();
    }
    db.migrate().await.unwrap();
    let store = product_service::store::ProductStore::new(db.clone()).await;
    assert_eq!(store.count(None).await.unwrap(), 37);
    // Migration 0006 indexed the rows that were there for search.
    assert_eq!(store.count(Some("old")).await.unwrap(), 37);
    let order = product_service::domain::OrderBy::parse("name desc").unwrap();
    let page = store
        .list(&product_service::store::ListQuery { order, query: Some("OLD"), after: None, limit: 2 })
        .await
        .unwrap();
    assert_eq!(page.rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["Old 9", "Old 8"]);
    assert_eq!(page.total_size, 37);
    db.close().await;
    let _ = std::fs::remove_dir_all(before);
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("storegate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
