//! Accounts an operator runs with the auth-service admin commands: list and
//! show them, disable and enable, delete, reset the second factor. Real
//! servers (and the real binary for the commands' output), SQLite and MySQL.

use storegate::{
    Db, on_db,
    pb::{
        auth::v1::{BeginLoginRequest, CompleteLoginRequest, RefreshTokenRequest},
        product::v1::{CreateProductRequest, GetProductRequest, Product},
    },
};
use storegate_testkit::{Backend, TestStack, backend_tests, bearer, totp_code};
use tonic::Code;

backend_tests!(
    an_operator_lists_and_shows_accounts,
    a_disabled_account_cannot_log_in_or_refresh_until_enabled,
    a_deleted_account_ends_its_sessions_and_leaves_its_products,
    an_operator_reset_of_the_second_factor_enrolls_again,
);

const PASSWORD: &str = "correct horse battery";

/// Runs `auth-service <args…>` on the stack's database; its standard output.
fn admin_command(stack: &TestStack, args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_auth-service"))
        .args(args)
        .env("DATABASE_URL", &stack.db.url)
        .env("STOREGATE_MASTER_KEY", storegate_testkit::TEST_MASTER_KEY)
        .env("RUST_LOG", "warn")
        .output()
        .expect("auth-service runs");
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn refresh(stack: &TestStack, token: &str) -> Result<String, tonic::Status> {
    let response =
        stack.auth().await.refresh_token(RefreshTokenRequest { refresh_token: token.into() }).await?;
    Ok(response.into_inner().refresh_token)
}

async fn begin(stack: &TestStack, username: &str, password: &str) -> Result<String, tonic::Status> {
    let request =
        BeginLoginRequest { username: username.into(), password: password.into(), ..Default::default() };
    Ok(stack.auth().await.begin_login(request).await?.into_inner().login_ticket)
}

async fn complete(stack: &TestStack, ticket: &str, code: &str) -> Result<String, tonic::Status> {
    let request = CompleteLoginRequest { login_ticket: ticket.into(), code: code.into() };
    Ok(stack.auth().await.complete_login(request).await?.into_inner().refresh_token)
}

async fn count(db: &Db, sql: &str, user_id: i64) -> i64 {
    on_db!(db, pool => sqlx::query_scalar(sql).bind(user_id).fetch_one(pool).await).unwrap()
}

async fn an_operator_lists_and_shows_accounts(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.admin_token("alice").await;
    stack.register("bob", PASSWORD).await;
    let config = TestStack::auth_config(&stack.db);

    let accounts = auth_service::list_users(&config).await.unwrap();
    let names: Vec<&str> = accounts.iter().map(|a| a.username.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    let (alice, bob) = (&accounts[0], &accounts[1]);
    assert_eq!(alice.roles, ["admin"]);
    assert_eq!(alice.sessions, 1, "alice's one login");
    assert!(alice.totp_confirmed_at.is_some() && alice.last_login_at.is_some());
    assert!(bob.roles.is_empty() && bob.sessions == 0 && bob.totp_confirmed_at.is_none());
    assert!(bob.last_login_at.is_none());

    let listed = admin_command(&stack, &["list-users"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[0].starts_with("username"), "{listed}");
    assert!(
        lines[1].starts_with("alice") && lines[1].contains("active") && lines[1].contains("admin"),
        "{listed}"
    );
    assert!(
        lines[2].starts_with("bob") && lines[2].contains("enrolling") && lines[2].ends_with("never"),
        "{listed}"
    );
    let shown = admin_command(&stack, &["show-user", "alice"]);
    for expected in ["username:    alice", "state:       active", "roles:       admin", "sessions:    1 live"]
    {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }
    assert!(shown.contains("enrolled:    yes, since "), "{shown}");
    stack.stop().await;
}

async fn a_disabled_account_cannot_log_in_or_refresh_until_enabled(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let (tokens, secret) = stack.register_and_login("alice", PASSWORD).await;
    let pending = begin(&stack, "alice", PASSWORD).await.unwrap();

    let said = admin_command(&stack, &["disable-user", "alice"]);
    assert!(said.starts_with("disabled alice"), "{said}");
    assert_eq!(refresh(&stack, &tokens.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let err = complete(&stack, &pending, &totp_code(&secret, 1)).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
        "a pending ticket: {err:?}"
    );
    let refused = begin(&stack, "alice", PASSWORD).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("disabled"), "{}", refused.message());
    let wrong = begin(&stack, "alice", "wrong password!").await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "a wrong password says nothing of it");
    assert!(admin_command(&stack, &["disable-user", "alice"]).contains("disabled already"));
    assert!(admin_command(&stack, &["show-user", "alice"]).contains("state:       disabled"));

    assert!(admin_command(&stack, &["enable-user", "alice"]).starts_with("enabled alice"));
    let ticket = begin(&stack, "alice", PASSWORD).await.expect("enabled again");
    complete(&stack, &ticket, &totp_code(&secret, 1)).await.expect("a login after enable-user");

    // The operator's commands are in the audit trail, newest first.
    let trail = admin_command(&stack, &["audit-log", "--user", "alice", "--limit", "6"]);
    let events: Vec<(&str, &str)> = trail
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields[1], fields[fields.iter().position(|f| *f == "by").unwrap() + 1])
        })
        .collect();
    assert_eq!(
        events,
        [
            ("login.completed", "self"),
            ("login.password_accepted", "self"),
            ("account.enabled", "operator"),
            ("login.password_rejected", "anonymous"),
            ("login.refused_disabled", "self"),
            ("account.disabled", "operator"),
        ],
        "{trail}"
    );
    stack.stop().await;
}

async fn a_deleted_account_ends_its_sessions_and_leaves_its_products(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let token = stack.admin_token("alice").await;
    let product = Product { name: "Kettle".into(), price: "20.00".into(), stock: 1, ..Default::default() };
    let created = stack
        .products()
        .await
        .create_product(bearer(
            CreateProductRequest { product: Some(product), request_id: String::new() },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let db = stack.db.open().await;
    let alice: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT id FROM users WHERE username = 'alice'").fetch_one(pool).await
    })
    .unwrap();
    let (second, _) = stack.register_and_login("bob", PASSWORD).await;

    assert!(admin_command(&stack, &["delete-user", "alice"]).starts_with("deleted alice"));
    for table in ["users WHERE id", "user_roles WHERE user_id", "refresh_tokens WHERE user_id"] {
        assert_eq!(count(&db, &format!("SELECT COUNT(*) FROM {table} = ?"), alice).await, 0, "{table}");
    }
    // Her product stays, and still says who made it.
    let created_by: Option<i64> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT created_by FROM products WHERE id = ?").bind(created.id).fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(created_by, Some(alice));
    let read = stack.products().await.get_product(bearer(GetProductRequest { id: created.id }, &token)).await;
    assert_eq!(read.unwrap().into_inner().name, "Kettle", "her access token lives out its minutes");
    // Others are untouched; the name is free again.
    refresh(&stack, &second.refresh_token).await.expect("bob's session");
    assert_eq!(begin(&stack, "alice", PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    stack.register("alice", "another good passphrase").await;
    stack.stop().await;
}

async fn an_operator_reset_of_the_second_factor_enrolls_again(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let (tokens, _) = stack.register_and_login("alice", PASSWORD).await;
    let db = stack.db.open().await;
    let alice: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT id FROM users WHERE username = 'alice'").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ?", alice).await, 10);

    assert!(admin_command(&stack, &["reset-totp", "alice"]).starts_with("reset the second factor of alice"));
    assert_eq!(refresh(&stack, &tokens.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ?", alice).await, 0);
    let begun = stack.begin_login("alice", PASSWORD).await;
    let secret = begun.enrollment.expect("the next login enrolls afresh").secret;
    complete(&stack, &begun.login_ticket, &totp_code(&secret, 0)).await.expect("the new factor works");
    stack.stop().await;
}
