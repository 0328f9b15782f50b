//! Round three of the attacks on accounts, each client on a loopback
//! address of its own (127.0.0.0/8: the server sees each connection's peer
//! address): strangers on many addresses failing against an account while
//! its owner logs in from a known device; the owner slowed, not locked out
//! for good; a lock that is no oracle; one address flooding BeginLogin;
//! the per-address budget of failures; device tokens ending with the
//! account's credentials; audit rows with addresses, and an account's
//! history after its name was taken again. SQLite and MySQL.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use auth_service::{AuditFilter, AuthConfig, throttle};
use storegate::{
    Db, on_db,
    pb::auth::v1::{
        BeginLoginRequest, BeginLoginResponse, ChangePasswordRequest, CompleteLoginRequest,
        CompleteLoginResponse, DisableUserRequest, GetUserRequest, ListAuditEventsRequest, RegisterRequest,
        ResetTotpRequest, UnlockUserRequest, admin_service_client::AdminServiceClient,
    },
};
use storegate_testkit::{
    Backend, TestStack, backend_tests, bearer,
    from_address::{auth_from, channel_from, client_address},
    observe::{metric_value, scrape_metrics},
    process::free_addr,
    totp_code,
};
use tonic::Code;
use tonic_types::StatusExt as _;

const PASSWORD: &str = "correct horse battery";
const THROTTLED: &str = "too many failed attempts; try again later";

backend_tests!(
    the_owner_logs_in_from_a_known_device_while_1000_addresses_fail_against_the_account,
    from_a_new_address_the_owner_is_slowed_not_locked_out_for_good,
    a_locked_account_answers_right_and_wrong_passwords_alike_and_hashes_neither,
    one_address_flooding_begin_login_leaves_the_owners_logins_successful,
    failures_from_one_address_are_limited_per_hour_whatever_the_names,
    device_tokens_belong_to_one_account_and_end_with_its_credentials,
    audit_rows_carry_addresses_and_an_accounts_history_outlives_its_name,
    a_lock_set_between_the_owners_password_and_code_does_not_refuse_the_code,
    a_login_begun_and_never_finished_counts_once_against_the_account,
    an_attempt_dropped_before_its_answer_gives_its_counts_back,
    unlocking_clears_the_lock_a_replica_of_the_previous_version_set,
);

fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::from([127, a, b, c])
}

async fn begin_from(
    stack: &TestStack,
    from: IpAddr,
    username: &str,
    password: &str,
    device_token: &str,
) -> Result<BeginLoginResponse, tonic::Status> {
    let request = BeginLoginRequest {
        username: username.into(),
        password: password.into(),
        device_token: device_token.into(),
    };
    Ok(auth_from(from, stack.auth_addr).await.begin_login(request).await?.into_inner())
}

async fn complete_from(
    stack: &TestStack,
    from: IpAddr,
    ticket: &str,
    code: &str,
) -> Result<CompleteLoginResponse, tonic::Status> {
    let request = CompleteLoginRequest { login_ticket: ticket.into(), code: code.into() };
    Ok(auth_from(from, stack.auth_addr).await.complete_login(request).await?.into_inner())
}

/// Registers and enrolls `username` from 127.0.0.1: its first login's
/// answer (with the device token) and its TOTP secret.
async fn enrolled(stack: &TestStack, username: &str) -> (CompleteLoginResponse, String) {
    stack.register_and_login(username, PASSWORD).await
}

/// The RetryInfo delay of a throttled answer, checking it is one.
fn retry_delay(status: &tonic::Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), THROTTLED, "{status:?}");
    status.get_details_retry_info().expect("RetryInfo").retry_delay.expect("a delay")
}

/// The account-wide lock of `username` in force now: when it ends.
async fn account_locked_until(db: &Db, username: &str) -> Option<i64> {
    let until: Option<Option<i64>> = on_db!(db, pool => {
        sqlx::query_scalar("SELECT locked_until FROM login_throttle WHERE subject = ?")
            .bind(throttle::account_subject(username))
            .fetch_optional(pool)
            .await
    })
    .unwrap();
    until.flatten().filter(|until| *until > chrono::Utc::now().timestamp())
}

/// The account-wide count of failures of `username`.
async fn account_failures(db: &Db, username: &str) -> i64 {
    let failures: Option<i64> = on_db!(db, pool => {
        sqlx::query_scalar("SELECT CAST(failures AS SIGNED) FROM login_throttle WHERE subject = ?")
            .bind(throttle::account_subject(username))
            .fetch_optional(pool)
            .await
    })
    .unwrap();
    failures.unwrap_or(0)
}

async fn count(db: &Db, sql: &str) -> i64 {
    on_db!(db, pool => sqlx::query_scalar(sql).fetch_one(pool).await).unwrap()
}

/// `storegate_login_attempts_total{step="begin"}` by outcome.
async fn begin_outcome(metrics: SocketAddr, outcome: &str) -> f64 {
    let page = scrape_metrics(metrics).await;
    let series = format!("storegate_login_attempts_total{{step=\"begin\",outcome=\"{outcome}\"}}");
    metric_value(&page, &series).unwrap_or(0.0)
}

async fn with_metrics(backend: Backend, adjust: impl FnOnce(&mut AuthConfig)) -> (TestStack, SocketAddr) {
    let metrics = free_addr();
    let stack = TestStack::start_auth_with(backend, |config| {
        config.metrics_listen_addr = metrics.to_string();
        adjust(config);
    })
    .await;
    (stack, metrics)
}

async fn the_owner_logs_in_from_a_known_device_while_1000_addresses_fail_against_the_account(
    backend: Backend,
) {
    const MAX: i32 = 10;
    let (stack, metrics) = with_metrics(backend, |config| {
        config.login.max_failed_logins = MAX;
        config.login.account_lock_secs = 3600;
    })
    .await;
    let stack = Arc::new(stack);
    let (first, secret) = enrolled(&stack, "owner").await;
    let db = stack.db.open().await;

    // 1,000 addresses, one wrong password each, 16 at a time.
    let flood = {
        let stack = stack.clone();
        tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..16)
                .map(|_| {
                    let (stack, next) = (stack.clone(), next.clone());
                    tokio::spawn(async move {
                        let mut answers = Vec::new();
                        loop {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            if n >= 1000 {
                                return answers;
                            }
                            let from = client_address(n as u32 + 100);
                            answers.push(
                                begin_from(&stack, from, "owner", "wrong password!", "").await.unwrap_err(),
                            );
                        }
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for worker in workers {
                answers.extend(worker.await.unwrap());
            }
            answers
        })
    };

    // Once the strangers have locked the account, the owner signs in from
    // the known device (at an address of its own).
    let started = Instant::now();
    while account_locked_until(&db, "owner").await.is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "the flood never locked the account");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let device = ip(0, 0, 50);
    let ticket = begin_from(&stack, device, "owner", PASSWORD, &first.device_token)
        .await
        .expect("the known device is not held up")
        .login_ticket;
    let second =
        complete_from(&stack, device, &ticket, &totp_code(&secret, 1)).await.expect("the owner is in");
    assert!(!flood.is_finished(), "the owner logged in while the flood went on");

    let answers = flood.await.unwrap();
    assert_eq!(answers.len(), 1000);
    let evaluated = answers.iter().filter(|s| s.code() == Code::Unauthenticated).count();
    let refused: Vec<_> = answers.iter().filter(|s| s.code() == Code::ResourceExhausted).collect();
    assert_eq!(evaluated + refused.len(), 1000, "nothing else: {:?}", &answers[..5]);
    // MAX before the lock; the owner's login proved the owner and cleared
    // the count, and the strangers had MAX more before the next lock.
    assert!(evaluated as i32 <= 2 * MAX && evaluated as i32 >= MAX, "{evaluated} evaluated");
    for status in &refused {
        assert!(retry_delay(status) <= Duration::from_secs(3600));
    }
    // Each address whose attempt was evaluated has its own failure budget,
    // with that one failure in it; a refused attempt spent none.
    let spent: Vec<Vec<u8>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT subject FROM client_quotas WHERE used = 1").fetch_all(pool).await
    })
    .unwrap();
    let flood_budgets = (0..1000u32)
        .map(|n| {
            throttle::login_failures_subject(auth_service::client::Client::Address(client_address(n + 100)))
        })
        .filter(|subject| spent.contains(subject))
        .count();
    assert_eq!(flood_budgets, evaluated, "one budget per failing address");
    // Only the evaluated attempts were hashed and audited.
    assert_eq!(begin_outcome(metrics, "rejected").await as usize, evaluated);
    let audited =
        count(&db, "SELECT COUNT(*) FROM audit_events WHERE event = 'login.password_rejected'").await;
    assert_eq!(audited as usize, evaluated);
    assert!(account_locked_until(&db, "owner").await.is_some(), "locked again by the strangers");

    // Still locked to a new address, even with the right password; the
    // device's new token gets in; its replaced one is a stranger's now.
    let stranger = retry_delay(&begin_from(&stack, ip(0, 0, 51), "owner", PASSWORD, "").await.unwrap_err());
    assert!(stranger <= Duration::from_secs(3600));
    let old = begin_from(&stack, device, "owner", PASSWORD, &first.device_token).await.unwrap_err();
    assert_eq!(old.code(), Code::ResourceExhausted, "the replaced token is not recognised");
    begin_from(&stack, device, "owner", PASSWORD, &second.device_token)
        .await
        .expect("the device's new token");
}

async fn from_a_new_address_the_owner_is_slowed_not_locked_out_for_good(backend: Backend) {
    let stack = TestStack::start_auth_with(backend, |config| {
        config.login.max_failed_logins = 3;
        config.login.account_lock_secs = 2;
    })
    .await;
    let (_, secret) = enrolled(&stack, "owner").await;
    let db = stack.db.open().await;
    let lock = |stack: &TestStack, round: u8| {
        let server = stack.auth_addr;
        async move {
            for n in 0..3 {
                let mut auth = auth_from(ip(1, round, n), server).await;
                let request = BeginLoginRequest {
                    username: "owner".into(),
                    password: "wrong password!".into(),
                    ..Default::default()
                };
                assert_eq!(auth.begin_login(request).await.unwrap_err().code(), Code::Unauthenticated);
            }
        }
    };
    lock(&stack, 1).await;

    // Slowed: the right password from a new address waits for the lock.
    let new_address = ip(2, 0, 1);
    let delay = retry_delay(&begin_from(&stack, new_address, "owner", PASSWORD, "").await.unwrap_err());
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(2), "{delay:?}");
    tokio::time::sleep(delay + Duration::from_millis(1_100)).await;
    let ticket =
        begin_from(&stack, new_address, "owner", PASSWORD, "").await.expect("after the lock").login_ticket;
    let done = complete_from(&stack, new_address, &ticket, &totp_code(&secret, 1)).await.unwrap();
    assert!(!done.device_token.is_empty(), "the new address is a known device from now on");

    // An operator lifts a lock at once, and says whether there was one.
    // (Locks made longer from here on, so that they outlast a slow test.)
    let longer = |db: Db| async move {
        on_db!(&db, pool => {
            sqlx::query("UPDATE login_throttle SET locked_until = ? WHERE subject = ?")
                .bind(chrono::Utc::now().timestamp() + 600)
                .bind(throttle::account_subject("owner"))
                .execute(pool)
                .await
                .map(drop)
        })
        .unwrap()
    };
    lock(&stack, 2).await;
    longer(db.clone()).await;
    assert!(account_locked_until(&db, "owner").await.is_some());
    let config = TestStack::auth_config(&stack.db);
    assert!(auth_service::unlock_user(&config, "owner").await.unwrap());
    begin_from(&stack, ip(2, 0, 2), "owner", PASSWORD, "").await.expect("unlocked");
    assert!(!auth_service::unlock_user(&config, "owner").await.unwrap(), "nothing to lift");

    // So does an administrator, through AdminService (from an address of
    // their own, which the audit trail keeps).
    let admin = stack.admin_token("root").await;
    lock(&stack, 3).await;
    longer(db.clone()).await;
    let admin_address = ip(3, 0, 1);
    let mut admin_api = AdminServiceClient::new(channel_from(admin_address, stack.auth_addr).await.unwrap());
    let user = admin_api
        .get_user(bearer(GetUserRequest { username: "owner".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    let (since, until) = (user.lock_time.expect("locked since"), user.lock_expire_time.expect("until"));
    assert!(until.seconds > since.seconds, "{since:?} {until:?}");
    let unlocked = admin_api
        .unlock_user(bearer(UnlockUserRequest { username: "owner".into() }, &admin))
        .await
        .unwrap()
        .into_inner();
    assert!(unlocked.unlocked && unlocked.lock_time.is_none() && unlocked.lock_expire_time.is_none());
    let again = admin_api.unlock_user(bearer(UnlockUserRequest { username: "owner".into() }, &admin)).await;
    assert!(!again.unwrap().into_inner().unlocked);
    let trail: Vec<(String, Option<String>)> = on_db!(&db, pool => {
        sqlx::query_as("SELECT actor, client_addr FROM audit_events WHERE event = 'account.unlocked' ORDER BY id")
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert_eq!(trail.len(), 2, "{trail:?}");
    assert_eq!(trail[0], ("operator".to_owned(), Some("operator".to_owned())));
    assert!(trail[1].0.starts_with("admin:"));
    assert_eq!(trail[1].1.as_deref(), Some("127.3.0.1"));
}

async fn a_locked_account_answers_right_and_wrong_passwords_alike_and_hashes_neither(backend: Backend) {
    let (stack, metrics) = with_metrics(backend, |config| {
        config.login.max_failed_logins = 3;
        config.login.account_lock_secs = 600;
    })
    .await;
    enrolled(&stack, "owner").await;
    let db = stack.db.open().await;
    // A known name and an unknown one, each locked from three addresses.
    for (name, round) in [("owner", 1), ("ghost", 2)] {
        for n in 0..3 {
            let err = begin_from(&stack, ip(4, round, n), name, "wrong password!", "").await.unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
        }
    }
    let evaluated = (begin_outcome(metrics, "ok").await, begin_outcome(metrics, "rejected").await);
    let audited = count(&db, "SELECT COUNT(*) FROM audit_events").await;
    let throttled = begin_outcome(metrics, "throttled").await;

    let asked =
        [("owner", PASSWORD), ("owner", "wrong password!"), ("ghost", PASSWORD), ("ghost", "wrong!!!!")];
    let mut answers = Vec::new();
    for (n, (name, password)) in asked.into_iter().enumerate() {
        let status = begin_from(&stack, ip(5, 0, n as u8), name, password, "").await.unwrap_err();
        answers.push((status.code(), status.message().to_owned(), retry_delay(&status)));
    }
    for (code, message, delay) in &answers {
        assert_eq!((*code, message.as_str()), (answers[0].0, answers[0].1.as_str()), "{answers:?}");
        assert!(*delay > Duration::ZERO && *delay <= Duration::from_secs(600), "{answers:?}");
    }
    // The right and the wrong password wait for the same lock's end.
    for pair in answers.chunks(2) {
        assert!(pair[0].2.abs_diff(pair[1].2) <= Duration::from_secs(1), "{answers:?}");
    }
    assert_eq!(
        (begin_outcome(metrics, "ok").await, begin_outcome(metrics, "rejected").await),
        evaluated,
        "no password was evaluated"
    );
    assert_eq!(begin_outcome(metrics, "throttled").await, throttled + 4.0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM audit_events").await, audited, "nothing audited");
    assert_eq!(
        count(&db, "SELECT CAST(MAX(failures) AS SIGNED) FROM login_throttle").await,
        3,
        "nothing counted"
    );
}

async fn one_address_flooding_begin_login_leaves_the_owners_logins_successful(backend: Backend) {
    // The per-address failure budget off: the flood hashes for as long as
    // it goes on, and only the hashing queue's fair share stands between it
    // and the owner.
    let stack = Arc::new(
        TestStack::start_auth_with(backend, |config| config.login.login_failures_per_client_per_hour = 0)
            .await,
    );
    stack.register("owner", PASSWORD).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = ip(6, 0, 1);
    let channels: Vec<_> = {
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(channel_from(flooder, stack.auth_addr).await.unwrap());
        }
        channels
    };
    // 150 calls in flight all along. A refused one is sent again 100 ms
    // later: the attacker's CPU is this test's own (2 cores shared with the
    // server), and a loop spinning on instant refusals measures that, not
    // the hashing queue.
    let flood: Vec<_> = (0..150)
        .map(|i| {
            let (channel, stop) = (channels[i % channels.len()].clone(), stop.clone());
            tokio::spawn(async move {
                let mut auth = storegate::pb::auth::v1::auth_service_client::AuthServiceClient::new(channel);
                let (mut busy, mut evaluated, mut n) = (0, 0, 0);
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let request = BeginLoginRequest {
                        username: format!("nobody-{i}-{n}-{}", rand::random::<u32>()),
                        password: "wrong password!".into(),
                        ..Default::default()
                    };
                    match auth.begin_login(request).await.unwrap_err().code() {
                        Code::ResourceExhausted => {
                            busy += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        _ => evaluated += 1,
                    }
                }
                (busy, evaluated)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let owner = ip(6, 0, 2);
    let mut auth = auth_from(owner, stack.auth_addr).await;
    let (mut ok, mut refused, mut latencies) = (0, Vec::new(), Vec::new());
    for _ in 0..100 {
        let started = Instant::now();
        let request =
            BeginLoginRequest { username: "owner".into(), password: PASSWORD.into(), ..Default::default() };
        match auth.begin_login(request).await {
            Ok(_) => ok += 1,
            Err(status) => refused.push(status),
        }
        latencies.push(started.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let (mut busy, mut evaluated) = (0, 0);
    for task in flood {
        let (b, e) = task.await.unwrap();
        busy += b;
        evaluated += e;
    }
    latencies.sort();
    eprintln!(
        "owner: {ok}/100 in; latency p50 {:?}, p99 {:?}, max {:?}; flood: {evaluated} evaluated, {busy} refused as busy",
        latencies[49], latencies[98], latencies[99]
    );
    assert!(evaluated > 100, "the flood was hashing all along ({evaluated})");
    assert!(busy > 0, "and beyond its share was refused");
    assert!(ok >= 99, "{ok} of 100 owner logins got in: {refused:?}");
}

async fn failures_from_one_address_are_limited_per_hour_whatever_the_names(backend: Backend) {
    let stack =
        TestStack::start_auth_with(backend, |config| config.login.login_failures_per_client_per_hour = 5)
            .await;
    stack.register("owner", PASSWORD).await;
    let db = stack.db.open().await;
    let prober = ip(7, 0, 1);
    for n in 0..5 {
        let err =
            begin_from(&stack, prober, &format!("nobody-{n}"), "wrong password!", "").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        // A right password in between uses none of the budget (while there
        // is some left: an attempt is counted before it is evaluated).
        if n < 4 {
            begin_from(&stack, prober, "owner", PASSWORD, "").await.expect("a right password");
        }
    }
    let (audited, throttle_rows) = (
        count(&db, "SELECT COUNT(*) FROM audit_events").await,
        count(&db, "SELECT COUNT(*) FROM login_throttle").await,
    );
    for name in ["nobody-6", "owner"] {
        let err = begin_from(&stack, prober, name, PASSWORD, "").await.unwrap_err();
        let delay = retry_delay(&err);
        assert!(delay > Duration::from_secs(3000) && delay <= Duration::from_secs(3600), "{delay:?}");
    }
    assert_eq!(count(&db, "SELECT COUNT(*) FROM audit_events").await, audited, "no audit row beyond it");
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM login_throttle").await,
        throttle_rows,
        "no throttle row either"
    );
    // Another address is not affected.
    begin_from(&stack, ip(7, 0, 2), "owner", PASSWORD, "").await.expect("another address");
    let err = begin_from(&stack, ip(7, 0, 2), "nobody-7", "wrong password!", "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn device_tokens_belong_to_one_account_and_end_with_its_credentials(backend: Backend) {
    let stack = TestStack::start_auth_with(backend, |config| config.login.max_failed_logins = 3).await;
    let (alice, alice_secret) = enrolled(&stack, "alice").await;
    let (bob, _) = enrolled(&stack, "bob").await;
    let db = stack.db.open().await;
    let devices = |user: &'static str| {
        let db = db.clone();
        async move {
            on_db!(&db, pool => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM login_devices JOIN users ON users.id = login_devices.user_id WHERE username = ?",
                )
                .bind(user)
                .fetch_one(pool)
                .await
            })
            .unwrap()
        }
    };
    assert_eq!((devices("alice").await, devices("bob").await), (1, 1));
    let stored: Vec<Vec<u8>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT token_hash FROM login_devices").fetch_all(pool).await
    })
    .unwrap();
    assert!(stored.contains(&auth_service::crypto::token_hash(&alice.device_token)), "stored as its SHA-256");
    assert!(!stored.iter().any(|h| h.as_slice() == alice.device_token.as_bytes()));

    // Lock alice to strangers.
    for n in 0..3 {
        begin_from(&stack, ip(8, 0, n), "alice", "wrong password!", "").await.unwrap_err();
    }
    // Bob's device token is no device of alice's.
    let err = begin_from(&stack, ip(8, 1, 1), "alice", PASSWORD, &bob.device_token).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // A known device is throttled as a client of its own, wherever it calls
    // from: five wrong passwords hold up that device only.
    for n in 0..5 {
        let err = begin_from(&stack, ip(8, 2, n), "alice", "wrong password!", &alice.device_token)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let held = begin_from(&stack, ip(8, 2, 9), "alice", PASSWORD, &alice.device_token).await.unwrap_err();
    retry_delay(&held);
    assert_eq!(devices("alice").await, 1);
    assert!(account_locked_until(&db, "alice").await.is_some(), "the device's failures did not touch it");
    // The operator's unlock, then a login from a second device.
    assert!(auth_service::unlock_user(&TestStack::auth_config(&stack.db), "alice").await.unwrap());
    let mut auth = stack.auth().await;
    let ticket = begin_from(&stack, ip(8, 3, 1), "alice", PASSWORD, "").await.unwrap().login_ticket;
    let second = complete_from(&stack, ip(8, 3, 1), &ticket, &alice.recovery_codes[0]).await.unwrap();
    assert_eq!(devices("alice").await, 2);

    // A password change ends every other device token and gives a new one.
    let ticket =
        begin_from(&stack, ip(8, 3, 1), "alice", PASSWORD, &second.device_token).await.unwrap().login_ticket;
    let changed = auth
        .change_password(ChangePasswordRequest {
            login_ticket: ticket,
            code: totp_code(&alice_secret, 1),
            new_password: "plum tiger orbit lantern".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.device_token.is_empty());
    assert_eq!(devices("alice").await, 1, "only the new one");
    let since: Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> = on_db!(&db, pool => {
        sqlx::query_as("SELECT created_at, last_used_at FROM login_devices WHERE token_hash = ?")
            .bind(auth_service::crypto::token_hash(&changed.device_token))
            .fetch_all(pool)
            .await
    })
    .unwrap();
    assert!(since[0].0 < since[0].1, "the device keeps the date of its first login: {since:?}");

    // A factor reset ends them all, and so does disabling the account.
    let ticket = begin_from(&stack, ip(8, 3, 1), "alice", "plum tiger orbit lantern", &changed.device_token)
        .await
        .unwrap()
        .login_ticket;
    auth.reset_totp(ResetTotpRequest {
        login_ticket: ticket,
        recovery_code: alice.recovery_codes[1].clone(),
    })
    .await
    .unwrap();
    assert_eq!(devices("alice").await, 0);
    let config = TestStack::auth_config(&stack.db);
    auth_service::set_user_disabled(&config, "bob", true).await.unwrap();
    assert_eq!(devices("bob").await, 0);
    // Deleting an account deletes its devices (foreign key).
    auth_service::set_user_disabled(&config, "bob", false).await.unwrap();
    let (carol, _) = enrolled(&stack, "carol").await;
    assert!(!carol.device_token.is_empty());
    auth_service::delete_user(&config, "carol").await.unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM login_devices").await, 0);
}

async fn audit_rows_carry_addresses_and_an_accounts_history_outlives_its_name(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let config = TestStack::auth_config(&stack.db);
    let admin = stack.admin_token("root").await;
    let db = stack.db.open().await;

    // alice registers and logs in from addresses of her own.
    let mut auth = auth_from(ip(9, 0, 1), stack.auth_addr).await;
    let old_id = auth
        .register(RegisterRequest { username: "alice".into(), password: PASSWORD.into() })
        .await
        .unwrap()
        .into_inner()
        .user_id;
    let begun = begin_from(&stack, ip(9, 0, 2), "alice", PASSWORD, "").await.unwrap();
    let secret = begun.enrollment.unwrap().secret;
    complete_from(&stack, ip(9, 0, 2), &begun.login_ticket, &totp_code(&secret, 0)).await.unwrap();
    begin_from(&stack, ip(9, 0, 3), "alice", "wrong password!", "").await.unwrap_err();
    // An operator's command, and an administrator's call from 127.9.0.4.
    auth_service::grant_role(&config, "alice", "auditor").await.unwrap();
    let mut admin_api = AdminServiceClient::new(channel_from(ip(9, 0, 4), stack.auth_addr).await.unwrap());
    admin_api.disable_user(bearer(DisableUserRequest { username: "alice".into() }, &admin)).await.unwrap();
    auth_service::delete_user(&config, "alice").await.unwrap();

    // The name is taken again by someone else.
    let new_id = stack.register("alice", PASSWORD).await;
    assert_ne!(new_id, old_id);

    let history = auth_service::audit_log(&config, AuditFilter::UserId(old_id), 100).await.unwrap();
    let mut seen: Vec<(String, String)> =
        history.iter().map(|r| (r.event.clone(), r.client_addr.clone().unwrap_or_default())).collect();
    seen.reverse();
    assert_eq!(
        seen,
        [
            ("user.registered", "127.9.0.1"),
            ("login.password_accepted", "127.9.0.2"),
            ("login.completed", "127.9.0.2"),
            ("login.password_rejected", "127.9.0.3"),
            ("role.granted", "operator"),
            ("account.disabled", "127.9.0.4"),
            ("account.deleted", "operator"),
        ]
        .map(|(e, c)| (e.to_owned(), c.to_owned())),
        "the old account's whole history, by its id"
    );
    assert!(history.iter().all(|r| r.user_id == Some(old_id)));
    let by_name = auth_service::audit_log(&config, AuditFilter::Username("alice"), 100).await.unwrap();
    assert!(
        !by_name.is_empty() && by_name.iter().all(|r| r.user_id == Some(new_id)),
        "the name is the new account's"
    );

    // The same through AdminService.
    let listed = admin_api
        .list_audit_events(bearer(
            ListAuditEventsRequest { user_id: old_id, page_size: 100, ..Default::default() },
            &admin,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        listed.iter().map(|e| e.id).collect::<Vec<_>>(),
        history.iter().map(|r| r.id).collect::<Vec<_>>()
    );
    let both = admin_api
        .list_audit_events(bearer(
            ListAuditEventsRequest { username: "alice".into(), user_id: old_id, ..Default::default() },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);

    // Every row says where it came from (the first signing key's row is
    // the service's own, at start-up).
    let without =
        count(&db, "SELECT COUNT(*) FROM audit_events WHERE client_addr IS NULL AND event <> 'key.rotated'")
            .await;
    assert_eq!(without, 0);
}

/// Strangers lock the account while the owner, on a new address, is between
/// the password and the code: the owner's first code is evaluated on the
/// count the ticket carries, not refused; a second code on a ticket is
/// throttled like a password.
async fn a_lock_set_between_the_owners_password_and_code_does_not_refuse_the_code(backend: Backend) {
    let stack = TestStack::start_auth_with(backend, |config| {
        config.login.max_failed_logins = 3;
        config.login.account_lock_secs = 600;
    })
    .await;
    let (_, secret) = enrolled(&stack, "owner").await;
    let db = stack.db.open().await;
    let owner = ip(6, 0, 1);
    let ticket = begin_from(&stack, owner, "owner", PASSWORD, "").await.unwrap().login_ticket;
    assert_eq!(account_failures(&db, "owner").await, 1, "the ticket carries one account count");
    for n in 0..2 {
        let err = begin_from(&stack, ip(6, 1, n), "owner", "wrong password!", "").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert!(account_locked_until(&db, "owner").await.is_some(), "three counts lock it");
    retry_delay(&begin_from(&stack, ip(6, 1, 9), "owner", "wrong password!", "").await.unwrap_err());

    let done = complete_from(&stack, owner, &ticket, &totp_code(&secret, 1)).await.expect("the owner's code");
    assert!(!done.access_token.is_empty() && !done.device_token.is_empty());
    assert_eq!(account_locked_until(&db, "owner").await, None, "a completed login lifts the lock");
    assert_eq!(account_failures(&db, "owner").await, 0);

    // A ticket's first wrong code stays counted; its next code meets the lock.
    let other = ip(6, 2, 1);
    let ticket = begin_from(&stack, other, "owner", PASSWORD, "").await.unwrap().login_ticket;
    let wrong = complete_from(&stack, other, &ticket, "000000").await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert_eq!(account_failures(&db, "owner").await, 1);
    let err = begin_from(&stack, ip(6, 2, 2), "owner", "wrong password!", "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = begin_from(&stack, ip(6, 2, 3), "owner", "wrong password!", "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(account_locked_until(&db, "owner").await.is_some());
    retry_delay(&complete_from(&stack, other, &ticket, &totp_code(&secret, 2)).await.unwrap_err());
    assert_eq!(account_failures(&db, "owner").await, 3, "a refused code is not counted");
}

/// A right password from an unrecognised client keeps its account count
/// until the login completes: tickets never used count like failures, so
/// that knowing the password buys no more guesses at the code than one
/// per count.
async fn a_login_begun_and_never_finished_counts_once_against_the_account(backend: Backend) {
    let stack = TestStack::start_auth_with(backend, |config| {
        config.login.max_failed_logins = 3;
        config.login.account_lock_secs = 600;
    })
    .await;
    let (first, _) = enrolled(&stack, "owner").await;
    let db = stack.db.open().await;
    for n in 0..3 {
        begin_from(&stack, ip(7, 0, n), "owner", PASSWORD, "").await.expect("the right password");
        assert_eq!(account_failures(&db, "owner").await, i64::from(n) + 1);
    }
    assert!(account_locked_until(&db, "owner").await.is_some());
    retry_delay(&begin_from(&stack, ip(7, 0, 9), "owner", PASSWORD, "").await.unwrap_err());
    // The pair counts (name and address) were given back: one address's
    // right passwords do not slow it.
    let pairs = count(&db, "SELECT COALESCE(CAST(SUM(failures) AS SIGNED), 0) FROM login_throttle").await;
    assert_eq!(pairs, 3, "only the account's count");
    // A known device is not held up.
    begin_from(&stack, ip(7, 1, 1), "owner", PASSWORD, &first.device_token).await.expect("known device");
}

/// An attempt dropped before its outcome (the call cancelled) gives its
/// counts back; one settled as wrong keeps them, and only then uses the
/// address's failure budget.
async fn an_attempt_dropped_before_its_answer_gives_its_counts_back(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let db = stack.db.open().await;
    let store = auth_service::store::AuthStore::new(db.clone());
    let policy = TestStack::auth_config(&stack.db).login;
    let caller =
        throttle::Caller { client: auth_service::client::Client::Address(ip(8, 0, 1)), device: None };
    let now = chrono::Utc::now().timestamp();
    let admit = || throttle::admit(&store, &policy, "owner", caller, throttle::Step::Password, now);
    let budget_used = || count(&db, "SELECT COALESCE(CAST(SUM(used) AS SIGNED), 0) FROM client_quotas");

    let attempt = admit().await.unwrap();
    assert_eq!((account_failures(&db, "owner").await, budget_used().await), (1, 0));
    drop(attempt);
    let deadline = Instant::now() + Duration::from_secs(10);
    while account_failures(&db, "owner").await != 0 {
        assert!(Instant::now() < deadline, "the dropped attempt's counts were never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(budget_used().await, 0, "nothing evaluated, nothing spent");

    let attempt = admit().await.unwrap();
    let wrong: Result<(), _> = Err(auth_service::refusal::Refusal::BadCredentials.into());
    assert!(!attempt.settle(&wrong).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((account_failures(&db, "owner").await, budget_used().await), (1, 1), "a wrong one stays");
}

/// During a rolling upgrade, replicas of the previous version still lock
/// an account in `users.locked_at` (and count in `users.failed_logins`):
/// `unlock-user` lifts that lock too, and says there was one.
async fn unlocking_clears_the_lock_a_replica_of_the_previous_version_set(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    enrolled(&stack, "owner").await;
    let db = stack.db.open().await;
    let old_columns = || {
        count(
            &db,
            "SELECT CAST(failed_logins AS SIGNED) + (locked_at IS NOT NULL) * 1000 FROM users WHERE username = 'owner'",
        )
    };
    on_db!(&db, pool => {
        sqlx::query("UPDATE users SET failed_logins = 100, locked_at = ? WHERE username = 'owner'")
            .bind(chrono::Utc::now())
            .execute(pool)
            .await
            .map(drop)
    })
    .unwrap();
    assert_eq!(old_columns().await, 1100);
    let config = TestStack::auth_config(&stack.db);
    assert!(auth_service::unlock_user(&config, "owner").await.unwrap(), "a lock was in force");
    assert_eq!(old_columns().await, 0, "lifted and forgotten");
    assert!(!auth_service::unlock_user(&config, "owner").await.unwrap(), "nothing left to lift");
}
