//! Prometheus metrics, served on a port of their own: calls by method and
//! gRPC status with latency histograms, database pool use, and what a
//! service adds (auth-service: login outcomes).

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tonic::codegen::{BoxFuture, Service, http};
use tracing::Instrument as _;

use crate::Db;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms … ~8 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.000_25, 2.0, 16))
}

/// The `/package.Service/Method` paths the servers answer: anything else a
/// client sends is counted as "unknown", so that made-up paths cannot grow
/// the label set without bound.
fn known_methods() -> HashSet<String> {
    use prost::Message as _;
    let mut known = HashSet::new();
    for set in [crate::pb::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else { continue };
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
    }
    for version in ["v1", "v1alpha"] {
        known.insert(format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"));
    }
    known
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConflictLabels {
    outcome: &'static str,
}

/// Transactions the database rolled back for a conflict, by what was done
/// about it. Process-wide: the stores that meet conflicts hold no metrics
/// handle, and one process (`storegate up`) may run both services.
static TRANSACTION_CONFLICTS: std::sync::LazyLock<Family<ConflictLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);

/// Counts a transaction conflict: `retried` or `gave_up`.
pub fn count_transaction_conflict(outcome: &'static str) {
    TRANSACTION_CONFLICTS.get_or_create(&ConflictLabels { outcome }).inc();
}

/// The count of conflicts with `outcome` so far in this process.
pub fn transaction_conflicts(outcome: &'static str) -> u64 {
    TRANSACTION_CONFLICTS.get_or_create(&ConflictLabels { outcome }).get()
}

/// A service's metrics: build, register extras, then serve and layer.
#[derive(Clone)]
pub struct Metrics {
    known_methods: Arc<HashSet<String>>,
    registry: Arc<std::sync::Mutex<Registry>>,
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pool_size: Gauge,
    pool_idle: Gauge,
}

impl Metrics {
    pub fn new(service: &str) -> Metrics {
        let mut registry = Registry::with_prefix("storegate");
        let calls = Family::<CallLabels, Counter>::default();
        let latency =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let (pool_size, pool_idle) = (Gauge::default(), Gauge::default());
        registry.register(
            "grpc_calls",
            format!("gRPC calls {service} answered, by method and status code"),
            calls.clone(),
        );
        registry.register_with_unit(
            "grpc_call_duration",
            "Time from request to response trailers, by method",
            prometheus_client::registry::Unit::Seconds,
            latency.clone(),
        );
        registry.register("db_pool_connections", "Database connections open in the pool", pool_size.clone());
        registry.register(
            "db_pool_idle_connections",
            "Database connections idle in the pool",
            pool_idle.clone(),
        );
        // Both outcomes' series from the start, at 0, so that increase()
        // sees the first conflict (an alert on it fires).
        for outcome in ["retried", "gave_up"] {
            drop(TRANSACTION_CONFLICTS.get_or_create(&ConflictLabels { outcome }));
        }
        registry.register(
            "db_transaction_conflicts",
            "Transactions the database rolled back for a conflict (deadlock, Galera certification), \
             by outcome: retried, or gave_up after the last attempt",
            TRANSACTION_CONFLICTS.clone(),
        );
        Metrics {
            known_methods: Arc::new(known_methods()),
            registry: Arc::new(std::sync::Mutex::new(registry)),
            calls,
            latency,
            pool_size,
            pool_idle,
        }
    }

    /// Adds a service's own metric.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        self.registry.lock().unwrap_or_else(|e| e.into_inner()).register(name, help, metric);
    }

    fn record(&self, method: &str, code: tonic::Code, started: Instant) {
        let method = if self.known_methods.contains(method) { method } else { "unknown" };
        let code = format!("{code:?}");
        self.calls.get_or_create(&CallLabels { method: method.to_owned(), code }).inc();
        self.latency
            .get_or_create(&MethodLabels { method: method.to_owned() })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The text exposition, with the pool gauges read now.
    pub fn render(&self, db: &Db) -> String {
        let (size, idle) = crate::on_db!(db, pool => (pool.size(), pool.num_idle()));
        self.pool_size.set(i64::from(size));
        self.pool_idle.set(idle as i64);
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            text.clear();
        }
        text
    }

    /// Serves `GET /metrics` on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener, db: Db) -> anyhow::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, db) = (self.clone(), db.clone());
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.render(&db),
                    )
                }
            }),
        );
        axum::serve(listener, app).await?;
        Ok(())
    }

    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer { metrics: self.clone() }
    }
}

/// Counts every call with its final gRPC status, read from the response
/// headers (trailers-only answers) or from the trailers at the end of the body.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl<S> tower_layer::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

/// Reads a `grpc-status` header value.
fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(value))
}

impl<S, B, ResBody> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Body + Send + Unpin + 'static,
{
    type Response = http::Response<RecordingBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The call's span lives until its status is known (the trailers of
        // a streamed answer).
        let span = crate::telemetry::call_span(&method, request.headers());
        let call = {
            let _entered = span.enter();
            inner.call(request)
        };
        Box::pin(
            async move {
                let response = call.await?;
                let span = tracing::Span::current();
                let mut pending = Some(Pending { metrics, method, started, span });
                if let Some(code) = status_of(response.headers())
                    && let Some(p) = pending.take()
                {
                    p.finish(code);
                }
                Ok(response.map(|inner| RecordingBody { inner, pending }))
            }
            .instrument(span),
        )
    }
}

struct Pending {
    metrics: Metrics,
    method: String,
    started: Instant,
    span: tracing::Span,
}

impl Pending {
    fn finish(self, code: tonic::Code) {
        self.metrics.record(&self.method, code, self.started);
        crate::telemetry::record_status(&self.span, code);
    }
}

/// A response body that records the call when its trailers go by (or, if
/// the body ends or is dropped without any, as UNKNOWN / CANCELLED).
pub struct RecordingBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> RecordingBody<B> {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(p) = self.pending.take() {
            p.finish(code);
        }
    }
}

impl<B> Drop for RecordingBody<B> {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

impl<B: Body + Unpin> Body for RecordingBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    self.finish(code);
                }
            }
            Poll::Ready(None) => self.finish(tonic::Code::Unknown),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_methods_the_servers_answer_get_their_own_label() {
        let known = known_methods();
        for method in [
            "/storegate.auth.v1.AuthService/BeginLogin",
            "/storegate.product.v1.ProductService/AdjustStock",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(known.contains(method), "{method}");
        }
        assert!(!known.contains("/made.Up/Path"));
    }
}
