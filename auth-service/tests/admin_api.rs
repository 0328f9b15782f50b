//! AdminService (an `admin`-role token administers accounts over gRPC) and
//! the audit trail it reads: real servers, real logins with TOTP codes,
//! SQLite and MySQL.

use storegate::{
    Db, on_db,
    pb::auth::v1::{
        AuditEvent, BeginLoginRequest, DeleteUserRequest, DisableUserRequest, EnableUserRequest,
        GetUserRequest, GrantRoleRequest, ListAuditEventsRequest, ListUsersRequest, RefreshTokenRequest,
        RevokeRoleRequest, admin_service_client::AdminServiceClient,
    },
};
use storegate_testkit::{Backend, TestStack, backend_tests, bearer};
use tonic::{Code, transport::Channel};

backend_tests!(
    admin_calls_need_a_valid_token_with_the_admin_role_now,
    an_admin_disables_enables_and_deletes_accounts_and_the_trail_says_who,
    logins_leave_their_outcomes_in_the_audit_trail_without_secrets,
    users_and_audit_events_come_in_pages_bound_to_their_listing,
    bad_requests_change_nothing,
    the_audit_trail_is_pruned_after_its_retention,
);

const PASSWORD: &str = "correct horse battery";

async fn admin_client(stack: &TestStack) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(TestStack::channel(stack.auth_addr).await)
}

async fn events(stack: &TestStack, token: &str, username: &str) -> Vec<AuditEvent> {
    let request = ListAuditEventsRequest { username: username.into(), page_size: 1000, ..Default::default() };
    let mut events = admin_client(stack)
        .await
        .list_audit_events(bearer(request, token))
        .await
        .unwrap()
        .into_inner()
        .events;
    events.reverse(); // oldest first
    events
}

async fn begin(stack: &TestStack, username: &str, password: &str) -> Result<String, tonic::Status> {
    let request =
        BeginLoginRequest { username: username.into(), password: password.into(), ..Default::default() };
    Ok(stack.auth().await.begin_login(request).await?.into_inner().login_ticket)
}

async fn scalar(db: &Db, sql: &str) -> i64 {
    on_db!(db, pool => sqlx::query_scalar(sql).fetch_one(pool).await).unwrap()
}

async fn admin_calls_need_a_valid_token_with_the_admin_role_now(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let admin = stack.admin_token("root").await;
    let (user_tokens, _) = stack.register_and_login("bob", PASSWORD).await;
    let mut client = admin_client(&stack).await;
    let get = |name: &str| GetUserRequest { username: name.into() };

    let code = client.get_user(get("bob")).await.unwrap_err().code();
    assert_eq!(code, Code::Unauthenticated, "no token");
    let code = client.get_user(bearer(get("bob"), "not.a.token")).await.unwrap_err().code();
    assert_eq!(code, Code::Unauthenticated, "a token that does not verify");
    let code = client.get_user(bearer(get("bob"), &user_tokens.access_token)).await.unwrap_err().code();
    assert_eq!(code, Code::PermissionDenied, "a user without the role");

    let bob = client.get_user(bearer(get("bob"), &admin)).await.unwrap().into_inner();
    assert_eq!((bob.username.as_str(), bob.enrolled, bob.active_sessions), ("bob", true, 1));
    assert!(bob.roles.is_empty() && bob.last_login_time.is_some() && bob.disable_time.is_none());
    assert_eq!(client.get_user(bearer(get("nobody"), &admin)).await.unwrap_err().code(), Code::NotFound);

    // The role taken away: the token still says admin, the database does not.
    auth_service::revoke_role(&TestStack::auth_config(&stack.db), "root", "admin").await.unwrap();
    let code = client.get_user(bearer(get("bob"), &admin)).await.unwrap_err().code();
    assert_eq!(code, Code::PermissionDenied, "a role revoked after the token was signed");
}

async fn an_admin_disables_enables_and_deletes_accounts_and_the_trail_says_who(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let admin = stack.admin_token("root").await;
    let root_id = scalar(&stack.db.open().await, "SELECT id FROM users WHERE username = 'root'").await;
    let (tokens, _) = stack.register_and_login("carol", PASSWORD).await;
    let mut client = admin_client(&stack).await;

    let disabled = client
        .disable_user(bearer(DisableUserRequest { username: "carol".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(disabled.disable_time.is_some());
    assert_eq!(disabled.active_sessions, 0, "the sessions ended");
    let refreshed =
        stack.auth().await.refresh_token(RefreshTokenRequest { refresh_token: tokens.refresh_token }).await;
    assert_eq!(refreshed.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(begin(&stack, "carol", PASSWORD).await.unwrap_err().code(), Code::PermissionDenied);

    // Not one's own account: the last admin could lock everyone out.
    let own = client.disable_user(bearer(DisableUserRequest { username: "root".into() }, &admin)).await;
    assert_eq!(own.unwrap_err().code(), Code::FailedPrecondition);
    let own = client.delete_user(bearer(DeleteUserRequest { username: "root".into() }, &admin)).await;
    assert_eq!(own.unwrap_err().code(), Code::FailedPrecondition);
    let own = client
        .revoke_role(bearer(RevokeRoleRequest { username: "root".into(), role: "admin".into() }, &admin))
        .await;
    assert_eq!(own.unwrap_err().code(), Code::FailedPrecondition);

    let enabled = client
        .enable_user(bearer(EnableUserRequest { username: "carol".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(enabled.disable_time.is_none());
    begin(&stack, "carol", PASSWORD).await.expect("an enabled account logs in");

    let granted = client
        .grant_role(bearer(GrantRoleRequest { username: "carol".into(), role: "editor".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(granted.roles, ["editor"]);

    client.delete_user(bearer(DeleteUserRequest { username: "carol".into() }, &admin)).await.unwrap();
    let gone = client.get_user(bearer(GetUserRequest { username: "carol".into() }, &admin)).await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    let again = client.delete_user(bearer(DeleteUserRequest { username: "carol".into() }, &admin)).await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);

    // Carol's history outlives her account, each admin action with its actor.
    let all = events(&stack, &admin, "").await;
    let carol: Vec<&AuditEvent> = all.iter().filter(|e| e.username == "carol").collect();
    let by_admin: Vec<(&str, &str)> = carol
        .iter()
        .filter(|e| e.actor.starts_with("admin:"))
        .map(|e| (e.event.as_str(), e.detail.as_str()))
        .collect();
    assert_eq!(
        by_admin,
        [
            ("account.disabled", ""),
            ("account.enabled", ""),
            ("role.granted", "editor"),
            ("account.deleted", "")
        ]
    );
    assert!(
        carol.iter().filter(|e| e.actor.starts_with("admin:")).all(|e| e.actor == format!("admin:{root_id}"))
    );
    // The operator's grant of admin to root, from the command line.
    assert!(all.iter().any(|e| e.event == "role.granted"
        && e.username == "root"
        && e.actor == "operator"
        && e.detail == "admin"));
}

async fn logins_leave_their_outcomes_in_the_audit_trail_without_secrets(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let admin = stack.admin_token("root").await;
    let (tokens, secret) = stack.register_and_login("dave", PASSWORD).await;
    assert_eq!(begin(&stack, "dave", "wrong password!").await.unwrap_err().code(), Code::Unauthenticated);
    // A password typed into the name field must not end up in the trail.
    let typo = "hunter2-my-password";
    assert_eq!(begin(&stack, typo, PASSWORD).await.unwrap_err().code(), Code::Unauthenticated);
    let ticket = begin(&stack, "dave", PASSWORD).await.unwrap();
    let wrong = storegate_testkit::wrong_totp_code(&secret);
    let completed = stack
        .auth()
        .await
        .complete_login(storegate::pb::auth::v1::CompleteLoginRequest { login_ticket: ticket, code: wrong })
        .await;
    assert_eq!(completed.unwrap_err().code(), Code::Unauthenticated);
    // A rotated refresh token presented again, once its successor was
    // rotated too (within the reuse grace it would get that successor).
    let mut auth = stack.auth().await;
    let successor = auth
        .refresh_token(RefreshTokenRequest { refresh_token: tokens.refresh_token.clone() })
        .await
        .unwrap()
        .into_inner()
        .refresh_token;
    auth.refresh_token(RefreshTokenRequest { refresh_token: successor }).await.unwrap();
    let reused =
        auth.refresh_token(RefreshTokenRequest { refresh_token: tokens.refresh_token.clone() }).await;
    assert_eq!(reused.unwrap_err().code(), Code::Unauthenticated);

    let dave = events(&stack, &admin, "dave").await;
    let seen: Vec<(&str, &str)> = dave.iter().map(|e| (e.event.as_str(), e.actor.as_str())).collect();
    assert_eq!(
        seen,
        [
            ("user.registered", "self"),
            ("login.password_accepted", "self"),
            ("login.completed", "self"),
            ("login.password_rejected", "anonymous"),
            ("login.password_accepted", "self"),
            ("login.code_rejected", "anonymous"),
            ("session.refresh_token_reused", "anonymous"),
        ]
    );
    assert_eq!(dave[2].detail, "enrolled a second factor");
    assert!(dave.iter().all(|e| e.client_address == "127.0.0.1"), "every row has the address: {dave:?}");
    assert!(dave.iter().all(|e| e.username == "dave" || e.event == "session.refresh_token_reused"));

    let unknown: Vec<AuditEvent> = events(&stack, &admin, "")
        .await
        .into_iter()
        .filter(|e| e.user_id == 0 && e.event.starts_with("login."))
        .collect();
    assert_eq!(unknown.len(), 1);
    assert_eq!(
        (unknown[0].event.as_str(), unknown[0].username.as_str(), unknown[0].detail.as_str()),
        ("login.password_rejected", "", "unknown user")
    );

    // No secret anywhere in the table: not the password, the typo, a
    // token or the TOTP secret.
    let db = stack.db.open().await;
    let rows: Vec<String> = on_db!(&db, pool => {
        sqlx::query_scalar(
            "SELECT CONCAT(event, '|', COALESCE(username, ''), '|', actor, '|', COALESCE(detail, '')) FROM audit_events",
        )
        .fetch_all(pool)
        .await
    })
    .unwrap();
    let text = rows.join("\n");
    for secret_text in
        [PASSWORD, typo, "wrong password!", &tokens.refresh_token, &tokens.access_token, &secret]
    {
        assert!(!text.contains(secret_text), "the audit trail holds a secret");
    }
}

async fn users_and_audit_events_come_in_pages_bound_to_their_listing(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let admin = stack.admin_token("root").await;
    for name in ["erin", "alma", "zoe", "bert", "nico"] {
        stack.register(name, PASSWORD).await;
    }
    let mut client = admin_client(&stack).await;
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_users(bearer(ListUsersRequest { page_size: 2, page_token: token.clone() }, &admin))
            .await
            .unwrap()
            .into_inner();
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.username));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["alma", "bert", "erin", "nico", "root", "zoe"]);

    // An audit page token of the whole trail is no token of one account's.
    let first = client
        .list_audit_events(bearer(ListAuditEventsRequest { page_size: 2, ..Default::default() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.events.len(), 2);
    assert!(first.events[0].id > first.events[1].id, "newest first");
    let next = client
        .list_audit_events(bearer(
            ListAuditEventsRequest {
                page_size: 2,
                page_token: first.next_page_token.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(next.events[0].id < first.events[1].id);
    let elsewhere = client
        .list_audit_events(bearer(
            ListAuditEventsRequest {
                username: "erin".into(),
                page_size: 2,
                page_token: first.next_page_token,
                ..Default::default()
            },
            &admin,
        ))
        .await;
    assert_eq!(elsewhere.unwrap_err().code(), Code::InvalidArgument);
}

async fn bad_requests_change_nothing(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let admin = stack.admin_token("root").await;
    stack.register("fay", PASSWORD).await;
    let db = stack.db.open().await;
    let before = (
        scalar(&db, "SELECT COUNT(*) FROM audit_events").await,
        scalar(&db, "SELECT COUNT(*) FROM user_roles").await,
    );
    let mut client = admin_client(&stack).await;
    let bad_role = client
        .grant_role(bearer(GrantRoleRequest { username: "fay".into(), role: "Not A Role!".into() }, &admin))
        .await;
    assert_eq!(bad_role.unwrap_err().code(), Code::InvalidArgument);
    let no_name = client.disable_user(bearer(DisableUserRequest { username: String::new() }, &admin)).await;
    assert_eq!(no_name.unwrap_err().code(), Code::InvalidArgument);
    let negative = client
        .list_users(bearer(ListUsersRequest { page_size: -1, page_token: String::new() }, &admin))
        .await;
    assert_eq!(negative.unwrap_err().code(), Code::InvalidArgument);
    let made_up = client
        .list_users(bearer(ListUsersRequest { page_size: 1, page_token: "bm90IG91cnM".into() }, &admin))
        .await;
    assert_eq!(made_up.unwrap_err().code(), Code::InvalidArgument);
    let not_base64 =
        client.list_users(bearer(ListUsersRequest { page_size: 1, page_token: "%%%".into() }, &admin)).await;
    assert_eq!(not_base64.unwrap_err().code(), Code::InvalidArgument);
    let after = (
        scalar(&db, "SELECT COUNT(*) FROM audit_events").await,
        scalar(&db, "SELECT COUNT(*) FROM user_roles").await,
    );
    assert_eq!(before, after);
    let fay = client
        .get_user(bearer(GetUserRequest { username: "fay".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(fay.disable_time.is_none() && fay.roles.is_empty());
}

async fn the_audit_trail_is_pruned_after_its_retention(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    for name in ["gus", "hal", "ida"] {
        stack.register(name, PASSWORD).await;
    }
    let db = stack.db.open().await;
    let now = storegate::db::now();
    // Two entries from long ago, one from yesterday.
    let aged = |days: i64, name: &'static str| {
        let db = db.clone();
        async move {
            on_db!(&db, pool => sqlx::query("UPDATE audit_events SET occurred_at = ? WHERE username = ?")
                .bind(now - chrono::Duration::days(days)).bind(name).execute(pool).await.map(drop))
            .unwrap();
        }
    };
    aged(500, "gus").await;
    aged(401, "hal").await;
    aged(1, "ida").await;
    let store = auth_service::store::AuthStore::new(db.clone());
    let pruned = auth_service::prune_audit(&store, now - chrono::Duration::days(400)).await.unwrap();
    assert_eq!(pruned, 2);
    let left: Vec<String> = on_db!(&db, pool => sqlx::query_scalar("SELECT username FROM audit_events WHERE event = 'user.registered' ORDER BY id")
        .fetch_all(pool).await).unwrap();
    assert_eq!(left, ["ida"]);
}
