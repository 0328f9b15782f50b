//! The login against the attacks that broke the prototype: guessing
//! (throttling), replay, stolen tickets, enumeration, weak passwords, and
//! secrets leaking into logs. Real servers, SQLite and MySQL.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use auth_service::{client::Client, throttle};
use storegate::{
    Db, on_db,
    pb::auth::v1::{
        BeginLoginRequest, ChangePasswordRequest, CompleteLoginRequest, RegisterRequest, ResetTotpRequest,
    },
};
use storegate_testkit::{Backend, TestStack, backend_tests, totp_code, wrong_totp_code};
use tonic::Code;
use tonic_types::StatusExt as _;

const PASSWORD: &str = "correct horse battery";

backend_tests!(
    five_failures_lock_even_the_right_password_with_growing_delays,
    unknown_names_are_throttled_like_known_ones,
    parallel_wrong_passwords_cannot_slip_past_the_limit,
    wrong_codes_count_towards_the_same_limit,
    twenty_parallel_wrong_codes_on_one_ticket_evaluate_exactly_five,
    ten_parallel_logins_with_one_code_let_exactly_one_in,
    recovery_codes_are_shown_once_and_each_works_once,
    a_ticket_of_one_user_fails_with_the_code_of_another,
    expired_tickets_are_refused,
    passwords_are_used_exactly_as_given,
    common_and_oversized_passwords_are_refused_before_hashing,
    a_wrong_master_key_stops_start_up_with_a_clear_error,
    logs_never_contain_passwords_codes_tickets_or_tokens,
    the_sweeper_forgets_idle_counts_but_keeps_locks,
);

async fn begin(stack: &TestStack, username: &str, password: &str) -> Result<String, tonic::Status> {
    let mut auth = stack.auth().await;
    auth.begin_login(BeginLoginRequest {
        username: username.into(),
        password: password.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().login_ticket)
}

async fn complete(stack: &TestStack, ticket: &str, code: &str) -> Result<Vec<String>, tonic::Status> {
    let mut auth = stack.auth().await;
    auth.complete_login(CompleteLoginRequest { login_ticket: ticket.into(), code: code.into() })
        .await
        .map(|r| r.into_inner().recovery_codes)
}

fn retry_delay(status: &tonic::Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    status.get_details_retry_info().expect("RetryInfo").retry_delay.expect("a delay")
}

/// Lets time pass for the throttle: the current lock ends now.
async fn end_lock(db: &Db) {
    let now = chrono::Utc::now().timestamp();
    on_db!(db, pool => {
        sqlx::query("UPDATE login_throttle SET locked_until = ? WHERE locked_until IS NOT NULL")
            .bind(now - 1)
            .execute(pool)
            .await
            .map(drop)
    })
    .unwrap();
}

/// The failures counted against `name` from this test's client (127.0.0.1),
/// and against the account `name` from all unrecognised clients.
async fn throttle_failures(db: &Db, name: &str) -> (Option<i64>, Option<i64>) {
    let here = Client::Address([127, 0, 0, 1].into());
    (
        failures_of(db, &throttle::subject(name, here)).await,
        failures_of(db, &throttle::account_subject(name)).await,
    )
}

async fn failures_of(db: &Db, subject: &[u8]) -> Option<i64> {
    on_db!(db, pool => {
        sqlx::query_scalar("SELECT CAST(failures AS SIGNED) FROM login_throttle WHERE subject = ?")
            .bind(subject)
            .fetch_optional(pool)
            .await
    })
    .unwrap()
}

/// Every count in the throttle table, sorted.
async fn all_throttle_failures(db: &Db) -> Vec<i64> {
    let mut all: Vec<i64> = on_db!(db, pool => {
        sqlx::query_scalar("SELECT CAST(failures AS SIGNED) FROM login_throttle").fetch_all(pool).await
    })
    .unwrap_or_default();
    all.sort();
    all
}

async fn five_failures_lock_even_the_right_password_with_growing_delays(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("mallory", PASSWORD).await;
    for _ in 0..5 {
        assert_eq!(
            begin(&stack, "mallory", "wrong password!").await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let first = retry_delay(&begin(&stack, "Mallory", PASSWORD).await.unwrap_err());
    assert!(first > Duration::ZERO && first <= Duration::from_secs(30), "{first:?}");

    let db = stack.db.open().await;
    end_lock(&db).await;
    assert_eq!(begin(&stack, "mallory", "wrong again!!").await.unwrap_err().code(), Code::Unauthenticated);
    let second = retry_delay(&begin(&stack, "mallory", PASSWORD).await.unwrap_err());
    assert!(second > Duration::from_secs(30) && second <= Duration::from_secs(60), "{second:?}");

    for cap in 0..6 {
        end_lock(&db).await;
        begin(&stack, "mallory", "still wrong!!").await.unwrap_err();
        let delay = retry_delay(&begin(&stack, "mallory", PASSWORD).await.unwrap_err());
        assert!(delay <= Duration::from_secs(15 * 60), "round {cap}: {delay:?}");
    }
    assert!(retry_delay(&begin(&stack, "mallory", PASSWORD).await.unwrap_err()) > Duration::from_secs(480));

    // Once the lock ends, the right password and code get in and clear the count.
    end_lock(&db).await;
    let begun = stack.begin_login("mallory", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    complete(&stack, &begun.login_ticket, &totp_code(&secret, 0)).await.unwrap();
    assert_eq!(
        throttle_failures(&db, "mallory").await,
        (Some(0), Some(0)),
        "a completed login resets the name's count and the account's"
    );
    let locks: Vec<Option<i64>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT locked_until FROM login_throttle").fetch_all(pool).await
    })
    .unwrap();
    assert_eq!(locks, [None, None], "and lifts the lock");
    // The count starts afresh: four wrong passwords leave the right one in.
    for _ in 0..4 {
        assert_eq!(
            begin(&stack, "mallory", "wrong once more").await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    begin(&stack, "mallory", PASSWORD).await.expect("the right password after four failures");
    // Its count on the name and address was given back and its ticket
    // stored; its account count stays, carried by the ticket for its
    // first code.
    assert_eq!(
        throttle_failures(&db, "mallory").await,
        (Some(4), Some(5)),
        "a right password is no failure of its address; the ticket carries one account count"
    );
    let tickets: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM login_tickets").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(tickets, 1);
}

async fn unknown_names_are_throttled_like_known_ones(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("known", PASSWORD).await;
    let mut last = Vec::new();
    for name in ["known", "ghost"] {
        for _ in 0..5 {
            let err = begin(&stack, name, "wrong password!").await.unwrap_err();
            assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "invalid username or password"));
        }
        let err = begin(&stack, name, PASSWORD).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        last.push(err.message().to_owned());
    }
    assert_eq!(last[0], last[1], "known and unknown names are refused alike");
}

async fn parallel_wrong_passwords_cannot_slip_past_the_limit(backend: Backend) {
    let stack = Arc::new(TestStack::start_auth(backend).await);
    stack.register("target", PASSWORD).await;
    let attempts: Vec<_> = (0..20)
        .map(|_| {
            let stack = stack.clone();
            tokio::spawn(async move { begin(&stack, "target", "wrong password!").await.unwrap_err().code() })
        })
        .collect();
    let mut codes = Vec::new();
    for a in attempts {
        codes.push(a.await.unwrap());
    }
    let evaluated = codes.iter().filter(|c| **c == Code::Unauthenticated).count();
    let refused = codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    assert_eq!((evaluated, refused), (5, 15), "{codes:?}");
    assert_eq!(
        throttle_failures(&stack.db.open().await, "target").await,
        (Some(5), Some(5)),
        "the refused ones counted against nothing"
    );
    assert_eq!(begin(&stack, "target", PASSWORD).await.unwrap_err().code(), Code::ResourceExhausted);
}

async fn wrong_codes_count_towards_the_same_limit(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("victim", PASSWORD).await;
    // The attacker has the password, not the phone.
    let begun = stack.begin_login("victim", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    for _ in 0..3 {
        complete(&stack, &begun.login_ticket, &wrong_totp_code(&secret)).await.unwrap_err();
    }
    let ticket = begin(&stack, "victim", PASSWORD).await.unwrap();
    for _ in 0..2 {
        complete(&stack, &ticket, &wrong_totp_code(&secret)).await.unwrap_err();
    }
    let err = begin(&stack, "victim", PASSWORD).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "a known password does not buy more code guesses");
    let err = complete(&stack, &ticket, &totp_code(&secret, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

/// The wrong-code limit of a ticket holds under parallel calls: each is
/// counted on the ticket before its code is evaluated.
async fn twenty_parallel_wrong_codes_on_one_ticket_evaluate_exactly_five(backend: Backend) {
    let stack = Arc::new(TestStack::start_auth(backend).await);
    let (_, secret) = stack.register_and_login("guessed", PASSWORD).await;
    let ticket = begin(&stack, "guessed", PASSWORD).await.unwrap();
    let wrong = wrong_totp_code(&secret);
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (stack, ticket, wrong) = (stack.clone(), ticket.clone(), wrong.clone());
            tokio::spawn(async move { complete(&stack, &ticket, &wrong).await.unwrap_err() })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        let status = call.await.unwrap();
        answers.push((status.code(), status.message().to_owned()));
    }
    let evaluated =
        answers.iter().filter(|a| *a == &(Code::Unauthenticated, "invalid code".to_owned())).count();
    let dead = answers
        .iter()
        .filter(|(code, message)| {
            *code == Code::Unauthenticated && message.starts_with("login ticket is invalid")
        })
        .count();
    assert_eq!((evaluated, dead), (5, 15), "{answers:?}");
    let db = stack.db.open().await;
    let failed_codes: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT CAST(failed_codes AS SIGNED) FROM login_tickets").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(failed_codes, 5);
    let rejected: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE event = 'login.code_rejected'").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(rejected, 5, "only evaluated codes are audited");
    // The ticket is spent: even the right code is refused now.
    let err = complete(&stack, &ticket, &totp_code(&secret, 1)).await.unwrap_err();
    assert!(err.message().starts_with("login ticket is invalid"), "{err:?}");
}

async fn ten_parallel_logins_with_one_code_let_exactly_one_in(backend: Backend) {
    let stack = Arc::new(TestStack::start_auth(backend).await);
    let (_, secret) = stack.register_and_login("racer", PASSWORD).await;
    let mut tickets = Vec::new();
    for _ in 0..10 {
        tickets.push(begin(&stack, "racer", PASSWORD).await.unwrap());
    }
    // The current step was spent by the enrollment login; the next one is fresh.
    let code = totp_code(&secret, 1);
    let calls: Vec<_> = tickets
        .into_iter()
        .map(|ticket| {
            let (stack, code) = (stack.clone(), code.clone());
            tokio::spawn(
                async move { complete(&stack, &ticket, &code).await.map(drop).map_err(|e| e.code()) },
            )
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(
        results.iter().all(|r| matches!(r, Ok(()) | Err(Code::Unauthenticated | Code::ResourceExhausted))),
        "{results:?}"
    );
}

async fn recovery_codes_are_shown_once_and_each_works_once(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("lostphone", PASSWORD).await;
    let begun = stack.begin_login("lostphone", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    let codes = complete(&stack, &begun.login_ticket, &totp_code(&secret, 0)).await.unwrap();
    assert_eq!(codes.len(), 10);
    assert_eq!(codes.iter().collect::<std::collections::HashSet<_>>().len(), 10);
    for code in &codes {
        let bits = code.chars().filter(|c| *c != '-').count() * 5;
        assert!(bits >= 50, "{code}");
    }

    let db = stack.db.open().await;
    let stored: Vec<Vec<u8>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT code_hash FROM recovery_codes").fetch_all(pool).await
    })
    .unwrap();
    assert_eq!(stored.len(), 10);
    for code in &codes {
        let plain = code.replace('-', "");
        assert!(
            !stored.iter().any(|h| h.windows(plain.len()).any(|w| w == plain.as_bytes())),
            "stored hashed"
        );
    }

    // A recovery code stands in for the phone, once; typed in lower case without dashes too.
    let ticket = begin(&stack, "lostphone", PASSWORD).await.unwrap();
    let again = complete(&stack, &ticket, &codes[3].replace('-', "").to_lowercase()).await.unwrap();
    assert!(again.is_empty(), "recovery codes are shown only when enrollment is confirmed");
    let ticket = begin(&stack, "lostphone", PASSWORD).await.unwrap();
    assert_eq!(complete(&stack, &ticket, &codes[3]).await.unwrap_err().code(), Code::Unauthenticated);
    complete(&stack, &ticket, &codes[4]).await.expect("another code still works");
    let used: i64 = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM recovery_codes WHERE used_at IS NOT NULL").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(used, 2);
}

async fn a_ticket_of_one_user_fails_with_the_code_of_another(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("user-a", PASSWORD).await;
    stack.register("user-b", PASSWORD).await;
    let a = stack.begin_login("user-a", PASSWORD).await;
    let b = stack.begin_login("user-b", PASSWORD).await;
    let b_code = totp_code(&b.enrollment.unwrap().secret, 0);
    assert_eq!(complete(&stack, &a.login_ticket, &b_code).await.unwrap_err().code(), Code::Unauthenticated);
    complete(&stack, &b.login_ticket, &b_code).await.expect("the code is b's");
}

async fn expired_tickets_are_refused(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("slowpoke", PASSWORD).await;
    let begun = stack.begin_login("slowpoke", PASSWORD).await;
    let expiry = begun.ticket_expire_time.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((290..=300).contains(&expiry), "{expiry}");
    let db = stack.db.open().await;
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    on_db!(&db, pool => sqlx::query("UPDATE login_tickets SET expires_at = ?").bind(past).execute(pool).await.map(drop))
        .unwrap();
    let code = totp_code(&begun.enrollment.unwrap().secret, 0);
    assert_eq!(complete(&stack, &begun.login_ticket, &code).await.unwrap_err().code(), Code::Unauthenticated);
}

async fn passwords_are_used_exactly_as_given(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let password: String = "  tea 🫖 kettle 🔥 sugar 🍬 spoon 🥄 cup ☕ saucer 🍽 milk 🥛 honey 🍯 x"
        .chars()
        .cycle()
        .take(64)
        .collect();
    assert_eq!(password.chars().count(), 64);
    stack.register("exact", &password).await;
    let prefix: String = password.chars().take(63).collect();
    for wrong in [prefix.as_str(), password.trim(), &format!("{password} ")] {
        assert_eq!(
            begin(&stack, "exact", wrong).await.unwrap_err().code(),
            Code::Unauthenticated,
            "{wrong:?}"
        );
    }
    begin(&stack, "exact", &password).await.expect("the exact password");
}

async fn common_and_oversized_passwords_are_refused_before_hashing(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let mut auth = stack.auth().await;
    for common in ["password123", "qwerty123", "1q2w3e4r5t", "iloveyou"] {
        let err = auth
            .register(RegisterRequest { username: "someone".into(), password: common.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{common}");
        let fields: Vec<_> = err
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        assert_eq!(fields, ["password"]);
    }
    let huge = "x".repeat(1 << 20);
    let started = Instant::now();
    let err = auth
        .register(RegisterRequest { username: "someone".into(), password: huge.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = auth
        .begin_login(BeginLoginRequest { username: "someone".into(), password: huge, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let users: i64 =
        on_db!(&stack.db.open().await, pool => sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await)
            .unwrap();
    assert_eq!(users, 0);
}

async fn a_wrong_master_key_stops_start_up_with_a_clear_error(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let mut config = TestStack::auth_config(&stack.db);
    config.master_key = Some(secrecy::SecretString::from(auth_service::crypto::MasterKey::generate_base64()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = auth_service::run(config, listener, std::future::pending()).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("STOREGATE_MASTER_KEY"), "{message}");
}

async fn logs_never_contain_passwords_codes_tickets_or_tokens(backend: Backend) {
    let logs = storegate_testkit::observe::captured_logs();
    let stack = TestStack::start_auth(backend).await;
    let password = "leak-canary horse battery";
    stack.register("canary", password).await;
    begin(&stack, "canary", "leak-canary wrong one").await.unwrap_err();
    let begun = stack.begin_login("canary", password).await;
    let secret = begun.enrollment.unwrap().secret;
    let code = totp_code(&secret, 0);
    let mut auth = stack.auth().await;
    let tokens = auth
        .complete_login(CompleteLoginRequest { login_ticket: begun.login_ticket.clone(), code: code.clone() })
        .await
        .unwrap()
        .into_inner();
    complete(&stack, &begun.login_ticket, &code).await.unwrap_err();
    // A password change (its new password) and a factor reset (its recovery code).
    let new_password = "leak-canary plum tiger orbit";
    let ticket = begin(&stack, "canary", password).await.unwrap();
    let changed = auth
        .change_password(ChangePasswordRequest {
            login_ticket: ticket.clone(),
            code: tokens.recovery_codes[1].clone(),
            new_password: new_password.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let ticket = begin(&stack, "canary", new_password).await.unwrap();
    auth.reset_totp(ResetTotpRequest {
        login_ticket: ticket,
        recovery_code: tokens.recovery_codes[2].clone(),
    })
    .await
    .unwrap();

    let text = storegate_testkit::observe::logs_text(&logs);
    assert!(text.contains("login completed"), "the capture works");
    assert!(text.contains("password changed"), "the capture works");
    let access_signature = tokens.access_token.rsplit('.').next().unwrap();
    for (what, secret_value) in [
        ("password", password),
        ("wrong password", "leak-canary wrong one"),
        ("TOTP secret", secret.as_str()),
        ("ticket", begun.login_ticket.as_str()),
        ("access token", access_signature),
        ("refresh token", tokens.refresh_token.as_str()),
        ("device token", tokens.device_token.as_str()),
        ("recovery code", tokens.recovery_codes[0].as_str()),
        ("recovery code used for a password change", tokens.recovery_codes[1].as_str()),
        ("recovery code used for a reset", tokens.recovery_codes[2].as_str()),
        ("new password", new_password),
        ("new access token", changed.access_token.rsplit('.').next().unwrap()),
        ("new refresh token", changed.refresh_token.as_str()),
        ("new device token", changed.device_token.as_str()),
    ] {
        assert!(!text.contains(secret_value), "the {what} is in the logs");
    }
    assert!(!text.contains(&format!("code: \"{code}\"")), "the code is in the logs");
    for sql in ["SELECT ", "INSERT INTO", "UPDATE users"] {
        assert!(!text.contains(sql), "SQL text {sql:?} is in the logs");
    }
}

/// A completed login leaves its name's count at zero; the sweeper deletes a
/// count after a day without attempts, unless a lock is still in force.
async fn the_sweeper_forgets_idle_counts_but_keeps_locks(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register_and_login("carol", PASSWORD).await;
    stack.register("dave", PASSWORD).await;
    for _ in 0..5 {
        begin(&stack, "dave", "wrong password!").await.unwrap_err();
    }
    begin(&stack, "erin", "no such user").await.unwrap_err();
    let db = stack.db.open().await;
    // With their account-wide counts beside them.
    assert_eq!(
        all_throttle_failures(&db).await,
        [0, 0, 1, 1, 5, 5],
        "carol cleared, erin counted, dave locked"
    );

    let store = auth_service::store::AuthStore::new(db.clone());
    let now = chrono::Utc::now();
    let grace = chrono::Duration::seconds(10);
    store.sweep_expired(now, grace).await.unwrap();
    assert_eq!(all_throttle_failures(&db).await.len(), 6, "counts touched today stay");

    // A day and a minute later, with dave's lock still in force then.
    let later = now + chrono::Duration::minutes(24 * 60 + 1);
    let dave = throttle::subject("dave", Client::Address([127, 0, 0, 1].into()));
    on_db!(&db, pool => {
        sqlx::query("UPDATE login_throttle SET locked_until = ? WHERE subject = ?")
            .bind(later.timestamp() + 60)
            .bind(&dave)
            .execute(pool)
            .await
            .map(drop)
    })
    .unwrap();
    store.sweep_expired(later, grace).await.unwrap();
    assert_eq!(all_throttle_failures(&db).await, [5], "idle counts are forgotten, a lock in force is kept");
    assert_eq!(failures_of(&db, &dave).await, Some(5));
}
