//! MySQL over TLS: `ssl-mode` and `ssl-ca` in DATABASE_URL, against MariaDB
//! servers started for the test (one with TLS on, one without) with
//! certificates made at test time.
//!
//! Runs where `mariadbd` is installed (`scripts/topology/install.sh`); under
//! CI (`CI` set) a server that cannot be started is a failure, not a skip.

use sqlx::Connection as _;
use storegate_testkit::certs::TestCa;

/// Connects once (no retries) and runs a query; the error text on failure.
async fn connect(url: &str) -> Result<(), String> {
    let mut connection = sqlx::mysql::MySqlConnection::connect(url).await.map_err(|e| e.to_string())?;
    sqlx::query("SELECT 1").execute(&mut connection).await.map_err(|e| e.to_string())?;
    connection.close().await.map_err(|e| e.to_string())
}

fn can_run() -> bool {
    let installed = std::process::Command::new("sh")
        .args(["-c", "command -v mariadbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed && std::env::var_os("CI").is_some() {
        panic!("mariadbd is missing under CI: run scripts/topology/install.sh");
    }
    if !installed {
        eprintln!("skipped: mariadbd is not installed");
    }
    installed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_mode_and_ssl_ca_in_the_database_url() {
    if !can_run() {
        return;
    }
    let base = std::env::temp_dir().join(format!("storegate-mysql-tls-{}", std::process::id()));
    let ca = TestCa::new(&base.join("certs"), "db");
    let other = TestCa::new(&base.join("certs"), "other");
    let server = ca.server("mariadb");
    // Ports in 4800-4899, apart from the other topology tests'.
    let port = 4800 + (std::process::id() % 40) as u16;
    let tls = storegate_topology::MariaDb::start(
        &base.join("tls"),
        port,
        Some((&ca.ca_file, &server.cert, &server.key)),
    )
    .expect("a MariaDB with TLS on");
    let plain = storegate_topology::MariaDb::start(&base.join("plain"), port + 50, None)
        .expect("a MariaDB without TLS");

    let ca_file = ca.ca_file.display();
    connect(&tls.url(&format!("?ssl-mode=verify_ca&ssl-ca={ca_file}")))
        .await
        .expect("verify_ca with the server's CA");
    connect(&tls.url(&format!("?ssl-mode=verify_identity&ssl-ca={ca_file}")))
        .await
        .expect("verify_identity: the certificate names 127.0.0.1");
    connect(&tls.url("?ssl-mode=required")).await.expect("required: encrypted, not verified");

    let wrong = connect(&tls.url(&format!("?ssl-mode=verify_ca&ssl-ca={}", other.ca_file.display()))).await;
    assert!(wrong.is_err(), "a server certificate from another CA must be refused");

    let downgrade = connect(&plain.url("?ssl-mode=required")).await;
    assert!(downgrade.is_err(), "ssl-mode=required against a server without TLS must be refused");
    connect(&plain.url("")).await.expect("the plain server itself works");

    // The services take the same URL: a Db opens over TLS.
    let db = storegate::Db::connect(&tls.url(&format!("?ssl-mode=verify_ca&ssl-ca={ca_file}")))
        .await
        .expect("storegate's Db over TLS");
    db.close().await;
    drop((tls, plain));
    let _ = std::fs::remove_dir_all(&base);
}
