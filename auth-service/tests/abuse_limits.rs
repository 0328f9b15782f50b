//! The attacks of the red-team pass, replayed with small limits so that they
//! finish in seconds: streams that never send a body, more connections than
//! the cap, a stalled HTTP/1.1 body, slow headers, idle connections, huge
//! headers, oversized messages, and the memory of a service binary under a
//! flood of stalled streams and of stalled gRPC-Web bodies.

use std::time::{Duration, Instant};

use auth_service::AuthConfig;
use storegate::{
    config::Limits,
    pb::auth::v1::{GetJwksRequest, RegisterRequest},
    tls::ClientTlsFiles,
};
use storegate_testkit::{
    Backend, Running, TEST_MASTER_KEY, TestDb, TestStack,
    attack::{H2Flood, eventually, http1_stalled_body, read_until_closed},
    channel_to,
    process::{ServiceProcess, free_addr},
    wait_serving_at,
};
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

async fn auth_with(db: &TestDb, limits: Limits) -> Running {
    let mut config: AuthConfig = TestStack::auth_config(db);
    config.common.limits = limits;
    let auth = Running::auth(config).await;
    assert!(
        wait_serving_at(&url(&auth), &ClientTlsFiles::default(), Duration::from_secs(30)).await,
        "auth-service did not start"
    );
    auth
}

fn url(server: &Running) -> String {
    format!("http://{}", server.addr)
}

/// A normal call from a fresh client.
async fn get_jwks(server: &Running) -> Result<String, tonic::Status> {
    let channel = channel_to(&url(server), &ClientTlsFiles::default())
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut client = storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel);
    Ok(client.get_jwks(GetJwksRequest {}).await?.into_inner().jwks_json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_beyond_the_advertised_limit_are_refused() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_with(&db, Limits { max_concurrent_streams: 8, ..Limits::default() }).await;

    let mut flood = H2Flood::connect(auth.addr, HEALTH_CHECK, &[]).await.unwrap();
    assert_eq!(flood.settings(Duration::from_secs(5)).await, Some(8), "SETTINGS_MAX_CONCURRENT_STREAMS");
    // An attacker ignores the limit: 8 streams are taken, 12 refused.
    flood.open_stalled(20);
    let refused = &flood.counts.refused;
    assert!(
        eventually(Duration::from_secs(5), || refused.load(std::sync::atomic::Ordering::Acquire) >= 12).await,
        "streams beyond the limit must be refused, {} were",
        refused.load(std::sync::atomic::Ordering::Acquire)
    );
    // Others are still served.
    get_jwks(&auth).await.expect("a normal call from a fresh client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_in_flight_are_bounded_and_stalled_ones_time_out() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits { max_concurrent_calls: 10, request_timeout_secs: 2, ..Limits::default() };
    let auth = auth_with(&db, limits).await;

    // Three addresses flood; each may hold fewer than half of the places
    // still free, so together they hold 3 + 2 + 2 = 7 of the 10.
    let mut floods = Vec::new();
    for from in ["127.0.0.11", "127.0.0.12", "127.0.0.13"] {
        let from = Some(from.parse().unwrap());
        let mut flood = H2Flood::connect_from(from, auth.addr, HEALTH_CHECK, &[], None).await.unwrap();
        flood.settings(Duration::from_secs(5)).await.expect("settings");
        flood.open_stalled(10);
        // One after the other, so that each sees the others' places taken.
        let answered = &flood.counts.answered;
        let _ =
            eventually(Duration::from_secs(1), || answered.load(std::sync::atomic::Ordering::Acquire) >= 7)
                .await;
        floods.push(flood);
    }
    let started = Instant::now();
    let load =
        || floods.iter().map(|f| f.counts.answered.load(std::sync::atomic::Ordering::Acquire)).sum::<usize>();
    // 23 beyond their shares are answered (RESOURCE_EXHAUSTED) at once.
    assert!(eventually(Duration::from_secs(1), || load() >= 23).await, "{} answered", load());
    assert_eq!(load(), 23, "the 7 stalled calls are still in flight");
    let shed = get_jwks_from(auth.addr, "127.0.0.11").await.expect_err("no room for another call of 11's");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    // Another address still finds a place.
    get_jwks_from(auth.addr, "127.0.0.14").await.expect("room for a fourth address");

    // The stalled ones end at the request timeout; then calls go through.
    assert!(eventually(Duration::from_secs(5), || load() >= 30).await, "{} answered", load());
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout");
    get_jwks_from(auth.addr, "127.0.0.11").await.expect("room again once the stalled calls have timed out");
}

/// A normal call from another address of this host (all of 127/8 is
/// loopback): another client, as far as the server can tell.
async fn get_jwks_from(server: std::net::SocketAddr, local: &str) -> Result<String, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .unwrap()
        .local_address(Some(local.parse().unwrap()))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut client = storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel);
    Ok(client.get_jwks(GetJwksRequest {}).await?.into_inner().jwks_json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_clients_stalled_calls_leave_room_for_other_clients() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits {
        max_concurrent_calls: 100,
        max_concurrent_calls_per_client: 5,
        request_timeout_secs: 10,
        ..Limits::default()
    };
    let auth = auth_with(&db, limits).await;

    // The flood comes from 127.0.0.1 on two connections: five of its calls
    // stall, the rest are answered at once.
    let mut floods = Vec::new();
    for _ in 0..2 {
        let mut flood = H2Flood::connect(auth.addr, HEALTH_CHECK, &[]).await.unwrap();
        flood.settings(Duration::from_secs(5)).await.expect("settings");
        flood.open_stalled(10);
        floods.push(flood);
    }
    let answered =
        || floods.iter().map(|f| f.counts.answered.load(std::sync::atomic::Ordering::Acquire)).sum::<usize>();
    assert!(eventually(Duration::from_secs(2), || answered() >= 15).await, "{} answered", answered());
    assert_eq!(answered(), 15, "five calls of the flooding address are in flight");
    let shed = get_jwks_from(auth.addr, "127.0.0.1").await.expect_err("the flooding address has its share");
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    // Another client is served at once.
    get_jwks_from(auth.addr, "127.0.0.2").await.expect("another address is served during the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_make_room_or_are_closed() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits { max_connections: 4, request_timeout_secs: 3, ..Limits::default() };
    let auth = auth_with(&db, limits).await;
    // Let the start-up health checks' connections go.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Silent connections, from four addresses (one address may hold only
    // part of the cap), fill it; a caller still gets through (the
    // longest-idle connection makes room) and the silent ones are closed.
    let from = |last: u8| std::net::SocketAddr::from(([127, 0, 0, last], 0));
    let connect_from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(from(last)).unwrap();
        socket.connect(auth.addr).await.unwrap()
    };
    let mut silent = Vec::new();
    for last in 21..25 {
        silent.push(connect_from(last).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    get_jwks(&auth).await.expect("a caller gets through past silent connections");
    let mut closed = 0;
    for connection in &mut silent {
        closed += usize::from(read_until_closed(connection, Duration::from_millis(500)).await.1);
    }
    assert_eq!(closed, 1, "one idle connection was closed to make room");
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every slot holds a call in flight: a new connection is closed at once.
    let mut floods = Vec::new();
    for last in 31..35 {
        let ip = Some(from(last).ip());
        let mut flood = H2Flood::connect_from(ip, auth.addr, HEALTH_CHECK, &[], None).await.unwrap();
        flood.settings(Duration::from_secs(5)).await.expect("admitted");
        flood.open_stalled(1);
        floods.push(flood);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(auth.addr).await.unwrap();
    let _ = extra.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let (_, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    assert!(closed, "a connection beyond the cap, all others busy, is closed");
    assert!(floods.iter().all(|f| !f.is_closed()), "busy connections are kept");

    // Once the stalled calls have timed out, callers get through again.
    let recovered = async {
        for _ in 0..50 {
            if get_jwks(&auth).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    };
    assert!(recovered.await, "calls are answered again after the request timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_grpc_web_body_is_cut_at_the_request_timeout() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_with(&db, Limits { request_timeout_secs: 1, ..Limits::default() }).await;
    let started = Instant::now();
    let mut stalled = http1_stalled_body(auth.addr, HEALTH_CHECK).await.unwrap();
    let (response, closed) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(closed, "the connection is closed, not left open: {response}");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout");
    assert!(response.to_ascii_lowercase().contains("grpc-status: 4"), "DEADLINE_EXCEEDED: {response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_headers_and_idle_connections_are_closed() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let limits = Limits { header_read_timeout_secs: 1, idle_timeout_secs: 1, ..Limits::default() };
    let auth = auth_with(&db, limits).await;

    // HTTP/1.1 headers that never end.
    let mut slow = TcpStream::connect(auth.addr).await.unwrap();
    slow.write_all(b"POST /grpc.health.v1.Health/Check HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // A connection that never says anything.
    let mut silent = TcpStream::connect(auth.addr).await.unwrap();
    // An HTTP/2 connection with no call.
    let idle = H2Flood::connect(auth.addr, HEALTH_CHECK, &[]).await.unwrap();
    idle.settings(Duration::from_secs(5)).await.expect("settings");

    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(closed, "slow headers are cut at the header read timeout");
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert!(closed, "a silent connection is closed");
    assert!(
        eventually(Duration::from_secs(5), || idle.is_closed()).await,
        "an idle HTTP/2 connection is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_headers_are_refused() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_with(&db, Limits { max_header_bytes: 8192, ..Limits::default() }).await;
    let big = "x".repeat(10_000);

    let mut http1 = TcpStream::connect(auth.addr).await.unwrap();
    let request =
        format!("POST {HEALTH_CHECK} HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\ncontent-length: 0\r\n\r\n");
    http1.write_all(request.as_bytes()).await.unwrap();
    let (response, _) = read_until_closed(&mut http1, Duration::from_secs(5)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");

    let channel = channel_to(&url(&auth), &ClientTlsFiles::default()).await.unwrap();
    let mut client = storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel);
    let mut request = tonic::Request::new(GetJwksRequest {});
    request.metadata_mut().insert("x-big", big.parse().unwrap());
    assert!(client.get_jwks(request).await.is_err(), "an HTTP/2 header list above the limit");
    get_jwks(&auth).await.expect("normal calls are unaffected");
}

/// A request message over `MAX_REQUEST_BYTES` is refused before any handler
/// runs, as RESOURCE_EXHAUSTED (tonic's own answer is OUT_OF_RANGE), over
/// gRPC and gRPC-Web; one within the limit reaches validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_request_message_is_resource_exhausted() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_with(&db, Limits { max_request_bytes: Some(64 * 1024), ..Limits::default() }).await;
    let channel = channel_to(&url(&auth), &ClientTlsFiles::default()).await.unwrap();
    let mut client = storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel);
    let register = |password: String| RegisterRequest { username: "big".into(), password };

    let err = client.register(register("x".repeat(100_000))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("larger than this server accepts"), "{}", err.message());
    let err = client.register(register("x".repeat(60_000))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "within the limit: the password is too long");

    // gRPC-Web: the same answer.
    let message = prost::Message::encode_to_vec(&register("x".repeat(100_000)));
    let path = "/storegate.auth.v1.AuthService/Register";
    let answer =
        storegate_testkit::grpc_web::unary(auth.addr, path, &message, &[], Duration::from_secs(10)).await;
    assert_eq!(answer, Err(tonic::Code::ResourceExhausted));

    let users: i64 = storegate::on_db!(&db.open().await, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(users, 0, "nothing was registered");
}

/// The auth-service binary on a fresh SQLite database, with `envs` on top
/// of the defaults; SERVING and settled. Its log folder goes with it.
async fn auth_binary(db: &TestDb, envs: &[(&str, String)]) -> (ServiceProcess, TempLogs) {
    let logs = TempLogs::new();
    let addr = free_addr();
    let mut all = vec![
        ("DATABASE_URL", db.url.clone()),
        ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned()),
        ("AUTH_LISTEN_ADDR", addr.to_string()),
    ];
    all.extend(envs.iter().cloned());
    let mut auth = ServiceProcess::spawn("auth-service", "auth-service", addr, &all, &logs.0).unwrap();
    auth.wait_serving(Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    (auth, logs)
}

struct TempLogs(std::path::PathBuf);

impl TempLogs {
    fn new() -> TempLogs {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "storegate-abuse-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempLogs(dir)
    }
}

impl Drop for TempLogs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How much the peak RSS (VmHWM) of a service may grow under a flood.
const FLOOD_BOUND_MIB: f64 = 64.0;

/// The red-team's flood against the real binary with its default limits:
/// 20,000 streams that never send a body, over 20 connections. Before the
/// limits every one was accepted and auth-service grew by ~190 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_under_a_flood_of_stalled_streams() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let (auth, _logs) = auth_binary(&db, &[]).await;
    let addr = auth.addr;
    let (before, _) = auth.memory_mib();

    let mut floods = Vec::new();
    for _ in 0..20 {
        let mut flood = H2Flood::connect(addr, HEALTH_CHECK, &[]).await.unwrap();
        flood.open_stalled(1000);
        floods.push(flood);
    }
    let sent = |f: &H2Flood| {
        f.counts.reset.load(std::sync::atomic::Ordering::Acquire)
            + f.counts.answered.load(std::sync::atomic::Ordering::Acquire)
    };
    // Most streams are refused or shed at once; the rest stay stalled.
    assert!(
        eventually(Duration::from_secs(20), || floods.iter().map(sent).sum::<usize>() >= 18_000).await,
        "the server refuses or sheds what is beyond its limits"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The peak (VmHWM) since start: an upper bound on what the flood cost.
    let (_, peak) = auth.memory_mib();
    let health = tokio::time::timeout(Duration::from_secs(5), storegate_testkit::health_serving(addr)).await;
    assert!(health.is_ok(), "a fresh caller is answered promptly during the flood");
    eprintln!("auth-service RSS: {before:.1} MiB idle, {peak:.1} MiB under 20,000 stalled streams");
    assert!(
        peak - before < FLOOD_BOUND_MIB,
        "RSS grew by {:.1} MiB (bound {FLOOD_BOUND_MIB} MiB)",
        peak - before
    );
    drop(floods);
}

/// The red-team's other flood against the real binary: 2,000 gRPC-Web
/// (HTTP/1.1) connections that stop in the middle of their body. Before the
/// limits all were still open after 65 s. Now the connection cap (1024)
/// closes what is beyond it, the per-client cap answers what is beyond 256
/// calls, and the request timeout (2 s here, 30 s by default) ends the rest;
/// memory stays bounded and another client is answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_under_a_flood_of_stalled_grpc_web_bodies() {
    const CONNECTIONS: usize = 2000;
    let db = TestDb::new(&Backend::Sqlite).await;
    let (auth, _logs) = auth_binary(&db, &[("REQUEST_TIMEOUT_SECS", "2".to_owned())]).await;
    let (before, _) = auth.memory_mib();

    let mut stalled = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        // A connection the server closed at once (beyond its cap) counts too.
        if let Ok(stream) = http1_stalled_body(auth.addr, HEALTH_CHECK).await {
            stalled.push(stream);
        }
    }
    let opened = stalled.len();
    get_jwks_from(auth.addr, "127.0.0.2").await.expect("another client is answered during the flood");

    let mut open = 0;
    for stream in &mut stalled {
        let (_, closed) = read_until_closed(stream, Duration::from_secs(10)).await;
        open += usize::from(!closed);
    }
    // The peak (VmHWM) since start, the flood's whole course included.
    let (_, peak) = auth.memory_mib();
    eprintln!(
        "auth-service RSS: {before:.1} MiB idle, {peak:.1} MiB under {opened} stalled gRPC-Web connections"
    );
    assert!(opened >= CONNECTIONS / 2, "only {opened} connections could be opened");
    assert_eq!(open, 0, "every stalled connection is closed by the request timeout or the cap");
    assert!(
        peak - before < FLOOD_BOUND_MIB,
        "RSS grew by {:.1} MiB (bound {FLOOD_BOUND_MIB} MiB)",
        peak - before
    );
    get_jwks_from(auth.addr, "127.0.0.1").await.expect("the flooding address is served again");
}

/// A gRPC-Web call in text mode (base64) is answered in text mode, also
/// without an `accept` header: a client that speaks text cannot read a
/// binary answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_web_text_call_is_answered_in_text() {
    let db = TestDb::new(&Backend::Sqlite).await;
    let auth = auth_with(&db, Limits::default()).await;
    for accept in ["", "accept: application/grpc-web-text\r\n", "accept: */*\r\n"] {
        let mut stream = TcpStream::connect(auth.addr).await.unwrap();
        // An empty GetJwksRequest in one frame, base64.
        let body = "AAAAAAA=";
        let head = format!(
            "POST /storegate.auth.v1.AuthService/GetJwks HTTP/1.1\r\nhost: storegate\r\n\
             content-type: application/grpc-web-text\r\nx-grpc-web: 1\r\n{accept}\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (response, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
        assert!(response.starts_with("http/1.1 200"), "{accept:?}: {response}");
        assert!(response.contains("content-type: application/grpc-web-text"), "{accept:?}: {response}");
        // The JWK Set's JSON is inside the base64, never in plain sight.
        assert!(!response.contains("\"keys\""), "{accept:?}: a binary answer: {response}");
    }
}
