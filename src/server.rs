//! What every storegate server has besides its own service: health checks
//! that say SERVING only when the service can answer, server reflection (v1
//! and v1alpha), gRPC-Web with CORS, a gate that fails calls fast while the
//! database is gone, and graceful shutdown on a signal.

use std::{
    convert::Infallible,
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Method};
use tokio::net::TcpListener;
use tonic::{
    codegen::{BoxFuture, Service},
    server::NamedService,
    service::{Routes, RoutesBuilder},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_layer::Layer as _;

use crate::{
    Db,
    config::CommonConfig,
    connections::{self, CallLimits},
    db_health::DbHealth,
    metrics::Metrics,
};

/// The routes every server starts from: health and reflection. The caller
/// adds its own service and hands the reporter to [`serve`].
/// `file_descriptor_set` describes the caller's service alone (e.g.
/// [`crate::pb::PRODUCT_FILE_DESCRIPTOR_SET`]): reflection lists every
/// service in the sets it is given, and must not list one this server does
/// not serve.
pub fn base_routes(file_descriptor_set: &'static [u8]) -> anyhow::Result<(RoutesBuilder, HealthReporter)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(file_descriptor_set)
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

/// A service that answers UNAVAILABLE until start-up has opened it, and
/// while the database is known to be gone. The server listens (and health
/// says NOT_SERVING) from the first moment; the API answers once the
/// database, its schema and the keys are there.
pub struct Gate<S> {
    open: Arc<OnceLock<(S, DbHealth)>>,
}

impl<S> Clone for Gate<S> {
    fn clone(&self) -> Self {
        Gate { open: self.open.clone() }
    }
}

impl<S> Default for Gate<S> {
    fn default() -> Self {
        Gate { open: Arc::new(OnceLock::new()) }
    }
}

impl<S> Gate<S> {
    /// Lets calls through to `service`; failing fast while `db` is down.
    pub fn open(&self, service: S, db: DbHealth) {
        if self.open.set((service, db)).is_err() {
            tracing::warn!("a service gate was opened twice; the first service stays");
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

fn unavailable(message: &'static str) -> http::Response<tonic::body::Body> {
    tonic::Status::unavailable(message).into_http()
}

impl<S, ResBody> Service<http::Request<tonic::body::Body>> for Gate<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        // Readiness of the inner service is awaited per call below.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let Some((service, db)) = self.open.get() else {
            return Box::pin(async { Ok(unavailable("the server is starting; try again")) });
        };
        if !db.is_up() {
            return Box::pin(async { Ok(unavailable("the database is unavailable; try again")) });
        }
        let (mut service, db) = (service.clone(), db.clone());
        Box::pin(async move {
            let call = async {
                std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
                Ok(service.call(request).await?.map(tonic::body::Body::new))
            };
            // A call in flight when the database goes is answered now, not
            // after the pool's acquire timeout or a TCP timeout. As with a
            // client that gives up, its outcome is then unknown: a write is
            // committed or rolled back whole, and retrying it with its
            // request_id is applied once. (The probe declares the database
            // gone only after the kept and a new connection both failed.)
            tokio::select! {
                response = call => response,
                () = db.went_down() => Ok(unavailable("the database is unavailable; try again")),
            }
        })
    }
}

/// Plain HTTP GETs a server answers beside gRPC, on the same port: those
/// under `/.well-known/` (auth-service: OpenID discovery and the JWK Set,
/// for gateways that check tokens themselves). Given the request's head;
/// HEAD is answered as GET without the body.
pub type HttpGets = Arc<
    dyn Fn(http::request::Parts) -> BoxFuture<http::Response<tonic::body::Body>, Infallible> + Send + Sync,
>;

/// A plain HTTP POST a server answers beside gRPC (auth-service: the OAuth
/// 2.0 token endpoint), given the request's head and its whole body.
pub type HttpPost = Arc<
    dyn Fn(http::request::Parts, bytes::Bytes) -> BoxFuture<http::Response<tonic::body::Body>, Infallible>
        + Send
        + Sync,
>;

/// The plain HTTP a server answers beside gRPC.
#[derive(Clone, Default)]
pub struct HttpRoutes {
    /// GET and HEAD under `/.well-known/`.
    pub gets: Option<HttpGets>,
    /// POSTs to exactly these paths.
    pub posts: Vec<(&'static str, HttpPost)>,
}

/// The most a plain HTTP POST's body may hold: an OAuth 2.0 token request
/// is a few hundred bytes, a signed client assertion a few kilobytes.
pub const MAX_HTTP_POST_BYTES: usize = 16 * 1024;

/// Sends GET and HEAD requests under `/.well-known/` and POSTs to the
/// routes' paths to [`HttpRoutes`], and everything else on. Outermost,
/// since tonic-web answers any HTTP/1.1 request that is not gRPC-Web with
/// 400.
#[derive(Clone)]
struct WithHttpGets<S> {
    inner: S,
    gets: Option<HttpGets>,
    posts: Vec<(&'static str, HttpPost)>,
    /// How long a POST's body may take to arrive.
    body_timeout: Duration,
}

/// Reads a POST's whole body, within `MAX_HTTP_POST_BYTES` and `timeout`,
/// and hands it to `post`; 413 or 408 in plain text otherwise.
async fn answer_post(
    post: HttpPost,
    request: http::Request<tonic::body::Body>,
    timeout: Duration,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt as _;
    let (parts, body) = request.into_parts();
    let plain = |status: http::StatusCode, text: &'static str| {
        let mut response = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(text.as_bytes()),
        )));
        *response.status_mut() = status;
        response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    let limited = http_body_util::Limited::new(body, MAX_HTTP_POST_BYTES);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(collected)) => post(parts, collected.to_bytes()).await.unwrap_or_else(|never| match never {}),
        Ok(Err(_)) => plain(http::StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large or broken\n"),
        Err(_) => plain(http::StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time\n"),
    }
}

impl<S> Service<http::Request<tonic::body::Body>> for WithHttpGets<S>
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.method() == Method::POST
            && let Some((_, post)) = self.posts.iter().find(|(path, _)| request.uri().path() == *path)
        {
            let answer = answer_post(post.clone(), request, self.body_timeout);
            return Box::pin(async move { Ok(answer.await) });
        }
        let get = matches!(*request.method(), Method::GET | Method::HEAD)
            && request.uri().path().starts_with("/.well-known/");
        match &self.gets {
            Some(gets) if get => {
                let (parts, _) = request.into_parts();
                let head = parts.method == Method::HEAD;
                let answer = gets(parts);
                Box::pin(async move {
                    let response = answer.await?;
                    Ok(if head { response.map(|_| tonic::body::Body::empty()) } else { response })
                })
            }
            _ => Box::pin(self.inner.call(answer_text_as_text(request))),
        }
    }
}

/// A gRPC-Web call in text (base64) mode without an `accept` header that
/// names gRPC-Web: tonic-web picks the answer's encoding from `accept`
/// alone, and would answer such a call in binary, which a client that
/// speaks text cannot read. The request's own content type is what it
/// speaks.
fn answer_text_as_text<B>(mut request: http::Request<B>) -> http::Request<B> {
    let headers = request.headers();
    let text = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc-web-text"));
    let accepts_grpc_web = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/grpc-web")));
    if text && !accepts_grpc_web {
        let content_type = headers[http::header::CONTENT_TYPE].clone();
        request.headers_mut().insert(http::header::ACCEPT, content_type);
    }
    request
}

/// What a server's start-up hands over once the API is open.
pub struct Started {
    pub db: Db,
    pub db_health: DbHealth,
    /// Besides the database, what must hold for SERVING (product-service:
    /// token keys loaded).
    pub also_ready: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Background work that ends with the server.
    pub background: Vec<tokio::task::JoinHandle<()>>,
}

/// How long in-flight calls and open streams may take to finish once the
/// server stops accepting.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);

/// How often health looks at `also_ready` (the database's state it is told).
const READINESS_POLL: Duration = Duration::from_millis(250);

/// Reports the server's state on `grpc.health.v1.Health`: the overall
/// status ("") and its own service's.
struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }

    /// SERVING while the database answers and `also_ready` holds,
    /// NOT_SERVING otherwise: a load balancer then sends calls to replicas
    /// that can do them. Never returns.
    async fn follow(&self, started: &Started) {
        let mut last = None;
        let mut db = started.db_health.clone();
        loop {
            let db_up = db.is_up();
            let ready = db_up && started.also_ready.as_ref().is_none_or(|ready| ready());
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            if last != Some(status) {
                tracing::info!(serving = ready, database = db_up, "readiness changed");
                self.set(status).await;
                last = Some(status);
            }
            tokio::select! {
                // A probe that has stopped (None) leaves only the timer.
                Some(_) = db.changed() => {}
                () = tokio::time::sleep(READINESS_POLL) => {}
            }
        }
    }
}

/// Serves `routes` on `listener` (gRPC over HTTP/2, gRPC-Web over HTTP/1.1)
/// at once, reporting NOT_SERVING, while `start` opens the database and the
/// service's [`Gate`]; then health follows the database. A failed start
/// stops the server and returns its error. When `shutdown` completes, health
/// turns NOT_SERVING first, the server keeps serving for `shutdown_grace`
/// (so load balancers stop sending calls), stops accepting, and lets
/// in-flight calls finish.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    routes: RoutesBuilder,
    reporter: HealthReporter,
    service: &'static str,
    metrics: &Metrics,
    listener: TcpListener,
    config: &CommonConfig,
    start: impl Future<Output = anyhow::Result<Started>>,
    shutdown: impl Future<Output = ()>,
    http: HttpRoutes,
) -> anyhow::Result<()> {
    // The start-up, the lifecycle and the server are large futures (debug
    // builds): on the heap, so that a caller awaiting `serve` in place (a
    // test on its thread's stack) holds only pointers.
    let start = Box::pin(start);
    let health = Health { reporter, service };
    health.set(ServingStatus::NotServing).await;
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let mut outcome: Option<anyhow::Result<Started>> = None;
    let lifecycle = async {
        let mut shutdown = std::pin::pin!(shutdown);
        let started = tokio::select! {
            started = start => started,
            // A signal during start-up: nothing was served, stop at once.
            () = &mut shutdown => return,
        };
        let started = match started {
            Ok(started) => started,
            Err(e) => {
                outcome = Some(Err(e));
                return;
            }
        };
        tokio::select! {
            () = health.follow(&started) => {}
            () = &mut shutdown => {}
        }
        health.set(ServingStatus::NotServing).await;
        outcome = Some(Ok(started));
        tracing::info!(grace = ?grace, "reporting NOT_SERVING; draining");
        tokio::time::sleep(grace).await;
    };
    // Ends when the lifecycle has ended and the drain has had its time:
    // long-lived streams (Health/Watch, held open by some balancers) would
    // otherwise keep a stopping or failed server alive for ever.
    let ended = tokio::sync::Notify::new();
    let lifecycle = Box::pin(async {
        lifecycle.await;
        ended.notify_one();
    });
    let drain_limit = async {
        ended.notified().await;
        tokio::time::sleep(DRAIN_LIMIT).await;
        tracing::warn!(limit = ?DRAIN_LIMIT, "calls or streams still open after the drain limit; stopping anyway");
    };
    let tls = config.server_tls()?;
    let limits = &config.limits;
    raise_open_files_limit(limits.max_connections);
    let reload = tls.clone().map(|tls| {
        let interval = Duration::from_secs(config.tls_reload_interval_secs.max(1));
        tokio::spawn(tls.keep_current(interval))
    });
    tracing::info!(tls = tls.is_some(), mtls = config.tls_client_ca_file.is_some(), "serving");
    let grpc = cors_layer(&config.cors_allowed_origins).layer(tonic_web::GrpcWebLayer::new().layer(
        // Innermost: sees gRPC-Web calls already translated to gRPC.
        metrics.layer().layer(CallLimits::new(routes.routes().prepare(), limits)),
    ));
    let service = WithHttpGets {
        inner: grpc,
        gets: http.gets,
        posts: http.posts,
        body_timeout: Duration::from_secs(limits.request_timeout_secs),
    };
    let server = connections::serve(listener, tls, limits, service, lifecycle);
    tokio::select! {
        () = Box::pin(server) => {}
        () = drain_limit => {}
    };
    if let Some(reload) = reload {
        reload.abort();
    }
    match outcome {
        Some(Ok(started)) => {
            for task in &started.background {
                task.abort();
            }
            started.db.close().await;
            Ok(())
        }
        Some(Err(e)) => Err(e.context("start-up failed")),
        None => Ok(()),
    }
}

/// Lifts the soft limit on open files to the hard one (as Go's runtime
/// does), so that the connection cap, not EMFILE, is what bounds
/// connections; warns when even the hard limit is below the cap.
fn raise_open_files_limit(max_connections: u32) {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        // Room for the database pool, files and the listener besides.
        let needed = libc::rlim_t::from(max_connections) + 128;
        if limit.rlim_cur < needed {
            tracing::warn!(
                open_files = limit.rlim_cur,
                max_connections,
                "the open-files limit is below MAX_CONNECTIONS; connections beyond it fail to be accepted"
            );
        }
    }
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
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    let metrics = metrics.clone();
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = metrics.serve(listener, db).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    })))
}
