//! Searches of common words (more matches than SEARCH_INDEX_MAX_MATCHES,
//! here 250 in a catalogue of 3,000): not run on the full-text index but
//! matched over a bounded read of the catalogue, with the index's semantics.
//! In a column's order the pages are the index's pages, short ones (even
//! empty) with a token where the bound on rows read stopped a page; by
//! relevance the newest matches are ranked. Real servers, SQLite and MySQL.

use std::time::{Duration, Instant};

use chrono::Utc;
use product_service::{
    domain::{OrderBy, Price},
    search_sample::SearchBounds,
    store::{ListQuery, ProductFields, ProductStore, SearchLabels},
};
use storegate::pb::product::v1::{ListProductsRequest, Product};
use storegate_testkit::{Backend, TestStack, backend_tests};

mod common;

use common::Shop;

backend_tests!(
    common_words_page_as_the_index_does_in_every_column_order,
    a_page_stopped_by_the_bound_is_short_and_goes_on,
    common_words_by_relevance_rank_the_newest_matches,
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
    // wait until the last product is found there.
    let deadline = Instant::now() + Duration::from_secs(2);
    while shop.list_all("id", &format!("m{}x", CATALOGUE - 1), 10).await.is_empty()
        && Instant::now() < deadline
    {
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
    let (mut found, mut pages, mut short_pages, mut token) = (Vec::new(), 0, 0, String::new());
    loop {
        let request = ListProductsRequest {
            query: "teapot with".into(),
            order_by: "price".into(),
            page_size: 50,
            page_token: token.clone(),
        };
        let (products, next, _) = shop.list(request).await.unwrap();
        assert!(products.len() <= 50);
        pages += 1;
        if products.len() < 50 && !next.is_empty() {
            short_pages += 1;
        }
        found.extend(products);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    assert_eq!(names(&found), expected.iter().map(|(_, i)| product(*i).name).collect::<Vec<_>>());
    let read_per_call = SearchBounds::for_index_matches(INDEX_MATCHES).rows_read;
    assert_eq!(read_per_call, 500);
    assert!(short_pages >= 2700 / read_per_call, "{short_pages} short pages of {pages}");
}

async fn common_words_by_relevance_rank_the_newest_matches(backend: Backend) {
    let shop = shop(backend).await;
    let (first, _, total_size) = shop
        .list(ListProductsRequest { query: "with".into(), page_size: 2, ..Default::default() })
        .await
        .unwrap();
    assert_eq!(first.len(), 2);
    assert!((2_700..=3_300).contains(&total_size), "an estimate of 3,000: {total_size}");
    // A fiftieth of the bound: the 5 newest products, each once.
    let ranked = SearchBounds::for_index_matches(INDEX_MATCHES).ranked_matches;
    assert_eq!(ranked, 5);
    let found = shop.list_all("relevance", "with", 2).await;
    let mut ids: Vec<i64> = found.iter().map(|p| p.id).collect();
    assert_eq!(names(&found[..2]), names(&first), "the first page is the same");
    ids.sort();
    let newest: Vec<String> = (CATALOGUE - ranked..CATALOGUE).map(|i| product(i).name).collect();
    let mut found_names = names(&found);
    found_names.sort_by_key(|name| newest.iter().position(|n| n == name));
    assert_eq!(found_names, newest);
    ids.dedup();
    assert_eq!(ids.len(), ranked);
    // Ranked: shorter texts with the word first. The newest five, 2995 to
    // 2999, all have names of 3 words; 2996 alone has the longer
    // description ("Crème finish, made with care"), so it ranks last.
    assert_eq!(found.last().unwrap().name, product(2996).name, "{found:?}");
}

async fn rare_words_are_still_searched_on_the_index(backend: Backend) {
    let shop = shop(backend).await;
    let (found, next, total_size) =
        shop.list(ListProductsRequest { query: "teapot m20x".into(), ..Default::default() }).await.unwrap();
    assert_eq!((names(&found), next.as_str(), total_size), (vec![product(20).name], "", 1));

    // The store says which path each search took.
    let store = ProductStore::new(shop.stack.db.open().await)
        .await
        .with_search_bounds(SearchBounds::for_index_matches(INDEX_MATCHES));
    let counts = store.search_counts();
    let taken = |path| counts.get_or_create(&SearchLabels { path }).get();
    // By relevance a rare word's matches are found in one statement (few);
    // in a column's order, page and count are two (index).
    for (query, order, path) in [
        ("with", "relevance", "broad"),
        ("m17x", "relevance", "few"),
        ("teapot m20", "relevance", "few"),
        ("teapot m20", "price", "index"),
        ("iron teapot", "relevance", "broad"),
    ] {
        let before = ["broad", "few", "index"].map(taken);
        let order = OrderBy::parse(order).unwrap();
        let page = store.list(&ListQuery { order, query: Some(query), after: None, limit: 5 }).await.unwrap();
        assert_eq!(page.broad, path == "broad", "{query}");
        let after = ["broad", "few", "index"].map(taken);
        let counted: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        let expected: Vec<u64> = ["broad", "few", "index"].iter().map(|p| u64::from(*p == path)).collect();
        assert_eq!(counted, expected, "{query} by {order:?}: counted as broad, few, index");
        assert!(!page.rows.is_empty(), "{query}");
    }
}
