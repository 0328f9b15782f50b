//! An operator withdraws a signing key that leaked: its tokens stop working
//! on product-service within one key refresh, cached verifications
//! included, and logins go on with a new key. Real servers, SQLite and MySQL.

use std::time::{Duration, Instant};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use storegate::pb::{auth::v1::GetJwksRequest, product::v1::GetProductRequest};
use storegate_testkit::{Backend, TestStack, backend_tests, bearer};
use tonic::Code;

backend_tests!(a_withdrawn_key_takes_its_tokens_with_it_within_one_refresh);

const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// What a GetProduct of a missing product says with `token`: NOT_FOUND
/// means the token was accepted.
async fn probe(stack: &TestStack, token: &str) -> Code {
    let mut products = stack.products().await;
    match products.get_product(bearer(GetProductRequest { id: 987_654 }, token)).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn kid_of(token: &str) -> String {
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

async fn a_withdrawn_key_takes_its_tokens_with_it_within_one_refresh(backend: Backend) {
    let mut stack = TestStack::start_auth(backend).await;
    stack.add_product(|config| config.jwks_refresh_interval_secs = REFRESH_INTERVAL.as_secs()).await;
    let (leaked, _) = stack.register_and_login("holder", "correct horse battery").await;
    let leaked_kid = kid_of(&leaked.access_token);
    // Verified once, so product-service remembers the verification.
    assert_eq!(probe(&stack, &leaked.access_token).await, Code::NotFound);
    assert_eq!(probe(&stack, &leaked.access_token).await, Code::NotFound);

    auth_service::revoke_key(&TestStack::auth_config(&stack.db), &leaked_kid).await.unwrap();
    let withdrawn = Instant::now();
    // auth-service serves its JWK Set from memory for up to 5 s; then
    // product-service drops the key at its next refresh, and with it every
    // verification it remembers. Never accepted again after that.
    let deadline = Duration::from_secs(5) + REFRESH_INTERVAL * 3;
    loop {
        let code = probe(&stack, &leaked.access_token).await;
        if code == Code::Unauthenticated {
            break;
        }
        assert_eq!(code, Code::NotFound);
        assert!(withdrawn.elapsed() < deadline, "still accepted after {:?}", withdrawn.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let jwks = stack.auth().await.get_jwks(GetJwksRequest {}).await.unwrap().into_inner().jwks_json;
    assert!(!jwks.contains(&leaked_kid), "the withdrawn key has left the JWK Set: {jwks}");
    for _ in 0..5 {
        assert_eq!(probe(&stack, &leaked.access_token).await, Code::Unauthenticated);
    }

    // Logins go on, signed by the key that took over (each auth-service
    // re-reads its signing key every 2 s).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (fresh, _) = stack.register_and_login("newcomer", "correct horse battery").await;
    assert_ne!(kid_of(&fresh.access_token), leaked_kid);
    assert_eq!(probe(&stack, &fresh.access_token).await, Code::NotFound);
}
