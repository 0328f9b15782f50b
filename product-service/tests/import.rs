//! `product-service import`: a JSON-lines file loaded in bulk, checked
//! whole first (a wrong line anywhere writes nothing), counted, and
//! searchable at once. Real servers, SQLite and MySQL.

use product_service::{ProductConfig, store::ProductStore};
use storegate_testkit::{Backend, TestDb, backend_tests};

backend_tests!(a_file_is_imported_whole, a_wrong_line_anywhere_imports_nothing);

mod common;

fn file_of(lines: &[&str]) -> (tempfile_dir::Dir, std::path::PathBuf) {
    let dir = tempfile_dir::Dir::new();
    let path = dir.0.join("products.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    (dir, path)
}

/// A folder removed when dropped.
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(format!(
                "storegate-import-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn a_file_is_imported_whole(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let mut lines = vec![
        r#"{"name": "Cast iron teapot", "description": "Enamelled, 1.2 l", "price": "39.90", "stock": 12}"#
            .to_owned(),
        String::new(),
        r#"{"name": "Linen apron", "price": "18"}"#.to_owned(),
    ];
    // More than one import transaction's worth.
    lines.extend(
        (0..product_service::import::BATCH + 5)
            .map(|i| format!(r#"{{"name": "Mug {i}", "price": "4.50", "stock": 1}}"#)),
    );
    let (_dir, path) = file_of(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    product_service::import_products(&ProductConfig::with_database_url(&db.url), &path).await.unwrap();

    let store = ProductStore::pool_only(db.open().await);
    let expected = 2 + product_service::import::BATCH as i64 + 5;
    assert_eq!(store.count(None).await.unwrap(), expected);
    assert_eq!(store.recount().await.unwrap(), expected, "the kept count is the table's");
    let found = common::search_when_indexed(&store, &backend, "teapot", 1).await;
    let teapot = found.rows.into_iter().map(|row| row.into_product().unwrap()).collect::<Vec<_>>();
    assert_eq!(teapot.len(), 1);
    assert_eq!(
        (teapot[0].name.as_str(), teapot[0].description.as_str(), teapot[0].price.as_str(), teapot[0].stock),
        ("Cast iron teapot", "Enamelled, 1.2 l", "39.90", 12)
    );
    let apron = store.get(teapot[0].id + 1).await.unwrap().unwrap().into_product().unwrap();
    assert_eq!(
        (apron.name.as_str(), apron.description.as_str(), apron.price.as_str(), apron.stock),
        ("Linen apron", "", "18.00", 0)
    );
}

async fn a_wrong_line_anywhere_imports_nothing(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let (_dir, path) = file_of(&[
        r#"{"name": "Teapot", "price": "9.00"}"#,
        r#"{"name": "Kettle", "price": "nine"}"#,
        r#"{"name": "Pot", "price": "1", "colour": "red"}"#,
        r#"{"name": "Cup", "price": "2.00"}"#,
    ]);
    let error = product_service::import_products(&ProductConfig::with_database_url(&db.url), &path)
        .await
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("line 2: price") && message.contains("line 3, column 38: unknown field `colour`"),
        "{message}"
    );
    assert!(!message.contains("line 1") && !message.contains("line 4"), "{message}");
    let store = ProductStore::pool_only(db.open().await);
    assert_eq!(store.count(None).await.unwrap(), 0);
    assert_eq!(store.recount().await.unwrap(), 0, "no row was written");
}
