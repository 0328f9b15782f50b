//! Searches of common words (more matches than SEARCH_INDEX_MAX_MATCHES,
//! here 250 in a catalogue of 3,000, or words whose lists together are
//! longer): not run on the full-text index but matched over a bounded read
//! of the catalogue, with the index's semantics. In a column's order the
//! pages are the index's pages, short ones (even empty) with a token where
//! the bound on rows read stopped a page; by relevance the newest products
//! are ranked window by window. A rare word among common ones is anchored:
//! the engine finds the rare word's products, and every match is kept.
//! Real servers, SQLite and MySQL.

use std::time::{Duration, Instant};

use chrono::Utc;
use product_service::{
    domain::{OrderBy, Price},
    page_token::{Cursor, Ranked},
    search_sample::{ReadCosts, SearchBounds},
    store::{ListQuery, ProductFields, ProductStore, SearchLabels},
};
use storegate::pb::product::v1::{ListProductsRequest, Product};
use storegate_testkit::{Backend, TestStack, backend_tests};

mod common;

use common::Shop;

backend_tests!(
    common_words_page_as_the_index_does_in_every_column_order,
    a_page_stopped_by_the_bound_is_short_and_goes_on,
    common_words_by_relevance_rank_window_by_window,
    common_words_with_few_matches_together_read_a_bounded_catalogue,
    a_rare_word_among_common_ones_anchors_the_search,
    rare_words_are_still_searched_on_the_index,
);

/// SEARCH_INDEX_MAX_MATCHES of these tests: a broad search reads at most
/// 500 products and ranks the newest 5 matches.
const INDEX_MATCHES: u32 = 250;
const CATALOGUE: usize = 3_000;

/// Product `i` of the catalogue: every description has "with"; one in ten
/// names is a teapot, priced above every other product; one in seven
/// descriptions has "Crème"; every name has its own model word `m{i}x`.
fn product(i: usize) -> ProductFields {
    let teapot = i.is_multiple_of(10);
    let name = if teapot { format!("Cast iron teapot m{i}x") } else { format!("Oak shelf m{i}x") };
    let cream = if i.is_multiple_of(7) { "Crème finish, " } else { "" };
    let price = if teapot { 500 + i / 10 } else { 1 + i % 400 };
    ProductFields {
        name,
        description: format!("{cream}made with care"),
        price: Price::parse(&format!("{price}.00")).unwrap(),
        stock: 1,
    }
}

/// A shop whose product-service has the small search bound, over the
/// catalogue imported in bulk.
async fn shop(backend: Backend) -> Shop {
    let mut stack = TestStack::start_auth(backend).await;
    stack.add_product(|config| config.search_index_max_matches = INDEX_MATCHES).await;
    let token = stack.admin_token("shopkeeper").await;
    let store = ProductStore::pool_only(stack.db.open().await);
    let products: Vec<ProductFields> = (0..CATALOGUE).map(product).collect();
    store.import(&products, None, Utc::now()).await.unwrap();
    let shop = Shop { stack, token };
    // MariaDB adds a bulk import to its full-text index as the commit ends:
    // wait until the last product is found there (seconds, when other
    // tests load the server).
    let deadline = Instant::now() + Duration::from_secs(60);
    while shop.list_all("id", &format!("m{}x", CATALOGUE - 1), 10).await.is_empty() {
        assert!(Instant::now() < deadline, "the import never reached the full-text index");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shop
}

/// Product `i`'s name (the catalogue's ids follow `i` in order).
fn names(products: &[Product]) -> Vec<String> {
    products.iter().map(|p| p.name.clone()).collect()
}

async fn common_words_page_as_the_index_does_in_every_column_order(backend: Backend) {
    let shop = shop(backend).await;
    let matching = |i: &usize| i.is_multiple_of(7);
    let all: Vec<(usize, ProductFields)> = (0..CATALOGUE).filter(matching).map(|i| (i, product(i))).collect();
    for order_by in ["price", "price desc", "name", "name desc", "id desc", "create_time"] {
        let mut expected = all.clone();
        match order_by {
            "price" => expected.sort_by_key(|(i, p)| (p.price, *i)),
            "price desc" => expected.sort_by_key(|(i, p)| std::cmp::Reverse((p.price, *i))),
            "name" => expected.sort_by(|(i, a), (j, b)| a.name.cmp(&b.name).then(i.cmp(j))),
            "name desc" => expected.sort_by(|(i, a), (j, b)| b.name.cmp(&a.name).then(j.cmp(i))),
            "id desc" => expected.reverse(),
            _ => {}
        }
        let expected: Vec<String> = expected.into_iter().map(|(_, p)| p.name).collect();
        // "Crème" found as "creme", the last word as a prefix, "with" in
        // every product: 429 matches, more than the index is given.
        let found = shop.list_all(order_by, "with CREM", 37).await;
        assert_eq!(names(&found), expected, "{order_by}");
    }
    let (page, _, total_size) = shop
        .list(ListProductsRequest {
            query: "with crem".into(),
            order_by: "price".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 5);
    assert!((300..=560).contains(&total_size), "an estimate of 429: {total_size}");
}

async fn a_page_stopped_by_the_bound_is_short_and_goes_on(backend: Backend) {
    let shop = shop(backend).await;
    // The 300 teapots cost more than the 2,700 other products: in price
    // order a broad search reads 500 products per call, so the first
    // calls find none and say where to go on.
    let mut expected: Vec<(Price, usize)> =
        (0..CATALOGUE).filter(|i| i.is_multiple_of(10)).map(|i| (product(i).price, i)).collect();
    expected.sort();
    let answers = pages(&shop, "teapot with", "price", 50).await;
    let short_pages = answers.iter().filter(|answer| answer.products.len() < 50 && answer.more).count();
    let found = all_of(&answers);
    assert_eq!(names(&found), expected.iter().map(|(_, i)| product(*i).name).collect::<Vec<_>>());
    let read_per_call = SearchBounds::for_index_matches(INDEX_MATCHES).rows_read;
    assert_eq!(read_per_call, 500);
    assert!(short_pages >= 2700 / read_per_call, "{short_pages} short pages of {}", answers.len());
}

async fn common_words_by_relevance_rank_window_by_window(backend: Backend) {
    let shop = shop(backend).await;
    let (first, _, total_size) = shop
        .list(ListProductsRequest { query: "with".into(), page_size: 2, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(first.len(), 2);
    assert!((2_700..=3_300).contains(&total_size), "an estimate of 3,000: {total_size}");
    // Windows of at least a fiftieth of the bound (5) matches among at
    // most a quarter of the rows read per call (125 products).
    let ranked = SearchBounds::for_index_matches(INDEX_MATCHES).ranked_matches;
    assert_eq!(ranked, 5);
    let found = shop.list_all("relevance", "with", 7).await;
    assert_eq!(names(&found[..2]), names(&first), "the first page is the same");
    let mut ids: Vec<i64> = found.iter().map(|p| p.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!((found.len(), ids.len()), (CATALOGUE, CATALOGUE), "every match, each once");
    // Ranked within recency: no product is further from its place newest
    // first than a window's length.
    let newest_first: Vec<i64> = {
        let mut ids = ids.clone();
        ids.reverse();
        ids
    };
    for (place, product) in found.iter().enumerate() {
        let by_age = newest_first.iter().position(|id| *id == product.id).unwrap();
        assert!(place.abs_diff(by_age) < 2 * ranked, "{} at {place}, {by_age} by age", product.name);
    }
    // Ranked: shorter texts with the word first. Of the newest five, 2995
    // to 2999, all have names of 3 words and 2996 alone has the longer
    // description ("Crème finish, made with care"): last of them.
    let place = |i: usize| found.iter().position(|p| p.name == product(i).name).unwrap();
    for i in [2995, 2997, 2998, 2999] {
        assert!(place(i) < place(2996), "{i} before 2996: {:?}", names(&found[..8]));
    }
}

/// One page of a listing as the API answered it.
struct Answer {
    products: Vec<Product>,
    total_size: i64,
    /// A next_page_token came with it.
    more: bool,
}

/// Every page of a listing through the API, each as answered.
async fn pages(shop: &Shop, query: &str, order_by: &str, page_size: i32) -> Vec<Answer> {
    let (mut answers, mut page_token) = (Vec::new(), String::new());
    loop {
        let request =
            ListProductsRequest { query: query.into(), order_by: order_by.into(), page_size, page_token };
        let (products, next, total_size) = shop.list(request).await.unwrap();
        answers.push(Answer { products, total_size, more: !next.is_empty() });
        if next.is_empty() {
            return answers;
        }
        page_token = next;
    }
}

/// The products of these pages, in order.
fn all_of(answers: &[Answer]) -> Vec<Product> {
    answers.iter().flat_map(|answer| answer.products.clone()).collect()
}

/// The engine's answer to a search, every page of it: a store without a
/// bound on its matches.
async fn engine_answer(shop: &Shop, query: &str, order: &str) -> Vec<String> {
    let store = ProductStore::new(shop.stack.db.open().await)
        .await
        .with_search_bounds(SearchBounds::for_index_matches(1_000_000));
    let order = OrderBy::parse(order).unwrap();
    let page =
        store.list(&ListQuery { order, query: Some(query), after: None, limit: 10_000 }).await.unwrap();
    page.rows.into_iter().map(|row| row.name).collect()
}

/// How a store answered a search: the path counted, and the page's.
async fn path_of(store: &ProductStore, query: &str, order: &str) -> &'static str {
    let counts = store.search_counts();
    let taken = |path| counts.get_or_create(&SearchLabels { path }).get();
    let paths = ["broad", "few", "index", "anchored"];
    let before = paths.map(taken);
    let order = OrderBy::parse(order).unwrap();
    let page = store.list(&ListQuery { order, query: Some(query), after: None, limit: 5 }).await.unwrap();
    let counted: Vec<&str> = paths
        .iter()
        .zip(before)
        .filter(|(path, before)| taken(path) > *before)
        .map(|(path, _)| *path)
        .collect();
    assert_eq!(counted.len(), 1, "{query} by {order:?}: one path counted, {counted:?}");
    assert_eq!(page.path.map(|path| path.label()), Some(counted[0]), "{query}: the page says the same");
    counted[0]
}

/// Every page of a search on a store, its tokens as the service makes
/// them (the store's cursor for a row where it gives one, the row's own
/// otherwise, or where a short page says to go on).
async fn store_pages(store: &ProductStore, query: &str, order: &str, page_size: usize) -> Vec<Answer> {
    let order = OrderBy::parse(order).unwrap();
    let (mut answers, mut after) = (Vec::new(), None::<Cursor>);
    loop {
        let q = ListQuery { order, query: Some(query), after: after.as_ref(), limit: page_size as i64 + 1 };
        let page = store.list(&q).await.unwrap();
        let kept = page.rows.len().min(page_size);
        let products: Vec<Product> =
            page.rows.into_iter().take(kept).map(|row| row.into_product().unwrap()).collect();
        let next = if kept < page_size {
            page.resume
        } else if let Some(cursor) = page.cursors.get(kept - 1) {
            Some(cursor.clone())
        } else {
            Some(Cursor::after(&products[kept - 1], order).unwrap())
        };
        answers.push(Answer { products, total_size: page.total_size, more: next.is_some() });
        match next {
            Some(next) => after = Some(next),
            None => return answers,
        }
    }
}

async fn common_words_with_few_matches_together_read_a_bounded_catalogue(backend: Backend) {
    let sqlite = matches!(backend, Backend::Sqlite);
    let shop = shop(backend).await;
    // "with" in every product, 300 teapots and 429 "Crème" descriptions,
    // 43 products with all three, none of the words rare.
    let query = "with teapot crem";
    let expected: Vec<usize> = (0..CATALOGUE).filter(|i| i.is_multiple_of(70)).collect();
    let mut by_price = expected.clone();
    by_price.sort_by_key(|i| (product(*i).price, *i));
    let by_price: Vec<String> = by_price.iter().map(|i| product(*i).name).collect();
    let mut every_match: Vec<String> = expected.iter().map(|i| product(*i).name).collect();
    every_match.sort();
    let sorted = |products: Vec<Product>| {
        let mut names = names(&products);
        names.sort();
        names
    };
    assert_eq!(engine_answer(&shop, query, "price").await, by_price);

    // The engine would read the three lists, 3,729 entries: more than
    // InnoDB reads in the time a broad search's 500 products take (1,500
    // entries), fewer than FTS5 does (10,000). The same answers either way.
    let store = ProductStore::new(shop.stack.db.open().await)
        .await
        .with_search_bounds(SearchBounds::for_index_matches(INDEX_MATCHES));
    let expected_path = if sqlite { "index" } else { "broad" };
    assert_eq!(path_of(&store, query, "price").await, expected_path);
    assert_eq!(names(&shop.list_all("price", query, 10).await), by_price);
    assert_eq!(sorted(shop.list_all("relevance", query, 4).await), every_match);

    // The bounded read itself, on both databases: a store that weighs
    // reads as InnoDB's are weighed.
    let innodb = ReadCosts::of(storegate::db::Backend::MySql);
    let bounded = ProductStore::new(shop.stack.db.open().await).await.with_search_bounds(SearchBounds {
        costs: Some(innodb),
        ..SearchBounds::for_index_matches(INDEX_MATCHES)
    });
    assert_eq!(path_of(&bounded, query, "price").await, "broad");
    assert_eq!(path_of(&bounded, query, "relevance").await, "broad");
    // In a column's order: the engine's pages, short ones where 500
    // products read held fewer matches than asked.
    let answers = store_pages(&bounded, query, "price", 10).await;
    for answer in &answers {
        let total_size = answer.total_size;
        assert!((20..=70).contains(&total_size), "an estimate of 43: {total_size}");
    }
    assert_eq!(names(&all_of(&answers)), by_price);
    let short = answers.iter().filter(|answer| answer.products.len() < 10 && answer.more).count();
    assert!(short >= 2_700 / 500, "{short} short pages of {}: at most 500 products read each", answers.len());
    // By relevance: every match once, window after window.
    let answers = store_pages(&bounded, query, "relevance", 4).await;
    assert_eq!(sorted(all_of(&answers)), every_match);

    // A token cannot send a search to the engine that may not read its
    // words' lists: refused as expired. One whose lists it may read (729
    // entries) goes on.
    let engine_token = Cursor::Ranked(Ranked::Engine { score: 1.0, id: 1 });
    let relevance = OrderBy::parse("relevance").unwrap();
    let q = ListQuery { order: relevance, query: Some(query), after: Some(&engine_token), limit: 5 };
    let refused = bounded.list(&q).await.err().map(tonic::Status::from).expect("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("expired"), "{}", refused.message());
    let q = ListQuery { query: Some("teapot crem"), ..q };
    assert!(bounded.list(&q).await.is_ok(), "the engine may answer it");
}

async fn a_rare_word_among_common_ones_anchors_the_search(backend: Backend) {
    let shop = shop(backend).await;
    let store = ProductStore::new(shop.stack.db.open().await)
        .await
        .with_search_bounds(SearchBounds::for_index_matches(INDEX_MATCHES));
    // "with" is in every product, m299 begins 11 model words (m299x,
    // m2990x..m2999x): the engine is asked for those 11 only.
    for order in ["relevance", "price", "name desc", "id"] {
        assert_eq!(path_of(&store, "with m299", order).await, "anchored", "{order}");
    }
    let expected: Vec<usize> = [299].into_iter().chain(2990..3000).collect();
    for order in ["price", "price desc", "name", "name desc", "create_time", "id desc"] {
        let engine = engine_answer(&shop, "with m299", order).await;
        assert_eq!(engine.len(), expected.len(), "{order}");
        for page_size in [1, 4, 11] {
            let answers = pages(&shop, "with m299", order, page_size).await;
            for answer in &answers {
                assert_eq!(answer.total_size, 11, "exact on every page: {order}");
                let full = answer.products.len() == page_size as usize;
                assert!(full || !answer.more, "only the last page short");
            }
            let found = all_of(&answers);
            assert_eq!(names(&found), engine, "{order}, {page_size} a page");
        }
    }
    // By relevance, ranked as a whole: the shortest texts first, and the
    // one teapot (2990, "Cast iron teapot m2990x") and the one "Crème"
    // description (2996) ranked after the products of 3-word names
    // without it.
    let found = shop.list_all("relevance", "with m299", 3).await;
    let mut sorted = names(&found);
    sorted.sort();
    let mut all: Vec<String> = expected.iter().map(|i| product(*i).name).collect();
    all.sort();
    assert_eq!(sorted, all, "every match once");
    let place = |i: usize| found.iter().position(|p| p.name == product(i).name).unwrap();
    for shorter in [299, 2991, 2992, 2993, 2994, 2995, 2997, 2998, 2999] {
        assert!(
            place(shorter) < place(2996) && place(shorter) < place(2990),
            "{shorter}: {:?}",
            names(&found)
        );
    }
    // A token cannot anchor on a common word (the engine would read its
    // whole list): refused as expired, as is one naming no word.
    let relevance = OrderBy::parse("relevance").unwrap();
    for term in [0, 7] {
        let forged = Cursor::Ranked(Ranked::Anchored { term, score: 1.0, id: 1 });
        let q = ListQuery { order: relevance, query: Some("with m299"), after: Some(&forged), limit: 5 };
        let refused = store.list(&q).await.err().map(|e| tonic::Status::from(e).code());
        assert_eq!(refused, Some(tonic::Code::InvalidArgument), "anchored on word {term}");
    }
    // A word the engine finds alone in few products, the others in none
    // of those: nothing, and no page token.
    let (found, next, total_size) =
        shop.list(ListProductsRequest { query: "teapot m2991".into(), ..Default::default() }).await.unwrap();
    assert_eq!((found.len(), next.as_str(), total_size), (0, "", 0));
}

async fn rare_words_are_still_searched_on_the_index(backend: Backend) {
    let shop = shop(backend).await;
    let (found, next, total_size) =
        shop.list(ListProductsRequest { query: "teapot m20x".into(), ..Default::default() }).await.unwrap();
    assert_eq!((names(&found), next.as_str(), total_size), (vec![product(20).name], "", 1));

    // The store says which path each search took. By relevance a rare
    // word's matches are found in one statement (few); in a column's
    // order, page and count are two (index).
    let store = ProductStore::new(shop.stack.db.open().await)
        .await
        .with_search_bounds(SearchBounds::for_index_matches(INDEX_MATCHES));
    for (query, order, path) in [
        ("with", "relevance", "broad"),
        ("m17x", "relevance", "few"),
        ("m2000x m200", "relevance", "few"),
        ("m2000x m200", "price", "index"),
        ("with m20x", "price", "anchored"),
        // 729 entries: within what either engine reads for a broad
        // search's bound.
        ("teapot crem", "price", "index"),
        ("iron teapot", "relevance", "broad"),
    ] {
        assert_eq!(path_of(&store, query, order).await, path, "{query} by {order}");
    }
}
