//! The catalogue through the API under concurrent use: etags, idempotent
//! writes, atomic stock, listing order, filters and pagination, audit
//! fields, and errors that never leak. Real servers, SQLite and MySQL.
//! (The store's own read paths: `store_reads.rs`; a catalogue from before a
//! migration: `catalogue_migration.rs`.)

use std::{collections::HashSet, sync::Arc};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use storegate::{
    Db, on_db,
    pb::product::v1::{
        DeleteProductRequest, GetProductRequest, ListProductsRequest, Product, UpdateProductRequest,
    },
};
use storegate_testkit::{Backend, backend_tests, bearer};
use tonic::Code;

mod common;

use common::{Shop, product};

backend_tests!(
    of_two_writers_from_one_etag_exactly_one_wins,
    ten_concurrent_retries_of_a_create_make_one_product,
    two_hundred_concurrent_decrements_stop_at_zero,
    adjust_stock_retries_return_the_first_result,
    listings_follow_order_by_and_query,
    page_tokens_only_continue_their_own_listing,
    ten_thousand_products_page_by_page_each_exactly_once,
    unicode_names_round_trip_exactly,
    audit_fields_say_who_and_when,
    database_errors_never_leak,
    total_size_follows_concurrent_creates_and_deletes,
);

fn names(products: &[Product]) -> Vec<&str> {
    products.iter().map(|p| p.name.as_str()).collect()
}

async fn of_two_writers_from_one_etag_exactly_one_wins(backend: Backend) {
    let shop = Arc::new(Shop::open(backend).await);
    let lamp = shop.add("Lamp", "30.00", 5).await;
    let writers: Vec<_> = (0..10)
        .map(|i| {
            let (shop, etag) = (shop.clone(), lamp.etag.clone());
            tokio::spawn(async move {
                let request = UpdateProductRequest {
                    product: Some(Product { id: lamp.id, stock: 100 + i, etag, ..Default::default() }),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["stock".into()] }),
                };
                shop.stack
                    .products()
                    .await
                    .update_product(bearer(request, &shop.token))
                    .await
                    .map_err(|e| e.code())
            })
        })
        .collect();
    let mut winners = Vec::new();
    for w in writers {
        match w.await.unwrap() {
            Ok(r) => winners.push(r.into_inner()),
            Err(code) => assert_eq!(code, Code::Aborted),
        }
    }
    assert_eq!(winners.len(), 1);
    let now = shop.get(lamp.id).await;
    assert_eq!(now, winners[0], "the winner's write is what is stored");
}

async fn ten_concurrent_retries_of_a_create_make_one_product(backend: Backend) {
    let shop = Arc::new(Shop::open(backend).await);
    let id = "0b7e6f43-2c1d-4a5b-8e9f-1a2b3c4d5e6f";
    let retries: Vec<_> = (0..10)
        .map(|_| {
            let shop = shop.clone();
            tokio::spawn(async move { shop.create_with_id(product("Vase", "15.50", 3), id).await.unwrap() })
        })
        .collect();
    let mut created = Vec::new();
    for r in retries {
        created.push(r.await.unwrap());
    }
    assert!(created.iter().all(|p| *p == created[0]), "every retry gets the first answer");
    let db = shop.stack.db.open().await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM products").await, 1);

    // The first answer, even after the product changed since.
    shop.adjust(created[0].id, 1, "").await.unwrap();
    assert_eq!(shop.create_with_id(product("Vase", "15.50", 3), id).await.unwrap(), created[0]);
    let err = shop.create_with_id(product("Vase", "16.50", 3), id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "the same id with another body");
    let err = shop.create_with_id(product("Vase", "15.50", 3), "not-a-uuid").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM products").await, 1);
}

/// total_size comes from a maintained count, not a scan: it must equal the
/// table's COUNT(*) after concurrent creates and deletes, and a recount
/// repairs it after writes that bypassed the service.
async fn total_size_follows_concurrent_creates_and_deletes(backend: Backend) {
    let shop = Arc::new(Shop::open(backend).await);
    let creates: Vec<_> = (0..40)
        .map(|i| {
            let shop = shop.clone();
            tokio::spawn(async move { shop.add(&format!("Item {i}"), "1.00", 1).await })
        })
        .collect();
    let mut ids = Vec::new();
    for create in creates {
        ids.push(create.await.unwrap().id);
    }
    let deletes: Vec<_> = ids
        .iter()
        .step_by(3)
        .map(|&id| {
            let shop = shop.clone();
            tokio::spawn(async move {
                let request = DeleteProductRequest { id, etag: String::new() };
                shop.stack.products().await.delete_product(bearer(request, &shop.token)).await.map(drop)
            })
        })
        .collect();
    for delete in deletes {
        delete.await.unwrap().unwrap();
    }
    // Deleting what is already gone changes nothing.
    let request = DeleteProductRequest { id: ids[0], etag: String::new() };
    let err = shop.stack.products().await.delete_product(bearer(request, &shop.token)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let db = shop.stack.db.open().await;
    let in_table = count(&db, "SELECT COUNT(*) FROM products").await;
    assert_eq!(in_table, 40 - 14);
    let (_, _, total) = shop.list(ListProductsRequest::default()).await.unwrap();
    assert_eq!(total, in_table);
    // A search's total is counted in the full-text index: every item has
    // the word "item" (tests/search.rs covers searches in depth).
    let filtered = ListProductsRequest { query: "item".into(), ..Default::default() };
    let (_, _, total) = shop.list(filtered).await.unwrap();
    assert_eq!(total, count(&db, "SELECT COUNT(*) FROM products WHERE LOWER(name) LIKE 'item %'").await);

    // A row written around the service is not counted until a recount.
    let store = product_service::store::ProductStore::new(db.clone()).await;
    on_db!(&db, pool => {
        sqlx::query(
            "INSERT INTO products (name, description, price, stock, version, create_time, update_time) \
             SELECT name, description, price, stock, 1, create_time, update_time FROM products WHERE id = ?",
        )
        .bind(ids[1])
        .execute(pool)
        .await
        .map(drop)
    })
    .unwrap();
    assert_eq!(shop.list(ListProductsRequest::default()).await.unwrap().2, in_table);
    assert_eq!(store.recount().await.unwrap(), in_table + 1);
    assert_eq!(shop.list(ListProductsRequest::default()).await.unwrap().2, in_table + 1);
}

async fn count(db: &Db, sql: &str) -> i64 {
    on_db!(db, pool => sqlx::query_scalar(sql).fetch_one(pool).await).unwrap()
}

async fn two_hundred_concurrent_decrements_stop_at_zero(backend: Backend) {
    let shop = Arc::new(Shop::open(backend).await);
    let stock = shop.add("Mug", "8.00", 100).await;
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let shop = shop.clone();
            tokio::spawn(
                async move { shop.adjust(stock.id, -1, "").await.map(|p| p.stock).map_err(|e| e.code()) },
            )
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let succeeded: Vec<i64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(succeeded.len(), 100, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(_) | Err(Code::FailedPrecondition))), "{results:?}");
    assert!(succeeded.iter().all(|s| (0..100).contains(s)), "never negative");
    assert_eq!(succeeded.iter().collect::<HashSet<_>>().len(), 100, "each decrement saw its own stock");
    assert_eq!(shop.get(stock.id).await.stock, 0);
    let db = shop.stack.db.open().await;
    assert_eq!(count(&db, "SELECT MIN(stock) FROM products").await, 0);
}

async fn adjust_stock_retries_return_the_first_result(backend: Backend) {
    let shop = Arc::new(Shop::open(backend).await);
    let bowl = shop.add("Bowl", "12.00", 10).await;
    let id = "7d4e0f8a-1b2c-4d3e-8f90-a1b2c3d4e5f6";
    let retries: Vec<_> = (0..10)
        .map(|_| {
            let shop = shop.clone();
            tokio::spawn(async move { shop.adjust(bowl.id, 5, id).await.unwrap() })
        })
        .collect();
    for r in retries {
        assert_eq!(r.await.unwrap().stock, 15);
    }
    assert_eq!(shop.get(bowl.id).await.stock, 15, "added once");
    let err = shop.adjust(bowl.id, 6, id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "the same id for another delta");

    // A refused adjustment changes nothing and records nothing: its retry is evaluated again.
    let take = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";
    assert_eq!(shop.adjust(bowl.id, -20, take).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(shop.get(bowl.id).await.stock, 15);
    assert_eq!(shop.adjust(bowl.id, -20, take).await.unwrap_err().code(), Code::FailedPrecondition);

    assert_eq!(shop.adjust(bowl.id, 0, "").await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(shop.adjust(424242, 1, "").await.unwrap_err().code(), Code::NotFound);
    let etag_before = shop.get(bowl.id).await.etag;
    shop.adjust(bowl.id, -1, "").await.unwrap();
    assert_ne!(shop.get(bowl.id).await.etag, etag_before, "stock changes move the etag");
}

async fn listings_follow_order_by_and_query(backend: Backend) {
    let shop = Shop::open(backend).await;
    for (name, price) in [
        ("Teapot", "24.50"),
        ("tea towel", "4.00"),
        ("Coffee 100% arabica", "9.99"),
        ("Cup_small", "100.00"),
        ("Kettle", "9.99"),
        ("O'Brien's mug", "7.25"),
    ] {
        shop.add(name, price, 1).await;
    }
    let all = shop.list_all("", "", 2).await;
    assert_eq!(
        names(&all),
        ["Teapot", "tea towel", "Coffee 100% arabica", "Cup_small", "Kettle", "O'Brien's mug"]
    );

    let by_price = shop.list_all("price", "", 4).await;
    assert_eq!(
        by_price.iter().map(|p| p.price.as_str()).collect::<Vec<_>>(),
        ["4.00", "7.25", "9.99", "9.99", "24.50", "100.00"],
        "numeric, not text, order"
    );
    assert_eq!(names(&by_price)[2..4], ["Coffee 100% arabica", "Kettle"], "ties by id");
    let by_price_desc = shop.list_all("price desc", "", 4).await;
    assert_eq!(names(&by_price_desc)[0], "Cup_small");
    assert_eq!(names(&by_price_desc)[2..4], ["Kettle", "Coffee 100% arabica"], "ties by id, descending");
    let newest_first = shop.list_all("create_time desc", "", 5).await;
    assert_eq!(names(&newest_first)[0], "O'Brien's mug");
    let by_name = shop.list_all("name", "", 3).await;
    assert_eq!(by_name.len(), 6);
    assert_eq!(names(&by_name)[0], "Coffee 100% arabica");

    // A query is words (the last one a prefix), not a substring: operator
    // and wildcard characters are no words and find nothing alone.
    for (query, expected) in [
        ("TEA", vec!["Teapot", "tea towel"]),
        ("100%", vec!["Coffee 100% arabica"]),
        ("%", vec![]),
        ("_", vec![]),
        ("cup_s", vec!["Cup_small"]),
        ("'", vec![]),
        ("o'brien", vec!["O'Brien's mug"]),
        // Words "OR" (too short, dropped), "1", "1": the last a prefix.
        ("' OR '1'='1", vec!["Coffee 100% arabica"]),
        ("\\", vec![]),
        ("about kettle", vec!["Kettle"]),
    ] {
        let (found, _, total) = shop
            .list(ListProductsRequest {
                query: query.into(),
                page_size: 100,
                order_by: "id".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(names(&found), expected, "query {query:?}");
        assert_eq!(total, expected.len() as i64);
    }
    for bad in [
        ListProductsRequest { order_by: "stock".into(), ..Default::default() },
        ListProductsRequest { order_by: "name; DROP TABLE products".into(), ..Default::default() },
        ListProductsRequest { query: "x".repeat(201), ..Default::default() },
        ListProductsRequest { page_size: -5, ..Default::default() },
    ] {
        assert_eq!(shop.list(bad).await.unwrap_err().code(), Code::InvalidArgument);
    }
    assert_eq!(shop.list_all("", "", 50).await.len(), 6, "the table survived");
}

async fn page_tokens_only_continue_their_own_listing(backend: Backend) {
    let shop = Shop::open(backend).await;
    for i in 0..5 {
        shop.add(&format!("Tea {i}"), "1.00", 1).await;
    }
    let first = ListProductsRequest {
        page_size: 2,
        order_by: "name".into(),
        query: "tea".into(),
        ..Default::default()
    };
    let (_, token, _) = shop.list(first.clone()).await.unwrap();
    for changed in [
        ListProductsRequest { order_by: "price".into(), ..first.clone() },
        ListProductsRequest { query: "coffee".into(), ..first.clone() },
    ] {
        let err = shop.list(ListProductsRequest { page_token: token.clone(), ..changed }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // A forged token can only point into the same listing.
    let forged = URL_SAFE_NO_PAD.encode(r#"{"f":"AAAAAAAAAAAAAAAA","v":"","i":0}"#);
    let err = shop.list(ListProductsRequest { page_token: forged, ..first.clone() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Changing only the page size is fine.
    let (rest, next, _) =
        shop.list(ListProductsRequest { page_token: token, page_size: 10, ..first }).await.unwrap();
    assert_eq!(names(&rest), ["Tea 2", "Tea 3", "Tea 4"]);
    assert!(next.is_empty());
}

async fn ten_thousand_products_page_by_page_each_exactly_once(backend: Backend) {
    let shop = Shop::open(backend.clone()).await;
    let db = shop.stack.db.open().await;
    // Bulk-loaded straight into the table: the listing is under test, not 10,000 creates.
    for chunk in 0..20 {
        let rows: Vec<String> = (0..500)
            .map(|i| {
                let n = chunk * 500 + i;
                // Many equal prices and names, so ties must be broken by id.
                let price = format!("{}.{:02}", n % 7, n % 3);
                // Each backend's stored forms: SQLite fixed-width price text and
                // RFC 3339 time text, MySQL DECIMAL and DATETIME(6).
                let (price, time) = match backend {
                    Backend::Sqlite => (format!("{:0>13}", price), "2026-01-01T00:00:00+00:00"),
                    Backend::MySql(_) => (price, "2026-01-01 00:00:00.000000"),
                };
                format!("('Item {}', '', '{price}', 1, 1, '{time}', '{time}')", n % 50)
            })
            .collect();
        let sql = format!(
            "INSERT INTO products (name, description, price, stock, version, create_time, update_time) VALUES {}",
            rows.join(", ")
        );
        on_db!(&db, pool => sqlx::query(&sql).execute(pool).await.map(drop)).unwrap();
    }
    for (order_by, page_size) in [("", 1000), ("price desc", 337), ("name", 999), ("create_time", 1000)] {
        let all = shop.list_all(order_by, "", page_size).await;
        let ids: HashSet<i64> = all.iter().map(|p| p.id).collect();
        assert_eq!((all.len(), ids.len()), (10_000, 10_000), "order_by {order_by:?}");
    }
    let by_price = shop.list_all("price", "", 1000).await;
    assert!(
        by_price.windows(2).all(|w| {
            let key = |p: &Product| (p.price.parse::<f64>().unwrap_or_default() * 100.0).round() as i64;
            (key(&w[0]), w[0].id) < (key(&w[1]), w[1].id)
        }),
        "sorted by price, then id"
    );
}

async fn unicode_names_round_trip_exactly(backend: Backend) {
    let shop = Shop::open(backend).await;
    for name in ["Théière 🫖 茶壶", "e\u{301}clair (combining accent)", "Ω≈ç√∫˜µ≤≥÷", "🧑‍🍳👩🏽‍🔧"]
    {
        let created = shop.add(name, "1.00", 1).await;
        assert_eq!(created.name, name);
        assert_eq!(shop.get(created.id).await.name, name);
    }
    // 200 characters of 4 bytes each fit; 201 do not.
    assert_eq!(shop.add(&"🫖".repeat(200), "1", 1).await.name.chars().count(), 200);
    let err = shop.create_with_id(product(&"🫖".repeat(201), "1", 1), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

fn user_id_of(token: &str) -> i64 {
    let payload: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    payload["sub"].as_str().unwrap().parse().unwrap()
}

async fn audit_fields_say_who_and_when(backend: Backend) {
    let shop = Shop::open(backend).await;
    let before = chrono::Utc::now();
    let created = shop.add("Clock", "45.00", 2).await;
    let creator = user_id_of(&shop.token);
    assert_eq!((created.created_by, created.updated_by), (creator, creator));
    let created_at = created.create_time.unwrap();
    assert!(
        created_at.seconds >= before.timestamp() - 1
            && created_at.seconds <= chrono::Utc::now().timestamp() + 1
    );

    let other = shop.stack.admin_token("assistant").await;
    let request = UpdateProductRequest {
        product: Some(Product { id: created.id, price: "40.00".into(), ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["price".into()] }),
    };
    let updated =
        shop.stack.products().await.update_product(bearer(request, &other)).await.unwrap().into_inner();
    assert_eq!(updated.created_by, creator);
    assert_eq!(updated.updated_by, user_id_of(&other));
    assert_eq!(updated.create_time, created.create_time);
    let (c, u) = (updated.create_time.unwrap(), updated.update_time.unwrap());
    assert!((u.seconds, u.nanos) > (c.seconds, c.nanos));

    // Audit fields are the server's: a mask cannot name them.
    let request = UpdateProductRequest {
        product: Some(Product { id: created.id, created_by: 999, ..Default::default() }),
        update_mask: Some(prost_types::FieldMask { paths: vec!["created_by".into()] }),
    };
    let err = shop.stack.products().await.update_product(bearer(request, &other)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn database_errors_never_leak(backend: Backend) {
    let shop = Shop::open(backend).await;
    let cup = shop.add("Cup", "3.00", 1).await;
    let db = shop.stack.db.open().await;
    on_db!(&db, pool => sqlx::query("DROP TABLE products").execute(pool).await.map(drop)).unwrap();
    let err = shop
        .stack
        .products()
        .await
        .get_product(bearer(GetProductRequest { id: cup.id }, &shop.token))
        .await
        .unwrap_err();
    assert!(matches!(err.code(), Code::Internal | Code::Unavailable), "{err:?}");
    for leak in ["SELECT", "products", "sqlite", "mysql", "table"] {
        assert!(
            !err.message().to_lowercase().contains(&leak.to_lowercase()),
            "{leak} in {:?}",
            err.message()
        );
    }
}
