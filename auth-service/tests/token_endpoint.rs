//! Service accounts and the OAuth 2.0 token endpoint (client credentials,
//! RFC 6749 §4.4) over plain HTTP on auth-service's port: accounts made by
//! the operator's commands, tokens that product-service accepts for
//! exactly the RPCs of their roles, every refusal with its standard error
//! and nothing issued, secret rotation with its grace, and the throttle of
//! wrong secrets per address. Real servers, SQLite and MySQL.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use auth_service::service_accounts::{Credentials, Output, commands};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use storegate::{
    on_db,
    pb::{
        auth::v1::{ListUsersRequest, admin_service_client::AdminServiceClient},
        product::v1::{AdjustStockRequest, CreateProductRequest, GetProductRequest, Product},
    },
};
use storegate_testkit::{
    Backend, TestStack, backend_tests, bearer,
    http1::{HttpResponse, exchange, get},
};
use tonic::Code;

backend_tests!(
    a_service_token_works_for_exactly_the_rpcs_of_its_roles,
    bad_requests_and_bad_clients_get_the_standard_errors_and_no_token,
    a_rotated_secret_works_for_its_grace_and_then_stops,
    wrong_secrets_are_throttled_per_address_and_never_lock_the_service_out,
);

trait Answer {
    fn json(&self) -> serde_json::Value;
    fn oauth_error(&self) -> (u16, String);
}

impl Answer for HttpResponse {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// An RFC 6749 §5.2 error: its status and `error` code.
    fn oauth_error(&self) -> (u16, String) {
        let body = self.json();
        assert!(body["error_description"].is_string(), "{}", self.body);
        (self.status, body["error"].as_str().expect("an error code").to_owned())
    }
}

/// An HTTP/1.1 POST to the token endpoint from the local address `from`.
async fn post(addr: SocketAddr, from: IpAddr, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut head =
        format!("POST /oauth2/token HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    exchange(stream, &head, body).await
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

fn here() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// `client_secret_basic`.
async fn token_basic(stack: &TestStack, credentials: &Credentials, extra_form: &str) -> HttpResponse {
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", credentials.client_id, credentials.client_secret))
    );
    let body = format!("grant_type=client_credentials{extra_form}");
    post(stack.auth_addr, here(), &[FORM, ("authorization", &basic)], body.as_bytes()).await
}

/// `client_secret_post`, from `from`.
async fn token_post_from(stack: &TestStack, from: IpAddr, client_id: &str, secret: &str) -> HttpResponse {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("client_id", client_id)
        .append_pair("client_secret", secret)
        .finish();
    post(stack.auth_addr, from, &[FORM], body.as_bytes()).await
}

fn claims_of(access_token: &str) -> serde_json::Value {
    let payload = access_token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

async fn create_account(stack: &TestStack, name: &str, roles: &[&str]) -> Credentials {
    let roles: Vec<String> = roles.iter().map(|r| (*r).to_owned()).collect();
    commands::create(&TestStack::auth_config(&stack.db), name, &roles, Output::Json).await.unwrap()
}

fn product(name: &str) -> Product {
    Product { name: name.into(), price: "2.50".into(), stock: 10, ..Default::default() }
}

async fn a_service_token_works_for_exactly_the_rpcs_of_its_roles(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let orders = create_account(&stack, "orders", &["stock-keeper"]).await;
    assert!(orders.client_id.starts_with("svc_"));
    assert!(orders.client_secret.len() >= 43, "256 random bits");

    let answer = token_basic(&stack, &orders, "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers.get("cache-control").map(String::as_str), Some("no-store"));
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let token = body["access_token"].as_str().unwrap().to_owned();
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], format!("svc:{}", orders.client_id), "never a user's decimal id");
    assert_eq!(claims["client_id"], orders.client_id.as_str());
    assert_eq!(claims["azp"], orders.client_id.as_str());
    assert_eq!(claims["roles"], serde_json::json!(["stock-keeper"]));

    // product-service: reads, and AdjustStock; nothing else.
    let admin = stack.admin_token("root").await;
    let mut products = stack.products().await;
    let kettle = products
        .create_product(bearer(
            CreateProductRequest { product: Some(product("Kettle")), request_id: String::new() },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    let adjusted = products
        .adjust_stock(bearer(
            AdjustStockRequest { id: kettle.id, delta: -3, request_id: String::new() },
            &token,
        ))
        .await
        .expect("a stock-keeper adjusts stock")
        .into_inner();
    assert_eq!(adjusted.stock, 7);
    assert_eq!(adjusted.updated_by, 0, "no user id for a service");
    let denied = products
        .create_product(bearer(
            CreateProductRequest { product: Some(product("Mug")), request_id: String::new() },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    products.get_product(bearer(GetProductRequest { id: kettle.id }, &token)).await.expect("reads");
    // AdminService is for people, whatever a service's roles.
    let boss = create_account(&stack, "boss", &["admin"]).await;
    let boss_token = token_basic(&stack, &boss, "").await.json()["access_token"].as_str().unwrap().to_owned();
    let mut admin_api = AdminServiceClient::new(TestStack::channel(stack.auth_addr).await);
    let refused = admin_api.list_users(bearer(ListUsersRequest::default(), &boss_token)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // client_secret_post gets the same kind of token.
    let posted = token_post_from(&stack, here(), &orders.client_id, &orders.client_secret).await;
    assert_eq!(posted.status, 200, "{}", posted.body);
    assert_eq!(
        claims_of(posted.json()["access_token"].as_str().unwrap())["roles"],
        serde_json::json!(["stock-keeper"])
    );

    // A scope narrows the roles, never widens them.
    let editor = create_account(&stack, "importer", &["catalogue-editor", "stock-keeper"]).await;
    let narrowed = token_basic(&stack, &editor, "&scope=stock-keeper").await;
    assert_eq!(narrowed.status, 200, "{}", narrowed.body);
    assert_eq!(narrowed.json()["scope"], "stock-keeper");
    assert_eq!(
        claims_of(narrowed.json()["access_token"].as_str().unwrap())["roles"],
        serde_json::json!(["stock-keeper"])
    );
    let widened = token_basic(&stack, &editor, "&scope=admin").await;
    assert_eq!(widened.oauth_error(), (400, "invalid_scope".to_owned()));

    // The discovery document names the endpoint.
    let discovery = get(stack.auth_addr, "/.well-known/openid-configuration", &[]).await.json();
    assert_eq!(discovery["token_endpoint"], format!("http://{}/oauth2/token", stack.auth_addr));
    assert_eq!(discovery["grant_types_supported"], serde_json::json!(["client_credentials"]));
    assert_eq!(
        discovery["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
}

async fn bad_requests_and_bad_clients_get_the_standard_errors_and_no_token(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let config = TestStack::auth_config(&stack.db);
    let svc = create_account(&stack, "reporting", &[]).await;
    let addr = stack.auth_addr;
    let basic = |id: &str, secret: &str| format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")));

    // A wrong secret, an unknown client: 401 invalid_client, and a Basic
    // challenge when the client used Basic.
    let wrong =
        token_basic(&stack, &Credentials { client_secret: "not-the-secret".into(), ..svc.clone() }, "").await;
    assert_eq!(wrong.oauth_error(), (401, "invalid_client".to_owned()));
    assert!(wrong.headers.get("www-authenticate").is_some_and(|v| v.starts_with("Basic")));
    let unknown = token_post_from(&stack, here(), "svc_nobody", &svc.client_secret).await;
    assert_eq!(unknown.oauth_error(), (401, "invalid_client".to_owned()));
    assert!(!unknown.headers.contains_key("www-authenticate"));
    assert!(!unknown.body.contains(&svc.client_secret), "no secret in an answer");

    // Malformed requests: 400 with the code RFC 6749 §5.2 names.
    let auth = basic(&svc.client_id, &svc.client_secret);
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: [Case; 7] = [
        (&[FORM, ("authorization", &auth)], "grant_type=password", "unsupported_grant_type"),
        (&[FORM, ("authorization", &auth)], "scope=x", "invalid_request"),
        (
            &[FORM, ("authorization", &auth)],
            "grant_type=client_credentials&grant_type=client_credentials",
            "invalid_request",
        ),
        (&[("content-type", "application/json"), ("authorization", &auth)], "{}", "invalid_request"),
        (&[FORM, ("authorization", "Bearer abc")], "grant_type=client_credentials", "invalid_request"),
        (
            &[FORM, ("authorization", &auth)],
            "grant_type=client_credentials&client_id=x&client_secret=y",
            "invalid_request",
        ),
        (
            &[FORM, ("authorization", &auth)],
            "grant_type=client_credentials&scope=Not%20A%20Role!",
            "invalid_scope",
        ),
    ];
    for (headers, body, error) in cases {
        let answer = post(addr, here(), headers, body.as_bytes()).await;
        assert_eq!(answer.oauth_error(), (400, error.to_owned()), "{body}");
    }
    // No credentials at all.
    let none = post(addr, here(), &[FORM], b"grant_type=client_credentials").await;
    assert_eq!(none.oauth_error(), (401, "invalid_client".to_owned()));
    // A huge body is refused before it is read whole.
    let huge = format!("grant_type=client_credentials&pad={}", "x".repeat(64 * 1024));
    assert_eq!(post(addr, here(), &[FORM, ("authorization", &auth)], huge.as_bytes()).await.status, 413);

    // Disabled, then enabled, then deleted.
    assert!(commands::set_disabled(&config, "reporting", true).await.unwrap());
    assert_eq!(token_basic(&stack, &svc, "").await.oauth_error(), (401, "invalid_client".to_owned()));
    assert!(commands::set_disabled(&config, "reporting", false).await.unwrap());
    assert_eq!(token_basic(&stack, &svc, "").await.status, 200);
    commands::delete(&config, "reporting").await.unwrap();
    assert_eq!(token_basic(&stack, &svc, "").await.oauth_error(), (401, "invalid_client".to_owned()));
    assert!(commands::list(&config, Output::Json).await.unwrap().is_empty());

    // The audit trail has each action, and never the secret.
    let db = stack.db.open().await;
    let trail: Vec<(String, Option<String>, Option<String>)> = on_db!(&db, pool => {
        sqlx::query_as("SELECT event, detail, client_addr FROM audit_events WHERE event LIKE 'service_account.%' ORDER BY id")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    let events: Vec<&str> = trail.iter().map(|(event, _, _)| event.as_str()).collect();
    assert_eq!(
        events,
        [
            "service_account.created",
            "service_account.disabled",
            "service_account.enabled",
            "service_account.deleted"
        ]
    );
    for (_, detail, client) in &trail {
        assert!(
            detail.as_deref().is_some_and(|d| d.contains("reporting") && !d.contains(&svc.client_secret))
        );
        assert_eq!(client.as_deref(), Some("operator"));
    }
    let stored: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE detail LIKE ?")
            .bind(format!("%{}%", svc.client_secret))
            .fetch_one(pool)
            .await
    })
    .unwrap();
    assert_eq!(stored, 0);
}

async fn a_rotated_secret_works_for_its_grace_and_then_stops(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let config = TestStack::auth_config(&stack.db);
    let first = create_account(&stack, "billing", &["stock-keeper"]).await;
    let second = commands::rotate_secret(&config, "billing", 2, Output::Json).await.unwrap();
    assert_eq!(second.client_id, first.client_id);
    assert_ne!(second.client_secret, first.client_secret);
    assert!(second.previous_secret_expires_at.is_some());
    assert_eq!(token_basic(&stack, &first, "").await.status, 200, "the old secret within its grace");
    assert_eq!(token_basic(&stack, &second, "").await.status, 200);
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert_eq!(token_basic(&stack, &first, "").await.oauth_error(), (401, "invalid_client".to_owned()));
    assert_eq!(token_basic(&stack, &second, "").await.status, 200, "the new one goes on");
    // Only hashes are stored.
    let db = stack.db.open().await;
    let hashes: Vec<Vec<u8>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT secret_hash FROM service_account_secrets").fetch_all(pool).await
    })
    .unwrap();
    assert!(hashes.iter().all(|h| h.len() == 32));
    assert!(!hashes.iter().any(|h| h == second.client_secret.as_bytes()));
}

async fn wrong_secrets_are_throttled_per_address_and_never_lock_the_service_out(backend: Backend) {
    let stack =
        TestStack::start_auth_with(backend, |config| config.login.login_failures_per_client_per_hour = 3)
            .await;
    let svc = create_account(&stack, "search", &[]).await;
    let stranger = IpAddr::from([127, 0, 9, 1]);
    for _ in 0..3 {
        let answer = token_post_from(&stack, stranger, &svc.client_id, "guess").await;
        assert_eq!(answer.oauth_error(), (401, "invalid_client".to_owned()));
    }
    // The stranger's address is slowed, even with the right secret...
    let slowed = token_post_from(&stack, stranger, &svc.client_id, &svc.client_secret).await;
    assert_eq!(slowed.status, 429, "{}", slowed.body);
    assert_eq!(slowed.json()["error"], "slow_down");
    assert!(slowed.headers.get("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s > 0)));
    // ...while the service, from its own address, is not held up.
    let service = IpAddr::from([127, 0, 9, 2]);
    assert_eq!(token_post_from(&stack, service, &svc.client_id, &svc.client_secret).await.status, 200);
}
