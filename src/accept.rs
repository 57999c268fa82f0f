//! Accepting a listener's TCP connections, shared by the notify and gRPC
//! listeners:
//!
//! - open connections are capped: past the cap, accepting waits (the
//!   kernel queues new connections) until one closes;
//! - an accept error (out of file descriptors) is logged at WARN,
//!   rate-limited, and backed off (up to a second) rather than retried in a
//!   spin: nothing will change at once;
//! - but a listening socket that no longer listens (shut down or destroyed
//!   under us, e.g. by `ss -K`: accept says EINVAL) never will again: that
//!   ends the listener, and with it the process (see `startup`).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use crate::{metrics::ListenerMetrics, telemetry::RateLimited};

pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    errors: RateLimited,
    backoff: Duration,
    metrics: ListenerMetrics,
    name: &'static str,
}

/// An open connection's place under the cap: it counts the connection
/// open until dropped, then records why it ended.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: ListenerMetrics,
    reason: &'static str,
}

impl Slot {
    /// Why the connection ended (a metric label), if not `closed`.
    pub fn set_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.connections.dec();
        self.metrics.closed(self.reason);
    }
}

impl Acceptor {
    pub fn new(
        listener: TcpListener,
        max_connections: usize,
        metrics: ListenerMetrics,
        name: &'static str,
    ) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections)),
            errors: RateLimited::new(Duration::from_secs(10)),
            backoff: Duration::ZERO,
            metrics,
            name,
        }
    }

    /// The next connection, once one is under the cap; TCP_NODELAY set
    /// (without it, an answer's last frames wait on the client's delayed
    /// ACK: about 40 ms a call, measured). An error only when the socket
    /// can accept no more (see [`is_fatal`]). Cancel-safe.
    pub async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr, Slot)> {
        loop {
            if self.slots.available_permits() == 0 {
                self.metrics.waits.inc();
            }
            let permit = Arc::clone(&self.slots)
                .acquire_owned()
                .await
                .expect("never closed");
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff = Duration::ZERO;
                    let _ = stream.set_nodelay(true);
                    self.metrics.connections.inc();
                    let slot = Slot {
                        _permit: permit,
                        metrics: self.metrics.clone(),
                        reason: "closed",
                    };
                    return Ok((stream, peer, slot));
                }
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    drop(permit);
                    self.backoff =
                        (self.backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    let name = self.name;
                    self.errors.log(|suppressed| {
                        tracing::warn!(error = %e, suppressed, "the {name} listener cannot accept")
                    });
                    self.metrics.accept_errors.inc();
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }
}

/// An accept error no wait will cure: the socket is no longer listening.
pub fn is_fatal(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidInput
}
