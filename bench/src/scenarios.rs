//! The scenarios and their ceilings, against one in-process stack.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use storegate::{
    Db, on_db,
    pb::{
        auth::v1::{
            BeginLoginRequest, CompleteLoginRequest, GetJwksRequest, RegisterRequest,
            auth_service_client::AuthServiceClient,
        },
        product::v1::{
            AdjustStockRequest, CreateProductRequest, DeleteProductRequest, GetProductRequest,
            ListProductsRequest, ListProductsResponse, Product, UpdateProductRequest,
            product_service_client::ProductServiceClient,
            product_service_server::{ProductService, ProductServiceServer},
        },
    },
};
use storegate_testkit::{Backend, TestStack, bearer, totp_code_at_step};
use tonic::{Request, Response, Status, transport::Channel};

use storegate_bench::runner::{Outcome, measure};

const SEED_PRODUCTS: i64 = 1_000;

/// A whole product row, as the API reads it: the ceiling does the same work
/// on the database side, no less.
type ProductTuple = (
    i64,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
);
const ROW: &str = "id, name, description, CAST(price AS CHAR) AS price, stock, version, created_by, updated_by, \
                   create_time, update_time";
/// Each user's TOTP steps are used once (the replay rule): 600 users have
/// 1,200 logins in the first 30 s and 600 in each 30 s after, room for an
/// 8 s `login` run near the argon2 ceiling (~100/s here) at any moment.
const LOGIN_USERS: usize = 600;
const PASSWORD: &str = "correct horse battery";

pub struct Bench {
    pub stack: TestStack,
    pub token: String,
    auth: Channel,
    products: Channel,
    noop: Channel,
    db: Db,
    users: Arc<Vec<LoginUser>>,
}

struct LoginUser {
    name: String,
    secret: String,
    /// The last TOTP step used: a step is accepted once per user.
    last_step: AtomicI64,
}

/// The framework ceiling: a tonic server answering GetProduct with a
/// product-sized message, with nothing behind it.
struct NoopProducts;

fn sample_product() -> Product {
    Product {
        id: 42,
        name: "Cast iron teapot".into(),
        description: "A product-sized description of a product, about as long as a real one.".into(),
        price: "24.50".into(),
        stock: 10,
        etag: "v3".into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ProductService for NoopProducts {
    async fn get_product(&self, _: Request<GetProductRequest>) -> Result<Response<Product>, Status> {
        Ok(Response::new(sample_product()))
    }
    async fn create_product(&self, _: Request<CreateProductRequest>) -> Result<Response<Product>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn list_products(
        &self,
        _: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn update_product(&self, _: Request<UpdateProductRequest>) -> Result<Response<Product>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn delete_product(&self, _: Request<DeleteProductRequest>) -> Result<Response<()>, Status> {
        Err(Status::unimplemented("noop"))
    }
    async fn adjust_stock(&self, _: Request<AdjustStockRequest>) -> Result<Response<Product>, Status> {
        Err(Status::unimplemented("noop"))
    }
}

async fn start_noop() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ProductServiceServer::new(NoopProducts))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            ),
    );
    Ok(addr)
}

/// Registers and enrolls [`LOGIN_USERS`] users, a few at a time (each
/// costs two password hashes). Enrollment is confirmed with the earliest
/// step the service accepts, so that each user has two more steps to log in
/// with before the clock moves on: a long `login` run must not run out.
async fn enroll_login_users(auth: &Channel) -> anyhow::Result<Vec<LoginUser>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut enrollers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (mut client, next) = (AuthServiceClient::new(auth.clone()), next.clone());
        enrollers.spawn(async move {
            let mut users = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= LOGIN_USERS as u64 {
                    return anyhow::Ok(users);
                }
                let name = format!("bench-user-{i}");
                client
                    .register(RegisterRequest { username: name.clone(), password: PASSWORD.into() })
                    .await?;
                let begun = client
                    .begin_login(BeginLoginRequest {
                        username: name.clone(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let secret = begun.enrollment.map(|e| e.secret).unwrap_or_default();
                // A step boundary between computing the code and its check
                // makes it too old: the ticket takes another try.
                let mut attempts = 0;
                let step = loop {
                    let step = chrono_free_now() / 30 - 1;
                    let completed = client
                        .complete_login(CompleteLoginRequest {
                            login_ticket: begun.login_ticket.clone(),
                            code: totp_code_at_step(&secret, step),
                        })
                        .await;
                    attempts += 1;
                    match completed {
                        Ok(_) => break step,
                        Err(_) if attempts < 3 => continue,
                        Err(status) => return Err(status.into()),
                    }
                };
                users.push(LoginUser { name, secret, last_step: AtomicI64::new(step) });
            }
        });
    }
    let mut users = Vec::new();
    while let Some(enrolled) = enrollers.join_next().await {
        users.extend(enrolled??);
    }
    Ok(users)
}

/// A cheap, well-spread pseudo-random number for picking ids.
fn pick(worker: usize, iteration: u64, modulo: i64) -> i64 {
    let mut x =
        (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ iteration.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    (x % modulo as u64) as i64
}

impl Bench {
    pub async fn start(backend: Backend) -> anyhow::Result<Bench> {
        eprintln!(
            "starting the stack and seeding {SEED_PRODUCTS} products and {LOGIN_USERS} enrolled users …"
        );
        // Hundreds of users register from this one address: the per-address
        // registration limit (tested on its own) would refuse them.
        let mut stack =
            TestStack::start_auth_with(backend, |auth| auth.login.registrations_per_client_per_hour = 0)
                .await;
        stack.add_product(|_| {}).await;
        let token = stack.admin_token("bench-admin").await;
        let auth = TestStack::channel(stack.auth_addr).await;
        let products = TestStack::channel(stack.product_addr.expect("product-service")).await;
        let noop = TestStack::channel(start_noop().await?).await;
        let db = stack.db.open().await;

        let seeded = Arc::new(AtomicI64::new(0));
        let seeders: Vec<_> = (0..16)
            .map(|_| {
                let (channel, token, seeded) = (products.clone(), token.clone(), seeded.clone());
                tokio::spawn(async move {
                    let mut client = ProductServiceClient::new(channel);
                    loop {
                        let n = seeded.fetch_add(1, Ordering::Relaxed);
                        if n >= SEED_PRODUCTS {
                            return;
                        }
                        let product = Product {
                            name: format!("Seed product {n}"),
                            description: "seeded for the benchmark".into(),
                            price: format!("{}.{:02}", n % 500, n % 100),
                            stock: 1_000_000,
                            ..Default::default()
                        };
                        let request =
                            CreateProductRequest { product: Some(product), request_id: String::new() };
                        client.create_product(bearer(request, &token)).await.expect("seed a product");
                    }
                })
            })
            .collect();
        for seeder in seeders {
            seeder.await?;
        }

        let users = enroll_login_users(&auth).await?;
        Ok(Bench { stack, token, auth, products, noop, db, users: Arc::new(users) })
    }

    /// Runs the scenario or ceiling called `name` (see `SCENARIOS` in main.rs).
    pub async fn run(&self, name: &str, concurrency: usize, duration: Duration) -> Outcome {
        match name {
            "noop" => self.noop(concurrency, duration).await,
            "db-point" => self.db_point(concurrency, duration).await,
            "db-page" => self.db_page(concurrency, duration).await,
            "argon2" => self.argon2(concurrency, duration).await,
            "get" => self.get(concurrency, duration).await,
            "list" => self.list(concurrency, duration).await,
            "create" => self.create(concurrency, duration).await,
            "adjust" => self.adjust(concurrency, duration).await,
            "login" => self.login(concurrency, duration).await,
            other => unreachable!("no timed scenario {other}"),
        }
    }

    pub async fn noop(&self, concurrency: usize, duration: Duration) -> Outcome {
        let channel = self.noop.clone();
        measure("noop", concurrency, duration, move |worker, i| {
            let mut client = ProductServiceClient::new(channel.clone());
            async move {
                client.get_product(GetProductRequest { id: pick(worker, i, SEED_PRODUCTS) }).await.is_ok()
            }
        })
        .await
    }

    pub async fn db_point(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (db, sql): (_, Arc<str>) =
            (self.db.clone(), format!("SELECT {ROW} FROM products WHERE id = ?").into());
        measure("db-point", concurrency, duration, move |worker, i| {
            let (db, sql) = (db.clone(), sql.clone());
            async move {
                let id = 1 + pick(worker, i, SEED_PRODUCTS);
                let row: Result<ProductTuple, _> = on_db!(&db, pool => {
                    sqlx::query_as(&sql)
                    .bind(id)
                    .fetch_one(pool)
                    .await
                });
                row.is_ok()
            }
        })
        .await
    }

    pub async fn db_page(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (db, sql): (_, Arc<str>) =
            (self.db.clone(), format!("SELECT {ROW} FROM products ORDER BY id LIMIT 50").into());
        measure("db-page", concurrency, duration, move |_, _| {
            let (db, sql) = (db.clone(), sql.clone());
            async move {
                let rows: Result<Vec<ProductTuple>, _> = on_db!(&db, pool => {
                    sqlx::query_as(&sql)
                    .fetch_all(pool)
                    .await
                });
                rows.is_ok_and(|r| r.len() == 50)
            }
        })
        .await
    }

    pub async fn argon2(&self, concurrency: usize, duration: Duration) -> Outcome {
        use auth_service::client::Client;
        let hasher = auth_service::password::PasswordHasher::new().expect("hasher");
        let hash = hasher.hash(Client::Unknown, PASSWORD.into()).await.expect("hash");
        measure("argon2", concurrency, duration, move |worker, _| {
            let (hasher, hash) = (hasher.clone(), hash.clone());
            // A client per worker: the queue is shared fairly between clients.
            let client = Client::Address(std::net::IpAddr::from([10, 0, (worker >> 8) as u8, worker as u8]));
            async move { hasher.verify(client, PASSWORD.into(), Some(hash)).await.unwrap_or(false) }
        })
        .await
    }

    pub async fn get(&self, concurrency: usize, duration: Duration) -> Outcome {
        self.get_on(self.products.clone(), concurrency, duration).await
    }

    /// `get` against the product-service at `channel`.
    pub async fn get_on(&self, channel: Channel, concurrency: usize, duration: Duration) -> Outcome {
        let token = self.token.clone();
        measure("get", concurrency, duration, move |worker, i| {
            let (mut client, token) = (ProductServiceClient::new(channel.clone()), token.clone());
            async move {
                let request = GetProductRequest { id: 1 + pick(worker, i, SEED_PRODUCTS) };
                client.get_product(bearer(request, &token)).await.is_ok()
            }
        })
        .await
    }

    pub async fn list(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (channel, token) = (self.products.clone(), self.token.clone());
        measure("list", concurrency, duration, move |_, _| {
            let (mut client, token) = (ProductServiceClient::new(channel.clone()), token.clone());
            async move {
                let request = ListProductsRequest { page_size: 50, ..Default::default() };
                client
                    .list_products(bearer(request, &token))
                    .await
                    .is_ok_and(|r| r.into_inner().products.len() == 50)
            }
        })
        .await
    }

    pub async fn create(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (channel, token) = (self.products.clone(), self.token.clone());
        measure("create", concurrency, duration, move |worker, i| {
            let (mut client, token) = (ProductServiceClient::new(channel.clone()), token.clone());
            async move {
                let product = Product {
                    name: format!("Created {worker}-{i}"),
                    description: "made by the benchmark".into(),
                    price: "9.99".into(),
                    stock: 5,
                    ..Default::default()
                };
                let request = CreateProductRequest { product: Some(product), request_id: String::new() };
                client.create_product(bearer(request, &token)).await.is_ok()
            }
        })
        .await
    }

    pub async fn adjust(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (channel, token) = (self.products.clone(), self.token.clone());
        measure("adjust", concurrency, duration, move |worker, i| {
            let (mut client, token) = (ProductServiceClient::new(channel.clone()), token.clone());
            async move {
                let request = AdjustStockRequest {
                    id: 1 + pick(worker, i, SEED_PRODUCTS),
                    delta: 1,
                    request_id: String::new(),
                };
                client.adjust_stock(bearer(request, &token)).await.is_ok()
            }
        })
        .await
    }

    /// BeginLogin + CompleteLogin with real codes, each user's time steps
    /// used once (the replay rule), across enrolled users.
    pub async fn login(&self, concurrency: usize, duration: Duration) -> Outcome {
        let (channel, users) = (self.auth.clone(), self.users.clone());
        let next_user = Arc::new(AtomicU64::new(0));
        measure("login", concurrency, duration, move |_, _| {
            let (mut auth, users, next_user) =
                (AuthServiceClient::new(channel.clone()), users.clone(), next_user.clone());
            async move {
                // A user with a time step still unused.
                let now_step = chrono_free_now() / 30;
                let mut chosen = None;
                for _ in 0..users.len() {
                    let user =
                        &users[(next_user.fetch_add(1, Ordering::Relaxed) % users.len() as u64) as usize];
                    let last = user.last_step.load(Ordering::Acquire);
                    let step = (last + 1).max(now_step - 1);
                    if step <= now_step + 1
                        && user
                            .last_step
                            .compare_exchange(last, step, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                    {
                        chosen = Some((user, step));
                        break;
                    }
                }
                let Some((user, step)) = chosen else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return false;
                };
                let Ok(begun) = auth
                    .begin_login(BeginLoginRequest {
                        username: user.name.clone(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    })
                    .await
                else {
                    return false;
                };
                let code = totp_code_at_step(&user.secret, step);
                auth.complete_login(CompleteLoginRequest {
                    login_ticket: begun.into_inner().login_ticket,
                    code,
                })
                .await
                .is_ok()
            }
        })
        .await
    }

    /// 200 simultaneous logins of unknown users while Health and GetJwks
    /// calls are timed.
    pub async fn storm(&self) -> Storm {
        storm_on(self.auth.clone()).await
    }
}

/// 200 simultaneous logins of unknown users against the auth-service at
/// `channel` while Health and GetJwks calls are timed.
pub async fn storm_on(channel: Channel) -> Storm {
    eprint!("  storm      200 concurrent logins, probing Health and GetJwks … ");
    const STORM: usize = 200;
    let started = Instant::now();
    let calls: Vec<_> = (0..STORM)
        .map(|i| {
            let mut auth = AuthServiceClient::new(channel.clone());
            tokio::spawn(async move {
                auth.begin_login(BeginLoginRequest {
                    username: format!("storm-{i}"),
                    password: "not the password".into(),
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|e| e.code())
            })
        })
        .collect();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut auth = AuthServiceClient::new(channel);
    let (mut health_times, mut jwks_times) = (Vec::new(), Vec::new());
    while !calls.iter().all(|c| c.is_finished()) {
        let t = Instant::now();
        let _ = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
        health_times.push(t.elapsed());
        let t = Instant::now();
        let _ = auth.get_jwks(GetJwksRequest {}).await;
        jwks_times.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut evaluated, mut shed, mut other) = (0, 0, 0);
    for call in calls {
        match call.await.expect("storm call") {
            Err(tonic::Code::Unauthenticated) => evaluated += 1,
            Err(tonic::Code::ResourceExhausted) => shed += 1,
            _ => other += 1,
        }
    }
    health_times.sort();
    jwks_times.sort();
    eprintln!("done");
    Storm { took: started.elapsed(), evaluated, shed, other, health: health_times, jwks: jwks_times }
}

fn chrono_free_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

pub struct Storm {
    took: Duration,
    evaluated: usize,
    shed: usize,
    other: usize,
    health: Vec<Duration>,
    jwks: Vec<Duration>,
}

fn p(sorted: &[Duration], q: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or_default()
}

impl Storm {
    pub fn summary(&self) -> String {
        format!(
            "storm: 200 concurrent BeginLogin in {:.2?}: {} evaluated, {} shed with RESOURCE_EXHAUSTED, {} other; \
             meanwhile Health p50 {:.2?} p99 {:.2?} max {:.2?} (n={}), GetJwks p50 {:.2?} p99 {:.2?} max {:.2?}",
            self.took,
            self.evaluated,
            self.shed,
            self.other,
            p(&self.health, 0.5),
            p(&self.health, 0.99),
            p(&self.health, 1.0),
            self.health.len(),
            p(&self.jwks, 0.5),
            p(&self.jwks, 0.99),
            p(&self.jwks, 1.0),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        serde_json::json!({
            "evaluated": self.evaluated,
            "shed": self.shed,
            "other": self.other,
            "health_p99_ms": ms(p(&self.health, 0.99)),
            "health_max_ms": ms(p(&self.health, 1.0)),
            "jwks_p99_ms": ms(p(&self.jwks, 0.99)),
            "jwks_max_ms": ms(p(&self.jwks, 1.0)),
        })
    }
}
