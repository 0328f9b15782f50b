//! OpenTelemetry traces across both services, received by a real OTLP
//! collector endpoint (testkit::otlp): a client's call through
//! product-service is one trace with the client's trace id, linked to the
//! client's span (over gRPC and gRPC-Web), with the gRPC status, a span per
//! SQL statement, the key fetch it caused in auth-service, and no secret
//! anywhere; the `storegate` command's calls are children of its command
//! span. The binaries run as processes (each exports its own spans), on
//! SQLite and MySQL.

use std::time::{Duration, Instant};

use storegate::pb::{
    auth::v1::{
        BeginLoginRequest, CompleteLoginRequest, RefreshTokenRequest, RegisterRequest,
        auth_service_client::AuthServiceClient,
    },
    product::v1::{ListProductsRequest, product_service_client::ProductServiceClient},
};
use storegate_testkit::{
    Backend, TEST_MASTER_KEY, TestDb, backend_tests,
    otlp::{OtlpReceiver, Received},
    process::{ServiceProcess, binary, free_addr},
    totp_code,
};

backend_tests!(a_call_through_product_service_is_one_trace_with_its_statements_and_no_secrets);

const PASSWORD: &str = "correct horse battery";
/// The client's own trace and span, as a W3C traceparent names them.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn a_call_through_product_service_is_one_trace_with_its_statements_and_no_secrets(backend: Backend) {
    let receiver = OtlpReceiver::start().await;
    let db = TestDb::new(&backend).await;
    let logs = std::env::temp_dir().join(format!(
        "storegate-traces-{}-{}",
        std::process::id(),
        TRACE_ID.len() + db.url.len()
    ));
    std::fs::create_dir_all(&logs).unwrap();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ("DATABASE_URL", db.url.clone()),
        ("STOREGATE_MASTER_KEY", TEST_MASTER_KEY.to_owned()),
    ];
    let auth_addr = free_addr();
    let mut envs = otel.to_vec();
    envs.push(("AUTH_LISTEN_ADDR", auth_addr.to_string()));
    let mut auth = ServiceProcess::spawn("auth-service", "auth-service", auth_addr, &envs, &logs).unwrap();
    auth.wait_serving(Duration::from_secs(60)).await.unwrap();
    let product_addr = free_addr();
    let mut envs = otel.to_vec();
    envs.extend([
        ("PRODUCT_LISTEN_ADDR", product_addr.to_string()),
        ("AUTH_SERVICE_URL", format!("http://{auth_addr}")),
        // No background key fetch during the test: only the one the call causes.
        ("JWKS_REFRESH_INTERVAL_SECS", "3600".to_owned()),
        // The key fetch logs at debug.
        ("RUST_LOG", "info,product_service=debug".to_owned()),
    ]);
    let mut product =
        ServiceProcess::spawn("product-service", "product-service", product_addr, &envs, &logs).unwrap();
    product.wait_serving(Duration::from_secs(60)).await.unwrap();
    let product_serving = Instant::now();

    // A user, logged in with a real code.
    let mut client = AuthServiceClient::connect(format!("http://{auth_addr}")).await.unwrap();
    client.register(RegisterRequest { username: "alice".into(), password: PASSWORD.into() }).await.unwrap();
    let begun = client
        .begin_login(BeginLoginRequest {
            username: "alice".into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let secret = begun.enrollment.unwrap().secret;
    let tokens = client
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 0),
        })
        .await
        .unwrap()
        .into_inner();

    // A new signing key that product-service has not fetched: the call
    // below names it, and product-service fetches the keys from
    // auth-service within the call (once its 5 s gap since the last
    // fetch has passed; auth-service signs with the new key within 2 s).
    let rotated = std::process::Command::new(binary("auth-service").unwrap())
        .args(["rotate-keys", "--activate-after-secs", "0"])
        .env("DATABASE_URL", &db.url)
        .env("STOREGATE_MASTER_KEY", TEST_MASTER_KEY)
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .unwrap();
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    tokio::time::sleep(
        Duration::from_secs(6).saturating_sub(product_serving.elapsed()).max(Duration::from_millis(2500)),
    )
    .await;
    let refreshed = client
        .refresh_token(RefreshTokenRequest { refresh_token: tokens.refresh_token.clone() })
        .await
        .unwrap()
        .into_inner();

    // The call, from inside the client's own trace.
    let mut products = ProductServiceClient::connect(format!("http://{product_addr}")).await.unwrap();
    let mut request =
        tonic::Request::new(ListProductsRequest { query: "cast iron teapot".into(), ..Default::default() });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", refreshed.access_token).parse().unwrap());
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01").parse().unwrap());
    products.list_products(request).await.expect("the call succeeds");

    let in_trace = |spans: &[Received]| -> Vec<Received> {
        spans.iter().filter(|s| hex(&s.span.trace_id) == TRACE_ID).cloned().collect()
    };
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            let trace = in_trace(spans);
            trace.iter().any(|s| s.service == "product-service" && s.span.name.ends_with("ListProducts"))
                && trace.iter().any(|s| s.service == "auth-service" && s.span.name.ends_with("GetJwks"))
                && trace.iter().any(|s| s.attribute("db.query.text").is_some())
        })
        .await;
    let trace = in_trace(&spans);
    let summary: Vec<String> = trace
        .iter()
        .map(|s| format!("{} {} ({})", s.service, s.span.name, hex(&s.span.parent_span_id)))
        .collect();

    // The server span of the call: a child of the client's span, with the status.
    let call = trace
        .iter()
        .find(|s| {
            s.service == "product-service"
                && s.span.name == "storegate.product.v1.ProductService/ListProducts"
        })
        .unwrap_or_else(|| panic!("no ListProducts span in {summary:#?}"));
    assert_eq!(hex(&call.span.parent_span_id), CLIENT_SPAN_ID, "linked to the caller's span");
    assert_eq!(call.attribute("rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(call.span.kind, 2, "a server span");

    // Its statements: client spans of this trace, under a span of the call.
    let ids: Vec<Vec<u8>> = trace.iter().map(|s| s.span.span_id.clone()).collect();
    let statements: Vec<&Received> = trace
        .iter()
        .filter(|s| s.service == "product-service" && s.attribute("db.query.text").is_some())
        .collect();
    assert!(!statements.is_empty(), "no statement span in {summary:#?}");
    for statement in &statements {
        assert!(
            ids.contains(&statement.span.parent_span_id),
            "a statement span outside the call: {summary:#?}"
        );
        assert_eq!(statement.span.kind, 3, "a client span");
        let text = statement.attribute("db.query.text").unwrap();
        assert!(!text.contains("teapot"), "a statement span holds a parameter: {text}");
    }

    // The key fetch the call caused: auth-service's GetJwks in the same trace.
    let get_jwks = trace
        .iter()
        .find(|s| s.service == "auth-service" && s.span.name == "storegate.auth.v1.AuthService/GetJwks")
        .unwrap_or_else(|| panic!("no GetJwks span in {summary:#?}"));
    assert!(ids.contains(&get_jwks.span.parent_span_id), "GetJwks is not linked into the call: {summary:#?}");

    // No secret in any span either service sent (the logins' too).
    let everything: Vec<String> = spans.iter().flat_map(Received::all_values).collect();
    assert!(spans.iter().any(|s| s.service == "auth-service" && s.span.name.ends_with("CompleteLogin")));
    for secret_text in [
        PASSWORD,
        &secret,
        &tokens.access_token,
        &tokens.refresh_token,
        &refreshed.access_token,
        &refreshed.refresh_token,
    ] {
        assert!(!everything.iter().any(|v| v.contains(secret_text)), "a secret in a span attribute");
    }

    // The log lines of the call carry its trace id: the key fetch's.
    let log = product.log();
    let fetched: Vec<&str> = log.lines().filter(|line| line.contains("signing keys refreshed")).collect();
    assert!(!fetched.is_empty(), "no key fetch logged:\n{}", product.log_tail(20));
    assert!(
        fetched.iter().any(|line| line.contains(TRACE_ID)),
        "the call's log line lacks its trace id: {fetched:?}"
    );

    // A browser's gRPC-Web call carries its traceparent as a header too.
    const WEB_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const WEB_SPAN_ID: &str = "b7ad6b7169203331";
    let traceparent = format!("00-{WEB_TRACE_ID}-{WEB_SPAN_ID}-01");
    let web = storegate_testkit::grpc_web::unary(
        auth_addr,
        "/storegate.auth.v1.AuthService/GetJwks",
        &[],
        &[("traceparent", &traceparent)],
        Duration::from_secs(10),
    )
    .await;
    assert!(web.is_ok(), "{web:?}");
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| hex(&s.span.trace_id) == WEB_TRACE_ID)
        })
        .await;
    let web_span = spans
        .iter()
        .find(|s| {
            hex(&s.span.trace_id) == WEB_TRACE_ID && s.span.name == "storegate.auth.v1.AuthService/GetJwks"
        })
        .expect("the gRPC-Web call's span");
    assert_eq!(hex(&web_span.span.parent_span_id), WEB_SPAN_ID, "linked to the browser's span");

    // The command-line client's trace: its command span is the parent of
    // auth-service's span for the call it made.
    let mut cli = std::process::Command::new(binary("storegate").unwrap())
        .args(["register", "bob", "--password-stdin", "--json"])
        .env("AUTH_SERVICE_URL", format!("http://{auth_addr}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("STOREGATE_CONFIG_DIR", logs.join("cli"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut cli.stdin.take().unwrap(), format!("{PASSWORD}\n").as_bytes()).unwrap();
    assert!(cli.wait().unwrap().success());
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            let command = spans.iter().find(|s| s.service == "storegate-cli");
            command.is_some_and(|c| {
                spans.iter().any(|s| s.service == "auth-service" && s.span.parent_span_id == c.span.span_id)
            })
        })
        .await;
    let command = spans.iter().find(|s| s.service == "storegate-cli").expect("the CLI exported its span");
    let register = spans
        .iter()
        .find(|s| s.service == "auth-service" && s.span.parent_span_id == command.span.span_id)
        .expect("auth-service's span of the CLI's call, under the command's span");
    assert_eq!(register.span.name, "storegate.auth.v1.AuthService/Register");
    assert_eq!(register.span.trace_id, command.span.trace_id);
    let _ = std::fs::remove_dir_all(&logs);
}
