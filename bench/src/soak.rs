//! storegate-soak: mixed traffic through the nginx gateway to 2 auth-service
//! and 2 product-service replicas (processes of this build) for a long time,
//! reporting every interval the calls, errors by status code, latency and
//! each replica's resident memory, to show memory flat after warm-up and no
//! error without a cause.
//!
//!     cargo build --release --workspace --bins
//!     scripts/topology/install.sh    # nginx (and galera-4 for --galera)
//!     target/release/storegate-soak --minutes 10 [--mysql-server-url mysql://root@127.0.0.1:3306] [--galera]
//!
//! The traffic: reads of random products (60%, a tenth of them over
//! gRPC-Web through the gateway's HTTP/1.1 port, as browsers read), listing
//! pages of random sizes and orders, first pages and continuations, a third
//! of them searches (15%), stock adjustments of ±1 with request ids (10%),
//! creates (5%), token refreshes (9%), and complete sign-ups with a
//! two-factor login (1%). Each client is a shopper of its own (reads and
//! searches carry its token, so per-user limits see many users, as behind
//! a real gateway); the administrator makes the writes. Access tokens are
//! renewed every 5 minutes, so a run may last as long as asked.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use storegate::pb::{
    auth::v1::{
        BeginLoginRequest, CompleteLoginRequest, RefreshTokenRequest, RegisterRequest,
        auth_service_client::AuthServiceClient,
    },
    product::v1::{
        AdjustStockRequest, CreateProductRequest, GetProductRequest, ListProductsRequest, Product,
        product_service_client::ProductServiceClient,
    },
};
use storegate_testkit::{Backend, TestDb, TestStack, bearer, grpc_web, totp_code};
use storegate_topology::{Galera, Gateway, Placement, Replicas, Scratch};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "storegate-soak",
    about = "Long mixed load through the gateway: errors and memory over time"
)]
struct Args {
    /// The MySQL/MariaDB server to make a fresh database on.
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    mysql_server_url: String,
    /// Run on a 3-node Galera cluster through the HAProxy single writer
    /// (started from scripts/topology/) instead.
    #[arg(long)]
    galera: bool,
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Seconds between reports.
    #[arg(long, default_value_t = 30)]
    report_secs: u64,
    /// Clients calling at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Products seeded before the run.
    #[arg(long, default_value_t = 5_000)]
    products: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "soak-results.json")]
    json: std::path::PathBuf,
}

/// Calls, errors by code and latencies of the current interval; sign-ups
/// apart (two argon2 hashes each, queued behind each other by design).
#[derive(Default)]
struct Interval {
    calls: usize,
    errors: BTreeMap<String, usize>,
    latencies_us: Vec<u64>,
    sign_up_latencies_us: Vec<u64>,
}

/// The first message seen for each error code, to tell what caused it.
static ERROR_SAMPLES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

struct Traffic {
    ids: Vec<i64>,
    /// The catalogue's administrator, who makes every write.
    admin: Mutex<Session>,
    /// The gateway's gRPC-Web (HTTP/1.1) port.
    web: std::net::SocketAddr,
    sessions: Mutex<Vec<String>>,
    interval: Mutex<Interval>,
    stop: AtomicBool,
    next: AtomicUsize,
}

impl Traffic {
    fn record<T>(&self, started: Instant, result: &Result<T, tonic::Status>) {
        self.record_as(started, result, false);
    }

    fn record_as<T>(&self, started: Instant, result: &Result<T, tonic::Status>, sign_up: bool) {
        let mut interval = self.interval.lock().unwrap_or_else(|e| e.into_inner());
        interval.calls += 1;
        let micros = started.elapsed().as_micros() as u64;
        if sign_up {
            interval.sign_up_latencies_us.push(micros);
        } else {
            interval.latencies_us.push(micros);
        }
        if let Err(status) = result {
            let code = format!("{:?}", status.code());
            *interval.errors.entry(code.clone()).or_default() += 1;
            ERROR_SAMPLES.lock().unwrap_or_else(|e| e.into_inner()).entry(code).or_insert_with(|| {
                use std::error::Error as _;
                format!("{} (source: {:?})", status.message(), status.source())
            });
        }
    }

    /// The administrator's access token, renewed when it is 5 minutes old.
    async fn admin_token(&self, auth: &mut AuthServiceClient<Channel>) -> String {
        let stale = {
            let admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            (admin.renewed.elapsed() > Duration::from_secs(300)).then(|| admin.refresh.clone())
        };
        if let Some(refresh_token) = stale
            && let Ok(renewed) = auth.refresh_token(RefreshTokenRequest { refresh_token }).await
        {
            let renewed = renewed.into_inner();
            *self.admin.lock().unwrap_or_else(|e| e.into_inner()) =
                Session::new((renewed.access_token, renewed.refresh_token));
        }
        self.admin.lock().unwrap_or_else(|e| e.into_inner()).access.clone()
    }

    /// A number that differs per call, for picking (not for anything secret).
    fn pick(&self, n: usize, modulo: usize) -> usize {
        (n.wrapping_mul(2_654_435_761) >> 7) % modulo.max(1)
    }
}

fn uuid(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A signed-in user's tokens, renewed before the access token (15 min)
/// runs out.
struct Session {
    access: String,
    refresh: String,
    renewed: Instant,
}

impl Session {
    fn new((access, refresh): (String, String)) -> Session {
        Session { access, refresh, renewed: Instant::now() }
    }

    /// The access token, refreshed first when it is 5 minutes old.
    async fn access(&mut self, auth: &mut AuthServiceClient<Channel>) -> String {
        if self.renewed.elapsed() > Duration::from_secs(300) {
            let request = RefreshTokenRequest { refresh_token: self.refresh.clone() };
            if let Ok(renewed) = auth.refresh_token(request).await {
                let renewed = renewed.into_inner();
                *self = Session::new((renewed.access_token, renewed.refresh_token));
            }
        }
        self.access.clone()
    }
}

async fn client_loop(traffic: Arc<Traffic>, channel: Channel, shopper: usize) {
    let mut products = ProductServiceClient::new(channel.clone());
    let mut auth = AuthServiceClient::new(channel);
    // Each client is a shopper of its own, as many users are behind a
    // gateway (searches are limited per user); the administrator writes.
    let Ok(tokens) = sign_up(&mut auth, &format!("shopper{shopper}")).await else {
        eprintln!("shopper {shopper} could not sign up");
        return;
    };
    let mut session = Session::new(tokens);
    // Pages seen before, to continue: (order, query, token).
    let mut page_tokens: Vec<(String, String, String)> = Vec::new();
    while !traffic.stop.load(Ordering::Relaxed) {
        let n = traffic.next.fetch_add(1, Ordering::Relaxed);
        let id = traffic.ids[traffic.pick(n, traffic.ids.len())];
        let shopper = &session.access(&mut auth).await;
        let started = Instant::now();
        match n % 100 {
            0..54 => {
                let result = products.get_product(bearer(GetProductRequest { id }, shopper)).await;
                traffic.record(started, &result);
            }
            54..60 => {
                let request = prost::Message::encode_to_vec(&GetProductRequest { id });
                let authorization = format!("Bearer {shopper}");
                let result = grpc_web::unary(
                    traffic.web,
                    "/storegate.product.v1.ProductService/GetProduct",
                    &request,
                    &[("authorization", &authorization)],
                    Duration::from_secs(10),
                )
                .await
                .map_err(|code| tonic::Status::new(code, "over gRPC-Web"));
                traffic.record(started, &result);
            }
            60..75 => {
                let order_by =
                    ["", "name", "price desc", "create_time", "id desc"][traffic.pick(n, 5)].to_owned();
                let page_size = [10, 20, 50, 100][traffic.pick(n / 5, 4)];
                // A third are searches, by relevance or in the page's order.
                let query = if n.is_multiple_of(3) {
                    let words =
                        ["teapot", "kettle", "mug", "cup", "saucer", "seed 0", "seed 01", "kettle seed"];
                    words[traffic.pick(n / 3, words.len())].to_owned()
                } else {
                    String::new()
                };
                let order_by =
                    if !query.is_empty() && n.is_multiple_of(2) { String::new() } else { order_by };
                // Half of the pages continue a listing seen before.
                let page_token = match page_tokens.pop() {
                    Some((order, seen_query, token))
                        if order == order_by && seen_query == query && n.is_multiple_of(2) =>
                    {
                        token
                    }
                    _ => String::new(),
                };
                let request = ListProductsRequest {
                    page_size,
                    page_token,
                    order_by: order_by.clone(),
                    query: query.clone(),
                };
                let result = products.list_products(bearer(request, shopper)).await;
                traffic.record(started, &result);
                if let Ok(page) = result
                    && !page.get_ref().next_page_token.is_empty()
                {
                    page_tokens.push((order_by, query, page.into_inner().next_page_token));
                    page_tokens.truncate(16);
                }
            }
            75..85 => {
                let delta = if n.is_multiple_of(2) { 1 } else { -1 };
                let request = AdjustStockRequest { id, delta, request_id: uuid(n) };
                let admin = traffic.admin_token(&mut auth).await;
                let result = products.adjust_stock(bearer(request, &admin)).await.map(drop);
                // Out of stock is an answer, not an error of the service.
                let result = result
                    .or_else(|s| if s.code() == tonic::Code::FailedPrecondition { Ok(()) } else { Err(s) });
                traffic.record(started, &result);
            }
            85..90 => {
                let product = Product {
                    name: format!("Soak {n}"),
                    price: "3.50".into(),
                    stock: 10,
                    ..Default::default()
                };
                let request = CreateProductRequest { product: Some(product), request_id: uuid(n) };
                let admin = traffic.admin_token(&mut auth).await;
                let result = products.create_product(bearer(request, &admin)).await;
                traffic.record(started, &result);
            }
            90..99 => {
                let session = traffic.sessions.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some(refresh_token) = session else { continue };
                let result = auth.refresh_token(RefreshTokenRequest { refresh_token }).await;
                traffic.record(started, &result);
                if let Ok(rotated) = result {
                    traffic
                        .sessions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(rotated.into_inner().refresh_token);
                }
            }
            _ => {
                let result = sign_up(&mut auth, &format!("soak{n}")).await;
                traffic.record_as(started, &result, true);
                if let Ok((_, refresh_token)) = result {
                    let mut sessions = traffic.sessions.lock().unwrap_or_else(|e| e.into_inner());
                    sessions.push(refresh_token);
                    // A bounded set of live sessions, as users come and go.
                    if sessions.len() > 200 {
                        sessions.remove(0);
                    }
                }
            }
        }
    }
}

/// Register, password, enrollment code: a new user's access and refresh
/// tokens.
async fn sign_up(
    auth: &mut AuthServiceClient<Channel>,
    username: &str,
) -> Result<(String, String), tonic::Status> {
    let password = "correct horse battery";
    auth.register(RegisterRequest { username: username.into(), password: password.into() }).await?;
    let begun = auth
        .begin_login(BeginLoginRequest {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let secret = begun.enrollment.map(|e| e.secret).unwrap_or_default();
    let done = auth
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 0),
        })
        .await?;
    let done = done.into_inner();
    Ok((done.access_token, done.refresh_token))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = Scratch::new("soak");
    let test_db;
    let galera;
    let url = if args.galera {
        galera = Some(Galera::start(&scratch.path.join("cluster"), 4800)?);
        let cluster = galera.as_ref().expect("just started");
        cluster.start_writer_proxy()?;
        let database = cluster.create_database("storegate_soak").await?;
        cluster.writer_url(&database)
    } else {
        test_db = TestDb::new(&Backend::MySql(args.mysql_server_url.clone())).await;
        test_db.url.clone()
    };
    let mut replicas = Replicas::spawn(&Placement::all_on(&url, 2, 2), true, &[], &scratch.path)?;
    replicas.wait_serving().await?;
    let gateway = Gateway::start(&scratch.path.join("gateway"), &replicas)?;
    let admin = replicas.login(&url, "soak-admin", true).await;
    let admin = Session::new((admin.access_token, admin.refresh_token));
    let channel = TestStack::channel(gateway.grpc).await;

    eprintln!("seeding {} products", args.products);
    let mut ids = Vec::with_capacity(args.products);
    let mut products = ProductServiceClient::new(channel.clone());
    for i in 0..args.products {
        let product = Product {
            name: format!("Seed {i:05} {}", ["teapot", "kettle", "mug", "cup", "saucer"][i % 5]),
            description: "x".repeat(i % 400),
            price: format!("{}.{:02}", 1 + i % 500, i % 100),
            stock: 1_000,
            ..Default::default()
        };
        let created = products
            .create_product(bearer(
                CreateProductRequest { product: Some(product), request_id: String::new() },
                &admin.access,
            ))
            .await?;
        ids.push(created.into_inner().id);
    }

    let traffic = Arc::new(Traffic {
        ids,
        admin: Mutex::new(admin),
        web: gateway.web,
        sessions: Mutex::default(),
        interval: Mutex::default(),
        stop: AtomicBool::new(false),
        next: AtomicUsize::new(1_000_000),
    });
    let clients: Vec<_> = (0..args.concurrency)
        .map(|i| tokio::spawn(client_loop(traffic.clone(), channel.clone(), i)))
        .collect();
    let started = Instant::now();
    let total = Duration::from_secs(args.minutes * 60);
    let mut reports = Vec::new();
    println!(
        "| minute | calls/s | p50 ms | p99 ms | sign-up p50 / p99 ms | errors | auth-0 / auth-1 / product-0 / product-1 RSS MiB |"
    );
    println!(
        "|--------|---------|--------|--------|----------------------|--------|----------------------------------------------|"
    );
    let mut interrupted = std::pin::pin!(tokio::signal::ctrl_c());
    while started.elapsed() < total {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.report_secs)) => {}
            // Stop the replicas and the gateway on the way out.
            _ = &mut interrupted => break,
        }
        let interval = std::mem::take(&mut *traffic.interval.lock().unwrap_or_else(|e| e.into_inner()));
        let (mut latencies, mut sign_ups) = (interval.latencies_us, interval.sign_up_latencies_us);
        latencies.sort_unstable();
        sign_ups.sort_unstable();
        let rss: Vec<f64> = replicas.all().map(|r| r.memory_mib().0).collect();
        let exited: Vec<String> =
            replicas.all().filter_map(|r| r.exited().map(|s| format!("{} {s}", r.name))).collect();
        anyhow::ensure!(exited.is_empty(), "replicas exited: {exited:?}");
        let row = serde_json::json!({
            "minute": started.elapsed().as_secs_f64() / 60.0,
            "calls_per_s": interval.calls as f64 / args.report_secs as f64,
            "p50_ms": percentile(&latencies, 0.5),
            "p99_ms": percentile(&latencies, 0.99),
            "sign_up_p50_ms": percentile(&sign_ups, 0.5),
            "sign_up_p99_ms": percentile(&sign_ups, 0.99),
            "errors": interval.errors,
            "rss_mib": rss,
        });
        println!(
            "| {:>6.1} | {:>7.0} | {:>6.2} | {:>6.2} | {:>9.0} / {:>8.0} | {:>6} | {} |",
            started.elapsed().as_secs_f64() / 60.0,
            interval.calls as f64 / args.report_secs as f64,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            percentile(&sign_ups, 0.5),
            percentile(&sign_ups, 0.99),
            if interval.errors.is_empty() { "0".to_owned() } else { format!("{:?}", interval.errors) },
            rss.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(" / "),
        );
        reports.push(row);
    }
    traffic.stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let samples = ERROR_SAMPLES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (code, message) in &samples {
        eprintln!("first {code}: {message}");
    }
    std::fs::write(
        &args.json,
        serde_json::to_string_pretty(
            &serde_json::json!({ "galera": args.galera, "intervals": reports, "error_samples": samples }),
        )?,
    )?;
    eprintln!("results written to {}", args.json.display());
    drop(gateway);
    drop(replicas);
    Ok(())
}
