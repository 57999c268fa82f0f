//! The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the
//! process answers) and `/readyz` (not shutting down, and the store can
//! write). Keep it off the internet.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::sync::watch;

use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    writable: watch::Receiver<bool>,
}

/// `ready` is true until shutdown begins; `writable` while the store can
/// write (a notification could not be stored otherwise).
pub fn router(
    metrics: Arc<Metrics>,
    ready: watch::Receiver<bool>,
    writable: watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            metrics,
            ready,
            writable,
        })
}

async fn metrics_text(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if !*state.ready.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down")
    } else if !*state.writable.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the store cannot write",
        )
    } else {
        (StatusCode::OK, "ready")
    }
}
