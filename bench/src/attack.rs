//! The red-team's resource attacks against the release binaries, once, to
//! state the memory bound the abuse limits give (BENCHMARKS.md,
//! docs/security.md): 20,000 HTTP/2 streams that never send a body, 2,000
//! gRPC-Web (HTTP/1.1) connections stalled mid-body, and 16 addresses
//! using every trick at once (held streams, unread answers, stalled
//! bodies, idle connections) while another client calls, against each
//! service with its default limits on SQLite.
//!
//!     cargo build --release --bins && target/release/storegate-attack
//!
//! `storegate-attack every-trick` runs the last attack alone.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use storegate::pb::auth::v1::{
    BeginLoginRequest, CompleteLoginRequest, RegisterRequest, auth_service_client::AuthServiceClient,
};
use storegate_testkit::{
    TEST_MASTER_KEY, TestStack,
    attack::{self, H2Flood, http1_stalled_body},
    process::{ServiceProcess, free_addr},
    totp_code,
};

const STREAMS: u32 = 20_000;
const STREAM_CONNECTIONS: u32 = 20;
const HTTP1_CONNECTIONS: usize = 2_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("storegate-attack-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = format!("sqlite://{}/storegate.db", dir.display());
    let (auth_addr, product_addr) = (free_addr(), free_addr());
    let common = [("DATABASE_URL", db.clone()), ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned())];
    let mut auth = ServiceProcess::spawn(
        "auth-service",
        "auth-service",
        auth_addr,
        &[&common[..], &[("AUTH_LISTEN_ADDR", auth_addr.to_string())]].concat(),
        &dir,
    )?;
    auth.wait_serving(Duration::from_secs(60)).await?;
    let mut product = ServiceProcess::spawn(
        "product-service",
        "product-service",
        product_addr,
        &[
            &common[..],
            &[
                ("PRODUCT_LISTEN_ADDR", product_addr.to_string()),
                ("AUTH_SERVICE_URL", format!("http://{auth_addr}")),
            ],
        ]
        .concat(),
        &dir,
    )?;
    product.wait_serving(Duration::from_secs(60)).await?;
    let token = self_registered_token(auth_addr).await?;
    let only_every_trick = std::env::args().nth(1).as_deref() == Some("every-trick");

    if !only_every_trick {
        floods_of_one_address(&auth, &product, &token).await?;
        println!();
    }
    println!(
        "| service | attack | idle RSS MiB | peak RSS MiB | another client's calls | p50 | p99 | max | attacking connections cut |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for service in [&auth, &product] {
        every_trick(service).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    drop((auth, product));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The two floods from one address, against each service in turn.
async fn floods_of_one_address(
    auth: &ServiceProcess,
    product: &ServiceProcess,
    token: &str,
) -> anyhow::Result<()> {
    println!(
        "| service | attack | idle RSS MiB | peak RSS MiB | refused or shed at once | fresh Health/Check during it | still open after 35 s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (service, path, headers) in [
        (auth, "/storegate.auth.v1.AuthService/GetJwks", vec![]),
        (
            product,
            "/storegate.product.v1.ProductService/ListProducts",
            vec![("authorization".to_owned(), format!("Bearer {token}"))],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        streams(service, path, &headers).await?;
        tokio::time::sleep(Duration::from_secs(35)).await;
        http1(service, path).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    Ok(())
}

async fn self_registered_token(auth: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut client = AuthServiceClient::new(TestStack::channel(auth).await);
    let (username, password) = ("attacker".to_owned(), "a self registered account".to_owned());
    client.register(RegisterRequest { username: username.clone(), password: password.clone() }).await?;
    let begun = client
        .begin_login(BeginLoginRequest { username, password, ..Default::default() })
        .await?
        .into_inner();
    let secret = begun.enrollment.map(|e| e.secret).unwrap_or_default();
    let tokens = client
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 0),
        })
        .await?
        .into_inner();
    Ok(tokens.access_token)
}

/// RSS now (MiB), and the peak of `samples` taken every 100 ms.
async fn peak_rss(service: &ServiceProcess, samples: usize) -> f64 {
    let mut peak: f64 = 0.0;
    for _ in 0..samples {
        peak = peak.max(service.memory_mib().0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

/// A health check from another client (127.0.0.2: all of 127/8 is
/// loopback) while the flood, from 127.0.0.1, goes on.
async fn fresh_health(service: &ServiceProcess) -> String {
    let started = Instant::now();
    let check = async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", service.addr))
            .ok()?
            .local_address(Some(std::net::Ipv4Addr::new(127, 0, 0, 2).into()));
        let mut client = tonic_health::pb::health_client::HealthClient::new(endpoint.connect().await.ok()?);
        let answer =
            client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?;
        Some(
            answer.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        )
    };
    let serving = tokio::time::timeout(Duration::from_secs(10), async { check.await.unwrap_or(false) }).await;
    match serving {
        Ok(true) => format!("SERVING in {} ms", started.elapsed().as_millis()),
        Ok(false) => format!("answered (not SERVING: shed) in {} ms", started.elapsed().as_millis()),
        Err(_) => "no answer in 10 s".to_owned(),
    }
}

async fn streams(service: &ServiceProcess, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<()> {
    let idle = service.memory_mib().0;
    let mut floods = Vec::new();
    for _ in 0..STREAM_CONNECTIONS {
        let mut flood = H2Flood::connect(service.addr, path, headers).await?;
        flood.open_stalled(STREAMS / STREAM_CONNECTIONS);
        floods.push(flood);
    }
    let peak = peak_rss(service, 30).await;
    let at_once: usize = floods
        .iter()
        .map(|f| f.counts.reset.load(Ordering::Acquire) + f.counts.answered.load(Ordering::Acquire))
        .sum();
    let health = fresh_health(service).await;
    let peak = peak.max(peak_rss(service, 10).await);
    println!(
        "| {} | {STREAMS} HTTP/2 streams without a body over {STREAM_CONNECTIONS} connections | {idle:.1} | {peak:.1} | {at_once} | {health} | – |",
        service.name
    );
    Ok(())
}

async fn http1(service: &ServiceProcess, path: &str) -> anyhow::Result<()> {
    let idle = service.memory_mib().0;
    let mut stalled = Vec::new();
    for _ in 0..HTTP1_CONNECTIONS {
        match http1_stalled_body(service.addr, path).await {
            Ok(stream) => stalled.push(stream),
            Err(_) => continue,
        }
    }
    let peak = peak_rss(service, 30).await;
    let health = fresh_health(service).await;
    // Count the connections the server has closed after 35 s.
    tokio::time::sleep(Duration::from_secs(32)).await;
    let mut open = 0;
    for stream in &mut stalled {
        let mut buf = [0u8; 4096];
        let closed = loop {
            match stream.try_read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        open += usize::from(!closed);
    }
    println!(
        "| {} | {HTTP1_CONNECTIONS} gRPC-Web connections stalled mid-body | {idle:.1} | {peak:.1} | – | {health} | {open} |",
        service.name
    );
    Ok(())
}

/// 16 addresses using every trick at once for 30 s (testkit's
/// `attack::every_trick`), while a client at another address calls
/// Health/Check every 20 ms.
async fn every_trick(service: &ServiceProcess) {
    const ATTACKERS: u8 = 16;
    const RUN: Duration = Duration::from_secs(30);
    let idle = service.memory_mib().0;
    let until = Instant::now() + RUN;
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|n| tokio::spawn(attack::every_trick([127, 0, 0, 100 + n].into(), service.addr, until)))
        .collect();
    let sampling = {
        let pid_status = format!("/proc/{}/status", service.pid());
        tokio::spawn(async move {
            let mut peak: f64 = 0.0;
            while Instant::now() < until {
                peak = peak.max(storegate_testkit::process::memory_of(&pid_status).0);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let observed = attack::observe_health(service.addr, [127, 0, 0, 250].into(), until).await;
    let mut cut = 0;
    for attacker in attackers {
        cut += attacker.await.unwrap_or(0);
    }
    let peak = sampling.await.unwrap_or(0.0);
    println!(
        "| {} | 16 addresses, every trick, {} s | {idle:.1} | {peak:.1} | {} answered, {} failed | {:.1} ms | {:.1} ms | {:.1} ms | {cut} |",
        service.name,
        RUN.as_secs(),
        observed.latencies.len(),
        observed.failures.len(),
        observed.quantile(0.5).as_secs_f64() * 1e3,
        observed.quantile(0.99).as_secs_f64() * 1e3,
        observed.quantile(1.0).as_secs_f64() * 1e3,
    );
}
