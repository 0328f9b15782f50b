//! The product store's own read paths (in-line on SQLite, read connections
//! of their own and shared statements on MySQL): the same answers as the
//! pool's, and connections the server dropped replaced before use. Real
//! servers, SQLite and MySQL.

use std::sync::Arc;

use storegate::{Db, on_db};
use storegate_testkit::{Backend, backend_tests};

mod common;

use common::{Shop, product};

backend_tests!(
    hot_read_paths_return_what_the_pool_returns,
    connections_the_server_dropped_are_replaced_before_use,
);

/// Gets and unfiltered listings have their own read path (on SQLite in-line
/// on the calling thread, store::sqlite_reads; on MySQL connections
/// without a ping per query, store::mysql_reads); they must return
/// exactly what the pool's reads return, for every listing shape, and on
/// SQLite give way to the pool for a row they cannot read (here: a time
/// written by hand in another format).
async fn hot_read_paths_return_what_the_pool_returns(backend: Backend) {
    use product_service::{
        domain::{OrderBy, SortField},
        page_token::Cursor,
        store::{ListQuery, ProductStore},
    };
    let is_sqlite = matches!(backend, Backend::Sqlite);
    let shop = Shop::open(backend).await;
    let (mut ids, mut names) = (Vec::new(), Vec::new());
    for i in 0..23 {
        // Repeated names and prices, so that ties are broken by id.
        let name = format!("{} item {}", ["Teapot", "Mug", "Tray"][i % 3], i % 5);
        ids.push(shop.add(&name, &format!("{}.50", i % 4), i as i64).await.id);
        names.push(name.to_lowercase());
    }
    let db = shop.stack.db.open().await;
    // One read connection on MySQL, so that concurrent reads surely queue
    // and share statements (below).
    let store = ProductStore::with_read_connections(db.clone(), 1).await;
    let pool = ProductStore::pool_only(db.clone());

    for &id in ids.iter().chain([&999_999]) {
        assert_eq!(store.get(id).await.unwrap(), pool.get(id).await.unwrap(), "product {id}");
    }
    // At once, as under load: on MySQL, gets and pages waiting for a read
    // connection share statements (store::shared_reads), yet each
    // caller gets its own answer, a missing or repeated id included.
    let asked: Vec<i64> =
        (0..96).map(|i| if i % 7 == 0 { 999_999 } else { ids[i * 5 % ids.len()] }).collect();
    let gets: Vec<_> = asked
        .iter()
        .map(|&id| {
            tokio::spawn({
                let store = store.clone();
                async move { store.get(id).await.unwrap() }
            })
        })
        .collect();
    let first_page = |order| ListQuery { order, query: None, after: None, limit: 4 };
    let orders = [SortField::Id, SortField::Name].map(|field| OrderBy { field, descending: false });
    let pages: Vec<_> = (0..32)
        .map(|i| {
            tokio::spawn({
                let store = store.clone();
                async move { store.list(&first_page(orders[i % 2])).await.unwrap() }
            })
        })
        .collect();
    for (get, id) in gets.into_iter().zip(&asked) {
        assert_eq!(get.await.unwrap(), pool.get(*id).await.unwrap(), "product {id}");
    }
    for (i, page) in pages.into_iter().enumerate() {
        let (page, expected) = (page.await.unwrap(), pool.list(&first_page(orders[i % 2])).await.unwrap());
        assert_eq!((page.rows, page.total_size), (expected.rows, expected.total_size));
    }
    let mut inline_listings = 0;
    for field in [SortField::Id, SortField::Name, SortField::Price, SortField::CreateTime] {
        for descending in [false, true] {
            for (query, word) in [(None, ""), (Some("mug"), "mug"), (Some("TEAPOT ite"), "teapot")] {
                let order = OrderBy { field, descending };
                let mut after: Option<Cursor> = None;
                let mut seen = 0;
                loop {
                    let q = ListQuery { order, query, after: after.as_ref(), limit: 4 };
                    let (inline, pooled) = (store.list(&q).await.unwrap(), pool.list(&q).await.unwrap());
                    assert_eq!(inline.rows, pooled.rows, "{order:?} {query:?} after {after:?}");
                    assert_eq!(inline.total_size, pooled.total_size);
                    // Only unfiltered pages are read in-line; a search reads
                    // the full-text index through the pool.
                    inline_listings += usize::from(query.is_none());
                    seen += inline.rows.len();
                    let Some(last) = inline.rows.last() else { break };
                    after = Some(Cursor::after(&last.clone().into_product().unwrap(), order).unwrap());
                }
                // Descriptions are "About <name>": a match is a name's match.
                let expected = match query {
                    None => 23,
                    Some(_) => names.iter().filter(|n| n.contains(word)).count(),
                };
                assert_eq!(seen, expected, "{order:?} {query:?}");
            }
        }
    }
    // What the read paths did, as the metrics endpoint says it.
    let metrics = storegate::metrics::Metrics::new("product-service");
    store.register_read_metrics(&metrics);
    let scrape = || metrics.render(&db);
    let figure = |text: &str, name: &str| -> Option<u64> {
        text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let text = scrape();
    if is_sqlite {
        let at_once = (asked.len() + 32) as u64;
        assert_eq!(
            figure(&text, "storegate_db_inline_reads_total"),
            Some(24 + inline_listings as u64 + at_once),
            "every read that could was done in-line:\n{text}"
        );
        assert_eq!(figure(&text, "storegate_db_inline_reads_gave_way_total"), Some(0));
        assert_eq!(figure(&text, "storegate_db_read_connections_idle"), None, "no MySQL read connections");
    } else {
        assert_eq!(figure(&text, "storegate_db_inline_reads_total"), None, "no in-line reads on MySQL");
        // There, gets and keyset pages go through connections of their own.
        assert_eq!(figure(&text, "storegate_db_read_connections_idle"), Some(1), "{text}");
        let statements = figure(&text, "storegate_db_shared_get_statements_total").unwrap();
        let answers = figure(&text, "storegate_db_shared_get_answers_total").unwrap();
        assert!(answers > statements, "gets shared statements: {answers} answers, {statements} statements");
    }
    // A store that reads only through the pool has no read path of its own.
    let pool_metrics = storegate::metrics::Metrics::new("product-service");
    pool.register_read_metrics(&pool_metrics);
    assert!(!pool_metrics.render(&db).contains("storegate_db_read_connections_idle"));

    // A row whose times were written by hand in SQL's own format.
    on_db!(&db, pool => {
        sqlx::query(
            "UPDATE products SET create_time = '2026-01-02 03:04:05', update_time = '2026-01-02 03:04:05' \
             WHERE id = ?",
        )
        .bind(ids[0])
        .execute(pool)
        .await
        .map(drop)
    })
    .unwrap();
    let row = store.get(ids[0]).await.unwrap().expect("the product");
    assert_eq!(row.create_time.to_rfc3339(), "2026-01-02T03:04:05+00:00");
    assert_eq!(Some(row), pool.get(ids[0]).await.unwrap());
    if is_sqlite {
        let text = scrape();
        assert_eq!(
            figure(&text, "storegate_db_inline_reads_gave_way_total"),
            Some(1),
            "read through the pool instead"
        );
    }
    db.close().await;
}

/// Both MySQL paths skip the ping before each use for a connection that was
/// just returned, but check one that sat idle: after the server drops every
/// connection, no call fails, neither reads (product-service's read
/// connections) nor writes (the pool). SQLite has no server to drop
/// connections.
async fn connections_the_server_dropped_are_replaced_before_use(backend: Backend) {
    if matches!(backend, Backend::Sqlite) {
        return;
    }
    let shop = Arc::new(Shop::open(backend).await);
    let kettle = shop.add("Kettle", "30.00", 3).await;
    let gets = |shop: Arc<Shop>| async move {
        let calls: Vec<_> = (0..32)
            .map(|_| {
                tokio::spawn({
                    let shop = shop.clone();
                    async move { shop.get(kettle.id).await }
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.expect("get after the drop").name, "Kettle");
        }
    };
    // Many pooled connections, then all of them dropped by the server.
    gets(shop.clone()).await;
    let db = shop.stack.db.open().await;
    let Db::MySql(pool) = &db else { unreachable!() };
    let mut own = pool.acquire().await.unwrap();
    let others: Vec<i64> = sqlx::query_scalar(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND ID <> CONNECTION_ID()",
    )
    .fetch_all(&mut *own)
    .await
    .unwrap();
    assert!(others.len() > 1, "the services hold pooled connections");
    for id in others {
        // A connection may end by itself meanwhile.
        let _ = sqlx::query(&format!("KILL {id}")).execute(&mut *own).await;
    }
    drop(own);
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    gets(shop.clone()).await;
    // Writes go through the pool, whose connections were dropped too.
    let writes: Vec<_> = (0..16)
        .map(|i| {
            let shop = shop.clone();
            tokio::spawn(
                async move { shop.create_with_id(product(&format!("Cup {i}"), "4.00", 1), "").await },
            )
        })
        .collect();
    for write in writes {
        write.await.unwrap().expect("a write after the drop");
    }
    db.close().await;
}
