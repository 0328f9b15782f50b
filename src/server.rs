//! What every storegate server has besides its own service: health checks,
//! server reflection (v1 and v1alpha), gRPC-Web with CORS, and graceful
//! shutdown on a signal.

use std::{future::Future, time::Duration};

use http::{HeaderName, HeaderValue, Method};
use tokio::net::TcpListener;
use tonic::{
    service::{Routes, RoutesBuilder},
    transport::server::TcpIncoming,
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{Db, config::CommonConfig, metrics::Metrics, pb::FILE_DESCRIPTOR_SET};

/// The routes every server starts from: health and reflection. The caller
/// adds its own service and hands the reporter to [`serve`].
pub fn base_routes() -> anyhow::Result<(RoutesBuilder, HealthReporter)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut routes = Routes::builder();
    routes.add_service(health).add_service(reflection_v1).add_service(reflection_v1alpha);
    Ok((routes, reporter))
}

/// The CORS policy for gRPC-Web callers: only the configured origins (none
/// by default), only POST, and the headers gRPC-Web needs.
fn cors_layer(allowed_origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = allowed_origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty() && *o != "*")
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let allow_origin = if allowed_origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins)
    };
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers([
            header("content-type"),
            header("authorization"),
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
        ])
        .expose_headers([header("grpc-status"), header("grpc-message"), header("grpc-status-details-bin")])
        .max_age(std::time::Duration::from_secs(24 * 60 * 60))
}

/// How a server reports itself on `grpc.health.v1.Health`: the overall
/// status ("") and its own service's, following the database.
pub struct Readiness {
    pub reporter: HealthReporter,
    /// The fully qualified gRPC service name, e.g. `storegate.auth.v1.AuthService`.
    pub service: &'static str,
    pub db: Db,
}

const READINESS_INTERVAL: Duration = Duration::from_secs(5);
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness {
    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }

    /// SERVING while the database answers, NOT_SERVING while it does not:
    /// a load balancer then sends calls to replicas that can do them.
    async fn follow_database(&self) {
        let mut last = None;
        let mut interval = tokio::time::interval(READINESS_INTERVAL);
        loop {
            interval.tick().await;
            let reachable =
                tokio::time::timeout(DB_PING_TIMEOUT, self.db.ping()).await.is_ok_and(|r| r.is_ok());
            let status = if reachable { ServingStatus::Serving } else { ServingStatus::NotServing };
            if last != Some(status) {
                if !reachable {
                    tracing::warn!("the database does not answer; reporting NOT_SERVING");
                } else if last.is_some() {
                    tracing::info!("the database answers again; reporting SERVING");
                }
                self.set(status).await;
                last = Some(status);
            }
        }
    }
}

/// Serves `routes` on `listener` (gRPC over HTTP/2, gRPC-Web over HTTP/1.1)
/// until `shutdown` completes. Then health turns NOT_SERVING first, the
/// server keeps serving for `shutdown_grace` (so load balancers stop sending
/// calls), stops accepting, and lets in-flight calls finish.
pub async fn serve(
    routes: RoutesBuilder,
    readiness: Readiness,
    metrics: &Metrics,
    listener: TcpListener,
    config: &CommonConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let readiness = std::sync::Arc::new(readiness);
    let follower = tokio::spawn({
        let readiness = readiness.clone();
        async move { readiness.follow_database().await }
    });
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let draining = async move {
        shutdown.await;
        // Wait until the follower is gone: a SERVING it is still writing
        // must not land after the NOT_SERVING below.
        follower.abort();
        let _ = follower.await;
        readiness.set(ServingStatus::NotServing).await;
        tracing::info!(grace = ?grace, "reporting NOT_SERVING; draining");
        tokio::time::sleep(grace).await;
    };
    tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(cors_layer(&config.cors_allowed_origins))
        .layer(tonic_web::GrpcWebLayer::new())
        // Innermost: sees gRPC-Web calls already translated to gRPC.
        .layer(metrics.layer())
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait out delayed ACKs (~40 ms).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            draining,
        )
        .await?;
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when
/// this is called, not when the future is first polled: call it first thing,
/// so that a signal during start-up already means "shut down gracefully".
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let (Ok(mut interrupt), Ok(mut terminate)) = (interrupt, terminate) else {
                tracing::warn!("cannot listen for signals; stop the process some other way");
                return std::future::pending().await;
            };
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
            tracing::info!("shutdown signal received; finishing in-flight calls");
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received; finishing in-flight calls");
    }
}

/// Binds `addr`, with the address in the error when it is taken.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))
}

/// Serves `metrics` on `addr` in the background; an empty address turns it off.
pub async fn spawn_metrics(
    metrics: &Metrics,
    addr: &str,
    db: Db,
) -> anyhow::Result<Option<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    Ok(Some(tokio::spawn(metrics.clone().serve(listener, db))))
}
