//! The notify listener's connections: our own accept loop over hyper's
//! HTTP/1.1, so that a client which connects and then stalls cannot hold
//! the listener shut.
//!
//! - A connection must deliver a request's headers within the read timeout
//!   of opening, or of its previous answer (hyper's header read timeout,
//!   which also ends idle keep-alive connections); the handler gives the
//!   body the same time (see `listener`).
//! - Open connections are capped, and accept errors backed off
//!   (`crate::accept`).
//! - At shutdown, a connection whose whole request is in hand finishes it;
//!   every other one (idle, or half-sent) is closed at once, so a stalled
//!   client cannot make shutdown wait out its grace period.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::ConnectInfo};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tower::ServiceExt;
use tracing::debug;

use crate::{accept::Acceptor, metrics::Metrics};

/// How the listener treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a connection has to send a request's headers (from opening, or
    /// from its previous answer), and then its body.
    pub read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Requests of one connection whose whole body is in hand and whose answer
/// is not yet sent. Handlers find it in the request's extensions.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a request as in flight until the guard drops.
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    fn is_idle(&self) -> bool {
        self.0.load(Ordering::SeqCst) == 0
    }
}

pub struct InFlightGuard(InFlight);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `app` on `listener` until `stopping` turns true, then closes
/// every connection without a whole request in hand and waits for the
/// others to answer. An error when the listening socket could accept no
/// more (its open connections are still let finish).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut acceptor = Acceptor::new(
        listener,
        limits.max_connections,
        metrics.notify_listener.clone(),
        "notify",
    );
    let mut connections = JoinSet::new();
    let mut ended = Ok(());
    loop {
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
        let (stream, peer, mut slot) = tokio::select! {
            accepted = acceptor.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    ended = Err(e);
                    break;
                }
            },
            () = stopped(&mut stopping) => break,
        };
        let (app, stopping) = (app.clone(), stopping.clone());
        connections.spawn(async move {
            slot.set_reason(connection(stream, peer, app, limits, stopping).await);
        });
    }
    drop(acceptor);
    while connections.join_next().await.is_some() {}
    ended
}

/// Serves one connection; returns why it ended (a metric label).
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
) -> &'static str {
    let in_flight = InFlight::default();
    let requests = in_flight.clone();
    let service = app.map_request(move |mut request: axum::extract::Request<_>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(requests.clone());
        request
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stopped(&mut stopping) => {
            if in_flight.is_idle() {
                return "shutdown";
            }
            // Answer what is in hand, then close.
            conn.as_mut().graceful_shutdown();
            return match conn.await {
                Ok(()) => "shutdown",
                Err(_) => "error",
            };
        }
    };
    match ended {
        Ok(()) => "closed",
        Err(e) if e.is_timeout() => "read_timeout",
        Err(e) => {
            debug!(error = %e, "notify connection failed");
            "error"
        }
    }
}

/// Completes once `stopping` is true (or its sender is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|s| *s).await;
}
