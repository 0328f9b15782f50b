//! One caller's searches, timed one at a time, on a catalogue kept between
//! runs: each query and order on the full-text index (as every search ran
//! before bounded searches) and as the service runs it now (the index, a
//! rare word looked up alone, or a bounded read for common words; see
//! `Sample::route`), with the rows of the page and the way it took. The
//! median of 5 runs of each. For BENCHMARKS.md ("Searches of common words",
//! "Routing searches by what they read").
//!
//!     cargo run --release -p storegate-bench --example search_probe -- \
//!         [sqlite:///tmp/probe.db | mysql://root@127.0.0.1:3306/probe] [SIZE] [QUERY …]
use std::time::Instant;

use product_service::{
    ProductConfig,
    domain::OrderBy,
    store::{ListQuery, ProductStore},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or("sqlite:///tmp/probe.db".into());
    let size: u64 = args.next().map_or(1_000_000, |s| s.parse().unwrap());
    let config = ProductConfig::with_database_url(&url);
    let db = config.common.open_database().await?;
    let store = ProductStore::new(db.clone()).await;
    // Every search on the full-text index, as before bounded searches.
    let on_index = ProductStore::new(db.clone())
        .await
        .with_search_bounds(product_service::search_sample::SearchBounds::for_index_matches(1_000_000));
    let have = store.count(None).await? as u64;
    let mut next = have;
    while next < size {
        let batch: Vec<_> =
            (next..(next + 10_000).min(size)).map(storegate_testkit::catalogue::product).collect();
        store.import(&batch, None, storegate::db::now()).await?;
        next += batch.len() as u64;
    }
    if have < size {
        store.optimize_search_index().await?;
        eprintln!("imported to {size}");
    }
    let queries: Vec<String> = std::env::args().skip(3).collect();
    let queries: Vec<String> = if queries.is_empty() {
        [
            "with",
            "the",
            "steel",
            "blue",
            "garden",
            "red blue",
            "steel te",
            "oak sto",
            "lamp",
            "rug",
            "desk ch",
            "zzzq",
            "with tojidan",
            "steel rapoze",
            "lamp zeromi",
        ]
        .map(String::from)
        .to_vec()
    } else {
        queries
    };
    for query in &queries {
        for order in ["relevance", "price", "price desc"] {
            let order = OrderBy::parse(order).unwrap();
            let mut line = format!("{query:>12} {:>12}", order.canonical());
            for store in [&on_index, &store] {
                let mut times = Vec::new();
                let mut info = String::new();
                for _ in 0..5 {
                    let started = Instant::now();
                    let page =
                        store.list(&ListQuery { order, query: Some(query), after: None, limit: 25 }).await?;
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                    info = format!(
                        "rows {} total {} {}",
                        page.rows.len(),
                        page.total_size,
                        page.path.map_or("", |path| path.label())
                    );
                }
                times.sort_by(f64::total_cmp);
                line.push_str(&format!(" | {:>8.2} ms {info:>28}", times[2]));
            }
            println!("{line}");
        }
    }
    Ok(())
}
