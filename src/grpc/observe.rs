//! What every RPC leaves behind, gRPC and Connect alike (a Connect call
//! reaches this layer already turned into its gRPC call):
//!
//! - the usual gRPC server metrics, `grpc_server_started_total`,
//!   `grpc_server_handled_total{grpc_code}` and the
//!   `grpc_server_handling_seconds` histogram, labelled by `grpc_type`,
//!   `grpc_service` and `grpc_method` (paths we do not serve count as
//!   `unknown`, so a scanner cannot grow the label set);
//! - a span per call (`grpc`, with the method, and the order id where a
//!   handler fills it in), continuing the caller's `traceparent`;
//! - one log line when the call ends, with its code and latency: INFO, or
//!   DEBUG for health checks and reflection (probes every few seconds would
//!   drown the log), WARN for our own faults. No header is logged.

use std::{
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, HeaderName, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prost::Message;
use tonic::Code;
use tower::{Layer, Service};
use tracing::{Level, Span};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use crate::{
    metrics::{Metrics, RpcLabels},
    telemetry::RateLimited,
};

/// How one served path is labelled.
#[derive(Debug)]
struct Rpc {
    service: &'static str,
    method: &'static str,
    /// unary, server_stream, client_stream, bidi_stream
    kind: &'static str,
    /// Health and reflection: logged at DEBUG.
    quiet: bool,
}

const UNKNOWN: Rpc = Rpc {
    service: "unknown",
    method: "unknown",
    kind: "unknown",
    quiet: false,
};

/// Every served path, read once from the descriptor sets the server
/// serves, sorted by path.
fn routes() -> &'static [(String, Rpc)] {
    static ROUTES: OnceLock<Vec<(String, Rpc)>> = OnceLock::new();
    ROUTES.get_or_init(|| {
        let mut routes = Vec::new();
        for (set, quiet) in [
            (crate::proto::FILE_DESCRIPTOR_SET, false),
            (tonic_health::pb::FILE_DESCRIPTOR_SET, true),
            (tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET, true),
            (tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET, true),
        ] {
            let set = prost_types::FileDescriptorSet::decode(set).expect("a descriptor set");
            for file in set.file {
                for service in &file.service {
                    let full = format!("{}.{}", file.package(), service.name());
                    let service_name: &'static str = full.clone().leak();
                    for method in &service.method {
                        let kind = match (method.client_streaming(), method.server_streaming()) {
                            (false, false) => "unary",
                            (false, true) => "server_stream",
                            (true, false) => "client_stream",
                            (true, true) => "bidi_stream",
                        };
                        routes.push((
                            format!("/{full}/{}", method.name()),
                            Rpc {
                                service: service_name,
                                method: method.name().to_owned().leak(),
                                kind,
                                quiet,
                            },
                        ));
                    }
                }
            }
        }
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        routes
    })
}

/// One RPC's metric handles, each taken from its family on first use (a
/// method never called exports no series) and then kept.
struct Route {
    rpc: &'static Rpc,
    labels: RpcLabels,
    started: OnceLock<Counter>,
    seconds: OnceLock<Histogram>,
    /// By code number.
    handled: [OnceLock<Counter>; 17],
}

impl Route {
    fn new(rpc: &'static Rpc) -> Self {
        Self {
            rpc,
            labels: RpcLabels {
                grpc_type: rpc.kind,
                grpc_service: rpc.service,
                grpc_method: rpc.method,
            },
            started: OnceLock::new(),
            seconds: OnceLock::new(),
            handled: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

/// The routes of one server (one [`Metrics`]): by path, sorted, looked up
/// by binary search.
struct Table {
    metrics: Arc<Metrics>,
    /// Calls that failed by our fault are logged at WARN, up to 50 lines a
    /// second: a client that makes the server fail its streams on purpose
    /// must not flood the log (every call is still counted).
    warnings: RateLimited,
    routes: Vec<(&'static str, Route)>,
    unknown: Route,
}

/// A route of a [`Table`]: its index, or none for a path nobody serves.
#[derive(Clone, Copy)]
struct RouteId(Option<usize>);

impl Table {
    fn find(&self, path: &str) -> RouteId {
        RouteId(self.routes.binary_search_by(|(p, _)| (*p).cmp(path)).ok())
    }

    fn route(&self, id: RouteId) -> &Route {
        id.0.map_or(&self.unknown, |i| &self.routes[i].1)
    }

    fn started(&self, route: &Route) {
        route
            .started
            .get_or_init(|| self.metrics.rpc_started(&route.labels))
            .inc();
    }

    fn handled(&self, route: &Route, code: Code, seconds: f64) {
        let index = (code as usize).min(16);
        route.handled[index]
            .get_or_init(|| self.metrics.rpc_handled(&route.labels, code_label(code)))
            .inc();
        route
            .seconds
            .get_or_init(|| self.metrics.rpc_seconds(&route.labels))
            .observe(seconds);
    }
}

/// gRPC's name of a code, as the metric label of every gRPC library.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Our own faults, logged at WARN.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented
    )
}

#[derive(Clone)]
pub struct ObserveLayer {
    table: Arc<Table>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let routes = routes()
            .iter()
            .map(|(path, rpc)| (path.as_str(), Route::new(rpc)))
            .collect();
        Self {
            table: Arc::new(Table {
                metrics,
                warnings: RateLimited::with_burst(Duration::from_secs(1), 50),
                routes,
                unknown: Route::new(&UNKNOWN),
            }),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            table: Arc::clone(&self.table),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    table: Arc<Table>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Observe<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let id = self.table.find(request.uri().path());
        let route = self.table.route(id);
        self.table.started(route);
        let rpc = route.rpc;
        let span = if rpc.quiet {
            tracing::debug_span!("grpc", method = request.uri().path())
        } else {
            tracing::info_span!(
                "grpc",
                method = request.uri().path(),
                out_trade_id = tracing::field::Empty
            )
        };
        crate::telemetry::continue_trace(&span, request.headers());
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let table = Arc::clone(&self.table);
        let started = Instant::now();
        Box::pin(async move {
            // The handler runs in the call's span.
            let response = tracing::Instrument::instrument(call, span.clone()).await?;
            let mut finish = Finish {
                table,
                id,
                quiet: rpc.quiet,
                started,
                span,
                done: false,
            };
            // Trailers-only: the status is in the headers.
            if let Some(code) = code_in(response.headers()) {
                finish.record(code);
            }
            Ok(response.map(|body| ObservedBody { body, finish }))
        })
    }
}

fn code_in(headers: &HeaderMap) -> Option<Code> {
    static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    let value = headers.get(&GRPC_STATUS)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(Code::Unknown, Code::from_i32),
    )
}

/// Records the call's end once: at its trailers, or, for a body dropped
/// before them (the client went away), as CANCELLED.
struct Finish {
    table: Arc<Table>,
    id: RouteId,
    quiet: bool,
    started: Instant,
    span: Span,
    done: bool,
}

impl Finish {
    fn record(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let seconds = self.started.elapsed().as_secs_f64();
        self.table.handled(self.table.route(self.id), code, seconds);
        let micros = (seconds * 1e6) as u64;
        let fault = is_server_fault(code);
        let code = code_label(code);
        let level = if fault {
            Level::WARN
        } else if self.quiet {
            Level::DEBUG
        } else {
            Level::INFO
        };
        let _entered = self.span.enter();
        match level {
            Level::WARN => self.table.warnings.log(|suppressed| {
                tracing::warn!(code = %code, latency_us = micros, suppressed, "rpc finished")
            }),
            Level::DEBUG => tracing::debug!(code = %code, latency_us = micros, "rpc finished"),
            _ => tracing::info!(code = %code, latency_us = micros, "rpc finished"),
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if !self.done {
            self.record(Code::Cancelled);
        }
    }
}

/// The response body, watched for the trailers that carry the status.
pub struct ObservedBody<B> {
    body: B,
    finish: Finish,
}

impl<B: HttpBody + Unpin> HttpBody for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_in) {
                    this.finish.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish.record(Code::Unknown),
            Poll::Ready(None) if !this.finish.done => {
                // A body that ended without trailers: a gRPC status was
                // in the headers (recorded then) or it was not gRPC.
                this.finish.record(Code::Unknown)
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
