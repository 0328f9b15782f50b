//! The CLI and TLS: a password goes to an https:// URL only over verified
//! TLS, never in plaintext to a server that does not speak it.

use std::{io::Write as _, process::Stdio, time::Duration};

use storegate::tls::ClientTlsFiles;
use storegate_testkit::{Backend, Running, TestDb, TestStack, certs::TestCa, wait_serving_at};

struct Ran {
    code: i32,
    stderr: String,
}

/// `storegate register alice --password-stdin` against `auth_url`.
async fn register(auth_url: &str, ca_file: Option<&std::path::Path>, config_dir: &std::path::Path) -> Ran {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_storegate"));
    command
        .args(["register", "alice", "--password-stdin"])
        .env("STOREGATE_CONFIG_DIR", config_dir)
        .env("AUTH_SERVICE_URL", auth_url)
        .env_remove("STOREGATE_CA_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ca) = ca_file {
        command.env("STOREGATE_CA_FILE", ca);
    }
    tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("spawn storegate");
        child.stdin.take().unwrap().write_all(b"correct horse battery\n").unwrap();
        let output = child.wait_with_output().unwrap();
        Ran {
            code: output.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("storegate-cli-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_refuses_an_https_url_served_in_plaintext() {
    let dir = scratch("plaintext");
    let ca = TestCa::new(&dir, "good");
    let stack = TestStack::start_auth(Backend::Sqlite).await;

    let ran =
        register(&format!("https://localhost:{}", stack.auth_addr.port()), Some(&ca.ca_file), &dir).await;
    assert_ne!(ran.code, 0, "the CLI must fail rather than speak plaintext: {}", ran.stderr);
    assert!(ran.stderr.contains("securely"), "{}", ran.stderr);
    // Nothing reached the server: the name is still free.
    stack.register("alice", "another good passphrase").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_registers_over_tls_with_its_ca_file() {
    let dir = scratch("tls");
    let ca = TestCa::new(&dir, "good");
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = Running::auth_over_tls(&db, &ca.server("auth")).await;
    let url = format!("https://localhost:{}", auth.addr.port());
    let trust = ClientTlsFiles { ca: Some(ca.ca_file.clone()), ..Default::default() };
    assert!(wait_serving_at(&url, &trust, Duration::from_secs(30)).await);

    let without_ca = register(&url, None, &dir).await;
    assert_ne!(without_ca.code, 0, "a server certificate the system does not trust: {}", without_ca.stderr);
    let ran = register(&url, Some(&ca.ca_file), &dir).await;
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
