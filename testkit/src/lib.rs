//! Test harness for storegate: starts the real servers on port 0 against a
//! fresh database and hands out typed clients.
//!
//! Every store behaviour is tested on both backends: [`backend_tests!`]
//! turns each `async fn name(backend: Backend)` into a SQLite test and a
//! MySQL test. The MySQL one needs `STOREGATE_TEST_MYSQL_URL` (a server URL
//! such as `mysql://root@127.0.0.1:3306`); each test gets its own database.
//! Without the variable the MySQL tests are skipped, except under CI (`CI`
//! set), where a missing database is a failure.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use auth_service::AuthConfig;
use product_service::ProductConfig;
use secrecy::SecretString;
use storegate::{
    Db,
    pb::{
        auth::v1::{
            BeginLoginRequest, BeginLoginResponse, CompleteLoginRequest, CompleteLoginResponse,
            RegisterRequest, auth_service_client::AuthServiceClient,
        },
        product::v1::product_service_client::ProductServiceClient,
    },
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tonic::transport::Channel;

pub const MYSQL_URL_VAR: &str = "STOREGATE_TEST_MYSQL_URL";

/// Generates a `sqlite` and a `mysql` test module calling each named
/// `async fn(Backend)` of the enclosing module.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    if let Some(backend) = $crate::Backend::mysql_from_env() {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    /// A MySQL server URL, without a database.
    MySql(String),
}

impl Backend {
    /// The MySQL backend from `STOREGATE_TEST_MYSQL_URL`; None (skip) when
    /// it is unset outside CI.
    pub fn mysql_from_env() -> Option<Backend> {
        match std::env::var(MYSQL_URL_VAR) {
            Ok(url) if !url.is_empty() => Some(Backend::MySql(url)),
            _ if std::env::var_os("CI").is_some() => panic!("{MYSQL_URL_VAR} must be set in CI"),
            _ => {
                eprintln!("skipped: set {MYSQL_URL_VAR} to run this test on MySQL");
                None
            }
        }
    }
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    format!("sg_test_{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), nanos)
}

/// `mysql://user:pass@host:port` with any path or query replaced by `/db`.
fn mysql_url_with_database(server_url: &str, database: &str) -> String {
    let (scheme, rest) = server_url.split_once("://").unwrap_or(("mysql", server_url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    format!("{scheme}://{authority}/{database}")
}

/// A fresh, empty database, removed again on drop.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    cleanup: Cleanup,
}

enum Cleanup {
    Dir(PathBuf),
    MySqlDatabase { server_url: String, name: String },
}

impl TestDb {
    pub async fn new(backend: &Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(unique_name());
                std::fs::create_dir_all(&dir).expect("temp dir");
                TestDb {
                    url: format!("sqlite://{}/storegate.db", dir.display()),
                    backend: backend.clone(),
                    cleanup: Cleanup::Dir(dir),
                }
            }
            Backend::MySql(server_url) => {
                let name = unique_name();
                let server = Db::connect(&mysql_url_with_database(server_url, ""))
                    .await
                    .expect("cannot connect to the MySQL test server");
                storegate::on_db!(&server, pool => {
                    sqlx::query(&format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
                        .execute(pool)
                        .await
                        .map(drop)
                })
                .expect("cannot create the test database");
                server.close().await;
                TestDb {
                    url: mysql_url_with_database(server_url, &name),
                    backend: backend.clone(),
                    cleanup: Cleanup::MySqlDatabase { server_url: server_url.clone(), name },
                }
            }
        }
    }

    /// A pool on the test database, for asserting on its state.
    pub async fn open(&self) -> Db {
        Db::open(&self.url).await.expect("open the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Dir(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::MySqlDatabase { server_url, name } => {
                // Drop runs inside the test's runtime: clean up on a thread
                // with its own.
                let (url, name) = (mysql_url_with_database(server_url, ""), name.clone());
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                    rt.block_on(async {
                        let server = Db::connect(&url).await.ok()?;
                        let dropped = storegate::on_db!(&server, pool => {
                            sqlx::query(&format!("DROP DATABASE IF EXISTS `{name}`")).execute(pool).await.map(drop)
                        });
                        server.close().await;
                        dropped.ok()
                    })
                })
                .join();
            }
        }
    }
}

/// A fixed master key for tests (the services refuse MySQL without one), as
/// STOREGATE_MASTER_KEY takes it: for service processes started by tests.
pub const TEST_MASTER_KEY: &str = "c3RvcmVnYXRlLXRlc3QtbWFzdGVyLWtleS0zMi1ieXQ=";

/// [`TEST_MASTER_KEY`] for in-process configurations.
pub fn test_master_key() -> SecretString {
    SecretString::from(TEST_MASTER_KEY.to_owned())
}

/// Both services running on port 0 against one fresh database.
pub struct TestStack {
    pub db: TestDb,
    pub auth_addr: SocketAddr,
    pub product_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    /// auth-service alone can be stopped, to show product-service without it.
    auth_shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

fn shutdown_future(rx: &watch::Sender<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.subscribe();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

impl TestStack {
    pub fn auth_config(db: &TestDb) -> AuthConfig {
        let mut config = AuthConfig::with_database_url(&db.url);
        config.master_key = Some(test_master_key());
        config
    }

    /// auth-service only.
    pub async fn start_auth(backend: Backend) -> TestStack {
        Self::start_auth_with(backend, |_| {}).await
    }

    /// auth-service only, with its configuration adjusted by `adjust`.
    pub async fn start_auth_with(backend: Backend, adjust: impl FnOnce(&mut AuthConfig)) -> TestStack {
        let db = TestDb::new(&backend).await;
        let mut config = Self::auth_config(&db);
        adjust(&mut config);
        let (shutdown, _) = watch::channel(false);
        let (auth_shutdown, _) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let auth_addr = listener.local_addr().unwrap();
        let stopped = {
            let (all, auth) = (shutdown_future(&shutdown), shutdown_future(&auth_shutdown));
            async move {
                tokio::select! { () = all => {}, () = auth => {} }
            }
        };
        let server = tokio::spawn(auth_service::run(config, listener, stopped));
        let stack =
            TestStack { db, auth_addr, product_addr: None, shutdown, auth_shutdown, servers: vec![server] };
        stack.wait_ready(auth_addr).await;
        stack
    }

    /// auth-service and product-service; product gets its keys from auth.
    pub async fn start(backend: Backend) -> TestStack {
        let mut stack = Self::start_auth(backend).await;
        stack.add_product(|_| {}).await;
        stack
    }

    /// Starts product-service beside a running auth-service, with its
    /// configuration adjusted by `adjust`.
    pub async fn add_product(&mut self, adjust: impl FnOnce(&mut ProductConfig)) {
        let stack = self;
        let mut config = ProductConfig::with_database_url(&stack.db.url);
        config.auth_service_url = format!("http://{}", stack.auth_addr);
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let product_addr = listener.local_addr().unwrap();
        stack.servers.push(tokio::spawn(product_service::run(
            config,
            listener,
            shutdown_future(&stack.shutdown),
        )));
        stack.product_addr = Some(product_addr);
        stack.wait_ready(product_addr).await;
    }

    /// Stops auth-service (gracefully) and waits until it is gone.
    pub async fn stop_auth(&mut self) {
        self.auth_shutdown.send_replace(true);
        let auth = self.servers.remove(0);
        auth.await.expect("auth task").expect("auth result");
    }

    /// Waits until the server answers health checks (or has failed).
    async fn wait_ready(&self, addr: SocketAddr) {
        for _ in 0..200 {
            if let Some(failed) = self.servers.iter().find(|s| s.is_finished()) {
                panic!("a server stopped during start-up: {failed:?}");
            }
            if health_serving(addr).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server on {addr} did not become ready");
    }

    pub async fn channel(addr: SocketAddr) -> Channel {
        Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect")
    }

    pub async fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(Self::channel(self.auth_addr).await)
    }

    pub async fn products(&self) -> ProductServiceClient<Channel> {
        ProductServiceClient::new(Self::channel(self.product_addr.expect("product-service is running")).await)
    }

    pub async fn register(&self, username: &str, password: &str) -> i64 {
        self.auth()
            .await
            .register(RegisterRequest { username: username.into(), password: password.into() })
            .await
            .expect("register")
            .into_inner()
            .user_id
    }

    pub async fn begin_login(&self, username: &str, password: &str) -> BeginLoginResponse {
        self.auth()
            .await
            .begin_login(BeginLoginRequest {
                username: username.into(),
                password: password.into(),
                ..Default::default()
            })
            .await
            .expect("begin login")
            .into_inner()
    }

    /// Registers `username` and logs in through both steps, computing the
    /// TOTP code from the enrollment secret. Returns the tokens and secret.
    pub async fn register_and_login(
        &self,
        username: &str,
        password: &str,
    ) -> (CompleteLoginResponse, String) {
        self.register(username, password).await;
        self.enroll(username, password).await
    }

    /// The first login of a registered user: both steps, the code computed
    /// from the enrollment secret.
    async fn enroll(&self, username: &str, password: &str) -> (CompleteLoginResponse, String) {
        let begun = self.begin_login(username, password).await;
        let secret = begun.enrollment.expect("enrollment on first login").secret;
        let tokens = self
            .auth()
            .await
            .complete_login(CompleteLoginRequest {
                login_ticket: begun.login_ticket,
                code: totp_code(&secret, 0),
            })
            .await
            .expect("complete login")
            .into_inner();
        (tokens, secret)
    }

    /// An admin's access token: registers, grants admin, logs in.
    pub async fn admin_token(&self, username: &str) -> String {
        self.token_with_roles(username, &["admin"]).await
    }

    /// Creates a product through the API with `token` (a role that may).
    pub async fn create_product(
        &self,
        token: &str,
        name: &str,
        price: &str,
        stock: i64,
    ) -> storegate::pb::product::v1::Product {
        let product = storegate::pb::product::v1::Product {
            name: name.into(),
            price: price.into(),
            stock,
            ..Default::default()
        };
        let request = storegate::pb::product::v1::CreateProductRequest {
            product: Some(product),
            request_id: String::new(),
        };
        self.products()
            .await
            .create_product(bearer(request, token))
            .await
            .expect("create a product")
            .into_inner()
    }

    /// The access token of a new user holding `roles`: registers, grants
    /// them, logs in.
    pub async fn token_with_roles(&self, username: &str, roles: &[&str]) -> String {
        let password = "correct horse battery";
        self.register(username, password).await;
        for role in roles {
            auth_service::grant_role(&Self::auth_config(&self.db), username, role)
                .await
                .expect("grant a role");
        }
        self.enroll(username, password).await.0.access_token
    }

    /// Stops the servers and waits until they have finished.
    pub async fn stop(mut self) {
        self.shutdown.send_replace(true);
        for server in self.servers.drain(..) {
            server.await.expect("server task").expect("server result");
        }
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// The TOTP code for the current time step plus `step_offset` steps, from a
/// base32 secret, as an authenticator app would compute it.
pub fn totp_code(secret_base32: &str, step_offset: i64) -> String {
    totp_code_at_step(secret_base32, chrono::Utc::now().timestamp() / 30 + step_offset)
}

/// The TOTP code of 30-second time step `step` (Unix time / 30).
pub fn totp_code_at_step(secret_base32: &str, step: i64) -> String {
    let secret = totp_rs::Secret::Encoded(secret_base32.to_owned()).to_bytes().expect("base32 secret");
    let totp =
        totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 0, 30, secret, None, "test".into()).expect("totp");
    totp.generate((step * 30) as u64)
}

/// A 6-digit code that is none of the codes accepted right now.
pub fn wrong_totp_code(secret_base32: &str) -> String {
    let accepted: Vec<String> = (-1..=1).map(|o| totp_code(secret_base32, o)).collect();
    (0..)
        .map(|n: u32| format!("{:06}", (n * 7919) % 1_000_000))
        .find(|c| !accepted.contains(c))
        .expect("some code is wrong")
}

/// Attaches `authorization: Bearer <token>` to a request.
pub fn bearer<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("ascii token"));
    request
}

pub mod attack;
pub mod catalogue;
pub mod certs;
pub mod from_address;
pub mod grpc_web;
pub mod http1;
pub mod observe;
pub mod otlp;
pub mod process;
pub mod proxy;

/// A server running in this process on its own (not part of a
/// [`TestStack`]), stopped when dropped.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    async fn spawn<F>(
        run: impl FnOnce(TcpListener, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
    ) -> Running
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, _) = watch::channel(false);
        let task = tokio::spawn(run(listener, Box::pin(shutdown_future(&stop))));
        Running { addr, stop, task: Some(task) }
    }

    /// auth-service with `config`, on port 0.
    pub async fn auth(config: AuthConfig) -> Running {
        Self::spawn(|listener, stop| auth_service::run(config, listener, stop)).await
    }

    /// auth-service on `db` serving TLS with `server`'s certificate.
    pub async fn auth_over_tls(db: &TestDb, server: &certs::PemFiles) -> Running {
        let mut config = TestStack::auth_config(db);
        config.common.tls_cert_file = Some(server.cert.clone());
        config.common.tls_key_file = Some(server.key.clone());
        Self::auth(config).await
    }

    /// product-service with `config`, on port 0.
    pub async fn product(config: ProductConfig) -> Running {
        Self::spawn(|listener, stop| product_service::run(config, listener, stop)).await
    }

    /// Whether the server has stopped (failed start-up, or done).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the server and returns how `run` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        self.task.take().expect("running").await.expect("server task")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A channel to `url` set up as the services' clients set theirs up
/// (TLS for https://, with `tls`'s CA and client certificate).
pub async fn channel_to(url: &str, tls: &storegate::tls::ClientTlsFiles) -> anyhow::Result<Channel> {
    Ok(storegate::tls::client_endpoint(url, "test URL", tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?)
}

/// Whether grpc.health.v1 at `url` answers SERVING for "".
pub async fn serving_at(url: &str, tls: &storegate::tls::ClientTlsFiles) -> anyhow::Result<bool> {
    let channel = channel_to(url, tls).await?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?;
    Ok(response.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// Waits up to `timeout` for [`serving_at`] to say SERVING.
pub async fn wait_serving_at(url: &str, tls: &storegate::tls::ClientTlsFiles, timeout: Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < timeout {
        if serving_at(url, tls).await.unwrap_or(false) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub use tonic_health_client::health_serving;

mod tonic_health_client {
    use std::net::SocketAddr;

    /// True when the server's grpc.health.v1 answers SERVING for "".
    pub async fn health_serving(addr: SocketAddr) -> bool {
        let Ok(channel) =
            tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await
        else {
            return false;
        };
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok_and(|r| {
            r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
    }
}
