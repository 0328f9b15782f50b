//! Round two of the attacks on accounts: strangers locking owners out,
//! guessing for ever, mass registration, enrollment hijacking, and sessions
//! that never end. Real servers, SQLite and MySQL.

use std::time::Duration;

use storegate::{
    Db, on_db,
    pb::auth::v1::{
        BeginLoginRequest, BeginLoginResponse, ChangePasswordRequest, CompleteLoginRequest,
        CompleteLoginResponse, RefreshTokenRequest, RegisterRequest, ResetTotpRequest, RevokeSessionsRequest,
        auth_service_client::AuthServiceClient,
    },
};
use storegate_testkit::{Backend, TestStack, backend_tests, totp_code, wrong_totp_code};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt as _;

const PASSWORD: &str = "correct horse battery";
const NEW_PASSWORD: &str = "plum tiger orbit lantern";

backend_tests!(
    a_strangers_failures_do_not_lock_the_owner_out,
    forwarded_addresses_count_only_from_trusted_gateways,
    a_hundred_failures_from_unknown_clients_lock_the_account_to_them_but_not_to_its_devices,
    registrations_are_limited_per_client_taken_names_included,
    each_enrollment_ticket_has_its_own_secret_and_only_the_confirmed_one_works,
    refresh_never_extends_a_session_past_its_maximum_lifetime,
    revoke_sessions_ends_every_other_session_or_all,
    changing_the_password_needs_a_code_and_ends_other_sessions,
    a_recovery_code_resets_the_second_factor_and_ends_every_session,
    revoking_a_role_ends_the_users_sessions,
    six_parallel_refreshes_of_one_token_get_the_same_successor,
    a_redeem_after_the_grace_or_of_a_rotated_successor_is_reuse,
);

/// A request that a trusted gateway forwarded from `client`.
fn from<T>(client: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-forwarded-for", client.parse().unwrap());
    request
}

/// auth-service behind a "gateway" on loopback: every test client says
/// which address it forwards for.
async fn behind_gateway(backend: Backend) -> TestStack {
    TestStack::start_auth_with(backend, |config| {
        config.login.trusted_proxies = "127.0.0.1".parse().unwrap();
    })
    .await
}

async fn begin(
    auth: &mut AuthServiceClient<Channel>,
    client: &str,
    username: &str,
    password: &str,
) -> Result<BeginLoginResponse, tonic::Status> {
    begin_on_device(auth, client, username, password, "").await
}

/// BeginLogin from a client that keeps `device_token` for the account.
async fn begin_on_device(
    auth: &mut AuthServiceClient<Channel>,
    client: &str,
    username: &str,
    password: &str,
    device_token: &str,
) -> Result<BeginLoginResponse, tonic::Status> {
    let request = BeginLoginRequest {
        username: username.into(),
        password: password.into(),
        device_token: device_token.into(),
    };
    auth.begin_login(from(client, request)).await.map(|r| r.into_inner())
}

async fn complete(
    auth: &mut AuthServiceClient<Channel>,
    client: &str,
    ticket: &str,
    code: &str,
) -> Result<CompleteLoginResponse, tonic::Status> {
    auth.complete_login(from(client, CompleteLoginRequest { login_ticket: ticket.into(), code: code.into() }))
        .await
        .map(|r| r.into_inner())
}

async fn refresh(auth: &mut AuthServiceClient<Channel>, token: &str) -> Result<String, tonic::Status> {
    auth.refresh_token(RefreshTokenRequest { refresh_token: token.into() })
        .await
        .map(|r| r.into_inner().refresh_token)
}

/// Registers and enrolls `username` from 192.0.2.1; its first session and
/// recovery codes, and the TOTP secret.
async fn enrolled(stack: &TestStack, username: &str) -> (CompleteLoginResponse, String) {
    let mut auth = stack.auth().await;
    stack.register(username, PASSWORD).await;
    let begun = begin(&mut auth, "192.0.2.1", username, PASSWORD).await.unwrap();
    let secret = begun.enrollment.unwrap().secret;
    let tokens = complete(&mut auth, "192.0.2.1", &begun.login_ticket, &totp_code(&secret, 0)).await.unwrap();
    (tokens, secret)
}

/// A further session of an enrolled user, proven with a recovery code (a
/// TOTP step counts once per user, and tests log in faster than 30 s).
async fn another_session(stack: &TestStack, username: &str, password: &str, recovery_code: &str) -> String {
    let mut auth = stack.auth().await;
    let ticket = begin(&mut auth, "192.0.2.1", username, password).await.unwrap().login_ticket;
    complete(&mut auth, "192.0.2.1", &ticket, recovery_code).await.unwrap().refresh_token
}

async fn user_id(db: &Db, username: &str) -> i64 {
    on_db!(db, pool => sqlx::query_scalar("SELECT id FROM users WHERE username = ?").bind(username).fetch_one(pool).await)
        .unwrap()
}

async fn scalar_i64(db: &Db, sql: &str, user_id: i64) -> i64 {
    on_db!(db, pool => sqlx::query_scalar(sql).bind(user_id).fetch_one(pool).await).unwrap()
}

async fn a_strangers_failures_do_not_lock_the_owner_out(backend: Backend) {
    let stack = behind_gateway(backend).await;
    let (_, secret) = enrolled(&stack, "owner").await;
    let mut auth = stack.auth().await;

    let stranger = "203.0.113.66";
    for _ in 0..5 {
        let err = begin(&mut auth, stranger, "owner", "wrong password!").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // The stranger is held up, even with the right password...
    let held = begin(&mut auth, stranger, "owner", PASSWORD).await.unwrap_err();
    assert_eq!(held.code(), Code::ResourceExhausted);
    assert!(held.get_details_retry_info().is_some());

    // ...while the owner, from where they always sign in, is not.
    let ticket = begin(&mut auth, "192.0.2.1", "owner", PASSWORD).await.unwrap().login_ticket;
    complete(&mut auth, "192.0.2.1", &ticket, &totp_code(&secret, 1)).await.expect("the owner gets in");
    // And the stranger is still held up: the owner's login cleared only
    // the owner's count.
    let still = begin(&mut auth, stranger, "owner", PASSWORD).await.unwrap_err();
    assert_eq!(still.code(), Code::ResourceExhausted);
}

async fn forwarded_addresses_count_only_from_trusted_gateways(backend: Backend) {
    // No trusted gateway: the header is the caller's own claim and changes
    // nothing; every attempt from this peer shares one count.
    let stack = TestStack::start_auth(backend).await;
    stack.register("victim", PASSWORD).await;
    let mut auth = stack.auth().await;
    for i in 0..5 {
        let err =
            begin(&mut auth, &format!("198.51.100.{i}"), "victim", "wrong password!").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let err = begin(&mut auth, "198.51.100.99", "victim", PASSWORD).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "a made-up x-forwarded-for buys no fresh count");
}

async fn a_hundred_failures_from_unknown_clients_lock_the_account_to_them_but_not_to_its_devices(
    backend: Backend,
) {
    let logs = storegate_testkit::observe::captured_logs();
    let metrics_addr = storegate_testkit::process::free_addr();
    let stack = TestStack::start_auth_with(backend, |config| {
        config.login.trusted_proxies = "127.0.0.1".parse().unwrap();
        config.metrics_listen_addr = metrics_addr.to_string();
    })
    .await;
    let (first, secret) = enrolled(&stack, "target").await;
    assert!(!first.device_token.is_empty(), "a completed login makes its client a known device");
    let mut auth = stack.auth().await;
    let db = stack.db.open().await;
    let user_id = user_id(&db, "target").await;
    let metric = |name: &'static str| async move {
        let page = storegate_testkit::observe::scrape_metrics(metrics_addr).await;
        storegate_testkit::observe::metric_value(&page, name)
    };
    assert_eq!(metric("storegate_accounts_locked_total").await, Some(0.0));

    // A botnet of twenty addresses, five guesses each, stays under every
    // per-client lock and reaches the account's cap of 100: wrong passwords
    // from nineteen, wrong codes (after the right password) from the last.
    for bot in 0..19 {
        for _ in 0..5 {
            let err =
                begin(&mut auth, &format!("203.0.113.{bot}"), "target", "wrong password!").await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
        }
    }
    let ticket = begin(&mut auth, "203.0.113.19", "target", PASSWORD).await.unwrap().login_ticket;
    for _ in 0..5 {
        let err = complete(&mut auth, "203.0.113.19", &ticket, &wrong_totp_code(&secret)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let account = auth_service::throttle::account_subject("target");
    let (failures, locked_until) = account_throttle(&db, &account).await;
    assert_eq!(failures, 100);
    let now = chrono::Utc::now().timestamp();
    assert!(locked_until > now && locked_until <= now + 900, "locked for ACCOUNT_LOCK_SECS");
    assert_eq!(metric("storegate_accounts_locked_total").await, Some(1.0), "the lock is counted");
    let logged = storegate_testkit::observe::logs_text(&logs);
    assert!(
        logged.lines().any(|line| line.contains("WARN")
            && line.contains("account locked after consecutive failed logins from unrecognised clients")
            && line.contains(&format!("user_id={user_id}"))),
        "the lock is logged as a warning"
    );
    let locked_from: String = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT client_addr FROM audit_events WHERE event = 'account.locked' AND user_id = ?")
            .bind(user_id)
            .fetch_one(pool)
            .await
    })
    .unwrap();
    assert_eq!(locked_from, "203.0.113.19", "audited with the address whose failure locked it");

    // Locked to every unrecognised client: the right password and a wrong
    // one get the same answer, the answer of any throttle; nothing is
    // evaluated (the counts do not move).
    let evaluated = || metric_sum(metrics_addr, "begin", &["ok", "rejected"]);
    let before = evaluated().await;
    let right = begin(&mut auth, "192.0.2.77", "target", PASSWORD).await.unwrap_err();
    let wrong = begin(&mut auth, "192.0.2.78", "target", "wrong password!").await.unwrap_err();
    for refused in [&right, &wrong] {
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(refused.message(), "too many failed attempts; try again later");
        let delay = refused.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
        assert!(delay > Duration::ZERO && delay <= Duration::from_secs(900), "{delay:?}");
    }
    assert_eq!(evaluated().await, before, "a locked account evaluates no password");
    assert_eq!(account_throttle(&db, &account).await.0, 100);
    assert_eq!(metric("storegate_accounts_locked_total").await, Some(1.0), "a lock is counted once");

    // The owner's known device is not held up, from wherever it calls.
    let ticket = begin_on_device(&mut auth, "198.51.100.4", "target", PASSWORD, &first.device_token)
        .await
        .expect("a known device is exempt from the account-wide lock")
        .login_ticket;
    let again = complete(&mut auth, "198.51.100.4", &ticket, &totp_code(&secret, 1)).await.unwrap();
    assert!(!again.device_token.is_empty());
    assert_ne!(again.device_token, first.device_token, "each login replaces the device's token");
    // The completed login proved the owner: the account's count is cleared.
    assert_eq!(account_throttle(&db, &account).await, (0, 0));
    begin(&mut auth, "192.0.2.77", "target", PASSWORD).await.expect("unlocked by the owner's login");
    assert_eq!(
        account_throttle(&db, &account).await.0,
        1,
        "the unrecognised client's ticket carries a count"
    );
    // The replaced token is no longer a known device's: its failure counts
    // against the account.
    let replaced =
        begin_on_device(&mut auth, "198.51.100.5", "target", "wrong password!", &first.device_token)
            .await
            .unwrap_err();
    assert_eq!(replaced.code(), Code::Unauthenticated);
    assert_eq!(account_throttle(&db, &account).await.0, 2);

    // The operator's command says whether there was a lock to lift.
    assert_eq!(
        unlock_user_command(&stack, "target"),
        "target is not locked; their failed logins are forgotten"
    );
}

/// The account-wide count of `subject` and when its lock ends.
async fn account_throttle(db: &Db, subject: &[u8]) -> (i64, i64) {
    on_db!(db, pool => {
        sqlx::query_as("SELECT CAST(failures AS SIGNED), COALESCE(locked_until, 0) FROM login_throttle WHERE subject = ?")
            .bind(subject)
            .fetch_one(pool)
            .await
    })
    .unwrap()
}

/// `storegate_login_attempts_total` of `step`, summed over `outcomes`.
async fn metric_sum(metrics_addr: std::net::SocketAddr, step: &str, outcomes: &[&str]) -> f64 {
    let page = storegate_testkit::observe::scrape_metrics(metrics_addr).await;
    outcomes
        .iter()
        .map(|outcome| {
            let series = format!("storegate_login_attempts_total{{step=\"{step}\",outcome=\"{outcome}\"}}");
            storegate_testkit::observe::metric_value(&page, &series).unwrap_or(0.0)
        })
        .sum()
}

/// Runs `auth-service unlock-user <username>` against the stack's database;
/// what it printed.
fn unlock_user_command(stack: &TestStack, username: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_auth-service"))
        .args(["unlock-user", username])
        .env("DATABASE_URL", &stack.db.url)
        .env("STOREGATE_MASTER_KEY", storegate_testkit::TEST_MASTER_KEY)
        .env("RUST_LOG", "warn")
        .output()
        .expect("auth-service runs");
    assert!(output.status.success(), "unlock-user failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

async fn registrations_are_limited_per_client_taken_names_included(backend: Backend) {
    let stack = TestStack::start_auth_with(backend, |config| {
        config.login.trusted_proxies = "127.0.0.1".parse().unwrap();
        config.login.registrations_per_client_per_hour = 3;
    })
    .await;
    let mut auth = stack.auth().await;
    let register = |client: &'static str, username: &'static str, password: &'static str| {
        let mut auth = auth.clone();
        async move {
            auth.register(from(
                client,
                RegisterRequest { username: username.into(), password: password.into() },
            ))
            .await
        }
    };
    let prober = "203.0.113.5";
    // A request refused before the database costs nothing.
    assert_eq!(register(prober, "x", "short").await.unwrap_err().code(), Code::InvalidArgument);
    register(prober, "first", PASSWORD).await.unwrap();
    assert_eq!(register(prober, "first", PASSWORD).await.unwrap_err().code(), Code::AlreadyExists);
    register(prober, "second", PASSWORD).await.unwrap();
    let limited = register(prober, "third", PASSWORD).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted);
    let delay = limited.get_details_retry_info().expect("RetryInfo").retry_delay.unwrap();
    assert!(delay > Duration::from_secs(3000) && delay <= Duration::from_secs(3600), "{delay:?}");
    // Probing for taken names is limited alike.
    assert_eq!(register(prober, "first", PASSWORD).await.unwrap_err().code(), Code::ResourceExhausted);

    let db = stack.db.open().await;
    let users: i64 =
        on_db!(&db, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await).unwrap();
    assert_eq!(users, 2, "the refused registration wrote nothing");
    // Another client is not affected.
    register("192.0.2.1", "third", PASSWORD).await.unwrap();
    auth.begin_login(BeginLoginRequest {
        username: "third".into(),
        password: PASSWORD.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn each_enrollment_ticket_has_its_own_secret_and_only_the_confirmed_one_works(backend: Backend) {
    let stack = behind_gateway(backend).await;
    stack.register("carol", PASSWORD).await;
    let mut auth = stack.auth().await;
    let here = "192.0.2.1";
    // Someone saw the enrollment of an earlier login (over a shoulder, in a
    // log); the owner then logs in again.
    let seen = begin(&mut auth, here, "carol", PASSWORD).await.unwrap();
    let seen_secret = seen.enrollment.unwrap().secret;
    let owners = begin(&mut auth, here, "carol", PASSWORD).await.unwrap();
    let owners_secret = owners.enrollment.unwrap().secret;
    assert_ne!(seen_secret, owners_secret, "every ticket offers a fresh secret");

    // A code of another ticket's secret does not confirm this ticket.
    let err = complete(&mut auth, here, &owners.login_ticket, &totp_code(&seen_secret, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let done = complete(&mut auth, here, &owners.login_ticket, &totp_code(&owners_secret, 0)).await.unwrap();
    assert_eq!(done.recovery_codes.len(), 10);

    // The earlier ticket cannot confirm its secret any more...
    let late = complete(&mut auth, here, &seen.login_ticket, &totp_code(&seen_secret, 1)).await.unwrap_err();
    assert_eq!(late.code(), Code::Unauthenticated);
    // ...nor does its secret work for any later login; the owner's does.
    let next = begin(&mut auth, here, "carol", PASSWORD).await.unwrap();
    assert!(next.enrollment.is_none());
    let err = complete(&mut auth, here, &next.login_ticket, &totp_code(&seen_secret, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    complete(&mut auth, here, &next.login_ticket, &totp_code(&owners_secret, 1))
        .await
        .expect("the owner's secret");
}

async fn refresh_never_extends_a_session_past_its_maximum_lifetime(backend: Backend) {
    let stack = TestStack::start_auth_with(backend, |config| {
        config.login.session_max_lifetime_secs = 3;
    })
    .await;
    let (tokens, _) = stack.register_and_login("dave", PASSWORD).await;
    let mut auth = stack.auth().await;
    let rotated = refresh(&mut auth, &tokens.refresh_token).await.expect("within the session");

    let db = stack.db.open().await;
    let beyond: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM refresh_tokens WHERE expires_at > session_expires_at")
            .fetch_one(pool)
            .await
    })
    .unwrap();
    assert_eq!(beyond, 0, "no refresh token outlives its session");

    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let err = refresh(&mut auth, &rotated).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the session is over however recently it was refreshed");
}

async fn revoke_sessions_ends_every_other_session_or_all(backend: Backend) {
    let stack = behind_gateway(backend).await;
    let (first, _) = enrolled(&stack, "erin").await;
    let second = another_session(&stack, "erin", PASSWORD, &first.recovery_codes[0]).await;
    let third = another_session(&stack, "erin", PASSWORD, &first.recovery_codes[1]).await;
    // Someone else's session stays.
    let (bystander, _) = enrolled(&stack, "frank").await;
    let mut auth = stack.auth().await;

    let revoked = auth
        .revoke_sessions(RevokeSessionsRequest {
            refresh_token: first.refresh_token.clone(),
            keep_current: true,
        })
        .await
        .unwrap()
        .into_inner()
        .revoked_sessions;
    assert_eq!(revoked, 2);
    for ended in [&second, &third] {
        assert_eq!(refresh(&mut auth, ended).await.unwrap_err().code(), Code::Unauthenticated);
    }
    let current = refresh(&mut auth, &first.refresh_token).await.expect("the current session stays");
    refresh(&mut auth, &bystander.refresh_token).await.expect("another user's session stays");

    let revoked = auth
        .revoke_sessions(RevokeSessionsRequest { refresh_token: current.clone(), keep_current: false })
        .await
        .unwrap()
        .into_inner()
        .revoked_sessions;
    assert_eq!(revoked, 1);
    assert_eq!(refresh(&mut auth, &current).await.unwrap_err().code(), Code::Unauthenticated);
    // A dead token shows no session.
    let err = auth
        .revoke_sessions(RevokeSessionsRequest { refresh_token: current, keep_current: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The admin command ends them all too.
    let session = another_session(&stack, "erin", PASSWORD, &first.recovery_codes[2]).await;
    assert_eq!(auth_service::revoke_sessions(&TestStack::auth_config(&stack.db), "erin").await.unwrap(), 1);
    assert_eq!(refresh(&mut auth, &session).await.unwrap_err().code(), Code::Unauthenticated);
}

async fn changing_the_password_needs_a_code_and_ends_other_sessions(backend: Backend) {
    let stack = behind_gateway(backend).await;
    let (first, secret) = enrolled(&stack, "grace").await;
    let other = another_session(&stack, "grace", PASSWORD, &first.recovery_codes[0]).await;
    let mut auth = stack.auth().await;
    let here = "192.0.2.1";
    let change = |ticket: &str, code: &str, new_password: &str| ChangePasswordRequest {
        login_ticket: ticket.into(),
        code: code.into(),
        new_password: new_password.into(),
    };

    let ticket = begin(&mut auth, here, "grace", PASSWORD).await.unwrap().login_ticket;
    let err = auth
        .change_password(from(here, change(&ticket, &wrong_totp_code(&secret), NEW_PASSWORD)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "a code is needed");
    let err = auth
        .change_password(from(here, change(&ticket, &totp_code(&secret, 1), "password")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.get_details_bad_request().unwrap().field_violations[0].field, "new_password");
    begin(&mut auth, here, "grace", PASSWORD).await.expect("the password is unchanged so far");

    let changed = auth
        .change_password(from(here, change(&ticket, &totp_code(&secret, 1), NEW_PASSWORD)))
        .await
        .expect("password changed")
        .into_inner();
    assert!(!changed.access_token.is_empty());
    for ended in [&first.refresh_token, &other] {
        assert_eq!(refresh(&mut auth, ended).await.unwrap_err().code(), Code::Unauthenticated);
    }
    refresh(&mut auth, &changed.refresh_token).await.expect("the new session lives");
    let err = begin(&mut auth, here, "grace", PASSWORD).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the old password is gone");
    begin(&mut auth, here, "grace", NEW_PASSWORD).await.expect("the new password works");

    // A ticket still enrolling changes nothing.
    stack.register("heidi", PASSWORD).await;
    let enrolling = begin(&mut auth, here, "heidi", PASSWORD).await.unwrap();
    let code = totp_code(&enrolling.enrollment.unwrap().secret, 0);
    let err = auth
        .change_password(from(here, change(&enrolling.login_ticket, &code, NEW_PASSWORD)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

async fn a_recovery_code_resets_the_second_factor_and_ends_every_session(backend: Backend) {
    let stack = behind_gateway(backend).await;
    let (first, old_secret) = enrolled(&stack, "ivan").await;
    let mut auth = stack.auth().await;
    let here = "192.0.2.1";
    let db = stack.db.open().await;

    let ticket = begin(&mut auth, here, "ivan", PASSWORD).await.unwrap().login_ticket;
    let reset = |code: &str| {
        from(here, ResetTotpRequest { login_ticket: ticket.clone(), recovery_code: code.into() })
    };
    let err = auth.reset_totp(reset(&totp_code(&old_secret, 1))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "only a recovery code resets the factor");
    let err = auth.reset_totp(reset("AAAA-BBBB-CCCC")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "an unknown recovery code");
    auth.reset_totp(reset(&first.recovery_codes[0])).await.expect("reset");

    assert_eq!(refresh(&mut auth, &first.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
    let codes_left =
        scalar_i64(&db, "SELECT COUNT(*) FROM recovery_codes WHERE user_id = ?", user_id(&db, "ivan").await)
            .await;
    assert_eq!(codes_left, 0, "the old recovery codes are gone");
    let err = complete(&mut auth, here, &ticket, &first.recovery_codes[1]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the ticket was used");

    // The next login enrolls afresh; the old authenticator is useless.
    let begun = begin(&mut auth, here, "ivan", PASSWORD).await.unwrap();
    let new_secret = begun.enrollment.expect("enrolls again").secret;
    assert_ne!(new_secret, old_secret);
    let err = complete(&mut auth, here, &begun.login_ticket, &totp_code(&old_secret, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Its first code may fall in the same 30 seconds as the old one's last.
    let done = complete(&mut auth, here, &begun.login_ticket, &totp_code(&new_secret, 0)).await.unwrap();
    assert_eq!(done.recovery_codes.len(), 10, "new recovery codes");
}

async fn revoking_a_role_ends_the_users_sessions(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let (tokens, _) = stack.register_and_login("judy", PASSWORD).await;
    let config = TestStack::auth_config(&stack.db);
    auth_service::grant_role(&config, "judy", "admin").await.unwrap();
    let mut auth = stack.auth().await;
    let rotated = refresh(&mut auth, &tokens.refresh_token).await.unwrap();
    auth_service::revoke_role(&config, "judy", "admin").await.unwrap();
    let err = refresh(&mut auth, &rotated).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no session mints tokens with a revoked role");
}

/// Two tabs (six here) refreshing one token at once: within the reuse grace
/// every redeem gets the one successor, and the session lives on.
async fn six_parallel_refreshes_of_one_token_get_the_same_successor(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let (tokens, _) = stack.register_and_login("tabs", PASSWORD).await;
    let auth = stack.auth().await;
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (mut auth, token) = (auth.clone(), tokens.refresh_token.clone());
            tokio::spawn(async move {
                auth.refresh_token(RefreshTokenRequest { refresh_token: token }).await.map(|r| r.into_inner())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap().expect("every tab is refreshed"));
    }
    let successor = &answers[0].refresh_token;
    assert!(answers.iter().all(|a| &a.refresh_token == successor), "one successor for all");
    let access: std::collections::HashSet<_> = answers.iter().map(|a| a.access_token.clone()).collect();
    assert_eq!(access.len(), 6, "each gets a fresh access token");

    let db = stack.db.open().await;
    let rows: Vec<(Option<Vec<u8>>, bool)> = on_db!(&db, pool => {
        sqlx::query_as("SELECT successor_sealed, revoked_at IS NOT NULL FROM refresh_tokens ORDER BY id")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert_eq!(rows.len(), 2, "one rotation: {rows:?}");
    let sealed = rows[0].0.as_ref().expect("the successor is kept, sealed, for the grace");
    assert!(!sealed.windows(successor.len()).any(|w| w == successor.as_bytes()), "sealed, not plain");
    assert!(rows.iter().all(|(_, revoked)| !revoked), "nothing revoked");
    let again: Vec<Option<String>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT client_addr FROM audit_events WHERE event = 'session.refresh_token_redeemed_again'")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert_eq!(
        again,
        vec![Some("127.0.0.1".to_owned()); 5],
        "each redeem within the grace is audited with its address"
    );

    // The session goes on with the successor; the sweeper forgets the
    // sealed copy once the grace is over.
    let mut auth = stack.auth().await;
    let next = refresh(&mut auth, successor).await.expect("the successor works");
    let store = auth_service::store::AuthStore::new(db.clone());
    store
        .sweep_expired(chrono::Utc::now() + chrono::Duration::seconds(11), chrono::Duration::seconds(10))
        .await
        .unwrap();
    let kept: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM refresh_tokens WHERE successor_sealed IS NOT NULL").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(kept, 0, "no sealed successor outlives its grace");
    refresh(&mut auth, &next).await.expect("still one live session");
}

/// Outside the grace, or once the successor was itself rotated, a second
/// redeem means a copy: the whole session is revoked, as before.
async fn a_redeem_after_the_grace_or_of_a_rotated_successor_is_reuse(backend: Backend) {
    let stack =
        TestStack::start_auth_with(backend.clone(), |config| config.login.refresh_reuse_grace_secs = 1).await;
    let mut auth = stack.auth().await;

    // After the grace.
    let (tokens, _) = stack.register_and_login("late", PASSWORD).await;
    let successor = refresh(&mut auth, &tokens.refresh_token).await.unwrap();
    assert_eq!(refresh(&mut auth, &tokens.refresh_token).await.unwrap(), successor, "within the grace");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let err = refresh(&mut auth, &tokens.refresh_token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = refresh(&mut auth, &successor).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the session is revoked");

    // Within the grace, but the successor has moved on: whoever redeems the
    // old token holds a copy.
    let (tokens, _) = stack.register_and_login("copied", PASSWORD).await;
    let successor = refresh(&mut auth, &tokens.refresh_token).await.unwrap();
    let third = refresh(&mut auth, &successor).await.unwrap();
    let err = refresh(&mut auth, &tokens.refresh_token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(refresh(&mut auth, &third).await.unwrap_err().code(), Code::Unauthenticated, "revoked");

    // Reuse is audited with the address it came from.
    let db = stack.db.open().await;
    let from: Vec<Option<String>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT client_addr FROM audit_events WHERE event = 'session.refresh_token_reused'")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert_eq!(from, [Some("127.0.0.1".to_owned()), Some("127.0.0.1".to_owned())]);

    // Without a grace, the second redeem is reuse at once.
    let stack = TestStack::start_auth_with(backend, |config| config.login.refresh_reuse_grace_secs = 0).await;
    let mut auth = stack.auth().await;
    let (tokens, _) = stack.register_and_login("strict", PASSWORD).await;
    refresh(&mut auth, &tokens.refresh_token).await.unwrap();
    assert_eq!(refresh(&mut auth, &tokens.refresh_token).await.unwrap_err().code(), Code::Unauthenticated);
}
