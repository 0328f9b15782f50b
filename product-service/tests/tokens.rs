//! The token lifecycle across both services: refresh rotation, logout, key
//! rotation, key distribution, role changes, and every way a forged or
//! misused token must fail. Real servers, SQLite and MySQL.

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use storegate::{
    on_db,
    pb::{
        auth::v1::{GetJwksRequest, LogoutRequest, RefreshTokenRequest},
        product::v1::{CreateProductRequest, GetProductRequest, Product},
    },
    token::{Claims, DEFAULT_AUDIENCE, DEFAULT_ISSUER},
};
use storegate_testkit::{Backend, TestStack, backend_tests, bearer};
use tonic::Code;

backend_tests!(
    refresh_rotates_and_a_reused_token_revokes_its_login,
    logout_revokes_the_whole_login,
    rotated_keys_are_used_after_publication_and_old_tokens_keep_working,
    product_service_keeps_verifying_while_auth_is_down,
    keys_can_come_from_a_jwks_file,
    forged_and_misused_tokens_are_unauthenticated,
    a_revoked_role_leaves_with_the_next_token,
);

/// What a GetProduct of a missing product says with `token`: NOT_FOUND
/// means the token was accepted.
async fn probe(stack: &TestStack, token: &str) -> Code {
    let mut products = stack.products().await;
    match products.get_product(bearer(GetProductRequest { id: 987_654 }, token)).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn refresh(stack: &TestStack, token: &str) -> Result<(String, String), Code> {
    let mut auth = stack.auth().await;
    auth.refresh_token(RefreshTokenRequest { refresh_token: token.into() })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.access_token, r.refresh_token)
        })
        .map_err(|e| e.code())
}

fn kid_of(token: &str) -> String {
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

fn claims(sub: &str) -> Claims {
    let now = chrono::Utc::now().timestamp();
    Claims {
        iss: DEFAULT_ISSUER.into(),
        sub: sub.into(),
        aud: DEFAULT_AUDIENCE.into(),
        exp: now + 900,
        iat: now,
        nbf: Some(now),
        jti: "test-jti".into(),
        roles: vec!["admin".into()],
        preferred_username: None,
        client_id: None,
        azp: None,
    }
}

fn at_jwt_header() -> Header {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some("at+jwt".into());
    header
}

async fn refresh_rotates_and_a_reused_token_revokes_its_login(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let (first, _) = stack.register_and_login("rotator", "correct horse battery").await;
    assert_eq!(URL_SAFE_NO_PAD.decode(&first.refresh_token).unwrap().len(), 32, "256 random bits");

    let (access, second) = refresh(&stack, &first.refresh_token).await.unwrap();
    assert_ne!(second, first.refresh_token);
    assert_ne!(access, first.access_token);
    assert_eq!(probe(&stack, &access).await, Code::NotFound, "the new access token works");

    let (_, third) = refresh(&stack, &second).await.unwrap();
    // The first token was rotated: presenting it again is theft.
    assert_eq!(refresh(&stack, &first.refresh_token).await.unwrap_err(), Code::Unauthenticated);
    assert_eq!(
        refresh(&stack, &third).await.unwrap_err(),
        Code::Unauthenticated,
        "the whole family is revoked"
    );

    let db = stack.db.open().await;
    let (total, revoked, expiry): (i64, i64, chrono::DateTime<chrono::Utc>) = on_db!(&db, pool => {
        sqlx::query_as(
            "SELECT COUNT(*), COUNT(revoked_at), MAX(expires_at) FROM refresh_tokens",
        )
        .fetch_one(pool)
        .await
    })
    .unwrap();
    assert_eq!((total, revoked), (3, 3));
    let days = (expiry - chrono::Utc::now()).num_hours() as f64 / 24.0;
    assert!((29.9..=30.0).contains(&days), "30-day lifetime, got {days}");
    assert_eq!(refresh(&stack, "made-up-token").await.unwrap_err(), Code::Unauthenticated);
}

async fn logout_revokes_the_whole_login(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let (tokens, _) = stack.register_and_login("leaver", "correct horse battery").await;
    let (_, rotated) = refresh(&stack, &tokens.refresh_token).await.unwrap();
    let mut auth = stack.auth().await;
    auth.logout(LogoutRequest { refresh_token: tokens.refresh_token.clone() }).await.unwrap();
    assert_eq!(refresh(&stack, &rotated).await.unwrap_err(), Code::Unauthenticated);
    // Logging out twice, or with nonsense, is not an error.
    auth.logout(LogoutRequest { refresh_token: rotated }).await.unwrap();
    auth.logout(LogoutRequest { refresh_token: "nonsense".into() }).await.unwrap();
}

async fn rotated_keys_are_used_after_publication_and_old_tokens_keep_working(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let (tokens, _) = stack.register_and_login("keeper", "correct horse battery").await;
    let old_kid = kid_of(&tokens.access_token);
    // product-service has the old key set cached.
    assert_eq!(probe(&stack, &tokens.access_token).await, Code::NotFound);

    let config = TestStack::auth_config(&stack.db);
    let activate_after = Duration::from_secs(6);
    let new_kid = auth_service::rotate_keys(&config, activate_after).await.unwrap();
    assert_ne!(new_kid, old_kid);

    // Published before it signs anything.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let jwks = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let (_, refresh_token) = refresh(&stack, &tokens.refresh_token).await.unwrap();
    assert!(jwks.contains(&new_kid) && jwks.contains(&old_kid), "{jwks}");

    // Once active, new tokens carry the new kid.
    let mut latest = refresh_token;
    let mut new_access = String::new();
    for _ in 0..40 {
        let (access, next) = refresh(&stack, &latest).await.unwrap();
        latest = next;
        if kid_of(&access) == new_kid {
            new_access = access;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(kid_of(&new_access), new_kid, "signing moved to the new key");
    // product-service learns the new kid on first sight, without a restart,
    // and still accepts tokens of the retired key.
    assert_eq!(probe(&stack, &new_access).await, Code::NotFound);
    assert_eq!(probe(&stack, &tokens.access_token).await, Code::NotFound);

    // A retired key is dropped once its tokens have expired.
    let db = stack.db.open().await;
    let long_ago = chrono::Utc::now() - chrono::Duration::minutes(20);
    on_db!(&db, pool => {
        sqlx::query("UPDATE signing_keys SET retired_at = ? WHERE kid = ?").bind(long_ago).bind(&old_kid).execute(pool).await.map(drop)
    })
    .unwrap();
    let state = auth_service::open_state(&config).await.unwrap();
    let published = state.keys.jwks().await.unwrap();
    let kids: Vec<_> = published.keys.iter().map(|k| k.kid.as_str()).collect();
    assert_eq!(kids, [new_kid.as_str()]);
}

async fn product_service_keeps_verifying_while_auth_is_down(backend: Backend) {
    let mut stack = TestStack::start(backend).await;
    let token = stack.admin_token("steady").await;
    stack.stop_auth().await;
    let mut products = stack.products().await;
    let created = products
        .create_product(bearer(
            CreateProductRequest {
                product: Some(Product {
                    name: "Lamp".into(),
                    price: "12.00".into(),
                    stock: 2,
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            &token,
        ))
        .await
        .expect("cached keys still verify");
    assert_eq!(created.into_inner().name, "Lamp");
}

async fn keys_can_come_from_a_jwks_file(backend: Backend) {
    let mut stack = TestStack::start_auth(backend).await;
    let jwks = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let file = std::env::temp_dir()
        .join(format!("storegate-jwks-{}.json", std::process::id() as u64 * 1000 + rand_suffix()));
    std::fs::write(&file, jwks).unwrap();
    stack
        .add_product(|config| {
            config.jwks_file = Some(file.clone());
            config.auth_service_url = "http://127.0.0.1:9".into(); // never used
        })
        .await;
    let (tokens, _) = stack.register_and_login("filed", "correct horse battery").await;
    assert_eq!(probe(&stack, &tokens.access_token).await, Code::NotFound);
    std::fs::remove_file(file).unwrap();
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 % 1000
}

async fn forged_and_misused_tokens_are_unauthenticated(backend: Backend) {
    let stack = TestStack::start(backend).await;
    let (tokens, _) = stack.register_and_login("target", "correct horse battery").await;
    let ticket = stack.begin_login("target", "correct horse battery").await.login_ticket;
    let state = auth_service::open_state(&TestStack::auth_config(&stack.db)).await.unwrap();
    let sign = |header: Header, payload: serde_json::Value| {
        let keys = state.keys.clone();
        async move { keys.sign_with(header, &payload).await.unwrap() }
    };
    let valid = serde_json::to_value(claims("1")).unwrap();
    let with = |field: &str, value: serde_json::Value| {
        let mut payload = valid.clone();
        payload[field] = value;
        payload
    };
    let without = |field: &str| {
        let mut payload = valid.clone();
        payload.as_object_mut().unwrap().remove(field);
        payload
    };
    let now = chrono::Utc::now().timestamp();

    // Controls: the real key with the right claims passes, also 30 s past exp (leeway).
    assert_eq!(probe(&stack, &sign(at_jwt_header(), valid.clone()).await).await, Code::NotFound);
    let in_leeway = sign(at_jwt_header(), with("exp", (now - 30).into())).await;
    assert_eq!(probe(&stack, &in_leeway).await, Code::NotFound);

    // Forgeries.
    let kid = kid_of(&tokens.access_token);
    let jwks = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    let x: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let x = x["keys"][0]["x"].as_str().unwrap().to_owned();
    let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none =
        format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "at+jwt", "kid": kid})), b64(&valid));
    let hs256 = |secret: Vec<u8>| {
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("at+jwt".into());
        header.kid = Some(kid.clone());
        jsonwebtoken::encode(&header, &valid, &EncodingKey::from_secret(&secret)).unwrap()
    };
    let attacker = {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        (EncodingKey::from_ed_der(key.to_pkcs8_der().unwrap().as_bytes()), key.verifying_key().to_bytes())
    };
    let attacker_signed = |kid: Option<&str>, customise: &dyn Fn(&mut Header)| {
        let mut header = at_jwt_header();
        header.kid = kid.map(str::to_owned);
        customise(&mut header);
        jsonwebtoken::encode(&header, &valid, &attacker.0).unwrap()
    };
    let attacker_jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(attacker.1), "kid": "attacker"
    }))
    .unwrap();
    let real = sign(at_jwt_header(), valid.clone()).await;
    let other = sign(at_jwt_header(), with("jti", "other".into())).await;
    let swapped_signature =
        format!("{}.{}", real.rsplit_once('.').unwrap().0, other.rsplit_once('.').unwrap().1);
    let tampered = {
        let parts: Vec<&str> = real.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(&with("sub", "2".into())), parts[2])
    };
    let mut typ_jwt = at_jwt_header();
    typ_jwt.typ = Some("JWT".into());
    let mut no_typ = at_jwt_header();
    no_typ.typ = None;

    let cases: Vec<(&str, String)> = vec![
        ("alg none", alg_none),
        ("HS256 with the public key bytes", hs256(URL_SAFE_NO_PAD.decode(&x).unwrap())),
        ("HS256 with the public key text", hs256(x.clone().into_bytes())),
        ("tampered payload", tampered),
        ("signature of another token", swapped_signature),
        ("unknown kid", attacker_signed(Some("no-such-key"), &|_| {})),
        ("the real kid, another key", attacker_signed(Some(&kid), &|_| {})),
        ("kid with path and SQL junk", attacker_signed(Some("../../etc/passwd' OR '1'='1"), &|_| {})),
        ("no kid", attacker_signed(None, &|_| {})),
        ("embedded jwk", attacker_signed(Some("attacker"), &|h| h.jwk = Some(attacker_jwk.clone()))),
        ("jku", attacker_signed(Some("attacker"), &|h| h.jku = Some("http://127.0.0.1:9/jwks.json".into()))),
        ("x5u", attacker_signed(Some("attacker"), &|h| h.x5u = Some("http://127.0.0.1:9/cert.pem".into()))),
        ("typ JWT", sign(typ_jwt, valid.clone()).await),
        ("no typ", sign(no_typ, valid.clone()).await),
        ("wrong iss", sign(at_jwt_header(), with("iss", "https://evil.example".into())).await),
        ("wrong aud", sign(at_jwt_header(), with("aud", "another-api".into())).await),
        ("expired beyond leeway", sign(at_jwt_header(), with("exp", (now - 61).into())).await),
        ("nbf in the future", sign(at_jwt_header(), with("nbf", (now + 300).into())).await),
        ("no exp", sign(at_jwt_header(), without("exp")).await),
        ("no sub", sign(at_jwt_header(), without("sub")).await),
        ("a login ticket", ticket),
        ("a refresh token", tokens.refresh_token.clone()),
        ("empty", String::new()),
    ];
    for (what, token) in &cases {
        assert_eq!(probe(&stack, token).await, Code::Unauthenticated, "{what}");
    }

    // The right token in the wrong metadata form.
    let mut products = stack.products().await;
    for value in [tokens.access_token.clone(), format!("Basic {}", tokens.access_token), "Bearer".into()] {
        let mut request = tonic::Request::new(GetProductRequest { id: 1 });
        request.metadata_mut().insert("authorization", value.parse().unwrap());
        assert_eq!(products.get_product(request).await.unwrap_err().code(), Code::Unauthenticated, "{value}");
    }
    assert_eq!(probe(&stack, &tokens.access_token).await, Code::NotFound, "and the real one works");
}

async fn a_revoked_role_leaves_with_the_next_token(backend: Backend) {
    let stack = TestStack::start(backend).await;
    stack.register("demoted", "correct horse battery").await;
    let config = TestStack::auth_config(&stack.db);
    auth_service::grant_role(&config, "demoted", "admin").await.unwrap();
    let begun = stack.begin_login("demoted", "correct horse battery").await;
    let enrolled_secret = begun.enrollment.unwrap().secret;
    let code = storegate_testkit::totp_code(&enrolled_secret, 0);
    let tokens = stack
        .auth()
        .await
        .complete_login(storegate::pb::auth::v1::CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code,
        })
        .await
        .unwrap()
        .into_inner();
    let create = |token: String| {
        let stack = &stack;
        async move {
            stack
                .products()
                .await
                .create_product(bearer(
                    CreateProductRequest {
                        product: Some(Product {
                            name: "Chair".into(),
                            price: "40".into(),
                            stock: 1,
                            ..Default::default()
                        }),
                        request_id: String::new(),
                    },
                    &token,
                ))
                .await
                .map(drop)
                .map_err(|e| e.code())
        }
    };
    create(tokens.access_token.clone()).await.expect("admin may write");

    auth_service::revoke_role(&config, "demoted", "admin").await.unwrap();
    // The change ends the user's sessions, so no refresh mints the role again...
    assert_eq!(refresh(&stack, &tokens.refresh_token).await.unwrap_err(), Code::Unauthenticated);
    // ...and the next login's token goes without it.
    let begun = stack.begin_login("demoted", "correct horse battery").await;
    let next_access = stack
        .auth()
        .await
        .complete_login(storegate::pb::auth::v1::CompleteLoginRequest {
            login_ticket: begun.login_ticket,
            code: storegate_testkit::totp_code(&enrolled_secret, 1),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_eq!(create(next_access.clone()).await.unwrap_err(), Code::PermissionDenied);
    assert_eq!(probe(&stack, &next_access).await, Code::NotFound, "reading still works");
    // The token issued before the change keeps its role until it expires (documented).
    create(tokens.access_token).await.expect("old token within its 15 minutes");
}
