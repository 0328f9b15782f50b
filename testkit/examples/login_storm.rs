//! Benchmark: 200 BeginLogin calls at once against a real auth-service,
//! while Health checks and GetJwks keep being timed. Shows that password
//! hashing (bounded, off the async runtime) does not starve other calls.
//!
//!     cargo run --release -p storegate-testkit --example login_storm
//!
//! Uses a fresh SQLite database; set STOREGATE_TEST_MYSQL_URL to use MySQL.

use std::time::{Duration, Instant};

use storegate::pb::auth::v1::{BeginLoginRequest, GetJwksRequest};
use storegate_testkit::{Backend, TestStack};
use tonic::Code;

const STORM: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:>8}: n={:<4} p50={:>7.2?} p99={:>7.2?} max={:>7.2?}",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

fn main() {
    let backend = match std::env::var(storegate_testkit::MYSQL_URL_VAR) {
        Ok(url) if !url.is_empty() => Backend::MySql(url),
        _ => Backend::Sqlite,
    };
    println!("backend: {}", if matches!(backend, Backend::Sqlite) { "SQLite" } else { "MySQL" });
    // The server gets a runtime of its own, as in production: the client's
    // 200 tasks must not queue in front of the server's work.
    let server_runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let stack = server_runtime.block_on(TestStack::start_auth(backend));
    let client_runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    client_runtime.block_on(storm(stack.auth_addr));
    drop(stack);
}

async fn storm(auth_addr: std::net::SocketAddr) {
    let channel = TestStack::channel(auth_addr).await;

    let storm_started = Instant::now();
    let storm: Vec<_> = (0..STORM)
        .map(|i| {
            let mut auth =
                storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let result = auth
                    .begin_login(BeginLoginRequest {
                        username: format!("storm-{i}"),
                        password: "not the password".into(),
                    })
                    .await;
                (result.map(drop).map_err(|e| e.code()), started.elapsed())
            })
        })
        .collect();

    // Probe the other calls while the storm runs.
    let mut health_client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut auth_client =
        storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel.clone());
    let (mut health, mut jwks) = (Vec::new(), Vec::new());
    while !storm.iter().all(|t| t.is_finished()) {
        let t = Instant::now();
        health_client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
        health.push(t.elapsed());
        let t = Instant::now();
        auth_client.get_jwks(GetJwksRequest {}).await.unwrap();
        jwks.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let storm_time = storm_started.elapsed();

    let (mut evaluated, mut shed, mut other) = (Vec::new(), 0, 0);
    for task in storm {
        match task.await.unwrap() {
            (Err(Code::Unauthenticated), took) => evaluated.push(took),
            (Err(Code::ResourceExhausted), _) => shed += 1,
            _ => other += 1,
        }
    }
    println!("{STORM} concurrent BeginLogin calls finished in {storm_time:.2?}");
    println!(
        "  evaluated (argon2id verify): {}, shed with RESOURCE_EXHAUSTED: {shed}, other: {other}",
        evaluated.len()
    );
    report("login", evaluated);
    report("health", health);
    report("GetJwks", jwks);
}
