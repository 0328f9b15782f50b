//! storegate-catalogue: how reads, searches and writes hold up as the
//! catalogue grows. The catalogue is imported in bulk (ProductStore::import,
//! what `product-service import` runs) to each size in turn (default 10k,
//! 100k, 1M products: a shop's made-up products, see
//! `storegate_testkit::catalogue`), and at each size every scenario runs
//! round-robin with its ceiling:
//!
//! - `get`: GetProduct of random products; ceiling `store-get`, the
//!   service's own read path (`ProductStore::get`) without gRPC.
//! - `list`: ListProducts as shoppers browse (every order, page sizes
//!   10–100, first pages and further ones; see `traffic`); ceiling
//!   `store-list`, the same browsing through `ProductStore::list`.
//! - `search`: a mix of what shoppers type (`traffic::search`); ceiling
//!   `store-search`. `search-rare`: model names, tens of matches.
//! - `create`, `adjust`: CreateProduct, AdjustStock of random products.
//! - one caller alone: `first-page/1` (the first page of 50 in each order
//!   in turn) and `search-rare/1`.
//!
//! Every caller is a shopper of its own (its own account and token), as in
//! a shop; the server's own limits apply as configured.
//!
//!     cargo build --release --workspace --bins
//!     target/release/storegate-catalogue [--mysql-server-url mysql://root@127.0.0.1:3306] [--sizes 10000,100000,1000000]

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use product_service::{
    domain::OrderBy,
    page_token::Cursor,
    store::{ListQuery, ProductStore},
};
use rand::Rng;
use storegate::pb::{
    auth::v1::RefreshTokenRequest,
    product::v1::{
        AdjustStockRequest, CreateProductRequest, GetProductRequest, ListProductsRequest, Product,
        product_service_client::ProductServiceClient,
    },
};
use storegate_bench::{
    runner::{Outcome, measure},
    traffic::{self, Callers, ORDERS},
};
use storegate_testkit::{TestStack, bearer, catalogue};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "storegate-catalogue",
    about = "storegate's reads, searches and writes as the catalogue grows"
)]
struct Args {
    /// Run on a fresh database on this MySQL server instead of SQLite.
    #[arg(long)]
    mysql_server_url: Option<String>,
    /// The catalogue sizes, ascending: the catalogue is grown to each in turn.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u64, 100_000, 1_000_000])]
    sizes: Vec<u64>,
    /// Seconds per scenario at each size.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// Slices each scenario's time is cut into, run round-robin.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Calls in flight for the concurrent scenarios (and shoppers signed in).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Run only these scenarios (comma separated, e.g.
    /// `search-rare,store-search-rare`); all of them by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where the JSON results go.
    #[arg(long, default_value = "catalogue-results.json")]
    json: PathBuf,
}

/// Products per import transaction while seeding.
const SEED_BATCH: u64 = 10_000;

/// The scenarios of one size, in the order they run and print; `/1` runs
/// with one caller.
const SCENARIOS: [&str; 12] = [
    "first-page/1",
    "search-rare/1",
    "get",
    "store-get",
    "list",
    "store-list",
    "search",
    "store-search",
    "search-rare",
    "store-search-rare",
    "create",
    "adjust",
];

struct Bench {
    channel: Channel,
    store: ProductStore,
    /// One access token per concurrent caller.
    tokens: Arc<Vec<String>>,
    /// Products in the catalogue when the scenarios of a size start (ids
    /// 1..=size: a fresh database, imported in order).
    size: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    storegate::alloc::return_freed_memory_promptly();
    let args = Args::parse();
    let (backend, backend_name) = storegate_bench::backend(args.mysql_server_url.as_deref());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut stack = TestStack::start_auth_with(backend, |auth| {
        // Every shopper signs up from this one address.
        auth.login.registrations_per_client_per_hour = 0;
    })
    .await;
    stack.add_product(|_| {}).await;
    eprintln!("signing in {} shoppers …", args.concurrency);
    let mut refresh_tokens = Vec::new();
    for n in 0..args.concurrency {
        let (tokens, _) = stack.register_and_login(&format!("shopper{n}"), "correct horse battery").await;
        refresh_tokens.push(tokens.refresh_token);
    }
    let admin = stack.admin_token("catalogue-admin").await;
    let db = stack.db.open().await;
    let importer = ProductStore::pool_only(db.clone());
    let mut bench = Bench {
        channel: TestStack::channel(stack.product_addr.expect("product-service")).await,
        store: ProductStore::new(db.clone()).await,
        tokens: Arc::default(),
        size: 0,
    };

    let mut sizes = Vec::new();
    for &size in &args.sizes {
        let seeding = seed(&importer, bench.size, size).await?;
        bench.size = size;
        // Access tokens live minutes; the run may take longer.
        let mut tokens = Vec::new();
        for refresh_token in &mut refresh_tokens {
            let mut auth = stack.auth().await;
            let fresh = auth
                .refresh_token(RefreshTokenRequest { refresh_token: refresh_token.clone() })
                .await?
                .into_inner();
            *refresh_token = fresh.refresh_token;
            tokens.push(fresh.access_token);
        }
        tokens.push(admin.clone());
        bench.tokens = Arc::new(tokens);
        eprintln!("{size} products (seeded {:.1} s); scenarios:", seeding.as_secs_f64());
        let mut outcomes: Vec<Outcome> = Vec::new();
        let slice = Duration::from_secs(args.seconds) / args.rounds.max(1);
        let scenarios: Vec<&str> = SCENARIOS
            .iter()
            .copied()
            .filter(|name| args.only.is_empty() || args.only.iter().any(|o| o == name))
            .collect();
        for _ in 0..args.rounds.max(1) {
            for (i, name) in scenarios.iter().enumerate() {
                let concurrency = if name.ends_with("/1") { 1 } else { args.concurrency };
                let part = bench.run(name, concurrency, slice).await;
                match outcomes.get_mut(i) {
                    Some(outcome) => outcome.absorb(part),
                    None => outcomes.push(part),
                }
            }
        }
        sizes.push((size, seeding, outcomes));
    }

    println!(
        "\nstoregate-catalogue on {backend_name}, {cores} cores, {} s per scenario in {} round-robin slices\n",
        args.seconds, args.rounds
    );
    for (size, seeding, outcomes) in &sizes {
        let added = size - sizes.iter().take_while(|(s, ..)| s < size).last().map_or(0, |(s, ..)| *s);
        println!(
            "{size} products (the last {added} imported in {:.1} s, {:.0}/s)\n",
            seeding.as_secs_f64(),
            added as f64 / seeding.as_secs_f64()
        );
        println!("| scenario          | conc | req/s     | p50 ms  | p99 ms  | errors | vs ceiling |");
        println!("|-------------------|------|-----------|---------|---------|--------|------------|");
        for outcome in outcomes {
            println!("{}", outcome.table_row(17, false, ceiling_of(outcome, outcomes)));
        }
        println!();
    }
    if let (Some((small, _, first)), Some((large, _, last))) = (sizes.first(), sizes.last()) {
        println!("at {large} products, as a share of at {small}:");
        for (a, b) in first.iter().zip(last) {
            println!(
                "  {:<18} throughput {:>4.0}%   p50 {:>6.2} → {:>6.2} ms   p99 {:>6.2} → {:>6.2} ms",
                a.name,
                b.rps() / a.rps() * 100.0,
                ms(a.percentile(0.5)),
                ms(b.percentile(0.5)),
                ms(a.percentile(0.99)),
                ms(b.percentile(0.99)),
            );
        }
    }
    let results = serde_json::json!({
        "backend": backend_name,
        "cores": cores,
        "seconds_per_scenario": args.seconds,
        "sizes": sizes.iter().map(|(size, seeding, outcomes)| serde_json::json!({
            "products": size,
            "seed_seconds": seeding.as_secs_f64(),
            "scenarios": outcomes.iter().map(|o| o.json(ceiling_of(o, outcomes))).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    eprintln!("results written to {}", args.json.display());
    stack.stop().await;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A scenario's ceiling: the same calls on the store, without gRPC.
fn ceiling_of<'a>(outcome: &Outcome, outcomes: &'a [Outcome]) -> Option<(&'a str, f64)> {
    let ceiling = format!("store-{}", outcome.name);
    outcomes.iter().find(|o| o.name == ceiling).map(|o| (o.name.as_str(), o.rps()))
}

/// Grows the catalogue from `from` to `to` products by bulk import; how
/// long that took.
async fn seed(importer: &ProductStore, from: u64, to: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut next = from;
    while next < to {
        let end = (next + SEED_BATCH).min(to);
        let batch: Vec<_> = (next..end).map(catalogue::product).collect();
        importer.import(&batch, None, storegate::db::now()).await?;
        next = end;
        if next.is_multiple_of(100_000) {
            eprintln!("  {next} products, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    // As `product-service import` ends.
    importer.optimize_search_index().await?;
    Ok(started.elapsed())
}

impl Bench {
    async fn run(&self, name: &str, concurrency: usize, duration: Duration) -> Outcome {
        match name {
            "first-page/1" => self.first_pages(duration).await,
            "get" => self.get(concurrency, duration).await,
            "store-get" => self.store_get(concurrency, duration).await,
            "list" => self.list(concurrency, duration).await,
            "store-list" => self.store_list(concurrency, duration).await,
            "search" | "search-rare" | "search-rare/1" => self.search(name, concurrency, duration).await,
            "store-search" | "store-search-rare" => self.store_search(name, concurrency, duration).await,
            "create" => self.create(concurrency, duration).await,
            "adjust" => self.adjust(concurrency, duration).await,
            other => unreachable!("no scenario {other}"),
        }
    }

    fn client(&self) -> ProductServiceClient<Channel> {
        ProductServiceClient::new(self.channel.clone())
    }

    async fn first_pages(&self, duration: Duration) -> Outcome {
        let (client, token) = (self.client(), self.tokens[0].clone());
        measure("first-page/1", 1, duration, move |_, i| {
            let (mut client, token) = (client.clone(), token.clone());
            async move {
                let order_by = ORDERS[i as usize % ORDERS.len()].to_owned();
                let request = ListProductsRequest { page_size: 50, order_by, ..Default::default() };
                client
                    .list_products(bearer(request, &token))
                    .await
                    .is_ok_and(|r| r.into_inner().products.len() == 50)
            }
        })
        .await
    }

    async fn get(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (client, tokens, size) = (self.client(), self.tokens.clone(), self.size as i64);
        measure("get", concurrency, duration, move |worker, _| {
            let (mut client, token) = (client.clone(), tokens[worker % tokens.len()].clone());
            let id = rand::thread_rng().gen_range(1..=size);
            async move { client.get_product(bearer(GetProductRequest { id }, &token)).await.is_ok() }
        })
        .await
    }

    async fn store_get(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (store, size) = (self.store.clone(), self.size as i64);
        measure("store-get", concurrency, duration, move |_, _| {
            let store = store.clone();
            let id = rand::thread_rng().gen_range(1..=size);
            async move { matches!(store.get(id).await, Ok(Some(_))) }
        })
        .await
    }

    async fn list(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (client, tokens) = (self.client(), self.tokens.clone());
        let callers = Arc::new(Callers::<String>::new(concurrency));
        measure("list", concurrency, duration, move |worker, _| {
            let (mut client, token, callers) =
                (client.clone(), tokens[worker % tokens.len()].clone(), callers.clone());
            async move {
                let browse = callers.next_page(worker);
                let request = ListProductsRequest {
                    page_size: browse.page_size,
                    order_by: browse.order_by.to_owned(),
                    page_token: browse.next.unwrap_or_default(),
                    ..Default::default()
                };
                match client.list_products(bearer(request, &token)).await {
                    Ok(response) => {
                        let page = response.into_inner();
                        callers.read(worker, Some(page.next_page_token).filter(|t| !t.is_empty()));
                        !page.products.is_empty()
                    }
                    Err(_) => {
                        callers.read(worker, None);
                        false
                    }
                }
            }
        })
        .await
    }

    async fn store_list(&self, concurrency: usize, duration: Duration) -> Outcome {
        let store = self.store.clone();
        let callers = Arc::new(Callers::<Cursor>::new(concurrency));
        measure("store-list", concurrency, duration, move |worker, _| {
            let (store, callers) = (store.clone(), callers.clone());
            async move {
                let browse = callers.next_page(worker);
                let order = OrderBy::parse(browse.order_by).expect("a valid order");
                let q = ListQuery {
                    order,
                    query: None,
                    after: browse.next.as_ref(),
                    limit: i64::from(browse.page_size),
                };
                let Ok(page) = store.list(&q).await else {
                    callers.read(worker, None);
                    return false;
                };
                // What the service does with a page: each row becomes a
                // product, the last one the next page's cursor.
                let products: Vec<Product> =
                    page.rows.into_iter().filter_map(|row| row.into_product().ok()).collect();
                let next = (products.len() == browse.page_size as usize)
                    .then(|| products.last().and_then(|last| Cursor::after(last, order).ok()))
                    .flatten();
                callers.read(worker, next);
                !products.is_empty()
            }
        })
        .await
    }

    async fn search(&self, name: &str, concurrency: usize, duration: Duration) -> Outcome {
        let (client, tokens) = (self.client(), self.tokens.clone());
        let rare = name.starts_with("search-rare");
        let callers = Arc::new(Callers::<()>::new(concurrency));
        measure(name, concurrency, duration, move |worker, _| {
            let (mut client, token) = (client.clone(), tokens[worker % tokens.len()].clone());
            let search = callers
                .with_rng(worker, |rng| if rare { traffic::rare_search(rng) } else { traffic::search(rng) });
            async move {
                let request = ListProductsRequest {
                    query: search.query,
                    order_by: search.order_by.to_owned(),
                    page_size: search.page_size,
                    ..Default::default()
                };
                client.list_products(bearer(request, &token)).await.is_ok()
            }
        })
        .await
    }

    async fn store_search(&self, name: &str, concurrency: usize, duration: Duration) -> Outcome {
        let store = self.store.clone();
        let rare = name.ends_with("rare");
        let callers = Arc::new(Callers::<()>::new(concurrency));
        measure(name, concurrency, duration, move |worker, _| {
            let store = store.clone();
            let search = callers
                .with_rng(worker, |rng| if rare { traffic::rare_search(rng) } else { traffic::search(rng) });
            async move {
                let order = OrderBy::parse(search.order_by).expect("a valid order");
                let q = ListQuery {
                    order,
                    query: Some(&search.query),
                    after: None,
                    limit: i64::from(search.page_size),
                };
                store
                    .list(&q)
                    .await
                    .is_ok_and(|page| page.rows.iter().all(|row| row.clone().into_product().is_ok()))
            }
        })
        .await
    }

    async fn create(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (client, token) = (self.client(), self.tokens.last().expect("the admin's token").clone());
        measure("create", concurrency, duration, move |_, _| {
            let (mut client, token) = (client.clone(), token.clone());
            let fields = catalogue::product(rand::thread_rng().gen_range(u64::MAX / 2..u64::MAX));
            async move {
                let product = Product {
                    name: fields.name,
                    description: fields.description,
                    price: fields.price.to_string(),
                    stock: fields.stock,
                    ..Default::default()
                };
                let request = CreateProductRequest { product: Some(product), request_id: String::new() };
                client.create_product(bearer(request, &token)).await.is_ok()
            }
        })
        .await
    }

    async fn adjust(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (client, token) = (self.client(), self.tokens.last().expect("the admin's token").clone());
        let size = self.size as i64;
        measure("adjust", concurrency, duration, move |_, _| {
            let (mut client, token) = (client.clone(), token.clone());
            let id = rand::thread_rng().gen_range(1..=size);
            async move {
                let request = AdjustStockRequest { id, delta: 1, request_id: String::new() };
                client.adjust_stock(bearer(request, &token)).await.is_ok()
            }
        })
        .await
    }
}
