//! Criterion micro-benchmarks of the per-call hot paths, one operation each:
//!
//! - `jwt/verify_new_token`: a full Ed25519 signature and claims check, what
//!   the first call with a token pays (and every call after a key change).
//! - `jwt/interceptor_cached`: the ProductService interceptor on a token it
//!   has already verified, the floor every later call pays.
//! - `totp/verify_window`: a TOTP check across the ±1 step drift window, what
//!   each second-factor attempt costs the auth service.
//! - `price/parse`: parsing a decimal price, done on every product write.
//!
//! Nothing here needs the network or the stack: the token is signed in
//! process with a fixed key, and the interceptor's key cache loads the
//! matching JWK Set from a file.
//!
//!     cargo bench -p storegate-bench --bench hot_paths

use std::{hint::black_box, time::Duration};

use auth_service::{crypto::random_token, totp};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use product_service::{
    auth::JwtAuth,
    domain::Price,
    keys::{JwksCache, KeySource},
};
use storegate::token::{
    ACCESS_TOKEN_TYPE, Claims, DEFAULT_AUDIENCE, DEFAULT_ISSUER, Jwks, KeySet, PublicJwk, TokenVerifier,
};
use tonic::{Request, metadata::MetadataValue, service::Interceptor as _};

/// An access token shaped like the ones auth-service issues, and the JWK Set
/// that verifies it.
fn signed_token() -> (String, Jwks) {
    // A fixed key: the cost of verifying does not depend on which key it is.
    let key = SigningKey::from_bytes(&[7; 32]);
    // Random like auth-service's jti, and as long as its RFC 7638 kid, so the
    // token is the size of a real one.
    let kid = random_token();
    let now = chrono::Utc::now().timestamp();
    let claims = Claims {
        iss: DEFAULT_ISSUER.into(),
        sub: "42".into(),
        aud: DEFAULT_AUDIENCE.into(),
        // Longer than a real token lives, so that a run with a long
        // --measurement-time never measures the refusal of an expired one.
        exp: now + 3600,
        iat: now,
        nbf: Some(now),
        jti: random_token(),
        roles: vec!["admin".into()],
        preferred_username: Some("bench-user".into()),
        client_id: None,
        azp: None,
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(ACCESS_TOKEN_TYPE.into());
    header.kid = Some(kid.clone());
    let der = key.to_pkcs8_der().expect("PKCS#8 encoding of the key");
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(der.as_bytes()))
        .expect("signing the token");
    let jwks = Jwks { keys: vec![PublicJwk::ed25519(&kid, &key.verifying_key().to_bytes())] };
    (token, jwks)
}

/// An interceptor whose key cache holds `jwks`. The cache fills only through
/// its refresher, so it reads the set from a file on a runtime that is
/// dropped once the keys are in: no refresh can swap the key set, and so
/// empty the interceptor's verified tokens, while it is measured.
fn loaded_interceptor(jwks: &Jwks) -> JwtAuth {
    let file = std::env::temp_dir().join(format!("storegate-bench-jwks-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec(jwks).expect("JWKS as JSON")).expect("writing the JWKS file");
    let cache = JwksCache::default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let loaded = runtime.block_on(async {
        tokio::spawn(cache.clone().keep_fresh(KeySource::File(file.clone()), Duration::from_secs(3600)));
        cache.wait_loaded(Duration::from_secs(5)).await
    });
    drop(runtime);
    let _ = std::fs::remove_file(&file);
    assert!(loaded, "the key cache did not load {}", file.display());
    JwtAuth::new(cache, TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE))
}

fn jwt(c: &mut Criterion) {
    let (token, jwks) = signed_token();
    let mut group = c.benchmark_group("jwt");

    let keys = KeySet::from_jwks(&jwks);
    let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
    group.bench_function("verify_new_token", |b| {
        b.iter(|| verifier.verify(&keys, black_box(&token)).expect("valid token"))
    });

    let mut interceptor = loaded_interceptor(&jwks);
    let bearer: MetadataValue<_> = format!("Bearer {token}").parse().expect("header value");
    let request = || {
        let mut request = Request::new(());
        request.metadata_mut().insert("authorization", bearer.clone());
        request
    };
    // This call verifies the token and remembers it; the measured ones find
    // it remembered.
    interceptor.call(request()).expect("admitted");
    // Building the request is the transport's cost, not the interceptor's,
    // so it stays outside the timing.
    group.bench_function("interceptor_cached", |b| {
        b.iter_batched(request, |r| interceptor.call(r).expect("admitted"), BatchSize::SmallInput)
    });
    group.finish();
}

fn totp(c: &mut Criterion) {
    let secret = [7; totp::SECRET_LEN];
    let now = totp::step_at(1_700_000_000);
    // The next step's code: the window is tried oldest step first, so this
    // computes all three codes, as a wrong guess does, and is still accepted.
    let code = totp::code_at_step(&secret, now + 1).expect("TOTP code");
    assert_eq!(totp::matching_step(&secret, &code, now, None), Some(now + 1));
    c.benchmark_group("totp").bench_function("verify_window", |b| {
        b.iter(|| totp::matching_step(&secret, black_box(&code), black_box(now), None))
    });
}

fn price(c: &mut Criterion) {
    c.benchmark_group("price")
        .bench_function("parse", |b| b.iter(|| Price::parse(black_box("12345.67")).expect("valid price")));
}

/// Short runs: each operation takes microseconds at most, so a second of
/// warm-up and two of measurement give tight estimates, and the whole file
/// runs in well under a minute on a two-core machine.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = jwt, totp, price
}
criterion_main!(hot_paths);
