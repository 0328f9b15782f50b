//! `storegate up`: auth-service and product-service in one process.

use anyhow::Context as _;
use auth_service::AuthConfig;
use product_service::ProductConfig;
use tokio::sync::watch;

#[derive(clap::Args)]
pub struct UpArgs {
    /// auth-service's settings (database, master key, listen address, …).
    #[command(flatten)]
    auth: AuthConfig,

    /// Where product-service listens.
    #[arg(long, env = "PRODUCT_LISTEN_ADDR", default_value = product_service::config::DEFAULT_LISTEN_ADDR)]
    product_listen_addr: String,

    /// Where product-service's metrics are scraped; empty to turn them off.
    #[arg(long, default_value = product_service::config::DEFAULT_METRICS_ADDR)]
    product_metrics_listen_addr: String,
}

/// Both services in one process, sharing the database; product-service
/// fetches its keys from the auth-service beside it.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let shutdown = storegate::server::shutdown_signal();
    let _telemetry = storegate::telemetry::init(args.auth.common.log_format, "storegate");
    let auth_listener = storegate::server::bind(&args.auth.listen_addr).await?;
    let product_listener = storegate::server::bind(&args.product_listen_addr).await?;
    let auth_addr = auth_listener.local_addr()?;
    let product_addr = product_listener.local_addr()?;

    let mut product = ProductConfig::with_database_url(args.auth.common.expose_database_url());
    product.common = args.auth.common.clone();
    product.auth_service_url = format!("http://{auth_addr}");
    product.metrics_listen_addr = args.product_metrics_listen_addr.clone();

    // Migrate once up front: the services then start on a current schema
    // (they could migrate side by side, safely, but this logs it once).
    args.auth.common.migrate_database().await?;

    let (stop, _) = watch::channel(false);
    let stopped = |stop: &watch::Sender<bool>| {
        let mut rx = stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut auth_task = tokio::spawn(auth_service::run(args.auth, auth_listener, stopped(&stop)));
    let mut product_task = tokio::spawn(product_service::run(product, product_listener, stopped(&stop)));

    // "Up" once both answer: a script that waits for the banner may call
    // at once.
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        () = wait_serving(auth_addr, product_addr) => announce(&format!(
            "storegate is up:\n  \
             auth-service     http://{auth_addr}   (storegate.auth.v1.AuthService)\n  \
             product-service  http://{product_addr}   (storegate.product.v1.ProductService)\n\
             Press Ctrl-C to stop.\n"
        )),
        () = &mut shutdown => {}
        result = &mut auth_task => return finished("auth-service", result),
        result = &mut product_task => return finished("product-service", result),
    }

    tokio::select! {
        () = shutdown => {}
        result = &mut auth_task => return finished("auth-service", result),
        result = &mut product_task => return finished("product-service", result),
    }
    // Let both finish their in-flight calls.
    stop.send_replace(true);
    let (auth, product) = tokio::join!(auth_task, product_task);
    auth.context("auth-service crashed")??;
    product.context("product-service crashed")??;
    Ok(())
}

/// Completes once both servers' health checks say SERVING.
async fn wait_serving(auth: std::net::SocketAddr, product: std::net::SocketAddr) {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    for addr in [auth, product] {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else { return };
        loop {
            let serving = match endpoint.connect().await {
                Ok(channel) => HealthClient::new(channel)
                    .check(HealthCheckRequest { service: String::new() })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32),
                Err(_) => false,
            };
            if serving {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Writes the banner to stdout. A reader that has gone away (`storegate up |
/// head -3`, a supervisor that closed the pipe) must not stop the services,
/// so write errors are logged (to stderr), not raised (`println!` would
/// panic).
fn announce(banner: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(banner.as_bytes()).and_then(|()| stdout.flush()) {
        tracing::warn!(error = %e, "cannot write the banner to stdout; serving anyway");
    }
}

fn finished(name: &str, result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.with_context(|| format!("{name} crashed"))?.with_context(|| format!("{name} stopped"))?;
    anyhow::bail!("{name} stopped unexpectedly")
}
