//! The server's budgets against clients on many addresses (issue: four
//! addresses holding Health/Watch streams, or reading no answers, stopped
//! either service). Each of 127.0.0.0/8 is a client of its own on loopback.
//! Long-lived streams are counted apart from unary calls, every cap is
//! shared fairly between addresses, a response left unread is reset (its
//! connection goes on), and a unary call's response must be sent within the
//! request timeout.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use storegate::{config::Limits, pb::auth::v1::GetJwksRequest, tls::ClientTlsFiles};
use storegate_testkit::{
    Backend, Running, TEST_MASTER_KEY, TestDb, TestStack,
    attack::{self, H2Flood, eventually},
    process::{ServiceProcess, free_addr},
    wait_serving_at,
};

const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";
const GET_JWKS: &str = "/storegate.auth.v1.AuthService/GetJwks";

/// The growth of resident memory we state for a service's connections
/// under every trick at once from 16 addresses (docs/security.md, "Abuse
/// limits"; measured about 50 MiB).
const FLOOD_BOUND_MIB: f64 = 96.0;
/// What a password hash holds while it runs (argon2id, m = 19 MiB); one
/// runs per core at most, and their areas are kept while more wait.
const HASH_MIB: f64 = 19.0;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

async fn auth_with(db: &TestDb, limits: Limits) -> Running {
    let mut config = TestStack::auth_config(db);
    config.common.limits = limits;
    let auth = Running::auth(config).await;
    let url = format!("http://{}", auth.addr);
    assert!(wait_serving_at(&url, &ClientTlsFiles::default(), Duration::from_secs(30)).await, "not serving");
    auth
}

/// A client on its own connection from `from`.
async fn client_from(
    server: SocketAddr,
    from: IpAddr,
) -> Result<
    storegate::pb::auth::v1::auth_service_client::AuthServiceClient<tonic::transport::Channel>,
    tonic::Status,
> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .unwrap()
        .local_address(Some(from))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    Ok(storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel))
}

async fn get_jwks_from(server: SocketAddr, from: IpAddr) -> Result<(), tonic::Status> {
    client_from(server, from).await?.get_jwks(GetJwksRequest {}).await.map(drop)
}

fn answered(flood: &H2Flood) -> usize {
    flood.counts.answered.load(Ordering::Acquire)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_lived_streams_never_take_a_unary_calls_place() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits {
        max_concurrent_calls: 8,
        max_streaming_calls: 40,
        max_streaming_calls_per_client: 10,
        ..Limits::default()
    };
    let auth = auth_with(&db, limits).await;

    // Four addresses ask for 25 Health/Watch streams each, far beyond their
    // share: each gets its share, the rest are refused at once.
    let mut watchers = Vec::new();
    for last in 10..14 {
        let mut flood =
            H2Flood::connect_from(Some(ip(last)), auth.addr, HEALTH_WATCH, &[], None).await.unwrap();
        flood.settings(Duration::from_secs(5)).await.expect("settings");
        flood.open_complete(25);
        watchers.push(flood);
    }
    let all_answered = || watchers.iter().map(answered).sum::<usize>();
    // Every stream gets its response headers (the held ones) or a
    // trailers-only refusal.
    assert!(eventually(Duration::from_secs(5), || all_answered() >= 100).await, "{}", all_answered());

    // Unary calls do not compete with the streams, from any address,
    // the watching ones included.
    for last in [10, 11, 12, 13, 50] {
        get_jwks_from(auth.addr, ip(last)).await.expect("a unary call beside held streams");
    }
    // A newcomer still finds a stream: the four hold less than all of them.
    let mut newcomer = H2Flood::connect_from(Some(ip(60)), auth.addr, HEALTH_WATCH, &[], None).await.unwrap();
    newcomer.settings(Duration::from_secs(5)).await.expect("settings");
    newcomer.open_complete(1);
    assert!(eventually(Duration::from_secs(2), || answered(&newcomer) >= 1).await);
    // Its one answer is a stream's headers, not a trailers-only refusal:
    // the stream stays open (no RST, no second HEADERS with the trailers).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(answered(&newcomer), 1, "the newcomer's stream is held open");
    assert_eq!(newcomer.counts.reset.load(Ordering::Acquire), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_left_unread_is_reset_at_the_write_timeout_and_its_connection_goes_on() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits {
        max_concurrent_calls_per_client: 40,
        write_timeout_secs: 1,
        request_timeout_secs: 60,
        ..Limits::default()
    };
    let auth = auth_with(&db, limits).await;

    // A window of 0: the client reads none of these answers.
    let started = Instant::now();
    let mut reader = H2Flood::connect_from(Some(ip(20)), auth.addr, GET_JWKS, &[], Some(0)).await.unwrap();
    reader.settings(Duration::from_secs(5)).await.expect("settings");
    reader.open_complete(20);
    assert!(eventually(Duration::from_secs(1), || answered(&reader) >= 20).await, "headers go out");
    // Meanwhile the same connection carries calls the client reads, each
    // given a window of its own: one every 200 ms, before and after the
    // resets.
    let (mut opened, mut reset_after) = (0, None);
    while started.elapsed() < Duration::from_secs(3) {
        reader.open_read();
        opened += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if reader.resets() > 0 && reset_after.is_none() {
            reset_after = Some(started.elapsed());
        }
    }
    let reset_after = reset_after.expect("reset within the write timeout and a check");
    assert_eq!(reader.resets(), 20, "each unread response is reset, and only those");
    assert!(reset_after >= Duration::from_millis(900), "not before the write timeout: {reset_after:?}");
    // The read calls are answered (response headers and trailers each), on
    // the connection that was not cut.
    assert!(
        eventually(Duration::from_secs(3), || answered(&reader) >= 20 + 2 * opened).await,
        "{} answers for {opened} read calls",
        answered(&reader)
    );
    assert!(!reader.is_closed(), "the connection goes on");
    assert_eq!(reader.resets(), 20);
    // Their places are free again: the address has its whole share.
    for _ in 0..3 {
        get_jwks_from(auth.addr, ip(20)).await.expect("the address is served again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unary_response_unsent_at_the_request_timeout_is_reset() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits { write_timeout_secs: 300, request_timeout_secs: 2, ..Limits::default() };
    let auth = auth_with(&db, limits).await;

    let started = Instant::now();
    let mut reader = H2Flood::connect_from(Some(ip(21)), auth.addr, GET_JWKS, &[], Some(0)).await.unwrap();
    reader.settings(Duration::from_secs(5)).await.expect("settings");
    reader.open_complete(5);
    assert!(eventually(Duration::from_secs(8), || reader.resets() == 5).await, "the streams are reset");
    let reset_after = started.elapsed();
    assert!(reset_after >= Duration::from_millis(1900), "not before the request timeout: {reset_after:?}");
    assert!(
        reset_after < Duration::from_secs(5),
        "at the request timeout, not the write timeout: {reset_after:?}"
    );
    assert!(!reader.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_stream_that_is_read_is_never_cut() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits { write_timeout_secs: 1, request_timeout_secs: 1, ..Limits::default() };
    let auth = auth_with(&db, limits).await;
    let mut watcher = H2Flood::connect_from(Some(ip(22)), auth.addr, HEALTH_WATCH, &[], None).await.unwrap();
    watcher.settings(Duration::from_secs(5)).await.expect("settings");
    watcher.open_complete(3);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!watcher.is_closed(), "streams outlive the request and write timeouts while read");
    assert_eq!(watcher.counts.reset.load(Ordering::Acquire), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_are_shared_fairly_between_addresses() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits { max_connections: 30, ..Limits::default() };
    let auth = auth_with(&db, limits).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Two addresses each open 30 connections with a call held on each.
    let mut floods = Vec::new();
    for last in [30, 31] {
        for _ in 0..30 {
            let Ok(mut flood) =
                H2Flood::connect_from(Some(ip(last)), auth.addr, HEALTH_WATCH, &[], None).await
            else {
                continue;
            };
            if flood.settings(Duration::from_secs(1)).await.is_some() {
                flood.open_complete(1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            floods.push(flood);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = floods.iter().filter(|f| !f.is_closed()).count();
    assert!(open < 30, "two addresses hold {open} of 30 connections");
    // A third address connects and is answered.
    get_jwks_from(auth.addr, ip(32)).await.expect("a newcomer gets a connection");
}

/// The whole attack at once against each service's binary at its
/// default limits (but shorter timeouts, to finish in seconds): from 16
/// addresses, each holds as many Health/Watch streams as it can, reads no
/// answers to 256 calls, stalls 256 request bodies, keeps 64 idle
/// connections, starting again as it is cut, and (auth-service) keeps 8
/// BeginLogin calls with made-up names going. Another client's unary calls
/// are answered with p99 under a second throughout, and memory stays
/// within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_addresses_using_every_trick_leave_another_client_served() {
    const ATTACKERS: u8 = 16;
    const RUN: Duration = Duration::from_secs(10);
    let db = TestDb::new(&Backend::Sqlite).await;
    let logs = tempfile_dir();
    let (auth_addr, product_addr) = (free_addr(), free_addr());
    let common = [
        ("DATABASE_URL", db.url.clone()),
        ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned()),
        ("REQUEST_TIMEOUT_SECS", "4".to_owned()),
        ("WRITE_TIMEOUT_SECS", "3".to_owned()),
    ];
    let auth_env = [&common[..], &[("AUTH_LISTEN_ADDR", auth_addr.to_string())]].concat();
    let mut auth =
        ServiceProcess::spawn("auth-service", "auth-service", auth_addr, &auth_env, &logs).unwrap();
    auth.wait_serving(Duration::from_secs(60)).await.unwrap();
    let product_env = [
        &common[..],
        &[
            ("PRODUCT_LISTEN_ADDR", product_addr.to_string()),
            ("AUTH_SERVICE_URL", format!("http://{auth_addr}")),
        ],
    ]
    .concat();
    let mut product =
        ServiceProcess::spawn("product-service", "product-service", product_addr, &product_env, &logs)
            .unwrap();
    product.wait_serving(Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    for service in [&auth, &product] {
        let (before, _) = service.memory_mib();
        let until = Instant::now() + RUN;
        let attackers: Vec<_> = (0..ATTACKERS)
            .map(|n| tokio::spawn(attack::every_trick(ip(100 + n), service.addr, until)))
            .collect();
        // Against auth-service each address also keeps 8 BeginLogin calls
        // with made-up names going, to fill the password-hashing queue.
        let logins: Vec<_> = (0..ATTACKERS)
            .filter(|_| service.name == "auth-service")
            .map(|n| tokio::spawn(attack::login_flood(ip(100 + n), service.addr, 8, until)))
            .collect();
        // Let the attack take hold before measuring.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let observed = attack::observe_health(service.addr, ip(250), until).await;
        let mut cut = 0;
        for attacker in attackers {
            cut += attacker.await.unwrap();
        }
        let (mut refused_logins, mut other_logins) = (0, 0);
        for flood in logins {
            let (refused, other) = flood.await.unwrap();
            (refused_logins, other_logins) = (refused_logins + refused, other_logins + other);
        }
        let (_, peak) = service.memory_mib();
        let p99 = observed.quantile(0.99);
        eprintln!(
            "{}: observer {} calls answered, {} failed, p50 {:?}, p99 {p99:?}; attacking connections cut or with streams reset: \
             {cut}; logins refused at once {refused_logins}, answered otherwise {other_logins}; \
             RSS {before:.1} MiB before, peak {peak:.1} MiB",
            service.name,
            observed.latencies.len(),
            observed.failures.len(),
            observed.quantile(0.5),
        );
        assert!(
            observed.failures.is_empty(),
            "{}: the observer's calls failed: {:?}",
            service.name,
            observed.failures
        );
        assert!(observed.latencies.len() > 100, "{}: too few calls", service.name);
        assert!(p99 <= Duration::from_secs(1), "{}: p99 {p99:?}", service.name);
        assert!(
            cut >= usize::from(ATTACKERS),
            "{}: slow readers and stalled calls are cut ({cut})",
            service.name
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let bound =
            if service.name == "auth-service" { FLOOD_BOUND_MIB + HASH_MIB * cores } else { FLOOD_BOUND_MIB };
        assert!(
            peak - before < bound,
            "{}: RSS grew by {:.1} MiB (bound {bound} MiB)",
            service.name,
            peak - before
        );
    }
    assert!(auth.exited().is_none() && product.exited().is_none(), "both services still run");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("storegate-fair-budgets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
