//! The root crate's example client (`examples/login_and_list.rs`), as
//! another backend service would use storegate: it logs in over verified
//! TLS, and never sends a password in plaintext to an `https://` URL.

use std::{io::Write as _, path::PathBuf, process::Stdio, time::Duration};

use storegate::{on_db, tls::ClientTlsFiles};
use storegate_testkit::{Backend, Running, TestDb, TestStack, certs::TestCa, totp_code, wait_serving_at};

/// `target/<profile>/examples/login_and_list`, which `cargo test` builds.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let binary = profile_dir.join("examples").join("login_and_list");
    assert!(
        binary.exists(),
        "{} is missing: `cargo test --workspace` builds it (or `cargo build --examples`)",
        binary.display()
    );
    binary
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// The example logging in as `username` at `auth_url`, the password and
/// the code on its standard input.
async fn login_and_list(auth_url: &str, product_url: &str, ca: Option<PathBuf>, input: String) -> Ran {
    let mut command = std::process::Command::new(example_binary());
    command
        .arg("alice")
        .env("AUTH_SERVICE_URL", auth_url)
        .env("PRODUCT_SERVICE_URL", product_url)
        .env_remove("STOREGATE_CA_FILE")
        .env_remove("STOREGATE_CLIENT_CERT_FILE")
        .env_remove("STOREGATE_CLIENT_KEY_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ca) = ca {
        command.env("STOREGATE_CA_FILE", ca);
    }
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("spawn the example");
        // The example may stop reading early (a refused connection).
        let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
        let output = child.wait_with_output().unwrap();
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("storegate-example-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Login tickets in the auth-service database: a BeginLogin with the right
/// password that reached the server leaves one.
async fn login_tickets(db: &TestDb) -> i64 {
    on_db!(&db.open().await, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM login_tickets").fetch_one(pool).await
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_client_refuses_an_https_url_served_in_plaintext() {
    let dir = scratch("plaintext");
    let ca = TestCa::new(&dir, "good");
    let stack = TestStack::start(Backend::Sqlite).await;
    stack.register("alice", "correct horse battery").await;

    let https = format!("https://localhost:{}", stack.auth_addr.port());
    let products = format!("http://{}", stack.product_addr.unwrap());
    let input = "correct horse battery\n123456\n".to_owned();
    let ran = login_and_list(&https, &products, Some(ca.ca_file.clone()), input).await;
    assert_ne!(ran.code, 0, "the example must fail rather than speak plaintext: {}", ran.stderr);
    assert_eq!(login_tickets(&stack.db).await, 0, "the password never reached the server");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_client_logs_in_and_lists_products_over_tls() {
    let dir = scratch("tls");
    let ca = TestCa::new(&dir, "good");
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = Running::auth_over_tls(&db, &ca.server("auth")).await;
    let auth_url = format!("https://localhost:{}", auth.addr.port());
    let trust = ClientTlsFiles { ca: Some(ca.ca_file.clone()), ..Default::default() };
    assert!(wait_serving_at(&auth_url, &trust, Duration::from_secs(30)).await);
    let mut product_config = product_service::ProductConfig::with_database_url(&db.url);
    product_config.auth_service_url = auth_url.clone();
    product_config.auth_service_ca_file = Some(ca.ca_file.clone());
    let server = ca.server("product");
    product_config.common.tls_cert_file = Some(server.cert);
    product_config.common.tls_key_file = Some(server.key);
    let products = Running::product(product_config).await;
    let product_url = format!("https://localhost:{}", products.addr.port());
    assert!(wait_serving_at(&product_url, &trust, Duration::from_secs(30)).await);

    // alice enrolled earlier; the example signs in with her next code.
    let secret = enroll_over_tls(&auth_url, &trust).await;
    let input = format!("correct horse battery\n{}\n", totp_code(&secret, 1));
    let without_ca = login_and_list(&auth_url, &product_url, None, input.clone()).await;
    assert_ne!(without_ca.code, 0, "a certificate the system does not trust: {}", without_ca.stdout);
    let ran = login_and_list(&auth_url, &product_url, Some(ca.ca_file.clone()), input).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert!(ran.stdout.contains("0 products:"), "{}", ran.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Registers alice and confirms her enrollment over TLS; her TOTP secret.
async fn enroll_over_tls(auth_url: &str, trust: &ClientTlsFiles) -> String {
    use storegate::pb::auth::v1::{
        BeginLoginRequest, CompleteLoginRequest, RegisterRequest, auth_service_client::AuthServiceClient,
    };
    let channel = storegate_testkit::channel_to(auth_url, trust).await.unwrap();
    let mut auth = AuthServiceClient::new(channel);
    let (username, password) = ("alice".to_owned(), "correct horse battery".to_owned());
    auth.register(RegisterRequest { username: username.clone(), password: password.clone() }).await.unwrap();
    let begun = auth
        .begin_login(BeginLoginRequest { username, password, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let secret = begun.enrollment.unwrap().secret;
    auth.complete_login(CompleteLoginRequest {
        login_ticket: begun.login_ticket,
        code: totp_code(&secret, 0),
    })
    .await
    .unwrap();
    secret
}
