//! product-service: the product catalogue, every call authenticated by an
//! access token from auth-service. `main.rs` only parses flags and calls
//! [`run`].

pub mod auth;
pub mod config;
pub mod domain;
pub mod import;
pub mod jwks_url;
pub mod keys;
pub mod page_token;
pub mod plan;
pub mod search;
pub mod search_limit;
pub mod search_sample;
pub mod service;
pub mod store;

use std::{future::Future, time::Duration};

use storegate::{
    db_health::DbHealth,
    pb::product::v1::product_service_server::ProductServiceServer,
    server::{Gate, Started},
    token::TokenVerifier,
};
use tokio::net::TcpListener;

pub use config::ProductConfig;
use keys::{JwksCache, KeySource};
use search_sample::SearchBounds;

/// Largest request accepted: a product with a 5000-character description
/// fits many times over.
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Serves ProductService (with health, reflection and gRPC-Web) on
/// `listener` until `shutdown` completes. The port answers at once; health
/// says SERVING once the database, its schema and the token keys are there.
pub async fn run(
    config: ProductConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = storegate::metrics::Metrics::new("product-service");
    let api = Gate::default();
    let (mut routes, health) = storegate::server::base_routes(storegate::pb::PRODUCT_FILE_DESCRIPTOR_SET)?;
    routes.add_service(api.clone());
    tracing::info!(addr = %listener.local_addr()?, "product-service listening; starting");
    let start = async {
        let source = match (&config.jwks_file, &config.jwks_url) {
            (Some(path), _) => KeySource::File(path.clone()),
            (None, Some(url)) => KeySource::Url(jwks_url::JwksUrl::new(url, &config.auth_service_tls())?),
            (None, None) => KeySource::auth(&config.auth_service_url, &config.auth_service_tls())?,
        };
        let db = config.common.open_database().await?;
        // What can fail first, so that a failed start leaves no task behind.
        let mut background: Vec<_> =
            storegate::server::spawn_metrics(&metrics, &config.metrics_listen_addr, db.clone())
                .await?
                .into_iter()
                .collect();
        let db_health = DbHealth::watch(&db);
        let keys = JwksCache::default();
        background.push(tokio::spawn(
            keys.clone().keep_fresh(source, Duration::from_secs(config.jwks_refresh_interval_secs.max(1))),
        ));
        // One store for the API and the sweeper: one set of read connections.
        let read_connections =
            config.db_read_connections.map_or_else(store::default_read_connections, usize::from);
        let store = store::ProductStore::with_read_connections(db.clone(), read_connections)
            .await
            .with_search_bounds(SearchBounds::for_index_matches(config.search_index_max_matches));
        metrics.register(
            "product_searches",
            "Searches answered, by path: index (the full-text engine, the page and the count apart), \
             few (relevance over every match's id in one statement), broad (common words, \
             matched over a bounded read of the catalogue) or anchored (a rare word looked up \
             alone, the others matched)",
            store.search_counts(),
        );
        store.register_read_metrics(&metrics);
        background.push(tokio::spawn(sweep_request_ids(store.clone())));
        let pool_size = storegate::on_db!(&db, pool => pool.options().get_max_connections()) as usize;
        let search_limit = search_limit::SearchLimit::new(
            usize::from(config.search_concurrency_per_caller),
            config.search_concurrency.map_or(pool_size / 2, usize::from),
            Duration::from_millis(config.search_wait_ms),
        );
        let limits = &config.common.limits;
        let verifier = TokenVerifier::new(&config.common.jwt_issuer, &config.common.jwt_audience)
            .with_max_lifetime(config.jwt_max_lifetime_secs);
        api.open(
            auth::AwaitNewKeys::new(
                tonic::service::interceptor::InterceptedService::new(
                    ProductServiceServer::new(service::ProductApi::new(store, search_limit))
                        .max_decoding_message_size(limits.max_request_bytes.unwrap_or(MAX_REQUEST_BYTES))
                        .max_encoding_message_size(limits.max_response_bytes),
                    auth::JwtAuth::new(keys.clone(), verifier),
                ),
                keys.clone(),
            ),
            db_health.clone(),
        );
        tracing::info!("product-service started; serving once the token keys are in");
        let also_ready: Box<dyn Fn() -> bool + Send + Sync> = Box::new(move || keys.is_loaded());
        Ok(Started { db, db_health, also_ready: Some(also_ready), background })
    };
    let name = <ProductServiceServer<service::ProductApi> as tonic::server::NamedService>::NAME;
    storegate::server::serve(
        routes,
        health,
        name,
        &metrics,
        listener,
        &config.common,
        start,
        shutdown,
        storegate::server::HttpRoutes::default(),
    )
    .await
}

/// Counts the products afresh (`product-service recount-products`), after
/// writes that did not keep the count: replicas of a version before it
/// during a rolling upgrade, or SQL run by hand.
pub async fn recount_products(config: &ProductConfig) -> anyhow::Result<()> {
    let db = config.common.open_database().await?;
    let products = store::ProductStore::new(db.clone()).await.recount().await?;
    tracing::info!(products, "counted the products");
    db.close().await;
    Ok(())
}

/// Imports products in bulk from a JSON-lines file (`product-service
/// import`, see [`import`]).
pub async fn import_products(config: &ProductConfig, file: &std::path::Path) -> anyhow::Result<()> {
    let db = config.common.open_database().await?;
    let imported = import::run(&store::ProductStore::pool_only(db.clone()), file).await;
    db.close().await;
    let products = imported?;
    tracing::info!(products, "import finished");
    Ok(())
}

/// Prints every listing's plan (`product-service check-plans`); fails if
/// one is not bounded by its page or its matches.
pub async fn check_plans(config: &ProductConfig) -> anyhow::Result<()> {
    let db = config.common.open_database().await?;
    let checks = plan::check_all(&store::ProductStore::pool_only(db.clone())).await;
    db.close().await;
    let mut unbounded = 0;
    for check in checks? {
        let verdict = if check.bounded { "ok" } else { "SCANS" };
        println!("{verdict:5} {}", check.listing);
        for step in &check.plan.steps {
            println!("        {step}");
        }
        unbounded += usize::from(!check.bounded);
    }
    anyhow::ensure!(unbounded == 0, "{unbounded} listing(s) sort instead of reading an index in order");
    Ok(())
}

/// Request ids are kept at least a day (AIP-155 asks for "a reasonable
/// time"); older ones are deleted now and then.
async fn sweep_request_ids(store: store::ProductStore) {
    let mut interval = tokio::time::interval(Duration::from_secs(600));
    loop {
        interval.tick().await;
        let before = storegate::db::now() - chrono::Duration::days(2);
        if let Err(e) = store.sweep_request_ids(before).await {
            tracing::warn!(error = %e, "sweeping old request ids failed");
        }
    }
}
