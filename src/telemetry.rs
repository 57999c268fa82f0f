//! Logging and tracing: `tracing` to stderr, plain or JSON, level from
//! `RUST_LOG`; and OpenTelemetry spans, exported over OTLP (HTTP/protobuf)
//! when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not otherwise.
//!
//! Trace context is W3C `traceparent`: an RPC that carries one continues
//! its trace (src/grpc/observe.rs), and each Kongtie request carries the
//! context of its own span (src/upstream). Without an exporter the spans
//! are still made, so the context still flows; they are just not sent.

use std::{
    io::{BufWriter, IsTerminal},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, HeaderName};
use opentelemetry::{global, trace::TraceContextExt, trace::TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::LogFormat;

/// Keeps the log writer and the span exporter; dropping it writes out the
/// log lines still queued and sends the spans still batched.
#[must_use = "dropping it stops the log writer and the span export"]
pub struct Telemetry {
    provider: SdkTracerProvider,
    _log_writer: tracing_appender::non_blocking::WorkerGuard,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Log lines queued beyond the writer's buffer (stderr not keeping up).
const LOG_QUEUE_LINES: usize = 128_000;

static DROPPED_LOG_LINES: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Log lines dropped because stderr did not keep up (0 without `init`).
pub fn dropped_log_lines() -> u64 {
    DROPPED_LOG_LINES
        .get()
        .map_or(0, |c| c.dropped_lines() as u64)
}

/// Whether spans are exported: an OTLP endpoint is configured.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Lines are formatted on the calling thread and written by a thread of
    // their own, in batches: no write(2) per RPC on a runtime thread, and a
    // stderr that blocks (a full pipe, a slow log shipper) holds up no
    // call. If it stays blocked past LOG_QUEUE_LINES lines, lines are
    // dropped, never calls, and counted (kongtie_log_lines_dropped).
    let (writer, log_writer) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("kongtie-log")
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let _ = DROPPED_LOG_LINES.set(writer.error_counter());
    let logs = match format {
        LogFormat::Plain => fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => fmt::layer().json().with_writer(writer).boxed(),
    };
    global::set_text_map_propagator(TraceContextPropagator::new());
    let mut provider = SdkTracerProvider::builder();
    let mut export_error = None;
    if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => provider = provider.with_batch_exporter(exporter),
            Err(e) => export_error = Some(e.to_string()),
        }
    }
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("kongtie-gateway");
    }
    let provider = provider.with_resource(resource.build()).build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("kongtie-gateway"))
        // What a span costs on every call: no busy/idle timing (a clock
        // read at each poll), no code location, no thread.
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        // Our spans only (no span of a library's inner workings), and of
        // the events only warnings and errors, which become span events:
        // the per-call INFO line is the log's, not the trace's.
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target().starts_with("kongtie_gateway")
                && (meta.is_span() || *meta.level() <= tracing::Level::WARN)
        }));
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .with(filter)
        .try_init();
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "OTLP span export is configured but could not start; spans are not exported");
    } else if otlp_configured() {
        tracing::info!("spans are exported over OTLP (OTEL_EXPORTER_OTLP_ENDPOINT)");
    }
    Telemetry {
        provider,
        _log_writer: log_writer,
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Continues the caller's trace in `span`, when the request carries a
/// valid `traceparent`.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !headers.contains_key(&TRACEPARENT) {
        return;
    }
    let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The current span's trace context as request headers (`traceparent`,
/// `tracestate`), for a call to Kongtie.
pub fn trace_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(&mut headers))
        });
    }
    headers
}

/// A warning that may repeat many times a second (each failed accept, each
/// failed checkpoint) is logged at most once per interval, with the number
/// of repeats it stood for.
pub struct RateLimited {
    interval: Duration,
    burst: u32,
    /// When the current interval began, lines logged in it, and how many
    /// were suppressed since the last one logged.
    state: Mutex<(Option<Instant>, u32, u64)>,
}

impl RateLimited {
    /// One line per interval.
    pub fn new(interval: Duration) -> Self {
        Self::with_burst(interval, 1)
    }

    /// Up to `burst` lines per interval.
    pub fn with_burst(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst: burst.max(1),
            state: Mutex::new((None, 0, 0)),
        }
    }

    /// Calls `log` with the number suppressed since the last line logged,
    /// unless the interval's lines are used up.
    pub fn log(&self, log: impl FnOnce(u64)) {
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (began, logged, suppressed) = &mut *state;
            if began.is_none_or(|t| t.elapsed() >= self.interval) {
                *began = Some(Instant::now());
                *logged = 0;
            }
            if *logged >= self.burst {
                *suppressed += 1;
                return;
            }
            *logged += 1;
            std::mem::take(suppressed)
        };
        log(suppressed);
    }
}
