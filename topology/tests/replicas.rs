//! Replicas of both services as processes, started together on a fresh
//! database, on SQLite and on MySQL/MariaDB: every one comes up, the schema
//! is migrated exactly once, and they behave as one service (a login begun
//! on one replica completes on another; stock taken through every replica
//! adds up).
//!
//! `STOREGATE_REPLICA_ROUNDS` sets how many fresh databases each backend
//! gets (default 3).

use std::time::Duration;

use storegate::{
    Db,
    migrate::{self, SchemaState},
    on_db,
    pb::product::v1::{AdjustStockRequest, CreateProductRequest, GetProductRequest, Product},
};
use storegate_testkit::{
    Backend, TEST_MASTER_KEY, TestDb, backend_tests, bearer,
    process::{ServiceProcess, free_addr},
};
use storegate_topology::{Placement, Replicas, Scratch};

backend_tests!(
    replicas_started_together_on_a_fresh_database_all_serve,
    a_product_replica_waits_for_the_migrate_step,
    a_product_replica_without_token_keys_is_not_serving,
    a_failed_start_exits_without_ever_serving,
);

fn rounds() -> usize {
    std::env::var("STOREGATE_REPLICA_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3)
}

async fn replicas_started_together_on_a_fresh_database_all_serve(backend: Backend) {
    for round in 0..rounds() {
        let db = TestDb::new(&backend).await;
        let scratch = Scratch::new("replicas");
        // SQLite goes without a master key: the development key is created
        // by whichever replica comes first, and the other must use it.
        let master_key = matches!(backend, Backend::MySql(_));
        let mut replicas =
            Replicas::spawn(&Placement::all_on(&db.url, 2, 2), master_key, &[], &scratch.path).unwrap();
        if let Err(e) = replicas.wait_serving().await {
            panic!("round {round}: {e:#}\n(logs in {})", scratch.path.display());
        }

        let pool = Db::connect(&db.url).await.unwrap();
        assert_eq!(migrate::schema_state(&pool).await.unwrap(), SchemaState::Current, "round {round}");
        let versions: Vec<(i64, bool)> = on_db!(&pool, p => {
            sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version").fetch_all(p).await
        })
        .unwrap();
        assert_eq!(versions, storegate_topology::all_applied(&backend), "round {round}");
        // Migration 3 ran to its end: all its seed rows are there.
        let count_rows: i64 =
            on_db!(&pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM product_counts").fetch_one(p).await)
                .unwrap();
        assert_eq!(count_rows, 16, "round {round}");
        let keys: i64 =
            on_db!(&pool, p => sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys").fetch_one(p).await)
                .unwrap();
        assert!((1..=2).contains(&keys), "round {round}: {keys} first signing keys");

        if round == 0 {
            behave_as_one(&replicas, &db.url).await;
        }
        for replica in replicas.all() {
            assert!(replica.exited().is_none(), "{} exited:\n{}", replica.name, replica.log_tail(20));
        }
        pool.close().await;
    }
}

/// A login begun on one replica completes on another; a product created on
/// one is read on the other; 40 decrements spread over both add up.
async fn behave_as_one(replicas: &Replicas, database_url: &str) {
    let token = replicas.login(database_url, "operator", true).await.access_token;
    let created = replicas
        .product_client(0)
        .await
        .create_product(bearer(
            CreateProductRequest {
                product: Some(Product {
                    name: "Teapot".into(),
                    price: "12.50".into(),
                    stock: 100,
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            &token,
        ))
        .await
        .expect("create on replica 0")
        .into_inner();
    let clients = [replicas.product_client(0).await, replicas.product_client(1).await];
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let (token, id, mut client) = (token.clone(), created.id, clients[i % 2].clone());
            tokio::spawn(async move {
                client
                    .adjust_stock(bearer(
                        AdjustStockRequest { id, delta: -1, request_id: String::new() },
                        &token,
                    ))
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().expect("every decrement succeeds");
    }
    let read = replicas
        .product_client(1)
        .await
        .get_product(bearer(GetProductRequest { id: created.id }, &token))
        .await
        .expect("read on replica 1")
        .into_inner();
    assert_eq!(read.stock, 60);
}

/// With MIGRATE_ON_START=false a replica reports NOT_SERVING and waits; the
/// `migrate` command brings it up without a restart.
async fn a_product_replica_waits_for_the_migrate_step(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let scratch = Scratch::new("migrate-step");
    let waiting = [("MIGRATE_ON_START", "false".to_owned())];
    let mut replicas =
        Replicas::spawn(&Placement::all_on(&db.url, 1, 1), true, &waiting, &scratch.path).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for replica in replicas.all() {
        assert!(replica.exited().is_none(), "{} exited:\n{}", replica.name, replica.log_tail(20));
        assert!(
            !storegate_testkit::health_serving(replica.addr).await,
            "{} serves without a schema",
            replica.name
        );
    }
    let pool = Db::connect(&db.url).await.unwrap();
    assert!(matches!(migrate::schema_state(&pool).await.unwrap(), SchemaState::Behind(_)), "nobody migrated");

    migrate_with("product-service", &db.url).await;
    replicas.wait_serving().await.expect("both serve once the schema is there");
    // The same step from the other binary, on the migrated schema: nothing
    // to do, and it says so by succeeding.
    migrate_with("auth-service", &db.url).await;
    assert_eq!(migrate::schema_state(&pool).await.unwrap(), SchemaState::Current);
    pool.close().await;
}

/// Runs `<binary> migrate` on `url`; it must succeed.
async fn migrate_with(binary: &str, url: &str) {
    let migrated = tokio::process::Command::new(storegate_testkit::process::binary(binary).unwrap())
        .arg("migrate")
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(migrated.status.success(), "{binary} migrate: {}", String::from_utf8_lossy(&migrated.stderr));
}

/// product-service can answer nothing without token keys: NOT_SERVING (and
/// UNAVAILABLE) until auth-service is there to give them, then SERVING
/// without a restart.
async fn a_product_replica_without_token_keys_is_not_serving(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let scratch = Scratch::new("no-keys");
    let auth_addr = free_addr();
    let product_addr = free_addr();
    let mut product = ServiceProcess::spawn(
        "product",
        "product-service",
        product_addr,
        &[
            ("DATABASE_URL", db.url.clone()),
            ("PRODUCT_LISTEN_ADDR", product_addr.to_string()),
            ("AUTH_SERVICE_URL", format!("http://{auth_addr}")),
        ],
        &scratch.path,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(product.exited().is_none(), "{}", product.log_tail(20));
    assert!(!storegate_testkit::health_serving(product_addr).await, "SERVING without keys");
    let mut client = storegate::pb::product::v1::product_service_client::ProductServiceClient::new(
        storegate_testkit::TestStack::channel(product_addr).await,
    );
    let err = client.get_product(bearer(GetProductRequest { id: 1 }, "any.token.here")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    let mut auth = ServiceProcess::spawn(
        "auth",
        "auth-service",
        auth_addr,
        &[
            ("DATABASE_URL", db.url.clone()),
            ("AUTH_LISTEN_ADDR", auth_addr.to_string()),
            ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned()),
        ],
        &scratch.path,
    )
    .unwrap();
    auth.wait_serving(Duration::from_secs(30)).await.unwrap();
    product.wait_serving(Duration::from_secs(30)).await.expect("SERVING once the keys arrive");
}

/// Watches a starting process until it exits: health must never have said
/// SERVING meanwhile. Its exit status and log.
async fn exits_without_serving(mut process: ServiceProcess) -> (std::process::ExitStatus, String) {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = process.exited() {
            return (status, process.log());
        }
        assert!(
            !storegate_testkit::health_serving(process.addr).await,
            "{} reported SERVING on a start that fails:\n{}",
            process.name,
            process.log_tail(20)
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} still running a minute into a start that fails:\n{}",
            process.name,
            process.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A start that cannot succeed (no master key where one is required, the
/// wrong master key for the stored keys, a certificate file that is not
/// there, a database that does not answer) exits non-zero with the cause in
/// its log, and no health check ever saw it SERVING.
async fn a_failed_start_exits_without_ever_serving(backend: Backend) {
    let db = TestDb::new(&backend).await;
    let scratch = Scratch::new("failed-start");
    let spawn = |name: &str, binary: &str, envs: &[(&str, String)]| {
        let addr = free_addr();
        let listen = if binary == "auth-service" { "AUTH_LISTEN_ADDR" } else { "PRODUCT_LISTEN_ADDR" };
        let mut all = vec![(listen, addr.to_string())];
        all.extend(envs.iter().cloned());
        ServiceProcess::spawn(name, binary, addr, &all, &scratch.path).unwrap()
    };
    let database = ("DATABASE_URL", db.url.clone());
    // The wrong key must meet keys stored under the right one: a first
    // start stores them.
    let mut first = spawn(
        "first",
        "auth-service",
        &[database.clone(), ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned())],
    );
    first.wait_serving(Duration::from_secs(60)).await.unwrap();
    drop(first);
    let mut cases = vec![
        (
            "a wrong master key",
            spawn(
                "wrong-key",
                "auth-service",
                &[database.clone(), ("STOREGATE_MASTER_KEY", OTHER_MASTER_KEY.to_owned())],
            ),
            "STOREGATE_MASTER_KEY",
        ),
        (
            "a certificate file that is not there",
            spawn(
                "no-cert",
                "product-service",
                &[
                    database.clone(),
                    ("TLS_CERT_FILE", "/nonexistent/storegate.crt".to_owned()),
                    ("TLS_KEY_FILE", "/nonexistent/storegate.key".to_owned()),
                ],
            ),
            "/nonexistent/storegate.crt",
        ),
    ];
    if matches!(backend, Backend::MySql(_)) {
        let closed = free_addr();
        cases.push((
            "no master key on MySQL",
            spawn("no-key", "auth-service", std::slice::from_ref(&database)),
            "STOREGATE_MASTER_KEY",
        ));
        cases.push((
            "a database that does not answer",
            spawn(
                "no-database",
                "product-service",
                &[("DATABASE_URL", format!("mysql://root@{closed}/storegate"))],
            ),
            "cannot connect to MySQL",
        ));
    }
    for (what, process, cause) in cases {
        let (status, log) = exits_without_serving(process).await;
        assert!(!status.success(), "{what}: exited {status}");
        assert!(log.contains(cause), "{what}: the log names the cause ({cause}):\n{log}");
    }
}

/// A master key other than the one the test stack stores its keys under.
const OTHER_MASTER_KEY: &str = "b3RoZXItc3RvcmVnYXRlLXRlc3Qta2V5LTMyYnl0ZXM=";
