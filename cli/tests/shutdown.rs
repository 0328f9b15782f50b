//! SIGTERM on `storegate up`: health turns NOT_SERVING first, calls in
//! flight complete, then the process exits cleanly.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use storegate::pb::auth::v1::{BeginLoginRequest, auth_service_client::AuthServiceClient};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_reports_not_serving_then_drains_calls_in_flight() {
    let dir = std::env::temp_dir().join(format!("storegate-shutdown-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_storegate"))
        .args(["up", "--auth-listen-addr", "127.0.0.1:0", "--product-listen-addr", "127.0.0.1:0"])
        .env("DATABASE_URL", format!("sqlite://{}/storegate.db", dir.display()))
        .env("SHUTDOWN_GRACE_SECS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // "  auth-service     http://127.0.0.1:PORT   (…)"
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let auth_url = loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "storegate up ended early");
        if let Some(url) = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .filter(|_| line.contains("auth-service"))
        {
            break url.to_owned();
        }
    };
    let channel = tonic::transport::Channel::from_shared(auth_url).unwrap().connect().await.unwrap();

    // Calls that each take an argon2 verification, all in flight at once.
    let calls: Vec<_> = (0..12)
        .map(|i| {
            let mut auth = AuthServiceClient::new(channel.clone());
            tokio::spawn(async move {
                auth.begin_login(BeginLoginRequest {
                    username: format!("nobody-{i}"),
                    password: "whatever it is".into(),
                })
                .await
                .map(drop)
                .map_err(|e| e.code())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());

    // During the grace period the server still answers, and says it is going.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("still answering during the grace period")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);

    for call in calls {
        assert_eq!(
            call.await.unwrap(),
            Err(Code::Unauthenticated),
            "every call in flight got its real answer"
        );
    }
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    let _ = std::fs::remove_dir_all(dir);
}
