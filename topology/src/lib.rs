//! Helpers for the topology tests: replicas of both services as processes
//! (the binaries of this build), each on a database URL of its own choosing
//! (one server, or different nodes of a cluster), and the repo's scripts for
//! the cluster and the gateway.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use storegate::pb::{
    auth::v1::{
        BeginLoginRequest, CompleteLoginRequest, CompleteLoginResponse, RegisterRequest,
        auth_service_client::AuthServiceClient,
    },
    product::v1::product_service_client::ProductServiceClient,
};
use storegate_testkit::{
    Backend, TEST_MASTER_KEY, TestStack,
    process::{ServiceProcess, free_addr},
    totp_code,
};
use tonic::transport::Channel;

/// The versions of this build's migration files for `backend` (numbers
/// need not be contiguous: branches number theirs apart).
pub fn migration_versions(backend: &Backend) -> Vec<i64> {
    let dialect = if matches!(backend, Backend::Sqlite) { "sqlite" } else { "mysql" };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations").join(dialect);
    let mut versions: Vec<i64> = std::fs::read_dir(dir)
        .expect("the migrations folder")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.split('_').next()?.parse().ok())
        .collect();
    versions.sort_unstable();
    assert!(versions.starts_with(&[1, 2, 3]), "{versions:?}");
    versions
}

/// `_sqlx_migrations` as it reads when every migration of this build is
/// applied: (version, success) rows.
pub fn all_applied(backend: &Backend) -> Vec<(i64, bool)> {
    migration_versions(backend).into_iter().map(|version| (version, true)).collect()
}

/// How long a replica may take to say SERVING (a cold MySQL, a migration
/// another replica runs, a cluster node catching up).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A folder for logs and files of one test, removed when dropped unless the
/// test failed (then kept for a look, its path in the panic message).
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!(
            "storegate-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::create_dir_all(&path).expect("scratch folder");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Which database URL each replica uses: the same for all, or one node each.
pub struct Placement<'a> {
    pub auth: Vec<&'a str>,
    pub product: Vec<&'a str>,
}

impl<'a> Placement<'a> {
    /// `auth` auth-service and `product` product-service replicas, all on `url`.
    pub fn all_on(url: &'a str, auth: usize, product: usize) -> Self {
        Placement { auth: vec![url; auth], product: vec![url; product] }
    }
}

/// Replicas of both services, product replica i fetching its keys from auth
/// replica i % auth replicas.
pub struct Replicas {
    pub auth: Vec<ServiceProcess>,
    pub product: Vec<ServiceProcess>,
    /// Where each replica serves `/metrics` (auth replicas first).
    metrics: Vec<SocketAddr>,
}

impl Replicas {
    /// Spawns every replica at the same moment (no waiting in between), with
    /// `extra` environment on each, logs in `logs`.
    pub fn spawn(
        placement: &Placement<'_>,
        master_key: bool,
        extra: &[(&str, String)],
        logs: &Path,
    ) -> anyhow::Result<Replicas> {
        let auth_addrs: Vec<SocketAddr> = placement.auth.iter().map(|_| free_addr()).collect();
        let key: Vec<(&str, String)> =
            if master_key { vec![("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned())] } else { Vec::new() };
        let mut metrics = Vec::new();
        let mut metrics_env = || {
            let addr = free_addr();
            metrics.push(addr);
            ("METRICS_LISTEN_ADDR", addr.to_string())
        };
        let mut auth = Vec::new();
        for (i, (url, addr)) in placement.auth.iter().zip(&auth_addrs).enumerate() {
            let mut envs = vec![("DATABASE_URL", url.to_string()), ("AUTH_LISTEN_ADDR", addr.to_string())];
            envs.push(metrics_env());
            envs.extend(key.iter().cloned());
            envs.extend(extra.iter().cloned());
            auth.push(ServiceProcess::spawn(format!("auth-{i}"), "auth-service", *addr, &envs, logs)?);
        }
        let mut product = Vec::new();
        for (i, url) in placement.product.iter().enumerate() {
            let addr = free_addr();
            let auth_url = format!("http://{}", auth_addrs[i % auth_addrs.len()]);
            let mut envs = vec![
                ("DATABASE_URL", url.to_string()),
                ("PRODUCT_LISTEN_ADDR", addr.to_string()),
                ("AUTH_SERVICE_URL", auth_url),
                metrics_env(),
            ];
            envs.extend(extra.iter().cloned());
            product.push(ServiceProcess::spawn(
                format!("product-{i}"),
                "product-service",
                addr,
                &envs,
                logs,
            )?);
        }
        Ok(Replicas { auth, product, metrics })
    }

    /// The sum over every replica of the metric sample `name` (as exposed,
    /// labels included; a replica without it counts 0).
    pub async fn metric_sum(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for addr in &self.metrics {
            let page = storegate_testkit::observe::scrape_metrics(*addr).await;
            sum += storegate_testkit::observe::metric_value(&page, name).unwrap_or(0.0);
        }
        sum
    }

    pub fn all(&mut self) -> impl Iterator<Item = &mut ServiceProcess> {
        self.auth.iter_mut().chain(self.product.iter_mut())
    }

    /// Waits until every replica says SERVING.
    pub async fn wait_serving(&mut self) -> anyhow::Result<()> {
        for replica in self.all() {
            replica.wait_serving(START_TIMEOUT).await?;
        }
        Ok(())
    }

    pub async fn auth_client(&self, i: usize) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(TestStack::channel(self.auth[i % self.auth.len()].addr).await)
    }

    pub async fn product_client(&self, i: usize) -> ProductServiceClient<Channel> {
        ProductServiceClient::new(TestStack::channel(self.product[i % self.product.len()].addr).await)
    }

    /// Registers `username`, optionally grants it `admin` (as an operator
    /// would, with the auth-service binary), and logs in: the password on
    /// one auth replica, the code on another.
    pub async fn login(&self, database_url: &str, username: &str, admin: bool) -> CompleteLoginResponse {
        let password = "correct horse battery";
        self.auth_client(0)
            .await
            .register(RegisterRequest { username: username.into(), password: password.into() })
            .await
            .expect("register");
        if admin {
            let granted =
                tokio::process::Command::new(storegate_testkit::process::binary("auth-service").unwrap())
                    .args(["grant-role", username, "admin"])
                    .env("DATABASE_URL", database_url)
                    .env("STOREGATE_MASTER_KEY", TEST_MASTER_KEY)
                    .env("RUST_LOG", "warn")
                    .output()
                    .await
                    .expect("run auth-service grant-role");
            assert!(granted.status.success(), "grant-role: {}", String::from_utf8_lossy(&granted.stderr));
        }
        let begun = self
            .auth_client(1)
            .await
            .begin_login(BeginLoginRequest {
                username: username.into(),
                password: password.into(),
                ..Default::default()
            })
            .await
            .expect("begin login")
            .into_inner();
        let secret = begun.enrollment.expect("enrollment on the first login").secret;
        self.auth_client(0)
            .await
            .complete_login(CompleteLoginRequest {
                login_ticket: begun.login_ticket,
                code: totp_code(&secret, 0),
            })
            .await
            .expect("complete login on another replica")
            .into_inner()
    }
}

/// The repo's folder of topology scripts.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/topology")
}

/// Runs `scripts/topology/<script> <args>` with `envs`; fails with its output.
pub fn run_script(script: &str, args: &[&str], envs: &[(&str, String)]) -> anyhow::Result<String> {
    let output = std::process::Command::new("bash")
        .arg(scripts_dir().join(script))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    anyhow::ensure!(
        output.status.success(),
        "{script} {} failed ({}):\n{text}",
        args.join(" "),
        output.status
    );
    Ok(text)
}

/// A 3-node MariaDB Galera cluster on loopback (`scripts/topology/galera.sh`),
/// stopped and deleted when dropped.
pub struct Galera {
    envs: Vec<(&'static str, String)>,
    base_port: u16,
}

impl Galera {
    /// Starts the cluster under `dir` with its ports from `base_port`
    /// (nodes on base+1..base+3; see galera.sh).
    pub fn start(dir: &Path, base_port: u16) -> anyhow::Result<Galera> {
        let envs = vec![
            ("TOPOLOGY_DIR", dir.display().to_string()),
            ("GALERA_BASE_PORT", base_port.to_string()),
            // The server's default: the services set wsrep_sync_wait on their
            // own sessions, which is what these tests are to show.
            ("GALERA_SYNC_WAIT", "0".to_owned()),
            // A dead node is noticed in ~2-4 s instead of ~5-15 s.
            (
                "GALERA_EXTRA_PROVIDER_OPTIONS",
                "evs.keepalive_period=PT0.5S;evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S".to_owned(),
            ),
        ];
        let galera = Galera { envs, base_port };
        // A cluster left behind by an interrupted run is stopped first.
        let _ = galera.script(&["stop"]);
        galera.script(&["start"])?;
        Ok(galera)
    }

    pub fn script(&self, args: &[&str]) -> anyhow::Result<String> {
        run_script("galera.sh", args, &self.envs)
    }

    /// Node `n`'s (1..=3) server URL, without a database.
    pub fn node_url(&self, n: u16) -> String {
        format!("mysql://root@127.0.0.1:{}", self.base_port + n)
    }

    /// A new, empty database (DDL replicates to every node); its name.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let server = storegate::Db::connect(&self.node_url(1)).await?;
        storegate::on_db!(&server, pool => {
            sqlx::query(&format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4")).execute(pool).await.map(drop)
        })?;
        server.close().await;
        // Certified on every node, but applied on the others a moment
        // later: a replica connecting there at once could find no such
        // database. Each node, asked with wsrep_sync_wait, answers only once
        // it has applied everything the cluster committed before.
        for n in 1..=3 {
            let node = storegate::Db::connect(&self.node_url(n)).await?;
            let seen: Option<String> = storegate::on_db!(&node, pool => async {
                let mut conn = pool.acquire().await?;
                sqlx::query("SET SESSION wsrep_sync_wait = 15").execute(&mut *conn).await?;
                sqlx::query_scalar("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?")
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await
            }.await)?;
            node.close().await;
            anyhow::ensure!(seen.is_some(), "node {n} does not have database {name} after a causal read");
        }
        Ok(name.to_owned())
    }

    /// Node `n`'s URL for `database`.
    pub fn url(&self, n: u16, database: &str) -> String {
        format!("{}/{database}", self.node_url(n))
    }

    /// Starts HAProxy as the cluster's single writer
    /// (`deploy/haproxy/galera-single-writer.cfg`): node 1, the others as
    /// backups.
    pub fn start_writer_proxy(&self) -> anyhow::Result<()> {
        self.writer_proxy("start").map(drop)
    }

    /// `haproxy.sh <command>`: `start`, `stop`, `status`, `writer`.
    pub fn writer_proxy(&self, command: &str) -> anyhow::Result<String> {
        run_script("haproxy.sh", &[command], &self.envs)
    }

    /// The single writer's URL for `database` (through HAProxy).
    pub fn writer_url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.base_port + 10)
    }
}

impl Drop for Galera {
    fn drop(&mut self) {
        let _ = self.writer_proxy("stop");
        if let Err(e) = self.script(&["clean"]) {
            eprintln!("stopping the Galera cluster failed: {e:#}");
        }
    }
}

/// The nginx gateway (`deploy/nginx/storegate.conf` through
/// `scripts/topology/nginx.sh`) in front of replicas; stopped when dropped.
pub struct Gateway {
    envs: Vec<(&'static str, String)>,
    /// gRPC over HTTP/2, routed by path to auth or product replicas.
    pub grpc: SocketAddr,
    /// gRPC-Web over HTTP/1.1.
    pub web: SocketAddr,
}

impl Gateway {
    pub fn start(dir: &Path, replicas: &Replicas) -> anyhow::Result<Gateway> {
        let list = |services: &[ServiceProcess]| {
            services.iter().map(|s| s.addr.to_string()).collect::<Vec<_>>().join(" ")
        };
        let (grpc, web) = (free_addr(), free_addr());
        let envs = vec![
            ("TOPOLOGY_DIR", dir.display().to_string()),
            ("AUTH_REPLICAS", list(&replicas.auth)),
            ("PRODUCT_REPLICAS", list(&replicas.product)),
            ("GATEWAY_GRPC_PORT", grpc.port().to_string()),
            ("GATEWAY_WEB_PORT", web.port().to_string()),
        ];
        // Built first: if the start fails half-way, dropping it stops
        // whatever did start.
        let gateway = Gateway { envs, grpc, web };
        run_script("nginx.sh", &["start"], &gateway.envs)?;
        Ok(gateway)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Err(e) = run_script("nginx.sh", &["stop"], &self.envs) {
            eprintln!("stopping nginx failed: {e:#}");
        }
    }
}

/// A standalone MariaDB server on a loopback port
/// (`scripts/topology/mariadb-tls.sh`), with TLS on when given a CA and a
/// server certificate; stopped and deleted when dropped.
pub struct MariaDb {
    dir: PathBuf,
    pub port: u16,
}

impl MariaDb {
    /// Starts a server in `dir` on `port`; `tls` is (CA, certificate, key).
    pub fn start(dir: &Path, port: u16, tls: Option<(&Path, &Path, &Path)>) -> anyhow::Result<MariaDb> {
        let mut args = vec!["start".to_owned(), dir.display().to_string(), port.to_string()];
        if let Some((ca, cert, key)) = tls {
            args.extend([ca, cert, key].iter().map(|p| p.display().to_string()));
        }
        let server = MariaDb { dir: dir.to_owned(), port };
        // A server left behind by an interrupted run is stopped first.
        let _ = run_script("mariadb-tls.sh", &["stop", &server.dir.display().to_string()], &[]);
        run_script("mariadb-tls.sh", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[])?;
        Ok(server)
    }

    /// `mysql://root@127.0.0.1:<port>/mysql` with `query` appended.
    pub fn url(&self, query: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql{query}", self.port)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = run_script("mariadb-tls.sh", &["stop", &self.dir.display().to_string()], &[]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
