//! Logging and tracing set-up. `RUST_LOG` picks what is logged, `LOG_FORMAT`
//! how. OpenTelemetry traces are exported over OTLP/gRPC when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, and off otherwise; the SDK reads the rest of the `OTEL_*`
//! variables itself (`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER` and its
//! `_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`, ...);
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.
//!
//! With traces on, every call is a server span (`crate::metrics` opens it,
//! the W3C `traceparent` of the request its parent) with the gRPC status
//! code, every SQL statement a client span under it (its text, which binds
//! parameters as `?`, never a value), and the call's log lines carry its
//! `trace_id`. SQL text never reaches the log itself.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use opentelemetry::{
    KeyValue,
    propagation::{Extractor, Injector},
    trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, filter::Targets, fmt, layer::Context, prelude::*,
    registry::LookupSpan,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Whether traces are exported (then the database logs each statement to
/// [`StatementSpans`], see `crate::db`).
static TRACES_ON: AtomicBool = AtomicBool::new(false);

/// True when this process exports traces.
pub fn traces_on() -> bool {
    TRACES_ON.load(Ordering::Relaxed)
}

/// Flushes and stops the trace exporter when dropped: keep it alive in
/// `main` until the process is done.
#[must_use = "traces are flushed when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Whether the `OTEL_*` environment asks for traces.
fn traces_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The OTLP/gRPC exporter and its provider. Must run inside the Tokio
/// runtime: the exporter's channel belongs to it.
fn tracer_provider(service_name: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, when set, names the service (the builder reads it).
    let resource = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        resource
    } else {
        resource.with_service_name(service_name)
    };
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build())
}

/// Installs the global subscriber (and, when the environment asks for it,
/// the trace exporter). Call once, from a binary's `main`, inside the Tokio
/// runtime. Logs go to stderr: stdout carries what a command prints for its
/// reader (`storegate up`'s addresses, the client's `--json`).
pub fn init(format: LogFormat, service_name: &'static str) -> TelemetryGuard {
    init_logging_at(format, service_name, "info")
}

/// [`init`] with another log filter than `info` when `RUST_LOG` is unset
/// (the command-line client logs only warnings: its output is for people).
pub fn init_logging_at(
    format: LogFormat,
    service_name: &'static str,
    default_filter: &str,
) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Statement logs carry SQL text: never into the log, whatever RUST_LOG says.
    let filter = filter.add_directive("sqlx::query=off".parse().expect("a valid directive"));
    // Colours only for a person at a terminal, not in files and collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let log = match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_filter(filter).boxed(),
    };
    let mut warning = None;
    let provider = if traces_configured() {
        match tracer_provider(service_name) {
            Ok(provider) => Some(provider),
            Err(e) => {
                warning = Some(format!("{e:#}"));
                None
            }
        }
    } else {
        None
    };
    let traces = provider.as_ref().map(|provider| {
        let tracer = provider.tracer("storegate");
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        opentelemetry::global::set_tracer_provider(provider.clone());
        TRACES_ON.store(true, Ordering::Relaxed);
        // Spans and events of the services and libraries at INFO; the
        // statement events become spans of their own below instead.
        let spans = tracing_opentelemetry::layer().with_tracer(tracer.clone()).with_filter(
            Targets::new().with_default(LevelFilter::INFO).with_target("sqlx::query", LevelFilter::OFF),
        );
        let statements = StatementSpans { tracer }
            .with_filter(Targets::new().with_target("sqlx::query", LevelFilter::TRACE));
        spans.and_then(statements)
    });
    tracing_subscriber::registry().with(log).with(traces).init();
    if let Some(e) = warning {
        tracing::warn!(error = %e, "OTLP trace export is configured but cannot start; traces are off");
    } else if provider.is_some() {
        tracing::info!("exporting traces over OTLP");
    }
    TelemetryGuard { provider }
}

/// The statement's text and timing from sqlx's per-statement event.
#[derive(Default)]
struct Statement {
    summary: String,
    text: String,
    elapsed_secs: f64,
    rows_affected: Option<i64>,
    rows_returned: Option<i64>,
}

impl tracing::field::Visit for Statement {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_owned(),
            "db.statement" => self.text = value.trim().to_owned(),
            _ => {}
        }
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = value;
        }
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        let value = i64::try_from(value).ok();
        match field.name() {
            "rows_affected" => self.rows_affected = value,
            "rows_returned" => self.rows_returned = value,
            _ => {}
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

/// Turns sqlx's event after each statement into a client span under the
/// current span: sqlx opens no span of its own, but reports every
/// statement once it is done, with its text and how long it took.
struct StatementSpans {
    tracer: SdkTracer,
}

impl<S> Layer<S> for StatementSpans
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut statement = Statement::default();
        event.record(&mut statement);
        if statement.summary.is_empty() {
            return;
        }
        // sqlx gives the full text only when the summary shortened it.
        let text = if statement.text.is_empty() { statement.summary.clone() } else { statement.text };
        let parent = tracing::Span::current().context();
        let end = SystemTime::now();
        let start = end.checked_sub(Duration::from_secs_f64(statement.elapsed_secs.max(0.0))).unwrap_or(end);
        let mut attributes = vec![KeyValue::new("db.query.text", text)];
        if let Some(rows) = statement.rows_returned {
            attributes.push(KeyValue::new("db.response.returned_rows", rows));
        }
        if let Some(rows) = statement.rows_affected {
            attributes.push(KeyValue::new("db.response.affected_rows", rows));
        }
        let mut span = self
            .tracer
            .span_builder(statement.summary)
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        span.end_with_timestamp(end);
    }
}

/// Reads `traceparent` (and `tracestate`) from HTTP headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// The span of one call: the caller's trace (W3C `traceparent` in
/// `headers`) as its parent, and its trace id as a field, so that every log
/// line of the call shows it. Without traces, none (logs stay as they were,
/// at no cost per call).
pub fn call_span(path: &str, headers: &http::HeaderMap) -> tracing::Span {
    if !traces_on() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: "storegate::rpc",
        "call",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.grpc.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// Records a call's final status on its span: ERROR for what the server
/// did wrong, not for a caller's mistake.
pub fn record_status(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i32);
    use tonic::Code::*;
    if matches!(code, Internal | Unavailable | Unknown | DataLoss | DeadlineExceeded) {
        span.record("otel.status_code", "ERROR");
    }
}

/// Puts the current span's trace into `headers` as W3C `traceparent`, for
/// an outgoing call (nothing without traces).
pub fn inject_current(headers: &mut http::HeaderMap) {
    if traces_on() {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(headers));
        });
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse())
        {
            self.0.insert(key, value);
        }
    }
}

/// Puts the current span's trace into a call's metadata.
fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    if traces_on() {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut MetadataInjector(metadata));
        });
    }
}

/// `message` as a request that carries the current trace on to the called
/// service.
pub fn traced_request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    inject_metadata(request.metadata_mut());
    request
}

/// A tonic interceptor that passes the current trace on to the called
/// service.
pub fn propagate(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    inject_metadata(request.metadata_mut());
    Ok(request)
}
