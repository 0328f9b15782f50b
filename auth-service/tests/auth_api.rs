//! AuthService against a real server and database, on SQLite and MySQL.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use storegate::{
    Db, on_db,
    pb::auth::v1::{BeginLoginRequest, CompleteLoginRequest, GetJwksRequest, RegisterRequest},
    token::{ACCESS_TOKEN_TTL_SECS, Claims, DEFAULT_AUDIENCE, DEFAULT_ISSUER, KeySet, TokenVerifier},
};
use storegate_testkit::{Backend, TestStack, backend_tests, totp_code, wrong_totp_code};
use tonic::Code;
use tonic_types::StatusExt as _;

const PASSWORD: &str = "correct horse battery";

backend_tests!(
    passwords_are_stored_as_argon2id_and_totp_secrets_sealed,
    taken_usernames_are_already_exists_whatever_the_case,
    bad_registrations_name_every_bad_field_and_write_nothing,
    wrong_password_and_unknown_user_look_the_same,
    first_login_enrolls_by_qr_and_issues_a_verifiable_token,
    enrollment_is_never_returned_after_confirmation,
    a_wrong_code_is_refused_and_the_ticket_survives_it,
    a_ticket_works_once,
    a_time_step_is_accepted_once_across_tickets,
    five_wrong_codes_kill_the_ticket,
    granted_roles_appear_in_the_next_token,
);

async fn count(db: &Db, table: &str) -> i64 {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    on_db!(db, pool => sqlx::query_scalar(&sql).fetch_one(pool).await).unwrap()
}

async fn passwords_are_stored_as_argon2id_and_totp_secrets_sealed(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let user_id = stack.register("Alice", PASSWORD).await;
    assert!(user_id > 0);

    let db = stack.db.open().await;
    let (username, hash, sealed): (String, String, Vec<u8>) = on_db!(&db, pool => {
        sqlx::query_as("SELECT username, password_hash, totp_secret FROM users WHERE id = ?")
            .bind(user_id)
            .fetch_one(pool)
            .await
    })
    .unwrap();
    assert_eq!(username, "alice", "usernames are stored lower-cased");
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
    assert!(!hash.contains(PASSWORD));

    assert!(sealed.is_empty(), "the secret comes with the first login, not with the account");

    // The ticket holds its own secret, sealed; the code that completes it
    // makes exactly that secret the account's.
    let begun = stack.begin_login("alice", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    let secret_bytes = totp_rs::Secret::Encoded(secret.clone()).to_bytes().unwrap();
    let in_clear = |sealed: &[u8]| {
        String::from_utf8_lossy(sealed).contains(&secret)
            || sealed.windows(secret_bytes.len()).any(|w| w == secret_bytes.as_slice())
    };
    let offered: Vec<u8> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT enrollment_secret FROM login_tickets WHERE user_id = ?")
            .bind(user_id)
            .fetch_one(pool)
            .await
    })
    .unwrap();
    assert!(!in_clear(&offered), "secret stored in the clear");
    assert!(offered.len() >= 12 + 20 + 16, "nonce, ciphertext and tag");

    stack
        .auth()
        .await
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 0),
        })
        .await
        .unwrap();
    let confirmed: Vec<u8> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT totp_secret FROM users WHERE id = ?").bind(user_id).fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(confirmed, offered, "the account keeps the secret of the ticket that confirmed it");
}

async fn taken_usernames_are_already_exists_whatever_the_case(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("bob", PASSWORD).await;
    for name in ["bob", "BOB", "Bob"] {
        let err = stack
            .auth()
            .await
            .register(RegisterRequest { username: name.into(), password: PASSWORD.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{name}");
    }
    assert_eq!(count(&stack.db.open().await, "users").await, 1);
}

async fn bad_registrations_name_every_bad_field_and_write_nothing(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let err = stack
        .auth()
        .await
        .register(RegisterRequest { username: "x y".into(), password: "short".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let details = err.get_error_details();
    let mut fields: Vec<_> = details
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    assert_eq!(fields, ["password", "username"]);

    for (username, password) in
        [("ok_name", "x".repeat(129)), ("ab", PASSWORD.to_owned()), ("", PASSWORD.to_owned())]
    {
        let err = stack
            .auth()
            .await
            .register(RegisterRequest { username: username.into(), password })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{username}");
    }
    assert_eq!(count(&stack.db.open().await, "users").await, 0);
}

async fn wrong_password_and_unknown_user_look_the_same(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("carol", PASSWORD).await;
    let mut auth = stack.auth().await;
    let wrong_password = auth
        .begin_login(BeginLoginRequest {
            username: "carol".into(),
            password: "not the password".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let unknown_user = auth
        .begin_login(BeginLoginRequest {
            username: "nobody".into(),
            password: "not the password".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_password.code(), Code::Unauthenticated);
    assert_eq!(unknown_user.code(), Code::Unauthenticated);
    assert_eq!(wrong_password.message(), unknown_user.message());
    assert_eq!(count(&stack.db.open().await, "login_tickets").await, 0, "no ticket without the password");
}

async fn first_login_enrolls_by_qr_and_issues_a_verifiable_token(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let user_id = stack.register("dave", PASSWORD).await;
    let begun = stack.begin_login("dave", PASSWORD).await;
    let enrollment = begun.enrollment.expect("enrollment while unconfirmed");
    assert!(begun.ticket_expire_time.unwrap().seconds <= chrono::Utc::now().timestamp() + 5 * 60);

    // The QR code decodes to exactly the URI, and the URI carries the secret.
    let image = image::load_from_memory(&enrollment.qr_png).expect("a PNG").to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(image);
    let (_, decoded) = prepared.detect_grids()[0].decode().expect("a readable QR code");
    assert_eq!(decoded, enrollment.otpauth_uri);
    assert!(
        enrollment.otpauth_uri.starts_with("otpauth://totp/storegate:dave?"),
        "{}",
        enrollment.otpauth_uri
    );
    assert!(enrollment.otpauth_uri.contains(&format!("secret={}", enrollment.secret)));
    assert!(enrollment.otpauth_uri.contains("issuer=storegate"));
    assert_eq!(
        totp_rs::Secret::Encoded(enrollment.secret.clone()).to_bytes().unwrap().len(),
        20,
        "160-bit secret"
    );

    let tokens = stack
        .auth()
        .await
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&enrollment.secret, 0),
        })
        .await
        .expect("the current code is accepted")
        .into_inner();
    assert_eq!(tokens.token_type, "Bearer");
    assert_eq!(tokens.expires_in, ACCESS_TOKEN_TTL_SECS);
    assert!(!tokens.refresh_token.is_empty());

    // The token verifies against the published keys and says who logged in.
    let jwks_json = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let jwks: serde_json::Value = serde_json::from_str(&jwks_json).unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    assert_eq!(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap().len(), 32);
    assert!(key.get("d").is_none(), "no private part in the JWKS");

    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD.decode(tokens.access_token.split('.').next().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"], key["kid"]);

    let claims: Claims = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE)
        .verify(&KeySet::parse_jwks_json(&jwks_json).unwrap(), &tokens.access_token)
        .expect("token verifies");
    assert_eq!(claims.sub, user_id.to_string());
    assert_eq!(claims.iss, DEFAULT_ISSUER);
    assert_eq!(claims.aud, DEFAULT_AUDIENCE);
    assert_eq!(claims.exp - claims.iat, 15 * 60);
    assert!(claims.roles.is_empty());
    assert!(!claims.jti.is_empty());

    // Stored: the confirmation, and only the refresh token's hash.
    let db = stack.db.open().await;
    let confirmed: Option<chrono::DateTime<chrono::Utc>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT totp_confirmed_at FROM users WHERE id = ?").bind(user_id).fetch_one(pool).await
    })
    .unwrap();
    assert!(confirmed.is_some());
    let stored: Vec<Vec<u8>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT token_hash FROM refresh_tokens WHERE user_id = ?").bind(user_id).fetch_all(pool).await
    })
    .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], tokens.refresh_token.as_bytes());
    assert_eq!(count(&db, "login_tickets").await, 0, "the ticket is burned");
}

async fn enrollment_is_never_returned_after_confirmation(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let (_, _secret) = stack.register_and_login("erin", PASSWORD).await;
    let again = stack.begin_login("erin", PASSWORD).await;
    assert!(again.enrollment.is_none());
    assert!(!again.login_ticket.is_empty());
}

async fn a_wrong_code_is_refused_and_the_ticket_survives_it(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("frank", PASSWORD).await;
    let begun = stack.begin_login("frank", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    let mut auth = stack.auth().await;
    for code in [wrong_totp_code(&secret), "12345".into(), "abcdef".into(), String::new()] {
        let err = auth
            .complete_login(CompleteLoginRequest {
                login_ticket: begun.login_ticket.clone(),
                code: code.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{code:?}");
        assert!(!err.message().contains(&code) || code.is_empty());
    }
    let db = stack.db.open().await;
    let confirmed: Option<chrono::DateTime<chrono::Utc>> = on_db!(&db, pool => {
        sqlx::query_scalar("SELECT totp_confirmed_at FROM users WHERE username = 'frank'").fetch_one(pool).await
    })
    .unwrap();
    assert!(confirmed.is_none(), "a wrong code confirms nothing");
    auth.complete_login(CompleteLoginRequest {
        login_ticket: begun.login_ticket,
        code: totp_code(&secret, 0),
    })
    .await
    .expect("four wrong codes leave the ticket usable");
}

async fn a_ticket_works_once(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("grace", PASSWORD).await;
    let begun = stack.begin_login("grace", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    let mut auth = stack.auth().await;
    auth.complete_login(CompleteLoginRequest {
        login_ticket: begun.login_ticket.clone(),
        code: totp_code(&secret, 0),
    })
    .await
    .unwrap();
    let err = auth
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = auth
        .complete_login(CompleteLoginRequest { login_ticket: "made-up".into(), code: totp_code(&secret, 1) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn a_time_step_is_accepted_once_across_tickets(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let (_, secret) = stack.register_and_login("heidi", PASSWORD).await;
    // The step just used is spent, whichever ticket presents it.
    let code = totp_code(&secret, 0);
    let ticket = stack.begin_login("heidi", PASSWORD).await.login_ticket;
    let err = stack
        .auth()
        .await
        .complete_login(CompleteLoginRequest { login_ticket: ticket.clone(), code })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The next step's code (within the allowed drift) still works.
    stack
        .auth()
        .await
        .complete_login(CompleteLoginRequest { login_ticket: ticket, code: totp_code(&secret, 1) })
        .await
        .expect("a later step is accepted");
}

async fn five_wrong_codes_kill_the_ticket(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    stack.register("ivan", PASSWORD).await;
    let begun = stack.begin_login("ivan", PASSWORD).await;
    let secret = begun.enrollment.unwrap().secret;
    let mut auth = stack.auth().await;
    for _ in 0..5 {
        auth.complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket.clone(),
            code: wrong_totp_code(&secret),
        })
        .await
        .unwrap_err();
    }
    let err = auth
        .complete_login(CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: totp_code(&secret, 0),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "the right code on a dead ticket");
    // Dead, not yet deleted: it took its 5 codes (the sweeper deletes it at
    // expiry).
    let live: i64 = on_db!(&stack.db.open().await, pool => {
        sqlx::query_scalar("SELECT COUNT(*) FROM login_tickets WHERE failed_codes < 5").fetch_one(pool).await
    })
    .unwrap();
    assert_eq!(live, 0);
}

async fn granted_roles_appear_in_the_next_token(backend: Backend) {
    let stack = TestStack::start_auth(backend).await;
    let token = stack.admin_token("judy").await;
    let jwks_json = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let claims = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE)
        .verify(&KeySet::parse_jwks_json(&jwks_json).unwrap(), &token)
        .unwrap();
    assert_eq!(claims.roles, ["admin"]);
    assert_eq!(claims.preferred_username.as_deref(), Some("judy"));
    // Granting again is harmless, and an unknown user is an error.
    let config = TestStack::auth_config(&stack.db);
    auth_service::grant_role(&config, "judy", "admin").await.unwrap();
    assert!(auth_service::grant_role(&config, "nobody", "admin").await.is_err());
    let roles: Vec<String> = on_db!(&stack.db.open().await, pool => {
        sqlx::query_scalar("SELECT role FROM user_roles").fetch_all(pool).await
    })
    .unwrap();
    assert_eq!(roles, ["admin"]);
}
