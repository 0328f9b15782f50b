//! Per-operation costs of the hot paths, timed in a loop: JWT verification
//! (new token, and a token the interceptor has already seen), TOTP
//! verification, price parsing.

use std::{hint::black_box, time::Instant};

use product_service::{
    auth::JwtAuth,
    domain::Price,
    keys::{JwksCache, KeySource},
};
use storegate::{
    pb::auth::v1::{GetJwksRequest, auth_service_client::AuthServiceClient},
    token::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, KeySet, TokenVerifier},
};
use tonic::service::Interceptor as _;

use crate::scenarios::Bench;

pub struct Micro {
    rows: Vec<(&'static str, f64)>,
}

fn per_op(iterations: u32, mut op: impl FnMut()) -> f64 {
    op(); // warm-up
    let started = Instant::now();
    for _ in 0..iterations {
        op();
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
}

pub async fn run(bench: &Bench) -> Micro {
    eprint!("  micro      JWT, TOTP, price … ");
    let jwks = AuthServiceClient::new(bench.auth_channel())
        .get_jwks(GetJwksRequest {})
        .await
        .expect("GetJwks")
        .into_inner()
        .jwks_json;
    let keys = KeySet::parse_jwks_json(&jwks).expect("JWKS");
    let verifier = TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE);
    let token = bench.token.clone();
    let jwt_verify = per_op(2_000, || {
        black_box(verifier.verify(&keys, black_box(&token)).expect("valid token"));
    });

    let cache = JwksCache::default();
    let source = KeySource::auth(&format!("http://{}", bench.stack.auth_addr)).expect("auth URL");
    let refresher = tokio::spawn(cache.clone().keep_fresh(source, std::time::Duration::from_secs(300)));
    cache.wait_loaded(std::time::Duration::from_secs(5)).await;
    let mut interceptor = JwtAuth::new(cache, TokenVerifier::new(DEFAULT_ISSUER, DEFAULT_AUDIENCE));
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().expect("header");
    let jwt_cached = per_op(20_000, || {
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("authorization", header.clone());
        black_box(interceptor.call(request).expect("admitted"));
    });
    refresher.abort();

    let secret = [7u8; 20];
    let step = auth_service::totp::step_at(1_700_000_000);
    let code = auth_service::totp::code_at_step(&secret, step).expect("code");
    let totp = per_op(20_000, || {
        black_box(auth_service::totp::matching_step(&secret, black_box(&code), step, None));
    });
    let price = per_op(200_000, || {
        black_box(Price::parse(black_box("12345.67")).expect("price"));
    });
    eprintln!("done");
    Micro {
        rows: vec![
            ("JWT verify, new token (µs)", jwt_verify),
            ("interceptor, token seen before (µs)", jwt_cached),
            ("TOTP verify, ±1 step (µs)", totp),
            ("price parse (µs)", price),
        ],
    }
}

impl Micro {
    pub fn summary(&self) -> String {
        self.rows.iter().map(|(name, us)| format!("{name}: {us:.2}")).collect::<Vec<_>>().join("\n")
    }

    pub fn json(&self) -> serde_json::Value {
        self.rows
            .iter()
            .map(|(name, us)| (name.to_string(), serde_json::json!((us * 100.0).round() / 100.0)))
            .collect()
    }
}
