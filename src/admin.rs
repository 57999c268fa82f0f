//! The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the
//! process answers) and `/readyz` (not shutting down, and the store can
//! write). Keep it off the internet.
//!
//! It is served by axum over [`AdminListener`], which ends the server when
//! its socket can accept no more (axum's own loop would retry forever,
//! leaving a process without an admin port but still reported healthy).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

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

/// Serves `app` on `listener` until `stop` completes; an error when the
/// listening socket can accept no more.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (dead_tx, dead) = oneshot::channel();
    let listener = AdminListener {
        listener,
        dead: Some(dead_tx),
        errors: crate::telemetry::RateLimited::new(Duration::from_secs(10)),
    };
    let serve = axum::serve(listener, app).with_graceful_shutdown(stop);
    tokio::select! {
        served = serve => served,
        Ok(e) = dead => Err(e),
    }
}

/// A TCP listener for axum that reports, rather than retries, an accept
/// error no wait will cure.
struct AdminListener {
    listener: TcpListener,
    dead: Option<oneshot::Sender<std::io::Error>>,
    errors: crate::telemetry::RateLimited,
}

impl axum::serve::Listener for AdminListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                Err(e) if crate::accept::is_fatal(&e) => {
                    if let Some(dead) = self.dead.take() {
                        let _ = dead.send(e);
                    }
                    std::future::pending::<()>().await;
                }
                // A connection that went before it was taken.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                    ) => {}
                // Out of file descriptors and the like: as axum does.
                Err(e) => {
                    self.errors.log(|suppressed| {
                        tracing::warn!(error = %e, suppressed, "admin listener: accepting failed; trying again in 1 s")
                    });
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
