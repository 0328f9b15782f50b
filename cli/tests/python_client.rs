//! The Python client example (`examples/python/storegate_client.py`, grpcio
//! with stubs generated from proto/ at start) against real servers: it
//! registers, enrolls with a TOTP code computed from the secret, and
//! manages a product. Needs a Python with grpcio and grpcio-tools
//! (`pip install -r examples/python/requirements.txt`) named by
//! STOREGATE_TEST_PYTHON; .ci/run makes one. Skipped without it, except
//! under CI, where it fails.

use std::{io::Write as _, path::PathBuf, process::Stdio};

use storegate_testkit::{Backend, TestStack, backend_tests};

backend_tests!(the_python_client_registers_enrolls_and_manages_a_product);

const PASSWORD: &str = "correct horse battery";

fn python() -> Option<String> {
    match std::env::var("STOREGATE_TEST_PYTHON") {
        Ok(python) if !python.is_empty() => Some(python),
        _ if std::env::var_os("CI").is_some() => {
            panic!("STOREGATE_TEST_PYTHON is not set under CI: .ci/run makes a Python with grpcio")
        }
        _ => {
            eprintln!("skipped: STOREGATE_TEST_PYTHON names no Python with grpcio");
            None
        }
    }
}

/// Runs the script with `args`, the password on stdin; its stdout lines.
async fn run(python: &str, stack: &TestStack, args: &[&str]) -> Vec<serde_json::Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/storegate_client.py");
    let mut command = std::process::Command::new(python);
    command
        .arg(script)
        .args(args)
        .env("AUTH_SERVICE_URL", stack.auth_addr.to_string())
        .env("PRODUCT_SERVICE_URL", stack.product_addr.unwrap().to_string())
        .env_remove("STOREGATE_CA_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("python runs");
        child.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{args:?} failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD), "the password is printed");
    stdout.lines().map(|line| serde_json::from_str(line).expect("one JSON object per line")).collect()
}

async fn the_python_client_registers_enrolls_and_manages_a_product(backend: Backend) {
    let Some(python) = python() else { return };
    let stack = TestStack::start(backend).await;
    let registered = run(&python, &stack, &["register", "alice"]).await;
    assert_eq!(registered[0]["step"], "register");
    assert!(registered[0]["user_id"].as_i64().unwrap() > 0);
    auth_service::grant_role(&TestStack::auth_config(&stack.db), "alice", "admin").await.unwrap();

    let steps = run(&python, &stack, &["demo", "alice"]).await;
    let step = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {steps:?}"))
            .clone()
    };
    let begun = step("begin_login");
    assert_eq!((begun["enrolling"].as_bool(), begun["png"].as_bool()), (Some(true), Some(true)));
    assert_eq!(begun["otpauth_uri_scheme"], "otpauth");
    let completed = step("complete_login");
    assert_eq!(
        (completed["token_type"].as_str(), completed["recovery_codes"].as_i64()),
        (Some("Bearer"), Some(10))
    );
    let created = step("create_product");
    let id = created["id"].as_i64().unwrap();
    assert_eq!(
        (created["price"].as_str(), created["retried_same_id"].as_bool()),
        (Some("31.50"), Some(true))
    );
    assert_eq!(step("get_product")["stock"], 12);
    assert_eq!(step("list_products")["ids"], serde_json::json!([id]));
    let updated = step("update_product");
    assert_eq!((updated["price"].as_str(), updated["name_kept"].as_bool()), (Some("29.99"), Some(true)));
    assert_eq!(step("adjust_stock")["stock"], 7);
    assert_eq!(step("adjust_stock_below_zero")["code"], "FAILED_PRECONDITION");
    assert_eq!(step("search")["ids"], serde_json::json!([id]));
    assert_eq!(step("delete_product")["then"], "NOT_FOUND");
    assert_eq!(step("refresh_token")["rotated"], true);
    assert_eq!(step("logout")["refresh_then"], "UNAUTHENTICATED");

    // What the client did is what the database holds: the product is gone,
    // and its one stock change was applied once.
    let db = stack.db.open().await;
    let products: i64 = storegate::on_db!(&db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM products").fetch_one(pool).await)
        .unwrap();
    assert_eq!(products, 0);
}
